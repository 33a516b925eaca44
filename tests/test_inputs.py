"""Inputs, arguments and config values the way transformers' models take them (issue 13, items 6-8, 10, 11).

What transformers' common model tests check for a causal LM, written for UoE: RoPE scaling past
`max_position_embeddings`, the deprecation of `past_key_values=`, router logits recorded through the output type,
and that bad inputs and config values fail with a `ValueError` naming them.
"""

import copy
import math
import sys
import typing
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

import uoe
from uoe import UoEForCausalLM, UoEModel
from uoe.configuration_uoe import CACHE_FIELD
from uoe.modeling_uoe import (
    UoECausalLMOutputWithPast,
    UoEModelOutputWithPast,
    UoERotaryEmbedding,
    _check_input_values,
)

from .helpers import BOTH_CACHE_NAMES, returned_cache, tiny_config, tiny_model

MAX_POSITIONS = 32
LONG = int(1.5 * MAX_POSITIONS)  # what transformers' RoPE scaling tests feed
SHORT = 10
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 10.0},
    "dynamic": {"rope_type": "dynamic", "factor": 10.0},
    "yarn": {"rope_type": "yarn", "factor": 10.0},
}


def rope_config(rope_parameters=None, **overrides):
    parameters = None if rope_parameters is None else copy.deepcopy(rope_parameters)
    return tiny_config(max_position_embeddings=MAX_POSITIONS, rope_parameters=parameters, **overrides)


def base_model(config, seed=0):
    torch.manual_seed(seed)
    return UoEModel(config).eval()


# -- 6. max_position_embeddings is soft; RoPE scaling ----------------------------------------------------------------


def test_positions_past_max_position_embeddings_run_and_decode_like_the_full_pass():
    model = tiny_model(max_position_embeddings=16)
    input_ids = torch.randint(0, 61, (2, 24))
    with torch.no_grad():
        full = model(input_ids).logits
        out = model(input_ids[:, :12], use_cache=True)
        cache, steps = returned_cache(out), [out.logits]
        for t in range(12, 24):  # every step past position 16 too
            step = model(input_ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = returned_cache(step)
            steps.append(step.logits)
    assert full.shape == (2, 24, 61) and torch.isfinite(full).all()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-4)


# Every RoPE type the config accepts (`"default"` and transformers' `ROPE_INIT_FUNCTIONS`), small enough for a
# 16-position model: the types that read an original context get 8, so that 24 tokens run past both.
ROPE_TYPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0},
    "yarn_betas": {
        "rope_type": "yarn",
        "factor": 3.0,
        "original_max_position_embeddings": 8,
        "beta_fast": 4.0,
        "beta_slow": 0.5,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0, 1.5, 2.0, 3.0],
        "long_factor": [2.0, 3.0, 5.0, 8.0],
        "original_max_position_embeddings": 8,
    },
    "proportional": {"rope_type": "proportional", "factor": 2.0},
}


def test_every_accepted_rope_type_is_covered():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    assert {params["rope_type"] for params in ROPE_TYPES.values() if params} | {"default"} == {
        "default",
        *ROPE_INIT_FUNCTIONS,
    }


