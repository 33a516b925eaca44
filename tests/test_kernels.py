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
from uoe.modeling_uoe import eager_attention_forward, selective_attention_mask

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


def test_smha_reference_with_attend_self_equals_model_selective_attention():
    """The model masks with `selective_attention_mask` (padded queries attend to themselves) and zeroes
    unselected heads; the reference with `attend_self=True` is the same function."""
    torch.manual_seed(3)
    batch, heads, q_len, k_len, head_dim = 2, 4, 9, 14, 8  # keys longer than queries: a cache
    query = torch.randn(batch, heads, q_len, head_dim)
    key = torch.randn(batch, heads, k_len, head_dim)
    value = torch.randn(batch, heads, k_len, head_dim)
    key_selected = torch.rand(batch, k_len, heads) < 0.5
    query_selected = key_selected[:, -q_len:]
    key_mask = torch.ones(batch, k_len, dtype=torch.bool)
    key_mask[0, :4] = False  # left padding
    key_mask[1, -2:] = False  # right padding: padded queries that selected a head
    mask = selective_attention_mask(key_selected, key_mask, q_len, torch.float32)
    module = torch.nn.Module().eval()
    expected, _ = eager_attention_forward(module, query, key, value, mask, scaling=head_dim**-0.5)
    expected = expected * query_selected[..., None]
    actual = selective_attention_reference(query, key, value, query_selected, key_selected, key_mask, attend_self=True)
    assert max_rel_error(actual, expected) < 1e-5


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
    with pytest.raises(KernelsUnavailableError, match='routing_backend="reference"'):
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
    with pytest.raises(ValueError, match=r"`routing_backend` must be one of \['auto', 'triton', 'reference'\]"):
        tiny_model(routing_backend="cuda")
    with pytest.raises(ValueError, match='routing_backend="triton"` needs `attention_dropout=0`'):
        tiny_model(routing_backend="triton", attention_dropout=0.1)
    assert tiny_model().config.routing_backend == "auto"


def test_forced_triton_backend_raises_where_kernels_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_model(routing_backend="triton")
    with pytest.raises(KernelsUnavailableError, match='routing_backend="triton" cannot run here'):
        model(torch.randint(0, 61, (1, 5)))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_auto_and_reference_backends_never_call_the_kernels_on_cpu(backend, monkeypatch):
    """On CPU tensors (no interpreter) "auto" is the reference path: a kernel call would be a bug."""
    import uoe.modeling_uoe as modeling

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("kernel called")

    monkeypatch.setattr(modeling, "selective_attention", forbidden)
    monkeypatch.setattr(modeling, "uoe_triton_experts_forward", forbidden)
    input_ids = torch.randint(0, 61, (2, 7))
    logits = tiny_model(routing_backend=backend)(input_ids).logits
    expected = tiny_model(routing_backend="reference")(input_ids).logits
    assert torch.equal(logits, expected)
