"""Merge, then compress (MC-SMoE: Li et al., "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its
Routing Policy", ICLR 2024) for UoE's UoME experts and transformers' Mixtral and Qwen3-MoE experts.

A trained mixture of experts often keeps experts that compute nearly the same thing. From a few calibration
batches (no gradient steps), this module shrinks such a model in two stages:

**M-SMoE: merge** (`merge_experts`), per MoE block (one UoME block of UoE, one sparse MLP of Mixtral / Qwen3-MoE):

1. *Statistics* (`collect_expert_statistics`): how often each routed expert is selected (its routing frequency)
   and the Gram matrix of the router logits over the calibration tokens, each token's logits centred over the
   experts (softmax ignores a common offset, so the centred logits are what tells experts apart).
2. *Grouping* (`group_experts`): the `num_experts` most frequently selected experts are the dominant ones; every
   other expert joins the dominant expert whose router-logit column is most similar to its own (cosine over the
   calibration tokens). `grouping="random"` (a baseline) draws the dominant experts and the assignment at random.
3. *Alignment*: an MLP expert is a sum over its hidden units, so permuting them changes nothing (UoME slices and
   SwiGLU / GELU experts alike). Before averaging, each member's units are permuted to match the dominant
   expert's: the permutation maximising the summed inner products of matched units' weights (a unit's weights are
   its rows of the gate/up projection, its up bias and its column of the down projection), found exactly by the
   Hungarian algorithm (`scipy.optimize.linear_sum_assignment`).
4. *Merging*: the group's aligned weights are averaged weighted by routing frequency (uniformly for a group that
   was never selected, or with `weighting="uniform"`), and so are the group's router rows (`router="mean"`;
   `router="dominant"` keeps the dominant expert's row).

The result is an ordinary model of the same class with fewer experts (`num_mlp_experts` / `num_local_experts` /
`num_experts` reduced, UoE's `intermediate_size` = expert width x experts): it saves, reloads (by remote code for
UoE) and trains like any other. `split_merged_experts` undoes the reduction in the representation MC-SMoE works in
(every original expert slot points at its group's merged weights, un-permuted, with its original router row), so
two experts that are permuted copies of each other merge and re-split without loss.

**C-SMoE: compress** (`compress_experts`), applied to a merged model:

- *structured pruning* (`prune_expert_units`): every expert keeps its `width` most important hidden units, a unit's
  importance being its mean contribution `|h_u(x)| * ||down column u||` over the calibration tokens routed to the
  expert (`h_u` = act(gate) * up, or act(up + bias)). Averaging misaligned units leaves units that contribute
  little; these go first. The configs tie one width to every expert, so every expert keeps the same number of
  units. The result is still an ordinary model;
- *low rank* (`low_rank_experts`): each expert's projections become rank-`rank` factors from a truncated SVD
  (`LowRankExperts`, a drop-in experts module; in-memory only: `from_pretrained` knows only the full layout).

MC-SMoE's compression splits each merged weight into a low-rank part plus a sparse remainder; here the sparse
part is structured (whole hidden units), so that it saves parameters and FLOPs in dense kernels. MC-SMoE also
chooses a number of experts per layer (from a global frequency ranking); these configs hold one number of experts
for every layer, so every block keeps `num_experts`. `drop_experts` (keep the most frequent experts, discard the
others) is the pruning baseline MC-SMoE compares against.

Calibration and merging run under `torch.no_grad`; loops run over blocks, groups and experts (offline tooling),
never over tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

Batch = torch.Tensor | Mapping[str, torch.Tensor]

# model_type -> (config field of the number of experts, config field of one expert's width or None for UoE, whose
# `intermediate_size` is the width times the number of experts)
FAMILIES: dict[str, tuple[str, str | None]] = {
    "uoe": ("num_mlp_experts", None),
    "mixtral": ("num_local_experts", "intermediate_size"),
    "qwen3_moe": ("num_experts", "moe_intermediate_size"),
}
GROUPINGS = ("router_logits", "random")
ROUTER_MERGES = ("mean", "dominant")
WEIGHTINGS = ("frequency", "uniform")
ALIGNMENTS = ("weight", "none")


# ---------------------------------------------------------------------------------------------------------------------
# MoE blocks of the supported families
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class MoEBlock:
    """One MoE block: its stacked experts, the routers that choose among its routed experts (UoE's Chain-of-Experts
    has one per iteration), and its leading shared experts (UoE's `num_shared_mlp_experts`; never merged)."""

    name: str
    module: nn.Module
    experts: nn.Module
    routers: list[tuple[str, nn.Module]]
    num_shared: int
    top_k: int

    @property
    def num_experts(self) -> int:
        """All experts of the block, shared ones included."""
        down = getattr(self.experts, "down_proj", None)
        return int(down.shape[0]) if isinstance(down, torch.Tensor) else int(self.experts.num_experts)

    @property
    def num_routed(self) -> int:
        return self.num_experts - self.num_shared

    @property
    def width(self) -> int:
        """Hidden units of one expert."""
        down = getattr(self.experts, "down_proj", None)
        return int(down.shape[2]) if isinstance(down, torch.Tensor) else int(self.experts.intermediate_dim)


def model_family(model: nn.Module) -> str:
    """`"uoe"`, `"mixtral"` or `"qwen3_moe"`; `ValueError` naming `model` for anything else."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise ValueError(
            f"`model` must be a UoE, Mixtral or Qwen3-MoE model (config.model_type one of {sorted(FAMILIES)}), "
            f"got {type(model).__name__} with model_type {family!r}."
        )
    return family


def moe_blocks(model: nn.Module, stacked: bool = True) -> list[MoEBlock]:
    """The MoE blocks of `model` in module order; with `stacked`, `ValueError` unless every experts module holds the
    stacked layout (not `LowRankExperts`, no adapters)."""
    family = model_family(model)
    blocks = []
    for name, module in model.named_modules():
        if family == "uoe":
            from .modeling_uoe import UoESparseMLP

            if isinstance(module, UoESparseMLP):
                routers = [(f"{name}.router", module.router)]
                routers += [(f"{name}.chain_routers.{i}", r) for i, r in enumerate(module.chain_routers)]
                blocks.append(MoEBlock(name, module, module.experts, routers, module.num_shared, module.top_k))
        elif family == "mixtral":
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

            if isinstance(module, MixtralSparseMoeBlock):
                blocks.append(MoEBlock(name, module, module.experts, [(f"{name}.gate", module.gate)], 0, module.top_k))
        else:
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

            if isinstance(module, Qwen3MoeSparseMoeBlock):
                top_k = module.gate.top_k
                blocks.append(MoEBlock(name, module, module.experts, [(f"{name}.gate", module.gate)], 0, top_k))
    if not blocks:
        raise ValueError(f"`model` ({type(model).__name__}) has no MoE block to merge.")
    if stacked:
        for block in blocks:
            _unit_tensors(block.experts)  # refuses experts modules of another layout (e.g. wrapped by PEFT)
    return blocks


# ---------------------------------------------------------------------------------------------------------------------
# Hidden units: every expert tensor viewed as (experts, units, features of one unit)
# ---------------------------------------------------------------------------------------------------------------------

_STACKED_NAMES = ("gate_up_proj", "up_proj", "up_proj_bias", "down_proj")


def _unit_tensors(experts: nn.Module) -> dict[str, torch.Tensor]:
    """The experts' learnable tensors as `(experts, units, features)`: a SwiGLU unit's gate row and up row side by
    side, a GELU unit's up row, its up bias (one feature), and its down column. Permuting or selecting units is
    indexing dim 1 of every tensor alike."""
    params = dict(experts.named_parameters(recurse=False))
    unknown = sorted(set(params) - set(_STACKED_NAMES))
    if unknown or "down_proj" not in params or ("gate_up_proj" in params) == ("up_proj" in params):
        raise ValueError(
            f"`model`'s experts module {type(experts).__name__} has parameters {sorted(params)}; merging needs the "
            "stacked layout `gate_up_proj` or `up_proj` (+ `up_proj_bias`) with `down_proj` (no adapters or wrappers)."
        )
    down = params["down_proj"].detach()
    num_experts, _, width = down.shape
    units = {}
    if "gate_up_proj" in params:
        gate_up = params["gate_up_proj"].detach()
        units["gate_up_proj"] = gate_up.view(num_experts, 2, width, -1).transpose(1, 2).reshape(num_experts, width, -1)
    else:
        units["up_proj"] = params["up_proj"].detach()
    if "up_proj_bias" in params:
        units["up_proj_bias"] = params["up_proj_bias"].detach()[..., None]
    units["down_proj"] = down.transpose(1, 2)
    return units


def _stacked_tensors(units: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `_unit_tensors`: the parameters' own layout (contiguous)."""
    stacked = {}
    for name, tensor in units.items():
        num_experts, width = tensor.shape[:2]
        if name == "gate_up_proj":
            stacked[name] = (
                tensor.reshape(num_experts, width, 2, -1).transpose(1, 2).reshape(num_experts, 2 * width, -1)
            )
        elif name == "up_proj_bias":
            stacked[name] = tensor[..., 0]
        elif name == "down_proj":
            stacked[name] = tensor.transpose(1, 2)
        else:
            stacked[name] = tensor
        stacked[name] = stacked[name].contiguous()
    return stacked


def _unit_features(units: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """`(experts, units, all features)`: what weight matching compares."""
    return torch.cat([tensor for tensor in units.values()], dim=-1)


def _unit_activations(experts: nn.Module, units: Mapping[str, torch.Tensor], expert: int, x: torch.Tensor):
    """`h(x)` of one expert's hidden units for rows `x`: act(gate) * up, or act(up + bias)."""
    if "gate_up_proj" in units:
        gate_rows, up_rows = units["gate_up_proj"][expert].to(x.dtype).chunk(2, dim=-1)  # (units, hidden) each
        return experts.act_fn(x @ gate_rows.T) * (x @ up_rows.T)
    inner = x @ units["up_proj"][expert].to(x.dtype).T
    if "up_proj_bias" in units:
        inner = inner + units["up_proj_bias"][expert, :, 0].to(x.dtype)
    return experts.act_fn(inner)


# ---------------------------------------------------------------------------------------------------------------------
# Calibration statistics
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ExpertStatistics:
    """What one MoE block did on the calibration batches.

    counts: `(routed experts,)` float64, (token, expert) selections of each routed expert (all routers of the block,
        every application of it; the image encoder's CLS token, which uses every expert, counts for each).
    tokens: the tokens the block's experts computed (padding excluded).
    logit_gram: `(routed, routed)` float64, `sum_t z_t z_t^T` of the router logits `z_t` centred over the experts.
    unit_importance: `(experts, width)` float64 or None, each unit's mean `|h_u(x)| * ||down column||` over the
        tokens routed to its expert (shared experts: every token), 0 for an expert nobody selected.
    """

    block: str
    counts: torch.Tensor
    tokens: int
    logit_gram: torch.Tensor
    unit_importance: torch.Tensor | None = None

    @property
    def frequency(self) -> torch.Tensor:
        """Share of the block's selections that went to each routed expert (sums to 1; uniform if none)."""
        total = self.counts.sum()
        return self.counts / total if total > 0 else torch.full_like(self.counts, 1 / len(self.counts))

    @property
    def router_similarity(self) -> torch.Tensor:
        """Cosine similarity of the experts' centred router-logit columns over the calibration tokens."""
        norms = self.logit_gram.diagonal().clamp_min(1e-30).sqrt()
        return self.logit_gram / (norms[:, None] * norms[None, :])


def _batch_kwargs(batch: Batch, argument: str = "calibration_batches") -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    if isinstance(batch, Mapping) and ("input_ids" in batch or "pixel_values" in batch or "inputs_embeds" in batch):
        return {k: v for k, v in batch.items() if k != "labels"}
    raise ValueError(
        f"`{argument}` must yield `input_ids` tensors or mappings of model inputs (`input_ids`, `attention_mask`, "
        f"`pixel_values`, ...), got {type(batch).__name__}."
    )


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def collect_expert_statistics(
    model: nn.Module, calibration_batches: Iterable[Batch], unit_importance: bool = False
) -> list[ExpertStatistics]:
    """Routing frequencies, router-logit Gram matrices and (optionally) hidden-unit importance of every MoE block,
    from forward passes over `calibration_batches` (`input_ids` tensors or mappings of model inputs; an
    `attention_mask` excludes padding). The model runs in eval mode; its mode is restored."""
    blocks = moe_blocks(model)
    device = _model_device(model)
    state = {"mask": None}
    selected = {block.name: torch.zeros(block.num_experts, dtype=torch.float64) for block in blocks}
    stats = []
    handles = []

    def experts_hook(block: MoEBlock, record: ExpertStatistics):
        def hook(module, args, output):
            hidden, index, weights = args[0], args[1], args[2]
            valid = weights != 0
            if len(args) > 3 and args[3] is not None:
                valid = valid & args[3].bool()
            mask = state["mask"]
            if mask is not None and mask.numel() == valid.shape[0]:  # padding is routed by some models: leave it out
                valid = valid & mask.reshape(-1, 1).bool()
            rows_valid = valid.any(-1)
            record.tokens += int(rows_valid.sum())
            chosen = index[valid]
            counts = torch.bincount(chosen.flatten(), minlength=block.num_experts).to(torch.float64).cpu()
            record.counts += counts[block.num_shared :]
            if record.unit_importance is not None:
                units = _unit_tensors(module)
                down_norms = units["down_proj"].to(torch.float64).norm(dim=-1)  # (experts, width)
                for expert in chosen.unique().tolist():
                    rows = (valid & (index == expert)).any(-1)
                    h = _unit_activations(module, units, expert, hidden[rows].to(torch.float64))
                    contribution = (h.abs() * down_norms[expert]).sum(0).cpu()
                    record.unit_importance[expert] += contribution
                    selected[block.name][expert] += int(rows.sum())

        return hook

    def router_hook(record: ExpertStatistics):
        def hook(module, args, output):
            logits = output[0] if isinstance(output, tuple) else output
            logits = logits.reshape(-1, logits.shape[-1]).to(torch.float64)
            mask = state["mask"]
            if mask is not None and mask.numel() == logits.shape[0]:
                logits = logits[mask.reshape(-1).bool()]
            centred = logits - logits.mean(-1, keepdim=True)
            record.logit_gram += (centred.T @ centred).cpu()

        return hook

    for block in blocks:
        routed = block.num_routed
        record = ExpertStatistics(
            block=block.name,
            counts=torch.zeros(routed, dtype=torch.float64),
            tokens=0,
            logit_gram=torch.zeros(routed, routed, dtype=torch.float64),
            unit_importance=torch.zeros(block.num_experts, block.width, dtype=torch.float64)
            if unit_importance
            else None,
        )
        stats.append(record)
        handles.append(block.experts.register_forward_hook(experts_hook(block, record)))
        for _, router in block.routers:
            handles.append(router.register_forward_hook(router_hook(record)))
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in calibration_batches:
            kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _batch_kwargs(batch).items()}
            state["mask"] = kwargs.get("attention_mask")
            model(**kwargs)
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("`calibration_batches` is empty: at least one batch is needed.")
    for block, record in zip(blocks, stats, strict=True):
        if record.unit_importance is not None:
            record.unit_importance /= selected[block.name].clamp_min(1)[:, None]
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# Grouping, alignment and the merge
# ---------------------------------------------------------------------------------------------------------------------


def _check_num_experts(num_experts, block: MoEBlock) -> None:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 1 <= num_experts <= block.num_routed:
        raise ValueError(
            f"`num_experts` (routed experts to keep per block) must be an integer in [1, {block.num_routed}], got "
            f"{num_experts!r}."
        )
    if num_experts < block.top_k:
        raise ValueError(
            f"`num_experts` ({num_experts}) must be at least the block's top-k ({block.top_k}): every token selects "
            "that many experts."
        )


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def group_experts(
    statistics: ExpertStatistics, num_experts: int, grouping: str = "router_logits", seed: int = 0
) -> list[list[int]]:
    """Partition a block's routed experts into `num_experts` groups; each group lists its dominant expert first,
    then its other members in increasing order; groups are ordered by their dominant expert's index.

    `"router_logits"` (MC-SMoE): the `num_experts` most frequently selected experts dominate (ties: lower index),
    each other expert joins the dominant expert of highest router-logit similarity. `"random"`: dominant experts
    and assignment drawn uniformly with `seed` (the random-grouping baseline)."""
    _check_choice("grouping", grouping, GROUPINGS)
    routed = len(statistics.counts)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 1 <= num_experts <= routed:
        raise ValueError(f"`num_experts` must be an integer in [1, {routed}], got {num_experts!r}.")
    if grouping == "router_logits":
        order = sorted(range(routed), key=lambda e: (-float(statistics.counts[e]), e))
        dominant = sorted(order[:num_experts])
        similarity = statistics.router_similarity[:, dominant]
        owner = {d: d for d in dominant}
        for expert in range(routed):
            if expert not in owner:
                owner[expert] = dominant[int(similarity[expert].argmax())]
    else:
        generator = torch.Generator().manual_seed(seed)
        dominant = sorted(torch.randperm(routed, generator=generator)[:num_experts].tolist())
        draws = torch.randint(0, num_experts, (routed,), generator=generator).tolist()
        owner = {e: (e if e in dominant else dominant[draws[e]]) for e in range(routed)}
    return [[d, *sorted(e for e in range(routed) if owner[e] == d and e != d)] for d in dominant]


def align_units(reference: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """The permutation `p` of `member`'s hidden units that best matches `reference`'s (weight matching): `member[p]`
    maximises `sum_u <reference[u], member[p[u]]>` over all permutations (Hungarian algorithm, exact).

    Args:
        reference, member: `(units, features)`, one row of weights per hidden unit (`_unit_tensors` concatenated).
    """
    from scipy.optimize import linear_sum_assignment

    if reference.shape != member.shape or reference.dim() != 2:
        raise ValueError(
            f"`reference` and `member` must both be (units, features) of one shape, got {tuple(reference.shape)} "
            f"and {tuple(member.shape)}."
        )
    similarity = (reference.to(torch.float64) @ member.to(torch.float64).T).cpu().numpy()
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    permutation = torch.empty(len(rows), dtype=torch.long)
    permutation[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return permutation


@dataclass
class BlockMerge:
    """How one block was merged: merged expert j (after the shared ones) = `sum_m weights[j][m] *
    member_m[permutations[j][m]]` over the members `groups[j]` (routed indices, dominant first); router rows alike.
    `router_weights` keeps the block's original router rows (for `split_merged_experts`)."""

    block: str
    groups: list[list[int]]
    weights: list[list[float]]
    permutations: list[list[torch.Tensor]]
    router_weights: dict[str, torch.Tensor] = field(repr=False)


@dataclass
class MergePlan:
    """What `merge_experts` did; `to_dict()` for JSON (groups, weights, settings)."""

    family: str
    num_experts_before: int
    num_experts_after: int
    grouping: str
    alignment: str
    weighting: str
    router: str
    blocks: list[BlockMerge]
    statistics: list[ExpertStatistics] = field(repr=False)

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "num_experts_before": self.num_experts_before,
            "num_experts_after": self.num_experts_after,
            "grouping": self.grouping,
            "alignment": self.alignment,
            "weighting": self.weighting,
            "router": self.router,
            "blocks": [
                {
                    "block": b.block,
                    "groups": b.groups,
                    "weights": [[round(w, 6) for w in ws] for ws in b.weights],
                    "frequency": [round(float(f), 6) for f in s.frequency],
                }
                for b, s in zip(self.blocks, self.statistics, strict=True)
            ],
        }


def _rebuild(model: nn.Module, state_dict: dict[str, torch.Tensor], num_routed: int, width: int) -> nn.Module:
    """A new model of `model`'s class whose blocks have `num_routed` routed experts of width `width`, loaded from
    `state_dict` (strictly: every tensor must fit the new layout)."""
    family = model_family(model)
    config = model.config
    count_field, width_field = FAMILIES[family]
    changes: dict = {}
    if family == "uoe":
        total = config.num_shared_mlp_experts + num_routed
        changes = {count_field: total, "intermediate_size": width * total}
    else:
        changes = {count_field: num_routed, width_field: width}
    new_config = copy.deepcopy(config)
    for name, value in changes.items():
        setattr(new_config, name, value)
    type(config).from_dict(new_config.to_dict())  # the class's own validation of the new sizes
    parameter = next(model.parameters())
    new_model = type(model)(new_config)
    missing, unexpected = new_model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(new_model, "_tied_weights_keys", None) or {}) if new_config.tie_word_embeddings else set()
    missing = [name for name in missing if name not in tied]
    if missing or unexpected:
        raise ValueError(f"merged weights do not fit the new layout: missing {missing}, unexpected {unexpected}")
    if new_config.tie_word_embeddings:
        new_model.tie_weights()
    return new_model.to(device=parameter.device, dtype=parameter.dtype).train(model.training)


def _new_block_state(
    state: dict[str, torch.Tensor],
    block: MoEBlock,
    units: Mapping[str, torch.Tensor],
    routers: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
) -> None:
    for name, tensor in _stacked_tensors(units).items():
        key = f"{block.name}.experts.{name}"
        if key in state:
            state[key] = tensor.to(dtype)
    for path, weight in routers.items():
        state[f"{path}.weight"] = weight.to(dtype)


@torch.no_grad()
def _merge_inputs(
    model: nn.Module,
    blocks: list,
    calibration_batches: Iterable[Batch] | None,
    num_experts: int | None,
    statistics: Sequence[ExpertStatistics] | None,
    groups: Sequence[Sequence[Sequence[int]]] | None,
) -> tuple[Sequence[ExpertStatistics], int]:
    """`merge_experts`' statistics (collected when not given) and target expert count, checked against the blocks."""
    if statistics is None:
        if calibration_batches is None:
            raise ValueError("`calibration_batches` (or `statistics`) is needed to merge by routing statistics.")
        statistics = collect_expert_statistics(model, calibration_batches)
    if len(statistics) != len(blocks) or any(s.block != b.name for s, b in zip(statistics, blocks, strict=True)):
        raise ValueError("`statistics` must be `collect_expert_statistics(model, ...)` of this model (one per block).")
    if groups is not None:
        if len(groups) != len(blocks):
            raise ValueError(f"`groups` must hold one partition per MoE block ({len(blocks)}), got {len(groups)}.")
        sizes = {len(g) for g in groups}
        if num_experts is None and len(sizes) == 1:
            num_experts = sizes.pop()
        for block, partition in zip(blocks, groups, strict=True):
            flat = sorted(e for group in partition for e in group)
            if flat != list(range(block.num_routed)) or len(partition) != num_experts:
                raise ValueError(
                    f"`groups` of block {block.name} must partition its {block.num_routed} routed experts into "
                    f"`num_experts`={num_experts} non-empty groups, got {partition!r}."
                )
    if num_experts is None:
        raise ValueError("`num_experts` is needed (or `groups`).")
    for block in blocks:
        _check_num_experts(num_experts, block)
    widths = {block.width for block in blocks}
    if len(widths) != 1:
        raise ValueError(f"`model`'s blocks have experts of different widths {sorted(widths)}.")

    return statistics, num_experts


def merge_experts(
    model: nn.Module,
    calibration_batches: Iterable[Batch] | None = None,
    num_experts: int | None = None,
    *,
    statistics: Sequence[ExpertStatistics] | None = None,
    groups: Sequence[Sequence[Sequence[int]]] | None = None,
    grouping: str = "router_logits",
    alignment: str = "weight",
    weighting: str = "frequency",
    router: str = "mean",
    seed: int = 0,
) -> tuple[nn.Module, MergePlan]:
    """M-SMoE: merge every MoE block of `model` (UoE, Mixtral or Qwen3-MoE) down to `num_experts` routed experts.

    Args:
        model: the model; it is not modified.
        calibration_batches: `input_ids` tensors or mappings of model inputs for `collect_expert_statistics`
            (not needed when `statistics` is given).
        num_experts: routed experts per block after merging (at least the top-k); may be left out with `groups`.
        statistics: statistics of `model` from `collect_expert_statistics`, instead of `calibration_batches`.
        groups: per block, the partition of its routed experts (dominant first), instead of `group_experts`.
        grouping: `"router_logits"` (MC-SMoE) or `"random"` (baseline), see `group_experts`.
        alignment: `"weight"` (permute each member's units to match the dominant expert, `align_units`) or `"none"`.
        weighting: `"frequency"` (MC-SMoE) or `"uniform"` average of each group.
        router: merged router row = the group's weighted mean of rows (`"mean"`) or the dominant's (`"dominant"`).
        seed: of the random grouping.

    Returns:
        `(merged model, MergePlan)`: a new model of `model`'s class with the reduced number of experts.
    """
    family = model_family(model)
    _check_choice("grouping", grouping, GROUPINGS)
    _check_choice("alignment", alignment, ALIGNMENTS)
    _check_choice("weighting", weighting, WEIGHTINGS)
    _check_choice("router", router, ROUTER_MERGES)
    blocks = moe_blocks(model)
    statistics, num_experts = _merge_inputs(model, blocks, calibration_batches, num_experts, statistics, groups)

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dtype = next(model.parameters()).dtype
    merges = []
    for index, (block, stats) in enumerate(zip(blocks, statistics, strict=True)):
        partition = (
            [list(g) for g in groups[index]]
            if groups is not None
            else group_experts(stats, num_experts, grouping, seed=seed + index)
        )
        units = {k: v.to(torch.float64) for k, v in _unit_tensors(block.experts).items()}
        features = _unit_features(units)
        shared = block.num_shared
        merged_units = {name: [tensor[:shared]] for name, tensor in units.items()}
        router_rows = {path: [] for path, _ in block.routers}
        all_weights, all_perms = [], []
        for group in partition:
            counts = stats.counts[group]
            if weighting == "frequency" and counts.sum() > 0:
                weights = counts / counts.sum()
            else:
                weights = torch.full((len(group),), 1 / len(group), dtype=torch.float64)
            dominant = shared + group[0]
            perms = []
            for member in group:
                expert = shared + member
                if member == group[0] or alignment == "none":
                    perms.append(torch.arange(block.width))
                else:
                    perms.append(align_units(features[dominant], features[expert]))
            for name, tensor in units.items():
                merged = sum(w * tensor[shared + m][p] for w, m, p in zip(weights, group, perms, strict=True))
                merged_units[name].append(merged[None])
            for path, module in block.routers:
                rows = module.weight.detach().to(torch.float64)
                if router == "mean":
                    row = sum(w * rows[m] for w, m in zip(weights, group, strict=True))
                else:
                    row = rows[group[0]]
                router_rows[path].append(row)
            all_weights.append([float(w) for w in weights])
            all_perms.append(perms)
        new_units = {name: torch.cat(parts) for name, parts in merged_units.items()}
        new_routers = {path: torch.stack(rows) for path, rows in router_rows.items()}
        _new_block_state(state, block, new_units, new_routers, dtype)
        merges.append(
            BlockMerge(
                block=block.name,
                groups=partition,
                weights=all_weights,
                permutations=all_perms,
                router_weights={path: module.weight.detach().clone() for path, module in block.routers},
            )
        )
    merged_model = _rebuild(model, state, num_experts, blocks[0].width)
    plan = MergePlan(
        family=family,
        num_experts_before=blocks[0].num_routed,
        num_experts_after=num_experts,
        grouping="given" if groups is not None else grouping,
        alignment=alignment,
        weighting=weighting,
        router=router,
        blocks=merges,
        statistics=list(statistics),
    )
    return merged_model, plan


@torch.no_grad()
def split_merged_experts(merged_model: nn.Module, plan: MergePlan) -> nn.Module:
    """Re-split a merged model to the original number of experts, as MC-SMoE represents a merged model: original
    expert m of group j gets merged expert j's weights with its units put back in m's order (the inverse of m's
    alignment permutation) and its original router rows. For a group of experts that are permuted copies of each
    other this restores the original weights, so the original model's outputs."""
    blocks = moe_blocks(merged_model)
    if len(blocks) != len(plan.blocks):
        raise ValueError("`plan` does not belong to `merged_model`: different numbers of MoE blocks.")
    state = {k: v.detach().clone() for k, v in merged_model.state_dict().items()}
    dtype = next(merged_model.parameters()).dtype
    for block, merge in zip(blocks, plan.blocks, strict=True):
        if block.name != merge.block or block.num_routed != len(merge.groups):
            raise ValueError(f"`plan` does not belong to `merged_model` (block {block.name}).")
        units = _unit_tensors(block.experts)
        shared = block.num_shared
        routed = sum(len(g) for g in merge.groups)
        split = {name: torch.empty(shared + routed, *t.shape[1:], dtype=t.dtype) for name, t in units.items()}
        for name, tensor in units.items():
            split[name][:shared] = tensor[:shared]
        for j, (group, perms) in enumerate(zip(merge.groups, merge.permutations, strict=True)):
            for member, perm in zip(group, perms, strict=True):
                inverse = torch.argsort(perm)
                for name, tensor in units.items():
                    split[name][shared + member] = tensor[shared + j][inverse]
        _new_block_state(state, block, split, merge.router_weights, dtype)
    return _rebuild(merged_model, state, plan.num_experts_before, blocks[0].width)


@torch.no_grad()
def drop_experts(
    model: nn.Module,
    calibration_batches: Iterable[Batch] | None = None,
    num_experts: int | None = None,
    *,
    statistics: Sequence[ExpertStatistics] | None = None,
) -> nn.Module:
    """The pruning baseline: keep each block's `num_experts` most frequently selected routed experts (ties: lower
    index) with their router rows, in their original order, and discard the others."""
    blocks = moe_blocks(model)
    if statistics is None:
        if calibration_batches is None:
            raise ValueError("`calibration_batches` (or `statistics`) is needed to rank the experts.")
        statistics = collect_expert_statistics(model, calibration_batches)
    if num_experts is None:
        raise ValueError("`num_experts` is needed.")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dtype = next(model.parameters()).dtype
    for block, stats in zip(blocks, statistics, strict=True):
        _check_num_experts(num_experts, block)
        order = sorted(range(block.num_routed), key=lambda e: (-float(stats.counts[e]), e))
        keep = torch.tensor(list(range(block.num_shared)) + [block.num_shared + e for e in sorted(order[:num_experts])])
        units = {name: tensor[keep] for name, tensor in _unit_tensors(block.experts).items()}
        routers = {
            path: module.weight.detach()[keep[block.num_shared :] - block.num_shared] for path, module in block.routers
        }
        _new_block_state(state, block, units, routers, dtype)
    return _rebuild(model, state, num_experts, blocks[0].width)


# ---------------------------------------------------------------------------------------------------------------------
# Compression: structured pruning of hidden units, low-rank factors
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def prune_expert_units(
    model: nn.Module,
    calibration_batches: Iterable[Batch] | None = None,
    width: int | None = None,
    *,
    statistics: Sequence[ExpertStatistics] | None = None,
) -> nn.Module:
    """Structured pruning: every expert of every block keeps its `width` most important hidden units (in their
    order), by `ExpertStatistics.unit_importance` (calibration contribution of each unit; an expert that no
    calibration token selected ranks its units by `||input weights|| * ||down column||`). An ordinary model."""
    blocks = moe_blocks(model)
    old_width = blocks[0].width
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= old_width:
        raise ValueError(
            f"`width` (hidden units kept per expert) must be an integer in [1, {old_width}], got {width!r}."
        )
    if statistics is None:
        if calibration_batches is None:
            raise ValueError(
                "`calibration_batches` (or `statistics` with unit importance) is needed to rank the units."
            )
        statistics = collect_expert_statistics(model, calibration_batches, unit_importance=True)
    if any(s.unit_importance is None for s in statistics):
        raise ValueError("`statistics` must be collected with `unit_importance=True`.")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dtype = next(model.parameters()).dtype
    for block, stats in zip(blocks, statistics, strict=True):
        units = _unit_tensors(block.experts)
        importance = stats.unit_importance.clone()
        unused = importance.sum(-1) == 0
        if unused.any():
            features = units["down_proj"].to(torch.float64).cpu().norm(dim=-1)
            inputs = torch.cat([t for n, t in units.items() if n != "down_proj"], -1).to(torch.float64).cpu()
            importance[unused] = (features * inputs.norm(dim=-1))[unused]
        # stable top-k: the most important units, ties to the lower index, kept in their original order
        order = torch.sort(-importance, dim=-1, stable=True).indices[:, :width]
        keep = torch.sort(order, dim=-1).values.to(units["down_proj"].device)
        pruned = {name: torch.gather(t, 1, keep[..., None].expand(-1, -1, t.shape[-1])) for name, t in units.items()}
        _new_block_state(state, block, pruned, {}, dtype)
    return _rebuild(model, state, blocks[0].num_routed, width)


class LowRankExperts(nn.Module):
    """Experts whose projections are low-rank factors from a truncated SVD: `gate_up_proj[e] ~ up_a[e] @ up_b[e]`
    (or `up_proj`) and `down_proj[e] ~ down_a[e] @ down_b[e]`, each of rank `min(rank, smaller side of the
    matrix)` (so a large `rank` keeps a matrix exactly). A drop-in replacement of a block's stacked experts module
    (same call: rows, top-k indices, top-k weights, optional kept-pair mask) that computes only the selected
    (token, expert) pairs, looping over experts."""

    def __init__(self, experts: nn.Module, rank: int):
        super().__init__()
        stacked = _stacked_tensors(_unit_tensors(experts))
        self.act_fn = experts.act_fn
        self.has_gate = "gate_up_proj" in stacked
        self.num_experts, self.hidden_dim, self.intermediate_dim = stacked["down_proj"].shape
        first = stacked["gate_up_proj" if self.has_gate else "up_proj"]
        self.up_rank = min(rank, *first.shape[1:])
        self.down_rank = min(rank, self.hidden_dim, self.intermediate_dim)
        a, b = self._factor(first, self.up_rank)
        self.up_a, self.up_b = nn.Parameter(a), nn.Parameter(b)
        a, b = self._factor(stacked["down_proj"], self.down_rank)
        self.down_a, self.down_b = nn.Parameter(a), nn.Parameter(b)
        bias = stacked.get("up_proj_bias")
        self.up_proj_bias = nn.Parameter(bias.clone()) if bias is not None else None

    @staticmethod
    def _factor(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(a, b)` with `a @ b` the best rank-`rank` approximation of each `weight[e]` (singular values split
        evenly between the factors)."""
        u, s, vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
        root = s[:, :rank].sqrt()
        a = u[:, :, :rank] * root[:, None, :]
        b = root[:, :, None] * vh[:, :rank]
        return a.to(weight.dtype).contiguous(), b.to(weight.dtype).contiguous()

    def expert_flops(self) -> int:
        """Forward FLOPs of one expert on one token (a multiply-add = 2)."""
        first_out = (2 if self.has_gate else 1) * self.intermediate_dim
        up = 2 * self.up_rank * (self.hidden_dim + first_out)
        return up + 2 * self.down_rank * (self.intermediate_dim + self.hidden_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        pair_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        weights = top_k_weights if pair_keep is None else top_k_weights * pair_keep.to(top_k_weights.dtype)
        output = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            if not 0 <= expert < self.num_experts:
                continue
            rows, slots = torch.nonzero(top_k_index == expert, as_tuple=True)
            inner = (hidden_states[rows] @ self.up_b[expert].T) @ self.up_a[expert].T
            if self.has_gate:
                gate, up = inner.chunk(2, dim=-1)
                inner = self.act_fn(gate) * up
            else:
                if self.up_proj_bias is not None:
                    inner = inner + self.up_proj_bias[expert]
                inner = self.act_fn(inner)
            y = (inner @ self.down_b[expert].T) @ self.down_a[expert].T
            output.index_add_(0, rows, (y * weights[rows, slots, None]).to(output.dtype))
        return output


def expert_flops(experts: nn.Module) -> int:
    """Forward FLOPs of one expert of `experts` on one token (a multiply-add = 2; biases and activations left out):
    a stacked experts module or `LowRankExperts`."""
    if isinstance(experts, LowRankExperts):
        return experts.expert_flops()
    units = _unit_tensors(experts)
    width = units["down_proj"].shape[1]
    return 2 * width * sum(t.shape[-1] for name, t in units.items() if name != "up_proj_bias")


@torch.no_grad()
def low_rank_experts(model: nn.Module, rank: int) -> nn.Module:
    """A copy of `model` whose experts are `LowRankExperts`: every projection of every expert replaced by its best
    rank-`rank` approximation (truncated SVD; a matrix whose smaller side is at most `rank` stays exact)."""
    blocks = moe_blocks(model)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` must be an integer >= 1, got {rank!r}.")
    new_model = copy.deepcopy(model)
    for block in moe_blocks(new_model):
        block.module.experts = LowRankExperts(block.experts, rank)
    del blocks
    return new_model


def compress_experts(
    model: nn.Module,
    calibration_batches: Iterable[Batch] | None = None,
    *,
    width: int | None = None,
    rank: int | None = None,
    statistics: Sequence[ExpertStatistics] | None = None,
) -> nn.Module:
    """C-SMoE on a (merged) model: structured pruning to `width` units per expert (`prune_expert_units`), then
    rank-`rank` factors (`low_rank_experts`); either step is skipped when its argument is None."""
    if width is None and rank is None:
        raise ValueError("`width` or `rank` must be given: compression needs something to reduce.")
    if width is not None:
        model = prune_expert_units(model, calibration_batches, width, statistics=statistics)
    if rank is not None:
        model = low_rank_experts(model, rank)
    return model


__all__ = [
    "BlockMerge",
    "ExpertStatistics",
    "LowRankExperts",
    "MergePlan",
    "MoEBlock",
    "align_units",
    "collect_expert_statistics",
    "compress_experts",
    "drop_experts",
    "expert_flops",
    "group_experts",
    "low_rank_experts",
    "merge_experts",
    "moe_blocks",
    "prune_expert_units",
    "split_merged_experts",
]
