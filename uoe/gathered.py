"""The gathered execution path of the routed blocks: only the selected (token, expert) pairs are computed.

Plain PyTorch ops, so it runs on every device, under autograd and under `torch.compile`. A routed block's
selection is a list of `Slots` (each token's experts, gates and whether the pair computes at all); the pairs
are sorted by expert and every projection is one grouped product over the sorted rows (`grouped_mm`):

- UoME (`gathered_experts_forward`): gather the rows of the pairs, grouped `x @ W1`, activation, times the gate,
  grouped `@ W2`, and a fixed-order sum of each token's slots (`combine_pairs`);
- SMHA (the pieces `UoESelectiveAttention` assembles): grouped q/k/v projections of the selected (token, head)
  pairs (`project_pairs`), RoPE at the tokens' original positions (`rotate_pairs`), attention over each (head,
  sequence)'s compacted list of tokens (`head_lists`, `self_list_attention`; lists are in token order, so causal in
  list order is causal in token order), and `output_projection` with a fixed-order sum.

Nothing is computed for unselected pairs, padding or pairs dropped by data selection. The padded attention
layout needs the list lengths: eager code reads them (one host read per attention block, free on CPU, a sync on
CUDA); under `torch.compile` the sequence length is the bound, so there is no data-dependent shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import flop_registry, register_flop_formula

from .routing import Slots, slots_to_dense
from .selective_attention import apply_rotary_pos_emb, query_slots, rotate_half

# ---------------------------------------------------------------------------------------------------------------------
# When a path may read a module's weights
# ---------------------------------------------------------------------------------------------------------------------


def _plain_tensor(tensor: torch.Tensor | None, device: torch.device) -> bool:
    # quantized weights (torchao, ...) and DTensors are tensor subclasses; offloaded ones live on another device
    return tensor is None or (type(tensor) in (torch.Tensor, nn.Parameter) and tensor.device == device)


def reads_weights_directly(module: nn.Module, device: torch.device) -> bool:
    """Whether a sparse path may multiply by `module.weight` (and `.bias`) itself instead of calling the module: only
    where that is provably the module's own computation. That is a plain `nn.Linear` (PEFT's LoRA layers, quanto's
    and bitsandbytes' layers and parametrized modules are other classes), whose `forward` is the class's (accelerate's
    offload hook replaces it), with no hooks of its own, and whose weight and bias are plain tensors on `device`
    (torchao's quantized weights are tensor subclasses). Everything else is called as a module. Global module hooks
    (`torch.nn.modules.module.register_module_forward_hook`) are not looked at: observers such as `FlopCounterMode`
    register them for every module, and they would turn every sparse projection dense."""
    if type(module) is not nn.Linear or "forward" in module.__dict__:
        return False
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return False
    return _plain_tensor(module.weight, device) and _plain_tensor(module.bias, device)


def reads_parameters_directly(module: nn.Module, names: Sequence[str], device: torch.device) -> bool:
    """The rule for an experts module, whose implementations run inside its own `forward` (so its hooks have run):
    the stacked parameters `names` must be plain tensors on `device`."""
    return all(_plain_tensor(getattr(module, name, None), device) for name in names)


# ---------------------------------------------------------------------------------------------------------------------
# Grouped products
# ---------------------------------------------------------------------------------------------------------------------

_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _native_grouped_mm(*tensors: torch.Tensor) -> bool:
    return hasattr(F, "grouped_mm") and all(t.dtype in _NATIVE_DTYPES for t in tensors)


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -x.shape[-1] % multiple
    return F.pad(x, (0, extra)) if extra else x


def _row_groups(offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Group of each row (`len(offsets)` for rows past the last group)."""
    rows = torch.arange(num_rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets, rows, right=True)


def _padded_groups(rows: torch.Tensor, offsets: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Rows scattered into a zero-padded `(groups, largest group, width)` batch (fallback only: reads the largest
    group's size on the host)."""
    group = _row_groups(offsets, rows.shape[0])
    starts = torch.cat([offsets.new_zeros(1), offsets[:-1]])
    in_group = group < num_groups
    group, index = group[in_group].long(), torch.arange(rows.shape[0], device=rows.device)[in_group]
    position = index - starts[group]
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    capacity = int(counts.max()) if num_groups > 0 else 0
    padded = rows.new_zeros(num_groups, capacity, rows.shape[1])
    padded[group, position] = rows[index]
    return padded, group, position, index


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, zero_tail: bool) -> torch.Tensor:
    num_rows, num_groups = a.shape[0], b.shape[0]
    if _native_grouped_mm(a, b):
        # grouped_mm needs 16-byte aligned strides: pad the inner and outer widths with zeros where they are not
        multiple = 16 // a.element_size()
        out_width = b.shape[2]
        if a.shape[1] % multiple or out_width % multiple:
            a = _pad_last(a, multiple)
            b = _pad_last(F.pad(b, (0, 0, 0, a.shape[1] - b.shape[1])), multiple)
        out = F.grouped_mm(a.contiguous(), b, offs=offsets)
        out = out[:, :out_width].contiguous() if out.shape[1] != out_width else out
    else:  # e.g. float64: a padded batched matmul
        padded, group, position, index = _padded_groups(a, offsets, num_groups)
        result = torch.bmm(padded, b)
        out = a.new_zeros(num_rows, b.shape[2])
        out[index] = result[group, position]
        return out
    if zero_tail:  # rows past the last group belong to no expert (dropped pairs), and grouped_mm leaves them unset
        out.masked_fill_((torch.arange(num_rows, device=a.device) >= offsets[-1])[:, None], 0)
    return out


def _grouped_mm_weight_grad(
    a: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """`(groups, K, N)`: for each group g, `a[rows of g].T @ grad[rows of g]`."""
    if _native_grouped_mm(a, grad):
        multiple = 16 // a.element_size()
        k, n = a.shape[1], grad.shape[1]
        a_p, grad_p = _pad_last(a, multiple), _pad_last(grad, multiple)
        rows = a.shape[0]
        if rows % multiple:  # the row axis is the inner axis of this product
            a_p, grad_p = F.pad(a_p, (0, 0, 0, -rows % multiple)), F.pad(grad_p, (0, 0, 0, -rows % multiple))
        return F.grouped_mm(a_p.t(), grad_p.contiguous(), offs=offsets)[:, :k, :n].contiguous()
    padded_a, *_ = _padded_groups(a, offsets, num_groups)
    padded_grad, *_ = _padded_groups(grad, offsets, num_groups)
    return torch.bmm(padded_a.transpose(1, 2), padded_grad)


def _grouped_mm_fake(a, b, offsets, zero_tail):
    return a.new_empty(a.shape[0], b.shape[2])


def _grouped_mm_weight_grad_fake(a, grad, offsets, num_groups):
    return a.new_empty(num_groups, a.shape[1], grad.shape[1])


def _grouped_mm_setup_context(ctx, inputs, output) -> None:
    a, b, offsets, zero_tail = inputs
    ctx.zero_tail = zero_tail
    ctx.save_for_backward(a, b, offsets)


def _grouped_mm_backward(ctx, grad):
    a, b, offsets = ctx.saved_tensors
    grad = grad.contiguous()  # autograd may hand an expanded gradient, which grouped_mm rejects
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = torch.ops.uoe.grouped_mm(grad, b.transpose(1, 2), offsets, ctx.zero_tail)
    if ctx.needs_input_grad[1]:
        grad_b = torch.ops.uoe.grouped_mm_weight_grad(a, grad, offsets, b.shape[0]).to(b.dtype)
    return grad_a, grad_b, None, None


# Custom ops: opaque to torch.compile (Inductor's meta function for grouped_mm only admits bfloat16 on CPU).
if not hasattr(torch.ops.uoe, "grouped_mm"):  # a second copy of this file (remote code) reuses the ops
    _op = torch.library.custom_op(
        "uoe::grouped_mm",
        _grouped_mm,
        mutates_args=(),
        schema="(Tensor a, Tensor b, Tensor offsets, bool zero_tail) -> Tensor",
    )
    _op.register_fake(_grouped_mm_fake)
    _op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup_context)
    torch.library.custom_op(
        "uoe::grouped_mm_weight_grad",
        _grouped_mm_weight_grad,
        mutates_args=(),
        schema="(Tensor a, Tensor grad, Tensor offsets, int num_groups) -> Tensor",
    ).register_fake(_grouped_mm_weight_grad_fake)


def _computed_rows(rows: torch.Tensor, offsets: torch.Tensor) -> int:
    try:  # the rows the product computes; a fake tensor (tracing) has no values: count them all
        return int(offsets[-1]) if offsets.numel() else 0
    except (RuntimeError, NotImplementedError, ValueError):
        return rows.shape[0]


def _grouped_mm_flops(a, b, offsets, *args, out_val=None, **kwargs) -> int:
    return 2 * _computed_rows(a, offsets) * a.shape[1] * b.shape[2]


def _grouped_mm_weight_grad_flops(a, grad, offsets, *args, out_val=None, **kwargs) -> int:
    return 2 * _computed_rows(a, offsets) * a.shape[1] * grad.shape[1]


# `torch.utils.flop_counter.FlopCounterMode` counts the rows the grouped products compute (what ran, not the
# buffer sizes).
if torch.ops.uoe.grouped_mm not in flop_registry:
    register_flop_formula(torch.ops.uoe.grouped_mm, get_raw=True)(_grouped_mm_flops)
    register_flop_formula(torch.ops.uoe.grouped_mm_weight_grad, get_raw=True)(_grouped_mm_weight_grad_flops)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, zero_tail: bool = True) -> torch.Tensor:
    """Grouped product of rows sorted by group: `out[r] = a[r] @ b[g]` for the rows r of group g.

    Args:
        a: `(rows, K)`, sorted by group.
        b: `(groups, K, N)` (any strides; a transposed view of `(groups, N, K)` weights is fine).
        offsets: `(groups,)` int32, the end row of each group (group g is rows `offsets[g-1]:offsets[g]`).
        zero_tail: whether rows may lie past the last group (then they are set to 0); `False` when the groups
            cover every row (saves a pass over the output).

    Returns:
        `(rows, N)`; rows from `offsets[-1]` on belong to no group and are 0. Differentiable in `a` and `b`.
        Uses `torch.nn.functional.grouped_mm` where the dtype allows it (float32/bfloat16/float16), a padded
        batched matmul otherwise.
    """
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None:
        return _grouped_mm(a, b, offsets, zero_tail)  # inference: skip the custom op's dispatch (~25 us a call)
    return torch.ops.uoe.grouped_mm(a, b, offsets, zero_tail)


# ---------------------------------------------------------------------------------------------------------------------
# Routed pairs
# ---------------------------------------------------------------------------------------------------------------------


class SortedPairs(NamedTuple):
    """The (token, expert) pairs of a list of `Slots`, sorted by expert, then by token.

    token: `(P,)` flat token index (`batch * seq_len + position`) of each sorted pair.
    expert: `(P,)` expert of each sorted pair; `num_experts` for pairs that compute nothing (sorted last).
    gate: `(P,)` the pair's gate.
    order: `(P,)` sorted pair r is pair `order[r]` of the slots flattened in order.
    offsets: `(num_experts,)` int32 end row of each expert (the `grouped_mm` offsets).
    complete: whether every pair is computed (no `keep` masks), so no rows lie past the last expert.
    """

    token: torch.Tensor
    expert: torch.Tensor
    gate: torch.Tensor
    order: torch.Tensor
    offsets: torch.Tensor
    complete: bool


def sort_pairs(slots: Sequence[Slots], num_experts: int, seq_len: int) -> SortedPairs:
    """Flatten `slots` (which tile the sequence axis in order) into pairs and sort them by (expert, token)."""
    tokens, experts, gates = [], [], []
    start = 0
    for block in slots:
        batch, length, width = block.index.shape
        device = block.index.device
        position = torch.arange(start, start + length, device=device)
        token = torch.arange(batch, device=device)[:, None, None] * seq_len + position[None, :, None]
        expert = block.index if block.keep is None else torch.where(block.keep, block.index, num_experts)
        tokens.append(token.expand(batch, length, width).reshape(-1))
        experts.append(expert.reshape(-1))
        gates.append(block.gate.reshape(-1))
        start += length
    if len(slots) == 1:
        token, expert, gate = tokens[0], experts[0].long(), gates[0]
    else:
        token, expert, gate = torch.cat(tokens), torch.cat(experts).long(), torch.cat(gates)
    batch = slots[0].index.shape[0]
    key = expert * (batch * seq_len) + token
    order = torch.sort(key, stable=True).indices
    expert = expert[order]
    boundaries = torch.arange(1, num_experts + 1, device=expert.device, dtype=expert.dtype)
    offsets = torch.searchsorted(expert, boundaries, out_int32=True)
    complete = all(block.keep is None for block in slots)
    return SortedPairs(token[order], expert, gate[order], order, offsets, complete)


def combine_pairs(rows: torch.Tensor, pairs: SortedPairs, slots: Sequence[Slots]) -> torch.Tensor:
    """Sum each token's pair rows (`rows` in sorted order) back into `(batch, seq, width)`, in a fixed order."""
    batch, seq_len = slots[0].index.shape[0], sum(block.index.shape[1] for block in slots)
    if rows.device.type == "cpu":
        # index_add_ accumulates in index order on the CPU (deterministic), in one pass over the rows
        out = rows.new_zeros(batch * seq_len, rows.shape[1]).index_add_(0, pairs.token, rows)
        return out.view(batch, seq_len, rows.shape[1])
    # elsewhere index_add_ uses atomics: unsort, then sum each token's slots in slot order
    inverse = torch.empty_like(pairs.order).scatter_(0, pairs.order, torch.arange(len(pairs.order), device=rows.device))
    rows = rows.index_select(0, inverse)
    outputs, start = [], 0
    for block in slots:
        batch, length, width = block.index.shape
        count = batch * length * width
        outputs.append(rows[start : start + count].view(batch, length, width, -1).sum(2))
        start += count
    return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]


