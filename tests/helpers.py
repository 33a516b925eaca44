"""Small models shared by the tests."""

import torch

import uoe


def tiny_config(**overrides) -> uoe.UoEConfig:
    """A small sparse UoE config: 4 heads (2 selected), 4 MLP experts (2 selected)."""
    kwargs = dict(
        vocab_size=61,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        attention_top_k=2,
        intermediate_size=64,
        num_mlp_experts=4,
        mlp_top_k=2,
        max_position_embeddings=128,
        # a larger init spreads router scores so that selections differ between tokens
        initializer_range=0.2,
    )
    kwargs.update(overrides)
    return uoe.UoEConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> uoe.UoEForCausalLM:
    torch.manual_seed(seed)
    return uoe.UoEForCausalLM(tiny_config(**overrides)).eval()


def returned_cache(outputs):
    """The KV cache a forward returned (field `cache` from transformers 5.24 on, `past_key_values` before)."""
    from uoe.modeling_uoe import CACHE_FIELD

    return getattr(outputs, CACHE_FIELD)


def enable_checkpointing(model) -> None:
    """Turn on activation checkpointing under the name this transformers has (`activation_checkpointing_enable` from
    5.24 on, `gradient_checkpointing_enable` before)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def checkpointing_argument() -> dict:
    """`TrainingArguments` keyword that turns on activation checkpointing in this transformers."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": True}


# The refusal of a cache passed under both names: transformers' `deprecate_kwarg` (5.24 on) or UoE's own (before).
BOTH_CACHE_NAMES = r"Both `past_key_values` and `cache`|as `cache` or as `past_key_values`.*not both"


def running_in_ci() -> bool:
    """Whether the `CI` environment variable is set (`.ci/run` sets it; so do hosted CI services)."""
    import os

    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_triton():
    """Import Triton for a kernel test module: skipped where Triton is not installed, but an error in CI, where
    skipping would silently drop the whole kernel suite (`scripts/setup.sh` installs the `kernels` extra)."""
    import pytest

    if running_in_ci():
        import triton

        return triton
    return pytest.importorskip("triton")


def count_kernel_calls(monkeypatch) -> dict[str, int]:
    """Count the model's calls into the SMHA and UoME Triton kernels (`{"attention": n, "experts": m}`, updated in
    place), so that a silent fallback to the reference fails a comparison instead of comparing it with itself."""
    import uoe.kernels_smha as kernels_smha
    import uoe.modeling_uoe as modeling

    calls = {"attention": 0, "experts": 0}

    def counted(kind, fn):
        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(kernels_smha, "selective_attention", counted("attention", kernels_smha.selective_attention))
    monkeypatch.setattr(modeling, "uoe_triton_experts_forward", counted("experts", modeling.uoe_triton_experts_forward))
    return calls


def chunked_decoding_error(model) -> float:
    """Largest relative error of cached decoding against the full pass on two sequences of 13 tokens (the second
    left-padded by 3): a 7-token prefill, a 2-token chunk, then single tokens; over the non-padding positions."""
    input_ids = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(10))
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = model(input_ids, attention_mask=mask).logits
        out = model(input_ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
        logits = [out.logits]
        for start, end in ((7, 9), (9, 10), (10, 11), (11, 12), (12, 13)):
            out = model(
                input_ids[:, start:end], attention_mask=mask[:, :end], cache=returned_cache(out), use_cache=True
            )
            logits.append(out.logits)
    real = mask.bool()
    cached = torch.cat(logits, dim=1)[real]
    return float((cached - expected[real]).abs().max() / expected[real].abs().max())
