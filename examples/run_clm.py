#!/usr/bin/env python
"""Train (or fine-tune) a Union-of-Experts causal language model on plain-text files.

In the style of transformers' `examples/pytorch/language-modeling/run_clm.py`, cut down to what a UoE
model needs and meant to be read top to bottom:

    arguments -> text files -> tokenizer (a byte-level BPE trained here unless one is given)
    -> config and model -> blocks of tokens -> Trainer (+ router statistics) -> evaluation (perplexity next
    to a unigram baseline) -> checkpoint (safetensors, tokenizer, modeling code, model card, plots)
    -> reload with the Auto classes and sample.

From the repository root, after `bash scripts/setup.sh`:

    .venv/bin/python -c "from uoe.data import write_train_validation_split as w; w('data/shakespeare')"
    .venv/bin/python examples/run_clm.py --output_dir runs/clm \
        --train_file data/shakespeare/train.txt --validation_file data/shakespeare/validation.txt \
        --config_overrides "hidden_size=128,num_hidden_layers=2" --max_steps 200

Two CPU processes (DDP over gloo); add `--fsdp full_shard --fsdp_config examples/fsdp_config.json` for FSDP:

    .venv/bin/torchrun --nproc_per_node 2 examples/run_clm.py ...same arguments...

Every `TrainingArguments` flag works (`--resume_from_checkpoint last`, `--push_to_hub --hub_model_id ...`).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch.distributed.tensor import DTensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    EvalPrediction,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

import uoe  # noqa: F401  (registers the "uoe" model type with the Auto classes and marks its code for saving)
from uoe import UoEConfig, UoEForCausalLM, UoERouterStatsCallback, estimate_flops_per_token
from uoe.configuration_uoe import RECIPES
from uoe.model_card import check_dataset_id, write_model_card

logger = logging.getLogger("run_clm")

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "uoe_causal_lm.md"
END_OF_TEXT = "<|endoftext|>"

# A small UoE for training from scratch; `--config_overrides` changes any field.
DEFAULT_CONFIG = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    attention_top_k=2,
    intermediate_size=512,
    num_mlp_experts=4,
    mlp_top_k=2,
)

# Defaults suited to training a small model from scratch; every one can be changed on the command line.
TRAINING_DEFAULTS = dict(
    output_dir="runs/clm",
    per_device_train_batch_size=16,
    per_device_eval_batch_size=16,
    learning_rate=1e-3,
    lr_scheduler_type="cosine",
    warmup_steps=0.05,  # < 1 means a fraction of the training steps
    weight_decay=0.1,
    logging_steps=10,
    eval_strategy="steps",
    eval_steps=100,
    save_steps=500,
    save_total_limit=2,
    include_num_input_tokens_seen=True,
    report_to="none",
)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Arguments
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A UoE checkpoint folder or Hub id to start from; leave unset to train from scratch."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Comma-separated `field=value` config changes, e.g. `hidden_size=128,num_hidden_layers=2`."},
    )
    recipe: str | None = field(
        default=None,
        metadata={
            "help": "Components of a model trained from scratch: a recipe of `UoEConfig.from_recipe` (gates, router "
            "scores, balance loss, norm placement, layer sharing, shared experts, chains; `paper` is UoEConfig's "
            "defaults). --config_overrides win over it. Default: UoEConfig's defaults.",
            "choices": list(RECIPES),
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer folder or Hub id. Default: the checkpoint's tokenizer, or a new byte-level BPE "
            "trained on --train_file."
        },
    )
    tokenizer_vocab_size: int = field(default=4096, metadata={"help": "Vocabulary of a newly trained tokenizer."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from a Hub model repository."})


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "A plain-text (UTF-8) training file."})
    validation_file: str | None = field(
        default=None, metadata={"help": "A plain-text validation file; default: the tail of --train_file."}
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Share of --train_file held out (its end) when there is no --validation_file."}
    )
    block_size: int = field(default=256, metadata={"help": "Tokens per training sequence."})
    max_train_chars: int | None = field(
        default=None, metadata={"help": "Use only the first N characters of each file (quick runs)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most N blocks."})
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset ID of the training text, for the model card's `datasets` metadata and its model-index "
            "result; leave unset for text that is not a Hub dataset (the card's metadata then names no dataset)."
        },
    )
    dataset_description: str | None = field(
        default=None,
        metadata={"help": "The training data, as the model card's text describes it; default: the files' names."},
    )


@dataclass
class RunArguments:
    max_train_minutes: float | None = field(
        default=None, metadata={"help": "Stop training gracefully after this many minutes of wall time."}
    )
    sample_prompt: str = field(default="\n", metadata={"help": "Prompt of the sample generated after training."})
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Length of the sample; 0 skips it."})
    plots: bool = field(default=True, metadata={"help": "Write loss and expert-load PNGs to OUTPUT_DIR/plots."})


# ---------------------------------------------------------------------------------------------------------------------
# 2. Text, tokenizer, config: the helpers `main` calls, in the order it calls them
# ---------------------------------------------------------------------------------------------------------------------


def read_text_file(path: str | None, argument: str, max_chars: int | None = None) -> str:
    """Read a UTF-8 text file, failing with a `ValueError` that names the command-line argument."""
    if path is None:
        raise ValueError(f"{argument} is required: pass a plain-text file.")
    if not Path(path).is_file():
        raise ValueError(f"{argument}: file not found: {path}")
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if max_chars is not None:
        text = text[:max_chars]
    if not text.strip():
        raise ValueError(f"{argument}: {path} is empty.")
    return text


def parse_config_overrides(overrides: str | None) -> dict[str, Any]:
    """Parse `"hidden_size=128,gate_mode=weighted"` into typed values, rejecting fields UoEConfig does not have."""
    if not overrides:
        return {}
    known = sorted(set(inspect.signature(UoEConfig.__init__).parameters) - {"self", "kwargs"})
    parsed: dict[str, Any] = {}
    for item in overrides.split(","):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--config_overrides: expected `field=value` pairs separated by commas, got {item!r}.")
        if key not in known:
            raise ValueError(f"--config_overrides: unknown config field {key!r}; UoEConfig fields are {known}.")
        parsed[key] = _parse_value(raw.strip())
    return parsed


def _parse_value(raw: str) -> Any:
    # JSON covers numbers, true/false/null and quoted strings; Python spellings are accepted too.
    python_literals = {"True": True, "False": False, "None": None}
    if raw in python_literals:
        return python_literals[raw]
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def train_bpe_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE trained on `text`: no unknown tokens, whitespace kept exactly."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT
    )


def build_config(model_args: ModelArguments, overrides: dict[str, Any], tokenizer) -> UoEConfig:
    """The checkpoint's config (or the small default) with `--config_overrides` applied and validated."""
    if model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
        )
        # Rebuilding through the constructor re-runs UoEConfig's checks on the changed values.
        return type(config).from_dict({**config.to_dict(), **overrides}) if overrides else config
    special = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    fields = {**DEFAULT_CONFIG, "vocab_size": len(tokenizer), **special, **overrides}
    if model_args.recipe is not None:
        try:
            return UoEConfig.from_recipe(model_args.recipe, **fields)
        except ValueError as error:
            raise ValueError(f"--recipe {model_args.recipe}: {error}") from error
    return UoEConfig(**fields)


