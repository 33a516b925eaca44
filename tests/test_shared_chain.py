"""Shared experts (`num_shared_attention_groups`, `num_shared_mlp_experts`) and Chain-of-Experts (`mlp_chain_length`).

Shared experts: exact against the dense model at full routing (a transformers Llama through `from_dense`), against
the float64 plain-loop reference (`tests/reference_uoe.py`) when sparse, on the masked, gathered and Triton
(interpreter) paths; padding selects none of them; routers and router losses see only the routed experts.
Chain-of-Experts: C=1 is the plain layer (same parameters, same output), C=2 equals two UoME blocks applied by hand.
Both: KV-cache decoding equals the full pass, checkpoints load (also as remote code), Trainer steps run, FLOPs.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from uoe import UoEConfig, UoEForCausalLM, UoERouterStatsCallback, estimate_flops_per_token
from uoe.modeling_uoe import UoERouter, select_experts

from .helpers import chunked_decoding_error, count_kernel_calls, require_triton, returned_cache, tiny_config, tiny_model
from .reference_uoe import reference_logits
from .remote_code import logits_without_uoe

SHARED = dict(num_shared_attention_groups=1, num_shared_mlp_experts=1)  # 4 heads / 4 experts: 1 shared + 2 of 3
CHAIN = dict(mlp_chain_length=2)
BACKENDS = ["masked", "gathered"]


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


# -- configuration ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, name",
    [
        (dict(num_shared_attention_groups=4, attention_top_k=1), "num_shared_attention_groups"),  # all 4 shared
        (dict(num_shared_attention_groups=3, attention_top_k=2), "num_shared_attention_groups"),  # 3 + 2 > 4
        (dict(num_shared_attention_groups=-1), "num_shared_attention_groups"),
        (dict(num_shared_attention_groups=True), "num_shared_attention_groups"),
        (dict(num_shared_attention_groups=1.0), "num_shared_attention_groups"),
        (dict(num_shared_mlp_experts=5, mlp_top_k=1), "num_shared_mlp_experts"),
        (dict(num_shared_mlp_experts=3, mlp_top_k=2), "num_shared_mlp_experts"),
        (dict(num_shared_mlp_experts=-2), "num_shared_mlp_experts"),
        (dict(num_shared_mlp_experts=False), "num_shared_mlp_experts"),
        (dict(mlp_chain_length=0), "mlp_chain_length"),
        (dict(mlp_chain_length=-1), "mlp_chain_length"),
        (dict(mlp_chain_length=True), "mlp_chain_length"),
        (dict(mlp_chain_length=2.0), "mlp_chain_length"),
    ],
)
def test_invalid_values_raise_at_construction(overrides, name):
    with pytest.raises(ValueError, match=name):
        tiny_config(**overrides)


def test_routers_score_only_the_routed_experts_and_chain_routers_are_extra_parameters():
    model = tiny_model(num_shared_attention_groups=1, num_shared_mlp_experts=2, mlp_top_k=1, **CHAIN)
    layer = model.model.layers[0]
    assert layer.self_attn.router.weight.shape == (3, 32)
    assert layer.mlp.router.weight.shape == layer.mlp.chain_routers[0].weight.shape == (2, 32)
    plain = set(tiny_model().state_dict())
    assert set(tiny_model(mlp_chain_length=1).state_dict()) == plain  # C=1: today's parameter names
    extra = set(model.state_dict()) - plain
    assert extra == {f"model.layers.{i}.mlp.chain_routers.0.weight" for i in range(2)}


# -- shared experts: full routing is the dense model -------------------------------------------------------------------


def dense_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        num_hidden_layers=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_routing_with_shared_experts_equals_the_dense_llama(backend):
    llama = dense_llama()
    overrides = dict(num_shared_attention_groups=1, num_shared_mlp_experts=2)  # union, top_k = routed count
    model = UoEForCausalLM.from_dense(llama, num_mlp_experts=4, routing_backend=backend, **overrides).eval()
    config = model.config
    assert config.attention_top_k == 4 - config.num_shared_attention_groups and config.is_full_routing
    input_ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = llama(input_ids).logits, model(input_ids).logits
    assert max_rel_error(actual, expected) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_gates_scale_only_the_routed_experts(backend):
    """`gate_mode="weighted"` with 2 shared and 2 routed head groups / MLP experts, every routed one selected: the
    routed experts are scaled by their renormalised scores (< 1), the shared ones by exactly 1. With one routing patch
    per sequence this is the dense Llama with those factors applied to each head's output before o_proj and to each
    hidden unit before down_proj (head group g = head g, expert e = units [16e, 16e + 16)). With one routed expert
    per block every gate is 1 and the config says full routing.

    Planted bug: shared experts given the gate of the first routed expert instead of 1. (Before, the weighted case had
    one routed expert, whose renormalised gate is exactly 1, so a wrong shared gate was 1 as well.)"""
    llama, seq = dense_llama(), 12
    model = UoEForCausalLM.from_dense(
        llama,
        num_mlp_experts=4,
        num_shared_attention_groups=2,
        num_shared_mlp_experts=2,
        gate_mode="weighted",
        routing_patch_size=seq,
        routing_backend=backend,
    ).eval()
    assert (model.config.attention_top_k, model.config.mlp_top_k) == (2, 2) and not model.config.is_full_routing
    input_ids = torch.randint(0, 97, (3, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids, output_router_logits=True)
    hooks = []
    for index, layer in enumerate(llama.model.layers):
        for module, logits, width in (
            (layer.self_attn.o_proj, out.router_logits[2 * index], 8),  # head_dim 8
            (layer.mlp.down_proj, out.router_logits[2 * index + 1], 16),  # 64 units / 4 experts
        ):
            routed = logits[:, 0].double().softmax(-1)  # top-2 of 2: the renormalised scores are the scores
            assert float(routed.max()) < 0.99
            gates = torch.cat([torch.ones(3, 2, dtype=torch.float64), routed], -1).float()
            per_column = gates.repeat_interleave(width, -1)[:, None, :]
            hooks.append(module.register_forward_pre_hook(lambda m, a, g=per_column: (a[0] * g,)))
    try:
        with torch.no_grad():
            expected = llama(input_ids).logits
    finally:
        for hook in hooks:
            hook.remove()
    assert max_rel_error(out.logits, expected) <= 1e-5
    one_routed = dict(num_shared_attention_groups=3, num_shared_mlp_experts=3, gate_mode="weighted")
    assert UoEForCausalLM.from_dense(llama, num_mlp_experts=4, **one_routed).config.is_full_routing


# -- shared experts and chains against the plain-loop reference --------------------------------------------------------

REFERENCE_CASES = {
    "shared_union": dict(SHARED),
    "shared_weighted_patches": dict(SHARED, gate_mode="weighted", routing_patch_size=2),
    "shared_gqa": dict(
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        num_shared_attention_groups=2,
        attention_top_k=1,
        num_shared_mlp_experts=2,
        mlp_top_k=1,
    ),
    "chain2": dict(CHAIN),
    "chain3_shared_weighted": dict(SHARED, mlp_chain_length=3, gate_mode="weighted", mlp_top_k=1),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides", REFERENCE_CASES.values(), ids=REFERENCE_CASES.keys())
def test_sparse_routing_matches_plain_loop_reference(overrides, backend):
    model = tiny_model(5, routing_backend=backend, **overrides).double()
    input_ids = torch.randint(0, 61, (13,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        outputs = model(torch.tensor([input_ids]), output_router_logits=True)
    blocks = model.config.num_hidden_layers * (1 + model.config.mlp_chain_length)
    assert len(outputs.router_logits) == blocks
    chosen = outputs.router_logits[0][0].argmax(-1)
    assert len(set(chosen.tolist())) > 1  # the routing differs between tokens
    expected = reference_logits(model, input_ids)
    assert float((outputs.logits[0] - expected).abs().max()) <= 1e-5  # float64, but router scores are float32


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_router_losses_cover_the_routed_experts_of_every_block_in_execution_order(score_func):
    """aux_loss and router_z_loss are the means of the Switch loss and the z-loss over the routed blocks (SMHA, then
    the C UoME iterations of each layer), recomputed here by the plain loops of `tests/test_routing.py` from the
    returned router logits, over the routed experts only and the non-padding tokens only (left and right padding).

    Planted bugs: a shared-expert model's router losses counting padding tokens; a chain iteration's losses counting
    padding tokens. (Before, only plain models were tested with padding.)"""
    from .test_routing import switch_loss_by_hand, z_loss_by_hand

    model = tiny_model(7, router_score_func=score_func, **SHARED, **CHAIN)
    input_ids = torch.randint(0, 61, (3, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(input_ids)
    mask[0, :4] = 0
    mask[2, 7:] = 0
    with torch.no_grad():
        outputs = model(input_ids, attention_mask=mask, output_router_logits=True)
    widths = [logits.shape[-1] for logits in outputs.router_logits]
    assert widths == [3, 3, 3] * 2  # layer: SMHA, UoME iteration 0, iteration 1; 4 experts minus 1 shared
    rows = mask.bool().tolist()
    balance, z = [], []
    for logits, k in zip(outputs.router_logits, [2, 2, 2] * 2, strict=True):
        logits = logits.double()
        scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
        top_index = scores.argsort(-1, descending=True)[..., :k]
        balance.append(switch_loss_by_hand(scores, top_index, rows))
        z.append(z_loss_by_hand(logits, rows))
    assert float(outputs.aux_loss) == pytest.approx(sum(balance) / len(balance), rel=1e-5)
    assert float(outputs.router_z_loss) == pytest.approx(sum(z) / len(z), rel=1e-5)
    # counting the padding would change both values
    padded_z = [z_loss_by_hand(logits.double(), None) for logits in outputs.router_logits]
    assert abs(sum(padded_z) / len(padded_z) - float(outputs.router_z_loss)) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_selects_no_expert_not_even_shared_ones(backend):
    """A left-padded row's real tokens get the logits they get alone: had padding selected the shared head group,
    real tokens would attend the padding keys in it."""
    model = tiny_model(2, routing_backend=backend, num_shared_attention_groups=2, num_shared_mlp_experts=1)
    sequence = torch.randint(0, 61, (9,), generator=torch.Generator().manual_seed(6))
    batch = torch.cat([torch.zeros(4, dtype=torch.long), sequence])[None].repeat(2, 1)
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    batch[1, 4:] = torch.randint(0, 61, (9,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        batched = model(batch, attention_mask=mask).logits[0, 4:]
        alone = model(sequence[None]).logits[0]
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


def test_encoder_data_selection_never_drops_shared_experts():
    """The encoder's data selection (`data_capacity`) limits the routed experts only: every patch keeps its shared
    experts (first slots, gate 1), and each routed expert keeps exactly the ceil(0.3 x 8) = 3 best-scored of the
    patches that chose it (recomputed here by a loop), per sequence; the length bound covers every token.

    Planted bug: the kept-patch count rounded down (`int(c * num_patches)` = 2), which the former upper bound at a
    whole-number capacity (`<= ceil(0.25 x 8)`) let through."""
    config = tiny_config(
        is_causal=False, data_capacity=0.3, num_shared_mlp_experts=2, mlp_top_k=1, routing_patch_size=2
    )
    torch.manual_seed(0)
    router = UoERouter(32, 2)
    torch.nn.init.normal_(router.weight)
    hidden = torch.randn(2, 1 + 16, 32)
    selection = select_experts(router, hidden, 1, config, None, None, "mlp", num_shared=2)
    cls, routed = selection.slots
    assert torch.equal(cls.index[0, 0], torch.arange(4))
    assert torch.equal(routed.index[..., :2], torch.arange(2).expand(2, 16, 2))
    assert bool(routed.keep[..., :2].all()) and torch.equal(routed.gate[..., :2], torch.ones(2, 16, 2))
    # the routed slot, by a loop: patch p chose its best routed expert; each expert keeps its 3 best choosers
    with torch.no_grad():
        scores = (hidden[:, 1:].double().view(2, 8, 2, 32).mean(2) @ router.weight.double().T).softmax(-1)
    for b in range(2):
        chosen = [int(scores[b, p].argmax()) for p in range(8)]
        kept = set()
        for expert in (0, 1):
            choosers = [p for p in range(8) if chosen[p] == expert]
            kept |= set(sorted(choosers, key=lambda p: -float(scores[b, p, expert]))[:3])
        assert len(kept) < 8  # data selection dropped a pair
        for t in range(16):
            assert int(routed.index[b, t, 2]) == 2 + chosen[t // 2]
            assert bool(routed.keep[b, t, 2]) == (t // 2 in kept), (b, t)
    assert selection.max_list_length == 17


def test_image_classifier_with_shared_experts_and_data_selection_matches_the_plain_loop_reference():
    """Shared head groups and MLP experts with data selection at capacity 0.3 x 16 patches = 4.8 -> 5 kept per routed
    expert: both paths equal the float64 encoder loop of `tests/reference_encoder.py`.

    Planted bugs: data selection that also drops shared experts; the kept count rounded down. (Before, the test only
    compared the two paths, which share the selection code.)"""
    from uoe import UoEForImageClassification

    from .reference_encoder import reference_image_logits

    def config(**overrides) -> UoEConfig:
        return UoEConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, attention_top_k=1, intermediate_size=64,
            num_mlp_experts=4, mlp_top_k=1, mlp_type="gelu", mlp_bias=True, is_causal=False, norm_type="layernorm",
            position_embedding_type="learned", image_size=16, patch_size=4, num_labels=3, initializer_range=0.2,
            data_capacity=0.3, num_shared_attention_groups=1, num_shared_mlp_experts=2, **overrides,
        )  # fmt: skip

    pixel_values = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = None
    for backend in BACKENDS:
        torch.manual_seed(0)
        model = UoEForImageClassification(config(routing_backend=backend)).eval().double()
        if expected is None:
            expected = reference_image_logits(model, pixel_values)
        with torch.no_grad():
            actual = model(pixel_values).logits
        torch.testing.assert_close(
            actual, expected, rtol=0, atol=1e-5, msg=lambda m, backend=backend: f"{backend}: {m}"
        )
    with pytest.raises(ValueError, match="mlp_chain_length"):
        UoEForImageClassification(config(mlp_chain_length=2))


# -- Chain-of-Experts: C=1 is today's block, C=2 two blocks by hand -----------------------------------------------------


def test_chain_of_one_is_todays_layer():
    """A chain of 1 has the plain layer's parameters and computes the plain layer, x + SMHA(norm x), then
    x + UoME(norm x): the float64 plain-loop reference's layer (sparse routing, routing patches of 2, both paths).

    Planted bug: the UoME block routing every token from itself instead of from its patch's first token. (Before, the
    test compared two identical models and a layer with itself rebuilt from its own modules, which share any bug.)"""
    assert set(tiny_model(mlp_chain_length=1).state_dict()) == set(tiny_model().state_dict())
    input_ids = torch.randint(0, 61, (13,), generator=torch.Generator().manual_seed(8)).tolist()
    for backend in BACKENDS:
        model = tiny_model(3, mlp_chain_length=1, routing_patch_size=2, routing_backend=backend).double()
        with torch.no_grad():
            actual = model(torch.tensor([input_ids])).logits[0]
        expected = reference_logits(model, input_ids)
        assert float((actual - expected).abs().max()) <= 1e-5, backend


def copies_of(layer, config_overrides: dict, mlp_router: torch.Tensor):
    """A separate plain (chain of 1) decoder layer holding copies of `layer`'s attention and norms, and a UoME block
    whose router is `mlp_router`: built from its own modules, so the chain's code computes none of the by-hand
    result."""
    plain = tiny_model(0, **config_overrides).model.layers[0]
    state = {n: p for n, p in layer.state_dict().items() if ".chain_routers." not in n}
    plain.load_state_dict({**state, "mlp.router.weight": mlp_router}, strict=True)
    return plain


@pytest.mark.parametrize("shared", [{}, SHARED], ids=["routed", "shared"])
def test_chain_of_two_equals_two_blocks_applied_by_hand(shared):
    """A chain of 2 is the plain layer (attention, then a UoME block with the first router) followed by a second
    residual UoME block with the same experts and norm and the chain's second router, all computed by a separate
    chain-of-1 layer (`copies_of`), whose function the test above holds to the reference.

    Planted bug: every chain iteration routed by the first router (`iteration` not passed on)."""
    model = tiny_model(4, mlp_chain_length=2, **shared)
    layer = model.model.layers[0]
    first = copies_of(layer, shared, layer.mlp.router.weight)
    second = copies_of(layer, shared, layer.mlp.chain_routers[0].weight)
    input_ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(9))
    captured = {}
    layer.register_forward_hook(lambda m, args, out: captured.update(x=args[0], pe=args[1], r=args[2], out=out[0]))
    with torch.no_grad():
        model(input_ids)
        x, routing = captured["x"], captured["r"]
        h = first(x, captured["pe"], routing)[0]  # x + SMHA(norm x), then + UoME_0(norm .)
        h = h + second.mlp(second.post_attention_layernorm(h), routing)[0]
        torch.testing.assert_close(captured["out"], h, rtol=0, atol=1e-6)
        # and the second iteration matters: it is not the first block twice
        twice = first.mlp(first.post_attention_layernorm(h), routing)[0]
        assert float((second.mlp(second.post_attention_layernorm(h), routing)[0] - twice).abs().max()) > 1e-4


# -- KV cache, checkpoints, Trainer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "overrides",
    [dict(SHARED, routing_patch_size=3), dict(CHAIN, routing_patch_size=3), dict(SHARED, **CHAIN)],
    ids=["shared", "chain", "shared_chain"],
)
def test_cached_decoding_equals_the_full_pass(overrides, backend):
    model = tiny_model(6, routing_backend=backend, **overrides)
    assert chunked_decoding_error(model) <= 1e-5


def test_save_and_remote_code_load(tmp_path):
    model = tiny_model(1, num_shared_attention_groups=2, num_shared_mlp_experts=1, attention_top_k=1, **CHAIN)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    loaded = UoEForCausalLM.from_pretrained(folder).eval()
    assert (loaded.config.num_shared_attention_groups, loaded.config.mlp_chain_length) == (2, 2)
    inputs = {"input_ids": torch.randint(0, 61, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    inputs["attention_mask"][1, :3] = 0
    with torch.no_grad():
        expected = model(**inputs).logits
        assert torch.equal(loaded(**inputs).logits, expected)
    logits, info = logits_without_uoe(folder, inputs, tmp_path)
    assert info["class"] == "UoEForCausalLM" and not info["uoe_loaded"]
    assert torch.equal(logits, expected)


class RandomBlocks(torch.utils.data.Dataset):
    def __init__(self):
        self.data = torch.randint(0, 61, (16, 12), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[index], "labels": self.data[index]}


def test_trainer_steps_update_every_router(tmp_path):
    model = tiny_model(0, **SHARED, **CHAIN).train()
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if "router" in n}
    assert len(routers) == 2 * 3
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=True, seed=0, logging_steps=1,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=RandomBlocks(), callbacks=[UoERouterStatsCallback()])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor([entry["loss"] for entry in logs])))
    # every chain iteration's router is logged, over its routed experts (3 of 4: one is shared)
    for kind in ("attention", "mlp", "mlp_1"):
        loads = [logs[-1][f"router/layer_1/{kind}/load_{e}"] for e in range(3)]
        assert sum(loads) == pytest.approx(1.0, abs=1e-3) and f"router/layer_1/{kind}/load_3" not in logs[-1]
    params = dict(model.named_parameters())
    for name, before in routers.items():
        assert not torch.equal(params[name].detach(), before), f"{name} was not trained"


# -- Triton kernels under the interpreter -------------------------------------------------------------------------------


def test_triton_backend_with_shared_experts_and_chain_matches_masked(monkeypatch):
    """Logits, loss and every gradient through the SMHA and UoME kernels (float32, interpreter) against the masked
    path, on a left-padded batch; the kernels are counted so that a silent fallback fails."""
    require_triton()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = count_kernel_calls(monkeypatch)
    overrides = dict(SHARED, **CHAIN, num_hidden_layers=1, gate_mode="weighted")
    input_ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0
    results = {}
    for backend in ("masked", "triton"):
        model = tiny_model(12, routing_backend=backend, **overrides).train()
        out = model(input_ids, attention_mask=mask, labels=input_ids)
        out.loss.backward()
        results[backend] = (out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    assert calls == {"attention": 1, "experts": 2}  # one layer: SMHA, two UoME iterations
    (logits, loss, grads), (expected_logits, expected_loss, expected_grads) = results["triton"], results["masked"]
    assert max_rel_error(logits, expected_logits) <= 1e-4 and max_rel_error(loss, expected_loss) <= 1e-4
    for name, grad in expected_grads.items():
        assert grad is not None and grad.abs().max() > 0, name
        assert max_rel_error(grads[name], grad) <= 1e-4, name
    # KV-cache decoding through the kernels equals the masked full pass
    model.eval()
    with torch.no_grad():
        out = model(input_ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        logits = [out.logits]
        for start, end in ((5, 7), (7, 8)):
            out = model(
                input_ids[:, start:end], attention_mask=mask[:, :end], cache=returned_cache(out), use_cache=True
            )
            logits.append(out.logits)
    assert calls["attention"] == 4
    real = mask[:, :8].bool()
    assert max_rel_error(torch.cat(logits, 1)[real], expected_logits[:, :8][real]) <= 1e-4


# -- FLOPs -------------------------------------------------------------------------------------------------------------


def test_flops_estimate_counts_shared_experts_and_chain_iterations(monkeypatch):
    """The gathered path's grouped products (selected heads' q/k/v, selected MLP experts of every iteration) run
    exactly the estimate's active FLOPs for them (o_proj: one dense product, 1/4 of the projections)."""
    import uoe.gathered

    monkeypatch.setattr(uoe.gathered, "TOKEN_MAJOR_MAX_WEIGHTS", 0)
    seq_len, batch = 16, 2
    model = tiny_model(routing_backend="gathered", attention_top_k=1, mlp_top_k=1, **SHARED, **CHAIN)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 61, (batch, seq_len)))
    grouped = sum(count for op, count in counter.get_flop_counts()["Global"].items() if "grouped_mm" in str(op))
    estimate = estimate_flops_per_token(model.config, seq_len)
    b = estimate.breakdown
    assert grouped == pytest.approx((0.75 * b["attention_projections"] + b["mlp"]) * batch * seq_len, rel=1e-9)
    # by hand: 2 of 4 groups and 2 of 4 experts per token; the MLP twice per layer, in the dense model too
    dense = estimate_flops_per_token(tiny_config(attention_top_k=4, mlp_top_k=4), seq_len).breakdown
    assert b["mlp"] == pytest.approx(2 * dense["mlp"] * 2 / 4)
    assert b["attention_projections"] == pytest.approx(dense["attention_projections"] / 2)
    # scores: the shared group sees every key (1/4), the routed one 1/3 of the keys (1/4 * 1/3)
    assert b["attention_scores"] == pytest.approx(dense["attention_scores"] * (1 / 4 + 1 / 12))
    assert b["routers"] == pytest.approx(2 * 2 * 32 * (3 + 2 * 3))
    assert estimate.dense == pytest.approx(
        estimate_flops_per_token(tiny_config(attention_top_k=4, mlp_top_k=4), seq_len).dense + dense["mlp"]
    )
