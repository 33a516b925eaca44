"""An independent plain-loop float64 implementation of UoEForCausalLM, written from SPEC.md.

It shares no code with `uoe.modeling_uoe`: it reads the weights from a state dict and computes one
sequence token by token and head by head, so that the vectorised model can be checked against the
specification's rules (patch routed from its first token, a head group -- one key/value head with its
query heads -- is the attention expert, a query head of a selected group attends to the earlier tokens
that selected the group, RoPE at original positions, union of selected experts). Attention biases and
per-head q/k RMSNorm (`qk_norm`) are read from the state dict when present. Shared experts (the first
`num_shared_*` of a block, every token's, gate 1, not scored by the router) and Chain-of-Experts iterations
(`mlp_chain_length`: `x = x + UoME_t(norm(x))`, router t per iteration) follow SPEC-level rules as well, and so do
MoEUT's layer grouping (`num_layer_groups = G`: layer `a*G + j` applies the weights of layer j), padding
(`reference_batch_logits`: each row's real tokens run alone, at positions counted from its first real token) and every
RoPE type the config accepts (`rope_frequencies`, from the published formulas). Per-layer budgets
(`layer_attention_top_k`, `layer_mlp_top_k`: entry j is the routed top-k of distinct layer j) are read from the
config fields directly.
"""

from __future__ import annotations

import math

