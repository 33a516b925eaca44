"""Invalid configurations fail at construction with the parameter's name in the message."""

import pytest

from uoe import UoEConfig, UoEForCausalLM

from .helpers import tiny_config

BAD_CONFIGS = [
    ("attention_top_k", dict(attention_top_k=5)),
    ("attention_top_k", dict(attention_top_k=0)),
    ("mlp_top_k", dict(mlp_top_k=5)),
    ("mlp_top_k", dict(mlp_top_k=0)),
    ("intermediate_size", dict(intermediate_size=66)),
    ("data_capacity", dict(data_capacity=0.5)),
    ("data_capacity", dict(data_capacity=1.5, is_causal=False)),
    ("data_capacity", dict(data_capacity=0.0, is_causal=False)),
    ("gate_mode", dict(gate_mode="sum")),
    ("mlp_type", dict(mlp_type="relu")),
    ("router_score_func", dict(router_score_func="tanh")),
    ("routing_patch_size", dict(routing_patch_size=0)),
    ("num_attention_heads", dict(num_attention_heads=2.5)),
    ("hidden_size", dict(hidden_size=30)),  # not divisible by 4 heads and no head_dim
    ("router_aux_loss_coef", dict(router_aux_loss_coef=-1.0)),
]


@pytest.mark.parametrize("name,overrides", BAD_CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_CONFIGS)])
def test_invalid_config_names_the_parameter(name, overrides):
    with pytest.raises(ValueError, match=name):
        tiny_config(**overrides)


def test_defaults_and_derived_fields():
    config = UoEConfig()
    assert config.model_type == "uoe"
    assert config.head_dim == config.hidden_size // config.num_attention_heads
    assert config.hidden_act == "silu"
    assert UoEConfig(mlp_type="gelu").hidden_act == "gelu"
    assert config.rope_parameters["rope_type"] == "default"
    assert UoEConfig(rope_theta=500.0).rope_parameters["rope_theta"] == 500.0
    assert tiny_config(attention_top_k=4, mlp_top_k=4).is_full_routing
    assert not tiny_config().is_full_routing


def test_data_capacity_allowed_only_for_bidirectional():
    config = tiny_config(is_causal=False, data_capacity=0.5)
    assert config.data_capacity == 0.5
    with pytest.raises(ValueError, match="is_causal"):
        UoEForCausalLM(config)


def test_config_round_trip(tmp_path):
    config = tiny_config(routing_patch_size=4, gate_mode="weighted", router_z_loss_coef=1e-3)
    config.save_pretrained(tmp_path)
    loaded = UoEConfig.from_pretrained(tmp_path)
    for key in ("routing_patch_size", "gate_mode", "router_z_loss_coef", "attention_top_k", "head_dim"):
        assert getattr(loaded, key) == getattr(config, key)
