"""`examples/run_clm.py` on 2 CPU ranks started by torchrun: DDP over gloo, and FSDP2 wrapping UoEDecoderLayer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from uoe import UoEForCausalLM

from .test_examples import EXAMPLES, TINY_ARGS, corpus, offline_env, run  # noqa: F401  (corpus is a fixture)

FSDP_CONFIG = EXAMPLES / "fsdp_config.json"


def torchrun(tmp_path: Path, corpus_files: tuple[Path, Path], extra: list[str]) -> tuple[Path, str]:
    train_file, validation_file = corpus_files
    output_dir = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(EXAMPLES / "run_clm.py"),
        "--train_file", str(train_file), "--validation_file", str(validation_file),
        "--output_dir", str(output_dir), *TINY_ARGS,
        "--per_device_train_batch_size", "4", "--max_steps", "6", "--logging_steps", "2", "--eval_steps", "3",
        "--save_strategy", "no", "--no_plots", *extra,
    ]  # fmt: skip
    result = run(command, cwd=tmp_path, env=offline_env(tmp_path), timeout=300)
    return output_dir, result.stdout + result.stderr


@pytest.fixture(scope="module")
def ddp_run(corpus, tmp_path_factory):  # noqa: F811
    return torchrun(tmp_path_factory.mktemp("ddp"), corpus, [])


@pytest.fixture(scope="module")
def fsdp_run(corpus, tmp_path_factory):  # noqa: F811
    return torchrun(
        tmp_path_factory.mktemp("fsdp"), corpus, ["--fsdp", "full_shard", "--fsdp_config", str(FSDP_CONFIG)]
    )


def check_two_rank_run(output_dir: Path, log: str, distributed: str) -> dict:
    for rank in (0, 1):
        assert f"[rank {rank}/2] finished: 6 steps" in log, f"rank {rank} did not finish"
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["world_size"] == 2
    assert results["distributed"] == distributed
    # 6 steps x 2 ranks x 4 sequences x 64 tokens: both ranks fed the optimizer.
    assert results["num_input_tokens_seen"] == 6 * 2 * 4 * 64
    assert 1.0 < results["eval_perplexity"] < 2 * 512

    config = json.loads((output_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_uoe.UoEForCausalLM"
    assert (output_dir / "modeling_uoe.py").is_file()
    assert not list(output_dir.glob("_fsdp_*.py"))
    model, info = AutoModelForCausalLM.from_pretrained(output_dir, output_loading_info=True)
    assert isinstance(model, UoEForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    logits = model(**tokenizer("KING.\nWhat say you?", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    return results


@pytest.mark.slow
def test_ddp_on_two_cpu_ranks(ddp_run):
    check_two_rank_run(*ddp_run, distributed="ddp")


@pytest.mark.slow
def test_fsdp_on_two_cpu_ranks(fsdp_run):
    assert json.loads(FSDP_CONFIG.read_text())["transformer_layer_cls_to_wrap"] == ["UoEDecoderLayer"]
    output_dir, log = fsdp_run
    check_two_rank_run(output_dir, log, distributed="fsdp")  # parameters were sharded DTensors
    training_args = torch.load(output_dir / "training_args.bin", weights_only=False)
    assert training_args.fsdp_config["transformer_layer_cls_to_wrap"] == ["UoEDecoderLayer"]


@pytest.mark.slow
def test_fsdp_trains_the_same_model_as_ddp(ddp_run, fsdp_run):
    # Same seed, data order and global batch: sharding must not change the mathematics.
    ddp = json.loads((ddp_run[0] / "all_results.json").read_text())
    fsdp = json.loads((fsdp_run[0] / "all_results.json").read_text())
    assert fsdp["eval_token_loss"] == pytest.approx(ddp["eval_token_loss"], rel=1e-4)
    ddp_model = AutoModelForCausalLM.from_pretrained(ddp_run[0])
    fsdp_model = AutoModelForCausalLM.from_pretrained(fsdp_run[0])
    for (name, ddp_param), fsdp_param in zip(ddp_model.named_parameters(), fsdp_model.parameters(), strict=True):
        torch.testing.assert_close(fsdp_param, ddp_param, atol=1e-4, rtol=1e-3, msg=name)
