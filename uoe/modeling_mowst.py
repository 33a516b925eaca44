"""Mowst, a mixture of weak and strong experts (Zeng et al., "Mixture of Weak & Strong Experts on Graphs",
ICLR 2024), for image classification: `MowstForImageClassification`.

- **Weak expert** (`MowstWeakExpert`): an all-MLP classifier in the style of "Scaling MLPs" (Bachmann, Anagnostidis
  & Hofmann, 2023): flattened image, linear embedding, pre-LayerNorm residual MLP blocks, LayerNorm, linear head.
- **Strong expert**: a `UoEForImageClassification`.
- **Confidence** (`MowstConfidence`): `C = g(D(p))` with p the weak expert's softmax, D its dispersion scaled to
  [0, 1] (variance or negative entropy; 1 for a one-hot p) and g a learnable non-decreasing function:
  `g(D) = sigmoid(15 tanh(s(D) / 15))`, `s(D) = b + sum_k softplus(a_k) tanh(softplus(w_k) D + c_k)`. Positive
  slopes make g monotone; the outer `15 tanh(. / 15)` keeps the logit inside (-15, 15), so 0 < C < 1 holds exactly
  even in float32.

**Training** (`model.train()`): both experts run on every image. With `config.mowst_loss="mowst"` the loss is the
paper's expected loss over the weak/strong choice,

    L = mean_i [ C_i * CE(weak_i, y_i) + (1 - C_i) * CE(strong_i, y_i) ],

so dL/dC_i = (CE(weak_i) - CE(strong_i)) / N: confidence grows where the weak expert is the better one, and the
strong expert's gradient on image i is weighted by 1 - C_i (it specialises on what the weak expert cannot do). The
weak expert receives gradient through both its cross-entropy and C. `"mowst_star"` is the paper's Mowst* variant,
the cross-entropy of the mixed prediction `C_i p_weak + (1 - C_i) p_strong`. The strong expert's router losses are
added with its own coefficients. The paper trains the two experts in alternation; here one optimizer steps all
parameters jointly.

**Inference** (`model.eval()`, the deterministic version of the paper's rule): image i takes the weak prediction if
`C_i >= confidence_threshold`, else the strong expert's. Only the images below the threshold are gathered
(`index_select`) and sent through the strong expert as one batch, and its logits are scattered back
(`index_copy`); confident images never reach it. Threshold 0 is the weak expert alone, threshold 1 the strong expert
alone (C < 1). `skip_confident=False` runs the strong expert on every image (same logits, and `strong_logits`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_mowst import MowstConfig
from .configuration_uoe import UoEConfig
from .flops import estimate_flops_per_token
from .modeling_uoe_vision import UoEForImageClassification

CONFIDENCE_LOGIT_LIMIT = 15.0  # |logit of C| < 15, so sigmoid stays strictly inside (0, 1) in float32


@dataclass
class MowstImageClassifierOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor`, with `labels`): in training (or with `skip_confident=False`) the Mowst loss of
        `config.mowst_loss` plus the strong expert's router losses; at inference the cross-entropy of `logits`.
    logits (`torch.FloatTensor` of shape `(batch, num_labels)`): the weak expert's logits where
        `confidence >= threshold`, the strong expert's elsewhere.
    weak_logits (`torch.FloatTensor` of shape `(batch, num_labels)`).
    strong_logits (`torch.FloatTensor` of shape `(batch, num_labels)`): only when the strong expert ran on every
        image (training, or `skip_confident=False`); `None` when confident images skipped it.
    confidence (`torch.FloatTensor` of shape `(batch,)`): C in (0, 1).
    strong_mask (`torch.BoolTensor` of shape `(batch,)`): the images that take the strong expert's prediction.
    aux_loss, router_z_loss (`torch.FloatTensor`): the strong expert's router losses, when it computed them.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    weak_logits: torch.FloatTensor | None = None
    strong_logits: torch.FloatTensor | None = None
    confidence: torch.FloatTensor | None = None
    strong_mask: torch.BoolTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    router_z_loss: torch.FloatTensor | None = None


class MowstMLPBlock(nn.Module):
    """`x + fc2(gelu(fc1(LayerNorm(x))))`, an inverted bottleneck of `weak_mlp_ratio * weak_hidden_size` units."""

    def __init__(self, config: MowstConfig):
        super().__init__()
        width = config.weak_hidden_size
        self.norm = nn.LayerNorm(width, eps=config.weak_layer_norm_eps)
        self.fc1 = nn.Linear(width, config.weak_mlp_ratio * width)
        self.fc2 = nn.Linear(config.weak_mlp_ratio * width, width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.fc2(F.gelu(self.fc1(self.norm(hidden_states))))


class MowstWeakExpert(nn.Module):
    """The weak expert, an all-MLP classifier (no patches): flatten, linear embedding, residual MLP blocks,
    LayerNorm, linear head."""

    def __init__(self, config: MowstConfig):
        super().__init__()
        self.in_features = config.num_channels * config.image_size**2
        self.embed = nn.Linear(self.in_features, config.weak_hidden_size)
        self.blocks = nn.ModuleList([MowstMLPBlock(config) for _ in range(config.weak_num_layers)])
        self.norm = nn.LayerNorm(config.weak_hidden_size, eps=config.weak_layer_norm_eps)
        self.head = nn.Linear(config.weak_hidden_size, config.num_labels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed(pixel_values.flatten(1))
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return self.head(self.norm(hidden_states))


def prediction_dispersion(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Dispersion of `softmax(logits)` over the last dim (K classes), scaled to [0, 1] (0: uniform, 1: one-hot):
    `"variance"`: `K^2 / (K - 1) * mean_c (p_c - 1/K)^2`; `"negative_entropy"`: `1 - H(p) / log K`."""
    num_classes = logits.shape[-1]
    if num_classes < 2:
        raise ValueError(f"`logits` must cover at least 2 classes for a dispersion, got {num_classes}.")
    log_p = F.log_softmax(logits, dim=-1)
    p = log_p.exp()
    if kind == "variance":
        return ((p - 1 / num_classes) ** 2).mean(-1) * num_classes**2 / (num_classes - 1)
    if kind == "negative_entropy":
        return 1 + (p * log_p).sum(-1) / math.log(num_classes)
    raise ValueError(f"`kind` must be 'variance' or 'negative_entropy', got {kind!r}.")


