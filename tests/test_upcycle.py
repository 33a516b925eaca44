"""examples/upcycle.py end to end in --quick mode: its table is checked against figures recomputed here."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from uoe import UoEForCausalLM, estimate_flops_per_token

ROOT = Path(__file__).resolve().parents[1]
# --quick, made smaller still: the checks are about the plumbing, not the perplexities
ARGS = ["--quick", "--dense_steps", "30", "--finetune_steps", "3", "--max_train_chars", "120000", "--eval_blocks", "16"]


@pytest.fixture(scope="module")
def upcycle_run(tmp_path_factory) -> tuple[Path, Path, dict, str]:
    tmp = tmp_path_factory.mktemp("upcycle")
    output_dir, data_dir = tmp / "out", tmp / "data"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf_home"), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, str(ROOT / "examples" / "upcycle.py"), *ARGS, "--output_dir", str(output_dir)]
    result = subprocess.run(
        [*command, "--data_dir", str(data_dir)], cwd=tmp, env=env, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return output_dir, data_dir, json.loads((output_dir / "results.json").read_text()), result.stdout


def eval_blocks(tokenizer, data_dir: Path, block_size: int, count: int) -> torch.Tensor:
    """The validation blocks, tokenized here in one call on the whole (truncated) text."""
    text = (data_dir / "validation.txt").read_text(encoding="utf-8")[:120000]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids[: count * block_size].view(count, block_size)


def loss_of(model, blocks: torch.Tensor) -> float:
    """Mean next-token cross-entropy from the logits (a UoE model's `loss` also holds its router loss)."""
    with torch.no_grad():
        logits = model(input_ids=blocks, use_cache=False).logits
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), blocks[:, 1:].flatten()))


