"""The training examples end to end on real Shakespeare text: run_clm.py, main_job.py, plots, model card, reload."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from uoe import UoEConfig, UoEForCausalLM
from uoe.data import read_text, shakespeare_files

from .remote_code import logits_without_uoe

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# A model and tokenizer small enough that a run takes seconds.
TINY_ARGS = [
    "--tokenizer_vocab_size", "512",
    "--config_overrides", "hidden_size=48,num_hidden_layers=2,num_attention_heads=4,attention_top_k=2,"
    "intermediate_size=96,num_mlp_experts=4,mlp_top_k=2",
    "--block_size", "64",
    "--per_device_train_batch_size", "8",
    "--max_eval_samples", "24",
    "--sample_max_new_tokens", "12",
    "--sample_prompt", "KING.\n",
]  # fmt: skip


def load_example(name: str):
    """Import an example script as a module (they are scripts, not a package)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))  # run_clm imports plot_router_logs from its folder
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def offline_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp / "hf_home"),  # remote-code modules are cached here, not in ~/.cache
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """~120k characters of two comedies for training, 20k of a held-out play for validation."""
    folder = tmp_path_factory.mktemp("corpus")
    files = {path.stem: path for path in shakespeare_files()}
    train = "\n".join(read_text(files[name])[:60_000] for name in ("as_you_like_it_gut", "comedy_of_errors_gut"))
    (folder / "train.txt").write_text(train, encoding="utf-8")
    (folder / "validation.txt").write_text(read_text(files["winters_tale_gut"])[:20_000], encoding="utf-8")
    return folder / "train.txt", folder / "validation.txt"


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory) -> tuple[Path, str]:
    """One run of `examples/run_clm.py` as a user would start it; several tests inspect its output."""
    tmp = tmp_path_factory.mktemp("run")
    train_file, validation_file = corpus
    output_dir = tmp / "out"
    command = [
        sys.executable, str(EXAMPLES / "run_clm.py"),
        "--train_file", str(train_file), "--validation_file", str(validation_file),
        "--output_dir", str(output_dir), *TINY_ARGS,
        "--max_steps", "8", "--logging_steps", "2", "--eval_steps", "4", "--save_steps", "4",
    ]  # fmt: skip
    result = run(command, cwd=tmp, env=offline_env(tmp))
    return output_dir, result.stdout


