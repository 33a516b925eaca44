"""What the benchmark scripts share: the environment record, the models by config, parameter counting and the width
solver, FLOP counting, the training loop, evaluation, command-line checks, tables and RESULTS.md sections.
The analytic FLOPs are in `uoe.flops` (UoE) and `baseline_flops.py` (the baselines)."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
RESULTS_DIR = ROOT / "benchmarks" / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def environment(script: str, argv: list[str] | None) -> dict[str, Any]:
    """What a reader needs to judge a script's numbers: date, device, CPU, versions, commit, command, load at the
    start (`loadavg_end` is the script's to add). `argv`: the script's arguments (None: `sys.argv[1:]`)."""
    import transformers  # noqa: PLC0415

    import uoe  # noqa: PLC0415

    arguments = sys.argv[1:] if argv is None else argv
    record = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "uoe": uoe.__version__,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "uoe_uncommitted_changes": bool(_git("status", "--porcelain", "--", "uoe")),
        "platform": platform.platform(),
        "command": shlex.join([".venv/bin/python", f"benchmarks/{script}", *arguments]),
        "loadavg_start": list(os.getloadavg()),
    }
    if torch.cuda.is_available():
        record["cuda"] = torch.version.cuda
        record["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        try:
            import triton  # noqa: PLC0415

            record["triton"] = triton.__version__
        except ImportError:
            record["triton"] = None
    return record


def parse_int_list(name: str, text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be a comma-separated list of integers, got {text!r}.") from None
    if not values:
        raise ValueError(f"--{name} must list at least one integer, got {text!r}.")
    if len(set(values)) != len(values):
        raise ValueError(f"--{name} has duplicates: {text!r}.")
    return values


def parse_choices(name: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"--{name} must be a comma-separated subset of {list(allowed)}, got {text!r}.")
    return list(dict.fromkeys(values))


def check_positive(name: str, value, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"--{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}.")


def model_class(model_type: str) -> type:
    """The model class of a config's `model_type` in the comparisons: UoE, transformers' baselines, MoEUT's."""
    import transformers  # noqa: PLC0415

    import uoe  # noqa: PLC0415

    if model_type == "uoe":
        return uoe.UoEForCausalLM
    if model_type == "moeut_baseline":
        import moeut  # noqa: PLC0415  (benchmarks/moeut.py, next to this file)

        return moeut.MoEUTForCausalLM
    names = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
             "deepseek_v3": "DeepseekV3ForCausalLM"}  # fmt: skip
    return getattr(transformers, names[model_type])


def config_from_dict(values: dict[str, Any]):
    """The config object of a `config.to_dict()` (worker processes and saved records hold configs as dicts)."""
    return model_class(values["model_type"]).config_class.from_dict(values)


def instantiate(config, device: str | torch.device = "cpu", **kwargs) -> torch.nn.Module:
    """A model built from `config` on `device` with SDPA attention (`kwargs`: more `_from_config` arguments)."""
    with torch.device(device):
        if config.model_type == "moeut_baseline":  # its own SDPA attention, not a transformers attention interface
            return model_class(config.model_type)(config)
        return model_class(config.model_type)._from_config(config, attn_implementation="sdpa", **kwargs)


def count_parameters(model: torch.nn.Module | Any) -> int:
    """Parameters of a model, or of the model a config builds (on the meta device: no memory, no initialisation)."""
    if not isinstance(model, torch.nn.Module):
        model = instantiate(model, "meta")
    return sum(p.numel() for p in model.parameters())


def solve_width(measure: Callable[[int], float], target: float, widths: range = range(1, 2**20)) -> int:
    """The width of `widths` whose `measure` (a count that grows with the width: parameters, FLOPs) is closest to
    `target`, the smaller of two equally close; by bisection, so a measure that builds a model runs ~20 times."""
    low, high = 0, len(widths) - 1
    while low < high:  # the first width whose measure reaches the target
        middle = (low + high) // 2
        if measure(widths[middle]) < target:
            low = middle + 1
        else:
            high = middle
    return min(widths[max(low - 1, 0) : low + 1], key=lambda width: abs(measure(width) - target))


