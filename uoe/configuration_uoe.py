"""Configuration of Union-of-Experts (UoE) transformers."""

import math
import warnings
from typing import Any, NamedTuple

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_outputs import MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

GATE_MODES = ("union", "weighted")
MLP_TYPES = ("swiglu", "gelu")
ROUTER_SCORE_FUNCS = ("softmax", "sigmoid")
NORM_TYPES = ("rmsnorm", "layernorm")
POSITION_EMBEDDING_TYPES = ("rope", "learned")
ROUTING_BACKENDS = ("auto", "gathered", "masked", "triton")
ROUTER_BALANCE_LOSSES = ("switch", "entropy")
NORM_PLACEMENTS = ("pre", "peri")
# Name used before the gathered path existed (uoe 0.1): the masked reference.
_LEGACY_ROUTING_BACKENDS = {"reference": "masked"}
# transformers 5.24 renamed the KV cache argument and output field `past_key_values` to `cache`; earlier 5.x
# releases pass and read `past_key_values`. The models accept both names and fill whichever field exists.
CACHE_FIELD = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


class Recipe(NamedTuple):
    """A named choice of UoE's components (`UoEConfig.from_recipe`); the sizes stay the caller's."""

    summary: str
    fields: dict[str, Any]
    # each distinct layer is applied this many times: `num_layer_groups = num_hidden_layers / layer_repeats`
    layer_repeats: int = 1


# The fields a recipe decides; a recipe sets every one of them (the others keep their defaults or the caller's values).
RECIPE_FIELDS = (
    "gate_mode",
    "router_score_func",
    "router_balance_loss",
    "norm_placement",
    "num_layer_groups",
    "num_shared_attention_groups",
    "num_shared_mlp_experts",
    "mlp_chain_length",
)
_PAPER_FIELDS = {
    "gate_mode": "union",
    "router_score_func": "softmax",
    "router_balance_loss": "switch",
    "norm_placement": "pre",
    "num_layer_groups": None,
    "num_shared_attention_groups": 0,
    "num_shared_mlp_experts": 0,
    "mlp_chain_length": 1,
}
# README "Recipes" gives the evidence for each; `benchmarks/recipe_study.py` is the study that decides between them.
RECIPES: dict[str, Recipe] = {
    "paper": Recipe(
        "the paper's configuration and UoEConfig's defaults: union gates, softmax router scores, Switch balance loss, "
        "pre-norm, every layer its own weights, no shared experts, no chain",
        dict(_PAPER_FIELDS),
    ),
    "weighted": Recipe(
        "the paper's configuration with weighted gates (top-k scores renormalised, Mixtral style): the better UoE of "
        "the LM comparison at 1.02M tokens",
        {**_PAPER_FIELDS, "gate_mode": "weighted"},
    ),
    "weighted_peri": Recipe(
        "weighted gates and peri-layernorm (only the routers and the query/key projections read the normalised "
        "stream), the rest the paper's: the best UoE arm of the recipe study's ablation at its middle FLOP level, and "
        "the main job's default",
        {**_PAPER_FIELDS, "gate_mode": "weighted", "norm_placement": "peri"},
    ),
    "moeut_style": Recipe(
        "weighted gates, entropy balance loss, peri-layernorm and layers shared two by two (MoEUT's design): the best "
        "UoE of the frontier sweep at 368k tokens; in the recipe study's ablation the entropy loss and the sharing "
        "add nothing to `weighted_peri`",
        {**_PAPER_FIELDS, "gate_mode": "weighted", "router_balance_loss": "entropy", "norm_placement": "peri"},
        layer_repeats=2,
    ),
}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_positive_int(name: str, value) -> None:
    _require(
        _is_int(value) and value >= 1,
        f"`{name}` must be an integer >= 1, got {value!r}.",
    )


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def _is_number(value) -> bool:
    # `True` is an int to Python, but a boolean given for a number is a mistake, not 1
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(name: str, value, low: float, high: float | None = None, high_inclusive: bool = True) -> None:
    """`value` is a finite number (not a bool) in `[low, high]` (`[low, high)` without `high_inclusive`)."""
    if high is None:
        allowed, in_range = f">= {low}", _is_number(value) and value >= low
    else:
        allowed = f"in [{low}, {high}{']' if high_inclusive else ')'}"
        in_range = _is_number(value) and low <= value and (value <= high if high_inclusive else value < high)
    _require(in_range, f"`{name}` must be a finite number {allowed}, got {value!r}.")


