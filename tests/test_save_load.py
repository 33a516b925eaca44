"""Checkpoints: save / AutoModel round trip, and loading as remote code without the `uoe` package."""

import json

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from uoe import UoEConfig, UoEForCausalLM, UoEModel

from .helpers import tiny_model
from .remote_code import logits_without_uoe


def test_save_and_auto_load_give_identical_logits(tmp_path):
    model = tiny_model(routing_patch_size=2, gate_mode="weighted", tie_word_embeddings=True)
    input_ids = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()

    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, UoEConfig) and config.routing_patch_size == 2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, UoEForCausalLM)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, UoEModel)


def test_checkpoint_carries_code_and_auto_map(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "uoe"
    assert config["auto_map"]["AutoConfig"] == "configuration_uoe.UoEConfig"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_uoe.UoEForCausalLM"
    for name in ("configuration_uoe.py", "modeling_uoe.py", "routing.py", "conversion.py"):
        assert (tmp_path / name).exists(), name


def test_remote_code_load_without_uoe_package(tmp_path):
    model = tiny_model(routing_patch_size=3)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    inputs = {"input_ids": torch.randint(0, 61, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    inputs["attention_mask"][1, :3] = 0
    with torch.no_grad():
        expected = model(**inputs).logits
    logits, info = logits_without_uoe(folder, inputs, tmp_path)
    assert info["class"] == "UoEForCausalLM"
    assert info["module"].startswith("transformers_modules.") and not info["uoe_loaded"]
    assert torch.equal(logits, expected)
