"""SMHA selective attention as `torch.library` custom ops over Triton kernels, next to its PyTorch reference.

Head h is an expert: a query token that selected h attends, in head h, to the key tokens that selected h
(and, causally, come no later; padding keys excluded; with packed sequences, only keys of its own segment).
Query tokens that did not select h get output 0 in head h. `selective_attention_reference` computes this
with a dense masked `T x T` softmax; `selective_attention` computes the same with FlashAttention-style
kernels over each (sequence, head)'s list of selected tokens, so time and memory follow the number of
selected (token, head) pairs.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from .kernels_common import require_kernels, triton_module
from .kernels_routing import compact_selection
from .selective_attention import (
    ALL_SELECTIVE_ATTENTION_FUNCTIONS,
    is_static,
    project_all_heads,
    selective_allowed,
    union_of_heads,
)


def _kernels() -> ModuleType:
    # Lazy, like `kernels_uome._kernels`; the relative import lets `save_pretrained` copy the file.
    from .kernels_smha_triton import INTERPRETED  # noqa: F401

    return triton_module("kernels_smha_triton")


def _check_inputs(query, key, value, query_selected, key_selected, key_mask, segment_ids, causal) -> None:
    if (
        query.dim() != 4
        or key.shape != value.shape
        or key.shape[:2] != query.shape[:2]
        or key.shape[3] != query.shape[3]
    ):
        raise ValueError(
            f"query must be (batch, heads, Tq, head_dim) and key/value (batch, heads, Tk, head_dim); got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if not (query.dtype == key.dtype == value.dtype) or not (query.device == key.device == value.device):
        raise ValueError("query, key and value must share dtype and device")
    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    if query_selected.shape != (batch, q_len, heads) or key_selected.shape != (batch, k_len, heads):
        raise ValueError(
            f"query_selected must be (batch, Tq, heads) = {(batch, q_len, heads)} and key_selected (batch, Tk, heads) "
            f"= {(batch, k_len, heads)}; got {tuple(query_selected.shape)}, {tuple(key_selected.shape)}"
        )
    if key_mask is not None and key_mask.shape != (batch, k_len):
        raise ValueError(f"key_mask must be (batch, Tk) = {(batch, k_len)}, got {tuple(key_mask.shape)}")
    if segment_ids is not None:
        if segment_ids.shape != (batch, k_len):
            raise ValueError(f"segment_ids must be (batch, Tk) = {(batch, k_len)}, got {tuple(segment_ids.shape)}")
        if segment_ids.dtype == torch.bool or segment_ids.dtype.is_floating_point or segment_ids.dtype.is_complex:
            raise ValueError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
        if k_len < q_len:
            raise ValueError(f"segment_ids need at least as many keys as queries (got Tk={k_len} < Tq={q_len})")
    if causal and k_len < q_len:
        raise ValueError(f"causal attention needs at least as many keys as queries (got Tk={k_len} < Tq={q_len})")


def selective_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_selected: torch.Tensor,
    key_selected: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    causal: bool = True,
    scaling: float | None = None,
) -> torch.Tensor:
    """Selective attention by definition, with a dense masked softmax (what `selective_attention` computes).

    For query i (at key position `p = i + Tk - Tq`) and head h with `query_selected[b, i, h]`: softmax over
    keys j with `key_selected[b, j, h]`, `key_mask[b, j]`, `j <= p` if `causal` and
    `segment_ids[b, j] == segment_ids[b, p]`, of `scaling * q.k`, applied to the values. Unselected
    (query, head) pairs, and selected ones with no allowed key, output 0.

    Args:
        query: `(batch, heads, Tq, head_dim)`.
        key, value: `(batch, heads, Tk, head_dim)`, `Tk >= Tq` when causal or segmented; the last `Tq` keys
            are the queries' own tokens (earlier keys come from a cache).
        query_selected: `(batch, Tq, heads)` bool.
        key_selected: `(batch, Tk, heads)` bool.
        key_mask: `(batch, Tk)` bool, False at padding (those keys are never attended), or `None`.
        segment_ids: `(batch, Tk)` integer ids of packed sequences (values within int32), or `None` for
            one sequence per row; a query attends only keys with its own token's id.
        causal: causal by original token index, or bidirectional.
        scaling: score scale, default `head_dim ** -0.5`.

    Returns:
        `(batch, Tq, heads, head_dim)`.
    """
    _check_inputs(query, key, value, query_selected, key_selected, key_mask, segment_ids, causal)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    key_selected = key_selected if key_mask is None else key_selected & key_mask[..., None]
    k_len, q_len = key.shape[2], query.shape[2]
    allowed = selective_allowed(
        key_selected, torch.arange(k_len - q_len, k_len, device=key.device), causal, segment_ids
    )
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    # zeroing after the softmax makes rows without any allowed key exactly 0 (and keeps gradients finite)
    probs = torch.softmax(scores, dim=-1) * allowed
    out = torch.matmul(probs, value.float()) * query_selected.transpose(1, 2)[..., None]
    return out.to(query.dtype).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------------------


def _int32(segment_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels read segment ids as a contiguous int32 `(batch, Tk)` array (a no-op when already one)."""
    return segment_ids.to(torch.int32).contiguous() if segment_ids is not None else None


def _smha_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_index: torch.Tensor,
    q_count: torch.Tensor,
    q_cumulative: torch.Tensor,
    k_index: torch.Tensor,
    k_count: torch.Tensor,
    k_cumulative: torch.Tensor,
    segment_ids: torch.Tensor | None,
    causal: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    require_kernels(q, "uoe::smha_forward")
    return _kernels().attention_forward(
        q, k, v, q_index, q_count, k_index, k_count, k_cumulative, _int32(segment_ids), causal, scaling
    )


