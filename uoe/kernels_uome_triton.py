"""Triton kernels of the UoME experts (imported lazily by `kernels_uome`, only where Triton can run).

Rows are (token, slot) pairs sorted by expert (`kernels_routing.expert_routing_metadata`). A grouped
GEMM runs one program per (row tile, column tile); row tiles never straddle two experts, and each
program finds its expert from the expert offsets itself, so the launch grid is a fixed upper bound
(`cdiv(S, BLOCK_M) + E` row tiles) and nothing is read back to the host. Tiles past the last expert exit
at once. Every output element has exactly one writer: no atomics, so results are deterministic.

Counts that change from call to call (experts, top-k, rows) are not specialised on (`do_not_specialize`), so
a new routing does not compile a new kernel variant; strides and widths are, for aligned vector loads.

Kernels (the plain PyTorch reference of each job sits next to its caller in `kernels_uome`):
  `_up_kernel`         pre = x[token] @ W1[e]^T (+ b1[e]);  hidden = act(pre)
  `_down_kernel`       pair_out[pair] = gate[pair] * (hidden @ W2[e]^T)
  `_down_bwd_kernel`   dhid = grad[token] @ W2[e];  d_gate partials = <dhid, hidden>;  d_pre = act'(gate * dhid)
  `_up_bwd_kernel`     pair_dx[pair] = d_pre @ W1[e]
  `_weight_grad_kernel` C[e] = sum over e's rows of (scale * A[row])^T B[row]  (dW1, dW2, db1), fixed order
"""

import os

import torch

try:  # inside `try` so transformers' remote-code import check does not require Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - this module is only imported when Triton is importable
    raise

# The `triton.jit` decorator picks compiled or interpreted kernels when this module is imported;
# `kernels_common.triton_module` reloads the module when the environment changes.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _configs(gpu: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """Autotune configs `(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`; the interpreter gets one small
    config (it cannot benchmark several)."""
    if INTERPRETED:
        gpu = [(16, 16, 16, 1, 1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in gpu
    ]


# Only Triton builtins inside the kernels: `tl.sum`, `tl.max`, `tl.cumsum`, `tl.sigmoid`, `tl.zeros` are
# @triton.jit functions of `triton.language`, which the interpreter can run only if TRITON_INTERPRET was set
# before Triton was first imported (torch and transformers often import it earlier). Hence `tl.reduce` /
# `tl.associative_scan` with this module's combine functions and `tl.full`; the compiled code is the same.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _sum(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, _add)


@triton.jit
def _cumsum(x, AXIS: tl.constexpr):
    return tl.associative_scan(x, AXIS, _add)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


_GEMM_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 128, 32, 8, 4),
    (64, 64, 32, 4, 3),
]
_WGRAD_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
]
# `_down_bwd_kernel` writes one d_gate partial per column tile: the buffer is sized for the narrowest tile.
MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _configs(_GEMM_CONFIGS))


@triton.jit
def _tile_rows(offsets_ptr, tile, num_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Expert and row range `[row_start, row_end)` of row tile `tile`; `row_start >= row_end` for idle tiles.

    Expert e owns `cdiv(count_e, BLOCK_M)` consecutive tiles; a prefix sum over the (few) experts finds
    the owner without a loop.
    """
    e = tl.arange(0, BLOCK_E)
    start = tl.load(offsets_ptr + e, mask=e < num_experts, other=0)
    end = tl.load(offsets_ptr + e + 1, mask=e < num_experts, other=0)
    tiles = (end - start + BLOCK_M - 1) // BLOCK_M
    tiles_end = _cumsum(tiles, 0)
    expert = _sum((tiles_end <= tile).to(tl.int32), 0)
    mine = e == expert
    row_start = _sum(tl.where(mine, start + (tile - (tiles_end - tiles)) * BLOCK_M, 0), 0)
    row_end = _sum(tl.where(mine, end, 0), 0)
    return expert, row_start, row_end


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_grad(x):
    return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)


