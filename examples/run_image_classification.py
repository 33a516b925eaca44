#!/usr/bin/env python
"""Train a UoE image classifier (`UoEForImageClassification`) with the transformers `Trainer`.

Defaults to Fashion-MNIST from the Debian package `dataset-fashion-mnist` (the four idx `.gz` files under
`/usr/share/datasets/fashion-mnist`); also accepts an image folder (`--train_dir`, `--validation_dir`, one
sub-folder per class, loaded with `datasets`' `imagefolder` builder). Nothing is downloaded.

    python examples/run_image_classification.py --output_dir runs/fmnist --do_train --do_eval \
        --num_train_epochs 5 --per_device_train_batch_size 128 --per_device_eval_batch_size 512 \
        --learning_rate 2e-3 --weight_decay 0.05 --warmup_steps 100 --lr_scheduler_type cosine \
        --save_strategy no --eval_strategy no --report_to none

Accuracy is computed here (no `evaluate.load`, which would fetch the metric from the hub).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

import uoe
from uoe import UoEConfig, UoEForImageClassification, UoEImageProcessor

logger = logging.getLogger(__name__)

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Pixel mean and standard deviation of the Fashion-MNIST training images (in [0, 1]).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


@dataclass
class DataArguments:
    dataset: str = field(default="fashion_mnist", metadata={"help": "`fashion_mnist` or `imagefolder`."})
    fashion_mnist_dir: str | None = field(
        default=None, metadata={"help": "Folder with the Fashion-MNIST idx .gz files (default: the Debian package's)."}
    )
    train_dir: str | None = field(default=None, metadata={"help": "Image folder for training (imagefolder)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder for evaluation (imagefolder)."})
    validation_split: float = field(
        default=0.1, metadata={"help": "Held-out fraction of the training images when there is no validation_dir."}
    )
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "A saved UoE image classifier to resume."})
    image_size: int = field(default=28)
    num_channels: int = field(default=1)
    patch_size: int = field(default=7)
    hidden_size: int = field(default=96)
    num_hidden_layers: int = field(default=4)
    num_attention_heads: int = field(default=4)
    attention_top_k: int = field(default=2)
    intermediate_size: int = field(default=192)
    num_mlp_experts: int = field(default=4)
    mlp_top_k: int = field(default=2)
    routing_patch_size: int = field(default=4, metadata={"help": "Image tokens per routing patch (4 = a row)."})
    data_capacity: float | None = field(default=None, metadata={"help": "Patch-wise data selection in (0, 1]."})
    position_embedding_type: str = field(default="learned")
    router_aux_loss_coef: float = field(default=0.01)


def find_fashion_mnist(folder: str | None) -> Path:
    candidates = [folder] if folder else [os.environ.get("UOE_FASHION_MNIST_DIR"), *FASHION_MNIST_DIRS]
    for candidate in filter(None, candidates):
        path = Path(candidate)
        if (path / "train-images-idx3-ubyte.gz").is_file():
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST idx files not found in {[c for c in candidates if c]}. Install them with "
        "`sudo apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu), or pass --fashion_mnist_dir."
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (the MNIST format): magic (2 zero bytes, dtype 0x08 = uint8, ndim), sizes, data."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an unsigned-byte idx file.")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class ArrayDataset(torch.utils.data.Dataset):
    """Preprocessed `pixel_values` and `labels` held in memory."""

    def __init__(self, pixel_values: np.ndarray, labels: np.ndarray):
        self.pixel_values = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32))
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def preprocess(processor: UoEImageProcessor, images, chunk: int = 4096) -> np.ndarray:
    # Once, up front: the PIL backend works image by image, too slow to repeat every epoch.
    out = [
        processor(list(images[i : i + chunk]), return_tensors="np")["pixel_values"]
        for i in range(0, len(images), chunk)
    ]
    return np.concatenate(out)


def split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    held_out = int(round(n * fraction))
    return order[held_out:], order[:held_out]


def load_fashion_mnist(args: DataArguments, processor: UoEImageProcessor, seed: int):
    folder = find_fashion_mnist(args.fashion_mnist_dir)
    train_x = read_idx(folder / "train-images-idx3-ubyte.gz")
    train_y = read_idx(folder / "train-labels-idx1-ubyte.gz")
    test_x = read_idx(folder / "t10k-images-idx3-ubyte.gz")
    test_y = read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    train_idx, val_idx = split(len(train_y), args.validation_split, seed)
    if args.max_train_samples:
        train_idx = train_idx[: args.max_train_samples]
    if args.max_eval_samples:
        val_idx, test_x, test_y = (
            val_idx[: args.max_eval_samples],
            test_x[: args.max_eval_samples],
            test_y[: args.max_eval_samples],
        )
    datasets = {
        "train": ArrayDataset(preprocess(processor, train_x[train_idx]), train_y[train_idx]),
        "validation": ArrayDataset(preprocess(processor, train_x[val_idx]), train_y[val_idx]),
        "test": ArrayDataset(preprocess(processor, test_x), test_y),
    }
    return datasets, FASHION_MNIST_LABELS


def load_image_folder(args: DataArguments, processor: UoEImageProcessor, seed: int):
    from datasets import load_dataset

    if not args.train_dir:
        raise ValueError("--dataset imagefolder needs --train_dir (one sub-folder per class).")
    data_files = {"train": os.path.join(args.train_dir, "**")}
    if args.validation_dir:
        data_files["validation"] = os.path.join(args.validation_dir, "**")
    raw = load_dataset("imagefolder", data_files=data_files)
    labels = raw["train"].features["label"].names
    if "validation" not in raw:
        parts = raw["train"].train_test_split(test_size=args.validation_split, seed=seed, stratify_by_column="label")
        raw["train"], raw["validation"] = parts["train"], parts["test"]
    if args.max_train_samples:
        raw["train"] = raw["train"].select(range(min(args.max_train_samples, len(raw["train"]))))
    if args.max_eval_samples:
        raw["validation"] = raw["validation"].select(range(min(args.max_eval_samples, len(raw["validation"]))))
    datasets = {
        name: ArrayDataset(preprocess(processor, list(split_data["image"])), np.asarray(split_data["label"]))
        for name, split_data in raw.items()
    }
    datasets.setdefault("test", datasets["validation"])
    return datasets, labels


def compute_metrics(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)
    start = time.time()

    if model_args.model_name_or_path:
        processor = UoEImageProcessor.from_pretrained(model_args.model_name_or_path)
    else:
        grey = model_args.num_channels == 1
        mean, std = (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if data_args.dataset == "fashion_mnist" else (0.5, 0.5)
        processor = UoEImageProcessor(
            size={"height": model_args.image_size, "width": model_args.image_size},
            do_convert_grayscale=grey,
            do_convert_rgb=not grey,
            image_mean=[mean] * model_args.num_channels,
            image_std=[std] * model_args.num_channels,
        )
    if data_args.dataset == "fashion_mnist":
        datasets, labels = load_fashion_mnist(data_args, processor, training_args.seed)
    elif data_args.dataset == "imagefolder":
        datasets, labels = load_image_folder(data_args, processor, training_args.seed)
    else:
        raise ValueError(f"--dataset must be `fashion_mnist` or `imagefolder`, got {data_args.dataset!r}.")
    logger.info("data ready in %.1fs: %s", time.time() - start, {k: len(v) for k, v in datasets.items()})

    if model_args.model_name_or_path:
        model = UoEForImageClassification.from_pretrained(model_args.model_name_or_path)
    else:
        config = UoEConfig(
            hidden_size=model_args.hidden_size,
            num_hidden_layers=model_args.num_hidden_layers,
            num_attention_heads=model_args.num_attention_heads,
            attention_top_k=model_args.attention_top_k,
            intermediate_size=model_args.intermediate_size,
            num_mlp_experts=model_args.num_mlp_experts,
            mlp_top_k=model_args.mlp_top_k,
            mlp_type="gelu",
            mlp_bias=True,
            attention_bias=True,
            routing_patch_size=model_args.routing_patch_size,
            data_capacity=model_args.data_capacity,
            router_aux_loss_coef=model_args.router_aux_loss_coef,
            is_causal=False,
            norm_type="layernorm",
            layer_norm_eps=1e-6,
            position_embedding_type=model_args.position_embedding_type,
            image_size=model_args.image_size,
            patch_size=model_args.patch_size,
            num_channels=model_args.num_channels,
            max_position_embeddings=(model_args.image_size // model_args.patch_size) ** 2 + 1,
            use_cache=False,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
        model = UoEForImageClassification(config)
    flops = uoe.estimate_flops_per_token(
        model.config, (model.config.image_size // model.config.patch_size) ** 2 + 1, include_lm_head=False
    )
    logger.info(
        "model: %.2fM parameters, active/dense encoder FLOPs per token %.3f",
        model.num_parameters() / 1e6,
        flops.active_fraction,
    )

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"],
        processing_class=processor,
        compute_metrics=compute_metrics,
    )
    results: dict[str, float] = {}
    if training_args.do_train:
        train_result = trainer.train()
        trainer.save_model()
        results.update({f"train_{k}": v for k, v in train_result.metrics.items()})
    if training_args.do_eval:
        results.update(trainer.evaluate(datasets["validation"], metric_key_prefix="eval"))
        results.update(trainer.evaluate(datasets["test"], metric_key_prefix="test"))
    results["wall_seconds"] = time.time() - start
    results["active_flops_fraction"] = flops.active_fraction
    if trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as handle:
            json.dump(results, handle, indent=2)
        logger.info("results: %s", json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:] or None)
