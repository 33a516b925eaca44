"""UoEForImageClassification: ViT equivalence, a plain-loop reference of hierarchical routing with data
selection, per-image batch independence, computed rows / FLOPs, save / load / remote code, Trainer on
scikit-learn digits, and input validation."""

import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTConfig, ViTForImageClassification

import uoe
from uoe import UoEConfig, UoEForImageClassification, UoEImageProcessor

from .remote_code import logits_without_uoe


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def vision_config(**overrides) -> UoEConfig:
    """8x8 images, 2x2 patches: 16 image tokens + CLS; 4 heads (2 selected), 4 MLP experts (2 selected)."""
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        attention_top_k=2,
        intermediate_size=64,
        num_mlp_experts=4,
        mlp_top_k=2,
        mlp_type="gelu",
        mlp_bias=True,
        attention_bias=True,
        routing_patch_size=2,
        is_causal=False,
        norm_type="layernorm",
        layer_norm_eps=1e-6,
        position_embedding_type="learned",
        image_size=8,
        patch_size=2,
        num_channels=3,
        max_position_embeddings=17,
        num_labels=5,
        use_cache=False,
        initializer_range=0.2,  # spreads router scores so that selections differ between patches
    )
    kwargs.update(overrides)
    return UoEConfig(**kwargs)


def vision_model(seed: int = 0, **overrides) -> UoEForImageClassification:
    torch.manual_seed(seed)
    model = UoEForImageClassification(vision_config(**overrides)).eval()
    with torch.no_grad():  # non-zero biases so that the bias handling is tested too
        for name, param in model.named_parameters():
            if name.endswith("bias") and "norm" not in name:
                param.normal_(0.0, 0.1)
    return model


def tiny_vit(seed: int = 0, **overrides) -> ViTForImageClassification:
    torch.manual_seed(seed)
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=8,
        patch_size=2,
        num_channels=3,
        num_labels=5,
        initializer_range=0.2,
    )
    kwargs.update(overrides)
    vit = ViTForImageClassification(ViTConfig(**kwargs)).eval()
    with torch.no_grad():  # random (not zero) biases, CLS and positions: equivalence must hold for all of them
        for name, param in vit.named_parameters():
            if name.endswith("bias") or "cls_token" in name or "position" in name:
                param.normal_(0.0, 0.1)
    return vit


# -- plain-loop reference (independent of the model's vectorised routing) -------------------------------------------


def _reference_route(router_weight, normed, config, top_k):
    """Experts -> list of kept patch indices for one image, with loops and Python sorting."""
    patch_size = config.routing_patch_size
    patches = normed[1:].reshape(-1, patch_size, normed.shape[-1]).mean(1)
    scores = torch.softmax(patches @ router_weight.T, dim=-1)
    num_patches, num_experts = scores.shape
    chosen = [set(scores[p].topk(top_k).indices.tolist()) for p in range(num_patches)]
    kept = {}
    for e in range(num_experts):
        candidates = [p for p in range(num_patches) if e in chosen[p]]
        if config.data_capacity is not None:
            capacity = math.ceil(config.data_capacity * num_patches)
            candidates = sorted(candidates, key=lambda p: -float(scores[p, e]))[:capacity]
        kept[e] = candidates
    return kept


def _tokens(patches, patch_size, with_cls):
    tokens = [1 + p * patch_size + j for p in sorted(patches) for j in range(patch_size)]
    return ([0] if with_cls else []) + tokens


