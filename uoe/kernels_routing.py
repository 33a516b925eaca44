"""Routing metadata for the UoE kernels, in plain tensor ops without host synchronisation.

Both kernels need the routed work grouped by expert: UoME needs the (token, slot) pairs sorted by MLP
expert, SMHA needs each (sequence, head)'s selected tokens in order. Sizes are fixed by the inputs
(no `nonzero`, no `bincount`, nothing read back to the host), so these run inside CUDA graphs and
`torch.compile` and cost a sort plus a few small scans.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ExpertRouting(NamedTuple):
    """Top-k assignments grouped by expert.

    A *pair* `p = token * top_k + slot` is one (token, slot) assignment, in `top_k_index.reshape(-1)` order.

    sorted_pair: `(S,)` int32, the pairs sorted by expert (stable, so by token within an expert).
    expert_offsets: `(E + 1,)` int32, expert e's pairs are `sorted_pair[expert_offsets[e]:expert_offsets[e + 1]]`.
    inverse: `(S,)` int32, position of pair p in `sorted_pair` (`sorted_pair[inverse[p]] == p`).
    """

    sorted_pair: torch.Tensor
    expert_offsets: torch.Tensor
    inverse: torch.Tensor


def expert_routing_metadata(top_k_index: torch.Tensor, num_experts: int) -> ExpertRouting:
    """Group the (token, slot) pairs of `top_k_index` `(tokens, top_k)` by expert.

    Expert ids must lie in `[0, num_experts)`; ids outside that range end up outside every expert's
    range (ignored by the kernels).
    """
    flat = top_k_index.reshape(-1)
    sorted_expert, sorted_pair = torch.sort(flat, stable=True)
    boundaries = torch.arange(num_experts + 1, device=flat.device, dtype=sorted_expert.dtype)
    # offsets[e] = number of pairs with expert < e; a binary search instead of bincount (which syncs)
    expert_offsets = torch.searchsorted(sorted_expert, boundaries, out_int32=True)
    positions = torch.arange(flat.numel(), device=flat.device, dtype=torch.int32)
    inverse = torch.empty_like(positions).scatter_(0, sorted_pair, positions)
    return ExpertRouting(sorted_pair.to(torch.int32), expert_offsets, inverse)


class CompactSelection(NamedTuple):
    """Selected positions along the last axis of a boolean `(..., T)` selection, per leading index.

    index: `(..., T)` int32; the first `count` entries are the selected positions in increasing order,
        the rest are the unselected positions (never read by the kernels).
    count: `(...,)` int32, number of selected positions.
    cumulative: `(..., T)` int32, `cumulative[..., t]` = number of selected positions `<= t`.
    """

    index: torch.Tensor
    count: torch.Tensor
    cumulative: torch.Tensor


def compact_selection(selected: torch.Tensor) -> CompactSelection:
    """Compact a boolean `(..., T)` selection: per leading index, the selected positions in order."""
    return CompactSelection(*torch.ops.uoe.compact_selection(selected))


def _compact_selection(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # a stable sort of "not selected" flags moves the selected positions to the front, keeping their order
    index = torch.sort((~selected).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    cumulative = selected.to(torch.int32).cumsum(-1, dtype=torch.int32)
    count = cumulative[..., -1].clone() if selected.shape[-1] > 0 else cumulative.new_zeros(selected.shape[:-1])
    # the kernels index these as dense (..., T) arrays
    return index.contiguous(), count.contiguous(), cumulative.contiguous()


def _compact_selection_fake(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = selected.shape
    return (
        selected.new_empty(shape, dtype=torch.int32),
        selected.new_empty(shape[:-1], dtype=torch.int32),
        selected.new_empty(shape, dtype=torch.int32),
    )


# An opaque op for torch.compile: Inductor's own code for this sort + cumsum (a split scan over long rows) fails
# to compile with torch 2.11 / Triton 3.6 ("'R0_BLOCK' is not in list"), and there is nothing here to fuse.
if not hasattr(torch.ops.uoe, "compact_selection"):  # a second copy of this file (remote code) reuses the op
    torch.library.custom_op(
        "uoe::compact_selection",
        _compact_selection,
        mutates_args=(),
        schema="(Tensor selected) -> (Tensor, Tensor, Tensor)",
    ).register_fake(_compact_selection_fake)
