"""PyTorch Union-of-Experts (UoE) models: Selective Multi-Head Attention (SMHA) and Union of MLP Experts (UoME).

A UoE layer is a dense transformer layer split by equivalent decomposition: each attention head is an
expert, and the MLP is cut into `num_mlp_experts` slices of its hidden units. Routers pick experts per
routing patch and the selected experts' outputs are summed, so at full routing the layer *is* the dense
layer. `UoESelectiveAttention` and `UoESparseMLP` serve the causal LM and the bidirectional encoder
(`modeling_uoe_vision`); each runs on one of three paths that compute the same function, registered by name like
transformers' attention and experts implementations: the masked reference, the gathered path (`gathered.py`) and
the Triton kernels (SMHA: `selective_attention.py`'s registry; UoME: transformers' experts interface).
"""

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import ExpertsInterface
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

try:
    from transformers.integrations.tensor_parallel import ALL_PARALLEL_STYLES, TensorParallelLayer
except ImportError:  # a transformers without named tensor-parallel styles: the model works, unsharded
    ALL_PARALLEL_STYLES, TensorParallelLayer = None, object

from .cache_uoe import (
    UoECacheLayer,
    UoEStaticCacheLayer,
    block_cache_layer,
    prepare_uoe_cache,
    resolve_cache_argument,
)
from .configuration_uoe import CACHE_FIELD, UoEConfig
from .conversion import uoe_config_from_dense, uoe_state_dict_from_dense
from .gathered import gathered_experts_forward, gathered_selective_attention, reads_parameters_directly
from .kernels_smha import triton_selective_attention
from .kernels_uome import register_uoe_experts_kernels, uoe_triton_experts_forward
from .routing import (
    Slots,
    capacity_keep,
    dense_gates,
    entropy_balance_loss,
    gather_patch_logits,
    load_balancing_loss,
    mean_router_distribution,
    packed_segment_ids,
    patch_mean,
    patch_source_index,
    router_scores,
    router_z_loss,
    select_top_k,
)
from .selective_attention import (
    ALL_SELECTIVE_ATTENTION_FUNCTIONS,
    GATHERED_ATTENTION_MIN_KEYS,  # noqa: F401  (re-exported: the "auto" threshold)
    auto_selective_attention,
    is_static,
    project_all_heads,
    resolve_routing_backend,
    selective_allowed,
    union_of_heads,
)

# ---------------------------------------------------------------------------------------------------------------------
# Execution paths
# ---------------------------------------------------------------------------------------------------------------------


# The stacked expert tensors the gathered and Triton experts read (those a module has).
EXPERT_TENSORS = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")
# The experts implementations that take `pair_keep` (the others get dropped pairs as zero weights).
UOE_EXPERTS_IMPLEMENTATIONS = ("uoe", "uoe_gathered", "uoe_triton", "eager")


