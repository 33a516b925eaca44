"""The static cache (`StaticCache`, `cache_implementation="static"`): fixed-size buffers for keys, values and the
routing state, so that a decode step has one shape, compiles once and reads nothing back from the device.

Every comparison is against an independent reference: the dynamic cache's generation, or a full forward of the
whole sequence without a cache (1e-4 in float32)."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

import uoe
from uoe.cache_uoe import UoEStaticCacheLayer

from .helpers import returned_cache, tiny_model
from .test_inputs import HostReads

BACKENDS = ["masked", "gathered"]
PROMPT, NEW, SLOTS = 36, 6, 48  # the prompt crosses the "auto" threshold of 32 keys


def prompt() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded prompts of 36 tokens (the second one has 5 padding tokens)."""
    ids = torch.randint(1, 61, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    return ids, mask


def model_on(backend: str, **overrides) -> uoe.UoEForCausalLM:
    return tiny_model(routing_backend=backend, pad_token_id=0, **overrides)


def full_logits(model, sequences: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    new = torch.ones(2, sequences.shape[1] - PROMPT, dtype=prompt_mask.dtype, device=prompt_mask.device)
    mask = torch.cat([prompt_mask, new], 1)
    with torch.no_grad():
        return model(sequences, attention_mask=mask, use_cache=False).logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "mode",
    [
        dict(do_sample=False),
        dict(do_sample=True, top_k=10),
        dict(do_sample=False, num_beams=3, num_return_sequences=2),
    ],
    ids=["greedy", "sampled", "beam"],
)
def test_generation_with_the_static_cache_equals_the_dynamic_one(backend, mode):
    model = model_on(backend)
    ids, mask = prompt()
    outputs = {}
    for cache_implementation in ("dynamic", "static"):
        torch.manual_seed(1)
        with torch.no_grad():
            outputs[cache_implementation] = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=NEW,
                cache_implementation=cache_implementation,
                output_logits=True,
                return_dict_in_generate=True,
                **mode,
            )
    assert torch.equal(outputs["static"].sequences, outputs["dynamic"].sequences)
    if mode.get("num_beams", 1) == 1:
        # every step's logits are the full forward's at that position
        logits = full_logits(model, outputs["static"].sequences, mask)
        for step, step_logits in enumerate(outputs["static"].logits):
            torch.testing.assert_close(step_logits, logits[:, PROMPT - 1 + step], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_assisted_generation_with_the_static_cache_equals_greedy(backend):
    """Assisted decoding crops the cache after rejected candidates (negative counts) and decodes several tokens at
    once: with the static cache it gives plain greedy decoding's tokens."""
    model = model_on(backend)
    assistant = tiny_model(seed=3, routing_backend=backend, pad_token_id=0)
    ids, mask = prompt()
    ids, mask = ids[:1], mask[:1]  # transformers' assisted decoding takes one sequence
    with torch.no_grad():
        greedy = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
        assisted = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=NEW,
            do_sample=False,
            assistant_model=assistant,
            cache_implementation="static",
        )
    assert torch.equal(assisted, greedy)


