"""Grouped-query attention in SMHA: the attention expert is one key/value head with its query heads.

Every path (masked reference, gathered, and, in `test_kernels_interpreter.py`, the Triton kernels) is held to
the plain-loop float64 reference of the group rule (`reference_uoe.py`) at sparse routing, with routing patches,
padding and the KV cache; at full routing the layer is the dense GQA layer (transformers' `LlamaAttention`).
"""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from uoe import UoEConfig
from uoe import gathered as gathered_module
from uoe.flops import estimate_flops_per_token
from uoe.modeling_uoe import RoutingInputs, UoESelectiveAttention

from .helpers import returned_cache, tiny_config, tiny_model
from .reference_uoe import reference_logits

# query heads of width 8 in groups of 2, 3 or 4
GQA_CASES = {
    "groups_of_2": dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8, attention_top_k=2),
    "groups_of_4_top1": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, attention_top_k=1),
    "patch3_weighted_sigmoid": dict(
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=8,
        attention_top_k=2,
        routing_patch_size=3,
        gate_mode="weighted",
        router_score_func="sigmoid",
    ),
    "bias_qk_norm_patch2": dict(
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        attention_top_k=2,
        attention_bias=True,
        qk_norm=True,
        routing_patch_size=2,
    ),
}
BACKENDS = ["masked", "gathered"]


def gqa_model(backend: str, seed: int = 0, **overrides):
    model = tiny_model(seed, routing_backend=backend, **overrides)
    with torch.no_grad():  # non-trivial biases and norm weights, so that a path that drops them fails
        for name, param in model.named_parameters():
            if name.endswith("bias") or "q_norm" in name or "k_norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    return model


@pytest.fixture(params=["grouped", "token_major"])
def decode_layout(request, monkeypatch):
    """Decode through the gathered path with grouped products and with token-major products (the two branches)."""
    monkeypatch.setattr(gathered_module, "TOKEN_MAJOR_MAX_WEIGHTS", 0 if request.param == "grouped" else 1 << 40)
    return request.param


# -- configuration ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [3, 0, 5, -2, 2.0])
def test_num_key_value_heads_must_divide_num_attention_heads(kv_heads):
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny_config(num_attention_heads=4, num_key_value_heads=kv_heads, attention_top_k=1)


def test_attention_top_k_counts_groups():
    with pytest.raises(ValueError, match=r"attention_top_k.*num_key_value_heads=2"):
        tiny_config(num_attention_heads=4, num_key_value_heads=2, attention_top_k=3)
    config = tiny_config(num_attention_heads=4, num_key_value_heads=2, attention_top_k=2, mlp_top_k=4)
    assert config.is_full_routing
    assert tiny_config().num_key_value_heads == 4  # default: multi-head attention, groups of one


def test_parameters_are_stacked_per_key_value_head():
    model = tiny_model(num_attention_heads=8, num_key_value_heads=2, head_dim=8, attention_top_k=1)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (64, 32) and attention.o_proj.weight.shape == (32, 64)
    assert attention.k_proj.weight.shape == attention.v_proj.weight.shape == (16, 32)
    assert attention.router.weight.shape == (2, 32)