def routed_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    pair_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Experts back-end `"uoe"` (the UoE models' default): the path `config.routing_backend` picks for the device.

    `"masked"` runs the module's own forward (every expert on every token), `"gathered"` the gathered experts,
    `"triton"` the UoME kernels; `"auto"` takes the masked (dense) computation when every token selects every
    expert. Modules without `routing_backend` in their config follow `"auto"`.
    """
    backend = getattr(self.config, "routing_backend", "auto")
    path = resolve_routing_backend(backend, hidden_states)
    if backend == "auto" and top_k_index.shape[-1] == getattr(self, "num_experts", -1) and pair_keep is None:
        path = "masked"  # every token in every expert: the dense computation is the fastest
    if path != "masked" and not reads_parameters_directly(self, EXPERT_TENSORS, hidden_states.device):
        path = "masked"  # quantized or off-device expert weights: the module's own computation
    if path == "gathered":
        return gathered_experts_forward(self, hidden_states, top_k_index, top_k_weights, pair_keep)
    if path == "triton":
        return uoe_triton_experts_forward(self, hidden_states, top_k_index, top_k_weights, pair_keep)
    masked_forward = type(self).forward.__wrapped__  # the class's own forward, under @use_experts_implementation
    if pair_keep is not None:
        return masked_forward(self, hidden_states, top_k_index, top_k_weights, pair_keep)
    return masked_forward(self, hidden_states, top_k_index, top_k_weights)


# `experts_implementation=` "uoe" (default), "uoe_gathered" and "uoe_triton" through transformers' experts interface.
ExpertsInterface.register("uoe", routed_experts_forward)
ExpertsInterface.register("uoe_gathered", gathered_experts_forward)
register_uoe_experts_kernels()


# ---------------------------------------------------------------------------------------------------------------------
# Tensor parallelism
# ---------------------------------------------------------------------------------------------------------------------
# The union is the tensor-parallel split: a rank holds whole heads (colwise q/k/v, rowwise o_proj) and a slice of every
# MLP expert (transformers' `moe_tp_experts`); routers and norms are replicated and every rank routes every token. The
# two styles below check that the split is even and tell SMHA which heads are its own. `install_forward` takes what
# transformers passes besides the module and the mesh (5.25 added the keywords `config` and `mesh_manager`; earlier
# releases pass neither), so one signature serves every supported release.


class UoESelectiveHeadsParallel(TensorParallelLayer):
    """TP style `"uoe_selective_heads"` of a `UoESelectiveAttention`: the rank computes head groups
    `[rank * G / tp, (rank + 1) * G / tp)` (their key/value heads and query heads) of the replicated routing (see
    `UoESelectiveAttention.local_groups`)."""

    def install_forward(self, module: nn.Module, mesh, **kwargs) -> nn.Module:
        if module.num_key_value_heads % mesh.size():
            raise ValueError(
                "Tensor parallelism gives every rank whole head groups: `num_key_value_heads`="
                f"{module.num_key_value_heads} must be divisible by the tensor-parallel size {mesh.size()}."
            )
        module.tp_mesh = mesh
        return module


class UoEUnionMLPParallel(TensorParallelLayer):
    """TP style `"uoe_union_mlp"` of a `UoESparseMLP`: checks that every expert's hidden units split evenly (the experts'
    own rules shard them; the block's output bias is added once, after their all-reduce)."""

    def install_forward(self, module: nn.Module, mesh, **kwargs) -> nn.Module:
        if module.experts.intermediate_dim % mesh.size():
            raise ValueError(
                f"Tensor parallelism gives every rank a slice of each MLP expert: `mlp_expert_size`="
                f"{module.experts.intermediate_dim} (intermediate_size / num_mlp_experts) must be divisible by the "
                f"tensor-parallel size {mesh.size()}."
            )
        experts = module.experts
        if "up_proj_bias" in experts._buffers:  # the zero stand-in of a bias-free encoder MLP: this rank's units
            experts.up_proj_bias = experts.up_proj_bias[:, : experts.intermediate_dim // mesh.size()].clone()
        return module


if ALL_PARALLEL_STYLES is not None:
    ALL_PARALLEL_STYLES.register("uoe_selective_heads", UoESelectiveHeadsParallel())
    ALL_PARALLEL_STYLES.register("uoe_union_mlp", UoEUnionMLPParallel())

# The layers' plan, for the decoder and the encoder (`from_pretrained(..., tp_plan="auto")`). It names every MLP
# layout (SwiGLU `gate_up_proj`; GELU `up_proj`, with `up_proj_bias` in the encoder): `init_parallel_plans` keeps the
# rules of what the model has.
UOE_LAYERS_TP_PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.self_attn": "uoe_selective_heads",
    "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
    "layers.*.mlp.experts.up_proj": "colwise",
    "layers.*.mlp.experts.up_proj_bias": "rowwise",  # (experts, units): its last dim, like up_proj's units
    "layers.*.mlp.experts.down_proj": "rowwise",
    "layers.*.mlp.experts": "moe_tp_experts",
    "layers.*.mlp": "uoe_union_mlp",
}


class _SumGradientOverRanks(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over a process group."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


# ---------------------------------------------------------------------------------------------------------------------
# Outputs and cache
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class UoEModelOutputWithPast(MoeModelOutputWithPast):
    r"""
    aux_loss (`torch.FloatTensor`, returned in training, with `labels` or with `output_router_logits=True`):
        Load-balancing loss (`config.router_balance_loss`): the Switch loss averaged over the model's routed blocks
        (SMHA and UoME of every layer application; each Chain-of-Experts iteration is a UoME block), over the routed
        experts (shared ones have no router), or σ-MoE's negative router entropy averaged over the routed blocks of
        the distinct layers (each over all applications of its layer).
    router_z_loss (`torch.FloatTensor`, returned with `aux_loss`):
        Router z-loss, averaged over the routed blocks.
    router_logits (`tuple(torch.FloatTensor)`, returned with `output_router_logits=True`):
        One `(batch, seq, experts)` tensor per routed block in execution order: layer 0 SMHA (experts =
        head groups, i.e. heads without grouped-query attention), layer 0 UoME, layer 1 SMHA, ...; with
        `mlp_chain_length = C` each layer has C UoME entries, one per chain iteration, in iteration order, and with
        `num_layer_groups` there is one set per application of a shared layer. These are the logits each token was
        routed with (its routing patch's logits); `experts` counts the routed experts only (shared experts have no
        router).
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


def renamed_cache_argument(forward: Callable) -> Callable:
    """Take the KV cache under its pre-5.24 name `past_key_values` as well as `cache`.

    From transformers 5.24 on (which renamed it) the old name warns as transformers' own models do
    (`deprecate_kwarg`, a `FutureWarning`); before 5.24 it is the name `generate` passes, so it is taken silently.
    """
    if CACHE_FIELD == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", raise_if_both_names=True)(forward)

    @wraps(forward)
    def wrapper(*args, **kwargs):
        if "past_key_values" in kwargs:
            kwargs["cache"] = resolve_cache_argument(kwargs.get("cache"), kwargs.pop("past_key_values"))
        return forward(*args, **kwargs)

    return wrapper


@dataclass
class RoutingInputs:
    """Per-forward routing context shared by all layers of the causal model.

    source_index: `(batch, seq)` index of the token routing each token's patch (see
        `routing.patch_source_index`), or `None` when every token routes itself.
    token_mask: `(batch, seq)` bool, False at padding, or `None` (no padding). Padding selects no expert.
    segment_ids: `(batch, seq)` packed-sequence id of each token (attention stays inside a sequence), or `None`
        (one sequence per row).
    router_losses: whether the routed blocks compute their load-balancing and z-losses.
    """

    source_index: torch.Tensor | None
    token_mask: torch.Tensor | None
    segment_ids: torch.Tensor | None = None
    router_losses: bool = True


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


def masked_selective_attention(
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    selection: "Selection",
    cache_layer: "UoECacheLayer | None",
    segment_ids: torch.Tensor | None,
    value_states: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SMHA implementation `"masked"`, the reference (contract: `selective_attention.py`): every head of every token
    through the modules and the configured attention function (`attn_implementation`) with the selective per-head
    mask; unselected heads are then multiplied by 0. Every query keeps its own key, so that no softmax row is empty
    (the rows of unselected heads are discarded)."""
    heads = project_all_heads(
        module, hidden_states, position_embeddings, selection, cache_layer, segment_ids, value_states
    )
    query, key = heads.query, heads.key
    implementation = module.config._attn_implementation
    key_length, query_length = key.shape[2], query.shape[2]
    # every head of every token, no padding, one sequence per row: the dense layer's attention, which SDPA runs with
    # its own kernels instead of a materialised mask
    # (a static cache's slots outnumber its tokens: the mask hides the empty ones)
    dense = (
        module.num_selected == module.num_key_value_heads
        and all(block.keep is None for block in selection.slots)
        and heads.key_segments is None
        and not is_static(cache_layer)
    )
    attention_mask = None
    if not (dense and implementation == "sdpa" and (not module.is_causal or query_length in (1, key_length))):
        positions = heads.query_positions
        allowed = selective_allowed(heads.key_selected, positions, module.is_causal, heads.key_segments)
        own_key = positions[:, None] == torch.arange(key_length, device=key.device)
        attention_mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~(allowed | own_key), torch.finfo(query.dtype).min
        )
    attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    attn_output, attn_weights = attention_interface(
        module,
        query,
        key,
        heads.value,
        attention_mask,
        dropout=0.0 if not module.training else module.attention_dropout,
        scaling=module.scaling,
        **kwargs,
    )
    return union_of_heads(module, attn_output, heads.head_gates), attn_weights


# The SMHA implementations, selected by name (`selective_attention_implementation`; see `selective_attention.py`).
ALL_SELECTIVE_ATTENTION_FUNCTIONS.register("masked", masked_selective_attention)
ALL_SELECTIVE_ATTENTION_FUNCTIONS.register("gathered", gathered_selective_attention)
ALL_SELECTIVE_ATTENTION_FUNCTIONS.register("triton", triton_selective_attention)


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


