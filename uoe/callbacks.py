"""Trainer callback that logs UoE routing statistics next to the loss."""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from .modeling_uoe import UoERouter, UoESelectiveAttention, UoESparseMLP
from .routing import router_scores


class _RouterStats:
    """Running per-router sums, kept on the model's device until a log step reads them."""

    def __init__(self, name: str, top_k: int, score_func: str):
        self.name, self.top_k, self.score_func = name, top_k, score_func
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

    def pop(self) -> dict[str, float]:
        if self.load is None or self.tokens == 0:
            return {}
        load = (self.load / self.load.sum()).tolist()
        logs = {f"router/{self.name}/load_{e}": round(value, 4) for e, value in enumerate(load)}
        logs[f"router/{self.name}/entropy"] = round(float(self.entropy) / self.tokens, 4)
        # max load relative to the perfectly balanced share: 1.0 is balanced, num_experts is collapsed
        logs[f"router/{self.name}/max_load_ratio"] = round(max(load) * len(load), 4)
        self.load, self.entropy, self.tokens = None, None, 0
        return logs


class UoERouterStatsCallback(TrainerCallback):
    """Adds routing statistics to every Trainer log entry (and so to `trainer.state.log_history`).

    For each routed block (`layers.{i}.attention` and `layers.{i}.mlp`) it logs the share of selections
    each expert received since the last log (`load_{e}`), the mean router entropy in nats, and the
    ratio of the busiest expert's share to the balanced share. It also logs the mean `aux_loss` and
    `router_z_loss` of the training forward passes. Statistics are gathered by forward hooks and stay
    on the device between log steps.
    """

    def __init__(self) -> None:
        self._handles: list = []
        self._router_stats: list[_RouterStats] = []
        self._aux_sum: torch.Tensor | None = None
        self._aux_count = 0

    def _on_model_output(self, module, args, output) -> None:
        if not module.training or getattr(output, "aux_loss", None) is None:
            return
        values = torch.stack([output.aux_loss.detach().float(), output.router_z_loss.detach().float()])
        self._aux_sum = values if self._aux_sum is None else self._aux_sum + values
        self._aux_count += 1

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.remove_hooks()
        config = model.config
        for module in model.modules():
            if isinstance(module, UoESelectiveAttention):
                kind, top_k = "attention", config.attention_top_k
            elif isinstance(module, UoESparseMLP):
                kind, top_k = "mlp", config.mlp_top_k
            else:
                continue
            stats = _RouterStats(f"layer_{module.layer_idx}/{kind}", top_k, config.router_score_func)
            self._handles.append(module.router.register_forward_hook(stats))
            self._router_stats.append(stats)
        self._handles.append(model.register_forward_hook(self._on_model_output))

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs:  # evaluation logs carry eval_* keys only
            return
        extra: dict[str, float] = {}
        if self._aux_sum is not None and self._aux_count:
            aux, z = (self._aux_sum / self._aux_count).tolist()
            extra["aux_loss"], extra["router_z_loss"] = round(aux, 6), round(z, 6)
            self._aux_sum, self._aux_count = None, 0
        for stats in self._router_stats:
            extra.update(stats.pop())
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
