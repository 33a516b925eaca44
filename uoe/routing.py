"""Routing for Union-of-Experts blocks: routing patches, top-k expert selection, gates and router losses.

Everything here is plain tensor code without Python loops over tokens or experts and without
host-device synchronisation, so it runs unchanged inside `torch.compile` and on any device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F


def patch_source_index(
    position_ids: torch.Tensor, patch_size: int, continues_cache: bool, segment_starts: torch.Tensor | None = None
) -> torch.Tensor:
    """Index of the token whose router logits decide each token's routing (causal models).

    A routing patch is `patch_size` consecutive positions starting at a multiple of `patch_size`, and it
    is routed from its first token, so a decision never depends on the patch's later tokens. Patches
    follow the tokens' position ids (not their index in a padded batch), so left padding does not move
    patch boundaries.

    Args:
        position_ids: `(batch, seq)` positions of the current tokens.
        patch_size: tokens per routing patch.
        continues_cache: whether earlier tokens of the sequence are in a KV cache. If so, tokens whose
            patch began in the cache get index `-1` (use the cached decision); otherwise the first token
            starts a patch whatever its position.
        segment_starts: `(batch, seq)` bool, True where a packed sequence begins; a segment's first token
            always starts a patch, so patches never span two packed sequences.

    Returns:
        `(batch, seq)` int64 indices into the current chunk, `-1` meaning "from the cache".
    """
    seq_len = position_ids.shape[-1]
    token_index = torch.arange(seq_len, device=position_ids.device).expand_as(position_ids)
    starts_patch = position_ids % patch_size == 0
    if segment_starts is not None:
        starts_patch = starts_patch | segment_starts
    if not continues_cache:
        starts_patch = starts_patch | (token_index == 0)
    start_index = torch.where(starts_patch, token_index, torch.full_like(token_index, -1))
    return start_index.cummax(dim=-1).values


def gather_patch_logits(
    logits: torch.Tensor, source_index: torch.Tensor | None, cached_logits: torch.Tensor | None
) -> torch.Tensor:
    """Replace each token's router logits by those of its patch's routing token.

    Args:
        logits: `(batch, seq, experts)` router logits of the current tokens.
        source_index: output of `patch_source_index`, or `None` when every token routes itself.
        cached_logits: `(batch, experts)` logits that routed the last cached token, used where the
            source index is `-1`.
    """
    if source_index is None:
        return logits
    if cached_logits is None:
        candidates, index = logits, source_index.clamp(min=0)
    else:
        candidates = torch.cat([cached_logits[:, None, :].to(logits.dtype), logits], dim=1)
        index = source_index + 1
    index = index[..., None].expand(-1, -1, logits.shape[-1])
    return candidates.gather(1, index)


def router_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """Router scores in float32: softmax over experts, or an independent sigmoid per expert."""
    if score_func == "softmax":
        return F.softmax(logits.float(), dim=-1)
    return torch.sigmoid(logits.float())


def select_top_k(scores: torch.Tensor, top_k: int, gate_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-choice expert selection and the gate each selected expert's output is multiplied by.

    `gate_mode="union"` gives gates whose value is exactly 1 (the experts' outputs are summed, as in
    the dense layer) but whose gradient is the score's, `1 + s - stop_grad(s)`, so routers learn.
    `gate_mode="weighted"` gives, for `top_k > 1`, the top-k scores renormalised to sum to 1 (Mixtral); for
    `top_k == 1`, the selected expert's raw score (Switch Transformer): renormalising a single score would
    make the gate exactly 1 and cut the router off from the task gradient.

    Returns:
        `(top_k_index, top_k_gates)`, both `(..., top_k)`; gates are float32.
    """
    top_scores, top_index = torch.topk(scores, top_k, dim=-1)
    if gate_mode == "union":
        gates = 1.0 + (top_scores - top_scores.detach())
    elif top_k == 1:
        gates = top_scores
    else:
        gates = top_scores / top_scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(top_scores.dtype).tiny)
    return top_index, gates


