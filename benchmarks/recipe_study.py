#!/usr/bin/env python
"""The UoE recipe study (issue 24): which of UoE's components beat the best MoE, at a budget that decides.

    .venv/bin/python benchmarks/recipe_study.py --estimate                  # short timed runs -> the plan's total time
    .venv/bin/python benchmarks/recipe_study.py --max_minutes 110           # one chunk; run it again to go on
    .venv/bin/python benchmarks/recipe_study.py --report                    # RESULTS.md section + plot, from the files
    .venv/bin/python benchmarks/recipe_study.py --quick                     # tiny models in this process (the test)

The plan (data, below: `uoe_ablation_sets`, `BASELINE_ARMS`, `VISION_STATIC`), on the data, tokenizer, optimizer,
schedule, matching rule and training runs of `compare_lm.py` / `frontier_sweep.py` (LM) and `compare_vision.py`:

1. **Ablation at the middle FLOP level** (the sweep's h3e4: 3 of 4 heads, 4 of 8 MLP slices; its shared-expert and
   chain variants at the same active FLOPs). UoE arms: the full 2^4 factorial of the four components of MoEUT's design
   (gates union/weighted, balance Switch/entropy, norm pre/peri, layers own/shared two by two), plus each other
   component (sigmoid router scores, a shared head and MLP slice, a Chain-of-Experts of 2, layer sharing with the
   saved parameters spent on more MLP experts, "grouped-wide") alone on the paper's configuration and added to the
   MoEUT-style one. Baselines where a component applies without rewriting them: Qwen3-MoE with the entropy balance
   loss instead of its Switch loss (computed from its router logits, `Setup.baseline_balance_loss`), DeepSeek-V3
   without its shared expert (top-3 routed instead of top-2 + 1 shared: the same FLOPs; expert width re-matched),
   the MoEUT baseline without layer sharing (its number of experts re-matched) and without its entropy loss. The
   other cells cannot be filled without forking a model: union gates, the score function, peri-norm and layer
   sharing are not options of transformers' Mixtral / Qwen3-MoE / DeepSeek-V3, MoEUT's norm placement and sigmoid
   gates are fixed in `moeut.py`.
2. **The frontier**: every level of the best baselines (Llama, Qwen3-MoE, DeepSeek-V3, MoEUT: the sweep's levels), of
   UoE's paper configuration and of the `top_recipes` best UoE arms of the ablation (chosen when every ablation arm
   has its seeds), UoE with one cheaper level than the sweep (h2e1), so that a UoE point exists at <= 0.8x the
   cheapest MoE levels' FLOPs.
3. **Vision**: `compare_vision.py`'s UoE classifier with the components the image encoder takes (weighted gates,
   sigmoid scores, entropy balance, peri-norm, shared experts: it refuses layer sharing and chains) against the
   FLOP-matched ViT (and the widest ViT at or below UoE's FLOPs: the two bracket them, and the report reads the ViT
   at UoE's FLOPs between them), plus the LM winner's encoder components once the LM ablation has its seeds.

Budget (`FULL`): 720 steps of 16 x 128 tokens = 1,474,560 tokens per LM run (4x the sweep's 368,640); Fashion-MNIST
60,000 images x 3 epochs per vision run. Learning rate: per arm, on the ladder `lr_base * 2**k`, searched with seed 0
at the full budget on the middle level, starting at k in `lr_start` (LM 1.5e-3 / 3e-3 / 6e-3); after every grid,
when the best rate is the largest (smallest) tried, the next one above (below) is queued, until the best is interior
or the ladder's bound is reached (a failed or diverged run counts as worse than every finished one). The arm's rate is
then used for every level and seed; the seed-0 run of the search counts as its seed 0. Seeds: 2 per ablation arm, 3
("top contenders") for every frontier arm and, in vision, for the two ViTs and the best UoE arm.

Resumable: every run writes `<results_dir>/<run-id>.json` (spec, config, result, environment, wall and CPU seconds)
and a rerun skips finished runs; the plan is recomputed from those files after each run (the rate widening and the
choice of the top recipes depend on them). `--max_minutes` does not start a run that its predicted time would carry
past the budget, so a chunk ends cleanly; the prediction is the slowest finished run of its cost class x 1.1, else
`--estimate`'s time x 1.5 (on a core shared with another job a UoE step took 1.5x the estimate's), else
`--default_run_minutes`. Two processes may share a results folder (one core each): a run is claimed with a
`<run-id>.lock` file. A run that failed (including a timeout) is recorded as failed; delete its file to retry it.
`--report` rebuilds the RESULTS.md section (`SECTION_TITLE`) and the plot from the result files only.
`--quick` runs the whole plan on tiny models in this process (seconds per run; used by the tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import inspect
import itertools
import json
import math
import os
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_lm  # noqa: E402  (the LM comparison: data, configs, matching rule, training runs)
import frontier_sweep  # noqa: E402  (the sweep: its levels, baseline builders, frontier reading)
import harness  # noqa: E402
from compare_lm import Setup  # noqa: E402
from harness import config_from_dict, count_parameters  # noqa: E402

SECTION_TITLE = "## UoE recipe study (recipe_study.py)"
PLAN_VERSION = 1  # part of every run's key: change it when the meaning of a run id changes
DEFAULT_RESULTS_DIR = harness.RESULTS_DIR / "recipe_study"
DEFAULT_PLOT = harness.ROOT / "benchmarks" / "recipe_study_frontier.png"
DEFAULT_WORK_DIR = harness.ROOT / "runs" / "recipe_study"
STUDY_FILE = "study.json"  # the study's setup, written once per results folder
ESTIMATE_DIR = "estimate"  # --estimate's timings, one file per cost class
POLL_SECONDS = 20.0  # how often a process whose ready runs are all held by another one looks again

# ---------------------------------------------------------------------------------------------------------------------
# 1. The study's budget
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VisionBudget:
    """compare_vision.py's training settings for one vision run."""

    train_samples: int = 60_000
    test_samples: int = 10_000
    epochs: int = 3
    batch_size: int = 128
    eval_batch_size: int = 500
    weight_decay: float = 0.05
    warmup_steps: int = 50


@dataclasses.dataclass(frozen=True)
class Study:
    """Everything a run's result depends on besides its arm, level, learning rate and seed."""

    mode: str
    setup: Setup  # the LM runs (compare_lm.Setup: data, sizes, budget, balance pressure)
    vision: VisionBudget
    ablation_seeds: int = 2
    contender_seeds: int = 3  # frontier arms and the vision contenders
    top_recipes: int = 2  # UoE arms of the ablation that join the frontier besides the paper's
    lr_base: float = 3e-3  # LM learning rates: lr_base * 2**k
    vision_lr_base: float = 2e-3
    lr_start: tuple[int, ...] = (-1, 0, 1)  # the first grid's k
    lr_bounds: tuple[int, int] = (-4, 3)  # the ladder's ends: 1.9e-4 .. 2.4e-2 (LM)
    in_process: bool = False  # True: LM runs in this process (quick mode; no peak RSS, no FLOP counter)

    def learning_rate(self, task: str, step: int) -> float:
        return float(f"{(self.lr_base if task == 'lm' else self.vision_lr_base) * 2.0**step:.6g}")

    def key(self) -> dict[str, Any]:
        return {"mode": self.mode, "setup": dataclasses.asdict(self.setup), "vision": dataclasses.asdict(self.vision)}


FULL = Study(
    mode="full",
    setup=dataclasses.replace(compare_lm.FULL, max_steps=720, warmup_steps=36, normalize_aux_by_top_k=True),
    vision=VisionBudget(),
)
QUICK = Study(
    mode="quick",
    setup=dataclasses.replace(frontier_sweep.SWEEP_QUICK.setup, max_steps=3, warmup_steps=1),
    vision=VisionBudget(train_samples=256, test_samples=256, epochs=1, batch_size=64, eval_batch_size=256,
                        warmup_steps=1),
    lr_bounds=(-2, 2),
    in_process=True,
)  # fmt: skip

# ---------------------------------------------------------------------------------------------------------------------
# 2. The arms: what is trained
# ---------------------------------------------------------------------------------------------------------------------

# UoE's components besides the paper's, in the order of arm names; "grouped-wide" is layer sharing with the saved
# parameters spent on more MLP experts (their number solved to the unshared model's parameters; same top-k).
UOE_LABELS = ("weighted", "sigmoid", "entropy", "peri", "grouped", "grouped-wide", "shared", "chain")
LABEL_FIELDS: dict[str, dict[str, Any]] = {
    "weighted": {"gate_mode": "weighted"},
    "sigmoid": {"router_score_func": "sigmoid"},
    "entropy": {"router_balance_loss": "entropy"},
    "peri": {"norm_placement": "peri"},
    "grouped": {},  # num_layer_groups = layers / 2, set in uoe_lm_config
    "grouped-wide": {},
    "shared": {"num_shared_attention_groups": 1, "num_shared_mlp_experts": 1},
    "chain": {"mlp_chain_length": 2},
}
COMPONENTS = {  # component: (paper's value, the labels that change it)
    "gate": ("union", ("weighted",)),
    "scores": ("softmax", ("sigmoid",)),
    "balance": ("Switch", ("entropy",)),
    "norm": ("pre", ("peri",)),
    "layers": ("own", ("grouped", "grouped-wide")),
    "shared": ("none", ("shared",)),
    "chain": ("1", ("chain",)),
}
MOEUT_STYLE = frozenset({"weighted", "entropy", "peri", "grouped"})
FACTORIAL = ("weighted", "entropy", "peri", "grouped")
VISION_LABELS = frozenset({"weighted", "sigmoid", "entropy", "peri", "shared"})  # what the image encoder accepts
# the presets of `UoEConfig.from_recipe` and the arm of this study that is each of them (a test checks the configs)
RECIPE_ARMS = {
    "paper": "uoe:paper",
    "weighted": "uoe:weighted",
    "weighted_peri": "uoe:weighted+peri",
    "moeut_style": "uoe:weighted+entropy+peri+grouped",
}