class MowstConfidence(nn.Module):
    """The weak expert's confidence `C = g(D(p))`, returned as its logit `z` (C = sigmoid(z)); see the module
    docstring for g. Parameters: `in_scale` (w), `in_bias` (c), `out_scale` (a), `out_bias` (b)."""

    def __init__(self, config: MowstConfig):
        super().__init__()
        units = config.confidence_hidden_size
        self.dispersion = config.confidence_dispersion
        self.in_scale = nn.Parameter(torch.empty(units))
        self.in_bias = nn.Parameter(torch.empty(units))
        self.out_scale = nn.Parameter(torch.empty(units))
        self.out_bias = nn.Parameter(torch.empty(()))

    def logit_from_dispersion(self, dispersion: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(F.softplus(self.in_scale) * dispersion[..., None] + self.in_bias)
        score = self.out_bias + (F.softplus(self.out_scale) * hidden).sum(-1)
        return CONFIDENCE_LOGIT_LIMIT * torch.tanh(score / CONFIDENCE_LOGIT_LIMIT)

    def forward(self, weak_logits: torch.Tensor) -> torch.Tensor:
        return self.logit_from_dispersion(prediction_dispersion(weak_logits, self.dispersion))


def mowst_loss(
    weak_logits: torch.Tensor,
    strong_logits: torch.Tensor,
    confidence_logit: torch.Tensor,
    labels: torch.Tensor,
    kind: str = "mowst",
) -> torch.Tensor:
    """Mowst's training loss, averaged over the batch. `"mowst"`: `C CE(weak) + (1 - C) CE(strong)`;
    `"mowst_star"`: `CE(C p_weak + (1 - C) p_strong)` (computed in log space). `C = sigmoid(confidence_logit)`."""
    if kind == "mowst":
        confidence = torch.sigmoid(confidence_logit)
        weak = F.cross_entropy(weak_logits, labels, reduction="none")
        strong = F.cross_entropy(strong_logits, labels, reduction="none")
        return (confidence * weak + (1 - confidence) * strong).mean()
    if kind == "mowst_star":
        log_mix = torch.logaddexp(
            F.logsigmoid(confidence_logit)[:, None] + F.log_softmax(weak_logits, dim=-1),
            F.logsigmoid(-confidence_logit)[:, None] + F.log_softmax(strong_logits, dim=-1),
        )
        return F.nll_loss(log_mix, labels)
    raise ValueError(f"`kind` must be 'mowst' or 'mowst_star', got {kind!r}.")


def weak_flops_per_image(config: MowstConfig) -> float:
    """Forward FLOPs of the weak expert per image (its matrix products; a multiply-add = 2)."""
    width, inner = config.weak_hidden_size, config.weak_mlp_ratio * config.weak_hidden_size
    in_features = config.num_channels * config.image_size**2
    return 2 * in_features * width + config.weak_num_layers * 2 * 2 * width * inner + 2 * width * config.num_labels


def strong_flops_per_image(config: UoEConfig) -> float:
    """Active forward FLOPs of a `UoEForImageClassification` per image: `uoe.estimate_flops_per_token` for the image
    tokens, the dense figure for the CLS token (it uses every head and expert), plus the patch embedding and the
    classifier."""
    patches = (config.image_size // config.patch_size) ** 2
    estimate = estimate_flops_per_token(config, patches + 1, include_lm_head=False)
    stem = 2 * config.num_channels * config.patch_size**2 * config.hidden_size * patches
    return estimate.active * patches + estimate.dense + stem + 2 * config.hidden_size * config.num_labels


class MowstPreTrainedModel(PreTrainedModel):
    config_class = MowstConfig
    config: MowstConfig
    base_model_prefix = "mowst"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["MowstWeakExpert", "UoEEncoderLayer", "UoEVisionEmbeddings"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MowstConfidence):
            units = module.in_scale.numel()
            slope = 8.0  # each unit rises over a stretch of ~1/4 of the dispersion range
            centres = (torch.arange(units, dtype=torch.float32) + 0.5) / units
            init.constant_(module.in_scale, math.log(math.expm1(slope)))  # softplus^-1(slope)
            init.copy_(module.in_bias, (-slope * centres).to(module.in_bias.dtype))
            init.constant_(module.out_scale, math.log(math.expm1(1.0)))  # softplus^-1(1)
            init.zeros_(module.out_bias)


class MowstForImageClassification(MowstPreTrainedModel):
    """Mowst: the all-MLP weak expert answers the images it is confident about; the UoE strong expert the rest."""

    def __init__(self, config: MowstConfig):
        super().__init__(config)
        self.weak = MowstWeakExpert(config)
        self.confidence = MowstConfidence(config)
        self.strong = UoEForImageClassification(config.strong_config)
        self.post_init()

    def flops_per_image(self) -> dict[str, float]:
        """Analytic forward FLOPs per image of each expert (the confidence's few dozen are left out); Mowst costs
        `weak + (share of images below the threshold) * strong`."""
        return {"weak": weak_flops_per_image(self.config), "strong": strong_flops_per_image(self.config.strong_config)}

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        if (
            not isinstance(pixel_values, torch.Tensor)
            or pixel_values.dim() != 4
            or tuple(pixel_values.shape[1:]) != expected
        ):
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"`pixel_values` must have shape (batch, {', '.join(map(str, expected))}), got {shape}.")

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        confidence_threshold: float | None = None,
        skip_confident: bool | None = None,
        output_router_logits: bool | None = None,
    ) -> MowstImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch,)`, *optional*): class indices.
        confidence_threshold (`float`, *optional*): overrides `config.confidence_threshold` (in [0, 1]).
        skip_confident (`bool`, *optional*): send only the images below the threshold through the strong expert.
            Default: at inference (`model.eval()`); in training the strong expert runs on every image, as the loss
            needs. With it, `loss` is the cross-entropy of the chosen predictions.
        """
        if pixel_values is None:
            raise ValueError("`pixel_values` is required.")
        self._check_pixel_values(pixel_values)
        threshold = self.config.confidence_threshold if confidence_threshold is None else confidence_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"`confidence_threshold` must be a number in [0, 1], got {threshold!r}.")
        if skip_confident is None:
            skip_confident = not self.training

        weak_logits = self.weak(pixel_values)
        confidence_logit = self.confidence(weak_logits)
        confidence = torch.sigmoid(confidence_logit)
        strong_mask = confidence < threshold
        strong_kwargs = {"output_router_logits": output_router_logits} if output_router_logits is not None else {}

        strong_logits, loss = None, None
        if skip_confident:
            index = strong_mask.nonzero().squeeze(1)
            logits, strong_outputs = weak_logits, None
            if index.numel() > 0:
                strong_outputs = self.strong(pixel_values=pixel_values.index_select(0, index), **strong_kwargs)
                logits = weak_logits.index_copy(0, index, strong_outputs.logits.to(weak_logits.dtype))
            if labels is not None:
                loss = F.cross_entropy(logits, labels)
        else:
            strong_outputs = self.strong(pixel_values=pixel_values, **strong_kwargs)
            strong_logits = strong_outputs.logits.to(weak_logits.dtype)
            logits = torch.where(strong_mask[:, None], strong_logits, weak_logits)
            if labels is not None:
                loss = mowst_loss(weak_logits, strong_logits, confidence_logit, labels, self.config.mowst_loss)

        aux_loss = router_z_loss = None
        if strong_outputs is not None and strong_outputs.aux_loss is not None:
            aux_loss, router_z_loss = strong_outputs.aux_loss, strong_outputs.router_z_loss
            if loss is not None:
                strong_config = self.config.strong_config
                loss = loss + strong_config.router_aux_loss_coef * aux_loss
                loss = loss + strong_config.router_z_loss_coef * router_z_loss
        return MowstImageClassifierOutput(
            loss=loss,
            logits=logits,
            weak_logits=weak_logits,
            strong_logits=strong_logits,
            confidence=confidence,
            strong_mask=strong_mask,
            aux_loss=aux_loss,
            router_z_loss=router_z_loss,
        )


__all__ = [
    "MowstConfidence",
    "MowstForImageClassification",
    "MowstImageClassifierOutput",
    "MowstPreTrainedModel",
    "MowstWeakExpert",
    "mowst_loss",
    "prediction_dispersion",
    "strong_flops_per_image",
    "weak_flops_per_image",
]