def dense_gates(top_index: torch.Tensor, top_gates: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Scatter top-k gates into a dense `(..., num_experts)` tensor that is 0 for unselected experts."""
    return top_gates.new_zeros(*top_gates.shape[:-1], num_experts).scatter(-1, top_index, top_gates)


def load_balancing_loss(scores: torch.Tensor, top_index: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss of one routed block.

    `num_experts * sum_e f_e * p_e`, with `f_e` the fraction of (token, slot) selections that went to
    expert e and `p_e` the mean normalised router score of e, both over the non-padding tokens. It is 1
    when routing is perfectly balanced and grows as it concentrates.

    Args:
        scores: `(batch, seq, experts)` float32 router scores.
        top_index: `(batch, seq, top_k)` selected experts.
        token_mask: `(batch, seq)` bool, False for padding; `None` means all tokens count.
    """
    num_experts, top_k = scores.shape[-1], top_index.shape[-1]
    probs = scores / scores.sum(dim=-1, keepdim=True)
    selected = torch.zeros_like(probs).scatter(-1, top_index, 1.0)
    if token_mask is None:
        num_tokens = probs.shape[0] * probs.shape[1]
        selected_sum, prob_sum = selected.sum(dim=(0, 1)), probs.sum(dim=(0, 1))
    else:
        weight = token_mask.to(probs.dtype)[..., None]
        num_tokens = weight.sum().clamp_min(1.0)
        selected_sum, prob_sum = (selected * weight).sum(dim=(0, 1)), (probs * weight).sum(dim=(0, 1))
    fraction_routed = selected_sum / (num_tokens * top_k)
    mean_prob = prob_sum / num_tokens
    return num_experts * (fraction_routed * mean_prob).sum()


def mean_router_distribution(logits: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """σ-MoE's averaged router distribution of one routed block: the softmax over experts of the router logits, in
    float32, averaged over the batch's and sequence's non-padding tokens. Softmax whatever `router_score_func`: σ-MoE
    selects with sigmoids but regularises the softmax of the same logits.

    Args:
        logits: `(batch, seq, experts)` router logits.
        token_mask: `(batch, seq)` bool, False for padding; `None` means all tokens count.

    Returns:
        `(experts,)` probabilities summing to 1 (all zero when every token is padding).
    """
    probs = F.softmax(logits.float(), dim=-1)
    if token_mask is None:
        return probs.mean(dim=(0, 1))
    weight = token_mask.to(probs.dtype)[..., None]
    return (probs * weight).sum(dim=(0, 1)) / weight.sum().clamp_min(1.0)


def entropy_balance_loss(distribution: torch.Tensor) -> torch.Tensor:
    """σ-MoE's entropy balance loss: the negative entropy `sum_e p_e log p_e` of an averaged router distribution
    (`mean_router_distribution`), summed over the last axis. It is `-log(experts)` at perfect balance and 0 when a
    single expert takes all the probability. Pass several blocks' distributions concatenated to get the sum of their
    losses."""
    return (distribution * distribution.clamp_min(torch.finfo(distribution.dtype).tiny).log()).sum(dim=-1)


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition of the router logits over non-padding tokens."""
    z = torch.logsumexp(logits.float(), dim=-1).square()
    if token_mask is None:
        return z.mean()
    weight = token_mask.to(z.dtype)
    return (z * weight).sum() / weight.sum().clamp_min(1.0)


def patch_mean(hidden_states: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Mean of each routing patch's tokens (bidirectional models route a patch from all of its tokens).

    Args:
        hidden_states: `(batch, tokens, hidden)`; `tokens` must be a multiple of `patch_size`.

    Returns:
        `(batch, tokens // patch_size, hidden)`.
    """
    batch, tokens, hidden = hidden_states.shape
    if tokens % patch_size != 0:
        raise ValueError(f"`routing_patch_size` ({patch_size}) must divide the number of tokens ({tokens}).")
    if patch_size == 1:
        return hidden_states
    return hidden_states.view(batch, tokens // patch_size, patch_size, hidden).mean(dim=2)


def capacity_keep(scores: torch.Tensor, top_index: torch.Tensor, capacity: int) -> torch.Tensor:
    """Patch-wise data selection (expert choice) within each sequence: every expert keeps at most `capacity`
    of the patches that selected it, those with the highest scores.

    Selection is along the patch axis of each sequence separately, so one sequence never affects another.

    Args:
        scores: `(batch, patches, experts)` router scores.
        top_index: `(batch, patches, top_k)` experts each patch selected (token choice).
        capacity: patches kept per expert and sequence, `1 <= capacity <= patches`.

    Returns:
        `(batch, patches, top_k)` bool: whether each (patch, selected expert) pair is kept.
    """
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top_index, True)
    masked = scores.float().masked_fill(~chosen, float("-inf"))
    _, slots = masked.topk(capacity, dim=1, sorted=False)  # (batch, capacity, experts)
    kept = torch.zeros_like(chosen).scatter(1, slots, True) & chosen
    return kept.gather(-1, top_index)


def packed_segment_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Which packed sequence each token belongs to, from `(batch, seq)` position ids that restart inside a row
    (padding-free batches, e.g. transformers' `DataCollatorWithFlattening`).

    A token starts a new sequence where its position is not the previous one's plus 1 (transformers' rule for
    packed rows). Returns `(batch, seq)` int64 ids counting from 0, or `None` when every row is one sequence: that
    check reads one flag on the host, so under `torch.compile` the ids are always returned.
    """
    first = position_ids[:, :1] - 1
    starts = torch.diff(position_ids, prepend=first, dim=-1) != 1
    segment_ids = starts.long().cumsum(-1)
    if not torch.compiler.is_compiling() and not bool(segment_ids[:, -1].any()):
        return None
    return segment_ids


class Slots(NamedTuple):
    """What a run of consecutive tokens selected in one routed block: `slots` experts per token.

    index: `(batch, tokens, slots)` expert ids.
    gate: `(batch, tokens, slots)` factor each selected expert's output is multiplied by.
    keep: `(batch, tokens, slots)` bool, or `None` (all kept): False means the pair computes nothing (padding,
        or a pair dropped by data selection).
    """

    index: torch.Tensor
    gate: torch.Tensor
    keep: torch.Tensor | None = None


def slots_to_dense(slots: Sequence[Slots], num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(selected, gates)`, both `(batch, seq, num_experts)`: the masked reference's view of the same selection
    (gates 0 where a pair is not selected or not kept)."""
    selected, gates = [], []
    for block in slots:
        keep = torch.ones_like(block.index, dtype=torch.bool) if block.keep is None else block.keep
        shape = (*block.index.shape[:2], num_experts)
        selected.append(torch.zeros(shape, dtype=torch.bool, device=keep.device).scatter(-1, block.index, keep))
        gate = block.gate * keep.to(block.gate.dtype)
        gates.append(gate.new_zeros(shape).scatter(-1, block.index, gate))
    if len(slots) == 1:
        return selected[0], gates[0]
    return torch.cat(selected, dim=1), torch.cat(gates, dim=1)
