"""Per-layer budgets (`layer_attention_top_k`, `layer_mlp_top_k`): validated in the config, honoured by every execution
path (masked, gathered, Triton under the interpreter) against the float64 plain-loop references, by cached decoding,
by the FLOPs estimate (against torch's FLOP counter on the gathered path) and by checkpoints loaded as remote code."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from uoe import UoEForCausalLM, estimate_flops_per_token
from uoe.flops import layer_flops_per_token

from .helpers import chunked_decoding_error, count_kernel_calls, require_triton, tiny_config, tiny_model
from .reference_uoe import reference_logits
from .remote_code import logits_without_uoe

# two layers whose budgets differ from each other and from the defaults (attention_top_k = mlp_top_k = 2)
BUDGETS = dict(layer_attention_top_k=[1, 3], layer_mlp_top_k=[3, 1])
BACKENDS = ["masked", "gathered"]


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max())


# -- configuration -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(layer_attention_top_k=[1]), r"layer_attention_top_k` must be None or a list of 2 integers"),
        (dict(layer_attention_top_k=[1, 2, 3]), "layer_attention_top_k"),
        (dict(layer_attention_top_k=[0, 2]), r"layer_attention_top_k\[0\]` must be an integer in \[1, 4\]"),
        (dict(layer_attention_top_k=[1, 5]), r"layer_attention_top_k\[1\]"),
        (dict(layer_attention_top_k=[1, True]), r"layer_attention_top_k\[1\]"),
        (dict(layer_attention_top_k=[1, 2.0]), r"layer_attention_top_k\[1\]"),
        (dict(layer_attention_top_k=3), "layer_attention_top_k"),
        (dict(layer_mlp_top_k=[2]), "layer_mlp_top_k"),
        (dict(layer_mlp_top_k=[2, 5]), r"layer_mlp_top_k\[1\]` must be an integer in \[1, 4\]"),
        # shared experts leave fewer routed ones: 4 groups, 2 shared -> at most 2 routed
        (dict(num_shared_attention_groups=2, attention_top_k=1, layer_attention_top_k=[2, 3]), r"\[1, 2\]"),
        (
            dict(num_shared_mlp_experts=1, layer_mlp_top_k=[4, 1]),
            r"layer_mlp_top_k\[0\]` must be an integer in \[1, 3\]",
        ),
        # MoEUT's grouping: one entry per distinct layer
        (dict(num_hidden_layers=4, num_layer_groups=2, layer_mlp_top_k=[1, 2, 3, 4]), "num_layer_groups"),
    ],
)
def test_invalid_budgets_raise_naming_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_budgets_are_read_per_layer_and_change_full_routing():
    config = tiny_config(**BUDGETS)
    assert [config.attention_top_k_at(i) for i in range(2)] == [1, 3]
    assert [config.mlp_top_k_at(i) for i in range(2)] == [3, 1]
    assert tiny_config(layer_mlp_top_k=(1, 2)).layer_mlp_top_k == [1, 2]  # tuples are stored as lists
    assert tiny_config(layer_attention_top_k=[4, 4], layer_mlp_top_k=[4, 4], attention_top_k=1).is_full_routing
    assert not tiny_config(attention_top_k=4, mlp_top_k=4, layer_mlp_top_k=[4, 3]).is_full_routing
    with pytest.raises(ValueError, match="layer_idx"):
        config.mlp_top_k_at(2)
    # a value set after construction is checked when a model is built from the config
    config.layer_mlp_top_k = [1, 9]
    with pytest.raises(ValueError, match=r"layer_mlp_top_k\[1\]"):
        UoEForCausalLM(config)
    model = tiny_model(**BUDGETS)
    assert [(layer.self_attn.top_k, layer.mlp.top_k) for layer in model.model.layers] == [(1, 3), (3, 1)]


# -- every path against the plain-loop reference ------------------------------------------------------------------------

REFERENCE_CASES = {
    "budgets": dict(BUDGETS),
    "budgets_weighted_patches": dict(BUDGETS, gate_mode="weighted", routing_patch_size=2),
    "budgets_shared_gqa": dict(
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        num_shared_attention_groups=1,
        attention_top_k=1,
        num_shared_mlp_experts=1,
        mlp_top_k=1,
        layer_attention_top_k=[3, 1],
        layer_mlp_top_k=[1, 3],
    ),
    "budgets_layer_groups": dict(num_hidden_layers=4, num_layer_groups=2, **BUDGETS),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides", REFERENCE_CASES.values(), ids=REFERENCE_CASES.keys())
def test_per_layer_budgets_match_plain_loop_reference(overrides, backend):
    """Planted bugs it catches: the blocks reading `attention_top_k` / `mlp_top_k` instead of their layer's entry;
    a layer reading another layer's entry (`layer_idx` off by one); the reference is independent of both."""
    model = tiny_model(5, routing_backend=backend, **overrides).double()
    input_ids = torch.randint(0, 61, (13,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        outputs = model(torch.tensor([input_ids]), output_router_logits=True)
    assert len(set(outputs.router_logits[0][0].argmax(-1).tolist())) > 1  # the routing differs between tokens
    expected = reference_logits(model, input_ids)
    assert max_abs_error(outputs.logits[0], expected) <= 1e-5  # float64, router scores float32
    # and the budgets matter: the same weights at the default top-k give other logits
    uniform = dict(model.config.to_dict(), layer_attention_top_k=None, layer_mlp_top_k=None)
    plain = UoEForCausalLM(type(model.config).from_dict(uniform)).double().eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert max_abs_error(plain(torch.tensor([input_ids])).logits[0], expected) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_classifier_per_layer_budgets_match_the_encoder_reference(backend):
    from uoe import UoEConfig, UoEForImageClassification

    from .reference_encoder import reference_image_logits

    config = UoEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, attention_top_k=2, intermediate_size=64,
        num_mlp_experts=4, mlp_top_k=2, mlp_type="gelu", mlp_bias=True, is_causal=False, norm_type="layernorm",
        position_embedding_type="learned", image_size=16, patch_size=4, num_labels=3, initializer_range=0.2,
        routing_backend=backend, **BUDGETS,
    )  # fmt: skip
    torch.manual_seed(0)
    model = UoEForImageClassification(config).eval().double()
    pixel_values = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        actual = model(pixel_values).logits
    torch.testing.assert_close(actual, reference_image_logits(model, pixel_values), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_decoding_with_budgets_equals_the_full_pass(backend):
    model = tiny_model(6, routing_backend=backend, routing_patch_size=3, **BUDGETS)
    assert chunked_decoding_error(model) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_static_cache_generation_with_budgets_equals_the_full_pass(backend):
    """Greedy generation with the static cache (fixed-size routing buffers) on a model whose layers select different
    numbers of groups and experts: every step's logits are the full forward's at that position (1e-4).

    Planted bug it catches (gathered path): the gathered decode step sizing its selection by the config's default
    `attention_top_k` instead of the layer's own (so does the dynamic-cache test above)."""
    model = tiny_model(7, routing_backend=backend, pad_token_id=0, **BUDGETS)
    ids = torch.randint(1, 61, (2, 36), generator=torch.Generator().manual_seed(12))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=5, do_sample=False, cache_implementation="static",
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        full_mask = torch.cat([mask, torch.ones(2, out.sequences.shape[1] - 36, dtype=mask.dtype)], 1)
        full = model(out.sequences, attention_mask=full_mask, use_cache=False).logits
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, 35 + step], rtol=1e-4, atol=1e-4)


