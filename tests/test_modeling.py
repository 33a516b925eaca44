"""Numerical invariants of UoEForCausalLM: dense equivalence, the spec's routing rules, causality,
batch independence, cache exactness, gradients, and input validation."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from uoe import UoEForCausalLM

from .helpers import BOTH_CACHE_NAMES, enable_checkpointing, returned_cache, tiny_model
from .reference_uoe import reference_logits
from .test_routing import switch_loss_by_hand, z_loss_by_hand


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


# -- 1. dense equivalence -------------------------------------------------------------------------

LLAMA_SIZES = [
    dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2),
    dict(hidden_size=48, num_attention_heads=6, intermediate_size=96, num_hidden_layers=3),
    dict(
        hidden_size=64,
        num_attention_heads=8,
        head_dim=16,
        intermediate_size=160,
        num_hidden_layers=2,
        tie_word_embeddings=True,
    ),
]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("size", LLAMA_SIZES, ids=["h32", "h48", "h64-tied"])
def test_full_routing_equals_llama(size, attn_implementation):
    torch.manual_seed(0)
    llama_config = LlamaConfig(vocab_size=97, max_position_embeddings=64, **size)
    llama_config.num_key_value_heads = llama_config.num_attention_heads
    llama = LlamaForCausalLM(llama_config).eval()
    model = UoEForCausalLM.from_dense(llama).eval()
    model.set_attn_implementation(attn_implementation)
    assert model.config.is_full_routing
    input_ids = torch.randint(0, 97, (3, 19))
    with torch.no_grad():
        expected = llama(input_ids).logits
        actual = model(input_ids).logits
    assert max_rel_error(actual, expected) <= 1e-5


def test_from_dense_sparsified_is_not_dense():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=64,
            num_hidden_layers=1,
        )
    ).eval()
    sparse = UoEForCausalLM.from_dense(llama, attention_top_k=2, num_mlp_experts=4, mlp_top_k=1).eval()
    assert (sparse.config.attention_top_k, sparse.config.mlp_top_k) == (2, 1)
    input_ids = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        assert max_rel_error(sparse(input_ids).logits, llama(input_ids).logits) > 1e-3


# -- the spec's routing rules, against an independent plain-loop reference --------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(routing_patch_size=4),
        dict(routing_patch_size=3, gate_mode="weighted", router_score_func="sigmoid"),
        dict(attention_top_k=1, mlp_top_k=3, routing_patch_size=2),
        dict(attention_top_k=1, mlp_top_k=1, gate_mode="weighted"),
    ],
    ids=["per-token", "patch4", "patch3-weighted-sigmoid", "top1-heads", "top1-weighted"],
)
def test_sparse_model_matches_plain_loop_reference(overrides):
    model = tiny_model(**overrides).double()
    input_ids = torch.randint(0, 61, (13,)).tolist()
    with torch.no_grad():
        actual = model(torch.tensor([input_ids])).logits[0]
    expected = reference_logits(model, input_ids)
    # float64 throughout except RoPE angles and router scores, which the model keeps in float32
    assert float((actual - expected).abs().max()) <= 1e-5


def test_tokens_of_a_patch_share_the_routing_decision():
    model = tiny_model(routing_patch_size=4)
    input_ids = torch.randint(0, 61, (1, 12))
    with torch.no_grad():
        outputs = model(input_ids, output_router_logits=True)
    assert len(outputs.router_logits) == 2 * model.config.num_hidden_layers
    for logits in outputs.router_logits:
        patches = logits[0].view(3, 4, -1)
        assert torch.equal(patches, patches[:, :1].expand_as(patches))
        assert not torch.equal(patches[0, 0], patches[1, 0])


# -- 2. causality ----------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_size", [1, 4])
def test_changing_later_tokens_leaves_earlier_logits_unchanged(patch_size):
    model = tiny_model(routing_patch_size=patch_size)
    torch.manual_seed(1)
    input_ids = torch.randint(0, 61, (2, 16))
    with torch.no_grad():
        base = model(input_ids).logits
        for t in (0, 5, 9, 14):
            changed = input_ids.clone()
            changed[:, t + 1 :] = torch.randint(0, 61, changed[:, t + 1 :].shape)
            logits = model(changed).logits
            # 1e-5, not exact: later tokens change the gathered path's list lengths and so its float rounding
            torch.testing.assert_close(logits[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)
            assert (logits[:, t + 1 :] - base[:, t + 1 :]).abs().max() > 1e-3  # the test can see a change


# -- 3. batch independence -------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("patch_size", [1, 4])
def test_sequence_logits_alone_equal_logits_in_padded_batch(padding_side, patch_size):
    model = tiny_model(routing_patch_size=patch_size)
    torch.manual_seed(2)
    lengths = [11, 16, 7]
    sequences = [torch.randint(0, 61, (n,)) for n in lengths]
    batch = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, seq in enumerate(sequences):
        where = slice(max(lengths) - len(seq), None) if padding_side == "left" else slice(0, len(seq))
        batch[i, where], mask[i, where] = seq, 1
    with torch.no_grad():
        batched = model(batch, attention_mask=mask).logits
        for i, seq in enumerate(sequences):
            alone = model(seq[None]).logits[0]
            in_batch = batched[i][mask[i].bool()]
            torch.testing.assert_close(in_batch, alone, rtol=0, atol=1e-5)


def test_padding_tokens_do_not_count_in_router_losses():
    model = tiny_model()
    input_ids = torch.randint(0, 61, (1, 10))
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), input_ids], dim=1)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model(input_ids, output_router_logits=True)
        batched = model(padded, attention_mask=mask, output_router_logits=True)
    torch.testing.assert_close(batched.aux_loss, alone.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched.router_z_loss, alone.router_z_loss, rtol=1e-5, atol=1e-6)


# -- 4. KV cache -----------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("patch_size", [1, 3])
def test_incremental_decoding_equals_full_forward(patch_size, attn_implementation):
    model = tiny_model(routing_patch_size=patch_size)
    model.set_attn_implementation(attn_implementation)
    input_ids = torch.randint(0, 61, (2, 14))
    with torch.no_grad():
        full = model(input_ids).logits
        # prefill 4 tokens, a chunk of 3, then one token at a time
        out = model(input_ids[:, :4], use_cache=True)
        cache, pieces = returned_cache(out), [out.logits]
        out = model(input_ids[:, 4:7], cache=cache, use_cache=True)
        pieces.append(out.logits)
        for t in range(7, 14):
            pieces.append(model(input_ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-4)


def test_full_routing_cache_uses_the_same_path():
    model = tiny_model(attention_top_k=4, mlp_top_k=4)
    input_ids = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        full = model(input_ids).logits
        out = model(input_ids[:, :5], use_cache=True)
        steps = [out.logits] + [
            model(input_ids[:, t : t + 1], cache=returned_cache(out), use_cache=True).logits for t in range(5, 9)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("patch_size", [1, 4])
def test_greedy_generate_same_with_and_without_cache(patch_size):
    model = tiny_model(routing_patch_size=patch_size)
    prompt = torch.randint(0, 61, (2, 6))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without_cache = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 18)
    assert torch.equal(with_cache, without_cache)


def test_left_padded_cached_generation_logits_equal_each_sequence_alone_without_cache():
    """Batched greedy generation with left padding and the cache: every step's logits equal, within 1e-4, those
    of a full forward pass without cache of that sequence alone (prompt + generated tokens), and so do the tokens
    of one-by-one generation."""
    model = tiny_model(routing_patch_size=2)
    torch.manual_seed(3)
    prompts = [torch.randint(1, 61, (n,)) for n in (3, 8, 5)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, prompt in enumerate(prompts):
        batch[i, width - len(prompt) :], mask[i, width - len(prompt) :] = prompt, 1
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    batched = model.generate(batch, attention_mask=mask, use_cache=True, output_logits=True, **kwargs)
    step_logits = torch.stack(batched.logits, dim=1)  # (batch, 8, vocab)
    for i, prompt in enumerate(prompts):
        generated = batched.sequences[i, width:]
        with torch.no_grad():
            alone = model(torch.cat([prompt, generated])[None], use_cache=False).logits[0]
        expected = alone[len(prompt) - 1 : len(prompt) - 1 + 8]
        torch.testing.assert_close(step_logits[i], expected, rtol=0, atol=1e-4)
        single = model.generate(prompt[None], **kwargs).sequences
        assert torch.equal(generated, single[0, len(prompt) :])


def test_beam_search_scores_equal_a_full_forward_of_the_returned_beams():
    """Beam search with the routing cache: every returned beam's `sequences_scores` is the sum of its generated
    tokens' log-probabilities under a full forward pass without cache, divided by `generated_length **
    length_penalty`; and the masked path without cache returns the same beams."""
    model = tiny_model(routing_patch_size=2)
    torch.manual_seed(5)
    prompt = torch.randint(1, 61, (2, 5))
    kwargs = dict(
        max_new_tokens=6,
        num_beams=3,
        num_return_sequences=3,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,  # every beam runs the full 6 tokens
        length_penalty=0.5,
        return_dict_in_generate=True,
        output_scores=True,
    )
    out = model.generate(prompt, use_cache=True, **kwargs)
    assert out.sequences.shape == (6, 11)
    assert torch.equal(out.sequences[:, :5], prompt.repeat_interleave(3, 0))
    with torch.no_grad():
        log_probs = model(out.sequences, use_cache=False).logits.log_softmax(-1)
    generated = out.sequences[:, 5:]
    total = log_probs[:, 4:-1].gather(-1, generated[..., None])[..., 0].sum(-1)
    torch.testing.assert_close(out.sequences_scores, total / 6**0.5, rtol=0, atol=1e-4)
    scores = out.sequences_scores.view(2, 3)
    assert torch.equal(scores, scores.sort(dim=-1, descending=True).values)  # best beam first
    assert len({tuple(row) for row in generated.tolist()}) == 6  # distinct beams

    masked = tiny_model(routing_patch_size=2, routing_backend="masked")
    reference = masked.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(reference.sequences, out.sequences)
    torch.testing.assert_close(reference.sequences_scores, out.sequences_scores, rtol=0, atol=1e-4)


# -- gradients and training modes ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["masked", "gathered"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("gate_mode", ["union", "weighted"])
def test_router_gradients_equal_plain_loop_reference(gate_mode, top_k, backend):
    """The routers' task gradient (router losses off) equals float64 autograd through the plain-loop reference,
    whose gates are written out per (token, expert): the straight-through `1 + s - stop_grad(s)` in union mode,
    the renormalised scores at top-k > 1 and the raw score at top-1 in weighted mode. Both routers of every layer.
    """
    model = tiny_model(
        gate_mode=gate_mode,
        attention_top_k=top_k,
        mlp_top_k=top_k,
        router_aux_loss_coef=0.0,
        router_z_loss_coef=0.0,
        routing_backend=backend,
    ).double()
    model.train()
    input_ids = torch.randint(0, 61, (13,)).tolist()
    ids = torch.tensor([input_ids])
    model(ids, labels=ids).loss.backward()

    names = [n for n, _ in model.named_parameters() if ".router." in n]
    assert len(names) == 2 * model.config.num_hidden_layers
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if n in names}
    logits = reference_logits(model, input_ids, router_weights=leaves)
    loss = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(input_ids[1:]))
    expected = torch.autograd.grad(loss, list(leaves.values()))
    params = dict(model.named_parameters())
    for name, grad in zip(names, expected, strict=True):
        assert grad.abs().max() > 1e-4, name  # a router cut off from the task gradient would show as ~0 here
        # the model keeps router scores in float32, hence 1e-5 rather than float64 precision
        assert max_rel_error(params[name].grad, grad) <= 1e-5, name


@pytest.mark.parametrize("backend", ["masked", "gathered"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("gate_mode", ["union", "weighted"])
@pytest.mark.parametrize("block", ["self_attn", "mlp"])
def test_router_gradient_equals_chain_rule_through_free_gate_leaves(block, gate_mode, top_k, backend, monkeypatch):
    """One routed block on a fixed input: the router's gradient equals dL/dgate, taken with every gate replaced by
    a free leaf of the same value, pushed through what the gate is as a function of the scores: the score itself
    in union mode (straight through) and at weighted top-1, `s / sum(top-k s)` at weighted top-k > 1."""
    from uoe import modeling_uoe
    from uoe.modeling_uoe import RoutingInputs

    model = tiny_model(gate_mode=gate_mode, attention_top_k=top_k, mlp_top_k=top_k, routing_backend=backend).double()
    module = getattr(model.model.layers[0], block)
    torch.manual_seed(6)
    hidden = torch.randn(2, 9, 32, dtype=torch.float64)
    weights = torch.randn(2, 9, 32, dtype=torch.float64)
    routing = RoutingInputs(source_index=None, token_mask=None, segment_ids=None, router_losses=False)
    rotary = model.model.rotary_emb(hidden, position_ids=torch.arange(9)[None])

    def block_loss() -> torch.Tensor:
        out = module(hidden, rotary, routing)[0] if block == "self_attn" else module(hidden, routing)[0]
        return (out * weights).sum()

    block_loss().backward()
    actual = module.router.weight.grad.clone()

    recorded = []
    real_select = modeling_uoe.select_top_k

    def select_with_free_gates(scores, k, mode):
        index, gates = real_select(scores, k, mode)
        leaf = gates.detach().clone().requires_grad_(True)
        recorded.append((scores, index, leaf))
        return index, leaf

    monkeypatch.setattr(modeling_uoe, "select_top_k", select_with_free_gates)
    block_loss().backward()
    ((scores, index, leaf),) = recorded
    chosen = scores.gather(-1, index)
    as_function = chosen if gate_mode == "union" or top_k == 1 else chosen / chosen.sum(-1, keepdim=True)
    if gate_mode == "weighted":
        torch.testing.assert_close(leaf.detach(), as_function.detach(), rtol=0, atol=0)  # the gate values
    (expected,) = torch.autograd.grad(as_function, module.router.weight, leaf.grad)
    assert expected.abs().max() > 1e-4
    assert max_rel_error(actual, expected) <= 1e-6


def test_union_gates_do_not_scale_outputs():
    """In union mode the router's scores only enter the gradient: scaling the router weights (which
    keeps the top-k choice) must leave the logits bit-for-bit unchanged."""
    model = tiny_model()
    input_ids = torch.randint(0, 61, (1, 10))
    with torch.no_grad():
        before = model(input_ids).logits
        for layer in model.model.layers:
            layer.self_attn.router.weight.mul_(3.0)
            layer.mlp.router.weight.mul_(3.0)
        after = model(input_ids).logits
    assert torch.equal(before, after)
    weighted = tiny_model(gate_mode="weighted")
    with torch.no_grad():
        before = weighted(input_ids).logits
        for layer in weighted.model.layers:
            layer.mlp.router.weight.mul_(3.0)
        assert not torch.allclose(weighted(input_ids).logits, before)


def test_loss_includes_router_losses_with_their_coefficients():
    model = tiny_model(router_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    input_ids = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        out = model(input_ids, labels=input_ids)
        plain = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 61), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, plain + 0.5 * out.aux_loss + 0.25 * out.router_z_loss)
    assert float(out.aux_loss) > 0.5 and float(out.router_z_loss) > 0.5  # both terms really enter `loss`


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_router_losses_equal_plain_loop_over_the_router_logits(score_func):
    """`aux_loss` / `router_z_loss` are the means over the routed blocks of the Switch loss and the z-loss of each
    block's router logits, padding excluded; recomputed here by plain loops from the returned `router_logits`."""
    model = tiny_model(router_score_func=score_func)
    torch.manual_seed(4)
    input_ids = torch.randint(0, 61, (3, 9))
    mask = torch.ones_like(input_ids)
    mask[0, :4] = 0
    mask[2, 7:] = 0
    with torch.no_grad():
        out = model(input_ids, attention_mask=mask, labels=input_ids, output_router_logits=True)
    mask_rows = mask.bool().tolist()
    balance, z = [], []
    for logits, top_k in zip(out.router_logits, [2, 2] * model.config.num_hidden_layers, strict=True):
        logits = logits.double()
        scores = torch.softmax(logits, -1) if score_func == "softmax" else torch.sigmoid(logits)
        top_index = torch.argsort(scores, dim=-1, descending=True)[..., :top_k]
        balance.append(switch_loss_by_hand(scores, top_index, mask_rows))
        z.append(z_loss_by_hand(logits, mask_rows))
    assert float(out.aux_loss) == pytest.approx(sum(balance) / len(balance), rel=1e-5)
    assert float(out.router_z_loss) == pytest.approx(sum(z) / len(z), rel=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    input_ids = torch.randint(0, 61, (2, 12))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            enable_checkpointing(model)
        model(input_ids, labels=input_ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_sdpa_and_eager_agree_at_sparse_routing():
    model = tiny_model(routing_patch_size=2)
    input_ids = torch.randint(0, 61, (2, 15))
    mask = torch.ones_like(input_ids)
    mask[0, :4] = 0
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(input_ids, attention_mask=mask).logits
        model.set_attn_implementation("sdpa")
        sdpa = model(input_ids, attention_mask=mask).logits
    torch.testing.assert_close(sdpa, eager, rtol=1e-5, atol=1e-5)


def test_router_losses_are_computed_only_when_asked():
    model = tiny_model()
    input_ids = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        plain = model(input_ids)
        with_labels = model(input_ids, labels=input_ids)
        with_logits = model(input_ids, output_router_logits=True)
    assert plain.aux_loss is None and plain.router_z_loss is None  # inference, e.g. generate
    assert torch.equal(with_labels.aux_loss, with_logits.aux_loss)
    assert torch.equal(with_labels.router_z_loss, with_logits.router_z_loss)
    model.train()
    assert model(input_ids).aux_loss is not None


def test_outputs_hidden_states_attentions_and_router_logits():
    model = tiny_model()
    model.set_attn_implementation("eager")
    input_ids = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True, output_attentions=True, output_router_logits=True)
    layers = model.config.num_hidden_layers
    assert len(out.hidden_states) == layers + 1 and len(out.attentions) == layers
    assert [t.shape[-1] for t in out.router_logits] == [4, 4] * layers
    assert out.attentions[0].shape == (2, 4, 7, 7)
    assert torch.equal(out.attentions[0].triu(1), torch.zeros_like(out.attentions[0]))  # causal


def test_grouped_mm_experts_backend_matches_reference():
    model = tiny_model(hidden_size=64, intermediate_size=128)
    input_ids = torch.randint(0, 61, (2, 8))
    with torch.no_grad():
        expected = model(input_ids).logits
        model.set_experts_implementation("grouped_mm")
        actual = model(input_ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_torch_compile_fullgraph_training_step_matches_eager():
    """The masked path compiles as one graph (`fullgraph=True`: no graph break, no host read) with its backward;
    loss and every gradient match eager within 1e-5 relative. `aot_eager` traces forward and backward as Inductor
    would but skips code generation, which keeps the test fast; the gathered path is compiled with Inductor in
    `test_gathered.py`."""
    # one layer keeps tracing short; the graph is the same for every layer
    eager = tiny_model(routing_patch_size=2, routing_backend="masked", num_hidden_layers=1).train()
    compiled_model = tiny_model(routing_patch_size=2, routing_backend="masked", num_hidden_layers=1).train()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    input_ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(15))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    losses = []
    for run in (eager, compiled):
        out = run(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        out.loss.backward()
        losses.append((out.loss.detach(), out.logits.detach()))
    assert max_rel_error(losses[1][0], losses[0][0]) <= 1e-5
    assert max_rel_error(losses[1][1], losses[0][1]) <= 1e-5
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        assert p.grad is not None and max_rel_error(q.grad, p.grad) <= 1e-5, name


# -- 7. bad input ----------------------------------------------------------------------------------


def test_token_ids_outside_vocabulary_raise():
    model = tiny_model()
    for bad in (61, -1):
        input_ids = torch.tensor([[1, 2, bad]])
        with pytest.raises(ValueError, match="input_ids"):
            model(input_ids)


def test_malformed_attention_mask_and_foreign_cache_raise():
    from transformers import DynamicCache, StaticCache

    model = tiny_model()
    input_ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids, attention_mask=torch.ones(2, 4))
    foreign_static = StaticCache(config=model.config, max_cache_len=8)  # filled by another model
    foreign_static.update(torch.zeros(2, 4, 3, 8), torch.zeros(2, 4, 3, 8), 0)
    with pytest.raises(ValueError, match="`cache`.*without UoE routing state"):
        model(input_ids, cache=foreign_static)
    foreign = DynamicCache()
    foreign.update(torch.zeros(2, 4, 3, 8), torch.zeros(2, 4, 3, 8), 0)
    with pytest.raises(ValueError, match="`cache`.*without UoE routing state"):
        model(input_ids, cache=foreign)
    with pytest.raises(ValueError, match=BOTH_CACHE_NAMES):
        model(input_ids, cache=DynamicCache(), past_key_values=DynamicCache())


def test_past_key_values_is_accepted_as_the_older_name_of_cache():
    """transformers < 5.24 passes the KV cache as `past_key_values`; both names give the same decoding."""
    model = tiny_model()
    input_ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        full = model(input_ids).logits
        for name in ("cache", "past_key_values"):
            out = model(input_ids[:, :6], use_cache=True)
            step = model(input_ids[:, 6:], use_cache=True, **{name: returned_cache(out)})
            torch.testing.assert_close(torch.cat([out.logits, step.logits], dim=1), full, rtol=0, atol=1e-4)
