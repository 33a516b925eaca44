"""PyTorch Union-of-Experts vision encoder: `UoEVisionModel` and `UoEForImageClassification`.

A ViT-style encoder (Conv2d patch embedding, CLS token, learned or rotary positions, pre-norm layers) whose
attention is Selective Multi-Head Attention and whose MLP is a Union of GELU MLP experts with biases: the
causal LM's `UoESelectiveAttention` and `UoESparseMLP`, bidirectional (`is_causal=False`). Routing is
hierarchical and per image (never across the batch):

1. image tokens are grouped into routing patches of `routing_patch_size` consecutive tokens, each routed from
   the mean of its tokens; every patch selects `attention_top_k` heads and `mlp_top_k` MLP experts;
2. with `data_capacity = c`, every expert (head or MLP slice) then keeps at most `ceil(c * num_patches)` of the
   patches of the image that chose it, by router score, and only those are computed (expert-choice layout).

The CLS token is not routed: every head and every MLP expert always processes it (it is what the classifier
reads, and it costs one token of dense compute per image). At full routing the model is exactly a ViT.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, ImageClassifierOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import can_return_tuple

from .configuration_uoe import UoEConfig
from .conversion_vit import uoe_config_from_vit, uoe_state_dict_from_vit
from .modeling_uoe import (
    UOE_LAYERS_TP_PLAN,
    RoutingInputs,
    UoEGELUBiasExperts,
    UoEPreTrainedModel,
    UoERMSNorm,
    UoERotaryEmbedding,
    UoESelectiveAttention,
    UoESparseMLP,
)

# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class UoEVisionModelOutput(BaseModelOutput):
    r"""
    aux_loss (`torch.FloatTensor`, returned in training and with `output_router_logits=True`):
        Switch load-balancing loss, averaged over the routed blocks (SMHA and UoME of every layer).
    router_z_loss (`torch.FloatTensor`, returned like `aux_loss`):
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
    aux_loss (`torch.FloatTensor`, returned in training, with `labels` and with `output_router_logits=True`):
        Switch load-balancing loss (added to `loss` with `config.router_aux_loss_coef`).
    router_z_loss (`torch.FloatTensor`, returned like `aux_loss`):
        Router z-loss (added to `loss` with `config.router_z_loss_coef`).
    router_logits (`tuple(torch.FloatTensor)`, returned with `output_router_logits=True`):
        One `(batch, num_routing_patches, experts)` tensor per routed block.
    """

    aux_loss: torch.FloatTensor | None = None
    router_z_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------------


class UoEVisionEmbeddings(nn.Module):
    """Conv2d patch embedding, CLS token and (for `position_embedding_type="learned"`) absolute positions."""

    def __init__(self, config: UoEConfig):
        super().__init__()
        self.config = config
        self.grid_side = config.image_size // config.patch_size
        self.num_patches = self.grid_side**2
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        if config.position_embedding_type == "learned":
            self.position_embeddings = nn.Parameter(torch.zeros(1, self.num_patches + 1, config.hidden_size))
        else:
            self.position_embeddings = None

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        embeddings = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        grid = embeddings.shape[-2:]
        embeddings = embeddings.flatten(2).transpose(1, 2)  # (batch, patches, hidden), row-major patches
        cls = self.cls_token.expand(embeddings.shape[0], -1, -1)
        embeddings = torch.cat([cls, embeddings], dim=1)
        if self.position_embeddings is not None:
            positions = self.position_embeddings
            if interpolate_pos_encoding and tuple(grid) != (self.grid_side, self.grid_side):
                positions = self.interpolate_pos_encoding(grid)
            embeddings = embeddings + positions
        return embeddings

    def interpolate_pos_encoding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The learned positions resized to a `grid` of patches (ViT's `interpolate_pos_encoding`: the trained square
        grid of patch positions, bicubically resampled; the CLS position as it is), `(1, 1 + rows * cols, hidden)`."""
        side = self.grid_side
        cls_position, patch_positions = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
        square = patch_positions.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, hidden, side, side)
        resized = F.interpolate(square.float(), size=tuple(grid), mode="bicubic", align_corners=False)
        resized = resized.to(patch_positions.dtype).permute(0, 2, 3, 1).reshape(1, -1, patch_positions.shape[-1])
        return torch.cat([cls_position, resized], dim=1)


def _make_norm(config: UoEConfig) -> nn.Module:
    if config.norm_type == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    return UoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class UoEEncoderLayer(GradientCheckpointingLayer):
    """Bidirectional UoE layer: x + SMHA(norm(x)), then x + UoME(norm(x)) (`norm_placement="pre"`). With MoEUT's
    peri-layernorm (`"peri"`) the norms feed only the routers and the query/key projections, as in the decoder; the
    value projection and the MLP experts read the residual stream `x`."""

    def __init__(self, config: UoEConfig, layer_idx: int):
        super().__init__()
        self.peri_norm = config.norm_placement == "peri"
        self.input_layernorm = _make_norm(config)
        self.self_attn = UoESelectiveAttention(config, layer_idx)
        self.post_attention_layernorm = _make_norm(config)
        self.mlp = UoESparseMLP(config, layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        routing: RoutingInputs | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        residual = hidden_states if self.peri_norm else None
        attn_out, attn_weights, attn_logits, attn_aux = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, routing, value_states=residual
        )
        hidden_states = hidden_states + attn_out
        normed = self.post_attention_layernorm(hidden_states)
        mlp_out, mlp_logits, mlp_aux = self.mlp(
            hidden_states if self.peri_norm else normed, routing, router_states=normed if self.peri_norm else None
        )
        hidden_states = hidden_states + mlp_out
        aux = None if attn_aux is None else attn_aux + mlp_aux
        return hidden_states, attn_weights, (attn_logits, mlp_logits), aux


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


