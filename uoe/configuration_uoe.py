"""Configuration of Union-of-Experts (UoE) transformers."""

import math
import warnings

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


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_positive_int(name: str, value) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
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
            peri-layernorm (causal LM only): only the routers and the query/key projections read the normalised
            stream; the value projection and the MLP experts read the residual stream itself.
    """

    model_type = "uoe"
    keys_to_ignore_at_inference = [CACHE_FIELD, "aux_loss", "router_z_loss"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        attention_top_k: int = 4,
        intermediate_size: int = 2048,
        num_mlp_experts: int = 4,
        mlp_top_k: int = 2,
        mlp_type: str = "swiglu",
        hidden_act: str | None = None,
        mlp_bias: bool = False,
        attention_bias: bool = False,
        qk_norm: bool = False,
        routing_patch_size: int = 1,
        data_capacity: float | None = None,
        gate_mode: str = "union",
        router_score_func: str = "softmax",
        router_aux_loss_coef: float = 0.01,
        router_z_loss_coef: float = 0.0,
        is_causal: bool = True,
        max_position_embeddings: int = 2048,
        rope_parameters: dict | None = None,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        attention_dropout: float = 0.0,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        output_router_logits: bool = False,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        norm_type: str = "rmsnorm",
        layer_norm_eps: float = 1e-12,
        position_embedding_type: str = "rope",
        image_size: int | None = None,
        patch_size: int = 16,
        num_channels: int = 3,
        routing_backend: str = "auto",
        num_shared_attention_groups: int = 0,
        num_shared_mlp_experts: int = 0,
        mlp_chain_length: int = 1,
        num_layer_groups: int | None = None,
        router_balance_loss: str = "switch",
        norm_placement: str = "pre",
        **kwargs,
    ):
        for name, value in (
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_attention_heads", num_attention_heads),
            ("attention_top_k", attention_top_k),
            ("intermediate_size", intermediate_size),
            ("num_mlp_experts", num_mlp_experts),
            ("mlp_top_k", mlp_top_k),
            ("routing_patch_size", routing_patch_size),
            ("max_position_embeddings", max_position_embeddings),
        ):
            _check_positive_int(name, value)
        if head_dim is None:
            _require(
                hidden_size % num_attention_heads == 0,
                f"`hidden_size` ({hidden_size}) must be divisible by `num_attention_heads` "
                f"({num_attention_heads}) when `head_dim` is not given.",
            )
            head_dim = hidden_size // num_attention_heads
        _check_positive_int("head_dim", head_dim)
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        _check_positive_int("num_key_value_heads", num_key_value_heads)
        _require(
            num_attention_heads % num_key_value_heads == 0,
            f"`num_key_value_heads` must divide `num_attention_heads` ({num_attention_heads}), got "
            f"{num_key_value_heads}.",
        )
        _require(
            attention_top_k <= num_key_value_heads,
            f"`attention_top_k` counts head groups and must be in [1, num_key_value_heads={num_key_value_heads}], "
            f"got {attention_top_k}.",
        )
        _require(
            mlp_top_k <= num_mlp_experts,
            f"`mlp_top_k` must be in [1, num_mlp_experts={num_mlp_experts}], got {mlp_top_k}.",
        )
        _require(
            intermediate_size % num_mlp_experts == 0,
            f"`intermediate_size` ({intermediate_size}) must be divisible by `num_mlp_experts` ({num_mlp_experts}).",
        )
        _check_choice("mlp_type", mlp_type, MLP_TYPES)
        _check_choice("gate_mode", gate_mode, GATE_MODES)
        _check_choice("router_score_func", router_score_func, ROUTER_SCORE_FUNCS)
        _check_choice("norm_type", norm_type, NORM_TYPES)
        _check_choice("position_embedding_type", position_embedding_type, POSITION_EMBEDDING_TYPES)
        if routing_backend in _LEGACY_ROUTING_BACKENDS:
            replacement = _LEGACY_ROUTING_BACKENDS[routing_backend]
            warnings.warn(
                f'`routing_backend="{routing_backend}"` is now called "{replacement}"; using "{replacement}".',
                FutureWarning,
                stacklevel=2,
            )
            routing_backend = replacement
        _check_choice("routing_backend", routing_backend, ROUTING_BACKENDS)
        _check_positive_int("patch_size", patch_size)
        _check_positive_int("num_channels", num_channels)
        if image_size is not None:
            _check_positive_int("image_size", image_size)
            _require(
                image_size % patch_size == 0,
                f"`image_size` ({image_size}) must be divisible by `patch_size` ({patch_size}).",
            )
        if data_capacity is not None:
            _require(
                isinstance(data_capacity, (int, float))
                and not isinstance(data_capacity, bool)
                and 0.0 < data_capacity <= 1.0,
                f"`data_capacity` must be None or a number in (0, 1], got {data_capacity!r}.",
            )
            _require(
                not is_causal,
                "`data_capacity` (patch-wise data selection) chooses patches across the whole sequence, so it "
                "would let a token's output depend on later tokens: it is only allowed with `is_causal=False`.",
            )
        for name, value in (
            ("router_aux_loss_coef", router_aux_loss_coef),
            ("router_z_loss_coef", router_z_loss_coef),
            ("rms_norm_eps", rms_norm_eps),
            ("layer_norm_eps", layer_norm_eps),
            ("initializer_range", initializer_range),
        ):
            _check_number(name, value, 0)
        _check_number("attention_dropout", attention_dropout, 0, 1, high_inclusive=False)
        if hidden_act is not None:
            _require(
                isinstance(hidden_act, str) and hidden_act in ACT2FN,
                f"`hidden_act` must be one of transformers' activations {sorted(ACT2FN)}, got {hidden_act!r}.",
            )
        if pad_token_id is not None:
            _require(
                isinstance(pad_token_id, int) and not isinstance(pad_token_id, bool) and 0 <= pad_token_id < vocab_size,
                f"`pad_token_id` must be None or a token id in [0, vocab_size={vocab_size}), got {pad_token_id!r}.",
            )
        if position_embedding_type == "rope":
            # rotate_half pairs dimension i with i + head_dim / 2
            _require(head_dim % 2 == 0, f"`head_dim` must be even with rotary position embeddings, got {head_dim}.")
        _require(
            not (routing_backend == "triton" and attention_dropout > 0),
            f'`routing_backend="triton"` needs `attention_dropout=0` (the selective-attention kernels have no '
            f'dropout), got {attention_dropout!r}; use `routing_backend="auto"` or `"gathered"`.',
        )
        # MoEUT options: layer grouping, entropy balance loss, peri-layernorm
        if num_layer_groups is not None:
            _check_positive_int("num_layer_groups", num_layer_groups)
            _require(
                num_hidden_layers % num_layer_groups == 0,
                f"`num_layer_groups` must divide `num_hidden_layers` ({num_hidden_layers}), got {num_layer_groups}.",
            )
        _check_choice("router_balance_loss", router_balance_loss, ROUTER_BALANCE_LOSSES)
        _check_choice("norm_placement", norm_placement, NORM_PLACEMENTS)

        # Shared experts and Chain-of-Experts (issue 15): the shared experts come first and are not routed.
        for name, value, total, top_k, top_k_name in (
            (
                "num_shared_attention_groups",
                num_shared_attention_groups,
                num_key_value_heads,
                attention_top_k,
                "attention_top_k",
            ),
            ("num_shared_mlp_experts", num_shared_mlp_experts, num_mlp_experts, mlp_top_k, "mlp_top_k"),
        ):
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                f"`{name}` must be an integer >= 0, got {value!r}.",
            )
            _require(
                value + top_k <= total,
                f"`{name}` + `{top_k_name}` must be at most {total} (the experts of the block: routed ones are chosen "
                f"among the non-shared), got {value} + {top_k}; `{name}` is at most {total - 1}.",
            )
        _check_positive_int("mlp_chain_length", mlp_chain_length)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.attention_top_k = attention_top_k
        self.intermediate_size = intermediate_size
        self.num_mlp_experts = num_mlp_experts
        self.mlp_top_k = mlp_top_k
        self.mlp_type = mlp_type
        self.hidden_act = hidden_act or ("silu" if mlp_type == "swiglu" else "gelu")
        self.mlp_bias = mlp_bias
        self.attention_bias = attention_bias
        self.qk_norm = qk_norm
        self.routing_patch_size = routing_patch_size
        self.data_capacity = data_capacity
        self.gate_mode = gate_mode
        self.router_score_func = router_score_func
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.is_causal = is_causal
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = rope_parameters
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.attention_dropout = attention_dropout
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.output_router_logits = output_router_logits
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.position_embedding_type = position_embedding_type
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.routing_backend = routing_backend
        self.num_shared_attention_groups = num_shared_attention_groups
        self.num_shared_mlp_experts = num_shared_mlp_experts
        self.mlp_chain_length = mlp_chain_length
        self.num_layer_groups = num_layer_groups
        self.router_balance_loss = router_balance_loss
        self.norm_placement = norm_placement
        super().__init__(**kwargs)
        if position_embedding_type == "rope":
            # after transformers has standardised it (legacy `rope_scaling` / `rope_theta` keywords included)
            _check_rope_parameters(self.rope_parameters)

    @property
    def mlp_expert_size(self) -> int:
        """Width of one UoME expert (its slice of `intermediate_size`)."""
        return self.intermediate_size // self.num_mlp_experts

    @property
    def is_full_routing(self) -> bool:
        """True when the model computes the dense function: every expert selected for every token, each with
        weight 1. `gate_mode="weighted"` scales experts by their renormalised scores, which is 1 only when a block
        has a single expert."""
        routed_groups = self.num_key_value_heads - self.num_shared_attention_groups
        routed_experts = self.num_mlp_experts - self.num_shared_mlp_experts
        every_expert = (
            self.attention_top_k == routed_groups and self.mlp_top_k == routed_experts and self.data_capacity is None
        )
        # shared experts have gate 1 in both modes; a single routed expert's softmax score is 1 too
        unit_gates = self.gate_mode == "union" or (routed_groups == 1 and routed_experts == 1)
        # a chain of C > 1 UoME iterations is a different function from the dense layer
        return every_expert and unit_gates and self.mlp_chain_length == 1


__all__ = ["UoEConfig"]
