"""benchmarks/recipe_study.py: the plan as data, the learning-rate rule, the resumable store, the report from files,
and the quick mode end to end (every table built from real run files)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from uoe import UoEConfig
from uoe.configuration_uoe import RECIPE_FIELDS

from .test_examples import offline_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "recipe_study.py"


@pytest.fixture(scope="module")
def rs():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import recipe_study  # noqa: PLC0415

    return recipe_study


def fake_record(rs, study, run, value: float | None, **extra) -> dict:
    """A finished run's file with `value` as its perplexity (vision: accuracy 1 - value/100); None: a failed run."""
    status = "ok" if value is not None else "failed: FloatingPointError: non-finite training loss"
    result = {"status": status, "validation_perplexity": value, "accuracy": None if value is None else 1 - value / 100}
    result.update(extra)
    return rs.record_of(run, study, {}, result, 1.0, 1.0, {"git_commit": "abc", "date_utc": "today", "cpu": "cpu"})


# --- the plan -------------------------------------------------------------------------------------------------------


def test_ablation_arms(rs):
    arms = rs.lm_static_arms()
    names = [a.name for a in arms]
    assert len(names) == len(set(names)) == 32
    sets = rs.uoe_ablation_sets()
    factorial = [s for s in sets if s <= set(rs.FACTORIAL)]
    assert len(factorial) == 16 and factorial[0] == frozenset()  # the full 2^4 factorial, the paper's config first
    for label in ("sigmoid", "shared", "chain", "grouped-wide"):  # alone, and added to the MoEUT-style arm
        assert frozenset({label}) in sets
        other = rs.MOEUT_STYLE - {"grouped"} if label == "grouped-wide" else rs.MOEUT_STYLE
        assert other | {label} in sets
    assert {a.name for a in rs.BASELINE_ARMS} >= {"llama", "qwen3_moe", "deepseek_v3", "moeut"}
    for arm in arms:  # every name maps back to its arm
        assert rs.arm_by_name(arm.name) == arm
    with pytest.raises(ValueError, match="not a UoE arm"):
        rs.uoe_arm({"grouped", "grouped-wide"})
    with pytest.raises(ValueError, match="the image encoder takes only"):
        rs.uoe_arm({"grouped"}, "vision")


