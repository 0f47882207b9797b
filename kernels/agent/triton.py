"""Agent attention in Triton (Han et al., ECCV 2024, Eq. 3-5), forward and backward.

A = adaptive average pooling of the grid queries to n = a x a agents (a Triton reduction over N);
agent aggregation V_A = softmax_j(A k_j^T / sqrt(d) + B1) V is a flash-style online softmax over key
blocks, split across programs and merged by log-sum-exp (one merge program per agent); agent broadcast
O_i = softmax_a(q_i A^T / sqrt(d) + B2) V_A is one kernel per query block. The N x n score
matrices live only in registers.

Backward, with P2 = softmax of the broadcast scores and P1 of the aggregation scores:
  dP2 = dO V_A^T, dS2 = P2 (dP2 - rowsum(dO O)) with rowsum(dO O) = rowsum(P2 dP2), dq = dS2 A / sqrt(d),
  dV_A = P2^T dO,
  dA += dS2^T q / sqrt(d), dB2 = sum_batch dS2;
  dP1 = dV_A V^T, dS1 = P1 (dP1 - rowsum(dV_A V_A)), dk = dS1^T A / sqrt(d), dv = P1^T dV_A,
  dA += dS1 K / sqrt(d), dB1 = sum_batch dS1;  finally dq_grid += pool^T dA.
The backward programs own a token chunk of one head and a group of batch elements and loop over the
group, so the bias gradients (shared by the batch) accumulate in place without atomics, one slice per
group (summed afterwards); chunks of >= 512 tokens keep the per-chunk [dV_A | dA] partials small, and
the groups supply the programs that a short sequence cannot (backward_split).

Precision: with 16-bit inputs the products take 16-bit operands; the scores, which are exponentiated,
use the fp32 agents as hi + lo parts against the exact 16-bit q, k (fp32-accurate scores), and so do
P1 in P1 V and V_A in dP2 (see _aggregate_kernel). Products whose result is an output or a gradient
take each fp32 operand rounded once (P2 in O, dS and P in dq, dk, dv and the dA, dV_A partials): an
error of about 2^-9 per term, the size of the 16-bit rounding of the result itself.
"""
import functools
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..core.alignment import row_alignment
from ..core.triton_common import (LOG2E, cdiv, dot, dot_split_a, dot_split_b, head_strides, launch,
                                  load_tile, num_programs_target, pad_dim, precision_flags, round_to,
                                  split_operand, split_tokens, store_tile)
from ..core.heads_last import heads_last_empty
from ..core.triton_op import triton_op


# Tile sizes and launch options per kernel (sm_90 ptxas register reports and the sweeps of
# ``python -m subquad.tasks.bench.linear --sweep``, which overrides them while it sweeps).
CONFIG = {
    "pool": dict(BLOCK_N=64, num_warps=8, num_stages=3),
    "aggregate": dict(BLOCK_N=32, num_warps=4, num_stages=3),
    "broadcast": dict(BLOCK_N=32, num_warps=4, num_stages=3, max_tiles=8),
    "merge": dict(BLOCK_S=32, num_warps=4),
    # wide heads: 32-token tiles (not swept; 64 spill 172 bytes of registers per thread on sm_90 at head dim 72)
    "broadcast_bwd": dict(BLOCK_N=64, num_warps=8, num_stages=2, min_chunk=512, wide_block_n=32),
    "aggregate_bwd": dict(BLOCK_N=64, num_warps=8, num_stages=2, min_chunk=512),
    "unpool": dict(BLOCK_N=32, num_warps=4, num_stages=3, max_tiles=8),
}
# the backward launches aim at this many programs per SM (see backward_split)
BACKWARD_PROGRAMS_PER_SM = 4


@triton.jit
def _bins(offs_n, offs_a, num_prefix, grid_h, grid_w, A_SIDE: tl.constexpr):
    """Membership (tokens x agents) of each grid token in each agent's adaptive-pooling bin
    [floor(i H / a), ceil((i + 1) H / a)) x [floor(j W / a), ceil((j + 1) W / a))."""
    g = offs_n - num_prefix
    row, col = g // grid_w, g % grid_w
    ai, aj = offs_a // A_SIDE, offs_a % A_SIDE
    r0, r1 = (ai * grid_h) // A_SIDE, ((ai + 1) * grid_h + A_SIDE - 1) // A_SIDE
    c0, c1 = (aj * grid_w) // A_SIDE, ((aj + 1) * grid_w + A_SIDE - 1) // A_SIDE
    return ((g >= 0)[:, None] & (row[:, None] >= r0[None, :]) & (row[:, None] < r1[None, :])
            & (col[:, None] >= c0[None, :]) & (col[:, None] < c1[None, :]) & (offs_a < A_SIDE * A_SIDE)[None, :])


