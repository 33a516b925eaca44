"""The Triton kernels on CPU under Triton's interpreter, in float32, against their PyTorch references.

Every test sets `TRITON_INTERPRET=1` for itself only (the kernel modules are imported, or re-imported, in
the matching mode on first use: see `kernels_common.triton_module`), so other tests in the same run are
unaffected. Shapes stay tiny: the interpreter runs every program in Python.

Error measure: max |kernel - reference| / max |reference| over the tensor, required <= 1e-4.
"""

import pytest
import torch
import torch.nn.functional as F

from .helpers import require_triton

require_triton()  # a skip outside CI, an error in CI

from uoe.kernels_common import triton_module  # noqa: E402
from uoe.kernels_routing import compact_selection, expert_routing_metadata  # noqa: E402
from uoe.kernels_smha import selective_attention, selective_attention_reference  # noqa: E402
from uoe.kernels_uome import (  # noqa: E402
    down_projection_backward_reference,
    down_projection_reference,
    register_uoe_experts_kernels,
    uome_experts,
    uome_experts_reference,
    up_projection_backward_reference,
    up_projection_reference,
    weight_grad_reference,
)

from .helpers import count_kernel_calls, returned_cache, tiny_model  # noqa: E402

TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, name
    if expected.numel():
        error = max_rel_error(actual, expected)
        assert error <= TOLERANCE, f"{name}: max relative error {error:.2e}"


# -- UoME experts --------------------------------------------------------------------------------


def make_experts_case(
    activation, tokens, hidden, inner, experts, top_k, routing="random", bias=False, union_gates=False, seed=0
):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).requires_grad_(True)

    width = 2 * inner if activation == "swiglu" else inner
    x = randn(tokens, hidden)
    w1 = randn(experts, width, hidden, scale=hidden**-0.5)
    w2 = randn(experts, hidden, inner, scale=inner**-0.5)
    b1 = randn(experts, width, scale=0.1) if bias else None
    if routing == "random":  # the last expert receives no token
        index = torch.rand(tokens, experts - 1, generator=generator).topk(top_k, dim=-1).indices
    elif routing == "one_expert":
        index = torch.full((tokens, top_k), 1, dtype=torch.long)
    else:  # every expert, in a random order per token
        index = torch.rand(tokens, experts, generator=generator).argsort(dim=-1)[:, :top_k]
    if union_gates:  # value 1, gradient flows (gate_mode="union")
        scores = torch.rand(tokens, top_k, generator=generator).requires_grad_(True)
        gates = 1.0 + (scores - scores.detach())
        leaf = scores
    else:
        gates = leaf = torch.rand(tokens, top_k, generator=generator).requires_grad_(True)
    return dict(x=x, w1=w1, w2=w2, b1=b1, index=index, gates=gates, leaf=leaf, activation=activation)


EXPERT_CASES = {
    "swiglu_bias_empty_expert": ("swiglu", 37, 24, 20, 5, 2, "random", True, False),
    "gelu_empty_expert": ("gelu", 37, 24, 20, 5, 2, "random", False, False),
    "swiglu_all_tokens_one_expert": ("swiglu", 40, 32, 16, 4, 1, "one_expert", False, False),
    "gelu_single_token": ("gelu", 1, 20, 24, 4, 3, "random", True, False),
    "swiglu_every_expert_union_gates": ("swiglu", 64, 32, 32, 4, 4, "all", False, True),
    "gelu_odd_sizes_bias": ("gelu", 23, 17, 9, 3, 2, "random", True, False),
    "swiglu_no_tokens": ("swiglu", 0, 16, 16, 3, 2, "random", False, False),
}


EXPERT_GRADS = ["out", "d_x", "d_w1", "d_w2", "d_gates", "d_b1"]  # d_b1 only with a bias


