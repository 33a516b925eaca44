"""Equivalent decomposition of dense transformers checkpoints into UoE layout."""

from __future__ import annotations

import re

import torch

from .configuration_uoe import UoEConfig


def _default_num_mlp_experts(intermediate_size: int) -> int:
    for candidate in (4, 2, 1):
        if intermediate_size % candidate == 0:
            return candidate
    return 1


def uoe_config_from_llama(llama_config, **overrides) -> UoEConfig:
    """A `UoEConfig` with the shapes of a `LlamaConfig`, at full routing unless `overrides` say otherwise."""
    num_kv_heads = getattr(llama_config, "num_key_value_heads", None) or llama_config.num_attention_heads
    if num_kv_heads != llama_config.num_attention_heads:
        raise ValueError(
            f"`num_key_value_heads` ({num_kv_heads}) must equal `num_attention_heads` "
            f"({llama_config.num_attention_heads}): grouped-query attention cannot be split into per-head experts."
        )
    if getattr(llama_config, "mlp_bias", False):
        raise ValueError(
            "`mlp_bias=True` Llama models are not supported by `from_dense` (UoE's SwiGLU MLP has no bias)."
        )
    num_heads = llama_config.num_attention_heads
    kwargs = dict(
        vocab_size=llama_config.vocab_size,
        hidden_size=llama_config.hidden_size,
        num_hidden_layers=llama_config.num_hidden_layers,
        num_attention_heads=num_heads,
        head_dim=getattr(llama_config, "head_dim", None) or llama_config.hidden_size // num_heads,
        attention_top_k=num_heads,
        intermediate_size=llama_config.intermediate_size,
        num_mlp_experts=_default_num_mlp_experts(llama_config.intermediate_size),
        mlp_type="swiglu",
        hidden_act=llama_config.hidden_act,
        attention_bias=getattr(llama_config, "attention_bias", False),
        max_position_embeddings=llama_config.max_position_embeddings,
        rope_parameters=dict(llama_config.rope_parameters),
        rms_norm_eps=llama_config.rms_norm_eps,
        initializer_range=llama_config.initializer_range,
        tie_word_embeddings=llama_config.tie_word_embeddings,
        pad_token_id=llama_config.pad_token_id,
        bos_token_id=llama_config.bos_token_id,
        eos_token_id=llama_config.eos_token_id,
    )
    kwargs.update(overrides)
    if "mlp_top_k" not in overrides:
        kwargs["mlp_top_k"] = kwargs["num_mlp_experts"]
    return UoEConfig(**kwargs)


_LLAMA_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")


def uoe_state_dict_from_llama(state_dict: dict[str, torch.Tensor], config: UoEConfig) -> dict[str, torch.Tensor]:
    """Rename and split a `LlamaForCausalLM` state dict into `UoEForCausalLM` parameters.

    Attention, norms, embeddings and head keep their names (a head's expert slices are rows/columns of
    the same matrices). The MLP of each layer becomes stacked expert tensors: expert e owns hidden units
    `[e*I/E, (e+1)*I/E)`, i.e. those rows of gate/up and those columns of down.
    """
    num_experts, expert_size = config.num_mlp_experts, config.mlp_expert_size
    converted, mlp = {}, {}
    for name, tensor in state_dict.items():
        match = _LLAMA_MLP.match(name)
        if match is None:
            converted[name] = tensor
        else:
            mlp.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    for layer, weights in mlp.items():
        prefix = f"model.layers.{layer}.mlp.experts."
        gate = weights["gate_proj"].reshape(num_experts, expert_size, -1)
        up = weights["up_proj"].reshape(num_experts, expert_size, -1)
        converted[prefix + "gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
        down = weights["down_proj"]  # (hidden, intermediate)
        converted[prefix + "down_proj"] = (
            down.reshape(down.shape[0], num_experts, expert_size).transpose(0, 1).contiguous()
        )
    return converted