@pytest.mark.slow
def test_run_clm_trains_saves_and_reloads(trained_run, corpus):
    output_dir, stdout = trained_run
    assert "[rank 0/1] finished: 8 steps" in stdout
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "trainer_state.json"):
        assert (output_dir / name).is_file(), name
    for code in ("configuration_uoe.py", "modeling_uoe.py", "routing.py", "conversion.py"):
        assert (output_dir / code).is_file(), f"remote code file {code} missing"
    config = json.loads((output_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_uoe.UoEForCausalLM"

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    assert isinstance(model, UoEForCausalLM)
    assert len(tokenizer) == model.config.vocab_size == 512
    assert model.config.hidden_size == 48 and model.config.num_hidden_layers == 2
    text = "ROSALIND.\nWhy, whither shall we go?"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level BPE round-trips exactly
    inputs = tokenizer("KING.\n", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 5

    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["world_size"] == 1 and results["distributed"] == "none"
    assert f"unigram baseline {results['eval_unigram_perplexity']:.2f}" in stdout

    # The reported figures, recomputed independently from the saved model, tokenizer and the validation text:
    # the first 24 blocks of 64 tokens (--max_eval_samples, --block_size), token cross-entropy of each block's
    # 2nd token onwards, without the router losses.
    train_text, validation_text = (path.read_text(encoding="utf-8") for path in corpus)
    validation_ids = torch.tensor(tokenizer(validation_text, add_special_tokens=False)["input_ids"])
    blocks = validation_ids[: 24 * 64].view(24, 64)
    with torch.no_grad():
        logits = model.eval()(blocks, use_cache=False).logits
    token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), blocks[:, 1:].reshape(-1))
    assert results["eval_perplexity"] == pytest.approx(float(token_loss.exp()), rel=1e-4)
    counts = torch.bincount(torch.tensor(tokenizer(train_text, add_special_tokens=False)["input_ids"]), minlength=512)
    unigram = (counts.double() + 1) / (counts.sum() + 512)
    assert results["eval_unigram_perplexity"] == pytest.approx(
        float((-unigram.log()[blocks[:, 1:]].mean()).exp()), rel=1e-4
    )
    # 8 steps of training moved the model clearly away from its initialisation (which sits at about the uniform
    # 512: measured 480 after training, so a 3% margin)
    torch.manual_seed(0)
    untrained = UoEForCausalLM(model.config).eval()
    with torch.no_grad():
        untrained_logits = untrained(blocks, use_cache=False).logits
    untrained_loss = torch.nn.functional.cross_entropy(
        untrained_logits[:, :-1].reshape(-1, 512), blocks[:, 1:].reshape(-1)
    )
    assert results["eval_perplexity"] < 0.97 * float(untrained_loss.exp())


@pytest.mark.slow
def test_checkpoint_loads_without_the_uoe_package(trained_run, tmp_path):
    output_dir, _ = trained_run
    folder = tmp_path / "copied_checkpoint"  # away from the run folder and the repository
    shutil.copytree(output_dir, folder, ignore=shutil.ignore_patterns("checkpoint-*", "plots"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = dict(tokenizer("ROSALIND.\nWhy, whither shall we go?", return_tensors="pt"))
    expected = AutoModelForCausalLM.from_pretrained(output_dir)(**inputs).logits
    logits, info = logits_without_uoe(folder, inputs, tmp_path)
    assert info["class"] == "UoEForCausalLM" and not info["uoe_loaded"]
    assert info["module"].startswith("transformers_modules")
    torch.testing.assert_close(logits, expected)
    # The tokenizer is a plain tokenizers-backed class: no custom code needed.
    assert "auto_map" not in json.loads((folder / "tokenizer_config.json").read_text())


@pytest.mark.slow
def test_model_card_has_valid_metadata_and_the_run_figures(trained_run):
    output_dir, _ = trained_run
    card = (output_dir / "README.md").read_text()
    assert card.startswith("---\n")
    front_matter, body = card[4:].split("\n---\n", 1)
    metadata = yaml.safe_load(front_matter)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "text-generation"
    assert "uoe" in metadata["tags"]
    assert metadata["metrics"] == ["perplexity"]
    # no --dataset_name (Hub dataset ID): the metadata names no dataset, and has no model-index (which must name one)
    assert "datasets" not in metadata and "model-index" not in metadata
    assert metadata["base_config"]["hidden_size"] == 48
    assert metadata["base_config"]["attention_top_k"] == 2

    results = json.loads((output_dir / "all_results.json").read_text())
    parameters = UoEForCausalLM(UoEConfig.from_pretrained(output_dir)).num_parameters()
    for figure in (
        f"| Validation perplexity | {results['eval_perplexity']:.2f} |",
        f"{results['eval_unigram_perplexity']:.2f}",
        f"{parameters:,}",
        "| Training steps / tokens | 8 / 4,096 |",
        "Training data: the text file `train.txt` (validation: `validation.txt`).",
        "tokens/s",
    ):
        assert figure in body, figure
    assert "{{" not in body and "}}" not in body  # every template variable was filled


@pytest.mark.slow
def test_router_statistics_in_log_history_and_plots(trained_run, tmp_path):
    output_dir, _ = trained_run
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    train_logs = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in train_logs] == [2, 4, 6, 8]
    for entry in train_logs:
        assert entry["aux_loss"] > 0
        for layer in range(2):
            for kind, experts in (("attention", 4), ("mlp", 4)):
                prefix = f"router/layer_{layer}/{kind}"
                loads = [entry[f"{prefix}/load_{e}"] for e in range(experts)]
                assert sum(loads) == pytest.approx(1.0, abs=1e-3)
                assert entry[f"{prefix}/max_load_ratio"] >= 1.0
                assert entry[f"{prefix}/entropy"] > 0
    assert [entry["step"] for entry in history if "eval_perplexity" in entry][:2] == [4, 8]

    plots = load_example("plot_router_logs").main([str(output_dir), "--output_dir", str(tmp_path / "plots")])
    names = sorted(path.name for path in plots)
    assert names == ["loss.png", "router_balance.png", "router_load_layer_0.png", "router_load_layer_1.png"]
    for path in plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
    assert (output_dir / "plots" / "loss.png").is_file()  # run_clm plots its own run too


@pytest.mark.slow
def test_resume_from_last_checkpoint(trained_run, corpus, tmp_path):
    output_dir, _ = trained_run
    resumed = tmp_path / "out"
    shutil.copytree(output_dir, resumed)
    train_file, validation_file = corpus
    command = [
        sys.executable, str(EXAMPLES / "run_clm.py"),
        "--train_file", str(train_file), "--validation_file", str(validation_file),
        "--output_dir", str(resumed), *TINY_ARGS, "--sample_max_new_tokens", "0", "--no_plots",
        "--max_steps", "10", "--logging_steps", "2", "--eval_steps", "4", "--save_steps", "4",
        "--resume_from_checkpoint", "last",
    ]  # fmt: skip
    result = run(command, cwd=tmp_path, env=offline_env(tmp_path))
    assert "finished: 10 steps" in result.stdout
    history = json.loads((resumed / "trainer_state.json").read_text())["log_history"]
    # Steps 2-8 come from checkpoint-8's restored state, 10 from the resumed run.
    assert [entry["step"] for entry in history if "loss" in entry] == [2, 4, 6, 8, 10]


def test_parse_config_overrides_types_and_unknown_fields():
    run_clm = load_example("run_clm")
    parsed = run_clm.parse_config_overrides(
        "hidden_size=128, gate_mode=weighted,router_aux_loss_coef=0.02,tie_word_embeddings=true"
    )
    assert parsed == {
        "hidden_size": 128,
        "gate_mode": "weighted",
        "router_aux_loss_coef": 0.02,
        "tie_word_embeddings": True,
    }
    assert run_clm.parse_config_overrides("data_capacity=None") == {"data_capacity": None}
    assert run_clm.parse_config_overrides(None) == {}
    with pytest.raises(ValueError, match="--config_overrides: unknown config field 'hiden_size'"):
        run_clm.parse_config_overrides("hiden_size=128")
    with pytest.raises(ValueError, match="--config_overrides: expected `field=value`"):
        run_clm.parse_config_overrides("hidden_size")


def test_unigram_perplexity_matches_hand_computation():
    run_clm = load_example("run_clm")
    train = torch.tensor([0, 0, 0, 1])  # counts + 1 over a vocabulary of 3: [4, 2, 1] / 7
    evaluation = torch.tensor([0, 2])
    expected = torch.tensor([4 / 7, 1 / 7]).log().mean().neg().exp().item()
    assert run_clm.unigram_perplexity(train, evaluation, vocab_size=3) == pytest.approx(expected)
    # A uniform distribution over V tokens has perplexity V.
    assert run_clm.unigram_perplexity(torch.arange(10), torch.arange(10), vocab_size=10) == pytest.approx(10.0)


def test_bad_input_fails_with_the_argument_named(corpus, tmp_path):
    run_clm = load_example("run_clm")
    train_file, validation_file = corpus
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    base = ["--output_dir", str(tmp_path / "out"), "--max_steps", "1", *TINY_ARGS]

    def fails(extra: list[str], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            run_clm.main([*base, *extra])

    fails(["--validation_file", str(validation_file)], "--train_file is required")
    fails(["--train_file", str(tmp_path / "missing.txt")], "--train_file: file not found")
    fails(["--train_file", str(empty)], "--train_file: .* is empty")
    fails(["--train_file", str(train_file), "--validation_file", str(empty)], "--validation_file: .* is empty")
    fails(
        ["--train_file", str(train_file), "--config_overrides", "hidden_size=32,num_expert=4"],
        "--config_overrides: unknown config field 'num_expert'",
    )

    # A tokenizer with more tokens than the model has embeddings.
    tokenizer = run_clm.train_bpe_tokenizer(read_text(train_file)[:50_000], vocab_size=400)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    small = UoEForCausalLM(
        UoEConfig(
            vocab_size=300,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            attention_top_k=1,
            intermediate_size=64,
        )
    )
    small.save_pretrained(tmp_path / "small_model")
    fails(
        [
            "--train_file", str(train_file), "--validation_file", str(validation_file),
            "--model_name_or_path", str(tmp_path / "small_model"), "--tokenizer_name", str(tmp_path / "tokenizer"),
        ],
        r"--tokenizer_name: the tokenizer has 400 tokens but the model's vocab_size is 300",
    )  # fmt: skip


@pytest.mark.slow
def test_main_job_quick(tmp_path):
    command = [
        sys.executable, str(EXAMPLES / "main_job.py"), "--quick",
        "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"), "--max_steps", "6",
    ]  # fmt: skip
    result = run(command, cwd=tmp_path, env=offline_env(tmp_path))
    assert "validation perplexity" in result.stdout and "unigram baseline" in result.stdout
    assert "main job finished in" in result.stdout
    assert (tmp_path / "data" / "train.txt").stat().st_size > 4_000_000  # the real corpus, 40 works
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert model.config.num_hidden_layers == 2
    # the default recipe, the recipe study's best UoE arm: weighted gates and peri-norm
    assert "recipe              weighted_peri" in result.stdout
    assert (model.config.gate_mode, model.config.norm_placement) == ("weighted", "peri")
    # the reported perplexity, recomputed from the saved model and tokenizer on the validation text the job wrote:
    # the first 32 blocks of 128 tokens of its first 300,000 characters (QUICK_ARGS)
    results = json.loads((tmp_path / "run" / "all_results.json").read_text())
    text = (tmp_path / "data" / "validation.txt").read_text(encoding="utf-8")[:300_000]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run")
    blocks = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][: 32 * 128]).view(32, 128)
    with torch.no_grad():
        logits = model.eval()(blocks, use_cache=False).logits
    token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), blocks[:, 1:].reshape(-1))
    assert results["eval_perplexity"] == pytest.approx(float(token_loss.exp()), rel=1e-4)
    assert f"validation perplexity {results['eval_perplexity']:.2f} vs unigram baseline" in result.stdout
