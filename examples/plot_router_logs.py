#!/usr/bin/env python
"""Turn a run's `trainer_state.json` log history into PNG plots.

    .venv/bin/python examples/plot_router_logs.py runs/uoe-shakespeare [--output_dir runs/uoe-shakespeare/plots]

Writes `loss.png` (training and validation loss, aux loss), `router_load_layer_{i}.png` (per layer, the share of
selections each attention head and MLP expert received at each log step, as heatmaps) and `router_balance.png`
(busiest expert's load relative to a balanced one, and router entropy). The router figures are the ones
`uoe.UoERouterStatsCallback` adds to the logs.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

LOAD_KEY = re.compile(r"^router/layer_(\d+)/(attention|mlp)/load_(\d+)$")


def load_log_history(path: str | Path) -> list[dict]:
    """The `log_history` of a `trainer_state.json`, given the file or the folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / "trainer_state.json"
    if not path.is_file():
        raise ValueError(f"No trainer_state.json at {path}.")
    return json.loads(path.read_text())["log_history"]


def router_loads(history: list[dict]) -> dict[tuple[int, str], tuple[list[int], list[list[float]]]]:
    """`{(layer, "attention"|"mlp"): (steps, loads)}` with `loads[step_index][expert]`."""
    found: dict[tuple[int, str], tuple[list[int], list[list[float]]]] = {}
    for entry in history:
        per_block: dict[tuple[int, str], dict[int, float]] = {}
        for key, value in entry.items():
            match = LOAD_KEY.match(key)
            if match:
                per_block.setdefault((int(match[1]), match[2]), {})[int(match[3])] = value
        for block, loads in per_block.items():
            steps, rows = found.setdefault(block, ([], []))
            steps.append(entry["step"])
            rows.append([loads[e] for e in sorted(loads)])
    return found


def plot_losses(history: list[dict], path: Path) -> Path:
    train = [(e["step"], e["loss"]) for e in history if "loss" in e]
    evals = [
        (e["step"], e["eval_token_loss"] if "eval_token_loss" in e else e["eval_loss"])
        for e in history
        if "eval_loss" in e
    ]
    aux = [(e["step"], e["aux_loss"]) for e in history if "aux_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="validation token loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    if aux:
        twin = ax.twinx()
        twin.plot(*zip(*aux, strict=True), color="tab:gray", alpha=0.6, label="aux loss (right)")
        twin.set_ylabel("load-balancing loss")
        twin.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title("Loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_layer_loads(layer: int, blocks: dict[str, tuple[list[int], list[list[float]]]], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(blocks), figsize=(6 * len(blocks), 3.5), squeeze=False)
    for ax, (kind, (steps, rows)) in zip(axes[0], sorted(blocks.items()), strict=True):
        loads = list(map(list, zip(*rows, strict=True)))  # experts x log steps
        image = ax.imshow(
            loads, aspect="auto", origin="lower", cmap="viridis", extent=(steps[0], steps[-1], -0.5, len(loads) - 0.5)
        )
        ax.set_title(f"layer {layer} {'attention heads' if kind == 'attention' else 'MLP experts'}")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        ax.set_yticks(range(len(loads)))
        fig.colorbar(image, ax=ax, label="share of selections")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_balance(history: list[dict], path: Path) -> Path:
    fig, (ratio_ax, entropy_ax) = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({k.rsplit("/", 1)[0] for e in history for k in e if k.endswith("/max_load_ratio")})
    for name in names:
        label = name.removeprefix("router/")
        for ax, stat in ((ratio_ax, "max_load_ratio"), (entropy_ax, "entropy")):
            points = [(e["step"], e[f"{name}/{stat}"]) for e in history if f"{name}/{stat}" in e]
            if points:
                ax.plot(*zip(*points, strict=True), label=label)
    ratio_ax.set_title("busiest expert / balanced share (1 = balanced)")
    entropy_ax.set_title("mean router entropy (nats)")
    for ax in (ratio_ax, entropy_ax):
        ax.set_xlabel("step")
    ratio_ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_run(state_path: str | Path, output_dir: str | Path) -> list[Path]:
    """Write every plot of the run at `state_path` into `output_dir`; return the PNG paths."""
    history = load_log_history(state_path)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_losses(history, output_dir / "loss.png")]
    loads = router_loads(history)
    for layer in sorted({layer for layer, _ in loads}):
        blocks = {kind: data for (index, kind), data in loads.items() if index == layer}
        written.append(plot_layer_loads(layer, blocks, output_dir / f"router_load_layer_{layer}.png"))
    if loads:
        written.append(plot_balance(history, output_dir / "router_balance.png"))
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run's output folder or checkpoint folder, or its trainer_state.json")
    parser.add_argument("--output_dir", help="where to write the PNGs (default: RUN/plots)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    output_dir = Path(args.output_dir) if args.output_dir else (run if run.is_dir() else run.parent) / "plots"
    written = plot_run(run, output_dir)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