def run_experts(case, fn):
    out = fn(case["x"], case["w1"], case["w2"], case["index"], case["gates"], case["activation"], case["b1"])
    inputs = [case["x"], case["w1"], case["w2"], case["leaf"]] + ([case["b1"]] if case["b1"] is not None else [])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    return [out, *torch.autograd.grad(out, inputs, grad_out)]


@pytest.mark.parametrize("name", list(EXPERT_CASES))
def test_uome_experts_match_reference(name):
    case = make_experts_case(*EXPERT_CASES[name])
    actual = run_experts(case, uome_experts)
    expected = run_experts(case, uome_experts_reference)
    for label, a, e in zip(EXPERT_GRADS, actual, expected, strict=False):
        assert_close(a, e, f"{name} {label}")


def test_uome_experts_are_deterministic():
    case = make_experts_case("swiglu", 48, 32, 16, 3, 2, bias=True)
    first, second = run_experts(case, uome_experts), run_experts(case, uome_experts)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_each_uome_kernel_matches_its_reference(activation):
    kernels = triton_module("kernels_uome_triton")
    case = make_experts_case(activation, 29, 24, 20, 4, 2, bias=True)
    x, w1, w2, b1 = (case[k].detach() for k in ("x", "w1", "w2", "b1"))
    gates, top_k, num_experts = case["gates"].detach(), 2, w1.shape[0]
    flat_gates = gates.reshape(-1)
    routing = expert_routing_metadata(case["index"], num_experts)
    pairs, offsets = routing.sorted_pair, routing.expert_offsets
    gated = activation == "swiglu"

    pre, hidden = kernels.up_projection(x, w1, b1, pairs, offsets, top_k, gated, True)
    ref_pre, ref_hidden = up_projection_reference(x, w1, b1, pairs, offsets, top_k, activation)
    assert_close(pre, ref_pre, "up pre")
    assert_close(hidden, ref_hidden, "up hidden")

    out = kernels.down_projection(hidden, w2, pairs, offsets, flat_gates, torch.float32)
    assert_close(out, down_projection_reference(hidden, w2, pairs, offsets, flat_gates), "down")

    grad = torch.randn(x.shape)
    d_pre, d_gate = kernels.down_projection_backward(grad, w2, pairs, offsets, flat_gates, pre, hidden, top_k, gated)
    ref_d_pre, ref_d_gate = down_projection_backward_reference(
        grad, w2, pairs, offsets, flat_gates, pre, top_k, activation
    )
    assert_close(d_pre, ref_d_pre, "down backward d_pre")
    assert_close(d_gate, ref_d_gate, "down backward d_gate")

    d_x = kernels.up_projection_backward(d_pre, w1, pairs, offsets, torch.float32)
    assert_close(d_x, up_projection_backward_reference(d_pre, w1, pairs, offsets), "up backward")

    d_w1, d_b1 = kernels.weight_grad(d_pre, x, pairs, offsets, top_k, False, True, None, num_experts, x.dtype, True)
    ref_d_w1, ref_d_b1 = weight_grad_reference(d_pre, x, pairs, offsets, top_k, False, True, None, num_experts)
    assert_close(d_w1, ref_d_w1, "d_w1")
    assert_close(d_b1, ref_d_b1, "d_b1")
    d_w2, _ = kernels.weight_grad(grad, hidden, pairs, offsets, top_k, True, False, flat_gates, num_experts, x.dtype)
    ref_d_w2, _ = weight_grad_reference(grad, hidden, pairs, offsets, top_k, True, False, flat_gates, num_experts)
    assert_close(d_w2, ref_d_w2, "d_w2")
    assert torch.all(d_w2[num_experts - 1] == 0)  # the expert without tokens


