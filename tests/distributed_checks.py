"""Checks that `tests/test_distributed.py` runs on 2 CPU ranks under `torchrun` (gloo).

    torchrun --nproc_per_node 2 tests/distributed_checks.py {tp,pp} MODEL_DIR OUT_DIR
    torchrun --nproc_per_node 2 tests/distributed_checks.py trainer {ddp,fsdp} MODEL_DIR OUT_DIR

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

from uoe import UoEForCausalLM


def batch(vocab_size: int) -> dict[str, torch.Tensor]:
    """Two sequences of 40 tokens (long enough for the gathered paths on CPU), the second left-padded by 5."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab_size, (2, 40), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def max_error(tensor: torch.Tensor, reference: torch.Tensor) -> float:
    return float((full(tensor) - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def tensor_parallel(model_dir: str) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 5.24 prefers distributed_config=DistributedConfig(...)
        model = UoEForCausalLM.from_pretrained(model_dir, tp_plan="auto")
    reference = UoEForCausalLM.from_pretrained(model_dir)
    inputs = batch(model.config.vocab_size)
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

    model.train(), reference.train()
    out, ref = model(**inputs), reference(**inputs)
    out.loss.backward()
    ref.loss.backward()
    report["train_loss"], report["train_loss_reference"] = out.loss.item(), ref.loss.item()
    reference_params = dict(reference.named_parameters())
    report["grad_errors"] = {
        name: max_error(param.grad, reference_params[name].grad) for name, param in model.named_parameters()
    }

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


def trainer(strategy: str, model_dir: str, out_dir: Path) -> dict:
    from trainer_run import train

    fsdp = {}
    if strategy == "fsdp":
        fsdp = {"fsdp": "full_shard", "fsdp_config": {"transformer_layer_cls_to_wrap": ["UoEDecoderLayer"]}}
    return train(model_dir, out_dir, per_device_batch=2, **fsdp)


def main() -> None:
    task, *args = sys.argv[1:]
    out_dir = Path(args[-1])
    if task == "tp":
        report = tensor_parallel(args[0])
    elif task == "pp":
        report = pipeline_parallel(args[0])
    elif task == "trainer":
        report = trainer(args[0], args[1], out_dir)
    else:
        raise ValueError(f"unknown task {task!r}; expected 'tp', 'pp' or 'trainer'")
    report["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
    (out_dir / f"rank{os.environ['RANK']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
