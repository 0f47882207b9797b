"""Non-causal linear attention in Triton: FLatten's focused map and MALA's magnitude-aware form.

Two passes over the tokens, the feature maps computed in registers and never stored:
  (0) FLatten only: the focused map's per-token norms over the whole token (all heads' channels, as the
      official code applies the map before splitting heads), one small (B, N) record per token of q and of k:
      [1/m, ||r||, ||r/m||, ||(r/m)^p||], m = max(r) (one pre-pass whose programs load every head of a tile
      of tokens as one 3D tile);
  (a) state:  S = sum_j phi(k_j)^T v_j  (d x dv),  z = sum_j phi(k_j),  sum_j v_j,
      with N split across programs (fp32 partial sums packed in one buffer, then one reduction);
  (b) output, per token:
      FLatten (Han et al., ICCV 2023, Eq. 3):  O_i = phi(q_i) S / M / (phi(q_i) z / M + eps);
      MALA (Fan et al., ICCV 2025, Eq. 9-11): with s_i = phi(q_i) z / (M sqrt(d)),
          Y_i = (1 + 1 / (s_i + eps)) rot(phi(q_i)) S / (M sqrt(d)) - s_i sum_j v_j / M,
      rot = MALA's optional 2D RoPE, applied to phi(q), phi(k) inside the KV product only.
      Programs own one head and a chunk of tokens, so each loads its head's state once.
The backward recomputes the feature maps. With G = dL/dO, FLatten: dnum_i = G_i / den_i,
dden_i = -G_i.O_i / den_i, dphi(q_i) = S dnum_i / M + dden_i z / M, dS = sum_i phi(q_i)^T dnum_i,
dz = sum_i dden_i phi(q_i), then dphi(k_j) = (dS v_j + dz) / M and dv_j = phi(k_j) dS / M.
MALA: da_i = G_i beta_i, ds_i = -G_i.a_i / (s_i + eps)^2 - G_i.vbar, and the same two reductions
(plus dvbar = -sum_i s_i G_i). The focused map phi = ||r|| w with w = r^p / ||r^p|| and
r = (ReLU(x) + eps) / softplus(s) has dL/dr = (g.w) r / ||r|| + p ||r|| r^(p-1) (g - (g.w) w) / ||r^p||,
evaluated on r / max(r) (the expression is scale-free), and dL/ds = -sum dL/dr r / softplus(s) * sigmoid(s)
(the kernels take s itself and compute softplus(s) where they load it).
The norms and g.w span the whole token, so g.w = sum_h phi_h . g_h / ||r|| is a cross-head reduction,
computed before the per-head backward passes. For a query it collapses (phi . dphi = G.O eps / den per
head): g.w = eps sum_h G_ih.O_ih / den_ih / ||r_i||, which needs the saved O and den. The query's factor
||r_i|| / ||r_i^p|| cancels in O_i only up to the official eps, so it is kept, not dropped: a head whose
channels are small next to its token's other heads has phi(q_i) z / M near eps. For a key,
g.w = sum_h phi_h(k_j) . (dS_h v_j + dz_h) / M / ||r_j||, computed by FLatten's key-side kernel itself:
its programs own a tile of keys across all heads, take g.w in a first pass over the heads, then dk, dv and
dc per head, re-reading the tiles from cache.

Precision: with 16-bit inputs the products run on 16-bit tensor-core operands. The state's product uses a
hi + lo split of phi(k) (about 2^-16 relative); the output's phi(q) S rounds both operands once
(OUTPUT_TERMS = 1: about 2^-9, the size of the output's own bf16 rounding; 3 products would carry it to
2^-16 at a measurable cost in the output kernel); gradient products split their fp32 operands too. fp32
inputs keep exact fp32 products. The 16-bit operands of fp32 intermediates are bf16 for fp16 inputs as well
(operand_dtype): small inputs put the features near FOCUSED_EPS and 1 / den near 1 / LINEAR_EPS = 1e6, out of
fp16's range (6e-5 to 65504) but not of bf16's. fp16 tiles that meet such operands (v) are split into bf16
hi + lo exactly, one product more; the fp16 output takes OUTPUT_TERMS_FP16 = 3 products (2^-16), so that
single bf16 roundings do not cost fp16 outputs their precision.
"""
import functools
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..core.alignment import row_alignment
from ..core.rope import rope_2d_angles
from ..core.triton_common import (cdiv, dot_split, dot_split_a, dot_split_b, dot_terms, head_strides, launch,
                                  load_tile, num_programs_target, operand_dtype, pad_dim, precision_flags,
                                  split_operand, split_tokens, store_tile)
from ..core.heads_last import heads_last_empty
from ..core.triton_op import triton_op
from .reference import FOCUSED_EPS, LINEAR_EPS

FOCUSED = 0      # FLatten: phi = focused map, O = phi(q) S / (phi(q) z)
MALA = 1         # MALA: phi = ELU + 1, Y = beta phi(q) S - gamma sum v

# Tile sizes and launch options per kernel: the fastest of the sweeps of ``python -m subquad.tasks.bench.linear
# --sweep`` (bf16, 4 heads of 64, the three standard sizes, per-kernel device times), which overrides them.
CONFIG = {   # per_sm: programs per SM that the N-split of a (batch, head) kernel aims at
    "state": dict(BLOCK_N=32, num_warps=4, num_stages=3, per_sm=4),
    "output": dict(BLOCK_N=64, num_warps=4, num_stages=2, per_sm=8, max_tiles=8),          # MALA
    "bwd_q": dict(BLOCK_N=32, num_warps=4, num_stages=2, per_sm=4, wide_block_n=16),
    "bwd_k": dict(BLOCK_N=32, num_warps=8, num_stages=3, per_sm=2),                         # MALA
    "focused_output": dict(BLOCK_N=64, num_warps=4, num_stages=2, per_sm=8, max_tiles=8),    # FLatten
    # FLatten's kernels over all heads of a tile of tokens (grid: batch x token tiles)
    "norms": dict(BLOCK_N=64, num_warps=4, num_stages=2),
    "gw_query": dict(BLOCK_N=32, num_warps=4, num_stages=2),
    "focused_bwd_k": dict(BLOCK_N=32, num_warps=4, num_stages=3, wide_num_stages=2),
}
# 16-bit products per output phi(q) @ S (dot_terms): 1 rounds phi(q) and S once each (about 2^-9, the output's
# own bf16 rounding; bf16 MALA/FLatten outputs then lie ~3e-3 from float64); 3 carries S to about 2^-16
# (~5e-6) at about a third more time in the output kernel.
OUTPUT_TERMS = 1
OUTPUT_TERMS_FP16 = 3   # fp16 outputs (bf16 operands): 1 product would be 2^-9, four times fp16's own rounding
NORMS_TILE = 8192      # elements of one (tokens, heads, channels) tile of the norms kernel
# A padded head_dim over 64 (DiT's 72 -> 128): tiles of at most 32 tokens (a kernel's wide_block_n where it
# has one) and at least 8 warps: wider tiles spill registers there (FLatten's query backward is fastest at 16
# tokens, its output kernel at 32). A kernel's wide_num_stages caps its pipeline there: FLatten's key backward
# with 3 stages asks for 241 KiB of shared memory on 16-byte aligned rows, over sm_90's 227 KiB.
WIDE = dict(max_block_n=32, min_warps=8)


