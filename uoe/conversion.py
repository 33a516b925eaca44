"""Equivalent decomposition of dense transformers checkpoints into UoE layout.

`UoEForCausalLM.from_dense` converts the decoder families whose layer UoE computes exactly: Llama, Mistral, Qwen2
(q/k/v biases) and Qwen3 (per-head q/k RMSNorm), with multi-head or grouped-query attention. Anything a UoE layer
would compute differently (another architecture, a sliding window, an MLP bias, a RoPE variant UoE lacks, ...) is
refused with a `ValueError` naming the field, instead of converting into a different function.
"""

from __future__ import annotations

import re

import torch
from transformers.activations import ACT2FN

from .configuration_uoe import UoEConfig

# Architecture (class name) -> what its attention has beyond Llama's.
SUPPORTED_DENSE_ARCHITECTURES = {
    "LlamaForCausalLM": {"qkv_bias": None, "qk_norm": False},  # None: `attention_bias` decides q/k/v/o alike
    "MistralForCausalLM": {"qkv_bias": False, "qk_norm": False},
    "Qwen2ForCausalLM": {"qkv_bias": True, "qk_norm": False},  # q/k/v biases, no o_proj bias
    "Qwen3ForCausalLM": {"qkv_bias": None, "qk_norm": True},
}
# RoPE variants whose frequencies UoE's rotary embedding computes as the dense models do (checked by the tests).
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def _default_num_mlp_experts(intermediate_size: int) -> int:
    for candidate in (4, 2, 1):
        if intermediate_size % candidate == 0:
            return candidate
    return 1


def _refuse(field: str, value, supported: str) -> None:
    raise ValueError(
        f"`from_dense` cannot convert exactly a model with `{field}={value!r}`: supported {supported}. "
        "A UoE layer would compute a different function."
    )


