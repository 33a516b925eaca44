"""Checks that `tests/test_distributed.py` runs on 2 CPU ranks under `torchrun` (gloo).

    torchrun --nproc_per_node 2 tests/distributed_checks.py tp MODEL_DIR... OUT_DIR
    torchrun --nproc_per_node 2 tests/distributed_checks.py pp MODEL_DIR OUT_DIR
    torchrun --nproc_per_node 2 tests/distributed_checks.py trainer {ddp,fsdp} MODEL_DIR OUT_DIR
    python tests/distributed_checks.py trainer single MODEL_DIR OUT_DIR

Every rank writes what it measured to `OUT_DIR/rank{R}.json` (the trainer check also saves the trained model);
the test compares it with a single-process run of the same model and data.
"""

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import DistributedConfig

from uoe import UoEConfig, UoEForCausalLM, UoEForImageClassification


def batch(vocab_size: int) -> dict[str, torch.Tensor]:
    """Two sequences of 40 tokens (long enough for the gathered paths on CPU), the second left-padded by 5."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab_size, (2, 40), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def image_batch(config: UoEConfig) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    size = (2, config.num_channels, config.image_size, config.image_size)
    return {
        "pixel_values": torch.randn(size, generator=generator),
        "labels": torch.randint(0, config.num_labels, (2,), generator=generator),
    }


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def max_error(tensor: torch.Tensor, reference: torch.Tensor) -> float:
    return float((full(tensor) - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def tensor_parallel(model_dir: str, out_dir: Path) -> dict:
    """The causal LM, or the image classifier when the saved config has an `image_size`."""
    config = UoEConfig.from_pretrained(model_dir)
    causal = config.image_size is None
    model_class = UoEForCausalLM if causal else UoEForImageClassification
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 5.24 prefers distributed_config=DistributedConfig(...)
        model = model_class.from_pretrained(model_dir, tp_plan="auto")
    reference = model_class.from_pretrained(model_dir)
    inputs = batch(config.vocab_size) if causal else image_batch(config)
    report = {
        "params": {
            name: {
                "local_shape": list(param.to_local().shape if isinstance(param, DTensor) else param.shape),
                "full_shape": list(param.shape),
                "dtensor": isinstance(param, DTensor),
            }
            for name, param in model.named_parameters()
        }
    }

    model.eval(), reference.eval()
    with torch.no_grad():
        out = model(**inputs, output_router_logits=True)
        ref = reference(**inputs, output_router_logits=True)
    report["eval_logits_error"] = max_error(out.logits, ref.logits)
    report["eval_loss"], report["eval_loss_reference"] = out.loss.item(), ref.loss.item()
    report["aux_loss"], report["aux_loss_reference"] = out.aux_loss.item(), ref.aux_loss.item()

    model.save_pretrained(out_dir / "saved")  # every rank: the shards are gathered for rank 0 to write

    model.train(), reference.train()
    out, ref = model(**inputs), reference(**inputs)
    out.loss.backward()
    ref.loss.backward()
    report["train_loss"], report["train_loss_reference"] = out.loss.item(), ref.loss.item()
    reference_params = dict(reference.named_parameters())
    report["grads"] = {  # [max |difference|, max |reference|]
        name: [float((full(param.grad) - reference_params[name].grad).abs().max()),
               float(reference_params[name].grad.abs().max())]
        for name, param in model.named_parameters()
    }  # fmt: skip

    if not causal:
        return report
    model.eval(), reference.eval()
    prompt = inputs["input_ids"][:1, :8]
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    report["generated"] = generated.tolist()
    report["generated_reference"] = reference.generate(prompt, max_new_tokens=6, do_sample=False).tolist()
    return report


def pipeline_parallel(model_dir: str) -> dict:
    model = UoEForCausalLM.from_pretrained(model_dir, distributed_config=DistributedConfig(pp_size=2))
    reference = UoEForCausalLM.from_pretrained(model_dir).eval()
    inputs = batch(model.config.vocab_size)
    inputs.pop("labels")
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
        reference_logits = reference(**inputs).logits
    layers = [type(layer).__name__ for layer in model.model.layers]
    return {"layers": layers, "logits_error": max_error(logits, reference_logits)}


def training_data(vocab_size: int, count: int = 12, length: int = 16) -> list[dict[str, torch.Tensor]]:
    """Right-padded sequences of different lengths, so that ranks hold different numbers of tokens."""
    generator = torch.Generator().manual_seed(2)
    examples = []
    for index in range(count):
        input_ids = torch.randint(0, vocab_size, (length,), generator=generator)
        attention_mask = (torch.arange(length) < length - 3 * (index % 4)).long()
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        examples.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return examples


def trainer(strategy: str, model_dir: str, out_dir: Path) -> dict:
    """3 steps of the standard `Trainer` at a global batch of 4 sequences: 2 per rank on 2 ranks (`"ddp"`, `"fsdp"`),
    or 2 micro-batches of 2 accumulated in one process (`"single"`: the same micro-batches, so the same Switch
    losses, which depend on what a forward pass sees)."""
    from transformers import Trainer, TrainingArguments

    from uoe import UoERouterStatsCallback

    extra = {}
    if strategy == "fsdp":
        extra = {
            "fsdp": "full_shard",
            "fsdp_config": {
                "version": 2,
                "transformer_layer_cls_to_wrap": ["UoEDecoderLayer"],
                "state_dict_type": "FULL_STATE_DICT",
            },
        }
    elif strategy == "single":
        extra = {"gradient_accumulation_steps": 2}
    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=2,
        max_steps=3,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        train_sampling_strategy="sequential",
        use_cpu=True,
        disable_tqdm=True,
        **extra,
    )
    model = UoEForCausalLM.from_pretrained(model_dir)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=training_data(model.config.vocab_size),
        callbacks=[UoERouterStatsCallback()],
    )
    report = {"trainer_enabled_fsdp": trainer.is_fsdp_enabled}
    if strategy == "fsdp" and not trainer.is_fsdp_enabled:
        # accelerate keeps FSDP for accelerator ranks and runs gloo CPU ranks as DDP, silently: switch its state to
        # FSDP2 the way examples/run_clm.py does (everything else is the standard Trainer path)
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
        from run_clm import enable_fsdp_on_cpu

        enable_fsdp_on_cpu(trainer)
    trainer.train()
    wrapped = trainer.model_wrapped
    report |= {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "wrapper": type(wrapped).__name__,
        "sharded": any(isinstance(param, DTensor) for param in trainer.model.parameters()),
        "log_history": [entry for entry in trainer.state.log_history if "loss" in entry],
    }
    trainer.save_model(str(out_dir / "model"))
    return report


def main() -> None:
    task, *args = sys.argv[1:]
    out_dir = Path(args[-1])
    if task == "tp":  # one report per model, by folder name
        report = {Path(folder).name: tensor_parallel(folder, out_dir / Path(folder).name) for folder in args[:-1]}
    elif task == "pp":
        report = pipeline_parallel(args[0])
    elif task == "trainer":
        report = trainer(args[0], args[1], out_dir)
    else:
        raise ValueError(f"unknown task {task!r}; expected 'tp', 'pp' or 'trainer'")
    report = {"world_size": dist.get_world_size() if dist.is_initialized() else 1, **report}
    (out_dir / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(report))
    if dist.is_initialized():  # leave together: a rank exiting with the gloo group alive can abort the launch
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
