"""Expert merging and compression (`uoe.merging`, MC-SMoE) on UoE, Mixtral and Qwen3-MoE models built in-process.

Tolerances: float32 models against float32 originals within 1e-5 (relative to the largest logit) where the maths is
exact; merged weights against the float64 reference within 1e-6 (float32 rounding of a float64 average)."""

import itertools
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import uoe
from uoe.configuration_mowst import default_strong_config
from uoe.merging import (
    ExpertStatistics,
    LowRankExperts,
    align_units,
    collect_expert_statistics,
    compress_experts,
    drop_experts,
    expert_flops,
    group_experts,
    low_rank_experts,
    merge_experts,
    moe_blocks,
    prune_expert_units,
    split_merged_experts,
)

from .remote_code import logits_without_uoe

VOCAB = 61


def tiny_uoe(seed: int = 0, **overrides) -> uoe.UoEForCausalLM:
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        attention_top_k=2,
        intermediate_size=32,  # 8 experts of width 4
        num_mlp_experts=8,
        mlp_top_k=2,
        initializer_range=0.2,
        max_position_embeddings=64,
    )
    kwargs.update(overrides)
    return uoe.UoEForCausalLM(uoe.UoEConfig(**kwargs)).eval()


def tiny_mixtral(seed: int = 0, **overrides) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        max_position_embeddings=64,
    )
    kwargs.update(overrides)
    model = MixtralForCausalLM(MixtralConfig(**kwargs)).eval()
    model.set_experts_implementation("eager")
    return model


def tiny_qwen3(seed: int = 0, **overrides) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=4,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        initializer_range=0.2,
        max_position_embeddings=64,
    )
    kwargs.update(overrides)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**kwargs)).eval()
    with torch.no_grad():  # transformers initialises the Qwen3-MoE router to zeros: give it a routing to merge by
        for block in moe_blocks(model):
            block.routers[0][1].weight.normal_(0, 0.5)
    model.set_experts_implementation("eager")
    return model


BUILDERS = {
    "uoe_union": lambda seed=0: tiny_uoe(seed, gate_mode="union"),
    "uoe_weighted": lambda seed=0: tiny_uoe(seed, gate_mode="weighted"),
    "uoe_gelu": lambda seed=0: tiny_uoe(seed, mlp_type="gelu", gate_mode="weighted"),
    "uoe_shared_chain": lambda seed=0: tiny_uoe(
        seed, num_mlp_experts=9, intermediate_size=36, num_shared_mlp_experts=1, mlp_chain_length=2
    ),
    "mixtral": tiny_mixtral,
    "qwen3_moe": tiny_qwen3,
}


