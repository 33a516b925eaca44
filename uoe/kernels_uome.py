"""UoME experts as `torch.library` custom ops over Triton kernels, with a plain PyTorch reference per kernel.

The function is the one every experts back-end computes (see `UoESwiGLUExperts` / `UoEGELUExperts`):

    out[n] = sum_j  top_k_weights[n, j] * W2[e] act(W1[e] x[n] + b1[e]),   e = top_k_index[n, j]

with `act` SwiGLU (`silu(gate) * up`, W1 = `gate_up_proj` = [gate rows; up rows]) or exact (erf) GELU
(W1 = `up_proj`). `top_k_weights` are the gate factors: the union gates of value 1 (whose gradient reaches
the router) or the weighted-mode scores (`routing.select_top_k`); the op returns their gradient.

Pipeline (ScatterMoE-style, one job per kernel; each kernel's reference is the `*_reference` function of
the same name here, and the tests hold every kernel to it):

    expert_routing_metadata   sort the (token, slot) pairs by expert          (torch ops, no host sync)
    up_projection             gather token rows, grouped x @ W1^T, activation
    down_projection           grouped hidden @ W2^T, times the gate, written in (token, slot) order
    combine                   sum each token's top_k rows in a fixed order    (deterministic, no atomics)
  backward:
    down_projection_backward  grouped grad @ W2, d gate, activation backward
    up_projection_backward    grouped d_pre @ W1 -> d x per (token, slot), then the same fixed-order combine
    weight_grad               dW1, db1, dW2: one program per expert tile, rows walked in order (deterministic)

`uome_experts` is the entry point; `uoe_triton_experts_forward` plugs it into transformers' experts interface
(`experts_implementation="uoe_triton"`, see `register_uoe_experts_kernels`).
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import GELUActivation, SiLUActivation
from transformers.integrations.moe import ExpertsInterface, grouped_mm_experts_forward
from transformers.utils import logging

from .gathered import expert_weights
from .kernels_common import require_kernels, triton_module
from .kernels_routing import expert_routing_metadata

logger = logging.get_logger(__name__)

ACTIVATIONS = ("swiglu", "gelu")
EXPERTS_IMPLEMENTATION = "uoe_triton"


def _kernels() -> ModuleType:
    # Lazy: importing defines the @triton.jit kernels. The explicit relative import also lets
    # `save_pretrained` find and copy the kernel file next to the model code.
    from .kernels_uome_triton import INTERPRETED  # noqa: F401

    return triton_module("kernels_uome_triton")


# ---------------------------------------------------------------------------------------------------------------------
# Plain PyTorch references (readable, O(rows x weight) memory: for tests, not for speed)
# ---------------------------------------------------------------------------------------------------------------------


def activate(pre: torch.Tensor, activation: str) -> torch.Tensor:
    """SwiGLU on `[gate; up]` pre-activations, or exact GELU."""
    if activation == "swiglu":
        gate, up = pre.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(pre)


def uome_experts_reference(
    hidden_states: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    activation: str = "swiglu",
    up_proj_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The function `uome_experts` computes, straight from its definition (autograd by PyTorch).

    Args:
        hidden_states: `(tokens, hidden)`.
        up_proj: `(experts, 2 * inner, hidden)` `[gate; up]` rows for SwiGLU, `(experts, inner, hidden)` for GELU.
        down_proj: `(experts, hidden, inner)`.
        top_k_index: `(tokens, top_k)` expert ids.
        top_k_weights: `(tokens, top_k)` gate factors.
        activation: `"swiglu"` or `"gelu"`.
        up_proj_bias: optional `(experts, rows of up_proj)`.
    """
    pre = torch.einsum("nh,nkfh->nkf", hidden_states, up_proj[top_k_index])
    if up_proj_bias is not None:
        pre = pre + up_proj_bias[top_k_index]
    out = torch.einsum("nki,nkhi->nkh", activate(pre, activation), down_proj[top_k_index])
    return (out * top_k_weights[..., None].to(out.dtype)).sum(1)


