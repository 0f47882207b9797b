"""Non-causal linear attention in Triton: FLatten's focused map and MALA's magnitude-aware form.

Two passes over the tokens, the feature maps computed in registers and never stored:
  (a) state:  S = sum_j phi(k_j)^T v_j  (d x dv),  z = sum_j phi(k_j),  sum_j v_j,
      with N split across programs (fp32 partial sums, then one reduction);
  (b) output, per token:
      FLatten (Han et al., ICCV 2023, Eq. 3):  O_i = phi(q_i) S / M / (phi(q_i) z / M + eps);
      MALA (Fan et al., ICCV 2025, Eq. 9-11): with s_i = phi(q_i) z / (M sqrt(d)),
          Y_i = (1 + 1 / (s_i + eps)) rot(phi(q_i)) S / (M sqrt(d)) - s_i sum_j v_j / M,
      rot = MALA's optional 2D RoPE, applied to phi(q), phi(k) inside the KV product only.
The backward recomputes the feature maps. With G = dL/dO, FLatten: dnum_i = G_i / den_i,
dden_i = -G_i.O_i / den_i, dphi(q_i) = S dnum_i / M + dden_i z / M, dS = sum_i phi(q_i)^T dnum_i,
dz = sum_i dden_i phi(q_i), then dphi(k_j) = (dS v_j + dz) / M and dv_j = phi(k_j) dS / M.
MALA: da_i = G_i beta_i, ds_i = -G_i.a_i / (s_i + eps)^2 - G_i.vbar, and the same two reductions
(plus dvbar = -sum_i s_i G_i). The focused map phi = ||r|| w with w = r^p / ||r^p|| and
r = (ReLU(x) + eps) / softplus(s) has dL/dr = (g.w) r / ||r|| + p ||r|| r^(p-1) (g - (g.w) w) / ||r^p||,
evaluated on r / max(r) (the expression is scale-free), and dL/dsoftplus(s) = -sum dL/dr r / softplus(s).
"""
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference.feature_maps import FOCUSED_EPS
from ..reference.linear_attention import LINEAR_EPS
from ..reference.rope import rope_2d_angles
from ._common import (dot_precision, head_strides, launch, load_tile, num_programs_target, pad_dim,
                      split_tokens, store_tile)

FOCUSED = 0      # FLatten: phi = focused map, O = phi(q) S / (phi(q) z)
MALA = 1         # MALA: phi = ELU + 1, Y = beta phi(q) S - gamma sum v

# Tile sizes and launch options per kernel (chosen from ptxas register/spill reports for sm_90 and the
# bench_linear sweep on an H100); bench_linear overrides them for its sweep.
CONFIG = {
    "state": dict(BLOCK_N=64, num_warps=8, num_stages=2),
    "output": dict(BLOCK_N=64, num_warps=8, num_stages=2, max_tiles=8),
    "bwd_q": dict(BLOCK_N=32, num_warps=8, num_stages=1),
    "bwd_k": dict(BLOCK_N=32, num_warps=8, num_stages=1),
}


# --- feature maps ---------------------------------------------------------------------------

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
def _focused_parts(x, c, mc, p, eps, P_INT: tl.constexpr):
    """r = (ReLU(x) + eps) / c, rn = r / max(r), rp = rn^p and the row norms ||r||, ||rn||, ||rp||."""
    r = tl.where(mc[None, :], (tl.maximum(x, 0.0) + eps) / c[None, :], 0.0)
    r_max = tl.max(r, axis=1)
    rn = tl.where(mc[None, :], r / r_max[:, None], 1.0)       # 1 on padding keeps the power finite
    rp = tl.where(mc[None, :], _power(rn, p, P_INT), 0.0)
    rn = tl.where(mc[None, :], rn, 0.0)
    norm_r = tl.sqrt(tl.sum(r * r, axis=1))
    norm_rn = tl.sqrt(tl.sum(rn * rn, axis=1))
    norm_rp = tl.sqrt(tl.sum(rp * rp, axis=1))
    return r, rn, rp, norm_r, norm_rn, norm_rp


@triton.jit
def _feature(x, c, mc, p, eps, FEATURE: tl.constexpr, P_INT: tl.constexpr):
    if FEATURE == 0:
        r, rn, rp, norm_r, norm_rn, norm_rp = _focused_parts(x, c, mc, p, eps, P_INT)
        phi = rp * (norm_r / norm_rp)[:, None]
    else:
        phi = tl.where(mc[None, :], tl.where(x > 0, x + 1.0, tl.exp(x)), 0.0)
    return phi