@dataclasses.dataclass(frozen=True)
class Arm:
    """One configuration of the study: a UoE component set, or a baseline as published or with one change."""

    name: str
    task: str  # "lm" or "vision"
    family: str  # "uoe", "llama", "qwen3_moe", "deepseek_v3", "moeut", "vit"
    labels: frozenset[str] = frozenset()  # UoE: its components besides the paper's
    variant: str = ""  # baselines: "" (as published) or the change: "entropy", "no-shared", "no-grouping", ...
    description: str = ""

    @property
    def is_uoe(self) -> bool:
        return self.family == "uoe"


def uoe_name(labels: frozenset[str], task: str = "lm") -> str:
    body = "+".join(label for label in UOE_LABELS if label in labels) or "paper"
    return ("vision:" if task == "vision" else "") + f"uoe:{body}"


def uoe_arm(labels: frozenset[str] | set[str], task: str = "lm") -> Arm:
    labels = frozenset(labels)
    unknown = labels - set(UOE_LABELS)
    if unknown or ({"grouped", "grouped-wide"} <= labels) or ({"shared", "chain"} <= labels):
        raise ValueError(f"not a UoE arm of this study: {sorted(labels)}")
    if task == "vision" and not labels <= VISION_LABELS:
        raise ValueError(f"the image encoder takes only {sorted(VISION_LABELS)}, got {sorted(labels)}")
    return Arm(uoe_name(labels, task), task, "uoe", labels)


def uoe_ablation_sets() -> list[frozenset[str]]:
    """The UoE arms of the ablation: the 2^4 factorial of MoEUT's four components (paper first), each other component
    alone on the paper's configuration and added to the MoEUT-style one, and layer sharing with parameters restored."""
    sets = [frozenset(c) for r in range(len(FACTORIAL) + 1) for c in itertools.combinations(FACTORIAL, r)]
    sets += [frozenset({label}) for label in ("sigmoid", "shared", "chain", "grouped-wide")]
    sets += [MOEUT_STYLE | {label} for label in ("sigmoid", "shared", "chain")]
    sets.append((MOEUT_STYLE - {"grouped"}) | {"grouped-wide"})
    return sets


FRONTIER_BASELINES = ("llama", "qwen3_moe", "deepseek_v3", "moeut")
MOE_FAMILIES = ("qwen3_moe", "deepseek_v3", "moeut")
BASELINE_ARMS: tuple[Arm, ...] = (
    Arm("llama", "lm", "llama", description=frontier_sweep.FAMILY_DESCRIPTIONS["llama"]),
    Arm("qwen3_moe", "lm", "qwen3_moe", description=frontier_sweep.FAMILY_DESCRIPTIONS["qwen3_moe"]),
    Arm("deepseek_v3", "lm", "deepseek_v3", description=frontier_sweep.FAMILY_DESCRIPTIONS["deepseek_v3"]),
    Arm("moeut", "lm", "moeut", description=frontier_sweep.FAMILY_DESCRIPTIONS["moeut"]),
    Arm("qwen3_moe:entropy", "lm", "qwen3_moe", variant="entropy",
        description="Qwen3-MoE with the entropy balance loss (from its router logits) in place of its Switch loss"),
    Arm("deepseek_v3:no-shared", "lm", "deepseek_v3", variant="no-shared",
        description="DeepSeek-V3 without its shared expert: one more routed expert per token (the same FLOPs), expert "
        "width re-matched to the parameters"),
    Arm("moeut:no-grouping", "lm", "moeut", variant="no-grouping",
        description="the MoEUT baseline with every layer its own (group_size = layers), its number of MLP experts "
        "re-matched to the parameters"),
    Arm("moeut:no-entropy", "lm", "moeut", variant="no-entropy",
        description="the MoEUT baseline without its entropy balance loss (both coefficients 0)"),
)  # fmt: skip
# component on/off pairs of the baselines: (component, arm with it, arm without it)
BASELINE_PAIRS = (
    ("balance: entropy (on) vs Switch (off)", "qwen3_moe:entropy", "qwen3_moe"),
    ("shared expert", "deepseek_v3", "deepseek_v3:no-shared"),
    ("layers shared two by two", "moeut", "moeut:no-grouping"),
    ("entropy balance loss (on) vs none (off)", "moeut", "moeut:no-entropy"),
)
VISION_STATIC = (
    frozenset(),
    frozenset({"weighted"}),
    frozenset({"entropy"}),
    frozenset({"sigmoid"}),
    frozenset({"shared"}),
    frozenset({"weighted", "entropy"}),
)
VIT_ARM = Arm("vision:vit", "vision", "vit", description="ViTForImageClassification, width matched to UoE's FLOPs")
# the matched width's FLOPs sit above or below UoE's (widths are multiples of 8): with the widest ViT at <= UoE's FLOPs
# the two ViTs bracket UoE's FLOPs, and the report reads the ViT at UoE's FLOPs between them
VIT_NARROW_ARM = Arm(
    "vision:vit:narrow", "vision", "vit", variant="narrow",
    description="ViTForImageClassification, the widest (multiple of 8) at <= UoE's active FLOPs",
)  # fmt: skip
VIT_ARMS = (VIT_ARM, VIT_NARROW_ARM)


def lm_static_arms() -> list[Arm]:
    return [uoe_arm(labels) for labels in uoe_ablation_sets()] + list(BASELINE_ARMS)


def vision_static_arms() -> list[Arm]:
    return [*VIT_ARMS] + [uoe_arm(labels, "vision") for labels in VISION_STATIC]


@functools.cache
def arm_by_name(name: str) -> Arm:
    for arm in lm_static_arms() + vision_static_arms():
        if arm.name == name:
            return arm
    if name.startswith("vision:uoe:"):  # the LM winner's components (dynamic)
        body = name.removeprefix("vision:uoe:")
        return uoe_arm(frozenset() if body == "paper" else frozenset(body.split("+")), "vision")
    raise ValueError(f"unknown arm {name!r}")


# ---------------------------------------------------------------------------------------------------------------------
# 3. Levels and configs
# ---------------------------------------------------------------------------------------------------------------------

Level = tuple[str, dict[str, Any]]


