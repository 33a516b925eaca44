"""The model's padded path held directly to the float64 plain-loop reference: a batch with left padding, right padding
and no padding equals, at every real token, `tests/reference_uoe.reference_batch_logits`, which runs each row's real
tokens alone (padding selects no expert, is attended by nothing, does not move routing patches, and positions count
real tokens only). Every option that keeps per-token routing state: routing patches, grouped-query attention, shared
experts (which padding must not select either), Chain-of-Experts, layer grouping, weighted gates; both paths."""

import pytest
import torch

from .helpers import tiny_model
from .reference_uoe import reference_batch_logits

CASES = {
    "patches3": dict(routing_patch_size=3),
    "gqa_shared_chain_weighted": dict(
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=4,
        num_shared_attention_groups=1,
        attention_top_k=2,
        num_shared_mlp_experts=1,
        mlp_chain_length=2,
        gate_mode="weighted",
        routing_patch_size=2,
    ),
    "layer_groups_sigmoid": dict(num_hidden_layers=4, num_layer_groups=2, router_score_func="sigmoid"),
}


def padded_batch():
    generator = torch.Generator().manual_seed(12)
    input_ids = torch.randint(0, 61, (3, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0  # left padding (odd: a shift by it moves patches of 2 and 3)
    attention_mask[1, 8:] = 0  # right padding
    return input_ids, attention_mask


@pytest.mark.parametrize("backend", ["masked", "gathered"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_padded_batch_equals_each_sequence_alone_in_the_reference(case, backend):
    """Planted bugs: padding that selects the shared experts (real tokens then attend padding keys in the shared
    groups); positions counted from the row's first column instead of its first real token (left padding shifts
    RoPE and routing patches)."""
    model = tiny_model(6, routing_backend=backend, **CASES[case]).double()
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        actual = model(input_ids, attention_mask=attention_mask).logits
    expected = reference_batch_logits(model, input_ids, attention_mask)
    real = attention_mask.bool()
    assert torch.isnan(expected[~real]).all() and not torch.isnan(expected[real]).any()
    # float64, except RoPE angles and router scores (float32 in the model)
    torch.testing.assert_close(actual[real], expected[real], rtol=0, atol=1e-5)