@pytest.mark.slow
def test_upcycle_table_matches_independent_figures(upcycle_run):
    output_dir, data_dir, results, stdout = upcycle_run
    rows = {row["model"]: row for row in results["rows"]}
    assert len(rows) == 7 and "| model | perplexity |" in stdout
    assert (output_dir / "results.md").read_text().count("\n") == 2 + 7

    # the dense perplexity is exp of the saved dense model's eval loss, computed here independently
    tokenizer = AutoTokenizer.from_pretrained(output_dir / "dense")
    dense = LlamaForCausalLM.from_pretrained(output_dir / "dense").eval()
    blocks = eval_blocks(tokenizer, data_dir, results["block_size"], 16)
    assert results["eval_tokens"] == blocks[:, 1:].numel()
    dense_loss = loss_of(dense, blocks)
    assert rows["dense Llama"]["perplexity"] == pytest.approx(math.exp(dense_loss), rel=1e-4)
    # conversion at full routing is exact
    full = UoEForCausalLM.from_dense(dense, num_mlp_experts=results["num_mlp_experts"])
    assert loss_of(full, blocks) == pytest.approx(dense_loss, rel=1e-5)
    assert rows["UoE from_dense, full routing"]["perplexity"] == pytest.approx(math.exp(dense_loss), rel=1e-4)

    # the saved upcycled checkpoint reloads with the Auto classes and scores as its row says
    checkpoint = Path(results["checkpoint"])
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    assert isinstance(model, UoEForCausalLM)
    config = model.config
    assert (config.attention_top_k, config.num_attention_heads) == (2, 4)
    assert (config.mlp_top_k, config.num_mlp_experts) == (2, 4)
    tuned = rows["sparse, data-driven init, fine-tuned"]
    assert tuned["token_loss"] == pytest.approx(loss_of(model, blocks), rel=1e-5)
    # fine-tuning changed the data-driven model: its perplexity differs from the one before
    assert tuned["perplexity"] != rows["sparse, data-driven init"]["perplexity"]

    # FLOPs: the analytic estimate of each shape; the fine-tuning budget is 10% of the dense tokens
    estimate = estimate_flops_per_token(config, results["block_size"])
    assert tuned["active_flops_per_token"] == pytest.approx(estimate.active)
    assert rows["dense Llama"]["active_flops_per_token"] == pytest.approx(estimate.dense)
    assert tuned["flops_vs_dense"] == pytest.approx(estimate.active / estimate.dense)
    assert results["finetune_tokens"] == 3 * 16 * 64 and results["dense_train_tokens"] == 30 * 16 * 64
    assert rows["UoE same shape from scratch (fine-tune budget)"]["train_tokens"] == results["finetune_tokens"]

    # a Hub-ready card: metadata names no dataset (the corpus is no Hub dataset, so no `datasets` / `model-index`)
    # and the card's table holds the perplexity of the fine-tuned model
    card = (checkpoint / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "transformers"
    assert "datasets" not in metadata and "model-index" not in metadata
    assert f"| Validation perplexity | {tuned['perplexity']:.2f} |" in card
    assert "sparsify" in card
    for code in ("configuration_uoe.py", "modeling_uoe.py"):
        assert (checkpoint / code).is_file()


# -- the new pieces: a distilled fine-tune under a FLOPs budget, and the study grid ---------------------------------------


def run_upcycle(tmp: Path, extra: list[str]) -> tuple[Path, str]:
    output_dir = tmp / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf_home"), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, str(ROOT / "examples" / "upcycle.py"), *ARGS, "--output_dir", str(output_dir), *extra]
    result = subprocess.run(
        [*command, "--data_dir", str(tmp / "data")], cwd=tmp, env=env, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return output_dir, result.stdout


@pytest.mark.slow
def test_distilled_run_under_a_flops_budget(upcycle_run, tmp_path):
    """`--distill --flops_budget 0.7 --shared_attention_groups 1` from the first run's dense model: the checkpoint has
    per-layer top-k within the budget (as `estimate_flops_per_token` counts it), reloads with the Auto classes and
    scores as its row says; the fine-tune was a distillation (its row and the card say so).

    Planted bugs it catches: `--distill` ignored (row name); the budget not passed to `sparsify` (no per-layer lists);
    the per-layer lists lost on saving."""
    dense_dir = upcycle_run[0] / "dense"
    extra = ["--model_name_or_path", str(dense_dir), "--finetune_steps", "2", "--distill", "--flops_budget", "0.7",
             "--shared_attention_groups", "1", "--distill_temperature", "2.0"]  # fmt: skip
    output_dir, stdout = run_upcycle(tmp_path, extra)
    results = json.loads((output_dir / "results.json").read_text())
    rows = {row["model"]: row for row in results["rows"]}
    tuned = rows["sparse, data-driven init, distilled"]
    model = AutoModelForCausalLM.from_pretrained(results["checkpoint"]).eval()
    config = model.config
    assert config.layer_attention_top_k is not None and len(config.layer_mlp_top_k) == 2
    assert config.num_shared_attention_groups == 1 and results["layer_mlp_top_k"] == config.layer_mlp_top_k
    estimate = estimate_flops_per_token(config, results["block_size"])
    assert estimate.active <= 0.7 * estimate.dense and tuned["active_flops_per_token"] == pytest.approx(estimate.active)
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    blocks = eval_blocks(tokenizer, tmp_path / "data", results["block_size"], 16)
    assert tuned["token_loss"] == pytest.approx(loss_of(model, blocks), rel=1e-5)
    assert results["sparsify_report"]["budget"]["active_fraction"] <= 0.7
    assert "distilled from the dense model" in (Path(results["checkpoint"]) / "README.md").read_text()
    # the data-init fine-tune logged DistillationTrainer's terms (the random-init one is plain CE)
    assert "'distill_kl'" in stdout and "'distill_ce'" in stdout


@pytest.mark.slow
def test_study_grid_table_and_plot(upcycle_run, tmp_path):
    """`--study` on two FLOPs levels and two token budgets, every method, two seeds for two methods at the largest
    budget: one run per cell, FLOPs recomputed here from each run's per-layer top-k, runs that share an init and train
    nothing agree, the goals are the best eligible means, and the table and plot are written."""
    dense_dir = upcycle_run[0] / "dense"
    extra = ["--model_name_or_path", str(dense_dir), "--finetune_steps", "3", "--study", "--study_flops", "0.55",
             "0.75", "--study_tokens", "0", "0.1"]  # fmt: skip
    output_dir, stdout = run_upcycle(tmp_path, extra)
    results = json.loads((output_dir / "study.json").read_text())
    methods = list(results["methods"])
    assert len(methods) == 6 and results["token_budgets"] == {"0.0": 0, "0.1": 3}
    runs = results["runs"]
    # one run per (method, level, budget) with seed 0, plus seed 1 of the seed methods at the 10% budget
    assert len(runs) == 2 * 6 * 2 + 2 * 2
    dense = LlamaForCausalLM.from_pretrained(dense_dir).eval()
    full = UoEForCausalLM.from_dense(dense, num_mlp_experts=4)
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    blocks = eval_blocks(tokenizer, tmp_path / "data", 64, 16)
    assert results["dense_perplexity"] == pytest.approx(math.exp(loss_of(dense, blocks)), rel=1e-4)
    levels = {level["target"]: level for level in results["levels"]}
    for run in runs:
        config = type(full.config).from_dict(
            {**full.config.to_dict(), "attention_top_k": 1, "mlp_top_k": 1,
             "layer_attention_top_k": run["layer_attention_top_k"],
             "layer_mlp_top_k": run["layer_mlp_top_k"],
             "num_shared_attention_groups": run["num_shared_attention_groups"]}
        )  # fmt: skip
        estimate = estimate_flops_per_token(config, 64)
        assert run["flops_vs_dense"] == pytest.approx(estimate.active / estimate.dense, rel=1e-9)
        if run["method"].startswith("budget"):  # per-layer budgets within the uniform level's FLOPs
            assert run["flops_vs_dense"] <= levels[run["level"]]["fraction"] + 1e-12
    by_key = {(r["method"], r["level"], r["token_fraction"], r["seed"]): r["perplexity"] for r in runs}
    for level in levels:  # the same init untrained: data and data+distill agree at 0 tokens
        assert by_key[("data", level, 0.0, 0)] == by_key[("data+distill", level, 0.0, 0)]
    # the finetuned goal: the best mean over seeds among runs at <= 0.6x and <= 10% tokens
    means = {}
    for (method, level, fraction, _), ppl in by_key.items():
        means.setdefault((method, level, fraction), []).append(ppl)
    eligible = [sum(v) / len(v) for (m, lv, f), v in means.items() if f <= 0.1 and levels[lv]["target"] <= 0.6
                and max(r["flops_vs_dense"] for r in runs if (r["method"], r["level"]) == (m, lv)) <= 0.6]  # fmt: skip
    assert results["goals"]["finetuned"]["perplexity"] == pytest.approx(min(eligible))
    table = (output_dir / "study.md").read_text()
    assert table.count("\n| ") == 1 + 2 * 6 and "goal finetuned" in table
    assert (output_dir / "study.png").stat().st_size > 10_000