@pytest.mark.parametrize("bias", [False, True])
def test_uome_ops_pass_opcheck(bias):
    case = make_experts_case("swiglu", 9, 16, 16, 3, 2, bias=bias)
    x, w1, w2, gates = case["x"], case["w1"], case["w2"], case["leaf"]
    routing = expert_routing_metadata(case["index"], 3)
    metadata = (routing.sorted_pair, routing.expert_offsets)
    torch.library.opcheck(torch.ops.uoe.uome_forward.default, (x, w1, w2, case["b1"], *metadata, gates, "swiglu", True))
    _, pre, hidden = torch.ops.uoe.uome_forward(x, w1, w2, case["b1"], *metadata, gates, "swiglu", True)
    b1 = case["b1"].detach() if bias else None
    args = (torch.randn(x.shape), x.detach(), w1.detach(), w2.detach(), b1, *metadata, gates.detach())
    torch.library.opcheck(
        torch.ops.uoe.uome_backward.default, (*args, pre.detach(), hidden.detach(), "swiglu", [True, True, True])
    )


def test_uome_experts_compile_fullgraph():
    case = make_experts_case("gelu", 21, 16, 16, 3, 2, bias=True)
    compiled = torch.compile(uome_experts, fullgraph=True, backend="aot_eager")
    actual, expected = run_experts(case, compiled), run_experts(case, uome_experts_reference)
    for label, a, e in zip(EXPERT_GRADS, actual, expected, strict=False):
        assert_close(a, e, f"compiled {label}")


@pytest.mark.parametrize("mlp_type", ["swiglu", "gelu"])
def test_model_with_uoe_triton_experts_matches_eager(mlp_type):
    register_uoe_experts_kernels()
    torch.manual_seed(6)
    input_ids = torch.randint(0, 61, (2, 10))
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[1, :3] = 0
    results = {}
    for implementation in ("eager", "uoe_triton"):
        model = tiny_model(mlp_type=mlp_type, gate_mode="weighted").train()
        model.set_experts_implementation(implementation)
        loss = model(input_ids, attention_mask=attention_mask, labels=input_ids).loss
        loss.backward()
        results[implementation] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    (loss, grads), (ref_loss, ref_grads) = results["uoe_triton"], results["eager"]
    assert_close(loss, ref_loss, "loss")
    for name, grad in ref_grads.items():
        assert_close(grads[name], grad, name)


# -- SMHA selective attention ---------------------------------------------------------------------


