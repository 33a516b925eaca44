"""The gathered execution path (`routing_backend="gathered"`, the CPU default) against the masked reference.

Error measure: max |gathered - masked| / max |masked| per tensor, required <= 1e-5 in float32, for the logits and
every parameter's gradient. Also: its grouped products against a plain loop, KV-cache decoding and `generate`,
packed sequences against the sequences run alone, `torch.compile`, and the rows it computes (a silent dense
fallback would compute more).
"""

import pytest
import torch

import uoe
import uoe.gathered as gathered
import uoe.modeling_uoe as modeling
from uoe import UoEConfig, UoEForImageClassification
from uoe.gathered import grouped_mm

from .helpers import returned_cache, tiny_model

TOLERANCE = 1e-5


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def logits_and_grads(model, backend: str, **inputs):
    """Logits, loss and parameter gradients; without labels the loss is the sum of squared logits."""
    model.config.routing_backend = backend
    model.zero_grad(set_to_none=True)
    outputs = model(**inputs)
    loss = outputs.loss if outputs.loss is not None else outputs.logits.square().sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return outputs.logits.detach(), loss.detach(), grads


def assert_paths_agree(model, rounding_only: tuple[str, ...] = (), **inputs) -> None:
    """Logits, loss and every parameter gradient of the gathered path equal the masked reference's.

    `rounding_only`: name suffixes of parameters whose gradient is 0 in exact arithmetic (compared absolutely).
    """
    expected_logits, expected_loss, expected = logits_and_grads(model, "masked", **inputs)
    logits, loss, actual = logits_and_grads(model, "gathered", **inputs)
    assert max_rel_error(logits, expected_logits) <= TOLERANCE
    assert max_rel_error(loss, expected_loss) <= TOLERANCE
    assert actual.keys() == expected.keys()
    largest = max(float(grad.abs().max()) for grad in expected.values())
    for name, grad in expected.items():
        rounding = 1e-6 * largest
        if name.endswith(rounding_only) or (name.endswith("k_proj.bias") and grad.abs().max() < rounding):
            # without RoPE, softmax ignores a key bias (a shift shared by all keys): 0 up to rounding in both
            assert actual[name].abs().max() < rounding and grad.abs().max() < rounding, name
            continue
        assert grad.abs().max() > 0, f"{name}: no gradient in the reference"
        error = max_rel_error(actual[name], grad)
        assert error <= TOLERANCE, f"grad {name}: max relative error {error:.2e}"


def never_select_last_expert(model) -> None:
    """Every router's last expert scores far below the others, so no token selects it."""

    def hook(module, args, logits):
        return logits - 1e4 * torch.nn.functional.one_hot(torch.tensor(module.num_experts - 1), module.num_experts).to(
            logits.dtype
        )

    for module in model.modules():
        if isinstance(module, modeling.UoERouter):
            module.register_forward_hook(hook)


@pytest.fixture(params=["grouped", "token_major"])
def experts_layout(request, monkeypatch):
    """Run a test with the UoME experts (and decoding heads) as grouped products, and as token-major products (what
    models this small use below `TOKEN_MAJOR_MAX_WEIGHTS`)."""
    limit = 0 if request.param == "grouped" else 1 << 40
    monkeypatch.setattr(gathered, "TOKEN_MAJOR_MAX_WEIGHTS", limit)
    return request.param


# -- grouped products ---------------------------------------------------------------------------------------------------


