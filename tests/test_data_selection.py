"""Patch-wise data selection (`data_capacity`) at capacities whose `capacity x patches` is not a whole number, against
the float64 plain-loop encoder of `tests/reference_encoder.py` (which keeps `math.ceil(c * num_patches)` patches per
expert), for the image classifier and the ListOps text encoder, on the masked and the gathered path.

Each case also checks that the kept count matters: the reference with one patch fewer per expert (the count rounded
down) gives other logits, so a model that rounded down could not pass.
"""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

from uoe import UoEConfig, UoEForImageClassification

from .reference_encoder import encoder_selections, reference_image_logits, reference_text_encoder_logits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_listops  # noqa: E402

BACKENDS = ["masked", "gathered"]


def vision_model(**overrides) -> UoEForImageClassification:
    """8x8 images of 2x2 patches: 16 image tokens + CLS. Non-zero biases."""
    kwargs = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, attention_top_k=2, intermediate_size=64,
        num_mlp_experts=4, mlp_top_k=2, mlp_type="gelu", mlp_bias=True, attention_bias=True, is_causal=False,
        norm_type="layernorm", layer_norm_eps=1e-6, position_embedding_type="learned", image_size=8, patch_size=2,
        num_channels=3, max_position_embeddings=17, num_labels=5, initializer_range=0.2,
    )  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = UoEForImageClassification(UoEConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") and "norm" not in name:
                param.normal_(0.0, 0.1)
    return model.double()


# capacity x patches: 0.3 x 16 = 4.8, 0.3 x 8 = 2.4, 0.45 x 4 = 1.8, 0.3 x 16 = 4.8 (routed experts only)
VISION_CASES = {
    "tokens": dict(routing_patch_size=1, data_capacity=0.3),
    "patches2": dict(routing_patch_size=2, data_capacity=0.3),
    "patches4_weighted_sigmoid": dict(
        routing_patch_size=4, data_capacity=0.45, gate_mode="weighted", router_score_func="sigmoid"
    ),
    "gqa_shared_rope": dict(
        routing_patch_size=1,
        data_capacity=0.3,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_shared_attention_groups=1,
        attention_top_k=2,
        num_shared_mlp_experts=1,
        mlp_top_k=2,
        position_embedding_type="rope",
    ),
}


def with_capacity_rounded_down(model):
    """A copy whose config keeps floor(c x patches) patches per expert (the reference reads only config and
    weights)."""
    config = model.config
    patches = (config.image_size // config.patch_size) ** 2 // config.routing_patch_size
    rounded = copy.deepcopy(model)
    rounded.config.data_capacity = math.floor(config.data_capacity * patches) / patches
    return rounded


@pytest.mark.parametrize("case", sorted(VISION_CASES))
def test_image_classifier_keeps_the_ceiling_of_capacity_times_patches(case):
    """Planted bug: the kept-patch count rounded down (`int(c * num_patches)`) instead of up."""
    pixel_values = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = None
    for backend in BACKENDS:
        model = vision_model(routing_backend=backend, **VISION_CASES[case])
        patches = 16 // model.config.routing_patch_size
        assert model.config.data_capacity * patches % 1 != 0  # not a whole number
        if reference is None:
            reference = reference_image_logits(model, pixel_values)
            rounded_down = reference_image_logits(with_capacity_rounded_down(model), pixel_values)
            assert float((reference - rounded_down).abs().max()) > 1e-3  # the kept count matters here
        with torch.no_grad():
            actual = model(pixel_values).logits
        # float64, except router scores (float32 in the model)
        torch.testing.assert_close(
            actual, reference, rtol=0, atol=1e-5, msg=lambda m, backend=backend: f"{backend}: {m}"
        )


def test_reference_keeps_exactly_the_best_scored_patches_per_expert():
    """The reference's own rule, by hand on fixed router logits: 5 patches of 1 token, top-1 of 2 experts, capacity
    0.5 x 5 = 2.5 -> 3; expert 0 is chosen by patches 0-3 and keeps the 3 with the highest scores (0, 2, 3)."""
    config = UoEConfig(
        hidden_size=2, num_attention_heads=1, intermediate_size=4, num_mlp_experts=2, mlp_top_k=1, is_causal=False,
        data_capacity=0.5, attention_top_k=1, head_dim=2,
    )  # fmt: skip
    # router weight = identity: a token's logits are its (patch-mean) state
    hidden = torch.tensor([[0, 0], [3, 0], [1, 0], [4, 0], [2, 0], [0, 2]], dtype=torch.float64)
    selections = encoder_selections(hidden, torch.eye(2, dtype=torch.float64), 1, 0, config)
    assert [set(s) for s in selections] == [{0, 1}, {0}, set(), {0}, {0}, {1}]


def listops_model(backend: str, data_capacity: float):
    config = compare_listops.listops_config("uoe", 64)
    config.update(dict(data_capacity=data_capacity, routing_backend=backend, initializer_range=0.2))
    torch.manual_seed(2)
    model = compare_listops.UoESequenceClassifier(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") and "norm" not in name:
                param.normal_(0.0, 0.1)
    return model.double()


def test_text_encoder_keeps_the_ceiling_of_capacity_times_patches():
    """The ListOps encoder (rotary positions, one token per patch): 10 tokens after CLS at capacity 0.35 keep
    ceil(3.5) = 4 patches per head and per expert.

    Planted bug: the kept-patch count rounded down (`int(c * num_patches)`) instead of up."""
    # distinct tokens: equal tokens would tie in the first layer's scores, and ties may be broken either way
    input_ids = torch.randperm(16, generator=torch.Generator().manual_seed(3))[:11].add(1).tolist()
    reference = None
    for backend in BACKENDS:
        model = listops_model(backend, 0.35)
        if reference is None:
            reference = reference_text_encoder_logits(model, input_ids)
            rounded = copy.deepcopy(model)
            rounded.config.data_capacity = 0.3  # floor(3.5) = 3 patches
            assert float((reference - reference_text_encoder_logits(rounded, input_ids)).abs().max()) > 1e-3
        with torch.no_grad():
            actual = model(torch.tensor([input_ids]))["logits"][0]
        torch.testing.assert_close(
            actual, reference, rtol=0, atol=1e-5, msg=lambda m, backend=backend: f"{backend}: {m}"
        )