def _row_experts(expert_offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    rows = torch.arange(num_rows, device=expert_offsets.device, dtype=expert_offsets.dtype)
    return torch.searchsorted(expert_offsets, rows, right=True) - 1


def up_projection_reference(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    sorted_pair: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k: int,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of `kernels_uome_triton.up_projection`: `(pre, hidden)` per sorted row."""
    expert = _row_experts(expert_offsets, sorted_pair.shape[0])
    pre = torch.einsum("sh,sfh->sf", x[sorted_pair.long() // top_k], w1[expert])
    if b1 is not None:
        pre = pre + b1[expert]
    return pre, activate(pre, activation)


def down_projection_reference(
    hidden: torch.Tensor, w2: torch.Tensor, sorted_pair: torch.Tensor, expert_offsets: torch.Tensor, gates: torch.Tensor
) -> torch.Tensor:
    """Reference of `down_projection`: gated outputs `[S, H]` in (token, slot) order."""
    expert = _row_experts(expert_offsets, sorted_pair.shape[0])
    rows = torch.einsum("si,shi->sh", hidden, w2[expert]) * gates.reshape(-1)[sorted_pair.long(), None]
    return torch.empty_like(rows).index_copy_(0, sorted_pair.long(), rows)


def down_projection_backward_reference(
    grad_out: torch.Tensor,
    w2: torch.Tensor,
    sorted_pair: torch.Tensor,
    expert_offsets: torch.Tensor,
    gates: torch.Tensor,
    pre: torch.Tensor,
    top_k: int,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of `down_projection_backward`: `(d_pre, d_gate)` per sorted row."""
    expert = _row_experts(expert_offsets, sorted_pair.shape[0])
    d_hidden = torch.einsum("sh,shi->si", grad_out[sorted_pair.long() // top_k], w2[expert])
    pre = pre.detach().requires_grad_(True)
    with torch.enable_grad():
        hidden = activate(pre, activation)
    gate = gates.reshape(-1)[sorted_pair.long(), None]
    (d_pre,) = torch.autograd.grad(hidden, pre, d_hidden * gate)
    return d_pre, (d_hidden * hidden.detach()).sum(-1)


def up_projection_backward_reference(
    d_pre: torch.Tensor, w1: torch.Tensor, sorted_pair: torch.Tensor, expert_offsets: torch.Tensor
) -> torch.Tensor:
    """Reference of `up_projection_backward`: input gradients `[S, H]` in (token, slot) order."""
    expert = _row_experts(expert_offsets, sorted_pair.shape[0])
    rows = torch.einsum("sf,sfh->sh", d_pre, w1[expert])
    return torch.empty_like(rows).index_copy_(0, sorted_pair.long(), rows)


def weight_grad_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    sorted_pair: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k: int,
    a_by_token: bool,
    b_by_token: bool,
    scale: torch.Tensor | None,
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of `weight_grad`: `(C [E, M, N], column sums of the scaled A [E, M])`."""
    pair = sorted_pair.long()
    rows_a = a[pair // top_k] if a_by_token else a
    rows_b = b[pair // top_k] if b_by_token else b
    if scale is not None:
        rows_a = rows_a * scale.reshape(-1)[pair, None]
    one_hot = F.one_hot(_row_experts(expert_offsets, pair.shape[0]).long(), num_experts).to(a.dtype)  # (S, E)
    return torch.einsum("se,sm,sn->emn", one_hot, rows_a, rows_b), one_hot.T @ rows_a


# ---------------------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------------------


def _combine(pair_rows: torch.Tensor, num_tokens: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum each token's `top_k` rows in slot order: deterministic, unlike atomics or index_add."""
    if top_k == 1:
        return pair_rows.to(dtype)
    return pair_rows.view(num_tokens, top_k, pair_rows.shape[-1]).sum(1).to(dtype)


def _check_inputs(x, w1, w2, b1, sorted_pair, top_k_weights, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    num_experts, width, hidden_size = w1.shape
    inner = width // 2 if activation == "swiglu" else width
    if x.dim() != 2 or x.shape[1] != hidden_size or w2.shape != (num_experts, hidden_size, inner):
        raise ValueError(
            f"shape mismatch: hidden_states {tuple(x.shape)}, up weight {tuple(w1.shape)}, down weight "
            f"{tuple(w2.shape)} (activation {activation!r})"
        )
    if x.dtype != w1.dtype or w2.dtype != w1.dtype or (b1 is not None and b1.shape != (num_experts, width)):
        raise ValueError("hidden_states and expert weights must share a dtype; up bias must be (experts, up rows)")
    if sorted_pair.shape[0] != top_k_weights.numel():
        raise ValueError("routing metadata does not match top_k_weights")


def _uome_forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None,
    sorted_pair: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k_weights: torch.Tensor,
    activation: str,
    save_for_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    require_kernels(x, "uoe::uome_forward")
    _check_inputs(x, w1, w2, b1, sorted_pair, top_k_weights, activation)
    kernels = _kernels()
    num_tokens, top_k = top_k_weights.shape
    gates = top_k_weights.reshape(-1).contiguous()
    pre, hidden = kernels.up_projection(
        x, w1, b1, sorted_pair, expert_offsets, top_k, activation == "swiglu", save_for_backward
    )
    pair_dtype = x.dtype if top_k == 1 else torch.float32  # slots are summed in float32
    pair_out = kernels.down_projection(hidden, w2, sorted_pair, expert_offsets, gates, pair_dtype)
    out = _combine(pair_out, num_tokens, top_k, x.dtype)
    if not save_for_backward:
        hidden = hidden.new_empty(0, hidden.shape[1])
    return out, pre, hidden


def _uome_forward_fake(x, w1, w2, b1, sorted_pair, expert_offsets, top_k_weights, activation, save_for_backward):
    rows = sorted_pair.shape[0] if save_for_backward else 0
    inner = w2.shape[2]
    return x.new_empty(x.shape), x.new_empty(rows, w1.shape[1]), x.new_empty(rows, inner)


def _uome_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None,
    sorted_pair: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k_weights: torch.Tensor,
    pre: torch.Tensor,
    hidden: torch.Tensor,
    activation: str,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    require_kernels(x, "uoe::uome_backward")
    kernels = _kernels()
    need_input, need_weights, need_gates = output_mask
    num_tokens, top_k = top_k_weights.shape
    num_experts = w1.shape[0]
    gates = top_k_weights.reshape(-1).contiguous()
    grad_out = grad_out.to(x.dtype)
    d_pre, d_gate = kernels.down_projection_backward(
        grad_out, w2, sorted_pair, expert_offsets, gates, pre, hidden, top_k, activation == "swiglu"
    )
    # a custom op's outputs may not alias each other: every unneeded gradient is its own empty tensor
    d_x = x.new_empty(0)
    if need_input:
        pair_dtype = x.dtype if top_k == 1 else torch.float32
        pair_dx = kernels.up_projection_backward(d_pre, w1, sorted_pair, expert_offsets, pair_dtype)
        d_x = _combine(pair_dx, num_tokens, top_k, x.dtype)
    d_w1, d_w2, d_b1 = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if need_weights:
        d_w1, d_b1 = kernels.weight_grad(
            d_pre, x, sorted_pair, expert_offsets, top_k, False, True, None, num_experts, w1.dtype, b1 is not None
        )
        d_w2, _ = kernels.weight_grad(
            grad_out, hidden, sorted_pair, expert_offsets, top_k, True, False, gates, num_experts, w2.dtype
        )
        d_b1 = x.new_empty(0) if d_b1 is None else d_b1
    d_weights = top_k_weights.new_empty(0)
    if need_gates:
        d_weights = torch.empty_like(gates).scatter_(0, sorted_pair.long(), d_gate.to(gates.dtype))
        d_weights = d_weights.view(num_tokens, top_k)
    return d_x, d_w1, d_w2, d_b1, d_weights


def _uome_backward_fake(
    grad_out, x, w1, w2, b1, sorted_pair, expert_offsets, top_k_weights, pre, hidden, activation, output_mask
):
    need_input, need_weights, need_gates = output_mask
    return (  # no two outputs alias (see `_uome_backward`)
        x.new_empty(x.shape) if need_input else x.new_empty(0),
        w1.new_empty(w1.shape) if need_weights else x.new_empty(0),
        w2.new_empty(w2.shape) if need_weights else x.new_empty(0),
        w1.new_empty(w1.shape[:2]) if need_weights and b1 is not None else x.new_empty(0),
        top_k_weights.new_empty(top_k_weights.shape) if need_gates else top_k_weights.new_empty(0),
    )


def _uome_setup_context(ctx, inputs, output) -> None:
    x, w1, w2, b1, sorted_pair, expert_offsets, top_k_weights, activation, save_for_backward = inputs
    _, pre, hidden = output
    ctx.activation = activation
    ctx.saved = save_for_backward
    ctx.has_bias = b1 is not None
    ctx.save_for_backward(x, w1, w2, b1, sorted_pair, expert_offsets, top_k_weights, pre, hidden)
    ctx.mark_non_differentiable(pre, hidden)


def _uome_autograd_backward(ctx, grad_out, _grad_pre, _grad_hidden):
    if not ctx.saved:
        raise RuntimeError("uoe::uome_forward ran with save_for_backward=False; call it through `uome_experts`.")
    x, w1, w2, b1, sorted_pair, expert_offsets, top_k_weights, pre, hidden = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[1] or needs[2] or needs[3], needs[6]]
    d_x, d_w1, d_w2, d_b1, d_weights = torch.ops.uoe.uome_backward(
        grad_out, x, w1, w2, b1, sorted_pair, expert_offsets, top_k_weights, pre, hidden, ctx.activation, mask
    )
    return (
        d_x if needs[0] else None,
        d_w1 if needs[1] else None,
        d_w2 if needs[2] else None,
        d_b1 if needs[3] else None,
        None,
        None,
        d_weights if needs[6] else None,
        None,
        None,
    )


def _op_registered(name: str) -> bool:
    # A second copy of this file (e.g. loaded as remote code) must not define the ops again.
    return hasattr(torch.ops.uoe, name)


if not _op_registered("uome_forward"):
    _forward_op = torch.library.custom_op(
        "uoe::uome_forward",
        _uome_forward,
        mutates_args=(),
        schema="(Tensor x, Tensor w1, Tensor w2, Tensor? b1, Tensor sorted_pair, Tensor expert_offsets, "
        "Tensor top_k_weights, str activation, bool save_for_backward) -> (Tensor, Tensor, Tensor)",
    )
    _forward_op.register_fake(_uome_forward_fake)
    _forward_op.register_autograd(_uome_autograd_backward, setup_context=_uome_setup_context)
    _backward_op = torch.library.custom_op(
        "uoe::uome_backward",
        _uome_backward,
        mutates_args=(),
        schema="(Tensor grad_out, Tensor x, Tensor w1, Tensor w2, Tensor? b1, Tensor sorted_pair, "
        "Tensor expert_offsets, Tensor top_k_weights, Tensor pre, Tensor hidden, str activation, "
        "bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    )
    _backward_op.register_fake(_uome_backward_fake)


def uome_experts(
    hidden_states: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    activation: str = "swiglu",
    up_proj_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """UoME experts with the Triton kernels (same arguments and result as `uome_experts_reference`).

    Differentiable in `hidden_states`, the weights, the bias and `top_k_weights`; deterministic; no host
    synchronisation; traceable by `torch.compile(fullgraph=True)` (the kernels are custom ops). Expert ids
    must lie in `[0, experts)`. Raises `KernelsUnavailableError` where the kernels cannot run (see
    `kernels_common.kernels_available`).
    """
    require_kernels(hidden_states, "uome_experts")
    routing = expert_routing_metadata(top_k_index, up_proj.shape[0])
    x = hidden_states.to(up_proj.dtype)
    tensors = (x, up_proj, down_proj, up_proj_bias, top_k_weights)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out, _, _ = torch.ops.uoe.uome_forward(
        x,
        up_proj,
        down_proj,
        up_proj_bias,
        routing.sorted_pair,
        routing.expert_offsets,
        top_k_weights,
        activation,
        needs_grad,
    )
    return out.to(hidden_states.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# transformers experts interface
# ---------------------------------------------------------------------------------------------------------------------


def experts_activation(experts: nn.Module) -> str | None:
    """`"swiglu"` / `"gelu"` when the kernels implement `experts`' activation, else `None`."""
    act = getattr(experts, "act_fn", None)
    if getattr(experts, "has_gate", True):
        return "swiglu" if isinstance(act, (SiLUActivation, nn.SiLU)) else None
    exact_gelu = (isinstance(act, GELUActivation) and act.act is F.gelu) or (
        isinstance(act, nn.GELU) and act.approximate == "none"
    )
    return "gelu" if exact_gelu else None


def uoe_triton_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    pair_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers experts back-end `"uoe_triton"` (`self` is a `@use_experts_implementation` experts module).

    `pair_keep` (`(tokens, top_k)` bool, optional) zeroes the weights of dropped pairs (they are still computed).
    Layouts the kernels do not cover (transposed or interleaved weights, post-expert norms, expert
    parallelism, other activations) fall back to transformers' `grouped_mm` back-end.
    """
    if pair_keep is not None:
        top_k_weights = top_k_weights * pair_keep.to(top_k_weights.dtype)
    activation = experts_activation(self)
    if (
        activation is None
        or getattr(self, "is_transposed", False)
        or not getattr(self, "is_concatenated", True)
        or getattr(self, "has_post_expert_norm", False)
        or getattr(self, "_is_expert_parallel", False)
    ):
        logger.warning_once(
            f"{type(self).__name__}: the uoe_triton experts kernels do not cover this layout or activation; "
            "using transformers' grouped_mm experts instead."
        )
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    require_kernels(hidden_states, f'experts_implementation="{EXPERTS_IMPLEMENTATION}"')
    up_proj, up_bias, down_bias = expert_weights(self)
    out = uome_experts(hidden_states, up_proj, self.down_proj, top_k_index, top_k_weights, activation, up_bias)
    if down_bias is not None:  # each selected expert's output bias, times its gate
        out = out + (top_k_weights[..., None].to(out.dtype) * down_bias[top_k_index].to(out.dtype)).sum(1)
    return out


def register_uoe_experts_kernels() -> None:
    """Register `"uoe_triton"` with transformers' experts interface (idempotent; needs no Triton or GPU).

    Afterwards `from_pretrained(..., experts_implementation="uoe_triton")` and
    `model.set_experts_implementation("uoe_triton")` select the kernels for every experts module.
    """
    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, uoe_triton_experts_forward)