def grouped_mm_by_loop(a, b, offsets):
    out, start = torch.zeros(a.shape[0], b.shape[2], dtype=a.dtype), 0
    for group, end in enumerate(offsets.tolist()):
        out[start:end] = a[start:end] @ b[group]
        start = end
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64_fallback"])
@pytest.mark.parametrize("shape", [(40, 32, 8), (37, 30, 7), (5, 3, 2)], ids=["aligned", "unaligned", "tiny"])
def test_grouped_mm_matches_a_loop_with_empty_groups_and_dropped_rows(dtype, shape):
    rows, inner, outer = shape
    torch.manual_seed(0)
    a = torch.randn(rows, inner, dtype=dtype, requires_grad=True)
    weight = torch.randn(4, outer, inner, dtype=dtype, requires_grad=True)
    offsets = torch.tensor([rows // 4, rows // 4, rows // 2, rows - 2], dtype=torch.int32)  # group 1 empty
    grad_out = torch.randn(rows, outer, dtype=dtype)
    results = []
    for fn in (grouped_mm, grouped_mm_by_loop):
        out = fn(a, weight.transpose(1, 2), offsets)
        (a_grad, w_grad) = torch.autograd.grad((out * grad_out).sum(), (a, weight))
        results.append((out, a_grad, w_grad))
    (out, a_grad, w_grad), (out_ref, a_ref, w_ref) = results
    limit = 1e-6 if dtype == torch.float32 else 1e-12
    for actual, expected in ((out, out_ref), (a_grad, a_ref), (w_grad, w_ref)):
        assert max_rel_error(actual, expected) <= limit
    assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))  # rows past the last group: exactly 0
    assert torch.equal(a_grad[-2:], torch.zeros_like(a_grad[-2:]))


def test_grouped_mm_accepts_an_expanded_gradient():
    # torch's own grouped_mm backward rejects the zero-stride gradient of `.sum()`
    a = torch.randn(12, 8, requires_grad=True)
    weight = torch.randn(3, 8, 4, requires_grad=True)
    offsets = torch.tensor([4, 8, 12], dtype=torch.int32)
    grouped_mm(a, weight, offsets).sum().backward()
    expected = torch.autograd.grad(grouped_mm_by_loop(a, weight, offsets).sum(), a)[0]
    assert max_rel_error(a.grad, expected) <= 1e-6


# -- the causal LM: gathered == masked -----------------------------------------------------------------------------------

LM_CASES = {
    "union": {},
    "weighted": dict(gate_mode="weighted"),
    "sigmoid": dict(router_score_func="sigmoid"),
    "weighted_sigmoid_patches": dict(gate_mode="weighted", router_score_func="sigmoid", routing_patch_size=3),
    "top1": dict(attention_top_k=1, mlp_top_k=1),
    "top_all": dict(attention_top_k=4, mlp_top_k=4),
    "gelu_biases": dict(mlp_type="gelu", attention_bias=True),
}


@pytest.mark.parametrize("overrides", LM_CASES.values(), ids=LM_CASES.keys())
def test_causal_lm_gathered_equals_masked(overrides, experts_layout):
    model = tiny_model(**overrides).train()
    input_ids = torch.randint(0, 61, (3, 13), generator=torch.Generator().manual_seed(1))
    assert_paths_agree(model, input_ids=input_ids, labels=input_ids)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("patch_size", [1, 2])