# ---------------------------------------------------------------------------------------------------------------------
# UoME
# ---------------------------------------------------------------------------------------------------------------------


def expert_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`(up, up bias, down bias)` of a `@use_experts_implementation` experts module (`gate_up_proj` when gated)."""
    has_bias = getattr(experts, "has_bias", False)
    if getattr(experts, "has_gate", True):
        up, up_bias = experts.gate_up_proj, getattr(experts, "gate_up_proj_bias", None) if has_bias else None
    else:
        up, up_bias = experts.up_proj, getattr(experts, "up_proj_bias", None) if has_bias else None
    return up, up_bias, getattr(experts, "down_proj_bias", None) if has_bias else None


def _activate(experts: nn.Module, inner: torch.Tensor) -> torch.Tensor:
    """The experts' activation of their up-projection rows (`act(gate) * up` when gated)."""
    if getattr(experts, "has_gate", True):
        gate, value = inner.chunk(2, dim=-1)
        return experts.act_fn(gate) * value
    return experts.act_fn(inner)


# Below this many gathered weights (pairs x the weights of one pair), e.g. decoding a small model, copying each
# pair's slices and multiplying them directly costs less than sorting the pairs and running grouped products.
TOKEN_MAJOR_MAX_WEIGHTS = 1 << 18