def check_recipe(model_args: ModelArguments) -> None:
    """A recipe chooses the architecture of a new model; a checkpoint already has one."""
    if model_args.recipe is not None and model_args.model_name_or_path:
        raise ValueError(
            f"--recipe {model_args.recipe}: a recipe builds a model from scratch; --model_name_or_path "
            f"{model_args.model_name_or_path} already has its architecture (change fields with --config_overrides)."
        )


def check_vocabulary(tokenizer, config: UoEConfig) -> None:
    """Every token id must have an embedding row; a larger model vocabulary is fine (padding rows)."""
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"--tokenizer_name: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{config.vocab_size} (from --model_name_or_path / --config_overrides); ids >= vocab_size would have "
            "no embedding. Use the model's own tokenizer or a model with a large enough vocab_size."
        )


class TokenBlocks(torch.utils.data.Dataset):
    """Consecutive, non-overlapping blocks of `block_size` tokens; the model shifts the labels itself."""

    def __init__(self, ids: torch.Tensor, block_size: int, max_blocks: int | None = None):
        num_blocks = len(ids) // block_size
        if max_blocks is not None:
            num_blocks = min(num_blocks, max_blocks)
        self.blocks = ids[: num_blocks * block_size].view(num_blocks, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def encode(tokenizer, text: str) -> torch.Tensor:
    # Line by line (batched in Rust), keeping the newlines: the same ids as one call on the whole text, minus
    # the warning about sequences longer than the model.
    lines = text.splitlines(keepends=True)
    ids = tokenizer(lines, add_special_tokens=False)["input_ids"]
    return torch.tensor([token for line in ids for token in line], dtype=torch.long)


def unigram_perplexity(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> float:
    """exp of the cross-entropy of `eval_ids` under add-one smoothed unigram frequencies of `train_ids`."""
    counts = torch.bincount(train_ids.flatten(), minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    return math.exp(-log_probs[eval_ids.flatten()].mean().item())


# ---------------------------------------------------------------------------------------------------------------------
# 3. Evaluation metrics and callbacks
# ---------------------------------------------------------------------------------------------------------------------


def token_losses(outputs, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of next-token prediction, so that perplexity leaves out the router losses
    (the model's `loss` adds `router_aux_loss_coef * aux_loss`). Keeps evaluation memory at one float per token."""
    # Trainer hands over every non-loss output (aux_loss, logits, router_z_loss); the logits are the 3-D one.
    logits = next(t for t in outputs if t.dim() == 3) if isinstance(outputs, (tuple, list)) else outputs
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    return F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")


def perplexity_metrics(prediction: EvalPrediction) -> dict[str, float]:
    losses, labels = prediction.predictions, prediction.label_ids
    mask = labels[:, 1:] != -100
    token_loss = float(np.asarray(losses)[mask].mean())
    return {"token_loss": token_loss, "perplexity": math.exp(token_loss)}


class TimeBudgetCallback(TrainerCallback):
    """Ends training gracefully after `minutes` of wall time. All ranks agree on the step to stop at (one
    tiny all-reduce per step), so no rank is left waiting in a collective."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.start = time.monotonic()
        self.stopped_at_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        over = torch.tensor(float(time.monotonic() - self.start > self.seconds), device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(over, op=torch.distributed.ReduceOp.MAX)
        if over.item() and not control.should_training_stop:
            control.should_training_stop = True
            self.stopped_at_step = state.global_step
            logger.warning(f"--max_train_minutes reached: stopping at step {state.global_step} of {state.max_steps}.")


class ThroughputCallback(TrainerCallback):
    """Training tokens per second of this session, leaving out the evaluations run inside `train`."""

    def __init__(self) -> None:
        self.tokens_per_second = 0.0
        self._start, self._start_tokens, self._eval_seconds = 0.0, 0, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start, self._start_tokens, self._eval_seconds = time.perf_counter(), state.num_input_tokens_seen, 0.0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._eval_seconds += (metrics or {}).get("eval_runtime", 0.0)

    def on_train_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self._start - self._eval_seconds
        self.tokens_per_second = (state.num_input_tokens_seen - self._start_tokens) / max(seconds, 1e-9)


def enable_fsdp_on_cpu(trainer: Trainer) -> None:
    """Make `--fsdp` shard on CPU ranks too.

    accelerate only turns its FSDP plugin on for accelerator ranks; on gloo CPU ranks it silently falls back to
    DDP. FSDP2 (`fully_shard`) itself runs on CPU, so switch accelerate's shared state to FSDP before `train`
    prepares the model (`AcceleratorState` re-reads `PartialState`, so both are set).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise ValueError(f"--fsdp was given but accelerate chose {state.distributed_type}; start with torchrun.")
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if plugin.fsdp_version != 2:
        raise ValueError('--fsdp on CPU ranks needs FSDP2 (`"version": 2` in --fsdp_config).')
    state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
    PartialState().distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def resolve_checkpoint(training_args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint last` (or `true`) means the newest checkpoint in --output_dir."""
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None:
        return None
    if checkpoint.lower() in ("last", "true"):
        last = get_last_checkpoint(training_args.output_dir) if Path(training_args.output_dir).is_dir() else None
        if last is None:
            raise ValueError(f"--resume_from_checkpoint {checkpoint}: no checkpoint in {training_args.output_dir}.")
        return last
    if not Path(checkpoint).is_dir():
        raise ValueError(f"--resume_from_checkpoint: folder not found: {checkpoint}")
    return checkpoint


# ---------------------------------------------------------------------------------------------------------------------
# 4. The run
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, RunArguments, TrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, RunArguments, TrainingArguments))
    # Without an accelerator, accelerate only starts gloo ranks under torchrun when told to use the CPU.
    parser.set_defaults(**TRAINING_DEFAULTS, use_cpu=not torch.accelerator.is_available())
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, run_args, training_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    rank, world_size = training_args.process_index, training_args.world_size
    logger.info(f"Process rank {rank} of world size {world_size}, device {training_args.device}")

    # Cheap checks first, so bad input fails before any training.
    train_text = read_text_file(data_args.train_file, "--train_file", data_args.max_train_chars)
    if data_args.validation_file is not None:
        validation_text = read_text_file(data_args.validation_file, "--validation_file", data_args.max_train_chars)
    else:
        if not 0 < data_args.validation_split_percentage < 100:
            raise ValueError("--validation_split_percentage must be in (0, 100).")
        cut = len(train_text) * (100 - data_args.validation_split_percentage) // 100
        train_text, validation_text = train_text[:cut], train_text[cut:]
    if data_args.dataset_name is not None:
        try:
            check_dataset_id(data_args.dataset_name)
        except ValueError as error:
            raise ValueError(f"--dataset_name: {error}") from error
    overrides = parse_config_overrides(model_args.config_overrides)
    check_recipe(model_args)
    checkpoint = resolve_checkpoint(training_args)
    set_seed(training_args.seed)

    # Tokenizer: given, from the checkpoint, or trained here once (by rank 0, which the other ranks wait for).
    output_dir = Path(training_args.output_dir)
    tokenizer_source = model_args.tokenizer_name or checkpoint or model_args.model_name_or_path
    if tokenizer_source is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=model_args.trust_remote_code)
    else:
        with training_args.main_process_first(local=False, desc="training the tokenizer"):
            if rank == 0:
                started = time.perf_counter()
                tokenizer = train_bpe_tokenizer(train_text, model_args.tokenizer_vocab_size)
                tokenizer.save_pretrained(output_dir)
                logger.info(f"Trained a {len(tokenizer)}-token BPE in {time.perf_counter() - started:.1f} s")
            else:
                tokenizer = AutoTokenizer.from_pretrained(output_dir)

    # Config and model.
    config = build_config(model_args, overrides, tokenizer)
    check_vocabulary(tokenizer, config)
    if data_args.block_size > config.max_position_embeddings:
        raise ValueError(
            f"--block_size {data_args.block_size} exceeds the model's max_position_embeddings "
            f"({config.max_position_embeddings})."
        )
    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, config=config, trust_remote_code=model_args.trust_remote_code
        )
    else:
        model = UoEForCausalLM(config)
    num_parameters = model.num_parameters()
    flops = estimate_flops_per_token(config, data_args.block_size)
    logger.info(f"{type(model).__name__}: {num_parameters:,} parameters, {flops.active:,.0f} active FLOPs/token")

    # Blocks of tokens.
    train_ids, validation_ids = encode(tokenizer, train_text), encode(tokenizer, validation_text)
    train_dataset = TokenBlocks(train_ids, data_args.block_size)
    eval_dataset = TokenBlocks(validation_ids, data_args.block_size, data_args.max_eval_samples)
    for dataset, argument, ids in (
        (train_dataset, "--train_file", train_ids),
        (eval_dataset, "--validation_file", validation_ids),
    ):
        if len(dataset) == 0:
            raise ValueError(
                f"{argument}: {len(ids)} tokens, fewer than one block of --block_size {data_args.block_size}."
            )
    # The baseline scores exactly the tokens the model predicts in evaluation (each block's 2nd token onwards).
    unigram = unigram_perplexity(train_ids, eval_dataset.blocks[:, 1:], len(tokenizer))

    # Training.
    throughput = ThroughputCallback()
    callbacks: list[TrainerCallback] = [UoERouterStatsCallback(), throughput]
    if run_args.max_train_minutes is not None:
        callbacks.append(TimeBudgetCallback(run_args.max_train_minutes))
    model.config.use_cache = False  # no KV cache while training and evaluating; restored before saving
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=perplexity_metrics,
        preprocess_logits_for_metrics=token_losses,
        callbacks=callbacks,
    )
    if training_args.fsdp and not trainer.is_fsdp_enabled:
        enable_fsdp_on_cpu(trainer)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    state = trainer.state
    # Evaluate the final weights, unless `eval_steps` just did.
    last_eval = next((entry for entry in reversed(state.log_history) if "eval_perplexity" in entry), None)
    if last_eval is not None and last_eval["step"] == state.global_step:
        eval_metrics = {key: value for key, value in last_eval.items() if key.startswith("eval_")}
    else:
        eval_metrics = trainer.evaluate()
    model.config.use_cache = True
    trainer.save_model()  # safetensors, config with auto_map, the modeling code files and the tokenizer
    # Read off the trained model itself: FSDP2 turns every parameter into a sharded DTensor.
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    distributed = "fsdp" if sharded else "ddp" if world_size > 1 else "none"
    metrics = {
        **train_result.metrics,
        **eval_metrics,
        "eval_unigram_perplexity": unigram,
        "world_size": world_size,
        "distributed": distributed,
    }
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)
    trainer.save_state()  # trainer_state.json with the log history (losses and router statistics)

    global_batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world_size
    results: dict[str, Any] = {
        "validation_perplexity": eval_metrics["eval_perplexity"],
        "validation_token_loss": eval_metrics["eval_token_loss"],
        "unigram_perplexity": unigram,
        "train_loss": next((e["loss"] for e in reversed(state.log_history) if "loss" in e), train_result.training_loss),
        "num_parameters": num_parameters,
        "active_flops_per_token": flops.active,
        "dense_flops_per_token": flops.dense,
        "global_step": state.global_step,
        "train_tokens": int(state.num_input_tokens_seen),
        "train_tokens_per_second": throughput.tokens_per_second,
        "train_runtime_s": train_result.metrics["train_runtime"],
        "block_size": data_args.block_size,
        "world_size": world_size,
        "distributed": distributed,
        "global_batch_size": global_batch,
        "tokenizer_vocab_size": len(tokenizer),
        "hardware": describe_hardware(training_args, world_size),
        "output_dir": str(output_dir.resolve()),
        "recipe": model_args.recipe,
        "recipe_summary": RECIPES[model_args.recipe].summary if model_args.recipe else None,
    }

    if trainer.is_world_process_zero():
        if trainer.is_fsdp_enabled:
            resave_without_fsdp_class(output_dir)
        results["sample"] = sample_from_checkpoint(output_dir, run_args, training_args.seed)
        if run_args.plots:
            from plot_router_logs import plot_run  # noqa: PLC0415  (matplotlib only when plotting)

            results["plots"] = [str(p) for p in plot_run(output_dir / "trainer_state.json", output_dir / "plots")]
        write_model_card(
            output_dir,
            config,
            results,
            model_name=training_args.hub_model_id or output_dir.name,
            model_id=training_args.hub_model_id or str(output_dir),
            dataset_description=data_args.dataset_description or describe_data_files(data_args),
            dataset_id=data_args.dataset_name,
            base_model=model_args.model_name_or_path if _is_hub_id(model_args.model_name_or_path) else None,
            command=" ".join(shlex.quote(a) for a in ["python", *sys.argv]),
            sample=results["sample"],
            sample_prompt=run_args.sample_prompt,
            template_path=MODEL_CARD_TEMPLATE,
        )
        if training_args.push_to_hub:
            # Trainer pushed in `save_model` with its own generic card; push the final folder (our card, plots).
            from huggingface_hub import upload_folder

            upload_folder(
                repo_id=trainer.hub_model_id,
                folder_path=output_dir,
                ignore_patterns=["_*", "checkpoint-*"],
                token=training_args.hub_token,
                commit_message="UoE model card and plots",
            )
        print_summary(results)
    print(f"[rank {rank}/{world_size}] finished: {state.global_step} steps", flush=True)
    if torch.distributed.is_initialized():
        # Wait for rank 0 (saving, sampling) and shut gloo down cleanly: a rank that exits with the process
        # group alive can abort ("terminate called without an active exception") and fail the whole launch.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return results


def describe_data_files(data_args: DataArguments) -> str:
    """The model card's description of training data given only as files: their names."""
    description = f"the text file `{Path(data_args.train_file).name}`"
    if data_args.validation_file:
        return f"{description} (validation: `{Path(data_args.validation_file).name}`)"
    return f"{description} (validation: its last {data_args.validation_split_percentage}%)"


def resave_without_fsdp_class(output_dir: Path) -> None:
    """FSDP2's `fully_shard` swaps the model's class for a generated `FSDPUoEForCausalLM` defined in torch, so
    `save_pretrained` wrote torch's `_fsdp_*.py` files as the "modeling code" and pointed `auto_map` at them.
    Save again from a plain instance, which writes `modeling_uoe.py` and the right `auto_map`."""
    model = AutoModelForCausalLM.from_pretrained(output_dir)  # `import uoe` makes this the plain UoEForCausalLM
    for stray in output_dir.glob("_fsdp_*.py"):
        stray.unlink()
    model.save_pretrained(output_dir)


def sample_from_checkpoint(output_dir: Path, run_args: RunArguments, seed: int) -> str:
    """Reload the saved folder the way a user would (Auto classes) and sample from it."""
    if run_args.sample_max_new_tokens <= 0:
        return ""
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    model = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    inputs = tokenizer(run_args.sample_prompt, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        tokens = model.generate(
            **inputs, max_new_tokens=run_args.sample_max_new_tokens, do_sample=True, temperature=0.8, top_k=50
        )
    return tokenizer.decode(tokens[0], skip_special_tokens=True)


def describe_hardware(training_args: TrainingArguments, world_size: int) -> str:
    device = training_args.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine()} CPU, {torch.get_num_threads()} threads per process"
    return f"{world_size} x {name}"


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not Path(name).exists() and name.count("/") == 1


def print_summary(results: dict[str, Any]) -> None:
    flops_share = results["active_flops_per_token"] / results["dense_flops_per_token"]
    lines = [
        f"parameters          {results['num_parameters']:,}",
        f"FLOPs per token     {results['active_flops_per_token'] / 1e6:.2f} M active vs "
        f"{results['dense_flops_per_token'] / 1e6:.2f} M dense ({flops_share:.0%}), sequence {results['block_size']}",
        f"training            {results['global_step']} steps, {results['train_tokens']:,} tokens, "
        f"{results['train_tokens_per_second']:,.0f} tokens/s, {results['train_runtime_s']:.0f} s",
        f"validation          perplexity {results['validation_perplexity']:.2f} "
        f"(unigram baseline {results['unigram_perplexity']:.2f})",
        f"saved to            {results['output_dir']}",
    ]
    if results.get("recipe"):
        lines.insert(0, f"recipe              {results['recipe']} (UoEConfig.from_recipe)")
    if results.get("sample"):
        sample = re.sub(r"\n\s*\n", "\n", results["sample"].strip())[:300]  # blank lines squeezed for the console
        lines.append("sample              " + sample.replace("\n", "\n                    "))
    print("\n".join(["", "=" * 30 + " UoE run summary " + "=" * 30, *lines, "=" * 77]), flush=True)


if __name__ == "__main__":
    main()
