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