def route(
    router_logits: torch.Tensor,
    top_k: int,
    config: UoEConfig,
    token_mask: torch.Tensor | None,
    router_losses: bool = True,
):
    """Select experts from router logits; return `(top_k_index, top_k_gates, aux)` with
    `aux = [load-balancing loss, z-loss]` of this block (`None` without `router_losses`). The load-balancing loss is
    `config.router_balance_loss`'s: the Switch loss, or σ-MoE's negative entropy of this block's averaged router
    distribution (the decoder recomputes it over all applications of a shared layer, see `UoEModel`)."""
    scores = router_scores(router_logits, config.router_score_func)
    top_index, top_gates = select_top_k(scores, top_k, config.gate_mode)
    aux = None
    if router_losses:
        if config.router_balance_loss == "entropy":
            balance = entropy_balance_loss(mean_router_distribution(router_logits, token_mask))
        else:
            balance = load_balancing_loss(scores, top_index, token_mask)
        aux = torch.stack([balance, router_z_loss(router_logits, token_mask)])
    return top_index, top_gates, aux


class Selection(NamedTuple):
    """What one routed block decided in a forward pass.

    slots: the experts of every token, as `Slots` tiling the sequence (the encoder's CLS token is its own block).
    router_logits: the logits tokens were routed with, `(batch, seq, experts)`; per routing patch,
        `(batch, patches, experts)`, in the encoder.
    aux: `[load-balancing loss, z-loss]` of the block, or `None` when the forward needs no router losses.
    max_list_length: a bound on the tokens of one sequence that one expert computes, when the routing fixes
        one (data selection); `None` otherwise.
    """

    slots: list[Slots]
    router_logits: torch.Tensor
    aux: torch.Tensor | None
    max_list_length: int | None


