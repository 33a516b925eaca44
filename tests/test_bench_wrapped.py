"""`benchmarks/bench_wrapped.py --quick` runs every variant and reports consistent ratios."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_wrapped  # noqa: E402


def test_quick_mode_reports_every_variant(tmp_path, capsys):
    output = tmp_path / "wrapped.json"
    assert bench_wrapped.main(["--quick", "--output", str(output)]) == 0
    rows = json.loads(output.read_text())["rows"]
    assert {(row["variant"], row["measure"]) for row in rows} == {
        (variant, measure) for variant in ("plain", "LoRA q/k/v/o") for measure in ("forward", "train")
    }
    for row in rows:
        ratio = row["masked_tokens_per_s"] / row["gathered_tokens_per_s"]
        assert abs(row["gathered_over_masked_time"] - ratio) < 1e-9 * ratio
    assert "gathered/masked time" in capsys.readouterr().out