@triton.jit
def _inv_bin_size(offs_a, grid_h, grid_w, A_SIDE: tl.constexpr):
    """1 / (tokens in each agent's bin); the bins of the padding agents count as 1."""
    ai, aj = offs_a // A_SIDE, offs_a % A_SIDE
    rows = ((ai + 1) * grid_h + A_SIDE - 1) // A_SIDE - (ai * grid_h) // A_SIDE
    cols = ((aj + 1) * grid_w + A_SIDE - 1) // A_SIDE - (aj * grid_w) // A_SIDE
    return tl.where(offs_a < A_SIDE * A_SIDE, 1.0 / (rows * cols).to(tl.float32), 1.0)


@triton.jit
def _load_agents(agents_ptr, bh, offs_a, offs_c, grid_h, grid_w, A_SIDE: tl.constexpr, NAP: tl.constexpr,
                 DP: tl.constexpr):
    """A (NAP, DP) fp32: the pooled bin sums divided by the bin sizes."""
    sums = tl.load(agents_ptr + bh * NAP * DP + offs_a[:, None] * DP + offs_c[None, :])
    return sums * _inv_bin_size(offs_a, grid_h, grid_w, A_SIDE)[:, None]


@triton.jit
def _scores(x, a_hi, a_lo, LOWP: tl.constexpr):
    """x A^T in fp32 for x in its own dtype and A given by split_operand: the scores are exponentiated, so
    the fp32 agents enter as hi + lo against the exact 16-bit x."""
    return dot_split_b(x, tl.trans(a_hi), tl.trans(a_lo), LOWP)