def test_triton_backend_with_budgets_matches_masked(monkeypatch):
    """Logits, loss and every gradient through the SMHA and UoME kernels (float32, interpreter) against the masked
    path, whose function the reference test pins; the kernels are counted so that a silent fallback fails."""
    require_triton()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = count_kernel_calls(monkeypatch)
    input_ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0
    results = {}
    for backend in ("masked", "triton"):
        model = tiny_model(12, routing_backend=backend, gate_mode="weighted", **BUDGETS).train()
        out = model(input_ids, attention_mask=mask, labels=input_ids)
        out.loss.backward()
        results[backend] = (out.logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    assert calls == {"attention": 2, "experts": 2}
    (logits, grads), (expected_logits, expected_grads) = results["triton"], results["masked"]
    real = mask.bool()
    assert max_abs_error(logits[real], expected_logits[real]) <= 1e-4 * float(expected_logits.abs().max())
    for name, grad in expected_grads.items():
        assert grad is not None, name
        assert max_abs_error(grads[name], grad) <= 1e-4 * max(float(grad.abs().max()), 1e-6), name


# -- FLOPs ---------------------------------------------------------------------------------------------------------------


def test_flops_estimate_counts_each_layer_budget(monkeypatch):
    """The gathered path's grouped products (the selected groups' q/k/v and the selected MLP experts, layer by layer)
    run exactly the estimate's active FLOPs for them; the estimate is the sum of the per-layer counts, and a uniform
    list is the plain config.

    Planted bug it catches: the estimate using `attention_top_k` / `mlp_top_k` for every layer."""
    import uoe.gathered

    monkeypatch.setattr(uoe.gathered, "TOKEN_MAJOR_MAX_WEIGHTS", 0)  # grouped products even for this small model
    seq_len, batch = 16, 2
    model = tiny_model(routing_backend="gathered", layer_attention_top_k=[1, 2], layer_mlp_top_k=[3, 3])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 61, (batch, seq_len)))
    grouped = sum(count for op, count in counter.get_flop_counts()["Global"].items() if "grouped_mm" in str(op))
    estimate = estimate_flops_per_token(model.config, seq_len)
    b = estimate.breakdown
    # q, k and v are 3/4 of the projections (o_proj is one dense product here)
    assert grouped == pytest.approx((0.75 * b["attention_projections"] + b["mlp"]) * batch * seq_len, rel=1e-9)
    # by hand: layer 0 has 1 of 4 groups (scores 1/16), layer 1 2 groups (4/16); 3 of 4 experts in both
    dense = estimate_flops_per_token(tiny_config(attention_top_k=4, mlp_top_k=4), seq_len).breakdown
    assert b["attention_projections"] == pytest.approx(dense["attention_projections"] / 2 * (1 / 4 + 2 / 4))
    assert b["attention_scores"] == pytest.approx(dense["attention_scores"] / 2 * (1 / 16 + 4 / 16))
    assert b["mlp"] == pytest.approx(dense["mlp"] * 3 / 4)
    per_layer = [layer_flops_per_token(model.config, seq_len, i) for i in range(2)]
    assert estimate.active == pytest.approx(sum(sum(parts.values()) for parts in per_layer) + b["lm_head"])
    assert per_layer[1]["attention_projections"] == pytest.approx(2 * per_layer[0]["attention_projections"])
    # another budget for one layer, asked of `layer_flops_per_token`, is what that layer would cost
    assert layer_flops_per_token(model.config, seq_len, 0, attention_top_k=2) == pytest.approx(per_layer[1])
    uniform = estimate_flops_per_token(tiny_config(layer_attention_top_k=[2, 2], layer_mlp_top_k=[2, 2]), seq_len)
    assert uniform.active == pytest.approx(estimate_flops_per_token(tiny_config(), seq_len).active, rel=1e-12)


def test_layer_flops_rejects_budgets_outside_the_routed_experts():
    config = tiny_config(num_shared_mlp_experts=1, mlp_top_k=1)
    with pytest.raises(ValueError, match="mlp_top_k"):
        layer_flops_per_token(config, 16, 0, mlp_top_k=4)
    with pytest.raises(ValueError, match="seq_len"):
        layer_flops_per_token(config, 0, 0)


# -- checkpoints ---------------------------------------------------------------------------------------------------------


def test_save_and_remote_code_load_keep_the_budgets(tmp_path):
    model = tiny_model(1, **BUDGETS)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    loaded = UoEForCausalLM.from_pretrained(folder).eval()
    assert (loaded.config.layer_attention_top_k, loaded.config.layer_mlp_top_k) == ([1, 3], [3, 1])
    inputs = {"input_ids": torch.randint(0, 61, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    inputs["attention_mask"][1, :3] = 0
    with torch.no_grad():
        expected = model(**inputs).logits
        assert torch.equal(loaded(**inputs).logits, expected)
    logits, info = logits_without_uoe(folder, inputs, tmp_path)
    assert info["class"] == "UoEForCausalLM" and not info["uoe_loaded"]
    assert torch.equal(logits, expected)
