#!/usr/bin/env python
"""UoE vs the dense encoder on generated ListOps (the long-range task of LRA), at the paper's LRA scale.

    python benchmarks/compare_listops.py --quick   # a few minutes on 2 CPU cores
    python benchmarks/compare_listops.py           # full CPU mode (the run in benchmarks/RESULTS.md)

Data: `benchmarks/listops.py` generates distinct expressions (LRA's generator: MAX, MIN, MED, SM; depth <= 10;
<= 10 arguments; label = value, 10 classes) with one seed, and splits them into train and test (disjoint). LRA uses
lengths 500-2000 and 96k training examples; on 2 CPU cores we use shorter sequences (full mode 100-300 tokens,
quick 50-150) and far fewer examples and steps, so the numbers are not comparable with LRA's (~37% for a
transformer): they compare UoE with its dense counterpart under one small, identical budget.

Models (`--models`), both `UoESequenceClassifier` defined here from the package's bidirectional building blocks
(`uoe.modeling_uoe_vision.UoEEncoderLayer`, `UoERotaryEmbedding`): a token embedding replaces the patch embedding,
a CLS token (first) feeds the linear classifier, rotary positions. Scale: 2 layers, d=64, 2 heads of 32, MLP 128
cut into 4 experts, GELU, LayerNorm.

- `uoe`: 1 of 2 heads and 2 of 4 MLP experts per token (token-level routing, `routing_patch_size=1`).
- `dense`: the same model at full routing (2 of 2 heads, 4 of 4 experts), which by construction computes the dense
  transformer encoder (the routers still run, their gates are all 1). Using the same code rather than a separate
  transformers encoder keeps the embedding, positions, padding and classifier identical, so only routing differs.

The encoder layers take no attention mask (they were written for fixed-size images), so padding is visible to the
model: batches are bucketed by length to keep padding small (the fraction is reported), and evaluation batches are
fixed (test set sorted by length), so evaluation is deterministic. The CLS token is not routed (every head and
expert processes it). The table also gives the majority-class accuracy (ListOps' labels are imbalanced).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import listops  # noqa: E402

from uoe import UoEConfig  # noqa: E402
from uoe.flops import estimate_flops_per_sequence  # noqa: E402
from uoe.modeling_uoe import UoERotaryEmbedding  # noqa: E402
from uoe.modeling_uoe_vision import UoEEncoderLayer, UoEVisionPreTrainedModel  # noqa: E402

MODELS = ("uoe", "dense")
SECTION = "## ListOps (compare_listops.py)"
SHAPE_FIELDS = (  # the config fields recorded with each run
    "hidden_size num_hidden_layers num_attention_heads attention_top_k intermediate_size num_mlp_experts mlp_top_k"
).split()
MODES = {
    "quick": dict(train_samples=3000, test_samples=500, min_length=50, max_length=150, epochs=2, seeds="0"),
    "full": dict(train_samples=9000, test_samples=1000, min_length=100, max_length=300, epochs=3, seeds="0,1"),
}


class UoESequenceClassifier(UoEVisionPreTrainedModel):
    """Bidirectional UoE encoder over token ids with a linear classifier on the first (CLS) token."""

    main_input_name = "input_ids"
    input_modalities = ("text",)
    _no_split_modules = ["UoEEncoderLayer"]

    def __init__(self, config: UoEConfig):
        super().__init__(config)
        if config.is_causal:
            raise ValueError("UoESequenceClassifier is a bidirectional encoder: set `is_causal=False`.")
        if config.mlp_type != "gelu":
            raise ValueError("UoESequenceClassifier uses the vision encoder's GELU experts: set `mlp_type='gelu'`.")
        if config.position_embedding_type != "rope":
            raise ValueError("UoESequenceClassifier uses rotary positions: set `position_embedding_type='rope'`.")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([UoEEncoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary_emb = UoERotaryEmbedding(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must be (batch, seq_len), got shape {tuple(input_ids.shape)}.")
        seq_len = input_ids.shape[1]
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds `max_position_embeddings`={self.config.max_position_embeddings}."
            )
        if (seq_len - 1) % self.config.routing_patch_size:
            raise ValueError(
                f"`routing_patch_size` ({self.config.routing_patch_size}) must divide the tokens after CLS ({seq_len - 1})."
            )
        hidden = self.embed_tokens(input_ids)
        position_ids = torch.arange(seq_len, device=input_ids.device)[None]
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        aux = hidden.new_zeros(2, dtype=torch.float32)
        for layer in self.layers:
            hidden, _, _, layer_aux = layer(hidden, position_embeddings)
            aux = aux + layer_aux
        logits = self.classifier(self.norm(hidden)[:, 0])
        aux = aux / (2 * self.config.num_hidden_layers)
        out = {"logits": logits, "aux_loss": aux[0], "router_z_loss": aux[1]}
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels)
            out["loss"] = loss + self.config.router_aux_loss_coef * aux[0] + self.config.router_z_loss_coef * aux[1]
        return out


def listops_config(name: str, max_length: int) -> UoEConfig:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {list(MODELS)}")
    dense = name == "dense"
    return UoEConfig(
        vocab_size=len(listops.VOCAB),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        attention_top_k=2 if dense else 1,
        intermediate_size=128,
        num_mlp_experts=4,
        mlp_top_k=4 if dense else 2,
        mlp_type="gelu",
        mlp_bias=True,
        attention_bias=True,
        routing_patch_size=1,
        router_aux_loss_coef=0.01,
        is_causal=False,
        norm_type="layernorm",
        layer_norm_eps=1e-6,
        position_embedding_type="rope",
        max_position_embeddings=max_length + 1,
        use_cache=False,
        pad_token_id=listops.PAD_ID,
        num_labels=listops.NUM_CLASSES,
    )


def analytic_flops(config: UoEConfig, lengths: list[int]) -> dict[str, float]:
    """Mean forward FLOPs per sequence over `lengths` (tokens incl. CLS, no padding), active and dense: the encoder
    layers, whose CLS token is not routed (`uoe.flops.estimate_flops_per_sequence`), and the classifier on CLS."""
    head = 2 * config.hidden_size * config.num_labels
    estimates = [estimate_flops_per_sequence(config, length, unrouted_tokens=1) for length in lengths]
    return {
        "active": statistics.fmean(e.active + head for e in estimates),
        "dense": statistics.fmean(e.dense + head for e in estimates),
    }


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------


def make_data(args) -> dict:
    examples = listops.generate(
        args.train_samples + args.test_samples,
        seed=args.data_seed,
        min_length=args.min_length,
        max_length=args.max_length,
        max_depth=args.max_depth,
        max_args=args.max_args,
    )
    train, test = examples[: args.train_samples], examples[args.train_samples :]
    return {
        "train_ids": [listops.encode(e.tokens) for e in train],
        "train_y": torch.tensor([e.label for e in train]),
        "test_ids": [listops.encode(e.tokens) for e in test],
        "test_y": torch.tensor([e.label for e in test]),
        "train_labels": listops.label_counts(train),
        "test_labels": listops.label_counts(test),
    }


def pad_batch(sequences: list[list[int]]) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), listops.PAD_ID, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.tensor(seq)
    return out


def bucketed_batches(lengths: list[int], batch_size: int, generator: torch.Generator, bucket: int = 20) -> list:
    """Shuffle, sort within chunks of `bucket` batches by length, cut into batches, shuffle the batches."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches = []
    for start in range(0, len(order), batch_size * bucket):
        chunk = sorted(order[start : start + batch_size * bucket], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def batch_tensors(ids: list[list[int]], y: torch.Tensor, index: list[int]) -> tuple[dict, torch.Tensor]:
    return {"input_ids": pad_batch([ids[i] for i in index])}, y[index]


def padding_fraction(ids: list[list[int]], batches: list[list[int]]) -> float:
    real = sum(len(ids[i]) for b in batches for i in b)
    padded = sum(len(b) * max(len(ids[i]) for i in b) for b in batches)
    return 1 - real / padded


# ------------------------------------------------------------------------------------------------------------------
# Run
# ------------------------------------------------------------------------------------------------------------------


def forward_logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(inputs["input_ids"])["logits"]


def training_loss(model: nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    return model(inputs["input_ids"], labels=labels)["loss"]


def run_one(name: str, seed: int, data: dict, args) -> dict:
    config = listops_config(name, args.max_length)
    torch.manual_seed(seed)
    model = UoESequenceClassifier(config)
    test_lengths = [len(s) for s in data["test_ids"]]
    flops = analytic_flops(config, test_lengths)
    test_order = sorted(range(len(test_lengths)), key=lambda i: test_lengths[i])  # fixed batches: deterministic
    probe = pad_batch([data["test_ids"][test_order[len(test_order) // 2]]])  # the test expression of median length
    counted = harness.counted_forward_flops(model, lambda: forward_logits(model, {"input_ids": probe}))
    counted_analytic = analytic_flops(config, [probe.shape[1]])

    train_lengths = [len(s) for s in data["train_ids"]]
    steps_per_epoch = math.ceil(len(train_lengths) / args.batch_size)
    padding = []

    def batches(epoch: int):
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)  # same batches for every model
        plan = bucketed_batches(train_lengths, args.batch_size, generator)
        padding.append(padding_fraction(data["train_ids"], plan))
        return (batch_tensors(data["train_ids"], data["train_y"], b) for b in plan)

    stats = harness.train_epochs(model, batches, training_loss, args, steps_per_epoch)
    tokens_trained = sum(train_lengths) * args.epochs
    test_plan = [test_order[i : i + args.eval_batch_size] for i in range(0, len(test_order), args.eval_batch_size)]
    evaluation = harness.evaluate(
        model, (batch_tensors(data["test_ids"], data["test_y"], b) for b in test_plan), forward_logits
    )
    return {
        "seed": seed,
        "config": {k: getattr(config, k) for k in SHAPE_FIELDS},
        "parameters": harness.count_parameters(model),
        "analytic_flops": flops["active"],
        "analytic_flops_dense_equivalent": flops["dense"],
        "counted_flops_probe": counted,
        "analytic_flops_probe": counted_analytic["active"],
        "probe_length": probe.shape[1],
        "train_padding_fraction": statistics.fmean(padding),
        "train_tokens_per_s": tokens_trained / stats["train_seconds"],
        **stats,
        **evaluation,
    }


LABELS = {"uoe": "UoE (1/2 heads, 2/4 experts)", "dense": "dense (same model, full routing)"}


SUMMARY_FIELDS = (
    ("config", "parameters", "analytic_flops", "analytic_flops_dense_equivalent", "counted_flops_probe",
     "analytic_flops_probe", "probe_length"),
    {"accuracy": "accuracy", "final_train_loss": "final_loss", "train_sequences_per_s": "train_examples_per_s",
     "train_tokens_per_s": "train_tokens_per_s", "eval_sequences_per_s": "eval_examples_per_s",
     "train_padding_fraction": "train_padding_fraction"},
)  # fmt: skip


def probe_length(results: dict) -> int | None:
    """Length of the test expression the FLOP counter ran on (the median one; the same for every model)."""
    return next((row["probe_length"] for row in results["summary"] if row["runs"]), None)


def markdown(results: dict) -> str:
    cfg = results["settings"]
    rows = []
    for row in results["summary"]:
        if not row["runs"]:
            rows.append([LABELS[row["model"]], "not run: " + "; ".join(row["failed"])] + [""] * 6)
            continue
        rows.append([
            LABELS[row["model"]], harness.fmt_mean(row["accuracy"], 100, 2),
            harness.fmt_mean(row["final_train_loss"], 1, 3), f"{row['parameters']:,}",
            harness.fmt_count(row["analytic_flops"]),
            f"{harness.fmt_count(row['counted_flops_probe'])} / {harness.fmt_count(row['analytic_flops_probe'])}",
            harness.fmt_mean(row["train_sequences_per_s"], 1, 1), harness.fmt_mean(row["eval_sequences_per_s"], 1, 0),
        ])  # fmt: skip
    majority = results["majority_class"]
    rows.append(
        [f"majority class ({majority['label']}, no model)", f"{100 * majority['test_accuracy']:.2f}"] + [""] * 6
    )
    header = ["model", "test accuracy %", "final train loss", "parameters", "FLOPs/sequence (analytic, mean)",
              f"counted / analytic FLOPs at length {probe_length(results)}", "train sequences/s", "eval sequences/s"]  # fmt: skip
    seeds = ", ".join(str(s) for s in cfg["seeds"])
    padding = [v for row in results["summary"] if row["runs"] for v in row["train_padding_fraction"]]
    settings = (
        f"ListOps from `benchmarks/listops.py` (data seed {cfg['data_seed']}): {cfg['train_samples']:,} training and "
        f"{cfg['test_samples']:,} test expressions (disjoint), {cfg['min_length']}-{cfg['max_length']} tokens "
        f"(mean {results['mean_test_length']:.0f} in test; LRA uses 500-2000), max_depth {cfg['max_depth']} (brackets "
        f"nest <= {cfg['max_depth'] - 1}), <= {cfg['max_args']} arguments. {cfg['epochs']} epochs, batch "
        f"{cfg['batch_size']}, AdamW lr {cfg['lr']:g}, weight decay {cfg['weight_decay']:g}, {cfg['warmup_steps']} "
        f"warm-up steps then cosine, grad clip 1.0, identical for both models; seeds {seeds} (mean ± sample std). "
        "Both: 2 layers, d=64, 2 heads, MLP 128 in 4 experts, rotary positions, CLS classifier; the dense model is "
        "the same code at full routing."
    )
    notes = [
        "- FLOPs are forward FLOPs per sequence (multiply-add = 2). Analytic: UoE's active FLOPs "
        "(`uoe.estimate_flops_per_token` at each test sequence's length, plus the dense CLS token and the head), "
        "averaged over the test set, without padding. Counted: `FlopCounterMode` on one test sequence of median "
        "length (what the code executes); UoE runs its gathered path (only the selected pairs, attention over "
        "each head's compacted lists, o_proj as one dense product, CLS through every expert), so its count lies "
        "between its active and its dense-equivalent FLOPs.",
        f"- Padding: the encoder layers take no attention mask, so pads are visible tokens; length bucketing kept "
        f"them to {100 * statistics.fmean(padding):.1f}% of training tokens."
        if padding
        else "- Padding: n/a.",
        f"- Label distribution (test): {results['test_label_counts']}.",
    ]
    return harness.section_text(results, [settings, "", harness.markdown_table(header, rows)], notes)


def _check_listops_arguments(args) -> None:
    harness.check_positive("min_length", args.min_length)
    if args.max_length < args.min_length:
        raise ValueError(f"--max_length must be >= --min_length ({args.min_length}), got {args.max_length}.")
    if args.max_depth < 2:
        raise ValueError(f"--max_depth must be >= 2, got {args.max_depth}.")
    if args.max_args < 2:
        raise ValueError(f"--max_args must be >= 2, got {args.max_args}.")


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_arguments(
        parser, MODELS, batch_size=32, eval_batch_size=100, lr=1e-3, weight_decay=0.01, json_stem="listops"
    )
    parser.add_argument("--min_length", type=int, default=None, help="shortest expression in tokens")
    parser.add_argument("--max_length", type=int, default=None, help="longest expression in tokens")
    parser.add_argument("--max_depth", type=int, default=10)
    parser.add_argument("--max_args", type=int, default=10)
    parser.add_argument("--data_seed", type=int, default=0)
    return harness.parse_common_arguments(parser, argv, MODES, MODELS, _check_listops_arguments)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    env = harness.environment("compare_listops.py", argv)
    data = make_data(args)
    test_lengths = [len(s) - 1 for s in data["test_ids"]]
    print(
        f"data: {len(data['train_y'])} train / {len(data['test_y'])} test expressions in "
        f"{time.perf_counter() - start:.1f}s, mean test length {statistics.fmean(test_lengths):.0f}",
        flush=True,
    )
    majority = max(data["train_labels"], key=lambda label: data["train_labels"][label])
    results = {
        "benchmark": "compare_listops",
        "environment": env,
        "settings": {
            **harness.common_settings(args),
            **{key: getattr(args, key) for key in ("min_length", "max_length", "max_depth", "max_args", "data_seed")},
        },
        "mean_test_length": statistics.fmean(test_lengths),
        "train_label_counts": data["train_labels"],
        "test_label_counts": data["test_labels"],
        "majority_class": {
            "label": majority,
            "test_accuracy": float((data["test_y"] == majority).float().mean()),
        },
    }
    results["runs"] = harness.run_grid(
        lambda name, seed: run_one(name, seed, data, args),
        args.model_list,
        args.seed_list,
        lambda run: (
            f"accuracy {run['accuracy']:.4f}, train loss {run['first_loss']:.3f} -> {run['final_loss']:.3f}, "
            f"{run['train_examples_per_s']:.1f} train seq/s"
        ),
    )
    return harness.finish_run(results, args, start, SUMMARY_FIELDS, markdown, SECTION)


if __name__ == "__main__":
    sys.exit(main())