def arm_levels(arm: Arm, setup: Setup) -> tuple[list[Level], str]:
    """The compute levels of `arm` (label, config changes) and the label of its middle level (the ablation's)."""
    if arm.task == "vision":
        return [("base", {})], "base"
    if arm.is_uoe:
        kind = "uoe_shared" if "shared" in arm.labels else "uoe_chain" if "chain" in arm.labels else "uoe_weighted"
        levels = frontier_sweep.sweep_levels(kind, setup)
        middle = levels[len(levels) // 2][0]
        cheaper = {"uoe_weighted": (2, 1), "uoe_chain": (1, 1)}.get(kind)  # a point at <= 0.8x the cheapest MoEs
        if cheaper is not None:
            levels = [(f"h{cheaper[0]}e{cheaper[1]}", {"attention_top_k": cheaper[0], "mlp_top_k": cheaper[1]}),
                      *levels]  # fmt: skip
        return levels, middle
    if arm.variant == "no-shared":  # one more routed expert replaces the shared one: the middle level is k2 + 1
        levels = [(f"k{k}", {"num_experts_per_tok": k}) for k in (2, 3, 4)]
        return levels, "k3"
    levels = frontier_sweep.sweep_levels(arm.family, setup)
    return levels, levels[len(levels) // 2][0]


def level_changes(arm: Arm, level: str, setup: Setup) -> dict[str, Any]:
    levels, _ = arm_levels(arm, setup)
    for label, changes in levels:
        if label == level:
            return changes
    raise ValueError(f"{arm.name} has no level {level!r}; it has {[label for label, _ in levels]}")


def setup_key(setup: Setup) -> str:
    return json.dumps(dataclasses.asdict(setup), sort_keys=True)


@functools.cache
def _base_configs(key: str) -> tuple[Any, dict[str, Any], int]:
    """compare_lm's UoE (the matching rule's reference), the sweep's baseline builders, UoE's parameter count."""
    setup = Setup(**json.loads(key))
    uoe = compare_lm.build_configs(setup, ("uoe_union",))["uoe_union"]
    builders = frontier_sweep.sweep_base_configs(setup, FRONTIER_BASELINES)
    return uoe, builders, count_parameters(uoe)


def uoe_lm_config(labels: frozenset[str], changes: dict[str, Any], setup: Setup) -> Any:
    """UoE at `setup`'s sizes (compare_lm's matching rule) with the paper's recipe, the components of `labels` and the
    level's `changes`, built by `UoEConfig.from_recipe`."""
    from uoe import UoEConfig  # noqa: PLC0415
    from uoe.configuration_uoe import RECIPE_FIELDS  # noqa: PLC0415

    reference, _, _ = _base_configs(setup_key(setup))
    accepted = set(inspect.signature(UoEConfig.__init__).parameters) - set(RECIPE_FIELDS)
    sizes = {k: v for k, v in reference.to_dict().items() if k in accepted}
    fields: dict[str, Any] = {}
    for label in sorted(labels):
        fields.update(LABEL_FIELDS[label])
    if labels & {"grouped", "grouped-wide"}:
        fields["num_layer_groups"] = max(1, setup.num_layers // 2)

    def build(**more: Any) -> Any:
        return UoEConfig.from_recipe("paper", **{**sizes, **fields, **changes, **more})

    if "grouped-wide" not in labels:
        return build()
    # as many parameters as the same arm with every layer its own: more MLP experts of the same width, same top-k
    target = count_parameters(uoe_lm_config(labels - {"grouped-wide"}, changes, setup))
    width, experts = reference.intermediate_size // reference.num_mlp_experts, reference.num_mlp_experts
    solved = harness.solve_width(
        lambda n: count_parameters(build(num_mlp_experts=n, intermediate_size=n * width)), target,
        range(experts, 8 * experts + 1),
    )  # fmt: skip
    return build(num_mlp_experts=solved, intermediate_size=solved * width)


def lm_config(arm: Arm, level: str, setup: Setup) -> Any:
    """The config of `arm` at `level`."""
    changes = level_changes(arm, level, setup)
    if arm.is_uoe:
        return uoe_lm_config(arm.labels, changes, setup)
    _, builders, target = _base_configs(setup_key(setup))
    if arm.variant in ("", "entropy"):  # the entropy variant changes the training loss, not the config
        return builders[arm.family](changes)
    if arm.variant == "no-shared":  # (transformers then builds a zero-width shared MLP: no parameters, output 0)
        values = builders["deepseek_v3"]({}).to_dict()

        def deepseek(width: int) -> Any:
            return config_from_dict({**values, **changes, "n_shared_experts": 0, "moe_intermediate_size": width})

        return deepseek(harness.solve_width(lambda w: count_parameters(deepseek(w)), target))
    if arm.variant == "no-grouping":
        layers = setup.num_layers
        experts = harness.solve_width(  # at least 8, as many as the other MoEs (the sweep's rule)
            lambda n: count_parameters(frontier_sweep.moeut_config(setup, n, group_size=layers)), target,
            range(8, 2**20),
        )  # fmt: skip
        return frontier_sweep.moeut_config(setup, experts, group_size=layers, **changes)
    if arm.variant == "no-entropy":
        return builders["moeut"]({**changes, "mlp_entropy_coef": 0.0, "attention_entropy_coef": 0.0})
    raise ValueError(f"unknown variant {arm.variant!r} of {arm.name}")


def baseline_balance_loss(arm: Arm) -> str:
    """`Setup.baseline_balance_loss` of the arm's runs: the entropy variant changes the training loss, not the model."""
    return "entropy" if arm.variant == "entropy" else "native"


def vision_config(arm: Arm) -> Any:
    """The image classifier of `compare_vision.py` with the components of `arm` (the shared variants keep 2 of 4 heads
    and experts in use: 1 shared + 1 routed)."""
    import compare_vision  # noqa: PLC0415

    from uoe import UoEConfig  # noqa: PLC0415

    fields: dict[str, Any] = {}
    for label in sorted(arm.labels):
        fields.update(LABEL_FIELDS[label])
    if "shared" in arm.labels:
        fields.update(attention_top_k=1, mlp_top_k=1)
    return UoEConfig.from_dict({**compare_vision.uoe_config().to_dict(), **fields})


# ---------------------------------------------------------------------------------------------------------------------
# 4. Runs and their files
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    arm: str
    level: str
    lr_step: int  # the learning rate is the study's lr_base * 2**lr_step
    seed: int

    def learning_rate(self, study: Study) -> float:
        return study.learning_rate(arm_by_name(self.arm).task, self.lr_step)

    def run_id(self, study: Study) -> str:
        slug = self.arm.replace(":", "_")
        return f"{slug}__{self.level}__lr{self.learning_rate(study):g}__s{self.seed}"

    def key(self, study: Study) -> str:
        """A hash of everything the run's result depends on (its plan entry and the study's budget)."""
        arm = arm_by_name(self.arm)
        spec = {
            "version": PLAN_VERSION, "arm": self.arm, "labels": sorted(arm.labels), "variant": arm.variant,
            "level": self.level, "learning_rate": self.learning_rate(study), "seed": self.seed,
            "budget": study.key()["setup" if arm.task == "lm" else "vision"],
        }  # fmt: skip
        if arm.task == "lm":
            spec["level_changes"] = level_changes(arm, self.level, study.setup)
        return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


class ResultStore:
    """The result files of one study: `<folder>/<run-id>.json`, claimed while running by `<run-id>.lock`."""

    def __init__(self, folder: Path, study: Study):
        self.folder, self.study = Path(folder), study
        self.records: dict[str, dict[str, Any]] = {}

    def check_study(self, create: bool) -> None:
        """The folder belongs to one study budget: refuse to mix results of another."""
        path = self.folder / STUDY_FILE
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved != self.study.key():
                raise SystemExit(
                    f"--results_dir: {self.folder} holds a study with another budget ({path}); use another folder "
                    "(or move the old results away)."
                )
        elif create:
            harness.write_json(path, self.study.key())

    def refresh(self) -> dict[str, dict[str, Any]]:
        records = {}
        if self.folder.is_dir():
            for path in sorted(self.folder.glob("*.json")):
                if path.name == STUDY_FILE:
                    continue
                record = json.loads(path.read_text())
                records[record["run_id"]] = record
        self.records = records
        return records

    def get(self, run: Run) -> dict[str, Any] | None:
        record = self.records.get(run.run_id(self.study))
        if record is not None and record["key"] != run.key(self.study):
            raise SystemExit(
                f"{self.folder / (record['run_id'] + '.json')} was written for another plan (key {record['key']}, "
                f"expected {run.key(self.study)}): move it away or change --results_dir."
            )
        return record

    def write(self, record: dict[str, Any]) -> None:
        path = self.folder / f"{record['run_id']}.json"
        temporary = path.with_name(path.name + f".tmp{os.getpid()}")
        harness.write_json(temporary, record, indent=1)
        os.replace(temporary, path)
        self.records[record["run_id"]] = record

    def claim(self, run_id: str) -> bool:
        """Create `<run-id>.lock`; False when another live process holds it (a dead one's lock is taken over)."""
        lock = self.folder / f"{run_id}.lock"
        for _ in range(2):
            try:
                descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    holder = json.loads(lock.read_text() or "{}")
                except (OSError, json.JSONDecodeError):
                    holder = {}
                if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid", -1)):
                    lock.unlink(missing_ok=True)  # its process is gone: take it over
                    continue
                return False
            with os.fdopen(descriptor, "w") as handle:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, handle)
            return True
        return False

    def release(self, run_id: str) -> None:
        (self.folder / f"{run_id}.lock").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return pid > 0


# ---------------------------------------------------------------------------------------------------------------------
# 5. The plan: what to run next, from the results so far
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LRSearch:
    tried: dict[int, float]  # k -> the seed-0 metric at the middle level (inf: failed)
    pending: list[int]
    chosen: int | None = None
    edge: bool = False  # the chosen rate is the largest or smallest tried (the ladder's bound stopped the widening)
    failed: bool = False  # every rate failed


def metric(record: dict[str, Any]) -> float:
    """What the study minimises: LM validation perplexity, vision test error (%); inf for a failed run."""
    result = record["result"]
    if result.get("status") != "ok":
        return math.inf
    value = result["validation_perplexity"] if record["task"] == "lm" else 100.0 * (1.0 - result["accuracy"])
    return value if math.isfinite(value) else math.inf


class Planner:
    """The runs the study needs next, given the finished ones (`records`: run id -> record)."""

    def __init__(self, study: Study, records: dict[str, dict[str, Any]], tasks: tuple[str, ...] = ("lm", "vision")):
        self.study, self.records, self.tasks = study, records, tasks

    def value(self, run: Run) -> float | None:
        record = self.records.get(run.run_id(self.study))
        return None if record is None else metric(record)

    def middle(self, arm: Arm) -> str:
        return arm_levels(arm, self.study.setup)[1]

    def lr_search(self, arm: Arm) -> LRSearch:
        low, high = self.study.lr_bounds
        grid, middle = set(self.study.lr_start), self.middle(arm)
        while True:
            tried = {k: self.value(Run(arm.name, middle, k, 0)) for k in sorted(grid)}
            pending = [k for k, v in tried.items() if v is None]
            if pending:
                return LRSearch({k: v for k, v in tried.items() if v is not None}, pending)
            finite = {k: v for k, v in tried.items() if math.isfinite(v)}
            if not finite:
                return LRSearch(tried, [], failed=True)
            best = min(finite, key=lambda k: (finite[k], k))
            if best == max(grid) and best < high:
                grid.add(best + 1)
            elif best == min(grid) and best > low:
                grid.add(best - 1)
            else:
                return LRSearch(tried, [], chosen=best, edge=best in (min(grid), max(grid)))

    def seeds(self, arm: Arm, contenders: set[str]) -> int:
        return self.study.contender_seeds if arm.name in contenders else self.study.ablation_seeds

    def point(self, arm: Arm, level: str, seeds: int) -> list[float] | None:
        """The metric of each finished seed of `arm` at `level` at its chosen rate (None: no rate chosen yet)."""
        search = self.lr_search(arm)
        if search.chosen is None:
            return None
        values = [self.value(Run(arm.name, level, search.chosen, seed)) for seed in range(seeds)]
        return [v for v in values if v is not None]

    def complete(self, arm: Arm, seeds: int) -> bool:
        """Its rate is settled (or every rate failed) and every seed at the middle level finished."""
        search = self.lr_search(arm)
        if search.failed:
            return True
        values = self.point(arm, self.middle(arm), seeds)
        return values is not None and len(values) == seeds

    def mean(self, arm: Arm, level: str, seeds: int) -> float:
        values = self.point(arm, level, seeds) or []
        return statistics.fmean(values) if values and all(map(math.isfinite, values)) else math.inf

    def top_recipes(self) -> tuple[list[Arm], str | None]:
        """The best UoE arms of the ablation (besides the paper's), once every UoE arm has its seeds."""
        uoe = [a for a in lm_static_arms() if a.is_uoe]
        waiting = [a.name for a in uoe if not self.complete(a, self.study.ablation_seeds)]
        if waiting:
            return [], f"the top UoE recipes wait for {len(waiting)} ablation arm(s) to finish their seeds"
        ranked = sorted(
            (a for a in uoe if a.labels and math.isfinite(self.mean(a, self.middle(a), self.study.ablation_seeds))),
            key=lambda a: (self.mean(a, self.middle(a), self.study.ablation_seeds), a.name),
        )
        return ranked[: self.study.top_recipes], None

    def frontier_arms(self) -> tuple[list[Arm], str | None]:
        known = [arm_by_name(name) for name in (*FRONTIER_BASELINES, "uoe:paper")]
        top, waiting = self.top_recipes()
        return known + top, waiting

    def lm_winner(self) -> Arm | None:
        """The UoE arm with the lowest perplexity at the middle level, once every UoE ablation arm has its seeds."""
        top, waiting = self.top_recipes()
        if waiting:
            return None
        seeds = self.study.ablation_seeds  # the ranking of `top_recipes`: fixed once the ablation has its seeds
        return min([*top, arm_by_name("uoe:paper")], key=lambda a: (self.mean(a, self.middle(a), seeds), a.name))

    def vision_arms(self) -> tuple[list[Arm], set[str], str | None]:
        """The vision arms (static ones + the LM winner's encoder components) and the vision contenders."""
        arms = vision_static_arms()
        winner = self.lm_winner()
        notes = []
        if winner is None:
            notes.append("the LM winner's components wait for the LM ablation")
        else:
            extra = uoe_arm(winner.labels & VISION_LABELS, "vision")
            if extra.name not in {a.name for a in arms}:
                arms.append(extra)
        contenders = {a.name for a in VIT_ARMS}
        waiting = [a.name for a in arms if not self.complete(a, self.study.ablation_seeds)]
        if waiting:
            notes.append(f"the third vision seeds wait for {len(waiting)} vision arm(s)")
        else:
            uoe = [a for a in arms if a.is_uoe]
            contenders.add(min(uoe, key=lambda a: (self.mean(a, "base", self.study.ablation_seeds), a.name)).name)
        return arms, contenders if not waiting else {a.name for a in VIT_ARMS}, "; ".join(notes) or None

    def ready(self) -> list[Run]:
        """Every run whose inputs are known and that has not finished, in the order to run them: the rate searches,
        the middle level's seeds, the frontier's other levels, then vision."""
        runs: list[Run] = []
        if "lm" in self.tasks:
            frontier, _ = self.frontier_arms()
            contenders = {a.name for a in frontier}
            arms = lm_static_arms() + [a for a in frontier if a not in lm_static_arms()]
            runs += self._searches(arms)
            runs += self._seeds(arms, contenders, lambda arm: [self.middle(arm)])
            runs += self._seeds(
                frontier, contenders, lambda arm: [lv for lv, _ in arm_levels(arm, self.study.setup)[0]]
            )
        if "vision" in self.tasks:
            arms, contenders, _ = self.vision_arms()
            runs += self._searches(arms)
            runs += self._seeds(arms, contenders, lambda arm: ["base"])
        return list(dict.fromkeys(runs))

    def _searches(self, arms: list[Arm]) -> list[Run]:
        return [Run(a.name, self.middle(a), k, 0) for a in arms for k in self.lr_search(a).pending]

    def _seeds(self, arms: list[Arm], contenders: set[str], levels: Callable[[Arm], list[str]]) -> list[Run]:
        runs = []
        for arm in arms:
            search = self.lr_search(arm)
            if search.chosen is None:
                continue
            for level in levels(arm):
                for seed in range(self.seeds(arm, contenders)):
                    run = Run(arm.name, level, search.chosen, seed)
                    if self.value(run) is None:
                        runs.append(run)
        return runs

    def waiting(self) -> list[str]:
        notes = []
        if "lm" in self.tasks:
            notes.append(self.frontier_arms()[1])
        if "vision" in self.tasks:
            notes.append(self.vision_arms()[2])
        return [n for n in notes if n]


# ---------------------------------------------------------------------------------------------------------------------
# 6. Running
# ---------------------------------------------------------------------------------------------------------------------


def compact_result(result: dict[str, Any], windows: int = 36) -> dict[str, Any]:
    """A worker's result without the per-step curves: the training loss averaged over `windows` equal windows."""
    result = dict(result)
    for name in ("train_losses", "aux_losses"):
        values = result.pop(name, None)
        if values:
            size = max(1, math.ceil(len(values) / windows))
            chunks = [values[i : i + size] for i in range(0, len(values), size)]
            result[f"{name}_windows"] = [round(statistics.fmean(c), 5) for c in chunks]
            result[f"{name}_window_steps"] = size
    return result


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Runner:
    """Runs the study's runs: LM ones in a fresh process each (compare_lm's worker) or, in quick mode, here; vision
    ones here (compare_vision's training)."""

    def __init__(self, study: Study, work_dir: Path, run_timeout: float, fashion_mnist_dir: str | None = None):
        self.study, self.work_dir, self.run_timeout = study, Path(work_dir), run_timeout
        self.fashion_mnist_dir = fashion_mnist_dir
        self._lm_data: tuple[Path, dict] | None = None
        self._vision_data: dict | None = None

    def lm_data(self) -> tuple[Path, dict]:
        if self._lm_data is None:
            import fcntl  # noqa: PLC0415  (two study processes must not write the data cache at once)

            self.work_dir.mkdir(parents=True, exist_ok=True)
            with open(self.work_dir / "data.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._lm_data = compare_lm.prepare_data(self.work_dir, self.study.setup)
        return self._lm_data

    def vision_data(self) -> dict:
        if self._vision_data is None:
            import compare_vision  # noqa: PLC0415

            budget = self.study.vision
            self._vision_data = compare_vision.load_data(
                self.fashion_mnist_dir, budget.train_samples, budget.test_samples
            )
        return self._vision_data

    def run(
        self, run: Run, setup_override: Setup | None = None, vision_override: VisionBudget | None = None
    ) -> tuple[dict[str, Any], dict[str, Any], float, float]:
        """Train and evaluate `run`; returns (config dict, result, wall seconds, CPU seconds)."""
        arm = arm_by_name(run.arm)
        lr = run.learning_rate(self.study)
        wall, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
        if arm.task == "lm":
            config, result = self._lm(run, arm, lr, setup_override)
        else:
            config, result = self._vision(run, arm, lr, vision_override or self.study.vision)
        cpu_seconds = time.process_time() - cpu + _children_cpu() - children
        return config, result, time.perf_counter() - wall, cpu_seconds

    def _lm(self, run: Run, arm: Arm, lr: float, setup_override: Setup | None) -> tuple[dict, dict]:
        data_path, _ = self.lm_data()
        setup = dataclasses.replace(
            setup_override or self.study.setup, learning_rate=lr, baseline_balance_loss=baseline_balance_loss(arm)
        )
        config = lm_config(arm, run.level, self.study.setup)
        name = run.run_id(self.study)
        if self.study.in_process:
            try:
                result = compare_lm.train_and_evaluate(name, config, setup, run.seed, data_path, measure=False)
            except Exception as error:  # noqa: BLE001  (a diverging or failing run is a result)
                result = {"model": name, "seed": run.seed, "status": f"failed: {type(error).__name__}: {error}"}
        else:
            result = compare_lm.run_worker(name, config, setup, run.seed, data_path, self.work_dir, self.run_timeout)
        return config.to_dict(), compact_result(result)

    def _vision(self, run: Run, arm: Arm, lr: float, budget: VisionBudget) -> tuple[dict, dict]:
        import compare_vision  # noqa: PLC0415
        import torch  # noqa: PLC0415

        data = self.vision_data()
        if len(data["train_y"]) < budget.train_samples:
            raise ValueError("the vision data holds fewer images than the budget asks for")
        data = {**data, "train_x": data["train_x"][: budget.train_samples],
                "train_y": data["train_y"][: budget.train_samples]}  # fmt: skip
        args = argparse.Namespace(lr=lr, **dataclasses.asdict(budget))
        torch.manual_seed(run.seed)
        try:
            if arm.family == "vit":
                narrow = arm.variant == "narrow"
                model, info = compare_vision.narrow_vit_model() if narrow else compare_vision.build_model("vit")
                config = model.config.to_dict()
            else:
                built = vision_config(arm)
                model, info = compare_vision.uoe_model(built)
                config = built.to_dict()
            result = {"status": "ok", **compare_vision.run_model(model, info, run.seed, data, args)}
        except Exception as error:  # noqa: BLE001
            config, result = {}, {"status": f"failed: {type(error).__name__}: {error}"}
        return config, result


def record_of(run: Run, study: Study, config: dict, result: dict, wall: float, cpu: float, env: dict) -> dict:
    """The file of a finished run: its plan entry and key, the config it trained, its result and its cost."""
    arm = arm_by_name(run.arm)
    return {
        "run_id": run.run_id(study), "key": run.key(study), "plan_version": PLAN_VERSION, "mode": study.mode,
        "arm": run.arm, "task": arm.task, "family": arm.family, "labels": sorted(arm.labels), "variant": arm.variant,
        "level": run.level, "lr_step": run.lr_step, "learning_rate": run.learning_rate(study), "seed": run.seed,
        "config": config, "result": result, "wall_seconds": wall, "cpu_seconds": cpu,
        "torch_threads": _torch_threads(), "environment": env,
    }  # fmt: skip


def _torch_threads() -> int:
    import torch  # noqa: PLC0415

    return torch.get_num_threads()


def cost_class(run: Run, study: Study) -> str:
    """Runs of one class take about the same time: UoE arms differ in time by their shared experts, chain and
    grouped-wide experts only (gates, scores, balance, norm and sharing do not change the work)."""
    arm = arm_by_name(run.arm)
    if arm.task == "vision":
        return f"vision:{arm.family}" + (":shared" if "shared" in arm.labels else "")
    if arm.is_uoe:
        kind = next((k for k in ("shared", "chain", "grouped-wide") if k in arm.labels), "plain")
        return f"uoe:{kind}:{run.level}"
    variant = {"no-shared": ":no-shared", "no-grouping": ":no-grouping"}.get(arm.variant, "")
    return f"{arm.family}{variant}:{run.level}"


def predicted_seconds(run: Run, study: Study, records: dict[str, dict], estimates: dict[str, dict],
                      default: float) -> float:  # fmt: skip
    cls = cost_class(run, study)
    seen = [r["wall_seconds"] for r in records.values() if cost_class(run_of(r), study) == cls]
    if seen:
        return 1.1 * max(seen)
    if cls in estimates:
        return 1.5 * estimates[cls]["run_seconds"]
    return default


def run_of(record: dict[str, Any]) -> Run:
    return Run(record["arm"], record["level"], record["lr_step"], record["seed"])


def load_estimates(folder: Path) -> dict[str, dict]:
    directory = Path(folder) / ESTIMATE_DIR
    timings = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))] if directory.is_dir() else []
    return {timing["class"]: timing for timing in timings}


