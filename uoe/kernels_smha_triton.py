"""Triton kernels of SMHA selective attention (imported lazily by `kernels_smha`, only where Triton can run).

FlashAttention-2 style (online softmax, no `T x T` matrix), over compacted token lists: for every
(sequence b, head h), `q_index[b, h, :q_count[b, h]]` are the query tokens that selected h and
`k_index[b, h, :k_count[b, h]]` the key tokens h may attend to, both in increasing token order
(`kernels_routing.compact_selection`). Programs are launched over list blocks; a block past the end of its
list exits at once, so work grows with the number of selected (token, head) pairs. Rows are gathered from
and scattered to the original `(batch, head, token)` layout through the lists, so nothing is copied.

Causality uses the original token indices (query i sits at key position `i + offset`, `offset = Tk - Tq`,
as with a KV cache); since the lists are sorted, a query block only visits keys up to
`k_cumulative[last query + offset]` and a key block only queries from `q_cumulative[first key - offset - 1]`.
With packed sequences (`SEGMENTED`), query i and key j must also share a segment id, `seg[i + offset] == seg[j]`
(`seg` int32 `(B, Tk)`, contiguous); this only removes keys, so the block bounds above stay valid.

  `_smha_fwd_kernel`   out, log-sum-exp (base 2) per selected query
  `_smha_bwd_dkdv_kernel` dK, dV per key block (loops over the queries that can see it)
  `_smha_bwd_dq_kernel`   dQ per query block
All outputs have one writer each (no atomics): deterministic.
"""

import math
import os

import torch

try:  # inside `try` so transformers' remote-code import check does not require Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - this module is only imported when Triton is importable
    raise

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
LOG2E = math.log2(math.e)


def _configs(gpu: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Autotune configs `(BLOCK_M, BLOCK_N, num_warps, num_stages)`; one small config when interpreting."""
    if INTERPRETED:
        gpu = [(16, 16, 1, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in gpu]


# Only Triton builtins inside the kernels: `tl.sum`, `tl.max`, `tl.cumsum`, `tl.sigmoid`, `tl.zeros` are
# @triton.jit functions of `triton.language`, which the interpreter can run only if TRITON_INTERPRET was set
# before Triton was first imported (torch and transformers often import it earlier). Hence `tl.reduce` /
# `tl.associative_scan` with this module's combine functions and `tl.full`; the compiled code is the same.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _sum(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, _add)


@triton.jit
def _max(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, _maximum)


_FWD_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 4)]
_BWD_KV_CONFIGS = [(64, 128, 8, 3), (32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3)]
_BWD_Q_CONFIGS = [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3)]


@triton.jit
def _allowed(qi, q_ok, kj, k_ok, seg_ptr, offset, CAUSAL: tl.constexpr, SEGMENTED: tl.constexpr):
    """Mask `[queries, keys]` of a block: both in their lists, causal by original index, and (packed
    sequences) in the same segment; `seg_ptr` points at the sequence's row of segment ids."""
    allowed = q_ok[:, None] & k_ok[None, :]
    if CAUSAL:
        allowed = allowed & (kj[None, :] <= qi[:, None] + offset)
    if SEGMENTED:
        q_seg = tl.load(seg_ptr + qi + offset, mask=q_ok, other=0)
        k_seg = tl.load(seg_ptr + kj, mask=k_ok, other=0)
        allowed = allowed & (q_seg[:, None] == k_seg[None, :])
    return allowed


@triton.autotune(configs=_configs(_FWD_CONFIGS), key=["D", "CAUSAL"])
@triton.jit
def _smha_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    q_idx_ptr, q_cnt_ptr, k_idx_ptr, k_cnt_ptr, k_cum_ptr, seg_ptr,
    H, Tq, Tk, D, offset, scale_log2,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, sot, soh, sod, ssb,
    CAUSAL: tl.constexpr, SEGMENTED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    n_q = tl.load(q_cnt_ptr + bh)
    m0 = tl.program_id(0) * BLOCK_M
    if m0 >= n_q:
        return
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    qpos = m0 + tl.arange(0, BLOCK_M)
    q_ok = qpos < n_q
    qi = tl.load(q_idx_ptr + bh * Tq + qpos, mask=q_ok, other=0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + b * sqb + h * sqh + qi[:, None] * sqt + d[None, :] * sqd, mask=q_ok[:, None] & d_ok[None, :])
    if CAUSAL:  # keys after the block's last query are never visible
        k_end = tl.load(k_cum_ptr + bh * Tk + _max(tl.where(q_ok, qi, 0), 0) + offset)
    else:
        k_end = tl.load(k_cnt_ptr + bh)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    for n0 in range(0, k_end, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N)
        k_ok = kpos < k_end
        kj = tl.load(k_idx_ptr + bh * Tk + kpos, mask=k_ok, other=0)
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + kj[:, None] * skt + d[None, :] * skd, mask=kv_mask)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        allowed = _allowed(qi, q_ok, kj, k_ok, seg_ptr + b * ssb, offset, CAUSAL, SEGMENTED)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, _max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet stay at 0
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + _sum(p, 1)
        v = tl.load(v_base + kj[:, None] * svt + d[None, :] * svd, mask=kv_mask)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    has_keys = l_i > 0.0  # a selected query with no visible key outputs 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    tl.store(o_ptr + b * sob + h * soh + qi[:, None] * sot + d[None, :] * sod, out, mask=q_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh * Tq + qpos, tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), 0.0), mask=q_ok)


