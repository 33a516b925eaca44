#!/usr/bin/env python
"""UoE vs transformers' ViT (matched FLOPs) vs an all-MLP classifier (matched parameters) on Fashion-MNIST.

    python benchmarks/compare_vision.py --quick   # a few minutes on 2 CPU cores
    python benchmarks/compare_vision.py           # full CPU mode (the run in benchmarks/RESULTS.md)

Data: the real Fashion-MNIST idx files (Debian's `dataset-fashion-mnist`, see `scripts/setup.sh`). Training uses a
fixed subset of the 60k training images (a permutation drawn with seed 12345, independent of the run seeds,
first `--train_samples`); evaluation uses the first `--test_samples` of the 10k test images (all of them in full
mode). Pixels are scaled to [0, 1] and normalised with the training set's mean/std; no augmentation.

Models (`--models`):

- `uoe`: `UoEForImageClassification`, the README's Fashion-MNIST config: 7x7 patches (16 tokens + CLS), width 96,
  4 layers, 4 heads with 2 selected, MLP 192 cut into 4 experts with 2 selected, routing patches of 4 tokens (one
  image row), learned positions, aux loss 0.01.
- `uoe_dc`: the same with patch-wise data selection `data_capacity=0.5` (each expert keeps at most 2 of the 4
  routing patches; computed on the gathered slots only).
- `vit`: `ViTForImageClassification` from a `ViTConfig` matched to UoE's *active* forward FLOPs per image. Rule:
  same patch size, depth and number of heads, MLP ratio 2 (as UoE's 192/96); the width is the multiple of 8 whose
  analytic FLOPs are closest to UoE's active FLOPs, and the script refuses to run if they differ by more than 10%.
- `mlp`: an all-MLP classifier in the style of "Scaling MLPs" (Bachmann, Anagnostidis & Hofmann, 2023): flatten
  the 28x28 image (no patches), linear embedding, `depth` pre-LayerNorm residual blocks `x + W2 gelu(W1 LN(x))` with
  an inverted bottleneck (expansion 4), final LayerNorm, linear head; the width is chosen so that its parameter count
  is closest to UoE's total. No data augmentation or pre-training (which that paper relies on).

Every model gets the same data order, optimizer (AdamW, weight decay 0.05), learning rate, warm-up + cosine schedule,
gradient clipping (1.0), batch size, epochs and seeds. FLOPs are forward FLOPs per image, a multiply-add = 2:
analytic (UoE: active, `uoe.flops.estimate_flops_per_image`; the baselines: `baseline_flops.py`), and as counted by
`torch.utils.flop_counter`.
UoE runs its gathered path (the CPU default): only the selected (token, expert) pairs are computed, each head attends
over its compacted token lists (padded to the longest), o_proj is one dense product and CLS goes through every
expert, so its counted FLOPs lie between its active and its dense-equivalent FLOPs; data selection drops pairs.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from baseline_flops import all_mlp_flops_per_image, vit_flops_per_image  # noqa: E402

from uoe import UoEConfig, UoEForImageClassification  # noqa: E402
from uoe.flops import estimate_flops_per_image  # noqa: E402

MODELS = ("uoe", "uoe_dc", "vit", "mlp")
SECTION = "## Vision comparison (compare_vision.py)"
IMAGE_SIZE, PATCH_SIZE, NUM_CLASSES = 28, 7, 10
NUM_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1  # patches + CLS
SUBSET_SEED = 12345
# Defaults per mode; any of them can be overridden on the command line.
MODES = {
    "quick": dict(train_samples=8000, test_samples=2000, epochs=1, seeds="0"),
    "full": dict(train_samples=30000, test_samples=10000, epochs=3, seeds="0,1"),
}
MLP_DEPTH, MLP_EXPANSION = 4, 4
UOE_SHAPE_FIELDS = (  # the shape column of the table, in this order
    "hidden_size num_hidden_layers num_attention_heads attention_top_k intermediate_size num_mlp_experts mlp_top_k "
    "routing_patch_size data_capacity patch_size"
).split()


# ------------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------------


def uoe_config(data_capacity: float | None = None) -> UoEConfig:
    return UoEConfig(
        hidden_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        attention_top_k=2,
        intermediate_size=192,
        num_mlp_experts=4,
        mlp_top_k=2,
        mlp_type="gelu",
        mlp_bias=True,
        attention_bias=True,
        routing_patch_size=4,
        data_capacity=data_capacity,
        router_aux_loss_coef=0.01,
        is_causal=False,
        norm_type="layernorm",
        layer_norm_eps=1e-6,
        position_embedding_type="learned",
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=1,
        max_position_embeddings=NUM_TOKENS,
        use_cache=False,
        num_labels=NUM_CLASSES,
    )


def vit_config(hidden_size: int) -> ViTConfig:
    return ViTConfig(
        hidden_size=hidden_size,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-6,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=1,
        qkv_bias=True,
        num_labels=NUM_CLASSES,
    )


def matched_vit_width(target_flops: float, tolerance: float = 0.10) -> int:
    """Width (multiple of 8) whose ViT FLOPs per image are closest to `target_flops`; within `tolerance`."""
    width = harness.solve_width(lambda w: vit_flops_per_image(vit_config(w)), target_flops, range(8, 1025, 8))
    ratio = vit_flops_per_image(vit_config(width)) / target_flops
    if abs(ratio - 1) > tolerance:
        raise RuntimeError(f"no ViT width matches {target_flops:.3g} FLOPs within {tolerance:.0%} (best {ratio:.3f})")
    return width


def vit_width_at_most(target_flops: float) -> int:
    """The widest ViT (width a multiple of 8) whose FLOPs per image are at most `target_flops`."""
    widths = [w for w in range(8, 1025, 8) if vit_flops_per_image(vit_config(w)) <= target_flops]
    if not widths:
        raise RuntimeError(f"no ViT width has at most {target_flops:.3g} FLOPs per image")
    return widths[-1]


def vit_model(width: int) -> tuple[nn.Module, dict]:
    """`ViTForImageClassification` of width `width` and its description (config, analytic FLOPs)."""
    config = vit_config(width)
    info = {
        "class": "transformers.ViTForImageClassification",
        "config": {
            k: getattr(config, k)
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size")
        },
        "analytic_flops": vit_flops_per_image(config),
    }
    return ViTForImageClassification(config), info


def narrow_vit_model() -> tuple[nn.Module, dict]:
    """The widest ViT at <= UoE's active FLOPs per image (with the matched `vit`, it brackets UoE's FLOPs)."""
    return vit_model(vit_width_at_most(estimate_flops_per_image(uoe_config()).active))


class MLPBlock(nn.Module):
    def __init__(self, width: int, expansion: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, expansion * width)
        self.fc2 = nn.Linear(expansion * width, width)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class AllMLPClassifier(nn.Module):
    """'Scaling MLPs' classifier: flatten -> Linear -> depth x [x + MLP(LN(x))] -> LN -> Linear. No patches."""

    def __init__(self, in_features: int, width: int, depth: int, expansion: int, num_classes: int):
        super().__init__()
        self.embed = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList([MLPBlock(width, expansion) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embed(pixel_values.flatten(1))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def mlp_param_count(width: int, depth: int = MLP_DEPTH, expansion: int = MLP_EXPANSION) -> int:
    in_features = IMAGE_SIZE * IMAGE_SIZE
    block = 2 * width + 2 * expansion * width * width + expansion * width + width
    return in_features * width + width + depth * block + 2 * width + width * NUM_CLASSES + NUM_CLASSES


def matched_mlp_width(target_params: int) -> int:
    return harness.solve_width(mlp_param_count, target_params, range(8, 4097))


@functools.lru_cache(maxsize=1)
def uoe_parameter_count() -> int:
    with torch.random.fork_rng():  # do not disturb the seeded initialisation of the model being built
        return harness.count_parameters(UoEForImageClassification(uoe_config()))


def uoe_model(config: UoEConfig) -> tuple[nn.Module, dict]:
    """The UoE classifier of `config` and its description (shape, active and dense-equivalent analytic FLOPs)."""
    flops = estimate_flops_per_image(config)
    info = {
        "class": "uoe.UoEForImageClassification",
        "config": {k: getattr(config, k) for k in UOE_SHAPE_FIELDS},
        "analytic_flops": flops.active,
        "analytic_flops_dense_equivalent": flops.dense,
    }
    return UoEForImageClassification(config), info


def build_model(name: str) -> tuple[nn.Module, dict]:
    """The model and its description (config, analytic FLOPs)."""
    reference = uoe_config()
    if name in ("uoe", "uoe_dc"):
        model, info = uoe_model(uoe_config(data_capacity=0.5 if name == "uoe_dc" else None))
    elif name == "vit":
        model, info = vit_model(matched_vit_width(estimate_flops_per_image(reference).active))
    elif name == "mlp":
        width, sizes = matched_mlp_width(uoe_parameter_count()), (MLP_DEPTH, MLP_EXPANSION, NUM_CLASSES)
        model = AllMLPClassifier(IMAGE_SIZE * IMAGE_SIZE, width, *sizes)
        info = {
            "class": "AllMLPClassifier (this script)",
            "config": {"width": width, "depth": MLP_DEPTH, "expansion": MLP_EXPANSION, "patches": "none"},
            "analytic_flops": all_mlp_flops_per_image(IMAGE_SIZE * IMAGE_SIZE, width, *sizes),
        }
    else:
        raise ValueError(f"unknown model {name!r}; expected one of {list(MODELS)}")
    return model, info


def forward_logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    if isinstance(model, AllMLPClassifier):
        return model(inputs["pixel_values"])
    return model(pixel_values=inputs["pixel_values"]).logits


def training_loss(model: nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    if isinstance(model, AllMLPClassifier):
        return nn.functional.cross_entropy(model(inputs["pixel_values"]), labels)
    # transformers models add their own terms (UoE: router aux loss) when given labels
    return model(pixel_values=inputs["pixel_values"], labels=labels).loss


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------


def _example_module():
    path = harness.ROOT / "examples" / "run_image_classification.py"
    spec = importlib.util.spec_from_file_location("_run_image_classification", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_data(folder: str | None, train_samples: int, test_samples: int) -> dict[str, torch.Tensor]:
    example = _example_module()  # reuse its idx reader and Fashion-MNIST statistics
    root = example.find_fashion_mnist(folder)
    train_x = example.read_idx(root / "train-images-idx3-ubyte.gz")
    train_y = example.read_idx(root / "train-labels-idx1-ubyte.gz")
    test_x = example.read_idx(root / "t10k-images-idx3-ubyte.gz")
    test_y = example.read_idx(root / "t10k-labels-idx1-ubyte.gz")
    if train_samples > len(train_y) or test_samples > len(test_y):
        raise ValueError(
            f"--train_samples must be <= {len(train_y)} and --test_samples <= {len(test_y)}, "
            f"got {train_samples} and {test_samples}."
        )
    subset = np.random.default_rng(SUBSET_SEED).permutation(len(train_y))[:train_samples]

    def pixels(images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images.astype(np.float32) / 255.0)
        x = (x - example.FASHION_MNIST_MEAN) / example.FASHION_MNIST_STD
        return x[:, None].contiguous()

    return {
        "train_x": pixels(train_x[subset]),
        "train_y": torch.from_numpy(train_y[subset].astype(np.int64)),
        "test_x": pixels(test_x[:test_samples]),
        "test_y": torch.from_numpy(test_y[:test_samples].astype(np.int64)),
    }


def batch_iterator(x: torch.Tensor, y: torch.Tensor, batch_size: int, order: torch.Tensor | None):
    index = order if order is not None else torch.arange(len(y))
    for start in range(0, len(index), batch_size):
        part = index[start : start + batch_size]
        yield {"pixel_values": x[part]}, y[part]


# ------------------------------------------------------------------------------------------------------------------
# Run
# ------------------------------------------------------------------------------------------------------------------


def run_one(name: str, seed: int, data: dict, args) -> dict:
    torch.manual_seed(seed)
    return run_model(*build_model(name), seed, data, args)


def run_model(model: nn.Module, info: dict, seed: int, data: dict, args) -> dict:
    """Train `model` (built after `torch.manual_seed(seed)`) with the batch order of `seed`, then evaluate it."""
    params = harness.count_parameters(model)
    probe = data["test_x"][:8]
    counted = harness.counted_forward_flops(model, lambda: forward_logits(model, {"pixel_values": probe})) / len(probe)
    n = len(data["train_y"])
    steps_per_epoch = math.ceil(n / args.batch_size)

    def batches(epoch: int):
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)  # same order for every model
        return batch_iterator(data["train_x"], data["train_y"], args.batch_size, torch.randperm(n, generator=generator))

    stats = harness.train_epochs(model, batches, training_loss, args, steps_per_epoch)
    evaluation = harness.evaluate(
        model, batch_iterator(data["test_x"], data["test_y"], args.eval_batch_size, None), forward_logits
    )
    return {
        **info,
        "seed": seed,
        "parameters": params,
        "counted_flops": counted,
        **stats,
        **evaluation,
    }


SUMMARY_FIELDS = (
    ("class", "config", "parameters", "analytic_flops", "counted_flops"),
    {"accuracy": "accuracy", "train_images_per_s": "train_examples_per_s", "eval_images_per_s": "eval_examples_per_s",
     "train_seconds": "train_seconds"},
)  # fmt: skip
LABELS = {
    "uoe": "UoE (2/4 heads, 2/4 experts)",
    "uoe_dc": "UoE + data selection (capacity 0.5)",
    "vit": "ViT (transformers), FLOP-matched",
    "mlp": "all-MLP (Scaling MLPs), param-matched",
}


def markdown(results: dict) -> str:
    cfg = results["settings"]
    rows = []
    for row in results["summary"]:
        if not row["runs"]:
            rows.append([LABELS[row["model"]], "not run: " + "; ".join(row["failed"])] + [""] * 6)
            continue
        shape = ", ".join(f"{k}={v}" for k, v in row["config"].items() if v is not None)
        rows.append([
            LABELS[row["model"]], harness.fmt_mean(row["accuracy"], 100, 2), f"{row['parameters']:,}",
            harness.fmt_count(row["analytic_flops"]), harness.fmt_count(row["counted_flops"]),
            harness.fmt_mean(row["train_images_per_s"], 1, 0), harness.fmt_mean(row["eval_images_per_s"], 1, 0),
            f"`{shape}`",
        ])  # fmt: skip
    header = ["model", "test accuracy %", "parameters", "FLOPs/image (analytic)", "FLOPs/image (counted)",
              "train images/s", "eval images/s", "shape"]  # fmt: skip
    seeds = ", ".join(str(s) for s in cfg["seeds"])
    settings = (
        f"Fashion-MNIST: {cfg['train_samples']:,} training images (fixed subset, permutation seed {SUBSET_SEED}), "
        f"{cfg['test_samples']:,} test images; {cfg['epochs']} epochs, batch {cfg['batch_size']}, AdamW lr "
        f"{cfg['lr']:g}, weight decay {cfg['weight_decay']:g}, {cfg['warmup_steps']} warm-up steps then cosine, "
        f"grad clip 1.0, identical for every model; seeds {seeds} (accuracy and throughput: mean ± sample std "
        "over seeds). FLOPs: forward, per image, multiply-add = 2."
    )
    notes = [
        "- Analytic FLOPs: UoE's are the *active* ones (`uoe.estimate_flops_per_token` on 17 tokens, plus the "
        "dense CLS token, patch embedding and head); the ViT's width is the multiple of 8 whose analytic FLOPs "
        "are closest to UoE's active FLOPs (same patch size, depth, heads, MLP ratio 2); the all-MLP width "
        "is the one whose parameter count is closest to UoE's.",
        "- Counted FLOPs: `torch.utils.flop_counter.FlopCounterMode` on an 8-image forward pass (matmuls, "
        "convolutions and attention, not norms/activations). UoE runs its gathered path: only the selected "
        "(token, expert) pairs, attention over each head's compacted lists (padded to the longest), o_proj as "
        "one dense product and CLS through every expert, so its count lies between its active FLOPs and the "
        f"dense-equivalent ones ({harness.fmt_count(results['uoe_dense_equivalent_flops'])}); data selection "
        "drops pairs.",
        "- Throughput is measured on this shared CPU with PyTorch eager kernels; it reflects these "
        "implementations here, not what the FLOPs would allow.",
    ]
    return harness.section_text(results, [settings, "", harness.markdown_table(header, rows)], notes)


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_arguments(
        parser, MODELS, batch_size=128, eval_batch_size=500, lr=2e-3, weight_decay=0.05, json_stem="vision"
    )
    parser.add_argument("--fashion_mnist_dir", default=None)
    return harness.parse_common_arguments(parser, argv, MODES, MODELS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    env = harness.environment("compare_vision.py", argv)
    data = load_data(args.fashion_mnist_dir, args.train_samples, args.test_samples)
    print(f"data: {len(data['train_y'])} train / {len(data['test_y'])} test images", flush=True)
    uoe_flops = estimate_flops_per_image(uoe_config())
    results = {
        "benchmark": "compare_vision",
        "environment": env,
        "settings": {**harness.common_settings(args), "subset_seed": SUBSET_SEED},
        "uoe_active_flops": uoe_flops.active,
        "uoe_dense_equivalent_flops": uoe_flops.dense,
    }
    results["runs"] = harness.run_grid(
        lambda name, seed: run_one(name, seed, data, args),
        args.model_list,
        args.seed_list,
        lambda run: f"accuracy {run['accuracy']:.4f}, {run['train_examples_per_s']:.0f} train images/s",
    )
    return harness.finish_run(results, args, start, SUMMARY_FIELDS, markdown, SECTION)


if __name__ == "__main__":
    sys.exit(main())
