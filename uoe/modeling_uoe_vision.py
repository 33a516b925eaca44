"""PyTorch Union-of-Experts vision encoder: `UoEVisionModel` and `UoEForImageClassification`.

A ViT-style encoder (Conv2d patch embedding, CLS token, learned or rotary positions, pre-norm layers) whose
attention is Selective Multi-Head Attention and whose MLP is a Union of GELU MLP experts with biases. Routing
is hierarchical and per image (never across the batch):

1. image tokens are grouped into routing patches of `routing_patch_size` consecutive tokens, each routed from
   the mean of its tokens; every patch selects `attention_top_k` heads and `mlp_top_k` MLP experts;
2. with `data_capacity = c`, every expert (head or MLP slice) then keeps at most `ceil(c * num_patches)` of the
   patches of the image that chose it, by router score, and only those are computed (expert-choice layout).

The CLS token is not routed: every head and every MLP expert always processes it (it is what the classifier
reads, and it costs one token of dense compute per image). At full routing the model is exactly a ViT.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import can_return_tuple

from .configuration_uoe import UoEConfig
from .conversion_vit import uoe_config_from_vit, uoe_state_dict_from_vit
from .kernels_smha import selective_attention
from .modeling_uoe import (
    UoEPreTrainedModel,
    UoERMSNorm,
    UoERotaryEmbedding,
    UoERouter,
    eager_attention_forward,
    rotate_half,
    route,
    routed_experts_forward,
    use_attention_kernels,
)
from .routing import capacity_slots, dense_gates, patch_mean, router_scores

# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class UoEVisionModelOutput(BaseModelOutput):
    r"""
    aux_loss (`torch.FloatTensor`):
        Switch load-balancing loss, averaged over the routed blocks (SMHA and UoME of every layer).
    router_z_loss (`torch.FloatTensor`):
        Router z-loss, averaged over the routed blocks.
    router_logits (`tuple(torch.FloatTensor)`, returned with `output_router_logits=True`):
        One `(batch, num_routing_patches, experts)` tensor per routed block: layer 0 SMHA, layer 0 UoME, ...
    """

    aux_loss: torch.FloatTensor | None = None
    router_z_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class UoEImageClassifierOutput(ImageClassifierOutput):
    r"""
    aux_loss (`torch.FloatTensor`):
        Switch load-balancing loss (added to `loss` with `config.router_aux_loss_coef`).
    router_z_loss (`torch.FloatTensor`):
        Router z-loss (added to `loss` with `config.router_z_loss_coef`).
    router_logits (`tuple(torch.FloatTensor)`, returned with `output_router_logits=True`):
        One `(batch, num_routing_patches, experts)` tensor per routed block.
    """

    aux_loss: torch.FloatTensor | None = None
    router_z_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Routing context
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class VisionRouting:
    """What a routed block decided for one forward pass.

    top_index / gates: `(batch, patches, top_k)` token-choice selection and its gates.
    slots / slot_valid: with data selection, `(batch, experts, capacity)` patch index of each kept slot and
        whether the slot holds a patch that chose the expert (invalid slots compute, but contribute 0).
    """

    top_index: torch.Tensor
    gates: torch.Tensor
    slots: torch.Tensor | None
    slot_valid: torch.Tensor | None


def _route_patches(
    router: UoERouter, hidden_states: torch.Tensor, top_k: int, config: UoEConfig
) -> tuple[VisionRouting, torch.Tensor, torch.Tensor]:
    """Route the image tokens (all but CLS) of `hidden_states`; return `(routing, router_logits, aux)`."""
    patch_states = patch_mean(hidden_states[:, 1:], config.routing_patch_size)
    router_logits = router(patch_states)
    top_index, gates, aux = route(router_logits, top_k, config, None)
    slots = slot_valid = None
    if config.data_capacity is not None:
        num_patches = router_logits.shape[1]
        capacity = math.ceil(config.data_capacity * num_patches)
        # rank by router score (softmax normalises per patch, so logits would rank differently)
        scores = router_scores(router_logits, config.router_score_func)
        slots, slot_valid = capacity_slots(scores, top_index, capacity)
    return VisionRouting(top_index, gates, slots, slot_valid), router_logits, aux


def _slot_tokens(slots: torch.Tensor, patch_size: int, with_cls: bool) -> torch.Tensor:
    """Token indices `(batch, experts, capacity * patch_size [+ 1])` covered by the slots' patches (CLS = 0)."""
    offsets = torch.arange(patch_size, device=slots.device)
    tokens = (1 + slots[..., None] * patch_size + offsets).flatten(-2)
    if with_cls:
        tokens = torch.cat([tokens.new_zeros(*tokens.shape[:-1], 1), tokens], dim=-1)
    return tokens