# -- the group rule against the plain-loop reference -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides", GQA_CASES.values(), ids=GQA_CASES.keys())
def test_sparse_gqa_matches_plain_loop_reference(overrides, backend):
    model = gqa_model(backend, **overrides).double()
    input_ids = torch.randint(0, 61, (13,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        outputs = model(torch.tensor([input_ids]), output_router_logits=True)
    # the routing is sparse and differs between tokens, so the test sees the group rule
    chosen = outputs.router_logits[0][0].argmax(-1)
    assert len(set(chosen.tolist())) > 1
    expected = reference_logits(model, input_ids)
    assert float((outputs.logits[0] - expected).abs().max()) <= 1e-5


def test_reference_distinguishes_the_group_rule_from_per_head_routing():
    """The reference sees a group as one expert: perturbing a query head of the group the last token did not select
    leaves its logits unchanged, perturbing one of its selected group changes them (one layer, so that other
    tokens' outputs do not feed back)."""
    model = gqa_model("masked", num_hidden_layers=1, **GQA_CASES["groups_of_4_top1"]).double()
    input_ids = [5, 17, 3, 40, 22, 9, 31, 8, 44, 12]
    with torch.no_grad():
        base = reference_logits(model, input_ids)[-1]
        logits = model(torch.tensor([input_ids]), output_router_logits=True).router_logits[0][0]
        used = int(logits[-1].argmax())
        assert int((logits.argmax(-1) == used).sum()) > 1  # the last token attends more than itself
        q_proj = model.model.layers[0].self_attn.q_proj.weight
        unused_head, used_head = (1 - used) * 4 + 3, used * 4 + 3  # the last query head of each group
        q_proj[unused_head * 8 : (unused_head + 1) * 8] += 1.0
        unchanged = reference_logits(model, input_ids)[-1]
        q_proj[used_head * 8 : (used_head + 1) * 8] += 1.0
        changed = reference_logits(model, input_ids)[-1]
    assert float((unchanged - base).abs().max()) < 1e-12
    assert float((changed - base).abs().max()) > 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_matches_the_reference_per_sequence(padding_side, backend):
    model = gqa_model(backend, **GQA_CASES["bias_qk_norm_patch2"]).double()
    generator = torch.Generator().manual_seed(4)
    lengths = [11, 16, 7]
    sequences = [torch.randint(0, 61, (n,), generator=generator) for n in lengths]
    batch = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, seq in enumerate(sequences):
        where = slice(max(lengths) - len(seq), None) if padding_side == "left" else slice(0, len(seq))
        batch[i, where], mask[i, where] = seq, 1
    with torch.no_grad():
        logits = model(batch, attention_mask=mask).logits
    for i, seq in enumerate(sequences):
        expected = reference_logits(model, seq.tolist())
        assert float((logits[i][mask[i].bool()] - expected).abs().max()) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["groups_of_2", "patch3_weighted_sigmoid", "bias_qk_norm_patch2"])
def test_cached_decoding_matches_the_reference(case, backend, decode_layout):
    model = gqa_model(backend, **GQA_CASES[case]).double()
    input_ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        # prefill 4 tokens, a chunk of 3, then one token at a time
        out = model(input_ids[:, :4], use_cache=True)
        cache, pieces = returned_cache(out), [out.logits]
        pieces.append(model(input_ids[:, 4:7], cache=cache, use_cache=True).logits)
        for t in range(7, 12):
            pieces.append(model(input_ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    # the cache holds one key/value head per group and which tokens selected each group
    layer = cache.layers[0]
    assert layer.keys.shape == (2, model.config.num_key_value_heads, 12, 8)
    assert layer.routing["head_selected"].shape == (2, 12, model.config.num_key_value_heads)
    decoded = torch.cat(pieces, dim=1)
    for row in range(2):
        expected = reference_logits(model, input_ids[row].tolist())
        assert float((decoded[row] - expected).abs().max()) <= 1e-5


def test_a_cache_filled_by_one_path_decodes_the_same_with_the_other():
    model = gqa_model("gathered", **GQA_CASES["groups_of_2"]).double()
    input_ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(input_ids).logits
        out = model(input_ids[:, :6], use_cache=True)
        model.config.routing_backend = "masked"
        steps = [model(input_ids[:, t : t + 1], cache=returned_cache(out), use_cache=True).logits for t in range(6, 10)]
    assert float((torch.cat(steps, 1) - full[:, 6:]).abs().max()) <= 1e-10


@pytest.mark.parametrize("case", ["groups_of_4_top1", "bias_qk_norm_patch2"])
def test_gathered_gradients_equal_the_masked_reference(case):
    from .test_gathered import assert_paths_agree

    model = gqa_model("masked", **GQA_CASES[case]).train()
    input_ids = torch.randint(0, 61, (3, 13), generator=torch.Generator().manual_seed(7))
    assert_paths_agree(model, input_ids=input_ids, labels=input_ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_rows_equal_their_sequences_run_alone(backend):
    model = gqa_model(backend, **GQA_CASES["groups_of_2"])
    generator = torch.Generator().manual_seed(8)
    parts = [torch.randint(0, 61, (n,), generator=generator) for n in (5, 9, 4)]
    position_ids = torch.cat([torch.arange(len(p)) for p in parts])[None]
    with torch.no_grad():
        packed = model(torch.cat(parts)[None], position_ids=position_ids).logits[0]
        alone = torch.cat([model(p[None]).logits[0] for p in parts])
    assert float((packed - alone).abs().max() / alone.abs().max()) <= 1e-5


# -- full routing: the dense GQA layer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_full_routing_equals_llama_gqa_attention(backend, attn_implementation):
    torch.manual_seed(0)
    llama_config = LlamaConfig(
        hidden_size=32, num_attention_heads=8, num_key_value_heads=2, head_dim=8, attention_bias=True
    )
    llama_config._attn_implementation = attn_implementation
    dense = LlamaAttention(llama_config, layer_idx=0).eval()
    config = UoEConfig(
        hidden_size=32,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        attention_top_k=2,
        attention_bias=True,
        routing_backend=backend,
    )
    config._attn_implementation = attn_implementation
    attention = UoESelectiveAttention(config, layer_idx=0).eval()
    missing, unexpected = attention.load_state_dict(dense.state_dict(), strict=False)
    assert missing == ["router.weight"] and not unexpected
    torch.nn.init.normal_(attention.router.weight)
    hidden = torch.randn(2, 40, 32)  # long enough for "auto" not to matter; the backend is explicit anyway
    position_embeddings = LlamaRotaryEmbedding(llama_config)(hidden, torch.arange(40)[None])
    mask = torch.full((40, 40), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        expected = dense(hidden, position_embeddings, attention_mask=mask)[0]
        actual = attention(hidden, position_embeddings, RoutingInputs(source_index=None, token_mask=None))[0]
    assert float((actual - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_flops_count_key_value_heads_and_groups():
    mha = tiny_config(num_attention_heads=8, head_dim=8, attention_top_k=2)
    gqa = tiny_config(num_attention_heads=8, num_key_value_heads=2, head_dim=8, attention_top_k=1)
    seq = 64
    mha_flops, gqa_flops = estimate_flops_per_token(mha, seq), estimate_flops_per_token(gqa, seq)
    layers, hidden, width = 2, 32, 64
    # dense: q and o over 8 heads, k and v over 2 key/value heads
    assert gqa_flops.dense - mha_flops.dense == layers * 2 * 2 * hidden * 8 * (2 - 8)
    # half of the groups selected: half of every projection, and a query meets half of the keys
    assert gqa_flops.breakdown["attention_projections"] == layers * 2 * hidden * (2 * width + 2 * 16) * 0.5
    assert gqa_flops.breakdown["attention_scores"] == layers * 2 * 2 * width * (seq + 1) / 2 * 0.25
    assert gqa_flops.breakdown["routers"] == layers * 2 * hidden * (2 + 4)