def _check_rope_parameters(rope_parameters) -> None:
    # transformers' own validation only warns about an unknown type; the rotary embedding would fail to build
    _require(isinstance(rope_parameters, dict), f"`rope_parameters` must be a dict, got {rope_parameters!r}.")
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    allowed = ["default", *sorted(ROPE_INIT_FUNCTIONS)]
    _require(rope_type in allowed, f"`rope_parameters['rope_type']` must be one of {allowed}, got {rope_type!r}.")
    # the rotary embedding rotates every dimension of a head
    factor = rope_parameters.get("partial_rotary_factor", 1.0)
    _require(
        factor == 1.0,
        f"`rope_parameters['partial_rotary_factor']` must be 1.0 (UoE rotates whole heads), got {factor!r}.",
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_sizes(config: "UoEConfig") -> None:
    """Counts and widths: positive integers that divide as the decomposition needs."""
    for name in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "attention_top_k",
        "intermediate_size",
        "num_mlp_experts",
        "mlp_top_k",
        "routing_patch_size",
        "max_position_embeddings",
        "patch_size",
        "num_channels",
        "mlp_chain_length",
    ):
        _check_positive_int(name, getattr(config, name))
    if config.head_dim is None:
        _require(
            False,
            f"`hidden_size` ({config.hidden_size}) must be divisible by `num_attention_heads` "
            f"({config.num_attention_heads}) when `head_dim` is not given.",
        )
    _check_positive_int("head_dim", config.head_dim)
    _check_positive_int("num_key_value_heads", config.num_key_value_heads)
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    _require(heads % groups == 0, f"`num_key_value_heads` must divide `num_attention_heads` ({heads}), got {groups}.")
    _require(
        config.attention_top_k <= groups,
        f"`attention_top_k` counts head groups and must be in [1, num_key_value_heads={groups}], got "
        f"{config.attention_top_k}.",
    )
    _require(
        config.mlp_top_k <= config.num_mlp_experts,
        f"`mlp_top_k` must be in [1, num_mlp_experts={config.num_mlp_experts}], got {config.mlp_top_k}.",
    )
    _require(
        config.intermediate_size % config.num_mlp_experts == 0,
        f"`intermediate_size` ({config.intermediate_size}) must be divisible by `num_mlp_experts` "
        f"({config.num_mlp_experts}).",
    )
    if config.image_size is not None:
        _check_positive_int("image_size", config.image_size)
        _require(
            config.image_size % config.patch_size == 0,
            f"`image_size` ({config.image_size}) must be divisible by `patch_size` ({config.patch_size}).",
        )
    if config.position_embedding_type == "rope":
        # rotate_half pairs dimension i with i + head_dim / 2
        _require(
            config.head_dim % 2 == 0,
            f"`head_dim` must be even with rotary position embeddings, got {config.head_dim}.",
        )
    if config.pad_token_id is not None:
        _require(
            _is_int(config.pad_token_id) and 0 <= config.pad_token_id < config.vocab_size,
            f"`pad_token_id` must be None or a token id in [0, vocab_size={config.vocab_size}), got "
            f"{config.pad_token_id!r}.",
        )


def _validate_choices(config: "UoEConfig") -> None:
    """Fields that take one of a few names."""
    for name, allowed in (
        ("mlp_type", MLP_TYPES),
        ("gate_mode", GATE_MODES),
        ("router_score_func", ROUTER_SCORE_FUNCS),
        ("norm_type", NORM_TYPES),
        ("position_embedding_type", POSITION_EMBEDDING_TYPES),
        ("routing_backend", ROUTING_BACKENDS),
        ("router_balance_loss", ROUTER_BALANCE_LOSSES),
        ("norm_placement", NORM_PLACEMENTS),
    ):
        _check_choice(name, getattr(config, name), allowed)
    _require(
        config.hidden_act in ACT2FN,
        f"`hidden_act` must be one of transformers' activations {sorted(ACT2FN)}, got {config.hidden_act!r}.",
    )
    # the registry of implementations lives with the models, which check the name when they are built
    name = config.selective_attention_implementation
    _require(
        name is None or isinstance(name, str),
        f"`selective_attention_implementation` must be None or the name of a registered SMHA implementation, got "
        f"{name!r}.",
    )
    if config.position_embedding_type == "rope":
        # after transformers has standardised it (legacy `rope_scaling` / `rope_theta` keywords included)
        _check_rope_parameters(config.rope_parameters)


