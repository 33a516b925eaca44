"""Distillation (`uoe.distillation`): the loss against a float64 reference written from the definition, its gradient,
per-block output matching, the Trainer's loss arithmetic (also under gradient accumulation), and a distilled
fine-tune (plain and PEFT-wrapped) that moves a sparse student toward its dense teacher."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from uoe import UoEForCausalLM
from uoe.distillation import (
    DistillationTrainer,
    block_modules,
    block_output_loss,
    capture_block_outputs,
    distillation_loss,
)

VOCAB = 48


def reference_kd(student, teacher, valid, temperature: float) -> float:
    """Mean over the positions marked in `valid` (`(batch, seq - 1)`, the shifted targets) of
    `T² Σ_v p_v (log p_v - log q_v)` with `p`, `q` the softmaxes of teacher / student logits at T, in float64 from
    explicit sums."""
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for i in range(student.shape[1] - 1):
            if not valid[b][i]:
                continue
            t = teacher[b, i].double() / temperature
            s = student[b, i].double() / temperature
            log_p = t - t.max() - torch.log(torch.exp(t - t.max()).sum())
            log_q = s - s.max() - torch.log(torch.exp(s - s.max()).sum())
            total += temperature**2 * float((torch.exp(log_p) * (log_p - log_q)).sum())
            count += 1
    return total / count


def random_logits(seed: int, shape=(3, 9, VOCAB), scale: float = 3.0, dtype=torch.float32) -> torch.Tensor:
    return (scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_equals_float64_reference_with_ignored_labels(temperature, dtype):
    """Tolerance: 1e-5 relative (float32 sums of ~20 positions of O(1) terms).

    Planted bugs it catches: reverse KL (student || teacher); T instead of T²; no LM shift (position i scored against
    label i); labels of -100 counted; the mean taken over all positions instead of the scored ones."""
    student, teacher = random_logits(0, dtype=dtype), random_logits(1, dtype=dtype)
    labels = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))
    labels[0, 4:] = -100  # right padding
    labels[2, :3] = -100  # prompt tokens; position 1 (target labels[2, 2]) is not scored, position 2 is
    valid = (labels[:, 1:] != -100).tolist()
    expected = reference_kd(student, teacher, valid, temperature)
    actual = distillation_loss(student, teacher, labels, temperature=temperature)
    assert actual.dtype == torch.float32
    assert float(actual) == pytest.approx(expected, rel=1e-5)
    count = sum(map(sum, valid))
    assert float(distillation_loss(student, teacher, labels, temperature=temperature, reduction="sum")) == (
        pytest.approx(expected * count, rel=1e-5)
    )
    per_position = distillation_loss(student, teacher, labels, temperature=temperature, reduction="none")
    assert per_position.shape == (3, 8) and float(per_position[0, 4:].abs().max()) == 0.0
    # equal logits: zero
    assert float(distillation_loss(teacher, teacher, labels, temperature=temperature)) == pytest.approx(0, abs=1e-6)


def test_without_labels_the_attention_mask_decides():
    student, teacher = random_logits(3), random_logits(4)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0  # left padding: positions 0..3 have no real token, position 3's target is real but its input not
    valid = (mask[:, :-1].bool() & mask[:, 1:].bool()).tolist()
    actual = distillation_loss(student, teacher, attention_mask=mask, temperature=2.0)
    assert float(actual) == pytest.approx(reference_kd(student, teacher, valid, 2.0), rel=1e-5)
    everything = [[True] * 8] * 3
    assert float(distillation_loss(student, teacher)) == pytest.approx(
        reference_kd(student, teacher, everything, 1.0), rel=1e-5
    )
    # shift=False scores every position
    unshifted = distillation_loss(student[:, :-1], teacher[:, :-1], shift=False)
    assert float(unshifted) == pytest.approx(float(distillation_loss(student, teacher)), rel=1e-6)


def test_gradient_is_temperature_times_q_minus_p():
    """d(T² KL(p || q)) / d student logits = T (q - p) per scored position (divided by their count for the mean)."""
    temperature = 3.0
    student = random_logits(5).requires_grad_(True)
    teacher = random_logits(6)
    labels = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(7))
    labels[1, 6:] = -100
    distillation_loss(student, teacher, labels, temperature=temperature).backward()
    valid = labels[:, 1:] != -100
    q = torch.softmax(student.detach().double()[:, :-1] / temperature, -1)
    p = torch.softmax(teacher.double()[:, :-1] / temperature, -1)
    expected = torch.zeros(3, 9, VOCAB, dtype=torch.float64)
    expected[:, :-1] = temperature * (q - p) * valid[..., None] / valid.sum()
    torch.testing.assert_close(student.grad.double(), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=True), "temperature"),
        (dict(reduction="avg"), "reduction"),
        (dict(labels=torch.zeros(3, 8, dtype=torch.long)), "labels"),
        (dict(attention_mask=torch.ones(2, 9)), "attention_mask"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        distillation_loss(random_logits(0), random_logits(1), **kwargs)


def test_teacher_with_another_vocabulary_raises():
    with pytest.raises(ValueError, match="teacher_logits"):
        distillation_loss(random_logits(0), random_logits(1, shape=(3, 9, VOCAB + 1)))


# ---------------------------------------------------------------------------------------------------------------------
# Models: a dense Llama teacher, its sparse UoE student
# ---------------------------------------------------------------------------------------------------------------------


def llama_teacher(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        initializer_range=0.2,  # peaked output distributions: a sparse student is clearly off
    )
    return LlamaForCausalLM(config).eval()


def sparse_student(teacher, **overrides) -> UoEForCausalLM:
    torch.manual_seed(1)
    kwargs = dict(num_mlp_experts=4, attention_top_k=2, mlp_top_k=2)
    return UoEForCausalLM.from_dense(teacher, **{**kwargs, **overrides})


def batch(seed: int, size: int = 4, seq: int = 12, pad: bool = True) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (size, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if pad:
        mask[0, 9:] = 0  # right padding
        labels[0, 9:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def trainer_for(student, teacher, tmp_path, **kwargs) -> DistillationTrainer:
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    return DistillationTrainer(model=student, args=args, **{"teacher_model": teacher, **kwargs})


def test_block_output_loss_matches_a_float64_reference():
    """Relative squared error of every attention and MLP block output, averaged, over real tokens, against outputs
    recorded here by hooks on `model.layers[i].self_attn / .mlp` of both models.

    Planted bugs it catches: padding tokens counted; the error not divided by the teacher's norm; a block missing
    from the capture (e.g. a pattern that misses `mlp`)."""
    teacher = llama_teacher()
    student = sparse_student(teacher)
    inputs = batch(3)
    del inputs["labels"]
    recorded = {}

    def hook(name):
        return lambda module, args, output: recorded.__setitem__(
            name, output[0] if isinstance(output, tuple) else output
        )

    handles = []
    for who, model in (("s", student), ("t", teacher)):
        for i, layer in enumerate(model.model.layers):
            handles.append(layer.self_attn.register_forward_hook(hook((who, i, "attention"))))
            handles.append(layer.mlp.register_forward_hook(hook((who, i, "mlp"))))
    with torch.no_grad(), capture_block_outputs(student) as s_out, capture_block_outputs(teacher) as t_out:
        student(**inputs)
        teacher(**inputs)
    for handle in handles:
        handle.remove()
    assert sorted(s_out) == ["0.attention", "0.mlp", "1.attention", "1.mlp"]
    real = inputs["attention_mask"].bool()
    ratios = []
    for i in range(2):
        for kind in ("attention", "mlp"):
            s, t = recorded[("s", i, kind)].double()[real], recorded[("t", i, kind)].double()[real]
            ratios.append(float((s - t).square().sum() / t.square().sum()))
    actual = block_output_loss(s_out, t_out, inputs["attention_mask"])
    assert float(actual) == pytest.approx(sum(ratios) / len(ratios), rel=1e-5)
    assert 0.05 < float(actual) < 10  # the sparse student's blocks differ from the teacher's
    with pytest.raises(ValueError, match="teacher_outputs"):
        block_output_loss(s_out, {"0.attention": t_out["0.attention"]})


def test_trainer_loss_is_the_documented_sum(tmp_path):
    """`(1 - alpha) CE + alpha T² KL + w blocks + router losses`, each term recomputed here independently (KD by the
    float64 reference, CE by the student's own `loss` with labels, whose router part is its config's coefficients
    times `aux_loss` / `router_z_loss`).

    Planted bugs it catches: alpha applied to the wrong term; the router losses dropped (a pure distillation run
    would then let the routers collapse); the teacher run on the labels' positions shifted twice."""
    teacher = llama_teacher()
    student = sparse_student(teacher, router_aux_loss_coef=0.05, router_z_loss_coef=0.01).train()
    inputs = batch(4)
    alpha, temperature, weight = 0.7, 2.0, 0.3
    trainer = trainer_for(student, teacher, tmp_path, alpha=alpha, temperature=temperature, block_loss_weight=weight)
    torch.manual_seed(0)
    loss = trainer.compute_loss(student, inputs)
    with torch.no_grad():
        own = student(**inputs)  # CE + router losses, as the model computes them
        with capture_block_outputs(student) as s_out, capture_block_outputs(teacher) as t_out:
            student_logits = student(**inputs).logits
            teacher_logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    router = 0.05 * own.aux_loss + 0.01 * own.router_z_loss
    ce = float(own.loss - router)
    kd = reference_kd(student_logits, teacher_logits, (inputs["labels"][:, 1:] != -100).tolist(), temperature)
    blocks = float(block_output_loss(s_out, t_out, inputs["attention_mask"]))
    expected = (1 - alpha) * ce + alpha * kd + weight * blocks + float(router)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(router) > 1e-3  # the router part is really there
    assert not trainer.loss_is_scaled_for_ga  # a per-batch mean: Trainer divides by the accumulation steps

    # alpha = 0 without blocks: exactly the student's own loss (the same CE and router terms)
    plain = trainer_for(student, teacher, tmp_path, alpha=0.0)
    assert float(plain.compute_loss(student, inputs).detach()) == pytest.approx(float(own.loss), rel=1e-5)
    with pytest.raises(ValueError, match="labels"):
        plain.compute_loss(student, {k: v for k, v in inputs.items() if k != "labels"})