def test_causal_lm_gathered_equals_masked_with_padding(padding_side, patch_size, experts_layout):
    model = tiny_model(routing_patch_size=patch_size).train()
    input_ids = torch.randint(0, 61, (3, 12), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(input_ids)
    padded = slice(0, 5) if padding_side == "left" else slice(7, None)
    attention_mask[1, padded] = 0
    attention_mask[2, padded.start or 0 : (padded.stop or 12) - 2 if padding_side == "left" else None] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    assert_paths_agree(model, input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def test_causal_lm_gathered_equals_masked_with_packed_rows(experts_layout):
    model = tiny_model(routing_patch_size=2).train()
    input_ids = torch.randint(0, 61, (2, 14), generator=torch.Generator().manual_seed(3))
    position_ids = torch.tensor([list(range(5)) + list(range(6)) + list(range(3)), list(range(9)) + list(range(5))])
    assert_paths_agree(model, input_ids=input_ids, position_ids=position_ids, labels=input_ids)


def test_causal_lm_gathered_equals_masked_when_a_head_and_an_expert_are_never_selected():
    model = tiny_model().train()
    never_select_last_expert(model)
    input_ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(input_ids, output_router_logits=True).router_logits
    assert all((block.topk(2, -1).indices != 3).all() for block in logits)
    # the unused experts' weights get no gradient in either path (None or 0 for the whole expert)
    _, _, grads = logits_and_grads(model, "gathered", input_ids=input_ids, labels=input_ids)
    for layer in range(2):
        prefix = f"model.layers.{layer}."
        assert grads[prefix + "mlp.experts.gate_up_proj"][3].abs().max() == 0
        assert grads[prefix + "self_attn.q_proj.weight"].view(4, 8, 32)[3].abs().max() == 0
    # a zero gradient cannot be compared relatively: compare the rest of the model
    expected = logits_and_grads(model, "masked", input_ids=input_ids, labels=input_ids)
    actual = logits_and_grads(model, "gathered", input_ids=input_ids, labels=input_ids)
    assert max_rel_error(actual[0], expected[0]) <= TOLERANCE
    for name, grad in expected[2].items():
        if not name.endswith("k_proj.bias") and grad.abs().max() > 0:
            assert max_rel_error(actual[2][name], grad) <= TOLERANCE, name


def test_causal_lm_gathered_equals_masked_on_a_single_token():
    model = tiny_model().train()
    input_ids = torch.randint(0, 61, (2, 1), generator=torch.Generator().manual_seed(5))
    # one token has no next token (squared logits as the loss) and one key: softmax is 1 whatever q and k are
    assert_paths_agree(model, ("q_proj.weight", "k_proj.weight"), input_ids=input_ids)


# -- the image classifier: gathered == masked ----------------------------------------------------------------------------


def vision_model(**overrides) -> UoEForImageClassification:
    kwargs = dict(
        is_causal=False, norm_type="layernorm", position_embedding_type="learned", mlp_type="gelu", mlp_bias=True,
        attention_bias=True, image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, attention_top_k=2, intermediate_size=64, num_mlp_experts=4, mlp_top_k=2,
        num_labels=3, initializer_range=0.2, max_position_embeddings=17,
    )  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(6)
    model = UoEForImageClassification(UoEConfig(**kwargs)).train()
    with torch.no_grad():  # non-zero biases so that their handling is compared too
        for name, param in model.named_parameters():
            if name.endswith("bias") and "norm" not in name:
                param.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("capacity", [None, 0.25, 0.5, 1.0])
@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(routing_patch_size=2, position_embedding_type="rope", gate_mode="weighted"), dict(attention_top_k=1)],
    ids=["tokens", "patches_rope_weighted", "top1"],
)
def test_image_classifier_gathered_equals_masked(capacity, overrides, experts_layout):
    model = vision_model(data_capacity=capacity, **overrides)
    pixels = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    assert_paths_agree(model, pixel_values=pixels, labels=torch.tensor([0, 2, 1]))


# -- KV cache and generation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_size", [1, 3])
def test_cached_decoding_through_the_gathered_path_equals_its_full_pass(patch_size, experts_layout):
    model = tiny_model(routing_patch_size=patch_size, routing_backend="gathered")
    input_ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(8))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
        chunks, cache = [], None
        for start, end in ((0, 6), (6, 8), (8, 9), (9, 10), (10, 12)):
            out = model(input_ids[:, start:end], attention_mask=attention_mask[:, :end], cache=cache, use_cache=True)
            chunks.append(out.logits)
            cache = returned_cache(out)
    real = attention_mask.bool()
    assert max_rel_error(torch.cat(chunks, dim=1)[real], expected[real]) <= 1e-5