def with_shared_experts(
    top_index: torch.Tensor, gates: torch.Tensor, keep: torch.Tensor | None, num_shared: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Put the shared experts `0 .. num_shared - 1` in front of a routed selection whose indices count the routed
    experts only: routed expert e becomes expert `num_shared + e`. Shared experts get gate exactly 1 (a constant:
    no router reaches it) and are kept wherever the token is (padding, `keep` False for every slot, selects none;
    data selection never drops them)."""
    if num_shared == 0:
        return top_index, gates, keep
    shape = (*top_index.shape[:-1], num_shared)
    shared = torch.arange(num_shared, device=top_index.device, dtype=top_index.dtype).expand(shape)
    top_index = torch.cat([shared, top_index + num_shared], dim=-1)
    gates = torch.cat([gates.new_ones(shape), gates], dim=-1)
    if keep is not None:
        keep = torch.cat([keep[..., :1].expand(shape), keep], dim=-1)
    return top_index, gates, keep


def select_experts(
    router: UoERouter,
    hidden_states: torch.Tensor,
    top_k: int,
    config: UoEConfig,
    routing: "RoutingInputs | None",
    cache_layer: "UoECacheLayer | None",
    cache_name: str,
    num_shared: int = 0,
) -> Selection:
    """Route one block. Causal models route every token from its patch's first token (padding selects nothing);
    the bidirectional encoder routes each patch of image tokens from their mean, sends its CLS token (token 0)
    through every expert, and with `data_capacity` keeps only each expert's best patches.

    The router scores the block's routed experts only; the `num_shared` shared experts (the block's first ones) are
    added to every token's `top_k` routed ones (`with_shared_experts`), so every path computes them like any other
    selected expert. The router losses see the routed experts only."""
    if config.is_causal:
        cached_logits = cache_layer.last_routing(cache_name) if cache_layer is not None else None
        logits = router(hidden_states, routing.source_index, cached_logits)
        if cache_layer is not None:
            cache_layer.update_routing(cache_name, logits)
        top_index, gates, aux = route(logits, top_k, config, routing.token_mask, routing.router_losses)
        keep = None if routing.token_mask is None else routing.token_mask[..., None].expand_as(top_index)
        top_index, gates, keep = with_shared_experts(top_index, gates, keep, num_shared)
        return Selection([Slots(top_index, gates, keep)], logits, aux, None)

    batch, patch_size = hidden_states.shape[0], config.routing_patch_size
    num_experts = router.num_experts + num_shared
    logits = router(patch_mean(hidden_states[:, 1:], patch_size))
    top_index, gates, aux = route(logits, top_k, config, None, routing is None or routing.router_losses)
    keep, max_list_length = None, None
    if config.data_capacity is not None:
        capacity = math.ceil(config.data_capacity * logits.shape[1])
        # rank by router score (softmax normalises per patch, so logits would rank differently)
        keep = capacity_keep(router_scores(logits, config.router_score_func), top_index, capacity)
        # shared experts take every token: data selection limits the routed experts' load only
        max_list_length = hidden_states.shape[1] if num_shared else 1 + capacity * patch_size
        keep = torch.cat([keep.new_ones(*keep.shape[:-1], num_shared), keep], dim=-1) if num_shared else keep
    top_index, gates, _ = with_shared_experts(top_index, gates, None, num_shared)
    if patch_size > 1:
        top_index, gates = top_index.repeat_interleave(patch_size, 1), gates.repeat_interleave(patch_size, 1)
        keep = None if keep is None else keep.repeat_interleave(patch_size, 1)
    every_expert = torch.arange(num_experts, device=hidden_states.device).expand(batch, 1, num_experts)
    cls = Slots(every_expert, torch.ones(batch, 1, num_experts, device=gates.device, dtype=gates.dtype))
    return Selection([cls, Slots(top_index, gates, keep)], logits, aux, max_list_length)


class UoESelectiveAttention(nn.Module):
    """Selective Multi-Head Attention: every head group (one key/value head with its query heads; one head without
    grouped-query attention) is an expert; each token (patch) selects `attention_top_k` groups, and in group g every
    query head of a token that selected g attends the tokens that selected g (causally in the decoder, in both
    directions in the encoder, within its packed sequence). The selected groups' outputs are summed through `o_proj`
    (whose columns are the heads' slices). With `qk_norm`, every query and key head is RMS-normalised before RoPE.

    `forward` routes, picks an implementation by name (`selective_attention_implementation`, or the one
    `routing_backend` picks) from `ALL_SELECTIVE_ATTENTION_FUNCTIONS` and calls it (contract: `selective_attention.py`):
    the masked reference (`masked_selective_attention`: all heads, per-head mask, unselected heads times 0), the
    gathered path (`gathered.gathered_selective_attention`: q/k/v, attention and output projection of the selected
    (token, group) pairs only) or the Triton kernels (`kernels_smha.triton_selective_attention`).
    """

    def __init__(self, config: UoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads  # = the experts (head groups)
        self.group_size = self.num_heads // self.num_key_value_heads  # query heads per group
        self.head_dim = config.head_dim
        self.top_k = config.attention_top_k_at(layer_idx)  # routed groups per token (per-layer budgets)
        self.num_shared = config.num_shared_attention_groups  # groups 0 .. num_shared - 1: every token's
        self.num_selected = self.num_shared + self.top_k
        # The attention functions get keys and values already expanded to one per query head.
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = config.is_causal
        width, kv_width = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        # Query heads of group g are heads [g * group_size, (g + 1) * group_size): the group's rows of q_proj and
        # columns of o_proj are contiguous, as are its key/value head's rows of k_proj and v_proj.
        self.q_proj = nn.Linear(config.hidden_size, width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=config.attention_bias)
        self.q_norm = UoERMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = UoERMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.router = UoERouter(config.hidden_size, self.num_key_value_heads - self.num_shared)  # routed groups only
        if config.selective_attention_implementation is not None:  # a registered name (raises listing them)
            ALL_SELECTIVE_ATTENTION_FUNCTIONS.get_interface(config.selective_attention_implementation)
        self.tp_mesh = None  # set by tensor parallelism (`UoESelectiveHeadsParallel`): this rank computes its groups

    def per_query_head(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Repeat a per-group axis `dim` (keys, values, selections) once per query head of the group."""
        return x if self.group_size == 1 else x.repeat_interleave(self.group_size, dim)

    def norm_heads(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`qk_norm` of query and key rows whose last axis is whole heads (`(..., heads * head_dim)`)."""
        if self.q_norm is None:
            return query, key
        shape, key_shape = query.shape, key.shape
        query = self.q_norm(query.reshape(*shape[:-1], -1, self.head_dim)).reshape(shape)
        key = self.k_norm(key.reshape(*key_shape[:-1], -1, self.head_dim)).reshape(key_shape)
        return query, key

    def local_groups(self, selected: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This tensor-parallel rank's columns of the replicated `(batch, seq, groups)` selection and gates. Each rank's
        groups reach only their own gate columns, so the gates' gradient is summed over the ranks before it reaches
        the (replicated) router."""
        groups = self.num_key_value_heads // self.tp_mesh.size()
        start = self.tp_mesh.get_local_rank() * groups
        gates = _SumGradientOverRanks.apply(gates, self.tp_mesh.get_group())
        return selected[..., start : start + groups], gates[..., start : start + groups]

    def implementation(self, hidden_states: torch.Tensor, num_keys: int) -> str:
        """The name of the SMHA implementation this call runs: `config.selective_attention_implementation`, or the one
        `routing_backend` picks for `num_keys` keys (`auto_selective_attention`)."""
        name = self.config.selective_attention_implementation
        return auto_selective_attention(self, hidden_states, num_keys) if name is None else name

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        routing: "RoutingInputs | None" = None,
        cache: Cache | None = None,
        cache_index: int | None = None,
        value_states: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Returns `(output, attention weights or None, router logits, aux)`.

        `hidden_states` feed the router and the query/key projections; `value_states` (default: `hidden_states`) feed
        the value projection (MoEUT's peri-layernorm gives it the un-normalised residual stream). `cache_index` is the
        cache layer of this application of the layer (default `layer_idx`; a grouped model applies a layer several
        times)."""
        cache_layer = block_cache_layer(cache, self.layer_idx, cache_index)
        selection = select_experts(
            self.router,
            hidden_states,
            self.top_k,
            self.config,
            routing,
            cache_layer,
            "attention_router_logits",
            self.num_shared,
        )
        num_keys = hidden_states.shape[1] if cache_layer is None else cache_layer.key_slots(hidden_states.shape[1])
        attention = ALL_SELECTIVE_ATTENTION_FUNCTIONS.get_interface(self.implementation(hidden_states, num_keys))
        segment_ids = routing.segment_ids if routing is not None else None
        output, attn_weights = attention(
            self, hidden_states, position_embeddings, selection, cache_layer, segment_ids, value_states, **kwargs
        )
        return output, attn_weights, selection.router_logits, selection.aux


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
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        pair_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Masked reference: every expert on every token, unselected (and dropped) experts weighted 0. This is the
        # dense MLP with masked hidden units; the other back-ends compute the same function sparsely.
        weights = masked_weights(top_k_index, top_k_weights, pair_keep, self.num_experts, hidden_states.dtype)
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
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        pair_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        weights = masked_weights(top_k_index, top_k_weights, pair_keep, self.num_experts, hidden_states.dtype)
        inner = self.act_fn(torch.einsum("nh,eih->nei", hidden_states, self.up_proj)) * weights[..., None]
        return torch.einsum("nei,ehi->nh", inner, self.down_proj)


@use_experts_implementation(has_gate=False, has_bias=True)
class UoEGELUBiasExperts(nn.Module):
    """UoME experts of a ViT MLP `fc2(gelu(fc1 x + b1)) + b2`, stacked: expert e owns hidden units
    `[e*I/E, (e+1)*I/E)` with their slice of b1 (`up_proj_bias`). The output bias b2 is shared by all experts
    and added once by `UoESparseMLP`; `down_proj_bias` is a zero buffer that only exists because
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
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        pair_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        weights = masked_weights(top_k_index, top_k_weights, pair_keep, self.num_experts, hidden_states.dtype)
        inner = torch.einsum("nh,eih->nei", hidden_states, self.up_proj) + self.up_proj_bias
        inner = self.act_fn(inner) * weights[..., None]
        return torch.einsum("nei,ehi->nh", inner, self.down_proj) + weights @ self.down_proj_bias


def masked_weights(
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    pair_keep: torch.Tensor | None,
    num_experts: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """`(tokens, experts)` weights of the masked reference: each kept slot's weight, 0 elsewhere."""
    weights = top_k_weights.to(dtype)
    if pair_keep is not None:
        weights = weights * pair_keep.to(dtype)
    return dense_gates(top_k_index, weights, num_experts)


class UoESparseMLP(nn.Module):
    """Union of MLP Experts: each token (patch) selects `mlp_top_k` slices of the MLP besides the
    `num_shared_mlp_experts` shared ones (the encoder's CLS token all of them). The experts follow
    `experts_implementation`; its default `"uoe"` follows `routing_backend`.

    With `mlp_chain_length = C > 1` (Chain-of-Experts) the decoder layer calls the block C times; iteration t routes
    with its own router (`router` for t = 0, `chain_routers[t - 1]` after) through the same experts."""

    def __init__(self, config: UoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.top_k = config.mlp_top_k_at(layer_idx)  # routed experts per token (per-layer budgets)
        self.num_shared = config.num_shared_mlp_experts  # experts 0 .. num_shared - 1: every token's
        routed = config.num_mlp_experts - self.num_shared
        self.router = UoERouter(config.hidden_size, routed)
        # a separate router per further chain iteration (CoE's iteration-wise routing); none at C = 1, so the
        # parameter names of a plain layer do not change
        chain = config.mlp_chain_length
        self.chain_routers = nn.ModuleList([UoERouter(config.hidden_size, routed) for _ in range(chain - 1)])
        if config.mlp_type == "swiglu":
            self.experts = UoESwiGLUExperts(config)
        elif config.is_causal:
            self.experts = UoEGELUExperts(config)
        else:
            self.experts = UoEGELUBiasExperts(config)
        # One output bias for the whole union (one per expert would add it top_k times and break equivalence).
        self.output_bias = nn.Parameter(torch.zeros(config.hidden_size)) if config.mlp_bias else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        routing: "RoutingInputs | None" = None,
        cache: Cache | None = None,
        iteration: int = 0,
        cache_index: int | None = None,
        router_states: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns `(output, router logits, aux)`.

        The experts read `hidden_states`, the router `router_states` (default: `hidden_states`; MoEUT's peri-layernorm
        routes from the normalised stream while the experts read the residual stream). `iteration` is the
        Chain-of-Experts step (its router and its routing state in the KV cache); `cache_index`: the cache layer of
        this application of the layer (default `layer_idx`)."""
        batch_size, _, hidden_dim = hidden_states.shape
        cache_layer = block_cache_layer(cache, self.layer_idx, cache_index)
        router_input = hidden_states if router_states is None else router_states
        router = self.router if iteration == 0 else self.chain_routers[iteration - 1]
        cache_name = "mlp_router_logits" if iteration == 0 else f"mlp_router_logits_{iteration}"
        selection = select_experts(
            router, router_input, self.top_k, self.config, routing, cache_layer, cache_name, self.num_shared
        )
        outputs, start = [], 0
        for block in selection.slots:  # one block, or the encoder's CLS and its routed tokens
            length, width = block.index.shape[1:]
            tokens = hidden_states[:, start : start + length].reshape(-1, hidden_dim)
            keep = None if block.keep is None else block.keep.reshape(-1, width)
            output = self._experts(
                tokens, block.index.reshape(-1, width), block.gate.reshape(-1, width).to(hidden_states.dtype), keep
            )
            outputs.append(output.view(batch_size, length, hidden_dim))
            start += length
        output = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        if self.output_bias is not None:
            output = output + self.output_bias
        return output, selection.router_logits, selection.aux

    def _experts(self, hidden_states, top_k_index, top_k_weights, pair_keep):
        if pair_keep is None:
            return self.experts(hidden_states, top_k_index, top_k_weights)
        if self.config._experts_implementation in UOE_EXPERTS_IMPLEMENTATIONS:
            return self.experts(hidden_states, top_k_index, top_k_weights, pair_keep)
        # other back-ends compute dropped pairs with weight 0
        return self.experts(hidden_states, top_k_index, top_k_weights * pair_keep.to(top_k_weights.dtype))


class UoEDecoderLayer(GradientCheckpointingLayer):
    """`x + SMHA(norm(x))`, then `x + UoME(norm(x))` (`norm_placement="pre"`). With MoEUT's peri-layernorm
    (`"peri"`) the norms feed only the routers and the query/key projections; the value projection and the MLP
    experts read the residual stream `x` itself."""

    def __init__(self, config: UoEConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.mlp_chain_length = config.mlp_chain_length
        self.peri_norm = config.norm_placement == "peri"
        self.entropy_balance = config.router_balance_loss == "entropy"
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
        cache_index: int | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns `(hidden_states, aux)`: `aux` is `[load-balancing loss, z-loss]` summed over the layer's routed
        blocks (`None` without router losses), followed with `router_balance_loss="entropy"` by each block's averaged
        router distribution (`mean_router_distribution`), which `UoEModel` averages over the applications of
        a shared layer. `cache_index`: the cache layer of this application (default: the layer's index)."""
        normed = self.input_layernorm(hidden_states)
        attention_output, _, attention_logits, attention_aux = self.self_attn(
            normed,
            position_embeddings,
            routing,
            cache=cache,
            cache_index=cache_index,
            value_states=hidden_states if self.peri_norm else None,
            **kwargs,
        )
        hidden_states = hidden_states + attention_output

        aux = attention_aux
        distributions = []
        if aux is not None and self.entropy_balance:
            distributions.append(mean_router_distribution(attention_logits, routing.token_mask))
        # Chain-of-Experts: C residual iterations of the UoME block (one at C = 1: the plain layer), sharing the norm
        # and the experts, each routed by its own router from the stream the previous one left
        for iteration in range(self.mlp_chain_length):
            normed = self.post_attention_layernorm(hidden_states)
            mlp_output, mlp_logits, mlp_aux = self.mlp(
                hidden_states if self.peri_norm else normed,
                routing,
                cache=cache,
                iteration=iteration,
                cache_index=cache_index,
                router_states=normed if self.peri_norm else None,
            )
            hidden_states = hidden_states + mlp_output
            if aux is not None:
                aux = aux + mlp_aux
                if self.entropy_balance:
                    distributions.append(mean_router_distribution(mlp_logits, routing.token_mask))
        if aux is None:
            return hidden_states, None
        if distributions:
            aux = torch.cat([aux, *distributions])
        return hidden_states, aux


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
    # a decode step with a static cache compiles as one graph (tests/test_static_cache.py)
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(UoERouter, index=0),
        "hidden_states": OutputRecorder(UoEDecoderLayer, index=0),
        "attentions": OutputRecorder(UoESelectiveAttention, index=1),
    }
    # What `save_pretrained` writes into `auto_map` besides the saved class's own entry (transformers writes only that
    # one), so that a folder of either model of the family loads with every Auto class by remote code.
    _auto_map_entries = {
        "AutoModel": "modeling_uoe.UoEModel",
        "AutoModelForCausalLM": "modeling_uoe.UoEForCausalLM",
        "AutoModelForSequenceClassification": "modeling_uoe.UoEForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_uoe.UoEForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_uoe.UoEForQuestionAnswering",
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, UoESwiGLUExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, (UoEGELUExperts, UoEGELUBiasExperts)):
            init.normal_(module.up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
            if isinstance(module, UoEGELUBiasExperts):
                init.zeros_(module.up_proj_bias)
                init.zeros_(module.down_proj_bias)
        elif isinstance(module, UoESparseMLP) and module.output_bias is not None:
            init.zeros_(module.output_bias)
        elif isinstance(module, UoERouter):
            init.normal_(module.weight, mean=0.0, std=std)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        if self.is_remote_code():
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **self._auto_map_entries}
        super().save_pretrained(save_directory, *args, **kwargs)

    def init_parallel_plans(self) -> None:
        super().init_parallel_plans()
        # `UOE_LAYERS_TP_PLAN` names every MLP layout: keep the rules of the parameters and modules this model has
        names = {re.sub(r"\.\d+(?=\.|$)", ".*", name) for name, _ in [*self.named_modules(), *self.named_parameters()]}
        self._tp_plan = {name: style for name, style in self._tp_plan.items() if name in names}

    def set_selective_attention_implementation(self, name: str | None) -> None:
        """Select the SMHA implementation of every layer by its registered name (`"masked"`, `"gathered"`, `"triton"`
        or one added with `SelectiveAttentionInterface.register`), or `None` to let `routing_backend` decide; like
        `set_attn_implementation` for transformers' attention functions. An unknown name raises a `ValueError`."""
        if name is not None:
            ALL_SELECTIVE_ATTENTION_FUNCTIONS.get_interface(name)
        self.config.selective_attention_implementation = name

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # The default "uoe" follows `routing_backend` (gathered experts on CPU, the kernels on CUDA); an explicit
        # choice ("eager" = the masked reference, "grouped_mm", "uoe_gathered", "uoe_triton") is obeyed.
        return super().get_correct_experts_implementation("uoe" if requested_experts is None else requested_experts)


def _check_input_values(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, vocab_size: int) -> None:
    """The value checks of the inputs, in one host read (skipped under `torch.compile`).

    An out-of-range token id would otherwise be a device-side assert (or garbage) on GPUs; a non-bool attention mask
    must hold only 0 and 1 (an additive 0 / -inf mask would otherwise turn into its inverse). Both are read back
    together, so the check costs one synchronisation with the device when `input_ids` are given (as in `generate`),
    and none for `inputs_embeds` with a bool or no mask.
    """
    if torch.compiler.is_compiling():
        return
    checks = []
    if input_ids is not None and input_ids.numel() > 0:
        checks.extend(torch.aminmax(input_ids))
    check_mask = attention_mask is not None and attention_mask.dtype != torch.bool and attention_mask.numel() > 0
    if check_mask:
        checks.append(((attention_mask != 0) & (attention_mask != 1)).any())
    if not checks:
        return
    values = torch.stack([value.to(torch.long) for value in checks]).tolist()  # the one host read
    if check_mask and values.pop():
        raise ValueError(
            "`attention_mask` must be a 2-D padding mask of 0/1 (or bool) values, 1 for tokens to attend to; got other "
            f"values ({attention_mask.dtype}). An additive mask (0 / -inf) is not accepted: pass `mask == 0` instead."
        )
    if values and (values[0] < 0 or values[1] >= vocab_size):
        raise ValueError(
            f"`input_ids` must be in [0, vocab_size={vocab_size}), got values in [{values[0]}, {values[1]}]."
        )


def _padding_mask(
    attention_mask: torch.Tensor,
    cache_layer: "UoECacheLayer | UoEStaticCacheLayer | None",
    batch_size: int,
    seq_len: int,
) -> torch.Tensor:
    """The 2-D padding mask as bool, over the cache's slots: `(batch, cached + new tokens)`, or with a static cache
    `(batch, max_cache_len)` (a mask of cached + new tokens is padded to it; `generate` passes the full length, see
    `UoEForCausalLM.create_masks_for_generate`). `max_position_embeddings` is no limit (as in transformers' RoPE
    models): RoPE scaling decides what longer inputs see."""
    static = isinstance(cache_layer, UoEStaticCacheLayer)
    if attention_mask.dim() == 2 and attention_mask.shape[0] == batch_size:
        if static and attention_mask.shape[1] == cache_layer.max_cache_len:
            return attention_mask.bool()
        if torch.compiler.is_compiling() and static:
            raise ValueError(
                "With a static cache under `torch.compile`, `attention_mask` must cover the cache's "
                f"max_cache_len={cache_layer.max_cache_len} slots, got shape {tuple(attention_mask.shape)}."
            )
        # a static cache's filled length is read back from the device here (eager calls with a shorter mask only)
        cached = int(cache_layer.get_seq_length()) if cache_layer is not None else 0
        if attention_mask.shape[1] == cached + seq_len:
            mask = attention_mask.bool()
            return F.pad(mask, (0, cache_layer.max_cache_len - mask.shape[1])) if static else mask
    expected = f"({batch_size}, cached + new tokens)" + (
        f" or ({batch_size}, max_cache_len={cache_layer.max_cache_len})" if static else ""
    )
    raise ValueError(
        f"`attention_mask` must be a 2-D padding mask of shape {expected}, got {tuple(attention_mask.shape)}."
    )


class UoEModel(UoEPreTrainedModel):
    # Tensor parallelism (see "Tensor parallelism" above); transformers adds the vocabulary-sharded `embed_tokens`.
    _tp_plan = UOE_LAYERS_TP_PLAN
    _pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    def __init__(self, config: UoEConfig):
        super().__init__(config)
        config.validate("causal_lm")  # again: fields may have changed since the config was built
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        # MoEUT's layer grouping: `num_layer_groups` distinct layers, applied in turn until `num_hidden_layers`
        # applications are done (see `forward`).
        num_distinct = config.num_layer_groups or config.num_hidden_layers
        self.layers = nn.ModuleList([UoEDecoderLayer(config, layer_idx) for layer_idx in range(num_distinct)])
        self.norm = UoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = UoERotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @capture_outputs
    @renamed_cache_argument
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        compute_router_losses: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> UoEModelOutputWithPast:
        r"""
        attention_mask (`torch.Tensor` of shape `(batch_size, cached + new tokens)`, *optional*):
            Padding mask, 1 (or True) for tokens to attend to and 0 for padding; any dtype, but only these values.
        cache (`DynamicCache`, *optional*):
            KV cache with routing state from an earlier call (`past_key_values`, its older name, is deprecated).
        compute_router_losses (`bool`, *optional*):
            Whether to compute `aux_loss` and `router_z_loss` (otherwise they are `None`). Default: in training and
            with `output_router_logits`; `UoEForCausalLM` also asks for them when given `labels`.
        """
        if compute_router_losses is None:
            compute_router_losses = self.training or bool(
                kwargs.get("output_router_logits", self.config.output_router_logits)
            )
        self._check_inputs(input_ids, inputs_embeds, position_ids)
        _check_input_values(input_ids, attention_mask, self.config.vocab_size)
        if input_ids is not None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]

        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # the recomputation in backward would write the cache twice
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None:
            cache = prepare_uoe_cache(cache, self.config.num_hidden_layers, batch_size)
        first_layer = cache.layers[0] if cache is not None else None
        # the slots the new tokens take in the cache (after the cached ones); a tensor, so a static cache's decode
        # step has one graph for every length
        device = inputs_embeds.device
        query_positions = (
            first_layer.next_positions(seq_len, device)
            if first_layer is not None
            else torch.arange(seq_len, device=device)
        )
        if attention_mask is not None:
            attention_mask = _padding_mask(attention_mask, first_layer, batch_size, seq_len)
        routing, position_ids = self._routing_inputs(
            attention_mask, position_ids, cache, query_positions, inputs_embeds, compute_router_losses
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        hidden_states, layer_aux = self._run_layers(
            inputs_embeds, position_embeddings, routing, cache, use_cache=use_cache, **kwargs
        )
        hidden_states = self.norm(hidden_states)
        aux_loss, z_loss = self._router_losses(layer_aux, inputs_embeds) if compute_router_losses else (None, None)
        return UoEModelOutputWithPast(
            last_hidden_state=hidden_states,
            **{CACHE_FIELD: cache if use_cache else None},
            aux_loss=aux_loss,
            router_z_loss=z_loss,
        )

    def _check_inputs(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> None:
        """The shape checks of the token inputs (no device reads)."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of `input_ids` or `inputs_embeds`.")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"`input_ids` must be 2-D (batch, seq), got shape {tuple(input_ids.shape)}.")
        elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"`inputs_embeds` must have shape (batch, seq, hidden_size={self.config.hidden_size}), got "
                f"{tuple(inputs_embeds.shape)}."
            )
        batch_size, seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if position_ids is not None and (
            position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch_size) or position_ids.shape[1] != seq_len
        ):
            raise ValueError(
                f"`position_ids` must have shape (batch, seq) = ({batch_size}, {seq_len}) or (1, {seq_len}), got "
                f"{tuple(position_ids.shape)}."
            )

    def _routing_inputs(
        self,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: Cache | None,
        query_positions: torch.Tensor,
        inputs_embeds: torch.Tensor,
        compute_router_losses: bool,
    ) -> tuple[RoutingInputs, torch.Tensor]:
        """The routing context every layer shares, and the `(batch, seq)` position ids of the new tokens
        (`query_positions`: their slots in the cache, or `0 .. seq - 1` without one).

        Packed rows (positions restarting inside a row, no mask) get segment ids, so attention and routing patches
        stay inside each sequence; new tokens after a cache continue the row's last packed sequence. Without
        `position_ids`, positions count real tokens only, so a left-padded sequence gets the positions it has alone.
        """
        batch_size, seq_len = inputs_embeds.shape[:2]
        continues = cache is not None and cache.layers[0].has_tokens
        segment_ids = None
        if position_ids is not None and attention_mask is None and not continues:
            segment_ids = packed_segment_ids(position_ids.expand(batch_size, -1))
        elif continues:
            cached_segments = cache.layers[0].last_routing("segment_ids")
            if cached_segments is not None:
                segment_ids = cached_segments[:, None].expand(batch_size, seq_len)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0).index_select(1, query_positions)
            else:
                position_ids = query_positions[None]
        position_ids = position_ids.expand(batch_size, -1)
        source_index = None
        if self.config.routing_patch_size > 1:
            segment_starts = None
            if segment_ids is not None and not continues:
                segment_starts = torch.diff(segment_ids, prepend=segment_ids[:, :1], dim=-1) != 0
            source_index = patch_source_index(position_ids, self.config.routing_patch_size, continues, segment_starts)
        routing = RoutingInputs(
            source_index=source_index,
            token_mask=attention_mask.index_select(1, query_positions) if attention_mask is not None else None,
            segment_ids=segment_ids,
            router_losses=compute_router_losses,
        )
        return routing, position_ids

    def _run_layers(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        routing: RoutingInputs,
        cache: Cache | None,
        **kwargs,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Apply the decoder layers; return the hidden states and each distinct layer's router statistics, summed
        over its applications. Application a of distinct layer j (a grouped model applies layers 0..G-1 in turn,
        num_hidden_layers / G times) is the model's layer a * G + j: its cache slot and its place in the router
        logits and hidden states."""
        if self.config.num_layer_groups is not None and not all(
            isinstance(layer, UoEDecoderLayer) for layer in self.layers
        ):
            # a pipeline stage holds some distinct layers, but every application of a group needs all of them
            raise ValueError(
                "`num_layer_groups` (shared layers applied several times) does not support pipeline parallelism: "
                "load the model without `pp_size`."
            )
        layer_aux: list[torch.Tensor | None] = [None] * len(self.layers)
        for application in range(self.config.num_hidden_layers // len(self.layers)):
            for index, decoder_layer in enumerate(self.layers):
                cache_index = application * len(self.layers) + index
                layer_output = decoder_layer(
                    hidden_states, position_embeddings, routing, cache=cache, cache_index=cache_index, **kwargs
                )
                if isinstance(layer_output, torch.Tensor):
                    # pipeline parallelism: a placeholder passing the hidden states on for a layer another stage runs
                    hidden_states = layer_output
                    continue
                hidden_states, aux = layer_output
                if aux is not None:
                    layer_aux[index] = aux if layer_aux[index] is None else layer_aux[index] + aux
        return hidden_states, layer_aux

    def _router_losses(
        self, layer_aux: list[torch.Tensor | None], reference: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`aux_loss` and `router_z_loss` from the per-layer router statistics (see `UoEDecoderLayer.forward`).

        The z-loss and the Switch loss are averaged over every routed block of every application. The entropy loss
        (σ-MoE / MoEUT) is taken per routed block of each distinct layer from its router distribution averaged over
        the layer's applications (the same tokens each time, so the mean of the applications' means is the mean over
        all of them), and averaged over those blocks."""
        stats = [aux for aux in layer_aux if aux is not None]
        if not stats:  # no layer on this pipeline stage
            zero = reference.new_zeros((), dtype=torch.float32)
            return zero, zero
        stats = torch.stack(stats)
        real_layer = next(layer for layer in self.layers if isinstance(layer, UoEDecoderLayer))  # not a pipeline stub
        blocks_per_layer = sum(isinstance(module, UoERouter) for module in real_layer.modules())
        block_applications = blocks_per_layer * self.config.num_hidden_layers
        z_loss = stats[:, 1].sum() / block_applications
        if self.config.router_balance_loss == "switch":
            return stats[:, 0].sum() / block_applications, z_loss
        applications = self.config.num_hidden_layers // len(self.layers)
        # each layer's blocks' distributions side by side: the loss of the row is the sum of its blocks' losses
        distributions = stats[:, 2:] / applications
        return entropy_balance_loss(distributions).sum() / (blocks_per_layer * len(self.layers)), z_loss


class UoEForCausalLM(UoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: UoEConfig):
        super().__init__(config)
        self.model = UoEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @renamed_cache_argument
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
        **kwargs: Unpack[TransformersKwargs],
    ) -> UoECausalLMOutputWithPast:
        r"""
        cache (`DynamicCache`, *optional*):
            KV cache with routing state from an earlier call (`past_key_values`, its older name, is deprecated).
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Targets for language modeling (shifted inside the loss); `-100` is ignored. When given, `loss`
            is the token cross-entropy plus `router_aux_loss_coef * aux_loss + router_z_loss_coef * router_z_loss`.
        """
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        if labels is not None:
            tokens = input_ids if input_ids is not None else inputs_embeds
            if tokens is not None and labels.shape != tokens.shape[:2]:
                raise ValueError(
                    f"`labels` must have the shape of the input tokens (batch, seq) = {tuple(tokens.shape[:2])}, got "
                    f"{tuple(labels.shape)}."
                )
        outputs: UoEModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            compute_router_losses=self.training or output_router_logits or labels is not None,
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

    def create_masks_for_generate(
        self, config=None, inputs_embeds=None, attention_mask=None, cache=None, past_key_values=None, **kwargs
    ) -> torch.Tensor | None:
        """`generate`'s mask for a static cache (transformers would build a 4-D causal mask; UoE takes the 2-D
        padding mask): the `(batch, cached + new tokens)` mask padded to the cache's `max_cache_len` slots, so that
        every decode step has the same shapes and compiles once."""
        cache = cache if cache is not None else past_key_values
        if attention_mask is None or not isinstance(cache, StaticCache):
            return attention_mask
        max_cache_len = cache.layers[0].max_cache_len
        return F.pad(attention_mask.bool(), (0, max_cache_len - attention_mask.shape[-1]))

    @classmethod
    def from_dense(cls, dense_model: PreTrainedModel, **config_overrides) -> "UoEForCausalLM":
        """Build a UoE model from a transformers `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM` or
        `Qwen3ForCausalLM` by equivalent decomposition.

        Attention head groups (one key/value head with its query heads; single heads without grouped-query
        attention) become SMHA experts as they are; the MLP's hidden units are cut into `num_mlp_experts`
        consecutive slices. Routers are freshly initialised. Without overrides every expert is selected
        (`attention_top_k = num_key_value_heads`, `mlp_top_k = num_mlp_experts`) and the result computes the same
        logits as `dense_model`; pass e.g. `attention_top_k=2, mlp_top_k=2` to sparsify. A model UoE cannot
        reproduce (another architecture, a sliding window, an MLP bias, an unsupported RoPE variant, ...) raises a
        `ValueError` naming the field.
        """
        if config_overrides.get("num_layer_groups") is not None:
            raise ValueError(
                "`num_layer_groups` cannot be set by `from_dense`: every layer of the dense model has its own weights."
            )
        config = uoe_config_from_dense(dense_model.config, type(dense_model).__name__, **config_overrides)
        model = cls(config)
        state_dict = uoe_state_dict_from_dense(dense_model.state_dict(), config)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        # Only the routers (and a tied head) are new; anything else missing means the layouts disagree.
        missing = [
            name
            for name in missing
            if ".router." not in name and ".chain_routers." not in name and name != "lm_head.weight"
        ]
        if missing or unexpected:
            raise ValueError(
                f"Dense checkpoint does not match the UoE layout: missing {missing}, unexpected {unexpected}"
            )
        if config.tie_word_embeddings:
            model.tie_weights()
        return model.to(dtype=next(dense_model.parameters()).dtype)


class UoEForSequenceClassification(GenericForSequenceClassification, UoEPreTrainedModel):
    """The decoder with a linear score head on the last non-padding token (transformers' generic head, as Llama's and
    Qwen3-MoE's). Like theirs, its loss is the task loss alone: the router losses are in the outputs' `aux_loss` /
    `router_z_loss` of the base model, not added here."""

    def __init__(self, config: UoEConfig):
        UoEPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = UoEModel(config)  # not `AutoModel.from_config`: it would need remote code for a loaded config
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()


class UoEForTokenClassification(GenericForTokenClassification, UoEPreTrainedModel):
    """The decoder with a linear classifier on every token (transformers' generic head)."""

    def __init__(self, config: UoEConfig):
        UoEPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = UoEModel(config)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


class UoEForQuestionAnswering(GenericForQuestionAnswering, UoEPreTrainedModel):
    """The decoder with a span-start/end head (transformers' generic head)."""

    def __init__(self, config: UoEConfig):
        UoEPreTrainedModel.__init__(self, config)
        self.model = UoEModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()


__all__ = [
    "UoECacheLayer",
    "UoEForCausalLM",
    "UoEForQuestionAnswering",
    "UoEForSequenceClassification",
    "UoEForTokenClassification",
    "UoEModel",
    "UoEPreTrainedModel",
]
