"""The registry of SMHA implementations (`uoe.SelectiveAttentionInterface`): selection by name, user-registered
implementations, and the errors for unknown names."""

import pytest
import torch

import uoe
from uoe import ALL_SELECTIVE_ATTENTION_FUNCTIONS, SelectiveAttentionInterface, UoEForCausalLM

from .helpers import tiny_config, tiny_model

INPUT_IDS = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(3))  # above the "auto" threshold


@pytest.fixture
def counting_implementation():
    """Register `"counting"`: counts its calls and delegates to `"masked"`; unregistered afterwards."""
    calls = []
    masked = ALL_SELECTIVE_ATTENTION_FUNCTIONS["masked"]

    def counting(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return masked(module, *args, **kwargs)

    SelectiveAttentionInterface.register("counting", counting)
    yield calls
    del SelectiveAttentionInterface._global_mapping["counting"]


def test_the_built_in_implementations_are_registered():
    assert {"masked", "gathered", "triton"} <= set(ALL_SELECTIVE_ATTENTION_FUNCTIONS)


def test_a_registered_implementation_is_used_by_every_layer(counting_implementation, tmp_path):
    reference = tiny_model(selective_attention_implementation="masked")
    with torch.no_grad():
        expected = reference(INPUT_IDS).logits
        # by config field
        model = tiny_model(selective_attention_implementation="counting")
        torch.testing.assert_close(model(INPUT_IDS).logits, expected, rtol=0, atol=0)
        assert counting_implementation == [0, 1]
        # by the model's setter, and back to `routing_backend`'s choice (here: "gathered", not this one)
        model = tiny_model()
        model.set_selective_attention_implementation("counting")
        counting_implementation.clear()
        model(INPUT_IDS)
        assert counting_implementation == [0, 1]
        model.set_selective_attention_implementation(None)
        model(INPUT_IDS)
        assert counting_implementation == [0, 1]
        # by `from_pretrained`, as transformers takes `attn_implementation`
        model.save_pretrained(tmp_path)
        loaded = UoEForCausalLM.from_pretrained(tmp_path, selective_attention_implementation="counting")
        counting_implementation.clear()
        torch.testing.assert_close(loaded(INPUT_IDS).logits, expected, rtol=0, atol=0)
        assert counting_implementation == [0, 1]


@pytest.mark.parametrize("name", ["masked", "gathered"])
def test_a_name_overrides_what_routing_backend_would_pick(name, monkeypatch):
    """ "auto" picks "masked" for 8 tokens and "gathered" for 40 on CPU; a named implementation runs at both lengths,
    and computes what the masked reference computes."""
    reference = tiny_model(routing_backend="masked")
    lengths = (8, INPUT_IDS.shape[1])
    with torch.no_grad():
        expected = [reference(INPUT_IDS[:, :length]).logits for length in lengths]
    ran = []
    original = ALL_SELECTIVE_ATTENTION_FUNCTIONS[name]

    def recorded(*args, **kwargs):
        ran.append(name)
        return original(*args, **kwargs)

    monkeypatch.setitem(ALL_SELECTIVE_ATTENTION_FUNCTIONS, name, recorded)
    model = tiny_model(selective_attention_implementation=name)
    for length, logits in zip(lengths, expected, strict=True):
        ran.clear()
        with torch.no_grad():
            torch.testing.assert_close(model(INPUT_IDS[:, :length]).logits, logits, rtol=1e-5, atol=1e-5)
        assert ran == [name, name]


def test_unknown_names_raise_listing_the_registered_ones():
    config = tiny_config(selective_attention_implementation="flash")
    with pytest.raises(ValueError, match=r"selective_attention_implementation.*'gathered'.*'masked'.*'triton'"):
        UoEForCausalLM(config)
    model = tiny_model()
    with pytest.raises(ValueError, match=r"selective_attention_implementation.*'masked'"):
        model.set_selective_attention_implementation("flash")
    model.config.selective_attention_implementation = "flash"  # behind the model's back: the forward refuses it
    with pytest.raises(ValueError, match=r"selective_attention_implementation.*'masked'"):
        model(INPUT_IDS)
    with pytest.raises(ValueError, match="selective_attention_implementation"):
        tiny_config(selective_attention_implementation=3)


def test_the_registry_is_importable_from_the_package():
    assert uoe.SelectiveAttentionInterface is SelectiveAttentionInterface
    assert isinstance(uoe.ALL_SELECTIVE_ATTENTION_FUNCTIONS, SelectiveAttentionInterface)