def decode_with_static_cache(model, ids, mask, steps, forward=None):
    """Prefill with a `StaticCache` of `SLOTS` slots, then `steps` greedy steps with the full-length mask; returns the
    tokens, each step's last logits and the cache."""
    forward = forward or model
    cache = StaticCache(config=model.config, max_cache_len=SLOTS)
    slot_mask = torch.zeros(ids.shape[0], SLOTS, dtype=torch.long, device=ids.device)
    slot_mask[:, :PROMPT] = mask
    with torch.no_grad():
        out = model(ids, attention_mask=mask, cache=cache, use_cache=True)
        tokens, logits = [out.logits[:, -1:].argmax(-1)], [out.logits[:, -1]]
        for step in range(steps):
            slot_mask[:, PROMPT + step] = 1
            out = forward(input_ids=tokens[-1], attention_mask=slot_mask, cache=cache, use_cache=True)
            tokens.append(out.logits[:, -1:].argmax(-1))
            logits.append(out.logits[:, -1])
    return torch.cat([ids, *tokens[:-1]], 1), logits, cache


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_cache_layers_are_static_buffers(backend):
    model = model_on(backend)
    ids, mask = prompt()
    _, _, cache = decode_with_static_cache(model, ids, mask, 2)
    layer = cache.layers[0]
    assert isinstance(layer, UoEStaticCacheLayer)
    assert layer.keys.shape[2] == SLOTS and layer.routing["head_selected"].shape[1] == SLOTS
    assert int(layer.get_seq_length()) == PROMPT + 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compiled_decode_step_is_one_graph_for_every_length(backend):
    """`torch.compile(fullgraph=True)` of the forward with a static cache: no graph break, no recompilation as the
    cache fills (transformers' `test_static_cache_no_recompile` rule), and the eager step's logits."""
    import torch._dynamo

    model = model_on(backend)
    ids, mask = prompt()
    sequences, eager_logits, _ = decode_with_static_cache(model, ids, mask, 4)
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled_sequences, compiled_logits, _ = decode_with_static_cache(model, ids, mask, 4, forward=compiled)
    assert torch.equal(compiled_sequences, sequences)
    for compiled_step, eager_step in zip(compiled_logits, eager_logits, strict=True):
        torch.testing.assert_close(compiled_step, eager_step, rtol=1e-5, atol=1e-5)
    reference = full_logits(model, sequences, mask)
    torch.testing.assert_close(eager_logits[-1], reference[:, -1], rtol=1e-4, atol=1e-4)


def test_generate_compiles_the_decode_step_by_itself_with_the_static_cache():
    """`generate(cache_implementation="static")` compiles the decode step on its own (transformers'
    `test_generate_compile_model_forward` rule, forced on CPU with `_compile_all_devices`), in one graph, and gives the eager dynamic
    cache's tokens and scores; the dynamic cache is not compiled."""
    from transformers import CompileConfig

    torch.compiler.reset()
    model = model_on("auto")
    model.generation_config.compile_config = CompileConfig(fullgraph=True, backend="aot_eager")
    model.generation_config.compile_config._compile_all_devices = True
    ids, mask = prompt()
    options = dict(do_sample=False, max_new_tokens=NEW, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        dynamic = model.generate(ids, attention_mask=mask, **options)
        assert not hasattr(model, "_compiled_call")
        static = model.generate(ids, attention_mask=mask, cache_implementation="static", **options)
    assert hasattr(model, "_compiled_call")
    assert isinstance(returned_cache(static), StaticCache) and returned_cache(static).is_compileable
    assert torch.equal(static.sequences, dynamic.sequences)
    for static_scores, dynamic_scores in zip(static.scores, dynamic.scores, strict=True):
        torch.testing.assert_close(static_scores, dynamic_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
def test_a_decode_step_reads_the_device_once(backend, cache_kind, monkeypatch):
    """An eager decode step reads back only what the input check reads (one `tolist`), on every path and with either
    cache: lengths, positions and masks stay on the device (the dynamic cache knows its length from its shapes)."""
    model = model_on(backend)
    ids, mask = prompt()
    if cache_kind == "static":
        cache = StaticCache(config=model.config, max_cache_len=SLOTS)
        step_mask = torch.zeros(2, SLOTS, dtype=torch.long)
        step_mask[:, : PROMPT + 1] = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    else:
        cache = DynamicCache()
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache, use_cache=True)
        reads = HostReads(monkeypatch)
        model(input_ids=ids[:, -1:], attention_mask=step_mask, cache=cache, use_cache=True)
    assert reads.count == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("surgery", ["crop", "reorder", "repeat", "select"])
def test_cache_surgery_then_decoding_equals_a_full_forward(backend, surgery):
    """After each operation `generate` performs on a cache (assisted decoding's negative crop, beam search's
    reorder, batch expansion and selection), decoding one more token gives the full forward's logits of the
    surviving tokens."""
    model = model_on(backend)
    ids, mask = prompt()
    sequences, _, cache = decode_with_static_cache(model, ids, mask, 3)  # 3 decoded tokens are in the cache
    kept_mask = torch.cat([mask, torch.ones(2, sequences.shape[1] - PROMPT, dtype=mask.dtype)], 1)
    if surgery == "crop":
        cache.crop(-2)
        sequences, kept_mask = sequences[:, :-2], kept_mask[:, :-2]
    elif surgery == "reorder":
        order = torch.tensor([1, 0])
        cache.reorder_cache(order)
        sequences, kept_mask = sequences[order], kept_mask[order]
    elif surgery == "repeat":
        cache.batch_repeat_interleave(2)
        sequences, kept_mask = sequences.repeat_interleave(2, 0), kept_mask.repeat_interleave(2, 0)
    else:
        keep = torch.tensor([1])
        cache.batch_select_indices(keep)
        sequences, kept_mask = sequences[keep], kept_mask[keep]
    batch, length = sequences.shape
    next_token = torch.randint(1, 61, (batch, 1), generator=torch.Generator().manual_seed(9))
    slot_mask = torch.zeros(batch, SLOTS, dtype=torch.long)
    slot_mask[:, :length] = kept_mask
    slot_mask[:, length] = 1
    with torch.no_grad():
        step = model(next_token, attention_mask=slot_mask, cache=cache, use_cache=True).logits[:, -1]
        full = model(
            torch.cat([sequences, next_token], 1), attention_mask=slot_mask[:, : length + 1], use_cache=False
        ).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_a_mask_of_cached_and_new_tokens_is_accepted_and_other_shapes_refused():
    model = model_on("gathered")
    ids, mask = prompt()
    cache = StaticCache(config=model.config, max_cache_len=SLOTS)
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache, use_cache=True)  # cached + new = the prompt
        short = torch.ones(2, PROMPT + 1, dtype=torch.long)
        short[:, :PROMPT] = mask
        logits = model(ids[:, -1:], attention_mask=short, cache=cache, use_cache=True).logits
        assert torch.isfinite(logits).all()
        with pytest.raises(ValueError, match="attention_mask.*max_cache_len"):
            model(ids[:, -1:], attention_mask=torch.ones(2, 7, dtype=torch.long), cache=cache, use_cache=True)


