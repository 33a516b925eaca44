#!/usr/bin/env python
"""Merge, then compress (MC-SMoE, `uoe.merging`) on a UoE language model trained here on Shakespeare (issue 26).

    .venv/bin/python benchmarks/merge_experts.py --quick   # tiny model, seconds (the test runs it)
    .venv/bin/python benchmarks/merge_experts.py           # full mode: see the time estimate below

The model is the comparison's UoE (`benchmarks/compare_lm.py`, `uoe_weighted`): vocabulary 2048 (byte-level BPE
trained on the training text), width 128, 4 layers, 4 heads with 2 selected, MLP 512 cut into 8 UoME experts of
width 64 with 2 selected (`gate_mode="weighted"`), Switch aux loss 0.01, untied embeddings, sequence 128, trained
from scratch for 500 steps of 16 x 128 tokens (AdamW 3e-3, betas 0.9/0.95, weight decay 0.1 on matrices, 25 warm-up
steps then cosine, gradient clipping 1.0) on the Shakespeare split of `uoe.data` (the last two works held out).

Every variant starts from that trained model and is calibrated on the same `calibration_batches` training batches
(no gradient steps):

- `original`: the trained model, 8 experts;
- `msmoe_N`: M-SMoE to N experts per block (`merge_experts`: dominant experts by routing frequency, the others
  grouped by router-logit similarity, units aligned by weight matching, frequency-weighted averages, router rows
  averaged alike);
- `msmoe_noalign_N`: the same without the permutation alignment (ablation);
- `random_N`: random grouping, then the same alignment and frequency-weighted merge (MC-SMoE's baseline);
- `drop_N`: keep the N most frequently selected experts, discard the others (the pruning baseline);
- `msmoe_N_pruned`: M-SMoE to the smallest N, then structured pruning of every expert to `compress_width` hidden units
  by calibration importance (still a plain `UoEForCausalLM`);
- `msmoe_N_pruned_lowrank`: the same, then every expert projection at rank `compress_rank` (`LowRankExperts`).

Then every variant (the original included) is fine-tuned for `finetune_steps` steps on fresh training batches (the
ones after the pre-training batches in the seed's order; AdamW `finetune_lr`, 10% warm-up then cosine, the model's
own loss including its aux loss) and evaluated again. Reported per variant: routed experts per block, expert width,
parameters, active forward FLOPs per token (`uoe.estimate_flops_per_token` at the sequence length, LM head
included, a multiply-add = 2; low-rank experts counted by `uoe.merging.expert_flops`), validation perplexity on
`eval_blocks` held-out blocks (exp of the token cross-entropy, no aux loss) before and after the fine-tune.

Writes `benchmarks/results/merge_experts.json` (raw) and replaces the section "## Expert merging (merge_experts.py)"
of `benchmarks/RESULTS.md`; `--output`, `--results_md` and `--work_dir` (the token cache) move them.

Time estimate of the full mode (2 seeds), measured on this project's shared 2-core machine with 1 torch thread by
`--time_steps` (see the README): pre-training 500 steps and 9 fine-tunes of 100 steps per seed, i.e. 1,400 steps of
16 x 128 tokens per seed, 2,800 in all, plus tokenizer training, calibration and evaluation.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import uoe  # noqa: E402
from uoe.merging import (  # noqa: E402
    collect_expert_statistics,
    drop_experts,
    expert_flops,
    low_rank_experts,
    merge_experts,
    moe_blocks,
    prune_expert_units,
)

SECTION = "## Expert merging (merge_experts.py)"


@dataclasses.dataclass
class Setup:
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    attention_top_k: int = 2
    intermediate_size: int = 512
    num_experts: int = 8
    top_k: int = 2
    gate_mode: str = "weighted"
    seq_len: int = 128
    batch_size: int = 16
    train_steps: int = 500
    learning_rate: float = 3e-3
    warmup_steps: int = 25
    weight_decay: float = 0.1
    aux_coef: float = 0.01
    calibration_batches: int = 8
    merge_targets: tuple[int, ...] = (6, 4)
    compress_width: int = 48
    compress_rank: int = 32
    finetune_steps: int = 100
    finetune_lr: float = 1e-3
    eval_blocks: int = 160
    max_train_chars: int | None = None


FULL = Setup()
QUICK = Setup(
    vocab_size=512,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    seq_len=32,
    batch_size=8,
    train_steps=12,
    warmup_steps=2,
    calibration_batches=2,
    compress_width=6,
    compress_rank=4,
    finetune_steps=3,
    eval_blocks=16,
    max_train_chars=200_000,
)


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE trained on `text` (no unknown tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return tokenizer


def encode(tokenizer, text: str) -> torch.Tensor:
    lines = text.splitlines(keepends=True)
    ids = [i for encoding in tokenizer.encode_batch(lines) for i in encoding.ids]
    return torch.tensor(ids, dtype=torch.long)


def prepare_data(work_dir: Path, setup: Setup) -> dict[str, Any]:
    """Token ids of the training and validation text (cached in `work_dir`)."""
    from uoe.data import shakespeare_files, write_train_validation_split

    cache = work_dir / f"tokens_v{setup.vocab_size}_c{setup.max_train_chars or 'all'}.pt"
    if cache.is_file():
        return torch.load(cache)
    start = time.perf_counter()
    train_path, validation_path = write_train_validation_split(work_dir / "text", validation_works=2)
    train_text = train_path.read_text(encoding="utf-8")[: setup.max_train_chars]
    validation_text = validation_path.read_text(encoding="utf-8")
    tokenizer = train_tokenizer(train_text, setup.vocab_size)
    data = {
        "train": encode(tokenizer, train_text),
        "validation": encode(tokenizer, validation_text),
        "info": {
            "train_chars": len(train_text),
            "validation_works": [path.stem for path in shakespeare_files()[-2:]],
            "tokenizer_vocab": tokenizer.get_vocab_size(),
            "seconds": time.perf_counter() - start,
        },
    }
    data["info"]["train_tokens"] = len(data["train"])
    data["info"]["validation_tokens"] = len(data["validation"])
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    return data


def blocks_of(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    return ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)


def validation_blocks(ids: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """`count` non-overlapping blocks evenly spaced over the validation text."""
    blocks = blocks_of(ids, seq_len)
    index = torch.linspace(0, len(blocks) - 1, min(count, len(blocks))).round().long().unique()
    return blocks[index]


# ---------------------------------------------------------------------------------------------------------------------
# Model, training, evaluation
# ---------------------------------------------------------------------------------------------------------------------


def model_config(setup: Setup, vocab_size: int) -> uoe.UoEConfig:
    return uoe.UoEConfig(
        vocab_size=vocab_size,
        hidden_size=setup.hidden_size,
        num_hidden_layers=setup.num_layers,
        num_attention_heads=setup.num_heads,
        attention_top_k=setup.attention_top_k,
        intermediate_size=setup.intermediate_size,
        num_mlp_experts=setup.num_experts,
        mlp_top_k=setup.top_k,
        gate_mode=setup.gate_mode,
        router_aux_loss_coef=setup.aux_coef,
        router_z_loss_coef=0.0,
        max_position_embeddings=setup.seq_len,
        tie_word_embeddings=False,
        initializer_range=0.02,
    )


def train(model, batches: torch.Tensor, steps: int, lr: float, warmup: int, weight_decay: float) -> dict[str, Any]:
    """AdamW (betas 0.9/0.95, decay on matrices), linear warm-up then cosine, clipping 1.0; `batches` is
    `(steps, batch, seq)`. The loss is the model's own (token cross-entropy + its aux loss)."""
    from transformers import get_cosine_schedule_with_warmup

    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    losses, step_seconds = [], []
    start = time.perf_counter()
    for step in range(steps):
        step_start = time.perf_counter()
        batch = batches[step]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_seconds.append(time.perf_counter() - step_start)
    model.eval()
    return {
        "seconds": time.perf_counter() - start,
        "median_step_seconds": statistics.median(step_seconds) if step_seconds else math.nan,
        "first_loss": losses[0] if losses else math.nan,
        "last_loss": losses[-1] if losses else math.nan,
    }


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for chunk in blocks.split(batch_size):
        logits = model(input_ids=chunk).logits[:, :-1]
        total += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


