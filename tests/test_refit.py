"""`sparsify(refit_output_weights=True)` / `uoe.sparsify.refit_outputs`: ridge least-squares compensation of the
output projections for the sparse routing, against an independent float64 solve and its defining property."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from uoe import UoEForCausalLM
from uoe.sparsify import sparsify


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, initializer_range=0.1,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def data(seed: int, count: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (4, 24), generator=generator) for _ in range(count)]


def test_full_routing_is_left_unchanged():
    """At full routing the sparse block is the dense one: the ridge solution toward the current weights is those
    weights. Planted bug it catches: the ridge pulling toward 0 instead of the current weights."""
    llama = tiny_llama()
    sparse, _ = sparsify(UoEForCausalLM.from_dense(llama), data(1), attention_top_k=4, mlp_top_k=4)
    refitted, _ = sparsify(
        UoEForCausalLM.from_dense(llama), data(1), attention_top_k=4, mlp_top_k=4, refit_output_weights=True
    )
    for name, tensor in sparse.state_dict().items():
        torch.testing.assert_close(refitted.state_dict()[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_mlp_down_proj_is_the_float64_ridge_solution():
    """Layer 0's new `down_proj` against `torch.linalg.lstsq` of the augmented system `[Z; sqrt(λ) I] W'ᵀ =
    [Y; sqrt(λ) Wᵀ]`, with Z (the selected experts' hidden units on the dense MLP input, the router's top-2 computed
    here) and Y (the dense MLP output) taken from the Llama by hooks. Tolerance 1e-4 relative (float32 inputs).

    Planted bugs it catches: the unselected experts' units left in Z; the sparse model's own (not teacher-forced)
    MLP input used; λ not scaled by the mean eigenvalue."""
    llama = tiny_llama()
    calibration = data(2)
    base, _ = sparsify(UoEForCausalLM.from_dense(llama), calibration, attention_top_k=2, mlp_top_k=2)
    ridge = 0.05
    refitted, _ = sparsify(
        UoEForCausalLM.from_dense(llama), calibration, attention_top_k=2, mlp_top_k=2, refit_output_weights=True,
        refit_ridge=ridge,
    )  # fmt: skip
    captured = {"x": [], "y": []}
    mlp = llama.model.layers[0].mlp
    handles = [
        mlp.register_forward_pre_hook(lambda m, a: captured["x"].append(a[0].reshape(-1, 32))),
        mlp.register_forward_hook(lambda m, a, o: captured["y"].append(o.reshape(-1, 32))),
    ]
    with torch.no_grad():
        for ids in calibration:
            llama(ids)
    for handle in handles:
        handle.remove()
    x, y = torch.cat(captured["x"]).double(), torch.cat(captured["y"]).double()
    layer = base.model.layers[0].mlp
    experts = layer.experts
    gate, up = torch.einsum("nh,eoh->neo", x, experts.gate_up_proj.double()).chunk(2, dim=-1)
    units = F.silu(gate) * up  # (tokens, experts, units per expert)
    chosen = (x @ layer.router.weight.double().T).topk(2, dim=-1).indices
    selected = torch.zeros(x.shape[0], 4, dtype=torch.float64).scatter(1, chosen, 1.0)
    z = (units * selected[..., None]).reshape(x.shape[0], -1)
    weight = experts.down_proj.double().permute(1, 0, 2).reshape(32, -1)  # (hidden, units), units expert by expert
    strength = ridge * (z.T @ z).diagonal().mean()
    system = torch.cat([z, strength.sqrt() * torch.eye(z.shape[1], dtype=torch.float64)])
    target = torch.cat([y, strength.sqrt() * weight.T])
    expected = torch.linalg.lstsq(system, target).solution.T
    new = refitted.model.layers[0].mlp.experts.down_proj.detach().double().permute(1, 0, 2).reshape(32, -1)
    assert float((new - expected).abs().max() / expected.abs().max()) <= 1e-4
    assert float((new - weight).abs().max()) > 1e-3  # it did change


def test_refit_keeps_more_of_every_block_on_the_calibration_tokens():
    """Least squares on the calibration tokens can only lower the teacher-forced error there (up to the ridge): every
    block's kept fraction measured on those tokens rises. Planted bug it catches: the target taken from the
    block's input instead of its output."""
    llama = tiny_llama()
    calibration = data(3)
    full = UoEForCausalLM.from_dense(llama)
    plain, plain_report = sparsify(full, calibration, attention_top_k=2, mlp_top_k=2, held_out_batches=calibration)
    refitted, report = sparsify(
        full, calibration, attention_top_k=2, mlp_top_k=2, held_out_batches=calibration, refit_output_weights=True,
        refit_ridge=1e-3,
    )  # fmt: skip
    for before, after in zip(plain_report.blocks, report.blocks, strict=True):
        assert after.kept > before.kept + 0.01, (before, after)
    with pytest.raises(ValueError, match="refit"):
        sparsify(full, calibration, attention_top_k=2, mlp_top_k=2, refit_output_weights=True, refit_ridge=-1.0)
    # the untouched model stays exact where nothing was refitted: embeddings, norms, q/k/v
    for name, tensor in plain.state_dict().items():
        if "o_proj" not in name and "down_proj" not in name:
            assert torch.equal(refitted.state_dict()[name], tensor), name