def _validate_numbers(config: "UoEConfig") -> None:
    """Coefficients, epsilons, rates and the data-selection capacity."""
    for name in ("router_aux_loss_coef", "router_z_loss_coef", "rms_norm_eps", "layer_norm_eps", "initializer_range"):
        _check_number(name, getattr(config, name), 0)
    _check_number("attention_dropout", config.attention_dropout, 0, 1, high_inclusive=False)
    if config.data_capacity is not None:
        _require(
            _is_number(config.data_capacity) and 0.0 < config.data_capacity <= 1.0,
            f"`data_capacity` must be None or a number in (0, 1], got {config.data_capacity!r}.",
        )
        _require(
            not config.is_causal,
            "`data_capacity` (patch-wise data selection) chooses patches across the whole sequence, so it "
            "would let a token's output depend on later tokens: it is only allowed with `is_causal=False`.",
        )
    _require(
        not (config.routing_backend == "triton" and config.attention_dropout > 0),
        f'`routing_backend="triton"` needs `attention_dropout=0` (the selective-attention kernels have no '
        f'dropout), got {config.attention_dropout!r}; use `routing_backend="auto"` or `"gathered"`.',
    )


def _validate_layer_top_k(config: "UoEConfig") -> None:
    """Per-layer top-k (`layer_attention_top_k`, `layer_mlp_top_k`): one entry per distinct layer, each a routed count
    that fits beside the block's shared experts."""
    layers = config.num_layer_groups or config.num_hidden_layers
    which = "`num_layer_groups`" if config.num_layer_groups else "`num_hidden_layers`"
    for name, total, shared_name in (
        ("layer_attention_top_k", config.num_key_value_heads, "num_shared_attention_groups"),
        ("layer_mlp_top_k", config.num_mlp_experts, "num_shared_mlp_experts"),
    ):
        values = getattr(config, name)
        if values is None:
            continue
        routed = total - getattr(config, shared_name)
        _require(
            isinstance(values, list) and len(values) == layers,
            f"`{name}` must be None or a list of {layers} integers (one per layer: {which}), got {values!r}.",
        )
        for index, value in enumerate(values):
            _require(
                _is_int(value) and 1 <= value <= routed,
                f"`{name}[{index}]` must be an integer in [1, {routed}] (the routed experts of the block: {total} "
                f"minus `{shared_name}`), got {value!r}.",
            )


def _validate_variants(config: "UoEConfig") -> None:
    """Shared experts, Chain-of-Experts and MoEUT's layer grouping."""
    if config.num_layer_groups is not None:
        _check_positive_int("num_layer_groups", config.num_layer_groups)
        _require(
            config.num_hidden_layers % config.num_layer_groups == 0,
            f"`num_layer_groups` must divide `num_hidden_layers` ({config.num_hidden_layers}), got "
            f"{config.num_layer_groups}.",
        )
    # the shared experts come first and are not routed
    for name, total, top_k_name in (
        ("num_shared_attention_groups", config.num_key_value_heads, "attention_top_k"),
        ("num_shared_mlp_experts", config.num_mlp_experts, "mlp_top_k"),
    ):
        value, top_k = getattr(config, name), getattr(config, top_k_name)
        _require(_is_int(value) and value >= 0, f"`{name}` must be an integer >= 0, got {value!r}.")
        _require(
            value + top_k <= total,
            f"`{name}` + `{top_k_name}` must be at most {total} (the experts of the block: routed ones are chosen "
            f"among the non-shared), got {value} + {top_k}; `{name}` is at most {total - 1}.",
        )


# What each model needs of the config beyond valid values: `{model: {field: (required value, why)}}`.
MODEL_REQUIREMENTS = {
    "causal_lm": {
        "is_causal": (True, "the causal RMSNorm/RoPE decoder (the bidirectional encoder is UoEForImageClassification)"),
        "mlp_bias": (False, "the causal RMSNorm/RoPE decoder"),
        "norm_type": ("rmsnorm", "the causal RMSNorm/RoPE decoder"),
        "position_embedding_type": ("rope", "the causal RMSNorm/RoPE decoder"),
    },
    "vision": {
        "is_causal": (False, "UoE vision models are bidirectional encoders"),
        "mlp_type": ("gelu", "UoE vision models use GELU MLP experts"),
        "num_layer_groups": (None, "MoEUT's layer grouping is a causal-LM option"),
        "mlp_chain_length": (1, "Chain-of-Experts is a causal-LM option"),
    },
}


