#!/usr/bin/env python
"""Mowst (mixture of weak and strong experts, `uoe.MowstForImageClassification`) on Fashion-MNIST (issue 26).

    .venv/bin/python benchmarks/mowst_vision.py --quick   # small data, seconds (the test runs it)
    .venv/bin/python benchmarks/mowst_vision.py           # full mode: see the time estimate in the README

Models, all trained from scratch with the same data order, AdamW (weight decay 0.05), learning rate 2e-3, 100 warm-up
steps then cosine, gradient clipping 1.0, batch 128, epochs and seeds (the recipe of `compare_vision.py`):

- `weak`: the weak expert alone, the all-MLP of "Scaling MLPs" with the vision comparison's parameter-matched shape
  (width 86, 4 residual blocks, expansion 4; `MowstWeakExpert`), cross-entropy;
- `strong`: the strong expert alone, the vision comparison's `UoEForImageClassification` (7x7 patches, width 96,
  4 layers, 2 of 4 heads, 2 of 4 experts, routing patches of one image row; `default_strong_config()`), its own loss
  (cross-entropy + router aux loss 0.01);
- `mowst`: both in one `MowstForImageClassification`, trained jointly with Mowst's expected loss
  `C CE(weak) + (1 - C) CE(strong)` (+ the strong expert's aux loss), confidence from the variance of the weak
  expert's softmax; evaluated at several confidence thresholds: an image goes to the strong expert only when
  `C < threshold` (0: the Mowst-trained weak expert alone; 1: its strong expert alone).

Reported per row: test accuracy (mean ± std over seeds), the share of test images that reach the strong expert,
analytic forward FLOPs per image (`weak + share x strong`; the weak expert's and the strong expert's matrix products,
`MowstForImageClassification.flops_per_image`; a multiply-add = 2), and evaluation throughput with the strong expert
really skipped for confident images (batches of 500).

Writes `benchmarks/results/mowst_vision.json` (raw) and replaces the section "## Mowst on Fashion-MNIST
(mowst_vision.py)" of `benchmarks/RESULTS.md`; `--output` and `--results_md` move them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gzip
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

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uoe import MowstConfig, MowstForImageClassification, UoEForImageClassification  # noqa: E402
from uoe.configuration_mowst import default_strong_config  # noqa: E402

SECTION = "## Mowst on Fashion-MNIST (mowst_vision.py)"
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", "/usr/share/dataset-fashion-mnist")
SUBSET_SEED = 12345


@dataclasses.dataclass
class Setup:
    train_samples: int = 60000
    test_samples: int = 10000
    epochs: int = 3
    batch_size: int = 128
    eval_batch_size: int = 500
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    weak_hidden_size: int = 86
    weak_num_layers: int = 4
    weak_mlp_ratio: int = 4
    mowst_loss: str = "mowst"
    confidence_dispersion: str = "variance"
    thresholds: tuple[float, ...] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0)


FULL = Setup()
QUICK = Setup(train_samples=1024, test_samples=500, epochs=1, warmup_steps=2, thresholds=(0.0, 0.5, 0.9, 1.0))


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte idx file (the MNIST format): 2 zero bytes, type 0x08, the number of dimensions, the sizes
    as big-endian 32-bit integers, then the data."""
    data = gzip.open(path, "rb").read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(folder: str | None, setup: Setup) -> dict[str, torch.Tensor]:
    candidates = [folder] if folder else [os.environ.get("UOE_FASHION_MNIST_DIR"), *FASHION_MNIST_DIRS]
    root = next((Path(c) for c in candidates if c and (Path(c) / "train-images-idx3-ubyte.gz").is_file()), None)
    if root is None:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {[c for c in candidates if c]}: install Debian's `dataset-fashion-mnist` "
            "(scripts/setup.sh does) or pass --fashion_mnist_dir."
        )
    train_x, train_y = read_idx(root / "train-images-idx3-ubyte.gz"), read_idx(root / "train-labels-idx1-ubyte.gz")
    test_x, test_y = read_idx(root / "t10k-images-idx3-ubyte.gz"), read_idx(root / "t10k-labels-idx1-ubyte.gz")
    if not 1 <= setup.train_samples <= len(train_y) or not 1 <= setup.test_samples <= len(test_y):
        raise ValueError(f"--train_samples must be in [1, {len(train_y)}] and --test_samples in [1, {len(test_y)}]")
    subset = np.random.default_rng(SUBSET_SEED).permutation(len(train_y))[: setup.train_samples]
    train = torch.from_numpy(train_x[subset].astype(np.float32) / 255)
    mean, std = float(train.mean()), float(train.std())  # the training subset's statistics

    def pixels(images: np.ndarray) -> torch.Tensor:
        return ((torch.from_numpy(images.astype(np.float32) / 255) - mean) / std)[:, None].contiguous()

    return {
        "train_x": pixels(train_x[subset]),
        "train_y": torch.from_numpy(train_y[subset].astype(np.int64)),
        "test_x": pixels(test_x[: setup.test_samples]),
        "test_y": torch.from_numpy(test_y[: setup.test_samples].astype(np.int64)),
        "root": str(root),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Models, training, evaluation
# ---------------------------------------------------------------------------------------------------------------------


def mowst_config(setup: Setup) -> MowstConfig:
    return MowstConfig(
        strong_config=default_strong_config(router_aux_loss_coef=0.01),
        weak_hidden_size=setup.weak_hidden_size,
        weak_num_layers=setup.weak_num_layers,
        weak_mlp_ratio=setup.weak_mlp_ratio,
        mowst_loss=setup.mowst_loss,
        confidence_dispersion=setup.confidence_dispersion,
    )


def build(name: str, setup: Setup, seed: int) -> tuple[torch.nn.Module, Any]:
    """The trainable module and its loss function `(module, images, labels) -> loss`."""
    torch.manual_seed(seed)
    if name == "mowst":
        return MowstForImageClassification(mowst_config(setup)), lambda m, x, y: m(pixel_values=x, labels=y).loss
    if name == "weak":  # the weak expert of a Mowst model, trained alone: same architecture and initialisation
        weak = MowstForImageClassification(mowst_config(setup)).weak
        return weak, lambda m, x, y: F.cross_entropy(m(x), y)
    if name == "strong":
        strong = UoEForImageClassification(mowst_config(setup).strong_config)
        return strong, lambda m, x, y: m(pixel_values=x, labels=y).loss
    raise ValueError(f"unknown model {name!r}")


def train(model, loss_fn, data: dict[str, torch.Tensor], setup: Setup, seed: int, max_steps: int | None = None):
    from transformers import get_cosine_schedule_with_warmup

    n = len(data["train_y"])
    steps_per_epoch = math.ceil(n / setup.batch_size)
    total = steps_per_epoch * setup.epochs if max_steps is None else max_steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup.learning_rate, weight_decay=setup.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(setup.warmup_steps, total), total)
    model.train()
    start, step, losses = time.perf_counter(), 0, []
    for epoch in range(setup.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))  # same for every model
        for begin in range(0, n, setup.batch_size):
            if step >= total:
                break
            index = order[begin : begin + setup.batch_size]
            loss = loss_fn(model, data["train_x"][index], data["train_y"][index])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
    seconds = time.perf_counter() - start
    model.eval()
    return {
        "seconds": seconds,
        "steps": step,
        "images_per_s": step * setup.batch_size / seconds,
        "last_loss": losses[-1],
    }