def test_gradient_accumulation_pieces_add_up_to_the_whole_batch(tmp_path):
    """With Trainer's `num_items_in_batch` (the step's target count), the micro-batch losses are token sums divided by
    it, so they add up to the loss of the whole batch (router losses off: the Switch loss is not additive)."""
    teacher = llama_teacher()
    student = sparse_student(teacher, router_aux_loss_coef=0.0, router_z_loss_coef=0.0).train()
    inputs = batch(5, size=4)
    trainer = trainer_for(student, teacher, tmp_path, alpha=0.4, temperature=1.5)
    whole = trainer.compute_loss(student, inputs)
    tokens = (inputs["labels"][:, 1:] != -100).sum()
    halves = [{k: v[rows] for k, v in inputs.items()} for rows in (slice(0, 2), slice(2, 4))]
    pieces = [trainer.compute_loss(student, half, num_items_in_batch=tokens) for half in halves]
    assert trainer.loss_is_scaled_for_ga
    assert float(sum(pieces).detach()) == pytest.approx(float(whole.detach()), rel=1e-5)


def teacher_student_kl(student, teacher, inputs: dict) -> float:
    with torch.no_grad():
        student_logits = student(**inputs).logits
        teacher_logits = teacher(**inputs).logits
    return float(distillation_loss(student_logits, teacher_logits, attention_mask=inputs["attention_mask"]))


