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


# -- the layout at sparse routing, against the dense model's own weights -----------------------------------------------
# Full routing computes the same function under any consistent permutation of hidden units or head groups, so it
# cannot pin which units an expert owns. Here every sequence is one routing patch (`routing_patch_size` = its length),
# so each block takes one decision per sequence, and every token attends to every earlier token in the groups it
# selected. The UoE model must then equal the dense model whose o_proj input (query heads) and down_proj input (MLP
# hidden units) are multiplied, per sequence, by the gates of the documented owners: head group g = query heads
# [g*G, (g+1)*G) with key/value head g, MLP expert e = hidden units [e*I/E, (e+1)*I/E).


def gated_dense_logits(dense, input_ids, head_gates, unit_gates):
    """Logits of the dense model with, in layer i, query head h's output multiplied by `head_gates[i][:, h]` before
    o_proj and hidden unit u multiplied by `unit_gates[i][:, u]` before down_proj (both `(batch, count)`)."""
    config = dense.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads  # Qwen2: none
    hooks = []
    for layer, heads, units in zip(dense.model.layers, head_gates, unit_gates, strict=True):
        per_column = heads.repeat_interleave(head_dim, -1)[:, None, :]
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, g=per_column: (a[0] * g,)))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, g=units[:, None, :]: (a[0] * g,)))
    try:
        with torch.no_grad():
            return dense(input_ids).logits
    finally:
        for hook in hooks:
            hook.remove()


def documented_gates(model, router_logits):
    """Per layer, `(batch, query heads)` and `(batch, hidden units)` gates from each sequence's routing decision (its
    first token's router logits): 0 for unselected experts, 1 (union) or the renormalised top-k score (weighted)."""
    config = model.config
    group_size = config.num_attention_heads // config.num_key_value_heads
    head_gates, unit_gates = [], []
    for layer in range(config.num_hidden_layers):
        for logits, top_k, width, gates in (
            (router_logits[2 * layer], config.attention_top_k, group_size, head_gates),
            (router_logits[2 * layer + 1], config.mlp_top_k, config.mlp_expert_size, unit_gates),
        ):
            scores = logits[:, 0].double().softmax(-1)
            top = scores.topk(top_k, -1)
            values = torch.ones_like(top.values) if config.gate_mode == "union" else top.values
            if config.gate_mode == "weighted":
                values = values / values.sum(-1, keepdim=True)
            per_expert = torch.zeros_like(scores).scatter(-1, top.indices, values)
            gates.append(per_expert.repeat_interleave(width, -1).float())  # expert e owns a contiguous block
    return head_gates, unit_gates


SPARSE_LAYOUTS = {
    "llama_gqa_bias_top1": ("llama_gqa_bias", dict(attention_top_k=1, mlp_top_k=1)),
    "mistral_gqa_top1_of_2_top2_of_4": ("mistral_gqa", dict(attention_top_k=1, mlp_top_k=2)),
    "qwen2_gqa_top1": ("qwen2_gqa_tied", dict(attention_top_k=1, mlp_top_k=1)),
    "qwen3_gqa_bias_8_experts": ("qwen3_gqa_bias", dict(attention_top_k=1, num_mlp_experts=8, mlp_top_k=3)),
    "llama_mha_top2": ("llama_mha_tied", dict(attention_top_k=2, mlp_top_k=1)),
}


@pytest.mark.parametrize("case", SPARSE_LAYOUTS.values(), ids=SPARSE_LAYOUTS.keys())
def test_sparse_conversion_owns_the_documented_heads_and_units(case):
    """Planted bugs: the MLP split into strided experts (unit u to expert u % E) instead of contiguous slices; the head
    groups converted in reverse order (key/value head g and its query heads stored as expert kv_heads - 1 - g). Both
    are exact at full routing."""
    family, overrides = case
    config_class, model_class, dense_overrides = FAMILIES[family]
    dense = dense_model(config_class, model_class, **dense_overrides)
    seq = 12
    model = UoEForCausalLM.from_dense(dense, routing_patch_size=seq, **overrides).eval()
    input_ids = torch.randint(3, 97, (4, seq), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out = model(input_ids, output_router_logits=True)
    head_gates, unit_gates = documented_gates(model, out.router_logits)
    assert any(len({tuple(g.tolist()) for g in gates}) > 1 for gates in head_gates + unit_gates)  # decisions vary
    expected = gated_dense_logits(dense, input_ids, head_gates, unit_gates)
    assert max_rel_error(out.logits, expected) <= TOLERANCE
    # the experts really are left out: the ungated dense model is far
    with torch.no_grad():
        assert max_rel_error(out.logits, dense(input_ids).logits) > 1e-2


def test_weighted_gates_scale_the_documented_heads_and_units():
    """`gate_mode="weighted"` with every expert selected is not the dense function (`is_full_routing` is False): it is
    the dense model with each head group and each MLP slice scaled by its renormalised score. With one key/value head
    and one MLP expert every gate is 1 and it is the dense function.

    Planted bug: the MLP split into strided experts (each expert's score then scales other units)."""
    dense = dense_model(LlamaConfig, LlamaForCausalLM, num_key_value_heads=2)
    seq = 12
    weighted = UoEForCausalLM.from_dense(dense, gate_mode="weighted", routing_patch_size=seq).eval()
    assert not weighted.config.is_full_routing
    input_ids = torch.randint(3, 97, (3, seq), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = weighted(input_ids, output_router_logits=True)
    head_gates, unit_gates = documented_gates(weighted, out.router_logits)
    assert all(float(g.min()) < 0.99 for g in head_gates + unit_gates)  # every block really scales
    assert max_rel_error(out.logits, gated_dense_logits(dense, input_ids, head_gates, unit_gates)) <= TOLERANCE
    # one key/value head and one MLP expert: every renormalised gate is 1, so weighted is the dense function too
    mqa = dense_model(LlamaConfig, LlamaForCausalLM, num_key_value_heads=1)
    single = UoEForCausalLM.from_dense(mqa, gate_mode="weighted", num_mlp_experts=1).eval()
    assert single.config.is_full_routing
    with torch.no_grad():
        assert max_rel_error(single(input_ids).logits, mqa(input_ids).logits) <= TOLERANCE


def test_sparse_conversion_router_scores_one_expert_per_key_value_group():
    dense = dense_model(Qwen2Config, Qwen2ForCausalLM, num_key_value_heads=2)
    sparse = UoEForCausalLM.from_dense(dense, attention_top_k=1, mlp_top_k=2).eval()
    assert not sparse.config.is_full_routing
    assert sparse.model.layers[0].self_attn.router.weight.shape == (2, 32)  # one expert per key/value head group


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