@torch.no_grad()
def evaluate(predict, data: dict[str, torch.Tensor], setup: Setup) -> dict[str, Any]:
    """`predict(images) -> (logits, strong mask or None)` over the test set in batches."""
    correct, strong, count = 0, 0, 0
    predict(data["test_x"][:8])  # warm-up: first-call costs are not throughput
    start = time.perf_counter()
    for begin in range(0, len(data["test_y"]), setup.eval_batch_size):
        x = data["test_x"][begin : begin + setup.eval_batch_size]
        y = data["test_y"][begin : begin + setup.eval_batch_size]
        logits, mask = predict(x)
        correct += int((logits.argmax(-1) == y).sum())
        strong += int(mask.sum()) if mask is not None else 0
        count += len(y)
    seconds = time.perf_counter() - start
    return {"accuracy": correct / count, "strong_share": strong / count, "eval_images_per_s": count / seconds}


def run_seed(seed: int, data: dict[str, torch.Tensor], setup: Setup, log) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    flops = MowstForImageClassification(mowst_config(setup)).flops_per_image()
    for name in ("weak", "strong", "mowst"):
        model, loss_fn = build(name, setup, seed)
        stats = train(model, loss_fn, data, setup, seed)
        parameters = sum(p.numel() for p in model.parameters())
        if name == "weak":
            result = evaluate(lambda x, m=model: (m(x), None), data, setup)
            rows["weak"] = {**result, "flops": flops["weak"], "parameters": parameters, "train": stats}
        elif name == "strong":
            result = evaluate(lambda x, m=model: (m(pixel_values=x).logits, torch.ones(len(x))), data, setup)
            rows["strong"] = {**result, "flops": flops["strong"], "parameters": parameters, "train": stats}
        else:
            with torch.no_grad():
                confidences = torch.cat([model(pixel_values=x).confidence for x in data["test_x"].split(500)])
            for threshold in setup.thresholds:

                def predict(x, m=model, t=threshold):
                    out = m(pixel_values=x, confidence_threshold=t)
                    return out.logits, out.strong_mask

                result = evaluate(predict, data, setup)
                rows[f"mowst@{threshold:g}"] = {
                    **result,
                    "threshold": threshold,
                    "flops": flops["weak"] + result["strong_share"] * flops["strong"],
                    "parameters": parameters,
                    "train": stats,
                }
            rows["mowst_confidence_quantiles"] = {
                str(q): float(confidences.quantile(q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)
            }
        log(f"seed {seed} {name}: trained in {stats['seconds']:.0f} s ({stats['images_per_s']:.0f} images/s)")
    return {"seed": seed, "flops": flops, "rows": rows}


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def fmt_mean(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def row_names(setup: Setup) -> list[str]:
    return ["weak", "strong", *(f"mowst@{t:g}" for t in setup.thresholds)]


def summarize(runs: list[dict[str, Any]], setup: Setup) -> list[dict[str, Any]]:
    summary = []
    for name in row_names(setup):
        rows = [run["rows"][name] for run in runs]
        summary.append(
            {
                "row": name,
                "parameters": rows[0]["parameters"],
                "accuracy": [r["accuracy"] for r in rows],
                "strong_share": [r["strong_share"] for r in rows],
                "flops": [r["flops"] for r in rows],
                "eval_images_per_s": [r["eval_images_per_s"] for r in rows],
                "train_images_per_s": [r["train"]["images_per_s"] for r in rows],
            }
        )
    return summary


def label(name: str) -> str:
    if name == "weak":
        return "weak alone (all-MLP)"
    if name == "strong":
        return "strong alone (UoE)"
    threshold = float(name.split("@")[1])
    note = " (its weak expert)" if threshold == 0 else " (its strong expert)" if threshold == 1 else ""
    return f"Mowst, threshold {threshold:g}{note}"


def markdown(record: dict[str, Any]) -> str:
    env, setup = record["environment"], record["setup"]
    strong_flops = record["runs"][0]["flops"]["strong"]
    lines = [
        "| model | test accuracy % | images to the strong expert % | FLOPs/image (analytic) | ×strong | parameters | "
        "eval images/s |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for row in record["summary"]:
        flops = statistics.mean(row["flops"])
        lines.append(
            f"| {label(row['row'])} | {fmt_mean(row['accuracy'], 100)} | {fmt_mean(row['strong_share'], 100, 1)} | "
            f"{flops / 1e6:.2f} M | {flops / strong_flops:.2f} | {row['parameters']:,} | "
            f"{fmt_mean(row['eval_images_per_s'], 1, 0)} |"
        )
    seeds = ", ".join(str(run["seed"]) for run in record["runs"])
    return "\n".join(
        [
            f"Mode `{record['mode']}`, {env['date_utc']}, `{env['command']}`; {env['cpu']} ({env['cpu_count']} cores, "
            f"{env['torch_threads']} torch threads), Python {env['python']}, torch {env['torch']}, transformers "
            f"{env['transformers']}; load average {env['loadavg_start'][0]:.2f} at the start, "
            f"{record['loadavg_end'][0]:.2f} at the end. Wall time {record['wall_seconds'] / 60:.1f} min.",
            "",
            f"Fashion-MNIST: {setup['train_samples']:,} training images (permutation seed {SUBSET_SEED}), "
            f"{setup['test_samples']:,} test images; {setup['epochs']} epochs, batch {setup['batch_size']}, AdamW lr "
            f"{setup['learning_rate']:g}, weight decay {setup['weight_decay']:g}, {setup['warmup_steps']} warm-up "
            f"steps then cosine, clipping 1.0, the same data order for every model; seeds {seeds} (mean ± std). "
            f"Mowst: loss `{setup['mowst_loss']}`, confidence from the `{setup['confidence_dispersion']}` of the weak "
            "expert's softmax, trained jointly (one optimizer), one model per seed evaluated at every threshold.",
            "",
            *lines,
            "",
            "- FLOPs: forward, per image, a multiply-add = 2, the experts' matrix products: the weak expert "
            f"{record['runs'][0]['flops']['weak'] / 1e6:.2f} M, the strong expert {strong_flops / 1e6:.2f} M (UoE's "
            "active FLOPs: routed image tokens, the CLS token dense, patch embedding, classifier); Mowst = weak + "
            "share x strong (its confidence function adds a few dozen).",
            "- Eval images/s: batches of 500, the strong expert run once per batch on the images below the threshold "
            "only (gathered with `index_select`); on this shared CPU, a throughput, not a FLOP count.",
            f"- Raw results: `{record['json_path']}`.",
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
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if "model name" in line
            ),
            cpu,
        )
    except OSError:
        pass
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
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--train_samples", type=int, default=None)
    parser.add_argument("--test_samples", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--thresholds", default=None, help="comma-separated confidence thresholds in [0, 1]")
    parser.add_argument("--mowst_loss", choices=("mowst", "mowst_star"), default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--fashion_mnist_dir", default=None)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--results_md", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument(
        "--time_steps", type=int, default=0, help="only time this many training steps per model; print the estimate"
    )
    args = parser.parse_args(argv)
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
        args.threshold_list = (
            None if args.thresholds is None else tuple(float(t) for t in args.thresholds.split(",") if t.strip())
        )
    except ValueError:
        parser.error("--seeds must be integers and --thresholds numbers, comma-separated")
    if not args.seed_list:
        parser.error("--seeds must name at least one seed")
    if args.threshold_list is not None and (
        not args.threshold_list or any(not 0 <= t <= 1 for t in args.threshold_list)
    ):
        parser.error("--thresholds must be numbers in [0, 1]")
    for name in ("train_samples", "test_samples", "epochs", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = dataclasses.replace(QUICK if args.quick else FULL)
    for name in ("train_samples", "test_samples", "epochs", "mowst_loss"):
        if getattr(args, name) is not None:
            setattr(setup, name, getattr(args, name))
    if args.threshold_list is not None:
        setup.thresholds = args.threshold_list
    start = time.perf_counter()
    env = environment()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    data = load_fashion_mnist(args.fashion_mnist_dir, setup)
    log(f"data: {len(data['train_y'])} training / {len(data['test_y'])} test images from {data['root']}")
    if args.time_steps:
        steps_per_seed = math.ceil(setup.train_samples / setup.batch_size) * setup.epochs
        timing = {}
        for name in ("weak", "strong", "mowst"):
            model, loss_fn = build(name, setup, 0)
            train(model, loss_fn, data, setup, 0, max_steps=1)  # warm-up
            timing[name] = train(model, loss_fn, data, setup, 0, max_steps=args.time_steps)["seconds"] / args.time_steps
        estimate = len(args.seed_list) * steps_per_seed * sum(timing.values())
        log(f"seconds per step {timing}; full training ~ {estimate / 60:.0f} min plus evaluation")
        return {"seconds_per_step": timing, "estimate_minutes": estimate / 60}
    runs = [run_seed(seed, data, setup, log) for seed in args.seed_list]
    output = args.output or ROOT / "benchmarks" / "results" / (
        "mowst_vision_quick.json" if args.quick else "mowst_vision.json"
    )
    record = {
        "benchmark": "mowst_vision",
        "mode": "quick" if args.quick else "full",
        "environment": env,
        "setup": dataclasses.asdict(setup),
        "runs": runs,
        "summary": summarize(runs, setup),
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