# torch's FLOP counter has no formula for the CPU flash-attention kernel that SDPA runs here (it would count 0);
# give it the one of the other SDPA kernels (full Lq x Lk scores and values, causal or not).
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA not in flop_registry:
    register_flop_formula(_CPU_SDPA, get_raw=True)(sdpa_flop)  # `sdpa_flop` already takes the raw arguments


def counted_forward_flops(model: torch.nn.Module, call: Callable[[], object]) -> int:
    """FLOPs that torch's FlopCounterMode sees for one forward call (matrix products, convolutions, attention).

    The model runs as configured (SDPA attention included, see `_CPU_SDPA`), so the count is what its code executes:
    UoE's gathered path counts only the selected pairs' products and its attention over each head's compacted
    lists.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call()
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def train(
    model: torch.nn.Module,
    batches: Iterable[tuple[dict, torch.Tensor]],
    loss_fn: Callable[[torch.nn.Module, dict, torch.Tensor], torch.Tensor],
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    betas: tuple[float, float] = (0.9, 0.999),
    decay_matrices_only: bool = False,
    after_step: Callable[[], None] | None = None,
    max_grad_norm: float = 1.0,
) -> dict[str, Any]:
    """The training loop of every comparison: AdamW, linear warm-up then cosine decay to 0 at `steps` (one per
    batch), gradient clipping. `decay_matrices_only` exempts norms and biases from the weight decay; `after_step`
    runs after every optimizer step. Returns each step's loss and seconds, the total seconds and examples."""
    from transformers import get_cosine_schedule_with_warmup  # noqa: PLC0415

    model.train()
    parameters = list(model.parameters())
    if decay_matrices_only:
        parameters = [
            {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
        ]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, betas=betas)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    losses, step_seconds, examples = [], [], 0
    start = time.perf_counter()
    for inputs, labels in batches:
        step_start = time.perf_counter()
        loss = loss_fn(model, inputs, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {len(losses)}: {loss.item()}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        losses.append(float(loss.detach()))
        examples += len(labels)
        step_seconds.append(time.perf_counter() - step_start)
    return {
        "losses": losses,
        "step_seconds": step_seconds,
        "seconds": time.perf_counter() - start,
        "examples": examples,
    }


def train_epochs(
    model: torch.nn.Module,
    batches: Callable[[int], Iterable[tuple[dict, torch.Tensor]]],
    loss_fn: Callable[[torch.nn.Module, dict, torch.Tensor], torch.Tensor],
    args: argparse.Namespace,
    steps_per_epoch: int,
) -> dict[str, Any]:
    """`train` over `args.epochs` passes of `batches(epoch)` with the optimizer settings of `args` (the classifier
    comparisons; warm-up at most half the steps), summarised for their tables."""
    steps = args.epochs * steps_per_epoch
    run = train(
        model,
        (batch for epoch in range(args.epochs) for batch in batches(epoch)),
        loss_fn,
        steps=steps,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=min(args.warmup_steps, steps // 2),
    )
    losses, seconds = run["losses"], run["seconds"]
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "train_seconds": seconds,
        "train_steps": len(losses),
        "train_examples": run["examples"],
        "train_examples_per_s": run["examples"] / seconds,
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
    }


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterator[tuple[dict, torch.Tensor]],
    logits_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
) -> dict:
    model.eval()
    correct = total = 0
    start = time.perf_counter()
    for inputs, labels in batches:
        predictions = logits_fn(model, inputs).argmax(-1)
        correct += int((predictions == labels).sum())
        total += len(labels)
    seconds = time.perf_counter() - start
    model.train()
    return {"accuracy": correct / total, "eval_examples": total, "eval_examples_per_s": total / seconds}