@triton.autotune(configs=_configs(_BWD_KV_CONFIGS), key=["D", "CAUSAL"])
@triton.jit
def _smha_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    q_idx_ptr, q_cnt_ptr, q_cum_ptr, k_idx_ptr, k_cnt_ptr, seg_ptr,
    H, Tq, Tk, D, offset, scale_log2, scale,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdob, sdot, sdoh, sdod, ssb,
    sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
    CAUSAL: tl.constexpr, SEGMENTED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    n_k = tl.load(k_cnt_ptr + bh)
    n0 = tl.program_id(0) * BLOCK_N
    if n0 >= n_k:
        return
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    kpos = n0 + tl.arange(0, BLOCK_N)
    k_ok = kpos < n_k
    kj = tl.load(k_idx_ptr + bh * Tk + kpos, mask=k_ok, other=0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    kv_mask = k_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + b * skb + h * skh + kj[:, None] * skt + d[None, :] * skd, mask=kv_mask)
    v = tl.load(v_ptr + b * svb + h * svh + kj[:, None] * svt + d[None, :] * svd, mask=kv_mask)
    n_q = tl.load(q_cnt_ptr + bh)
    q_start = 0
    if CAUSAL:  # queries before the block's first key (index < first key - offset) never see it
        last_blind = tl.load(k_idx_ptr + bh * Tk + n0) - offset - 1
        blind = tl.load(q_cum_ptr + bh * Tq + tl.maximum(last_blind, 0))
        q_start = tl.where(last_blind >= 0, blind, 0)
    q_base = q_ptr + b * sqb + h * sqh
    do_base = do_ptr + b * sdob + h * sdoh
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    for m0 in range(q_start, n_q, BLOCK_M):
        qpos = m0 + tl.arange(0, BLOCK_M)
        q_ok = qpos < n_q
        qi = tl.load(q_idx_ptr + bh * Tq + qpos, mask=q_ok, other=0)
        q_mask = q_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + qi[:, None] * sqt + d[None, :] * sqd, mask=q_mask)
        do = tl.load(do_base + qi[:, None] * sdot + d[None, :] * sdod, mask=q_mask)
        lse = tl.load(lse_ptr + bh * Tq + qpos, mask=q_ok, other=0.0)
        delta = tl.load(delta_ptr + (b * Tq + qi) * H + h, mask=q_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        allowed = _allowed(qi, q_ok, kj, k_ok, seg_ptr + b * ssb, offset, CAUSAL, SEGMENTED)
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
    tl.store(dk_ptr + b * sdkb + h * sdkh + kj[:, None] * sdkt + d[None, :], dk * scale, mask=kv_mask)
    tl.store(dv_ptr + b * sdvb + h * sdvh + kj[:, None] * sdvt + d[None, :], dv, mask=kv_mask)


@triton.autotune(configs=_configs(_BWD_Q_CONFIGS), key=["D", "CAUSAL"])
@triton.jit
def _smha_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    q_idx_ptr, q_cnt_ptr, k_idx_ptr, k_cnt_ptr, k_cum_ptr, seg_ptr,
    H, Tq, Tk, D, offset, scale_log2, scale,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdob, sdot, sdoh, sdod, ssb,
    sdqb, sdqh, sdqt,
    CAUSAL: tl.constexpr, SEGMENTED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    n_q = tl.load(q_cnt_ptr + bh)
    m0 = tl.program_id(0) * BLOCK_M
    if m0 >= n_q:
        return
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    qpos = m0 + tl.arange(0, BLOCK_M)
    q_ok = qpos < n_q
    qi = tl.load(q_idx_ptr + bh * Tq + qpos, mask=q_ok, other=0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_mask = q_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * sqb + h * sqh + qi[:, None] * sqt + d[None, :] * sqd, mask=q_mask)
    do = tl.load(do_ptr + b * sdob + h * sdoh + qi[:, None] * sdot + d[None, :] * sdod, mask=q_mask)
    lse = tl.load(lse_ptr + bh * Tq + qpos, mask=q_ok, other=0.0)
    delta = tl.load(delta_ptr + (b * Tq + qi) * H + h, mask=q_ok, other=0.0)
    if CAUSAL:
        k_end = tl.load(k_cum_ptr + bh * Tk + _max(tl.where(q_ok, qi, 0), 0) + offset)
    else:
        k_end = tl.load(k_cnt_ptr + bh)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    for n0 in range(0, k_end, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N)
        k_ok = kpos < k_end
        kj = tl.load(k_idx_ptr + bh * Tk + kpos, mask=k_ok, other=0)
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + kj[:, None] * skt + d[None, :] * skd, mask=kv_mask)
        v = tl.load(v_base + kj[:, None] * svt + d[None, :] * svd, mask=kv_mask)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        allowed = _allowed(qi, q_ok, kj, k_ok, seg_ptr + b * ssb, offset, CAUSAL, SEGMENTED)
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    tl.store(dq_ptr + b * sdqb + h * sdqh + qi[:, None] * sdqt + d[None, :], dq * scale, mask=q_mask)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers (called from the custom ops in `kernels_smha`)
# ---------------------------------------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_index: torch.Tensor,
    q_count: torch.Tensor,
    k_index: torch.Tensor,
    k_count: torch.Tensor,
    k_cumulative: torch.Tensor,
    segment_ids: torch.Tensor | None,
    causal: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(out [B, Tq, H, D], lse [B, H, Tq] float32, base 2, by list position)`; `segment_ids` int32 `(B, Tk)`
    contiguous, or `None` for one sequence per row (padding keys are already out of the key lists)."""
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    out = q.new_zeros(batch, q_len, heads, head_dim)
    lse = torch.zeros(batch, heads, q_len, device=q.device, dtype=torch.float32)
    if out.numel() == 0 or k_len == 0:
        return out, lse
    seg = segment_ids if segment_ids is not None else q_count  # dummy pointer, never read
    grid = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _smha_fwd_kernel[grid](
        q, k, v, out, lse, q_index, q_count, k_index, k_count, k_cumulative, seg,
        heads, q_len, k_len, head_dim, k_len - q_len, scaling * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), seg.stride(0),
        CAUSAL=causal, SEGMENTED=segment_ids is not None, PRECISION=_precision(q.dtype), BLOCK_D=_block_d(head_dim),
    )  # fmt: skip
    return out, lse


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_index: torch.Tensor,
    q_count: torch.Tensor,
    q_cumulative: torch.Tensor,
    k_index: torch.Tensor,
    k_count: torch.Tensor,
    k_cumulative: torch.Tensor,
    segment_ids: torch.Tensor | None,
    causal: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(dq, dk, dv)` in the layouts of `q, k, v` (contiguous); zero for tokens outside the lists."""
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)  # contiguous
    if out.numel() == 0 or k_len == 0:
        return dq, dk, dv
    # delta_i = <dO_i, O_i>, the softmax backward's row term (cheap, elementwise)
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # (B, Tq, H)
    seg = segment_ids if segment_ids is not None else q_count  # dummy pointer, never read
    common = dict(
        CAUSAL=causal, SEGMENTED=segment_ids is not None, PRECISION=_precision(q.dtype), BLOCK_D=_block_d(head_dim)
    )
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), seg.stride(0))
    sizes = (heads, q_len, k_len, head_dim, k_len - q_len, scaling * LOG2E, scaling)
    grid_kv = lambda meta: (triton.cdiv(k_len, meta["BLOCK_N"]), batch * heads)  # noqa: E731
    _smha_bwd_dkdv_kernel[grid_kv](
        q, k, v, grad_out, lse, delta, dk, dv, q_index, q_count, q_cumulative, k_index, k_count, seg,
        *sizes, *strides, *dk.stride()[:3], *dv.stride()[:3], **common,
    )  # fmt: skip
    grid_q = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _smha_bwd_dq_kernel[grid_q](
        q, k, v, grad_out, lse, delta, dq, q_index, q_count, k_index, k_count, k_cumulative, seg,
        *sizes, *strides, *dq.stride()[:3], **common,
    )  # fmt: skip
    return dq, dk, dv