def reference_logits(model: UoEForImageClassification, pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits of `model` (gate_mode="union", learned positions) computed image by image, head by head and
    expert by expert: head h runs softmax attention among CLS + the tokens of its kept patches; expert e's
    MLP slice runs on CLS + the tokens of its kept patches; everything else contributes nothing."""
    config, encoder = model.config, model.model
    heads, head_dim, rps = config.num_attention_heads, config.head_dim, config.routing_patch_size
    logits = []
    for image in pixel_values:
        conv = encoder.embeddings.patch_embedding
        x = F.conv2d(image[None], conv.weight, conv.bias, stride=config.patch_size).flatten(2)[0].T
        x = torch.cat([encoder.embeddings.cls_token[0], x]) + encoder.embeddings.position_embeddings[0]
        for layer in encoder.layers:
            attn, normed = layer.self_attn, layer.input_layernorm(x)
            kept = _reference_route(attn.router.weight, normed, config, config.attention_top_k)
            update = torch.zeros_like(x) + attn.o_proj.bias
            for h in range(heads):
                rows = slice(h * head_dim, (h + 1) * head_dim)
                tokens = _tokens(kept[h], rps, with_cls=True)
                sub = normed[tokens]
                q = sub @ attn.q_proj.weight[rows].T + attn.q_proj.bias[rows]
                k = sub @ attn.k_proj.weight[rows].T + attn.k_proj.bias[rows]
                v = sub @ attn.v_proj.weight[rows].T + attn.v_proj.bias[rows]
                out = torch.softmax(q @ k.T / math.sqrt(head_dim), dim=-1) @ v
                update[tokens] += out @ attn.o_proj.weight[:, rows].T
            x = x + update

            mlp, normed = layer.mlp, layer.post_attention_layernorm(x)
            kept = _reference_route(mlp.router.weight, normed, config, config.mlp_top_k)
            update = torch.zeros_like(x) + mlp.output_bias
            for e in range(config.num_mlp_experts):
                tokens = _tokens(kept[e], rps, with_cls=True)  # CLS goes through every expert
                hidden = F.gelu(normed[tokens] @ mlp.experts.up_proj[e].T + mlp.experts.up_proj_bias[e])
                update[tokens] += hidden @ mlp.experts.down_proj[e].T
            x = x + update
        x = encoder.norm(x)
        logits.append(model.classifier(x[0]))
    return torch.stack(logits)


# -- 1. equivalence with ViT -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "vit_overrides, uoe_overrides",
    [
        ({}, {}),
        (dict(hidden_size=48, num_attention_heads=6, intermediate_size=96, num_channels=1), {"num_mlp_experts": 6}),
    ],
    ids=["h32-e4", "h48-grey-e6"],
)
def test_full_routing_equals_vit(vit_overrides, uoe_overrides, attn_implementation):
    vit = tiny_vit(**vit_overrides)
    model = UoEForImageClassification.from_dense(vit, **uoe_overrides).eval()
    model.set_attn_implementation(attn_implementation)
    assert model.config.is_full_routing
    pixel_values = torch.randn(3, vit.config.num_channels, 8, 8)
    with torch.no_grad():
        expected = vit(pixel_values).logits
        actual = model(pixel_values).logits
    assert max_rel_error(actual, expected) <= 1e-5


def test_sparse_conversion_owns_the_documented_heads_and_units():
    """`from_dense` of a ViT at sparse routing, against the ViT's own weights: with all image tokens in one routing
    patch and weighted gates, head h's output of every image token is scaled by h's score (all heads selected, so
    attention itself stays dense) and MLP expert e = fc1 rows / fc2 columns [e*I/E, (e+1)*I/E) is scaled by its
    renormalised top-2 score, 0 if not selected; CLS goes through everything with gate 1. The UoE model must equal
    the ViT with exactly those factors applied before o_proj and fc2.

    Planted bug: the MLP split into strided experts (unit u to expert u % E), exact at full routing."""
    vit = tiny_vit()
    model = UoEForImageClassification.from_dense(
        vit, gate_mode="weighted", mlp_top_k=2, routing_patch_size=16, data_capacity=None
    ).eval()
    pixel_values = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(pixel_values, output_router_logits=True)
    config, hooks = model.config, []
    for index, layer in enumerate(vit.vit.layers):
        head_scores = out.router_logits[2 * index][:, 0].softmax(-1)  # (batch, heads): all selected
        top = out.router_logits[2 * index + 1][:, 0].softmax(-1).topk(2, -1)
        expert_gates = torch.zeros(3, 4).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
        for module, gates, width in (
            (layer.attention.o_proj, head_scores, config.head_dim),
            (layer.mlp.fc2, expert_gates, config.mlp_expert_size),
        ):
            per_column = gates.repeat_interleave(width, -1)[:, None, :].expand(-1, 17, -1).clone()
            per_column[:, 0] = 1.0  # CLS
            hooks.append(module.register_forward_pre_hook(lambda m, a, g=per_column: (a[0] * g,)))
    try:
        with torch.no_grad():
            expected = vit(pixel_values).logits
    finally:
        for hook in hooks:
            hook.remove()
    assert max_rel_error(out.logits, expected) <= 1e-5
    with torch.no_grad():
        assert max_rel_error(out.logits, vit(pixel_values).logits) > 1e-2  # the gates matter


# -- 2. routing against the loop reference; per-image independence ----------------------------------------------------


@pytest.mark.parametrize("data_capacity", [None, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("routing_patch_size", [1, 4])
def test_matches_loop_reference(data_capacity, routing_patch_size):
    model = vision_model(data_capacity=data_capacity, routing_patch_size=routing_patch_size)
    model.set_attn_implementation("eager")
    pixel_values = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        actual = model(pixel_values).logits
        expected = reference_logits(model, pixel_values)
    assert max_rel_error(actual, expected) <= 1e-5


@pytest.mark.parametrize("position_embedding_type", ["learned", "rope"])
def test_full_capacity_equals_no_data_selection(position_embedding_type):
    # data_capacity=1 keeps every patch that chose an expert: the gathered path must equal the masked path.
    gathered = vision_model(data_capacity=1.0, position_embedding_type=position_embedding_type)
    masked = vision_model(data_capacity=None, position_embedding_type=position_embedding_type)
    masked.load_state_dict(gathered.state_dict())
    pixel_values = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert max_rel_error(gathered(pixel_values).logits, masked(pixel_values).logits) <= 1e-5


@pytest.mark.parametrize("data_capacity", [None, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("position_embedding_type", ["learned", "rope"])
def test_batch_independence(data_capacity, position_embedding_type):
    model = vision_model(data_capacity=data_capacity, position_embedding_type=position_embedding_type)
    pixel_values = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        batched = model(pixel_values).logits
        alone = torch.cat([model(pixel_values[i : i + 1]).logits for i in range(4)])
        shuffled = model(pixel_values.flip(0)).logits.flip(0)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched, shuffled, atol=1e-5, rtol=1e-5)


def test_routers_receive_gradient_and_losses():
    model = vision_model(data_capacity=0.5, router_aux_loss_coef=0.1, router_z_loss_coef=0.01).train()
    labels = torch.tensor([0, 1, 2])
    out = model(torch.randn(3, 3, 8, 8), labels=labels, output_router_logits=True, output_hidden_states=True)
    expected = F.cross_entropy(out.logits, labels) + 0.1 * out.aux_loss + 0.01 * out.router_z_loss
    torch.testing.assert_close(out.loss, expected)
    assert len(out.router_logits) == 4 and out.router_logits[0].shape == (3, 8, 4)  # 8 routing patches
    assert len(out.hidden_states) == 3
    out.loss.backward()
    for layer in model.model.layers:
        assert layer.self_attn.router.weight.grad.abs().sum() > 0
        assert layer.mlp.router.weight.grad.abs().sum() > 0


# -- 3. FLOPs: estimate and what is really computed --------------------------------------------------------------------


def test_estimated_flops_half_at_capacity_half():
    config = vision_config(data_capacity=0.5)
    estimate = uoe.estimate_flops_per_token(config, 17, include_lm_head=False)
    assert 0.4 <= estimate.active_fraction <= 0.55
    dense = uoe.estimate_flops_per_token(vision_config(attention_top_k=4, mlp_top_k=4), 17, include_lm_head=False)
    assert dense.active_fraction > 0.97  # only the routers on top of the dense model


def test_unselected_pairs_are_not_computed(monkeypatch):
    """The gathered path (the CPU default) computes exactly the kept (token, expert) pairs: per layer, attention
    projects CLS in every head plus each head's kept patches, and the MLP the same for its experts."""
    import uoe.gathered as gathered

    monkeypatch.setattr(gathered, "TOKEN_MAJOR_MAX_WEIGHTS", 0)  # grouped products even for this small model
    model = vision_model(data_capacity=0.5, routing_patch_size=2, routing_backend="gathered")
    pixel_values = torch.randn(3, 3, 8, 8)
    num_patches, capacity, patch_tokens, batch = 8, 4, 2, 3  # capacity = ceil(0.5 * 8)

    computed = []
    original = gathered.grouped_mm

    def counting(a, b, offsets, *args):
        computed.append(int(offsets[-1]))
        return original(a, b, offsets, *args)

    monkeypatch.setattr(gathered, "grouped_mm", counting)
    with torch.no_grad():
        out = model(pixel_values, output_router_logits=True)
    # per layer: q/k/v (one product; o_proj is one dense product over the scattered heads); the MLP's CLS block
    # (up, down), then its image block (up, down)
    assert len(computed) == 2 * (1 + 4)
    for layer in range(2):
        attention_logits, mlp_logits = out.router_logits[2 * layer : 2 * layer + 2]
        kept = []
        for logits in (attention_logits, mlp_logits):
            chosen = torch.zeros(batch, num_patches, 4, dtype=torch.bool).scatter(-1, logits.topk(2, -1).indices, True)
            kept.append(int(chosen.sum(1).clamp(max=capacity).sum()) * patch_tokens)  # min(#chose, capacity) each
        rows = computed[5 * layer : 5 * layer + 5]
        assert rows[0] == batch * 4 + kept[0]  # CLS in all 4 heads + the kept image pairs
        assert rows[1:3] == [batch * 4] * 2  # CLS through all 4 experts
        assert rows[3:] == [kept[1]] * 2
        assert max(kept) < batch * 16 * 2  # data selection dropped some of the 96 token-choice pairs

    # Counted matmul FLOPs of the whole forward: about half of the same model without data selection at full
    # routing (the dense ViT), as the analytic estimate says.
    monkeypatch.setattr(gathered, "grouped_mm", original)
    dense = vision_model(attention_top_k=4, mlp_top_k=4)
    counts = []
    for m in (model, dense):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(pixel_values)
        counts.append(counter.get_total_flops())
    assert 0.4 <= counts[0] / counts[1] <= 0.6, counts


# -- 4. save / load / remote code ---------------------------------------------------------------------------------------


def test_save_load_auto_and_remote_code(tmp_path):
    model = vision_model(data_capacity=0.5)
    processor = UoEImageProcessor(size={"height": 8, "width": 8})
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert (folder / "modeling_uoe_vision.py").is_file() and (folder / "image_processing_uoe.py").is_file()
    assert "AutoImageProcessor" in json.loads((folder / "preprocessor_config.json").read_text())["auto_map"]

    images = [np.random.default_rng(i).integers(0, 256, (12, 12, 3), dtype=np.uint8) for i in range(2)]
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    loaded_processor = AutoImageProcessor.from_pretrained(folder)
    assert type(loaded_processor) is UoEImageProcessor
    torch.testing.assert_close(loaded_processor(images, return_tensors="pt")["pixel_values"], pixel_values)

    with torch.no_grad():
        expected = model(pixel_values).logits
        loaded = AutoModelForImageClassification.from_pretrained(folder).eval()
        assert type(loaded) is UoEForImageClassification
        torch.testing.assert_close(loaded(pixel_values).logits, expected, atol=0, rtol=0)
    remote, info = logits_without_uoe(
        folder, {"pixel_values": pixel_values}, tmp_path, auto_class="AutoModelForImageClassification"
    )
    assert info["class"] == "UoEForImageClassification" and not info["uoe_loaded"]
    torch.testing.assert_close(remote, expected, atol=0, rtol=0)


# -- 5. Trainer on scikit-learn digits ----------------------------------------------------------------------------------


def test_trainer_learns_digits(tmp_path):
    from sklearn.datasets import load_digits
    from transformers import Trainer, TrainingArguments

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    pixel_values = (images - 0.5) / 0.5
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = order[:1400], order[1400:]

    class Digits(torch.utils.data.Dataset):
        def __init__(self, index):
            self.index = index

        def __len__(self):
            return len(self.index)

        def __getitem__(self, i):
            j = self.index[i]
            return {"pixel_values": pixel_values[j], "labels": labels[j]}

    # 4x4 patches of the 8x8 digits: 4 image tokens, each its own routing patch; each expert keeps 2 of them.
    model = vision_model(
        num_channels=1,
        num_labels=10,
        patch_size=4,
        routing_patch_size=1,
        max_position_embeddings=5,
        data_capacity=0.5,
        initializer_range=0.02,
    ).train()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=3,
        per_device_train_batch_size=32,
        learning_rate=5e-3,
        warmup_steps=5,
        lr_scheduler_type="cosine",
        report_to="none",
        save_strategy="no",
        logging_steps=50,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=Digits(train_idx)).train()
    model.eval()
    with torch.no_grad():
        predictions = model(pixel_values[test_idx]).logits.argmax(-1)
    accuracy = float((predictions == labels[test_idx]).float().mean())
    assert accuracy >= 0.6, accuracy