def batches(count: int = 3, seed: int = 1, batch: int = 4, length: int = 24) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, length), generator=generator) for _ in range(count)]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_close_logits(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    error = float((actual.double() - expected.double()).abs().max() / expected.abs().max())
    assert error <= tolerance, error


def unit_rows(experts) -> dict[str, torch.Tensor]:
    """Each hidden unit's weights, by the test's own reading of the stacked layout: `(experts, units, features)`."""
    down = experts.down_proj.detach()
    num_experts, _, width = down.shape
    rows = {}
    if hasattr(experts, "gate_up_proj"):
        gate, up = experts.gate_up_proj.detach().split(width, dim=1)
        rows["gate"], rows["up"] = gate, up
    else:
        rows["up"] = experts.up_proj.detach()
    if isinstance(getattr(experts, "up_proj_bias", None), torch.nn.Parameter):
        rows["bias"] = experts.up_proj_bias.detach()[..., None]
    rows["down"] = down.transpose(1, 2)
    return rows


def set_unit_rows(experts, rows: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        if "gate" in rows:
            experts.gate_up_proj.copy_(torch.cat([rows["gate"], rows["up"]], dim=1))
        else:
            experts.up_proj.copy_(rows["up"])
        if "bias" in rows:
            experts.up_proj_bias.copy_(rows["bias"][..., 0])
        experts.down_proj.copy_(rows["down"].transpose(1, 2))


def make_permuted_copies(model, experts_to_copy: list[int], source: int, seed: int = 5) -> dict[tuple, torch.Tensor]:
    """Make each listed expert of every block a copy of `source` with its hidden units permuted (a fresh random
    permutation each); return the permutations sigma, `copy[u] = source[sigma[u]]`."""
    generator = torch.Generator().manual_seed(seed)
    sigmas = {}
    for block in moe_blocks(model):
        rows = unit_rows(block.experts)
        width = rows["down"].shape[1]
        for expert in experts_to_copy:
            sigma = torch.randperm(width, generator=generator)
            for name in rows:
                rows[name][block.num_shared + expert] = rows[name][block.num_shared + source][sigma]
            sigmas[(block.name, expert)] = sigma
        set_unit_rows(block.experts, rows)
    return sigmas


# ---------------------------------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["uoe_weighted", "uoe_gelu", "uoe_shared_chain", "mixtral", "qwen3_moe", "vision"])
def test_merge_two_identical_experts_and_resplit(family):
    """Expert 1 is expert 0 with its hidden units permuted: the alignment finds the inverse permutation exactly, the
    merged expert is expert 0 whatever the frequencies, and re-splitting restores every weight and the logits."""
    if family == "vision":
        torch.manual_seed(0)
        config = default_strong_config(
            hidden_size=16, intermediate_size=32, num_mlp_experts=8, num_hidden_layers=2, initializer_range=0.2
        )
        model = uoe.UoEForImageClassification(config).eval()
        with torch.no_grad():
            for block in moe_blocks(model):
                block.experts.up_proj_bias.normal_()  # non-zero biases, so that they must be permuted too
        generator = torch.Generator().manual_seed(1)
        data = [{"pixel_values": torch.randn(4, 1, 28, 28, generator=generator)} for _ in range(2)]
    else:
        model = BUILDERS[family]()
        data = batches()
    sigmas = make_permuted_copies(model, [1], source=0)
    routed = moe_blocks(model)[0].num_routed
    groups = [[[0, 1], *[[e] for e in range(2, routed)]] for _ in moe_blocks(model)]
    merged, plan = merge_experts(model, data, groups=groups)
    for block, merge, original_block in zip(moe_blocks(merged), plan.blocks, moe_blocks(model), strict=True):
        found = merge.permutations[0][1]
        assert torch.equal(found, torch.argsort(sigmas[(merge.block, 1)])), "alignment is not sigma^-1"
        merged_rows, source_rows = unit_rows(block.experts), unit_rows(original_block.experts)
        for name in merged_rows:
            shared = block.num_shared
            torch.testing.assert_close(merged_rows[name][shared], source_rows[name][shared], rtol=1e-6, atol=1e-7)
    resplit = split_merged_experts(merged, plan)
    assert type(resplit) is type(model)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(resplit.state_dict()[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    inputs = data[0] if isinstance(data[0], dict) else {"input_ids": data[0]}
    with torch.no_grad():
        assert_close_logits(resplit(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("family", ["uoe_union", "uoe_weighted", "uoe_shared_chain", "mixtral", "qwen3_moe"])
@pytest.mark.parametrize("num_experts", [4, 6])
def test_merging_permuted_copies_is_lossless(family, num_experts):
    """Every routed expert is a differently permuted copy of one expert: a frequency-weighted merge to fewer
    experts (grouped by router logits, each router row averaged) leaves the logits unchanged, while the routers
    really changed."""
    model = BUILDERS[family]()
    routed = moe_blocks(model)[0].num_routed
    make_permuted_copies(model, list(range(1, routed)), source=0)
    data = batches()
    merged, plan = merge_experts(model, data, num_experts)
    assert plan.num_experts_after == num_experts
    assert any(len(group) > 1 for group in plan.blocks[0].groups)
    assert moe_blocks(merged)[0].num_routed == num_experts
    for ids in data:
        assert_close_logits(logits(merged, ids), logits(model, ids))


def routing_counts(model, data, family: str) -> list[torch.Tensor]:
    """Per MoE block, the test's own count of (token, expert) selections: top-k of the router logits the model
    returns with `output_router_logits=True`."""
    per_block = None
    for ids in data:
        with torch.no_grad():
            router_logits = model(input_ids=ids, output_router_logits=True).router_logits
        if family.startswith("uoe"):
            router_logits = router_logits[1::2]  # layer l: SMHA at 2l, UoME at 2l + 1
        top_k = model.config.mlp_top_k if family.startswith("uoe") else model.config.num_experts_per_tok
        counts = [
            torch.bincount(logit.reshape(-1, logit.shape[-1]).topk(top_k, dim=-1).indices.flatten(), minlength=8)
            for logit in router_logits
        ]
        per_block = counts if per_block is None else [a + b for a, b in zip(per_block, counts, strict=True)]
    return [c.double() for c in per_block]


def brute_force_alignment(reference: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """argmax over all permutations p of sum_u <reference[u], member[p[u]]> (float64)."""
    width = reference.shape[0]
    score = reference.double() @ member.double().T
    best = max(itertools.permutations(range(width)), key=lambda p: float(score[torch.arange(width), list(p)].sum()))
    return torch.tensor(best)


@pytest.mark.parametrize("family", ["uoe_union", "uoe_weighted", "mixtral", "qwen3_moe"])
@pytest.mark.parametrize("router", ["mean", "dominant"])
def test_merged_model_equals_float64_reference(family, router):
    """The merged weights and router rows equal the merge formula evaluated in float64 from the test's own routing
    counts, centred-logit cosine grouping and brute-force alignment; the merged model's logits equal a float64 model
    carrying those weights."""
    model = BUILDERS[family]()
    data = batches()
    num_experts = 4
    merged, plan = merge_experts(model, data, num_experts, router=router)
    counts = routing_counts(model, data, family)
    reference = type(merged)(merged.config).to(torch.float64).eval()
    reference.load_state_dict({k: v.double() for k, v in merged.state_dict().items()})
    if not family.startswith("uoe"):
        reference.set_experts_implementation("eager")
    # the test's router statistics: centred logits over every calibration token
    grams = [torch.zeros(8, 8, dtype=torch.float64) for _ in counts]
    for ids in data:
        with torch.no_grad():
            router_logits = model(input_ids=ids, output_router_logits=True).router_logits
        if family.startswith("uoe"):
            router_logits = router_logits[1::2]
        for gram, logit in zip(grams, router_logits, strict=True):
            z = logit.reshape(-1, 8).double()
            z = z - z.mean(-1, keepdim=True)
            gram += z.T @ z
    for index, (block, merged_block, ref_block) in enumerate(
        zip(moe_blocks(model), moe_blocks(merged), moe_blocks(reference), strict=True)
    ):
        count = counts[index]
        assert torch.equal(plan.statistics[index].counts, count), "routing frequencies differ"
        dominant = sorted(sorted(range(8), key=lambda e: (-float(count[e]), e))[:num_experts])
        norms = grams[index].diagonal().sqrt()
        cosine = grams[index] / (norms[:, None] * norms[None, :])
        groups = {d: [d] for d in dominant}
        for e in range(8):
            if e not in groups:
                groups[dominant[int(cosine[e, dominant].argmax())]].append(e)
        expected_groups = [groups[d] for d in dominant]
        assert plan.blocks[index].groups == expected_groups
        rows = {k: v.double() for k, v in unit_rows(block.experts).items()}
        features = torch.cat(list(rows.values()), dim=-1)
        router_weight = block.routers[0][1].weight.detach().double()
        expected_rows = {name: [] for name in rows}
        expected_router = []
        for group in expected_groups:
            weights = count[group] / count[group].sum()
            perms = [torch.arange(4)] + [brute_force_alignment(features[group[0]], features[m]) for m in group[1:]]
            for name in rows:
                expected_rows[name].append(
                    sum(w * rows[name][m][p] for w, m, p in zip(weights, group, perms, strict=True))
                )
            if router == "mean":
                expected_router.append(sum(w * router_weight[m] for w, m in zip(weights, group, strict=True)))
            else:
                expected_router.append(router_weight[group[0]])
        expected_rows = {name: torch.stack(parts) for name, parts in expected_rows.items()}
        for name, tensor in unit_rows(merged_block.experts).items():
            torch.testing.assert_close(tensor.double(), expected_rows[name], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(
            merged_block.routers[0][1].weight.detach().double(), torch.stack(expected_router), rtol=1e-6, atol=1e-7
        )
        set_unit_rows(ref_block.experts, expected_rows)
        with torch.no_grad():
            ref_block.routers[0][1].weight.copy_(torch.stack(expected_router))
    for ids in data:
        assert_close_logits(logits(merged, ids), logits(reference, ids))


# ---------------------------------------------------------------------------------------------------------------------
# Grouping, baselines, compression
# ---------------------------------------------------------------------------------------------------------------------


def synthetic_statistics() -> ExpertStatistics:
    """6 experts: frequencies make 1 and 4 dominant; centred router logits make 0, 2 like 1 and 3, 5 like 4."""
    counts = torch.tensor([5.0, 40.0, 7.0, 3.0, 30.0, 6.0], dtype=torch.float64)
    directions = torch.zeros(6, 6, dtype=torch.float64)
    for expert, owner in enumerate([1, 1, 1, 4, 4, 4]):
        directions[expert, owner] = 1.0
        directions[expert, expert] += 0.3
    return ExpertStatistics(block="b", counts=counts, tokens=50, logit_gram=directions @ directions.T)


def test_grouping_by_frequency_and_router_similarity():
    stats = synthetic_statistics()
    assert group_experts(stats, 2) == [[1, 0, 2], [4, 3, 5]]
    assert group_experts(stats, 3) == [[1, 0], [2], [4, 3, 5]]
    random_groups = group_experts(stats, 3, grouping="random", seed=3)
    assert sorted(e for g in random_groups for e in g) == list(range(6)) and len(random_groups) == 3
    assert random_groups == group_experts(stats, 3, grouping="random", seed=3)
    assert any(group_experts(stats, 3, grouping="random", seed=s) != random_groups for s in range(10))


def test_align_units_is_exact_hungarian():
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        reference, member = torch.randn(5, 7, generator=generator), torch.randn(5, 7, generator=generator)
        assert torch.equal(align_units(reference, member), brute_force_alignment(reference, member))


@pytest.mark.parametrize("family", ["uoe_weighted", "mixtral"])
def test_statistics_leave_padding_out(family):
    """Right padding (attention_mask 0) changes no statistic: the same as the unpadded prefix alone."""
    model = BUILDERS[family]()
    ids = batches(1)[0]
    mask = torch.ones_like(ids)
    mask[:, -5:] = 0
    padded = collect_expert_statistics(model, [{"input_ids": ids, "attention_mask": mask}], unit_importance=True)
    alone = collect_expert_statistics(model, [ids[:, :-5]], unit_importance=True)
    for a, b in zip(padded, alone, strict=True):
        assert a.tokens == b.tokens == ids[:, :-5].numel()
        assert torch.equal(a.counts, b.counts)
        torch.testing.assert_close(a.logit_gram, b.logit_gram, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(a.unit_importance, b.unit_importance, rtol=1e-5, atol=1e-8)


def test_drop_experts_keeps_the_most_frequent():
    model = tiny_uoe(gate_mode="weighted")
    data = batches()
    stats = collect_expert_statistics(model, data)
    dropped = drop_experts(model, num_experts=4, statistics=stats)
    assert dropped.config.num_mlp_experts == 4 and dropped.config.intermediate_size == 16
    for block, new_block, s in zip(moe_blocks(model), moe_blocks(dropped), stats, strict=True):
        keep = sorted(sorted(range(8), key=lambda e: (-float(s.counts[e]), e))[:4])
        assert torch.equal(new_block.experts.gate_up_proj, block.experts.gate_up_proj[keep])
        assert torch.equal(new_block.routers[0][1].weight, block.routers[0][1].weight[keep])


def test_unit_importance_and_structured_pruning():
    """Unit importance equals the test's float64 mean of |h_u(x)| * ||down column|| over the tokens routed to the
    expert; units whose down column is zero are pruned first, so pruning them away is lossless."""
    model = tiny_uoe(gate_mode="weighted", intermediate_size=48)  # width 6
    with torch.no_grad():
        for block in moe_blocks(model):
            block.experts.down_proj[:, :, [1, 4]] = 0  # two dead units per expert
    data = batches()
    stats = collect_expert_statistics(model, data, unit_importance=True)
    # independent importance of layer 0 from the experts' inputs and the routing the model reports
    captured = []
    block = moe_blocks(model)[0]
    handle = block.experts.register_forward_hook(lambda m, args, out: captured.append((args[0], args[1])))
    for ids in data:
        logits(model, ids)
    handle.remove()
    x = torch.cat([c[0] for c in captured]).double()
    index = torch.cat([c[1] for c in captured])
    gate, up = block.experts.gate_up_proj.detach().double().split(6, dim=1)
    down = block.experts.down_proj.detach().double()
    for expert in range(8):
        rows = (index == expert).any(-1)
        h = F.silu(x[rows] @ gate[expert].T) * (x[rows] @ up[expert].T)
        expected = (h.abs() * down[expert].norm(dim=0)).mean(0)
        torch.testing.assert_close(stats[0].unit_importance[expert], expected, rtol=1e-9, atol=1e-12)
    pruned = prune_expert_units(model, data, 4)
    assert pruned.config.intermediate_size == 32 and moe_blocks(pruned)[0].width == 4
    for ids in data:
        assert_close_logits(logits(pruned, ids), logits(model, ids))
    assert any(not torch.equal(logits(prune_expert_units(model, data, 3), ids), logits(model, ids)) for ids in data)


def test_low_rank_experts():
    """Full rank reproduces the model; rank r gives each matrix its best rank-r approximation (Eckart-Young error)."""
    model = tiny_uoe(gate_mode="weighted")
    ids = batches(1)[0]
    exact = low_rank_experts(model, 16)
    assert isinstance(moe_blocks(model)[0].experts, uoe.modeling_uoe.UoESwiGLUExperts)
    assert_close_logits(logits(exact, ids), logits(model, ids))
    low = low_rank_experts(model, 2)
    experts, original = low.model.layers[0].mlp.experts, model.model.layers[0].mlp.experts
    assert isinstance(experts, LowRankExperts)
    for e in range(8):
        for a, b, weight in (
            (experts.up_a, experts.up_b, original.gate_up_proj),
            (experts.down_a, experts.down_b, original.down_proj),
        ):
            approx = (a[e] @ b[e]).double()
            singular = torch.linalg.svdvals(weight[e].double())
            error = torch.linalg.matrix_norm(approx - weight[e].double())
            torch.testing.assert_close(error, singular[2:].square().sum().sqrt(), rtol=1e-5, atol=1e-6)
    # FLOPs per expert and token: gate_up (8 x 16) at rank 2, down (16 x 4) at rank 2; the full expert 3 x 4 x 16 x 2
    assert expert_flops(experts) == 2 * 2 * (16 + 8) + 2 * 2 * (4 + 16)
    assert expert_flops(original) == 2 * 3 * 4 * 16
    loss = low(input_ids=ids, labels=ids).loss
    loss.backward()
    assert experts.up_a.grad is not None and experts.up_a.grad.abs().sum() > 0


def test_compress_merged_model():
    model = tiny_uoe(gate_mode="weighted")
    data = batches()
    merged, _ = merge_experts(model, data, 4)
    compressed = compress_experts(merged, data, width=3, rank=2)
    assert isinstance(compressed.model.layers[0].mlp.experts, LowRankExperts)
    assert compressed.config.intermediate_size == 12
    assert torch.isfinite(logits(compressed, data[0])).all()


# ---------------------------------------------------------------------------------------------------------------------
# An ordinary model: save, reload, train
# ---------------------------------------------------------------------------------------------------------------------


def test_merged_uoe_saves_reloads_by_remote_code_and_trains(tmp_path):
    model = tiny_uoe(gate_mode="weighted")
    data = batches()
    merged, _ = merge_experts(model, data, 4)
    assert type(merged) is uoe.UoEForCausalLM
    assert merged.config.num_mlp_experts == 4 and merged.config.intermediate_size == 16
    assert merged.config.mlp_expert_size == 4
    merged.save_pretrained(tmp_path / "merged")
    remote, info = logits_without_uoe(tmp_path / "merged", {"input_ids": data[0]}, tmp_path)
    assert info["class"] == "UoEForCausalLM" and not info["uoe_loaded"]
    assert_close_logits(remote, logits(merged, data[0]), 1e-6)

    merged.train()
    optimizer = torch.optim.AdamW(merged.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = merged(input_ids=data[0], labels=data[0]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_merged_transformers_moe_saves_and_reloads(family, tmp_path):
    model = BUILDERS[family]()
    merged, _ = merge_experts(model, batches(), 4)
    assert type(merged) is type(model)
    field = "num_local_experts" if family == "mixtral" else "num_experts"
    assert getattr(merged.config, field) == 4
    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(model).from_pretrained(tmp_path / "merged").eval()
    reloaded.set_experts_implementation("eager")
    ids = batches(1)[0]
    assert_close_logits(logits(reloaded, ids), logits(merged, ids), 1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_value_errors():
    model = tiny_uoe()
    data = batches(1)
    stats = collect_expert_statistics(model, data)
    with pytest.raises(ValueError, match="`num_experts`"):
        merge_experts(model, num_experts=1, statistics=stats)  # below top-k 2
    with pytest.raises(ValueError, match="`num_experts`"):
        merge_experts(model, num_experts=9, statistics=stats)
    with pytest.raises(ValueError, match="`grouping`"):
        merge_experts(model, num_experts=4, statistics=stats, grouping="kmeans")
    with pytest.raises(ValueError, match="`router`"):
        merge_experts(model, num_experts=4, statistics=stats, router="sum")
    with pytest.raises(ValueError, match="`groups`"):
        merge_experts(model, statistics=stats, groups=[[[0, 1], [2, 3]], [[0, 1], [2, 3]]], num_experts=2)
    with pytest.raises(ValueError, match="`calibration_batches`"):
        merge_experts(model, num_experts=4)
    with pytest.raises(ValueError, match="`calibration_batches`"):
        collect_expert_statistics(model, [])
    with pytest.raises(ValueError, match="`calibration_batches`"):
        collect_expert_statistics(model, ["text"])
    with pytest.raises(ValueError, match="`width`"):
        prune_expert_units(model, data, 0)
    with pytest.raises(ValueError, match="`rank`"):
        low_rank_experts(model, 0)
    with pytest.raises(ValueError, match="`width` or `rank`"):
        compress_experts(model, data)
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4)
    )
    with pytest.raises(ValueError, match="`model`"):
        merge_experts(llama, data, 2)


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark's quick mode
# ---------------------------------------------------------------------------------------------------------------------


def load_benchmark(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_merge_experts_benchmark_quick_mode(tmp_path):
    """`benchmarks/merge_experts.py --quick` reports every variant with the sizes the merge implies; the original's
    parameters and FLOPs equal independent counts; its RESULTS.md section replaces only itself."""
    bench = load_benchmark("merge_experts")
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n\n## Other (x.py)\n\nkept\n\n## Expert merging (merge_experts.py)\n\nold\n")
    record = bench.main(
        [
            "--quick",
            "--work_dir",
            str(tmp_path / "work"),
            "--output",
            str(tmp_path / "m.json"),
            "--results_md",
            str(results_md),
        ]
    )
    setup = bench.QUICK
    rows = {row["variant"]: row for row in record["summary"]}
    assert list(rows) == bench.variant_names(setup)
    config = bench.model_config(setup, record["data"]["tokenizer_vocab"])
    original = rows["original"]
    assert original["parameters"] == sum(p.numel() for p in uoe.UoEForCausalLM(config).parameters())
    assert original["active_flops_per_token"] == pytest.approx(
        uoe.estimate_flops_per_token(config, setup.seq_len).active
    )
    width = setup.intermediate_size // setup.num_experts
    for n in setup.merge_targets:
        for kind in ("msmoe", "msmoe_noalign", "random", "drop"):
            row = rows[f"{kind}_{n}"]
            assert row["experts"] == n and row["expert_width"] == width
            # each block loses (8 - n) experts of 3 x width x hidden weights and their router rows
            lost = setup.num_layers * (setup.num_experts - n) * (3 * width + 1) * setup.hidden_size
            assert row["parameters"] == original["parameters"] - lost
    smallest = min(setup.merge_targets)
    pruned, low = rows[f"msmoe_{smallest}_pruned"], rows[f"msmoe_{smallest}_pruned_lowrank"]
    assert pruned["expert_width"] == setup.compress_width and low["rank"] == [setup.compress_rank] * 2
    assert (
        low["active_flops_per_token"]
        < pruned["active_flops_per_token"]
        < rows[f"msmoe_{smallest}"]["active_flops_per_token"]
    )
    for row in rows.values():
        assert all(0 < p < record["data"]["tokenizer_vocab"] for p in row["perplexity"] + row["perplexity_finetuned"])
    plan = record["runs"][0]["variants"][f"msmoe_{smallest}"]["merge_plan"]
    assert all(sorted(e for g in b["groups"] for e in g) == list(range(setup.num_experts)) for b in plan["blocks"])
    text = results_md.read_text()
    assert "## Other (x.py)\n\nkept" in text and "\nold\n" not in text
    assert text.count("| M-SMoE merge |") == len(setup.merge_targets)