def active_flops_per_token(model, seq_len: int) -> float:
    """`uoe.estimate_flops_per_token`'s active FLOPs, with the MLP experts' term recounted from the experts modules
    (their width and, for `LowRankExperts`, their ranks)."""
    config = model.config
    estimate = uoe.estimate_flops_per_token(config, seq_len)
    experts = sum(config.mlp_top_k * expert_flops(block.experts) for block in moe_blocks(model, stacked=False))
    return estimate.active - estimate.breakdown["mlp"] + experts


def parameter_count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def describe(model) -> dict[str, Any]:
    block = moe_blocks(model, stacked=False)[0]
    experts = block.experts
    rank = getattr(experts, "up_rank", None)
    return {
        "experts": block.num_routed,
        "expert_width": block.width if rank is None else int(experts.intermediate_dim),
        "rank": None if rank is None else [int(experts.up_rank), int(experts.down_rank)],
        "class": type(model).__name__,
        "experts_module": type(experts).__name__,
    }


# ---------------------------------------------------------------------------------------------------------------------
# One seed
# ---------------------------------------------------------------------------------------------------------------------


def variant_names(setup: Setup) -> list[str]:
    names = ["original"]
    for n in setup.merge_targets:
        names += [f"msmoe_{n}", f"msmoe_noalign_{n}", f"random_{n}", f"drop_{n}"]
    smallest = min(setup.merge_targets)
    names += [f"msmoe_{smallest}_pruned", f"msmoe_{smallest}_pruned_lowrank"]
    return names