def _validate_model_requirements(config: "UoEConfig", model: str) -> None:
    for name, (required, why) in MODEL_REQUIREMENTS[model].items():
        value = getattr(config, name)
        _require(value == required, f"`{name}` must be {required!r} for this model ({why}), got {value!r}.")
    if model != "vision":
        return
    _require(config.image_size is not None, "`image_size` must be set in the config of a UoE vision model.")
    num_tokens = (config.image_size // config.patch_size) ** 2
    _require(
        num_tokens % config.routing_patch_size == 0,
        f"`routing_patch_size` ({config.routing_patch_size}) must divide the number of image tokens "
        f"((image_size / patch_size)^2 = {num_tokens}).",
    )
    _require(
        config.position_embedding_type != "rope" or config.max_position_embeddings >= num_tokens + 1,
        f"`max_position_embeddings` ({config.max_position_embeddings}) must be >= the number of tokens "
        f"including CLS ({num_tokens + 1}) for rotary positions.",
    )


class UoEConfig(PreTrainedConfig):
    r"""
    Configuration of a Union-of-Experts transformer (Yang, Lian & Li, 2025).

    Every attention head is an expert of Selective Multi-Head Attention (SMHA) and the MLP is split by
    equivalent decomposition into `num_mlp_experts` slices (UoME). With grouped-query attention the attention expert
    is a head group (one key/value head with its query heads). With `attention_top_k == num_key_value_heads`,
    `mlp_top_k == num_mlp_experts` and `gate_mode="union"` a UoE layer computes exactly the dense layer.

    Args:
        vocab_size: Size of the token vocabulary.
        hidden_size: Width of the residual stream.
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Number of query heads.
        num_key_value_heads: Number of key/value heads (grouped-query attention); must divide
            `num_attention_heads`, defaults to it (multi-head attention). The SMHA expert is one key/value head
            with its `num_attention_heads // num_key_value_heads` query heads (a group of one head without GQA).
        head_dim: Width of one head; defaults to `hidden_size // num_attention_heads`.
        attention_top_k: Head groups (SMHA experts) selected per routing patch, in `[1, num_key_value_heads]`; with
            `num_shared_attention_groups` it counts the routed groups, besides the shared ones.
        intermediate_size: Width of the dense MLP that UoME decomposes.
        num_mlp_experts: Number of MLP slices; must divide `intermediate_size`.
        mlp_top_k: MLP experts selected per routing patch, in `[1, num_mlp_experts]` (routed ones, besides
            `num_shared_mlp_experts`).
        mlp_type: `"swiglu"` (gated, like Llama) or `"gelu"` (plain two-layer MLP, like ViT).
        hidden_act: Activation of the MLP; defaults to `"silu"` for SwiGLU and `"gelu"` for GELU.
        mlp_bias: Whether the MLP projections have biases (the input bias is split per expert, the
            output bias is shared, which keeps the decomposition exact).
        attention_bias: Whether the q/k/v/o projections have biases.
        qk_norm: RMSNorm of every query and key head over `head_dim` before RoPE (Qwen3 style).
        routing_patch_size: Number of consecutive tokens that share one routing decision.
        data_capacity: Patch-wise data selection (expert choice): each expert keeps at most
            `ceil(data_capacity * num_patches)` of the patches that chose it. Only for bidirectional
            models; `None` disables it.
        gate_mode: `"union"` adds the selected experts with weight exactly 1 and passes the router gradient
            straight through; `"weighted"` multiplies by the top-k scores renormalised to sum to 1 (Mixtral
            style) or, at top-1, by the selected expert's raw score (Switch style, so the router is trained).
        router_score_func: `"softmax"` or `"sigmoid"` router scores.
        router_aux_loss_coef: Weight of the Switch-style load-balancing loss added to `loss`.
        router_z_loss_coef: Weight of the router z-loss added to `loss`.
        is_causal: Causal (decoder) or bidirectional (encoder) attention and routing.
        max_position_embeddings: Context length the model is trained for. As in transformers' RoPE models it is
            no hard limit for the causal LM (longer inputs run); RoPE scaling types read it as the original length.
            Image models with learned position embeddings need one per token.
        rope_parameters: RoPE settings (`{"rope_type": "default", "rope_theta": 10000.0}`); the scaling types of
            transformers' `ROPE_INIT_FUNCTIONS` work too, e.g. `{"rope_type": "linear", "factor": 2.0}`,
            `"dynamic"` (changes nothing up to `max_position_embeddings`) or `"yarn"`. Legacy `rope_theta=` and
            `rope_scaling=` keywords are accepted.
        rms_norm_eps: Epsilon of the RMSNorm layers.
        initializer_range: Standard deviation of the normal weight initialisation.
        attention_dropout: Dropout on attention probabilities.
        use_cache: Whether the model returns a KV cache by default.
        tie_word_embeddings: Tie the LM head to the input embeddings.
        output_router_logits: Return the routers' logits (one entry per routed block).
        norm_type: `"rmsnorm"` (Llama style) or `"layernorm"` (ViT style, with bias).
        layer_norm_eps: Epsilon of the LayerNorm layers when `norm_type="layernorm"`.
        position_embedding_type: `"rope"` (rotary, at the tokens' original positions) or `"learned"`
            (absolute position embeddings, ViT style; image models only).
        image_size: Side of the (square) input image in pixels; image models only.
        patch_size: Side of one image patch (= one token) in pixels; must divide `image_size`.
        num_channels: Channels of the input images.
        routing_backend: Who computes the routed blocks (all compute the same function).
            `"masked"`: the readable reference: every head and MLP expert on every token, unselected ones
            multiplied by 0 (dense cost). `"gathered"`: PyTorch ops on any device; only the selected (token,
            expert) pairs are gathered and computed (grouped products, attention over each head's compacted
            tokens). `"triton"`: the Triton kernels for SMHA attention and the UoME experts (CUDA, or CPU under
            `TRITON_INTERPRET=1`); a forward where they cannot run raises an error. `"auto"` (default): the kernels
            on CUDA tensors when Triton is installed, the gathered path everywhere else (and for attention with
            dropout while training: the kernels have no dropout). An explicitly chosen `experts_implementation`
            (e.g. `"eager"` or `"grouped_mm"`) decides the UoME experts whatever the backend.
        selective_attention_implementation: The SMHA implementation by its registered name (`"masked"`,
            `"gathered"`, `"triton"`, or one added with `uoe.SelectiveAttentionInterface.register`), the way
            `attn_implementation` names transformers' attention functions; `None` (default): the one `routing_backend`
            picks. It decides SMHA only (the UoME experts follow `routing_backend` / `experts_implementation`).
        num_shared_attention_groups: Shared attention experts: head groups `0 .. N-1` are used by every token with
            gate exactly 1 (in both gate modes); no router scores them and the router losses ignore them. The
            SMHA router scores only the `num_key_value_heads - N` routed groups, of which each token (patch) selects
            `attention_top_k`, so `N + attention_top_k <= num_key_value_heads`. Padding selects no group (not even
            the shared ones); the encoder's data selection (`data_capacity`) limits only the routed groups.
        num_shared_mlp_experts: Shared MLP experts, likewise: experts `0 .. N-1` on every token, `mlp_top_k` routed
            experts among the other `num_mlp_experts - N`; `N + mlp_top_k <= num_mlp_experts`.
        mlp_chain_length: Chain-of-Experts (Wang et al., 2025) for UoME: the MLP sub-block runs this many times in
            sequence inside each layer, `x = x + UoME_t(post_attention_layernorm(x))` for `t = 0 .. C-1`. The
            experts and the norm are shared by the iterations; each iteration has its own router (`mlp.router` for
            the first, `mlp.chain_routers[t - 1]` for the others), its own selection and its own router losses.
            `1` (default) is the plain layer.
        num_layer_groups: MoEUT's layer grouping (Csordás et al., 2024), causal LM only: `G` distinct decoder layers
            (`model.layers.0` ... `model.layers.{G-1}`) applied in sequence `num_hidden_layers / G` times (MoEUT's `group_size` is G) with shared
            weights (layers 0..G-1, then 0..G-1 again, ...). Every application keeps its own KV-cache layer (slot
            `a * G + j` for application `a` of layer `j`) and router logits. `None` (default): every layer has its
            own weights.
        router_balance_loss: `"switch"` (default): the Switch-Transformer loss `E * sum_e f_e P_e` of every routed
            block. `"entropy"`: σ-MoE's entropy regulariser, the negative entropy of the router's softmax averaged
            over the batch's non-padding tokens (and, with `num_layer_groups`, over all applications of a shared
            layer). Either is `aux_loss`, averaged over the routed blocks and weighted by `router_aux_loss_coef`.
        norm_placement: `"pre"` (default): pre-norm, every block reads the normalised stream. `"peri"`: MoEUT's
            peri-layernorm (decoder and image encoder alike): only the routers and the query/key projections read
            the normalised stream; the value projection and the MLP experts read the residual stream itself.
        layer_attention_top_k: Per-layer budgets: `attention_top_k` of each layer, a list with one entry per layer
            (per distinct layer with `num_layer_groups`), each in `[1, num_key_value_heads -
            num_shared_attention_groups]`. `None` (default): `attention_top_k` in every layer. `uoe.sparsify` can
            choose the entries under one active-FLOPs budget; `uoe.estimate_flops_per_token` counts them.
        layer_mlp_top_k: The same for `mlp_top_k`: one entry per (distinct) layer, each in `[1, num_mlp_experts -
            num_shared_mlp_experts]`; `None`: `mlp_top_k` everywhere.
    """

    model_type = "uoe"
    keys_to_ignore_at_inference = [CACHE_FIELD, "aux_loss", "router_z_loss"]

    vocab_size: int = 32000
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    attention_top_k: int = 4
    intermediate_size: int = 2048
    num_mlp_experts: int = 4
    mlp_top_k: int = 2
    mlp_type: str = "swiglu"
    hidden_act: str | None = None
    mlp_bias: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    routing_patch_size: int = 1
    data_capacity: float | None = None
    gate_mode: str = "union"
    router_score_func: str = "softmax"
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    is_causal: bool = True
    max_position_embeddings: int = 2048
    rope_parameters: dict | None = None
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    use_cache: bool = True
    tie_word_embeddings: bool = False
    output_router_logits: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    norm_type: str = "rmsnorm"
    layer_norm_eps: float = 1e-12
    position_embedding_type: str = "rope"
    image_size: int | None = None
    patch_size: int = 16
    num_channels: int = 3
    routing_backend: str = "auto"
    selective_attention_implementation: str | None = None
    num_shared_attention_groups: int = 0
    num_shared_mlp_experts: int = 0
    mlp_chain_length: int = 1
    num_layer_groups: int | None = None
    router_balance_loss: str = "switch"
    norm_placement: str = "pre"
    layer_attention_top_k: list[int] | None = None
    layer_mlp_top_k: list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.routing_backend in _LEGACY_ROUTING_BACKENDS:
            replacement = _LEGACY_ROUTING_BACKENDS[self.routing_backend]
            warnings.warn(
                f'`routing_backend="{self.routing_backend}"` is now called "{replacement}"; using "{replacement}".',
                FutureWarning,
                stacklevel=3,
            )
            self.routing_backend = replacement
        if self.head_dim is None and _is_int(self.hidden_size) and _is_int(self.num_attention_heads):
            if self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads == 0:
                self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_act is None:
            self.hidden_act = "silu" if self.mlp_type == "swiglu" else "gelu"
        for name in ("layer_attention_top_k", "layer_mlp_top_k"):
            if isinstance(getattr(self, name), tuple):  # JSON and the validation know lists
                setattr(self, name, list(getattr(self, name)))
        super().__post_init__(**kwargs)
        self.validate()

    @classmethod
    def from_recipe(cls, recipe: str, **overrides) -> "UoEConfig":
        """A config with the components of a named recipe (`RECIPES`: `"paper"`, `"weighted"`, `"moeut_style"`) and
        the sizes and any other fields of `overrides`, which win over the recipe's fields.

        A recipe that shares layers (`moeut_style`: each distinct layer applied twice) sets `num_layer_groups` to
        `num_hidden_layers / 2`; that needs an even `num_hidden_layers`, unless `num_layer_groups` is given.
        """
        _check_choice("recipe", recipe, tuple(RECIPES))
        chosen = RECIPES[recipe]
        fields = dict(chosen.fields)
        if chosen.layer_repeats > 1 and "num_layer_groups" not in overrides:
            layers = overrides.get("num_hidden_layers", cls.num_hidden_layers)
            _require(
                _is_int(layers) and layers >= chosen.layer_repeats and layers % chosen.layer_repeats == 0,
                f"`num_hidden_layers` must be a multiple of {chosen.layer_repeats} for recipe {recipe!r} (each "
                f"distinct layer is applied {chosen.layer_repeats} times), got {layers!r}; or give `num_layer_groups`.",
            )
            fields["num_layer_groups"] = layers // chosen.layer_repeats
        return cls(**{**fields, **overrides})

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        # transformers applies `from_pretrained`'s overrides (`attention_top_k=...`) after building the config
        result = super().from_dict(config_dict, **kwargs)
        (result[0] if isinstance(result, tuple) else result).validate()
        return result

    def validate(self, model: str | None = None) -> None:
        """Check every field; raise a `ValueError` naming the first invalid one and the values it allows.

        The config calls it when it is built, every UoE model again when it is built from a config (with `model`,
        `"causal_lm"` or `"vision"`, for the fields that model needs), and `save_pretrained` before writing, so a
        value changed after construction (`from_pretrained(..., attention_top_k=...)`, `config.x = ...`) is checked
        too."""
        _validate_sizes(self)
        _validate_choices(self)
        _validate_numbers(self)
        _validate_variants(self)
        _validate_layer_top_k(self)
        if model is not None:
            _check_choice("model", model, tuple(MODEL_REQUIREMENTS))
            _validate_model_requirements(self, model)
        parent_validate = getattr(super(), "validate", None)  # transformers' own checks (RoPE, token ids, ...)
        if parent_validate is not None:
            try:
                parent_validate()
            except Exception as error:  # huggingface_hub's StrictDataclassClassValidationError is no ValueError
                if isinstance(error, ValueError) or type(error).__name__ != "StrictDataclassClassValidationError":
                    raise
                raise ValueError(str(error.__cause__ or error)) from error

    @property
    def mlp_expert_size(self) -> int:
        """Width of one UoME expert (its slice of `intermediate_size`)."""
        return self.intermediate_size // self.num_mlp_experts

    def attention_top_k_at(self, layer_idx: int) -> int:
        """Routed head groups each token selects in distinct layer `layer_idx` (`layer_attention_top_k`'s entry, else
        `attention_top_k`). With `num_layer_groups` the index counts the distinct (shared) layers."""
        return self._top_k_at("layer_attention_top_k", self.attention_top_k, layer_idx)

    def mlp_top_k_at(self, layer_idx: int) -> int:
        """Routed MLP experts each token selects in distinct layer `layer_idx` (`layer_mlp_top_k`'s entry, else
        `mlp_top_k`)."""
        return self._top_k_at("layer_mlp_top_k", self.mlp_top_k, layer_idx)

    def _top_k_at(self, name: str, default: int, layer_idx: int) -> int:
        layers = self.num_layer_groups or self.num_hidden_layers
        _require(
            _is_int(layer_idx) and 0 <= layer_idx < layers,
            f"`layer_idx` must be an integer in [0, {layers}) (the distinct layers), got {layer_idx!r}.",
        )
        values = getattr(self, name)
        return default if values is None else values[layer_idx]

    @property
    def is_full_routing(self) -> bool:
        """True when the model computes the dense function: every expert selected for every token, each with
        weight 1. `gate_mode="weighted"` scales experts by their renormalised scores, which is 1 only when a block
        has a single expert."""
        routed_groups = self.num_key_value_heads - self.num_shared_attention_groups
        routed_experts = self.num_mlp_experts - self.num_shared_mlp_experts
        layers = range(self.num_layer_groups or self.num_hidden_layers)
        every_expert = (
            all(self.attention_top_k_at(i) == routed_groups for i in layers)
            and all(self.mlp_top_k_at(i) == routed_experts for i in layers)
            and self.data_capacity is None
        )
        # shared experts have gate 1 in both modes; a single routed expert's softmax score is 1 too
        unit_gates = self.gate_mode == "union" or (routed_groups == 1 and routed_experts == 1)
        # a chain of C > 1 UoME iterations is a different function from the dense layer
        return every_expert and unit_gates and self.mlp_chain_length == 1


__all__ = ["RECIPES", "RECIPE_FIELDS", "Recipe", "UoEConfig"]
