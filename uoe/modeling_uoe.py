"""PyTorch Union-of-Experts (UoE) models: Selective Multi-Head Attention (SMHA) and Union of MLP Experts (UoME).

A UoE layer is a dense transformer layer split by equivalent decomposition: each attention head is an
expert, and the MLP is cut into `num_mlp_experts` slices of its hidden units. Routers pick experts per
routing patch and the selected experts' outputs are summed, so at full routing the layer *is* the dense
layer. This file is the plain PyTorch reference path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.utils import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_uoe import CACHE_FIELD, UoEConfig
from .conversion import uoe_config_from_llama, uoe_state_dict_from_llama
from .kernels_common import require_kernels, triton_importable
from .kernels_smha import selective_attention
from .kernels_uome import register_uoe_experts_kernels, uoe_triton_experts_forward
from .routing import (
    dense_gates,
    gather_patch_logits,
    load_balancing_loss,
    patch_source_index,
    router_scores,
    router_z_loss,
    select_top_k,
)

# `experts_implementation="uoe_triton"` selects the UoME kernels through transformers' experts interface.
register_uoe_experts_kernels()


def use_routing_kernels(config: UoEConfig, tensor: torch.Tensor) -> bool:
    """Whether a routed block runs the Triton kernels on `tensor` (see `UoEConfig.routing_backend`).

    Decided from the config and the device only: no synchronisation, and constant under `torch.compile`.
    """
    if config.routing_backend == "reference":
        return False
    if config.routing_backend == "triton":
        require_kernels(tensor, 'routing_backend="triton"')
        return True
    return tensor.device.type == "cuda" and triton_importable()


def use_attention_kernels(attention: nn.Module, tensor: torch.Tensor) -> bool:
    """Whether a selective-attention module runs the SMHA kernel: `use_routing_kernels`, except that attention
    dropout while training keeps the reference path (the kernel has no dropout; `"triton"` refuses dropout > 0 at
    config construction)."""
    return use_routing_kernels(attention.config, tensor) and not (
        attention.training and attention.attention_dropout > 0
    )


def routed_experts_forward(
    experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Run a stacked experts module: the UoME kernels where `routing_backend` asks for them, else the module
    itself (which follows `experts_implementation`)."""
    config = experts.config
    if use_routing_kernels(config, hidden_states) and (
        config.routing_backend == "triton" or config._experts_implementation in (None, "eager")
    ):
        return uoe_triton_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    return experts(hidden_states, top_k_index, top_k_weights)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs and cache
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class UoEModelOutputWithPast(MoeModelOutputWithPast):
    r"""
    aux_loss (`torch.FloatTensor`):
        Switch load-balancing loss, averaged over the model's routed blocks (SMHA and UoME of every layer).
    router_z_loss (`torch.FloatTensor`):
        Router z-loss, averaged over the routed blocks.
    router_logits (`tuple(torch.FloatTensor)`, returned with `output_router_logits=True`):
        One `(batch, seq, experts)` tensor per routed block in execution order: layer 0 SMHA (experts =
        heads), layer 0 UoME, layer 1 SMHA, ... These are the logits each token was routed with (its
        routing patch's logits).
    """

    aux_loss: torch.FloatTensor | None = None
    router_z_loss: torch.FloatTensor | None = None


@dataclass
class UoECausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    r"""
    router_z_loss (`torch.FloatTensor`):
        Router z-loss, averaged over the routed blocks (added to `loss` with `config.router_z_loss_coef`).
    """

    router_z_loss: torch.FloatTensor | None = None


