"""`UoEForCausalLM.from_dense` of the four supported dense families (Llama, Mistral, Qwen2, Qwen3): exact at full
routing (logits, greedy generation, KV-cache decoding, SDPA and eager, a checkpoint loaded as remote code), and a
`ValueError` naming the field for everything a UoE model would compute differently."""

import pytest
import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from uoe import UoEForCausalLM

from .helpers import returned_cache
from .remote_code import many_logits_without_uoe

TOLERANCE = 1e-5  # max relative logit error, float32
SHAPES = dict(
    vocab_size=97,
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=64,
    num_hidden_layers=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    "llama_gqa_bias": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, attention_bias=True)),
    "llama_mha_tied": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "mistral_gqa": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2_gqa_tied": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3_mqa_qk_norm": (Qwen3Config, Qwen3ForCausalLM, dict(num_key_value_heads=1, head_dim=16)),
    "qwen3_gqa_bias": (Qwen3Config, Qwen3ForCausalLM, dict(num_key_value_heads=2, head_dim=8, attention_bias=True)),
}


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def dense_model(config_class, model_class, seed: int = 0, **overrides):
    """A small random dense model whose norms and biases are not their initial ones and ones (so that a conversion
    dropping or misplacing them fails)."""
    torch.manual_seed(seed)
    model = model_class(config_class(**{**SHAPES, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.5 * torch.randn_like(param))
    return model


def padded_batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 97, (3, 17), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0  # left padding
    input_ids[1, :5] = 0
    return input_ids, attention_mask


@pytest.fixture(params=list(FAMILIES), ids=list(FAMILIES))
def converted(request):
    config_class, model_class, overrides = FAMILIES[request.param]
    dense = dense_model(config_class, model_class, **overrides)
    model = UoEForCausalLM.from_dense(dense).eval()
    assert model.config.is_full_routing
    assert model.config.num_key_value_heads == dense.config.num_key_value_heads
    return dense, model


@pytest.mark.parametrize("backend", ["auto", "gathered"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_logits_equal_the_dense_model(converted, attn_implementation, backend):
    dense, model = converted
    dense.set_attn_implementation(attn_implementation)
    model.set_attn_implementation(attn_implementation)
    model.config.routing_backend = backend
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        expected = dense(input_ids, attention_mask=attention_mask).logits
        actual = model(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert max_rel_error(actual[real], expected[real]) <= TOLERANCE


def test_greedy_generation_equals_the_dense_model(converted):
    dense, model = converted
    input_ids, attention_mask = padded_batch(2)
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        expected = dense.generate(input_ids, **kwargs)
        actual = model.generate(input_ids, **kwargs)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_kv_cache_decoding_equals_the_dense_model(converted, attn_implementation):
    dense, model = converted
    dense.set_attn_implementation(attn_implementation)
    model.set_attn_implementation(attn_implementation)
    input_ids = torch.randint(3, 97, (2, 15), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = dense(input_ids).logits
        # prefill 6 tokens, a chunk of 4, then one token at a time
        out = model(input_ids[:, :6], use_cache=True)
        cache, pieces = returned_cache(out), [out.logits]
        pieces.append(model(input_ids[:, 6:10], cache=cache, use_cache=True).logits)
        for t in range(10, 15):
            pieces.append(model(input_ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    assert max_rel_error(torch.cat(pieces, dim=1), expected) <= TOLERANCE


def test_saved_checkpoints_reload_as_remote_code_without_uoe(tmp_path):
    """Every family's converted checkpoint, loaded by remote code in one interpreter that cannot import `uoe`."""
    folders, expected = [], []
    input_ids, attention_mask = padded_batch(4)
    for name, (config_class, model_class, overrides) in FAMILIES.items():
        dense = dense_model(config_class, model_class, **overrides)
        UoEForCausalLM.from_dense(dense).save_pretrained(tmp_path / name)
        folders.append(tmp_path / name)
        with torch.no_grad():
            expected.append(dense(input_ids, attention_mask=attention_mask).logits)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    all_logits, info = many_logits_without_uoe(folders, inputs, tmp_path)
    assert info["classes"] == ["UoEForCausalLM"] * len(FAMILIES) and not info["uoe_loaded"]
    assert all(module.startswith("transformers_modules.") for module in info["modules"])
    real = attention_mask.bool()
    for name, logits, dense_logits in zip(FAMILIES, all_logits, expected, strict=True):
        assert max_rel_error(logits[real], dense_logits[real]) <= TOLERANCE, name


ROPE_PARAMETERS = {
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
    "dynamic": dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
    "yarn": dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16),
    "llama3": dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
    ),
}


@pytest.mark.parametrize("rope", ROPE_PARAMETERS.values(), ids=ROPE_PARAMETERS.keys())
def test_supported_rope_variants_are_exact(rope):
    dense = dense_model(LlamaConfig, LlamaForCausalLM, num_key_value_heads=2, rope_parameters=dict(rope))
    model = UoEForCausalLM.from_dense(dense).eval()
    input_ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert max_rel_error(model(input_ids).logits, dense(input_ids).logits) <= TOLERANCE


def test_a_window_longer_than_every_accepted_sequence_is_exact():
    dense = dense_model(MistralConfig, MistralForCausalLM, num_key_value_heads=2, sliding_window=64)
    model = UoEForCausalLM.from_dense(dense).eval()
    input_ids = torch.randint(3, 97, (1, 64), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert max_rel_error(model(input_ids).logits, dense(input_ids).logits) <= TOLERANCE
    # a shorter window, with UoE limited to sequences it never cuts
    windowed = dense_model(MistralConfig, MistralForCausalLM, num_key_value_heads=2, sliding_window=20)
    model = UoEForCausalLM.from_dense(windowed, max_position_embeddings=20).eval()
    with torch.no_grad():
        assert max_rel_error(model(input_ids[:, :20]).logits, windowed(input_ids[:, :20]).logits) <= TOLERANCE


# -- full routing means the dense function ----------------------------------------------------------------------------


def test_weighted_gates_are_not_full_routing_unless_every_block_has_one_expert():
    dense = dense_model(LlamaConfig, LlamaForCausalLM, num_key_value_heads=2)
    weighted = UoEForCausalLM.from_dense(dense, gate_mode="weighted").eval()
    assert not weighted.config.is_full_routing
    input_ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert max_rel_error(weighted(input_ids).logits, dense(input_ids).logits) > 1e-3
    # one key/value head and one MLP expert: every renormalised gate is 1, so weighted is the dense function too
    mqa = dense_model(LlamaConfig, LlamaForCausalLM, num_key_value_heads=1)
    single = UoEForCausalLM.from_dense(mqa, gate_mode="weighted", num_mlp_experts=1).eval()
    assert single.config.is_full_routing
    with torch.no_grad():
        assert max_rel_error(single(input_ids).logits, mqa(input_ids).logits) <= TOLERANCE


def test_sparsified_conversion_is_not_dense():
    dense = dense_model(Qwen2Config, Qwen2ForCausalLM, num_key_value_heads=2)
    sparse = UoEForCausalLM.from_dense(dense, attention_top_k=1, mlp_top_k=2).eval()
    assert not sparse.config.is_full_routing
    assert sparse.model.layers[0].self_attn.router.weight.shape == (2, 32)  # one expert per key/value head group
    input_ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert max_rel_error(sparse(input_ids).logits, dense(input_ids).logits) > 1e-3


# -- refused models and fields: one test per case ------------------------------------------------------------------------


def test_another_architecture_is_refused():
    gemma = GemmaForCausalLM(GemmaConfig(**SHAPES, num_key_value_heads=2, head_dim=8))
    with pytest.raises(ValueError, match=r"`architecture='GemmaForCausalLM'`.*LlamaForCausalLM"):
        UoEForCausalLM.from_dense(gemma)


def test_a_model_without_language_modeling_head_is_refused():
    with pytest.raises(ValueError, match=r"`architecture='LlamaModel'`"):
        UoEForCausalLM.from_dense(LlamaModel(LlamaConfig(**SHAPES)))


def test_a_mistral_sliding_window_is_refused():
    mistral = dense_model(MistralConfig, MistralForCausalLM, num_key_value_heads=2, sliding_window=4)
    with pytest.raises(ValueError, match=r"`sliding_window=4`.*None"):
        UoEForCausalLM.from_dense(mistral)


@pytest.mark.parametrize(
    "config_class, model_class",
    [(Qwen2Config, Qwen2ForCausalLM), (Qwen3Config, Qwen3ForCausalLM)],
    ids=["qwen2", "qwen3"],
)
def test_a_qwen_sliding_window_is_refused(config_class, model_class):
    model = dense_model(config_class, model_class, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    with pytest.raises(ValueError, match=r"`use_sliding_window=True`.*use_sliding_window=False"):
        UoEForCausalLM.from_dense(model)


def test_an_mlp_bias_is_refused():
    llama = dense_model(LlamaConfig, LlamaForCausalLM, mlp_bias=True)
    with pytest.raises(ValueError, match=r"`mlp_bias=True`.*mlp_bias=False"):
        UoEForCausalLM.from_dense(llama)


def test_a_rope_type_uoe_lacks_is_refused():
    llama = dense_model(LlamaConfig, LlamaForCausalLM)
    llama.config.rope_parameters = dict(
        rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 4, long_factor=[2.0] * 4
    )
    with pytest.raises(ValueError, match=r"rope_type'\]='longrope'`.*'default'"):
        UoEForCausalLM.from_dense(llama)


def test_partial_rotary_embeddings_are_refused():
    llama = dense_model(LlamaConfig, LlamaForCausalLM)
    llama.config.rope_parameters = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)
    with pytest.raises(ValueError, match=r"`partial_rotary_factor=0.5`"):
        UoEForCausalLM.from_dense(llama)


def test_an_unknown_activation_is_refused():
    llama = dense_model(LlamaConfig, LlamaForCausalLM)
    llama.config.hidden_act = "not_an_activation"
    with pytest.raises(ValueError, match=r"`hidden_act='not_an_activation'`.*silu"):
        UoEForCausalLM.from_dense(llama)


def test_tensor_parallel_pretraining_slices_are_refused():
    llama = dense_model(LlamaConfig, LlamaForCausalLM)
    llama.config.pretraining_tp = 2
    with pytest.raises(ValueError, match=r"`pretraining_tp=2`"):
        UoEForCausalLM.from_dense(llama)


def test_attention_top_k_beyond_the_key_value_groups_is_refused():
    llama = dense_model(LlamaConfig, LlamaForCausalLM, num_key_value_heads=2)
    with pytest.raises(ValueError, match=r"attention_top_k.*num_key_value_heads=2"):
        UoEForCausalLM.from_dense(llama, attention_top_k=4)
