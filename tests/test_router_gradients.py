"""The routers' task gradient (router losses off) of the newer blocks, against float64 autograd through the plain-loop
reference of `tests/reference_uoe.py`: grouped-query attention, shared experts, Chain-of-Experts (every chain router)
and MoEUT layer grouping (a shared layer's router summed over its applications), on the masked and gathered paths, and
on the Triton kernels under the interpreter (float32, `TRITON_INTERPRET=1`, as in `tests/test_kernels_interpreter.py`).

Every router's expected gradient is asserted to be clearly non-zero, so a router cut off from the task gradient
(straight-through gates detached, a chain iteration's gates constant) fails instead of passing as "no gradient".
"""

import pytest
import torch
import torch.nn.functional as F

from .helpers import count_kernel_calls, require_triton, tiny_model
from .reference_uoe import reference_logits

CASES = {
    "gqa": dict(num_attention_heads=8, num_key_value_heads=4, head_dim=4, attention_top_k=2),
    "shared_weighted": dict(num_shared_attention_groups=1, num_shared_mlp_experts=1, gate_mode="weighted"),
    "shared_top1_union": dict(num_shared_attention_groups=2, attention_top_k=1, num_shared_mlp_experts=2, mlp_top_k=1),
    "chain3": dict(mlp_chain_length=3),
    "chain2_weighted_top1": dict(mlp_chain_length=2, gate_mode="weighted", mlp_top_k=1),
    "layer_groups_patches": dict(num_hidden_layers=4, num_layer_groups=2, routing_patch_size=2),
    "everything": dict(
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=4,
        num_shared_attention_groups=1,
        attention_top_k=2,
        num_shared_mlp_experts=1,
        mlp_chain_length=2,
        num_hidden_layers=4,
        num_layer_groups=2,
        routing_patch_size=3,
    ),
}
ROUTER_LOSSES_OFF = dict(router_aux_loss_coef=0.0, router_z_loss_coef=0.0)


def router_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".router." in n or ".chain_routers." in n]


def reference_router_gradients(model, input_ids: list[int], names: list[str]) -> list[torch.Tensor]:
    """d(mean next-token cross-entropy)/d(router weight) by float64 autograd through the plain-loop reference."""
    params = dict(model.named_parameters())
    leaves = {n: params[n].detach().double().clone().requires_grad_(True) for n in names}
    logits = reference_logits(model, input_ids, router_weights=leaves)
    loss = F.cross_entropy(logits[:-1], torch.tensor(input_ids[1:]))
    return list(torch.autograd.grad(loss, list(leaves.values())))


def check_router_gradients(model, input_ids: list[int], tolerance: float) -> None:
    ids = torch.tensor([input_ids])
    model(ids, labels=ids).loss.backward()
    names = router_names(model)
    config = model.config
    distinct = config.num_layer_groups or config.num_hidden_layers
    assert len(names) == distinct * (1 + config.mlp_chain_length)  # SMHA, then one router per chain iteration
    params = dict(model.named_parameters())
    for name, expected in zip(names, reference_router_gradients(model, input_ids, names), strict=True):
        assert float(expected.abs().max()) > 1e-4, name  # the router is in the task gradient
        actual = params[name].grad
        assert actual is not None, name
        error = float((actual.double() - expected).abs().max() / expected.abs().max())
        assert error <= tolerance, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("backend", ["masked", "gathered"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_router_gradients_equal_the_plain_loop_reference(case, backend):
    """Planted bug: the chain iterations' gates detached (their routers then get no task gradient; the aux and z
    losses would still move them)."""
    model = tiny_model(3, routing_backend=backend, **ROUTER_LOSSES_OFF, **CASES[case]).double().train()
    input_ids = torch.randint(0, 61, (13,), generator=torch.Generator().manual_seed(14)).tolist()
    # the model keeps router scores in float32, hence 1e-5 rather than float64 precision
    check_router_gradients(model, input_ids, 1e-5)


@pytest.fixture
def triton_interpreter(monkeypatch):
    require_triton()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return count_kernel_calls(monkeypatch)


@pytest.mark.parametrize("case", ["everything", "chain2_weighted_top1"])
def test_router_gradients_through_the_kernels_equal_the_plain_loop_reference(case, triton_interpreter):
    """The same on the Triton kernels (interpreter, float32: 1e-4), counting kernel calls so that a silent fallback
    to another path cannot pass."""
    model = tiny_model(3, routing_backend="triton", **ROUTER_LOSSES_OFF, **CASES[case]).train()
    input_ids = torch.randint(0, 61, (11,), generator=torch.Generator().manual_seed(15)).tolist()
    check_router_gradients(model, input_ids, 1e-4)
    applications = model.config.num_hidden_layers
    assert triton_interpreter == {"attention": applications, "experts": applications * model.config.mlp_chain_length}
