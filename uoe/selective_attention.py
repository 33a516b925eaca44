"""Selective Multi-Head Attention (SMHA): the registry of its implementations and what they share.

An SMHA implementation is one function that computes a `UoESelectiveAttention` block's output once the block has
routed its tokens, registered by name the way transformers registers attention functions (`AttentionInterface`)
and experts back-ends (`ExpertsInterface`). Built in: `"masked"` (the reference, `modeling_uoe`), `"gathered"`
(`gathered.py`) and `"triton"` (`kernels_smha.py`). The config field `selective_attention_implementation` picks
one by name; `None` lets `routing_backend` decide (see `auto_selective_attention`).

The contract of every implementation::

    def implementation(
        module,               # the UoESelectiveAttention: its projections, norms, head counts, scaling, dropout
        hidden_states,        # (batch, seq, hidden): the stream the queries and keys are projected from
        position_embeddings,  # (cos, sin), each (batch, seq, head_dim), at the tokens' original positions, or None
        selection,            # the block's routing: `Selection` (slots of (index, gate, keep), max_list_length)
        cache_layer,          # this application's `UoECacheLayer` (append keys, values and routing state), or None
        segment_ids,          # (batch, seq) packed-sequence ids (attention stays inside a sequence), or None
        value_states=None,    # (batch, seq, hidden): the stream values are projected from (default hidden_states)
        **kwargs,             # what the model passes through to transformers' attention functions
    ) -> tuple[output, attention_weights]  # output (batch, seq, hidden) after o_proj (with its bias); weights or None

The group rule every implementation computes: in head group g, a query token that selected g attends to the key
tokens that selected g (no later ones in a causal model, only its own packed sequence); its group's output, times
its gate, goes through g's columns of `o_proj`; unselected groups contribute nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from transformers.utils.generic import GeneralInterface

from .kernels_common import require_kernels, triton_importable
from .routing import slots_to_dense


class SelectiveAttentionInterface(GeneralInterface):
    """Registry of SMHA implementations (see the module docstring for their contract).

    `SelectiveAttentionInterface.register("mine", fn)` adds one for every model; select it with
    `config.selective_attention_implementation = "mine"` or `model.set_selective_attention_implementation("mine")`.
    """

    _global_mapping: dict[str, Callable] = {}

    def get_interface(self, name: str) -> Callable:
        """The implementation registered as `name`; a `ValueError` listing the registered names otherwise."""
        if name not in self:
            raise ValueError(
                f"`selective_attention_implementation` must be one of the registered SMHA implementations "
                f"{sorted(self)} (or None: `routing_backend` decides), got {name!r}."
            )
        return self[name]


ALL_SELECTIVE_ATTENTION_FUNCTIONS = SelectiveAttentionInterface()


# ---------------------------------------------------------------------------------------------------------------------
# Choosing an implementation
# ---------------------------------------------------------------------------------------------------------------------


def resolve_routing_backend(backend: str, tensor: torch.Tensor) -> str:
    """The path (`"masked"`, `"gathered"` or `"triton"`) that `routing_backend` means for `tensor`'s device.

    Decided from the config and the device only: no synchronisation, and constant under `torch.compile`. Under
    `torch.onnx.export` "auto" is the masked path: ONNX has no lowering for the stable sort and the custom ops the
    other paths use.
    """
    if torch.onnx.is_in_onnx_export():
        if backend in ("gathered", "triton"):
            raise ValueError(
                f'`routing_backend="{backend}"` cannot be exported to ONNX (its sort and custom ops have no ONNX '
                'lowering); export with "auto" or "masked", which compute the same function.'
            )
        return "masked"
    if backend in ("masked", "gathered"):
        return backend
    if backend == "triton":
        require_kernels(tensor, 'routing_backend="triton"')
        return "triton"
    return "triton" if tensor.device.type == "cuda" and triton_importable() else "gathered"


# With fewer keys per sequence than this, "auto" attends on the masked path on CPU: its per-head mask is tiny and
# the gathered path's sorting and scattering cost more than the attention they save (measured on 2 CPU cores: the
# two break even at about 32 tokens; the image encoder's 17 tokens are 1.3x faster masked). Decode steps (one new
# token per sequence) attend masked there too: gathering the selected groups' cached keys copies about as much as
# attending over every group reads, in more operations (decode step 0.67-0.79x the gathered path's at the main
# job's shape and d512, batch 1 and 8, with the experts gathered either way).
GATHERED_ATTENTION_MIN_KEYS = 32


def auto_selective_attention(module: nn.Module, tensor: torch.Tensor, num_keys: int) -> str:
    """The implementation `routing_backend` picks for an SMHA block attending over `num_keys` keys.

    `"auto"` runs the masked path where it is the dense layer (full routing: plain SDPA, no mask), with a non-SDPA
    `attn_implementation` (e.g. `"eager"`, which returns attention maps) and, off CUDA, for short sequences and for
    decode steps (`GATHERED_ATTENTION_MIN_KEYS`); training with attention dropout leaves the kernels (which have no dropout) for
    the gathered path. Tensor-parallel attention never takes the gathered path (it reads whole weight tensors,
    while a rank holds only its heads' slices).
    """
    config = module.config
    path = resolve_routing_backend(config.routing_backend, tensor)
    if path == "gathered" and module.tp_mesh is not None:
        if config.routing_backend == "gathered":
            raise ValueError(
                '`routing_backend="gathered"` does not support tensor-parallel attention; use "auto" (the masked '
                'path on each rank\'s heads) or "masked".'
            )
        return "masked"
    if config.routing_backend != "auto":
        return path
    full_routing = module.num_selected == module.num_key_value_heads and not config.data_capacity
    if full_routing or config._attn_implementation != "sdpa":
        return "masked"
    if path == "gathered" and (num_keys < GATHERED_ATTENTION_MIN_KEYS or tensor.shape[1] == 1):
        return "masked"
    if path == "triton" and module.training and module.attention_dropout > 0:
        return "gathered"
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys by their tokens' original positions (`cos`/`sin` broadcast along `unsqueeze_dim`,
    the heads axis of `(batch, heads, seq, head_dim)` tensors)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def selective_allowed(
    key_selected: torch.Tensor,
    query_positions: torch.Tensor,
    causal: bool,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(batch, heads, queries, keys)` bool: key slot j is visible to query i in head h when j selected h, j is not
    after i's own slot (`causal`; in a static cache this also hides the slots not filled yet) and both are in the
    same packed sequence.

    Args:
        key_selected: `(batch, keys, heads)` bool, which heads each key token selected (padding selects none).
        query_positions: `(queries,)` the key slots of the queries' own tokens.
        segment_ids: `(batch, keys)` packed-sequence ids of the keys, or `None` (one sequence per row).
    """
    key_pos = torch.arange(key_selected.shape[1], device=key_selected.device)[None, :]
    query_pos = query_positions.to(key_selected.device)[:, None]
    allowed = key_selected.transpose(1, 2)[:, :, None, :]
    if causal:
        allowed = allowed & (key_pos <= query_pos)
    if segment_ids is not None:
        same_segment = segment_ids.index_select(1, query_positions)[:, :, None] == segment_ids[:, None, :]
        allowed = allowed & same_segment[:, None]
    return allowed


def query_slots(cache_layer, num_new: int, device: torch.device) -> torch.Tensor:
    """`(num_new,)` the key slots the new tokens take: after the cached ones (call before updating the cache)."""
    return torch.arange(num_new, device=device) if cache_layer is None else cache_layer.next_positions(num_new, device)


def is_static(cache_layer) -> bool:
    """Whether a cache layer is the fixed-size layout (`UoEStaticCacheLayer`): its key slots outnumber the tokens."""
    return cache_layer is not None and getattr(cache_layer, "is_compileable", False)


class HeadStates(NamedTuple):
    """Every head's queries, keys and values, as the masked and Triton implementations attend over them.

    query: `(batch, heads, seq, head_dim)`, normalised (`qk_norm`) and rotated.
    key, value: `(batch, heads, keys, head_dim)`: the cached tokens' and then the new ones', one per query head.
    query_selected: `(batch, seq, heads)` bool; key_selected: `(batch, keys, heads)` bool (per query head).
    key_segments: `(batch, keys)` packed-sequence ids of the keys, or `None`.
    head_gates: `(batch, seq, heads)` each query head's gate (its group's), 0 where the group is not selected.
    query_positions: `(seq,)` the key slots of the new tokens themselves.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    query_selected: torch.Tensor
    key_selected: torch.Tensor
    key_segments: torch.Tensor | None
    head_gates: torch.Tensor
    query_positions: torch.Tensor


def project_all_heads(
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    selection,
    cache_layer,
    segment_ids: torch.Tensor | None,
    value_states: torch.Tensor | None,
) -> HeadStates:
    """Project every head through the modules (`q_proj(hidden_states)`, ...), rotate, append to the cache and expand
    the key/value heads to one per query head: the dense layer's states plus the selection that masks them."""
    batch, seq_len, _ = hidden_states.shape
    selected, group_gates = slots_to_dense(selection.slots, module.num_key_value_heads)  # (batch, seq, groups)
    if module.tp_mesh is not None:
        selected, group_gates = module.local_groups(selected, group_gates)
    query, key = module.norm_heads(module.q_proj(hidden_states), module.k_proj(hidden_states))
    value = module.v_proj(hidden_states if value_states is None else value_states)
    # -1: this rank's heads under tensor parallelism
    query, key, value = (x.view(batch, seq_len, -1, module.head_dim).transpose(1, 2) for x in (query, key, value))
    if position_embeddings is not None:
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
    query_positions = query_slots(cache_layer, seq_len, hidden_states.device)
    key_selected, key_segments = selected, segment_ids
    if cache_layer is not None:
        key, value = cache_layer.update(key, value)
        key_selected = cache_layer.update_routing("head_selected", selected)
        if segment_ids is not None:
            key_segments = cache_layer.update_routing("segment_ids", segment_ids)
    per_head = module.per_query_head
    return HeadStates(
        query,
        per_head(key, 1),
        per_head(value, 1),
        per_head(selected, -1),
        per_head(key_selected, -1),
        key_segments,
        per_head(group_gates, -1),
        query_positions,
    )


def union_of_heads(module: nn.Module, attn_output: torch.Tensor, head_gates: torch.Tensor) -> torch.Tensor:
    """`o_proj` of the heads' outputs `(batch, seq, heads, head_dim)`, each times its gate (0: not selected)."""
    attn_output = attn_output * head_gates.to(attn_output.dtype)[..., None]
    return module.o_proj(attn_output.reshape(*attn_output.shape[:2], -1))