import torch


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _linear(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    out = x @ sd[name + ".weight"].T
    return out + sd[name + ".bias"] if name + ".bias" in sd else out


def _rope(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    half = x.shape[-1] // 2
    out = x.clone()
    for i in range(half):
        angle = position / theta ** (2 * i / x.shape[-1])
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


def rope_frequencies(cfg, seq_len: int) -> tuple[torch.Tensor, float]:
    """`(inverse frequencies (head_dim / 2,), cos/sin scale)` of the configured RoPE, in float64, for a forward pass
    whose largest position is `seq_len - 1` (dynamic NTK and LongRoPE depend on it). Pair d of a head rotates by
    `position * inv[d]`; the default is `inv[d] = theta ** (-2d / head_dim)`. Written from the methods' descriptions:

    - linear (position interpolation) and proportional (all dimensions rotated): `inv / factor`;
    - dynamic NTK: past `max_position_embeddings = L`, the base grows to `theta * (factor * seq_len / L - factor + 1)
      ** (D / (D - 2))`;
    - YaRN: pairs that turn more than `beta_fast` times over the original context `L0` keep their frequency, those
      that turn fewer than `beta_slow` times are interpolated (`/ factor`), linearly in the pair index between the two
      (bounds rounded outwards); cos and sin are scaled by `0.1 ln(factor) + 1` (or `attention_factor`);
    - Llama 3: wavelengths `2 pi / inv` above `L0 / low_freq_factor` are interpolated, those below
      `L0 / high_freq_factor` kept, those between blended by `(L0 / wavelength - low) / (high - low)`;
    - LongRoPE: `inv / long_factor` when `seq_len > L0`, else `inv / short_factor`, cos and sin scaled by
      `sqrt(1 + ln(factor) / ln(L0))` with `factor = L / L0` unless given (or `attention_factor`).
    """
    params = cfg.rope_parameters
    kind, base, dim = params.get("rope_type", "default"), params["rope_theta"], cfg.head_dim
    length = cfg.max_position_embeddings
    original = params.get("original_max_position_embeddings", length)
    pairs = torch.arange(dim // 2, dtype=torch.float64)
    inv = base ** (-2 * pairs / dim)
    scale = 1.0
    if kind in ("linear", "proportional"):
        inv = inv / params["factor"]
    elif kind == "dynamic" and seq_len > length:
        factor = params["factor"]
        grown = base * (factor * seq_len / length - factor + 1) ** (dim / (dim - 2))
        inv = grown ** (-2 * pairs / dim)
    elif kind == "yarn":
        factor = params["factor"]

        def pair_turning(turns: float) -> float:  # the pair index whose frequency turns `turns` times over L0 tokens
            return dim * math.log(original / (2 * math.pi * turns)) / (2 * math.log(base))

        low, high = pair_turning(params.get("beta_fast") or 32), pair_turning(params.get("beta_slow") or 1)
        if params.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        high = high + 0.001 if low == high else high
        interpolated = ((pairs - low) / (high - low)).clamp(0, 1)
        inv = inv * (1 - interpolated) + inv / factor * interpolated
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        if params.get("attention_factor") is not None:
            scale = params["attention_factor"]
        elif mscale and mscale_all:
            scale = (0.1 * mscale * math.log(factor) + 1) / (0.1 * mscale_all * math.log(factor) + 1)
        else:
            scale = 0.1 * math.log(factor) + 1 if factor > 1 else 1.0
    elif kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        wavelength = 2 * math.pi / inv
        blend = ((original / wavelength - low) / (high - low)).clamp(0, 1)
        blend = torch.where(wavelength > original / low, 0.0, torch.where(wavelength < original / high, 1.0, blend))
        inv = inv / factor * (1 - blend) + inv * blend
    elif kind == "longrope":
        chosen = params["long_factor"] if seq_len > original else params["short_factor"]
        inv = inv / torch.tensor(chosen, dtype=torch.float64)
        factor = params.get("factor") or length / original
        if params.get("attention_factor") is not None:
            scale = params["attention_factor"]
        else:
            scale = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
    return inv, scale


def _rotate(x: torch.Tensor, position: int, inv: torch.Tensor, scale: float) -> torch.Tensor:
    """RoPE of one head vector: pair (i, i + head_dim / 2) turned by `position * inv[i]`, times `scale`."""
    half = x.shape[-1] // 2
    cos, sin = torch.cos(position * inv), torch.sin(position * inv)
    return scale * torch.cat([x[:half] * cos - x[half:] * sin, x[half:] * cos + x[:half] * sin])


def _select(logits: torch.Tensor, top_k: int, score_func: str, gate_mode: str) -> dict[int, torch.Tensor]:
    """Each selected expert's gate, as a 0-dim tensor that carries the router's gradient."""
    scores = torch.softmax(logits, -1) if score_func == "softmax" else torch.sigmoid(logits)
    order = sorted(range(len(scores)), key=lambda e: -float(scores[e].detach()))[:top_k]
    if gate_mode == "union":  # value 1, gradient of the score (straight through)
        return {e: 1.0 + scores[e] - scores[e].detach() for e in order}
    if top_k == 1:  # Switch: the raw score (renormalised it would be the constant 1)
        return {order[0]: scores[order[0]]}
    total = sum(scores[e] for e in order)
    return {e: scores[e] / total for e in order}


def _select_with_shared(
    logits: torch.Tensor, top_k: int, num_shared: int, score_func: str, gate_mode: str
) -> dict[int, torch.Tensor]:
    """Shared experts 0..num_shared-1 with gate 1, plus the routed ones (router index e is expert num_shared + e)."""
    chosen = {num_shared + e: gate for e, gate in _select(logits, top_k, score_func, gate_mode).items()}
    return {**{e: 1.0 for e in range(num_shared)}, **chosen}


def layer_top_k(cfg, name: str, default: int, distinct_layer: int) -> int:
    """The routed top-k of distinct layer `distinct_layer`: the per-layer list's entry when the list is set."""
    values = getattr(cfg, name, None)
    return default if values is None else int(values[distinct_layer])


def reference_logits(
    model,
    input_ids: list[int],
    router_weights: dict[str, torch.Tensor] | None = None,
    rope_length: int | None = None,
) -> torch.Tensor:
    """Logits `(seq, vocab)` of one unpadded sequence, in float64.

    `router_weights` replaces the model's router weights by the given tensors (state-dict names), e.g. float64
    leaves that require grad, so that autograd through this loop gives the routers' gradients. `rope_length`: the
    largest position + 1 of the forward pass the sequence is part of (default: its own length), which dynamic NTK and
    LongRoPE read.
    """
    cfg = model.config
    sd = {k: v.detach().double().cpu() for k, v in model.state_dict().items()}
    sd.update(router_weights or {})
    heads, head_dim, patch = cfg.num_attention_heads, cfg.head_dim, cfg.routing_patch_size
    kv_heads = cfg.num_key_value_heads
    group_size = heads // kv_heads
    seq = len(input_ids)
    inv_freq, rope_scale = rope_frequencies(cfg, rope_length or seq)
    distinct_layers = getattr(cfg, "num_layer_groups", None) or cfg.num_hidden_layers
    expert_size = cfg.intermediate_size // cfg.num_mlp_experts
    act = torch.nn.functional.silu if cfg.hidden_act == "silu" else torch.nn.functional.gelu
    x = sd["model.embed_tokens.weight"][input_ids]
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer % distinct_layers}."  # layer grouping: application a of layer j is a*G + j
        attention_top_k = layer_top_k(cfg, "layer_attention_top_k", cfg.attention_top_k, layer % distinct_layers)
        mlp_top_k = layer_top_k(cfg, "layer_mlp_top_k", cfg.mlp_top_k, layer % distinct_layers)
        h = _rms_norm(x, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        # routing: every token of a patch uses the decision of the patch's first token; experts are head groups
        router = h @ sd[p + "self_attn.router.weight"].T
        shared_groups = getattr(cfg, "num_shared_attention_groups", 0)
        groups_of = [
            _select_with_shared(
                router[(t // patch) * patch], attention_top_k, shared_groups, cfg.router_score_func, cfg.gate_mode
            )
            for t in range(seq)
        ]

        q, k, v = (
            _linear(h, sd, p + f"self_attn.{name}").view(seq, count, head_dim)
            for name, count in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads))
        )
        if p + "self_attn.q_norm.weight" in sd:
            q = _rms_norm(q, sd[p + "self_attn.q_norm.weight"], cfg.rms_norm_eps)
            k = _rms_norm(k, sd[p + "self_attn.k_norm.weight"], cfg.rms_norm_eps)
        # every head vector rotated at its token's position
        q = torch.stack(
            [torch.stack([_rotate(q[t, i], t, inv_freq, rope_scale) for i in range(heads)]) for t in range(seq)]
        )
        k = torch.stack(
            [torch.stack([_rotate(k[t, i], t, inv_freq, rope_scale) for i in range(kv_heads)]) for t in range(seq)]
        )
        attn = torch.zeros(seq, heads, head_dim, dtype=torch.float64)
        for t in range(seq):
            for group, gate in groups_of[t].items():
                keys = [j for j in range(t + 1) if group in groups_of[j]]
                for head in range(group * group_size, (group + 1) * group_size):
                    scores = torch.stack([q[t, head] @ k[j, group] for j in keys]) / math.sqrt(head_dim)
                    weights = torch.softmax(scores, 0)
                    attn[t, head] = gate * sum(w * v[j, group] for w, j in zip(weights, keys, strict=True))
        x = x + attn.reshape(seq, -1) @ sd[p + "self_attn.o_proj.weight"].T
        if p + "self_attn.o_proj.bias" in sd:
            x = x + sd[p + "self_attn.o_proj.bias"]

        gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
        for step in range(getattr(cfg, "mlp_chain_length", 1)):
            h = _rms_norm(x, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
            router_name = "mlp.router.weight" if step == 0 else f"mlp.chain_routers.{step - 1}.weight"
            router = h @ sd[p + router_name].T
            mlp = torch.zeros_like(x)
            for t in range(seq):
                chosen = _select_with_shared(
                    router[(t // patch) * patch],
                    mlp_top_k,
                    getattr(cfg, "num_shared_mlp_experts", 0),
                    cfg.router_score_func,
                    cfg.gate_mode,
                )
                for expert, gate in chosen.items():
                    g, u = gate_up[expert][:expert_size] @ h[t], gate_up[expert][expert_size:] @ h[t]
                    mlp[t] += gate * (down[expert] @ (act(g) * u))
            x = x + mlp
    x = _rms_norm(x, sd["model.norm.weight"], cfg.rms_norm_eps)
    head_weight = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return x @ head_weight.T


def reference_batch_logits(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    router_weights: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits `(batch, seq, vocab)` of a padded batch, in float64: each row's real tokens (mask 1, one contiguous
    run: left or right padding) run alone through `reference_logits`, at positions 0, 1, ... from its first real
    token; padding positions are NaN. Padding thus selects nothing, is attended by nothing and moves no routing patch.
    RoPE types that depend on the length (dynamic NTK, LongRoPE) get the batch's longest sequence, as a batched forward
    pass sees it."""
    rows = [torch.nonzero(row).flatten() for row in attention_mask]
    for real in rows:
        assert len(real) == 0 or int(real[-1] - real[0]) == len(real) - 1, "real tokens must be contiguous"
    rope_length = max(len(real) for real in rows)
    out = None
    for index, real in enumerate(rows):
        logits = reference_logits(model, input_ids[index, real].tolist(), router_weights, rope_length)
        if out is None:
            out = logits.new_full((*input_ids.shape, logits.shape[-1]), float("nan"))
        out = out.index_put((torch.tensor(index), real), logits) if len(real) else out
    return out
