"""Mowst (`MowstForImageClassification`): forward and loss against their defining formulas in float64, the confidence
gradient against a hand-derived chain rule and finite differences, the batched skipping of the strong expert, the
threshold extremes, save/load (remote code) and refusals."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageClassification

import uoe
from uoe.configuration_mowst import MowstConfig, default_strong_config
from uoe.modeling_mowst import (
    CONFIDENCE_LOGIT_LIMIT,
    MowstForImageClassification,
    mowst_loss,
    prediction_dispersion,
    strong_flops_per_image,
    weak_flops_per_image,
)

from .remote_code import logits_without_uoe


def tiny_config(**overrides) -> MowstConfig:
    strong = default_strong_config(
        hidden_size=16, num_hidden_layers=2, intermediate_size=32, initializer_range=0.2, router_z_loss_coef=0.01
    )
    values = dict(strong_config=strong, weak_hidden_size=16, weak_num_layers=2, weak_mlp_ratio=2, initializer_range=0.1)
    values.update(overrides)
    return MowstConfig(**values)


def tiny_model(seed: int = 0, dtype=torch.float32, **overrides) -> MowstForImageClassification:
    torch.manual_seed(seed)
    model = MowstForImageClassification(tiny_config(**overrides)).to(dtype)
    with torch.no_grad():  # spread the confidence over the batch: random (monotone) g, sharper weak predictions
        model.weak.head.weight.mul_(20)
        for name in ("in_bias", "out_scale", "in_scale"):
            getattr(model.confidence, name).add_(torch.randn_like(getattr(model.confidence, name)))
    return model


def images(count: int = 12, seed: int = 1, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 1, 28, 28, generator=generator, dtype=dtype), torch.randint(
        0, 10, (count,), generator=generator
    )


def reference_weak_logits(model: MowstForImageClassification, x: torch.Tensor) -> torch.Tensor:
    """The all-MLP written out from its parameters: flatten, embed, residual pre-LN MLP blocks, LN, head."""
    weak, eps = model.weak, model.config.weak_layer_norm_eps
    h = x.flatten(1) @ weak.embed.weight.T + weak.embed.bias
    for block in weak.blocks:
        normed = F.layer_norm(h, (h.shape[-1],), block.norm.weight, block.norm.bias, eps)
        inner = normed @ block.fc1.weight.T + block.fc1.bias
        inner = 0.5 * inner * (1 + torch.erf(inner / math.sqrt(2)))
        h = h + inner @ block.fc2.weight.T + block.fc2.bias
    h = F.layer_norm(h, (h.shape[-1],), weak.norm.weight, weak.norm.bias, eps)
    return h @ weak.head.weight.T + weak.head.bias


def reference_confidence(model: MowstForImageClassification, weak_logits: torch.Tensor, kind: str):
    """`(C, s, t, D)`: C = sigmoid(15 tanh(s / 15)), s = b + sum_k softplus(a_k) tanh(softplus(w_k) D + c_k)."""
    p = torch.softmax(weak_logits, dim=-1)
    k = p.shape[-1]
    if kind == "variance":
        dispersion = ((p - 1 / k) ** 2).sum(-1) / k / ((k - 1) / k**2)
    else:
        dispersion = 1 + (p * torch.log(p)).sum(-1) / math.log(k)
    conf = model.confidence
    t = torch.tanh(F.softplus(conf.in_scale) * dispersion[:, None] + conf.in_bias)
    s = conf.out_bias + (F.softplus(conf.out_scale) * t).sum(-1)
    c = 1 / (1 + torch.exp(-CONFIDENCE_LOGIT_LIMIT * torch.tanh(s / CONFIDENCE_LOGIT_LIMIT)))
    return c, s, t, dispersion


def strong_calls(model: MowstForImageClassification) -> tuple[list, object]:
    calls = []
    handle = model.strong.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["pixel_values"].clone()), with_kwargs=True
    )
    return calls, handle


@pytest.mark.parametrize("kind", ["mowst", "mowst_star"])
@pytest.mark.parametrize("dispersion", ["variance", "negative_entropy"])
def test_forward_equals_defining_formula(kind, dispersion):
    """float64: training forward = both experts, logits chosen by C >= threshold, loss = the Mowst loss written out
    (+ the strong expert's router terms); inference = the same logits with the strong expert run once, on exactly
    the images below the threshold."""
    model = tiny_model(dtype=torch.float64, mowst_loss=kind, confidence_dispersion=dispersion).train()
    x, y = images(dtype=torch.float64)
    weak = reference_weak_logits(model, x)
    c, _, _, _ = reference_confidence(model, weak, dispersion)
    threshold = float(c.detach().median())  # about half the images each way
    strong_outputs = model.strong(pixel_values=x)
    strong = strong_outputs.logits
    if kind == "mowst":
        ce_weak = -torch.log_softmax(weak, -1)[torch.arange(len(y)), y]
        ce_strong = -torch.log_softmax(strong, -1)[torch.arange(len(y)), y]
        expected_loss = (c * ce_weak + (1 - c) * ce_strong).mean()
    else:
        mixed = c[:, None] * torch.softmax(weak, -1) + (1 - c[:, None]) * torch.softmax(strong, -1)
        expected_loss = -torch.log(mixed[torch.arange(len(y)), y]).mean()
    strong_config = model.config.strong_config
    expected_loss = expected_loss + strong_config.router_aux_loss_coef * strong_outputs.aux_loss
    expected_loss = expected_loss + strong_config.router_z_loss_coef * strong_outputs.router_z_loss
    expected_logits = torch.where((c >= threshold)[:, None], weak, strong)

    out = model(pixel_values=x, labels=y, confidence_threshold=threshold)
    torch.testing.assert_close(out.weak_logits, weak, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.confidence, c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.logits, expected_logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, expected_loss, rtol=1e-12, atol=1e-12)
    assert out.strong_logits is not None and 0 < int(out.strong_mask.sum()) < len(y)

    model.eval()
    with torch.no_grad():
        strong_eval = model.strong(pixel_values=x).logits
        calls, handle = strong_calls(model)
        out = model(pixel_values=x, labels=y, confidence_threshold=threshold)
        handle.remove()
    below = (c < threshold).nonzero().squeeze(1)
    assert len(calls) == 1 and torch.equal(calls[0], x[below]), "the strong expert must run once, on the rest only"
    torch.testing.assert_close(
        out.logits, torch.where((c >= threshold)[:, None], weak, strong_eval), rtol=1e-10, atol=1e-10
    )
    assert out.strong_logits is None
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, y), rtol=1e-12, atol=1e-12)


def test_confidence_gradient_against_autograd_float64():
    """dL/dtheta of the confidence parameters by the hand-derived chain rule (dL/dC_i = (CE_weak_i - CE_strong_i) / N)
    equals autograd's; and autograd's gradient of the loss in the confidence parameters and the weak logits passes
    finite-difference checking (`gradcheck`)."""
    model = tiny_model(dtype=torch.float64).train()
    x, y = images(dtype=torch.float64)
    weak = model.weak(x).detach()
    strong = model.strong(pixel_values=x).logits.detach()
    conf = model.confidence
    loss = mowst_loss(weak, strong, conf(weak), y, "mowst")
    grads = torch.autograd.grad(loss, [conf.in_scale, conf.in_bias, conf.out_scale, conf.out_bias])

    c, s, t, dispersion = reference_confidence(model, weak, "variance")
    c, s, t = c.detach(), s.detach(), t.detach()
    ce_weak = F.cross_entropy(weak, y, reduction="none")
    ce_strong = F.cross_entropy(strong, y, reduction="none")
    dl_ds = (ce_weak - ce_strong) / len(y) * c * (1 - c) * (1 - torch.tanh(s / CONFIDENCE_LOGIT_LIMIT) ** 2)
    a = F.softplus(conf.out_scale.detach())
    expected = (
        (dl_ds[:, None] * a * (1 - t**2) * dispersion[:, None].detach()).sum(0) * torch.sigmoid(conf.in_scale.detach()),
        (dl_ds[:, None] * a * (1 - t**2)).sum(0),
        (dl_ds[:, None] * t).sum(0) * torch.sigmoid(conf.out_scale.detach()),
        dl_ds.sum(),
    )
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert any(g.abs().max() > 1e-6 for g in grads), "the check needs a non-trivial gradient"

    def loss_of(in_scale, in_bias, out_scale, out_bias, weak_logits):
        dispersion = prediction_dispersion(weak_logits, "variance")
        hidden = torch.tanh(F.softplus(in_scale) * dispersion[:, None] + in_bias)
        score = out_bias + (F.softplus(out_scale) * hidden).sum(-1)
        z = CONFIDENCE_LOGIT_LIMIT * torch.tanh(score / CONFIDENCE_LOGIT_LIMIT)
        return mowst_loss(weak_logits, strong, z, y, "mowst")

    inputs = tuple(p.detach().clone().requires_grad_() for p in (conf.in_scale, conf.in_bias, conf.out_scale))
    inputs += (conf.out_bias.detach().clone().requires_grad_(), weak.clone().requires_grad_())
    assert torch.autograd.gradcheck(loss_of, inputs)


@pytest.mark.parametrize("skip", [True, False])
def test_threshold_zero_is_weak_and_one_is_strong(skip):
    model = tiny_model().eval()
    x, _ = images()
    with torch.no_grad():
        weak_alone = model.weak(x)
        strong_alone = model.strong(pixel_values=x).logits
        calls, handle = strong_calls(model)
        out = model(pixel_values=x, confidence_threshold=0.0, skip_confident=skip)
        assert torch.equal(out.logits, weak_alone) and not out.strong_mask.any()
        assert len(calls) == (0 if skip else 1)
        out = model(pixel_values=x, confidence_threshold=1.0, skip_confident=skip)
        handle.remove()
        torch.testing.assert_close(out.logits, strong_alone, rtol=1e-6, atol=1e-6)
        assert out.strong_mask.all()
        # even a weak expert certain of everything (confidence logit at its bound) stays below 1
        model.confidence.out_bias.fill_(1e6)
        out = model(pixel_values=x, confidence_threshold=1.0, skip_confident=skip)
        assert (out.confidence < 1).all() and out.strong_mask.all()
        torch.testing.assert_close(out.logits, strong_alone, rtol=1e-6, atol=1e-6)


def test_dispersion_and_monotone_confidence():
    one_hot = torch.tensor([[50.0, 0, 0, 0]])
    uniform = torch.zeros(1, 4)
    for kind in ("variance", "negative_entropy"):
        torch.testing.assert_close(prediction_dispersion(one_hot, kind), torch.ones(1), rtol=0, atol=1e-6)
        torch.testing.assert_close(prediction_dispersion(uniform, kind), torch.zeros(1), rtol=0, atol=1e-7)
    model = tiny_model()
    with torch.no_grad():
        for parameter in model.confidence.parameters():
            parameter.normal_(0, 2)
        values = torch.sigmoid(model.confidence.logit_from_dispersion(torch.linspace(0, 1, 201)))
    assert (values[1:] >= values[:-1]).all(), "g must be non-decreasing in the dispersion"
    assert values[-1] > values[0]


def test_trains_and_flops():
    model = tiny_model().train()
    x, y = images(32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = model(pixel_values=x, labels=y).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    config = model.config
    assert weak_flops_per_image(config) == 2 * 784 * 16 + 2 * 2 * 2 * 16 * 32 + 2 * 16 * 10
    strong = strong_flops_per_image(config.strong_config)
    estimate = uoe.estimate_flops_per_token(config.strong_config, 17, include_lm_head=False)
    assert strong == estimate.active * 16 + estimate.dense + 2 * 49 * 16 * 16 + 2 * 16 * 10
    assert model.flops_per_image() == {"weak": weak_flops_per_image(config), "strong": strong}


def test_save_and_reload_by_auto_class_and_remote_code(tmp_path):
    model = tiny_model().eval()
    x, _ = images()
    with torch.no_grad():
        threshold = float(model(pixel_values=x).confidence.median())
    model.config.confidence_threshold = threshold
    with torch.no_grad():
        expected = model(pixel_values=x)
    assert 0 < int(expected.strong_mask.sum()) < len(x)
    model.save_pretrained(tmp_path / "mowst")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "mowst").eval()
    assert type(reloaded) is MowstForImageClassification
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, expected.logits, rtol=0, atol=0)
    remote, info = logits_without_uoe(
        tmp_path / "mowst", {"pixel_values": x}, tmp_path, auto_class="AutoModelForImageClassification"
    )
    assert info["class"] == "MowstForImageClassification" and not info["uoe_loaded"]
    torch.testing.assert_close(remote, expected.logits, rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise_value_errors():
    strong = default_strong_config(hidden_size=16, num_hidden_layers=1, intermediate_size=32)
    with pytest.raises(ValueError, match="`strong_config`"):
        MowstConfig(strong_config=uoe.UoEConfig(hidden_size=16, num_attention_heads=2, attention_top_k=1))
    with pytest.raises(ValueError, match="`strong_config`"):
        MowstConfig(strong_config="uoe")
    with pytest.raises(ValueError, match="`confidence_dispersion`"):
        MowstConfig(strong_config=strong, confidence_dispersion="entropy")
    with pytest.raises(ValueError, match="`mowst_loss`"):
        MowstConfig(strong_config=strong, mowst_loss="mixture")
    with pytest.raises(ValueError, match="`confidence_threshold`"):
        MowstConfig(strong_config=strong, confidence_threshold=1.5)
    with pytest.raises(ValueError, match="`weak_hidden_size`"):
        MowstConfig(strong_config=strong, weak_hidden_size=0)
    with pytest.raises(ValueError, match="`num_labels`"):
        MowstConfig(strong_config=strong, num_labels=3)
    model = tiny_model().eval()
    with pytest.raises(ValueError, match="`pixel_values`"):
        model(pixel_values=torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="`confidence_threshold`"):
        model(pixel_values=torch.randn(2, 1, 28, 28), confidence_threshold=-0.1)


@pytest.mark.slow
def test_mowst_benchmark_quick_mode(tmp_path):
    """`benchmarks/mowst_vision.py --quick`: every row; threshold 0 sends no image and 1 every image to the strong
    expert; the share grows with the threshold and the FLOPs are weak + share x strong."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mowst_vision.py"
    spec = importlib.util.spec_from_file_location("_bench_mowst_vision", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up while the file executes
    spec.loader.exec_module(bench)
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n\n## Other (x.py)\n\nkept\n")
    record = bench.main(
        ["--quick", "--seeds", "0", "--output", str(tmp_path / "m.json"), "--results_md", str(results_md)]
    )
    rows = {row["row"]: row for row in record["summary"]}
    assert list(rows) == bench.row_names(bench.QUICK)
    flops = record["runs"][0]["flops"]
    config = bench.mowst_config(bench.QUICK)
    assert flops == {"weak": weak_flops_per_image(config), "strong": strong_flops_per_image(config.strong_config)}
    assert rows["weak"]["flops"] == [flops["weak"]] and rows["strong"]["flops"] == [flops["strong"]]
    shares = [rows[f"mowst@{t:g}"]["strong_share"][0] for t in bench.QUICK.thresholds]
    assert shares[0] == 0 and shares[-1] == 1 and shares == sorted(shares)
    for t, share in zip(bench.QUICK.thresholds, shares, strict=True):
        assert rows[f"mowst@{t:g}"]["flops"] == [pytest.approx(flops["weak"] + share * flops["strong"])]
    assert all(0 <= row["accuracy"][0] <= 1 for row in rows.values())
    text = results_md.read_text()
    assert "## Other (x.py)\n\nkept" in text and "## Mowst on Fashion-MNIST (mowst_vision.py)" in text
