"""Knowledge distillation from a (dense) teacher into a (sparse) student causal LM.

The loss is Hinton et al.'s (2015) soft-target term: with temperature T, teacher distribution `p = softmax(z_t / T)`
and student distribution `q = softmax(z_s / T)` over the vocabulary at each position,

    KD = T² · KL(p || q) = T² · Σ_v p_v (log p_v − log q_v)          (forward KL, "teacher || student")

averaged over the positions that have a next-token target. The forward direction is the one whose minimiser covers
the whole teacher distribution (mass-covering), the usual choice for distilling a pre-trained LM into a smaller one
on the teacher's own data; T² keeps the gradient's size independent of T (the gradient with respect to the student's
logits is `T · (q − p)` per position, before averaging). Everything is computed in float32 whatever the logits'
dtype.

Pieces:

- `distillation_loss(student_logits, teacher_logits, labels, ...)`: the term above, with the causal LM shift
  (logits at position i are scored against the target at i + 1) and positions whose target is `ignore_index` (-100)
  or padding left out.
- `capture_block_outputs(model)` and `block_output_loss(student, teacher, mask)`: optional per-block output matching.
  The outputs of every `layers.N.self_attn` and `layers.N.mlp` module (found by name, so a PEFT-wrapped model, a
  transformers Llama and a UoE model all match) are recorded; the loss is the mean over blocks of the relative squared
  error `Σ_t ||s_b(t) − t_b(t)||² / Σ_t ||t_b(t)||²` over non-padding tokens.
- `DistillationTrainer`: a `transformers.Trainer` whose loss is `(1 − alpha) · CE + alpha · KD + block_loss_weight ·
  blocks + the student's router losses` (UoE's `router_aux_loss_coef · aux_loss + router_z_loss_coef ·
  router_z_loss`), with the teacher run under `torch.no_grad()` in eval mode on the same batch. It works with a
  PEFT-wrapped student and with gradient accumulation (the token sums are divided by Trainer's `num_items_in_batch`
  when it passes one).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

BLOCK_PATTERN = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)$")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")


def target_mask(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    shift: bool = True,
    ignore_index: int = -100,
) -> torch.Tensor:
    """`(batch, positions)` bool on `logits`' device: the positions of `(batch, seq, ...)` `logits` that are scored
    (`positions = seq - 1` with `shift`).

    With `labels`, a position counts when its target (`labels[:, i + 1]` with `shift`, else `labels[:, i]`) is not
    `ignore_index`; without, when the token and (with `shift`) the next one are not padding (`attention_mask`, all
    tokens when `None`)."""
    batch, seq = logits.shape[0], logits.shape[1]
    for name, tensor in (("labels", labels), ("attention_mask", attention_mask)):
        if tensor is not None and tuple(tensor.shape) != (batch, seq):
            raise ValueError(f"`{name}` must have shape (batch, seq) = {(batch, seq)}, got {tuple(tensor.shape)}.")
    if labels is not None:
        return ((labels[:, 1:] if shift else labels) != ignore_index).to(logits.device)
    if attention_mask is None:
        return torch.ones(batch, seq - 1 if shift else seq, dtype=torch.bool, device=logits.device)
    real = attention_mask.to(logits.device).bool()
    return real[:, :-1] & real[:, 1:] if shift else real


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    shift: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """`T² · KL(softmax(teacher / T) || softmax(student / T))` per scored position, in float32.

    Args:
        student_logits, teacher_logits: `(batch, seq, vocab)`, the same shape (the same tokenizer).
        labels: `(batch, seq)` next-token labels as a causal LM takes them (unshifted); positions whose target is
            `ignore_index` are left out. `None`: every position whose token and target are real (`attention_mask`).
        attention_mask: `(batch, seq)`, 1 for real tokens; read only when `labels` is `None`.
        temperature: T > 0 (1 = the plain distributions).
        shift: the causal LM shift (logits at i against the target at i + 1; the last position has none).
        reduction: `"mean"` over the scored positions (0 when there are none), `"sum"`, or `"none"` (a
            `(batch, positions)` tensor, 0 at positions not scored).
    """
    _check_positive("temperature", temperature)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"`reduction` must be one of ['mean', 'sum', 'none'], got {reduction!r}.")
    if student_logits.dim() != 3 or tuple(student_logits.shape) != tuple(teacher_logits.shape):
        raise ValueError(
            "`teacher_logits` must have the shape of `student_logits`, (batch, seq, vocab): got "
            f"{tuple(teacher_logits.shape)} and {tuple(student_logits.shape)} (a different vocabulary needs another "
            "loss)."
        )
    mask = target_mask(student_logits, labels, attention_mask, shift, ignore_index)
    if shift:
        student_logits, teacher_logits = student_logits[:, :-1], teacher_logits[:, :-1]
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2
    per_position = torch.where(mask, per_position, 0.0)  # positions without a target count 0
    if reduction == "none":
        return per_position
    total = per_position.sum()
    return total if reduction == "sum" else total / mask.sum().clamp_min(1)


# ---------------------------------------------------------------------------------------------------------------------
# Per-block output matching
# ---------------------------------------------------------------------------------------------------------------------


def block_modules(model: nn.Module) -> dict[str, nn.Module]:
    """`{"<layer>.attention" | "<layer>.mlp": module}` for every `layers.N.self_attn` / `layers.N.mlp` module of
    `model` (any prefix: a PEFT wrapper's, an image model's)."""
    found = {}
    for name, module in model.named_modules():
        match = BLOCK_PATTERN.search(name)
        if match:
            key = f"{match.group(1)}.{'attention' if match.group(2) == 'self_attn' else 'mlp'}"
            if key in found:
                raise ValueError(f"`model` has two modules for block {key}: names must be unique per layer.")
            found[key] = module
    return found


@contextmanager
def capture_block_outputs(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the output (the first element of a tuple output) of every attention and MLP block of `model` while the
    context is open: `{"<layer>.attention": [output of each call], "<layer>.mlp": [...]}` (a block called several
    times, as in Chain-of-Experts or a shared MoEUT layer, has one entry per call)."""
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook(key):
        def record(module, args, output):
            outputs.setdefault(key, []).append(output[0] if isinstance(output, (tuple, list)) else output)

        return record

    try:
        for key, module in block_modules(model).items():
            handles.append(module.register_forward_hook(hook(key)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def block_output_loss(
    student_outputs: dict[str, list[torch.Tensor]],
    teacher_outputs: dict[str, list[torch.Tensor]],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over blocks (and calls) of `Σ_t ||s(t) − t(t)||² / Σ_t ||t(t)||²` over the non-padding tokens, float32.

    The two dicts come from `capture_block_outputs` of the student and the teacher on the same batch and must have
    the same blocks and calls."""
    if sorted(student_outputs) != sorted(teacher_outputs) or any(
        len(student_outputs[key]) != len(teacher_outputs[key]) for key in student_outputs
    ):
        raise ValueError(
            "`teacher_outputs` must hold the same blocks and calls as `student_outputs` (same layers; block "
            f"matching needs the same architecture shape), got {sorted(teacher_outputs)} and {sorted(student_outputs)}."
        )
    if not student_outputs:
        raise ValueError("`student_outputs` is empty: the model has no `layers.N.self_attn` / `layers.N.mlp` blocks.")
    losses = []
    for key in sorted(student_outputs):
        for student, teacher in zip(student_outputs[key], teacher_outputs[key], strict=True):
            error = (student.float() - teacher.detach().float()).square().sum(-1)
            norm = teacher.detach().float().square().sum(-1)
            if attention_mask is not None:
                real = attention_mask.to(error.device, torch.float32)
                error, norm = error * real, norm * real
            losses.append(error.sum() / norm.sum().clamp_min(torch.finfo(torch.float32).tiny))
    return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------------


class DistillationTrainer(Trainer):
    """`Trainer` that fine-tunes `model` (the student) toward `teacher_model`'s output distribution.

    Loss per batch: `(1 − alpha) · CE + alpha · T² · KL(teacher_T || student_T) + block_loss_weight · block_loss`
    plus the student's router losses when it returns them (`aux_loss`, `router_z_loss`, weighted by its config's
    `router_aux_loss_coef` / `router_z_loss_coef`, as the UoE models add them to their own loss). CE and KD are means
    over the tokens that have a target (labels not -100, shifted); under gradient accumulation Trainer passes the
    whole step's token count (`num_items_in_batch`), and the token sums are divided by it. The teacher runs in eval
    mode without gradients on `input_ids` / `attention_mask` / `position_ids`.

    Args:
        teacher_model: a causal LM with the student's vocabulary (e.g. the dense model a sparse UoE was made from).
        temperature: T > 0.
        alpha: weight of the distillation term, in [0, 1]; `1 − alpha` weighs the cross-entropy on the labels.
        block_loss_weight: weight (>= 0) of the per-block output matching (`block_output_loss`); 0 skips it.
        *args, **kwargs: `Trainer`'s.
    """

    def __init__(
        self,
        *args,
        teacher_model: nn.Module,
        temperature: float = 2.0,
        alpha: float = 0.5,
        block_loss_weight: float = 0.0,
        **kwargs,
    ) -> None:
        _check_positive("temperature", temperature)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}.")
        if (
            isinstance(block_loss_weight, bool)
            or not isinstance(block_loss_weight, (int, float))
            or not math.isfinite(block_loss_weight)
            or block_loss_weight < 0
        ):
            raise ValueError(f"`block_loss_weight` must be a finite number >= 0, got {block_loss_weight!r}.")
        if not isinstance(teacher_model, nn.Module):
            raise ValueError(f"`teacher_model` must be a torch module, got {type(teacher_model).__name__}.")
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher_model
        self.temperature, self.alpha, self.block_loss_weight = (
            float(temperature),
            float(alpha),
            float(block_loss_weight),
        )
        if getattr(teacher_model, "hf_device_map", None) is None:
            teacher_model.to(self.args.device)
        teacher_model.eval().requires_grad_(False)
        self._logged: dict[str, list[torch.Tensor]] = {}

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None and self.alpha < 1:
            raise ValueError("the batch has no `labels`: the cross-entropy term needs them (or set `alpha=1`).")
        attention_mask = inputs.get("attention_mask")
        teacher_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        match_blocks = self.block_loss_weight > 0
        student_capture = capture_block_outputs(model) if match_blocks else nullcontext()
        teacher_capture = capture_block_outputs(self.teacher_model) if match_blocks else nullcontext()
        with student_capture as student_blocks:
            outputs = model(**inputs, use_cache=False)
        with torch.no_grad(), teacher_capture as teacher_blocks:
            teacher_logits = self.teacher_model(**teacher_inputs, use_cache=False).logits
        logits = outputs.logits
        mask = target_mask(logits, labels, attention_mask)
        tokens = mask.sum()
        # the token sums are divided by the whole optimizer step's count when Trainer gives it, else this batch's
        normaliser = tokens.clamp_min(1) if num_items_in_batch is None else num_items_in_batch
        share = tokens / normaliser  # this micro-batch's share of the step's tokens
        kd = distillation_loss(
            logits, teacher_logits, labels, attention_mask, temperature=self.temperature, reduction="sum"
        )
        loss = self.alpha * kd / normaliser
        terms = {"distill_kl": kd / tokens.clamp_min(1)}
        if self.alpha < 1:
            shifted = logits[:, :-1].float().flatten(0, 1)
            ce = F.cross_entropy(shifted, labels[:, 1:].flatten().to(logits.device), reduction="sum")
            loss = loss + (1 - self.alpha) * ce / normaliser
            terms["distill_ce"] = ce / tokens.clamp_min(1)
        if match_blocks:
            blocks = block_output_loss(student_blocks, teacher_blocks, attention_mask)
            loss = loss + self.block_loss_weight * blocks * share
            terms["distill_blocks"] = blocks
        router_loss = self._router_loss(model, outputs)
        if router_loss is not None:
            loss = loss + router_loss * share
        if model.training:  # evaluation batches do not enter the training logs
            for name, value in terms.items():  # kept on the device: read back only when logged
                self._logged.setdefault(name, []).append(value.detach())
        # tell `training_step` whether the loss is already normalised for gradient accumulation
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages the gradients of the ranks' summed shares
        return (loss, outputs) if return_outputs else loss

    def _router_loss(self, model: nn.Module, outputs) -> torch.Tensor | None:
        aux = getattr(outputs, "aux_loss", None)
        if aux is None:
            return None
        config = self.accelerator.unwrap_model(model).config
        loss = getattr(config, "router_aux_loss_coef", 0.0) * aux
        z_loss = getattr(outputs, "router_z_loss", None)
        if z_loss is not None:
            loss = loss + getattr(config, "router_z_loss_coef", 0.0) * z_loss
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the means of the loss terms since the last log (`distill_kl`, `distill_ce`, `distill_blocks`)."""
        if "loss" in logs:
            for name, values in self._logged.items():
                logs[name] = round(float(torch.stack(values).mean()), 6)
            self._logged = {}
        super().log(logs, start_time)


__all__ = [
    "DistillationTrainer",
    "block_modules",
    "block_output_loss",
    "capture_block_outputs",
    "distillation_loss",
    "target_mask",
]
