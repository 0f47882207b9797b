"""2D neighborhood attention in Triton, forward and backward (NAT, Hassani et al., CVPR 2023, Eq. 2-3;
dilated: DiNAT, Hassani & Shi, 2022, Sec. 3.1).

NAT's Eq. 2-3: for a grid query i with the k x k neighbourhood rho(i) (the window centred on i, shifted
inward at the borders; with dilation delta taken inside i's dilation group),
    A_i = [Q_i K_rho(i)^T + B(i, rho(i))] / sqrt(d) ... (the bias added to the scaled scores here, as NATTEN),
    NA(i) = softmax(A_i) V_rho(i),
plus the prefix (cls) keys, which every grid query also attends.

The kernels read the raster-order (B, heads, N, d) tensors directly (no permutation pass). A program owns a
TH x TW tile of queries of one (batch, head) and one dilation group (rows = group + delta * u in group
coordinates u); the window start clamp(u - k//2, 0, len - k) is monotone in u, so the tile's windows
cover the rectangle [start(u_first), start(u_last) + k) per axis, which the program walks in KH x KW key
blocks (pointer gathers: a token's d channels are contiguous) with the exact mask computed from the
coordinates and NAT's relative position bias B[h, dr + k - 1, dc + k - 1] read from its table.

Backward (FlashAttention-2 style, steps shared with the block-sparse core in ``core.triton_common``): delta =
rowsum(dO O); dQ per query tile over the same key rectangle; dK, dV per key tile over the rectangle of
queries whose windows can hold one of its keys (start(u) <= g < start(u) + k bounds u to an interval).
The dQ programs also give the prefix keys' dK, dV (float32 atomics: few rows) and the bias gradient:
dB[h, dr, dc] = sum of dS over the pairs at offset (dr, dc); within one (query tile, key block) pair the
offset is the block's offset plus (a - i, b - j), so the (M, N) dS block folds into a (TH + KH - 1,
TW + KW - 1) table with two one-hot matrix products, added with atomics to a per-program table (no
contention), summed after. Prefix queries attend densely: SDPA, outside these kernels.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..core.alignment import row_alignment
from ..core.heads_last import heads_last_empty
from ..core.triton_op import triton_op
from ..core.triton_common import (LOG2E, cdiv, delta_kernel, dkdv_step, dot_acc, dq_step, launch,
                                  load_block, load_row_stats, pad_dim, row_ptrs, rows_contiguous,
                                  softmax_finish, softmax_step, strides)
from ..softmax import fill_prefix_queries
from ..softmax.prefix_triton import add_prefix_queries_gradients_triton

PREFIX_BLOCK = 16       # prefix keys per block (the smallest tl.dot side)


# --- coordinates -----------------------------------------------------------------------------------

@triton.jit
def _group_tile(tile, height, width, dilation, TH: tl.constexpr, TW: tl.constexpr):
    """Program index -> (group row, group column, tile origin (u_r, u_c) in group coordinates, the group's
    lengths). Tiles are counted over the longest group; in a shorter group the last tile may hold no token."""
    tiles_c = tl.cdiv(tl.cdiv(width, dilation), TW)
    tiles_r = tl.cdiv(tl.cdiv(height, dilation), TH)
    tc = tile % tiles_c
    tr = (tile // tiles_c) % tiles_r
    group = tile // (tiles_c * tiles_r)
    g_r = group // dilation
    g_c = group % dilation
    len_r = (height - g_r + dilation - 1) // dilation
    len_c = (width - g_c + dilation - 1) // dilation
    return g_r, g_c, tr * TH, tc * TW, len_r, len_c


@triton.jit
def _window_start(u, length, KS):
    """Where the window of group position u starts, shifted inward at the group's borders."""
    return tl.minimum(tl.maximum(u - KS // 2, 0), length - KS)


@triton.jit
def _tile_tokens(tile, height, width, dilation, TH: tl.constexpr, TW: tl.constexpr):
    """The TH x TW tile of program ``tile`` (``_group_tile``) and, per slot: whether it holds a token
    (ok), its group coordinates (u_r, u_c) and raster index. Slots past the group's end repeat its
    last token: they compute on a copy and are never stored."""
    g_r, g_c, r0, c0, len_r, len_c = _group_tile(tile, height, width, dilation, TH, TW)
    offs = tl.arange(0, TH * TW)
    ok = (r0 + offs // TW < len_r) & (c0 + offs % TW < len_c)
    u_r = tl.minimum(r0 + offs // TW, len_r - 1)
    u_c = tl.minimum(c0 + offs % TW, len_c - 1)
    return g_r, g_c, r0, c0, len_r, len_c, ok, u_r, u_c, _token(g_r, g_c, u_r, u_c, width, dilation)


@triton.jit
def _key_rectangle(r0, c0, len_r, len_c, KS, TH: tl.constexpr, TW: tl.constexpr):
    """[r_lo, r_hi) x [c_lo, c_hi): the keys (group coordinates) that the windows of a query tile cover;
    window starts grow with the position, so the first and last query of each axis bound it."""
    r_lo = _window_start(r0, len_r, KS)
    r_hi = _window_start(tl.minimum(r0 + TH, len_r) - 1, len_r, KS) + KS
    c_lo = _window_start(c0, len_c, KS)
    c_hi = _window_start(tl.minimum(c0 + TW, len_c) - 1, len_c, KS) + KS
    return r_lo, r_hi, c_lo, c_hi


@triton.jit
def _first_viewer(g, KS):
    """The first group position whose window holds position g (windows start at most k//2 before u)."""
    return tl.where(g < KS, 0, g - KS // 2)


@triton.jit
def _last_viewer(g, length, KS):
    """The last group position whose window holds position g."""
    return tl.where(g >= length - KS, length - 1, g + KS // 2)


@triton.jit
def _token(g_r, g_c, u_r, u_c, width, dilation):
    """Raster index on the grid of group coordinates (u_r, u_c) in group (g_r, g_c)."""
    return (g_r + dilation * u_r) * width + g_c + dilation * u_c


@triton.jit
def _window_scores(s, Rpb, q_r, q_c, start_r, start_c, k_r, k_c, qk_bias_scale, KS,
                   HAS_RPB: tl.constexpr):
    """Scores with NAT's bias added and -inf outside each query's window. Query-side coordinates and
    key-side coordinates come as broadcastable (rows x 1 and 1 x cols, or transposed)."""
    d_r = k_r - start_r
    d_c = k_c - start_c
    inside = (d_r >= 0) & (d_r < KS) & (d_c >= 0) & (d_c < KS)
    if HAS_RPB:
        index = (k_r - q_r + KS - 1) * (2 * KS - 1) + (k_c - q_c + KS - 1)
        s += tl.load(Rpb + index, mask=inside, other=0.0).to(tl.float32) * qk_bias_scale
    return tl.where(inside, s, float("-inf"))


@triton.jit
def _prefix_block(q, K, V, p0, P, cols, skn, svn, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  PB: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr):
    """Prefix keys p0..p0+PB of a query tile: their k, v and the scores (log2 domain, -inf past P)."""
    keys = p0 + tl.arange(0, PB)
    kp = load_block(row_ptrs(K, keys, skn, ALIGN)[:, None] + cols[None, :], keys, P, cols, HEAD_DIM, BLOCK_D, True)
    vp = load_block(row_ptrs(V, keys, svn, ALIGN)[:, None] + cols[None, :], keys, P, cols, HEAD_DIM, BLOCK_D, True)
    s = tl.where(keys[None, :] < P, dot_acc(q, tl.trans(kp), None, DOT_PRECISION) * qk_scale, float("-inf"))
    return keys, kp, vp, s


@triton.jit
def _grid_block(q, K, V, Rpb, kr0, kc0, r_hi, c_hi, g_r, g_c, u_r, u_c, start_r, start_c, width, dilation, P,
                cols, skn, svn, qk_scale, KS, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, KH: tl.constexpr,
                KW: tl.constexpr, HAS_RPB: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr):
    """The KH x KW key block at (kr0, kc0) of a query tile's key rectangle: its k, v and the scores of
    the tile's queries, masked to their windows, with the relative position bias (log2 domain). Keys
    past the rectangle are read at its last row/column (in bounds) and masked by the window test."""
    offs_n = tl.arange(0, KH * KW)
    k_r = kr0 + offs_n // KW
    k_c = kc0 + offs_n % KW
    k_tok = P + _token(g_r, g_c, tl.minimum(k_r, r_hi - 1), tl.minimum(k_c, c_hi - 1), width, dilation)
    k = load_block(row_ptrs(K, k_tok, skn, ALIGN)[:, None] + cols[None, :], offs_n, KH * KW, cols, HEAD_DIM,
                   BLOCK_D, False)
    v = load_block(row_ptrs(V, k_tok, svn, ALIGN)[:, None] + cols[None, :], offs_n, KH * KW, cols, HEAD_DIM,
                   BLOCK_D, False)
    s = dot_acc(q, tl.trans(k), None, DOT_PRECISION) * qk_scale
    s = _window_scores(s, Rpb, u_r[:, None], u_c[:, None], start_r[:, None], start_c[:, None],
                       k_r[None, :], k_c[None, :], LOG2E, KS, HAS_RPB)
    return k, v, s


# --- forward ---------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["NH", "height", "width", "dilation", "P", "KS"])
def _fwd_kernel(Q, K, V, O, LSE, Rpb,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                NH, height, width, dilation, P, qk_scale,
                KS, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TH: tl.constexpr,
                TW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, PB: tl.constexpr, HAS_RPB: tl.constexpr,
                DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr):
    BLOCK_M: tl.constexpr = TH * TW
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // NH, bh % NH
    g_r, g_c, r0, c0, len_r, len_c, q_ok, u_r, u_c, q_tok = _tile_tokens(tl.program_id(0), height, width, dilation,
                                                                         TH, TW)
    offs_m = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q = load_block(row_ptrs(Q + b * sqb + h * sqh, P + q_tok, sqn, ALIGN)[:, None] + cols[None, :], offs_m,
                   BLOCK_M, cols, HEAD_DIM, BLOCK_D, False)
    K += b * skb + h * skh
    V += b * svb + h * svh
    Rpb += h * (2 * KS - 1) * (2 * KS - 1)
    start_r = _window_start(u_r, len_r, KS)
    start_c = _window_start(u_c, len_c, KS)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for p0 in range(0, P, PB):
        keys, kp, vp, s = _prefix_block(q, K, V, p0, P, cols, skn, svn, qk_scale, HEAD_DIM, BLOCK_D, PB,
                                        DOT_PRECISION, ALIGN)
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, s, vp, DOT_PRECISION)
    r_lo, r_hi, c_lo, c_hi = _key_rectangle(r0, c0, len_r, len_c, KS, TH, TW)
    blocks_c = tl.cdiv(c_hi - c_lo, KW)
    for blk in range(tl.cdiv(r_hi - r_lo, KH) * blocks_c):
        k, v, s = _grid_block(q, K, V, Rpb, r_lo + (blk // blocks_c) * KH, c_lo + (blk % blocks_c) * KW, r_hi, c_hi,
                              g_r, g_c, u_r, u_c, start_r, start_c, width, dilation, P, cols, skn, svn, qk_scale,
                              KS, HEAD_DIM, BLOCK_D, KH, KW, HAS_RPB, DOT_PRECISION, ALIGN)
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION)
    out, lse = softmax_finish(acc, m_i, l_i)
    tl.store(row_ptrs(O + b * sob + h * soh, q_tok, son, ALIGN)[:, None] + cols[None, :],
             out.to(O.dtype.element_ty), mask=q_ok[:, None] & (cols[None, :] < HEAD_DIM))
    tl.store(LSE + bh * height * width + q_tok, lse, mask=q_ok)


# --- backward --------------------------------------------------------------------------------------

@triton.jit
def _add_bias_grad(DRpb, ds, off_r, off_c, KS, TH: tl.constexpr, TW: tl.constexpr,
                   KH: tl.constexpr, KW: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Add the sums of the (TH*TW, KH*KW) dS block per relative offset to the (2k-1, 2k-1) table DRpb.

    Query (i, j) of the tile and key (a, b) of the block are (off_r + a - i, off_c + b - j) apart; the
    block folds into Z[a - i + TH - 1, b - j + TW - 1] = E_r^T (dS permuted to (i a, j b)) E_c with
    one-hot E_c[(j, b), b - j + TW - 1] and E_r[(i, a), a - i + TH - 1]."""
    x = tl.reshape(tl.permute(tl.reshape(ds, (TH, TW, KH, KW)), (0, 2, 1, 3)), (TH * KH, TW * KW))
    jb = tl.arange(0, TW * KW)
    e_c = ((jb % KW - jb // KW + TW - 1)[:, None] == tl.arange(0, DB)[None, :]).to(tl.float32)
    ia = tl.arange(0, TH * KH)
    e_r = ((ia % KH - ia // KH + TH - 1)[None, :] == tl.arange(0, DA)[:, None]).to(tl.float32)
    z = dot_acc(e_r, dot_acc(x, e_c, None, DOT_PRECISION), None, DOT_PRECISION)
    bin_r = off_r + tl.arange(0, DA) - (TH - 1) + KS - 1
    bin_c = off_c + tl.arange(0, DB) - (TW - 1) + KS - 1
    ok = ((bin_r >= 0) & (bin_r < 2 * KS - 1))[:, None] & ((bin_c >= 0) & (bin_c < 2 * KS - 1))[None, :]
    tl.atomic_add(DRpb + bin_r[:, None] * (2 * KS - 1) + bin_c[None, :], z, mask=ok, sem="relaxed")


@triton.jit(do_not_specialize=["NH", "height", "width", "dilation", "P", "KS"])
def _bwd_q_kernel(Q, K, V, DO, DQ, LSE, Delta, Rpb, DRpb, DKP, DVP,
                  sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
                  NH, height, width, dilation, P, qk_scale, sm_scale,
                  KS, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TH: tl.constexpr,
                  TW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, PB: tl.constexpr, DA: tl.constexpr,
                  DB: tl.constexpr, HAS_RPB: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr):
    """dQ of one query tile; with it the prefix keys' dK, dV (float32 atomics into DKP, DVP of shape
    (B * H * P, BLOCK_D)) and the bias gradient (atomics into this program's table of DRpb)."""
    BLOCK_M: tl.constexpr = TH * TW
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // NH, bh % NH
    g_r, g_c, r0, c0, len_r, len_c, q_ok, u_r, u_c, q_tok = _tile_tokens(tl.program_id(0), height, width, dilation,
                                                                         TH, TW)
    offs_m = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q = load_block(row_ptrs(Q + b * sqb + h * sqh, P + q_tok, sqn, ALIGN)[:, None] + cols[None, :], offs_m,
                   BLOCK_M, cols, HEAD_DIM, BLOCK_D, False)
    do = load_block(row_ptrs(DO + b * sdb + h * sdh, q_tok, sdn, ALIGN)[:, None] + cols[None, :], offs_m,
                    BLOCK_M, cols, HEAD_DIM, BLOCK_D, False)
    # a copied query (not q_ok) gets lse = +inf: probability 0, so it adds to no gradient
    lse, delta = load_row_stats(LSE + bh * height * width, Delta + bh * height * width, q_tok, q_ok)
    K += b * skb + h * skh
    V += b * svb + h * svh
    Rpb += h * (2 * KS - 1) * (2 * KS - 1)
    DRpb += (bh * tl.num_programs(0) + tl.program_id(0)) * (2 * KS - 1) * (2 * KS - 1)
    start_r = _window_start(u_r, len_r, KS)
    start_c = _window_start(u_c, len_c, KS)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for p0 in range(0, P, PB):
        keys, kp, vp, s = _prefix_block(q, K, V, p0, P, cols, skn, svn, qk_scale, HEAD_DIM, BLOCK_D, PB,
                                        DOT_PRECISION, ALIGN)
        dq, _ = dq_step(dq, s, lse, delta, do, kp, vp, DOT_PRECISION)
        zero = tl.zeros([PB, BLOCK_D], dtype=tl.float32)
        dkp, dvp, _ = dkdv_step(zero, zero, tl.trans(s), lse, delta, q, do, vp, DOT_PRECISION)
        rows = (bh * P + keys)[:, None] * BLOCK_D + cols[None, :]
        tl.atomic_add(DKP + rows, dkp * sm_scale, mask=keys[:, None] < P, sem="relaxed")
        tl.atomic_add(DVP + rows, dvp, mask=keys[:, None] < P, sem="relaxed")
    r_lo, r_hi, c_lo, c_hi = _key_rectangle(r0, c0, len_r, len_c, KS, TH, TW)
    blocks_c = tl.cdiv(c_hi - c_lo, KW)
    for blk in range(tl.cdiv(r_hi - r_lo, KH) * blocks_c):
        kr0 = r_lo + (blk // blocks_c) * KH
        kc0 = c_lo + (blk % blocks_c) * KW
        k, v, s = _grid_block(q, K, V, Rpb, kr0, kc0, r_hi, c_hi, g_r, g_c, u_r, u_c, start_r, start_c, width,
                              dilation, P, cols, skn, svn, qk_scale, KS, HEAD_DIM, BLOCK_D, KH, KW, HAS_RPB,
                              DOT_PRECISION, ALIGN)
        dq, ds = dq_step(dq, s, lse, delta, do, k, v, DOT_PRECISION)
        if HAS_RPB:
            _add_bias_grad(DRpb, ds, kr0 - r0, kc0 - c0, KS, TH, TW, KH, KW, DA, DB, DOT_PRECISION)
    tl.store(row_ptrs(DQ + b * sgb + h * sgh, (P + q_tok), sgn, ALIGN)[:, None] + cols[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_ok[:, None] & (cols[None, :] < HEAD_DIM))


@triton.jit(do_not_specialize=["NH", "height", "width", "dilation", "P", "KS"])
def _bwd_kv_kernel(Q, K, V, DO, DK, DV, LSE, Delta, Rpb,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, skgb, skgh, skgn, svgb, svgh, svgn,
                   NH, height, width, dilation, P, qk_scale, sm_scale,
                   KS, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TH: tl.constexpr,
                   TW: tl.constexpr, QH: tl.constexpr, QW: tl.constexpr, HAS_RPB: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr):
    """dK, dV of one TH x TW tile of grid keys over the QH x QW query blocks of its viewers' rectangle."""
    BLOCK_N: tl.constexpr = TH * TW
    BLOCK_M: tl.constexpr = QH * QW
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // NH, bh % NH
    g_r, g_c, r0, c0, len_r, len_c, k_ok, k_r, k_c, k_tok = _tile_tokens(tl.program_id(0), height, width, dilation,
                                                                         TH, TW)
    k_tok += P
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    k = load_block(row_ptrs(K + b * skb + h * skh, k_tok, skn, ALIGN)[:, None] + cols[None, :], offs_n, BLOCK_N, cols,
                   HEAD_DIM, BLOCK_D, False)
    v = load_block(row_ptrs(V + b * svb + h * svh, k_tok, svn, ALIGN)[:, None] + cols[None, :], offs_n, BLOCK_N, cols,
                   HEAD_DIM, BLOCK_D, False)
    Q += b * sqb + h * sqh
    DO += b * sdb + h * sdh
    LSE += bh * height * width
    Delta += bh * height * width
    Rpb += h * (2 * KS - 1) * (2 * KS - 1)
    r_lo = _first_viewer(tl.minimum(r0, len_r - 1), KS)
    r_hi = _last_viewer(tl.minimum(r0 + TH, len_r) - 1, len_r, KS) + 1
    c_lo = _first_viewer(tl.minimum(c0, len_c - 1), KS)
    c_hi = _last_viewer(tl.minimum(c0 + TW, len_c) - 1, len_c, KS) + 1
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    blocks_c = tl.cdiv(c_hi - c_lo, QW)
    for blk in range(tl.cdiv(r_hi - r_lo, QH) * blocks_c):
        u_r = r_lo + (blk // blocks_c) * QH + offs_m // QW
        u_c = c_lo + (blk % blocks_c) * QW + offs_m % QW
        in_rect = (u_r < r_hi) & (u_c < c_hi)
        u_r = tl.minimum(u_r, r_hi - 1)
        u_c = tl.minimum(u_c, c_hi - 1)
        q_tok = _token(g_r, g_c, u_r, u_c, width, dilation)
        q = load_block(row_ptrs(Q, P + q_tok, sqn, ALIGN)[:, None] + cols[None, :], offs_m, BLOCK_M, cols, HEAD_DIM,
                       BLOCK_D, False)
        do = load_block(row_ptrs(DO, q_tok, sdn, ALIGN)[:, None] + cols[None, :], offs_m, BLOCK_M, cols, HEAD_DIM,
                        BLOCK_D, False)
        lse, delta = load_row_stats(LSE, Delta, q_tok, in_rect)
        s_t = dot_acc(k, tl.trans(q), None, DOT_PRECISION) * qk_scale
        s_t = _window_scores(s_t, Rpb, u_r[None, :], u_c[None, :], _window_start(u_r, len_r, KS)[None, :],
                             _window_start(u_c, len_c, KS)[None, :], k_r[:, None], k_c[:, None], LOG2E, KS,
                             HAS_RPB)
        dk, dv, _ = dkdv_step(dk, dv, s_t, lse, delta, q, do, v, DOT_PRECISION)
    store_mask = k_ok[:, None] & (cols[None, :] < HEAD_DIM)
    tl.store(row_ptrs(DK + b * skgb + h * skgh, k_tok, skgn, ALIGN)[:, None] + cols[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=store_mask)
    tl.store(row_ptrs(DV + b * svgb + h * svgh, k_tok, svgn, ALIGN)[:, None] + cols[None, :],
             dv.to(DV.dtype.element_ty), mask=store_mask)


# --- launch ----------------------------------------------------------------------------------------

def _num_tiles(height: int, width: int, dilation: int, th: int, tw: int) -> int:
    """Programs per (batch, head): tiles of the longest dilation group, for each of the dilation^2 groups."""
    return dilation * dilation * cdiv(cdiv(height, dilation), th) * cdiv(cdiv(width, dilation), tw)


@functools.lru_cache(maxsize=256)
def default_config(grid: tuple[int, int], kernel_size: int, dilation: int, head_dim: int,
                   dtype: torch.dtype) -> dict[str, dict]:
    """Tile shapes and launch options per kernel: "fwd" and "bwd_q" (query tile TH x TW, key blocks
    KH x KW), "bwd_kv" (key tile TH x TW, query blocks QH x QW).

    From sweeps in bf16, d = 64, 56x56 k7 to 256x256 k21: 8 x 8 query and key tiles with 4 warps beat
    larger tiles, since a small tile wastes least of its key rectangle (8 + k - 1 on a side). The key blocks
    are 8 x 8 or 4 x 16, whichever pads that rectangle less (k21: 28 x 32 instead of 32 x 32 keys).
    dK/dV programs take 8 x 16 query blocks with 16-bit inputs, 8 x 8 and 8 warps from padded head dim 128 on
    (not swept: any other of these choices spills 48-400 bytes of registers per thread on sm_90, ptxas). The
    pipeline is as deep as fits in ~160 KB of shared memory (at most 3 stages forward, 2 backward). Cached: the
    callers copy the per-kernel dicts before changing them."""
    elem = torch.finfo(dtype).bits // 8
    d = pad_dim(head_dim)
    tile = 64 * d       # elements of one block of 64 tokens
    budget = 160 * 1024 // elem
    warps = 8 if elem == 4 else 4
    fwd_stages = max(1, min(3, (budget - tile) // (2 * tile)))
    bwd_stages = max(1, min(2, (budget - 2 * tile) // (2 * tile)))
    side = 8 + kernel_size - 1
    padded = lambda kh, kw: cdiv(side, kh) * kh * cdiv(side, kw) * kw     # noqa: E731
    kh, kw = (4, 16) if padded(4, 16) < padded(8, 8) else (8, 8)
    qw = 16 if elem == 2 and d < 128 else 8
    kv_warps = 8 if d >= 128 else warps
    return {"fwd": dict(TH=8, TW=8, KH=kh, KW=kw, num_warps=warps, num_stages=fwd_stages),
            "bwd_q": dict(TH=8, TW=8, KH=kh, KW=kw, num_warps=warps, num_stages=bwd_stages),
            "bwd_kv": dict(TH=8, TW=8, QH=8, QW=qw, num_warps=kv_warps, num_stages=bwd_stages)}


def _consts(q: Tensor, kernel_size: int) -> dict:
    return dict(KS=kernel_size, HEAD_DIM=q.shape[-1], BLOCK_D=pad_dim(q.shape[-1]),
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def forward(q: Tensor, k: Tensor, v: Tensor, rpb: Optional[Tensor], height: int, width: int, kernel_size: int,
            dilation: int, num_prefix: int, scale: float,
            config: Optional[dict] = None) -> tuple[Tensor, Tensor]:
    """The output (B, H, N, d) in q's dtype: the ``num_prefix`` prefix queries' rows (dense over all keys, by SDPA),
    then the grid queries'; and the grid queries' base-2 log-sum-exp (B, H, height * width) float32."""
    q, k, v = rows_contiguous(q), rows_contiguous(k), rows_contiguous(v)
    b, nh, _, d = q.shape
    n = height * width
    out = heads_last_empty(q, b, nh, n + num_prefix, v.shape[-1])
    o = out[:, :, num_prefix:]
    lse = torch.empty(b, nh, n, device=q.device, dtype=torch.float32)
    cfg = dict((config or default_config((height, width), kernel_size, dilation, d, q.dtype))["fwd"])
    tiles = _num_tiles(height, width, dilation, cfg["TH"], cfg["TW"])
    launch(_fwd_kernel, (tiles, b * nh),
        q, k, v, o, lse, rpb.contiguous() if rpb is not None else lse,
        *strides(q), *strides(k), *strides(v), *strides(o), nh, height, width, dilation, num_prefix,
        scale * LOG2E.value, **_consts(q, kernel_size), **cfg, PB=PREFIX_BLOCK, HAS_RPB=rpb is not None,
        ALIGN=row_alignment(q, k, v, o))
    fill_prefix_queries(out, q, k, v, num_prefix)
    return out, lse


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, rpb: Optional[Tensor],
             height: int, width: int, kernel_size: int, dilation: int, num_prefix: int,
             scale: float, config: Optional[dict] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv (B, H, N, d) and the bias gradient (H, 2k-1, 2k-1) float32 (empty without rpb) of the grid and
    the prefix queries' attention."""
    n, p = height * width, num_prefix
    o_all, do_all = o, do
    o, do = o[:, :, p:], do[:, :, p:]
    do, q, k, v = rows_contiguous(do), rows_contiguous(q), rows_contiguous(k), rows_contiguous(v)
    b, nh, n_all, d = q.shape
    consts = _consts(q, kernel_size)
    block_d = consts["BLOCK_D"]
    configs = config or default_config((height, width), kernel_size, dilation, d, q.dtype)
    delta = torch.empty_like(lse)
    launch(delta_kernel, (cdiv(n, 128), b * nh), o, do, delta, *strides(o), *strides(do), nh, n, HEAD_DIM=d,
           BLOCK_M=128, BLOCK_D=block_d, ALIGN=row_alignment(o, do))
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    qk_scale = scale * LOG2E.value
    common = (*strides(q), *strides(k), *strides(v), *strides(do))
    consts["ALIGN"] = row_alignment(q, k, v, do, dq, dk, dv)
    rpb_arg = rpb.contiguous() if rpb is not None else lse

    cfg = dict(configs["bwd_q"])
    tiles = _num_tiles(height, width, dilation, cfg["TH"], cfg["TW"])
    side = 2 * kernel_size - 1
    drpb_parts = torch.zeros(b * nh * tiles if rpb is not None else 0, side, side, device=q.device,
                             dtype=torch.float32)
    prefix_grads = torch.zeros(2, b * nh * p, block_d, device=q.device, dtype=torch.float32)
    launch(_bwd_q_kernel, (tiles, b * nh),
        q, k, v, do, dq, lse, delta, rpb_arg, drpb_parts if rpb is not None else lse,
        *(prefix_grads if p > 0 else (lse, lse)), *common, *strides(dq), nh, height, width, dilation, p, qk_scale,
        scale, **consts, **cfg,
        PB=PREFIX_BLOCK, DA=pad_dim(cfg["TH"] + cfg["KH"] - 1),
        DB=pad_dim(cfg["TW"] + cfg["KW"] - 1), HAS_RPB=rpb is not None)

    cfg = dict(configs["bwd_kv"])
    tiles = _num_tiles(height, width, dilation, cfg["TH"], cfg["TW"])
    launch(_bwd_kv_kernel, (tiles, b * nh),
        q, k, v, do, dk, dv, lse, delta, rpb_arg, *common, *strides(dk), *strides(dv), nh, height, width,
        dilation, p, qk_scale, scale, **consts, **cfg, HAS_RPB=rpb is not None)
    if p > 0:
        grads = prefix_grads[..., :d].reshape(2, b, nh, p, d)
        dk[:, :, :p] = grads[0]
        dv[:, :, :p] = grads[1]
    add_prefix_queries_gradients_triton(dq, dk, dv, do_all, q, k, v, o_all, p)
    drpb = drpb_parts.reshape(b, nh, -1, side, side).sum((0, 2)) if rpb is not None else drpb_parts
    return dq, dk, dv, drpb


# --- the op: custom ops for torch.compile, an autograd.Function in eager mode ------------------------

def _forward_fake(q, k, v, rpb, height, width, kernel_size, dilation, num_prefix, scale):
    b, nh = q.shape[:2]
    return (heads_last_empty(q, b, nh, height * width + num_prefix, v.shape[-1]),
            q.new_empty(b, nh, height * width, dtype=torch.float32))


def _backward_fake(do, q, k, v, o, lse, rpb, height, width, kernel_size, dilation, num_prefix, scale):
    side = 2 * kernel_size - 1
    drpb = q.new_empty((q.shape[1], side, side) if rpb is not None else (0, side, side), dtype=torch.float32)
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))   # as backward's
    return dq, dk, dv, drpb


def _gradients(run_backward, do, saved, args, needs):
    q, k, v, rpb, o, lse = saved
    dq, dk, dv, drpb = run_backward(do, q, k, v, o, lse, rpb, *args)
    return dq, dk, dv, drpb.to(rpb.dtype) if rpb is not None else None


_neighborhood_attention = triton_op(
    "neighborhood_attention", forward, backward, num_tensors=4, forward_fake=_forward_fake,
    backward_fake=_backward_fake, save=lambda inputs, outputs: (*inputs[:4], *outputs), gradients=_gradients)


def neighborhood_attention_triton(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int], kernel_size: int,
                                  dilation: int, rpb: Optional[Tensor], num_prefix: int) -> Tensor:
    """The Triton backend of ``neighborhood_attention`` (arguments as the reference's): the grid queries
    through the kernels above, the prefix queries (dense over all keys) by SDPA into the first rows of the same
    output, their gradients in the op's backward (``add_prefix_queries_gradients_triton``): one output tensor, which the
    op keeps for its backward and the next layer reads, no concatenated copy."""
    return _neighborhood_attention(q, k, v, rpb, grid[0], grid[1], kernel_size, dilation, num_prefix,
                                   q.shape[-1] ** -0.5)
