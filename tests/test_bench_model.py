"""benchmarks/bench_model.py: the quick mode end to end (every model measured, the section written, UoE's FLOPs
ratio = `active_fraction`), the Mixtral width rule, shape parsing and bad arguments. No speed is asserted."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import uoe.configuration_uoe as configuration
from uoe import UoEConfig, estimate_flops_per_token

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_model  # noqa: E402

OTHER_SECTIONS = "# Benchmarks\n\n## LM comparison (compare_lm.py)\n\nLM table stays.\n"


def expected_uoe_rows() -> list[str]:
    """The UoE rows a CPU run must have (the triton backend needs CUDA)."""
    return ["uoe-auto", "uoe-masked", "uoe-gathered"]


@pytest.mark.slow
def test_quick_mode_measures_every_model(tmp_path):
    results_md, output = tmp_path / "RESULTS.md", tmp_path / "bench.json"
    results_md.write_text(OTHER_SECTIONS)
    results = bench_model.main(["--quick", "--device", "cpu", "--results_md", str(results_md), "--output", str(output)])
    assert output.is_file()
    text = results_md.read_text()
    assert "LM table stays." in text  # other sections are kept
    assert "## Whole-model benchmark (bench_model.py, CPU)" in text
    expected = ["llama", "mixtral", *expected_uoe_rows()]
    assert "uoe-masked" in expected
    assert len(results["shapes"]) == len(bench_model.QUICK_SHAPES.split(","))
    for shape in results["shapes"]:
        rows = {row["model"]: row for row in shape["rows"]}
        assert sorted(rows) == sorted(expected), shape["notes"]
        decodes = [f"decode_{mode}_b2" for mode in ("dynamic", "static", "generate")]  # the quick mode's rows
        for name, row in rows.items():
            assert row["status"] == "ok", row["status"]
            for measurement in ("train", "prefill", *decodes):
                rate = row[measurement]["tokens_per_second"]
                assert math.isfinite(rate) and rate > 0, (name, measurement, rate)
                ratio = row["time_ratio"][measurement]
                assert math.isfinite(ratio) and ratio > 0, (name, measurement, ratio)
            for measurement in decodes:
                assert math.isfinite(row[measurement]["ms_per_token"]) and row[measurement]["ms_per_token"] > 0
            assert row["peak_memory_mib"] is not None and math.isfinite(row["peak_memory_mib"])
            assert f"{name}: {row['description']}" in text  # every model has its row in the written section
        assert rows["llama"]["time_ratio"] == {name: 1.0 for name in ("train", "prefill", *decodes)}

        # the FLOPs ratio of a UoE row is UoE's active fraction, computed here independently from the shape
        s = shape["shape"]
        config = UoEConfig(
            vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"], attention_top_k=s["attention_top_k"], intermediate_size=s["intermediate"],
            num_mlp_experts=s["experts"], mlp_top_k=s["mlp_top_k"],
        )  # fmt: skip
        estimate = estimate_flops_per_token(config, s["seq"])
        assert rows["uoe-masked"]["flops_ratio"] == pytest.approx(estimate.active_fraction, rel=1e-12)
        assert rows["llama"]["flops_per_token"] == pytest.approx(estimate.dense, rel=1e-12)
        assert 0 < rows["mixtral"]["flops_ratio"] < 1


def test_mixtral_width_matches_uoe_active_parameters():
    shape = bench_model.PRESETS["main"]
    uoe_config = bench_model.uoe_config(shape, shape.seq)
    target = bench_model.active_parameters(uoe_config)
    # UoE's active parameters by hand: half the attention, half the MLP, routers, norms, embeddings and head
    h, layers = shape.hidden, shape.layers
    by_hand = layers * (4 * h * h * 3 / 6 + 3 * h * shape.intermediate * 2 / 4 + h * (6 + 4) + 2 * h)
    by_hand += h + 2 * shape.vocab * h
    assert target == pytest.approx(by_hand)
    width = bench_model.solve_mixtral_width(shape, shape.seq, target)

    def mixtral_active(w: int) -> float:
        return bench_model.active_parameters(bench_model.mixtral_config(shape, shape.seq, w))

    step = mixtral_active(width + 1) - mixtral_active(width)
    assert step == 2 * 3 * h * layers  # two experts of 3 matrices per layer
    assert abs(mixtral_active(width) - target) <= step / 2


def test_mixtral_flops_follow_the_uoe_convention():
    """A Mixtral whose 2 experts together are as wide as Llama's MLP has Llama's FLOPs plus its routers'."""
    shape = bench_model.PRESETS["tiny"]
    mixtral = bench_model.mixtral_config(shape, shape.seq, shape.intermediate // 2)
    dense = estimate_flops_per_token(bench_model.uoe_config(shape, shape.seq), shape.seq).dense
    routers = shape.layers * 2 * shape.hidden * shape.experts
    assert bench_model.analytic_flops_per_token(mixtral, shape.seq) == pytest.approx(dense + routers)


def test_shapes_parse_presets_and_specs():
    shapes = bench_model.parse_shapes("main, 64:2:4/2:256:4/2:512:2x32")
    assert shapes[0] == bench_model.PRESETS["main"]
    assert shapes[1].spec == "64:2:4/2:256:4/2:512:2x32"
    assert bench_model.parse_shape(bench_model.PRESETS["d1024"].spec, "d1024") == bench_model.PRESETS["d1024"]


def test_backends_skip_what_cannot_run(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(configuration, "ROUTING_BACKENDS", ("auto", "triton", "masked"))
    runnable, notes = bench_model.routing_backends(["masked", "gathered", "triton"], cpu)
    assert runnable == [("masked", "masked")]
    assert len(notes) == 2 and "gathered" in notes[0] and "triton" in notes[1]
    monkeypatch.setattr(configuration, "ROUTING_BACKENDS", ("auto", "masked", "gathered", "triton"))
    runnable, notes = bench_model.routing_backends(["masked", "gathered", "triton"], cpu)
    assert runnable == [("masked", "masked"), ("gathered", "gathered")]
    assert len(notes) == 1 and "triton" in notes[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shapes", "192:4:6"], "--shapes"),
        (["--shapes", "192:4:6/7:768:4/2:4096:16x256"], "attention_top_k"),
        (["--models", "gpt2"], "--models"),
        (["--backends", "cuda"], "--backends"),
        (["--repeats", "0"], "--repeats"),
        (["--decode_tokens", "-1"], "--decode_tokens"),
        (["--decode_modes", "cached"], "--decode_modes"),
        (["--decode_batches", "1,0"], "--decode_batches"),
    ],
)
def test_bad_arguments_name_the_parameter(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_model.parse_args(argv)
    assert message in capsys.readouterr().err