# --- feature maps and RoPE ------------------------------------------------------------------

@triton.jit
def _power(x, p, P_INT: tl.constexpr):
    """x ** p for x > 0: repeated products when p is a small integer, exp2(p log2 x) otherwise."""
    if P_INT > 0:
        y = x
        for _ in tl.static_range(P_INT - 1):
            y = y * x
    else:
        y = tl.exp2(p * tl.log2(x))
    return y


@triton.jit
def _power_m1(x, p, P_INT: tl.constexpr):
    """x ** (p - 1) for x > 0 (the focused map's derivative), without dividing x ** p by x."""
    if P_INT == 1:
        y = tl.full(x.shape, 1.0, tl.float32)
    elif P_INT > 1:
        y = x
        for _ in tl.static_range(P_INT - 2):
            y = y * x
    else:
        y = tl.exp2((p - 1.0) * tl.log2(x))
    return y


@triton.jit
def _relu(x):
    """max(x, 0) that keeps NaN (tl.maximum's default returns the other operand, so a NaN input would give a
    finite feature where the reference's ReLU gives NaN)."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _focused_parts(x, inv_c, mc, p, eps, inv_m, P_INT: tl.constexpr):
    """r = (ReLU(x) + eps) / c, rn = r / m and rp = rn^p for this head's channels (m = the token's max(r));
    inv_c = 1 / c."""
    r = tl.where(mc[None, :], (_relu(x) + eps) * inv_c[None, :], 0.0)
    rn = tl.where(mc[None, :], r * inv_m[:, None], 1.0)       # 1 on padding keeps the power finite
    rp = tl.where(mc[None, :], _power(rn, p, P_INT), 0.0)
    rn = tl.where(mc[None, :], rn, 0.0)
    return r, rn, rp


@triton.jit
def _load_heads(base, heads, offs_n, offs_c, s_h, s_n, mask, ALIGN: tl.constexpr):
    """A (heads, tokens, channels) block of a (B, h, N, d) tensor's batch at ``base``, 0 outside ``mask``; rows
    ALIGN bytes aligned (``row_ptrs``)."""
    rows = tl.multiple_of(base + heads[:, None] * s_h + offs_n[None, :] * s_n, [ALIGN, ALIGN])
    return tl.load(rows[:, :, None] + offs_c[None, None, :], mask=mask, other=0.0)


@triton.jit
def _relu_scaled(x, inv_c, eps_c, m_hc, EVEN: tl.constexpr):
    """r = (ReLU(x) + eps) / c of a (heads, tokens, channels) block, given 1/c and eps/c per (head, channel);
    0 on padding heads and channels (EVEN: there are none)."""
    r = _relu(x) * inv_c[:, None, :] + eps_c[:, None, :]
    if not EVEN:
        r = tl.where(m_hc[:, None, :], r, 0.0)
    return r


@triton.jit
def _power_sums(r, inv_m, p, P_INT: tl.constexpr):
    """rp = (r / m)^p of a (heads, tokens, channels) block and the per-token sums of (r / m)^2 and rp^2."""
    rn = r * inv_m[None, :, None]
    rp = _power(rn, p, P_INT)                      # 0 where r = 0 (padding), for any p > 0
    return rp, tl.sum(tl.sum(rn * rn, axis=2), axis=0), tl.sum(tl.sum(rp * rp, axis=2), axis=0)


@triton.jit
def _softplus(s):
    """softplus(s) = max(s, 0) + log(1 + e^-|s|) in float32, log1p by its series where e^-|s| is small (where
    1 + e^-|s| would round it away)."""
    e = tl.exp(-tl.abs(s))
    return tl.maximum(s, 0.0) + tl.where(e < 1e-2, e * (1.0 - e * (0.5 - e / 3.0)), tl.log(1.0 + e))


@triton.jit
def _scale_rows(scale_ptr, heads, offs_c, H, eps, D: tl.constexpr):
    """(1/c, eps/c, mask) per (head, channel) of the focused map's scale c = softplus(s), 0 on padding."""
    m_hc = (heads < H)[:, None] & (offs_c < D)[None, :]
    inv_c = 1.0 / _softplus(tl.load(scale_ptr + heads[:, None] * D + offs_c[None, :], mask=m_hc, other=0.0))
    return inv_c, tl.where(m_hc, eps * inv_c, 0.0), m_hc


@triton.jit
def _online_norms(x_base, s_h, s_n, scale_ptr, H, offs_n, mn, p, eps, D: tl.constexpr, DP: tl.constexpr,
                  HB: tl.constexpr, EVEN: tl.constexpr, P_INT: tl.constexpr, ALIGN: tl.constexpr):
    """The whole-token [1/m, ||r||, ||r/m||, ||(r/m)^p||] (m = max(r) over all H heads' channels) of a
    tile of tokens, loading HB heads at a time as one (HB, tokens, DP) block; across head blocks the running
    sums are rescaled whenever m grows, as an online softmax rescales its sum. EVEN: D = DP and HB divides H,
    so no channel or head is padding (padding tokens are never stored). About nine operations per element:
    the kernel is bound by them as much as by its loads."""
    offs_c = tl.arange(0, DP)
    offs_h = tl.arange(0, HB)
    m = tl.zeros(offs_n.shape, tl.float32)
    sum_rn = tl.zeros(offs_n.shape, tl.float32)
    sum_rp = tl.zeros(offs_n.shape, tl.float32)
    for h0 in range(0, H, HB):
        heads = h0 + offs_h
        inv_c, eps_c, m_hc = _scale_rows(scale_ptr, heads, offs_c, H, eps, D)
        x = _load_heads(x_base, heads, offs_n, offs_c, s_h, s_n, m_hc[:, None, :] & mn[None, :, None], ALIGN)
        r = _relu_scaled(x.to(tl.float32), inv_c, eps_c, m_hc, EVEN)
        m_new = tl.maximum(tl.maximum(m, tl.max(tl.max(r, axis=2), axis=0)), 1e-30)   # > 0 on padding tokens too
        alpha = tl.where(m > 0, m / m_new, 1.0)        # m = 0 before the first head, when the sums are 0 too
        alpha_p = _power(alpha, p, P_INT)
        _, block_rn, block_rp = _power_sums(r, 1.0 / m_new, p, P_INT)
        sum_rn = sum_rn * (alpha * alpha) + block_rn
        sum_rp = sum_rp * (alpha_p * alpha_p) + block_rp
        m = m_new
    norm_rn = tl.sqrt(sum_rn)
    return 1.0 / m, m * norm_rn, norm_rn, tl.sqrt(sum_rp)


@triton.jit
def _store_norms(rec_ptr, b, N, offs_n, mn, inv_m, norm_r, norm_rn, norm_rp):
    at = rec_ptr + (b * N + offs_n) * 4
    tl.store(at, inv_m, mask=mn)
    tl.store(at + 1, norm_r, mask=mn)
    tl.store(at + 2, norm_rn, mask=mn)
    tl.store(at + 3, norm_rp, mask=mn)


