"""An independent plain-loop float64 implementation of the bidirectional UoE encoder, written from SPEC.md.

It shares no code with `uoe`: it reads the weights from a state dict and computes one sequence (CLS first) token by
token, head group by head group and expert by expert. The rules it follows:

- a routing patch is `routing_patch_size` consecutive tokens after CLS, routed from the mean of its tokens' normed
  states; it selects its `top_k` routed experts by score (the first `num_shared_*` experts of a block are every token's,
  gate 1, never scored);
- patch-wise data selection (`data_capacity = c`): each routed expert keeps, among the patches that selected it, the
  `ceil(c * num_patches)` with the highest scores (`math.ceil` on the exact product); the other pairs compute nothing;
- CLS goes through every head group and every expert with gate 1;
- in head group g, every query head of a token whose pair (token, g) is kept attends to all tokens (both directions)
  whose pair (token, g) is kept; RoPE (when configured) at the token index, CLS at 0;
- a block's output is the union (sum) of its kept experts' outputs times their gates, plus the shared output bias;
- peri-layernorm (`norm_placement="peri"`): the routers and the query/key projections read the normed stream, the
  value projection and the MLP experts the residual stream itself.

Used for the image classifier (`UoEForImageClassification`) and the ListOps text encoder of `benchmarks/`.
"""

from __future__ import annotations

import math

import torch

from .reference_uoe import _rms_norm, _rotate, _select, layer_top_k, rope_frequencies


def _norm(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str, cfg) -> torch.Tensor:
    if cfg.norm_type == "layernorm":
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + cfg.layer_norm_eps) * sd[name + ".weight"] + sd[name + ".bias"]
    return _rms_norm(x, sd[name + ".weight"], cfg.rms_norm_eps)