# -- 7. bad input ---------------------------------------------------------------------------------------------------------


def test_bad_pixel_values_raise():
    model = vision_model()
    with pytest.raises(ValueError, match="num_channels"):
        model(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="patch_size"):
        model(torch.randn(1, 3, 9, 8))
    with pytest.raises(ValueError, match="image_size"):
        model(torch.randn(1, 3, 6, 6))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 8, 8))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(data_capacity=0.0), "data_capacity"),
        (dict(data_capacity=1.5), "data_capacity"),
        (dict(image_size=9), "patch_size"),
        (dict(routing_patch_size=3), "routing_patch_size"),
        (dict(is_causal=True), "is_causal"),
        (dict(image_size=None), "image_size"),
        (dict(position_embedding_type="rope", max_position_embeddings=8), "max_position_embeddings"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        UoEForImageClassification(vision_config(**overrides))


# -- 6. the example script ----------------------------------------------------------------------------------------------


def _load_example():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "run_image_classification.py"
    spec = importlib.util.spec_from_file_location("run_image_classification", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _write_idx(path, array: np.ndarray) -> None:
    import gzip

    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_example_runs_on_idx_files_and_errors_clearly(tmp_path):
    example = _load_example()
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        example.find_fashion_mnist(str(tmp_path / "missing"))

    rng = np.random.default_rng(0)
    data = tmp_path / "fmnist"
    data.mkdir()
    for prefix, count in (("train", 40), ("t10k", 12)):
        images = rng.integers(0, 256, (count, 28, 28))
        _write_idx(data / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, count))
    np.testing.assert_array_equal(example.read_idx(data / "t10k-images-idx3-ubyte.gz").shape, (12, 28, 28))

    results = example.main(
        [
            "--fashion_mnist_dir", str(data),
            "--output_dir", str(tmp_path / "out"),
            "--hidden_size", "16", "--intermediate_size", "32", "--num_hidden_layers", "1",
            "--data_capacity", "0.5",
            "--do_train", "--do_eval", "--max_steps", "2", "--per_device_train_batch_size", "8",
            "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "true",
        ]
    )  # fmt: skip
    assert results["active_flops_fraction"] < 0.6
    saved = AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    # the reported test accuracy, recomputed from the saved model and processor on the 12 test images
    processor = AutoImageProcessor.from_pretrained(tmp_path / "out")
    test_images = example.read_idx(data / "t10k-images-idx3-ubyte.gz")
    test_labels = torch.from_numpy(example.read_idx(data / "t10k-labels-idx1-ubyte.gz").astype(np.int64))
    pixel_values = processor(list(test_images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        predictions = saved.eval()(pixel_values=pixel_values).logits.argmax(-1)
    assert results["test_accuracy"] == pytest.approx(float((predictions == test_labels).double().mean()), abs=1e-9)
    assert saved.config.num_channels == 1 and saved.config.id2label[9] == "Ankle boot"
    assert AutoImageProcessor.from_pretrained(tmp_path / "out").do_convert_grayscale