def packed_segment_ids(lengths: list[list[int]]) -> torch.Tensor:
    """`(batch, T)` int64 ids of rows packing sequences of the given lengths (decreasing ids: only equality counts)."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(row), 0, -1), torch.tensor(row)) for row in lengths])


def make_attention_case(batch, heads, q_len, k_len, head_dim, fraction=0.5, padding=False, segments=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=generator).requires_grad_(True)
    k = torch.randn(batch, heads, k_len, head_dim, generator=generator).requires_grad_(True)
    v = torch.randn(batch, heads, k_len, head_dim, generator=generator).requires_grad_(True)
    key_selected = torch.rand(batch, k_len, heads, generator=generator) < fraction
    if heads > 2:
        key_selected[..., 2] = False  # a head that no token selected
    query_selected = key_selected[:, k_len - q_len :].clone()
    key_mask = None
    if padding:
        key_mask = torch.ones(batch, k_len, dtype=torch.bool)
        key_mask[0, :5] = False  # left padding (selected padded queries see no key)
        key_mask[-1, -3:] = False  # right padding
    segment_ids = None
    if segments is not None:
        segment_ids = packed_segment_ids(segments)
        # some selected queries whose own key is not selected: alone in a short segment they see no key at all
        query_selected |= torch.rand(batch, q_len, heads, generator=generator) < 0.2
    return q, k, v, query_selected, key_selected, key_mask, segment_ids


SHORT_SEGMENTS = [1] * 6 + [2, 1, 3, 1, 1, 4, 2]
ATTENTION_CASES = {
    "causal": ((2, 3, 37, 37, 12), dict(causal=True)),
    "bidirectional": ((2, 3, 37, 37, 12), dict(causal=False)),
    "causal_padded": ((2, 3, 33, 33, 16, 0.5, True), dict(causal=True)),
    "bidirectional_padded": ((2, 3, 30, 30, 8, 0.6, True), dict(causal=False)),
    "cache_keys_longer_padded": ((2, 3, 13, 45, 16, 0.5, True), dict(causal=True)),
    "decode_one_query": ((2, 4, 1, 30, 16), dict(causal=True)),
    "full_selection_48": ((1, 2, 48, 48, 16, 1.1), dict(causal=True)),
    "sparse_selection": ((1, 4, 40, 40, 16, 0.25), dict(causal=True, scaling=0.3)),
    # packed sequences; BLOCK_M = BLOCK_N = 16 under the interpreter, so segments cross block boundaries
    "causal_segments": ((2, 3, 37, 37, 12, 0.5, False, [[10, 1, 20, 6], [37]]), dict(causal=True)),
    "bidirectional_segments": ((2, 3, 37, 37, 12, 0.5, False, [[16, 5, 16], [1, 30, 6]]), dict(causal=False)),
    "causal_padded_segments": ((2, 3, 33, 33, 16, 0.5, True, [[5, 12, 16], [20, 10, 3]]), dict(causal=True)),
    "bidirectional_padded_segments": ((2, 2, 30, 30, 8, 0.6, True, [[3, 27], [14, 1, 15]]), dict(causal=False)),
    "cache_segments": ((2, 3, 13, 45, 16, 0.5, True, [[20, 15, 10], [44, 1]]), dict(causal=True)),
    "bidirectional_cache_segments": ((2, 3, 13, 45, 16, 0.5, False, [[33, 2, 10], [40, 5]]), dict(causal=False)),
    # row 0: the query is a one-token segment (attends itself, or nothing where its own key is unselected)
    "decode_one_query_segments": ((2, 4, 1, 30, 16, 0.5, False, [[29, 1], [10, 20]], 1), dict(causal=True)),
    # row 0: every token its own segment (d_q, d_k are 0 there up to rounding); row 1: short segments
    "one_token_segments": ((2, 3, 20, 20, 8, 0.7, False, [[1] * 20, SHORT_SEGMENTS]), dict(causal=True)),
    "one_token_segments_bidirectional": ((2, 3, 20, 20, 8, 0.7, False, [[1] * 20, SHORT_SEGMENTS]), dict(causal=False)),
    "sparse_segments": ((1, 4, 40, 40, 16, 0.25, False, [[7, 9, 3, 21]]), dict(causal=True, scaling=0.3)),
}


def run_attention(inputs, options, fn):
    q, k, v, query_selected, key_selected, key_mask, segment_ids = inputs
    out = fn(q, k, v, query_selected, key_selected, key_mask, segment_ids, **options)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return [out, *torch.autograd.grad(out, (q, k, v), grad_out)]


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_selective_attention_matches_reference(name):
    shape, options = ATTENTION_CASES[name]
    inputs = make_attention_case(*shape)
    actual = run_attention(inputs, options, selective_attention)
    expected = run_attention(inputs, options, selective_attention_reference)
    for label, a, e in zip(["out", "d_q", "d_k", "d_v"], actual, expected, strict=True):
        assert_close(a, e, f"{name} {label}")
    # unselected (query, head) pairs, and selected ones without any allowed key, are exactly 0
    assert torch.all(actual[0][~inputs[3]] == 0)
    assert torch.all(actual[0][expected[0].abs().amax(-1) == 0] == 0)


def test_selective_attention_with_one_segment_equals_no_segment_ids():
    """`SEGMENTED` with a single segment per row takes the same arithmetic as no segment ids: equal results."""
    q, k, v, query_selected, key_selected, key_mask, _ = make_attention_case(2, 3, 13, 45, 16, padding=True)
    one_segment = torch.full((2, 45), 3, dtype=torch.int32)
    inputs = (q, k, v, query_selected, key_selected, key_mask)
    first = run_attention((*inputs, None), dict(causal=True), selective_attention)
    second = run_attention((*inputs, one_segment), dict(causal=True), selective_attention)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_selective_attention_with_one_selection_tensor_for_queries_and_keys():
    """The model passes the same selection twice (no cache, no padding): compacted once, same results."""
    q, k, v, _, selected, _, _ = make_attention_case(1, 2, 40, 40, 16)
    assert_close(
        selective_attention(q, k, v, selected, selected),
        selective_attention_reference(q, k, v, selected, selected),
        "out",
    )
    everything = torch.ones(1, 40, 2, dtype=torch.bool)
    out = selective_attention(q, k, v, everything, everything)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert_close(out, expected, "full selection vs SDPA")


def test_selective_attention_reads_strided_inputs():
    """The model's query/key/value are `(batch, seq, heads, dim)` projections viewed as `(batch, heads, seq, dim)`;
    segment ids may be any integer dtype and non-contiguous."""
    generator = torch.Generator().manual_seed(9)
    leaves = [torch.randn(2, length, 3, 16, generator=generator, requires_grad=True) for length in (21, 29, 29)]
    q, k, v = (leaf.transpose(1, 2) for leaf in leaves)
    key_selected = torch.rand(2, 29, 3, generator=generator) < 0.5
    key_mask = torch.ones(2, 29, dtype=torch.bool)
    key_mask[1, :4] = False
    segment_ids = packed_segment_ids([[4, 25], [12, 12, 5]]).T.contiguous().T  # int64, column-major
    results = []
    for fn in (selective_attention, selective_attention_reference):
        out = fn(q, k, v, key_selected[:, 8:], key_selected, key_mask, segment_ids)
        results.append([out, *torch.autograd.grad(out, leaves, torch.ones_like(out))])
    for label, actual, expected in zip(["out", "d_q", "d_k", "d_v"], *results, strict=True):
        assert_close(actual, expected, label)


def test_selective_attention_is_deterministic():
    inputs = make_attention_case(2, 3, 37, 37, 12, padding=True, segments=[[10, 27], [17, 3, 17]])
    options = dict(causal=True)
    first = run_attention(inputs, options, selective_attention)
    second = run_attention(inputs, options, selective_attention)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("segmented", [False, True], ids=["one_segment", "segments"])
def test_smha_ops_pass_opcheck(segmented):
    q, k, v, query_selected, key_selected, key_mask, segment_ids = make_attention_case(
        1, 2, 20, 24, 16, padding=True, segments=[[9, 4, 11]]
    )
    key_list = key_selected & key_mask[..., None]
    metadata = (*compact_selection(query_selected.transpose(1, 2)), *compact_selection(key_list.transpose(1, 2)))
    seg = segment_ids.to(torch.int32) if segmented else None
    torch.library.opcheck(torch.ops.uoe.smha_forward.default, (q, k, v, *metadata, seg, True, 0.25))
    out, lse = torch.ops.uoe.smha_forward(q, k, v, *metadata, seg, True, 0.25)
    args = (torch.randn(out.shape), q.detach(), k.detach(), v.detach(), out.detach(), lse, *metadata, seg)
    torch.library.opcheck(torch.ops.uoe.smha_backward.default, (*args, True, 0.25))


def test_selective_attention_compile_fullgraph():
    inputs = make_attention_case(1, 2, 24, 24, 16, padding=True, segments=[[6, 11, 7]])
    options = dict(causal=True)
    compiled = torch.compile(selective_attention, fullgraph=True, backend="aot_eager")
    actual = run_attention(inputs, options, compiled)
    expected = run_attention(inputs, options, selective_attention_reference)
    for label, a, e in zip(["out", "d_q", "d_k", "d_v"], actual, expected, strict=True):
        assert_close(a, e, f"compiled {label}")


def test_uoe_triton_experts_forward_handles_expert_biases():
    """Vision experts (`has_gate=False, has_bias=True`): the up bias goes through the kernels, the per-expert
    down bias is added per selected expert; same result and gradients as the module's own forward."""
    from uoe.kernels_uome import uoe_triton_experts_forward
    from uoe.modeling_uoe_vision import UoEGELUBiasExperts

    from .helpers import tiny_config

    torch.manual_seed(8)
    experts = UoEGELUBiasExperts(tiny_config(mlp_type="gelu", mlp_bias=True))
    for tensor in (experts.up_proj, experts.down_proj, experts.up_proj_bias, experts.down_proj_bias):
        tensor.data.normal_(std=0.2)
    hidden = torch.randn(19, experts.hidden_dim, requires_grad=True)
    top_k_index = torch.rand(19, experts.num_experts).topk(2, dim=-1).indices
    top_k_weights = torch.rand(19, 2, requires_grad=True)
    inputs = (hidden, experts.up_proj, experts.down_proj, experts.up_proj_bias, top_k_weights)
    results = []
    for forward in (uoe_triton_experts_forward, UoEGELUBiasExperts.forward.__wrapped__):
        out = forward(experts, hidden, top_k_index, top_k_weights)
        results.append([out, *torch.autograd.grad(out, inputs, torch.ones_like(out))])
    for label, actual, expected in zip(["out", "d_x", "d_w1", "d_w2", "d_b1", "d_gates"], *results, strict=True):
        assert_close(actual, expected, label)


