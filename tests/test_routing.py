"""Router losses and gates of `uoe.routing` against plain-loop computations for fixed scores, selections and masks."""

import math

import pytest
import torch

from uoe.routing import load_balancing_loss, router_z_loss, select_top_k


def switch_loss_by_hand(scores, top_index, mask) -> float:
    """`E * sum_e f_e * p_e` over the tokens with mask 1: f_e = share of the (token, slot) selections that went to
    e, p_e = mean score of e after normalising each token's scores to sum to 1. Plain Python loops."""
    batch, seq, experts = scores.shape
    tokens = [(b, t) for b in range(batch) for t in range(seq) if mask is None or mask[b][t]]
    top_k = top_index.shape[-1]
    loss = 0.0
    for e in range(experts):
        routed = sum(int(top_index[b, t, j]) == e for b, t in tokens for j in range(top_k))
        prob = sum(float(scores[b, t, e]) / float(scores[b, t].sum()) for b, t in tokens)
        loss += (routed / (len(tokens) * top_k)) * (prob / len(tokens))
    return experts * loss


def z_loss_by_hand(logits, mask) -> float:
    batch, seq, _ = logits.shape
    values = [
        math.log(sum(math.exp(float(v)) for v in logits[b, t])) ** 2
        for b in range(batch)
        for t in range(seq)
        if mask is None or mask[b][t]
    ]
    return sum(values) / len(values)


def test_switch_loss_of_the_issue_example_is_below_one():
    """9 tokens at p = (.51, .49) and one at (.01, .99), top-1: f = (.9, .1), p = (.46, .54), loss 0.936 (< 1: the
    loss is not bounded below by its balanced value)."""
    scores = torch.tensor([[0.51, 0.49]] * 9 + [[0.01, 0.99]])[None]
    top_index = scores.argmax(-1, keepdim=True)
    loss = load_balancing_loss(scores, top_index, None)
    assert float(loss) == pytest.approx(2 * (0.9 * 0.46 + 0.1 * 0.54), abs=1e-6)
    assert float(loss) == pytest.approx(0.936, abs=1e-6)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_switch_loss_with_padding_equals_plain_loop(top_k, score_func):
    torch.manual_seed(top_k)
    logits = 2 * torch.randn(3, 7, 5)
    # fixed selections that are not the top-k of the scores, so a loss that re-derived them would be caught
    top_index = torch.stack([torch.randperm(5)[:top_k] for _ in range(21)]).view(3, 7, top_k)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    mask[2, 5:] = False  # right padding
    # padding routed all to expert 0, so counting it would change the value clearly
    logits[~mask] = torch.tensor([6.0, -6.0, -6.0, -6.0, -6.0])
    top_index[~mask] = torch.arange(top_k)
    scores = torch.softmax(logits, -1) if score_func == "softmax" else torch.sigmoid(logits)
    expected = switch_loss_by_hand(scores, top_index, mask.tolist())
    assert float(load_balancing_loss(scores, top_index, mask)) == pytest.approx(expected, rel=1e-6)
    assert float(load_balancing_loss(scores, top_index, None)) == pytest.approx(
        switch_loss_by_hand(scores, top_index, None), rel=1e-6
    )
    # padding changes the value here, so the mask is really applied
    assert abs(switch_loss_by_hand(scores, top_index, None) - expected) > 1e-3


def test_z_loss_with_padding_equals_plain_loop():
    torch.manual_seed(0)
    logits = 3 * torch.randn(2, 6, 4)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :4] = False
    assert float(router_z_loss(logits, mask)) == pytest.approx(z_loss_by_hand(logits, mask.tolist()), rel=1e-6)
    assert float(router_z_loss(logits, None)) == pytest.approx(z_loss_by_hand(logits, None), rel=1e-6)
    assert abs(z_loss_by_hand(logits, None) - z_loss_by_hand(logits, mask.tolist())) > 1e-2


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("gate_mode", ["union", "weighted"])
def test_gate_values_and_gradients_against_leaves(gate_mode, top_k):
    """Gate values, and the gradient the gates pass to the scores, against autograd through free leaves: the
    union gate's gradient is the score's (straight through); weighted gates are `s / sum(top-k s)` for k > 1 and
    the raw score `s` at k = 1 (Switch)."""
    torch.manual_seed(top_k)
    scores = torch.softmax(torch.randn(4, 5, dtype=torch.float64), -1).requires_grad_(True)
    index, gates = select_top_k(scores, top_k, gate_mode)
    upstream = torch.randn_like(gates)
    (actual,) = torch.autograd.grad(gates, scores, upstream)

    leaves = scores.detach().clone().requires_grad_(True)
    chosen = leaves.gather(-1, torch.argsort(-leaves.detach(), -1)[:, :top_k])
    assert torch.equal(index, torch.argsort(-scores.detach(), -1)[:, :top_k])
    if gate_mode == "union":
        expected_value = torch.ones_like(chosen)
        surrogate = chosen  # what the straight-through gate differentiates as
    elif top_k == 1:
        expected_value = surrogate = chosen
    else:
        expected_value = surrogate = chosen / chosen.sum(-1, keepdim=True)
    (expected,) = torch.autograd.grad(surrogate, leaves, upstream)
    torch.testing.assert_close(gates.detach(), expected_value.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-15)