def _linear(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    out = x @ sd[name + ".weight"].T
    return out + sd[name + ".bias"] if name + ".bias" in sd else out


def encoder_selections(h: torch.Tensor, router_weight: torch.Tensor, top_k: int, num_shared: int, cfg) -> list[dict]:
    """Per token (CLS first): `{expert: gate}` of its kept pairs, expert ids counting the shared experts first."""
    patch = cfg.routing_patch_size
    tokens = h.shape[0] - 1
    num_patches, routed = tokens // patch, router_weight.shape[0]
    logits = [h[1 + p * patch : 1 + (p + 1) * patch].mean(0) @ router_weight.T for p in range(num_patches)]
    chosen = [_select(logits[p], top_k, cfg.router_score_func, cfg.gate_mode) for p in range(num_patches)]
    if cfg.data_capacity is not None:
        capacity = math.ceil(cfg.data_capacity * num_patches)
        score = torch.softmax if cfg.router_score_func == "softmax" else (lambda v, dim: torch.sigmoid(v))
        scores = [score(logits[p].detach(), dim=-1) for p in range(num_patches)]
        for e in range(routed):
            candidates = [p for p in range(num_patches) if e in chosen[p]]
            for p in sorted(candidates, key=lambda p: -float(scores[p][e]))[capacity:]:
                del chosen[p][e]
    selections = [{e: 1.0 for e in range(num_shared + routed)}]  # CLS
    for t in range(tokens):
        gates = chosen[t // patch]
        selections.append({**{e: 1.0 for e in range(num_shared)}, **{num_shared + e: g for e, g in gates.items()}})
    return selections


def encoder_hidden_states(cfg, sd: dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states `(tokens, hidden)` of one sequence of input embeddings `x` (CLS first), float64.

    `prefix`: where the encoder's `layers.*` and `norm` live in `sd` (`"model."` in the image classifier)."""
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    group_size = heads // kv_heads
    rope = cfg.position_embedding_type == "rope"
    seq = x.shape[0]
    inv_freq, rope_scale = rope_frequencies(cfg, seq) if rope else (None, None)
    act = torch.nn.functional.gelu
    peri = getattr(cfg, "norm_placement", "pre") == "peri"
    for layer in range(cfg.num_hidden_layers):
        p = f"{prefix}layers.{layer}."
        h = _norm(x, sd, p + "input_layernorm", cfg)
        groups_of = encoder_selections(
            h,
            sd[p + "self_attn.router.weight"],
            layer_top_k(cfg, "layer_attention_top_k", cfg.attention_top_k, layer),
            cfg.num_shared_attention_groups,
            cfg,
        )
        q, k, v = (
            _linear(stream, sd, p + f"self_attn.{name}").view(seq, count, head_dim)
            for name, count, stream in (
                ("q_proj", heads, h),
                ("k_proj", kv_heads, h),
                ("v_proj", kv_heads, x if peri else h),
            )
        )
        if p + "self_attn.q_norm.weight" in sd:
            q = _rms_norm(q, sd[p + "self_attn.q_norm.weight"], cfg.rms_norm_eps)
            k = _rms_norm(k, sd[p + "self_attn.k_norm.weight"], cfg.rms_norm_eps)
        attn = torch.zeros(seq, heads, head_dim, dtype=torch.float64)
        for t in range(seq):
            for group, gate in groups_of[t].items():
                keys = [j for j in range(seq) if group in groups_of[j]]
                key_rows = [_rotate(k[j, group], j, inv_freq, rope_scale) if rope else k[j, group] for j in keys]
                for head in range(group * group_size, (group + 1) * group_size):
                    qt = _rotate(q[t, head], t, inv_freq, rope_scale) if rope else q[t, head]
                    weights = torch.softmax(torch.stack([qt @ kj for kj in key_rows]) / math.sqrt(head_dim), 0)
                    attn[t, head] = gate * sum(w * v[j, group] for w, j in zip(weights, keys, strict=True))
        x = x + _linear(attn.reshape(seq, -1), sd, p + "self_attn.o_proj")

        h = _norm(x, sd, p + "post_attention_layernorm", cfg)
        mlp_top_k = layer_top_k(cfg, "layer_mlp_top_k", cfg.mlp_top_k, layer)
        experts_of = encoder_selections(h, sd[p + "mlp.router.weight"], mlp_top_k, cfg.num_shared_mlp_experts, cfg)
        up, down = sd[p + "mlp.experts.up_proj"], sd[p + "mlp.experts.down_proj"]
        up_bias = sd.get(p + "mlp.experts.up_proj_bias")
        expert_input = x if peri else h
        mlp = torch.zeros_like(x)
        for t in range(seq):
            for expert, gate in experts_of[t].items():
                inner = up[expert] @ expert_input[t] + (0 if up_bias is None else up_bias[expert])
                mlp[t] += gate * (down[expert] @ act(inner))
        if p + "mlp.output_bias" in sd:
            mlp = mlp + sd[p + "mlp.output_bias"]
        x = x + mlp
    return _norm(x, sd, prefix + "norm", cfg)


def _state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().double().cpu() for k, v in model.state_dict().items()}


def reference_image_logits(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits `(batch, labels)` of a `UoEForImageClassification`, image by image, in float64. The patch embedding is
    a linear map of each patch's pixels (row-major patches), then CLS and the learned positions (if any)."""
    cfg, sd = model.config, _state_dict(model)
    size, channels = cfg.patch_size, cfg.num_channels
    weight = sd["model.embeddings.patch_embedding.weight"].reshape(cfg.hidden_size, -1)
    bias = sd["model.embeddings.patch_embedding.bias"]
    side = cfg.image_size // size
    logits = []
    for image in pixel_values.double():
        rows = [
            weight @ image[:, i * size : (i + 1) * size, j * size : (j + 1) * size].reshape(channels * size * size)
            + bias
            for i in range(side)
            for j in range(side)
        ]
        x = torch.stack([sd["model.embeddings.cls_token"][0, 0], *rows])
        if "model.embeddings.position_embeddings" in sd:
            x = x + sd["model.embeddings.position_embeddings"][0]
        hidden = encoder_hidden_states(cfg, sd, "model.", x)
        logits.append(_linear(hidden[0], sd, "classifier"))
    return torch.stack(logits)


def reference_text_encoder_logits(model, input_ids: list[int]) -> torch.Tensor:
    """Logits `(labels,)` of one unpadded sequence (CLS first) through the ListOps text encoder
    (`benchmarks/compare_listops.py`: token embeddings, rotary positions, classifier on CLS), in float64."""
    sd = _state_dict(model)
    hidden = encoder_hidden_states(model.config, sd, "", sd["embed_tokens.weight"][input_ids])
    return _linear(hidden[0], sd, "classifier")