class Blocks(torch.utils.data.Dataset):
    def __init__(self, count: int = 64):
        self.items = [batch(100 + i, size=1, pad=False) for i in range(count)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.items[index].items()}


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_distilled_finetune_moves_the_student_toward_the_teacher(peft, tmp_path):
    """20 steps of pure distillation (alpha = 1) with block matching lower the held-out KL(teacher || student) of a
    sparse student (half the heads and experts, random routers): by more than a third when every weight trains, by
    more than 15% with LoRA on the attention projections only (experts and routers frozen). Measured (CPU, torch
    2.13): 0.826 -> 0.441 and 0.826 -> 0.678. The PEFT-wrapped student finds its blocks under the wrapper's prefix.

    Planted bugs it catches: the teacher's logits detached from nothing but used as the student's (loss 0, no
    movement); the KD term's gradient not reaching the student (the loss scaled by 0)."""
    teacher = llama_teacher()
    student = sparse_student(teacher).train()
    held_out = batch(999, size=8)
    del held_out["labels"]
    before = teacher_student_kl(student.eval(), teacher, held_out)
    if peft:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(
            student, LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=8, lora_alpha=16)
        )
        assert len(block_modules(student)) == 4
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=20, learning_rate=1e-2, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=10, seed=0, lr_scheduler_type="constant",
    )  # fmt: skip
    trainer = DistillationTrainer(
        model=student.train(), args=args, train_dataset=Blocks(), teacher_model=teacher, alpha=1.0,
        temperature=1.0, block_loss_weight=0.1,
    )  # fmt: skip
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("distill_kl" in entry and "distill_blocks" in entry for entry in logs)
    logged = dict(trainer._logged)
    metrics = trainer.evaluate(Blocks(8))  # Trainer's evaluation runs the same loss, outside the training logs
    assert math.isfinite(metrics["eval_loss"]) and trainer._logged == logged
    after = teacher_student_kl(student.eval(), teacher, held_out)
    print(f"KL before {before:.4f}, after {after:.4f}")
    assert before > 0.1 and math.isfinite(after)
    assert after < (0.85 if peft else 0.67) * before


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=-0.1), "alpha"),
        (dict(temperature=0), "temperature"),
        (dict(block_loss_weight=-1.0), "block_loss_weight"),
        (dict(teacher_model="llama"), "teacher_model"),
    ],
)
def test_trainer_bad_arguments_raise(kwargs, name, tmp_path):
    teacher = llama_teacher()
    with pytest.raises(ValueError, match=name):
        trainer_for(sparse_student(teacher), teacher, tmp_path, **kwargs)