def mean_spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def fmt_mean(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean, spread = mean_spread([v * scale for v in values])
    if spread is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def fmt_count(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def replace_section(path: Path, heading: str, body: str) -> None:
    """Replace the `## heading` section of a markdown file (up to the next `## ` heading), or append it.

    Other sections are kept byte for byte. The file is re-read right before writing, so a section another
    script wrote meanwhile survives.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    section = f"{heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        new = pattern.sub(lambda _: section + "\n", text, count=1)
        new = new.rstrip("\n") + "\n"
    else:
        new = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


def display_path(path) -> str:
    """`path` relative to the repository when it is inside it, else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def write_json(path: Path, payload: dict, indent: int = 2) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=indent) + "\n", encoding="utf-8")


def load_note(load_start: list[float], load_end: list[float], cores: int | None, threads: int = 1) -> str:
    """The load averages around a run of `threads` threads, flagged when other processes took about a core."""
    cores = cores or 1
    # the 1-minute load at the end includes the run's own threads
    high = max(load_start[0], load_end[0] - threads) > 0.75
    text = (
        f"`os.getloadavg()` (1/5/15 min) at start {', '.join(f'{v:.2f}' for v in load_start)}, "
        f"at end {', '.join(f'{v:.2f}' for v in load_end)} on {cores} cores."
    )
    if high:
        text += (
            " The load was above the run's own threads at the start or the end (the 1-minute average still counts a "
            "job that finished just before, or other processes ran), so the throughput figures may be lower and "
            "noisier than on an idle machine (accuracy and FLOPs are unaffected)."
        )
    return text


def run_grid(
    run_one: Callable[[str, int], dict], names: list[str], seeds: list[int], describe: Callable[[dict], str]
) -> dict[str, list[dict]]:
    """Run every model for every seed (seed-major, so a slow spell of the machine hits all models alike).

    A run that raises is recorded as `{"seed": ..., "error": ...}` and reported, not dropped.
    """
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for seed in seeds:
        for name in names:
            started = time.perf_counter()
            try:
                run = run_one(name, seed)
                print(
                    f"{name} seed {seed}: {describe(run)}, {time.perf_counter() - started:.0f}s, "
                    f"load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
            except Exception as error:  # a model that cannot run is reported, not dropped
                traceback.print_exc()
                run = {"seed": seed, "error": f"{type(error).__name__}: {error}"}
            runs[name].append(run)
    return runs


# -- command line and the end of a run, shared by compare_vision.py and compare_listops.py -----------------------

THREADS_NOTE = (
    "- One torch thread (`--threads 1`, the default): on this shared 2-core machine two OpenMP threads made "
    "training 3-4x slower."
)


def add_common_arguments(
    parser: argparse.ArgumentParser,
    models: tuple[str, ...],
    *,
    batch_size: int,
    eval_batch_size: int,
    lr: float,
    weight_decay: float,
    json_stem: str,
) -> None:
    """The arguments every classifier comparison takes: mode, models, seeds, data sizes, optimizer, threads, outputs.
    `None` defaults are filled from the script's `MODES` table by `parse_common_arguments`."""
    parser.add_argument("--quick", action="store_true", help="small budget (a few minutes on 2 CPU cores)")
    parser.add_argument("--models", default=",".join(models), help=f"comma-separated subset of {list(models)}")
    parser.add_argument("--seeds", default=None, help="comma-separated integers (default: quick 0, full 0,1)")
    parser.add_argument("--train_samples", type=int, default=None)
    parser.add_argument("--test_samples", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=batch_size)
    parser.add_argument("--eval_batch_size", type=int, default=eval_batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--weight_decay", type=float, default=weight_decay)
    parser.add_argument("--warmup_steps", type=int, default=50)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core machine, 2 OpenMP threads ran 3-4x slower)",
    )
    parser.add_argument("--results_md", default=str(DEFAULT_RESULTS_MD), help="markdown file whose section is replaced")
    parser.add_argument(
        "--output", default=None, help=f"JSON path (default benchmarks/results/{json_stem}_<mode>.json)"
    )
    parser.set_defaults(json_stem=json_stem)