def test_a_cache_filled_by_one_path_decodes_the_same_with_the_other():
    """Prefill fills the layout every path reads: gathered prefill + masked decoding == masked throughout."""
    model = tiny_model()
    input_ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(9))
    results = {}
    for prefill_path, decode_path in (("gathered", "masked"), ("masked", "gathered"), ("masked", "masked")):
        with torch.no_grad():
            model.config.routing_backend = prefill_path
            cache = returned_cache(model(input_ids[:, :7], use_cache=True))
            model.config.routing_backend = decode_path
            results[prefill_path, decode_path] = torch.cat(
                [model(input_ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(7, 10)], 1
            )
    expected = results["masked", "masked"]
    assert max_rel_error(results["gathered", "masked"], expected) <= 1e-5
    assert max_rel_error(results["masked", "gathered"], expected) <= 1e-5


@pytest.mark.parametrize("patch_size", [1, 2])
def test_generate_with_and_without_cache_agree_on_the_gathered_path(patch_size):
    model = tiny_model(routing_patch_size=patch_size, routing_backend="gathered")
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(10))
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


# -- packed sequences ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["gathered", "masked"])
@pytest.mark.parametrize("patch_size", [1, 3])
def test_packed_rows_equal_their_sequences_run_alone(backend, patch_size):
    model = tiny_model(routing_patch_size=patch_size, routing_backend=backend)
    lengths = [[5, 7, 4], [9, 7]]
    sequences = [
        [torch.randint(0, 61, (n,), generator=torch.Generator().manual_seed(11 + 3 * r + i)) for i, n in enumerate(row)]
        for r, row in enumerate(lengths)
    ]
    input_ids = torch.stack([torch.cat(row) for row in sequences])
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    with torch.no_grad():
        packed = model(input_ids, position_ids=position_ids, use_cache=False).logits
        alone = [torch.cat([model(seq[None], use_cache=False).logits[0] for seq in row]) for row in sequences]
        unpacked = model(input_ids, use_cache=False).logits  # the same row read as one sequence
    expected = torch.stack(alone)
    assert (packed - expected).abs().max() <= 1e-5
    assert (unpacked - expected).abs().max() > 1e-2  # the test would see attention across sequences


def test_packed_prefill_then_decoding_continues_the_last_sequence():
    model = tiny_model(routing_backend="gathered")
    first, last = torch.randint(0, 61, (1, 6)), torch.randint(0, 61, (1, 8))
    input_ids = torch.cat([first, last], dim=1)
    position_ids = torch.cat([torch.arange(6), torch.arange(5)])[None]
    with torch.no_grad():
        cache = returned_cache(model(input_ids[:, :11], position_ids=position_ids, use_cache=True))
        steps = [
            model(input_ids[:, t : t + 1], position_ids=torch.tensor([[t - 6]]), cache=cache, use_cache=True).logits
            for t in range(11, 14)
        ]
        expected = model(last, use_cache=False).logits[:, 5:]
    assert (torch.cat(steps, dim=1) - expected).abs().max() <= 1e-5


# -- what the gathered path computes -------------------------------------------------------------------------------------


@pytest.fixture
def computed_rows(monkeypatch):
    """Rows computed by each grouped product; the masked paths are forbidden (a silent dense fallback fails)."""
    rows = []
    original = gathered.grouped_mm

    def counting(a, b, offsets, *args):
        rows.append(int(offsets[-1]))
        return original(a, b, offsets, *args)

    def forbidden(*args, **kwargs):
        raise AssertionError("the masked reference ran")

    monkeypatch.setattr(gathered, "grouped_mm", counting)
    monkeypatch.setitem(modeling.ALL_SELECTIVE_ATTENTION_FUNCTIONS, "masked", forbidden)
    monkeypatch.setattr(modeling.UoESwiGLUExperts.forward, "__wrapped__", forbidden)
    return rows


