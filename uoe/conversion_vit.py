"""Equivalent decomposition of a transformers ViT (`ViTForImageClassification`) into a UoE vision classifier.

Heads are SMHA experts as they are. The MLP's `intermediate_size` hidden units are cut into `num_mlp_experts`
consecutive slices: expert e gets rows `[e*I/E, (e+1)*I/E)` of fc1 (and of its bias) and the matching columns of
fc2; fc2's bias is shared. With every expert selected the UoE model computes the ViT's function.
"""

from __future__ import annotations

import re

import torch

from .configuration_uoe import UoEConfig

# transformers 5.x ViT names, and the 4.x names for checkpoints saved with older versions.
_LAYER_RENAMES = {
    "attention.q_proj": "self_attn.q_proj",
    "attention.k_proj": "self_attn.k_proj",
    "attention.v_proj": "self_attn.v_proj",
    "attention.o_proj": "self_attn.o_proj",
    "attention.attention.query": "self_attn.q_proj",
    "attention.attention.key": "self_attn.k_proj",
    "attention.attention.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.o_proj",
    "layernorm_before": "input_layernorm",
    "layernorm_after": "post_attention_layernorm",
}
_MLP_IN = ("mlp.fc1", "intermediate.dense")
_MLP_OUT = ("mlp.fc2", "output.dense")
_LAYER = re.compile(r"^vit\.(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")


def uoe_config_from_vit(vit_config, **overrides) -> UoEConfig:
    """UoE config with a ViT's shapes; full routing unless `overrides` say otherwise."""
    if getattr(vit_config, "hidden_act", "gelu") not in ("gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu"):
        raise ValueError(f"Only GELU-family ViT MLPs convert, got hidden_act={vit_config.hidden_act!r}.")
    heads = vit_config.num_attention_heads
    intermediate = vit_config.intermediate_size
    experts = overrides.pop("num_mlp_experts", 4 if intermediate % 4 == 0 else 1)
    num_tokens = (vit_config.image_size // vit_config.patch_size) ** 2
    kwargs = dict(
        hidden_size=vit_config.hidden_size,
        num_hidden_layers=vit_config.num_hidden_layers,
        num_attention_heads=heads,
        attention_top_k=heads,
        intermediate_size=intermediate,
        num_mlp_experts=experts,
        mlp_top_k=experts,
        mlp_type="gelu",
        hidden_act=vit_config.hidden_act,
        mlp_bias=True,
        attention_bias=bool(getattr(vit_config, "qkv_bias", True)),
        is_causal=False,
        norm_type="layernorm",
        layer_norm_eps=vit_config.layer_norm_eps,
        position_embedding_type="learned",
        image_size=vit_config.image_size,
        patch_size=vit_config.patch_size,
        num_channels=vit_config.num_channels,
        max_position_embeddings=max(num_tokens + 1, 2),
        initializer_range=vit_config.initializer_range,
        attention_dropout=getattr(vit_config, "attention_probs_dropout_prob", 0.0),
        use_cache=False,
        id2label=dict(vit_config.id2label),
        label2id=dict(vit_config.label2id),
        problem_type=vit_config.problem_type,
    )
    kwargs.update(overrides)
    return UoEConfig(**kwargs)


def uoe_state_dict_from_vit(state_dict: dict[str, torch.Tensor], config: UoEConfig) -> dict[str, torch.Tensor]:
    """Map a `ViTForImageClassification` state dict onto `UoEForImageClassification` (routers excluded)."""
    experts, slice_size = config.num_mlp_experts, config.mlp_expert_size
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name == "vit.embeddings.cls_token":
            out["model.embeddings.cls_token"] = tensor
        elif name == "vit.embeddings.position_embeddings":
            out["model.embeddings.position_embeddings"] = tensor
        elif name.startswith("vit.embeddings.patch_embeddings.projection."):
            out["model.embeddings.patch_embedding." + name.rsplit(".", 1)[1]] = tensor
        elif name.startswith("vit.layernorm."):
            out["model.norm." + name.rsplit(".", 1)[1]] = tensor
        elif name.startswith("classifier."):
            out[name] = tensor
        elif (match := _LAYER.match(name)) is not None:
            index, module, kind = match.groups()
            prefix = f"model.layers.{index}."
            if module in _LAYER_RENAMES:
                out[prefix + _LAYER_RENAMES[module] + "." + kind] = tensor
            elif module in _MLP_IN:
                if kind == "weight":  # (I, H) -> (E, I/E, H)
                    out[prefix + "mlp.experts.up_proj"] = tensor.reshape(experts, slice_size, -1).contiguous()
                else:
                    out[prefix + "mlp.experts.up_proj_bias"] = tensor.reshape(experts, slice_size).contiguous()
            elif module in _MLP_OUT:
                if kind == "weight":  # (H, I) -> (E, H, I/E)
                    out[prefix + "mlp.experts.down_proj"] = (
                        tensor.reshape(tensor.shape[0], experts, slice_size).permute(1, 0, 2).contiguous()
                    )
                else:
                    out[prefix + "mlp.output_bias"] = tensor
            else:
                out[name] = tensor  # reported as unexpected by the caller
        else:
            out[name] = tensor
    return out


__all__ = ["uoe_config_from_vit", "uoe_state_dict_from_vit"]
