"""Per-layer budgets chosen under one FLOPs budget (`uoe.budgets`, `sparsify(flops_budget=...)`) and shared experts
chosen by importance: the allocation is the exact optimum (brute force) and meets the budget as
`uoe.estimate_flops_per_token` counts it; the measurements are what they say; the result saves and reloads as remote
code."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from uoe import UoEConfig, UoEForCausalLM, estimate_flops_per_token
from uoe.budgets import allocate_top_k, block_costs, routed_experts, uniform_top_k_for_budget
from uoe.sparsify import block_sensitivity, importance_order, sparsify

from .helpers import tiny_config
from .remote_code import logits_without_uoe


def random_losses(config: UoEConfig, seed: int) -> dict:
    """A loss table that falls with k (k = all routed experts: 0), different for every block."""
    generator = torch.Generator().manual_seed(seed)
    routed = routed_experts(config)
    losses = {}
    for layer in range(config.num_layer_groups or config.num_hidden_layers):
        for block in ("attention", "mlp"):
            steps = torch.rand(routed[block] - 1, generator=generator, dtype=torch.float64).tolist()
            losses[(layer, block)] = [sum(steps[k:]) for k in range(routed[block] - 1)] + [0.0]
    return losses


def brute_force(config: UoEConfig, losses: dict, budget: float, seq_len: int) -> float:
    """The least summed loss over every per-layer top-k whose estimate is within the budget."""
    routed = routed_experts(config)
    layers = config.num_layer_groups or config.num_hidden_layers
    best = float("inf")
    ranges = [range(1, routed["attention"] + 1)] * layers + [range(1, routed["mlp"] + 1)] * layers
    for choice in itertools.product(*ranges):
        attention, mlp = list(choice[:layers]), list(choice[layers:])
        candidate = UoEConfig.from_dict(
            {**config.to_dict(), "layer_attention_top_k": attention, "layer_mlp_top_k": mlp}
        )
        estimate = estimate_flops_per_token(candidate, seq_len)
        if estimate.active <= budget * estimate.dense:
            loss = sum(losses[(i, "attention")][k - 1] for i, k in enumerate(attention))
            best = min(best, loss + sum(losses[(i, "mlp")][k - 1] for i, k in enumerate(mlp)))
    return best


CONFIGS = {
    "plain": dict(),
    "shared_gqa": dict(
        num_attention_heads=8, num_key_value_heads=4, head_dim=8, num_shared_attention_groups=1, attention_top_k=1,
        num_shared_mlp_experts=1, mlp_top_k=1,
    ),
    "layer_groups": dict(num_hidden_layers=4, num_layer_groups=2),
}  # fmt: skip


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("position", [0.2, 0.5, 0.8])
def test_allocation_is_the_optimum_and_meets_the_estimate(overrides, position):
    """Against brute force over every per-layer choice, FLOPs counted by `estimate_flops_per_token` itself.

    Planted bugs it catches: attention scores costed linearly in k (they grow as k²); the LM head or routers left out
    of the fixed cost (the choice then exceeds the budget); choosing by loss per FLOP greedily."""
    config = tiny_config(**overrides)
    seq_len = 24
    layers = config.num_layer_groups or config.num_hidden_layers
    cheapest = estimate_flops_per_token(
        UoEConfig.from_dict(
            {**config.to_dict(), "layer_attention_top_k": [1] * layers, "layer_mlp_top_k": [1] * layers}
        ),
        seq_len,
    )
    lowest = cheapest.active / cheapest.dense
    budget = lowest + position * (1 - lowest)  # between top-k 1 everywhere and full routing
    for seed in range(3):
        losses = random_losses(config, seed)
        allocation = allocate_top_k(config, losses, budget, seq_len)
        chosen = UoEConfig.from_dict(
            {
                **config.to_dict(),
                "layer_attention_top_k": allocation.layer_attention_top_k,
                "layer_mlp_top_k": allocation.layer_mlp_top_k,
            }
        )
        estimate = estimate_flops_per_token(chosen, seq_len)
        assert estimate.active <= budget * estimate.dense
        assert allocation.active_flops == estimate.active and allocation.dense_flops == estimate.dense
        assert allocation.predicted_loss_increase == pytest.approx(brute_force(config, losses, budget, seq_len))


def test_block_costs_add_up_to_the_estimate():
    config = tiny_config(layer_attention_top_k=[1, 3], layer_mlp_top_k=[4, 2])
    costs = block_costs(config, 16)
    estimate = estimate_flops_per_token(config, 16)
    chosen = costs[(0, "attention")][0] + costs[(1, "attention")][2] + costs[(0, "mlp")][3] + costs[(1, "mlp")][1]
    fixed = estimate.breakdown["routers"] + estimate.breakdown["lm_head"]
    assert chosen + fixed == pytest.approx(estimate.active, rel=1e-12)
    # attention scores grow with the square of the share of keys: the cost is not linear in k
    attention = costs[(0, "attention")]
    assert attention[2] - attention[1] > attention[1] - attention[0]


def test_bad_budgets_raise():
    config = tiny_config()
    losses = random_losses(config, 0)
    for budget in (0.0, 1.5, True, "half"):
        with pytest.raises(ValueError, match="flops_budget"):
            allocate_top_k(config, losses, budget, 16)
    with pytest.raises(ValueError, match=r"flops_budget.*cheapest"):
        allocate_top_k(config, losses, 0.1, 16)
    with pytest.raises(ValueError, match="losses"):
        allocate_top_k(config, {key: value[:-1] for key, value in losses.items()}, 0.6, 16)
    assert uniform_top_k_for_budget(config, 0.6, 16)[2] <= 0.6


# ---------------------------------------------------------------------------------------------------------------------
# sparsify with a FLOPs budget and shared experts
# ---------------------------------------------------------------------------------------------------------------------


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=64, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, initializer_range=0.1,
    )  # fmt: skip
    kwargs.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


def data(seed: int, count: int = 2, size: int = 4, seq: int = 24) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (size, seq), generator=generator) for _ in range(count)]


def token_loss(model, batches) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            logits = model(ids).logits
            total += float(
                F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten(), reduction="sum")
            )
            count += ids[:, 1:].numel()
    return total / count


def test_block_sensitivity_is_the_loss_of_one_sparse_block():
    """Every entry against a model built here with that one block at top-k k and the others at full routing, its loss
    computed from the logits.

    Planted bugs it catches: the other blocks left at the model's own (sparse) top-k; the base loss taken from the
    sparse model instead of full routing; entries shifted by one k."""
    llama = tiny_llama()
    model, _ = sparsify(UoEForCausalLM.from_dense(llama), data(1), attention_top_k=2, mlp_top_k=2)
    batches = data(2)
    losses = block_sensitivity(model, batches)
    assert sorted(losses) == [(0, "attention"), (0, "mlp"), (1, "attention"), (1, "mlp")]

    def loss_with(attention: list[int], mlp: list[int]) -> float:
        config = UoEConfig.from_dict(
            {**model.config.to_dict(), "layer_attention_top_k": attention, "layer_mlp_top_k": mlp}
        )
        candidate = UoEForCausalLM(config).eval()
        candidate.load_state_dict(model.state_dict())
        return token_loss(candidate, batches)

    base = loss_with([4, 4], [4, 4])
    for (layer, block), values in losses.items():
        assert len(values) == 4 and values[-1] == 0.0
        for k in (1, 3):
            attention, mlp = [4, 4], [4, 4]
            (attention if block == "attention" else mlp)[layer] = k
            assert values[k - 1] == pytest.approx(loss_with(attention, mlp) - base, abs=1e-5), (layer, block, k)
    assert losses[(0, "mlp")][0] > losses[(0, "mlp")][2]  # fewer experts lose more


def test_sparsify_under_a_flops_budget_meets_it_and_reloads_as_remote_code(tmp_path):
    llama = tiny_llama()
    full = UoEForCausalLM.from_dense(llama)
    sparse, report = sparsify(
        full, data(3), flops_budget=0.6, num_shared_attention_groups=1, held_out_batches=data(4, count=1)
    )
    config = sparse.config
    allocation = report.budget
    assert config.layer_attention_top_k == allocation.layer_attention_top_k
    assert config.layer_mlp_top_k == allocation.layer_mlp_top_k
    assert config.num_shared_attention_groups == 1 and allocation.seq_len == 24
    estimate = estimate_flops_per_token(config, 24)
    assert estimate.active <= 0.6 * estimate.dense and estimate.active == allocation.active_flops
    assert [b.top_k for b in report.blocks] == [
        k for pair in zip(config.layer_attention_top_k, config.layer_mlp_top_k, strict=True) for k in pair
    ]
    assert "per-layer top-k" in str(report) and report.to_dict()["budget"]["active_fraction"] <= 0.6
    # the result saves and reloads (also as remote code) with its per-layer top-k and shared group
    folder = tmp_path / "sparse"
    sparse.save_pretrained(folder)
    inputs = {"input_ids": data(5, count=1)[0]}
    with torch.no_grad():
        expected = sparse(**inputs).logits
    loaded = UoEForCausalLM.from_pretrained(folder).eval()
    assert loaded.config.layer_mlp_top_k == config.layer_mlp_top_k
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)
    logits, info = logits_without_uoe(folder, inputs, tmp_path)
    assert info["class"] == "UoEForCausalLM" and not info["uoe_loaded"]
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("num_key_value_heads", [4, 2])
def test_shared_experts_are_the_most_important_and_full_routing_stays_exact(num_key_value_heads):
    """The shared group of each layer is the one with the largest mean contribution (measured here by hooks on the
    Llama's o_proj input), moved to the front with its q/k/v rows and o_proj columns: at full routing (every routed
    expert selected) the model is still the Llama. Likewise for the shared MLP expert.

    Planted bugs it catches: the least important group shared (`topk(largest=False)`); o_proj's columns not permuted
    with the heads (the full-routing logits then differ)."""
    llama = tiny_llama(num_key_value_heads=num_key_value_heads)
    groups = num_key_value_heads
    calibration = data(6)
    contributions = {}

    def record(index):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            weight = module.weight.double()
            width = x.shape[1] // groups
            sizes = torch.stack(
                [(x[:, g * width : (g + 1) * width] @ weight[:, g * width : (g + 1) * width].T).norm(dim=-1)
                 for g in range(groups)], dim=1,
            )  # fmt: skip
            contributions.setdefault(index, []).append(sizes)

        return hook

    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(record(i)) for i, layer in enumerate(llama.model.layers)
    ]
    with torch.no_grad():
        for ids in calibration:
            llama(ids)
    for handle in handles:
        handle.remove()
    sparse, _ = sparsify(
        UoEForCausalLM.from_dense(llama), calibration, attention_top_k=groups - 1, mlp_top_k=3,
        num_shared_attention_groups=1, num_shared_mlp_experts=1,
    )  # fmt: skip
    assert sparse.config.is_full_routing
    head_rows = 32 // 4 * (4 // groups)  # query rows of one group
    for index, layer in enumerate(sparse.model.layers):
        best = int(torch.cat(contributions[index]).mean(0).argmax())
        dense_q = llama.model.layers[index].self_attn.q_proj.weight
        assert torch.equal(
            layer.self_attn.q_proj.weight[:head_rows], dense_q[best * head_rows : (best + 1) * head_rows]
        )
        assert layer.self_attn.router.weight.shape == (groups - 1, 32)
        assert layer.mlp.router.weight.shape == (3, 32)
        # the shared MLP expert contributes most on average among the experts
        experts = layer.mlp.experts
        with torch.no_grad():
            captured = []
            handle = layer.mlp.register_forward_pre_hook(lambda m, a, store=captured: store.append(a[0]))
            sparse(calibration[0])
            handle.remove()
            x = captured[0].reshape(-1, 32)
            gate, up = torch.einsum("nh,eoh->neo", x, experts.gate_up_proj).chunk(2, dim=-1)
            sizes = torch.einsum("nei,ehi->neh", F.silu(gate) * up, experts.down_proj).norm(dim=-1).mean(0)
        assert int(sizes.argmax()) == 0
    ids = data(7, count=1)[0]
    with torch.no_grad():
        expected, actual = llama(ids).logits, sparse(ids).logits
    assert float((actual - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_importance_order_puts_the_largest_first_and_keeps_the_rest_in_order():
    importance = torch.tensor([0.1, 0.9, 0.3, 0.7, 0.2])
    assert importance_order(importance, 2).tolist() == [1, 3, 0, 2, 4]
    assert importance_order(importance, 0).tolist() == [0, 1, 2, 3, 4]


def test_sparsify_budget_arguments_are_checked():
    model = UoEForCausalLM.from_dense(tiny_llama())
    batches = data(8, count=1)
    for kwargs, name in [
        (dict(flops_budget=0.6, attention_top_k=2), "flops_budget"),
        (dict(flops_budget=1.2), "flops_budget"),
        (dict(attention_top_k=[2, 2, 2], mlp_top_k=2), "attention_top_k"),
        (dict(attention_top_k=[2, 0], mlp_top_k=2), r"attention_top_k\[1\]"),
        (dict(attention_top_k=4, mlp_top_k=2, num_shared_attention_groups=1), "attention_top_k"),
        (dict(attention_top_k=2, mlp_top_k=2, num_shared_mlp_experts=4), "num_shared_mlp_experts"),
        (dict(attention_top_k=2, mlp_top_k=2, sensitivity_tokens=0), "sensitivity_tokens"),
        (dict(attention_top_k=None, mlp_top_k=2), "attention_top_k"),
    ]:
        with pytest.raises(ValueError, match=name):
            sparsify(model, batches, **kwargs)
    shared = UoEForCausalLM.from_dense(tiny_llama(), num_shared_mlp_experts=1, mlp_top_k=3)
    with pytest.raises(ValueError, match="shared experts"):
        sparsify(shared, batches, attention_top_k=2, mlp_top_k=2)
    # per-layer lists given directly
    sparse, _ = sparsify(model, batches, attention_top_k=[1, 3], mlp_top_k=[4, 1])
    assert (sparse.config.layer_attention_top_k, sparse.config.layer_mlp_top_k) == ([1, 3], [4, 1])