@pytest.mark.parametrize("experts_layout", ["grouped"], indirect=True)
def test_the_gathered_path_computes_only_the_selected_pairs(computed_rows, experts_layout):
    model = tiny_model(routing_backend="gathered")  # 2 of 4 heads and 2 of 4 experts per token
    input_ids = torch.randint(0, 61, (3, 20), generator=torch.Generator().manual_seed(12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :6] = 0  # padding computes nothing
    real_tokens = int(attention_mask.sum())
    with torch.no_grad():
        cache = returned_cache(model(input_ids, attention_mask=attention_mask, use_cache=True))
    # per layer: q/k/v as one product over the 2 selected heads of each real token, then MLP up and down (o_proj
    # is one dense product over the scattered heads when there are many pairs)
    assert computed_rows == [2 * real_tokens] * 3 * 2
    computed_rows.clear()
    with torch.no_grad():
        model(input_ids[:, :1], attention_mask=torch.cat([attention_mask, attention_mask[:, :1]], 1), cache=cache)
    # decoding one token of 3 sequences: q, k, v separately and o_proj per head (few rows), up, down
    assert computed_rows == [2 * 2] * 6 * 2


def test_the_gathered_path_computes_a_fraction_of_the_dense_flops():
    from torch.utils.flop_counter import FlopCounterMode

    input_ids = torch.randint(0, 61, (4, 32), generator=torch.Generator().manual_seed(13))
    counts = {}
    for name, model in (("gathered", tiny_model()), ("dense", tiny_model(attention_top_k=4, mlp_top_k=4))):
        model.config.routing_backend = "gathered" if name == "gathered" else "masked"
        model.train()
        with FlopCounterMode(display=False) as counter:
            model(input_ids, labels=input_ids).loss.backward()
        counts[name] = counter.get_total_flops()
    estimate = uoe.estimate_flops_per_token(tiny_model().config, 32)
    assert counts["gathered"] < 0.75 * counts["dense"]
    assert counts["gathered"] / counts["dense"] == pytest.approx(estimate.active_fraction, abs=0.15)


# -- torch.compile -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_training_step_equals_eager():
    """Inductor with `fullgraph=True`: under `torch.compile` the gathered path replaces its host reads (list
    lengths, packed-row check) by static bounds, so forward and backward are one graph each. Loss within 1e-5,
    gradients within 1e-4 relative (Inductor fuses and reorders float32 sums)."""
    eager = tiny_model(routing_patch_size=2, routing_backend="gathered").train()
    compiled_model = tiny_model(routing_patch_size=2, routing_backend="gathered").train()
    compiled = torch.compile(compiled_model, fullgraph=True)
    input_ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(14))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    losses = []
    for run in (eager, compiled):
        loss = run(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    assert max_rel_error(losses[1], losses[0]) <= 1e-5
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        if not name.endswith("k_proj.bias"):
            assert max_rel_error(q.grad, p.grad) <= 1e-4, name


# -- what "auto" picks on CPU ----------------------------------------------------------------------------------------


def test_auto_attends_on_the_gathered_path_except_where_the_masked_one_is_faster(monkeypatch):
    calls = []
    for name in ("gathered", "masked"):  # each registered implementation, recording its calls
        original = modeling.ALL_SELECTIVE_ATTENTION_FUNCTIONS[name]

        def recorded(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setitem(modeling.ALL_SELECTIVE_ATTENTION_FUNCTIONS, name, recorded)
    short = torch.randint(0, 61, (1, modeling.GATHERED_ATTENTION_MIN_KEYS - 1))
    long = torch.randint(0, 61, (1, modeling.GATHERED_ATTENTION_MIN_KEYS))
    with torch.no_grad():
        for model, input_ids, expected in (
            (tiny_model(), long, "gathered"),
            (tiny_model(), short, "masked"),  # a short sequence: the per-head mask is cheaper
            (tiny_model(attention_top_k=4), long, "masked"),  # full routing: the dense layer
        ):
            calls.clear()
            model(input_ids)
            assert calls == [expected] * 2, (input_ids.shape, calls)
        # a decode step after a long prompt: one new token per sequence attends masked (fewer operations)
        model = tiny_model()
        cache = returned_cache(model(long, use_cache=True))
        calls.clear()
        model(long[:, :1], cache=cache, use_cache=True)
        assert calls == ["masked"] * 2, calls