class UoEVisionPreTrainedModel(UoEPreTrainedModel):
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["UoEEncoderLayer", "UoEVisionEmbeddings"]
    _can_record_outputs = None
    _auto_map_entries = {
        "AutoModel": "modeling_uoe_vision.UoEVisionModel",
        "AutoModelForImageClassification": "modeling_uoe_vision.UoEForImageClassification",
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, UoEVisionEmbeddings):
            init.trunc_normal_(module.cls_token, mean=0.0, std=std)
            if module.position_embeddings is not None:
                init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)


class UoEVisionModel(UoEVisionPreTrainedModel):
    """The bidirectional UoE encoder; returns the final-norm hidden states of CLS + image tokens."""

    _tp_plan = UOE_LAYERS_TP_PLAN  # heads and expert slices per rank; embeddings, norms and routers replicated

    def __init__(self, config: UoEConfig):
        super().__init__(config)
        config.validate("vision")  # again: fields may have changed since the config was built
        self.embeddings = UoEVisionEmbeddings(config)
        self.layers = nn.ModuleList([UoEEncoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = _make_norm(config)
        self.rotary_emb = UoERotaryEmbedding(config) if config.position_embedding_type == "rope" else None
        self.gradient_checkpointing = False
        self.post_init()

    def _check_pixel_values(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> None:
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
        if interpolate_pos_encoding:
            num_tokens = (height // config.patch_size) * (width // config.patch_size)
            if num_tokens % config.routing_patch_size:
                raise ValueError(
                    f"`pixel_values` of {height}x{width} give {num_tokens} image tokens, which `routing_patch_size`="
                    f"{config.routing_patch_size} must divide."
                )
        elif (height, width) != (config.image_size, config.image_size):
            raise ValueError(
                f"`pixel_values` must be {config.image_size}x{config.image_size} (`image_size`), got {height}x{width}; "
                "pass `interpolate_pos_encoding=True` for other sizes."
            )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        compute_router_losses: bool | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> UoEVisionModelOutput:
        r"""
        compute_router_losses (`bool`, *optional*):
            Whether to compute `aux_loss` and `router_z_loss` (otherwise they are `None`). Default: in training and
            with `output_router_logits`; `UoEForImageClassification` also asks for them when given `labels`.
        interpolate_pos_encoding (`bool`, *optional*, defaults to `False`):
            Accept images of another size than `image_size` (sides divisible by `patch_size`), as ViT does: learned
            positions are resized bicubically to the new grid of patches; rotary positions are the tokens' indices.
        """
        self._check_pixel_values(pixel_values, interpolate_pos_encoding)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        if compute_router_losses is None:
            compute_router_losses = self.training or bool(output_router_logits)
        # Images are routed per patch, never padded or packed: the routing context only says whether to compute the
        # router losses (as in transformers' MoE models, only when asked, so outputs hold per-example fields only).
        routing = RoutingInputs(source_index=None, token_mask=None, router_losses=compute_router_losses)
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding)
        position_embeddings = None
        if self.rotary_emb is not None:
            # CLS at position 0, image tokens at 1..N in row-major order (1-D rotary over the token index).
            position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None]
            position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        all_hidden, all_attn, all_logits = [], [], []
        aux_total = hidden_states.new_zeros(2, dtype=torch.float32) if compute_router_losses else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, attn_weights, logits, aux = layer(hidden_states, position_embeddings, routing)
            if aux_total is not None:
                aux_total = aux_total + aux
            all_attn.append(attn_weights)
            all_logits.extend(logits)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        aux_mean = [None, None] if aux_total is None else aux_total / (2 * self.config.num_hidden_layers)
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
        interpolate_pos_encoding: bool = False,
    ) -> UoEImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices (or regression targets, per `config.problem_type`). When given, `loss` is the
            classification loss plus `router_aux_loss_coef * aux_loss + router_z_loss_coef * router_z_loss`.
        interpolate_pos_encoding (`bool`, *optional*, defaults to `False`):
            Accept images of another size than `image_size` (see `UoEVisionModel.forward`).
        """
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        outputs: UoEVisionModelOutput = self.model(
            pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            output_router_logits=output_router_logits,
            compute_router_losses=self.training or bool(output_router_logits) or labels is not None,
            interpolate_pos_encoding=interpolate_pos_encoding,
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
    def from_dense(cls, dense_model: PreTrainedModel, **config_overrides) -> "UoEForImageClassification":
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


__all__ = [
    "UoEForImageClassification",
    "UoEGELUBiasExperts",
    "UoEImageClassifierOutput",
    "UoEVisionModel",
    "UoEVisionPreTrainedModel",
]