def build_variants(model, calibration: list[torch.Tensor], setup: Setup, seed: int):
    """Yield `(name, model, seconds to build, merge plan as a dict or None)` for every variant, from the trained
    `model` (not modified)."""
    start = time.perf_counter()
    stats = collect_expert_statistics(model, calibration)
    stats_seconds = time.perf_counter() - start
    yield "original", model, 0.0, None
    merged = {}
    for n in setup.merge_targets:
        for name, kwargs in (
            (f"msmoe_{n}", {}),
            (f"msmoe_noalign_{n}", {"alignment": "none"}),
            (f"random_{n}", {"grouping": "random", "seed": 1000 * seed + n}),
        ):
            start = time.perf_counter()
            result, plan = merge_experts(model, num_experts=n, statistics=stats, **kwargs)
            seconds = stats_seconds + time.perf_counter() - start
            if name == f"msmoe_{n}":
                merged[n] = (result, seconds)
            yield name, result, seconds, plan.to_dict()
        start = time.perf_counter()
        dropped = drop_experts(model, num_experts=n, statistics=stats)
        yield f"drop_{n}", dropped, stats_seconds + time.perf_counter() - start, None
    smallest = min(setup.merge_targets)
    base, base_seconds = merged[smallest]
    start = time.perf_counter()
    pruned = prune_expert_units(base, calibration, setup.compress_width)
    pruned_seconds = base_seconds + time.perf_counter() - start
    yield f"msmoe_{smallest}_pruned", pruned, pruned_seconds, None
    start = time.perf_counter()
    low = low_rank_experts(pruned, setup.compress_rank)
    yield f"msmoe_{smallest}_pruned_lowrank", low, pruned_seconds + time.perf_counter() - start, None


