"""KV caches of UoE models: keys and values of every head group plus the routing state incremental decoding needs.

A selective-attention layer must know, for every cached token, which head groups it selected (a group's keys are
visible only to queries that selected the same group), the router logits it was routed with (the next token reuses
them when it belongs to the same routing patch) and, for packed rows, its sequence id. Two layouts hold them:

- `UoECacheLayer` (in a `DynamicCache`): tensors that grow by concatenation, one token per step;
- `UoEStaticCacheLayer` (in a `StaticCache`, `cache_implementation="static"`): fixed `max_cache_len` buffers written
  in place at the new tokens' positions, with the filled length a device tensor, so a decode step has one shape
  whatever the length, compiles once (`torch.compile(fullgraph=True)`) and can be captured in a CUDA graph.

Both answer the same calls (`update`, `update_routing`, `last_routing`, `next_positions`, `has_tokens`, `key_slots`),
so every SMHA implementation reads either: keys come back as `(batch, groups, slots, head_dim)`, routing states as
`(batch, slots, ...)`; in a static layer, slots past the filled length hold zeros or stale values, which the causal
rule (no key after the query's position) hides. `prepare_uoe_cache` turns the empty layers of the cache `generate`
builds into these.
"""

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, StaticCache


class UoECacheLayer(DynamicLayer):
    """Growing KV cache of one SMHA layer with its routing state (see the module docstring).

    Besides keys and values of every key/value head (one per head group) it keeps, per cached token, which groups
    the token selected (`routing["head_selected"]`, `(batch, tokens, groups)`) and the router logits the token was
    routed with (`routing["attention_router_logits"]`, ...).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.routing: dict[str, torch.Tensor] = {}

    @property
    def has_tokens(self) -> bool:
        """Whether anything is cached (a Python answer: the dynamic layout knows its length on the host)."""
        return self.get_seq_length() > 0

    def key_slots(self, num_new: int) -> int:
        """The key slots attention runs over once `num_new` tokens are added: the cached and the new tokens."""
        return self.get_seq_length() + num_new

    def next_positions(self, num_new: int, device: torch.device) -> torch.Tensor:
        """`(num_new,)` slots the next `update` writes (call it before): after the cached tokens."""
        start = self.get_seq_length()
        return torch.arange(start, start + num_new, device=device)

    def update_routing(self, name: str, states: torch.Tensor) -> torch.Tensor:
        """Append `(batch, seq, ...)` routing states and return all of them."""
        if name in self.routing:
            states = torch.cat([self.routing[name], states.to(self.routing[name].device)], dim=1)
        self.routing[name] = states
        return states

    def last_routing(self, name: str) -> torch.Tensor | None:
        """The routing state of the last cached token, `(batch, ...)`, or `None` if nothing is cached."""
        states = self.routing.get(name)
        return None if states is None or states.shape[1] == 0 else states[:, -1]

    def _map_routing(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.routing = {name: fn(states) for name, states in self.routing.items()}

    def reset(self) -> None:
        super().reset()
        self.routing = {}

    def crop(self, tokens_to_remove: int) -> None:
        # The routing state follows the keys, whatever the argument means to the installed transformers: a negative
        # count of tokens to remove, or a positive length to keep (older releases; transformers 5.25 refuses it).
        super().crop(tokens_to_remove)
        length = self.get_seq_length()
        self._map_routing(lambda states: states[:, :length])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_routing(lambda states: states.index_select(0, beam_idx.to(states.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_routing(lambda states: states.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_routing(lambda states: states[indices, ...])

    def offload(self) -> None:
        super().offload()
        self._map_routing(lambda states: states.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        super().prefetch()
        if self.is_initialized:
            self._map_routing(lambda states: states.to(self.device, non_blocking=True))


class UoEStaticCacheLayer(CacheLayerMixin):
    """Fixed-size KV cache of one SMHA layer with its routing state (see the module docstring).

    Keys and values are `(batch, groups, max_cache_len, head_dim)` buffers; every routing state is a
    `(batch, max_cache_len, ...)` buffer with its own filled length (the router logits of a token are written before
    its keys, the groups it selected after them). Lengths are device tensors updated in place, so the same compiled
    decode step serves every length; the buffers keep their addresses (`torch._dynamo.mark_static_address`), as
    transformers' `StaticLayer`'s do, so a CUDA graph can capture the step.
    """

    is_compileable = True
    is_croppable = True
    is_sliding = False

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__()
        self.max_cache_len = max_cache_len
        self.cumulative_length = torch.zeros((), dtype=torch.long)
        self.routing: dict[str, torch.Tensor] = {}
        self.routing_length: dict[str, torch.Tensor] = {}
        self._has_tokens = False  # set by the first `update` after creation or `reset`

    # -- what the attention implementations ask ------------------------------------------------------------------

    @property
    def has_tokens(self) -> bool:
        """Whether anything was written since the layer was created or reset (a Python flag: no device read)."""
        return self._has_tokens

    def key_slots(self, num_new: int) -> int:
        """The key slots attention runs over: the whole buffer (unfilled slots are hidden by the causal rule)."""
        return self.max_cache_len

    def next_positions(self, num_new: int, device: torch.device) -> torch.Tensor:
        """`(num_new,)` slots the next `update` writes (call it before): the filled length onwards."""
        return self.cumulative_length.to(device) + torch.arange(num_new, device=device)

    def get_seq_length(self) -> torch.Tensor | int:
        """The filled length, a device tensor (transformers' static layers answer the same way)."""
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    # -- writing -------------------------------------------------------------------------------------------------

    def _static(self, tensor: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(tensor)
        return tensor

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        batch, groups = key_states.shape[:2]
        self.keys = self._static(key_states.new_zeros(batch, groups, self.max_cache_len, key_states.shape[-1]))
        self.values = self._static(value_states.new_zeros(batch, groups, self.max_cache_len, value_states.shape[-1]))
        self.cumulative_length = self._static(self.cumulative_length.to(self.device))
        self.is_initialized = True

    def _write(self, buffer: torch.Tensor, length: torch.Tensor, states: torch.Tensor, dim: int) -> None:
        positions = length + torch.arange(states.shape[dim], device=length.device)
        buffer.index_copy_(dim, positions, states.to(buffer.dtype))
        length.add_(states.shape[dim])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new tokens' keys and values at the filled length; return the whole buffers."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = self.cumulative_length + torch.arange(key_states.shape[2], device=self.device)
        self.keys.index_copy_(2, positions, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, positions, value_states.to(self.values.dtype))
        self.cumulative_length.add_(key_states.shape[2])
        self._has_tokens = True
        return self.keys, self.values

    def update_routing(self, name: str, states: torch.Tensor) -> torch.Tensor:
        """Write `(batch, seq, ...)` routing states at this state's filled length; return the whole buffer."""
        if name not in self.routing:
            shape = (states.shape[0], self.max_cache_len, *states.shape[2:])
            self.routing[name] = self._static(states.new_zeros(shape))
            self.routing_length[name] = self._static(torch.zeros((), dtype=torch.long, device=states.device))
        self._write(self.routing[name], self.routing_length[name], states, 1)
        return self.routing[name]

    def last_routing(self, name: str) -> torch.Tensor | None:
        """The routing state of the last written token, `(batch, ...)`, or `None` before any was written."""
        if name not in self.routing or not self._has_tokens:
            return None
        last = (self.routing_length[name] - 1).clamp_min(0).reshape(1)
        return self.routing[name].index_select(1, last).squeeze(1)

    # -- surgery (generate's beam search, assisted decoding, batch expansion) -----------------------------------

    def _lengths(self) -> list[torch.Tensor]:
        return [self.cumulative_length, *self.routing_length.values()]

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
        for length in self._lengths():
            length.zero_()
        for buffer in self.routing.values():
            buffer.zero_()
        self._has_tokens = False

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` tokens (a negative count, as transformers' static layers take): the
        filled lengths go back; later writes overwrite the slots."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"Static cache layers are cropped by a negative count (the tokens to remove), got {tokens_to_remove}."
            )
        for length in self._lengths():
            length.sub_(-tokens_to_remove).clamp_(min=0)

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        # a new batch layout: new buffers (transformers' static layers reorder the same way)
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)
        self.routing = {name: fn(buffer) for name, buffer in self.routing.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda buffer: buffer.index_select(0, beam_idx.to(buffer.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda buffer: buffer.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda buffer: buffer[indices.to(buffer.device), ...])


UOE_CACHE_LAYERS = (UoECacheLayer, UoEStaticCacheLayer)


def prepare_uoe_cache(cache: Cache, num_layers: int, batch_size: int | None = None) -> Cache:
    """Make every layer of a `DynamicCache` a `UoECacheLayer` and every layer of a `StaticCache` a
    `UoEStaticCacheLayer` (the caches `generate` builds have transformers' plain layers).

    Only empty layers are swapped: a cache already filled by another model cannot be continued. A cache made for
    more layers, or filled by a model of another depth or for another batch size, is refused (shapes only, no sync).
    """
    if not isinstance(cache, (DynamicCache, StaticCache)):
        raise ValueError(
            f"`cache` (`past_key_values`) must be a `DynamicCache` or a `StaticCache` for UoE models (got "
            f"{type(cache).__name__}): selective attention needs per-token routing state that other caches (e.g. "
            "quantized or sliding-window ones) do not store."
        )
    foreign = any(not isinstance(layer, UOE_CACHE_LAYERS) and layer.is_initialized for layer in cache.layers)
    if foreign:
        raise ValueError(
            "`cache` (`past_key_values`) holds keys and values without UoE routing state (filled by another model); "
            "pass an empty cache or one returned by this model."
        )
    filled = any(isinstance(layer, UOE_CACHE_LAYERS) and layer.has_tokens for layer in cache.layers)
    if len(cache.layers) > num_layers or (filled and len(cache.layers) != num_layers):
        raise ValueError(
            f"`cache` (`past_key_values`) has {len(cache.layers)} layers but the model has num_hidden_layers="
            f"{num_layers}: it was made for another config."
        )
    cached_routing = cache.layers[0].routing.get("attention_router_logits") if filled else None
    if batch_size is not None and cached_routing is not None and cached_routing.shape[0] != batch_size:
        raise ValueError(
            f"`cache` (`past_key_values`) holds {cached_routing.shape[0]} sequences but the input has batch size "
            f"{batch_size}."
        )
    static = isinstance(cache, StaticCache)
    max_cache_len = cache.layers[0].max_cache_len if static else None

    def uoe_layer() -> CacheLayerMixin:
        return UoEStaticCacheLayer(max_cache_len) if static else UoECacheLayer()

    for index, layer in enumerate(cache.layers):
        if not isinstance(layer, UOE_CACHE_LAYERS):
            cache.layers[index] = uoe_layer()
    while len(cache.layers) < num_layers:
        cache.layers.append(uoe_layer())
    if getattr(cache, "layer_class_to_replicate", None) is not None:
        cache.layer_class_to_replicate = UoECacheLayer
    return cache


def resolve_cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache given as `cache` or under its older name `past_key_values` (not both)."""
    if past_key_values is None:
        return cache
    if cache is not None:
        raise ValueError("Pass the KV cache as `cache` or as `past_key_values` (its older name), not both.")
    return past_key_values


def block_cache_layer(cache: Cache | None, layer_idx: int, cache_index: int | None) -> CacheLayerMixin | None:
    """The cache layer of one application of a decoder layer: `cache_index` (a grouped model applies its layers
    several times, each with a cache layer of its own) or, by default, the layer's own index."""
    if cache is None:
        return None
    return cache.layers[layer_idx if cache_index is None else cache_index]