# -- whole models with routing_backend="triton" ----------------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the model's calls into the SMHA and UoME kernels (a silent fallback would make the comparisons
    below compare the reference with itself)."""
    return count_kernel_calls(monkeypatch)


def model_loss_and_grads(model, **inputs):
    outputs = model(**inputs)
    loss = outputs.loss
    loss.backward()
    return outputs.logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "overrides",
    [
        dict(gate_mode="union"),
        dict(gate_mode="weighted", router_score_func="sigmoid", routing_patch_size=3),
        dict(mlp_type="gelu", attention_top_k=1, mlp_top_k=3),
        dict(gate_mode="weighted", attention_top_k=1, mlp_top_k=1, router_aux_loss_coef=0.0),
    ],
    ids=["union", "weighted_sigmoid_patches", "gelu_top1", "weighted_top1"],
)
def test_causal_lm_with_triton_backend_matches_reference(overrides, kernel_calls):
    """The whole UoEForCausalLM: logits, loss and every parameter's gradient (routers included), on a
    left-padded batch, with the kernels vs the plain PyTorch path."""
    torch.manual_seed(8)
    input_ids = torch.randint(0, 61, (2, 11))
    attention_mask = torch.ones(2, 11, dtype=torch.long)
    attention_mask[1, :4] = 0
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    expected = model_loss_and_grads(tiny_model(routing_backend="masked", **overrides).train(), **inputs)
    assert kernel_calls == {"attention": 0, "experts": 0}
    actual = model_loss_and_grads(tiny_model(routing_backend="triton", **overrides).train(), **inputs)
    assert kernel_calls == {"attention": 2, "experts": 2}  # two layers
    assert_close(actual[0], expected[0], "logits")
    assert_close(actual[1], expected[1], "loss")
    for name, grad in expected[2].items():
        assert grad is not None and grad.abs().max() > 0, f"{name} has no gradient in the reference"
        assert_close(actual[2][name], grad, f"grad {name}")


@pytest.mark.parametrize("gate_mode", ["union", "weighted"])
def test_top1_router_gradients_through_the_kernels_equal_the_plain_loop_reference(gate_mode, kernel_calls):
    """At top-1 (heads and experts) the kernels receive the gates the routing code computed (union
    straight-through, weighted: the raw score): both routers' task gradients equal float64 autograd through the
    plain-loop reference of `tests/reference_uoe.py` (float32 model, hence 1e-4)."""
    from .reference_uoe import reference_logits

    model = tiny_model(
        gate_mode=gate_mode, attention_top_k=1, mlp_top_k=1, router_aux_loss_coef=0.0, routing_backend="triton"
    ).train()
    input_ids = torch.randint(0, 61, (11,), generator=torch.Generator().manual_seed(16)).tolist()
    ids = torch.tensor([input_ids])
    model(ids, labels=ids).loss.backward()
    assert kernel_calls == {"attention": 2, "experts": 2}
    names = [n for n, _ in model.named_parameters() if ".router." in n]
    leaves = {n: p.detach().double().clone().requires_grad_(True) for n, p in model.named_parameters() if n in names}
    logits = reference_logits(model, input_ids, router_weights=leaves)
    loss = F.cross_entropy(logits[:-1], torch.tensor(input_ids[1:]))
    expected = torch.autograd.grad(loss, list(leaves.values()))
    params = dict(model.named_parameters())
    for name, grad in zip(names, expected, strict=True):
        assert grad.abs().max() > 1e-4, name
        assert_close(params[name].grad.double(), grad, name)


def test_causal_lm_with_triton_backend_on_packed_rows_matches_masked(kernel_calls):
    """Packed rows (position ids restarting inside a row): the kernels keep attention inside each sequence."""
    torch.manual_seed(13)
    input_ids = torch.randint(0, 61, (2, 12))
    position_ids = torch.tensor([list(range(5)) + list(range(7)), list(range(3)) + list(range(9))])
    inputs = dict(input_ids=input_ids, position_ids=position_ids, labels=input_ids)
    expected = model_loss_and_grads(tiny_model(routing_backend="masked").train(), **inputs)
    actual = model_loss_and_grads(tiny_model(routing_backend="triton").train(), **inputs)
    assert kernel_calls["attention"] == 2
    assert_close(actual[0], expected[0], "logits")
    for name, grad in expected[2].items():
        assert_close(actual[2][name], grad, f"grad {name}")


def test_causal_lm_with_triton_backend_decodes_like_the_full_pass(kernel_calls):
    """KV-cache decoding through the kernels (keys longer than queries) equals the reference full pass."""
    torch.manual_seed(9)
    input_ids = torch.randint(0, 61, (2, 12))
    reference = tiny_model(routing_backend="masked")
    model = tiny_model(routing_backend="triton")
    with torch.no_grad():
        expected = reference(input_ids).logits
        prefill = model(input_ids[:, :7], use_cache=True)
        step = model(input_ids[:, 7:9], cache=returned_cache(prefill), use_cache=True)
        last = model(input_ids[:, 9:], cache=returned_cache(step), use_cache=True)
    assert_close(torch.cat([prefill.logits, step.logits, last.logits], dim=1), expected, "cached logits")
    assert kernel_calls == {"attention": 6, "experts": 6}


# one layer keeps the interpreter's run short
GQA_OVERRIDES = dict(
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=8,
    attention_top_k=1,
    qk_norm=True,
    attention_bias=True,
    num_hidden_layers=1,
)


def test_smha_gqa_with_triton_backend_matches_plain_loop_reference(kernel_calls):
    """Grouped-query attention through the kernels: a left-padded batch, then KV-cache decoding, against the
    float64 plain-loop reference of the group rule for each sequence alone."""
    from .reference_uoe import reference_logits

    model = tiny_model(11, routing_backend="triton", routing_patch_size=2, **GQA_OVERRIDES)
    with torch.no_grad():
        for name, param in model.named_parameters():  # non-trivial biases and q/k norm weights
            if name.endswith("bias") or "_norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    generator = torch.Generator().manual_seed(12)
    input_ids = torch.randint(0, 61, (2, 9), generator=generator)
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, :3] = 0
    with torch.no_grad():
        prefill = model(input_ids[:, :6], attention_mask=attention_mask[:, :6], use_cache=True)
        cache, pieces = returned_cache(prefill), [prefill.logits]
        for t in range(6, 9):
            step = model(
                input_ids[:, t : t + 1], attention_mask=attention_mask[:, : t + 1], cache=cache, use_cache=True
            )
            pieces.append(step.logits)
    assert kernel_calls["attention"] == 4
    logits = torch.cat(pieces, dim=1)
    for row in range(2):
        real = attention_mask[row].bool()
        expected = reference_logits(model, input_ids[row][real].tolist()).float()
        assert_close(logits[row][real], expected, f"sequence {row}")


def test_smha_gqa_with_triton_backend_gradients_match_masked(kernel_calls):
    torch.manual_seed(14)
    input_ids = torch.randint(0, 61, (2, 11))
    inputs = dict(input_ids=input_ids, labels=input_ids)
    expected = model_loss_and_grads(tiny_model(routing_backend="masked", **GQA_OVERRIDES).train(), **inputs)
    actual = model_loss_and_grads(tiny_model(routing_backend="triton", **GQA_OVERRIDES).train(), **inputs)
    assert kernel_calls["attention"] == 1
    assert_close(actual[0], expected[0], "logits")
    for name, grad in expected[2].items():
        assert grad is not None and grad.abs().max() > 0, f"{name} has no gradient in the reference"
        assert_close(actual[2][name], grad, f"grad {name}")


def test_image_classifier_with_triton_backend_matches_reference(kernel_calls):
    from uoe import UoEConfig, UoEForImageClassification

    def build(backend):
        torch.manual_seed(10)
        config = UoEConfig(
            is_causal=False, norm_type="layernorm", position_embedding_type="learned", mlp_type="gelu",
            mlp_bias=True, attention_bias=True, image_size=8, patch_size=2, num_channels=1, hidden_size=32,
            num_hidden_layers=2, num_attention_heads=4, attention_top_k=2, intermediate_size=64, num_mlp_experts=4,
            mlp_top_k=2, num_labels=3, initializer_range=0.2, routing_backend=backend,
        )  # fmt: skip
        return UoEForImageClassification(config).train()

    pixels = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(11))
    labels = torch.tensor([0, 2, 1])
    expected = model_loss_and_grads(build("masked"), pixel_values=pixels, labels=labels)
    actual = model_loss_and_grads(build("triton"), pixel_values=pixels, labels=labels)
    assert kernel_calls == {"attention": 2, "experts": 4}  # per layer: attention; experts for CLS and patches
    assert_close(actual[0], expected[0], "logits")
    for name, grad in expected[2].items():
        if name.endswith("k_proj.bias"):
            # softmax ignores a shift shared by all keys: this gradient is 0 up to rounding in both paths
            assert actual[2][name].abs().max() < 1e-6 and grad.abs().max() < 1e-6, name
        else:
            assert_close(actual[2][name], grad, f"grad {name}")


def test_decoder_layer_with_triton_backend_compiles_fullgraph():
    """One UoE decoder layer (routing, SMHA and UoME kernels as custom ops) traced by `torch.compile` in one
    graph; forward and input gradient equal the eager reference layer."""
    from uoe.modeling_uoe import RoutingInputs

    reference_model, model = tiny_model(routing_backend="masked"), tiny_model(routing_backend="triton")
    hidden = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(12))
    positions = torch.arange(9)[None].expand(2, -1)
    rotary = model.model.rotary_emb(hidden, positions)
    routing = RoutingInputs(source_index=None, token_mask=None)

    def run(layer):
        x = hidden.clone().requires_grad_(True)
        out, aux = layer(x, rotary, routing)
        (out.square().sum() + aux.sum()).backward()
        return out.detach(), x.grad

    compiled = torch.compile(model.model.layers[0], fullgraph=True, backend="aot_eager")
    for label, a, e in zip(["out", "d_hidden"], run(compiled), run(reference_model.model.layers[0]), strict=True):
        assert_close(a, e, f"compiled layer {label}")