@pytest.mark.parametrize("rope_type", sorted(ROPE_TYPES))
def test_rope_scaling_matches_the_plain_loop_reference(rope_type):
    """Every RoPE type, within and past `max_position_embeddings` (10 and 24 tokens, 16 positions), at sparse routing
    with routing patches, against the float64 plain-loop reference whose frequencies and cos/sin scale are written
    from the methods' formulas (`tests/reference_uoe.rope_frequencies`). The reference with default RoPE differs
    wherever the type changes something (every type but dynamic within the limit), so a model ignoring the scaling
    fails.

    Planted bugs: the rotary embedding without its cos/sin scale (YaRN, LongRoPE), without the dynamic frequency
    update (dynamic, LongRoPE past the original context). (Before, linear and YaRN were only asserted to "change
    something".)"""
    from .reference_uoe import reference_logits

    parameters = copy.deepcopy(ROPE_TYPES[rope_type])
    model = tiny_model(max_position_embeddings=16, rope_parameters=parameters, routing_patch_size=2).double()
    plain = tiny_model(max_position_embeddings=16, routing_patch_size=2).double()
    plain.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(4)
    for length in (10, 24):
        input_ids = torch.randint(0, 61, (length,), generator=generator).tolist()
        with torch.no_grad():
            actual = model(torch.tensor([input_ids])).logits[0]
        expected = reference_logits(model, input_ids)
        # float64, except RoPE angles and router scores (float32 in the model)
        torch.testing.assert_close(actual, expected, rtol=0, atol=2e-5, msg=lambda m, n=length: f"{n} tokens: {m}")
        unscaled = reference_logits(plain, input_ids)
        changes = rope_type != "default" and not (rope_type == "dynamic" and length <= 16)
        assert (float((expected - unscaled).abs().max()) > 1e-3) == changes, length


