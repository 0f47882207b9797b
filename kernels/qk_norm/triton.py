"""``rms_norm_rope`` in Triton: one read of x and one write of the result per element, float32 arithmetic.

A program takes BLOCK_R norm rows (a head's D channels, or a token's H * D) of G channels each, all G in one tile:
the sum of squares, the weight, then the rotation of the tile viewed as (rows, G / 2, 2) channel pairs, each pair's
angle read from the (N, D / 2) tables at the row's token (rows of one token share them: cache hits). Addresses
follow x's and out's strides (B, N, H) with unit stride in D, so x may be a view of a projection and out a slice
of a joint text + image buffer.
"""
from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from ..core.dispatch import Requirement
from ..core.triton_common import cdiv, launch, next_power_of_2

INFERENCE = Requirement("no gradient to record (the Triton kernel has no backward; the reference does)",
                        lambda f: not f.get("recording_grad", False))
TILE_ELEMENTS = 4096        # fp32 values per operand tile, as the layer norm's


@triton.jit
def _addresses(rows, groups, n, offs_c, s_b, s_n, s_h, D: tl.constexpr, G: tl.constexpr):
    """Offsets (rows x channels) of channel c of norm row r = ((b * N + token) * groups + group) in a (B, N, H, D)
    tensor of strides (s_b, s_n, s_h, 1)."""
    group = rows % groups
    token = rows // groups
    head = group[:, None] * (G // D) + (offs_c // D)[None, :]
    return (token // n)[:, None] * s_b + (token % n)[:, None] * s_n + head * s_h + (offs_c % D)[None, :]


@triton.jit(do_not_specialize=["rows", "n", "groups", "eps"])
def _rms_norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, rows, n, groups, eps, s_xb, s_xn, s_xh,
                          s_ob, s_on, s_oh, s_cn, s_cp, s_sn, s_sp, D: tl.constexpr, G: tl.constexpr,
                          ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_G)
    mask = (offs_r < rows)[:, None] & (offs_c < G)[None, :]
    x = tl.load(x_ptr + _addresses(offs_r, groups, n, offs_c, s_xb, s_xn, s_xh, D, G), mask=mask,
                other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / G + eps)
    y = x * rstd[:, None] * tl.load(w_ptr + offs_c, mask=offs_c < G, other=0.0).to(tl.float32)[None, :]
    if ROPE:
        offs_p = tl.arange(0, BLOCK_G // 2)
        token = (offs_r // groups) % n
        pair = ((offs_p * 2) % D) // 2
        mp = (offs_r < rows)[:, None] & (offs_p < G // 2)[None, :]
        c = tl.load(cos_ptr + token[:, None] * s_cn + pair[None, :] * s_cp, mask=mp, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + token[:, None] * s_sn + pair[None, :] * s_sp, mask=mp, other=0.0).to(tl.float32)
        a, b = tl.split(tl.reshape(y, (BLOCK_R, BLOCK_G // 2, 2)))
        y = tl.reshape(tl.join(a * c - b * s, a * s + b * c), (BLOCK_R, BLOCK_G))
    tl.store(out_ptr + _addresses(offs_r, groups, n, offs_c, s_ob, s_on, s_oh, D, G),
             y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_rope_triton(x: Tensor, weight: Tensor, eps: float, cos: Optional[Tensor], sin: Optional[Tensor],
                         out: Tensor) -> Tensor:
    """``rms_norm_rope`` (see the package) into ``out``; no autograd (the dispatch runs the reference then)."""
    b, n, h, d = x.shape
    g = weight.numel()
    rows = b * n * (h * d // g)
    block_g = next_power_of_2(g)
    block_r = max(1, TILE_ELEMENTS // block_g)
    rope = cos is not None
    tables = (cos, sin) if rope else (weight, weight)
    table_strides = (*cos.stride(), *sin.stride()) if rope else (0, 0, 0, 0)
    launch(_rms_norm_rope_kernel, (cdiv(rows, block_r),), x, weight, *tables, out, rows, n, h * d // g, eps,
           x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2), *table_strides,
           D=d, G=g, ROPE=rope, BLOCK_R=block_r, BLOCK_G=block_g,
           num_warps=4 if block_g <= 2048 else (8 if block_g <= 4096 else 16))
    return out