def use_token_major(num_pairs: int, weights_per_pair: int) -> bool:
    """Whether products over `num_pairs` pairs should copy each pair's weight slices (see `TOKEN_MAJOR_MAX_WEIGHTS`)."""
    return num_pairs * weights_per_pair <= TOKEN_MAJOR_MAX_WEIGHTS


def gathered_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    pair_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Experts back-end `"uoe_gathered"` (`self` is a `@use_experts_implementation` experts module).

    Computes `sum_j w[n, j] * down[e] act(up[e] x[n] + b[e]) (+ down bias[e])` over each token's kept slots
    `e = top_k_index[n, j]`, with one grouped product per projection over the pairs sorted by expert.

    Args:
        hidden_states: `(tokens, hidden)`.
        top_k_index, top_k_weights: `(tokens, top_k)`.
        pair_keep: optional `(tokens, top_k)` bool; False pairs compute nothing and contribute 0.
    """
    if getattr(self, "is_transposed", False) or not getattr(self, "is_concatenated", True):
        raise NotImplementedError(
            f'{type(self).__name__}: experts_implementation="uoe_gathered" supports stacked (experts, out, in) '
            "weights with concatenated [gate; up] rows; use another experts implementation for this model."
        )
    num_tokens = hidden_states.shape[0]
    up, up_bias, down_bias = expert_weights(self)
    num_experts = up.shape[0]
    if use_token_major(top_k_index.numel(), up[0].numel()):
        return _token_major_experts(self, hidden_states, top_k_index, top_k_weights, pair_keep)
    keep = None if pair_keep is None else pair_keep[None]
    slots = [Slots(top_k_index[None], top_k_weights[None], keep)]
    pairs = sort_pairs(slots, num_experts, num_tokens)
    expert = pairs.expert.clamp(max=num_experts - 1)  # dropped rows are zeroed by the next grouped product

    rows = hidden_states.to(up.dtype).index_select(0, pairs.token)
    inner = grouped_mm(rows, up.transpose(1, 2), pairs.offsets, not pairs.complete)
    if up_bias is not None:
        inner = inner + up_bias.index_select(0, expert)
    inner = _activate(self, inner) * pairs.gate[:, None].to(inner.dtype)
    out = grouped_mm(inner, self.down_proj.transpose(1, 2), pairs.offsets, not pairs.complete)
    if down_bias is not None:
        kept = (pairs.expert < num_experts).to(out.dtype)[:, None]
        out = out + down_bias[expert] * (pairs.gate[:, None].to(out.dtype) * kept)
    return combine_pairs(out, pairs, slots)[0].to(hidden_states.dtype)


def pair_products(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`weights[p] @ rows[p]` for each pair p: `(pairs, in)` rows times `(pairs, out, in)` weights -> `(pairs, out)`.

    Written as a batch of row vectors times transposed weights: on CPU that is an order of magnitude faster than the
    same batch of matrix-vector products (`bmm(weights, rows[..., None])`, 155 vs 15 us at 2 x 384 x 192)."""
    return torch.bmm(rows[:, None, :], weights.mT)[:, 0]