@triton.jit
def _focused_backward(g, x, c, mc, p, eps, P_INT: tl.constexpr):
    """(dL/dx, -dL/dr * r / c) for dL/dphi = g; the second summed over rows gives dL/dc."""
    r, rn, rp, norm_r, norm_rn, norm_rp = _focused_parts(x, c, mc, p, eps, P_INT)
    w = rp / norm_rp[:, None]
    gw = tl.sum(g * w, axis=1)
    rn_pm1 = tl.where(mc[None, :], rp / tl.where(mc[None, :], rn, 1.0), 0.0)
    dr = (gw / norm_rn)[:, None] * rn + (norm_rn * p / norm_rp)[:, None] * rn_pm1 * (g - gw[:, None] * w)
    dx = tl.where(x > 0, dr / c[None, :], 0.0)
    return dx, -dr * r / c[None, :]


@triton.jit
def _rope_tables(trig_ptr, offs_n, offs_c, mask_n, num_prefix, grid_h, grid_w, D: tl.constexpr):
    """cos and sgn*sin per (token, channel) for 2D RoPE: rot[c] = x[c] cos + x[c ^ 1] sgn sin, sgn = -1 on
    even channels. trig_ptr: (2, grid_h + grid_w, D/2): the row angles of channels < D/2, then the column
    angles of channels >= D/2. Prefix tokens are not rotated."""
    g = offs_n - num_prefix
    on_grid = mask_n & (g >= 0)
    g = tl.maximum(g, 0)
    first = offs_c < D // 2
    pos = tl.where(first[None, :], (g // grid_w)[:, None], grid_h + (g % grid_w)[:, None])
    idx = pos * (D // 2) + tl.where(first, offs_c, offs_c - D // 2)[None, :]
    m = on_grid[:, None] & (offs_c < D)[None, :]
    cos = tl.load(trig_ptr + idx, mask=m, other=1.0)
    sin = tl.load(trig_ptr + (grid_h + grid_w) * (D // 2) + idx, mask=m, other=0.0)
    return cos, sin * tl.where(offs_c % 2 == 0, -1.0, 1.0)[None, :]


# --- kernels --------------------------------------------------------------------------------

@triton.jit
def _state_kernel(k_ptr, v_ptr, c_ptr, trig_ptr, state_ptr, ksum_ptr, vsum_ptr,
                  N, H, chunk, p, eps, num_prefix, grid_h, grid_w,
                  s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
                  FEATURE: tl.constexpr, P_INT: tl.constexpr, ROPE: tl.constexpr,
                  D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
                  BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Partial S = sum_j rot(phi(k_j))^T v_j, sum_j phi(k_j), sum_j v_j over one chunk of tokens."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_c = tl.arange(0, DP)
    offs_v = tl.arange(0, DVP)
    mc, mv = offs_c < D, offs_v < DV
    c = tl.load(c_ptr + h * D + offs_c, mask=mc, other=1.0)
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    acc = tl.zeros((DP, DVP), tl.float32)
    ksum = tl.zeros((DP,), tl.float32)
    vsum = tl.zeros((DVP,), tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < hi
        x = load_tile(k_base, offs_n, offs_c, s_kn, mn, mc)
        vt = load_tile(v_base, offs_n, offs_v, s_vn, mn, mv)
        phi = tl.where(mn[:, None], _feature(x, c, mc, p, eps, FEATURE, P_INT), 0.0)
        ksum += tl.sum(phi, axis=0)
        vsum += tl.sum(vt, axis=0)
        if ROPE:
            x_pair = load_tile(k_base, offs_n, offs_c ^ 1, s_kn, mn, mc)
            phi_pair = tl.where(mn[:, None], _feature(x_pair, c, mc, p, eps, FEATURE, P_INT), 0.0)
            cos, sin = _rope_tables(trig_ptr, offs_n, offs_c, mn, num_prefix, grid_h, grid_w, D)
            phi = phi * cos + phi_pair * sin
        acc += tl.dot(tl.trans(phi), vt, input_precision=PREC)
    part = bh * tl.num_programs(1) + split
    tl.store(state_ptr + part * DP * DVP + offs_c[:, None] * DVP + offs_v[None, :], acc)
    tl.store(ksum_ptr + part * DP + offs_c, ksum)
    tl.store(vsum_ptr + part * DVP + offs_v, vsum)


@triton.jit
def _output_kernel(q_ptr, c_ptr, trig_ptr, state_ptr, ksum_ptr, vsum_ptr, o_ptr,
                   N, H, chunk, p, eps, num_prefix, grid_h, grid_w, inv_n, scale_d, lin_eps,
                   s_qb, s_qh, s_qn, s_ob, s_oh, s_on,
                   FEATURE: tl.constexpr, P_INT: tl.constexpr, ROPE: tl.constexpr,
                   D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
                   BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """O for one chunk of queries from the reduced state (FLatten's or MALA's combination)."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    offs_c = tl.arange(0, DP)
    offs_v = tl.arange(0, DVP)
    mc, mv = offs_c < D, offs_v < DV
    c = tl.load(c_ptr + h * D + offs_c, mask=mc, other=1.0)
    state = tl.load(state_ptr + bh * DP * DVP + offs_c[:, None] * DVP + offs_v[None, :])
    kbar = tl.load(ksum_ptr + bh * DP + offs_c) * inv_n
    vbar = tl.load(vsum_ptr + bh * DVP + offs_v) * inv_n
    q_base = q_ptr + b * s_qb + h * s_qh
    o_base = o_ptr + b * s_ob + h * s_oh
    lo = tl.program_id(1) * chunk
    hi = tl.minimum(lo + chunk, N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < hi
        x = load_tile(q_base, offs_n, offs_c, s_qn, mn, mc)
        phi = _feature(x, c, mc, p, eps, FEATURE, P_INT)
        if FEATURE == 0:
            den = tl.sum(phi * kbar[None, :], axis=1) + lin_eps
            out = tl.dot(phi, state, input_precision=PREC) * inv_n / den[:, None]
        else:
            s = tl.sum(phi * kbar[None, :], axis=1) * scale_d
            rot = phi
            if ROPE:
                x_pair = load_tile(q_base, offs_n, offs_c ^ 1, s_qn, mn, mc)
                phi_pair = _feature(x_pair, c, mc, p, eps, FEATURE, P_INT)
                cos, sin = _rope_tables(trig_ptr, offs_n, offs_c, mn, num_prefix, grid_h, grid_w, D)
                rot = phi * cos + phi_pair * sin
            a = tl.dot(rot, state, input_precision=PREC) * (scale_d * inv_n)
            out = a * (1.0 + 1.0 / (s + lin_eps))[:, None] - s[:, None] * vbar[None, :]
        store_tile(o_base, offs_n, offs_v, s_on, mn, mv, out)


@triton.jit
def _backward_q_kernel(q_ptr, do_ptr, c_ptr, trig_ptr, state_ptr, ksum_ptr, vsum_ptr,
                       dq_ptr, dstate_ptr, dksum_ptr, dvsum_ptr, dc_ptr,
                       N, H, chunk, p, eps, num_prefix, grid_h, grid_w, inv_n, scale_d, lin_eps,
                       s_qb, s_qh, s_qn, s_gb, s_gh, s_gn, s_db, s_dh, s_dn,
                       FEATURE: tl.constexpr, P_INT: tl.constexpr, ROPE: tl.constexpr,
                       D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
                       BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Query side: dq, and partial sums over the chunk of dS (d x dv), dz (d), dvbar (dv), dc (d)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_c = tl.arange(0, DP)
    offs_v = tl.arange(0, DVP)
    mc, mv = offs_c < D, offs_v < DV
    c = tl.load(c_ptr + h * D + offs_c, mask=mc, other=1.0)
    state = tl.load(state_ptr + bh * DP * DVP + offs_c[:, None] * DVP + offs_v[None, :])
    kbar = tl.load(ksum_ptr + bh * DP + offs_c) * inv_n
    vbar = tl.load(vsum_ptr + bh * DVP + offs_v) * inv_n
    if ROPE:
        state_pair = tl.load(state_ptr + bh * DP * DVP + (offs_c ^ 1)[:, None] * DVP + offs_v[None, :])
    q_base = q_ptr + b * s_qb + h * s_qh
    g_base = do_ptr + b * s_gb + h * s_gh
    dq_base = dq_ptr + b * s_db + h * s_dh
    acc_state = tl.zeros((DP, DVP), tl.float32)
    acc_k = tl.zeros((DP,), tl.float32)
    acc_v = tl.zeros((DVP,), tl.float32)
    acc_c = tl.zeros((DP,), tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < hi
        x = load_tile(q_base, offs_n, offs_c, s_qn, mn, mc)
        g = load_tile(g_base, offs_n, offs_v, s_gn, mn, mv)
        phi = tl.where(mn[:, None], _feature(x, c, mc, p, eps, FEATURE, P_INT), 0.0)
        if FEATURE == 0:
            den = tl.sum(phi * kbar[None, :], axis=1) + lin_eps
            out = tl.dot(phi, state, input_precision=PREC) * inv_n / den[:, None]
            d_num = g / den[:, None]
            d_den = -tl.sum(g * out, axis=1) / den
            d_phi = tl.dot(d_num, tl.trans(state), input_precision=PREC) * inv_n + d_den[:, None] * kbar[None, :]
            acc_state += tl.dot(tl.trans(phi), d_num, input_precision=PREC)
            acc_k += tl.sum(d_den[:, None] * phi, axis=0)
            dx, dc = _focused_backward(d_phi, x, c, mc, p, eps, P_INT)
            acc_c += tl.sum(tl.where(mn[:, None], dc, 0.0), axis=0)
        else:
            s = tl.sum(phi * kbar[None, :], axis=1) * scale_d
            inv_s = 1.0 / (s + lin_eps)
            rot = phi
            if ROPE:
                x_pair = load_tile(q_base, offs_n, offs_c ^ 1, s_qn, mn, mc)
                phi_pair = tl.where(mn[:, None], _feature(x_pair, c, mc, p, eps, FEATURE, P_INT), 0.0)
                cos, sin = _rope_tables(trig_ptr, offs_n, offs_c, mn, num_prefix, grid_h, grid_w, D)
                rot = phi * cos + phi_pair * sin
            a = tl.dot(rot, state, input_precision=PREC) * (scale_d * inv_n)
            d_a = g * (1.0 + inv_s)[:, None]
            d_s = -tl.sum(g * a, axis=1) * inv_s * inv_s - tl.sum(g * vbar[None, :], axis=1)
            d_rot = tl.dot(d_a, tl.trans(state), input_precision=PREC) * (scale_d * inv_n)
            if ROPE:
                d_rot_pair = tl.dot(d_a, tl.trans(state_pair), input_precision=PREC) * (scale_d * inv_n)
                d_rot = d_rot * cos - d_rot_pair * sin
            d_phi = d_rot + (d_s * scale_d)[:, None] * kbar[None, :]
            acc_state += tl.dot(tl.trans(rot), d_a, input_precision=PREC)
            acc_k += tl.sum(d_s[:, None] * phi, axis=0) * scale_d
            acc_v -= tl.sum(s[:, None] * g, axis=0)
            dx = d_phi * tl.where(x > 0, 1.0, phi)
        store_tile(dq_base, offs_n, offs_c, s_dn, mn, mc, dx)
    part = bh * tl.num_programs(1) + split
    tl.store(dstate_ptr + part * DP * DVP + offs_c[:, None] * DVP + offs_v[None, :], acc_state)
    tl.store(dksum_ptr + part * DP + offs_c, acc_k)
    tl.store(dvsum_ptr + part * DVP + offs_v, acc_v)
    tl.store(dc_ptr + part * DP + offs_c, acc_c)


@triton.jit
def _backward_k_kernel(k_ptr, v_ptr, c_ptr, trig_ptr, dstate_ptr, dksum_ptr, dvsum_ptr,
                       dk_ptr, dv_ptr, dc_ptr,
                       N, H, chunk, p, eps, num_prefix, grid_h, grid_w, inv_n, scale_d,
                       s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn,
                       FEATURE: tl.constexpr, P_INT: tl.constexpr, ROPE: tl.constexpr,
                       D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
                       BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Key side: dk, dv from the reduced dS, dz, dvbar; partial dc over the chunk."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_c = tl.arange(0, DP)
    offs_v = tl.arange(0, DVP)
    mc, mv = offs_c < D, offs_v < DV
    c = tl.load(c_ptr + h * D + offs_c, mask=mc, other=1.0)
    d_state = tl.load(dstate_ptr + bh * DP * DVP + offs_c[:, None] * DVP + offs_v[None, :])
    d_ksum = tl.load(dksum_ptr + bh * DP + offs_c) * inv_n
    d_vsum = tl.load(dvsum_ptr + bh * DVP + offs_v) * inv_n
    if ROPE:
        d_state_pair = tl.load(dstate_ptr + bh * DP * DVP + (offs_c ^ 1)[:, None] * DVP + offs_v[None, :])
    if FEATURE == 0:
        coef = inv_n
    else:
        coef = scale_d * inv_n
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    dk_base = dk_ptr + b * s_dkb + h * s_dkh
    dv_base = dv_ptr + b * s_dvb + h * s_dvh
    acc_c = tl.zeros((DP,), tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, N)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < hi
        x = load_tile(k_base, offs_n, offs_c, s_kn, mn, mc)
        vt = load_tile(v_base, offs_n, offs_v, s_vn, mn, mv)
        phi = _feature(x, c, mc, p, eps, FEATURE, P_INT)
        d_rot = tl.dot(vt, tl.trans(d_state), input_precision=PREC) * coef
        rot = phi
        if ROPE:
            x_pair = load_tile(k_base, offs_n, offs_c ^ 1, s_kn, mn, mc)
            phi_pair = _feature(x_pair, c, mc, p, eps, FEATURE, P_INT)
            cos, sin = _rope_tables(trig_ptr, offs_n, offs_c, mn, num_prefix, grid_h, grid_w, D)
            rot = phi * cos + phi_pair * sin
            d_rot_pair = tl.dot(vt, tl.trans(d_state_pair), input_precision=PREC) * coef
            d_rot = d_rot * cos - d_rot_pair * sin
        d_phi = d_rot + d_ksum[None, :]
        dv = tl.dot(rot, d_state, input_precision=PREC) * coef + d_vsum[None, :]
        if FEATURE == 0:
            dx, dc = _focused_backward(d_phi, x, c, mc, p, eps, P_INT)
            acc_c += tl.sum(tl.where(mn[:, None], dc, 0.0), axis=0)
        else:
            dx = d_phi * tl.where(x > 0, 1.0, phi)
        store_tile(dk_base, offs_n, offs_c, s_dkn, mn, mc, dx)
        store_tile(dv_base, offs_n, offs_v, s_dvn, mn, mv, dv)
    tl.store(dc_ptr + (bh * tl.num_programs(1) + split) * DP + offs_c, acc_c)


# --- launchers ------------------------------------------------------------------------------

_TRIG_CACHE: dict = {}


def _rope_trig(grid_h: int, grid_w: int, d: int, device: torch.device) -> Tensor:
    """(2, grid_h + grid_w, d/2) float32: cos, sin of the row angles (channels < d/2) then of the column
    angles (channels >= d/2), taken from the reference's angle table so both rotate identically."""
    key = (grid_h, grid_w, d, str(device))
    if key not in _TRIG_CACHE:
        sin_r, cos_r = rope_2d_angles((grid_h, 1), d, device)
        sin_c, cos_c = rope_2d_angles((1, grid_w), d, device)
        cos = torch.cat([cos_r[:, : d // 2], cos_c[:, d // 2:]])
        sin = torch.cat([sin_r[:, : d // 2], sin_c[:, d // 2:]])
        _TRIG_CACHE[key] = torch.stack([cos, sin]).contiguous()
    return _TRIG_CACHE[key]


def _p_int(p: float) -> int:
    return int(p) if float(p).is_integer() and 1 <= p <= 8 else 0


def _common_args(q: Tensor, v: Tensor, feature: int, p: float, rope_h: int, rope_w: int):
    d, dv = q.shape[-1], v.shape[-1]
    meta = dict(FEATURE=feature, P_INT=_p_int(p), ROPE=rope_h > 0, D=d, DV=dv, DP=pad_dim(d),
                DVP=pad_dim(dv), PREC=dot_precision(q.dtype))
    trig = _rope_trig(rope_h, rope_w, d, q.device) if rope_h > 0 else q.new_empty(1, dtype=torch.float32)
    return meta, trig


def _scales(n: int, d: int) -> Tuple[float, float]:
    return 1.0 / n, d ** -0.5


def linear_attention_forward(q: Tensor, k: Tensor, v: Tensor, c: Tensor, feature: int, p: float,
                             num_prefix: int, rope_h: int, rope_w: int
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(O, S, sum phi(k), sum v): S (B*h, DP, DVP) fp32 (padded channels, unnormalised sums)."""
    b, h, n, d = q.shape
    dv = v.shape[-1]
    (q, s_qb, s_qh, s_qn), (k, s_kb, s_kh, s_kn), (v, s_vb, s_vh, s_vn) = map(head_strides, (q, k, v))
    meta, trig = _common_args(q, v, feature, p, rope_h, rope_w)
    dp, dvp = meta["DP"], meta["DVP"]
    target = num_programs_target(q.device)
    cfg = CONFIG["state"]
    splits, chunk = split_tokens(b * h, n, cfg["BLOCK_N"], target)
    part_state = q.new_empty(b * h, splits, dp, dvp, dtype=torch.float32)
    part_k = q.new_empty(b * h, splits, dp, dtype=torch.float32)
    part_v = q.new_empty(b * h, splits, dvp, dtype=torch.float32)
    launch(_state_kernel, (b * h, splits),
        k, v, c, trig, part_state, part_k, part_v, n, h, chunk, float(p), FOCUSED_EPS, num_prefix,
        rope_h, rope_w, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, **meta, **cfg)
    state, ksum, vsum = part_state.sum(1), part_k.sum(1), part_v.sum(1)
    out = q.new_empty(b, h, n, dv)
    cfg = CONFIG["output"]
    splits, chunk = split_tokens(b * h, n, cfg["BLOCK_N"], 2 * target, cfg["max_tiles"])
    inv_n, scale_d = _scales(n, d)
    launch(_output_kernel, (b * h, splits),
        q, c, trig, state, ksum, vsum, out, n, h, chunk, float(p), FOCUSED_EPS, num_prefix, rope_h, rope_w,
        inv_n, scale_d, LINEAR_EPS, s_qb, s_qh, s_qn, out.stride(0), out.stride(1), out.stride(2),
        **meta, BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, state, ksum, vsum


def linear_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, c: Tensor, state: Tensor,
                              ksum: Tensor, vsum: Tensor, feature: int, p: float, num_prefix: int,
                              rope_h: int, rope_w: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dc) with dc of shape (h, d) in float32."""
    b, h, n, d = q.shape
    dv_dim = v.shape[-1]
    (q, s_qb, s_qh, s_qn), (k, s_kb, s_kh, s_kn), (v, s_vb, s_vh, s_vn), (grad, s_gb, s_gh, s_gn) = map(
        head_strides, (q, k, v, grad))
    meta, trig = _common_args(q, v, feature, p, rope_h, rope_w)
    dp, dvp = meta["DP"], meta["DVP"]
    target = num_programs_target(q.device)
    inv_n, scale_d = _scales(n, d)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    cfg = CONFIG["bwd_q"]
    splits, chunk = split_tokens(b * h, n, cfg["BLOCK_N"], target)
    part_state = q.new_empty(b * h, splits, dp, dvp, dtype=torch.float32)
    part_k = q.new_empty(b * h, splits, dp, dtype=torch.float32)
    part_v = q.new_empty(b * h, splits, dvp, dtype=torch.float32)
    part_cq = q.new_empty(b * h, splits, dp, dtype=torch.float32)
    launch(_backward_q_kernel, (b * h, splits),
        q, grad, c, trig, state, ksum, vsum, dq, part_state, part_k, part_v, part_cq,
        n, h, chunk, float(p), FOCUSED_EPS, num_prefix, rope_h, rope_w, inv_n, scale_d, LINEAR_EPS,
        s_qb, s_qh, s_qn, s_gb, s_gh, s_gn, dq.stride(0), dq.stride(1), dq.stride(2), **meta, **cfg)
    d_state, d_ksum, d_vsum = part_state.sum(1), part_k.sum(1), part_v.sum(1)

    cfg = CONFIG["bwd_k"]
    splits, chunk = split_tokens(b * h, n, cfg["BLOCK_N"], target)
    part_ck = q.new_empty(b * h, splits, dp, dtype=torch.float32)
    launch(_backward_k_kernel, (b * h, splits),
        k, v, c, trig, d_state, d_ksum, d_vsum, dk, dv, part_ck,
        n, h, chunk, float(p), FOCUSED_EPS, num_prefix, rope_h, rope_w, inv_n, scale_d,
        s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2), **meta, **cfg)
    dc = (part_cq.sum(1) + part_ck.sum(1)).reshape(b, h, dp).sum(0)[:, :d]
    return dq, dk, dv, dc


# --- torch.library registration --------------------------------------------------------------

@torch.library.custom_op("subquad::linear_attention", mutates_args=())
def _linear_attention_op(q: Tensor, k: Tensor, v: Tensor, c: Tensor, feature: int, p: float,
                         num_prefix: int, rope_h: int, rope_w: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return linear_attention_forward(q, k, v, c, feature, p, num_prefix, rope_h, rope_w)


@_linear_attention_op.register_fake
def _(q, k, v, c, feature, p, num_prefix, rope_h, rope_w):
    b, h, n, d = q.shape
    dp, dvp = pad_dim(d), pad_dim(v.shape[-1])
    return (q.new_empty(b, h, n, v.shape[-1]), q.new_empty(b * h, dp, dvp, dtype=torch.float32),
            q.new_empty(b * h, dp, dtype=torch.float32), q.new_empty(b * h, dvp, dtype=torch.float32))


@torch.library.custom_op("subquad::linear_attention_backward", mutates_args=())
def _linear_attention_backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, c: Tensor, state: Tensor,
                                  ksum: Tensor, vsum: Tensor, feature: int, p: float, num_prefix: int,
                                  rope_h: int, rope_w: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return linear_attention_backward(grad, q, k, v, c, state, ksum, vsum, feature, p, num_prefix, rope_h, rope_w)


@_linear_attention_backward_op.register_fake
def _(grad, q, k, v, c, state, ksum, vsum, feature, p, num_prefix, rope_h, rope_w):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(q.shape[1], q.shape[-1], dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, c, feature, p, num_prefix, rope_h, rope_w = inputs
    _, state, ksum, vsum = output
    ctx.save_for_backward(q, k, v, c, state, ksum, vsum)
    ctx.args = (feature, p, num_prefix, rope_h, rope_w)
    ctx.mark_non_differentiable(state, ksum, vsum)


def _backward(ctx, grad, *_):
    q, k, v, c, state, ksum, vsum = ctx.saved_tensors
    dq, dk, dv, dc = torch.ops.subquad.linear_attention_backward(grad, q, k, v, c, state, ksum, vsum, *ctx.args)
    return dq, dk, dv, dc.to(c.dtype), None, None, None, None, None


_linear_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --- backends for kernels.functional ---------------------------------------------------------

def _softplus_scale(scale: Optional[Tensor], h: int, d: int, like: Tensor) -> Tensor:
    """softplus(s) as an (h, d) float32 tensor (ones when there is no scale)."""
    if scale is None:
        return torch.ones(h, d, device=like.device, dtype=torch.float32)
    s = scale.reshape(-1, d) if scale.numel() > 1 else scale.reshape(1, 1)
    return torch.nn.functional.softplus(s.float()).expand(h, d).contiguous()


def focused_linear_attention_triton(q: Tensor, k: Tensor, v: Tensor, focusing_factor: float,
                                    scale: Optional[Tensor]) -> Tensor:
    """FLatten's focused linear attention; float64 inputs go to the reference (kernels are fp32 inside)."""
    if q.dtype == torch.float64:
        from ..functional import _focused_linear_reference
        return _focused_linear_reference(q, k, v, focusing_factor, scale)
    c = _softplus_scale(scale, q.shape[1], q.shape[-1], q)
    return torch.ops.subquad.linear_attention(q, k, v, c, FOCUSED, float(focusing_factor), 0, 0, 0)[0]


def mala_attention_triton(q: Tensor, k: Tensor, v: Tensor, rope_grid: Optional[Tuple[int, int]],
                          num_prefix: int) -> Tensor:
    """MALA with phi = ELU + 1 and optional 2D RoPE; float64 inputs go to the reference."""
    if q.dtype == torch.float64:
        from ..functional import _mala_reference
        return _mala_reference(q, k, v, rope_grid, num_prefix)
    rope_h, rope_w = rope_grid if rope_grid is not None else (0, 0)
    if rope_grid is not None and q.shape[-1] % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {q.shape[-1]}")
    c = torch.ones(q.shape[1], q.shape[-1], device=q.device, dtype=torch.float32)
    return torch.ops.subquad.linear_attention(q, k, v, c, MALA, 1.0, num_prefix, rope_h, rope_w)[0]