def _gather_tokens(hidden_states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`(batch, T, H)` gathered at `(batch, E, L)` token indices -> `(batch, E, L, H)`."""
    batch, experts, length = tokens.shape
    flat = tokens.reshape(batch, experts * length, 1).expand(-1, -1, hidden_states.shape[-1])
    return hidden_states.gather(1, flat).view(batch, experts, length, -1)


def _scatter_tokens(values: torch.Tensor, tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Sum `(batch, E, L, H)` slot outputs back into `(batch, seq_len, H)` at their token indices."""
    batch, experts, length, hidden = values.shape
    flat = tokens.reshape(batch, experts * length, 1).expand(-1, -1, hidden)
    out = values.new_zeros(batch, seq_len, hidden)
    return out.scatter_add(1, flat, values.reshape(batch, experts * length, hidden))


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------------


class UoEVisionEmbeddings(nn.Module):
    """Conv2d patch embedding, CLS token and (for `position_embedding_type="learned"`) absolute positions."""

    def __init__(self, config: UoEConfig):
        super().__init__()
        self.config = config
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        if config.position_embedding_type == "learned":
            self.position_embeddings = nn.Parameter(torch.zeros(1, self.num_patches + 1, config.hidden_size))
        else:
            self.position_embeddings = None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeddings = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        embeddings = embeddings.flatten(2).transpose(1, 2)  # (batch, patches, hidden), row-major patches
        cls = self.cls_token.expand(embeddings.shape[0], -1, -1)
        embeddings = torch.cat([cls, embeddings], dim=1)
        if self.position_embeddings is not None:
            embeddings = embeddings + self.position_embeddings
        return embeddings


def _make_norm(config: UoEConfig) -> nn.Module:
    if config.norm_type == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    return UoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class UoEVisionSelectiveAttention(nn.Module):
    """Bidirectional Selective Multi-Head Attention over image tokens.

    Head h: query i attends key j iff both selected h (CLS selects every head). Without data selection this is
    masked attention over all tokens (the reference layout); with data selection each head gathers the
    `1 + capacity * routing_patch_size` tokens it kept and computes its projections and attention on those only.
    """

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
        self.is_causal = False
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, width, bias=config.attention_bias)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=config.attention_bias)
        self.router = UoERouter(config.hidden_size, self.num_heads)

    def _attention(self, query, key, value, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        return interface(
            self,
            query,
            key,
            value,
            mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
        )

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        routing, router_logits, aux = _route_patches(self.router, hidden_states, self.top_k, self.config)
        if routing.slots is None:
            output, weights = self._forward_masked(hidden_states, position_embeddings, routing)
        else:
            output, weights = self._forward_gathered(hidden_states, position_embeddings, routing)
        return output, weights, router_logits, aux

    def _forward_masked(self, hidden_states, position_embeddings, routing: VisionRouting):
        batch_size, seq_len, _ = hidden_states.shape
        patch_size = self.config.routing_patch_size
        patch_gates = dense_gates(routing.top_index, routing.gates, self.num_heads)  # (batch, patches, heads)
        token_gates = torch.cat(
            [patch_gates.new_ones(batch_size, 1, self.num_heads), patch_gates.repeat_interleave(patch_size, dim=1)],
            dim=1,
        )
        shape = (batch_size, seq_len, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if position_embeddings is not None:
            cos, sin = (t.unsqueeze(1) for t in position_embeddings)
            query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
        selected = token_gates != 0
        if use_attention_kernels(self, query):
            # Bidirectional selective attention over each head's selected tokens; unselected heads come back 0.
            attn_output = selective_attention(query, key, value, selected, selected, causal=False, scaling=self.scaling)
            attn_weights = None
        else:
            mask = None
            if self.top_k < self.num_heads:
                # key j is visible in head h iff it selected h; the diagonal keeps unselected queries' rows finite
                # (their outputs are multiplied by a zero gate afterwards).
                allowed = selected.transpose(1, 2)[:, :, None, :]
                allowed = allowed | torch.eye(seq_len, dtype=torch.bool, device=hidden_states.device)
                mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
                mask = mask.masked_fill(~allowed, torch.finfo(query.dtype).min)
            attn_output, attn_weights = self._attention(query, key, value, mask)  # (batch, seq, heads, head_dim)
        attn_output = attn_output * token_gates.to(attn_output.dtype)[..., None]
        return self.o_proj(attn_output.reshape(batch_size, seq_len, -1)), attn_weights

    def _forward_gathered(self, hidden_states, position_embeddings, routing: VisionRouting):
        batch_size, seq_len, hidden_size = hidden_states.shape
        heads, head_dim, patch_size = self.num_heads, self.head_dim, self.config.routing_patch_size
        tokens = _slot_tokens(routing.slots, patch_size, with_cls=True)  # (batch, heads, L)
        valid = torch.cat(
            [routing.slot_valid.new_ones(batch_size, heads, 1), routing.slot_valid.repeat_interleave(patch_size, -1)],
            dim=-1,
        )
        patch_gates = dense_gates(routing.top_index, routing.gates, heads).transpose(1, 2)  # (batch, heads, P)
        slot_gates = patch_gates.gather(2, routing.slots).repeat_interleave(patch_size, -1)
        gates = torch.cat([slot_gates.new_ones(batch_size, heads, 1), slot_gates], dim=-1) * valid

        # Per-head projections of the kept tokens only: (batch, heads, L, hidden) x (heads, head_dim, hidden).
        gathered = _gather_tokens(hidden_states, tokens)

        def project(linear: nn.Linear) -> torch.Tensor:
            out = torch.einsum("bhlc,hdc->bhld", gathered, linear.weight.view(heads, head_dim, hidden_size))
            return out if linear.bias is None else out + linear.bias.view(heads, 1, head_dim)

        query, key, value = project(self.q_proj), project(self.k_proj), project(self.v_proj)
        if position_embeddings is not None:
            cos, sin = (t[0][tokens] for t in position_embeddings)  # positions are the tokens' original ones
            query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
        length = tokens.shape[-1]
        allowed = valid[:, :, None, :] | torch.eye(length, dtype=torch.bool, device=valid.device)
        mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill(~allowed, torch.finfo(query.dtype).min)
        attn_output, attn_weights = self._attention(query, key, value, mask)
        attn_output = attn_output.transpose(1, 2) * gates.to(attn_output.dtype)[..., None]  # (batch, heads, L, d)
        out = torch.einsum("bhld,chd->bhlc", attn_output, self.o_proj.weight.view(hidden_size, heads, head_dim))
        out = _scatter_tokens(out, tokens, seq_len)
        if self.o_proj.bias is not None:
            out = out + self.o_proj.bias
        # attention weights are in each head's slot coordinates here; not comparable to (seq x seq) maps
        return out, None


@use_experts_implementation(has_gate=False, has_bias=True)
class UoEGELUBiasExperts(nn.Module):
    """UoME experts of a ViT MLP `fc2(gelu(fc1 x + b1)) + b2`, stacked: expert e owns hidden units
    `[e*I/E, (e+1)*I/E)` with their slice of b1 (`up_proj_bias`). The output bias b2 is shared by all experts
    and added once by `UoEVisionSparseMLP`; `down_proj_bias` is a zero buffer that only exists because
    transformers' experts back-ends read `down_proj_bias[expert_ids]`."""

    def __init__(self, config: UoEConfig):
        super().__init__()
        self.num_experts = config.num_mlp_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.mlp_expert_size
        self.up_proj = nn.Parameter(torch.empty(self.num_experts, self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        if config.mlp_bias:
            self.up_proj_bias = nn.Parameter(torch.zeros(self.num_experts, self.intermediate_dim))
        else:
            self.register_buffer("up_proj_bias", torch.zeros(self.num_experts, self.intermediate_dim), persistent=False)
        self.register_buffer("down_proj_bias", torch.zeros(self.num_experts, self.hidden_dim), persistent=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # Reference path (token choice): every expert on every row, unselected experts weighted 0.
        weights = dense_gates(top_k_index, top_k_weights.to(hidden_states.dtype), self.num_experts)
        inner = torch.einsum("nh,eih->nei", hidden_states, self.up_proj) + self.up_proj_bias
        inner = self.act_fn(inner) * weights[..., None]
        return torch.einsum("nei,ehi->nh", inner, self.down_proj) + weights @ self.down_proj_bias

    def forward_slots(self, slot_states: torch.Tensor, slot_weights: torch.Tensor) -> torch.Tensor:
        """Expert-choice path: `(batch, E, L, hidden)` rows, row block e computed by expert e only.

        This is where data selection saves compute: only the kept (patch, expert) rows are multiplied.
        """
        inner = torch.einsum("belh,eih->beli", slot_states, self.up_proj) + self.up_proj_bias[:, None]
        inner = self.act_fn(inner) * slot_weights[..., None]
        return torch.einsum("beli,ehi->belh", inner, self.down_proj)


class UoEVisionSparseMLP(nn.Module):
    """Union of GELU MLP experts for the vision encoder. CLS goes through every expert."""

    def __init__(self, config: UoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.top_k = config.mlp_top_k
        self.num_experts = config.num_mlp_experts
        self.router = UoERouter(config.hidden_size, config.num_mlp_experts)
        self.experts = UoEGELUBiasExperts(config)
        # One output bias for the whole union (one per expert would add it top_k times and break equivalence).
        self.output_bias = nn.Parameter(torch.zeros(config.hidden_size)) if config.mlp_bias else None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        routing, router_logits, aux = _route_patches(self.router, hidden_states, self.top_k, self.config)
        patch_size = self.config.routing_patch_size

        all_experts = torch.arange(self.num_experts, device=hidden_states.device).expand(batch_size, -1)
        cls_out = routed_experts_forward(
            self.experts, hidden_states[:, 0], all_experts, torch.ones_like(all_experts, dtype=torch.float32)
        )
        if routing.slots is None:
            top_index = routing.top_index.repeat_interleave(patch_size, dim=1).reshape(-1, self.top_k)
            gates = routing.gates.repeat_interleave(patch_size, dim=1).reshape(-1, self.top_k)
            image_out = routed_experts_forward(
                self.experts, hidden_states[:, 1:].reshape(-1, hidden_dim), top_index, gates
            )
            image_out = image_out.view(batch_size, seq_len - 1, hidden_dim)
            output = torch.cat([cls_out[:, None].to(image_out.dtype), image_out], dim=1)
        else:
            tokens = _slot_tokens(routing.slots, patch_size, with_cls=False)  # (batch, E, capacity * patch_size)
            patch_gates = dense_gates(routing.top_index, routing.gates, self.num_experts).transpose(1, 2)
            slot_weights = (patch_gates.gather(2, routing.slots) * routing.slot_valid).repeat_interleave(patch_size, -1)
            slot_out = self.experts.forward_slots(
                _gather_tokens(hidden_states, tokens), slot_weights.to(hidden_states.dtype)
            )
            output = _scatter_tokens(slot_out, tokens, seq_len)
            output = output + F.pad(cls_out[:, None].to(output.dtype), (0, 0, 0, seq_len - 1))
        if self.output_bias is not None:
            output = output + self.output_bias
        return output, router_logits, aux


class UoEEncoderLayer(GradientCheckpointingLayer):
    """Pre-norm bidirectional UoE layer: x + SMHA(norm(x)), then x + UoME(norm(x))."""

    def __init__(self, config: UoEConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = _make_norm(config)
        self.self_attn = UoEVisionSelectiveAttention(config, layer_idx)
        self.post_attention_layernorm = _make_norm(config)
        self.mlp = UoEVisionSparseMLP(config, layer_idx)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        attn_out, attn_weights, attn_logits, attn_aux = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings
        )
        hidden_states = hidden_states + attn_out
        mlp_out, mlp_logits, mlp_aux = self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = hidden_states + mlp_out
        return hidden_states, attn_weights, (attn_logits, mlp_logits), attn_aux + mlp_aux


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def _check_vision_config(config: UoEConfig) -> None:
    if config.image_size is None:
        raise ValueError("`image_size` must be set in the config of a UoE vision model.")
    if config.is_causal:
        raise ValueError("UoE vision models are bidirectional encoders: set `is_causal=False`.")
    if config.mlp_type != "gelu":
        raise ValueError(f"UoE vision models use GELU MLP experts: set `mlp_type='gelu'`, got {config.mlp_type!r}.")
    num_tokens = (config.image_size // config.patch_size) ** 2
    if num_tokens % config.routing_patch_size != 0:
        raise ValueError(
            f"`routing_patch_size` ({config.routing_patch_size}) must divide the number of image tokens "
            f"((image_size / patch_size)^2 = {num_tokens})."
        )
    if config.position_embedding_type == "rope" and config.max_position_embeddings < num_tokens + 1:
        raise ValueError(
            f"`max_position_embeddings` ({config.max_position_embeddings}) must be >= the number of tokens "
            f"including CLS ({num_tokens + 1}) for rotary positions."
        )


class UoEVisionPreTrainedModel(UoEPreTrainedModel):
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["UoEEncoderLayer", "UoEVisionEmbeddings"]
    _can_record_outputs = None

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, UoEGELUBiasExperts):
            init.normal_(module.up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
            init.zeros_(module.up_proj_bias)
            init.zeros_(module.down_proj_bias)
        elif isinstance(module, UoEVisionSparseMLP) and module.output_bias is not None:
            init.zeros_(module.output_bias)
        elif isinstance(module, UoEVisionEmbeddings):
            init.trunc_normal_(module.cls_token, mean=0.0, std=std)
            if module.position_embeddings is not None:
                init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)


class UoEVisionModel(UoEVisionPreTrainedModel):
    """The bidirectional UoE encoder; returns the final-norm hidden states of CLS + image tokens."""

    def __init__(self, config: UoEConfig):
        super().__init__(config)
        _check_vision_config(config)
        self.embeddings = UoEVisionEmbeddings(config)
        self.layers = nn.ModuleList([UoEEncoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = _make_norm(config)
        self.rotary_emb = UoERotaryEmbedding(config) if config.position_embedding_type == "rope" else None
        self.gradient_checkpointing = False
        self.post_init()

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        config = self.config
        if pixel_values.dim() != 4:
            raise ValueError(
                f"`pixel_values` must be a 4-D (batch, num_channels, height, width) tensor, got shape "
                f"{tuple(pixel_values.shape)}."
            )
        _, channels, height, width = pixel_values.shape
        if channels != config.num_channels:
            raise ValueError(
                f"`pixel_values` has {channels} channels but the model expects `num_channels`={config.num_channels}."
            )
        if height % config.patch_size or width % config.patch_size:
            raise ValueError(
                f"`pixel_values` height and width ({height}, {width}) must be divisible by `patch_size`="
                f"{config.patch_size}."
            )
        if (height, width) != (config.image_size, config.image_size):
            raise ValueError(
                f"`pixel_values` must be {config.image_size}x{config.image_size} (`image_size`), got {height}x{width}."
            )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
    ) -> UoEVisionModelOutput:
        self._check_pixel_values(pixel_values)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        hidden_states = self.embeddings(pixel_values)
        position_embeddings = None
        if self.rotary_emb is not None:
            # CLS at position 0, image tokens at 1..N in row-major order (1-D rotary over the token index).
            position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None]
            position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        all_hidden, all_attn, all_logits = [], [], []
        aux_total = hidden_states.new_zeros(2, dtype=torch.float32)
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, attn_weights, logits, aux = layer(hidden_states, position_embeddings)
            aux_total = aux_total + aux
            all_attn.append(attn_weights)
            all_logits.extend(logits)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        aux_mean = aux_total / (2 * self.config.num_hidden_layers)
        return UoEVisionModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
            aux_loss=aux_mean[0],
            router_z_loss=aux_mean[1],
            router_logits=tuple(all_logits) if output_router_logits else None,
        )


class UoEForImageClassification(UoEVisionPreTrainedModel):
    """UoE vision encoder with a linear classifier on the CLS token (ViT style)."""

    def __init__(self, config: UoEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = UoEVisionModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
    ) -> UoEImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices (or regression targets, per `config.problem_type`). When given, `loss` is the
            classification loss plus `router_aux_loss_coef * aux_loss + router_z_loss_coef * router_z_loss`.
        """
        outputs: UoEVisionModelOutput = self.model(
            pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            output_router_logits=output_router_logits,
        )
        logits = self.classifier(outputs.last_hidden_state[:, 0])
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
            router_loss = (
                self.config.router_aux_loss_coef * outputs.aux_loss
                + self.config.router_z_loss_coef * outputs.router_z_loss
            )
            loss = loss + router_loss.to(loss.device)
        return UoEImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_loss=outputs.aux_loss,
            router_z_loss=outputs.router_z_loss,
            router_logits=outputs.router_logits,
        )

    @classmethod
    def from_dense(cls, dense_model: PreTrainedModel, **config_overrides) -> UoEForImageClassification:
        """Build a UoE classifier from a transformers `ViTForImageClassification` by equivalent decomposition.

        Heads become SMHA experts; the MLP's hidden units are cut into `num_mlp_experts` consecutive slices
        (input bias split with them, output bias shared). Routers are freshly initialised. Without overrides
        every expert is selected and the logits equal the ViT's; pass e.g. `attention_top_k=2, mlp_top_k=2,
        data_capacity=0.5` to sparsify.
        """
        config = uoe_config_from_vit(dense_model.config, **config_overrides)
        model = cls(config)
        state_dict = uoe_state_dict_from_vit(dense_model.state_dict(), config)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        missing = [name for name in missing if ".router." not in name]
        if missing or unexpected:
            raise ValueError(
                f"ViT checkpoint does not match the UoE layout: missing {missing}, unexpected {unexpected}"
            )
        return model.to(dtype=next(dense_model.parameters()).dtype)


__all__ = ["UoEForImageClassification", "UoEVisionModel", "UoEVisionPreTrainedModel", "UoEImageClassifierOutput"]
