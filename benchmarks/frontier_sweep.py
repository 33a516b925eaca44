#!/usr/bin/env python
"""The LM frontier sweep (issue 15): every family of compare_lm.py at three compute levels, and each family's
frontier of validation perplexity against active FLOPs.

    .venv/bin/python benchmarks/frontier_sweep.py            # 38.4 min on 2 idle CPU cores (2026-12-01)
    .venv/bin/python benchmarks/frontier_sweep.py --quick    # tiny models, in this process, about a minute
    .venv/bin/python benchmarks/frontier_sweep.py --from_json benchmarks/results/compare_lm_sweep.json  # re-report

`compare_lm.py --sweep` runs this script with its other arguments. The data, tokenizer, optimizer, schedule, seeds,
matching rule and training runs are compare_lm.py's; the budget is the sweep's own (`SWEEP_FULL`: the sizes of
compare_lm's `FULL`, 180 steps = 368,640 tokens per run). The families and their levels (`sweep_levels`):
- `llama` by width: hidden 64 / 96 / 128, MLP 4x hidden, 4 heads;
- `mixtral`, `qwen3_moe`, `deepseek_v3` by (routed) top-k 1 / 2 / 4 of 8, their expert width matched to UoE's total
  parameters at top-2 as in the main comparison (so every level of a family has the same parameters);
- `moeut`, the MoEUT baseline of `benchmarks/moeut.py` (SwitchHead attention with 4 value/output experts per head,
  σ-MoE MLP of experts of width intermediate/16, 2 distinct layers applied twice, peri-layernorm; its number of
  MLP experts solved to match UoE's parameters), by (attention top-k, MLP top-k) = (1, 2), (2, 4), (4, 8);
- UoE by (selected heads, selected MLP slices) = (2, 2), (3, 4), (4, 6): `uoe_union` and `uoe_weighted`, and on
  the weighted one the variants of issue 15: `uoe_shared` (1 shared head and 1 shared slice + routed (1, 1),
  (2, 3), (3, 5)), `uoe_moeut` (`num_layer_groups=2`, `router_balance_loss="entropy"`, `norm_placement="peri"`) and
  `uoe_chain` (`mlp_chain_length=2`, (2, 1), (3, 2), (4, 3)); `uoe_moeut` shares its layers two by two
  (`num_layer_groups` = layers / 2), so it has fewer parameters than the others at the same FLOPs (the MoEUT
  baseline instead spends the saved parameters on more MLP experts). A variant whose fields this `UoEConfig` does not
  take (checked on its signature; its **kwargs would swallow them) is skipped with the reason in the table.
Balance: every Switch loss at the same pressure (`Setup.normalize_aux_by_top_k`, see `compare_lm.aux_loss_weight`);
DeepSeek-V3 keeps its bias update, the MoEUT baseline its own entropy loss. Learning rate: per family, the argmin of
validation perplexity over `LR_GRID` on a short run (seed 0) at its middle level (`lr_search` in the JSON). Output:
a table of every point, each family's frontier (`pareto_frontier`: the points no cheaper-or-equal point of the
family beats), the paper's claim read off the frontiers (`summarize_sweep`, `frontier_at`), the plot
`benchmarks/compare_lm_frontier.png`, a RESULTS.md section and `benchmarks/results/compare_lm_sweep.json`.
`--quick` trains in this process (no peak RSS, no FLOP counter), 3 steps of tiny models; the full sweep runs every
(family, level, seed) in a fresh process, as compare_lm.py does.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_lm  # noqa: E402  (the LM comparison: its data, models, training runs and arguments)
import harness  # noqa: E402
import moeut  # noqa: E402  (the MoEUT baseline)
from compare_lm import MOE_BASELINES, Setup  # noqa: E402
from harness import config_from_dict, count_parameters  # noqa: E402

# the section's heading names the sweep's former command, which still runs it: RESULTS.md keeps its section
SWEEP_SECTION_TITLE = "## LM frontier sweep (compare_lm.py --sweep)"
LR_GRID = (1.5e-3, 3e-3, 6e-3)  # the same grid for every family
UOE_FAMILIES = ("uoe_union", "uoe_weighted", "uoe_shared", "uoe_moeut", "uoe_chain")
SWEEP_MOE_FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3", "moeut")
SWEEP_FAMILIES = ("llama", *SWEEP_MOE_FAMILIES, *UOE_FAMILIES)
FAMILY_DESCRIPTIONS = {
    "llama": "LlamaForCausalLM, dense, by hidden width (MLP 4x, 4 heads)",
    "mixtral": "MixtralForCausalLM, by top-k of 8 (expert width matched to UoE's parameters at top-2)",
    "qwen3_moe": "Qwen3MoeForCausalLM, by top-k of 8 (expert width matched at top-2)",
    "deepseek_v3": "DeepseekV3ForCausalLM, by routed top-k of 8 (+1 shared expert; width matched at top-2)",
    "moeut": "MoEUT baseline (benchmarks/moeut.py; layers shared two by two, parameters matched by its number of "
    "MLP experts), by SwitchHead / sigma-MoE top-k",
    "uoe_union": "UoE, union gates, by selected heads / MLP slices",
    "uoe_weighted": "UoE, weighted gates, by selected heads / MLP slices",
    "uoe_shared": "UoE weighted + 1 shared head and 1 shared MLP slice, by routed heads / slices",
    "uoe_moeut": "UoE weighted, MoEUT-style: layers shared two by two (num_layer_groups = layers/2; so fewer "
    "parameters at the same FLOPs), entropy balance loss, peri-layernorm",
    "uoe_chain": "UoE weighted, Chain-of-Experts: the UoME block twice per layer (C=2)",
}


@dataclasses.dataclass
class SweepPlan:
    """What the sweep trains besides `Setup`: seeds, the learning-rate search and the in-process switch."""

    setup: Setup
    seeds: tuple[int, ...] = (0, 1)  # --seeds
    lr_grid: tuple[float, ...] = LR_GRID
    lr_steps: int = 60  # steps of each learning-rate trial (seed 0, the family's middle level)
    in_process: bool = False  # True: runs in this process (no per-run peak RSS; the quick mode's speed)


SWEEP_FULL = SweepPlan(
    setup=dataclasses.replace(compare_lm.FULL, max_steps=180, warmup_steps=18, normalize_aux_by_top_k=True), lr_steps=60
)
SWEEP_QUICK = SweepPlan(
    setup=dataclasses.replace(
        compare_lm.FULL, vocab_size=256, hidden_size=32, num_layers=2, intermediate_size=64, seq_len=32, batch_size=4,
        max_steps=3, warmup_steps=1, eval_blocks=4, max_train_chars=200_000, normalize_aux_by_top_k=True,
    ),
    lr_steps=2,
    in_process=True,
)  # fmt: skip


def sweep_levels(family: str, setup: Setup) -> list[tuple[str, dict[str, Any]]]:
    """The compute levels of `family`: (label, the changes from the family's base config)."""
    if family == "llama":  # dense, by width: hidden 1/2, 3/4 and 1x the setup's, MLP 4x hidden, 4 heads
        widths = [setup.hidden_size // 2, 3 * setup.hidden_size // 4, setup.hidden_size]
        return [(f"d{w}", {"hidden_size": w, "intermediate_size": 4 * w}) for w in widths]
    if family in ("mixtral", "qwen3_moe", "deepseek_v3"):
        return [(f"k{k}", {"num_experts_per_tok": k}) for k in (1, 2, 4)]
    if family == "moeut":
        return [(f"a{a}m{m}", {"attention_top_k": a, "mlp_top_k": m}) for a, m in ((1, 2), (2, 4), (4, 8))]
    # UoE from its main-comparison point (2 of 4 heads, 2 of 8 slices) up to about the MoEs' largest FLOPs, so that
    # the frontiers overlap (the MoEs' attention is dense: their FLOPs span only their MLP's share)
    if family == "uoe_shared":  # 1 shared + routed: 2/2, 3/4 and 4/6 heads / slices in all
        pairs = ((1, 1), (2, 3), (3, 5))
    elif family == "uoe_chain":  # the MLP runs twice: 2x the slices per token
        pairs = ((2, 1), (3, 2), (4, 3))
    else:
        pairs = ((2, 2), (3, 4), (4, 6))
    return [(f"h{h}e{e}", {"attention_top_k": h, "mlp_top_k": e}) for h, e in pairs]


UOE_VARIANT_FIELDS = {
    "uoe_union": {"gate_mode": "union"},
    "uoe_weighted": {"gate_mode": "weighted"},
    "uoe_shared": {"gate_mode": "weighted", "num_shared_attention_groups": 1, "num_shared_mlp_experts": 1},
    # num_layer_groups None here: half the layers, set per setup in sweep_base_configs (4 layers = 2 distinct x 2)
    "uoe_moeut": {"gate_mode": "weighted", "num_layer_groups": None, "router_balance_loss": "entropy",
                  "norm_placement": "peri"},
    "uoe_chain": {"gate_mode": "weighted", "mlp_chain_length": 2},
}  # fmt: skip


def missing_uoe_fields(family: str) -> list[str]:
    """The variant fields of `family` that this UoEConfig does not take yet (its **kwargs would swallow them)."""
    import inspect  # noqa: PLC0415

    from uoe import UoEConfig  # noqa: PLC0415

    accepted = inspect.signature(UoEConfig.__init__).parameters
    return [name for name in UOE_VARIANT_FIELDS.get(family, {}) if name not in accepted]


def moeut_config(setup: Setup, num_mlp_experts: int, group_size: int | None = None, **levels):
    """The MoEUT baseline at `setup`'s sizes; `group_size` distinct layers (default half the layers: each applied
    twice), `levels`: more `MoEUTConfig` fields."""
    return moeut.MoEUTConfig(
        vocab_size=setup.vocab_size, hidden_size=setup.hidden_size, num_hidden_layers=setup.num_layers,
        group_size=group_size or max(1, setup.num_layers // 2), num_attention_heads=setup.num_heads,
        num_attention_experts=4, num_mlp_experts=num_mlp_experts, mlp_expert_size=setup.intermediate_size // 16,
        max_position_embeddings=setup.seq_len, **levels,
    )  # fmt: skip


def sweep_base_configs(setup: Setup, families: tuple[str, ...]) -> dict[str, Any]:
    """Per family, a function level-overrides -> config. The MoEs keep the parameters matched to UoE (top-2 of 8,
    as the main comparison); the MoEUT baseline's number of MLP experts is solved likewise (its layers are shared
    two by two, so it spends the parameters on more, smaller experts: width intermediate/16)."""
    from transformers import LlamaConfig  # noqa: PLC0415

    from uoe import UoEConfig  # noqa: PLC0415

    builders: dict[str, Any] = {}
    base = compare_lm.build_configs(setup, tuple(f for f in families if f in MOE_BASELINES) + ("uoe_union",))
    target = count_parameters(base["uoe_union"])
    for family in families:
        if family == "llama":
            common = {**compare_lm.common_fields(setup), "num_key_value_heads": setup.num_heads}
            builders[family] = lambda o, common=common: LlamaConfig(**{**common, **o})
        elif family in MOE_BASELINES:
            values = base[family].to_dict()
            builders[family] = lambda o, values=values: config_from_dict({**values, **o})
        elif family == "moeut":
            experts = harness.solve_width(  # at least as many as the other MoEs
                lambda n: count_parameters(moeut_config(setup, n)), target, range(8, 2**20)
            )
            builders[family] = lambda o, experts=experts: moeut_config(setup, experts, **o)
        else:
            values = {**base["uoe_union"].to_dict(), **UOE_VARIANT_FIELDS[family]}
            # only the variants that name `num_layer_groups` share layers (every config's dict has the field: before
            # 2026-12-06 this tested `values` and so shared the layers of every UoE family of the sweep)
            if "num_layer_groups" in UOE_VARIANT_FIELDS[family] and values["num_layer_groups"] is None:
                values["num_layer_groups"] = max(1, setup.num_layers // 2)
            builders[family] = lambda o, values=values: UoEConfig.from_dict({**values, **o})
    return builders


def run_point(name: str, config, setup: Setup, seed: int, data_path: Path, work_dir: Path, plan: SweepPlan,
              timeout: float) -> dict[str, Any]:  # fmt: skip
    """One training run of the sweep: in a fresh process (peak RSS is its own), or here with `plan.in_process`."""
    if not plan.in_process:
        return compare_lm.run_worker(name, config, setup, seed, data_path, work_dir, timeout)
    try:
        return compare_lm.train_and_evaluate(name, config, setup, seed, data_path, measure=False)
    except Exception as error:  # noqa: BLE001  (a failing model is reported, the sweep goes on)
        return {"model": name, "seed": seed, "status": f"failed: {type(error).__name__}: {error}"}


def run_sweep(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """Choose each family's learning rate on the grid, then train every (family, level, seed)."""
    env, wall_start = harness.environment("frontier_sweep.py", argv), time.perf_counter()
    plan = dataclasses.replace(SWEEP_QUICK if args.quick else SWEEP_FULL, seeds=args.seeds)
    plan.setup = compare_lm.apply_budget(plan.setup, args)
    plan.in_process = plan.in_process or args.in_process
    setup = plan.setup
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"[sweep] {'quick' if args.quick else 'full'}: {plan}", flush=True)
    data_path, data_info = compare_lm.prepare_data(work_dir, setup)

    families, skipped = [], {}
    for family in args.families:
        missing = missing_uoe_fields(family)
        if missing:
            skipped[family] = f"skipped: UoEConfig does not accept {', '.join(missing)} yet"
            print(f"[sweep] {family}: {skipped[family]}", flush=True)
        else:
            families.append(family)
    builders = sweep_base_configs(setup, tuple(families))
    points = {f: [(label, builders[f](o)) for label, o in sweep_levels(f, setup)] for f in families}

    lr_search, runs = {}, []
    for family in families:  # the learning rate: argmin of validation perplexity on a short run, middle level
        label, config = points[family][len(points[family]) // 2]
        short = dataclasses.replace(setup, max_steps=plan.lr_steps, warmup_steps=max(1, plan.lr_steps // 10))
        results = {}
        for lr in plan.lr_grid:
            run = run_point(f"{family}:{label}", config, dataclasses.replace(short, learning_rate=lr), 0, data_path,
                            work_dir, plan, args.run_timeout)  # fmt: skip
            results[repr(lr)] = run.get("validation_perplexity") if run["status"] == "ok" else None
            print(f"[sweep] lr search {family} {label} lr {lr:g}: {results[repr(lr)]}", flush=True)
        finished = {lr: ppl for lr, ppl in results.items() if ppl is not None and math.isfinite(ppl)}
        chosen = float(min(finished, key=finished.get)) if finished else None
        lr_search[family] = {"level": label, "steps": plan.lr_steps, "seed": 0, "perplexity": results, "chosen": chosen}

    for seed in plan.seeds:
        for family in families:
            lr = lr_search[family]["chosen"]
            for label, config in points[family]:
                name = f"{family}:{label}"
                if lr is None:
                    runs.append({"model": name, "seed": seed, "status": "failed: every learning rate failed"})
                    continue
                run = run_point(name, config, dataclasses.replace(setup, learning_rate=lr), seed, data_path, work_dir,
                                plan, args.run_timeout)  # fmt: skip
                run.update(family=family, level=label)
                runs.append(run)
                done = f"val ppl {run['validation_perplexity']:.2f}" if run["status"] == "ok" else run["status"]
                print(f"[sweep] {name} seed {seed} lr {lr:g}: {done}", flush=True)

    record = {
        "command": env["command"], "mode": "sweep_quick" if args.quick else "sweep",
        "setup": dataclasses.asdict(setup),
        "plan": {"seeds": list(plan.seeds), "lr_grid": list(plan.lr_grid), "lr_steps": plan.lr_steps,
                 "in_process": plan.in_process},
        "environment": env, "load_average": {"start": env["loadavg_start"], "end": os.getloadavg()},
        "data": data_info, "wall_seconds": time.perf_counter() - wall_start, "families": list(families),
        "skipped": skipped, "lr_search": lr_search,
        "points": {f"{f}:{label}": {"family": f, "level": label, "config": c.to_dict()} for f in families
                   for label, c in points[f]},
        "runs": runs,
    }  # fmt: skip
    return write_sweep_reports(record, Path(args.plot), Path(args.results_md), Path(args.output))


def pareto_frontier(points: dict[str, dict[str, Any]]) -> list[str]:
    """The lower envelope of (active FLOPs, mean perplexity): the points no cheaper-or-equal point beats, by FLOPs."""
    ordered = sorted(points, key=lambda n: (points[n]["flops_analytic"], points[n]["perplexity_mean"]))
    frontier, best = [], math.inf
    for name in ordered:
        if points[name]["perplexity_mean"] < best:
            frontier.append(name)
            best = points[name]["perplexity_mean"]
    return frontier


def frontier_at(curve: list[tuple[float, float]], flops: float, top: float) -> float | None:
    """A frontier (FLOPs ascending, perplexity descending) read at a budget of `flops`: linear in log FLOPs between
    its points; past its last point up to `top` (the family's costliest point) its best perplexity (a costlier
    level of the family did no better); None below its cheapest point or above `top` (no extrapolation)."""
    if not curve or flops < curve[0][0] * (1 - 1e-9) or flops > top * (1 + 1e-9):
        return None
    for (f0, p0), (f1, p1) in zip(curve, curve[1:], strict=False):
        if f0 <= flops <= f1:
            return p0 + (p1 - p0) * (math.log(flops) - math.log(f0)) / (math.log(f1) - math.log(f0))
    return curve[-1][1]


def summarize_sweep(record: dict[str, Any]) -> dict[str, Any]:
    """Per point: mean and spread over seeds; per family: its frontier; the claim at common FLOP levels."""
    points = {}
    for name, info in record["points"].items():
        mine = [r for r in record["runs"] if r["model"] == name]
        failed = [r for r in mine if r["status"] != "ok"]
        if failed or not mine:
            points[name] = {**info, "status": failed[0]["status"] if failed else "not run"}
            continue
        ppl = [r["validation_perplexity"] for r in mine]
        points[name] = {
            "family": info["family"], "level": info["level"], "status": "ok", "seeds": [r["seed"] for r in mine],
            "learning_rate": mine[0]["learning_rate"], "parameters": mine[0]["parameters"],
            "flops_analytic": mine[0]["flops_analytic"], "flops_counted": mine[0]["flops_counted"],
            "perplexity_mean": statistics.fmean(ppl), "perplexity_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
            "perplexity_min": min(ppl), "perplexity_max": max(ppl),
            "tokens_per_second": statistics.fmean(r["tokens_per_second"] for r in mine),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
        }  # fmt: skip
    frontiers = {}
    for family in record["families"]:
        ok = {n: p for n, p in points.items() if p["family"] == family and p["status"] == "ok"}
        frontiers[family] = pareto_frontier(ok)

    def curve(family: str) -> list[tuple[float, float]]:
        return [(points[n]["flops_analytic"], points[n]["perplexity_mean"]) for n in frontiers.get(family, [])]

    def top(family: str) -> float:
        return max(p["flops_analytic"] for p in points.values() if p["family"] == family and p["status"] == "ok")

    def best_of(group: tuple[str, ...], flops: float) -> tuple[str | None, float | None]:
        values = {f: frontier_at(curve(f), flops, top(f)) for f in group if frontiers.get(f)}
        values = {f: v for f, v in values.items() if v is not None}
        return (min(values, key=values.get), min(values.values())) if values else (None, None)

    claim = {"levels": []}
    spans = {g: [(curve(f)[0][0], top(f)) for f in group if frontiers.get(f)]
             for g, group in (("uoe", UOE_FAMILIES), ("moe", SWEEP_MOE_FAMILIES))}  # fmt: skip
    if spans["uoe"] and spans["moe"]:
        low = max(min(lo for lo, _ in spans["uoe"]), min(lo for lo, _ in spans["moe"]))
        high = min(max(hi for _, hi in spans["uoe"]), max(hi for _, hi in spans["moe"]))
        claim["overlap"] = [low, high]
        if low <= high:
            count = 5 if high > low else 1
            for i in range(count):
                flops = low * (high / low) ** (i / max(count - 1, 1))
                uoe_family, uoe_ppl = best_of(UOE_FAMILIES, flops)
                moe_family, moe_ppl = best_of(SWEEP_MOE_FAMILIES, flops)
                if uoe_ppl is None or moe_ppl is None:
                    continue  # the envelope of one side has a gap here
                claim["levels"].append({
                    "flops": flops, "uoe_family": uoe_family, "uoe_perplexity": uoe_ppl, "moe_family": moe_family,
                    "moe_perplexity": moe_ppl, "difference": uoe_ppl - moe_ppl,
                    "relative": (uoe_ppl - moe_ppl) / moe_ppl,
                })  # fmt: skip
    return {"points": points, "frontiers": frontiers, "claim": claim}


def sweep_table(record: dict[str, Any], summary: dict[str, Any]) -> str:
    rows = [
        "| family | level | lr | parameters | active FLOPs/token (analytic) | val. perplexity (mean ± std, [min, max]) "
        "| train tokens/s (median step) | on frontier |",
        "|---|---|---:|---:|---:|---|---:|:-:|",
    ]
    for name, p in summary["points"].items():
        if p["status"] != "ok":
            rows.append(f"| {p['family']} | {p['level']} | – | – | – | **could not run**: {p['status']} | – | – |")
            continue
        mark = "✓" if name in summary["frontiers"][p["family"]] else ""
        rows.append(
            f"| {p['family']} | {p['level']} | {p['learning_rate']:g} | {p['parameters']:,} "
            f"| {p['flops_analytic'] / 1e6:.3f} M | {p['perplexity_mean']:.2f} ± {p['perplexity_std']:.2f} "
            f"[{p['perplexity_min']:.2f}, {p['perplexity_max']:.2f}] | {p['tokens_per_second']:,.0f} | {mark} |"
        )
    for family, reason in record["skipped"].items():
        rows.append(f"| {family} | – | – | – | – | {reason} | – | – |")
    return "\n".join(rows)


def sweep_claim_statement(summary: dict[str, Any]) -> str:
    """The paper's claim read off the frontiers: UoE's best envelope against the best MoE envelope at equal FLOPs."""
    claim = summary["claim"]
    if not claim["levels"]:
        overlap = claim.get("overlap")
        why = "no UoE or no MoE frontier" if overlap is None else "their frontiers' FLOP ranges do not overlap"
        return f"The paper's claim cannot be read off the frontiers: {why}."
    lines = [
        "Paper's claim, read off the frontiers at equal active FLOPs (each family's lower envelope: linear in "
        "log FLOPs between its frontier points, flat from its best point to its costliest level, no extrapolation "
        "beyond its levels; the best UoE variant against the best MoE, MoEUT included, at 5 log-spaced levels "
        "over the FLOPs both cover):",
        "",
        "| active FLOPs/token | best UoE (variant) | best MoE (family) | UoE − MoE perplexity |",
        "|---:|---|---|---:|",
    ]
    for level in claim["levels"]:
        lines.append(
            f"| {level['flops'] / 1e6:.3f} M | {level['uoe_perplexity']:.2f} ({level['uoe_family']}) "
            f"| {level['moe_perplexity']:.2f} ({level['moe_family']}) | {level['difference']:+.2f} "
            f"({100 * level['relative']:+.1f}%) |"
        )
    below = [lv for lv in claim["levels"] if lv["difference"] <= 0]
    above = [lv for lv in claim["levels"] if lv["difference"] > 0]
    lines.append("")
    if not above:
        lines.append(f"UoE's best frontier is at or below the best MoE's at all {len(below)} levels: the claim holds.")
    else:
        worst = max(above, key=lambda lv: lv["relative"])
        closest = Counter(lv["uoe_family"] for lv in above).most_common(1)[0][0]
        above_levels = ", ".join(f"{lv['flops'] / 1e6:.3f} M" for lv in above)
        lines.append(
            f"UoE's best frontier is below the best MoE's at {len(below)} of {len(claim['levels'])} levels and above "
            f"at {above_levels} (by up to {worst['difference']:+.2f} "
            f"perplexity, {100 * worst['relative']:+.1f}%, at {worst['flops'] / 1e6:.3f} M); the UoE variant "
            f"closest there: {closest}."
        )
    return "\n".join(lines)


def plot_frontier(record: dict[str, Any], summary: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axis = plt.subplots(figsize=(9, 6))
    colors = plt.get_cmap("tab10")
    for i, family in enumerate(record["families"]):
        mine = [p for p in summary["points"].values() if p["family"] == family and p["status"] == "ok"]
        if not mine:
            continue
        style = "-" if family in UOE_FAMILIES else "--"
        flops = [p["flops_analytic"] / 1e6 for p in mine]
        means = [p["perplexity_mean"] for p in mine]
        spread = [[m - p["perplexity_min"] for m, p in zip(means, mine, strict=True)],
                  [p["perplexity_max"] - m for m, p in zip(means, mine, strict=True)]]  # fmt: skip
        axis.errorbar(flops, means, yerr=spread, fmt="o", color=colors(i), capsize=3, alpha=0.8)
        front = [summary["points"][n] for n in summary["frontiers"][family]]
        axis.plot([p["flops_analytic"] / 1e6 for p in front], [p["perplexity_mean"] for p in front], style,
                  color=colors(i), marker="o", markersize=7, markerfacecolor="none", label=family)  # fmt: skip
    axis.set_xscale("log")
    axis.set_xlabel("analytic active forward FLOPs per token (M)")
    axis.set_ylabel("validation perplexity (mean over seeds; bars: min-max)")
    axis.set_title("compare_lm.py --sweep: frontiers (lower envelopes); solid: UoE variants, dashed: baselines")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def sweep_section(record: dict[str, Any], summary: dict[str, Any], plot_link: str) -> str:
    env, setup, plan, data_info = record["environment"], record["setup"], record["plan"], record["data"]
    load = record["load_average"]
    lr_lines = [
        f"- {family}: " + ", ".join(
            f"{float(lr):g} → {'failed' if ppl is None else f'{ppl:.2f}'}" for lr, ppl in s["perplexity"].items()
        ) + f" ⇒ **{s['chosen']:g}**" if s["chosen"] is not None else f"- {family}: every learning rate failed"
        for family, s in record["lr_search"].items()
    ]  # fmt: skip
    lines = [
        SWEEP_SECTION_TITLE,
        "",
        f"Command: `{record['command']}` ({record['wall_seconds'] / 60:.1f} min wall time, finished {env['date_utc']}).",
        f"Device: {env['cpu']}, {env['cpu_count']} cores, torch threads {env['torch_threads']}, no GPU; load average "
        f"(1 min) {load['start'][0]:.2f} at start, {load['end'][0]:.2f} at end. Versions: torch {env['torch']}, "
        f"transformers {env['transformers']}, uoe {env['uoe']} (commit {env['git_commit']}).",
        "",
        f"Setup, identical for every run (as the LM comparison above, at a smaller budget): Shakespeare "
        f"({data_info['train_tokens']:,} training tokens), BPE {setup['vocab_size']}, blocks of {setup['seq_len']}, "
        f"batch {setup['batch_size']}, {setup['max_steps']} steps "
        f"({setup['max_steps'] * setup['batch_size'] * setup['seq_len']:,} tokens), AdamW (betas 0.9/0.95, weight "
        f"decay {setup['weight_decay']}), warmup {setup['warmup_steps']} then cosine, clipping 1.0, float32; seeds "
        f"{', '.join(map(str, plan['seeds']))}. Width {setup['hidden_size']}, {setup['num_layers']} layers, "
        f"{setup['num_heads']} heads; the MoEs and UoE variants share the main comparison's matching rule.",
        "",
        "Balance at the same pressure: UoE's Switch loss (mean over its 2L routed blocks) is 1 at perfect balance, "
        "transformers' Mixtral / Qwen3-MoE loss (`load_balancing_loss_func`) is top_k there, so their coefficient "
        f"is divided by their top-k: every Switch loss is weighted {setup['aux_coef']} per unit of imbalance. "
        "DeepSeek-V3 keeps its aux-loss-free bias update; the MoEUT baseline its own entropy loss (0.01 MLP, "
        f"0.001 attention, as its code); `uoe_moeut` UoE's entropy balance loss x {setup['aux_coef']}.",
        "",
        f"Learning rate per family: the argmin of validation perplexity over the grid "
        f"{', '.join(f'{lr:g}' for lr in plan['lr_grid'])} on a {plan['lr_steps']}-step run (seed 0) at the "
        "family's middle level:",
        *lr_lines,
        "",
        "Families: "
        + "; ".join(f"`{f}`: {FAMILY_DESCRIPTIONS[f]}" for f in (*record["families"], *record["skipped"]))
        + ".",
        "",
        sweep_table(record, summary),
        "",
        sweep_claim_statement(summary),
        "",
        f"![frontier]({plot_link})",
        "",
        "FLOPs: analytic active forward FLOPs per token (`analytic_flops_per_token`, `uoe.estimate_flops_per_token` "
        "for UoE, causal attention, LM head included). Frontier: the points that no cheaper-or-equal point of the "
        "family beats. Tokens/s: the median training step. Raw results: `benchmarks/results/compare_lm_sweep.json`.",
    ]
    return "\n".join(lines) + "\n"


def write_sweep_reports(record: dict[str, Any], plot: Path, results_md: Path, output: Path) -> dict[str, Any]:
    summary = summarize_sweep(record)
    record["summary"] = summary
    print("\n" + sweep_table(record, summary) + "\n\n" + sweep_claim_statement(summary), flush=True)
    plot_frontier(record, summary, plot)
    section = sweep_section(record, summary, os.path.relpath(plot, results_md.parent))
    harness.replace_section(results_md, SWEEP_SECTION_TITLE, section.removeprefix(SWEEP_SECTION_TITLE))
    harness.write_json(output, record, indent=1)
    print(f"[sweep] wrote {results_md}, {plot}, {output} ({record['wall_seconds'] / 60:.1f} min)", flush=True)
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    compare_lm.add_run_arguments(parser, output="compare_lm_sweep.json", plot="compare_lm_frontier.png")
    parser.add_argument(
        "--families", default=",".join(SWEEP_FAMILIES), help=f"comma-separated subset of {SWEEP_FAMILIES}"
    )
    parser.add_argument("--in_process", action="store_true", help="train in this process (the quick mode's default)")
    args = parser.parse_args(argv)
    if args.from_json:
        return args
    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    unknown = [f for f in families if f not in SWEEP_FAMILIES]
    if unknown or not families:
        parser.error(f"--families: unknown family(s) {unknown or families}; allowed: {', '.join(SWEEP_FAMILIES)}")
    args.families = tuple(dict.fromkeys(families))
    compare_lm.check_run_arguments(parser, args)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.from_json:
        record = compare_lm.read_record(args.from_json, sweep=True)
        return write_sweep_reports(record, Path(args.plot), Path(args.results_md), Path(args.output))
    return run_sweep(args, argv)


if __name__ == "__main__":
    main()
