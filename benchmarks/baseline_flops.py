"""Analytic forward FLOPs of the models the benchmarks compare UoE with; UoE's own are `uoe.flops`.

The convention is `uoe.estimate_flops_per_token`'s: a multiply-add counts as 2 FLOPs, only matrix products and
attention count (norms, activations, softmax and RoPE are left out), and a causal model's attention averages
(L + 1) / 2 keys per query (`attention="causal"`); `attention="full"` counts all L keys, as a dense attention kernel
executes them and torch's FLOP counter counts them.
"""

from __future__ import annotations


def keys_per_query(seq_len: int, attention: str) -> float:
    if attention not in ("causal", "full"):
        raise ValueError(f"`attention` must be 'causal' or 'full', got {attention!r}.")
    return (seq_len + 1) / 2 if attention == "causal" else seq_len


def attention_flops(hidden: int, heads: int, kv_heads: int, head_dim: int, context: float) -> float:
    """Per token: the q and o projections of every query head, k and v of every key/value head, then the scores and
    weighted values over `context` keys."""
    return 2 * hidden * head_dim * (2 * heads + 2 * kv_heads) + 2 * 2 * heads * head_dim * context


def mlp_flops(hidden: int, width: int, matrices: int = 3) -> float:
    """Per token: an MLP of `matrices` hidden x `width` matrices (SwiGLU 3, GELU/ReLU 2)."""
    return matrices * 2 * hidden * width


def analytic_flops_per_token(config, seq_len: int, attention: str = "causal") -> float:
    """Active forward FLOPs per token of a language model of the comparisons, LM head included: transformers'
    Llama, Mixtral, Qwen3-MoE and DeepSeek-V3 (multi-head latent attention, keys and values expanded per token as
    transformers computes them), the MoEUT baseline of `moeut.py` and UoE (`uoe.estimate_flops_per_token`)."""
    from uoe.flops import estimate_flops_per_token  # noqa: PLC0415

    context = keys_per_query(seq_len, attention)
    hidden, layers, kind = config.hidden_size, config.num_hidden_layers, config.model_type
    if kind == "uoe":
        return estimate_flops_per_token(config, seq_len, full_attention=attention == "full").active
    if kind == "moeut_baseline":
        return moeut_flops_per_token(config, context)

    heads = config.num_attention_heads
    if kind == "deepseek_v3":
        qk_head = config.qk_nope_head_dim + config.qk_rope_head_dim
        q_rank, kv_rank, v_head = config.q_lora_rank, config.kv_lora_rank, config.v_head_dim
        query = 2 * hidden * heads * qk_head if q_rank is None else 2 * hidden * q_rank + 2 * q_rank * heads * qk_head
        key_value = 2 * hidden * (kv_rank + config.qk_rope_head_dim) + 2 * kv_rank * heads * (
            config.qk_nope_head_dim + v_head
        )
        attention_per_layer = query + key_value + 2 * heads * v_head * hidden + 2 * heads * (qk_head + v_head) * context
    else:
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        attention_per_layer = attention_flops(hidden, heads, config.num_key_value_heads, head_dim, context)

    if kind == "llama":
        mlp = [mlp_flops(hidden, config.intermediate_size)] * layers
    elif kind == "mixtral":
        routed = 2 * hidden * config.num_local_experts + config.num_experts_per_tok * mlp_flops(
            hidden, config.intermediate_size
        )
        mlp = [routed] * layers
    elif kind == "qwen3_moe":
        routed = 2 * hidden * config.num_experts + config.num_experts_per_tok * mlp_flops(
            hidden, config.moe_intermediate_size
        )
        sparse = [
            i not in config.mlp_only_layers and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0
            for i in range(layers)
        ]
        mlp = [routed if s else mlp_flops(hidden, config.intermediate_size) for s in sparse]
    elif kind == "deepseek_v3":
        experts = config.num_experts_per_tok + config.n_shared_experts
        routed = 2 * hidden * config.n_routed_experts + experts * mlp_flops(hidden, config.moe_intermediate_size)
        dense = mlp_flops(hidden, config.intermediate_size)
        mlp = [dense if i < config.first_k_dense_replace else routed for i in range(layers)]
    else:
        raise ValueError(f"no analytic FLOPs for model_type {kind!r}")
    return layers * attention_per_layer + sum(mlp) + 2 * hidden * config.vocab_size


def moeut_flops_per_token(config, context: float) -> float:
    """The MoEUT baseline (`moeut.MoEUTConfig`) per layer application: the dense q/k projections, its three routers,
    the top-k value and output experts of every head, the scores and weighted values over `context` keys, the top-k
    two-layer MLP experts; plus the LM head."""
    d, heads, head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
    query_key = 2 * 2 * d * heads * head_dim
    routers = 2 * d * (2 * heads * config.num_attention_experts + config.num_mlp_experts)
    value_output = 2 * 2 * d * head_dim * heads * config.attention_top_k
    scores = 2 * 2 * heads * head_dim * context
    mlp = config.mlp_top_k * mlp_flops(d, config.mlp_expert_size, matrices=2)
    return config.num_hidden_layers * (query_key + routers + value_output + scores + mlp) + 2 * d * config.vocab_size


def vit_flops_per_image(config) -> float:
    """transformers' `ViTForImageClassification` (a `ViTConfig`): the patch embedding, the encoder over the patches
    and CLS (full attention, GELU MLP) and the classifier on CLS."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    patches = (config.image_size // config.patch_size) ** 2
    tokens = patches + 1
    per_token = attention_flops(hidden, heads, heads, hidden // heads, tokens)
    per_token += mlp_flops(hidden, config.intermediate_size, matrices=2)
    stem = 2 * config.num_channels * config.patch_size**2 * hidden * patches + 2 * hidden * config.num_labels
    return config.num_hidden_layers * per_token * tokens + stem


def all_mlp_flops_per_image(in_features: int, width: int, depth: int, expansion: int, num_classes: int) -> float:
    """The all-MLP classifier of compare_vision.py: the linear embedding, `depth` blocks of two `expansion`x
    matrices, the linear head."""
    return 2 * in_features * width + depth * mlp_flops(width, expansion * width, matrices=2) + 2 * width * num_classes
