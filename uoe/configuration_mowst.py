"""Configuration of Mowst (mixture of weak and strong experts; Zeng et al., ICLR 2024) for image classification:
an all-MLP weak expert, a `UoEForImageClassification` strong expert, and the weak expert's learnable confidence."""

from transformers import PretrainedConfig

from .configuration_uoe import UoEConfig

CONFIDENCE_DISPERSIONS = ("variance", "negative_entropy")
MOWST_LOSSES = ("mowst", "mowst_star")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def default_strong_config(**overrides) -> UoEConfig:
    """A small UoE image classifier for 28x28 grey images (Fashion-MNIST): 7x7 patches, width 96, 4 layers, 2 of 4
    heads, 2 of 4 GELU experts with biases, routing patches of one image row."""
    values = dict(
        hidden_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        attention_top_k=2,
        intermediate_size=192,
        num_mlp_experts=4,
        mlp_top_k=2,
        mlp_type="gelu",
        mlp_bias=True,
        attention_bias=True,
        routing_patch_size=4,
        is_causal=False,
        norm_type="layernorm",
        layer_norm_eps=1e-6,
        position_embedding_type="learned",
        image_size=28,
        patch_size=7,
        num_channels=1,
        max_position_embeddings=17,
        use_cache=False,
        num_labels=10,
    )
    values.update(overrides)
    return UoEConfig(**values)


class MowstConfig(PretrainedConfig):
    r"""Configuration of `MowstForImageClassification`.

    The strong expert is a `UoEForImageClassification` of `strong_config`, which also fixes the images
    (`image_size`, `num_channels`) and the classes (`num_labels`). The weak expert is an all-MLP classifier in the
    style of "Scaling MLPs" (Bachmann et al., 2023): the flattened image, a linear embedding to `weak_hidden_size`,
    `weak_num_layers` pre-LayerNorm residual blocks `x + W2 gelu(W1 LN(x))` of width
    `weak_mlp_ratio * weak_hidden_size`, a final LayerNorm and a linear head.

    Args:
        strong_config (`UoEConfig` or `dict`, *optional*): the strong expert (default: `default_strong_config()` with
            this config's `num_labels` when given); must be a bidirectional (`is_causal=False`) image config.
        weak_hidden_size (`int`, 128), weak_num_layers (`int`, 4), weak_mlp_ratio (`int`, 4),
        weak_layer_norm_eps (`float`, 1e-5): the weak expert.
        confidence_dispersion (`str`, `"variance"`): the dispersion D of the weak expert's softmax p over K classes,
            scaled to [0, 1] (1 = one-hot): `"variance"` `K^2 / (K - 1) * mean_c (p_c - 1/K)^2`, or
            `"negative_entropy"` `1 - H(p) / log K`.
        confidence_hidden_size (`int`, 4): units of the learnable monotone function g with C = g(D).
        confidence_threshold (`float`, 0.5): inference: an image whose confidence C >= threshold takes the weak
            expert's prediction, the others run the strong expert (0: the weak expert alone; 1: the strong expert
            alone, since C < 1 always).
        mowst_loss (`str`, `"mowst"`): `"mowst"`, the expected loss `C * CE(weak) + (1 - C) * CE(strong)`, or
            `"mowst_star"`, the loss of the mixed prediction `CE(C * p_weak + (1 - C) * p_strong)`.
        initializer_range (`float`, 0.02): std of the weak expert's initial weights.
    """

    model_type = "uoe_mowst"

    def __init__(
        self,
        strong_config: UoEConfig | dict | None = None,
        weak_hidden_size: int = 128,
        weak_num_layers: int = 4,
        weak_mlp_ratio: int = 4,
        weak_layer_norm_eps: float = 1e-5,
        confidence_dispersion: str = "variance",
        confidence_hidden_size: int = 4,
        confidence_threshold: float = 0.5,
        mowst_loss: str = "mowst",
        initializer_range: float = 0.02,
        **kwargs,
    ):
        if strong_config is None:
            labels = kwargs.get("num_labels") or (len(kwargs["id2label"]) if kwargs.get("id2label") else None)
            strong_config = default_strong_config(**({"num_labels": labels} if labels else {}))
        elif isinstance(strong_config, dict):
            strong_config = UoEConfig.from_dict(strong_config)
        _require(
            isinstance(strong_config, UoEConfig),
            f"`strong_config` must be a UoEConfig, a dict of one, or None, got {type(strong_config).__name__}.",
        )
        _require(
            not strong_config.is_causal and strong_config.image_size is not None,
            "`strong_config` must describe a UoE image classifier (`is_causal=False` and `image_size` set).",
        )
        for name, value in (
            ("weak_hidden_size", weak_hidden_size),
            ("weak_num_layers", weak_num_layers),
            ("weak_mlp_ratio", weak_mlp_ratio),
            ("confidence_hidden_size", confidence_hidden_size),
        ):
            _require(_is_positive_int(value), f"`{name}` must be a positive integer, got {value!r}.")
        for name, value in (("weak_layer_norm_eps", weak_layer_norm_eps), ("initializer_range", initializer_range)):
            _require(
                isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                f"`{name}` must be a number > 0, got {value!r}.",
            )
        _require(
            confidence_dispersion in CONFIDENCE_DISPERSIONS,
            f"`confidence_dispersion` must be one of {list(CONFIDENCE_DISPERSIONS)}, got {confidence_dispersion!r}.",
        )
        _require(mowst_loss in MOWST_LOSSES, f"`mowst_loss` must be one of {list(MOWST_LOSSES)}, got {mowst_loss!r}.")
        _require(
            isinstance(confidence_threshold, (int, float))
            and not isinstance(confidence_threshold, bool)
            and 0.0 <= confidence_threshold <= 1.0,
            f"`confidence_threshold` must be a number in [0, 1], got {confidence_threshold!r}.",
        )
        self.strong_config = strong_config
        self.weak_hidden_size = weak_hidden_size
        self.weak_num_layers = weak_num_layers
        self.weak_mlp_ratio = weak_mlp_ratio
        self.weak_layer_norm_eps = weak_layer_norm_eps
        self.confidence_dispersion = confidence_dispersion
        self.confidence_hidden_size = confidence_hidden_size
        self.confidence_threshold = float(confidence_threshold)
        self.mowst_loss = mowst_loss
        self.initializer_range = initializer_range
        if "num_labels" not in kwargs and "id2label" not in kwargs:
            kwargs["id2label"] = dict(strong_config.id2label)
        super().__init__(**kwargs)
        _require(
            self.num_labels == strong_config.num_labels,
            f"`num_labels` ({self.num_labels}) must equal `strong_config.num_labels` ({strong_config.num_labels}).",
        )

    @property
    def image_size(self) -> int:
        return self.strong_config.image_size

    @property
    def num_channels(self) -> int:
        return self.strong_config.num_channels


__all__ = ["MowstConfig"]
