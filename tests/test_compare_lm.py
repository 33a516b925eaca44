"""benchmarks/compare_lm.py: the quick mode end to end, the matching rule, the analytic FLOPs, RESULTS.md handling."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uoe import estimate_flops_per_token

from .test_examples import offline_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compare_lm.py"
SWEEP_SCRIPT = ROOT / "benchmarks" / "frontier_sweep.py"
ALL_MODELS = ("llama", "mixtral", "deepseek_v3", "qwen3_moe", "uoe_union", "uoe_weighted")


def load_compare_lm():
    if "compare_lm" in sys.modules:
        return sys.modules["compare_lm"]
    spec = importlib.util.spec_from_file_location("compare_lm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_lm"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compare_lm():
    return load_compare_lm()


@pytest.fixture(scope="module")
def frontier_sweep(compare_lm):
    import frontier_sweep  # noqa: PLC0415  (benchmarks/frontier_sweep.py; compare_lm put benchmarks/ on the path)

    return frontier_sweep


@pytest.fixture(scope="module")
def tiny_setup(compare_lm):
    return dataclasses.replace(compare_lm.QUICK, vocab_size=256, seq_len=32)


@pytest.mark.slow
def test_quick_mode_reports_every_model(tmp_path):
    """The quick mode on a tiny budget: every model trains, and the table, JSON, PNG and RESULTS.md have all six."""
    results_md = tmp_path / "RESULTS.md"
    other = "# Benchmarks\n\n## Kernels (bench_kernels.py)\n\nkernel table\n\n## Vision\n\nvision table\n"
    results_md.write_text(other)
    command = [
        sys.executable, str(SCRIPT), "--quick", "--max_steps", "3", "--seeds", "0", "--eval_blocks", "4",
        "--output", str(tmp_path / "out.json"), "--plot", str(tmp_path / "loss.png"),
        "--results_md", str(results_md), "--work_dir", str(tmp_path / "work"),
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path, env=offline_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}"

    record = json.loads((tmp_path / "out.json").read_text())
    assert record["mode"] == "quick" and record["setup"]["max_steps"] == 3
    assert list(record["summary"]) == list(ALL_MODELS)
    for name, summary in record["summary"].items():
        assert summary["status"] == "ok", (name, summary["status"])
        (run,) = [run for run in record["runs"] if run["model"] == name]  # one seed
        # perplexity is exp of the token loss over every predicted token of the 4 evaluation blocks
        assert run["validation_tokens"] == 4 * (record["setup"]["seq_len"] - 1), name
        assert run["validation_perplexity"] == pytest.approx(math.exp(run["validation_loss"]), rel=1e-12), name
        assert summary["perplexity_mean"] == pytest.approx(run["validation_perplexity"], rel=1e-12), name
        # 3 steps move every model below the uniform perplexity (the vocabulary size, about where an untrained
        # model sits): measured 0.85-0.94 of it, required < 0.97
        assert run["validation_perplexity"] < 0.97 * record["setup"]["vocab_size"], name
        assert summary["parameters"] > 0 and summary["flops_analytic"] > 0 and summary["flops_counted"] > 0, name
        assert summary["tokens_per_second"] > 0 and summary["peak_rss_mb"] >= 0, name
        assert len(summary["mean_train_losses"]) == 3
    assert [run["model"] for run in record["runs"]] == list(ALL_MODELS)
    assert record["environment"]["torch"] == torch.__version__

    document = results_md.read_text()
    assert document.startswith(other.rstrip("\n"))  # the other sections are kept
    section = document[document.index("## LM comparison (compare_lm.py)") :]
    for name in ALL_MODELS:
        assert f"\n| {name} | " in section, f"{name} missing from the RESULTS.md table"
        assert f"\n| {name} | " in result.stdout, f"{name} missing from the printed table"
    assert "could not run**" not in section
    assert "Paper's claim" in section and "0.8x" in section
    assert "![training loss curves](loss.png)" in section
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Re-reporting from the JSON replaces the section in place: one LM section, the others untouched.
    load_compare_lm().main(
        ["--from_json", str(tmp_path / "out.json"), "--plot", str(tmp_path / "loss2.png"),
         "--results_md", str(results_md), "--output", str(tmp_path / "out2.json")]
    )  # fmt: skip
    rewritten = results_md.read_text()
    assert rewritten.count("## LM comparison (compare_lm.py)") == 1 and rewritten.startswith(other.rstrip("\n"))
    assert rewritten.replace("loss2.png", "loss.png") == document


def test_matching_rule(compare_lm, tiny_setup):
    configs = compare_lm.build_configs(tiny_setup)
    params = {name: compare_lm.count_parameters(config) for name, config in configs.items()}
    uoe = params["uoe_union"]
    assert params["uoe_weighted"] == uoe
    routers = tiny_setup.num_layers * tiny_setup.hidden_size * (tiny_setup.num_heads + tiny_setup.num_experts)
    assert params["llama"] == uoe - routers  # Llama is UoE at full routing, without the routers
    for name in ("mixtral", "qwen3_moe", "deepseek_v3"):
        assert abs(params[name] - uoe) / uoe < 0.01, (name, params[name], uoe)
        config = configs[name]
        assert config.num_experts_per_tok == tiny_setup.top_k
        assert config.num_key_value_heads == config.num_attention_heads == tiny_setup.num_heads
    assert configs["mixtral"].num_local_experts == configs["qwen3_moe"].num_experts == tiny_setup.num_experts
    assert configs["deepseek_v3"].n_routed_experts == tiny_setup.num_experts
    assert configs["uoe_union"].gate_mode == "union" and configs["uoe_weighted"].gate_mode == "weighted"


@pytest.mark.parametrize("setup_name", ["QUICK", "FULL"])
def test_uoe_at_full_routing_has_the_dense_llama_flops(compare_lm, setup_name):
    setup = getattr(compare_lm, setup_name)
    configs = compare_lm.build_configs(setup, ("llama", "uoe_union"))
    llama = compare_lm.analytic_flops_per_token(configs["llama"], setup.seq_len)
    full = dataclasses.replace(setup, attention_top_k=setup.num_heads, top_k=setup.num_experts)
    uoe_full = compare_lm.build_configs(full, ("uoe_union",))["uoe_union"]
    assert uoe_full.is_full_routing
    uoe_full_flops = compare_lm.analytic_flops_per_token(uoe_full, setup.seq_len)
    assert uoe_full_flops == pytest.approx(llama, rel=0.01)
    routers = setup.num_layers * 2 * setup.hidden_size * (setup.num_heads + setup.num_experts)
    assert uoe_full_flops == pytest.approx(llama + routers, rel=1e-12)  # the only difference: UoE's routers
    # Without routers, uoe.flops' dense figure is exactly the Llama count of this script.
    assert estimate_flops_per_token(configs["uoe_union"], setup.seq_len).dense == pytest.approx(llama, rel=1e-12)
    assert compare_lm.analytic_flops_per_token(configs["uoe_union"], setup.seq_len) < 0.8 * llama


@pytest.mark.parametrize("name", ["llama", "mixtral", "qwen3_moe", "deepseek_v3"])
def test_analytic_flops_match_the_flop_counter(compare_lm, tiny_setup, name):
    """With full attention (what eager attention executes) the analytic count equals FlopCounterMode's: the dense
    model exactly, the MoEs because their eager experts run exactly the routed (and shared) experts per token."""
    config = compare_lm.build_configs(tiny_setup, (name,))[name]
    torch.manual_seed(0)
    model = compare_lm.instantiate(config)
    ids = torch.randint(0, tiny_setup.vocab_size, (2, tiny_setup.seq_len))
    counted = compare_lm.counted_flops_per_token(model, ids)
    analytic = compare_lm.analytic_flops_per_token(config, tiny_setup.seq_len, attention="full")
    assert counted == pytest.approx(analytic, rel=0.02)
    assert model.config._attn_implementation == "sdpa"  # counting does not leave eager attention behind
    causal = compare_lm.analytic_flops_per_token(config, tiny_setup.seq_len)
    assert causal < analytic


def test_bad_arguments_name_the_parameter(compare_lm, capsys):
    for argv, message in (
        (["--models", "llama,gpt2"], "--models: unknown model(s) ['gpt2']; allowed: llama, mixtral"),
        (["--seeds", "a,b"], "--seeds: expected comma-separated integers"),
        (["--max_steps", "0"], "--max_steps: must be an integer >= 1"),
        (["--max_steps", "3", "--tokens", "100"], "not allowed with argument"),
        (["--sweep", "--families", "llama,gpt2"], "--families: unknown family(s) ['gpt2']; allowed: llama, mixtral"),
        (["--families", "llama"], "--families: only with --sweep"),
    ):
        with pytest.raises(SystemExit):
            compare_lm.parse_args(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="`attention` must be 'causal' or 'full'"):
        compare_lm.analytic_flops_per_token(compare_lm.build_configs(compare_lm.QUICK, ("llama",))["llama"], 8, "half")


# ---------------------------------------------------------------------------------------------------------------------
# The frontier sweep (frontier_sweep.py; `compare_lm.py --sweep` runs it)
# ---------------------------------------------------------------------------------------------------------------------


def independent_flops(config: dict, seq_len: int) -> float | None:
    """Active forward FLOPs per token written out again for the families with a short formula (None otherwise)."""
    d, layers, kind = config["hidden_size"], config["num_hidden_layers"], config["model_type"]
    context, lm_head = (seq_len + 1) / 2, 2 * d * config["vocab_size"]
    if kind == "moeut_baseline":
        heads, head_dim = config["num_attention_heads"], config["head_dim"]
        per_layer = (
            4 * d * heads * head_dim  # dense q and k
            + 2 * d * (2 * heads * config["num_attention_experts"] + config["num_mlp_experts"])  # three routers
            + 4 * d * head_dim * heads * config["attention_top_k"]  # value and output experts
            + 4 * heads * head_dim * context  # scores and weighted values
            + 4 * d * config["mlp_expert_size"] * config["mlp_top_k"]  # two-layer experts
        )
        return layers * per_layer + lm_head
    if kind not in ("llama", "mixtral", "qwen3_moe"):
        return None
    attention = 8 * d * d + 4 * d * context  # q, k, v, o (no GQA) + scores and values
    if kind == "llama":
        mlp = 6 * d * config["intermediate_size"]
    else:
        experts = config.get("num_local_experts") or config["num_experts"]
        width = config.get("moe_intermediate_size") or config["intermediate_size"]
        mlp = 2 * d * experts + config["num_experts_per_tok"] * 6 * d * width
    return layers * (attention + mlp) + lm_head


@pytest.mark.slow
def test_sweep_quick_produces_every_point(compare_lm, frontier_sweep, tmp_path):
    """`--sweep --quick` in <= 2 minutes: every family at >= 3 levels and 2 seeds, the LR the grid's argmin, the
    FLOPs the analytic formula, each frontier the lower envelope of its points, the table, PNG and JSON written."""
    from uoe import UoEConfig  # noqa: PLC0415

    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Benchmarks\n\n## LM comparison (compare_lm.py)\n\nkept\n")
    command = [
        sys.executable, str(SWEEP_SCRIPT), "--quick", "--output", str(tmp_path / "sweep.json"),
        "--plot", str(tmp_path / "frontier.png"), "--results_md", str(results_md), "--work_dir", str(tmp_path / "w"),
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path, env=offline_env(tmp_path), capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    record = json.loads((tmp_path / "sweep.json").read_text())
    # its time is reported (record["wall_seconds"]), not asserted: a test does not time a shared machine
    summary, setup = record["summary"], record["setup"]

    # every family runs (UoEConfig has every variant's fields), or is skipped exactly when it lacks them
    assert set(record["families"]) == set(frontier_sweep.SWEEP_FAMILIES) and not record["skipped"]
    for family in frontier_sweep.SWEEP_FAMILIES:
        assert (family in record["skipped"]) == bool(frontier_sweep.missing_uoe_fields(family)), family
    for family in ("llama", "mixtral", "qwen3_moe", "deepseek_v3", "moeut", "uoe_union", "uoe_weighted"):
        assert family in record["families"], family

    for family in record["families"]:
        mine = {n: p for n, p in summary["points"].items() if p["family"] == family}
        assert len(mine) >= 3 and all(p["status"] == "ok" for p in mine.values()), (family, mine)
        assert len({p["flops_analytic"] for p in mine.values()}) == len(mine), f"{family}: levels of equal FLOPs"
        # the learning rate: the argmin of the grid's perplexities, used by every run of the family
        search = record["lr_search"][family]
        assert len(search["perplexity"]) >= 3 and set(map(float, search["perplexity"])) == set(
            record["plan"]["lr_grid"]
        )
        argmin = min(search["perplexity"], key=lambda lr: search["perplexity"][lr])
        assert search["chosen"] == float(argmin)
        runs = [r for r in record["runs"] if r.get("family") == family]
        assert len(runs) == 2 * len(mine) and {r["learning_rate"] for r in runs} == {float(argmin)}  # as trained
        for name, point in mine.items():
            # FLOPs: the analytic formula (uoe.estimate_flops_per_token for UoE)
            config = record["points"][name]["config"]
            if config["model_type"] == "uoe":
                expected = estimate_flops_per_token(UoEConfig.from_dict(config), setup["seq_len"]).active
            else:
                expected = independent_flops(config, setup["seq_len"])
                if expected is None:  # DeepSeek-V3's MLA: the formula checked against FlopCounterMode above
                    expected = compare_lm.analytic_flops_per_token(
                        compare_lm.config_from_dict(config), setup["seq_len"]
                    )
            assert point["flops_analytic"] == pytest.approx(expected, rel=1e-9), name
            ppl = [r["validation_perplexity"] for r in record["runs"] if r["model"] == name]
            assert len(ppl) == 2 and point["perplexity_mean"] == pytest.approx(sum(ppl) / 2, rel=1e-12)
            assert point["perplexity_std"] == pytest.approx(abs(ppl[0] - ppl[1]) / math.sqrt(2), rel=1e-9)
            assert point["tokens_per_second"] > 0
        # the frontier: exactly the points that no cheaper-or-equal point of the family beats (by dominance)
        dominated = {
            n for n, p in mine.items()
            if any(q["flops_analytic"] <= p["flops_analytic"] and q["perplexity_mean"] < p["perplexity_mean"]
                   for m, q in mine.items() if m != n)
        }  # fmt: skip
        assert set(summary["frontiers"][family]) == set(mine) - dominated, family
        frontier_flops = [mine[n]["flops_analytic"] for n in summary["frontiers"][family]]
        assert frontier_flops == sorted(frontier_flops)

    for level in summary["claim"]["levels"]:
        assert level["difference"] == pytest.approx(level["uoe_perplexity"] - level["moe_perplexity"])
        assert level["uoe_family"].startswith("uoe") and level["moe_family"] in frontier_sweep.SWEEP_MOE_FAMILIES

    document = results_md.read_text()
    assert "## LM comparison (compare_lm.py)\n\nkept" in document  # the other section is kept
    section = document[document.index("## LM frontier sweep (compare_lm.py --sweep)") :]
    for name, point in summary["points"].items():
        assert f"\n| {point['family']} | {point['level']} | " in section, name
    assert "Paper's claim" in section and "![frontier](frontier.png)" in section
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_shares_layers_only_in_uoe_moeut(compare_lm, frontier_sweep):
    """Only `uoe_moeut` names `num_layer_groups`; every other UoE family of the sweep keeps every layer its own (and
    so the parameters of the main comparison's UoE). Until 2026-12-06 every UoE family shared its layers."""
    setup = frontier_sweep.SWEEP_FULL.setup
    builders = frontier_sweep.sweep_base_configs(setup, frontier_sweep.UOE_FAMILIES)
    for family in frontier_sweep.UOE_FAMILIES:
        groups = builders[family]({}).num_layer_groups
        assert groups == (setup.num_layers // 2 if family == "uoe_moeut" else None), family
    reference = compare_lm.build_configs(setup, ("uoe_union",))["uoe_union"]
    assert compare_lm.count_parameters(builders["uoe_union"]({})) == compare_lm.count_parameters(reference)


def test_frontier_and_its_reading(frontier_sweep):
    points = {
        "a": {"flops_analytic": 1.0, "perplexity_mean": 10.0},
        "b": {"flops_analytic": 2.0, "perplexity_mean": 12.0},  # dominated by a
        "c": {"flops_analytic": 3.0, "perplexity_mean": 8.0},
        "d": {"flops_analytic": 3.0, "perplexity_mean": 9.0},  # dominated by c (equal FLOPs)
        "e": {"flops_analytic": 4.0, "perplexity_mean": 8.5},  # dominated by c
    }
    assert frontier_sweep.pareto_frontier(points) == ["a", "c"]
    curve = [(1.0, 10.0), (3.0, 8.0)]
    assert frontier_sweep.frontier_at(curve, 2.0, 4.0) == pytest.approx(10.0 - 2.0 * math.log(2) / math.log(3))
    assert frontier_sweep.frontier_at(curve, 1.0, 4.0) == 10.0
    assert frontier_sweep.frontier_at(curve, 4.0, 4.0) == 8.0  # flat past the best point, up to the costliest level
    assert frontier_sweep.frontier_at(curve, 0.5, 4.0) is None and frontier_sweep.frontier_at(curve, 5.0, 4.0) is None


def test_switch_losses_weigh_the_same(compare_lm, tiny_setup):
    """At uniform router probabilities transformers' Mixtral/Qwen3-MoE loss is top_k and UoE's is 1, so the sweep
    divides the former's coefficient by top_k."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: PLC0415

    from uoe.routing import load_balancing_loss  # noqa: PLC0415

    experts, top_k = 8, 4
    logits = torch.zeros(3 * 16, experts)
    assert load_balancing_loss_func((logits, logits), experts, top_k).item() == pytest.approx(top_k)
    scores = torch.full((3, 16, experts), 1.0 / experts)
    index = torch.arange(top_k).expand(3, 16, top_k)
    assert load_balancing_loss(scores, index, None).item() == pytest.approx(1.0)

    setup = dataclasses.replace(tiny_setup, top_k=top_k, normalize_aux_by_top_k=True)
    configs = compare_lm.build_configs(setup, ("mixtral", "qwen3_moe", "uoe_union"))
    for name in ("mixtral", "qwen3_moe"):
        assert compare_lm.aux_loss_weight(configs[name], setup) == pytest.approx(setup.aux_coef / top_k), name
    assert compare_lm.aux_loss_weight(configs["uoe_union"], setup) == setup.aux_coef
    unnormalised = dataclasses.replace(setup, normalize_aux_by_top_k=False)  # the main comparison keeps its rule
    assert compare_lm.aux_loss_weight(configs["mixtral"], unnormalised) == setup.aux_coef
