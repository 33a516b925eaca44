"""Kernel support code that runs without Triton: routing metadata, the references against the model's own
paths, dispatch helpers and the experts-interface registration. The kernels themselves are tested in
`test_kernels_interpreter.py` (CPU, Triton interpreter) and `test_kernels_gpu.py` (CUDA)."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from uoe import UoEForCausalLM
from uoe.kernels_common import KernelsUnavailableError, kernels_available, require_kernels, triton_importable
from uoe.kernels_routing import compact_selection, expert_routing_metadata
from uoe.kernels_smha import selective_attention, selective_attention_reference
from uoe.kernels_uome import (
    experts_activation,
    register_uoe_experts_kernels,
    uome_experts,
    uome_experts_reference,
)

from .helpers import tiny_model


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (normwise, so entries near 0 do not blow it up)."""
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


# -- routing metadata ------------------------------------------------------------------------------


def test_expert_routing_metadata_groups_pairs_by_expert_in_token_order():
    torch.manual_seed(0)
    num_experts, top_k = 6, 2
    scores = torch.rand(29, num_experts - 1)  # expert 5 receives no token
    top_k_index = scores.topk(top_k, dim=-1).indices
    routing = expert_routing_metadata(top_k_index, num_experts)

    flat = top_k_index.reshape(-1)
    counts = torch.stack([(flat == e).sum() for e in range(num_experts)])
    assert routing.expert_offsets.tolist() == [0] + counts.cumsum(0).tolist()
    assert routing.expert_offsets.dtype == routing.sorted_pair.dtype == torch.int32
    pairs = routing.sorted_pair.long()
    for e in range(num_experts):
        start, end = routing.expert_offsets[e], routing.expert_offsets[e + 1]
        expected = (flat == e).nonzero().flatten()  # increasing pair index = token order
        assert torch.equal(pairs[start:end], expected)
    assert torch.equal(pairs[routing.inverse.long()], torch.arange(flat.numel()))


def test_compact_selection_lists_selected_positions_in_order():
    torch.manual_seed(1)
    selected = torch.rand(2, 3, 17) < 0.4
    selected[0, 1] = False  # nothing selected
    selected[1, 2] = True  # everything selected
    compact = compact_selection(selected)
    for b in range(2):
        for h in range(3):
            expected = selected[b, h].nonzero().flatten()
            count = int(compact.count[b, h])
            assert count == expected.numel()
            assert torch.equal(compact.index[b, h, :count].long(), expected)
    assert torch.equal(compact.cumulative, selected.int().cumsum(-1))
    assert compact.index.is_contiguous() and compact.cumulative.is_contiguous()


def test_compact_selection_op_passes_opcheck():
    """`compact_selection` runs as the custom op `uoe::compact_selection` (opaque to torch.compile)."""
    selected = torch.rand(2, 3, 17, generator=torch.Generator().manual_seed(2)) < 0.4
    torch.library.opcheck(torch.ops.uoe.compact_selection.default, (selected,))
    torch.library.opcheck(torch.ops.uoe.compact_selection.default, (torch.zeros(2, 0, dtype=torch.bool),))


# -- references against the model's own paths ------------------------------------------------------


@pytest.mark.parametrize("mlp_type", ["swiglu", "gelu"])
def test_uome_reference_equals_model_experts(mlp_type):
    model = tiny_model(mlp_type=mlp_type)
    experts = model.model.layers[0].mlp.experts
    torch.manual_seed(2)
    hidden = torch.randn(13, model.config.hidden_size)
    top_k_index = torch.rand(13, experts.num_experts).topk(2, dim=-1).indices
    top_k_weights = torch.rand(13, 2)
    up = experts.gate_up_proj if mlp_type == "swiglu" else experts.up_proj
    activation = experts_activation(experts)
    assert activation == mlp_type
    with torch.no_grad():
        expected = experts(hidden, top_k_index, top_k_weights)
        actual = uome_experts_reference(hidden, up, experts.down_proj, top_k_index, top_k_weights, activation)
    assert max_rel_error(actual, expected) < 1e-5