def _token_major_experts(self, hidden_states, top_k_index, top_k_weights, pair_keep) -> torch.Tensor:
    """Few pairs of small experts: each pair's expert slices gathered and multiplied directly, without sorting."""
    up, up_bias, down_bias = expert_weights(self)
    num_tokens, top_k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    rows = hidden_states.to(up.dtype).repeat_interleave(top_k, 0)  # (pairs, hidden)
    inner = pair_products(rows, up.index_select(0, flat))
    if up_bias is not None:
        inner = inner + up_bias.index_select(0, flat)
    inner = _activate(self, inner)
    weights = top_k_weights.reshape(-1, 1).to(inner.dtype)
    if pair_keep is not None:
        weights = weights * pair_keep.reshape(-1, 1).to(inner.dtype)
    out = pair_products(inner * weights, self.down_proj.index_select(0, flat))
    if down_bias is not None:
        out = out + down_bias.index_select(0, flat) * weights
    return out.view(num_tokens, top_k, -1).sum(1).to(hidden_states.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# SMHA
# ---------------------------------------------------------------------------------------------------------------------


class HeadLists(NamedTuple):
    """Each (head, sequence)'s selected tokens as one list in token order, padded, in a flat buffer.

    Lists are grouped into buckets of similar length (by count), each bucket a `(lists, length, width)` block of
    the buffer, so that a few long lists do not pad every list to their length.

    count: `(heads, batch)` number of tokens in each list.
    slot: `(P,)` buffer row of each sorted pair (dropped pairs: rows past the lists, each its own).
    buckets: `(first row, number of lists, padded length)` of each bucket, in buffer order.
    bucket_count: per bucket, the `(lists,)` counts of its lists.
    rows: rows of the buffer taken by the lists.
    scratch: rows after them for dropped pairs (0 when every pair is kept).
    """

    count: torch.Tensor
    slot: torch.Tensor
    buckets: list[tuple[int, int, int]]
    bucket_count: list[torch.Tensor]
    rows: int
    scratch: int


# Lists shorter than this share one bucket: their attention is cheap, extra buckets would cost more calls.
_BUCKETS_FROM_LENGTH = 128


def head_lists(
    pairs: SortedPairs, num_heads: int, batch: int, seq_len: int, max_length: int | None, num_buckets: int = 4
) -> HeadLists:
    """Lay the sorted (token, head) pairs out as per-(head, sequence) lists in token order.

    `max_length` (a bound known from the routing) gives one bucket of that length. Otherwise eager code reads the
    lengths of `num_buckets` buckets on the host (the gathered path's one host read per attention block); under
    `torch.compile` there is one bucket of length `seq_len`, so shapes do not depend on the data.
    """
    num_pairs, num_lists = pairs.token.shape[0], num_heads * batch
    device = pairs.token.device
    group = pairs.expert * batch + pairs.token // seq_len  # (head, sequence); dropped pairs past the last list
    starts = torch.searchsorted(group, torch.arange(num_lists + 1, device=device, dtype=group.dtype))
    count = torch.diff(starts)
    length = max_length
    if length is None:
        length = seq_len if torch.compiler.is_compiling() else max(int(count.max()), 1)
    if max_length is not None or torch.compiler.is_compiling() or num_buckets == 1 or length < _BUCKETS_FROM_LENGTH:
        list_base = torch.arange(num_lists, device=device) * length
        buckets, bucket_count = [(0, num_lists, length)], [count]
    else:
        # longest lists first; bucket b holds lists [b * size, (b + 1) * size) of that order, padded to its first
        sorted_count, order = torch.sort(count, descending=True, stable=True)
        size = -(-num_lists // num_buckets)
        lengths = [max(n, 1) for n in sorted_count[::size].tolist()]
        list_length = torch.tensor(lengths, device=device).repeat_interleave(size)[:num_lists]
        base_in_order = torch.cumsum(list_length, 0) - list_length
        list_base = torch.empty_like(base_in_order).scatter_(0, order, base_in_order)
        buckets, bucket_count, first = [], [], 0
        for b, length in enumerate(lengths):
            lists = min(size, num_lists - b * size)
            buckets.append((first, lists, length))
            bucket_count.append(sorted_count[b * size : b * size + lists])
            first += lists * length
    rows = sum(lists * length for _, lists, length in buckets)
    rank = torch.arange(num_pairs, device=device) - starts[group.clamp(max=num_lists)]
    slot = list_base[group.clamp(max=num_lists - 1)] + rank
    scratch = 0 if pairs.complete else num_pairs
    if scratch:
        slot = torch.where(pairs.expert < num_heads, slot, rows + torch.arange(num_pairs, device=device))
    return HeadLists(count.view(num_heads, batch), slot, buckets, bucket_count, rows, scratch)


def to_lists(rows: torch.Tensor, lists: HeadLists) -> torch.Tensor:
    """Scatter sorted pair rows `(P, width)` into the flat list buffer (zeros where no pair is)."""
    buffer = rows.new_zeros(lists.rows + lists.scratch, rows.shape[1]).index_copy(0, lists.slot, rows)
    return buffer[: lists.rows] if lists.scratch else buffer


def from_lists(buffer: torch.Tensor, lists: HeadLists) -> torch.Tensor:
    """Read the sorted pairs' rows back from the flat list buffer (rows of dropped pairs are 0)."""
    if not lists.scratch:
        return buffer.index_select(0, lists.slot)
    out = buffer.index_select(0, lists.slot.clamp(max=lists.rows - 1))
    return out.masked_fill(lists.slot[:, None] >= lists.rows, 0)


def self_list_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lists: HeadLists,
    causal: bool,
    scaling: float,
    dropout: float = 0.0,
    segment: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of every list with itself (no KV cache): flat buffers in, `(rows, group * d)` out.

    A list is one head group's tokens: `query` rows `(rows, group * d)` hold the group's query heads side by side,
    `key` and `value` rows `(rows, d)` its one key/value head (`group = 1`: multi-head attention).
    Causal attention is causal in list order (lists are in token order). `segment` (`(rows,)` packed-sequence ids
    of the buffer rows) keeps attention inside each packed sequence. Padding rows get finite values never read.
    """
    head_dim = key.shape[1]
    group = query.shape[1] // head_dim
    outputs = []
    for (first, num_lists, length), count in zip(lists.buckets, lists.bucket_count, strict=True):
        block = slice(first, first + num_lists * length)
        q = query[block].view(num_lists, length, group, head_dim).transpose(1, 2)
        k, v = (t[block].view(num_lists, 1, length, head_dim) for t in (key, value))
        gqa = {"enable_gqa": True} if group > 1 else {}
        if segment is None and causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling, **gqa)
        else:
            index = torch.arange(length, device=q.device)
            valid = index < count[:, None]  # (lists, L)
            allowed = valid[:, None, None, :]
            if causal:
                allowed = allowed & (index[None, :] <= index[:, None])
            if segment is not None:
                seg = segment[block].view(num_lists, length)
                allowed = allowed & (seg[:, None, None, :] == seg[:, None, :, None])
            allowed = allowed | (index[None, :] == index[:, None])  # every row keeps itself: no empty softmax row
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scaling, **gqa)
        outputs.append(out.transpose(1, 2).reshape(num_lists * length, group * head_dim))
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def cached_list_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_count: torch.Tensor,
    key_count: torch.Tensor,
    query_position: torch.Tensor,
    key_position: torch.Tensor,
    causal: bool,
    scaling: float,
    dropout: float = 0.0,
    query_segment: torch.Tensor | None = None,
    key_segment: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of new tokens' lists `(heads, batch, Lq, group * d)` against the cached tokens' lists
    `(heads, batch, Lk, d)` (`heads` are head groups; a query row holds the group's query heads side by side).

    A query sees the keys of its list at token positions (`(heads, batch, L)`) no later than its own (causal), in
    its packed sequence. Rows past a list's count are padding: finite values, never read.
    """
    q_len, k_len = query.shape[2], key.shape[2]
    groups, batch, head_dim = key.shape[0], key.shape[1], key.shape[3]
    group = query.shape[3] // head_dim
    allowed = (torch.arange(k_len, device=query.device) < key_count[..., None])[:, :, None, :]
    if causal:
        allowed = allowed & (key_position[:, :, None, :] <= query_position[..., None])
    if query_segment is not None:
        allowed = allowed & (key_segment[:, :, None, :] == query_segment[..., None])
    query_valid = torch.arange(q_len, device=query.device) < query_count[..., None]
    # padding rows (and lists without keys) attend everything: finite, and never read
    allowed = allowed | ~(query_valid[..., None] & allowed.any(-1, keepdim=True))
    if group == 1:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, dropout_p=dropout, scale=scaling)
    # one (group, sequence) list per batch entry, its query heads as heads sharing the one key/value head
    query = query.reshape(groups * batch, q_len, group, head_dim).transpose(1, 2)
    key, value = (t.reshape(groups * batch, 1, k_len, head_dim) for t in (key, value))
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=allowed.reshape(groups * batch, 1, q_len, k_len),
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=True,
    )
    return out.transpose(1, 2).reshape(groups, batch, q_len, group * head_dim)


