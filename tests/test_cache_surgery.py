"""Cache surgery: the `Cache` methods transformers' generation utilities call between forward passes (`crop` in
assisted generation, `reorder_cache` in beam search, `batch_repeat_interleave` and `batch_select_indices` when
expanding or pruning a batch) must treat UoE's routing state (which groups each cached token selected, the router
logits a routing patch continues with) exactly like the keys and values. Each test performs one operation on a filled
cache and then decodes: the logits must equal a full forward pass, without cache, of the tokens that survived plus the
new ones (1e-4, float32).

Every cache class the model accepts is covered: `DynamicCache` built empty, built from the config, and offloading.
The model has everything that keeps routing state: routing patches of 3 (a decode step inside a patch reuses the
cached router logits), grouped-query attention (per-group selections), a Chain-of-Experts of 2 (a second MLP router's
state) and 2 distinct layers applied twice (cache slots per application).
"""

import pytest
import torch
from transformers import DynamicCache

from .helpers import returned_cache, tiny_model

BACKENDS = ["masked", "gathered"]
CACHES = {
    "dynamic": lambda config: DynamicCache(),
    "dynamic_from_config": lambda config: DynamicCache(config=config),
    "offloading": lambda config: DynamicCache(offloading=True),
}
PROMPT, NEW = 9, 4


def surgery_model(backend: str):
    return tiny_model(
        11,
        routing_backend=backend,
        num_hidden_layers=4,
        num_layer_groups=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_top_k=1,
        routing_patch_size=3,
        mlp_chain_length=2,
    )


def tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 61, (batch, length), generator=torch.Generator().manual_seed(seed))


def prefill(model, input_ids: torch.Tensor, cache_kind: str):
    with torch.no_grad():
        out = model(input_ids, cache=CACHES[cache_kind](model.config), use_cache=True)
    return returned_cache(out)


def decode(model, cache, new_ids: torch.Tensor) -> torch.Tensor:
    """Logits of `new_ids` decoded on `cache`: a chunk of two tokens, then one token at a time (both kinds of cached
    forward: several queries, and the single-token decode step)."""
    logits = []
    with torch.no_grad():
        for chunk in (new_ids[:, :2], new_ids[:, 2:3], new_ids[:, 3:]):
            out = model(chunk, cache=cache, use_cache=True)
            cache = returned_cache(out)
            logits.append(out.logits)
    return torch.cat(logits, dim=1)


def full_forward(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, use_cache=False).logits


@pytest.mark.parametrize("cache_kind", sorted(CACHES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("removed", [1, 4, PROMPT])
def test_crop_by_a_negative_count_decodes_like_the_surviving_tokens(removed, backend, cache_kind):
    """`crop(-n)` (assisted generation rejecting n draft tokens) removes the last n tokens' routing state with their
    keys: other tokens decoded next see exactly the surviving prefix. Removing 4 of 9 leaves a routing patch half
    cached (positions 3, 4), so the next token continues it with token 3's router logits.

    Planted bug: a `crop` that cuts the keys but not the routing state (the masked path fails on mismatched lengths,
    the gathered path attends with other tokens' selections and continues the wrong patch)."""
    model = surgery_model(backend)
    prompt, new = tokens(2, PROMPT, 1), tokens(2, NEW, 2)
    cache = prefill(model, prompt, cache_kind)
    cache.crop(-removed)
    kept = PROMPT - removed
    assert cache.get_seq_length() == kept
    if kept == 0:  # an empty cache starts over: a new first token starts a patch
        expected = full_forward(model, new)
    else:
        expected = full_forward(model, torch.cat([prompt[:, :kept], new], dim=1))[:, kept:]
    torch.testing.assert_close(decode(model, cache, new), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("cache_kind", sorted(CACHES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_crop_by_a_positive_count_keeps_keys_and_routing_state_together(backend, cache_kind):
    """A positive argument meant "keep this many tokens" in older transformers releases; 5.25 refuses it. Either way
    the routing state follows the keys: if the keys are kept whole (refused), decoding continues all 9 tokens; if
    they are cut to 5, it continues those 5.

    Planted bug: a `crop` that cuts the routing state to the positive length before the keys' crop refuses it (the
    cache keeps 9 keys but the routing of 5 tokens)."""
    model = surgery_model(backend)
    prompt, new = tokens(2, PROMPT, 3), tokens(2, NEW, 4)
    cache = prefill(model, prompt, cache_kind)
    try:
        cache.crop(5)
    except ValueError:
        pass  # transformers refuses a positive count
    kept = cache.get_seq_length()
    assert kept in (5, PROMPT)
    expected = full_forward(model, torch.cat([prompt[:, :kept], new], dim=1))[:, kept:]
    torch.testing.assert_close(decode(model, cache, new), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("cache_kind", sorted(CACHES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_reorder_cache_moves_the_routing_state_with_the_keys(backend, cache_kind):
    """`reorder_cache(beam_idx)` (beam search): row i continues sequence `beam_idx[i]`, rows may repeat.

    Planted bug: a `reorder_cache` that reorders keys and values but not the routing state."""
    model = surgery_model(backend)
    prompt, new = tokens(3, PROMPT, 5), tokens(3, NEW, 6)
    cache = prefill(model, prompt, cache_kind)
    beam_idx = torch.tensor([2, 0, 2])
    cache.reorder_cache(beam_idx)
    expected = full_forward(model, torch.cat([prompt[beam_idx], new], dim=1))[:, PROMPT:]
    torch.testing.assert_close(decode(model, cache, new), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("cache_kind", sorted(CACHES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_repeat_interleave_repeats_the_routing_state_with_the_keys(backend, cache_kind):
    """`batch_repeat_interleave(3)`: rows 3i, 3i+1, 3i+2 continue sequence i, each with its own new tokens.

    Planted bug: a `batch_repeat_interleave` that repeats the routing state with `repeat` (tiled: row 1 gets
    sequence 1's routing with sequence 0's keys) instead of `repeat_interleave`."""
    model = surgery_model(backend)
    prompt, new = tokens(2, PROMPT, 7), tokens(6, NEW, 8)
    cache = prefill(model, prompt, cache_kind)
    cache.batch_repeat_interleave(3)
    expected = full_forward(model, torch.cat([prompt.repeat_interleave(3, 0), new], dim=1))[:, PROMPT:]
    torch.testing.assert_close(decode(model, cache, new), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("cache_kind", sorted(CACHES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_select_indices_selects_the_routing_state_with_the_keys(backend, cache_kind):
    """`batch_select_indices([3, 1])`: the kept rows continue sequences 3 and 1, in that order.

    Planted bug: a `batch_select_indices` that keeps the first rows of the routing state (`[:len(indices)]`)."""
    model = surgery_model(backend)
    prompt, new = tokens(4, PROMPT, 9), tokens(2, NEW, 10)
    cache = prefill(model, prompt, cache_kind)
    indices = torch.tensor([3, 1])
    cache.batch_select_indices(indices)
    expected = full_forward(model, torch.cat([prompt[indices], new], dim=1))[:, PROMPT:]
    torch.testing.assert_close(decode(model, cache, new), expected, rtol=0, atol=1e-4)
