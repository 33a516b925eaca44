"""Data-driven sparsification of a full-routing UoE model (e.g. one `from_dense` converted).

A converted model computes the dense function only while every expert is selected. Cutting the routing
down (`attention_top_k`, `mlp_top_k`) with random routers and the contiguous split of the MLP throws away a
random half of each layer. `sparsify` instead starts the sparse model close to the dense function:

1. **MLP experts by co-activation.** On calibration tokens, every hidden unit of a layer gets a pattern: its
   contribution size per token, `|act(gate . x) * (up . x)| * ||down column||`. Balanced k-means on the
   normalised patterns groups units that fire together into experts of equal size (`num_mlp_experts` may
   change, regrouping the I hidden units into E' experts). Re-ordering hidden units is a permutation of the
   dense MLP, so at full routing the model is unchanged.
2. **Routers that pick the largest contributions.** For each routed block, the contribution of expert e to a
   token's output is `||y_e(t)||` at full routing (for attention, the output of one key/value group through
   its columns of `o_proj`). The router is fitted by ridge least squares from the router input (the normed
   hidden state) to `log ||y_e(t)||`, centred per token. Softmax of the fitted logits then estimates each
   expert's share of the output, and its top-k (softmax and sigmoid rank the logits alike) are the experts
   predicted to contribute most.
3. **Report.** `retention_report` measures, per block on held-out tokens, how much of the dense output the
   selected experts keep (see `BlockRetention`), and the held-out loss of both models.

Calibration runs under `torch.no_grad`; statistics are batched tensor code (Python loops only over layers,
k-means iterations and calibration batches).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .budgets import BudgetAllocation, allocate_top_k, routed_experts, top_k_fields
from .configuration_uoe import UoEConfig
from .modeling_uoe import UoEForCausalLM

Batch = torch.Tensor | Mapping[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------------
# Attention experts (key/value groups)
# ---------------------------------------------------------------------------------------------------------------------


def attention_expert_groups(config: UoEConfig) -> tuple[int, int]:
    """`(number of attention experts G, query heads per expert)`.

    An attention expert is one key/value head with its query heads: expert g owns query heads
    `[g * H / G, (g + 1) * H / G)`, i.e. a contiguous slice of `o_proj`'s input columns. Multi-head attention is
    the case of groups of one (`num_key_value_heads` unset or equal to `num_attention_heads`).
    """
    heads = config.num_attention_heads
    groups = getattr(config, "num_key_value_heads", None) or heads
    if heads % groups != 0:
        raise ValueError(f"`num_key_value_heads` ({groups}) must divide `num_attention_heads` ({heads}).")
    return groups, heads // groups


def attention_group_outputs(head_outputs: torch.Tensor, o_weight: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Each attention expert's share of the attention output (without the shared `o_proj` bias).

    Args:
        head_outputs: `(tokens, heads * head_dim)`, the input of `o_proj` at full routing.
        o_weight: `(hidden, heads * head_dim)`, the weight of `o_proj`.
        num_groups: G from `attention_expert_groups`.

    Returns:
        `(tokens, G, hidden)`; the sum over groups is the attention output minus the bias.
    """
    tokens, width = head_outputs.shape
    grouped = head_outputs.reshape(tokens, num_groups, width // num_groups)
    return torch.einsum("tgk,cgk->tgc", grouped, o_weight.reshape(o_weight.shape[0], num_groups, -1))


# ---------------------------------------------------------------------------------------------------------------------
# MLP hidden units
# ---------------------------------------------------------------------------------------------------------------------


def _flat_mlp(experts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked expert tensors (`down_proj` and `gate_up_proj` or `up_proj`, as named in the experts module) as dense
    `(units, hidden)` / `(hidden, units)` matrices, units in expert order."""
    down = experts["down_proj"]  # (E, hidden, I/E)
    flat = {"down": down.permute(1, 0, 2).reshape(down.shape[1], -1)}
    if "gate_up_proj" in experts:
        gate, up = experts["gate_up_proj"].chunk(2, dim=1)  # each (E, I/E, hidden)
        flat["gate"], flat["up"] = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])
    else:
        flat["up"] = experts["up_proj"].reshape(-1, experts["up_proj"].shape[-1])
    return flat


def _expert_tensors(experts: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.float() for name, parameter in experts.named_parameters(recurse=False)}


def _stacked_mlp(flat: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """The inverse of `_flat_mlp`: consecutive runs of `units / num_experts` units become the experts."""
    down = flat["down"]  # (hidden, I)
    stacked = {"down_proj": down.reshape(down.shape[0], num_experts, -1).transpose(0, 1).contiguous()}
    up = flat["up"].reshape(num_experts, -1, flat["up"].shape[-1])
    if "gate" in flat:
        stacked["gate_up_proj"] = torch.cat([flat["gate"].reshape_as(up), up], dim=1).contiguous()
    else:
        stacked["up_proj"] = up.contiguous()
    return stacked


def _unit_activations(flat: dict[str, torch.Tensor], act_fn, inputs: torch.Tensor) -> torch.Tensor:
    """`(tokens, units)` hidden activations of the dense MLP on `(tokens, hidden)` inputs."""
    if "gate" in flat:
        return act_fn(inputs @ flat["gate"].T) * (inputs @ flat["up"].T)
    return act_fn(inputs @ flat["up"].T)


def _expert_outputs(flat: dict[str, torch.Tensor], act_fn, inputs: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`(tokens, experts, hidden)`: each expert's (run of consecutive units') share of the MLP output."""
    units = _unit_activations(flat, act_fn, inputs)
    down = flat["down"].reshape(flat["down"].shape[0], num_experts, -1)
    return torch.einsum("tes,hes->teh", units.reshape(units.shape[0], num_experts, -1), down)


def balanced_assignment(similarity: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each row to a column (cluster) with exactly `capacity` rows per column, greedily by similarity.

    Every round, each unassigned row proposes to its most similar column that still has room, and each column
    accepts its best proposals up to its room. A round either assigns every remaining row or fills at least one
    column, so there are at most `columns` rounds.

    Args:
        similarity: `(rows, columns)` with `rows == columns * capacity`.

    Returns:
        `(rows,)` int64 column of each row.
    """
    rows, columns = similarity.shape
    if rows != columns * capacity:
        raise ValueError(f"`capacity` ({capacity}) times the columns ({columns}) must equal the rows ({rows}).")
    labels = torch.full((rows,), -1, dtype=torch.long, device=similarity.device)
    room = torch.full((columns,), capacity, dtype=torch.long, device=similarity.device)
    for _ in range(columns):
        pending = (labels < 0).nonzero().squeeze(1)
        if pending.numel() == 0:
            break
        scores = similarity[pending].masked_fill(room[None] == 0, float("-inf"))
        best_score, choice = scores.max(dim=1)
        # proposals grouped by column, best first within each column
        order = torch.argsort(best_score, descending=True, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]
        chosen = choice[order]
        counts = torch.bincount(chosen, minlength=columns)
        rank = torch.arange(order.numel(), device=order.device) - (counts.cumsum(0) - counts)[chosen]
        accept = rank < room[chosen]
        labels[pending[order[accept]]] = chosen[accept]
        room -= torch.bincount(chosen[accept], minlength=columns)
    return labels


def balanced_kmeans(
    features: torch.Tensor, num_clusters: int, iterations: int = 30, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Spherical k-means with equal cluster sizes: `(rows, dim)` features -> `(rows,)` cluster labels.

    Rows are compared by cosine similarity; every cluster gets exactly `rows / num_clusters` rows
    (`balanced_assignment`). Centroids start at distinct random rows.
    """
    rows = features.shape[0]
    if num_clusters < 1 or rows % num_clusters != 0:
        raise ValueError(f"`num_clusters` ({num_clusters}) must be >= 1 and divide the number of rows ({rows}).")
    capacity = rows // num_clusters
    points = F.normalize(features.double(), dim=1)
    start = torch.randperm(rows, generator=generator)[:num_clusters].to(points.device)
    centroids = points[start]
    labels = None
    for _ in range(iterations):
        new_labels = balanced_assignment(points @ centroids.T, capacity)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        centroids = F.normalize(sums, dim=1)
    return labels


def cluster_mlp_units(unit_activations: torch.Tensor, down: torch.Tensor, num_experts: int, **kwargs) -> torch.Tensor:
    """A permutation of the hidden units, expert by expert, that puts units which fire together in one expert.

    Args:
        unit_activations: `(tokens, units)` hidden activations on calibration tokens.
        down: `(hidden, units)` dense down projection (a unit's output direction and size).
        num_experts: experts to form; must divide `units`.
        **kwargs: passed to `balanced_kmeans` (`iterations`, `generator`).

    Returns:
        `(units,)` int64: the units of expert 0, then those of expert 1, ... (each group in ascending order).
    """
    # A unit's per-token contribution size; centred per unit so that clusters follow co-activation, not scale.
    pattern = unit_activations.abs().T * down.norm(dim=0)[:, None]  # (units, tokens)
    pattern = pattern - pattern.mean(dim=1, keepdim=True)
    labels = balanced_kmeans(pattern, num_experts, **kwargs)
    return torch.argsort(labels * labels.numel() + torch.arange(labels.numel(), device=labels.device))


# ---------------------------------------------------------------------------------------------------------------------
# Routers
# ---------------------------------------------------------------------------------------------------------------------


def fit_router(
    inputs: torch.Tensor, contributions: torch.Tensor, ridge: float = 1e-3, consistency: float = 0.0
) -> torch.Tensor:
    """Router weight `(experts, hidden)` whose logits predict the per-token log contribution of each expert.

    Ridge least squares, in float64, from `(tokens, hidden)` router inputs to `log(contributions)` centred per
    token (a per-token constant changes neither softmax nor any ranking). `ridge` is relative to the mean
    eigenvalue of the inputs' second-moment matrix. `consistency` adds that multiple of each expert's mean target
    to every token's target, which makes tokens agree more on their experts.
    """
    x = inputs.double()
    c = contributions.double()
    # contributions below a millionth of the token's largest count as that (no log of 0)
    floor = 1e-6 * c.amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    target = torch.log(torch.maximum(c, floor))
    target = target - target.mean(dim=1, keepdim=True)
    target = target + consistency * target.mean(dim=0, keepdim=True)
    gram = x.T @ x
    gram = gram + ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram, x.T @ target).T


# ---------------------------------------------------------------------------------------------------------------------
# Calibration data and hooks
# ---------------------------------------------------------------------------------------------------------------------


def _batch_inputs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return batch["input_ids"], batch.get("attention_mask")
    raise ValueError(
        "`calibration_batches` / `held_out_batches` must yield `input_ids` tensors of shape (batch, seq) or "
        f"mappings with an `input_ids` entry (and optionally `attention_mask`), got {type(batch).__name__}."
    )


def _model_inputs(
    batches: Iterable[Batch], device: torch.device, max_tokens: int | None = None
) -> Iterator[tuple[dict, torch.Tensor]]:
    """`(forward keyword arguments, (batch, seq) bool mask of the non-padding tokens)` of each batch on `device`,
    stopping after the batch that reaches `max_tokens` non-padding tokens (all batches when `None`)."""
    seen = 0
    for batch in batches:
        input_ids, attention_mask = _batch_inputs(batch)
        input_ids = input_ids.to(device)
        attention_mask = None if attention_mask is None else attention_mask.to(device)
        keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        yield dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False), keep
        seen += int(keep.sum())
        if max_tokens is not None and seen >= max_tokens:
            return


class _Hooks:
    """Forward (pre-)hooks that are removed on exit, whatever happens inside."""

    def __init__(self) -> None:
        self.handles = []

    def pre(self, module: torch.nn.Module, fn) -> None:
        self.handles.append(module.register_forward_pre_hook(fn))

    def post(self, module: torch.nn.Module, fn) -> None:
        self.handles.append(module.register_forward_hook(fn))

    def __enter__(self) -> _Hooks:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


class _MaskedAttention:
    """Run a model's SMHA on the masked reference implementation (where `o_proj` sees every head's output) for a
    while, selected by name like any SMHA implementation."""

    def __init__(self, model: UoEForCausalLM) -> None:
        self.model, self.name = model, model.config.selective_attention_implementation

    def __enter__(self) -> None:
        self.model.set_selective_attention_implementation("masked")

    def __exit__(self, *exc) -> None:
        self.model.set_selective_attention_implementation(self.name)


def _rebuild(model: UoEForCausalLM, state_dict: dict[str, torch.Tensor], **config_changes) -> UoEForCausalLM:
    """A new `UoEForCausalLM` with `model`'s config changed by `config_changes`, loaded from `state_dict`."""
    config = type(model.config).from_dict({**model.config.to_dict(), **config_changes})
    new_model = type(model)(config)
    missing, unexpected = new_model.load_state_dict(state_dict, strict=False)
    missing = [name for name in missing if not (name == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"State dict does not fit the sparse layout: missing {missing}, unexpected {unexpected}.")
    if config.tie_word_embeddings:
        new_model.tie_weights()
    parameter = next(model.parameters())
    return new_model.to(device=parameter.device, dtype=parameter.dtype).eval()


def _check_top_k(name: str, value: int, maximum: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ValueError(f"`{name}` must be an integer in [1, {maximum}] ({what}), got {value!r}.")


@torch.no_grad()
def _collect(model: UoEForCausalLM, batches: Iterable[Batch], max_tokens: int) -> dict[str, list[torch.Tensor]]:
    """Per layer, on up to `max_tokens` non-padding tokens of a full-routing model: the attention input, each
    attention expert's contribution size, and the MLP input (all `(tokens, ...)` float32 on the model's device)."""
    layers = model.model.layers
    num_groups, _ = attention_expert_groups(model.config)
    store: dict[str, list[list[torch.Tensor]]] = {key: [[] for _ in layers] for key in ("attn_in", "attn_c", "mlp_in")}
    state = {"keep": None}

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])[state["keep"]].float()

    with _Hooks() as hooks, _MaskedAttention(model):
        for index, layer in enumerate(layers):
            attention = layer.self_attn

            def on_attention(module, args, index=index):
                store["attn_in"][index].append(flat(args[0]))

            def on_o_proj(module, args, index=index):
                parts = attention_group_outputs(flat(args[0]), module.weight.float(), num_groups)
                store["attn_c"][index].append(parts.norm(dim=-1))

            def on_mlp(module, args, index=index):
                store["mlp_in"][index].append(flat(args[0]))

            hooks.pre(attention, on_attention)
            hooks.pre(attention.o_proj, on_o_proj)
            hooks.pre(layer.mlp, on_mlp)
        seen = 0
        for inputs, keep in _model_inputs(batches, model.device, max_tokens):
            state["keep"] = keep.reshape(-1)
            model(**inputs)
            seen += int(keep.sum())
    if seen == 0:
        raise ValueError("`calibration_batches` yielded no (non-padding) tokens.")
    return {key: [torch.cat(parts)[:max_tokens] for parts in per_layer] for key, per_layer in store.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockRetention:
    """How much of one routed block's dense output the sparse model keeps, on held-out tokens.

    With `y(t)` the block's dense output for token t and `ŷ(t)` the sparse block's output *on the same input*
    (the dense model's input to the block, so that errors of earlier layers do not count here), kept is
    `1 - sqrt(sum_t ||ŷ(t) - y(t)||²) / sqrt(sum_t ||y(t)||²)`: 1 keeps everything, 0 is no better than
    outputting 0.

    Attributes:
        layer: decoder layer index.
        block: `"attention"` (experts = key/value groups) or `"mlp"`.
        num_experts, top_k: the block's experts and how many routed ones each token selects (the layer's own top-k).
        kept: the measure above for the sparse model's own routing.
        oracle_kept: the same for selecting, per token, the shared experts and the `top_k` routed experts with the
            largest dense contribution `||y_e(t)||`, summing their dense contributions (for attention this ignores
            that a sparse group only sees the keys that selected it).
        router_recall: share of the router's selections that are among those `top_k` largest routed contributions.
        num_shared: the block's shared experts (its first ones, every token's).
    """

    layer: int
    block: str
    num_experts: int
    top_k: int
    kept: float
    oracle_kept: float
    router_recall: float
    num_shared: int = 0


@dataclass
class SparsifyReport:
    """Per-block retention (`BlockRetention`) and held-out token losses of the dense and the sparse model."""

    blocks: list[BlockRetention]
    num_tokens: int
    dense_loss: float
    sparse_loss: float
    budget: BudgetAllocation | None = None  # the per-layer top-k `sparsify(flops_budget=...)` chose

    @property
    def dense_perplexity(self) -> float:
        return math.exp(self.dense_loss)

    @property
    def sparse_perplexity(self) -> float:
        return math.exp(self.sparse_loss)

    def mean_kept(self, block: str | None = None) -> float:
        """Mean `kept` over the blocks (of one kind: `"attention"` or `"mlp"`)."""
        values = [b.kept for b in self.blocks if block is None or b.block == block]
        return sum(values) / len(values)

    def to_dict(self) -> dict:
        return {
            "num_tokens": self.num_tokens,
            "dense_loss": self.dense_loss,
            "sparse_loss": self.sparse_loss,
            "dense_perplexity": self.dense_perplexity,
            "sparse_perplexity": self.sparse_perplexity,
            "mean_kept": self.mean_kept(),
            "blocks": [asdict(b) for b in self.blocks],
            "budget": None if self.budget is None else self.budget.to_dict(),
        }

    def __str__(self) -> str:
        lines = [
            f"held-out tokens {self.num_tokens:,}: perplexity dense {self.dense_perplexity:.3f}, "
            f"sparse {self.sparse_perplexity:.3f}",
            f"{'layer':>5}  {'block':<9} {'top_k':>7}  {'kept':>6}  {'oracle':>6}  {'recall':>6}",
        ]
        for b in self.blocks:
            shared = f"{b.num_shared}+" if b.num_shared else ""
            lines.append(
                f"{b.layer:>5}  {b.block:<9} {f'{shared}{b.top_k}/{b.num_experts}':>7}  {b.kept:6.3f}  "
                f"{b.oracle_kept:6.3f}  {b.router_recall:6.3f}"
            )
        lines.append(f"mean kept {self.mean_kept():.3f} (attention {self.mean_kept('attention'):.3f}, "
                     f"mlp {self.mean_kept('mlp'):.3f})")  # fmt: skip
        if self.budget is not None:
            lines.append(str(self.budget))
        return "\n".join(lines)


def _token_loss(logits: torch.Tensor, input_ids: torch.Tensor, keep: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over targets whose input and target are both kept, and their count."""
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    valid = keep[:, 1:] & keep[:, :-1]
    return float(losses[valid].sum()), int(valid.sum())


def _kept(squared_error: float, squared_norm: float) -> float:
    return 1.0 - math.sqrt(squared_error / max(squared_norm, 1e-30))


def _retention_hooks(hooks: _Hooks, model: UoEForCausalLM, reference: UoEForCausalLM, state: dict, flat) -> None:
    """Hooks that record, per layer and block, the dense model's inputs, outputs and head outputs, and the sparse
    model's outputs and router logits when `state["forced"]` (teacher forcing: every sparse block then gets the dense
    model's input to that block)."""
    for index, layer in enumerate(reference.model.layers):

        def dense_in(module, args, index=index, block=0):
            state[("in", index, block)] = args[0]

        def dense_out(module, args, output, index=index, block=0):
            state[("out", index, block)] = flat(output[0])

        def dense_heads(module, args, index=index):
            state[("heads", index)] = flat(args[0])

        hooks.pre(layer.self_attn, dense_in)
        hooks.post(layer.self_attn, dense_out)
        hooks.pre(layer.mlp, lambda m, a, index=index: dense_in(m, a, index, 1))
        hooks.post(layer.mlp, lambda m, a, o, index=index: dense_out(m, a, o, index, 1))
        hooks.pre(layer.self_attn.o_proj, dense_heads)
    for index, layer in enumerate(model.model.layers):
        # teacher forcing: every sparse block gets the dense model's input to that block
        def sparse_in(module, args, index=index, block=0):
            if state["forced"]:
                return (state[("in", index, block)], *args[1:])
            return None

        def sparse_out(module, args, output, index=index, block=0):
            if state["forced"]:
                state[("sparse", index, block)] = flat(output[0])

        def router_out(module, args, output, index=index, block=0):
            if state["forced"]:
                state[("logits", index, block)] = flat(output)

        hooks.pre(layer.self_attn, sparse_in)
        hooks.post(layer.self_attn, sparse_out)
        hooks.post(layer.self_attn.router, router_out)
        hooks.pre(layer.mlp, lambda m, a, index=index: sparse_in(m, a, index, 1))
        hooks.post(layer.mlp, lambda m, a, o, index=index: sparse_out(m, a, o, index, 1))
        hooks.post(layer.mlp.router, lambda m, a, o, index=index: router_out(m, a, o, index, 1))


def _block_budgets(config: UoEConfig, index: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """`((attention top-k, shared groups), (MLP top-k, shared experts))` of layer `index`."""
    return (
        (config.attention_top_k_at(index), config.num_shared_attention_groups),
        (config.mlp_top_k_at(index), config.num_shared_mlp_experts),
    )


def _accumulate_retention(
    sums: dict, model: UoEForCausalLM, reference: UoEForCausalLM, state: dict, flat, num_groups: int
) -> None:
    """Add one batch's per-block squared errors, dense norms, oracle errors and router hits to `sums`."""
    for index in range(len(model.model.layers)):
        reference_layer = reference.model.layers[index]
        # per-expert dense contributions: key/value groups and MLP experts of the reference (which has the sparse
        # model's grouping and expert order)
        groups = attention_group_outputs(
            state[("heads", index)], reference_layer.self_attn.o_proj.weight.float(), num_groups
        )
        experts = reference_layer.mlp.experts
        mlp_parts = _expert_outputs(
            _flat_mlp(_expert_tensors(experts)),
            experts.act_fn,
            flat(state[("in", index, 1)]),
            reference.config.num_mlp_experts,
        )
        budgets = _block_budgets(model.config, index)
        for block, (parts, (top_k, shared)) in enumerate(zip((groups, mlp_parts), budgets, strict=True)):
            dense = state[("out", index, block)]
            sums["error"][index, block] += (state[("sparse", index, block)] - dense).double().square().sum()
            total = parts.sum(dim=1)
            sums["norm"][index, block] += total.double().square().sum()
            routed = parts[:, shared:]
            best = routed.norm(dim=-1).topk(top_k, dim=-1).indices
            oracle = parts[:, :shared].sum(1) + routed.gather(1, best[..., None].expand(-1, -1, parts.shape[-1])).sum(1)
            sums["oracle"][index, block] += (oracle - total).double().square().sum()
            chosen = state[("logits", index, block)].topk(top_k, dim=-1).indices
            sums["hits"][index, block] += (chosen[:, :, None] == best[:, None, :]).any(-1).sum()


@torch.no_grad()
def retention_report(model: UoEForCausalLM, reference: UoEForCausalLM, batches: Iterable[Batch]) -> SparsifyReport:
    """Measure how much of `reference`'s (a full-routing model's) function the sparse `model` keeps on `batches`.

    `reference` defines the dense function and the experts: it must have `model`'s MLP grouping and expert order
    (e.g. `model` converted again at full routing; `sparsify` passes the regrouped dense model). Per-layer budgets
    and shared experts of `model` are read from its config. See `BlockRetention` for the per-block figures; the
    losses are next-token cross-entropies of each model run on its own.
    """
    if not reference.config.is_full_routing:
        raise ValueError("`reference` must be at full routing (`config.is_full_routing`): it defines the dense output.")
    if len(model.model.layers) != len(reference.model.layers):
        raise ValueError("`model` and `reference` have different numbers of layers.")
    if model.config.num_mlp_experts != reference.config.num_mlp_experts:
        raise ValueError(
            f"`reference` must have `model`'s MLP experts ({model.config.num_mlp_experts}), got "
            f"{reference.config.num_mlp_experts}: convert it again with the same grouping."
        )
    num_groups, _ = attention_expert_groups(reference.config)
    layers = len(reference.model.layers)
    sums = {
        key: torch.zeros(layers, 2, dtype=torch.float64, device=reference.device)
        for key in ("error", "norm", "oracle", "hits")
    }
    state: dict = {}
    dense_loss = sparse_loss = 0.0
    count = num_tokens = 0
    model.eval()
    reference.eval()

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])[state["keep"]].float()

    with _Hooks() as hooks, _MaskedAttention(reference):
        _retention_hooks(hooks, model, reference, state, flat)
        for inputs, keep in _model_inputs(batches, reference.device):
            state["keep"] = keep.reshape(-1)
            num_tokens += int(keep.sum())
            state["forced"] = False
            dense_logits = reference(**inputs).logits
            sparse_logits = model(**inputs).logits
            state["forced"] = True
            model(**inputs)
            loss, tokens = _token_loss(dense_logits, inputs["input_ids"], keep)
            dense_loss, count = dense_loss + loss, count + tokens
            sparse_loss += _token_loss(sparse_logits, inputs["input_ids"], keep)[0]

            _accumulate_retention(sums, model, reference, state, flat, num_groups)
    if count == 0:
        raise ValueError("`held_out_batches` yielded no next-token targets.")
    blocks = []
    for index in range(layers):
        budgets = _block_budgets(model.config, index)
        for block, (name, (top_k, shared)) in enumerate(zip(("attention", "mlp"), budgets, strict=True)):
            num_experts = attention_expert_groups(model.config)[0] if block == 0 else model.config.num_mlp_experts
            norm = float(sums["norm"][index, block])
            blocks.append(
                BlockRetention(
                    layer=index,
                    block=name,
                    num_experts=num_experts,
                    top_k=top_k,
                    kept=_kept(float(sums["error"][index, block]), norm),
                    oracle_kept=_kept(float(sums["oracle"][index, block]), norm),
                    router_recall=float(sums["hits"][index, block]) / (num_tokens * top_k),
                    num_shared=shared,
                )
            )
    return SparsifyReport(
        blocks=blocks, num_tokens=num_tokens, dense_loss=dense_loss / count, sparse_loss=sparse_loss / count
    )


# ---------------------------------------------------------------------------------------------------------------------
# Sparsify
# ---------------------------------------------------------------------------------------------------------------------


def _check_count(name: str, value, low: int, high: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"`{name}` must be an integer in [{low}, {high}] ({what}), got {value!r}.")


def _check_budget(name: str, value, routed: int, layers: int, what: str) -> None:
    """`value` is None, an int in [1, routed] or a list of `layers` of them."""
    if value is None or not isinstance(value, (list, tuple)):
        _check_top_k(name, value, routed, what)
        return
    if len(value) != layers:
        raise ValueError(f"`{name}` must be an integer or a list of {layers} integers (one per layer), got {value!r}.")
    for index, entry in enumerate(value):
        _check_top_k(f"{name}[{index}]", entry, routed, what)


def _check_sparsify_arguments(
    model: UoEForCausalLM,
    attention_top_k,
    mlp_top_k,
    flops_budget,
    num_mlp_experts: int | None,
    num_shared_attention_groups,
    num_shared_mlp_experts,
    max_calibration_tokens: int,
    sensitivity_tokens: int,
    refit_ridge: float,
) -> int:
    """Raise a `ValueError` naming the first invalid argument of `sparsify`; return `num_mlp_experts` resolved."""
    if not isinstance(model, UoEForCausalLM):
        raise ValueError(f"`model` must be a `UoEForCausalLM`, got {type(model).__name__}.")
    config = model.config
    if config.num_shared_attention_groups or config.num_shared_mlp_experts or config.mlp_chain_length != 1:
        raise ValueError(
            "`model` must be a plain UoE model without shared experts or Chain-of-Experts (e.g. `from_dense`'s): "
            "`sparsify` reads it at full routing and chooses the shared experts itself."
        )
    num_mlp_experts = config.num_mlp_experts if num_mlp_experts is None else num_mlp_experts
    num_groups, _ = attention_expert_groups(config)
    if isinstance(num_mlp_experts, bool) or not isinstance(num_mlp_experts, int) or num_mlp_experts < 1:
        raise ValueError(f"`num_mlp_experts` must be an integer >= 1, got {num_mlp_experts!r}.")
    if config.intermediate_size % num_mlp_experts != 0:
        raise ValueError(
            f"`num_mlp_experts` ({num_mlp_experts}) must divide `intermediate_size` ({config.intermediate_size})."
        )
    _check_count("num_shared_attention_groups", num_shared_attention_groups, 0, num_groups - 1, "key/value groups - 1")
    _check_count("num_shared_mlp_experts", num_shared_mlp_experts, 0, num_mlp_experts - 1, "`num_mlp_experts` - 1")
    routed_groups, routed_experts = num_groups - num_shared_attention_groups, num_mlp_experts - num_shared_mlp_experts
    layers = config.num_layer_groups or config.num_hidden_layers
    if flops_budget is None:
        what = "the routed attention experts (key/value groups); or give `flops_budget`"
        _check_budget("attention_top_k", attention_top_k, routed_groups, layers, what)
        _check_budget("mlp_top_k", mlp_top_k, routed_experts, layers, "the routed MLP experts; or give `flops_budget`")
    else:
        if attention_top_k is not None or mlp_top_k is not None:
            raise ValueError(
                "`flops_budget` chooses the per-layer top-k: leave `attention_top_k` and `mlp_top_k` None with it."
            )
        if isinstance(flops_budget, bool) or not isinstance(flops_budget, (int, float)) or not 0 < flops_budget <= 1:
            raise ValueError(f"`flops_budget` must be a fraction of the dense FLOPs in (0, 1], got {flops_budget!r}.")
    for name, value in (("max_calibration_tokens", max_calibration_tokens), ("sensitivity_tokens", sensitivity_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    if isinstance(refit_ridge, bool) or not isinstance(refit_ridge, (int, float)) or not 0 < refit_ridge < math.inf:
        raise ValueError(f"`refit_ridge` must be a finite number > 0, got {refit_ridge!r}.")
    if config.data_capacity is not None:
        raise ValueError("`model.config.data_capacity` must be None: causal models route by token choice only.")
    return num_mlp_experts


def importance_order(importance: torch.Tensor, num_shared: int) -> torch.Tensor:
    """A permutation of the experts that puts the `num_shared` most important first (most important first) and
    keeps the others in their order: `(experts,)` importance -> `(experts,)` int64."""
    experts = importance.shape[0]
    shared = importance.topk(num_shared).indices if num_shared else importance.new_zeros(0, dtype=torch.long)
    rest = torch.ones(experts, dtype=torch.bool, device=importance.device)
    rest[shared] = False
    return torch.cat([shared, torch.arange(experts, device=importance.device)[rest]])


def _permute_attention_groups(
    state_dict: dict[str, torch.Tensor], prefix: str, order: torch.Tensor, config: UoEConfig
) -> None:
    """Reorder the key/value groups of one attention block (their query heads' rows of q_proj, their key/value heads'
    rows of k_proj / v_proj, their columns of o_proj): a permutation of the heads, exact at full routing."""
    groups, per_group = attention_expert_groups(config)
    order = order.cpu()
    for name, rows in (
        ("q_proj", per_group * config.head_dim),
        ("k_proj", config.head_dim),
        ("v_proj", config.head_dim),
    ):
        for kind in ("weight", "bias"):
            key = f"{prefix}self_attn.{name}.{kind}"
            if key in state_dict:
                tensor = state_dict[key]
                state_dict[key] = tensor.reshape(groups, rows, *tensor.shape[1:])[order].reshape(tensor.shape)
    key = f"{prefix}self_attn.o_proj.weight"
    weight = state_dict[key]
    state_dict[key] = weight.reshape(weight.shape[0], groups, -1)[:, order].reshape(weight.shape)


@torch.no_grad()
def block_sensitivity(
    model: UoEForCausalLM, batches: Iterable[Batch], max_tokens: int = 8192
) -> dict[tuple[int, str], list[float]]:
    """Measured cost of each block's budget: the increase of the next-token loss (nats per token, on `batches`) when
    that block alone selects k routed experts and every other block all of them, for every distinct layer, block
    (`"attention"`, `"mlp"`) and k in `[1, routed experts]` (k = all routed experts: 0).

    `model`'s weights, routers and shared experts are used as they are; its own top-k are not read. `batches`: as
    `sparsify`'s, read until `max_tokens` non-padding tokens. The input to `uoe.budgets.allocate_top_k`.
    """
    batches = _take_tokens(batches, max_tokens)
    config = model.config
    routed = routed_experts(config)
    layers = config.num_layer_groups or config.num_hidden_layers
    state_dict = model.state_dict()

    def loss_of(attention: list[int], mlp: list[int]) -> float:
        candidate = _rebuild(model, state_dict, **top_k_fields(attention, mlp))
        return _mean_token_loss(candidate, batches)

    full = {"attention": [routed["attention"]] * layers, "mlp": [routed["mlp"]] * layers}
    base = loss_of(full["attention"], full["mlp"])
    losses = {}
    for layer in range(layers):
        for block in ("attention", "mlp"):
            values = []
            for k in range(1, routed[block]):
                budget = {name: list(entries) for name, entries in full.items()}
                budget[block][layer] = k
                values.append(loss_of(budget["attention"], budget["mlp"]) - base)
            losses[(layer, block)] = [*values, 0.0]
    return losses


def _take_tokens(batches: Iterable[Batch], max_tokens: int) -> list[Batch]:
    """The first batches of `batches` up to `max_tokens` non-padding tokens (the last one whole)."""
    taken, seen = [], 0
    for batch in batches:
        input_ids, attention_mask = _batch_inputs(batch)
        taken.append(batch)
        seen += int(input_ids.numel() if attention_mask is None else attention_mask.sum())
        if seen >= max_tokens:
            break
    if not taken:
        raise ValueError("`calibration_batches` yielded no batches.")
    return taken


def _mean_token_loss(model: UoEForCausalLM, batches: list[Batch]) -> float:
    total, count = 0.0, 0
    for inputs, keep in _model_inputs(batches, model.device):
        loss, tokens = _token_loss(model(**inputs).logits, inputs["input_ids"], keep)
        total, count = total + loss, count + tokens
    if count == 0:
        raise ValueError("`calibration_batches` yielded no next-token targets.")
    return total / count


def _ridge_solve(gram: torch.Tensor, cross: torch.Tensor, weight: torch.Tensor, ridge: float) -> torch.Tensor:
    """`argmin_W' ||Z W'^T - Y||² + λ ||W' - W||²` from `gram = Z^T Z`, `cross = Y^T Z` (float64), with
    `λ = ridge * mean(diag(gram))`: `W' = (cross + λ W)(gram + λ I)^-1`."""
    strength = ridge * gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + strength * eye, (cross + strength * weight.double()).T).T


@torch.no_grad()
def refit_outputs(
    model: UoEForCausalLM,
    reference: UoEForCausalLM,
    batches: Iterable[Batch],
    max_tokens: int = 16384,
    ridge: float = 0.05,
) -> None:
    """Least-squares compensation of the sparse routing, in place: every layer's `o_proj` and MLP `down_proj` of
    `model` are refitted so that the block's output on the dense model's input to it (teacher forcing) is as close as
    possible to `reference`'s (the full-routing model with `model`'s grouping and expert order) on `batches`.

    For a block with input activations `z(t)` (the selected heads' outputs, unselected ones 0; the selected experts'
    hidden units times their gates, the others 0) and dense output `y(t)`, the new output weight is
    `argmin_W' Σ_t ||W' z(t) - y(t)||² + λ ||W' - W||²` (ridge toward the current weight `W`, `λ = ridge · mean
    eigenvalue of Σ z zᵀ`), accumulated in float64 over up to `max_tokens` non-padding tokens. A linear map of the
    heads (units) a token kept can then stand in for part of what the dropped ones added. Output biases stay.
    """
    layers = len(model.model.layers)
    sums = {}
    state: dict = {}

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])[state["keep"]].double()

    def add(key, z: torch.Tensor, y: torch.Tensor) -> None:
        gram, cross = sums.get(key, (0.0, 0.0))
        sums[key] = (gram + z.T @ z, cross + y.T @ z)

    with _Hooks() as hooks, _MaskedAttention(reference), _MaskedAttention(model):
        for index in range(layers):
            dense_layer, layer = reference.model.layers[index], model.model.layers[index]

            def save(name, index=index):
                return lambda module, args, *output: state.__setitem__((name, index), output[0] if output else args)

            hooks.pre(dense_layer.self_attn, save("attention_in"))
            hooks.post(dense_layer.self_attn, save("attention_out"))
            hooks.pre(dense_layer.mlp, save("mlp_in"))
            hooks.post(dense_layer.mlp, save("mlp_out"))

            def forced(module, args, index=index):
                name = "attention_in" if module is model.model.layers[index].self_attn else "mlp_in"
                return (state[(name, index)][0], *args[1:]) if state["forced"] else None

            hooks.pre(layer.self_attn, forced)
            hooks.pre(layer.mlp, forced)
            hooks.pre(layer.self_attn.o_proj, save("heads"))
            hooks.pre(layer.mlp.experts, save("experts"))
        for inputs, keep in _model_inputs(batches, model.device, max_tokens):
            state["keep"] = keep.reshape(-1)
            state["forced"] = False
            reference(**inputs)
            state["forced"] = True
            model(**inputs)
            for index in range(layers):
                layer = model.model.layers[index]
                bias = layer.self_attn.o_proj.bias
                target = flat(state[("attention_out", index)][0] if isinstance(state[("attention_out", index)], tuple)
                              else state[("attention_out", index)])  # fmt: skip
                add(
                    (index, "attention"),
                    flat(state[("heads", index)][0]),
                    target - (0 if bias is None else bias.double()),
                )
                hidden, top_index, top_weights = state[("experts", index)][:3]
                experts = layer.mlp.experts
                flat_mlp = _flat_mlp(_expert_tensors(experts))
                gates = dense_gates_of(top_index, top_weights, experts.num_experts)  # (tokens, experts)
                units = _unit_activations(flat_mlp, experts.act_fn, hidden.float())
                units = units * gates.repeat_interleave(units.shape[1] // experts.num_experts, dim=1)
                mlp_out = state[("mlp_out", index)]
                target = flat(mlp_out[0] if isinstance(mlp_out, tuple) else mlp_out)
                if layer.mlp.output_bias is not None:
                    target = target - layer.mlp.output_bias.double()
                add((index, "mlp"), units.double()[state["keep"]], target)
    for index in range(layers):
        layer = model.model.layers[index]
        o_proj = layer.self_attn.o_proj
        gram, cross = sums[(index, "attention")]
        o_proj.weight.copy_(_ridge_solve(gram, cross, o_proj.weight, ridge).to(o_proj.weight))
        experts = layer.mlp.experts
        down = experts.down_proj  # (E, hidden, I/E)
        flat_down = down.permute(1, 0, 2).reshape(down.shape[1], -1)
        gram, cross = sums[(index, "mlp")]
        new = _ridge_solve(gram, cross, flat_down, ridge).to(down)
        down.copy_(new.reshape(down.shape[1], down.shape[0], -1).transpose(0, 1))


def dense_gates_of(top_index: torch.Tensor, top_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`(tokens, experts)` gate of every expert: the selected ones' weights, 0 elsewhere."""
    gates = torch.zeros(*top_index.shape[:-1], num_experts, dtype=torch.float32, device=top_index.device)
    return gates.scatter_add(-1, top_index.long(), top_weights.float())


def _dense_reference(
    model: UoEForCausalLM, state_dict: dict[str, torch.Tensor], num_mlp_experts: int
) -> UoEForCausalLM:
    """`state_dict`'s weights at full routing without shared experts (the dense function with the sparse model's
    grouping and expert order); its routers (whose shapes then differ) are zeros, as at full routing they select
    every expert whatever they hold."""
    num_groups, _ = attention_expert_groups(model.config)
    weights = dict(state_dict)
    for name in list(weights):
        if name.endswith("self_attn.router.weight"):
            weights[name] = weights[name].new_zeros(num_groups, weights[name].shape[1])
        elif name.endswith("mlp.router.weight"):
            weights[name] = weights[name].new_zeros(num_mlp_experts, weights[name].shape[1])
    return _rebuild(
        model,
        weights,
        num_mlp_experts=num_mlp_experts,
        attention_top_k=num_groups,
        mlp_top_k=num_mlp_experts,
        layer_attention_top_k=None,
        layer_mlp_top_k=None,
        routing_backend="masked",
    )


@torch.no_grad()
def sparsify(
    model: UoEForCausalLM,
    calibration_batches: Iterable[Batch],
    *,
    attention_top_k: int | list[int] | None = None,
    mlp_top_k: int | list[int] | None = None,
    flops_budget: float | None = None,
    budget_seq_len: int | None = None,
    num_mlp_experts: int | None = None,
    num_shared_attention_groups: int = 0,
    num_shared_mlp_experts: int = 0,
    held_out_batches: Iterable[Batch] | None = None,
    cluster_mlp: bool = True,
    fit_routers: bool = True,
    max_calibration_tokens: int = 16384,
    sensitivity_tokens: int = 8192,
    kmeans_iterations: int = 30,
    ridge: float = 1e-3,
    attention_consistency: float = 3.0,
    refit_output_weights: bool = False,
    refit_ridge: float = 0.05,
    seed: int = 0,
) -> tuple[UoEForCausalLM, SparsifyReport | None]:
    """Turn a UoE causal LM into a sparse one that starts close to its full-routing (dense) function.

    `model` is read at full routing whatever its top-k (e.g. `UoEForCausalLM.from_dense(llama)`); it is not
    modified. The MLP hidden units of every layer are regrouped into `num_mlp_experts` experts of co-activating
    units (`cluster_mlp`), and every router is fitted to pick the experts with the largest contribution per token
    (`fit_routers`); see the module docstring. With both off, the result is the naive baseline: the contiguous
    split and `model`'s own routers (fresh random ones where `num_mlp_experts` changes their shape).

    The budget is either given (`attention_top_k`, `mlp_top_k`: one value for every layer or a list with one per
    layer) or chosen (`flops_budget`): every block's loss increase at each top-k is measured
    (`block_sensitivity`, on the first `sensitivity_tokens` calibration tokens, after the clustering and the router
    fit) and `uoe.budgets.allocate_top_k` picks the per-layer top-k with the least summed increase whose active FLOPs
    (`uoe.estimate_flops_per_token` at `budget_seq_len`) are at most `flops_budget` times the dense FLOPs.

    Shared experts (`num_shared_attention_groups`, `num_shared_mlp_experts`) are chosen per layer by measured
    importance: the groups / experts with the largest mean contribution `||y_e(t)||` on the calibration tokens are
    moved to the front (a permutation, exact at full routing) and become every token's; the routers score the others.

    Args:
        model: a `UoEForCausalLM` without shared experts.
        calibration_batches: `input_ids` tensors `(batch, seq)` or mappings with `input_ids` (and optionally
            `attention_mask`; padding is left out of the statistics). Read until `max_calibration_tokens`.
        attention_top_k: routed attention experts (key/value groups) each token selects: an int in `[1, G - shared]`
            or one per layer; `None` with `flops_budget`.
        mlp_top_k: routed MLP experts each token selects, likewise in `[1, num_mlp_experts - shared]`.
        flops_budget: the active FLOPs per token allowed, as a fraction of the dense model's, in (0, 1]; chooses the
            per-layer top-k (then `attention_top_k` and `mlp_top_k` must be None).
        budget_seq_len: sequence length the FLOPs are counted at; default: the first calibration batch's length.
        num_mlp_experts: experts the MLP hidden units are regrouped into (must divide `intermediate_size`);
            default: `model`'s.
        num_shared_attention_groups, num_shared_mlp_experts: shared experts per block, chosen by importance.
        held_out_batches: data for `retention_report` (same formats); `None` skips the report.
        cluster_mlp: regroup the hidden units by balanced k-means on their activation patterns.
        fit_routers: fit every router to the per-token expert contributions.
        max_calibration_tokens: non-padding tokens the statistics use.
        sensitivity_tokens: non-padding calibration tokens the budget measurements use.
        kmeans_iterations: iterations of the balanced k-means.
        ridge: relative ridge of the router fit (`fit_router`).
        attention_consistency: `consistency` of the attention routers' fit. A group only sees the keys of tokens
            that also selected it, so attention keeps more of the dense output when tokens agree on their groups
            (measured on a small trained Llama with half the groups: kept 0.27 at 0 -> 0.45 at 3, flat to 10;
            the MLP, without that coupling, is best at 0).
        refit_output_weights: after the routing is fixed, refit every `o_proj` and MLP `down_proj` by ridge least
            squares so that each sparse block's output on the dense input approaches the dense output
            (`refit_outputs`, on the calibration tokens). The model is then no longer exact at full routing.
        refit_ridge: the relative ridge of that refit (toward the dense weights).
        seed: seed of the k-means initialisation and of newly initialised routers.

    Returns:
        `(sparse_model, report)`: a new `UoEForCausalLM` in eval mode with the new top-k and MLP grouping, and the
        `SparsifyReport` on `held_out_batches` (or `None`); with `flops_budget` the report's `budget` holds the
        measurements and the choice (`uoe.budgets.BudgetAllocation`).
    """
    num_mlp_experts = _check_sparsify_arguments(
        model,
        attention_top_k,
        mlp_top_k,
        flops_budget,
        num_mlp_experts,
        num_shared_attention_groups,
        num_shared_mlp_experts,
        max_calibration_tokens,
        sensitivity_tokens,
        refit_ridge,
    )
    config = model.config
    num_groups, _ = attention_expert_groups(config)
    calibration_batches = list(calibration_batches)
    # The dense function: the same weights with every expert selected.
    full_routing = dict(layer_attention_top_k=None, layer_mlp_top_k=None, routing_backend="masked")
    dense = _rebuild(
        model, model.state_dict(), attention_top_k=num_groups, mlp_top_k=config.num_mlp_experts, **full_routing
    )
    state_dict = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    regroup = cluster_mlp or num_mlp_experts != config.num_mlp_experts
    shared = num_shared_attention_groups or num_shared_mlp_experts
    needs_stats = cluster_mlp or fit_routers or shared
    stats = _collect(dense, calibration_batches, max_calibration_tokens) if needs_stats else None
    generator = torch.Generator().manual_seed(seed)

    def random_router(rows: int, like: torch.Tensor) -> torch.Tensor:
        weight = torch.empty(rows, config.hidden_size).normal_(0.0, config.initializer_range, generator=generator)
        return weight.to(like)

    for index, layer in enumerate(dense.model.layers):
        prefix = f"model.layers.{index}."
        flat = _flat_mlp(_expert_tensors(layer.mlp.experts))
        act_fn = layer.mlp.experts.act_fn
        units = flat["down"].shape[1]
        order = torch.arange(units, device=flat["down"].device)  # the contiguous split
        if cluster_mlp:
            activations = _unit_activations(flat, act_fn, stats["mlp_in"][index])
            order = cluster_mlp_units(
                activations, flat["down"], num_mlp_experts, iterations=kmeans_iterations, generator=generator
            ).to(order.device)
        if num_shared_mlp_experts:
            # the most important experts (largest mean contribution) first: they become the shared ones
            regrouped = {name: t[order] if name != "down" else t[:, order] for name, t in flat.items()}
            sizes = _expert_outputs(regrouped, act_fn, stats["mlp_in"][index], num_mlp_experts).norm(dim=-1)
            experts = importance_order(sizes.mean(0), num_shared_mlp_experts).to(order.device)
            order = order.view(num_mlp_experts, -1)[experts].reshape(-1)
        if regroup or num_shared_mlp_experts:
            flat = {name: tensor[order] if name != "down" else tensor[:, order] for name, tensor in flat.items()}
            dtype = state_dict[prefix + "mlp.experts.down_proj"].dtype
            for name, tensor in _stacked_mlp(flat, num_mlp_experts).items():
                state_dict[prefix + "mlp.experts." + name] = tensor.to(dtype)
        attention_sizes = None if stats is None else stats["attn_c"][index]
        if num_shared_attention_groups:
            groups = importance_order(attention_sizes.mean(0), num_shared_attention_groups)
            _permute_attention_groups(state_dict, prefix, groups, config)
            attention_sizes = attention_sizes[:, groups.to(attention_sizes.device)]
        if fit_routers:
            attention_router = fit_router(
                stats["attn_in"][index],
                attention_sizes[:, num_shared_attention_groups:],
                ridge,
                consistency=attention_consistency,
            )
            state_dict[prefix + "self_attn.router.weight"] = attention_router.to(layer.self_attn.router.weight)
            sizes = _expert_outputs(flat, act_fn, stats["mlp_in"][index], num_mlp_experts).norm(dim=-1)
            mlp_router = fit_router(stats["mlp_in"][index], sizes[:, num_shared_mlp_experts:], ridge)
            state_dict[prefix + "mlp.router.weight"] = mlp_router.to(layer.mlp.router.weight)
        else:
            if num_shared_attention_groups:
                rows = num_groups - num_shared_attention_groups
                state_dict[prefix + "self_attn.router.weight"] = random_router(rows, layer.self_attn.router.weight)
            if num_mlp_experts != config.num_mlp_experts or num_shared_mlp_experts:
                rows = num_mlp_experts - num_shared_mlp_experts
                state_dict[prefix + "mlp.router.weight"] = random_router(rows, layer.mlp.router.weight)

    layout = dict(
        num_mlp_experts=num_mlp_experts,
        num_shared_attention_groups=num_shared_attention_groups,
        num_shared_mlp_experts=num_shared_mlp_experts,
    )
    allocation = None
    if flops_budget is not None:
        routed_groups = num_groups - num_shared_attention_groups
        probe = _rebuild(
            model, state_dict, **layout, **top_k_fields(routed_groups, num_mlp_experts - num_shared_mlp_experts)
        )
        losses = block_sensitivity(probe, calibration_batches, sensitivity_tokens)
        seq_len = budget_seq_len or int(_batch_inputs(calibration_batches[0])[0].shape[-1])
        allocation = allocate_top_k(probe.config, losses, flops_budget, seq_len)
        attention_top_k, mlp_top_k = allocation.layer_attention_top_k, allocation.layer_mlp_top_k
    sparse = _rebuild(model, state_dict, **layout, **top_k_fields(attention_top_k, mlp_top_k))
    # the reference: the regrouped (and permuted) weights at full routing, so that expert ids agree
    reference = _dense_reference(model, state_dict, num_mlp_experts)
    if refit_output_weights:
        refit_outputs(sparse, reference, calibration_batches, max_calibration_tokens, refit_ridge)
    report = None
    if held_out_batches is not None:
        report = retention_report(sparse, reference, held_out_batches)
        report.budget = allocation
    return sparse, report


__all__ = [
    "BlockRetention",
    "SparsifyReport",
    "block_sensitivity",
    "importance_order",
    "refit_outputs",
    "attention_expert_groups",
    "attention_group_outputs",
    "balanced_assignment",
    "balanced_kmeans",
    "cluster_mlp_units",
    "fit_router",
    "retention_report",
    "sparsify",
]