def check_dense_config(
    dense_config, architecture: str | None = None, max_position_embeddings: int | None = None
) -> dict:
    """Raise a `ValueError` naming the first field of `dense_config` a UoE model cannot reproduce; return the
    architecture's traits (`SUPPORTED_DENSE_ARCHITECTURES`). `max_position_embeddings`: the longest sequence the
    UoE model will accept (default: the dense model's), which decides whether a sliding window can matter."""
    if architecture is None:
        architectures = getattr(dense_config, "architectures", None) or []
        architecture = architectures[0] if architectures else None
    if architecture not in SUPPORTED_DENSE_ARCHITECTURES:
        _refuse("architecture", architecture, f"architectures {sorted(SUPPORTED_DENSE_ARCHITECTURES)}")
    if getattr(dense_config, "mlp_bias", False):
        _refuse("mlp_bias", dense_config.mlp_bias, "`mlp_bias=False` (UoE's SwiGLU experts have no bias)")
    # SMHA attends to every earlier token: a window that can cut a sequence UoE accepts changes the function
    window = getattr(dense_config, "sliding_window", None)
    max_positions = max_position_embeddings or dense_config.max_position_embeddings
    layer_types = getattr(dense_config, "layer_types", None)
    if layer_types is not None:  # Qwen2/Qwen3: the window applies to the layers marked "sliding_attention"
        other = sorted(set(layer_types) - {"full_attention"})
        if other and getattr(dense_config, "use_sliding_window", False):
            _refuse("use_sliding_window", True, "`use_sliding_window=False` (no sliding-window layers)")
        if other:
            _refuse("layer_types", other, 'only "full_attention" layers')
    elif window is not None and window < max_positions:
        _refuse(
            "sliding_window",
            window,
            f"`sliding_window=None` or >= max_position_embeddings ({max_positions}; pass "
            f"`max_position_embeddings={window}` to convert for sequences the window never cuts)",
        )
    hidden_act = getattr(dense_config, "hidden_act", None)
    if hidden_act not in ACT2FN:
        _refuse("hidden_act", hidden_act, f"activations {sorted(ACT2FN)}")
    rope = dict(getattr(dense_config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        _refuse("rope_parameters['rope_type']", rope_type, f"RoPE types {list(SUPPORTED_ROPE_TYPES)}")
    partial = rope.get("partial_rotary_factor", getattr(dense_config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        _refuse("partial_rotary_factor", partial, "1.0 (RoPE over the whole head)")
    if getattr(dense_config, "pretraining_tp", 1) not in (None, 1):
        _refuse("pretraining_tp", dense_config.pretraining_tp, "1")
    return SUPPORTED_DENSE_ARCHITECTURES[architecture]


def uoe_config_from_dense(dense_config, architecture: str | None = None, **overrides) -> UoEConfig:
    """A `UoEConfig` with the shapes of a supported dense config (`check_dense_config`), at full routing unless
    `overrides` say otherwise. Attention experts are the key/value head groups."""
    traits = check_dense_config(dense_config, architecture, overrides.get("max_position_embeddings"))
    num_heads = dense_config.num_attention_heads
    num_kv_heads = getattr(dense_config, "num_key_value_heads", None) or num_heads
    attention_bias = bool(getattr(dense_config, "attention_bias", False))
    if traits["qkv_bias"] is not None:
        attention_bias = traits["qkv_bias"]
    kwargs = dict(
        vocab_size=dense_config.vocab_size,
        hidden_size=dense_config.hidden_size,
        num_hidden_layers=dense_config.num_hidden_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=getattr(dense_config, "head_dim", None) or dense_config.hidden_size // num_heads,
        attention_top_k=num_kv_heads,
        intermediate_size=dense_config.intermediate_size,
        num_mlp_experts=_default_num_mlp_experts(dense_config.intermediate_size),
        mlp_type="swiglu",
        hidden_act=dense_config.hidden_act,
        attention_bias=attention_bias,
        qk_norm=traits["qk_norm"],
        attention_dropout=float(getattr(dense_config, "attention_dropout", 0.0) or 0.0),
        max_position_embeddings=dense_config.max_position_embeddings,
        rope_parameters=dict(dense_config.rope_parameters),
        rms_norm_eps=dense_config.rms_norm_eps,
        initializer_range=dense_config.initializer_range,
        tie_word_embeddings=dense_config.tie_word_embeddings,
        pad_token_id=dense_config.pad_token_id,
        bos_token_id=dense_config.bos_token_id,
        eos_token_id=dense_config.eos_token_id,
    )
    kwargs.update(overrides)
    # full routing by default: every routed expert besides the shared ones
    if "attention_top_k" not in overrides:
        kwargs["attention_top_k"] = kwargs["num_key_value_heads"] - kwargs.get("num_shared_attention_groups", 0)
    if "mlp_top_k" not in overrides:
        kwargs["mlp_top_k"] = kwargs["num_mlp_experts"] - kwargs.get("num_shared_mlp_experts", 0)
    return UoEConfig(**kwargs)


def uoe_config_from_llama(llama_config, **overrides) -> UoEConfig:
    """`uoe_config_from_dense` for a `LlamaConfig` (kept for existing callers)."""
    return uoe_config_from_dense(llama_config, "LlamaForCausalLM", **overrides)


_DENSE_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")


def uoe_state_dict_from_dense(state_dict: dict[str, torch.Tensor], config: UoEConfig) -> dict[str, torch.Tensor]:
    """Rename and split a Llama / Mistral / Qwen2 / Qwen3 causal-LM state dict into `UoEForCausalLM` parameters.

    Attention, norms (q/k norms included), embeddings and head keep their names: a head group's expert slices are
    contiguous rows of q/k/v and columns of o (query heads `[g*G, (g+1)*G)` share key/value head g). The MLP of each
    layer becomes stacked expert tensors: expert e owns hidden units `[e*I/E, (e+1)*I/E)`, i.e. those rows of
    gate/up and those columns of down. A model with q/k/v biases but none on `o_proj` (Qwen2) gets a zero `o_proj`
    bias, which changes nothing.
    """
    num_experts, expert_size = config.num_mlp_experts, config.mlp_expert_size
    converted, mlp = {}, {}
    for name, tensor in state_dict.items():
        match = _DENSE_MLP.match(name)
        if match is None:
            converted[name] = tensor
        else:
            mlp.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    if config.attention_bias:
        for layer in range(config.num_hidden_layers):
            prefix = f"model.layers.{layer}.self_attn.o_proj."
            if prefix + "weight" in converted and prefix + "bias" not in converted:
                converted[prefix + "bias"] = converted[prefix + "weight"].new_zeros(config.hidden_size)
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


uoe_state_dict_from_llama = uoe_state_dict_from_dense