def _smha_forward_fake(
    q, k, v, q_index, q_count, q_cumulative, k_index, k_count, k_cumulative, segment_ids, causal, scaling
):
    batch, heads, q_len, head_dim = q.shape
    return q.new_empty(batch, q_len, heads, head_dim), q.new_empty(batch, heads, q_len, dtype=torch.float32)


def _smha_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_index: torch.Tensor,
    q_count: torch.Tensor,
    q_cumulative: torch.Tensor,
    k_index: torch.Tensor,
    k_count: torch.Tensor,
    k_cumulative: torch.Tensor,
    segment_ids: torch.Tensor | None,
    causal: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    require_kernels(q, "uoe::smha_backward")
    return _kernels().attention_backward(
        grad_out.to(q.dtype),
        q,
        k,
        v,
        out,
        lse,
        q_index,
        q_count,
        q_cumulative,
        k_index,
        k_count,
        k_cumulative,
        _int32(segment_ids),
        causal,
        scaling,
    )


def _smha_backward_fake(grad_out, q, k, v, out, lse, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _smha_setup_context(ctx, inputs, output) -> None:
    q, k, v, *metadata, segment_ids, causal, scaling = inputs
    out, lse = output
    ctx.causal, ctx.scaling = causal, scaling
    ctx.save_for_backward(q, k, v, out, lse, *metadata, segment_ids)
    ctx.mark_non_differentiable(lse)


def _smha_autograd_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, *metadata, segment_ids = ctx.saved_tensors
    dq, dk, dv = torch.ops.uoe.smha_backward(
        grad_out, q, k, v, out, lse, *metadata, segment_ids, ctx.causal, ctx.scaling
    )
    return (dq, dk, dv) + (None,) * 9


_METADATA_SCHEMA = (
    "Tensor q_index, Tensor q_count, Tensor q_cumulative, Tensor k_index, Tensor k_count, Tensor k_cumulative"
)

if not hasattr(torch.ops.uoe, "smha_forward"):  # a second copy of this file (remote code) reuses the ops
    _forward_op = torch.library.custom_op(
        "uoe::smha_forward",
        _smha_forward,
        mutates_args=(),
        schema=f"(Tensor q, Tensor k, Tensor v, {_METADATA_SCHEMA}, Tensor? segment_ids, bool causal, "
        "float scaling) -> (Tensor, Tensor)",
    )
    _forward_op.register_fake(_smha_forward_fake)
    _forward_op.register_autograd(_smha_autograd_backward, setup_context=_smha_setup_context)
    _backward_op = torch.library.custom_op(
        "uoe::smha_backward",
        _smha_backward,
        mutates_args=(),
        schema=f"(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_METADATA_SCHEMA}, "
        "Tensor? segment_ids, bool causal, float scaling) -> (Tensor, Tensor, Tensor)",
    )
    _backward_op.register_fake(_smha_backward_fake)


def selective_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_selected: torch.Tensor,
    key_selected: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    causal: bool = True,
    scaling: float | None = None,
) -> torch.Tensor:
    """SMHA selective attention with the Triton kernels; same arguments and result as
    `selective_attention_reference` (see there), differentiable in query, key and value.

    No `T x T` matrix and no host synchronisation; work and memory of the attention itself follow the
    selected (token, head) pairs (outputs and gradients keep the dense layouts, zero where unselected).
    Raises `KernelsUnavailableError` where the kernels cannot run.
    """
    require_kernels(query, "selective_attention")
    _check_inputs(query, key, value, query_selected, key_selected, key_mask, segment_ids, causal)
    scaling = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    key_list = key_selected if key_mask is None else key_selected & key_mask[..., None]  # padding leaves the lists
    queries = compact_selection(query_selected.transpose(1, 2))
    # self-attention without cache or key padding (the model passes one tensor twice): one compaction
    keys = queries if key_list is query_selected else compact_selection(key_list.transpose(1, 2))
    out, _ = torch.ops.uoe.smha_forward(query, key, value, *queries, *keys, _int32(segment_ids), causal, scaling)
    return out


def triton_selective_attention(
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    selection,
    cache_layer,
    segment_ids: torch.Tensor | None,
    value_states: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SMHA implementation `"triton"` (contract: `selective_attention.py`): the modules project every head, the
    kernels attend over each (sequence, head)'s selected tokens, unselected heads are 0.

    The kernels take the new tokens as the last keys. A static cache's buffer has empty slots after them, so there
    the kernels run one decoded token at a time (its visible slots passed as the selection, no causal rule needed);
    other forwards with a static cache (the prefill, several new tokens, packed rows) take the masked reference."""
    static = is_static(cache_layer)
    if static and (hidden_states.shape[1] != 1 or not cache_layer.has_tokens or segment_ids is not None):
        masked = ALL_SELECTIVE_ATTENTION_FUNCTIONS["masked"]
        return masked(module, hidden_states, position_embeddings, selection, cache_layer, segment_ids, value_states)
    heads = project_all_heads(
        module, hidden_states, position_embeddings, selection, cache_layer, segment_ids, value_states
    )
    key_selected, causal = heads.key_selected, module.is_causal
    if static:  # one new token: every filled slot up to its own is a key it may see
        slots = torch.arange(key_selected.shape[1], device=key_selected.device)
        key_selected = key_selected & (slots <= heads.query_positions)[None, :, None]
        causal = False
    attn_output = selective_attention(
        heads.query,
        heads.key,
        heads.value,
        query_selected=heads.query_selected,
        key_selected=key_selected,
        segment_ids=heads.key_segments,
        causal=causal,
        scaling=module.scaling,
    )
    return union_of_heads(module, attn_output, heads.head_gates), None
