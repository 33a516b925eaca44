"""Analytic forward FLOPs per token of a UoE model and of its dense equivalent.

A multiply-add counts as 2 FLOPs. "Dense" is the same architecture with every expert selected (the
model `from_dense` converts); "active" counts only what the routing asks for: the selected heads'
projections and attention, the selected MLP slices, and the routers. The attention experts are head
groups (one key/value head with its query heads; one head without grouped-query attention). Attention
over a causal sequence of length L averages (L + 1) / 2 keys per query; in SMHA a query head of a selected
group sees on average the fraction `attention_top_k / num_key_value_heads` of them (the keys that selected
the same group).
With `data_capacity = c`, each expert keeps at most a fraction `c` of the patches, so its share of
tokens is `min(top_k / experts, c)`.
Shared experts (`num_shared_attention_groups`, `num_shared_mlp_experts`) take every token (share 1, data
selection does not apply to them; a query head of a shared group sees every key) and the routers score only the
routed experts, among which the `top_k` routed selections spread evenly. With `mlp_chain_length = C` the UoME
block, its router included, runs C times per layer (the dense equivalent too).
The encoder of `UoEForImageClassification` does not route its CLS token: it goes through every head's projections
and every MLP expert (`estimate_flops_per_sequence`'s `unrouted_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .configuration_uoe import UoEConfig


@dataclass
class FlopsEstimate:
    """Forward FLOPs per token (per sequence or image for the functions that say so); `breakdown` holds the active
    FLOPs of each part for the whole model, `dense_breakdown` those of its dense equivalent."""

    active: float
    dense: float
    breakdown: dict[str, float] = field(default_factory=dict)
    dense_breakdown: dict[str, float] = field(default_factory=dict)

    @property
    def active_fraction(self) -> float:
        return self.active / self.dense


def layer_flops_per_token(
    config: UoEConfig,
    seq_len: int,
    layer_idx: int,
    attention_top_k: int | None = None,
    mlp_top_k: int | None = None,
    full_attention: bool = False,
) -> dict[str, float]:
    """Active forward FLOPs per token of distinct layer `layer_idx`, all its applications together (`num_hidden_layers
    / num_layer_groups` with MoEUT's grouping, else one), by part: `attention_projections`, `attention_scores`,
    `mlp`, `routers`.

    `attention_top_k` / `mlp_top_k` replace the layer's own routed top-k (`config.attention_top_k_at(layer_idx)`,
    `config.mlp_top_k_at(layer_idx)`): what the layer would cost with another budget. At full routing (top-k = the
    routed experts) the attention and MLP parts are the dense layer's. `estimate_flops_per_token` is the sum of these
    over the distinct layers plus the LM head.
    """
    _check_seq_len(seq_len)
    return _layer_parts(config, seq_len, layer_idx, attention_top_k, mlp_top_k, full_attention, dense=False)


def _check_seq_len(seq_len) -> None:
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"`seq_len` must be an integer >= 1, got {seq_len!r}.")


def _layer_parts(
    config: UoEConfig,
    seq_len: int,
    layer_idx: int,
    attention_top_k: int | None,
    mlp_top_k: int | None,
    full_attention: bool,
    dense: bool,
) -> dict[str, float]:
    """`layer_flops_per_token`; `dense=True`: the dense equivalent (every expert, no data selection, no routers)."""
    hidden, heads, head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
    kv_heads = config.num_key_value_heads
    distinct = config.num_layer_groups or config.num_hidden_layers
    applications = config.num_hidden_layers // distinct
    context = (seq_len + 1) / 2 if config.is_causal and not full_attention else seq_len

    shared_groups, shared_experts = config.num_shared_attention_groups, config.num_shared_mlp_experts
    routed_groups, routed_experts = kv_heads - shared_groups, config.num_mlp_experts - shared_experts
    attention_top_k = config.attention_top_k_at(layer_idx) if attention_top_k is None else attention_top_k
    mlp_top_k = config.mlp_top_k_at(layer_idx) if mlp_top_k is None else mlp_top_k
    if dense:
        attention_top_k, mlp_top_k = routed_groups, routed_experts
    checks = (("attention_top_k", attention_top_k, routed_groups), ("mlp_top_k", mlp_top_k, routed_experts))
    for name, value, routed in checks:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= routed:
            raise ValueError(f"`{name}` must be an integer in [1, {routed}] (the routed experts), got {value!r}.")
    chain = config.mlp_chain_length
    # the share of tokens one routed expert computes
    routed_head_share = attention_top_k / routed_groups
    routed_mlp_share = mlp_top_k / routed_experts
    if config.data_capacity is not None and not dense:
        routed_head_share = min(routed_head_share, config.data_capacity)
        routed_mlp_share = min(routed_mlp_share, config.data_capacity)
    head_share = (shared_groups + routed_groups * routed_head_share) / kv_heads
    # a query head of a shared group meets every key; one of a routed group the keys that chose the group too
    score_share = (shared_groups + routed_groups * routed_head_share**2) / kv_heads
    mlp_share = (shared_experts + routed_experts * routed_mlp_share) / config.num_mlp_experts

    projections = 2 * 2 * hidden * (heads + kv_heads) * head_dim  # q and o per query head, k and v per kv head
    attention = 2 * 2 * heads * head_dim * context  # scores and weighted values
    mlp_matrices = 3 if config.mlp_type == "swiglu" else 2
    mlp = mlp_matrices * 2 * hidden * config.intermediate_size
    routers = 2 * hidden * (routed_groups + chain * routed_experts)
    return {
        "attention_projections": applications * projections * head_share,
        # a query head of group g meets only the keys that also chose g
        "attention_scores": applications * attention * score_share,
        "mlp": applications * chain * mlp * mlp_share,
        "routers": 0.0 if dense else applications * routers,
    }


def estimate_flops_per_token(
    config: UoEConfig, seq_len: int, include_lm_head: bool = True, full_attention: bool = False
) -> FlopsEstimate:
    """Active and dense-equivalent forward FLOPs per token for `config` at sequence length `seq_len`.

    Per-layer budgets (`layer_attention_top_k`, `layer_mlp_top_k`) are counted layer by layer
    (`layer_flops_per_token`). `full_attention=True` counts every query against all `seq_len` keys, as a dense
    attention kernel executes a causal mask (and torch's FLOP counter counts it), instead of the causal average.
    """
    _check_seq_len(seq_len)
    lm_head = 2 * config.hidden_size * config.vocab_size if include_lm_head else 0
    parts = ("attention_projections", "attention_scores", "mlp", "routers")
    breakdown = dict.fromkeys(parts, 0.0)
    dense_breakdown = dict.fromkeys(parts, 0.0)
    for layer_idx in range(config.num_layer_groups or config.num_hidden_layers):
        active = _layer_parts(config, seq_len, layer_idx, None, None, full_attention, dense=False)
        full = _layer_parts(config, seq_len, layer_idx, None, None, full_attention, dense=True)
        for part in parts:
            breakdown[part] += active[part]
            dense_breakdown[part] += full[part]
    breakdown["lm_head"] = dense_breakdown["lm_head"] = lm_head
    return FlopsEstimate(
        active=sum(breakdown.values()),
        dense=sum(dense_breakdown.values()),
        breakdown=breakdown,
        dense_breakdown=dense_breakdown,
    )


def estimate_flops_per_sequence(config: UoEConfig, seq_len: int, unrouted_tokens: int = 0) -> FlopsEstimate:
    """Forward FLOPs of one sequence of `seq_len` tokens through the layers (no LM head), of which `unrouted_tokens`
    go through every head's projections and every MLP expert (the CLS token of UoE's encoder layers); their
    attention scores are counted as a routed token's."""
    if not isinstance(unrouted_tokens, int) or not 0 <= unrouted_tokens <= seq_len:
        raise ValueError(f"`unrouted_tokens` must be an integer in [0, seq_len={seq_len}], got {unrouted_tokens!r}.")
    token = estimate_flops_per_token(config, seq_len, include_lm_head=False)
    breakdown = {part: flops * seq_len for part, flops in token.breakdown.items()}
    for part in ("attention_projections", "mlp"):
        breakdown[part] += unrouted_tokens * (token.dense_breakdown[part] - token.breakdown[part])
    dense_breakdown = {part: flops * seq_len for part, flops in token.dense_breakdown.items()}
    return FlopsEstimate(
        active=sum(breakdown.values()),
        dense=token.dense * seq_len,
        breakdown=breakdown,
        dense_breakdown=dense_breakdown,
    )


def estimate_flops_per_image(config: UoEConfig) -> FlopsEstimate:
    """Forward FLOPs of one image through `UoEForImageClassification`: the patch embedding, the encoder over the
    patches and the unrouted CLS token, and the classifier on CLS."""
    patches = (config.image_size // config.patch_size) ** 2
    encoder = estimate_flops_per_sequence(config, patches + 1, unrouted_tokens=1)
    stem = {
        "patch_embedding": 2 * config.num_channels * config.patch_size**2 * config.hidden_size * patches,
        "classifier": 2 * config.hidden_size * config.num_labels,
    }
    breakdown, dense_breakdown = {**encoder.breakdown, **stem}, {**encoder.dense_breakdown, **stem}
    dense = encoder.dense + sum(stem.values())
    return FlopsEstimate(
        active=sum(breakdown.values()), dense=dense, breakdown=breakdown, dense_breakdown=dense_breakdown
    )