def run_seed(seed: int, data: dict[str, Any], setup: Setup, log) -> dict[str, Any]:
    train_blocks = blocks_of(data["train"], setup.seq_len)
    eval_blocks = validation_blocks(data["validation"], setup.seq_len, setup.eval_blocks)
    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(seed))
    needed = (setup.train_steps + setup.finetune_steps) * setup.batch_size
    order = order.repeat(math.ceil(needed / len(order)))
    pretrain = train_blocks[order[: setup.train_steps * setup.batch_size]].view(
        setup.train_steps, setup.batch_size, setup.seq_len
    )
    finetune = train_blocks[order[setup.train_steps * setup.batch_size : needed]].view(
        setup.finetune_steps, setup.batch_size, setup.seq_len
    )
    calibration = list(pretrain[: setup.calibration_batches])

    torch.manual_seed(seed)
    model = uoe.UoEForCausalLM(model_config(setup, data["info"]["tokenizer_vocab"]))
    pretraining = train(model, pretrain, setup.train_steps, setup.learning_rate, setup.warmup_steps, setup.weight_decay)
    log(f"seed {seed}: pre-trained in {pretraining['seconds']:.0f} s, last loss {pretraining['last_loss']:.3f}")

    rows = {}
    for name, variant, build_seconds, plan in build_variants(model, calibration, setup, seed):
        start = time.perf_counter()
        row = {
            **describe(variant),
            "parameters": parameter_count(variant),
            "active_flops_per_token": active_flops_per_token(variant, setup.seq_len),
            "build_seconds": build_seconds,
            "perplexity": perplexity(variant, eval_blocks, setup.batch_size),
        }
        tuned = copy.deepcopy(variant)
        warmup = max(1, setup.finetune_steps // 10)
        row["finetune"] = train(tuned, finetune, setup.finetune_steps, setup.finetune_lr, warmup, setup.weight_decay)
        row["perplexity_finetuned"] = perplexity(tuned, eval_blocks, setup.batch_size)
        row["seconds"] = time.perf_counter() - start
        if plan is not None:
            row["merge_plan"] = plan
        rows[name] = row
        log(
            f"seed {seed} {name}: {row['experts']} experts, ppl {row['perplexity']:.2f} -> "
            f"{row['perplexity_finetuned']:.2f} after fine-tune ({row['seconds']:.0f} s)"
        )
        del tuned
    return {"seed": seed, "pretraining": pretraining, "variants": rows}


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------

LABELS = {
    "original": "original (trained)",
    "msmoe": "M-SMoE merge",
    "msmoe_noalign": "M-SMoE merge, no alignment",
    "random": "random grouping + merge",
    "drop": "drop least-used experts",
}


def label(name: str, setup: Setup) -> str:
    if name == "original":
        return LABELS["original"]
    if name.endswith("_pruned_lowrank"):
        return f"M-SMoE + prune to width {setup.compress_width} + rank {setup.compress_rank}"
    if name.endswith("_pruned"):
        return f"M-SMoE + prune to width {setup.compress_width}"
    kind = name.rsplit("_", 1)[0]
    return LABELS[kind]


def fmt_mean(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarize(runs: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    summary = []
    for name in names:
        rows = [run["variants"][name] for run in runs]
        first = rows[0]
        summary.append(
            {
                "variant": name,
                "experts": first["experts"],
                "expert_width": first["expert_width"],
                "rank": first["rank"],
                "parameters": first["parameters"],
                "active_flops_per_token": first["active_flops_per_token"],
                "perplexity": [r["perplexity"] for r in rows],
                "perplexity_finetuned": [r["perplexity_finetuned"] for r in rows],
                "build_seconds": [r["build_seconds"] for r in rows],
            }
        )
    return summary


def markdown(record: dict[str, Any]) -> str:
    setup = Setup(**{**record["setup"], "merge_targets": tuple(record["setup"]["merge_targets"])})
    env = record["environment"]
    original = next(row for row in record["summary"] if row["variant"] == "original")
    lines = [
        "| variant | experts | expert width (rank) | parameters | active FLOPs/token | ×original | val. perplexity | "
        f"after fine-tune ({setup.finetune_steps} steps) | calibration + merge (s) |",
        "|---|---:|---|---:|---:|---:|---|---|---:|",
    ]
    for row in record["summary"]:
        width = str(row["expert_width"]) + (f" (rank {row['rank'][0]}/{row['rank'][1]})" if row["rank"] else "")
        lines.append(
            f"| {label(row['variant'], setup)} | {row['experts']} | {width} | {row['parameters']:,} | "
            f"{row['active_flops_per_token'] / 1e6:.3f} M | "
            f"{row['active_flops_per_token'] / original['active_flops_per_token']:.2f} | "
            f"{fmt_mean(row['perplexity'])} | {fmt_mean(row['perplexity_finetuned'])} | "
            f"{statistics.mean(row['build_seconds']):.1f} |"
        )
    seeds = ", ".join(str(run["seed"]) for run in record["runs"])
    info = record["data"]
    return "\n".join(
        [
            f"Mode `{record['mode']}`, {env['date_utc']}, `{env['command']}`; {env['cpu']} ({env['cpu_count']} cores, "
            f"{env['torch_threads']} torch threads), Python {env['python']}, torch {env['torch']}, transformers "
            f"{env['transformers']}; load average {env['loadavg_start'][0]:.2f} at the start, "
            f"{record['loadavg_end'][0]:.2f} at the end. Wall time {record['wall_seconds'] / 60:.1f} min.",
            "",
            f"Model: `UoEForCausalLM`, vocabulary {info['tokenizer_vocab']} (byte-level BPE on the training text), "
            f"width {setup.hidden_size}, {setup.num_layers} layers, {setup.attention_top_k} of {setup.num_heads} heads, "
            f"MLP {setup.intermediate_size} in {setup.num_experts} experts with {setup.top_k} selected "
            f'(`gate_mode="{setup.gate_mode}"`), trained {setup.train_steps} steps x {setup.batch_size} x '
            f"{setup.seq_len} tokens on Shakespeare ({info['train_tokens']:,} training tokens; validation: "
            f"{', '.join(info['validation_works'])}, {setup.eval_blocks} blocks). Calibration: "
            f"{setup.calibration_batches} training batches. Fine-tune: {setup.finetune_steps} steps of fresh "
            f"training batches, AdamW lr {setup.finetune_lr:g}, for every row (the original too). Seeds {seeds} "
            "(mean ± std over seeds; each seed trains its own model).",
            "",
            *lines,
            "",
            "- Active FLOPs: forward, per token, a multiply-add = 2, LM head included (`uoe.estimate_flops_per_token` "
            "at the sequence length, the experts recounted from their modules). Merging keeps the top-k, so it "
            "saves parameters, not FLOPs; pruning and low rank save both.",
            f"- Groups, weights and frequencies of every block are in the raw JSON (`{record['json_path']}`).",
        ]
    )


def replace_section(path: Path, heading: str, body: str) -> None:
    """Replace the section `heading` (up to the next `## ` heading) of `path`, or append it."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n"
    section = f"{heading}\n\n{body.strip()}\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    path.write_text(text, encoding="utf-8")


def environment() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "loadavg_start": list(os.getloadavg()),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and budgets (seconds)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0,1 full, 0 quick)")
    parser.add_argument("--train_steps", type=int, default=None)
    parser.add_argument("--finetune_steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--work_dir", type=Path, default=ROOT / "runs" / "merge_experts")
    parser.add_argument("--output", type=Path, default=None, help="raw JSON (default benchmarks/results/...)")
    parser.add_argument("--results_md", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument(
        "--time_steps",
        type=int,
        default=0,
        help="only time this many pre-training steps of the full model and print the full mode's estimate",
    )
    args = parser.parse_args(argv)
    seeds = args.seeds or ("0" if args.quick else "0,1")
    try:
        args.seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {seeds!r}")
    if not args.seed_list:
        parser.error("--seeds must name at least one seed")
    for name in ("train_steps", "finetune_steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "finetune_steps" else 1):
            parser.error(f"--{name} must be positive, got {value}")
    if args.finetune_steps == 0:
        parser.error("--finetune_steps must be >= 1")
    return args


def time_steps(data: dict[str, Any], setup: Setup, steps: int, seeds: int) -> dict[str, Any]:
    """Time `steps` training steps of the full model (after one warm-up step) and extrapolate the full mode."""
    blocks = blocks_of(data["train"], setup.seq_len)[: (steps + 1) * setup.batch_size]
    batches = blocks.view(steps + 1, setup.batch_size, setup.seq_len)
    torch.manual_seed(0)
    model = uoe.UoEForCausalLM(model_config(setup, data["info"]["tokenizer_vocab"]))
    train(model, batches[:1], 1, setup.learning_rate, 1, setup.weight_decay)
    stats = train(model, batches[1:], steps, setup.learning_rate, 1, setup.weight_decay)
    per_step = stats["seconds"] / steps
    start = time.perf_counter()
    perplexity(model, validation_blocks(data["validation"], setup.seq_len, setup.eval_blocks), setup.batch_size)
    eval_seconds = time.perf_counter() - start
    variants = len(variant_names(setup))
    total_steps = seeds * (setup.train_steps + variants * setup.finetune_steps)
    # each variant is evaluated twice; merging and calibration take seconds
    estimate = total_steps * per_step + seeds * variants * 2 * eval_seconds
    return {
        "seconds_per_step": per_step,
        "eval_seconds": eval_seconds,
        "steps": total_steps,
        "estimate_minutes": estimate / 60,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = dataclasses.replace(QUICK if args.quick else FULL)
    if args.train_steps:
        setup.train_steps = args.train_steps
    if args.finetune_steps:
        setup.finetune_steps = args.finetune_steps
    start = time.perf_counter()
    env = environment()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    data = prepare_data(args.work_dir, setup)
    log(f"data: {data['info']['train_tokens']:,} training / {data['info']['validation_tokens']:,} validation tokens")
    if args.time_steps:
        timing = time_steps(data, setup, args.time_steps, len(args.seed_list))
        log(
            f"{timing['seconds_per_step']:.3f} s per training step, {timing['eval_seconds']:.1f} s per evaluation: "
            f"full mode ({timing['steps']} steps) ~ {timing['estimate_minutes']:.0f} min"
        )
        return timing
    runs = [run_seed(seed, data, setup, log) for seed in args.seed_list]
    names = variant_names(setup)
    output = args.output or ROOT / "benchmarks" / "results" / (
        "merge_experts_quick.json" if args.quick else "merge_experts.json"
    )
    record = {
        "benchmark": "merge_experts",
        "mode": "quick" if args.quick else "full",
        "environment": env,
        "setup": dataclasses.asdict(setup),
        "data": data["info"],
        "runs": runs,
        "summary": summarize(runs, names),
        "wall_seconds": time.perf_counter() - start,
        "loadavg_end": list(os.getloadavg()),
        "json_path": os.path.relpath(output, ROOT) if output.is_relative_to(ROOT) else str(output),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1), encoding="utf-8")
    body = markdown(record)
    replace_section(args.results_md, SECTION, body)
    print(body)
    return record


if __name__ == "__main__":
    main()