@triton.jit
def _token_norms(norms_ptr, b, N, offs_n, mn, FEATURE: tl.constexpr):
    """The whole-token record [1/m, ||r||, ||rn||, ||rp||] of each token (ones for MALA, unused there)."""
    if FEATURE == 0:
        at = norms_ptr + (b * N + offs_n) * 4
        inv_m = tl.load(at, mask=mn, other=1.0)
        norm_r = tl.load(at + 1, mask=mn, other=1.0)
        norm_rn = tl.load(at + 2, mask=mn, other=1.0)
        norm_rp = tl.load(at + 3, mask=mn, other=1.0)
    else:
        inv_m = tl.full(offs_n.shape, 1.0, tl.float32)
        norm_r, norm_rn, norm_rp = inv_m, inv_m, inv_m
    return inv_m, norm_r, norm_rn, norm_rp


@triton.jit
def _feature(x, inv_c, mc, p, eps, inv_m, norm_r, norm_rp, FEATURE: tl.constexpr, P_INT: tl.constexpr):
    if FEATURE == 0:
        r, rn, rp = _focused_parts(x, inv_c, mc, p, eps, inv_m, P_INT)
        phi = rp * (norm_r / norm_rp)[:, None]
    else:
        phi = tl.where(mc[None, :], tl.where(x > 0, x + 1.0, tl.exp(x)), 0.0)
    return phi


@triton.jit
def _focused_backward(g, gw, x, inv_c, mc, p, eps, inv_m, norm_rn, norm_rp, P_INT: tl.constexpr):
    """(dL/dx, -dL/dr * r / c) for dL/dphi = g on this head and the token's whole g.w = gw; the second
    summed over rows gives dL/dc."""
    r, rn, rp = _focused_parts(x, inv_c, mc, p, eps, inv_m, P_INT)
    inv_rp = 1.0 / norm_rp
    w = rp * inv_rp[:, None]
    rn_pm1 = tl.where(mc[None, :], _power_m1(tl.where(mc[None, :], rn, 1.0), p, P_INT), 0.0)
    dr = (gw / norm_rn)[:, None] * rn + (norm_rn * p * inv_rp)[:, None] * rn_pm1 * (g - gw[:, None] * w)
    dx = tl.where(x <= 0, 0.0, dr * inv_c[None, :])         # NaN x passes dr on, as torch's ReLU backward does
    return dx, -dr * r * inv_c[None, :]


@triton.jit
def _load_scale(scale_ptr, h, offs_c, mc, D: tl.constexpr, DP: tl.constexpr, FEATURE: tl.constexpr):
    """1 / softplus(s) of this head for the focused map; ones for MALA (unused there)."""
    if FEATURE == 0:
        c = 1.0 / _softplus(tl.load(scale_ptr + h * D + offs_c, mask=mc, other=0.0))
    else:
        c = tl.full((DP,), 1.0, tl.float32)
    return c


@triton.jit
def _load_reduced(base, offs_c, offs_v, inv_n, scale_d, DT: tl.constexpr, FEATURE: tl.constexpr, DP: tl.constexpr,
                  DVP: tl.constexpr, LOWP: tl.constexpr):
    """A reduced [M (d x dv) | a (d) | b (dv)] record at ``base`` as means over the N keys: M (times
    1/sqrt(d) for MALA) split for dot_split, a and b."""
    m = tl.load(base + offs_c[:, None] * DVP + offs_v[None, :])
    if FEATURE == 0:
        m = m * inv_n
    else:
        m = m * (scale_d * inv_n)
    m_hi, m_lo = split_operand(m, DT, LOWP)
    a = tl.load(base + DP * DVP + offs_c) * inv_n
    b = tl.load(base + DP * DVP + DP + offs_v) * inv_n
    return m_hi, m_lo, a, b


@triton.jit
def _load_state(state_ptr, bh, offs_c, offs_v, inv_n, scale_d, DT: tl.constexpr, FEATURE: tl.constexpr,
                DP: tl.constexpr, DVP: tl.constexpr, LOWP: tl.constexpr):
    """This (batch, head)'s reduced [S | ksum | vsum]: (S hi, S lo, kbar, vbar)."""
    return _load_reduced(state_ptr + bh * (DP * DVP + DP + DVP), offs_c, offs_v, inv_n, scale_d, DT, FEATURE, DP,
                         DVP, LOWP)