def packed_segment_ids(lengths: list[list[int]]) -> torch.Tensor:
    """`(batch, T)` int64 ids of rows packing sequences of the given lengths (decreasing ids: only equality counts)."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(row), 0, -1), torch.tensor(row)) for row in lengths])


def attention_by_definition(query, key, value, query_selected, key_selected, key_mask, segment_ids, causal, scaling):
    """Float64 loops over (batch, head, query), independent of the reference's dense masking."""
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    out = torch.zeros(batch, q_len, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                p = i + k_len - q_len
                keys = [
                    j
                    for j in range(k_len)
                    if key_selected[b, j, h]
                    and key_mask[b, j]
                    and (j <= p or not causal)
                    and segment_ids[b, j] == segment_ids[b, p]
                ]
                if not query_selected[b, i, h] or not keys:
                    continue
                scores = torch.stack([scaling * query[b, h, i].double() @ key[b, h, j].double() for j in keys])
                weights = torch.softmax(scores, dim=0)
                out[b, i, h] = sum(w * value[b, h, j].double() for w, j in zip(weights, keys, strict=True))
    return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_smha_reference_with_segments_equals_plain_loop(causal):
    """Packed sequences (several segments per row), a KV-cache offset (Tk > Tq) and key padding: the reference
    equals the definition computed by plain loops in float64 within 1e-5 (relative, normwise)."""
    generator = torch.Generator().manual_seed(3)
    batch, heads, q_len, k_len, head_dim = 2, 3, 10, 16, 8  # queries at key positions 6..15
    query = torch.randn(batch, heads, q_len, head_dim, generator=generator)
    key, value = torch.randn(2, batch, heads, k_len, head_dim, generator=generator).unbind(0)
    key_selected = torch.rand(batch, k_len, heads, generator=generator) < 0.6
    query_selected = torch.rand(batch, q_len, heads, generator=generator) < 0.7  # not tied to the keys' selection
    segment_ids = packed_segment_ids([[5, 4, 7], [3, 12, 1]])  # segments start in the cache and among the queries
    key_mask = torch.ones(batch, k_len, dtype=torch.bool)
    key_mask[0, 10] = False  # a query token that is padding
    key_mask[1, :2] = False
    key_selected[1, 15, 0], query_selected[1, 9, 0] = False, True  # selected, alone in its segment, no key: 0
    expected = attention_by_definition(
        query, key, value, query_selected, key_selected, key_mask, segment_ids, causal, head_dim**-0.5
    )
    actual = selective_attention_reference(
        query, key, value, query_selected, key_selected, key_mask, segment_ids, causal
    )
    assert max_rel_error(actual.double(), expected) < 1e-5
    assert torch.all(actual[1, 9, 0] == 0) and torch.all(actual[~query_selected] == 0)
    # the segments matter here: ignoring them is far off
    unsegmented = selective_attention_reference(query, key, value, query_selected, key_selected, key_mask, None, causal)
    assert max_rel_error(unsegmented.double(), expected) > 1e-2


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_smha_reference_with_one_segment_equals_no_segment_ids(causal):
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(2, 3, 7, 8, generator=generator)
    key, value = torch.randn(2, 2, 3, 12, 8, generator=generator).unbind(0)
    key_selected = torch.rand(2, 12, 3, generator=generator) < 0.5
    args = (query, key, value, key_selected[:, 5:], key_selected)
    one_segment = torch.full((2, 12), 7, dtype=torch.int32)
    expected = selective_attention_reference(*args, segment_ids=None, causal=causal)
    assert torch.equal(selective_attention_reference(*args, segment_ids=one_segment, causal=causal), expected)


def test_smha_inputs_are_validated():
    query, key, value = torch.zeros(3, 1, 2, 4, 8).unbind(0)
    selected = torch.ones(1, 4, 2, dtype=torch.bool)
    args = (query, key, value, selected, selected)
    with pytest.raises(ValueError, match=r"segment_ids must be \(batch, Tk\)"):
        selective_attention_reference(*args, segment_ids=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="segment_ids must be an integer tensor"):
        selective_attention_reference(*args, segment_ids=torch.zeros(1, 4))
    # Tk = 3 < Tq = 4: allowed without causality, but then no query has a key position for its segment id
    short = (query, *torch.zeros(2, 1, 2, 3, 8).unbind(0), selected, selected[:, :3])
    assert selective_attention_reference(*short, causal=False).shape == (1, 4, 2, 8)
    with pytest.raises(ValueError, match="segment_ids need at least as many keys as queries"):
        selective_attention_reference(*short, segment_ids=torch.zeros(1, 3, dtype=torch.long), causal=False)


def test_smha_reference_with_full_selection_is_causal_sdpa():
    torch.manual_seed(4)
    query, key, value = torch.randn(3, 2, 4, 11, 8).unbind(0)
    selected = torch.ones(2, 11, 4, dtype=torch.bool)
    expected = F.scaled_dot_product_attention(query, key, value, is_causal=True).transpose(1, 2)
    actual = selective_attention_reference(query, key, value, selected, selected)
    assert max_rel_error(actual, expected) < 1e-5


# -- dispatch helpers ----------------------------------------------------------------------------


def test_kernels_unavailable_on_cpu_without_interpreter_raise_clear_errors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tensor = torch.zeros(4, 4)
    assert not kernels_available(tensor)
    with pytest.raises(KernelsUnavailableError, match="CPU|Triton is not installed"):
        require_kernels(tensor, 'routing_backend="triton"')
    with pytest.raises(KernelsUnavailableError, match='routing_backend="auto"`, `"gathered"` or `"masked"`'):
        uome_experts(
            tensor, torch.zeros(2, 8, 4), torch.zeros(2, 4, 4), torch.zeros(4, 1, dtype=torch.long), tensor[:, :1]
        )
    selected = torch.ones(1, 4, 1, dtype=torch.bool)
    with pytest.raises(KernelsUnavailableError):
        selective_attention(*torch.zeros(3, 1, 1, 4, 4).unbind(0), selected, selected)


def test_kernels_available_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels_available(torch.zeros(1)) == triton_importable()


def test_package_imports_and_reports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, uoe, uoe.kernels_uome, uoe.kernels_smha\n"
        "from uoe.kernels_common import kernels_available, require_kernels, KernelsUnavailableError\n"
        "uoe.kernels_uome.register_uoe_experts_kernels()\n"
        "assert not kernels_available(torch.zeros(1))\n"
        "try:\n    require_kernels(torch.zeros(1))\nexcept KernelsUnavailableError as e:\n    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Triton is not installed" in result.stdout


# -- experts interface -----------------------------------------------------------------------------


def test_uoe_triton_experts_implementation_registers_and_loads(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    register_uoe_experts_kernels()
    register_uoe_experts_kernels()  # idempotent
    assert "uoe_triton" in ALL_EXPERTS_FUNCTIONS
    assert "grouped_mm" in ALL_EXPERTS_FUNCTIONS  # the other back-ends stay available

    tiny_model().save_pretrained(tmp_path)
    model = UoEForCausalLM.from_pretrained(tmp_path, experts_implementation="uoe_triton")
    assert model.config._experts_implementation == "uoe_triton"
    # where the kernels cannot run, the forced back-end says so instead of silently falling back
    with pytest.raises(KernelsUnavailableError, match="uoe_triton"):
        model(torch.randint(0, 61, (1, 5)))
    model.set_experts_implementation("eager")
    assert model.config._experts_implementation == "eager"
    model.set_experts_implementation("uoe_triton")
    assert model.config._experts_implementation == "uoe_triton"


# -- routing_backend ---------------------------------------------------------------------------------


def test_routing_backend_is_validated_at_construction():
    with pytest.raises(
        ValueError, match=r"`routing_backend` must be one of \['auto', 'gathered', 'masked', 'triton'\], got 'cuda'"
    ):
        tiny_model(routing_backend="cuda")
    with pytest.raises(ValueError, match='routing_backend="triton"` needs `attention_dropout=0`'):
        tiny_model(routing_backend="triton", attention_dropout=0.1)
    assert tiny_model().config.routing_backend == "auto"
    # uoe 0.1's name of the masked reference is still understood, with a warning
    with pytest.warns(FutureWarning, match='"reference"` is now called "masked"'):
        assert tiny_model(routing_backend="reference").config.routing_backend == "masked"


def test_forced_triton_backend_raises_where_kernels_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_model(routing_backend="triton")
    with pytest.raises(KernelsUnavailableError, match='routing_backend="triton" cannot run here'):
        model(torch.randint(0, 61, (1, 5)))


@pytest.mark.parametrize("backend", ["auto", "gathered", "masked"])
def test_pytorch_backends_never_call_the_kernels_on_cpu(backend, monkeypatch):
    """On CPU tensors (no interpreter) "auto" is the gathered path: a kernel call would be a bug."""
    import uoe.modeling_uoe as modeling

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("kernel called")

    monkeypatch.setitem(modeling.ALL_SELECTIVE_ATTENTION_FUNCTIONS, "triton", forbidden)
    monkeypatch.setattr(modeling, "uoe_triton_experts_forward", forbidden)
    input_ids = torch.randint(0, 61, (2, 7))
    logits = tiny_model(routing_backend=backend)(input_ids).logits
    expected = tiny_model(routing_backend="masked")(input_ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_missing_triton_skips_the_kernel_suites_outside_ci_and_fails_in_ci(monkeypatch):
    """`require_triton` (called at the top of the Triton test modules): a skip where Triton is missing, an
    ImportError when `CI` is set, so that CI cannot pass with the kernel suite skipped."""
    from .helpers import require_triton

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_triton()
    for value in ("1", "true"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(ImportError):
            require_triton()
