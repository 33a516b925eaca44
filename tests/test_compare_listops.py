"""benchmarks/compare_listops.py: quick mode end to end on a tiny budget, the sequence classifier, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import compare_listops as cl  # noqa: E402
import harness  # noqa: E402
import listops  # noqa: E402


@pytest.mark.slow
def test_quick_mode_reports_every_model(tmp_path):
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Benchmarks\n\n## Vision comparison (compare_vision.py)\n\nvision stays\n")
    output = tmp_path / "listops.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "compare_listops.py"), "--quick",
        "--train_samples", "96", "--test_samples", "48", "--min_length", "20", "--max_length", "60",
        "--epochs", "1", "--batch_size", "16",
        "--results_md", str(results_md), "--output", str(output),
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    payload = json.loads(output.read_text())
    rows = {row["model"]: row for row in payload["summary"]}
    assert set(rows) == set(cl.MODELS)
    for name, row in rows.items():
        assert row["runs"] == 1 and not row["failed"], name
        for key in ("parameters", "analytic_flops", "counted_flops_probe"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key)
        assert math.isfinite(row["final_train_loss"][0])
        run = payload["runs"][name][0]
        assert run["eval_examples"] == 48  # every test expression scored once
        correct = row["accuracy"][0] * 48  # a share of 48 predictions (harness.evaluate is checked by hand below)
        assert abs(correct - round(correct)) < 1e-9 and run["accuracy"] == row["accuracy"][0]
        assert row["train_sequences_per_s"][0] > 0
    assert rows["uoe"]["parameters"] == rows["dense"]["parameters"]  # same model, different routing
    assert rows["uoe"]["analytic_flops"] < 0.7 * rows["dense"]["analytic_flops"]
    assert sum(payload["test_label_counts"].values()) == 48
    train_counts, test_counts = payload["train_label_counts"], payload["test_label_counts"]
    majority = max(train_counts, key=train_counts.get)  # the most frequent training label
    assert str(payload["majority_class"]["label"]) == majority
    assert payload["majority_class"]["test_accuracy"] == pytest.approx(test_counts.get(majority, 0) / 48, abs=1e-12)

    text = results_md.read_text()
    assert "vision stays" in text and cl.SECTION in text
    section = text.split(cl.SECTION)[1]
    for label in cl.LABELS.values():
        assert label in section
    assert "majority class" in section and "Mode `quick`" in section


def _batch(n, seed=0):
    examples = listops.generate(4 * n, seed=seed, min_length=10, max_length=40)
    return cl.pad_batch([listops.encode(e.tokens) for e in examples[:n]])


def test_dense_classifier_equals_plain_transformer_at_full_routing():
    """At full routing, UoESequenceClassifier is a pre-norm transformer encoder; recompute it by hand."""
    torch.manual_seed(0)
    model = cl.UoESequenceClassifier(cl.listops_config("dense", 64)).eval()
    ids = _batch(3)
    with torch.no_grad():
        logits = model(ids)["logits"]
        h = model.embed_tokens(ids)
        seq = ids.shape[1]
        cos, sin = model.rotary_emb(h, position_ids=torch.arange(seq)[None])

        def rope(x):
            x1, x2 = x.chunk(2, dim=-1)
            return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]

        for layer in model.layers:
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            shape = (ids.shape[0], seq, attn.num_heads, attn.head_dim)
            q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            weights = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / attn.head_dim**0.5, dim=-1)
            h = h + attn.o_proj((weights @ v).transpose(1, 2).reshape(ids.shape[0], seq, -1))
            x = layer.post_attention_layernorm(h)
            experts = layer.mlp.experts
            up = torch.cat(list(experts.up_proj), dim=0)  # (I, H)
            down = torch.cat(list(experts.down_proj), dim=1)  # (H, I)
            inner = torch.nn.functional.gelu(x @ up.T + experts.up_proj_bias.reshape(-1))
            h = h + inner @ down.T + layer.mlp.output_bias
        expected = model.classifier(model.norm(h)[:, 0])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_sparse_classifier_routes_and_trains():
    torch.manual_seed(0)
    model = cl.UoESequenceClassifier(cl.listops_config("uoe", 64))
    ids = _batch(4)
    out = model(ids, labels=torch.tensor([1, 2, 3, 4]))
    assert torch.isfinite(out["loss"]) and out["aux_loss"] > 0
    out["loss"].backward()
    routers = [p for n, p in model.named_parameters() if ".router." in n]
    assert routers and all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)
    # sparse and dense models with the same weights differ (routing actually drops experts)
    dense = cl.UoESequenceClassifier(cl.listops_config("dense", 64))
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(model.eval()(ids)["logits"], dense.eval()(ids)["logits"])


def test_analytic_flops_agree_with_counted_at_full_routing():
    model = cl.UoESequenceClassifier(cl.listops_config("dense", 128))
    ids = _batch(1)
    counted = harness.counted_forward_flops(model, lambda: model(ids))
    analytic = cl.analytic_flops(model.config, [ids.shape[1]])
    assert abs(counted / analytic["dense"] - 1) < 0.05
    sparse = cl.analytic_flops(cl.listops_config("uoe", 128), [ids.shape[1]])
    assert sparse["active"] < 0.6 * sparse["dense"]


def test_bucketed_batches_cover_every_example_once():
    lengths = [5, 50, 7, 30, 8, 40, 9, 10, 11, 60, 3]
    batches = cl.bucketed_batches(lengths, 3, torch.Generator().manual_seed(0), bucket=2)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    again = cl.bucketed_batches(lengths, 3, torch.Generator().manual_seed(0), bucket=2)
    assert batches == again


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "uoe,lstm"], "--models must be a comma-separated subset of"),
        (["--min_length", "100", "--max_length", "50"], "--max_length must be >= --min_length"),
        (["--seeds", ""], "--seeds must list at least one integer"),
        (["--batch_size", "0"], "--batch_size must be > 0"),
    ],
)
def test_bad_arguments_name_the_parameter(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cl.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_too_long_sequence_is_refused():
    model = cl.UoESequenceClassifier(cl.listops_config("uoe", 16))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.full((1, 40), listops.CLS_ID))


def test_evaluate_accuracy_is_the_share_of_correct_predictions_over_all_batches():
    """`harness.evaluate` against a hand count, on uneven batches (a mean of per-batch accuracies would give
    (2/3 + 1/5 + 1) / 3 = 0.622 instead of 4/9 = 0.444) and a model that records its mode."""

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.modes = []

        def forward(self, predictions):
            self.modes.append(self.training)
            return torch.nn.functional.one_hot(predictions, 4).float()

    batches = [
        ({"predictions": torch.tensor([0, 1, 2])}, torch.tensor([0, 1, 3])),  # 2 of 3
        ({"predictions": torch.tensor([3, 3, 3, 3, 3])}, torch.tensor([0, 1, 2, 3, 0])),  # 1 of 5
        ({"predictions": torch.tensor([2])}, torch.tensor([2])),  # 1 of 1
    ]
    model = Fixed().train()
    result = harness.evaluate(model, iter(batches), lambda m, inputs: m(**inputs))
    assert result["accuracy"] == pytest.approx(4 / 9, abs=1e-12) and result["eval_examples"] == 9
    assert model.modes == [False] * 3 and model.training  # evaluated in eval mode, handed back in train mode