@triton.jit
def _rope_cos_sin(trig_ptr, offs_n, mask_n, num_prefix, grid_h, grid_w, DPH: tl.constexpr):
    """cos, sin (tokens, channel pairs) of 2D RoPE. trig_ptr holds four (rows, DPH) tables: cos and sin
    of the row angles (nonzero on the first d/4 pairs), then of the column angles (the next d/4), so
    a row term plus a column term gives every pair's value. Prefix tokens are not rotated."""
    g = offs_n - num_prefix
    on_grid = mask_n & (g >= 0)
    g = tl.maximum(g, 0)
    offs_i = tl.arange(0, DPH)
    m = on_grid[:, None] & (offs_i < DPH)[None, :]
    at_row = (g // grid_w)[:, None] * DPH + offs_i[None, :]
    at_col = (g % grid_w)[:, None] * DPH + offs_i[None, :]
    col_tables = trig_ptr + 2 * grid_h * DPH
    cos = tl.load(trig_ptr + at_row, mask=m, other=0.0) + tl.load(col_tables + at_col, mask=m, other=0.0)
    sin = (tl.load(trig_ptr + grid_h * DPH + at_row, mask=m, other=0.0)
           + tl.load(col_tables + grid_w * DPH + at_col, mask=m, other=0.0))
    return tl.where(on_grid[:, None], cos, 1.0), sin


@triton.jit
def _rotate(x, cos, sin, BLOCK_N: tl.constexpr, DP: tl.constexpr, INVERSE: tl.constexpr):
    """Rotate channel pairs (2i, 2i+1) of x by the pair's angle (INVERSE: by minus it, the transpose)."""
    xe, xo = tl.split(tl.reshape(x, (BLOCK_N, DP // 2, 2)))
    if INVERSE:
        ye, yo = xe * cos + xo * sin, xo * cos - xe * sin
    else:
        ye, yo = xe * cos - xo * sin, xo * cos + xe * sin
    return tl.reshape(tl.join(ye, yo), (BLOCK_N, DP))


@triton.jit
def _load_grad_state(grads_ptr, bh, inv_n, scale_d, FEATURE: tl.constexpr, DT: tl.constexpr, DP: tl.constexpr,
                     DVP: tl.constexpr, LOWP: tl.constexpr):
    """The reduced [dS | dz | dvbar] of one head, scaled as the forward scaled S: (dS hi, dS lo, dz, dvbar)."""
    return _load_reduced(grads_ptr + bh * (DP * DVP + 2 * DP + DVP), tl.arange(0, DP), tl.arange(0, DVP), inv_n,
                         scale_d, DT, FEATURE, DP, DVP, LOWP)


# --- kernels --------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["N", "H"])
def _token_norms_kernel(q_ptr, k_ptr, scale_ptr, rec_ptr, B, N, H, p, eps, s_qb, s_qh, s_qn, s_kb, s_kh, s_kn,
                        P_INT: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, HB: tl.constexpr,
                        EVEN: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr):
    """FLatten's whole-token norms (Eq. 5-6 over all C = H * D channels) of a tile of tokens of the queries
    (program_id(2) = 0) or the keys (1): the (2, B, N, 4) record [1/m, ||r||, ||r/m||, ||(r/m)^p||] with
    m = max(r)."""
    b = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    which = tl.program_id(2)
    if which == 0:
        x_base, s_xh, s_xn = q_ptr + b * s_qb, s_qh, s_qn
    else:
        x_base, s_xh, s_xn = k_ptr + b * s_kb, s_kh, s_kn
    inv_m, norm_r, norm_rn, norm_rp = _online_norms(x_base, s_xh, s_xn, scale_ptr, H, offs_n, mn, p, eps, D, DP, HB,
                                                    EVEN, P_INT, ALIGN)
    _store_norms(rec_ptr + which * B * N * 4, b, N, offs_n, mn, inv_m, norm_r, norm_rn, norm_rp)


@triton.jit(do_not_specialize=["N", "H"])
def _query_gw_kernel(g_ptr, q_ptr, scale_ptr, norms_ptr, state_ptr, den_ptr, gw_ptr, N, H, p, eps, inv_n, lin_eps,
                     s_gb, s_gh, s_gn, s_qb, s_qh, s_qn, P_INT: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                     DP: tl.constexpr, DVP: tl.constexpr, BLOCK_N: tl.constexpr, LOWP: tl.constexpr,
                     ALIGN: tl.constexpr):
    """g.w of a tile of queries over all heads: phi(q_i) . dL/dphi(q_i) / ||r_i||, which for O = num / den
    (den = phi . z / M + eps) collapses to eps sum_h G_ih . O_ih / den_ih / ||r_i||. O is recomputed from
    phi(q) and the state (the forward's output is not kept for the backward)."""
    b = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    DT = operand_dtype(q_ptr).dtype
    offs_c = tl.arange(0, DP)
    offs_v = tl.arange(0, DVP)
    mc, mv = offs_c < D, offs_v < DV
    inv_m, norm_r, norm_rn, norm_rp = _token_norms(norms_ptr, b, N, offs_n, mn, 0)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for h in range(H):
        c = _load_scale(scale_ptr, h, offs_c, mc, D, DP, 0)
        state_hi, state_lo, kbar, vbar = _load_state(state_ptr, b * H + h, offs_c, offs_v, inv_n, 1.0, DT, 0,
                                                     DP, DVP, LOWP)
        x = load_tile(q_ptr + b * s_qb + h * s_qh, offs_n, offs_c, s_qn, mn, mc, ALIGN).to(tl.float32)
        phi = _feature(x, c, mc, p, eps, inv_m, norm_r, norm_rp, 0, P_INT)
        g = load_tile(g_ptr + b * s_gb + h * s_gh, offs_n, offs_v, s_gn, mn, mv, ALIGN).to(tl.float32)
        den = tl.load(den_ptr + (b * H + h) * N + offs_n, mask=mn, other=1.0)
        acc += tl.sum(g * dot_split(phi, state_hi, state_lo, DT, LOWP), axis=1) / (den * den)
    tl.store(gw_ptr + b * N + offs_n, lin_eps * acc / norm_r, mask=mn)


@triton.jit(do_not_specialize=["N", "H", "chunk", "num_prefix", "grid_h", "grid_w"])
def _state_kernel(k_ptr, v_ptr, scale_ptr, norms_ptr, trig_ptr, part_ptr,
                  N, H, chunk, p, eps, num_prefix, grid_h, grid_w, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                  FEATURE: tl.constexpr, P_INT: tl.constexpr, ROPE: tl.constexpr,
                  D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
                  BLOCK_N: tl.constexpr, LOWP: tl.constexpr, ALIGN: tl.constexpr):
    """Partial [S = sum_j rot(phi(k_j))^T v_j | sum_j phi(k_j) | sum_j v_j] over one chunk of tokens.
    The two sums accumulate per token row and are reduced once, after the loop."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b, h = bh // H, bh % H
    DT = operand_dtype(k_ptr).dtype
    offs_c = tl.arange(0, DP)
    offs_v = tl.arange(0, DVP)
    mc, mv = offs_c < D, offs_v < DV
    c = _load_scale(scale_ptr, h, offs_c, mc, D, DP, FEATURE)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    acc = tl.zeros((DP, DVP), tl.float32)
    ksum = tl.zeros((BLOCK_N, DP), tl.float32)
    vsum = tl.zeros((BLOCK_N, DVP), tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < hi
        x = load_tile(k_base, offs_n, offs_c, s_kn, mn, mc, ALIGN).to(tl.float32)
        vt = load_tile(v_base, offs_n, offs_v, s_vn, mn, mv, ALIGN)
        inv_m, norm_r, norm_rn, norm_rp = _token_norms(norms_ptr, b, N, offs_n, mn, FEATURE)
        phi = tl.where(mn[:, None], _feature(x, c, mc, p, eps, inv_m, norm_r, norm_rp, FEATURE, P_INT), 0.0)
        ksum += phi
        if FEATURE == 1:
            vsum += vt.to(tl.float32)
        if ROPE:
            cos, sin = _rope_cos_sin(trig_ptr, offs_n, mn, num_prefix, grid_h, grid_w, DP // 2)
            phi = _rotate(phi, cos, sin, BLOCK_N, DP, False)
        acc += dot_split_a(tl.trans(phi), vt, DT, LOWP)
    base = part_ptr + (bh * tl.num_programs(1) + split) * (DP * DVP + DP + DVP)
    tl.store(base + offs_c[:, None] * DVP + offs_v[None, :], acc)
    tl.store(base + DP * DVP + offs_c, tl.sum(ksum, axis=0))
    tl.store(base + DP * DVP + DP + offs_v, tl.sum(vsum, axis=0))


@triton.jit(do_not_specialize=["N", "H", "chunk", "num_prefix", "grid_h", "grid_w"])
def _output_kernel(q_ptr, scale_ptr, norms_ptr, trig_ptr, state_ptr, o_ptr, den_ptr, N, H, chunk, p, eps, num_prefix,
                   grid_h, grid_w, inv_n, scale_d, lin_eps, s_qb, s_qh, s_qn, s_ob, s_oh, s_on,
                   FEATURE: tl.constexpr, P_INT: tl.constexpr, ROPE: tl.constexpr,
                   D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr, TERMS: tl.constexpr,
                   BLOCK_N: tl.constexpr, LOWP: tl.constexpr, ALIGN: tl.constexpr):
    """The output of one chunk of queries of one head from the reduced state: FLatten's O (keeping its
    normaliser den (B*h, N) for the backward's g.w) or MALA's Y."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    DT = operand_dtype(q_ptr).dtype
    offs_c = tl.arange(0, DP)
    offs_v = tl.arange(0, DVP)
    mc, mv = offs_c < D, offs_v < DV
    c = _load_scale(scale_ptr, h, offs_c, mc, D, DP, FEATURE)
    state_hi, state_lo, kbar, vbar = _load_state(state_ptr, bh, offs_c, offs_v, inv_n, scale_d, DT, FEATURE,
                                                 DP, DVP, LOWP)
    q_base = q_ptr + b * s_qb + h * s_qh
    o_base = o_ptr + b * s_ob + h * s_oh
    lo = tl.program_id(1) * chunk
    hi = tl.minimum(lo + chunk, N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < hi
        x = load_tile(q_base, offs_n, offs_c, s_qn, mn, mc, ALIGN).to(tl.float32)
        inv_m, norm_r, norm_rn, norm_rp = _token_norms(norms_ptr, b, N, offs_n, mn, FEATURE)
        phi = _feature(x, c, mc, p, eps, inv_m, norm_r, norm_rp, FEATURE, P_INT)
        if FEATURE == 0:
            den = tl.sum(phi * kbar[None, :], axis=1) + lin_eps
            out = dot_terms(phi, state_hi, state_lo, DT, TERMS, LOWP) * (1.0 / den)[:, None]
            tl.store(den_ptr + bh * N + offs_n, den, mask=mn)
        else:
            s = tl.sum(phi * kbar[None, :], axis=1) * scale_d
            if ROPE:
                cos, sin = _rope_cos_sin(trig_ptr, offs_n, mn, num_prefix, grid_h, grid_w, DP // 2)
                phi = _rotate(phi, cos, sin, BLOCK_N, DP, False)
            a = dot_terms(phi, state_hi, state_lo, DT, TERMS, LOWP)
            out = a * (1.0 + 1.0 / (s + lin_eps))[:, None] - s[:, None] * vbar[None, :]
        store_tile(o_base, offs_n, offs_v, s_on, mn, mv, out, ALIGN)


@triton.jit(do_not_specialize=["N", "H", "chunk", "num_prefix", "grid_h", "grid_w"])
def _backward_q_kernel(q_ptr, do_ptr, scale_ptr, norms_ptr, gw_ptr, trig_ptr, state_ptr, dq_ptr, part_ptr,
                       N, H, chunk, p, eps, num_prefix, grid_h, grid_w, inv_n, scale_d, lin_eps,
                       s_qb, s_qh, s_qn, s_gb, s_gh, s_gn, s_db, s_dh, s_dn,
                       FEATURE: tl.constexpr, P_INT: tl.constexpr, ROPE: tl.constexpr,
                       D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
                       BLOCK_N: tl.constexpr, LOWP: tl.constexpr, ALIGN: tl.constexpr):
    """Query side: dq (FLatten: with the per-token g.w of _query_gw_kernel), and partial
    [dS (d x dv) | dz (d) | dvbar (dv) | dc (d)] over one chunk."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b, h = bh // H, bh % H
    DT = operand_dtype(q_ptr).dtype
    offs_c = tl.arange(0, DP)
    offs_v = tl.arange(0, DVP)
    mc, mv = offs_c < D, offs_v < DV
    c = _load_scale(scale_ptr, h, offs_c, mc, D, DP, FEATURE)
    state_hi, state_lo, kbar, vbar = _load_state(state_ptr, bh, offs_c, offs_v, inv_n, scale_d, DT, FEATURE,
                                                 DP, DVP, LOWP)
    q_base = q_ptr + b * s_qb + h * s_qh
    g_base = do_ptr + b * s_gb + h * s_gh
    dq_base = dq_ptr + b * s_db + h * s_dh
    acc_state = tl.zeros((DP, DVP), tl.float32)
    acc_k = tl.zeros((BLOCK_N, DP), tl.float32)
    acc_v = tl.zeros((BLOCK_N, DVP), tl.float32)
    acc_c = tl.zeros((BLOCK_N, DP), tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < hi
        x = load_tile(q_base, offs_n, offs_c, s_qn, mn, mc, ALIGN).to(tl.float32)
        g = load_tile(g_base, offs_n, offs_v, s_gn, mn, mv, ALIGN).to(tl.float32)
        inv_m, norm_r, norm_rn, norm_rp = _token_norms(norms_ptr, b, N, offs_n, mn, FEATURE)
        phi = tl.where(mn[:, None], _feature(x, c, mc, p, eps, inv_m, norm_r, norm_rp, FEATURE, P_INT), 0.0)
        if FEATURE == 0:
            den = tl.sum(phi * kbar[None, :], axis=1) + lin_eps
            out = dot_split(phi, state_hi, state_lo, DT, LOWP) / den[:, None]
            d_num = g / den[:, None]
            d_den = -tl.sum(g * out, axis=1) / den
            d_phi = (dot_split(d_num, tl.trans(state_hi), tl.trans(state_lo), DT, LOWP)
                     + d_den[:, None] * kbar[None, :])
            d_num_hi, d_num_lo = split_operand(d_num, DT, LOWP)
            acc_state += dot_split(tl.trans(phi), d_num_hi, d_num_lo, DT, LOWP)
            acc_k += d_den[:, None] * phi
            gw = tl.load(gw_ptr + b * N + offs_n, mask=mn, other=0.0)
            dx, dc = _focused_backward(d_phi, gw, x, c, mc, p, eps, inv_m, norm_rn, norm_rp, P_INT)
            acc_c += tl.where(mn[:, None], dc, 0.0)
        else:
            s = tl.sum(phi * kbar[None, :], axis=1) * scale_d
            inv_s = 1.0 / (s + lin_eps)
            rot = phi
            if ROPE:
                cos, sin = _rope_cos_sin(trig_ptr, offs_n, mn, num_prefix, grid_h, grid_w, DP // 2)
                rot = _rotate(phi, cos, sin, BLOCK_N, DP, False)
            a = dot_split(rot, state_hi, state_lo, DT, LOWP)
            d_a = g * (1.0 + inv_s)[:, None]
            d_s = -tl.sum(g * a, axis=1) * inv_s * inv_s - tl.sum(g * vbar[None, :], axis=1)
            d_rot = dot_split(d_a, tl.trans(state_hi), tl.trans(state_lo), DT, LOWP)
            if ROPE:
                d_rot = _rotate(d_rot, cos, sin, BLOCK_N, DP, True)
            d_phi = d_rot + (d_s * scale_d)[:, None] * kbar[None, :]
            d_a_hi, d_a_lo = split_operand(d_a, DT, LOWP)
            acc_state += dot_split(tl.trans(rot), d_a_hi, d_a_lo, DT, LOWP)
            acc_k += d_s[:, None] * phi
            acc_v -= s[:, None] * g
            dx = d_phi * tl.where(x > 0, 1.0, phi)
        store_tile(dq_base, offs_n, offs_c, s_dn, mn, mc, dx, ALIGN)
    part = part_ptr + (bh * tl.num_programs(1) + split) * (DP * DVP + 2 * DP + DVP)
    tl.store(part + offs_c[:, None] * DVP + offs_v[None, :], acc_state)
    if FEATURE == 0:
        tl.store(part + DP * DVP + offs_c, tl.sum(acc_k, axis=0))
    else:
        tl.store(part + DP * DVP + offs_c, tl.sum(acc_k, axis=0) * scale_d)
    tl.store(part + DP * DVP + DP + offs_v, tl.sum(acc_v, axis=0))
    tl.store(part + DP * DVP + DP + DVP + offs_c, tl.sum(acc_c, axis=0))


@triton.jit(do_not_specialize=["N", "H", "chunk", "num_prefix", "grid_h", "grid_w"])
def _backward_k_kernel(k_ptr, v_ptr, trig_ptr, grads_ptr, dk_ptr, dv_ptr,
                       N, H, chunk, num_prefix, grid_h, grid_w, inv_n, scale_d,
                       s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn,
                       ROPE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
                       BLOCK_N: tl.constexpr, LOWP: tl.constexpr, ALIGN: tl.constexpr):
    """MALA's key side: dk, dv of one chunk of one head from the reduced [dS | dz | dvbar]."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b, h = bh // H, bh % H
    DT = operand_dtype(k_ptr).dtype
    offs_c = tl.arange(0, DP)
    offs_v = tl.arange(0, DVP)
    mc, mv = offs_c < D, offs_v < DV
    d_state_hi, d_state_lo, d_ksum, d_vsum = _load_grad_state(grads_ptr, bh, inv_n, scale_d, 1, DT, DP, DVP,
                                                              LOWP)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    dk_base = dk_ptr + b * s_dkb + h * s_dkh
    dv_base = dv_ptr + b * s_dvb + h * s_dvh
    lo = split * chunk
    hi = tl.minimum(lo + chunk, N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < hi
        x = load_tile(k_base, offs_n, offs_c, s_kn, mn, mc, ALIGN).to(tl.float32)
        vt = load_tile(v_base, offs_n, offs_v, s_vn, mn, mv, ALIGN)
        phi = tl.where(mc[None, :], tl.where(x > 0, x + 1.0, tl.exp(x)), 0.0)
        d_rot = dot_split_b(vt, tl.trans(d_state_hi), tl.trans(d_state_lo), LOWP)
        rot = phi
        if ROPE:
            cos, sin = _rope_cos_sin(trig_ptr, offs_n, mn, num_prefix, grid_h, grid_w, DP // 2)
            rot = _rotate(phi, cos, sin, BLOCK_N, DP, False)
            d_rot = _rotate(d_rot, cos, sin, BLOCK_N, DP, True)
        d_phi = d_rot + d_ksum[None, :]
        dv = dot_split(rot, d_state_hi, d_state_lo, DT, LOWP) + d_vsum[None, :]
        dx = d_phi * tl.where(x > 0, 1.0, phi)
        store_tile(dk_base, offs_n, offs_c, s_dkn, mn, mc, dx, ALIGN)
        store_tile(dv_base, offs_n, offs_v, s_dvn, mn, mv, dv, ALIGN)


@triton.jit
def _focused_key_head(scale_ptr, grads_ptr, k_head, v_head, bh, h, offs_n, mn, offs_c, mc, offs_v, mv, s_kn, s_vn, p,
                      eps, inv_n, inv_m, norm_r, norm_rp, DT: tl.constexpr, P_INT: tl.constexpr, D: tl.constexpr,
                      DP: tl.constexpr, DVP: tl.constexpr, LOWP: tl.constexpr, ALIGN: tl.constexpr):
    """One head of a key tile in FLatten's key backward: its scale, keys x, features phi, the gradient
    d phi = dS v + dz reaching them, and the state gradient dS (hi, lo)."""
    inv_c = _load_scale(scale_ptr, h, offs_c, mc, D, DP, 0)
    d_state_hi, d_state_lo, d_ksum, _ = _load_grad_state(grads_ptr, bh, inv_n, 1.0, 0, DT, DP, DVP, LOWP)
    x = load_tile(k_head, offs_n, offs_c, s_kn, mn, mc, ALIGN).to(tl.float32)
    vt = load_tile(v_head, offs_n, offs_v, s_vn, mn, mv, ALIGN)
    phi = _feature(x, inv_c, mc, p, eps, inv_m, norm_r, norm_rp, 0, P_INT)
    d_phi = dot_split_b(vt, tl.trans(d_state_hi), tl.trans(d_state_lo), LOWP) + d_ksum[None, :]
    return inv_c, x, phi, d_phi, d_state_hi, d_state_lo


@triton.jit(do_not_specialize=["N", "H"])
def _focused_backward_k_kernel(k_ptr, v_ptr, scale_ptr, rec_ptr, grads_ptr, dk_ptr, dv_ptr, ds_ptr, N, H, p, eps, inv_n,
                               s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn,
                               P_INT: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr,
                               DVP: tl.constexpr, BLOCK_N: tl.constexpr, LOWP: tl.constexpr, ALIGN: tl.constexpr):
    """FLatten's key side for a tile of tokens over all heads: first the keys' whole-token
    g.w = sum_h phi_h(k_j) . (dS_h v_j + dz_h) / M / ||r_j|| (one pass over the heads), then per head dk, dv
    and a partial dc (B, tiles, H, DP), the first tile's with the queries' share added, times softplus'(s) =
    sigmoid(s): partials of ds (so that ds is one sum).
    The second pass re-reads the tiles it has just read (from cache)."""
    b = tl.program_id(0)
    tile = tl.program_id(1)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    DT = operand_dtype(k_ptr).dtype
    offs_c = tl.arange(0, DP)
    offs_v = tl.arange(0, DVP)
    mc, mv = offs_c < D, offs_v < DV
    k_base = k_ptr + b * s_kb
    v_base = v_ptr + b * s_vb
    inv_m, norm_r, norm_rn, norm_rp = _token_norms(rec_ptr, b, N, offs_n, mn, 0)
    gw = tl.zeros((BLOCK_N,), tl.float32)
    for h in range(H):
        inv_c, x, phi, d_phi, d_state_hi, d_state_lo = _focused_key_head(
            scale_ptr, grads_ptr, k_base + h * s_kh, v_base + h * s_vh, b * H + h, h, offs_n, mn, offs_c, mc, offs_v,
            mv, s_kn, s_vn, p, eps, inv_n, inv_m, norm_r, norm_rp, DT, P_INT, D, DP, DVP, LOWP, ALIGN)
        gw += tl.sum(phi * d_phi, axis=1)
    gw = gw / norm_r
    for h in range(H):
        inv_c, x, phi, d_phi, d_state_hi, d_state_lo = _focused_key_head(
            scale_ptr, grads_ptr, k_base + h * s_kh, v_base + h * s_vh, b * H + h, h, offs_n, mn, offs_c, mc, offs_v,
            mv, s_kn, s_vn, p, eps, inv_n, inv_m, norm_r, norm_rp, DT, P_INT, D, DP, DVP, LOWP, ALIGN)
        dv = dot_split(phi, d_state_hi, d_state_lo, DT, LOWP)
        dx, dc = _focused_backward(d_phi, gw, x, inv_c, mc, p, eps, inv_m, norm_rn, norm_rp, P_INT)
        store_tile(dk_ptr + b * s_dkb + h * s_dkh, offs_n, offs_c, s_dkn, mn, mc, dx, ALIGN)
        store_tile(dv_ptr + b * s_dvb + h * s_dvh, offs_n, offs_v, s_dvn, mn, mv, dv, ALIGN)
        dc = tl.sum(tl.where(mn[:, None], dc, 0.0), axis=0)
        if tile == 0:       # the first tile also carries the queries' share (the reduced grads' last DP values)
            dc += tl.load(grads_ptr + (b * H + h) * (DP * DVP + 2 * DP + DVP) + DP * DVP + DP + DVP + offs_c)
        s = tl.load(scale_ptr + h * D + offs_c, mask=mc, other=0.0)
        tl.store(ds_ptr + ((b * tl.num_programs(1) + tile) * H + h) * DP + offs_c, dc / (1.0 + tl.exp(-s)))


# --- launchers ------------------------------------------------------------------------------

_TRIG_CACHE: dict = {}


def _rope_trig(grid_h: int, grid_w: int, d: int, dp: int, device: torch.device) -> Tensor:
    """Flat float32 tables for _rope_cos_sin: cos and sin of the row angles (grid_h, dp/2), zero beyond the
    first d/4 pairs, then of the column angles (grid_w, dp/2), zero outside pairs [d/4, d/2). The angles
    come from the reference's table so both rotate identically."""
    key = (grid_h, grid_w, d, dp, str(device))
    if key not in _TRIG_CACHE:
        sin_r, cos_r = rope_2d_angles((grid_h, 1), d, device)       # (grid_h, d): channel 2i holds pair i
        sin_c, cos_c = rope_2d_angles((1, grid_w), d, device)
        pairs = torch.arange(dp // 2, device=device)
        row_pairs, col_pairs = pairs < d // 4, (pairs >= d // 4) & (pairs < d // 2)

        def table(values, keep):
            out = torch.zeros(values.shape[0], dp // 2, device=device)
            out[:, : d // 2] = values[:, 0::2]
            return out * keep
        _TRIG_CACHE[key] = torch.cat([table(cos_r, row_pairs), table(sin_r, row_pairs),
                                      table(cos_c, col_pairs), table(sin_c, col_pairs)]).flatten().contiguous()
    return _TRIG_CACHE[key]


def _p_int(p: float) -> int:
    return int(p) if float(p).is_integer() and 1 <= p <= 8 else 0


def _meta(q: Tensor, v: Tensor, feature: int, p: float, rope_h: int, rope_w: int):
    """The kernels' constexpr options and the RoPE tables (q itself, unused, without RoPE)."""
    meta = _constexprs(q.dtype, q.shape[-1], v.shape[-1], feature, p, rope_h > 0)
    trig = _rope_trig(rope_h, rope_w, q.shape[-1], meta["DP"], q.device) if rope_h > 0 else q
    return meta, trig


@functools.lru_cache(maxsize=None)
def _constexprs(dtype: torch.dtype, d: int, dv: int, feature: int, p: float, rope: bool) -> dict:
    """Kept per signature: building it costs a few microseconds of every call's host time (read only)."""
    return dict(FEATURE=feature, P_INT=_p_int(p), ROPE=rope, D=d, DV=dv, DP=pad_dim(d), DVP=pad_dim(dv),
                **precision_flags(dtype))


def _launch_opts(cfg: dict, meta: dict) -> dict:
    """The kernel's tile and launch options; fp32 inputs (exact fp32 products on the FMA units, which need
    far more registers) take tiles of at most 16 tokens, and wide heads (a padded head_dim over 64, e.g.
    DiT's 72 padded to 128) the smaller tiles and more warps of WIDE."""
    block_n, warps, stages = cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]
    if not meta["LOWP"]:
        block_n = min(block_n, 16)
    if max(meta["DP"], meta["DVP"]) > 64:
        block_n = min(block_n, cfg.get("wide_block_n", WIDE["max_block_n"]))
        warps = max(warps, WIDE["min_warps"])
        stages = cfg.get("wide_num_stages", stages)
    return dict(BLOCK_N=block_n, num_warps=warps, num_stages=stages)


def _splits(cfg: dict, opts: dict, groups: int, n: int, device: torch.device) -> Tuple[int, int]:
    return split_tokens(groups, n, opts["BLOCK_N"], num_programs_target(device, cfg["per_sm"]),
                        cfg.get("max_tiles", 1 << 30))


def linear_attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: Tensor, feature: int, p: float,
                             num_prefix: int, rope_h: int, rope_w: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(O, state, norms, den): state (B*h, DP*DVP + DP + DVP) fp32 = [S | sum phi(k) | sum v] per head,
    unnormalised; FLatten's whole-token norms (2, B, N, 4) (queries, keys) and normaliser den (B*h, N),
    empty for MALA."""
    b, h, n, d = q.shape
    dv = v.shape[-1]
    meta, trig = _meta(q, v, feature, p, rope_h, rope_w)
    dp, dvp = meta["DP"], meta["DVP"]
    focused = feature == FOCUSED
    (q, s_qb, s_qh, s_qn), (k, s_kb, s_kh, s_kn), (v, s_vb, s_vh, s_vn) = map(head_strides, (q, k, v))
    if focused:
        norms = q.new_empty(2, b, n, 4, dtype=torch.float32)
        opts = _launch_opts(CONFIG["norms"], meta)
        heads = min(1 << (h - 1).bit_length(), max(1, NORMS_TILE // (opts["BLOCK_N"] * dp)))
        launch(_token_norms_kernel, (b, cdiv(n, opts["BLOCK_N"]), 2), q, k, scale, norms, b, n, h, float(p),
               FOCUSED_EPS, s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, P_INT=meta["P_INT"], D=d, DP=dp, HB=heads,
               EVEN=d == dp and h % heads == 0, ALIGN=row_alignment(q, k), **opts)
        den = q.new_empty(b * h, n, dtype=torch.float32)
    else:
        norms = den = q.new_empty(0, dtype=torch.float32)
    cfg = CONFIG["state"]
    opts = _launch_opts(cfg, meta)
    splits, chunk = _splits(cfg, opts, b * h, n, q.device)
    part = q.new_empty(b * h, splits, dp * dvp + dp + dvp, dtype=torch.float32)
    launch(_state_kernel, (b * h, splits), k, v, scale, norms[1] if focused else q, trig, part, n, h, chunk, float(p),
           FOCUSED_EPS, num_prefix, rope_h, rope_w, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, ALIGN=row_alignment(k, v),
           **meta, **opts)
    state = part.sum(1) if splits > 1 else part[:, 0]
    out = heads_last_empty(q, b, h, n, dv)
    cfg = CONFIG["focused_output" if focused else "output"]
    opts = _launch_opts(cfg, meta)
    splits, chunk = _splits(cfg, opts, b * h, n, q.device)
    terms = OUTPUT_TERMS_FP16 if q.dtype == torch.float16 else OUTPUT_TERMS
    launch(_output_kernel, (b * h, splits), q, scale, norms[0] if focused else q, trig, state, out,
           den if focused else q, n, h, chunk,
           float(p), FOCUSED_EPS, num_prefix, rope_h, rope_w, 1.0 / n, d ** -0.5, LINEAR_EPS, s_qb, s_qh, s_qn,
           out.stride(0), out.stride(1), out.stride(2), TERMS=terms, ALIGN=row_alignment(q, out), **meta, **opts)
    return out, state, norms, den if focused else q.new_empty(b * h, 0, dtype=torch.float32)


def linear_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: Tensor, state: Tensor,
                              norms: Tensor, den: Tensor, feature: int, p: float, num_prefix: int, rope_h: int,
                              rope_w: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, ds): ds (h, d) float32 for FLatten (``scale`` = s, the focused map's scale softplus(s)), an
    empty tensor for MALA (no scale). ``norms`` and ``den`` are FLatten's (empty for MALA)."""
    b, h, n, d = q.shape
    d_v = v.shape[-1]
    meta, trig = _meta(q, v, feature, p, rope_h, rope_w)
    dp, dvp = meta["DP"], meta["DVP"]
    focused = feature == FOCUSED
    (q, s_qb, s_qh, s_qn), (k, s_kb, s_kh, s_kn), (v, s_vb, s_vh, s_vn), (grad, s_gb, s_gh, s_gn) = map(
        head_strides, (q, k, v, grad))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    gw_q = q
    if focused:      # the queries' whole-token g.w (see _query_gw_kernel)
        gw_q = grad.new_empty(b, n, dtype=torch.float32)
        opts = _launch_opts(CONFIG["gw_query"], meta)
        launch(_query_gw_kernel, (b, cdiv(n, opts["BLOCK_N"])), grad, q, scale, norms[0], state, den, gw_q, n, h,
               float(p), FOCUSED_EPS, 1.0 / n, LINEAR_EPS, s_gb, s_gh, s_gn, s_qb, s_qh, s_qn, P_INT=meta["P_INT"],
               D=d, DV=d_v, DP=dp, DVP=dvp, LOWP=meta["LOWP"], ALIGN=row_alignment(grad, q), **opts)

    cfg = CONFIG["bwd_q"]
    opts = _launch_opts(cfg, meta)
    splits, chunk = _splits(cfg, opts, b * h, n, q.device)
    part = q.new_empty(b * h, splits, dp * dvp + 2 * dp + dvp, dtype=torch.float32)
    launch(_backward_q_kernel, (b * h, splits), q, grad, scale, norms[0] if focused else q, gw_q, trig, state, dq, part,
           n, h, chunk, float(p), FOCUSED_EPS, num_prefix, rope_h, rope_w, 1.0 / n, d ** -0.5, LINEAR_EPS,
           s_qb, s_qh, s_qn, s_gb, s_gh, s_gn, dq.stride(0), dq.stride(1), dq.stride(2),
           ALIGN=row_alignment(q, grad, dq), **meta, **opts)
    grads = part.sum(1) if splits > 1 else part[:, 0]

    strides = (s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0),
               dv.stride(1), dv.stride(2))
    if not focused:
        cfg = CONFIG["bwd_k"]
        opts = _launch_opts(cfg, meta)
        splits, chunk = _splits(cfg, opts, b * h, n, q.device)
        launch(_backward_k_kernel, (b * h, splits), k, v, trig, grads, dk, dv, n, h, chunk, num_prefix, rope_h,
               rope_w, 1.0 / n, d ** -0.5, *strides, ROPE=meta["ROPE"], D=d, DV=d_v, DP=dp, DVP=dvp,
               LOWP=meta["LOWP"], ALIGN=row_alignment(k, v, dk, dv), **opts)
        return dq, dk, dv, q.new_empty(0, dtype=torch.float32)
    opts = _launch_opts(CONFIG["focused_bwd_k"], meta)
    tiles = cdiv(n, opts["BLOCK_N"])
    part_s = q.new_empty(b, tiles, h, dp, dtype=torch.float32)
    launch(_focused_backward_k_kernel, (b, tiles), k, v, scale, norms[1], grads, dk, dv, part_s, n, h, float(p),
           FOCUSED_EPS, 1.0 / n, *strides, P_INT=meta["P_INT"], D=d, DV=d_v, DP=dp, DVP=dvp, LOWP=meta["LOWP"],
           ALIGN=row_alignment(k, v, dk, dv), **opts)
    return dq, dk, dv, part_s.sum((0, 1))[:, :d]


# --- the op: custom ops for torch.compile, an autograd.Function in eager mode ------------------------

def _forward_fake(q, k, v, scale, feature, p, num_prefix, rope_h, rope_w):
    b, h, n, d = q.shape
    dp, dvp = pad_dim(d), pad_dim(v.shape[-1])
    focused = feature == FOCUSED
    return (heads_last_empty(q, b, h, n, v.shape[-1]), q.new_empty(b * h, dp * dvp + dp + dvp, dtype=torch.float32),
            q.new_empty((2, b, n, 4) if focused else (0,), dtype=torch.float32),
            q.new_empty(b * h, n if focused else 0, dtype=torch.float32))


def _backward_fake(grad, q, k, v, scale, state, norms, den, feature, p, num_prefix, rope_h, rope_w):
    dc_shape = (q.shape[1], q.shape[-1]) if feature == FOCUSED else (0,)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(dc_shape, dtype=torch.float32))


def _gradients(run_backward, grad, saved, args, needs):
    dq, dk, dv, ds = run_backward(grad, *saved, *args)
    return dq, dk, dv, ds if args[0] == FOCUSED and needs[3] else None


_linear_attention = triton_op("linear_attention", linear_attention_forward, linear_attention_backward,
                              num_tensors=4, forward_fake=_forward_fake, backward_fake=_backward_fake,
                              gradients=_gradients)


# --- backends of focused_linear_attention and mala_attention -------------------------------------

_UNIT_SCALE: dict = {}


def _scale_parameter(scale: Optional[Tensor], h: int, d: int, like: Tensor) -> Tensor:
    """The focused map's s as an (h, d) float32 tensor, softplus(s) being its scale (log(e - 1), softplus 1 to
    a rounding, when there is no scale)."""
    if scale is None:
        key = (h, d, like.device)
        if key not in _UNIT_SCALE:
            _UNIT_SCALE[key] = torch.full((h, d), math.log(math.e - 1), device=like.device, dtype=torch.float32)
        return _UNIT_SCALE[key]
    s = scale.reshape(-1, d) if scale.numel() > 1 else scale.reshape(1, 1)
    return s.float().expand(h, d).contiguous()


def focused_linear_attention_triton(q: Tensor, k: Tensor, v: Tensor, focusing_factor: float,
                                    scale: Optional[Tensor]) -> Tensor:
    """FLatten's focused linear attention (arguments as the reference's)."""
    s = _scale_parameter(scale, q.shape[1], q.shape[-1], q)
    return _linear_attention(q, k, v, s, FOCUSED, float(focusing_factor), 0, 0, 0)


def mala_attention_triton(q: Tensor, k: Tensor, v: Tensor, rope_grid: Optional[Tuple[int, int]],
                          num_prefix: int) -> Tensor:
    """MALA with phi = ELU + 1 and optional 2D RoPE (arguments as the reference's)."""
    rope_h, rope_w = rope_grid if rope_grid is not None else (0, 0)
    return _linear_attention(q, k, v, q, MALA, 1.0, num_prefix, rope_h, rope_w)
