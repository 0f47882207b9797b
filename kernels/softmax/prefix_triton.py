"""The prefix queries' backward in Triton: gradients of a few queries (cls or text tokens) that attend densely over
all N keys, O = softmax(q k^T / sqrt(d)) v (Vaswani et al., 2017, Eq. 1), for a sparse op whose output holds
their rows (``fill_prefix_queries``). FlashAttention-2's backward (Dao 2023, Alg. 2) split in two launches:

- per block of prefix queries (``_prefix_dq_kernel``): delta = rowsum(dO O), the rows' log-sum-exp over all keys
  (one pass), then dQ = dS K scale with dS = P (dO V^T - delta) (a second pass); dQ written into the op's dq;
- per key tile (``_prefix_dkdv_kernel``): dV += P^T dO and dK += dS^T Q scale over every prefix query, added
  into the op's dk and dv (each tile is one program's: no atomics).

Two launches and two small float32 buffers where ``reference.prefix_queries_backward`` (the ground truth) takes
about twenty torch operations and float32 copies of K and V.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..core.alignment import row_alignment
from ..core.triton_common import (LOG2E, cdiv, dkdv_step, dq_step, launch, load_row_stats, load_tile, pad_dim,
                                  rows_contiguous, scores, store_tile, strides, transposed_scores)

BLOCK_M = 16        # prefix queries per block (the smallest tl.dot side; most models have one)
BLOCK_N = 64        # keys per tile


@triton.jit(do_not_specialize=["H", "N", "P"])
def _prefix_dq_kernel(Q, K, V, O, DO, DQ, Stats, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                      sdb, sdh, sdn, sgb, sgh, sgn, H, N, P, qk_scale, scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr):
    """One block of prefix queries of one (batch, head): base-2 log-sum-exp and delta into Stats (2, B*H, P),
    dQ into DQ's rows."""
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mc = cols < HEAD_DIM
    q = load_tile(Q + b * sqb + h * sqh, rows, cols, sqn, rows < P, mc, ALIGN)
    do = load_tile(DO + b * sdb + h * sdh, rows, cols, sdn, rows < P, mc, ALIGN)
    o = load_tile(O + b * sob + h * soh, rows, cols, son, rows < P, mc, ALIGN)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    k_base, v_base = K + b * skb + h * skh, V + b * svb + h * svh
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, N, BLOCK_N):             # pass 1: the rows' log-sum-exp (the output is the op's)
        keys = start + tl.arange(0, BLOCK_N)
        k = load_tile(k_base, keys, cols, skn, keys < N, mc, ALIGN)
        s = tl.where(keys[None, :] < N, scores(q, k, DOT_PRECISION) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    lse = m_i + tl.math.log2(l_i)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, N, BLOCK_N):             # pass 2: dQ
        keys = start + tl.arange(0, BLOCK_N)
        k = load_tile(k_base, keys, cols, skn, keys < N, mc, ALIGN)
        v = load_tile(v_base, keys, cols, svn, keys < N, mc, ALIGN)
        s = tl.where(keys[None, :] < N, scores(q, k, DOT_PRECISION) * qk_scale, float("-inf"))
        dq, _ = dq_step(dq, s, lse, delta, do, k, v, DOT_PRECISION)
    store_tile(DQ + b * sgb + h * sgh, rows, cols, sgn, rows < P, mc, dq * scale, ALIGN)
    tl.store(Stats + bh * P + rows, lse, mask=rows < P)
    tl.store(Stats + (tl.num_programs(1) + bh) * P + rows, delta, mask=rows < P)


@triton.jit(do_not_specialize=["H", "N", "P"])
def _prefix_dkdv_kernel(Q, K, V, DO, DK, DV, Stats, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                        sdb, sdh, sdn, skgb, skgh, skgn, svgb, svgh, svgn, H, N, P, qk_scale, scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr):
    """One key tile of one (batch, head): every prefix query's share of dK and dV added into DK and DV."""
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    mc = cols < HEAD_DIM
    k = load_tile(K + b * skb + h * skh, keys, cols, skn, keys < N, mc, ALIGN)
    v = load_tile(V + b * svb + h * svh, keys, cols, svn, keys < N, mc, ALIGN)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start in range(0, P, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = load_tile(Q + b * sqb + h * sqh, rows, cols, sqn, rows < P, mc, ALIGN)
        do = load_tile(DO + b * sdb + h * sdh, rows, cols, sdn, rows < P, mc, ALIGN)
        lse, delta = load_row_stats(Stats + bh * P, Stats + (tl.num_programs(1) + bh) * P, rows, rows < P)
        s_t = transposed_scores(k, q, DOT_PRECISION) * qk_scale
        dk, dv, _ = dkdv_step(dk, dv, s_t, lse, delta, q, do, v, DOT_PRECISION)
    mn = keys < N
    dk_base, dv_base = DK + b * skgb + h * skgh, DV + b * svgb + h * svgh
    store_tile(dk_base, keys, cols, skgn, mn, mc, load_tile(dk_base, keys, cols, skgn, mn, mc, ALIGN) + dk * scale,
               ALIGN)
    store_tile(dv_base, keys, cols, svgn, mn, mc, load_tile(dv_base, keys, cols, svgn, mn, mc, ALIGN) + dv, ALIGN)


def add_prefix_queries_gradients_triton(dq: Tensor, dk: Tensor, dv: Tensor, do: Tensor, q: Tensor, k: Tensor,
                                        v: Tensor, o: Tensor, num_prefix: int) -> None:
    """In place, as ``reference.add_prefix_queries_gradients``: the first ``num_prefix`` rows of dq from the
    prefix queries' gradients, their keys' and values' shares added to dk and dv (B, h, N, d), at SDPA's default
    scale 1 / sqrt(d). dq, dk and dv have unit stride on their last axis (the inputs are copied where not)."""
    if num_prefix == 0:
        return
    q, k, v, o, do = (rows_contiguous(t) for t in (q, k, v, o, do))
    b, h, n, d = k.shape
    if v.shape[-1] != d:
        raise ValueError(f"prefix queries' backward: values of head dim {v.shape[-1]} != the keys' {d}")
    scale = d ** -0.5
    stats = torch.empty(2, b * h, num_prefix, device=q.device, dtype=torch.float32)
    consts = dict(HEAD_DIM=d, BLOCK_D=pad_dim(d), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    common = (*strides(q), *strides(k), *strides(v))
    launch(_prefix_dq_kernel, (cdiv(num_prefix, BLOCK_M), b * h), q, k, v, o, do, dq, stats, *common, *strides(o),
           *strides(do), *strides(dq), h, n, num_prefix, scale * LOG2E.value, scale,
           ALIGN=row_alignment(q, k, v, o, do, dq), **consts)
    launch(_prefix_dkdv_kernel, (cdiv(n, BLOCK_N), b * h), q, k, v, do, dk, dv, stats, *common, *strides(do),
           *strides(dk), *strides(dv), h, n, num_prefix, scale * LOG2E.value, scale,
           ALIGN=row_alignment(q, k, v, do, dk, dv), **consts)