@triton.autotune(configs=_configs(_GEMM_CONFIGS), key=["H", "INNER"])
@triton.jit(do_not_specialize=["num_experts", "top_k"])
def _up_kernel(
    x_ptr, w_ptr, b_ptr, pair_ptr, offsets_ptr, pre_ptr, hid_ptr,
    H, INNER, num_experts, top_k,
    stride_xn, stride_xh, stride_we, stride_wf, stride_wh, stride_be, stride_bf, stride_pre, stride_hid,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    expert, row_start, row_end = _tile_rows(offsets_ptr, tl.program_id(0), num_experts, BLOCK_M, BLOCK_E)
    if row_start >= row_end:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    token = (tl.load(pair_ptr + rows, mask=row_ok, other=0) // top_k).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INNER
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
    acc_up = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        x = tl.load(x_ptr + token[:, None] * stride_xn + ks[None, :] * stride_xh, mask=row_ok[:, None] & k_ok[None, :])
        w_mask = k_ok[:, None] & col_ok[None, :]
        w = tl.load(w_base + cols[None, :] * stride_wf + ks[:, None] * stride_wh, mask=w_mask)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if GATED:  # up rows follow the gate rows in W1
            w = tl.load(w_base + (cols + INNER)[None, :] * stride_wf + ks[:, None] * stride_wh, mask=w_mask)
            acc_up = tl.dot(x, w, acc_up, input_precision=PRECISION)
    if HAS_BIAS:
        b_base = b_ptr + expert.to(tl.int64) * stride_be
        acc += tl.load(b_base + cols * stride_bf, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(b_base + (cols + INNER) * stride_bf, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        hidden = acc * _sigmoid(acc) * acc_up  # SwiGLU: silu(gate) * up
    else:
        hidden = _gelu(acc)
    out_mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    tl.store(hid_ptr + rows64 * stride_hid + cols[None, :], hidden, mask=out_mask)
    if STORE_PRE:  # pre-activations, laid out like W1's rows, for the backward pass
        tl.store(pre_ptr + rows64 * stride_pre + cols[None, :], acc, mask=out_mask)
        if GATED:
            tl.store(pre_ptr + rows64 * stride_pre + (cols + INNER)[None, :], acc_up, mask=out_mask)


@triton.autotune(configs=_configs(_GEMM_CONFIGS), key=["H", "INNER"])
@triton.jit(do_not_specialize=["num_experts"])
def _down_kernel(
    hid_ptr, w_ptr, pair_ptr, gate_ptr, offsets_ptr, out_ptr,
    H, INNER, num_experts,
    stride_hid, stride_we, stride_wh, stride_wi, stride_out,
    PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    expert, row_start, row_end = _tile_rows(offsets_ptr, tl.program_id(0), num_experts, BLOCK_M, BLOCK_E)
    if row_start >= row_end:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    pair = tl.load(pair_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    gate = tl.load(gate_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    rows64 = rows.to(tl.int64)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
    for k0 in range(0, INNER, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < INNER
        a = tl.load(hid_ptr + rows64[:, None] * stride_hid + ks[None, :], mask=row_ok[:, None] & k_ok[None, :])
        w = tl.load(w_base + cols[None, :] * stride_wh + ks[:, None] * stride_wi, mask=k_ok[:, None] & col_ok[None, :])
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    # written in (token, slot) order; the caller sums the slots in a fixed order (deterministic combine)
    tl.store(
        out_ptr + pair[:, None] * stride_out + cols[None, :],
        acc * gate[:, None],
        mask=row_ok[:, None] & col_ok[None, :],
    )


# each config writes d_gate partials for its own number of column tiles: start every trial from zeros
@triton.autotune(configs=_configs(_GEMM_CONFIGS), key=["H", "INNER"], reset_to_zero=["dgate_ptr"])
@triton.jit(do_not_specialize=["num_experts", "top_k", "num_rows"])
def _down_bwd_kernel(
    grad_ptr, w_ptr, pair_ptr, gate_ptr, offsets_ptr, pre_ptr, hid_ptr, dpre_ptr, dgate_ptr,
    H, INNER, num_experts, top_k, num_rows,
    stride_gn, stride_gh, stride_we, stride_wh, stride_wi, stride_pre, stride_hid, stride_dpre,
    GATED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    expert, row_start, row_end = _tile_rows(offsets_ptr, tl.program_id(0), num_experts, BLOCK_M, BLOCK_E)
    if row_start >= row_end:
        return
    pid_n = tl.program_id(1)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    pair = tl.load(pair_ptr + rows, mask=row_ok, other=0)
    token = (pair // top_k).to(tl.int64)
    gate = tl.load(gate_ptr + pair.to(tl.int64), mask=row_ok, other=0.0).to(tl.float32)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INNER
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        g = tl.load(
            grad_ptr + token[:, None] * stride_gn + ks[None, :] * stride_gh, mask=row_ok[:, None] & k_ok[None, :]
        )
        w = tl.load(w_base + ks[:, None] * stride_wh + cols[None, :] * stride_wi, mask=k_ok[:, None] & col_ok[None, :])
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    # d gate = <grad, hidden @ W2^T> = <grad @ W2, hidden>: one partial per column tile, summed by the caller
    hidden = tl.load(hid_ptr + rows64 * stride_hid + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(dgate_ptr + pid_n * num_rows + rows, _sum(acc * hidden, 1), mask=row_ok)
    dhid = acc * gate[:, None]
    pre = tl.load(pre_ptr + rows64 * stride_pre + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if GATED:
        up = tl.load(pre_ptr + rows64 * stride_pre + (cols + INNER)[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = _sigmoid(pre)
        tl.store(
            dpre_ptr + rows64 * stride_dpre + cols[None, :], dhid * up * sig * (1.0 + pre * (1.0 - sig)), mask=mask
        )
        tl.store(dpre_ptr + rows64 * stride_dpre + (cols + INNER)[None, :], dhid * pre * sig, mask=mask)
    else:
        tl.store(dpre_ptr + rows64 * stride_dpre + cols[None, :], dhid * _gelu_grad(pre), mask=mask)


@triton.autotune(configs=_configs(_GEMM_CONFIGS), key=["H", "F"])
@triton.jit(do_not_specialize=["num_experts"])
def _up_bwd_kernel(
    dpre_ptr, w_ptr, pair_ptr, offsets_ptr, out_ptr,
    H, F, num_experts,
    stride_dpre, stride_we, stride_wf, stride_wh, stride_out,
    PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    expert, row_start, row_end = _tile_rows(offsets_ptr, tl.program_id(0), num_experts, BLOCK_M, BLOCK_E)
    if row_start >= row_end:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    pair = tl.load(pair_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    rows64 = rows.to(tl.int64)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < F
        a = tl.load(dpre_ptr + rows64[:, None] * stride_dpre + ks[None, :], mask=row_ok[:, None] & k_ok[None, :])
        w = tl.load(w_base + ks[:, None] * stride_wf + cols[None, :] * stride_wh, mask=k_ok[:, None] & col_ok[None, :])
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    tl.store(out_ptr + pair[:, None] * stride_out + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=_configs(_WGRAD_CONFIGS), key=["M", "N"])
@triton.jit(do_not_specialize=["top_k"])
def _weight_grad_kernel(
    a_ptr, b_ptr, pair_ptr, scale_ptr, offsets_ptr, c_ptr, bias_ptr,
    M, N, top_k,
    stride_as, stride_am, stride_bs, stride_bn, stride_ce, stride_cm, stride_cn, stride_biase,
    A_BY_TOKEN: tl.constexpr, B_BY_TOKEN: tl.constexpr, SCALE: tl.constexpr, BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C[e] = sum over expert e's sorted rows s of (scale[pair_s] * A[row_a(s)])^T B[row_b(s)].

    A row is either the sorted row s itself or its token `pair_s // top_k` (a gather). One program owns one
    (M, N) tile of one expert and walks that expert's rows in order, so the reduction is deterministic.
    """
    expert = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    row_start = tl.load(offsets_ptr + expert)
    row_end = tl.load(offsets_ptr + expert + 1)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < M
    n_ok = ns < N
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
    bias_acc = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    for s0 in range(row_start, row_end, BLOCK_K):
        rows = s0 + tl.arange(0, BLOCK_K)
        row_ok = rows < row_end
        pair = tl.load(pair_ptr + rows, mask=row_ok, other=0)
        token = (pair // top_k).to(tl.int64)
        row_a = token if A_BY_TOKEN else rows.to(tl.int64)
        row_b = token if B_BY_TOKEN else rows.to(tl.int64)
        a = tl.load(a_ptr + row_a[:, None] * stride_as + ms[None, :] * stride_am, mask=row_ok[:, None] & m_ok[None, :])
        b = tl.load(b_ptr + row_b[:, None] * stride_bs + ns[None, :] * stride_bn, mask=row_ok[:, None] & n_ok[None, :])
        if SCALE:
            scale = tl.load(scale_ptr + pair.to(tl.int64), mask=row_ok, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * scale[:, None]).to(b.dtype)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
        if BIAS:
            bias_acc += _sum(a.to(tl.float32), 0)
    c_base = c_ptr + expert.to(tl.int64) * stride_ce
    tl.store(c_base + ms[:, None] * stride_cm + ns[None, :] * stride_cn, acc, mask=m_ok[:, None] & n_ok[None, :])
    if BIAS:
        if pid_n == 0:
            tl.store(bias_ptr + expert.to(tl.int64) * stride_biase + ms, bias_acc, mask=m_ok)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers (called from the custom ops in `kernels_uome`)
# ---------------------------------------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> str:
    # float32 matmuls follow torch's TF32 switch, as torch.matmul does
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _row_grid(num_rows: int, num_experts: int, num_cols: int):
    return lambda meta: (triton.cdiv(num_rows, meta["BLOCK_M"]) + num_experts, triton.cdiv(num_cols, meta["BLOCK_N"]))


def up_projection(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    sorted_pair: torch.Tensor,
    offsets: torch.Tensor,
    top_k: int,
    gated: bool,
    store_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(pre [S, F] or [0, F], hidden [S, inner])` for the sorted rows."""
    num_experts, width, hidden_size = w1.shape
    inner = width // 2 if gated else width
    num_rows = sorted_pair.shape[0]
    hidden = x.new_empty(num_rows, inner)
    pre = x.new_empty(num_rows if store_pre else 0, width)
    if num_rows == 0:
        return pre, hidden
    bias = b1 if b1 is not None else w1  # dummy pointer when there is no bias
    _up_kernel[_row_grid(num_rows, num_experts, inner)](
        x, w1, bias, sorted_pair, offsets, pre, hidden,
        hidden_size, inner, num_experts, top_k,
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w1.stride(2),
        bias.stride(0), bias.stride(1), width, inner,
        GATED=gated, HAS_BIAS=b1 is not None, STORE_PRE=store_pre, PRECISION=_precision(x.dtype),
        BLOCK_E=triton.next_power_of_2(num_experts),
    )  # fmt: skip
    return pre, hidden


def down_projection(
    hidden: torch.Tensor,
    w2: torch.Tensor,
    sorted_pair: torch.Tensor,
    offsets: torch.Tensor,
    gates: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Gated expert outputs `[S, H]` in (token, slot) order."""
    num_experts, hidden_size, inner = w2.shape
    num_rows = sorted_pair.shape[0]
    out = hidden.new_empty(num_rows, hidden_size, dtype=out_dtype)
    if num_rows == 0:
        return out
    _down_kernel[_row_grid(num_rows, num_experts, hidden_size)](
        hidden, w2, sorted_pair, gates, offsets, out,
        hidden_size, inner, num_experts,
        hidden.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), out.stride(0),
        PRECISION=_precision(hidden.dtype), BLOCK_E=triton.next_power_of_2(num_experts),
    )  # fmt: skip
    return out


def down_projection_backward(
    grad_out: torch.Tensor,
    w2: torch.Tensor,
    sorted_pair: torch.Tensor,
    offsets: torch.Tensor,
    gates: torch.Tensor,
    pre: torch.Tensor,
    hidden: torch.Tensor,
    top_k: int,
    gated: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(d_pre [S, F], d_gate [S] per sorted row, float32)`."""
    num_experts, hidden_size, inner = w2.shape
    num_rows = sorted_pair.shape[0]
    d_pre = pre.new_empty(pre.shape)
    d_gate_parts = torch.zeros(triton.cdiv(inner, MIN_BLOCK_N), num_rows, device=pre.device, dtype=torch.float32)
    if num_rows > 0:
        _down_bwd_kernel[_row_grid(num_rows, num_experts, inner)](
            grad_out, w2, sorted_pair, gates, offsets, pre, hidden, d_pre, d_gate_parts,
            hidden_size, inner, num_experts, top_k, num_rows,
            grad_out.stride(0), grad_out.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
            pre.stride(0), hidden.stride(0), d_pre.stride(0),
            GATED=gated, PRECISION=_precision(pre.dtype), BLOCK_E=triton.next_power_of_2(num_experts),
        )  # fmt: skip
    return d_pre, d_gate_parts.sum(0)


def up_projection_backward(
    d_pre: torch.Tensor, w1: torch.Tensor, sorted_pair: torch.Tensor, offsets: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Input gradients `[S, H]` in (token, slot) order."""
    num_experts, width, hidden_size = w1.shape
    num_rows = sorted_pair.shape[0]
    out = d_pre.new_empty(num_rows, hidden_size, dtype=out_dtype)
    if num_rows == 0:
        return out
    _up_bwd_kernel[_row_grid(num_rows, num_experts, hidden_size)](
        d_pre, w1, sorted_pair, offsets, out,
        hidden_size, width, num_experts,
        d_pre.stride(0), w1.stride(0), w1.stride(1), w1.stride(2), out.stride(0),
        PRECISION=_precision(d_pre.dtype), BLOCK_E=triton.next_power_of_2(num_experts),
    )  # fmt: skip
    return out


def weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    sorted_pair: torch.Tensor,
    offsets: torch.Tensor,
    top_k: int,
    a_by_token: bool,
    b_by_token: bool,
    scale: torch.Tensor | None,
    num_experts: int,
    out_dtype: torch.dtype,
    with_bias: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(C [E, M, N], column sums of the scaled A per expert [E, M] or None)`; see `_weight_grad_kernel`."""
    m, n = a.shape[1], b.shape[1]
    c = torch.empty(num_experts, m, n, device=a.device, dtype=out_dtype)  # float32 accumulators, one rounding
    bias = torch.empty(num_experts, m, device=a.device, dtype=out_dtype) if with_bias else c
    grid = lambda meta: (num_experts, triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _weight_grad_kernel[grid](
        a, b, sorted_pair, scale if scale is not None else a, offsets, c, bias,
        m, n, top_k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), c.stride(2), bias.stride(0),
        A_BY_TOKEN=a_by_token, B_BY_TOKEN=b_by_token, SCALE=scale is not None, BIAS=with_bias,
        PRECISION=_precision(a.dtype),
    )  # fmt: skip
    return c, (bias if with_bias else None)
