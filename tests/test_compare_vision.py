"""benchmarks/compare_vision.py: quick mode end to end on a tiny budget, FLOP/parameter matching, bad input."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import compare_vision as cv  # noqa: E402
import harness  # noqa: E402
from baseline_flops import all_mlp_flops_per_image  # noqa: E402

from uoe.flops import estimate_flops_per_image  # noqa: E402

OTHER_SECTIONS = "# Benchmarks\n\n## LM comparison (compare_lm.py)\n\nLM table stays.\n\n## Kernels\n\nkernel text\n"


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp / "hf_home"))
    return env


def _fashion_mnist_dir(tmp: Path) -> str:
    """The installed Fashion-MNIST if there is one, else random idx files with the same layout."""
    try:
        return str(cv._example_module().find_fashion_mnist(None))
    except FileNotFoundError:
        folder = tmp / "fmnist"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for prefix, count in (("train", 600), ("t10k", 300)):
            for kind, array in (
                ("images-idx3", rng.integers(0, 256, (count, 28, 28))),
                ("labels-idx1", rng.integers(0, 10, count)),
            ):
                header = (
                    b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
                )
                with gzip.open(folder / f"{prefix}-{kind}-ubyte.gz", "wb") as handle:
                    handle.write(header + array.astype(np.uint8).tobytes())
        return str(folder)


@pytest.mark.slow
def test_quick_mode_reports_every_model(tmp_path):
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text(OTHER_SECTIONS)
    output = tmp_path / "vision.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "compare_vision.py"), "--quick",
        "--train_samples", "256", "--test_samples", "200", "--epochs", "1", "--batch_size", "64",
        "--fashion_mnist_dir", _fashion_mnist_dir(tmp_path),
        "--results_md", str(results_md), "--output", str(output),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    payload = json.loads(output.read_text())
    assert payload["settings"]["mode"] == "quick"
    rows = {row["model"]: row for row in payload["summary"]}
    assert set(rows) == set(cv.MODELS)
    for name, row in rows.items():
        assert row["runs"] == 1 and not row["failed"], name
        for key in ("parameters", "analytic_flops", "counted_flops"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key)
        run = payload["runs"][name][0]
        assert run["eval_examples"] == 200  # every test image scored once
        correct = row["accuracy"][0] * 200  # a share of 200 predictions (harness.evaluate: test_compare_listops)
        assert abs(correct - round(correct)) < 1e-9 and run["accuracy"] == row["accuracy"][0]
        assert row["train_images_per_s"][0] > 0 and row["eval_images_per_s"][0] > 0
    # FLOP matching and parameter matching hold in the actual run
    uoe_active = rows["uoe"]["analytic_flops"]
    assert abs(rows["vit"]["analytic_flops"] / uoe_active - 1) <= 0.10
    assert abs(rows["mlp"]["parameters"] / rows["uoe"]["parameters"] - 1) <= 0.02
    # UoE's gathered path computes the selected pairs (plus CLS in every expert and the padding of its attention
    # lists), well below the dense-equivalent work (~1.9x the active FLOPs here); data selection computes less still
    assert uoe_active < rows["uoe"]["counted_flops"] < 1.6 * uoe_active
    assert rows["uoe_dc"]["counted_flops"] < rows["uoe"]["counted_flops"]
    assert payload["environment"]["loadavg_start"] and payload["environment"]["loadavg_end"]

    text = results_md.read_text()
    assert cv.SECTION in text and "LM table stays." in text and "kernel text" in text
    section = text.split(cv.SECTION)[1].split("\n## ")[0]
    for label in cv.LABELS.values():
        assert label in section
    assert "Mode `quick`" in section and "getloadavg" in section


def test_all_mlp_flops_analytic_equal_counted():
    model = cv.AllMLPClassifier(784, 86, 4, 4, 10)
    x = torch.randn(4, 1, 28, 28)
    counted = harness.counted_forward_flops(model, lambda: model(x)) / 4
    assert abs(counted / all_mlp_flops_per_image(784, 86, 4, 4, 10) - 1) < 0.02


def test_vit_flops_analytic_equal_counted_and_matched_to_uoe():
    target = estimate_flops_per_image(cv.uoe_config()).active
    width = cv.matched_vit_width(target)
    assert abs(cv.vit_flops_per_image(cv.vit_config(width)) / target - 1) <= 0.10
    model, info = cv.build_model("vit")
    x = torch.randn(2, 1, 28, 28)
    counted = harness.counted_forward_flops(model, lambda: cv.forward_logits(model, {"pixel_values": x})) / 2
    assert abs(counted / info["analytic_flops"] - 1) < 0.03
    assert model.config._attn_implementation == "sdpa"  # restored after counting


def test_uoe_dense_flops_agree_with_counted_and_active_is_about_half():
    flops = estimate_flops_per_image(cv.uoe_config())
    model, _ = cv.build_model("uoe")
    x = torch.randn(2, 1, 28, 28)
    model.config.routing_backend = "masked"
    counted = harness.counted_forward_flops(model, lambda: cv.forward_logits(model, {"pixel_values": x})) / 2
    assert abs(counted / flops.dense - 1) < 0.05  # masked path = dense work (+ routers)
    assert 0.4 < flops.active / flops.dense < 0.6
    model.config.routing_backend = "gathered"  # the CPU default: the selected pairs (+ CLS, list padding)
    counted = harness.counted_forward_flops(model, lambda: cv.forward_logits(model, {"pixel_values": x})) / 2
    assert 0.9 * flops.active < counted < 0.8 * flops.dense


def test_mlp_width_matches_parameters():
    target = cv.uoe_parameter_count()
    width = cv.matched_mlp_width(target)
    model = cv.AllMLPClassifier(784, width, cv.MLP_DEPTH, cv.MLP_EXPANSION, 10)
    assert harness.count_parameters(model) == cv.mlp_param_count(width)
    assert abs(cv.mlp_param_count(width) / target - 1) < 0.02


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "uoe,resnet"], "--models must be a comma-separated subset of"),
        (["--seeds", "a,b"], "--seeds must be a comma-separated list of integers"),
        (["--epochs", "0"], "--epochs must be > 0"),
        (["--lr", "-1"], "--lr must be > 0"),
    ],
)
def test_bad_arguments_name_the_parameter(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cv.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_replace_section_keeps_other_sections(tmp_path):
    path = tmp_path / "R.md"
    path.write_text(OTHER_SECTIONS)
    harness.replace_section(path, cv.SECTION, "first")
    harness.replace_section(path, "## ListOps (compare_listops.py)", "listops")
    harness.replace_section(path, cv.SECTION, "second")
    text = path.read_text()
    assert text.count(cv.SECTION) == 1 and "second" in text and "first" not in text
    assert "LM table stays." in text and "kernel text" in text and "listops" in text
    assert text.index("## Kernels") < text.index(cv.SECTION) < text.index("## ListOps")


def test_run_grid_runs_seed_major_and_records_failures(capsys):
    calls = []

    def run_one(name, seed):
        calls.append((name, seed))
        if name == "broken":
            raise RuntimeError("no kernel for this shape")
        return {"seed": seed, "accuracy": 0.5}

    runs = harness.run_grid(run_one, ["ok", "broken"], [0, 1], lambda run: f"accuracy {run['accuracy']}")
    assert calls == [("ok", 0), ("broken", 0), ("ok", 1), ("broken", 1)]
    assert runs["ok"] == [{"seed": 0, "accuracy": 0.5}, {"seed": 1, "accuracy": 0.5}]
    assert runs["broken"] == [{"seed": s, "error": "RuntimeError: no kernel for this shape"} for s in (0, 1)]
    assert "ok seed 1: accuracy 0.5" in capsys.readouterr().out
