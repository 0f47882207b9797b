"""Flash-attention building blocks shared by the softmax-attention Triton kernels (the block-sparse core,
neighborhood attention): block loads, the online-softmax step, the backward steps (FlashAttention-2,
Dao 2023, Alg. 1-2). Scores live in the log2 domain (exp2) with float32 accumulation; a kernel computes
its scores, masks them with -inf, and hands them to these steps.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
INTERPRET = tl.constexpr(triton.knobs.runtime.interpret)


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    if INTERPRET:
        if a.dtype == tl.bfloat16:      # the CPU interpreter would multiply bfloat16's raw bits
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def load_block(ptrs, rows, row_limit, cols, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """A (rows, BLOCK_D) block, zero outside [0, row_limit) x [0, HEAD_DIM)."""
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs, mask=rows[:, None] < row_limit, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < row_limit) & (cols[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def store_block(ptrs, x, rows, row_limit, cols, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                CHECK_ROWS: tl.constexpr):
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            tl.store(ptrs, x, mask=rows[:, None] < row_limit)
        else:
            tl.store(ptrs, x, mask=(rows[:, None] < row_limit) & (cols[None, :] < HEAD_DIM))
    else:
        if BLOCK_D == HEAD_DIM:
            tl.store(ptrs, x)
        else:
            tl.store(ptrs, x, mask=cols[None, :] < HEAD_DIM)


@triton.jit
def softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION: tl.constexpr):
    """One online-softmax update with the (M, N) log2-domain scores ``s`` (-inf: masked) of values ``v``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row that has seen only -inf keeps a finite reference point so that exp2 gives 0, not NaN
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_ref)
    p = tl.math.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def softmax_finish(acc, m_i, l_i):
    """Normalized output and base-2 log-sum-exp (-inf for a query that saw no key; its output is 0)."""
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    return acc / l_safe[:, None], tl.where(seen, m_i + tl.math.log2(l_safe), float("-inf"))


@triton.jit
def dq_step(dq, s, lse, delta, do, k, v, DOT_PRECISION: tl.constexpr):
    """dQ += dS K for one key block (unscaled) from the masked log2-domain scores ``s`` (M, N); also dS."""
    p = tl.math.exp2(s - lse[:, None])
    dp = dot(do, tl.trans(v), None, DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return dot(ds.to(k.dtype), k, dq, DOT_PRECISION), ds


@triton.jit
def dkdv_step(dk, dv, s_t, lse, delta, q, do, v, DOT_PRECISION: tl.constexpr):
    """dV += P^T dO and dK += dS^T Q (unscaled) for one query block from the transposed masked scores
    ``s_t`` (N, M); also dS^T."""
    p_t = tl.math.exp2(s_t - lse[None, :])
    dv = dot(p_t.to(do.dtype), do, dv, DOT_PRECISION)
    dp_t = dot(v, tl.trans(do), None, DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    return dot(ds_t.to(q.dtype), q, dk, DOT_PRECISION), dv, ds_t


@triton.jit
def load_row_stats(LSE, Delta, rows, row_mask):
    """Log-sum-exp (+inf for a query that attends nothing or is masked, so its probabilities are 0)
    and delta, at offsets ``rows`` where ``row_mask``."""
    lse = tl.load(LSE + rows, mask=row_mask, other=float("inf"))
    delta = tl.load(Delta + rows, mask=row_mask, other=0.0)
    return tl.where(lse == float("-inf"), float("inf"), lse), delta


@triton.jit(do_not_specialize=["H", "Nq"])
def delta_kernel(O, DO, Delta, sob, soh, son, sdb, sdh, sdn, H, Nq,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O) per query, (B * H, Nq) float32."""
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    o = load_block(O + b * sob + h * soh + rows[:, None] * son + cols[None, :], rows, Nq, cols,
                   HEAD_DIM, BLOCK_D, True)
    do = load_block(DO + b * sdb + h * sdh + rows[:, None] * sdn + cols[None, :], rows, Nq, cols,
                    HEAD_DIM, BLOCK_D, True)
    tl.store(Delta + bh * Nq + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < Nq)