def test_every_arm_builds_at_equal_flops_and_matched_parameters(rs):
    """Every LM arm at its middle level, on the full study's sizes: UoE's components keep the active FLOPs (within the
    routers of `grouped-wide`), the parameter-matched variants stay matched, the recipe presets are the study's arms."""
    from baseline_flops import analytic_flops_per_token  # noqa: PLC0415
    from harness import count_parameters  # noqa: PLC0415

    setup = rs.FULL.setup
    configs = {a.name: rs.lm_config(a, rs.arm_levels(a, setup)[1], setup) for a in rs.lm_static_arms()}
    flops = {n: analytic_flops_per_token(c, setup.seq_len) for n, c in configs.items()}
    params = {n: count_parameters(c) for n, c in configs.items()}
    paper = flops["uoe:paper"]
    for name in configs:
        if name.startswith("uoe:"):
            assert flops[name] == pytest.approx(paper, rel=0.01), name  # chain, shared, wide: same active FLOPs
            grouped = "+grouped" in name or name == "uoe:grouped"
            expected = params["uoe:paper"] * (0.67 if grouped and "wide" not in name else 1.0)
            assert params[name] == pytest.approx(expected, rel=0.02), name
    assert configs["uoe:grouped"].num_layer_groups == setup.num_layers // 2
    assert configs["uoe:paper"].num_layer_groups is None  # the sweep's bug shared these too
    assert configs["uoe:grouped-wide"].num_mlp_experts > configs["uoe:paper"].num_mlp_experts
    assert configs["uoe:chain"].mlp_top_k * 2 == configs["uoe:paper"].mlp_top_k
    for base, variant in (("deepseek_v3", "deepseek_v3:no-shared"), ("moeut", "moeut:no-grouping")):
        assert params[variant] == pytest.approx(params[base], rel=0.01)
        assert flops[variant] == pytest.approx(flops[base], rel=0.03)
    assert configs["deepseek_v3:no-shared"].n_shared_experts == 0
    assert configs["deepseek_v3:no-shared"].num_experts_per_tok == configs["deepseek_v3"].num_experts_per_tok + 1
    assert configs["moeut:no-grouping"].group_size == setup.num_layers
    assert configs["moeut:no-entropy"].mlp_entropy_coef == configs["moeut:no-entropy"].attention_entropy_coef == 0
    # the presets of UoEConfig.from_recipe are arms of the study
    sizes = {k: getattr(configs["uoe:paper"], k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")}
    for recipe, arm in rs.RECIPE_ARMS.items():
        preset = UoEConfig.from_recipe(recipe, **sizes)
        for field in RECIPE_FIELDS:
            assert getattr(configs[arm], field) == getattr(preset, field), (recipe, field)


def test_levels(rs):
    setup = rs.FULL.setup
    levels, middle = rs.arm_levels(rs.arm_by_name("uoe:paper"), setup)
    assert [label for label, _ in levels] == ["h2e1", "h2e2", "h3e4", "h4e6"] and middle == "h3e4"
    assert rs.arm_levels(rs.arm_by_name("uoe:shared"), setup)[1] == "h2e3"
    assert rs.arm_levels(rs.arm_by_name("uoe:chain"), setup)[1] == "h3e2"
    assert rs.arm_levels(rs.arm_by_name("deepseek_v3:no-shared"), setup)[1] == "k3"
    assert rs.arm_levels(rs.arm_by_name("llama"), setup)[1] == "d96"
    with pytest.raises(ValueError, match="has no level 'k9'"):
        rs.level_changes(rs.arm_by_name("qwen3_moe"), "k9", setup)


def test_learning_rate_rule(rs):
    """The grid widens past an edge pick until the best rate is interior or the ladder ends; failures count as worse."""
    study = rs.QUICK
    arm = rs.arm_by_name("uoe:paper")

    def search(values: dict[int, float | None]):
        records = {}
        for k, v in values.items():
            record = fake_record(rs, study, rs.Run(arm.name, "h3e4", k, 0), v)
            records[record["run_id"]] = record
        return rs.Planner(study, records).lr_search(arm)

    assert search({}).pending == [-1, 0, 1]  # the first grid
    assert search({-1: 9.0, 0: 8.0}).pending == [1]
    assert search({-1: 9.0, 0: 8.0, 1: 7.0}).pending == [2]  # best at the top: the next rate above
    assert search({-1: 7.0, 0: 8.0, 1: 9.0}).pending == [-2]  # best at the bottom: the next rate below
    interior = search({-1: 9.0, 0: 7.0, 1: 8.0})
    assert (interior.chosen, interior.edge, interior.pending) == (0, False, [])
    widened = search({-1: 9.0, 0: 8.0, 1: 7.0, 2: None})  # the rate above diverged: the best is interior now
    assert (widened.chosen, widened.edge) == (1, False)
    bound = search({-1: 9.0, 0: 8.0, 1: 7.0, 2: 6.0})  # QUICK's ladder ends at k = 2
    assert (bound.chosen, bound.edge) == (2, True)
    failed = search({-1: None, 0: None, 1: None})
    assert failed.failed and failed.chosen is None
    assert study.learning_rate("lm", 0) == 3e-3 and study.learning_rate("vision", 1) == 4e-3


def test_plan_order_seeds_and_top_recipes(rs):
    """Searches first; the frontier gets 3 seeds at every level; the top recipes wait for every ablation arm."""
    study = rs.FULL
    assert rs.Planner(study, {}).ready()[0] == rs.Run("uoe:paper", "h3e4", -1, 0)

    winner = "uoe:weighted+entropy"

    def cost(run):  # the simulation takes the costliest UoE arms as the top recipes: make `winner` the costliest
        return 100.0 if run.arm == winner else 0.0

    planned = rs.simulate(study, {}, cost, ("lm",))
    ids = [r.run_id(study) for r in planned]
    assert len(ids) == len(set(ids))
    by_arm: dict[str, set] = {}
    for run in planned:
        by_arm.setdefault(run.arm, set()).add((run.level, run.seed))
    assert by_arm["uoe:peri"] == {("h3e4", 0), ("h3e4", 1)}  # an ablation arm: 2 seeds, middle level
    for arm in ("uoe:paper", winner, "llama", "deepseek_v3", "moeut", "qwen3_moe"):  # frontier: 3 seeds, all levels
        levels, _ = rs.arm_levels(rs.arm_by_name(arm), study.setup)
        assert {lv for lv, s in by_arm[arm] if s == 2} == {lv for lv, _ in levels}, arm
    frontier = [a.name for a in rs.Planner(study, {}).frontier_arms()[0]]
    assert winner not in frontier  # nothing finished yet: the top recipes are not known
    # the frontier's other levels come after every middle-level run of the ablation
    first_frontier = next(i for i, r in enumerate(planned) if r.arm == winner and r.level != "h3e4")
    last_ablation = max(i for i, r in enumerate(planned) if r.arm == "uoe:peri")
    assert last_ablation < first_frontier


def test_vision_plan(rs):
    study = rs.QUICK
    planned = rs.simulate(study, {}, lambda run: 0.0, ("vision",))
    arms = {r.arm for r in planned}
    assert arms == {a.name for a in rs.vision_static_arms()}  # the LM winner's arm waits for the LM ablation
    for vit in ("vision:vit", "vision:vit:narrow"):  # the two ViTs that bracket UoE's FLOPs: contenders
        assert {r.seed for r in planned if r.arm == vit} == {0, 1, 2}
    planned = rs.simulate(study, {}, lambda run: 1.0 if run.arm == "uoe:weighted+sigmoid+entropy+peri+grouped" else 0,
                          ("lm", "vision"))  # fmt: skip
    # the LM winner's encoder components: all but layer sharing
    assert "vision:uoe:weighted+sigmoid+entropy+peri" in {r.arm for r in planned}
    assert rs.vision_config(rs.arm_by_name("vision:uoe:weighted+sigmoid+entropy+peri")).norm_placement == "peri"
    vision = [a for a in rs.vision_static_arms() if a.is_uoe]
    assert all(rs.vision_config(a).is_causal is False for a in vision)
    shared = rs.vision_config(rs.arm_by_name("vision:uoe:shared"))
    assert (shared.num_shared_attention_groups, shared.attention_top_k, shared.mlp_top_k) == (1, 1, 1)


def test_vit_read_at_uoe_flops_between_the_two_vits(rs):
    """Linear in log FLOPs between the bracketing ViTs: at 8 between (4, 80%) and (16, 90%), halfway in log: 85%;
    outside the bracket nothing (no extrapolation); a ViT at exactly the FLOPs is its own value."""
    vits = [{"flops": 4.0, "accuracy": {"mean": 80.0}}, {"flops": 16.0, "accuracy": {"mean": 90.0}}]
    assert rs.vit_at_flops(vits, 8.0) == pytest.approx(85.0, abs=1e-12)
    assert rs.vit_at_flops(vits, 2.0**3.5) == pytest.approx(80.0 + 10.0 * 1.5 / 2.0, abs=1e-12)
    assert rs.vit_at_flops(vits, 20.0) is None and rs.vit_at_flops(vits[:1], 8.0) is None
    assert rs.vit_at_flops(vits, 16.0) == 90.0


# --- files ----------------------------------------------------------------------------------------------------------


def test_result_store_locks_keys_and_budget(rs, tmp_path):
    study = rs.QUICK
    store = rs.ResultStore(tmp_path, study)
    store.check_study(create=True)
    run = rs.Run("uoe:paper", "h3e4", 0, 0)
    run_id = run.run_id(study)
    assert store.claim(run_id) and not store.claim(run_id)  # held by this (live) process
    store.release(run_id)
    (tmp_path / f"{run_id}.lock").write_text(json.dumps({"pid": 2**22 + 7, "host": os.uname().nodename}))
    assert store.claim(run_id)  # a dead process's lock is taken over
    store.release(run_id)
    store.write(fake_record(rs, study, run, 10.0))
    assert rs.ResultStore(tmp_path, study).refresh()[run_id]["result"]["validation_perplexity"] == 10.0
    # a file written for another plan under the same id is refused, not overwritten
    stale = {**fake_record(rs, study, run, 10.0), "key": "0" * 12}
    store.write(stale)
    with pytest.raises(SystemExit, match="was written for another plan"):
        store.get(run)
    other = dataclasses.replace(study, vision=dataclasses.replace(study.vision, epochs=2))
    with pytest.raises(SystemExit, match="holds a study with another budget"):
        rs.ResultStore(tmp_path, other).check_study(create=True)


def test_compact_result(rs):
    result = rs.compact_result({"status": "ok", "train_losses": [float(i) for i in range(10)], "aux_losses": []}, 4)
    assert result["train_losses_windows"] == [1.0, 4.0, 7.0, 9.0] and result["train_losses_window_steps"] == 3
    assert "train_losses" not in result and "aux_losses" not in result


def test_seed_statistics(rs):
    """Sample std over seeds (statistics.stdev by hand for two values); one seed has no spread; a failure fails."""
    two = rs.stats([50.0, 52.0])
    assert two["mean"] == 51.0 and abs(two["std"] - 2.0**0.5) < 1e-12 and (two["min"], two["max"]) == (50.0, 52.0)
    assert rs.fmt_stats(two) == "51.00 ± 1.41 [50.00, 52.00] (n=2)"
    assert rs.fmt_stats(rs.stats([50.0])) == "50.00 ± – [50.00, 50.00] (n=1)"
    assert rs.fmt_stats(rs.stats([50.0, float("nan")])) == "failed"
    assert rs.fmt_stats(rs.stats([])) == "–"


def test_report_reads_the_goal_off_the_files(rs):
    """The goal: at each MoE level, a UoE point at <= 0.8x the best MoE's FLOPs, lower in mean and in range."""
    study = rs.FULL
    records = {}

    def add(arm: str, level: str, values: list[float], flops: float):
        for seed, value in enumerate(values):
            record = fake_record(rs, study, rs.Run(arm, level, 0, seed), value, flops_analytic=flops, parameters=1)
            records[record["run_id"]] = record

    for arm in [a.name for a in rs.lm_static_arms()]:  # every search settles on k = 0 (k = -1 and 1 are worse)
        levels, middle = rs.arm_levels(rs.arm_by_name(arm), study.setup)
        for k in (-1, 1):
            record = fake_record(rs, study, rs.Run(arm, middle, k, 0), 500.0)
            records[record["run_id"]] = record
        add(arm, middle, [200.0, 201.0], 1e6)
    moe = {  # per level: the seeds' perplexities; DeepSeek-V3 is the best MoE at every level
        "qwen3_moe": [[100.0, 101.0, 102.0]] * 3,
        "moeut": [[95.0, 96.0, 97.0]] * 3,
        "deepseek_v3": [[90.0, 91.0, 92.0], [80.5, 82.0, 83.5], [70.0, 71.0, 72.0]],
    }
    for family, values in moe.items():
        for i, (level, _) in enumerate(rs.arm_levels(rs.arm_by_name(family), study.setup)[0]):
            add(family, level, values[i], 1.0e6 * (1 + i))
    # the top recipe: its cheapest level 80 +- 1 at 0.5x the MoEs' lowest FLOPs, its other levels worse and costlier
    top = "uoe:weighted+entropy"
    for i, (level, _) in enumerate(rs.arm_levels(rs.arm_by_name(top), study.setup)[0]):
        add(top, level, [79.0 + i * 3, 80.0 + i * 3, 81.0 + i * 3], 1.0e6 * (0.5, 0.75, 1.2, 1.6)[i])
    report = rs.Report(study, records)
    assert top in [a.name for a in report.frontier]
    goal = report.goal()
    assert [row["moe"]["arm"] for row in goal] == ["deepseek_v3"] * 3
    assert [(row["uoe"]["arm"], row["uoe"]["level"]) for row in goal] == [(top, "h2e1")] * 3  # the best at <= 0.8x
    assert [row["budget"] for row in goal] == pytest.approx([0.8e6, 1.6e6, 2.4e6])
    # met: 80 [79, 81] against 91 [90, 92]; not met: against 82 [80.5, 83.5] (ranges overlap), against 71 (lower)
    assert [row["met"] for row in goal] == [True, False, False]
    text = rs.section(report, "plot.png")
    assert "| `uoe:weighted+entropy` | weighted | softmax | entropy | pre | own | none | 1 | h3e4 |" in text
    assert re.search(r"Goal: \*\*not met\*\* \(1 of 3 levels\)", text)


# --- the quick mode end to end --------------------------------------------------------------------------------------


def run_script(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = offline_env(tmp_path)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def subsection(section: str, title: str) -> str:
    start = section.index(title)
    end = section.find("\n### ", start + 1)
    return section[start : end if end > 0 else None]


@pytest.mark.slow
def test_quick_mode_resumes_and_reports_from_files(rs, tmp_path):
    """`--quick` in chunks: a first chunk of 12 runs, then the rest (the finished runs are not run again); `--report`
    then rebuilds every table of the section from the run files alone, next to the other sections of RESULTS.md."""
    work, results = tmp_path / "work", tmp_path / "results"
    common = ["--quick", "--work_dir", str(work), "--results_dir", str(results)]
    first = run_script([*common, "--max_runs", "12"], tmp_path)
    assert "--max_runs 12 reached" in first.stdout
    files = sorted(results.glob("*.json"))
    assert len(files) == 12 + 1  # + study.json
    before = {p.name: p.read_bytes() for p in files}
    estimate = run_script([*common, "--estimate"], tmp_path)  # times one run per cost class of what is left
    planned = int(re.search(r"\[estimate\] 12 run\(s\) finished .*?; (\d+) planned", estimate.stdout).group(1))
    timings = list((results / "estimate").glob("*.json"))
    assert planned > 100 and len(timings) >= 10 and "not timed yet" not in estimate.stdout
    second = run_script(common, tmp_path)
    assert "stopped: nothing left to run" in second.stdout
    finished = {p.name for p in results.glob("*.json")} - {"study.json"}
    for name, content in before.items():
        assert (results / name).read_bytes() == content, name  # not run again
    ran_again = re.findall(r"^\[recipe\] (\S+__s\d+): ", second.stdout, re.M)
    assert len(ran_again) == len(finished) - 12 and not set(ran_again) & {n[:-5] for n in before}
    assert not list(results.glob("*.lock"))

    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Benchmarks\n\n## LM comparison (compare_lm.py)\n\nkept\n")
    run_script([*common, "--report", "--results_md", str(results_md), "--plot", str(tmp_path / "f.png")], tmp_path)
    document = results_md.read_text()
    assert "## LM comparison (compare_lm.py)\n\nkept" in document
    section = document[document.index(rs.SECTION_TITLE) :]
    assert "the plan is complete" in section
    records = {json.loads(p.read_text())["run_id"]: json.loads(p.read_text()) for p in results.glob("*__*.json")}
    assert all(r["result"]["status"] == "ok" for r in records.values())
    study, planner = rs.QUICK, rs.Planner(rs.QUICK, records)
    assert not planner.ready() and not planner.waiting()
    ablation, grids = subsection(section, "### Ablation at"), subsection(section, "### Learning-rate grids")
    for arm in rs.lm_static_arms():  # the ablation table: every arm, its mean over its seed files
        search = planner.lr_search(arm)
        assert search.chosen is not None and not search.pending
        middle = planner.middle(arm)
        seeds = [r for r in records.values() if r["arm"] == arm.name and r["level"] == middle
                 and r["lr_step"] == search.chosen]  # fmt: skip
        ppl = [r["result"]["validation_perplexity"] for r in seeds]
        assert len(ppl) in (2, 3)
        row = next(line for line in ablation.splitlines() if line.startswith(f"| `{arm.name}` |"))
        assert f"{sum(ppl) / len(ppl):.2f} ± " in row and f"(n={len(ppl)})" in row, row
        assert f"{min(ppl):.2f}, {max(ppl):.2f}]" in row
        lr_row = next(line for line in grids.splitlines() if line.startswith(f"| `{arm.name}` | "))
        assert f"**{study.learning_rate('lm', search.chosen):g} → " in lr_row
        # the rule held: the chosen rate is interior, or at the ladder's bound
        assert (search.chosen not in (min(search.tried), max(search.tried))) or search.chosen in study.lr_bounds
    for title in ("### Ablation at the middle FLOP level", "### Learning-rate grids", "### Frontier at the larger budget",
                  "### The claim read off the frontier", "### Vision: the components on the image classifier",
                  "### Recipes (`UoEConfig.from_recipe`)"):  # fmt: skip
        assert title in section, title
    frontier, frontier_text = [a.name for a in planner.frontier_arms()[0]], subsection(section, "### Frontier")
    assert len(frontier) == 5 + study.top_recipes
    for arm in frontier:
        for level, _ in rs.arm_levels(rs.arm_by_name(arm), study.setup)[0]:
            assert re.search(rf"^\| `{re.escape(arm)}` \| {level} \| [\d,]+ \| ", frontier_text, re.M), (arm, level)
    assert re.search(r"^\| (low|middle|high) \| `(qwen3_moe|deepseek_v3|moeut)` ", section, re.M)
    assert re.search(r"Goal: \*\*(met|not met)", section)
    for arm in rs.vision_static_arms():
        assert re.search(rf"^\| `{re.escape(arm.name)}` \| [\d,]+ \| ", section, re.M), arm.name
    assert "Vision goal" in section and "Total CPU time of the finished runs" in section
    cpu = sum(r["cpu_seconds"] for r in records.values())
    assert f"**{cpu / 3600:.2f} h**" in section
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert re.search(r"From scratch the plan is \*\*\d+ runs, [\d.]+ h\*\*.*left now: 0 runs, 0\.0 h", section)
    for timing in timings:  # the time table: one row per timed cost class
        assert f"\n| {json.loads(timing.read_text())['class']} | " in section


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tasks", "lm,audio"], "--tasks must be a comma-separated subset of ['lm', 'vision']"),
        (["--max_minutes", "0"], "--max_minutes must be > 0"),
        (["--max_runs", "-2"], "--max_runs must be > 0"),
        (["--report", "--estimate"], "argument --estimate: not allowed with argument --report"),
    ],
)
def test_bad_arguments_name_the_parameter(rs, argv, message, capsys):
    with pytest.raises(SystemExit):
        rs.parse_args(argv)
    assert message in capsys.readouterr().err


def test_entropy_balance_on_a_transformers_moe(rs):
    """`Setup.baseline_balance_loss="entropy"` for Qwen3-MoE: the mean over layers of sum p log p of the batch's mean
    router softmax, weighted by aux_coef; refused for models that balance their own way."""
    import compare_lm  # noqa: PLC0415
    import torch  # noqa: PLC0415

    setup = dataclasses.replace(compare_lm.QUICK, vocab_size=64, hidden_size=32, seq_len=16, num_heads=4,
                                intermediate_size=64, baseline_balance_loss="entropy", normalize_aux_by_top_k=True)  # fmt: skip
    config = compare_lm.build_configs(setup, ("qwen3_moe",))["qwen3_moe"]
    assert compare_lm.entropy_balance(config, setup) and compare_lm.aux_loss_weight(config, setup) == setup.aux_coef
    torch.manual_seed(0)
    model = compare_lm.instantiate(config)
    outputs = model(input_ids=torch.randint(0, 64, (2, 16)), output_router_logits=True)
    expected = []
    for logits in outputs.router_logits:
        p = logits.float().softmax(-1).mean(0)
        expected.append((p * p.log()).sum())
    torch.testing.assert_close(compare_lm.balance_loss(outputs, True), torch.stack(expected).mean())
    assert compare_lm.balance_loss(outputs, False) is outputs.aux_loss
    assert -math.log(config.num_experts) <= float(compare_lm.balance_loss(outputs, True).detach()) <= 0
    llama = compare_lm.build_configs(setup, ("llama",))["llama"]
    with pytest.raises(ValueError, match="replaces the Switch loss of Mixtral and Qwen3-MoE only"):
        compare_lm.entropy_balance(llama, setup)
    with pytest.raises(ValueError, match="`baseline_balance_loss` must be 'native' or 'entropy'"):
        compare_lm.entropy_balance(config, dataclasses.replace(setup, baseline_balance_loss="z"))