def run_study(args: argparse.Namespace, study: Study, argv: list[str] | None) -> dict[str, Any]:
    """Run ready runs until none is left, `--max_runs` ran or `--max_minutes` would be exceeded."""
    store = ResultStore(Path(args.results_dir), study)
    store.folder.mkdir(parents=True, exist_ok=True)
    store.check_study(create=True)
    runner = Runner(study, Path(args.work_dir), args.run_timeout, args.fashion_mnist_dir)
    env = harness.environment("recipe_study.py", argv)
    started, done, stop = time.perf_counter(), 0, None
    budget = args.max_minutes * 60 if args.max_minutes is not None else math.inf
    estimates = load_estimates(store.folder)
    while stop is None:
        planner = Planner(study, store.refresh(), args.tasks)
        ready = planner.ready()
        if not ready:
            stop = "nothing left to run" + (f" ({'; '.join(planner.waiting())})" if planner.waiting() else "")
            break
        for run in ready:
            run_id = run.run_id(study)
            store.get(run)  # refuses a stale file under this id
            if args.max_runs is not None and done >= args.max_runs:
                stop = f"--max_runs {args.max_runs} reached"
                break
            predicted = predicted_seconds(run, study, store.records, estimates, args.default_run_minutes * 60)
            if time.perf_counter() - started + predicted > budget:
                stop = f"--max_minutes: the next run ({run_id}, ~{predicted / 60:.1f} min) would not fit"
                break
            if not store.claim(run_id):
                continue  # another process runs it
            if (store.folder / f"{run_id}.json").is_file():  # another process finished it since the refresh
                store.release(run_id)
                break
            try:
                config, result, wall, cpu = runner.run(run)
                record = record_of(run, study, config, result, wall, cpu, {**env, "loadavg_end": list(os.getloadavg())})
                store.write(record)
            finally:
                store.release(run_id)
            done += 1
            outcome = f"{metric(record):.2f}" if result.get("status") == "ok" else result.get("status")
            print(f"[recipe] {run_id}: {outcome} ({wall:.0f} s wall, {cpu:.0f} s CPU)", flush=True)
            break  # re-plan after every run: a result can add or remove runs
        else:  # every ready run is held by another process: wait for its results (they can open new runs)
            if time.perf_counter() - started + POLL_SECONDS > budget:
                stop = "every ready run is being run by another process"
            else:
                time.sleep(POLL_SECONDS)
    print(f"[recipe] stopped: {stop}; {done} run(s) in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return {"runs": done, "stop": stop}


# ---------------------------------------------------------------------------------------------------------------------
# 7. The estimate: the planned runs and their time
# ---------------------------------------------------------------------------------------------------------------------


def simulate(study: Study, records: dict[str, dict], cost: Callable[[Run], float], tasks: tuple[str, ...]) -> list[Run]:
    """Every run the plan will make from `records` on, with stand-in results for the missing ones: every rate search
    settles on its first grid (no widening; `lr_extensions` in the estimate adds them) and the costliest UoE arms are
    taken as the top recipes (so the time is an upper bound there)."""
    records, planned = dict(records), []
    center = sorted(study.lr_start)[len(study.lr_start) // 2]
    while True:
        ready = Planner(study, records, tasks).ready()
        if not ready:
            return planned
        for run in ready:
            arm = arm_by_name(run.arm)
            value = 100.0 + abs(run.lr_step - center) - (cost(run) / 1e4 if arm.is_uoe else 0.0)
            result = {"status": "ok", "validation_perplexity": value, "accuracy": 1.0 - value / 1e3}
            records[run.run_id(study)] = {**record_of(run, study, {}, result, 0.0, 0.0, {}), "simulated": True}
            planned.append(run)


def measure_class(run: Run, study: Study, runner: Runner, steps: int) -> dict[str, Any]:
    """Time one short run of `run`'s cost class: a real run (a fresh process, as the study's), `steps` steps (vision:
    `steps` batches), scaled to the study's budget: overhead (start, data, build, evaluation) + steps x step time."""
    arm = arm_by_name(run.arm)
    if arm.task == "lm":
        short = dataclasses.replace(study.setup, max_steps=steps, warmup_steps=1)
        _, result, wall, cpu = runner.run(run, setup_override=short)
        if result.get("status") != "ok":
            raise RuntimeError(f"{run.run_id(study)}: {result.get('status')}")
        step = study.setup.batch_size * study.setup.seq_len / result["tokens_per_second"]
        overhead = max(0.0, wall - result["train_seconds"])
        total_steps = study.setup.max_steps
    else:
        budget = study.vision
        short = dataclasses.replace(budget, train_samples=steps * budget.batch_size, epochs=1, warmup_steps=1)
        _, result, wall, cpu = runner.run(run, vision_override=short)
        if result.get("status") != "ok":
            raise RuntimeError(f"{run.run_id(study)}: {result.get('status')}")
        step = result["train_seconds"] / result["train_steps"]
        overhead = max(0.0, wall - result["train_seconds"])
        total_steps = budget.epochs * math.ceil(budget.train_samples / budget.batch_size)
    return {
        "class": cost_class(run, study), "example_run": run.run_id(study), "steps_timed": steps,
        "step_seconds": step, "overhead_seconds": overhead, "run_seconds": overhead + total_steps * step,
        "short_wall_seconds": wall, "short_cpu_seconds": cpu, "torch_threads": _torch_threads(),
        "load_average": list(os.getloadavg()), "date_utc": harness.environment("recipe_study.py", [])["date_utc"],
    }  # fmt: skip


def plan_summary(study: Study, records: dict[str, dict], estimates: dict[str, dict], tasks: tuple[str, ...]) -> dict:
    """The runs still planned from `records` on (`simulate`) and their time from `estimates` (per cost class)."""

    def seconds(run: Run) -> float:
        return estimates.get(cost_class(run, study), {}).get("run_seconds", math.nan)

    planned = simulate(study, records, lambda run: 0.0 if math.isnan(seconds(run)) else seconds(run), tasks)
    classes = list(dict.fromkeys(cost_class(r, study) for r in planned))
    searches = {(r.arm, r.level) for r in planned if r.seed == 0}
    per_search = [seconds(Run(a, lv, 0, 0)) for a, lv in searches]
    return {
        "planned_runs": len(planned), "planned_seconds": sum(seconds(r) for r in planned),  # NaN: a class untimed
        "unmeasured_classes": [c for c in classes if c not in estimates], "lr_searches": len(searches),
        "lr_extension_seconds_each": statistics.fmean(per_search) if per_search else 0.0,
        "finished_runs": len(records), "finished_seconds": sum(r["wall_seconds"] for r in records.values()),
        "example_runs": {c: next(r for r in planned if cost_class(r, study) == c) for c in classes},
        "per_class": {c: {"runs": sum(1 for r in planned if cost_class(r, study) == c),
                          "run_seconds": estimates.get(c, {}).get("run_seconds")} for c in classes},
    }  # fmt: skip


def estimate(args: argparse.Namespace, study: Study) -> dict[str, Any]:
    """Time one short run per cost class of the plan not timed yet (saved under `<results_dir>/estimate/`, so this
    resumes too), then print the planned runs per class and their total time. The planned runs depend on the timings
    (the costliest UoE arms stand in for the top recipes), so it re-plans until every planned class is timed."""
    store = ResultStore(Path(args.results_dir), study)
    store.folder.mkdir(parents=True, exist_ok=True)
    store.check_study(create=True)  # the timings are scaled to this budget
    records = store.refresh()
    folder = store.folder / ESTIMATE_DIR
    runner = Runner(study, Path(args.work_dir), args.run_timeout, args.fashion_mnist_dir)
    started = time.perf_counter()
    while True:
        estimates = load_estimates(store.folder)
        summary = plan_summary(study, records, estimates, args.tasks)
        if not summary["unmeasured_classes"]:
            break
        if args.max_minutes is not None and time.perf_counter() - started > args.max_minutes * 60:
            print("[estimate] --max_minutes reached: run --estimate again to time the other classes", flush=True)
            break
        cls = summary["unmeasured_classes"][0]
        timing = measure_class(summary["example_runs"][cls], study, runner, args.estimate_steps)
        harness.write_json(folder / f"{cls.replace(':', '_')}.json", timing)
        seconds = f"{timing['step_seconds']:.3f} s/step x the budget's steps + {timing['overhead_seconds']:.0f} s"
        print(
            f"[estimate] {cls}: {timing['run_seconds']:.0f} s per run ({seconds} start, data, evaluation)", flush=True
        )
    print(estimate_text(summary), flush=True)
    return {k: v for k, v in summary.items() if k != "example_runs"}


def estimate_text(summary: dict[str, Any]) -> str:
    hours = summary["planned_seconds"] / 3600
    extra = summary["lr_searches"] * summary["lr_extension_seconds_each"] / 3600
    lines = [
        f"[estimate] {summary['finished_runs']} run(s) finished ({summary['finished_seconds'] / 3600:.2f} h); "
        f"{summary['planned_runs']} planned: {hours:.1f} h at the timed seconds per run (one run at a time), "
        f"+ {extra:.1f} h if each of the {summary['lr_searches']} rate searches widens once.",
    ]
    if summary["unmeasured_classes"]:
        lines.append(f"[estimate] not timed yet (so the total is NaN): {', '.join(summary['unmeasured_classes'])}")
    for cls, info in summary["per_class"].items():
        each = info["run_seconds"]
        lines.append(f"  {cls:30s} {info['runs']:4d} runs x {'?' if each is None else f'{each:.0f}'} s")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# 8. The report, from the result files only
# ---------------------------------------------------------------------------------------------------------------------


def stats(values: list[float]) -> dict[str, Any]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite or len(finite) < len(values):
        return {"n": len(values), "ok": False}
    spread = statistics.stdev(finite) if len(finite) > 1 else None  # one seed has no spread (shown as "–")
    return {"n": len(values), "ok": True, "mean": statistics.fmean(finite), "std": spread, "min": min(finite),
            "max": max(finite)}  # fmt: skip


def fmt_stats(s: dict[str, Any] | None, digits: int = 2) -> str:
    if s is None or s["n"] == 0:
        return "–"
    if not s["ok"]:
        return "failed"
    mean, low, high = (f"{s[k]:.{digits}f}" for k in ("mean", "min", "max"))
    std = "–" if s["std"] is None else f"{s['std']:.{digits}f}"
    return f"{mean} ± {std} [{low}, {high}] (n={s['n']})"


class Report:
    """Everything the RESULTS.md section shows, computed from the run records."""

    def __init__(self, study: Study, records: dict[str, dict[str, Any]]):
        self.study, self.records = study, records
        self.planner = Planner(study, records)
        self.frontier, self.frontier_waiting = self.planner.frontier_arms()
        self.contenders = {a.name for a in self.frontier} | self.planner.vision_arms()[1]  # their seeds: 3

    def runs_of(self, arm: Arm, level: str) -> list[dict[str, Any]]:
        search = self.planner.lr_search(arm)
        if search.chosen is None:
            return []
        seeds = self.planner.seeds(arm, self.contenders)
        out = []
        for seed in range(seeds):
            record = self.records.get(Run(arm.name, level, search.chosen, seed).run_id(self.study))
            if record is not None:
                out.append(record)
        return out

    def point(self, arm: Arm, level: str) -> dict[str, Any] | None:
        runs = self.runs_of(arm, level)
        if not runs:
            return None
        ok = [r for r in runs if r["result"].get("status") == "ok"]
        values = [metric(r) for r in runs]  # inf for a failed seed: the point shows as failed
        first = ok[0]["result"] if ok else {}
        point = {"arm": arm.name, "level": level, "learning_rate": runs[0]["learning_rate"], "stats": stats(values),
                 "parameters": first.get("parameters"),
                 "flops": first.get("flops_analytic", first.get("analytic_flops")),
                 "failed": [r["result"].get("status") for r in runs if r not in ok]}  # fmt: skip
        if arm.task == "vision":
            point["accuracy"] = stats([100.0 * r["result"]["accuracy"] if r in ok else math.inf for r in runs])
        return point

    def ablation_rows(self) -> list[dict[str, Any]]:
        rows = []
        for arm in lm_static_arms():
            point = self.point(arm, self.planner.middle(arm))
            rows.append({"arm": arm, "level": self.planner.middle(arm), "point": point})
        return rows

    def effects(self) -> list[dict[str, Any]]:
        """Per component: the pairs of ablation arms that differ only in it, and what turning it on changed."""
        means = {}
        for row in self.ablation_rows():
            point = row["point"]
            if point is not None and point["stats"].get("ok"):
                means[row["arm"].name] = point["stats"]["mean"]
        sets = {uoe_name(s): s for s in uoe_ablation_sets()}
        effects = []
        for label in UOE_LABELS:
            pairs = []
            for off_name, off in sets.items():
                if (
                    label in off
                    or (label == "grouped-wide" and "grouped" in off)
                    or (label == "grouped" and "grouped-wide" in off)
                ):
                    continue
                on_name = uoe_name(off | {label})
                if on_name in sets and on_name in means and off_name in means:
                    pairs.append((off_name, on_name, means[on_name] - means[off_name]))
            effects.append({"component": label, "model": "UoE", "pairs": pairs})
        for component, on, off in BASELINE_PAIRS:
            pairs = [(off, on, means[on] - means[off])] if on in means and off in means else []
            effects.append({"component": component, "model": arm_by_name(on).family, "pairs": pairs})
        return effects

    def lr_rows(self) -> list[dict[str, Any]]:
        arms = lm_static_arms() + [a for a in self.frontier if a not in lm_static_arms()]
        arms += self.planner.vision_arms()[0]
        rows = []
        for arm in arms:
            search = self.planner.lr_search(arm)
            if not search.tried and not search.pending:
                continue
            rows.append({"arm": arm, "search": search})
        return rows

    def frontier_points(self) -> dict[str, list[dict[str, Any]]]:
        points = {}
        for arm in self.frontier:
            levels, _ = arm_levels(arm, self.study.setup)
            mine = [self.point(arm, level) for level, _ in levels]
            points[arm.name] = [p for p in mine if p is not None and p["stats"].get("ok") and p["flops"] is not None]
        return points

    def goal(self) -> list[dict[str, Any]]:
        """At each level index of the MoE baselines: the best MoE (lowest mean), and the best UoE point of the frontier
        at <= 0.8x its active FLOPs; met when lower in mean and in range (UoE's max below the MoE's min)."""
        points = self.frontier_points()
        rows = []
        for index in range(3):
            moes = [points[f][index] for f in MOE_FAMILIES if len(points.get(f, [])) == 3]
            if not moes:
                continue
            moe = min(moes, key=lambda p: p["stats"]["mean"])
            budget = 0.8 * moe["flops"]
            uoes = [p for a in self.frontier if a.is_uoe for p in points.get(a.name, []) if p["flops"] <= budget]
            uoe = min(uoes, key=lambda p: p["stats"]["mean"]) if uoes else None
            met = (
                uoe is not None
                and uoe["stats"]["mean"] < moe["stats"]["mean"]
                and uoe["stats"]["max"] < moe["stats"]["min"]
            )
            rows.append({"index": index, "moe": moe, "uoe": uoe, "budget": budget, "met": met})
        return rows

    def envelope_claim(self) -> list[dict[str, Any]]:
        """The sweep's reading: the best UoE envelope against the best MoE envelope at 5 log-spaced FLOPs."""
        points = self.frontier_points()
        curves, tops = {}, {}
        for name, mine in points.items():
            if not mine:
                continue
            ranked = {
                f"{p['level']}": {"flops_analytic": p["flops"], "perplexity_mean": p["stats"]["mean"]} for p in mine
            }
            front = frontier_sweep.pareto_frontier(ranked)
            curves[name] = [(ranked[n]["flops_analytic"], ranked[n]["perplexity_mean"]) for n in front]
            tops[name] = max(p["flops"] for p in mine)
        uoe = [n for n in curves if arm_by_name(n).is_uoe]
        moe = [n for n in curves if arm_by_name(n).family in MOE_FAMILIES]
        if not uoe or not moe:
            return []
        low = max(min(curves[n][0][0] for n in uoe), min(curves[n][0][0] for n in moe))
        high = min(max(tops[n] for n in uoe), max(tops[n] for n in moe))
        rows = []
        for i in range(5 if high > low else 1):
            flops = low * (high / low) ** (i / 4) if high > low else low

            def best(group: list[str], flops: float = flops) -> tuple[str | None, float | None]:
                values = {n: frontier_sweep.frontier_at(curves[n], flops, tops[n]) for n in group}
                values = {n: v for n, v in values.items() if v is not None}
                return (min(values, key=values.get), min(values.values())) if values else (None, None)

            (u_name, u_value), (m_name, m_value) = best(uoe), best(moe)
            if u_value is not None and m_value is not None:
                rows.append({"flops": flops, "uoe": u_name, "uoe_ppl": u_value, "moe": m_name, "moe_ppl": m_value})
        return rows

    def vision_rows(self) -> list[dict[str, Any]]:
        arms, _, _ = self.planner.vision_arms()
        return [{"arm": a, "point": self.point(a, "base")} for a in arms]

    def totals(self) -> dict[str, Any]:
        records = list(self.records.values())
        per_level: dict[int, list[float]] = {}
        for r in records:
            if r["task"] == "lm" and r["result"].get("status") == "ok":
                per_level.setdefault(self._level_position(r), []).append(r["wall_seconds"])
        names = {-2: "UoE's cheaper level (h2e1/h1e1)", -1: "low", 0: "middle", 1: "high"}
        return {
            "runs": len(records), "failed": sum(1 for r in records if r["result"].get("status") != "ok"),
            "cpu_seconds": sum(r["cpu_seconds"] for r in records),
            "wall_seconds": sum(r["wall_seconds"] for r in records),
            "per_level_seconds": {names.get(k, f"{k:+d}"): statistics.fmean(v) for k, v in sorted(per_level.items())},
            "ready": len(self.planner.ready()), "waiting": self.planner.waiting(),
            "commits": sorted({r["environment"].get("git_commit", "?") for r in records}),
            "dates": sorted(r["environment"].get("date_utc", "?") for r in records),
            "cpus": sorted({f"{r['environment'].get('cpu', '?')}, {r['torch_threads']} thread(s)" for r in records}),
        }  # fmt: skip

    def _level_position(self, record: dict[str, Any]) -> int:
        """The run's level relative to its arm's middle level (-1: the next cheaper, ...)."""
        levels, middle = arm_levels(arm_by_name(record["arm"]), self.study.setup)
        labels = [label for label, _ in levels]
        return labels.index(record["level"]) - labels.index(middle)


def components_of(arm: Arm) -> list[str]:
    """The value of each component of `COMPONENTS` in a UoE arm (the paper's where the arm does not change it)."""
    cells = []
    for paper, labels in COMPONENTS.values():
        present = [label for label in labels if label in arm.labels]
        cells.append(present[0] if present else paper)
    return cells


def lr_cell(study: Study, arm: Arm, search: LRSearch) -> str:
    parts = []
    for k in sorted(search.tried):
        value = search.tried[k]
        text = "failed" if not math.isfinite(value) else f"{value:.2f}"
        lr = f"{study.learning_rate(arm.task, k):g}"
        parts.append(f"**{lr} → {text}**" if k == search.chosen else f"{lr} → {text}")
    parts += [f"{study.learning_rate(arm.task, k):g} → (to run)" for k in search.pending]
    return ", ".join(parts)


def _cell(value: Any, text: Callable[[Any], str]) -> str:
    return "–" if value is None else text(value)


def header_lines(report: Report) -> list[str]:
    study, totals = report.study, report.totals()
    setup, vision = study.setup, study.vision
    if totals["ready"] == 0 and not totals["waiting"]:
        progress = "the plan is complete."
    else:
        waiting = f", and {'; '.join(totals['waiting'])}" if totals["waiting"] else ""
        progress = f"**incomplete**: {totals['ready']} run(s) ready to run{waiting}; every figure below is provisional."
    dates = f"; runs from {totals['dates'][0]} to {totals['dates'][-1]}" if totals["dates"] else ""
    per_level = ", ".join(f"{k} {v:.0f} s" for k, v in totals["per_level_seconds"].items()) or "–"
    return [
        f"Mode `{study.mode}`. Runs finished: {totals['runs']} ({totals['failed']} failed); {progress}",
        f"Total CPU time of the finished runs: **{totals['cpu_seconds'] / 3600:.2f} h** (wall "
        f"{totals['wall_seconds'] / 3600:.2f} h, summed over runs). Machines: {'; '.join(totals['cpus']) or '–'}; "
        f"commits {', '.join(totals['commits']) or '–'}{dates}.",
        f"Mean wall seconds per LM run by level: {per_level}.",
        "",
        f"Budget per LM run: {setup.max_steps} steps x {setup.batch_size} x {setup.seq_len} tokens = "
        f"{setup.tokens:,} tokens ({setup.tokens / 368_640:.1f}x the frontier sweep's), warm-up {setup.warmup_steps} "
        f"then cosine, AdamW as compare_lm.py, width {setup.hidden_size}, {setup.num_layers} layers, "
        f"{setup.num_heads} heads, vocabulary {setup.vocab_size}, validation on {setup.eval_blocks} blocks; every "
        f"Switch loss at the same pressure (x {setup.aux_coef}). Vision: Fashion-MNIST, {vision.train_samples:,} "
        f"training images x {vision.epochs} epochs, {vision.test_samples:,} test images, batch {vision.batch_size}, "
        f"weight decay {vision.weight_decay}. Learning rates on the ladder {study.lr_base:g} x 2^k (vision "
        f"{study.vision_lr_base:g} x 2^k), k in [{study.lr_bounds[0]}, {study.lr_bounds[1]}], first grid k = "
        f"{', '.join(map(str, study.lr_start))}, widened while the best rate is at an edge; seed 0 at the middle "
        f"level, full budget. Seeds: {study.ablation_seeds} per ablation arm, {study.contender_seeds} for the "
        "frontier arms and the vision contenders (the two ViTs and the best UoE classifier).",
    ]


def ablation_lines(report: Report) -> list[str]:
    header = ["arm", *COMPONENTS, "level", "parameters", "active FLOPs/token", "lr", "val. perplexity"]
    rows = []
    for row in report.ablation_rows():
        arm, point = row["arm"], row["point"] or {}
        rows.append([
            f"`{arm.name}`", *(components_of(arm) if arm.is_uoe else ["–"] * len(COMPONENTS)), row["level"],
            _cell(point.get("parameters"), lambda v: f"{v:,}"), _cell(point.get("flops"), lambda v: f"{v / 1e6:.3f} M"),
            _cell(point.get("learning_rate"), lambda v: f"{v:g}"), _cell(point.get("stats"), fmt_stats),
        ])  # fmt: skip
    effects = []
    for effect in report.effects():
        deltas = [d for _, _, d in effect["pairs"]]
        cells = ["–", "–", "–"]
        if deltas:
            better = sum(1 for d in deltas if d < 0)
            cells = [f"{statistics.fmean(deltas):+.2f}", f"[{min(deltas):+.2f}, {max(deltas):+.2f}]",
                     f"{better}/{len(deltas)}"]  # fmt: skip
        effects.append([effect["component"], effect["model"], str(len(deltas)), *cells])
    effect_header = ["component", "model", "pairs", "mean Δ perplexity", "[min, max]", "better with it"]
    return [
        "### Ablation at the middle FLOP level",
        "",
        "Validation perplexity, mean ± sample std over seeds [min, max], at each arm's chosen learning rate. UoE "
        "components: `weighted` gates, `sigmoid` router scores, `entropy` balance loss, `peri` layernorm, layers "
        "shared two by two (`grouped`; `grouped-wide`: the saved parameters spent on more MLP experts), a `shared` "
        "head and MLP slice, a `chain` of 2 UoME blocks (half the slices each).",
        "",
        harness.markdown_table(header, rows),
        "",
        "What each component changed (perplexity with it minus without it, over the pairs of arms that differ in it "
        "alone; negative = better):",
        "",
        harness.markdown_table(effect_header, effects),
        "",
        "Components that cannot be tested on a baseline without forking it: union gates and the router score "
        "function (fixed in transformers' Mixtral / Qwen3-MoE softmax, DeepSeek-V3 sigmoid, MoEUT sigmoid), "
        "peri-layernorm and layer sharing (not options of transformers' models; MoEUT's peri-norm is fixed in "
        "`moeut.py`), chains (none has them); Qwen3-MoE and Mixtral have no shared expert in transformers.",
    ]


def lr_lines(report: Report) -> list[str]:
    rows, edges = [], 0
    for row in report.lr_rows():
        search = row["search"]
        if search.edge:
            edge = "**yes (ladder bound)**"
        else:
            edge = "failed" if search.failed else "" if search.chosen is not None else "(searching)"
        edges += bool(search.edge)
        rows.append([f"`{row['arm'].name}`", lr_cell(report.study, row["arm"], search), edge])
    return [
        "### Learning-rate grids",
        "",
        "Seed 0 at the middle level, the full budget; the chosen rate in bold. An *edge pick* is a chosen rate at "
        "the end of its grid, which only happens at the ladder's bound.",
        "",
        harness.markdown_table(["arm", "rates → val. perplexity (vision: test error %)", "edge pick"], rows),
        "",
        f"Edge picks: {edges} of {len(rows)} arms.",
    ]


def frontier_lines(report: Report, plot_link: str | None) -> list[str]:
    rows = []
    for arm in report.frontier:
        for level, _ in arm_levels(arm, report.study.setup)[0]:
            point = report.point(arm, level) or {}
            rows.append([
                f"`{arm.name}`", level, _cell(point.get("parameters"), lambda v: f"{v:,}"),
                _cell(point.get("flops"), lambda v: f"{v / 1e6:.3f} M"),
                _cell(point.get("learning_rate"), lambda v: f"{v:g}"), _cell(point.get("stats"), fmt_stats),
            ])  # fmt: skip
    header = ["arm", "level", "parameters", "active FLOPs/token", "lr", "val. perplexity"]
    lines = ["### Frontier at the larger budget", "", harness.markdown_table(header, rows)]
    if report.frontier_waiting:
        lines += ["", f"Not yet on the frontier: {report.frontier_waiting}."]
    plot = f"![recipe study frontier]({plot_link})" if plot_link else "(No frontier point has its seeds yet: no plot.)"
    return [*lines, "", plot]


def claim_lines(report: Report) -> list[str]:
    goal, rows = report.goal(), []
    for row in goal:
        moe, uoe = row["moe"], row["uoe"]
        uoe_cells = ["none", "–", "–"]
        if uoe:
            ratio = uoe["flops"] / moe["flops"]
            uoe_cells = [f"`{uoe['arm']}` {uoe['level']}", f"{uoe['flops'] / 1e6:.3f} M ({ratio:.2f}x)",
                         fmt_stats(uoe["stats"])]  # fmt: skip
        rows.append([
            ["low", "middle", "high"][row["index"]], f"`{moe['arm']}` {moe['level']}", f"{moe['flops'] / 1e6:.3f} M",
            fmt_stats(moe["stats"]), *uoe_cells, "yes" if row["met"] else "no",
        ])  # fmt: skip
    if len(goal) == 3:
        met = sum(r["met"] for r in goal)
        verdict = "**met**" if met == 3 else f"**not met** ({met} of 3 levels)"
    else:
        verdict = "not decidable yet (the MoE frontiers are incomplete)"
    header = ["level", "best MoE", "its FLOPs", "its perplexity", "best UoE at <= 0.8x", "UoE FLOPs (ratio)",
              "UoE perplexity", "met"]  # fmt: skip
    lines = [
        "### The claim read off the frontier",
        "",
        "Goal: a UoE recipe below the best MoE's perplexity at <= 0.8x its active FLOPs at every frontier level, "
        "with seed ranges that do not overlap. Per level of the MoE baselines (Qwen3-MoE, DeepSeek-V3, MoEUT), the "
        "best of them against the best UoE frontier point at <= 0.8x its FLOPs:",
        "",
        harness.markdown_table(header, rows),
        "",
        f"Goal: {verdict}.",
    ]
    envelope = [
        [f"{r['flops'] / 1e6:.3f} M", f"{r['uoe_ppl']:.2f} (`{r['uoe']}`)", f"{r['moe_ppl']:.2f} (`{r['moe']}`)",
         f"{r['uoe_ppl'] - r['moe_ppl']:+.2f}"]
        for r in report.envelope_claim()
    ]  # fmt: skip
    if envelope:
        lines += [
            "",
            "At equal active FLOPs (the sweep's reading: each arm's lower envelope, linear in log FLOPs, no "
            "extrapolation):",
            "",
            harness.markdown_table(["active FLOPs/token", "best UoE", "best MoE", "UoE − MoE"], envelope),
        ]
    return lines


def vit_at_flops(vits: list[dict[str, Any]], flops: float) -> float | None:
    """The ViT's mean accuracy at `flops`, linear in log FLOPs between the two ViT points that bracket it (None when
    they do not: no extrapolation)."""
    below = [v for v in vits if v["flops"] <= flops]
    above = [v for v in vits if v["flops"] >= flops]
    if not below or not above:
        return None
    low, high = max(below, key=lambda v: v["flops"]), min(above, key=lambda v: v["flops"])
    if low["flops"] == high["flops"]:
        return low["accuracy"]["mean"]
    share = math.log(flops / low["flops"]) / math.log(high["flops"] / low["flops"])
    return low["accuracy"]["mean"] + share * (high["accuracy"]["mean"] - low["accuracy"]["mean"])


def vision_lines(report: Report) -> list[str]:
    rows, vits, best = [], [], None
    for row in report.vision_rows():
        arm, point = row["arm"], row["point"] or {}
        accuracy = point.get("accuracy")
        rows.append([
            f"`{arm.name}`", _cell(point.get("parameters"), lambda v: f"{v:,}"),
            _cell(point.get("flops"), harness.fmt_count), _cell(point.get("learning_rate"), lambda v: f"{v:g}"),
            _cell(accuracy, fmt_stats),
        ])  # fmt: skip
        if not (accuracy and accuracy.get("ok")):
            continue
        if arm.family == "vit":
            vits.append(point)
        elif best is None or accuracy["mean"] > best["accuracy"]["mean"]:
            best = point
    lines = [
        "### Vision: the components on the image classifier",
        "",
        "`compare_vision.py`'s UoE (2 of 4 heads, 2 of 4 experts; the shared variant 1 shared + 1 routed of each) "
        "against the ViT matched to its active FLOPs (`vision:vit`, the width whose FLOPs are closest) and the widest "
        "ViT at or below them (`vision:vit:narrow`); test accuracy %, mean ± std over seeds [min, max].",
        "",
        harness.markdown_table(["arm", "parameters", "FLOPs/image (analytic)", "lr", "test accuracy %"], rows),
    ]
    if vits and best:
        against = [
            f"{best['accuracy']['mean'] - v['accuracy']['mean']:+.2f} against `{v['arm']}` "
            f"(UoE at {best['flops'] / v['flops']:.2f}x its FLOPs)"
            for v in vits
        ]
        reference = vit_at_flops(vits, best["flops"])
        if reference is None:  # no bracket: the nearest ViT in FLOPs decides
            nearest = min(vits, key=lambda v: abs(math.log(best["flops"] / v["flops"])))
            reference, how = nearest["accuracy"]["mean"], f"the nearest ViT in FLOPs, `{nearest['arm']}`"
        else:
            how = "the ViT read at UoE's FLOPs, linear in log FLOPs between the two ViTs"
        gap = best["accuracy"]["mean"] - reference
        lines += [
            "",
            f"Vision goal (UoE at or above the ViT at equal active FLOPs): best UoE `{best['arm']}` "
            f"{'; '.join(against)}. Against {how} ({reference:.2f}): {gap:+.2f} points, "
            f"**{'met' if gap >= 0 else 'not met'}**.",
        ]
    return lines


def recipe_lines(report: Report) -> list[str]:
    from uoe.configuration_uoe import RECIPES  # noqa: PLC0415

    lines = ["### Recipes (`UoEConfig.from_recipe`)", ""]
    for name, arm_name in RECIPE_ARMS.items():
        arm = arm_by_name(arm_name)
        point = report.point(arm, report.planner.middle(arm))
        result = f"{fmt_stats(point['stats'])} at the middle level" if point else "not run yet"
        lines.append(f"- `{name}` = arm `{arm_name}` ({RECIPES[name].summary}): {result}.")
    winner = report.planner.lm_winner()
    if winner is not None:
        preset = next((n for n, a in RECIPE_ARMS.items() if a == winner.name), None)
        known = f"the preset `{preset}`" if preset else "no preset yet: add it to `RECIPES`"
        lines.append(f"- Best UoE arm at the middle level: `{winner.name}` ({known}).")
    return lines


def section(report: Report, plot_link: str | None, estimates: dict[str, dict] | None = None) -> str:
    """The RESULTS.md section: progress and budget, the ablation, the rate grids, the frontier, the claim, vision,
    the recipes, and the time estimate when `--estimate` has run."""
    parts = [header_lines(report), ablation_lines(report), lr_lines(report), frontier_lines(report, plot_link),
             claim_lines(report), vision_lines(report), recipe_lines(report)]  # fmt: skip
    parts.append([
        "Notes: FLOPs are analytic active forward FLOPs per token (per image in vision), LM head included. The "
        "frontier sweep's UoE families (README) all shared their layers two by two through a bug in its config "
        "builder, fixed with this study; this study's `uoe:paper` and the other arms without `grouped` have every "
        "layer their own. Raw per-run JSON: `benchmarks/results/recipe_study/`. Command: "
        "`.venv/bin/python benchmarks/recipe_study.py --report`.",
    ])  # fmt: skip
    if estimates:
        parts.append(["### Time", "", estimate_section(report, estimates)])
    return "\n\n".join("\n".join(part) for part in parts) + "\n"


def estimate_section(report: Report, estimates: dict[str, dict]) -> str:
    """The plan's time: `--estimate`'s seconds per run of each cost class, the whole plan from scratch (before any
    run: no rate widening, the costliest UoE arms as the top recipes) and what is left."""
    study = report.study
    scratch = plan_summary(study, {}, estimates, ("lm", "vision"))
    left = plan_summary(study, report.records, estimates, ("lm", "vision"))
    timed = sorted(estimates.values(), key=lambda e: e["class"])
    loads = [e["load_average"][0] for e in timed]
    dates = sorted(e["date_utc"] for e in timed)
    lines = [
        f"Estimated with `--estimate` ({dates[0]}"
        + (f" to {dates[-1]}" if dates[-1] != dates[0] else "")
        + f", {timed[0]['torch_threads']} torch thread(s), load "
        f"average {min(loads):.2f}-{max(loads):.2f}): a run of each cost class timed for {timed[0]['steps_timed']} "
        f"steps {'in this process' if study.in_process else 'in a fresh process'}, scaled to the budget (its start, "
        "data, evaluation and FLOP count measured, not scaled). From scratch the plan is "
        f"**{scratch['planned_runs']} runs, {scratch['planned_seconds'] / 3600:.1f} h** of one-run-at-a-time compute "
        f"(+ {scratch['lr_searches'] * scratch['lr_extension_seconds_each'] / 3600:.1f} h if each of its "
        f"{scratch['lr_searches']} rate searches widens once); left now: {left['planned_runs']} runs, "
        + (
            f"{left['planned_seconds'] / 3600:.1f} h."
            if math.isfinite(left["planned_seconds"])
            else f"time unknown: cost class(es) {', '.join(left['unmeasured_classes'])} not timed yet (`--estimate` "
            "times them)."
        ),
        "",
        "| cost class | seconds per step | overhead (s) | seconds per run | runs planned from scratch |",
        "|---|---:|---:|---:|---:|",
    ]
    for e in timed:
        runs = scratch["per_class"].get(e["class"], {}).get("runs", 0)
        cells = [e["class"], f"{e['step_seconds']:.3f}", f"{e['overhead_seconds']:.0f}", f"{e['run_seconds']:.0f}"]
        lines.append("| " + " | ".join([*cells, str(runs)]) + " |")
    return "\n".join(lines)


def plot_frontier(report: Report, path: Path) -> bool:
    """The frontier arms' perplexity against FLOPs (mean, min-max bars); False (and no file) while none has a point."""
    if not any(report.frontier_points().values()):
        return False
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axis = plt.subplots(figsize=(9, 6))
    colors = plt.get_cmap("tab10")
    for i, (name, points) in enumerate(report.frontier_points().items()):
        if not points:
            continue
        flops = [p["flops"] / 1e6 for p in points]
        means = [p["stats"]["mean"] for p in points]
        spread = [[m - p["stats"]["min"] for m, p in zip(means, points, strict=True)],
                  [p["stats"]["max"] - m for m, p in zip(means, points, strict=True)]]  # fmt: skip
        style = "-" if arm_by_name(name).is_uoe else "--"
        axis.errorbar(flops, means, yerr=spread, fmt="o" + style, color=colors(i % 10), capsize=3, label=name)
    axis.set_xscale("log")
    axis.set_xlabel("analytic active forward FLOPs per token (M)")
    axis.set_ylabel("validation perplexity (mean over seeds; bars: min-max)")
    axis.set_title("recipe_study.py: frontier (solid: UoE recipes, dashed: baselines)")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report(args: argparse.Namespace, study: Study) -> Report:
    store = ResultStore(Path(args.results_dir), study)
    store.check_study(create=False)
    report = Report(study, store.refresh())
    plot, results_md = Path(args.plot), Path(args.results_md)
    link = os.path.relpath(plot, results_md.parent) if plot_frontier(report, plot) else None
    harness.replace_section(results_md, SECTION_TITLE, section(report, link, load_estimates(store.folder)))
    wrote = f"{results_md} ({SECTION_TITLE})" + (f" and {plot}" if link else "")
    print(f"[recipe] wrote {wrote} from {len(report.records)} run file(s)", flush=True)
    return report


# ---------------------------------------------------------------------------------------------------------------------
# 9. Command line
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--report", action="store_true", help="rebuild the RESULTS.md section and plot from the files")
    mode.add_argument("--estimate", action="store_true", help="time short runs; print the planned runs and time")
    parser.add_argument("--quick", action="store_true", help="tiny models in this process (seconds per run)")
    parser.add_argument("--tasks", default="lm,vision", help="comma-separated subset of lm, vision (default both)")
    parser.add_argument("--max_minutes", type=float, help="do not start a run that would end after this many minutes")
    parser.add_argument("--max_runs", type=int, help="stop after this many runs")
    parser.add_argument("--default_run_minutes", type=float, default=None,
                        help="predicted minutes of a run of an untimed class (default: full 8, quick 0.1)")  # fmt: skip
    parser.add_argument("--estimate_steps", type=int, default=None, help="steps of each timed run (full 24, quick 3)")
    parser.add_argument("--results_dir", help=f"run files (default {harness.display_path(DEFAULT_RESULTS_DIR)}; "
                        "quick: runs/recipe_study_quick/results)")  # fmt: skip
    parser.add_argument("--work_dir", help="data cache and worker files (default runs/recipe_study[_quick])")
    parser.add_argument("--results_md", help="markdown file whose section --report replaces (default "
                        "benchmarks/RESULTS.md; quick: RESULTS.md in --work_dir)")  # fmt: skip
    parser.add_argument(
        "--plot", help="frontier PNG (default benchmarks/recipe_study_frontier.png; quick: in --work_dir)"
    )
    parser.add_argument("--run_timeout", type=float, default=3600, help="seconds before one LM run is abandoned")
    parser.add_argument("--fashion_mnist_dir", default=None, help="the Fashion-MNIST idx files (default: installed)")
    args = parser.parse_args(argv)
    try:
        args.tasks = tuple(harness.parse_choices("tasks", args.tasks, ("lm", "vision")))
        for name in ("max_minutes", "max_runs", "default_run_minutes", "estimate_steps", "run_timeout"):
            if getattr(args, name) is not None:
                harness.check_positive(name, getattr(args, name))
    except ValueError as error:
        parser.error(str(error))
    work = DEFAULT_WORK_DIR.with_name(DEFAULT_WORK_DIR.name + ("_quick" if args.quick else ""))
    args.work_dir = args.work_dir or str(work)
    work = Path(args.work_dir)
    args.results_dir = args.results_dir or str(work / "results" if args.quick else DEFAULT_RESULTS_DIR)
    args.results_md = args.results_md or str(work / "RESULTS.md" if args.quick else harness.DEFAULT_RESULTS_MD)
    args.plot = args.plot or str(work / "frontier.png" if args.quick else DEFAULT_PLOT)
    args.default_run_minutes = args.default_run_minutes or (0.1 if args.quick else 8.0)
    args.estimate_steps = args.estimate_steps or (3 if args.quick else 24)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    study = QUICK if args.quick else FULL
    import transformers  # noqa: PLC0415

    import uoe  # noqa: F401, PLC0415  (registers the uoe model type)

    transformers.logging.set_verbosity_error()
    if args.report:
        report = write_report(args, study)
        return {"records": len(report.records)}
    if args.estimate:
        return estimate(args, study)
    outcome = run_study(args, study, argv)
    if args.quick and outcome["stop"].startswith("nothing left"):
        write_report(args, study)
    return outcome


if __name__ == "__main__":
    main()
