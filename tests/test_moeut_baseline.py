"""benchmarks/moeut.py: the MoEUT baseline against a plain-loop reading of its equations (float64, tiny config)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_moeut():
    if "moeut" in sys.modules:
        return sys.modules["moeut"]
    spec = importlib.util.spec_from_file_location("moeut", ROOT / "benchmarks" / "moeut.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["moeut"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def moeut():
    return load_moeut()


def tiny_config(moeut, **overrides):
    sizes = dict(
        vocab_size=17, hidden_size=8, num_hidden_layers=4, group_size=2, num_attention_heads=2, head_dim=4,
        num_attention_experts=3, attention_top_k=2, num_mlp_experts=5, mlp_expert_size=3, mlp_top_k=2,
        max_position_embeddings=16, mlp_entropy_coef=0.01, attention_entropy_coef=0.001,
    )  # fmt: skip
    sizes.update(overrides)
    return moeut.MoEUTConfig(**sizes)


def layer_norm(x: list[float], weight, bias, eps: float) -> list[float]:
    mean = sum(x) / len(x)
    var = sum((v - mean) ** 2 for v in x) / len(x)
    return [(v - mean) / math.sqrt(var + eps) * float(w) + float(b) for v, w, b in zip(x, weight, bias, strict=True)]


def vec_mat(x: list[float], matrix: torch.Tensor) -> list[float]:
    """x @ matrix for matrix (len(x), out)."""
    return [sum(x[i] * float(matrix[i, j]) for i in range(len(x))) for j in range(matrix.shape[1])]


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def top_k(scores: list[float], k: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda e: -scores[e])[:k]


def rope(x: list[float], position: int, channels: int, theta: float) -> list[float]:
    """Rotate channel j with channel j + channels/2 (j < channels/2) by position * theta^(-2j/channels)."""
    out, half = list(x), channels // 2
    for j in range(half):
        angle = position * theta ** (-2 * j / channels)
        a, b = x[j], x[j + half]
        out[j], out[j + half] = a * math.cos(angle) - b * math.sin(angle), b * math.cos(angle) + a * math.sin(angle)
    return out


def negative_entropy(rows: list[list[float]]) -> float:
    """Σ p log p of the token-averaged softmax of `rows` (one logit row per token)."""
    probs = []
    for row in rows:
        z = sum(math.exp(v) for v in row)
        probs.append([math.exp(v) / z for v in row])
    mean = [sum(p[e] for p in probs) / len(probs) for e in range(len(rows[0]))]
    return sum(p * math.log(p) for p in mean)


def reference_forward(model, config, ids: torch.Tensor) -> tuple[list, float]:
    """Logits and the weighted entropy loss, by plain loops over tokens, heads, experts and layer applications."""
    heads, experts, head_dim, k_att = (
        config.num_attention_heads, config.num_attention_experts, config.head_dim, config.attention_top_k,
    )  # fmt: skip
    eps = config.layer_norm_eps
    all_logits = []
    recorded = {g: {"v": [[] for _ in range(heads)], "o": [[] for _ in range(heads)], "mlp": []} for g in range(2)}
    for sequence in ids.tolist():
        x = [[float(v) for v in model.embed_tokens.weight[token]] for token in sequence]
        seq = len(x)
        for application in range(config.num_hidden_layers):
            g = application % config.group_size
            layer = model.layers[g]
            att = layer.attention
            n = [layer_norm(x[t], layer.attention_norm.weight, layer.attention_norm.bias, eps) for t in range(seq)]
            wq, wk = att.q_proj.weight.T, att.k_proj.weight.T
            v_router, o_router = att.v_router.weight.T, att.o_router.weight.T
            q, key, value, o_gates = {}, {}, {}, {}
            for t in range(seq):
                v_logits, o_logits = vec_mat(n[t], v_router), vec_mat(n[t], o_router)
                for h in range(heads):
                    head_v = v_logits[h * experts : (h + 1) * experts]
                    head_o = o_logits[h * experts : (h + 1) * experts]
                    recorded[g]["v"][h].append(head_v)
                    recorded[g]["o"][h].append(head_o)
                    gates = [sigmoid(v) for v in head_v]
                    val = [0.0] * head_dim
                    for e in top_k(gates, k_att):  # value experts read the raw residual
                        projected = vec_mat(x[t], att.v_experts[h * experts + e])
                        val = [a + gates[e] * b for a, b in zip(val, projected, strict=True)]
                    value[t, h] = val
                    o_gates[t, h] = [sigmoid(v) for v in head_o]
                    columns = slice(h * head_dim, (h + 1) * head_dim)
                    q[t, h] = rope(vec_mat(n[t], wq[:, columns]), t, config.num_rotary_channels, config.rope_theta)
                    key[t, h] = rope(vec_mat(n[t], wk[:, columns]), t, config.num_rotary_channels, config.rope_theta)
            new_x = []
            for t in range(seq):
                y = [0.0] * config.hidden_size
                for h in range(heads):
                    scores = [sum(a * b for a, b in zip(q[t, h], key[s, h], strict=True)) / math.sqrt(head_dim)
                              for s in range(t + 1)]  # fmt: skip
                    top = max(scores)
                    weights = [math.exp(v - top) for v in scores]
                    weights = [w / sum(weights) for w in weights]
                    attended = [sum(weights[s] * value[s, h][c] for s in range(t + 1)) for c in range(head_dim)]
                    gates = o_gates[t, h]
                    for e in top_k(gates, k_att):
                        projected = vec_mat(attended, att.o_experts[h * experts + e])
                        y = [a + gates[e] * b for a, b in zip(y, projected, strict=True)]
                new_x.append([a + b for a, b in zip(x[t], y, strict=True)])
            x = new_x
            mlp = layer.mlp
            for t in range(seq):
                n2 = layer_norm(x[t], layer.mlp_norm.weight, layer.mlp_norm.bias, eps)
                logits = vec_mat(n2, mlp.router.weight.T)
                recorded[g]["mlp"].append(logits)
                gates = [sigmoid(v) for v in logits]
                y = [0.0] * config.hidden_size
                for e in top_k(gates, config.mlp_top_k):  # experts read the raw residual
                    hidden = [max(v, 0.0) for v in vec_mat(x[t], mlp.up[e])]
                    y = [a + gates[e] * b for a, b in zip(y, vec_mat(hidden, mlp.down[e]), strict=True)]
                x[t] = [a + b for a, b in zip(x[t], y, strict=True)]
        final = [layer_norm(x[t], model.norm.weight, model.norm.bias, eps) for t in range(seq)]
        all_logits.append([vec_mat(f, model.lm_head.weight.T) for f in final])

    entropy = 0.0
    for g in range(config.group_size):  # pooled over the batch, the positions and every application of layer g
        attention = sum(negative_entropy(recorded[g][kind][h]) for kind in ("v", "o") for h in range(heads)) / heads
        entropy += config.attention_entropy_coef * attention + config.mlp_entropy_coef * negative_entropy(
            recorded[g]["mlp"]
        )
    return all_logits, entropy


@pytest.mark.parametrize("implementation", ["dense", "gathered"])
def test_forward_matches_a_plain_loop_reading_of_the_equations(moeut, implementation):
    config = tiny_config(moeut, expert_implementation=implementation)
    torch.manual_seed(0)
    model = moeut.MoEUTForCausalLM(config).double()
    ids = torch.randint(0, config.vocab_size, (2, 5))
    with torch.no_grad():
        output = model(input_ids=ids, output_router_logits=True)
        expected_logits, expected_entropy = reference_forward(model, config, ids)
    torch.testing.assert_close(output.logits, torch.tensor(expected_logits, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    # the entropy loss, independently: softmax per token, pooled mean, Σ p log p, weighted (computed in float32)
    assert output.aux_loss.item() == pytest.approx(expected_entropy, rel=1e-5)
    assert output.aux_loss.item() < 0  # a negative entropy
    # grouping: the two distinct layers are really shared (4 applications, 2 layers' parameters)
    assert len(model.layers) == 2


def test_gathered_experts_equal_a_loop(moeut):
    torch.manual_seed(1)
    rows, weight = torch.randn(11, 4, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    expert = torch.tensor([2, 0, 0, 1, 2, 2, 2, 0, 1, 1, 2])
    result = moeut.expert_matmul(rows, moeut.expert_plan(expert, 3), weight)
    expected = torch.stack([rows[i] @ weight[expert[i]] for i in range(len(rows))])
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)


def test_loss_decreases_on_a_fixed_batch(moeut):
    config = tiny_config(moeut, vocab_size=32, hidden_size=16, head_dim=8)  # the dense experts, the sweep's
    torch.manual_seed(0)
    model = moeut.MoEUTForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (4, 12))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # measured: 3.71 -> 2.10 in 8 steps (an untrained model sits near log(32) = 3.47)
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"group_size": 3}, "`group_size` (3) must divide `num_hidden_layers` (4)"),
        ({"attention_top_k": 4}, "`attention_top_k` (4) must be <= `num_attention_experts` (3)"),
        ({"mlp_top_k": 6}, "`mlp_top_k` (6) must be <= `num_mlp_experts` (5)"),
        ({"num_mlp_experts": 0}, "`num_mlp_experts` must be an integer >= 1"),
        ({"tie_word_embeddings": True}, "`tie_word_embeddings` must be False"),
        ({"expert_implementation": "cvmm"}, "`expert_implementation` must be 'dense' or 'gathered'"),
    ],
)
def test_invalid_configs_raise(moeut, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(moeut, **overrides)


def test_padding_mask_is_refused(moeut):
    model = moeut.MoEUTForCausalLM(tiny_config(moeut))
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="`attention_mask` must be None"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
