"""The analytic FLOPs estimate against torch's FLOP counter and against its own routing arithmetic."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from uoe import estimate_flops_per_token
from uoe.flops import estimate_flops_per_sequence

from .helpers import tiny_config, tiny_model


def test_dense_estimate_matches_flop_counter_on_the_reference_path():
    # At full routing the reference path computes exactly the dense layer, so torch's counter sees the
    # dense FLOPs. The counter charges attention for every (query, key) pair although half are
    # masked, so compare with the estimate at full (not causal-average) context.
    seq_len = 24
    model = tiny_model(attention_top_k=4, mlp_top_k=4, routing_backend="masked")
    model.set_attn_implementation("eager")  # explicit matmuls, which the counter sees
    input_ids = torch.randint(0, 61, (1, seq_len))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids)
    counted = counter.get_total_flops() / seq_len
    estimate = estimate_flops_per_token(model.config, seq_len)
    cfg = model.config
    causal_to_full = (
        cfg.num_hidden_layers * 2 * 2 * cfg.num_attention_heads * cfg.head_dim * (seq_len - (seq_len + 1) / 2)
    )
    routers = estimate.breakdown["routers"]  # not in `dense`: the dense model has no routers
    assert counted == pytest.approx(estimate.dense + causal_to_full + routers, rel=1e-6)


def test_gathered_path_computes_the_estimated_active_projections(monkeypatch):
    """The gathered path's grouped products (q/k/v of the selected heads and the selected MLP experts) run exactly
    the estimate's active FLOPs for them: a path that computed unselected pairs would count more. (With many pairs
    o_proj is one dense product, 1/4 of the dense projections.)"""
    import uoe.gathered

    monkeypatch.setattr(uoe.gathered, "TOKEN_MAJOR_MAX_WEIGHTS", 0)  # grouped products even for this small model
    seq_len, batch = 24, 3
    model = tiny_model(routing_backend="gathered")
    input_ids = torch.randint(0, 61, (batch, seq_len))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids)
    grouped = sum(count for op, count in counter.get_flop_counts()["Global"].items() if "grouped_mm" in str(op))
    b = estimate_flops_per_token(model.config, seq_len).breakdown
    assert grouped == pytest.approx((0.75 * b["attention_projections"] + b["mlp"]) * batch * seq_len, rel=1e-9)
    dense = estimate_flops_per_token(tiny_config(attention_top_k=4, mlp_top_k=4), seq_len).breakdown
    assert grouped < 0.6 * (dense["attention_projections"] + dense["mlp"]) * batch * seq_len


def test_active_fraction_follows_the_routing():
    dense = estimate_flops_per_token(tiny_config(attention_top_k=4, mlp_top_k=4), 256, include_lm_head=False)
    half = estimate_flops_per_token(tiny_config(attention_top_k=2, mlp_top_k=2), 256, include_lm_head=False)
    assert dense.active == pytest.approx(dense.dense + dense.breakdown["routers"])
    assert half.dense == dense.dense
    b = half.breakdown
    assert b["mlp"] == pytest.approx(dense.breakdown["mlp"] / 2)
    assert b["attention_projections"] == pytest.approx(dense.breakdown["attention_projections"] / 2)
    assert b["attention_scores"] == pytest.approx(dense.breakdown["attention_scores"] / 4)
    assert 0.25 < half.active_fraction < 0.6
    capped = estimate_flops_per_token(
        tiny_config(attention_top_k=4, mlp_top_k=4, is_causal=False, data_capacity=0.5), 256, include_lm_head=False
    )
    assert capped.breakdown["mlp"] == pytest.approx(dense.breakdown["mlp"] / 2)


def test_bad_sequence_length_raises():
    with pytest.raises(ValueError, match="seq_len"):
        estimate_flops_per_token(tiny_config(), 0)


def test_full_attention_counts_every_key():
    config = tiny_config()
    causal = estimate_flops_per_token(config, 24)
    full = estimate_flops_per_token(config, 24, full_attention=True)
    scores = full.breakdown["attention_scores"]
    assert scores == pytest.approx(causal.breakdown["attention_scores"] * 24 / 12.5)  # 24 keys, not (24 + 1) / 2
    assert full.active - scores == pytest.approx(causal.active - causal.breakdown["attention_scores"])


def test_an_unrouted_token_computes_every_head_and_expert():
    """The encoder's CLS token goes through every head's projections and every MLP expert: with half of the heads
    and half of the experts selected, it adds half the dense projections and MLP of one token."""
    config = tiny_config(is_causal=False)
    token = estimate_flops_per_token(config, 16, include_lm_head=False)
    routed = estimate_flops_per_sequence(config, 16)
    with_cls = estimate_flops_per_sequence(config, 16, unrouted_tokens=1)
    assert routed.active == pytest.approx(16 * token.active)
    extra = (token.dense_breakdown["attention_projections"] + token.dense_breakdown["mlp"]) / 2
    assert with_cls.active - routed.active == pytest.approx(extra)
    assert with_cls.dense == routed.dense == pytest.approx(16 * token.dense)