def reference_cos_sin(positions: torch.Tensor, head_dim: int, base: float, position_scale: float = 1.0):
    """RoPE's cos/sin from the formula in float64: angle = position / scale * base^(-2i / head_dim), i < head_dim/2."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.double()[..., None] / position_scale * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotary(config, positions):
    x = torch.zeros(1, dtype=torch.float32)  # only its dtype and device are used
    return UoERotaryEmbedding(config)(x, positions)


def test_rotary_embedding_matches_the_formula():
    """Unscaled, linear (positions divided by the factor) and dynamic NTK (base grown with the length past the
    limit, unchanged within it) against float64 formulas."""
    head_dim, base, factor = tiny_config().head_dim, 10000.0, 10.0
    short = torch.arange(SHORT)[None]
    long = torch.arange(LONG)[None]
    for positions in (short, long):
        for rope_parameters, scale in ((None, 1.0), (SCALINGS["linear"], factor)):
            cos, sin = rotary(rope_config(rope_parameters), positions)
            ref_cos, ref_sin = reference_cos_sin(positions, head_dim, base, scale)
            torch.testing.assert_close(cos.double(), ref_cos, rtol=0, atol=1e-5)
            torch.testing.assert_close(sin.double(), ref_sin, rtol=0, atol=1e-5)

    dynamic = UoERotaryEmbedding(rope_config(SCALINGS["dynamic"]))
    x = torch.zeros(1)
    for positions in (short, long, short):  # grows past the limit, then goes back for short inputs
        length = positions.shape[-1]
        grown = base
        if length > MAX_POSITIONS:
            grown = base * ((factor * length / MAX_POSITIONS) - (factor - 1)) ** (head_dim / (head_dim - 2))
        cos, sin = dynamic(x, positions)
        ref_cos, ref_sin = reference_cos_sin(positions, head_dim, grown)
        torch.testing.assert_close(cos.double(), ref_cos, rtol=0, atol=1e-5)
        torch.testing.assert_close(sin.double(), ref_sin, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scaling", [None, *sorted(SCALINGS)])
def test_rotary_embedding_matches_llama(scaling):
    """The same `rope_parameters` give the cos/sin of transformers' Llama (YaRN's attention factor included)."""
    rope_parameters = SCALINGS.get(scaling, {"rope_type": "default", "rope_theta": 10000.0})
    config = rope_config(rope_parameters)
    llama = LlamaRotaryEmbedding(
        LlamaConfig(
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            max_position_embeddings=MAX_POSITIONS,
            rope_parameters=copy.deepcopy(rope_parameters),
        )
    )
    ours = UoERotaryEmbedding(config)
    x = torch.zeros(1)
    for length in (SHORT, LONG, SHORT):
        positions = torch.arange(length)[None]
        for got, expected in zip(ours(x, positions), llama(x, positions), strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_linear_scaling_maps_position_x_to_x_over_factor():
    positions = torch.arange(LONG)[None]
    original_cos, original_sin = rotary(rope_config(), positions)
    linear_cos, linear_sin = rotary(rope_config(SCALINGS["linear"]), positions)
    for new_position in range(0, LONG, 10):
        torch.testing.assert_close(linear_cos[:, new_position], original_cos[:, new_position // 10])
        torch.testing.assert_close(linear_sin[:, new_position], original_sin[:, new_position // 10])


# -- 7. `past_key_values=` is deprecated in favour of `cache=` --------------------------------------------------------


@pytest.mark.parametrize("model_class", [UoEModel, UoEForCausalLM])
def test_past_key_values_warns_and_gives_the_same_result(model_class):
    torch.manual_seed(0)
    model = model_class(tiny_config()).eval()
    input_ids = torch.randint(0, 61, (2, 9))
    results = {}
    with torch.no_grad():
        for name in ("cache", "past_key_values"):
            cache = returned_cache(model(input_ids[:, :6], use_cache=True))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = model(input_ids[:, 6:], use_cache=True, **{name: cache})
            deprecations = [w for w in caught if "past_key_values" in str(w.message)]
            if name == "past_key_values" and CACHE_FIELD == "cache":  # transformers >= 5.24 renamed it
                assert [w.category for w in deprecations] == [FutureWarning]
                assert "`cache`" in str(deprecations[0].message)
            else:
                assert deprecations == []
            results[name] = out.last_hidden_state if model_class is UoEModel else out.logits
            assert returned_cache(out) is cache  # the cache given under the old name is the one continued
    torch.testing.assert_close(results["past_key_values"], results["cache"], rtol=0, atol=0)


def test_cache_under_both_names_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match=BOTH_CACHE_NAMES):
        model(torch.zeros(1, 3, dtype=torch.long), cache=DynamicCache(), past_key_values=DynamicCache())


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_passes_the_cache_without_deprecation_warnings(num_beams):
    """No `FutureWarning` about the cache's name from `generate`, and decoding with the cache is decoding without it:
    greedy tokens equal argmax over full forward passes; beam search (which reorders the cache every step) returns
    the beams and scores of beam search without cache.

    Planted bug: a `reorder_cache` that leaves the routing state in place (before, beams were only checked for their
    shape)."""
    model = tiny_model(routing_patch_size=2)
    input_ids = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(13))
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams, pad_token_id=0, eos_token_id=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generated = model.generate(
            input_ids, use_cache=True, return_dict_in_generate=True, output_scores=True, **kwargs
        )
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    assert generated.sequences.shape == (2, 11)
    if num_beams == 1:  # greedy decoding with the cache equals argmax over full forward passes
        sequence = input_ids
        with torch.no_grad():
            for _ in range(6):
                sequence = torch.cat([sequence, model(sequence).logits[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(generated.sequences, sequence)
    else:
        without = model.generate(input_ids, use_cache=False, return_dict_in_generate=True, output_scores=True, **kwargs)
        assert torch.equal(generated.sequences, without.sequences)
        torch.testing.assert_close(generated.sequences_scores, without.sequences_scores, rtol=0, atol=1e-4)


# -- 8. annotations and router logits through the output type ---------------------------------------------------------


@pytest.mark.parametrize(
    "model_class,output_class", [(UoEModel, UoEModelOutputWithPast), (UoEForCausalLM, UoECausalLMOutputWithPast)]
)
def test_forward_type_hints_resolve(model_class, output_class):
    hints = typing.get_type_hints(model_class.forward)
    assert hints["return"] is output_class
    assert "router_logits" in output_class.__dataclass_fields__
    assert hints["kwargs"] == Unpack[TransformersKwargs]


def test_files_copied_for_remote_code_have_no_postponed_annotations():
    """transformers reads the modeling and config classes' annotations; `from __future__ import annotations` would
    turn them into strings."""
    for module in ("uoe.modeling_uoe", "uoe.modeling_uoe_vision", "uoe.configuration_uoe"):
        assert "annotations" not in vars(sys.modules[module]), module


@pytest.mark.parametrize("model_class", [UoEModel, UoEForCausalLM])
def test_router_logits_are_recorded_for_every_routed_block(model_class):
    """`output_router_logits=True`: one `(batch, seq, experts)` entry per routed block (layer 0 SMHA, layer 0 UoME,
    ...), equal to each router's linear map of its block's normed input, computed here in float64 from the
    hidden states and the attention outputs."""
    torch.manual_seed(0)
    model = model_class(tiny_config()).eval()
    base = model if model_class is UoEModel else model.model
    attention_outputs = []
    hooks = [
        layer.self_attn.register_forward_hook(lambda module, args, output: attention_outputs.append(output[0]))
        for layer in base.layers
    ]
    input_ids = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        out = model(input_ids, output_router_logits=True, output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    layers = base.layers
    assert len(out.router_logits) == 2 * len(layers)

    def norm(layer_norm, states):  # RMSNorm in float64
        states = states.double()
        return layer_norm.weight.double() * states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + 1e-6)

    for index, layer in enumerate(layers):
        layer_input = out.hidden_states[index]
        attention_logits = F.linear(norm(layer.input_layernorm, layer_input), layer.self_attn.router.weight.double())
        middle = layer_input.double() + attention_outputs[index].double()
        mlp_logits = F.linear(norm(layer.post_attention_layernorm, middle), layer.mlp.router.weight.double())
        for got, expected in zip(
            out.router_logits[2 * index : 2 * index + 2], (attention_logits, mlp_logits), strict=True
        ):
            assert got.shape == (2, 7, expected.shape[-1])
            torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    assert out.router_logits[0].shape[-1] == 4 and out.router_logits[1].shape[-1] == 4


# -- 10. input validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool),
        torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.long),
        torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.int32),
        torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.float32),
    ],
    ids=["bool", "int64", "int32", "float32"],
)
def test_padding_mask_of_any_dtype_gives_the_bool_mask_result(mask):
    model = tiny_model()
    input_ids = torch.randint(1, 61, (2, 5))
    with torch.no_grad():
        expected = model(input_ids, attention_mask=mask.bool()).logits
        got = model(input_ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


BAD_MASKS = {
    "additive-float": torch.tensor([[0.0, 0.0, 0.0], [float("-inf"), 0.0, 0.0]]),
    "additive-finfo-min": torch.tensor([[0.0, 0.0, 0.0], [torch.finfo(torch.float32).min, 0.0, 0.0]]),
    "int-2": torch.tensor([[1, 1, 2], [0, 1, 1]]),
    "int-negative": torch.tensor([[1, 1, 1], [-1, 1, 1]]),
    "float-half": torch.tensor([[1.0, 1.0, 0.5], [0.0, 1.0, 1.0]]),
    "float-nan": torch.tensor([[1.0, 1.0, float("nan")], [0.0, 1.0, 1.0]]),
    "4-d": torch.ones(2, 1, 3, 3, dtype=torch.bool),
    "wrong-length": torch.ones(2, 4, dtype=torch.bool),
}


@pytest.mark.parametrize("name", sorted(BAD_MASKS))
def test_bad_attention_mask_is_refused(name):
    model = tiny_model()
    input_ids = torch.randint(1, 61, (2, 3))
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids, attention_mask=BAD_MASKS[name])
    with pytest.raises(ValueError, match="attention_mask"):  # with inputs_embeds as well
        model(inputs_embeds=torch.zeros(2, 3, 32), attention_mask=BAD_MASKS[name])


def _foreign_layer_count_cache():
    deeper = tiny_model(num_hidden_layers=3)
    return returned_cache(deeper(torch.zeros(2, 3, dtype=torch.long), use_cache=True))


def _other_batch_cache():
    return returned_cache(tiny_model()(torch.zeros(3, 3, dtype=torch.long), use_cache=True))


BAD_FORWARD_INPUTS = {
    "inputs_embeds-width": ("inputs_embeds", lambda: dict(inputs_embeds=torch.zeros(2, 4, 31))),
    "inputs_embeds-2d": ("inputs_embeds", lambda: dict(inputs_embeds=torch.zeros(4, 32))),
    "position_ids-batch": (
        "position_ids",
        lambda: dict(input_ids=torch.zeros(2, 4, dtype=torch.long), position_ids=torch.arange(4).expand(3, 4)),
    ),
    "position_ids-length": (
        "position_ids",
        lambda: dict(input_ids=torch.zeros(2, 4, dtype=torch.long), position_ids=torch.arange(5)[None]),
    ),
    "position_ids-1d": (
        "position_ids",
        lambda: dict(input_ids=torch.zeros(2, 4, dtype=torch.long), position_ids=torch.arange(4)),
    ),
    "labels-length": (
        "labels",
        lambda: dict(input_ids=torch.zeros(2, 4, dtype=torch.long), labels=torch.zeros(2, 5, dtype=torch.long)),
    ),
    "labels-flat": (
        "labels",
        lambda: dict(input_ids=torch.zeros(2, 4, dtype=torch.long), labels=torch.zeros(8, dtype=torch.long)),
    ),
    "cache-layers-filled": (
        "cache",
        lambda: dict(input_ids=torch.zeros(2, 1, dtype=torch.long), cache=_foreign_layer_count_cache()),
    ),
    "cache-layers-empty": (
        "cache",
        lambda: dict(
            input_ids=torch.zeros(2, 1, dtype=torch.long),
            cache=DynamicCache(config=tiny_config(num_hidden_layers=3)),
        ),
    ),
    "cache-batch": ("cache", lambda: dict(input_ids=torch.zeros(2, 1, dtype=torch.long), cache=_other_batch_cache())),
    "input_ids-1d": ("input_ids", lambda: dict(input_ids=torch.zeros(4, dtype=torch.long))),
}


@pytest.mark.parametrize("case", sorted(BAD_FORWARD_INPUTS))
def test_bad_forward_input_names_the_argument(case):
    name, make_inputs = BAD_FORWARD_INPUTS[case]
    model = tiny_model()
    with pytest.raises(ValueError, match=f"`{name}`"):
        model(**make_inputs())


def test_well_formed_inputs_of_the_same_kinds_are_accepted():
    """The forms the checks above must let through: (1, seq) and (batch, seq) positions, embeddings, labels, a
    cache of this model and batch."""
    model = tiny_model()
    input_ids = torch.randint(0, 61, (2, 4))
    with torch.no_grad():
        expected = model(input_ids).logits
        for position_ids in (torch.arange(4)[None], torch.arange(4).expand(2, 4)):
            torch.testing.assert_close(model(input_ids, position_ids=position_ids).logits, expected)
        embeds = model.get_input_embeddings()(input_ids)
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, expected)
        assert model(input_ids, labels=input_ids).loss is not None
        # a cache of this model and batch continues the sequence; a fresh config-built cache starts it (planted bug:
        # positions of the tokens after a cache counted from 0, which two calls that assert nothing let through)
        cache = returned_cache(model(input_ids[:, :3], use_cache=True))
        torch.testing.assert_close(model(input_ids[:, 3:], cache=cache, use_cache=True).logits, expected[:, 3:])
        fresh = model(input_ids, cache=DynamicCache(config=model.config), use_cache=True)
        torch.testing.assert_close(fresh.logits, expected)
        assert returned_cache(fresh).get_seq_length() == 4


BAD_CONFIG_VALUES = {
    "head_dim-odd": ("head_dim", dict(head_dim=7)),
    "head_dim-odd-small": ("head_dim", dict(head_dim=3)),
    "num_key_value_heads-not-dividing": ("num_key_value_heads", dict(num_key_value_heads=3)),
    "num_key_value_heads-zero": ("num_key_value_heads", dict(num_key_value_heads=0)),
    "num_key_value_heads-more": ("num_key_value_heads", dict(num_key_value_heads=8)),
    "hidden_act-unknown": ("hidden_act", dict(hidden_act="swishy")),
    "pad_token_id-vocab": ("pad_token_id", dict(pad_token_id=61)),
    "pad_token_id-negative": ("pad_token_id", dict(pad_token_id=-1)),
    "rms_norm_eps-negative": ("rms_norm_eps", dict(rms_norm_eps=-1e-6)),
    "layer_norm_eps-negative": ("layer_norm_eps", dict(layer_norm_eps=-1e-12)),
    "initializer_range-negative": ("initializer_range", dict(initializer_range=-0.02)),
    "attention_dropout-none": ("attention_dropout", dict(attention_dropout=None)),
    "num_hidden_layers-bool": ("num_hidden_layers", dict(num_hidden_layers=True)),
    "router_aux_loss_coef-bool": ("router_aux_loss_coef", dict(router_aux_loss_coef=True)),
    "attention_dropout-bool": ("attention_dropout", dict(attention_dropout=False)),
    "initializer_range-bool": ("initializer_range", dict(initializer_range=True)),
    "rms_norm_eps-bool": ("rms_norm_eps", dict(rms_norm_eps=True)),
    "rms_norm_eps-nan": ("rms_norm_eps", dict(rms_norm_eps=math.nan)),
    "rope_type-unknown": ("rope_type", dict(rope_parameters={"rope_type": "spiral", "rope_theta": 10000.0})),
    "partial_rotary_factor": ("partial_rotary_factor", dict(partial_rotary_factor=0.5)),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIG_VALUES))
def test_bad_config_value_fails_at_construction(case):
    name, overrides = BAD_CONFIG_VALUES[case]
    with pytest.raises(ValueError, match=name):
        tiny_config(**overrides)


def test_accepted_config_values_build_and_round_trip(tmp_path):
    config = tiny_config(num_key_value_heads=4, hidden_act="gelu", pad_token_id=0, rms_norm_eps=0.0)
    assert config.num_key_value_heads == 4 and tiny_config().num_key_value_heads == 4
    config.save_pretrained(tmp_path)
    loaded = uoe.UoEConfig.from_pretrained(tmp_path)
    assert (loaded.num_key_value_heads, loaded.hidden_act, loaded.pad_token_id) == (4, "gelu", 0)
    UoEForCausalLM(loaded)


# -- 11. token ids: one host read ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 61, 1000])
def test_token_ids_outside_the_vocabulary_raise(bad):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"`input_ids` must be in \[0, vocab_size=61\)"):
        model(torch.tensor([[1, bad, 2]]))
    model(torch.tensor([[0, 60, 2]]))  # both ends of the vocabulary are fine


class HostReads:
    """Counts the ways a tensor's value reaches Python (`item`, `tolist`, `int()`, `float()`, `bool()`, indexing)."""

    METHODS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")

    def __init__(self, monkeypatch):
        self.count = 0
        for method in self.METHODS:
            original = getattr(torch.Tensor, method)
            monkeypatch.setattr(torch.Tensor, method, self._counting(original))

    def _counting(self, original):
        def counted(tensor, *args, **kwargs):
            self.count += 1
            return original(tensor, *args, **kwargs)

        return counted


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("bad", [None, -1, 61])
def test_input_value_check_reads_the_device_once(monkeypatch, with_mask, bad):
    input_ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    if bad is not None:
        input_ids[1, 2] = bad
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]]) if with_mask else None
    reads = HostReads(monkeypatch)
    if bad is None:
        _check_input_values(input_ids, mask, 61)
    else:
        with pytest.raises(ValueError, match="input_ids"):
            _check_input_values(input_ids, mask, 61)
    assert reads.count == 1


def test_bool_mask_with_inputs_embeds_reads_nothing(monkeypatch):
    reads = HostReads(monkeypatch)
    _check_input_values(None, torch.ones(2, 3, dtype=torch.bool), 61)
    _check_input_values(None, None, 61)
    assert reads.count == 0