class UoECacheLayer(DynamicLayer):
    """KV cache of one SMHA layer, plus the routing state incremental decoding needs.

    Besides keys and values of every head it keeps, per cached token, which heads the token selected
    (a head's keys are only visible to queries that selected the same head) and the router logits the
    token was routed with (the next token reuses them when it belongs to the same routing patch).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.routing: dict[str, torch.Tensor] = {}

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
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0:
            self._map_routing(lambda states: states[:, :tokens_to_remove])

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


def prepare_uoe_cache(cache: Cache, num_layers: int) -> Cache:
    """Make every layer of a `DynamicCache` a `UoECacheLayer` (the cache `generate` builds has plain layers).

    Only empty layers are swapped: a cache already filled by another model cannot be continued.
    """
    if not isinstance(cache, DynamicCache):
        raise ValueError(
            f"`cache` (`past_key_values`) must be a `DynamicCache` for UoE models (got {type(cache).__name__}): selective "
            "attention needs per-token routing state that static and quantized caches do not store."
        )
    for index, layer in enumerate(cache.layers):
        if not isinstance(layer, UoECacheLayer):
            if layer.get_seq_length() > 0:
                raise ValueError(
                    "`cache` (`past_key_values`) holds keys and values without UoE routing state (filled by another model); "
                    "pass an empty `DynamicCache` or one returned by this model."
                )
            cache.layers[index] = UoECacheLayer()
    while len(cache.layers) < num_layers:
        cache.layers.append(UoECacheLayer())
    if cache.layer_class_to_replicate is not None:
        cache.layer_class_to_replicate = UoECacheLayer
    return cache


def resolve_cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache given as `cache` or under its older name `past_key_values` (not both)."""
    if past_key_values is None:
        return cache
    if cache is not None:
        raise ValueError("Pass the KV cache as `cache` or as `past_key_values` (its older name), not both.")
    return past_key_values


@dataclass
class RoutingInputs:
    """Per-forward routing context shared by all layers.

    source_index: `(batch, seq)` index of the token routing each token's patch (see
        `routing.patch_source_index`), or `None` when every token routes itself.
    token_mask: `(batch, seq)` bool, False at padding, or `None` (no padding).
    key_mask: `(batch, past + seq)` bool padding mask over the keys, or `None`.
    """

    source_index: torch.Tensor | None
    token_mask: torch.Tensor | None
    key_mask: torch.Tensor | None


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------------


class UoERMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class UoERotaryEmbedding(nn.Module):
    def __init__(self, config: UoEConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn = (
            self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        )
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: UoEConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate `(batch, heads, seq, head_dim)` queries and keys by their tokens' original positions."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def selective_attention_mask(
    key_selected: torch.Tensor, key_mask: torch.Tensor | None, query_length: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive `(batch, heads, queries, keys)` mask of causal selective attention.

    Query i may attend key j in head h when j is not later than i, j is not padding and j selected h.
    Queries that did not select h are discarded afterwards (their gate is 0); they keep the diagonal so
    no softmax row is empty, which also keeps padded queries finite.

    Args:
        key_selected: `(batch, keys, heads)` bool, which heads each key token selected.
        key_mask: `(batch, keys)` bool padding mask, or `None`.
        query_length: number of queries, the last `query_length` keys.
    """
    key_length = key_selected.shape[1]
    device = key_selected.device
    query_pos = torch.arange(key_length - query_length, key_length, device=device)[:, None]
    key_pos = torch.arange(key_length, device=device)[None, :]
    allowed = (key_pos <= query_pos)[None, None] & key_selected.transpose(1, 2)[:, :, None, :]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    allowed = allowed | (key_pos == query_pos)[None, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class UoERouter(nn.Module):
    """Linear router of one routed block. Returns the logits each token is routed with.

    With routing patches, a token uses the logits of its patch's first token (`source_index`), or the
    `cached_logits` of the previous chunk when its patch began there.
    """

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(
        self,
        hidden_states: torch.Tensor,
        source_index: torch.Tensor | None = None,
        cached_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits = F.linear(hidden_states, self.weight)
        return gather_patch_logits(logits, source_index, cached_logits)


def route(router_logits: torch.Tensor, top_k: int, config: UoEConfig, token_mask: torch.Tensor | None):
    """Select experts from router logits; return `(top_k_index, top_k_gates, aux)` with
    `aux = [load-balancing loss, z-loss]` of this block."""
    scores = router_scores(router_logits, config.router_score_func)
    top_index, top_gates = select_top_k(scores, top_k, config.gate_mode)
    aux = torch.stack([load_balancing_loss(scores, top_index, token_mask), router_z_loss(router_logits, token_mask)])
    return top_index, top_gates, aux


class UoESelectiveAttention(nn.Module):
    """Selective Multi-Head Attention: every head is an expert; each token (patch) selects
    `attention_top_k` heads, and head h runs causal attention over the tokens that selected it.
    The selected heads' outputs are summed through `o_proj` (whose rows are the heads' slices)."""

    def __init__(self, config: UoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.top_k = config.attention_top_k
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, width, bias=config.attention_bias)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=config.attention_bias)
        self.router = UoERouter(config.hidden_size, self.num_heads)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        routing: RoutingInputs,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        batch_size, seq_len, _ = hidden_states.shape
        cache_layer = cache.layers[self.layer_idx] if cache is not None else None

        cached_logits = cache_layer.last_routing("attention_router_logits") if cache_layer is not None else None
        router_logits = self.router(hidden_states, routing.source_index, cached_logits)
        top_index, top_gates, aux = route(router_logits, self.top_k, self.config, routing.token_mask)
        head_gates = dense_gates(top_index, top_gates, self.num_heads)  # (batch, seq, heads), 0 = not selected
        selected = torch.zeros_like(head_gates, dtype=torch.bool).scatter(-1, top_index, True)

        hidden_shape = (batch_size, seq_len, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)

        key_selected = selected
        if cache_layer is not None:
            key, value = cache_layer.update(key, value)
            key_selected = cache_layer.update_routing("head_selected", selected)
            cache_layer.update_routing("attention_router_logits", router_logits)

        if use_attention_kernels(self, query):
            # Work and memory follow the selected (token, head) pairs; unselected heads come back as 0.
            attn_output = selective_attention(
                query,
                key,
                value,
                query_selected=selected,
                key_selected=key_selected,
                key_mask=routing.key_mask,
                causal=True,
                scaling=self.scaling,
                attend_self=True,
            )
            attn_weights = None
        else:
            attn_output, attn_weights = self._masked_attention(
                query, key, value, key_selected, routing.key_mask, **kwargs
            )
        # Union of the selected heads: unselected heads are multiplied by 0, selected ones by their gate.
        attn_output = attn_output * head_gates.to(attn_output.dtype)[..., None]
        attn_output = self.o_proj(attn_output.reshape(batch_size, seq_len, -1))
        return attn_output, attn_weights, aux

    def _masked_attention(self, query, key, value, key_selected, key_mask, **kwargs):
        """The reference path: the configured attention function with the selective (per-head) mask."""
        implementation = self.config._attn_implementation
        key_length, query_length = key.shape[2], query.shape[2]
        # With every head selected and no padding this is plain causal attention: let SDPA use its
        # causal kernels instead of a materialised mask.
        dense_causal = (
            self.top_k == self.num_heads
            and key_mask is None
            and implementation == "sdpa"
            and (key_length == query_length or query_length == 1)
        )
        attention_mask = (
            None if dense_causal else selective_attention_mask(key_selected, key_mask, query_length, query.dtype)
        )
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        return attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )


@use_experts_implementation
class UoESwiGLUExperts(nn.Module):
    """UoME experts of a SwiGLU MLP, stacked: expert e owns hidden units `[e*I/E, (e+1)*I/E)`.

    `gate_up_proj[e]` is `[gate rows; up rows]` of those units, `down_proj[e]` the matching columns of
    the dense down projection, so the sum over all experts is the dense MLP.
    """

    def __init__(self, config: UoEConfig):
        super().__init__()
        self.num_experts = config.num_mlp_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.mlp_expert_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # Reference path: every expert on every token, unselected experts weighted 0. This is the dense
        # MLP with masked hidden units; sparse back-ends ("grouped_mm", kernels) compute the same function.
        weights = dense_gates(top_k_index, top_k_weights.to(hidden_states.dtype), self.num_experts)
        gate, up = torch.einsum("nh,eoh->neo", hidden_states, self.gate_up_proj).chunk(2, dim=-1)
        inner = self.act_fn(gate) * up * weights[..., None]
        return torch.einsum("nei,ehi->nh", inner, self.down_proj)


@use_experts_implementation(has_gate=False)
class UoEGELUExperts(nn.Module):
    """UoME experts of a plain `down(act(up(x)))` MLP, stacked like `UoESwiGLUExperts`."""

    def __init__(self, config: UoEConfig):
        super().__init__()
        self.num_experts = config.num_mlp_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.mlp_expert_size
        self.up_proj = nn.Parameter(torch.empty(self.num_experts, self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        weights = dense_gates(top_k_index, top_k_weights.to(hidden_states.dtype), self.num_experts)
        inner = self.act_fn(torch.einsum("nh,eih->nei", hidden_states, self.up_proj)) * weights[..., None]
        return torch.einsum("nei,ehi->nh", inner, self.down_proj)


class UoESparseMLP(nn.Module):
    """Union of MLP Experts: each token (patch) selects `mlp_top_k` slices of the MLP."""

    def __init__(self, config: UoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.top_k = config.mlp_top_k
        self.router = UoERouter(config.hidden_size, config.num_mlp_experts)
        self.experts = UoESwiGLUExperts(config) if config.mlp_type == "swiglu" else UoEGELUExperts(config)

    def forward(
        self, hidden_states: torch.Tensor, routing: RoutingInputs, cache: Cache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        cache_layer = cache.layers[self.layer_idx] if cache is not None else None
        cached_logits = cache_layer.last_routing("mlp_router_logits") if cache_layer is not None else None
        router_logits = self.router(hidden_states, routing.source_index, cached_logits)
        if cache_layer is not None:
            cache_layer.update_routing("mlp_router_logits", router_logits)
        top_index, top_gates, aux = route(router_logits, self.top_k, self.config, routing.token_mask)
        output = routed_experts_forward(
            self.experts,
            hidden_states.reshape(-1, hidden_dim),
            top_index.reshape(-1, self.top_k),
            top_gates.reshape(-1, self.top_k).to(hidden_states.dtype),
        )
        return output.reshape(batch_size, seq_len, hidden_dim), aux


class UoEDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: UoEConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = UoESelectiveAttention(config, layer_idx)
        self.mlp = UoESparseMLP(config, layer_idx)
        self.input_layernorm = UoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = UoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        routing: RoutingInputs,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _, attention_aux = self.self_attn(
            hidden_states, position_embeddings, routing, cache=cache, **kwargs
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states, mlp_aux = self.mlp(hidden_states, routing, cache=cache)
        hidden_states = residual + hidden_states
        return hidden_states, attention_aux + mlp_aux


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


class UoEPreTrainedModel(PreTrainedModel):
    config_class = UoEConfig
    config: UoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["UoEDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    # Selective attention needs a per-head mask, which flash-attention kernels cannot take.
    _supports_flash_attn = False
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(UoERouter, index=0),
        "hidden_states": OutputRecorder(UoEDecoderLayer, index=0),
        "attentions": OutputRecorder(UoESelectiveAttention, index=1),
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, UoESwiGLUExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, UoEGELUExperts):
            init.normal_(module.up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, UoERouter):
            init.normal_(module.weight, mean=0.0, std=std)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # transformers defaults to "grouped_mm", which on CPU rejects float32 shapes that are not multiples of
        # 16 bytes; the reference ("eager") path runs everywhere. Ask for "grouped_mm" explicitly to use it.
        return super().get_correct_experts_implementation("eager" if requested_experts is None else requested_experts)


def _check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    # One host sync: an out-of-range id would otherwise be a device-side assert (or garbage) on GPUs.
    if torch.compiler.is_compiling() or input_ids.numel() == 0:
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"`input_ids` must be in [0, vocab_size={vocab_size}), got values in [{low}, {high}].")


class UoEModel(UoEPreTrainedModel):
    def __init__(self, config: UoEConfig):
        super().__init__(config)
        unsupported = {
            "is_causal": (config.is_causal, True),
            "mlp_bias": (config.mlp_bias, False),
            "norm_type": (config.norm_type, "rmsnorm"),
            "position_embedding_type": (config.position_embedding_type, "rope"),
        }
        for name, (value, required) in unsupported.items():
            if value != required:
                raise ValueError(
                    f"`UoEModel` is the causal RMSNorm/RoPE decoder and needs `{name}={required!r}`, got {value!r} "
                    "(the bidirectional ViT-style encoder is `UoEForImageClassification`)."
                )
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [UoEDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = UoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = UoERotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> UoEModelOutputWithPast:
        r"""
        cache (`DynamicCache`, *optional*):
            KV cache with routing state from an earlier call (`past_key_values` is accepted as its older name).
        """
        cache = resolve_cache_argument(cache, past_key_values)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of `input_ids` or `inputs_embeds`.")
        if input_ids is not None:
            _check_input_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]

        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # the recomputation in backward would write the cache twice
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None:
            cache = prepare_uoe_cache(cache, self.config.num_hidden_layers)
        past_length = cache.get_seq_length() if cache is not None else 0

        total_length = past_length + seq_len
        if total_length > self.config.max_position_embeddings:
            raise ValueError(
                f"Sequence length {total_length} (cached {past_length} + new {seq_len}) exceeds "
                f"`max_position_embeddings`={self.config.max_position_embeddings}."
            )
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (batch_size, total_length):
                raise ValueError(
                    f"`attention_mask` must be a 2-D padding mask of shape (batch, cached + new tokens) = "
                    f"({batch_size}, {total_length}), got {tuple(attention_mask.shape)}."
                )
            attention_mask = attention_mask.bool()
        if position_ids is None:
            if attention_mask is not None:
                # Positions count real tokens only, so a left-padded sequence gets the positions it has alone.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past_length:]
            else:
                position_ids = torch.arange(past_length, total_length, device=inputs_embeds.device)[None]
        position_ids = position_ids.expand(batch_size, -1)

        patch_size = self.config.routing_patch_size
        routing = RoutingInputs(
            source_index=None
            if patch_size == 1
            else patch_source_index(position_ids, patch_size, continues_cache=past_length > 0),
            token_mask=attention_mask[:, past_length:] if attention_mask is not None else None,
            key_mask=attention_mask,
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        aux_total = inputs_embeds.new_zeros(2, dtype=torch.float32)
        for decoder_layer in self.layers:
            hidden_states, aux = decoder_layer(
                hidden_states,
                position_embeddings,
                routing,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
            aux_total = aux_total + aux
        hidden_states = self.norm(hidden_states)
        aux_mean = aux_total / (2 * self.config.num_hidden_layers)

        return UoEModelOutputWithPast(
            last_hidden_state=hidden_states,
            **{CACHE_FIELD: cache if use_cache else None},
            aux_loss=aux_mean[0],
            router_z_loss=aux_mean[1],
        )


class UoEForCausalLM(UoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: UoEConfig):
        super().__init__(config)
        self.model = UoEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> UoECausalLMOutputWithPast:
        r"""
        cache (`DynamicCache`, *optional*):
            KV cache with routing state from an earlier call (`past_key_values` is accepted as its older name).
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Targets for language modeling (shifted inside the loss); `-100` is ignored. When given, `loss`
            is the token cross-entropy plus `router_aux_loss_coef * aux_loss + router_z_loss_coef * router_z_loss`.
        """
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        outputs: UoEModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
            router_loss = (
                self.config.router_aux_loss_coef * outputs.aux_loss
                + self.config.router_z_loss_coef * outputs.router_z_loss
            )
            num_items_in_batch = kwargs.get("num_items_in_batch")
            if num_items_in_batch is not None:
                # Trainer sums micro-batch losses under gradient accumulation (the token loss is already divided
                # by the whole batch's token count); weight the router losses by this micro-batch's share of the
                # tokens so that they add up to one mean instead of `accumulation_steps` of them.
                micro_tokens = (labels[..., 1:] != -100).sum()
                router_loss = router_loss * micro_tokens.to(router_loss.dtype) / num_items_in_batch
            loss = loss + router_loss.to(loss.device)

        return UoECausalLMOutputWithPast(
            loss=loss,
            aux_loss=outputs.aux_loss,
            router_z_loss=outputs.router_z_loss,
            logits=logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

    @classmethod
    def from_dense(cls, dense_model: PreTrainedModel, **config_overrides) -> UoEForCausalLM:
        """Build a UoE model from a transformers `LlamaForCausalLM` by equivalent decomposition.

        Attention heads become SMHA experts as they are; the MLP's hidden units are cut into
        `num_mlp_experts` consecutive slices. Routers are freshly initialised. Without overrides every
        expert is selected (`attention_top_k = num_attention_heads`, `mlp_top_k = num_mlp_experts`) and
        the result computes the same logits as `dense_model`; pass e.g. `attention_top_k=4, mlp_top_k=2`
        to sparsify.
        """
        config = uoe_config_from_llama(dense_model.config, **config_overrides)
        model = cls(config)
        state_dict = uoe_state_dict_from_llama(dense_model.state_dict(), config)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        # Only the routers (and a tied head) are new; anything else missing means the layouts disagree.
        missing = [name for name in missing if ".router." not in name and name != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(
                f"Dense checkpoint does not match the UoE layout: missing {missing}, unexpected {unexpected}"
            )
        if config.tie_word_embeddings:
            model.tie_weights()
        return model.to(dtype=next(dense_model.parameters()).dtype)


__all__ = ["UoEForCausalLM", "UoEModel", "UoEPreTrainedModel", "UoECacheLayer"]