def parse_common_arguments(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    modes: dict[str, dict],
    models: tuple[str, ...],
    extra_checks: Callable[[argparse.Namespace], None] | None = None,
) -> argparse.Namespace:
    """Parse, fill the mode's defaults, validate (a bad value exits with a message naming the argument)."""
    args = parser.parse_args(argv)
    args.mode = "quick" if args.quick else "full"
    for key, value in modes[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.model_list = parse_choices("models", args.models, models)
        args.seed_list = parse_int_list("seeds", args.seeds)
        for name in ("train_samples", "test_samples", "epochs", "batch_size", "eval_batch_size", "lr", "threads"):
            check_positive(name, getattr(args, name))
        check_positive("weight_decay", args.weight_decay, allow_zero=True)
        check_positive("warmup_steps", args.warmup_steps, allow_zero=True)
        if extra_checks is not None:
            extra_checks(args)
    except ValueError as error:
        parser.error(str(error))
    if args.output is None:
        args.output = str(RESULTS_DIR / f"{args.json_stem}_{args.mode}.json")
    return args


def common_settings(args: argparse.Namespace) -> dict:
    """The settings every classifier comparison records with its results."""
    keys = ("mode", "train_samples", "test_samples", "epochs", "batch_size", "lr", "weight_decay", "warmup_steps")
    return {"models": args.model_list, "seeds": args.seed_list, **{key: getattr(args, key) for key in keys}}


def summarize(results: dict, names: list[str], first: tuple[str, ...], per_seed: dict[str, str]) -> list[dict]:
    """Per model: its finished runs and failures, the `first` fields of its first run (the same for every seed) and
    the `per_seed` fields (summary name: run field) as lists over its seeds."""
    rows = []
    for name in names:
        runs = results["runs"].get(name, [])
        ok = [r for r in runs if "error" not in r]
        row = {
            "model": name,
            "runs": len(ok),
            "failed": [f"seed {r['seed']}: {r['error']}" for r in runs if "error" in r],
        }
        if ok:
            row.update({key: ok[0][key] for key in first})
            row.update({key: [r[field] for r in ok] for key, field in per_seed.items()})
        rows.append(row)
    return rows


def section_text(results: dict, body: list[str], notes: list[str]) -> str:
    """A classifier comparison's RESULTS.md section: mode, date, command and machine; the script's `body` (settings,
    table) and `notes`; the notes every comparison has (threads, load, failed models) and the JSON's path."""
    env, settings = results["environment"], results["settings"]
    failed = [f"- {row['model']}: {'; '.join(row['failed'])}" for row in results["summary"] if row["failed"]]
    return "\n".join([
        f"Mode `{settings['mode']}`, {env['date_utc']}, `{env['command']}`; {env['device']} ({env['cpu']}, "
        f"{env['cpu_count']} cores, {env['torch_threads']} torch threads), Python {env['python']}, torch "
        f"{env['torch']}, transformers {env['transformers']}. Wall time {results['wall_seconds'] / 60:.1f} min.",
        "", *body, "", *notes, THREADS_NOTE, f"- {results['load_note']}",
        *(["", "Models that did not run:", *failed] if failed else []), "", f"Raw results: `{results['json_path']}`.",
    ])  # fmt: skip


def finish_run(
    results: dict,
    args: argparse.Namespace,
    started: float,
    summary_fields: tuple[tuple[str, ...], dict[str, str]],
    markdown: Callable[[dict], str],
    section: str,
) -> int:
    """Summarise (`summary_fields`: `summarize`'s `first` and `per_seed`), write the JSON and the RESULTS.md section,
    print the section; exit status 1 if a run failed."""
    env = results["environment"]
    env["loadavg_end"] = list(os.getloadavg())
    results["wall_seconds"] = time.perf_counter() - started
    results["summary"] = summarize(results, args.model_list, *summary_fields)
    results["load_note"] = load_note(
        env["loadavg_start"], env["loadavg_end"], env["cpu_count"], torch.get_num_threads()
    )
    results["json_path"] = display_path(args.output)
    write_json(Path(args.output), results)
    text = markdown(results)
    if args.results_md and args.results_md.lower() != "none":
        replace_section(Path(args.results_md), section, text)
    print(text)
    return 1 if any(row["failed"] for row in results["summary"]) else 0