def head_weights(linear: nn.Linear, num_heads: int) -> torch.Tensor:
    """`(heads, hidden, head_dim)` view of a q/k/v projection's per-head weight slices."""
    out_features, in_features = linear.weight.shape
    return linear.weight.view(num_heads, out_features // num_heads, in_features).transpose(1, 2)


def project_pairs(
    rows: torch.Tensor, projections: Sequence[nn.Linear], pairs: SortedPairs, num_heads: int
) -> list[torch.Tensor]:
    """q/k/v of the sorted (token, head) pairs: per-head weight slices, one grouped product.

    With many pairs the three projections run as one product over their concatenated weights (the gathered rows
    are read once); with few pairs (decoding) each reads only the selected heads' slices.
    """
    head = pairs.expert.clamp(max=num_heads - 1)  # dropped rows are zeroed by grouped_mm; biases are harmless
    widths = [p.weight.shape[0] // num_heads for p in projections]
    has_bias = projections[0].bias is not None
    if rows.shape[0] >= rows.shape[1]:
        weight = torch.cat([head_weights(p, num_heads) for p in projections], dim=2)
        fused = grouped_mm(rows, weight, pairs.offsets, not pairs.complete)
        if has_bias:
            fused = fused + torch.cat([p.bias.view(num_heads, -1) for p in projections], 1).index_select(0, head)
        return list(fused.split(widths, dim=-1))
    outputs = [grouped_mm(rows, head_weights(p, num_heads), pairs.offsets, not pairs.complete) for p in projections]
    if has_bias:
        outputs = [
            out + p.bias.view(num_heads, -1).index_select(0, head) for out, p in zip(outputs, projections, strict=True)
        ]
    return outputs


def output_projection(
    rows: torch.Tensor, o_proj: nn.Linear, pairs: SortedPairs, slots: Sequence[Slots], num_heads: int
) -> torch.Tensor:
    """`o_proj` (without bias) of the heads' outputs `(P, head_dim)`, summed per token: `(batch, seq, hidden)`.

    With few pairs (decoding) each pair goes through its head's columns of `o_proj` (a grouped product that reads
    only the selected heads' weights). With many, the pairs are scattered to their (token, head) places and one
    dense product sums the heads: on CPU that beats per-head products, which write `top_k` rows of width `hidden`
    per token, although it multiplies the zeros of unselected heads too.
    """
    hidden, width = o_proj.weight.shape
    head_dim = width // num_heads
    if rows.shape[0] < hidden:
        weight = o_proj.weight.view(hidden, num_heads, head_dim).permute(1, 2, 0)  # (heads, head_dim, hidden)
        return combine_pairs(grouped_mm(rows, weight, pairs.offsets, not pairs.complete), pairs, slots)
    return F.linear(to_token_heads(rows, pairs, slots, num_heads), o_proj.weight)


def to_token_heads(rows: torch.Tensor, pairs: SortedPairs, slots: Sequence[Slots], num_heads: int) -> torch.Tensor:
    """The pairs' rows `(P, width)` scattered to their (token, head) places: `(batch, seq, num_heads * width)`, zero
    where a token did not select a head (the input `o_proj` takes)."""
    batch, seq_len = slots[0].index.shape[0], sum(block.index.shape[1] for block in slots)
    places = batch * seq_len * num_heads
    place = pairs.token * num_heads + pairs.expert.clamp(max=num_heads - 1)
    if not pairs.complete:  # dropped pairs write to a scratch row
        place = torch.where(pairs.expert < num_heads, place, places)
    heads = rows.new_zeros(places + (0 if pairs.complete else 1), rows.shape[1]).index_copy(0, place, rows)
    return heads[:places].view(batch, seq_len, num_heads * rows.shape[1])


def rotate_pairs(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairs: SortedPairs
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of pair rows at their tokens' original positions (`cos`/`sin`: `(batch, seq, head_dim)`); a query row may
    hold several heads side by side (`(P, group * head_dim)`), each rotated alike."""
    head_dim = cos.shape[-1]
    cos = cos.reshape(-1, head_dim).index_select(0, pairs.token)
    sin = sin.reshape(-1, head_dim).index_select(0, pairs.token)
    key = key * cos + rotate_half(key) * sin
    if query.shape[-1] == head_dim:
        return query * cos + rotate_half(query) * sin, key
    heads = query.view(query.shape[0], -1, head_dim)
    heads = heads * cos[:, None] + rotate_half(heads) * sin[:, None]
    return heads.reshape(query.shape), key


def to_dense_heads(rows: torch.Tensor, pairs: SortedPairs, batch: int, seq_len: int, heads: int) -> torch.Tensor:
    """Sorted (token, head) pair rows as a `(batch, heads, seq, head_dim)` tensor, zero for unselected pairs."""
    size = batch * heads * seq_len
    index = (pairs.token // seq_len * heads + pairs.expert.clamp(max=heads - 1)) * seq_len + pairs.token % seq_len
    if pairs.complete:
        return rows.new_zeros(size, rows.shape[1]).index_copy_(0, index, rows).view(batch, heads, seq_len, -1)
    # dropped pairs write to scratch rows past the tensor
    index = torch.where(pairs.expert < heads, index, size + torch.arange(len(index), device=index.device))
    dense = rows.new_zeros(size + rows.shape[0], rows.shape[1]).index_copy(0, index, rows)
    return dense[:size].view(batch, heads, seq_len, rows.shape[1])


def compact_heads(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(index, count)`: the positions of the tokens that selected each head, per `(head, sequence)` list, in order,
    padded to the longest list (`(heads, batch, L)`; entries past `count` are other positions, never read)."""
    by_head = selected.permute(2, 0, 1)  # (heads, batch, keys)
    count = by_head.sum(-1)
    # the host read of the gathered path with a cache (eager only)
    length = by_head.shape[-1] if torch.compiler.is_compiling() else max(int(count.max()), 1)
    index = torch.sort((~by_head).to(torch.uint8), dim=-1, stable=True).indices[..., :length]
    return index, count


def gather_heads(cached: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of a `(batch, heads, keys, head_dim)` cache at `(heads, batch, L)` key positions: `(heads, batch, L, d)`."""
    batch, heads, keys, head_dim = cached.shape
    base = (
        torch.arange(batch, device=index.device)[None, :, None] * heads
        + torch.arange(heads, device=index.device)[:, None, None]
    ) * keys
    flat = (base + index).reshape(-1)
    return cached.reshape(-1, head_dim).index_select(0, flat).view(*index.shape, head_dim)


# ---------------------------------------------------------------------------------------------------------------------
# SMHA implementation "gathered"
# ---------------------------------------------------------------------------------------------------------------------


def gathered_selective_attention(
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    selection,
    cache_layer,
    segment_ids: torch.Tensor | None,
    value_states: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SMHA implementation `"gathered"` (contract: `selective_attention.py`): only the selected (token, group) pairs
    are projected, attended and projected back. A pair's query row holds its group's query heads side by side
    (`group_size * head_dim`), its key and value rows the group's key/value head."""
    batch, seq_len, _ = hidden_states.shape
    if seq_len == 1 and cache_layer is not None and len(selection.slots) == 1:
        return _decode_step(
            module, hidden_states, position_embeddings, selection, cache_layer, segment_ids, value_states
        )
    heads = module.num_key_value_heads
    continues = cache_layer is not None and cache_layer.has_tokens
    query_positions = query_slots(cache_layer, seq_len, hidden_states.device)
    pairs = sort_pairs(selection.slots, heads, seq_len)
    query, key, value = _pair_states(module, hidden_states, value_states, position_embeddings, pairs)
    dropout = module.attention_dropout if module.training else 0.0
    token_segments = None
    if segment_ids is not None:
        token_segments = segment_ids.reshape(-1).index_select(0, pairs.token)[:, None]
    if cache_layer is not None:
        # the cache keeps the layout every path reads: (batch, heads, tokens, head_dim), 0 for unselected pairs
        cached_key, cached_value = cache_layer.update(
            *(to_dense_heads(x, pairs, batch, seq_len, heads) for x in (key, value))
        )
        key_selected = cache_layer.update_routing("head_selected", slots_to_dense(selection.slots, heads)[0])
        key_segments = None if segment_ids is None else cache_layer.update_routing("segment_ids", segment_ids)

    if not continues:  # attention over the new tokens only
        lists = head_lists(pairs, heads, batch, seq_len, selection.max_list_length)
        segments = None if token_segments is None else to_lists(token_segments, lists)[:, 0]
        rows = [to_lists(x, lists) for x in (query, key, value)]
        out = self_list_attention(*rows, lists, module.is_causal, module.scaling, dropout, segments)
    else:
        # Queries: the new pairs, one list per (head, sequence); keys: every cached token that selected the head.
        lists = head_lists(pairs, heads, batch, seq_len, None, num_buckets=1)
        length = lists.buckets[0][2]

        def as_lists(rows: torch.Tensor) -> torch.Tensor:
            return to_lists(rows, lists).view(heads, batch, length, rows.shape[1])

        query_position = as_lists(query_positions[pairs.token % seq_len][:, None])[..., 0]
        key_index, key_count = compact_heads(key_selected)  # (heads, batch, Lk)
        key_segment = query_segment = None
        if key_segments is not None:
            key_segment = key_segments[torch.arange(batch, device=key_index.device)[None, :, None], key_index]
            query_segment = as_lists(token_segments)[..., 0]
        out = cached_list_attention(
            as_lists(query),
            gather_heads(cached_key, key_index),
            gather_heads(cached_value, key_index),
            lists.count,
            key_count,
            query_position,
            key_index,
            module.is_causal,
            module.scaling,
            dropout,
            query_segment,
            key_segment,
        ).reshape(-1, query.shape[-1])
    head_rows = from_lists(out, lists) * pairs.gate[:, None].to(out.dtype)
    return _pairs_output(module, head_rows, pairs, selection.slots, hidden_states.dtype), None


def _pair_states(
    module: nn.Module,
    hidden_states: torch.Tensor,
    value_states: torch.Tensor | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    pairs: SortedPairs,
) -> list[torch.Tensor]:
    """Query, key and value rows of the sorted (token, group) pairs, normalised and rotated; the values read
    `value_states` when given."""
    heads, (batch, _, hidden) = module.num_key_value_heads, hidden_states.shape
    projections = (module.q_proj, module.k_proj, module.v_proj)
    if not all(reads_weights_directly(p, hidden_states.device) for p in projections):
        query, key, value = _pair_rows_through_modules(module, hidden_states, value_states, pairs)
    elif value_states is None:
        rows = hidden_states.reshape(-1, hidden).index_select(0, pairs.token)
        query, key, value = project_pairs(rows, projections, pairs, heads)
    else:
        rows = hidden_states.reshape(-1, hidden).index_select(0, pairs.token)
        value_rows = value_states.reshape(-1, hidden).index_select(0, pairs.token)
        query, key = project_pairs(rows, projections[:2], pairs, heads)
        (value,) = project_pairs(value_rows, projections[2:], pairs, heads)
    query, key = module.norm_heads(query, key)
    if position_embeddings is not None:
        cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)
        query, key = rotate_pairs(query, key, cos, sin, pairs)
    return [query, key, value]


def _pair_rows_through_modules(
    module: nn.Module, hidden_states: torch.Tensor, value_states: torch.Tensor | None, pairs: SortedPairs
) -> list[torch.Tensor]:
    """Query, key and value rows of the pairs from the projection modules themselves (`reads_weights_directly` says
    no: adapters, quantized or offloaded weights, hooks): each module runs on every token, each pair takes its
    group's slice. The projections then cost what the dense layer's do; the attention stays sparse."""
    heads = module.num_key_value_heads
    head = pairs.expert.clamp(max=heads - 1)  # rows of dropped pairs are never read
    outputs = []
    for projection, source in zip(
        (module.q_proj, module.k_proj, module.v_proj),
        (hidden_states, hidden_states, hidden_states if value_states is None else value_states),
        strict=True,
    ):
        rows = projection(source).reshape(-1, heads, projection.out_features // heads)  # (tokens, groups, width)
        outputs.append(rows[pairs.token, head])
    return outputs


def _pairs_output(
    module: nn.Module, head_rows: torch.Tensor, pairs: SortedPairs, slots: Sequence[Slots], dtype: torch.dtype
) -> torch.Tensor:
    """`o_proj` of the gated pair rows, summed per token, with the projection's bias (through the module itself,
    on every token's scattered heads, where `reads_weights_directly` says no)."""
    heads = module.num_key_value_heads
    if not reads_weights_directly(module.o_proj, head_rows.device):
        return module.o_proj(to_token_heads(head_rows, pairs, slots, heads)).to(dtype)
    output = output_projection(head_rows, module.o_proj, pairs, slots, heads)
    if module.o_proj.bias is not None:
        output = output + module.o_proj.bias
    return output.to(dtype)


def _decode_step(
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    selection,
    cache_layer,
    segment_ids: torch.Tensor | None,
    value_states: torch.Tensor | None,
) -> tuple[torch.Tensor, None]:
    """One new token per sequence with a KV cache: the selected groups' projections and, per token, attention over
    its selected groups' cached keys."""
    batch, _, hidden = hidden_states.shape
    heads, head_dim, top_k, group = module.num_key_value_heads, module.head_dim, module.num_selected, module.group_size
    block = selection.slots[0]
    index = block.index[:, 0]  # (batch, top_k) selected groups, token-major
    query_width = group * head_dim
    position = query_slots(cache_layer, 1, hidden_states.device)  # the new token's slot
    plain = all(
        reads_weights_directly(p, hidden_states.device)
        for p in (module.q_proj, module.k_proj, module.v_proj, module.o_proj)
    )
    if plain and use_token_major(batch * top_k, (query_width + 2 * head_dim) * hidden):
        slot_query, key, value, gate = _decode_states_token_major(
            module, hidden_states, value_states, position_embeddings, block
        )
        scatter_index = index[..., None].expand(-1, -1, head_dim)
        cached_key, cached_value = cache_layer.update(
            *(x.new_zeros(batch, heads, head_dim).scatter(1, scatter_index, x)[:, :, None] for x in (key, value))
        )
        pairs = None
    else:
        pairs = sort_pairs(selection.slots, heads, 1)
        query, key, value = _pair_states(module, hidden_states, value_states, position_embeddings, pairs)
        cached_key, cached_value = cache_layer.update(
            *(to_dense_heads(x, pairs, batch, 1, heads) for x in (key, value))
        )
        slot_query = torch.empty_like(query).index_copy_(0, pairs.order, query)
    slot_query = slot_query.view(batch, top_k, group, head_dim)  # a group's query heads against the group's keys
    key_selected = cache_layer.update_routing("head_selected", slots_to_dense(selection.slots, heads)[0])
    num_keys = cached_key.shape[2]
    head_index = index[:, :, None, None].expand(-1, -1, num_keys, head_dim)
    keys, values = cached_key.gather(1, head_index), cached_value.gather(1, head_index)  # (batch, top_k, keys, d)
    allowed = key_selected.gather(2, index[:, None, :].expand(-1, num_keys, -1)).transpose(1, 2)
    # no slot after the token's own (a static cache's empty or cropped slots)
    allowed = allowed & (torch.arange(num_keys, device=allowed.device) <= position)
    if segment_ids is not None:
        key_segments = cache_layer.update_routing("segment_ids", segment_ids)
        allowed = allowed & (key_segments == segment_ids[:, -1:])[:, None, :]
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # groups of padding: finite, never read
    dropout = module.attention_dropout if module.training else 0.0
    out = F.scaled_dot_product_attention(
        slot_query, keys, values, attn_mask=allowed[:, :, None], dropout_p=dropout, scale=module.scaling
    )
    if pairs is None:  # through the selected groups' columns of o_proj
        o_weight = module.o_proj.weight.view(hidden, heads, query_width).index_select(1, index.reshape(-1))
        out = out.reshape(batch * top_k, query_width) * gate.reshape(-1, 1)
        output = torch.einsum("nd,cnd->nc", out, o_weight).view(batch, top_k, hidden).sum(1, keepdim=True)
        output = output if module.o_proj.bias is None else output + module.o_proj.bias
        return output.to(hidden_states.dtype), None
    head_rows = out.reshape(batch * top_k, query_width).index_select(0, pairs.order)  # sorted order again
    head_rows = head_rows * pairs.gate[:, None].to(head_rows.dtype)
    if not pairs.complete:
        head_rows = head_rows.masked_fill((pairs.expert >= heads)[:, None], 0)
    return _pairs_output(module, head_rows, pairs, selection.slots, hidden_states.dtype), None


def _decode_states_token_major(
    module: nn.Module,
    hidden_states: torch.Tensor,
    value_states: torch.Tensor | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    block: Slots,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Small heads: copy each token's selected groups' weight slices and multiply (fewer ops than sorting and
    grouped products). Returns `(query (batch, top_k, group * d), key, value (batch, top_k, d), gate (batch, top_k))`;
    padding (not kept) gets zero keys, values and gate."""
    batch, _, hidden = hidden_states.shape
    heads, head_dim, top_k, group = module.num_key_value_heads, module.head_dim, module.num_selected, module.group_size
    index = block.index[:, 0]
    widths = [group * head_dim, head_dim, head_dim]  # a group's query heads, its key head, its value head
    projections = (module.q_proj, module.k_proj, module.v_proj)
    weight = torch.cat([p.weight.view(heads, -1, hidden).index_select(0, index.reshape(-1)) for p in projections], 1)
    rows = hidden_states[:, 0].repeat_interleave(top_k, 0)  # (batch * top_k, hidden): each token once per group
    if value_states is None:
        qkv = pair_products(rows, weight)
    else:  # peri-norm: queries and keys from the normalised stream, values from the residual stream
        qk_width = widths[0] + widths[1]
        value_rows = value_states[:, 0].repeat_interleave(top_k, 0)
        qkv = torch.cat(
            [pair_products(rows, weight[:, :qk_width]), pair_products(value_rows, weight[:, qk_width:])], dim=1
        )
    qkv = qkv.view(batch, top_k, sum(widths))
    if module.q_proj.bias is not None:
        qkv = qkv + torch.cat([p.bias.view(heads, -1) for p in projections], 1)[index]
    query, key, value = qkv.split(widths, -1)
    query, key = module.norm_heads(query, key)
    if position_embeddings is not None:
        query, key = apply_rotary_pos_emb(
            query.reshape(batch, top_k * group, 1, head_dim), key[:, :, None], *position_embeddings
        )
        query, key = query.reshape(batch, top_k, group * head_dim), key[:, :, 0]
    gate = block.gate[:, 0].to(hidden_states.dtype)
    if block.keep is not None:  # padding selects nothing
        keep = block.keep[:, 0].to(key.dtype)
        key, value, gate = key * keep[..., None], value * keep[..., None], gate * keep
    return query, key, value, gate
