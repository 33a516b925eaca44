"""`UoEConfig.from_recipe`: the presets' fields, overrides, bad input, save/load, and `--recipe` in the examples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uoe import UoEConfig, UoEForCausalLM
from uoe.configuration_uoe import RECIPE_FIELDS, RECIPES

from .test_examples import EXAMPLES, load_example, offline_env, run

SIZES = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, attention_top_k=2,
    intermediate_size=64, num_mlp_experts=4, mlp_top_k=2, max_position_embeddings=32,
)  # fmt: skip


def test_paper_recipe_is_the_default_config():
    """`paper` is the paper's configuration, which is also UoEConfig's defaults (a config built without a recipe)."""
    assert UoEConfig.from_recipe("paper", **SIZES).to_dict() == UoEConfig(**SIZES).to_dict()
    expected = {
        "gate_mode": "union", "router_score_func": "softmax", "router_balance_loss": "switch",
        "norm_placement": "pre", "num_layer_groups": None, "num_shared_attention_groups": 0,
        "num_shared_mlp_experts": 0, "mlp_chain_length": 1,
    }  # fmt: skip
    assert RECIPES["paper"].fields == expected
    for name, recipe in RECIPES.items():  # every recipe decides every component (nothing left to the defaults)
        assert set(recipe.fields) == set(RECIPE_FIELDS), name


@pytest.mark.parametrize("layers", [2, 4, 8])
def test_moeut_style_recipe(layers):
    config = UoEConfig.from_recipe("moeut_style", **{**SIZES, "num_hidden_layers": layers})
    assert (config.gate_mode, config.router_balance_loss, config.norm_placement) == ("weighted", "entropy", "peri")
    assert config.num_layer_groups == layers // 2  # each distinct layer applied twice
    assert config.router_score_func == "softmax" and config.mlp_chain_length == 1
    assert config.num_shared_attention_groups == config.num_shared_mlp_experts == 0
    weighted = UoEConfig.from_recipe("weighted", **SIZES)
    assert weighted.gate_mode == "weighted" and weighted.num_layer_groups is None


def test_weighted_peri_recipe_changes_only_gates_and_norm():
    """`weighted_peri` is `paper` with weighted gates and peri-norm; every other component is the paper's."""
    config = UoEConfig.from_recipe("weighted_peri", **SIZES)
    paper = UoEConfig.from_recipe("paper", **SIZES)
    differing = {f for f in RECIPE_FIELDS if getattr(config, f) != getattr(paper, f)}
    assert differing == {"gate_mode", "norm_placement"}
    assert (config.gate_mode, config.norm_placement) == ("weighted", "peri")


def test_overrides_win_over_the_recipe():
    config = UoEConfig.from_recipe("moeut_style", **SIZES, gate_mode="union", num_layer_groups=1)
    assert config.gate_mode == "union" and config.num_layer_groups == 1 and config.norm_placement == "peri"
    assert config.hidden_size == 32 and config.mlp_top_k == 2


@pytest.mark.parametrize(
    ("recipe", "overrides", "message"),
    [
        ("best", {}, r"`recipe` must be one of \['paper', 'weighted', 'weighted_peri', 'moeut_style'\], got 'best'"),
        ("moeut_style", {"num_hidden_layers": 3}, r"`num_hidden_layers` must be a multiple of 2 for recipe"),
        ("moeut_style", {"num_hidden_layers": 1}, r"`num_hidden_layers` must be a multiple of 2"),
        ("paper", {"gate_mode": "summed"}, r"`gate_mode` must be one of"),  # the overrides are validated too
        ("moeut_style", {"num_layer_groups": 3}, r"`num_layer_groups` must divide `num_hidden_layers`"),
    ],
)
def test_bad_recipe_input_names_the_parameter(recipe, overrides, message):
    with pytest.raises(ValueError, match=message):
        UoEConfig.from_recipe(recipe, **{**SIZES, **overrides})


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_model_save_load_round_trip(recipe, tmp_path):
    torch.manual_seed(0)
    model = UoEForCausalLM(UoEConfig.from_recipe(recipe, **SIZES)).eval()
    model.save_pretrained(tmp_path)
    reloaded = UoEForCausalLM.from_pretrained(tmp_path).eval()
    for field in RECIPE_FIELDS:
        assert getattr(reloaded.config, field) == getattr(model.config, field), field
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["gate_mode"] == RECIPES[recipe].fields["gate_mode"]


def test_run_clm_refuses_a_recipe_for_a_checkpoint(tmp_path):
    run_clm = load_example("run_clm")
    args = run_clm.ModelArguments(model_name_or_path=str(tmp_path), recipe="moeut_style")
    with pytest.raises(ValueError, match=r"--recipe moeut_style: a recipe builds a model from scratch"):
        run_clm.check_recipe(args)
    run_clm.check_recipe(run_clm.ModelArguments(recipe="moeut_style"))  # from scratch: fine


def test_main_job_rejects_an_unknown_recipe(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "main_job.py"), "--recipe", "best", "--data_dir", str(tmp_path / "d")],
        cwd=tmp_path, env=offline_env(tmp_path), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "argument --recipe: invalid choice: 'best'" in result.stderr


@pytest.mark.slow
def test_main_job_quick_with_a_recipe(tmp_path):
    """The main job's quick mode with `--recipe moeut_style`: the saved model has the recipe's components (two
    layers: one distinct layer applied twice) and the model card names the recipe."""
    command = [
        sys.executable, str(EXAMPLES / "main_job.py"), "--quick", "--recipe", "moeut_style",
        "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"), "--max_steps", "4",
        "--sample_max_new_tokens", "5", "--plots", "false",
    ]  # fmt: skip
    result = run(command, cwd=tmp_path, env=offline_env(tmp_path))
    assert "recipe              moeut_style" in result.stdout
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["num_layer_groups"] == 1
    assert (config["gate_mode"], config["router_balance_loss"], config["norm_placement"]) == (
        "weighted", "entropy", "peri",
    )  # fmt: skip
    card = (tmp_path / "run" / "README.md").read_text()
    assert "Components: the recipe `moeut_style` of `UoEConfig.from_recipe`" in card
    model = UoEForCausalLM.from_pretrained(tmp_path / "run")
    assert len(model.model.layers) == 1  # the shared layer is stored once
    assert Path(tmp_path / "run" / "all_results.json").is_file()