@triton.jit(do_not_specialize=["N", "H", "chunk", "num_prefix", "grid_h", "grid_w"])
def _pool_kernel(q_ptr, part_ptr, N, H, chunk, num_prefix, grid_h, grid_w, s_qb, s_qh, s_qn,
                 A_SIDE: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, NAP: tl.constexpr, BLOCK_N: tl.constexpr,
                 LOWP: tl.constexpr, ALIGN: tl.constexpr):
    """Partial bin sums sum_{i in bin a} q_i over one chunk of tokens: (NAP, DP) fp32."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b, h = bh // H, bh % H
    DT = q_ptr.dtype.element_ty
    offs_c = tl.arange(0, DP)
    offs_a = tl.arange(0, NAP)
    mc = offs_c < D
    q_base = q_ptr + b * s_qb + h * s_qh
    acc = tl.zeros((NAP, DP), tl.float32)
    lo = num_prefix + split * chunk
    hi = tl.minimum(lo + chunk, N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < hi
        x = load_tile(q_base, offs_n, offs_c, s_qn, mn, mc, ALIGN)
        member = tl.where(_bins(offs_n, offs_a, num_prefix, grid_h, grid_w, A_SIDE) & mn[:, None], 1.0, 0.0)
        acc += dot(tl.trans(round_to(member, DT)), x, LOWP)      # 0/1 weights: exact in 16 bits
    tl.store(part_ptr + (bh * tl.num_programs(1) + split) * NAP * DP + offs_a[:, None] * DP + offs_c[None, :], acc)


@triton.jit
def _dot_split_first(a_hi, a_lo, b, LOWP: tl.constexpr):
    """a @ b for fp32 a given by split_operand and b already in its 16-bit dtype (exact): hi*b + lo*b."""
    if LOWP:
        out = dot(a_hi, b, LOWP) + dot(a_lo, b, LOWP)
    else:
        out = dot(a_hi, b, LOWP)
    return out


@triton.jit
def _aggregate_scores(kt, a_hi, a_lo, b1_ptr, h, offs_n, offs_a, mn, ma, N, qk_scale, NA: tl.constexpr,
                      HAS_BIAS: tl.constexpr, LOWP: tl.constexpr):
    """A K^T / sqrt(d) + B1 (log2 domain, agents x keys) over a block of keys (k in its own dtype), computed
    agents-first so that no transpose of the scores is needed; keys outside ``mn`` are left for the caller."""
    s = _dot_split_first(a_hi, a_lo, tl.trans(kt), LOWP) * qk_scale
    if HAS_BIAS:
        s += tl.load(b1_ptr + h * NA * N + offs_a[:, None] * N + offs_n[None, :],
                     mask=ma[:, None] & mn[None, :], other=0.0).to(tl.float32) * LOG2E
    return s


@triton.jit(do_not_specialize=["N", "H", "chunk", "grid_h", "grid_w"])
def _aggregate_kernel(k_ptr, v_ptr, agents_ptr, b1_ptr, m_ptr, l_ptr, acc_ptr,
                      N, H, chunk, qk_scale, grid_h, grid_w, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                      NA: tl.constexpr, A_SIDE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr,
                      DVP: tl.constexpr, NAP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                      LOWP: tl.constexpr, ALIGN: tl.constexpr, FINAL: tl.constexpr):
    """Online softmax over one chunk of keys for every agent: running max, sum and P V (log2 domain). FINAL
    (one chunk holds every key): V_A = P V / sum and lse = m + log2(sum) stored directly (at acc_ptr and m_ptr),
    what ``_merge_kernel`` makes of a single split, without its launch.
    P enters P V as hi + lo: rounding it once, as flash attention does, would perturb V_A by 2^-9 / sqrt(N),
    which is a percent of the differences between the agents' rows when the softmax is nearly flat, and
    those differences are what dB2 sees (tests: test_flat_softmax_cpu)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b, h = bh // H, bh % H
    DT = k_ptr.dtype.element_ty
    offs_c = tl.arange(0, DP)
    offs_v = tl.arange(0, DVP)
    offs_a = tl.arange(0, NAP)
    mc, mv, ma = offs_c < D, offs_v < DV, offs_a < NA
    a_hi, a_lo = split_operand(_load_agents(agents_ptr, bh, offs_a, offs_c, grid_h, grid_w, A_SIDE, NAP, DP),
                               DT, LOWP)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    m_i = tl.full((NAP,), float("-inf"), tl.float32)
    l_i = tl.zeros((NAP,), tl.float32)
    acc = tl.zeros((NAP, DVP), tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < hi
        kt = load_tile(k_base, offs_n, offs_c, s_kn, mn, mc, ALIGN)
        vt = load_tile(v_base, offs_n, offs_v, s_vn, mn, mv, ALIGN)
        s = _aggregate_scores(kt, a_hi, a_lo, b1_ptr, h, offs_n, offs_a, mn, ma, N, qk_scale, NA, HAS_BIAS, LOWP)
        s = tl.where(mn[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot_split_a(p, vt, DT, LOWP)
        m_i = m_new
    part = bh * tl.num_programs(1) + split
    if FINAL:
        tl.store(m_ptr + part * NAP + offs_a, m_i + tl.log2(l_i))
        acc = acc / l_i[:, None]
    else:
        tl.store(m_ptr + part * NAP + offs_a, m_i)
        tl.store(l_ptr + part * NAP + offs_a, l_i)
    tl.store(acc_ptr + part * NAP * DVP + offs_a[:, None] * DVP + offs_v[None, :], acc)


@triton.jit(do_not_specialize=["SPLITS"])
def _merge_kernel(m_ptr, l_ptr, acc_ptr, va_ptr, lse_ptr, SPLITS, NAP: tl.constexpr, DVP: tl.constexpr,
                  BLOCK_S: tl.constexpr):
    """For one agent of one (batch, head): V_A = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s and
    lse = m + log2(l) over the splits, BLOCK_S splits at a time (one program per agent, so the merge is
    as parallel as the agents, not serial over the splits of a head)."""
    bh = tl.program_id(0)
    a = tl.program_id(1)
    offs_v = tl.arange(0, DVP)
    m = tl.full((1,), float("-inf"), tl.float32)
    l_sum = tl.zeros((1,), tl.float32)
    acc = tl.zeros((DVP,), tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ms = offs_s < SPLITS
        rows = bh * SPLITS + offs_s
        m_s = tl.load(m_ptr + rows * NAP + a, mask=ms, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(m_s, axis=0))
        w = tl.where(ms, tl.exp2(m_s - m_new), 0.0)
        alpha = tl.exp2(m - m_new)
        l_sum = l_sum * alpha + tl.sum(w * tl.load(l_ptr + rows * NAP + a, mask=ms, other=0.0), axis=0)
        acc_s = tl.load(acc_ptr + (rows[:, None] * NAP + a) * DVP + offs_v[None, :], mask=ms[:, None], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * acc_s, axis=0)
        m = m_new
    tl.store(va_ptr + (bh * NAP + a) * DVP + offs_v, acc / l_sum)
    tl.store(lse_ptr + bh * NAP + a + tl.arange(0, 1), m + tl.log2(l_sum))


@triton.jit
def _broadcast_probs(qt, a_hi, a_lo, b2_ptr, h, offs_n, offs_a, mn, ma, N, qk_scale, NA: tl.constexpr,
                     HAS_BIAS: tl.constexpr, LOWP: tl.constexpr):
    """P2 = softmax over agents of q A^T / sqrt(d) + B2 for a block of queries (q in its own dtype)."""
    s = _scores(qt, a_hi, a_lo, LOWP) * qk_scale
    if HAS_BIAS:
        s += tl.load(b2_ptr + h * N * NA + offs_n[:, None] * NA + offs_a[None, :],
                     mask=mn[:, None] & ma[None, :], other=0.0).to(tl.float32) * LOG2E
    s = tl.where(ma[None, :], s, float("-inf"))
    p = tl.exp2(s - tl.max(s, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit(do_not_specialize=["N", "H", "chunk", "grid_h", "grid_w"])
def _broadcast_kernel(q_ptr, agents_ptr, va_ptr, b2_ptr, o_ptr, N, H, chunk, qk_scale, grid_h, grid_w,
                      s_qb, s_qh, s_qn, s_ob, s_oh, s_on,
                      NA: tl.constexpr, A_SIDE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr,
                      DVP: tl.constexpr, NAP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                      LOWP: tl.constexpr, ALIGN: tl.constexpr):
    """O = P2 V_A for one chunk of queries (P2 rounded once to the input dtype, V_A as hi + lo)."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    DT = q_ptr.dtype.element_ty
    offs_c = tl.arange(0, DP)
    offs_v = tl.arange(0, DVP)
    offs_a = tl.arange(0, NAP)
    mc, mv, ma = offs_c < D, offs_v < DV, offs_a < NA
    a_hi, a_lo = split_operand(_load_agents(agents_ptr, bh, offs_a, offs_c, grid_h, grid_w, A_SIDE, NAP, DP),
                               DT, LOWP)
    va_hi, va_lo = split_operand(tl.load(va_ptr + bh * NAP * DVP + offs_a[:, None] * DVP + offs_v[None, :]),
                                 DT, LOWP)
    q_base = q_ptr + b * s_qb + h * s_qh
    o_base = o_ptr + b * s_ob + h * s_oh
    lo = tl.program_id(1) * chunk
    hi = tl.minimum(lo + chunk, N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < hi
        qt = load_tile(q_base, offs_n, offs_c, s_qn, mn, mc, ALIGN)
        p = _broadcast_probs(qt, a_hi, a_lo, b2_ptr, h, offs_n, offs_a, mn, ma, N, qk_scale, NA, HAS_BIAS, LOWP)
        out = dot_split_b(round_to(p, DT), va_hi, va_lo, LOWP)
        store_tile(o_base, offs_n, offs_v, s_on, mn, mv, out, ALIGN)


@triton.jit(do_not_specialize=["B", "BPG", "N", "H", "chunk", "grid_h", "grid_w"])
def _broadcast_bwd_kernel(q_ptr, do_ptr, agents_ptr, va_ptr, b2_ptr, dq_ptr, db2_ptr, part_ptr,
                          B, BPG, N, H, chunk, qk_scale, scale, grid_h, grid_w,
                          s_qb, s_qh, s_qn, s_gb, s_gh, s_gn, s_db, s_dh, s_dn,
                          NA: tl.constexpr, A_SIDE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                          DP: tl.constexpr, DVP: tl.constexpr, NAP: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BIAS_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, LOWP: tl.constexpr, ALIGN: tl.constexpr):
    """Broadcast stage backward for one head, one chunk of queries and one group of BPG batch elements:
    dq (without the pooling term), the group's dB2 accumulated in place (its own slice of db2), and per
    batch element partial [dV_A | dA]. rowsum(dO O) = rowsum(P2 dP2) needs no recomputed O."""
    h = tl.program_id(0)
    split = tl.program_id(1)
    group = tl.program_id(2)
    DT = q_ptr.dtype.element_ty
    offs_c = tl.arange(0, DP)
    offs_v = tl.arange(0, DVP)
    offs_a = tl.arange(0, NAP)
    mc, mv, ma = offs_c < D, offs_v < DV, offs_a < NA
    lo = split * chunk
    hi = tl.minimum(lo + chunk, N)
    b_lo = group * BPG
    b_hi = tl.minimum(b_lo + BPG, B)
    db2_base = db2_ptr + (group * H + h) * N * NA
    for b in range(b_lo, b_hi):
        bh = b * H + h
        agents = _load_agents(agents_ptr, bh, offs_a, offs_c, grid_h, grid_w, A_SIDE, NAP, DP)
        a_hi, a_lo = split_operand(agents, DT, LOWP)
        va = tl.load(va_ptr + bh * NAP * DVP + offs_a[:, None] * DVP + offs_v[None, :])
        va_hi, va_lo = split_operand(va, DT, LOWP)
        q_base = q_ptr + b * s_qb + h * s_qh
        g_base = do_ptr + b * s_gb + h * s_gh
        dq_base = dq_ptr + b * s_db + h * s_dh
        acc_va = tl.zeros((NAP, DVP), tl.float32)
        acc_a = tl.zeros((NAP, DP), tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mn = offs_n < hi
            qt = load_tile(q_base, offs_n, offs_c, s_qn, mn, mc, ALIGN)
            g = load_tile(g_base, offs_n, offs_v, s_gn, mn, mv, ALIGN)
            p = _broadcast_probs(qt, a_hi, a_lo, b2_ptr, h, offs_n, offs_a, mn, ma, N, qk_scale, NA, HAS_BIAS,
                                 LOWP)
            dp = dot_split_b(g, tl.trans(va_hi), tl.trans(va_lo), LOWP)
            ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
            ds16 = round_to(ds, DT)
            dq = dot(ds16, a_hi, LOWP) * scale
            store_tile(dq_base, offs_n, offs_c, s_dn, mn, mc, dq, ALIGN)
            acc_va += dot(tl.trans(round_to(p, DT)), g, LOWP)
            acc_a += dot(tl.trans(ds16), qt, LOWP)
            if BIAS_GRAD:
                ptrs = db2_base + offs_n[:, None] * NA + offs_a[None, :]
                m = mn[:, None] & ma[None, :]
                if b > b_lo:
                    ds += tl.load(ptrs, mask=m, other=0.0)
                tl.store(ptrs, ds, mask=m)
        part = part_ptr + (bh * tl.num_programs(1) + split) * NAP * (DVP + DP)
        tl.store(part + offs_a[:, None] * DVP + offs_v[None, :], acc_va)
        tl.store(part + NAP * DVP + offs_a[:, None] * DP + offs_c[None, :], acc_a * scale)
        tl.debug_barrier()          # this batch element's dB2 stores are read by other threads at the next


@triton.jit(do_not_specialize=["B", "BPG", "N", "H", "chunk", "grid_h", "grid_w"])
def _aggregate_bwd_kernel(k_ptr, v_ptr, agents_ptr, b1_ptr, va_ptr, lse_ptr, grads_ptr, dk_ptr, dv_ptr,
                          db1_ptr, part_ptr, B, BPG, N, H, chunk, qk_scale, scale, grid_h, grid_w,
                          s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn,
                          NA: tl.constexpr, A_SIDE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                          DP: tl.constexpr, DVP: tl.constexpr, NAP: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BIAS_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, LOWP: tl.constexpr, ALIGN: tl.constexpr):
    """Aggregation stage backward for one head, one chunk of keys and one group of BPG batch elements:
    dk, dv, the group's dB1 in place and per batch element a partial dA = dS1 K / sqrt(d) (the first chunk's with
    the broadcast stage's share, the last NAP * DP values of ``grads``, added)."""
    h = tl.program_id(0)
    split = tl.program_id(1)
    group = tl.program_id(2)
    DT = k_ptr.dtype.element_ty
    offs_c = tl.arange(0, DP)
    offs_v = tl.arange(0, DVP)
    offs_a = tl.arange(0, NAP)
    mc, mv, ma = offs_c < D, offs_v < DV, offs_a < NA
    lo = split * chunk
    hi = tl.minimum(lo + chunk, N)
    b_lo = group * BPG
    b_hi = tl.minimum(b_lo + BPG, B)
    db1_base = db1_ptr + (group * H + h) * NA * N
    for b in range(b_lo, b_hi):
        bh = b * H + h
        agents = _load_agents(agents_ptr, bh, offs_a, offs_c, grid_h, grid_w, A_SIDE, NAP, DP)
        a_hi, a_lo = split_operand(agents, DT, LOWP)
        dva = tl.load(grads_ptr + bh * NAP * (DVP + DP) + offs_a[:, None] * DVP + offs_v[None, :])
        dva_hi, dva_lo = split_operand(dva, DT, LOWP)
        va = tl.load(va_ptr + bh * NAP * DVP + offs_a[:, None] * DVP + offs_v[None, :])
        delta = tl.sum(dva * va, axis=1)
        lse = tl.load(lse_ptr + bh * NAP + offs_a)
        k_base = k_ptr + b * s_kb + h * s_kh
        v_base = v_ptr + b * s_vb + h * s_vh
        dk_base = dk_ptr + b * s_dkb + h * s_dkh
        dv_base = dv_ptr + b * s_dvb + h * s_dvh
        acc_a = tl.zeros((NAP, DP), tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mn = offs_n < hi
            kt = load_tile(k_base, offs_n, offs_c, s_kn, mn, mc, ALIGN)
            vt = load_tile(v_base, offs_n, offs_v, s_vn, mn, mv, ALIGN)
            s = _aggregate_scores(kt, a_hi, a_lo, b1_ptr, h, offs_n, offs_a, mn, ma, N, qk_scale, NA, HAS_BIAS,
                                  LOWP)
            p = tl.where(mn[None, :], tl.exp2(s - lse[:, None]), 0.0)
            ds = p * (_dot_split_first(dva_hi, dva_lo, tl.trans(vt), LOWP) - delta[:, None])
            ds16 = round_to(ds, DT)
            dk = dot(tl.trans(ds16), a_hi, LOWP) * scale
            store_tile(dk_base, offs_n, offs_c, s_dkn, mn, mc, dk, ALIGN)
            dv = dot(tl.trans(round_to(p, DT)), dva_hi, LOWP)
            store_tile(dv_base, offs_n, offs_v, s_dvn, mn, mv, dv, ALIGN)
            acc_a += dot(ds16, kt, LOWP)
            if BIAS_GRAD:
                ptrs = db1_base + offs_a[:, None] * N + offs_n[None, :]
                m = ma[:, None] & mn[None, :]
                if b > b_lo:
                    ds += tl.load(ptrs, mask=m, other=0.0)
                tl.store(ptrs, ds, mask=m)
        acc_a *= scale
        if split == 0:          # the first chunk also carries the broadcast stage's share of dA (so dA is one sum)
            acc_a += tl.load(grads_ptr + bh * NAP * (DVP + DP) + NAP * DVP + offs_a[:, None] * DP + offs_c[None, :])
        tl.store(part_ptr + (bh * tl.num_programs(1) + split) * NAP * DP + offs_a[:, None] * DP + offs_c[None, :],
                 acc_a)
        tl.debug_barrier()          # this batch element's dB1 stores are read by other threads at the next


@triton.jit(do_not_specialize=["N", "H", "chunk", "num_prefix", "grid_h", "grid_w"])
def _unpool_kernel(dq_ptr, da_ptr, N, H, chunk, num_prefix, grid_h, grid_w, s_db, s_dh, s_dn,
                   A_SIDE: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, NAP: tl.constexpr, BLOCK_N: tl.constexpr,
                   LOWP: tl.constexpr, ALIGN: tl.constexpr):
    """dq_i += sum over the bins a holding grid token i of dA_a / |bin a|."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    DT = dq_ptr.dtype.element_ty
    offs_c = tl.arange(0, DP)
    offs_a = tl.arange(0, NAP)
    mc = offs_c < D
    da = _load_agents(da_ptr, bh, offs_a, offs_c, grid_h, grid_w, A_SIDE, NAP, DP)
    da_hi, da_lo = split_operand(da, DT, LOWP)
    dq_base = dq_ptr + b * s_db + h * s_dh
    lo = num_prefix + tl.program_id(1) * chunk
    hi = tl.minimum(lo + chunk, N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < hi
        member = tl.where(_bins(offs_n, offs_a, num_prefix, grid_h, grid_w, A_SIDE) & mn[:, None], 1.0, 0.0)
        dq = load_tile(dq_base, offs_n, offs_c, s_dn, mn, mc, ALIGN).to(tl.float32)
        dq += dot_split_b(round_to(member, DT), da_hi, da_lo, LOWP)
        store_tile(dq_base, offs_n, offs_c, s_dn, mn, mc, dq, ALIGN)


# --- launchers ------------------------------------------------------------------------------

def _meta(q: Tensor, v: Tensor, num_agents: int) -> dict:
    """The kernels' constexpr options (read only: kept per signature, as linear_attention keeps its own)."""
    return _constexprs(q.dtype, q.shape[-1], v.shape[-1], num_agents)


@functools.lru_cache(maxsize=None)
def _constexprs(dtype: torch.dtype, d: int, dv: int, num_agents: int) -> dict:
    return dict(D=d, DV=dv, DP=pad_dim(d), DVP=pad_dim(dv), NAP=pad_dim(num_agents), A_SIDE=math.isqrt(num_agents),
                **precision_flags(dtype))


def _launch_opts(cfg: dict, meta: dict) -> dict:
    """The kernel's tile and launch options; fp32 inputs (exact fp32 products on the FMA units, which need
    far more registers) take tiles of at most 16 tokens, wide heads (a padded head dim over 64, e.g. DiT's 72
    padded to 128) the config's ``wide_block_n`` where it has one."""
    block_n = cfg["BLOCK_N"] if meta["LOWP"] else min(cfg["BLOCK_N"], 16)
    if max(meta["DP"], meta["DVP"]) > 64:
        block_n = min(block_n, cfg.get("wide_block_n", block_n))
    return dict(BLOCK_N=block_n, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def backward_split(batch: int, heads: int, n: int, block_n: int, target: int, min_chunk: int
                   ) -> Tuple[int, int, int, int]:
    """(splits, chunk, groups, batches per group) of a backward launch over (heads, splits, groups).

    Each program writes one [dV_A | dA] partial per batch element and token chunk, and one dB slice per
    batch group: chunks of at least ``min_chunk`` tokens keep the partials a small fraction of the token
    traffic, and groups of batch elements (each with its own dB slice, summed afterwards) supply the
    programs that a short sequence cannot, so heads * splits * groups reaches ``target``."""
    tiles = cdiv(n, block_n)
    chunk_tiles = max(cdiv(min_chunk, block_n), cdiv(tiles, cdiv(target, heads)))
    chunk = min(chunk_tiles, tiles) * block_n
    splits = cdiv(n, chunk)
    groups = min(batch, cdiv(target, heads * splits))
    per_group = cdiv(batch, groups)
    return splits, chunk, cdiv(batch, per_group), per_group


def agent_attention_forward(q: Tensor, k: Tensor, v: Tensor, b1: Optional[Tensor], b2: Optional[Tensor],
                            num_agents: int, num_prefix: int, grid_h: int, grid_w: int
                            ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(O, bin sums of q (B*h, NAP, DP) fp32, V_A (B*h, NAP, DVP) fp32, lse1 (B*h, NAP) fp32, log2 domain)."""
    b, h, n, d = q.shape
    dv = v.shape[-1]
    (q, s_qb, s_qh, s_qn), (k, s_kb, s_kh, s_kn), (v, s_vb, s_vh, s_vn) = map(head_strides, (q, k, v))
    meta = _meta(q, v, num_agents)
    dp, dvp, nap = meta["DP"], meta["DVP"], meta["NAP"]
    flags = dict(LOWP=meta["LOWP"])
    target = num_programs_target(q.device)
    has_bias = b1 is not None

    cfg = CONFIG["pool"]
    splits, chunk = split_tokens(b * h, n - num_prefix, cfg["BLOCK_N"], target)
    part = q.new_empty(b * h, splits, nap, dp, dtype=torch.float32)
    launch(_pool_kernel, (b * h, splits), q, part, n, h, chunk, num_prefix, grid_h, grid_w, s_qb, s_qh, s_qn,
           A_SIDE=meta["A_SIDE"], D=d, DP=dp, NAP=nap, ALIGN=row_alignment(q), **flags,
           **_launch_opts(cfg, meta))
    agents = part.sum(1) if splits > 1 else part.view(b * h, nap, dp)

    cfg = CONFIG["aggregate"]
    splits, chunk = split_tokens(b * h, n, cfg["BLOCK_N"], target)
    va = q.new_empty(b * h, nap, dvp, dtype=torch.float32)
    lse = q.new_empty(b * h, nap, dtype=torch.float32)
    if splits == 1:         # every key in one chunk: the aggregation writes V_A and lse itself
        m_part, l_part, acc_part = lse, lse, va
    else:
        m_part = q.new_empty(b * h, splits, nap, dtype=torch.float32)
        l_part = torch.empty_like(m_part)
        acc_part = q.new_empty(b * h, splits, nap, dvp, dtype=torch.float32)
    qk_scale = d ** -0.5 * LOG2E.value
    launch(_aggregate_kernel, (b * h, splits), k, v, agents, b1 if has_bias else q, m_part, l_part, acc_part, n, h,
           chunk, qk_scale, grid_h, grid_w, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, NA=num_agents, HAS_BIAS=has_bias,
           ALIGN=row_alignment(k, v), FINAL=splits == 1, **meta, **_launch_opts(cfg, meta))
    if splits > 1:
        cfg = CONFIG["merge"]
        # the padding agents' rows are merged too (finite: their scores are the zero agent's), never read back
        launch(_merge_kernel, (b * h, nap), m_part, l_part, acc_part, va, lse, splits, NAP=nap, DVP=dvp,
               BLOCK_S=cfg["BLOCK_S"], num_warps=cfg["num_warps"])

    out = heads_last_empty(q, b, h, n, dv)
    cfg = CONFIG["broadcast"]
    splits, chunk = split_tokens(b * h, n, cfg["BLOCK_N"], 2 * target, cfg["max_tiles"])
    launch(_broadcast_kernel, (b * h, splits), q, agents, va, b2 if has_bias else q, out, n, h, chunk, qk_scale,
           grid_h, grid_w, s_qb, s_qh, s_qn, out.stride(0), out.stride(1), out.stride(2), NA=num_agents,
           HAS_BIAS=has_bias, ALIGN=row_alignment(q, out), **meta, **_launch_opts(cfg, meta))
    return out, agents, va, lse


def agent_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, b1: Optional[Tensor],
                             b2: Optional[Tensor], agents: Tensor, va: Tensor, lse: Tensor, bias_grad: bool,
                             num_agents: int, num_prefix: int, grid_h: int, grid_w: int
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dB1, dB2); the bias gradients are fp32, empty when ``bias_grad`` is False."""
    b, h, n, d = q.shape
    (q, s_qb, s_qh, s_qn), (k, s_kb, s_kh, s_kn), (v, s_vb, s_vh, s_vn), (grad, s_gb, s_gh, s_gn) = map(
        head_strides, (q, k, v, grad))
    meta = _meta(q, v, num_agents)
    dp, dvp, nap = meta["DP"], meta["DVP"], meta["NAP"]
    target = num_programs_target(q.device, per_sm=BACKWARD_PROGRAMS_PER_SM)
    has_bias = b1 is not None
    bias_grad = bias_grad and has_bias
    scale = d ** -0.5
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    flags = dict(NA=num_agents, HAS_BIAS=has_bias, BIAS_GRAD=bias_grad, **meta)

    def bias_buffer(groups: int, shape) -> Tensor:
        return q.new_empty((groups, *shape) if bias_grad else (0,), dtype=torch.float32)

    def group_sum(buf: Tensor) -> Tensor:
        return buf if not bias_grad else (buf[0] if buf.shape[0] == 1 else buf.sum(0))

    cfg = CONFIG["broadcast_bwd"]
    opts = _launch_opts(cfg, meta)
    splits, chunk, groups, per_group = backward_split(b, h, n, opts["BLOCK_N"], target, cfg["min_chunk"])
    db2 = bias_buffer(groups, b2.shape if bias_grad else ())
    part_q = q.new_empty(b * h, splits, nap * (dvp + dp), dtype=torch.float32)
    launch(_broadcast_bwd_kernel, (h, splits, groups), q, grad, agents, va, b2 if has_bias else q, dq,
           db2 if bias_grad else q, part_q, b, per_group, n, h, chunk, scale * LOG2E.value, scale, grid_h, grid_w,
           s_qb, s_qh, s_qn, s_gb, s_gh, s_gn, dq.stride(0), dq.stride(1), dq.stride(2),
           ALIGN=row_alignment(q, grad, dq), **flags, **opts)
    grads_q = part_q.sum(1) if splits > 1 else part_q.view(b * h, nap * (dvp + dp))

    cfg = CONFIG["aggregate_bwd"]
    opts = _launch_opts(cfg, meta)
    splits, chunk, groups, per_group = backward_split(b, h, n, opts["BLOCK_N"], target, cfg["min_chunk"])
    db1 = bias_buffer(groups, b1.shape if bias_grad else ())
    part_k = q.new_empty(b * h, splits, nap, dp, dtype=torch.float32)
    launch(_aggregate_bwd_kernel, (h, splits, groups), k, v, agents, b1 if has_bias else q, va, lse, grads_q, dk,
           dv, db1 if bias_grad else q, part_k, b, per_group, n, h, chunk, scale * LOG2E.value, scale, grid_h, grid_w,
           s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, dk.stride(0), dk.stride(1), dk.stride(2),
           dv.stride(0), dv.stride(1), dv.stride(2), ALIGN=row_alignment(k, v, dk, dv), **flags, **opts)
    da = part_k.sum(1) if splits > 1 else part_k.view(b * h, nap, dp)

    cfg = CONFIG["unpool"]
    splits, chunk = split_tokens(b * h, n - num_prefix, cfg["BLOCK_N"], 2 * target, cfg["max_tiles"])
    launch(_unpool_kernel, (b * h, splits), dq, da, n, h, chunk, num_prefix, grid_h, grid_w, dq.stride(0),
           dq.stride(1), dq.stride(2), A_SIDE=meta["A_SIDE"], D=d, DP=dp, NAP=nap, LOWP=meta["LOWP"],
           ALIGN=row_alignment(dq), **_launch_opts(cfg, meta))
    return dq, dk, dv, group_sum(db1), group_sum(db2)


# --- the op: custom ops for torch.compile, an autograd.Function in eager mode ------------------------

def _forward_fake(q, k, v, b1, b2, num_agents, num_prefix, grid_h, grid_w):
    b, h, n, d = q.shape
    nap, dp, dvp = pad_dim(num_agents), pad_dim(d), pad_dim(v.shape[-1])
    f32 = torch.float32
    return (heads_last_empty(q, b, h, n, v.shape[-1]), q.new_empty(b * h, nap, dp, dtype=f32),
            q.new_empty(b * h, nap, dvp, dtype=f32), q.new_empty(b * h, nap, dtype=f32))


def _backward_fake(grad, q, k, v, b1, b2, agents, va, lse, bias_grad, num_agents, num_prefix, grid_h, grid_w):
    with_bias = bias_grad and b1 is not None
    f32 = torch.float32
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(b1.shape if with_bias else (0,), dtype=f32),
            q.new_empty(b2.shape if with_bias else (0,), dtype=f32))


def _gradients(backward, grad, saved, args, needs):
    """The bias gradients only when a bias needs one (they cost a pass over the batch)."""
    b1, b2 = saved[3], saved[4]
    bias_grad = b1 is not None and (needs[3] or needs[4])
    dq, dk, dv, db1, db2 = backward(grad, *saved, bias_grad, *args)
    if not bias_grad:
        return dq, dk, dv, None, None
    return dq, dk, dv, db1.to(b1.dtype), db2.to(b2.dtype)


_agent_attention = triton_op("agent_attention", agent_attention_forward, agent_attention_backward, num_tensors=5,
                             forward_fake=_forward_fake, backward_fake=_backward_fake, gradients=_gradients)


def agent_attention_triton(q: Tensor, k: Tensor, v: Tensor, grid: Tuple[int, int], num_agents: int,
                           agent_bias: Optional[Tuple[Tensor, Tensor]], num_prefix: int) -> Tensor:
    """Agent attention with fused softmax stages (arguments as the reference's)."""
    b1, b2 = (None, None) if agent_bias is None else (agent_bias[0].contiguous(), agent_bias[1].contiguous())
    return _agent_attention(q, k, v, b1, b2, num_agents, num_prefix, grid[0], grid[1])