def test_caches_other_than_dynamic_and_static_are_refused():
    from transformers import QuantizedCache

    model = model_on("gathered")
    with pytest.raises(ValueError, match="DynamicCache` or a `StaticCache"):
        model(torch.ones(1, 3, dtype=torch.long), cache=QuantizedCache(backend="quanto", config=model.config))


# -- on a GPU (scripts/gpu_check.sh) ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "gathered", "masked"])
def test_gpu_static_cache_generation_equals_the_dynamic_one(backend):
    """On CUDA ("auto" is the Triton kernels there): greedy tokens with the static cache equal the dynamic cache's,
    and each step's logits the full forward's (float32, 1e-3: the kernels' accumulation order differs)."""
    model = model_on(backend).cuda()
    ids, mask = (t.cuda() for t in prompt())
    outputs = {}
    for cache_implementation in ("dynamic", "static"):
        with torch.no_grad():
            outputs[cache_implementation] = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=NEW,
                do_sample=False,
                cache_implementation=cache_implementation,
                output_logits=True,
                return_dict_in_generate=True,
            )
    assert torch.equal(outputs["static"].sequences, outputs["dynamic"].sequences)
    logits = full_logits(model, outputs["static"].sequences, mask)
    for step, step_logits in enumerate(outputs["static"].logits):
        torch.testing.assert_close(step_logits, logits[:, PROMPT - 1 + step], rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "gathered"])
def test_gpu_decode_step_in_a_cuda_graph_equals_eager(backend):
    """`torch.compile(mode="reduce-overhead")` (CUDA graphs) of the static-cache decode step: eager's tokens and
    logits (1e-3), one graph for every length."""
    import torch._dynamo

    model = model_on(backend).cuda()
    ids, mask = (t.cuda() for t in prompt())
    sequences, eager_logits, _ = decode_with_static_cache(model, ids, mask, 4)
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, fullgraph=True, mode="reduce-overhead")
    with torch._dynamo.config.patch(error_on_recompile=True):
        graph_sequences, graph_logits, _ = decode_with_static_cache(model, ids, mask, 4, forward=compiled)
    assert torch.equal(graph_sequences, sequences)
    for graph_step, eager_step in zip(graph_logits, eager_logits, strict=True):
        torch.testing.assert_close(graph_step, eager_step, rtol=1e-3, atol=1e-3)
