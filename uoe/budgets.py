"""Per-layer budgets: choose every layer's attention and MLP top-k under one active-FLOPs budget.

Each routed block (layer l's attention or MLP) has options `k = 1 .. routed experts`. Option k costs the block's
active FLOPs per token at top-k k (`uoe.flops.layer_flops_per_token`: attention projections and scores depend only on
the attention top-k, the MLP on the MLP top-k; routers and the LM head are fixed) and loses `loss[l, block][k]`, a
measured increase of the next-token loss when that block alone runs at top-k k (`uoe.sparsify.block_sensitivity`).
`allocate_top_k` picks one option per block that minimises the summed loss subject to the estimate of the whole
configuration being at most the budget: an exact multiple-choice knapsack solved by dynamic programming over the
blocks, keeping only Pareto-optimal (cost, loss) partial choices. The chosen configuration is checked against
`uoe.estimate_flops_per_token` itself, not against the DP's own sums.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from .configuration_uoe import UoEConfig
from .flops import estimate_flops_per_token, layer_flops_per_token

BLOCKS = ("attention", "mlp")


def routed_experts(config: UoEConfig) -> dict[str, int]:
    """`{"attention": routed head groups, "mlp": routed MLP experts}` of `config`: the top-k range of each block."""
    return {
        "attention": config.num_key_value_heads - config.num_shared_attention_groups,
        "mlp": config.num_mlp_experts - config.num_shared_mlp_experts,
    }


def block_costs(config: UoEConfig, seq_len: int) -> dict[tuple[int, str], list[float]]:
    """`{(layer, block): [active FLOPs per token of the block at top-k 1, 2, ..., routed]}` for every distinct layer
    (all its applications under MoEUT's grouping), from `layer_flops_per_token`."""
    routed = routed_experts(config)
    costs = {}
    for layer in range(config.num_layer_groups or config.num_hidden_layers):
        attention, mlp = [], []
        for k in range(1, routed["attention"] + 1):
            parts = layer_flops_per_token(config, seq_len, layer, attention_top_k=k, mlp_top_k=1)
            attention.append(parts["attention_projections"] + parts["attention_scores"])
        for k in range(1, routed["mlp"] + 1):
            mlp.append(layer_flops_per_token(config, seq_len, layer, attention_top_k=1, mlp_top_k=k)["mlp"])
        costs[(layer, "attention")], costs[(layer, "mlp")] = attention, mlp
    return costs


@dataclass
class BudgetAllocation:
    """The per-layer top-k chosen under a FLOPs budget, with what it was chosen from.

    Attributes:
        layer_attention_top_k, layer_mlp_top_k: the chosen routed top-k of every distinct layer.
        active_flops: `estimate_flops_per_token(...).active` of the chosen configuration.
        budget_flops: the budget it had to meet (`active_flops <= budget_flops`).
        dense_flops: the dense equivalent's FLOPs (`.dense`); `active_flops / dense_flops` is the active fraction.
        predicted_loss_increase: the sum of the chosen options' measured losses.
        losses: `{"<layer>.<block>": [loss increase at top-k 1, 2, ...]}`, the measurements.
        seq_len: the sequence length the FLOPs are counted at.
    """

    layer_attention_top_k: list[int]
    layer_mlp_top_k: list[int]
    active_flops: float
    budget_flops: float
    dense_flops: float
    predicted_loss_increase: float
    losses: dict[str, list[float]]
    seq_len: int

    @property
    def active_fraction(self) -> float:
        return self.active_flops / self.dense_flops

    def to_dict(self) -> dict:
        return {**asdict(self), "active_fraction": self.active_fraction}

    def __str__(self) -> str:
        return (
            f"per-layer top-k under {self.budget_flops / self.dense_flops:.3f}x the dense FLOPs "
            f"(uses {self.active_fraction:.3f}x): attention {self.layer_attention_top_k}, mlp {self.layer_mlp_top_k}; "
            f"predicted loss increase {self.predicted_loss_increase:.4f} nats"
        )


def _pareto(states: list[tuple[float, float, tuple[int, ...]]]) -> list[tuple[float, float, tuple[int, ...]]]:
    """The (cost, loss, choice) states no other state beats in both cost and loss, by increasing cost."""
    states.sort(key=lambda s: (s[0], s[1]))
    kept, best = [], float("inf")
    for state in states:
        if state[1] < best:
            kept.append(state)
            best = state[1]
    return kept


def allocate_top_k(
    config: UoEConfig,
    losses: Mapping[tuple[int, str], Sequence[float]],
    flops_budget: float,
    seq_len: int,
) -> BudgetAllocation:
    """Per-layer top-k of every routed block that minimises the summed measured loss within `flops_budget`.

    Args:
        config: the sparse model's config (experts, shared experts, grouping); its own top-k are not read.
        losses: `{(layer, "attention" | "mlp"): [loss increase at top-k 1, ..., routed]}` for every distinct layer.
        flops_budget: the most active FLOPs per token allowed, as a fraction of the dense equivalent's
            (`estimate_flops_per_token(config, seq_len).dense`), in (0, 1].
        seq_len: the sequence length the FLOPs are counted at (attention scores grow with it).

    Returns:
        a `BudgetAllocation`; its configuration's `estimate_flops_per_token(...).active` is at most the budget.
    """
    if isinstance(flops_budget, bool) or not isinstance(flops_budget, (int, float)) or not 0 < flops_budget <= 1:
        raise ValueError(f"`flops_budget` must be a fraction of the dense FLOPs in (0, 1], got {flops_budget!r}.")
    costs = block_costs(config, seq_len)
    if set(losses) != set(costs) or any(len(losses[key]) != len(costs[key]) for key in costs):
        expected = {f"{layer}.{block}": len(values) for (layer, block), values in costs.items()}
        raise ValueError(f"`losses` must give one value per top-k of every block: {expected}.")
    layers = config.num_layer_groups or config.num_hidden_layers
    keys = [(layer, block) for layer in range(layers) for block in BLOCKS]
    dense = estimate_flops_per_token(config, seq_len)
    # the fixed part (routers, LM head): the estimate at top-k 1 everywhere minus the blocks' costs there
    minimal = _with_top_k(config, [1] * layers, [1] * layers)
    fixed = estimate_flops_per_token(minimal, seq_len).active - sum(costs[key][0] for key in keys)
    budget = flops_budget * dense.dense
    room = budget - fixed
    cheapest_rest = [sum(costs[key][0] for key in keys[i:]) for i in range(len(keys) + 1)]
    if cheapest_rest[0] > room:
        lowest = estimate_flops_per_token(minimal, seq_len).active / dense.dense
        raise ValueError(
            f"`flops_budget` ({flops_budget}) is below the cheapest configuration (top-k 1 everywhere: "
            f"{lowest:.4f} of the dense FLOPs); it must be in [{lowest:.4f}, 1]."
        )
    states = [(0.0, 0.0, ())]
    for index, key in enumerate(keys):
        grown = [
            (cost + option_cost, loss + float(losses[key][k]), choice + (k + 1,))
            for cost, loss, choice in states
            for k, option_cost in enumerate(costs[key])
            if cost + option_cost + cheapest_rest[index + 1] <= room
        ]
        states = _pareto(grown)
    # best first; the first whose configuration the estimate itself finds within the budget (float sums may differ
    # from the DP's in the last bits)
    for _, loss, choice in sorted(states, key=lambda s: s[1]):
        attention, mlp = list(choice[0::2]), list(choice[1::2])
        estimate = estimate_flops_per_token(_with_top_k(config, attention, mlp), seq_len)
        if estimate.active <= budget:
            return BudgetAllocation(
                layer_attention_top_k=attention,
                layer_mlp_top_k=mlp,
                active_flops=estimate.active,
                budget_flops=budget,
                dense_flops=estimate.dense,
                predicted_loss_increase=loss,
                losses={f"{layer}.{block}": [float(v) for v in losses[(layer, block)]] for layer, block in keys},
                seq_len=seq_len,
            )
    raise ValueError(f"`flops_budget` ({flops_budget}) cannot be met by any per-layer top-k.")  # pragma: no cover


def top_k_fields(attention: int | Sequence[int], mlp: int | Sequence[int]) -> dict:
    """Config fields of uniform (an integer) or per-layer (a list; the default then its largest entry) top-k."""
    fields = {}
    for name, value in (("attention_top_k", attention), ("mlp_top_k", mlp)):
        per_layer = isinstance(value, (list, tuple))
        fields[name] = max(value) if per_layer else value
        fields[f"layer_{name}"] = [int(v) for v in value] if per_layer else None
    return fields


def _with_top_k(config: UoEConfig, attention: int | list[int], mlp: int | list[int]) -> UoEConfig:
    """A copy of `config` with the given top-k (`top_k_fields`)."""
    return type(config).from_dict({**config.to_dict(), **top_k_fields(attention, mlp)})


def uniform_options(config: UoEConfig, seq_len: int) -> list[tuple[int, int, float]]:
    """Every uniform `(attention_top_k, mlp_top_k)` of `config` with its active FLOPs fraction at `seq_len`."""
    routed = routed_experts(config)
    options = []
    for a in range(1, routed["attention"] + 1):
        for m in range(1, routed["mlp"] + 1):
            estimate = estimate_flops_per_token(_with_top_k(config, a, m), seq_len)
            options.append((a, m, estimate.active / estimate.dense))
    return options


def uniform_top_k_for_budget(config: UoEConfig, flops_budget: float, seq_len: int) -> tuple[int, int, float]:
    """The uniform `(attention_top_k, mlp_top_k)` with the most active FLOPs within `flops_budget` (a fraction of the
    dense FLOPs), and its active fraction; ties go to the larger attention top-k."""
    within = [option for option in uniform_options(config, seq_len) if option[2] <= flops_budget]
    if not within:
        raise ValueError(f"`flops_budget` ({flops_budget}) is below every uniform top-k.")
    return max(within, key=lambda option: (option[2], option[0]))


__all__ = [
    "BudgetAllocation",
    "allocate_top_k",
    "block_costs",
    "routed_experts",
    "top_k_fields",
    "uniform_options",
    "uniform_top_k_for_budget",
]
