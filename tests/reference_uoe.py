"""An independent plain-loop float64 implementation of UoEForCausalLM, written from SPEC.md.

It shares no code with `uoe.modeling_uoe`: it reads the weights from a state dict and computes one
sequence token by token and head by head, so that the vectorised model can be checked against the
specification's rules (patch routed from its first token, a head group -- one key/value head with its
query heads -- is the attention expert, a query head of a selected group attends to the earlier tokens
that selected the group, RoPE at original positions, union of selected experts). Attention biases and
per-head q/k RMSNorm (`qk_norm`) are read from the state dict when present. Shared experts (the first
`num_shared_*` of a block, every token's, gate 1, not scored by the router) and Chain-of-Experts iterations
(`mlp_chain_length`: `x = x + UoME_t(norm(x))`, router t per iteration) follow SPEC-level rules as well.
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


def reference_logits(
    model, input_ids: list[int], router_weights: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """Logits `(seq, vocab)` of one unpadded sequence, in float64.

    `router_weights` replaces the model's router weights by the given tensors (state-dict names), e.g. float64
    leaves that require grad, so that autograd through this loop gives the routers' gradients.
    """
    cfg = model.config
    sd = {k: v.detach().double().cpu() for k, v in model.state_dict().items()}
    sd.update(router_weights or {})
    heads, head_dim, patch = cfg.num_attention_heads, cfg.head_dim, cfg.routing_patch_size
    kv_heads = cfg.num_key_value_heads
    group_size = heads // kv_heads
    theta = cfg.rope_parameters["rope_theta"]
    expert_size = cfg.intermediate_size // cfg.num_mlp_experts
    act = torch.nn.functional.silu if cfg.hidden_act == "silu" else torch.nn.functional.gelu
    seq = len(input_ids)
    x = sd["model.embed_tokens.weight"][input_ids]
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        h = _rms_norm(x, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        # routing: every token of a patch uses the decision of the patch's first token; experts are head groups
        router = h @ sd[p + "self_attn.router.weight"].T
        shared_groups = getattr(cfg, "num_shared_attention_groups", 0)
        groups_of = [
            _select_with_shared(
                router[(t // patch) * patch], cfg.attention_top_k, shared_groups, cfg.router_score_func, cfg.gate_mode
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
        attn = torch.zeros(seq, heads, head_dim, dtype=torch.float64)
        for t in range(seq):
            for group, gate in groups_of[t].items():
                keys = [j for j in range(t + 1) if group in groups_of[j]]
                for head in range(group * group_size, (group + 1) * group_size):
                    qt = _rope(q[t, head], t, theta)
                    scores = torch.stack([qt @ _rope(k[j, group], j, theta) for j in keys]) / math.sqrt(head_dim)
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
                    cfg.mlp_top_k,
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
