"""Trainer callback that logs UoE routing statistics next to the loss."""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from .modeling_uoe import UoERouter, UoESelectiveAttention, UoESparseMLP
from .routing import router_scores


class _RouterStats:
    """Running per-router sums, kept on the model's device until a log step reads them."""

    def __init__(self, name: str, num_experts: int, top_k: int, score_func: str):
        self.name, self.num_experts, self.top_k, self.score_func = name, num_experts, top_k, score_func
        self.load: torch.Tensor | None = None
        self.entropy: torch.Tensor | None = None
        self.tokens = 0

    @torch.no_grad()
    def __call__(self, module: UoERouter, args, logits: torch.Tensor) -> None:
        logits = logits.detach().reshape(-1, logits.shape[-1])
        scores = router_scores(logits, self.score_func)
        probs = scores / scores.sum(-1, keepdim=True)
        top_index = scores.topk(self.top_k, dim=-1).indices
        load = torch.zeros_like(probs).scatter_(-1, top_index, 1.0).sum(0)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
        self.load = load if self.load is None else self.load + load
        self.entropy = entropy if self.entropy is None else self.entropy + entropy
        self.tokens += logits.shape[0]

    def totals(self, device: torch.device) -> torch.Tensor:
        """`[load per expert..., entropy sum, tokens]` since the last log (zeros if this rank routed nothing); resets."""
        totals = torch.zeros(self.num_experts + 2, device=device)
        if self.load is not None:
            totals[:-2], totals[-2], totals[-1] = self.load, self.entropy, self.tokens
        self.load, self.entropy, self.tokens = None, None, 0
        return totals

    def logs(self, totals: torch.Tensor) -> dict[str, float]:
        """The log entries of `totals` (summed over the ranks)."""
        tokens = float(totals[-1])
        if tokens == 0:
            return {}
        load = (totals[:-2] / totals[:-2].sum()).tolist()
        logs = {f"router/{self.name}/load_{e}": round(value, 4) for e, value in enumerate(load)}
        logs[f"router/{self.name}/entropy"] = round(float(totals[-2]) / tokens, 4)
        # max load relative to the perfectly balanced share: 1.0 is balanced, num_experts is collapsed
        logs[f"router/{self.name}/max_load_ratio"] = round(max(load) * len(load), 4)
        return logs


class UoERouterStatsCallback(TrainerCallback):
    """Adds routing statistics to every Trainer log entry (and so to `trainer.state.log_history`).

    For each routed block (`layers.{i}.attention` and `layers.{i}.mlp`) it logs the share of selections
    each expert received since the last log (`load_{e}`), the mean router entropy in nats, and the
    ratio of the busiest expert's share to the balanced share. It also logs the mean `aux_loss` and
    `router_z_loss` of the training forward passes. Statistics are gathered by forward hooks and stay
    on the device between log steps; in distributed training they are summed over the ranks (one all-reduce
    per log step), so they describe the global batch, not rank 0's share of it.
    """

    def __init__(self) -> None:
        self._handles: list = []
        self._router_stats: list[_RouterStats] = []
        self._aux_sum: torch.Tensor | None = None
        self._aux_count = 0
        self._device = torch.device("cpu")

    def _on_model_output(self, module, args, output) -> None:
        if not module.training or getattr(output, "aux_loss", None) is None:
            return
        values = torch.stack([output.aux_loss.detach().float(), output.router_z_loss.detach().float()])
        self._aux_sum = values if self._aux_sum is None else self._aux_sum + values
        self._aux_count += 1

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.remove_hooks()
        config = model.config
        self._device = next(model.parameters()).device
        for module in model.modules():
            if isinstance(module, UoESelectiveAttention):
                kind, top_k = "attention", module.top_k  # per-layer budgets: the layer's own top-k
            elif isinstance(module, UoESparseMLP):
                kind, top_k = "mlp", module.top_k
            else:
                continue
            # Chain-of-Experts: one router per iteration (`mlp_chain_length`), logged as `mlp_1`, `mlp_2`, ...
            routers = [(kind, module.router)]
            routers += [(f"{kind}_{t + 1}", r) for t, r in enumerate(getattr(module, "chain_routers", None) or [])]
            for router_kind, router in routers:
                name = f"layer_{module.layer_idx}/{router_kind}"
                stats = _RouterStats(name, router.num_experts, top_k, config.router_score_func)
                self._handles.append(router.register_forward_hook(stats))
                self._router_stats.append(stats)
        self._handles.append(model.register_forward_hook(self._on_model_output))

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs:  # evaluation logs carry eval_* keys only
            return
        # One all-reduce over the ranks (every rank logs at the same steps): the statistics of the whole global batch
        # (each rank's forward passes see only its own share of it).
        aux = torch.zeros(3, device=self._device)
        if self._aux_sum is not None:
            aux[:2], aux[2] = self._aux_sum, self._aux_count
        self._aux_sum, self._aux_count = None, 0
        totals = torch.cat([aux] + [stats.totals(self._device) for stats in self._router_stats])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        extra: dict[str, float] = {}
        if totals[2] > 0:
            mean = (totals[:2] / totals[2]).tolist()
            extra["aux_loss"], extra["router_z_loss"] = round(mean[0], 6), round(mean[1], 6)
        start = 3
        for stats in self._router_stats:
            extra.update(stats.logs(totals[start : start + stats.num_experts + 2]))
            start += stats.num_experts + 2
        logs.update(extra)
        # Trainer stores a copy of `logs` before calling the callbacks; keep the history complete too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_train_end(self, args, state, control, **kwargs):
        self.remove_hooks()

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._router_stats = [], []
