"""Depthwise k x k convolution over the grid tokens (DWC / LePE) in Triton, with a fused residual add.

Works on the (B, h, N, d) token layout in place: tokens 0..P-1 are prefix tokens, then each frame's grid
in raster order. With w (C, 1, k, k), C = h*d (one filter per channel) or C = d (one per head channel,
shared by the heads), zero padding and r = k // 2:

  out[t, c] = residual[t, c] + bias[c] + sum_ij w[c, i, j] x[t + (i - r, j - r), c]   (grid tokens t)
  out[t, c] = residual[t, c]                                                           (prefix tokens)

A program owns a TILE_H x TILE_W block of one frame's grid tokens and all d channels of one head: it loads
the k*k shifted tiles under masks (neighbouring programs run at the same time, so the halo rows come from
cache), accumulates in fp32 and writes the output dtype; x and the residual are read once, out written once.
A program per (batch, head) copies the prefix rows. The filter enters as fp32 taps (k*k, C), so that each
tap's channels are one contiguous vector load, laid out once per filter tensor and version (``_taps``).

Backward, with g = dL/dout: d residual = g; dx = the transposed conv of g (the flipped filter), 0 on the
prefix rows; dw[c, i, j] = sum g[t, c] x[t + (i - r, j - r), c] and dbias[c] = sum g[t, c] over the grid tokens
and the batch (and the heads when C = d). One kernel does both over a chunk of tiles per program: per tile it
loads g once, and per tap the shifted tiles of x and g (from L1 after the first taps), summing g * x(shifted)
over the tile's tokens into that tap's row of fp32 partials [dw taps | dbias] (k*k + 1 rows of d) and adding
the flipped tap times g(shifted) into dx; g and x cross the memory system once. A small kernel sums the
programs' partials into dw and dbias in their dtype.
"""
import weakref
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..core.alignment import row_alignment
from ..core.triton_common import (cdiv, head_strides, launch, load_tile, num_programs_target, pad_dim,
                                  round_to, store_tile)
from ..core.triton_op import triton_op

# Tile sizes and launch options (``python -m subquad.tasks.bench.grid_conv --sweep`` times them); 8 warps
# keep a 64-token tile under 130 registers in the forward and 150 in the backward (sm_90 ptxas, bf16, d = 64,
# k = 5: no spills; the backward at 4 warps spills). backward: per_sm programs per SM that the chunks aim at, and
# at least min_tiles tiles per chunk, so that the partials stay a small part of the chunk's bytes ((k*k + 1) /
# (64 min_tiles) of its g and x for 16-bit inputs).
CONFIG = {
    "forward": dict(TILE_H=8, TILE_W=8, num_warps=8),
    "backward": dict(TILE_H=8, TILE_W=8, num_warps=8, per_sm=4, min_tiles=4),
    "reduce": dict(BLOCK_R=32, num_warps=4),
}


# --- tiles of the grid ----------------------------------------------------------------------

@triton.jit
def _tile(j, num_prefix, grid_h, grid_w, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """(rows, columns, token index of the frame's first token, the tile's token indices, which of them lie in
    the grid) of tile j; tiles in raster order per frame."""
    tiles_w = tl.cdiv(grid_w, TILE_W)
    tiles = tl.cdiv(grid_h, TILE_H) * tiles_w
    frame, tile = j // tiles, j % tiles
    offs = tl.arange(0, TILE_H * TILE_W)
    row = (tile // tiles_w) * TILE_H + offs // TILE_W
    col = (tile % tiles_w) * TILE_W + offs % TILE_W
    first = num_prefix + frame * grid_h * grid_w
    return row, col, first, first + row * grid_w + col, (row < grid_h) & (col < grid_w)


@triton.jit
def _shifted(base, stride_n, first, row, col, di, dj, grid_h, grid_w, offs_c, mc, ALIGN: tl.constexpr):
    """The fp32 tile of tokens (row + di, col + dj) of a frame, zero outside the grid (the zero padding)."""
    r, c = row + di, col + dj
    inside = (r >= 0) & (r < grid_h) & (c >= 0) & (c < grid_w)
    return load_tile(base, first + r * grid_w + c, offs_c, stride_n, inside, mc, ALIGN).to(tl.float32)


@triton.jit
def _conv(base, stride_n, taps_ptr, s_tap, chan, first, row, col, grid_h, grid_w, offs_c, mc, K: tl.constexpr,
          TOKENS: tl.constexpr, DP: tl.constexpr, ALIGN: tl.constexpr):
    """sum_ij w[chan, i, j] src[row + i - K//2, col + j - K//2] in fp32, the filter given as fp32 taps
    (K*K, C). The filter rows are a loop, not unrolled: K shifted tiles in flight at a time, not K*K, keep the
    registers in bounds."""
    acc = tl.zeros((TOKENS, DP), tl.float32)
    for i in range(K):
        for j in tl.static_range(K):
            w = tl.load(taps_ptr + (i * K + j) * s_tap + chan, mask=mc, other=0.0)
            acc += w[None, :] * _shifted(base, stride_n, first, row, col, i - K // 2, j - K // 2, grid_h, grid_w,
                                         offs_c, mc, ALIGN)
    return acc


@triton.jit
def _prefix_rows(src_base, s_src, dst_base, s_dst, num_prefix, offs_c, mc, COPY: tl.constexpr, TOKENS: tl.constexpr,
                 DP: tl.constexpr, ALIGN: tl.constexpr):
    """dst[:P] = src[:P] (COPY) or 0: the conv is 0 on the prefix rows."""
    for p0 in range(0, num_prefix, TOKENS):
        offs = p0 + tl.arange(0, TOKENS)
        m = offs < num_prefix
        if COPY:
            rows = load_tile(src_base, offs, offs_c, s_src, m, mc, ALIGN).to(tl.float32)
        else:
            rows = tl.zeros((TOKENS, DP), tl.float32)
        store_tile(dst_base, offs, offs_c, s_dst, m, mc, rows, ALIGN)


# --- kernels --------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["num_prefix", "grid_h", "grid_w", "grid_items", "items"])
def _forward_kernel(x_ptr, taps_ptr, b_ptr, r_ptr, o_ptr, num_prefix, grid_h, grid_w, grid_items, items, s_tap,
                    s_xb, s_xh, s_xn, s_rb, s_rh, s_rn, s_ob, s_oh, s_on,
                    D: tl.constexpr, DP: tl.constexpr, K: tl.constexpr, PER_HEAD: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                    ALIGN: tl.constexpr):
    """out = residual + bias + conv(x) for one tile of one (batch, head); item ``grid_items`` of a batch
    element (there when P > 0) is its prefix rows. ``items`` = tiles per batch element, prefix item included."""
    b = (tl.program_id(0) // items).to(tl.int64)        # batch offsets may pass 2^31 elements
    j = tl.program_id(0) % items
    h = tl.program_id(1)
    offs_c = tl.arange(0, DP)
    mc = offs_c < D
    chan = h * D + offs_c if PER_HEAD else offs_c
    r_base = r_ptr + b * s_rb + h * s_rh
    o_base = o_ptr + b * s_ob + h * s_oh
    if j == grid_items:
        _prefix_rows(r_base, s_rn, o_base, s_on, num_prefix, offs_c, mc, HAS_RES, TILE_H * TILE_W, DP, ALIGN)
    else:
        row, col, first, tok, inside = _tile(j, num_prefix, grid_h, grid_w, TILE_H, TILE_W)
        acc = _conv(x_ptr + b * s_xb + h * s_xh, s_xn, taps_ptr, s_tap, chan, first, row, col, grid_h, grid_w, offs_c,
                    mc, K, TILE_H * TILE_W, DP, ALIGN)
        if HAS_BIAS:
            acc += tl.load(b_ptr + chan, mask=mc, other=0.0).to(tl.float32)[None, :]
        if HAS_RES:
            acc += load_tile(r_base, tok, offs_c, s_rn, inside, mc, ALIGN).to(tl.float32)
        store_tile(o_base, tok, offs_c, s_on, inside, mc, acc, ALIGN)


@triton.jit(do_not_specialize=["num_prefix", "grid_h", "grid_w", "grid_items", "items", "total", "chunk"])
def _backward_kernel(g_ptr, x_ptr, taps_ptr, dx_ptr, part_ptr, num_prefix, grid_h, grid_w, grid_items, items, total,
                     chunk, s_tap, s_gb, s_gh, s_gn, s_xb, s_xh, s_xn, s_db, s_dh, s_dn, D: tl.constexpr,
                     DP: tl.constexpr, K: tl.constexpr, TAPS: tl.constexpr, PER_HEAD: tl.constexpr,
                     TILE_H: tl.constexpr, TILE_W: tl.constexpr, ALIGN: tl.constexpr):
    """For a chunk of the (batch, tile) items of one head: the fp32 partials [dw tap 0 .. tap K*K-1 | dbias],
    stored at part[head, chunk], and dx of the chunk's tiles, 0 on the prefix rows. Per tile, g is
    loaded once; per tap, the products g * x(shifted) are summed over the tile's tokens into row ``tap`` of a
    (TAPS, DP) register tile, and dx gathers the flipped tap times g(shifted). The shifted tiles overlap, so
    after the first taps they come from L1: g and x cross the memory system once."""
    split = tl.program_id(0)
    h = tl.program_id(1)
    offs_c = tl.arange(0, DP)
    mc = offs_c < D
    chan = h * D + offs_c if PER_HEAD else offs_c
    taps = tl.arange(0, TAPS)[:, None]
    lo = split * chunk
    hi = tl.minimum(lo + chunk, total)
    acc = tl.zeros((TAPS, DP), tl.float32)
    for item in range(lo, hi):
        b, j = (item // items).to(tl.int64), item % items
        g_base = g_ptr + b * s_gb + h * s_gh
        dx_base = dx_ptr + b * s_db + h * s_dh
        if j == grid_items:
            _prefix_rows(dx_base, s_dn, dx_base, s_dn, num_prefix, offs_c, mc, False, TILE_H * TILE_W, DP, ALIGN)
        else:
            row, col, first, tok, inside = _tile(j, num_prefix, grid_h, grid_w, TILE_H, TILE_W)
            g = load_tile(g_base, tok, offs_c, s_gn, inside, mc, ALIGN).to(tl.float32)
            acc += tl.where(taps == K * K, tl.sum(g, axis=0)[None, :], 0.0)
            x_base = x_ptr + b * s_xb + h * s_xh
            dx = tl.zeros((TILE_H * TILE_W, DP), tl.float32)
            for i in range(K):
                for jj in tl.static_range(K):
                    xs = _shifted(x_base, s_xn, first, row, col, i - K // 2, jj - K // 2, grid_h, grid_w, offs_c, mc,
                                  ALIGN)
                    acc += tl.where(taps == i * K + jj, tl.sum(g * xs, axis=0)[None, :], 0.0)
                    w = tl.load(taps_ptr + (K * K - 1 - (i * K + jj)) * s_tap + chan, mask=mc, other=0.0)
                    dx += w[None, :] * _shifted(g_base, s_gn, first, row, col, i - K // 2, jj - K // 2, grid_h, grid_w,
                                                offs_c, mc, ALIGN)
            store_tile(dx_base, tok, offs_c, s_dn, inside, mc, dx, ALIGN)
    part = part_ptr + (h * tl.num_programs(0) + split) * (K * K + 1) * DP
    tl.store(part + taps * DP + offs_c[None, :], acc, mask=taps < K * K + 1)


@triton.jit(do_not_specialize=["rows"])
def _reduce_kernel(part_ptr, dw_ptr, db_ptr, rows, D: tl.constexpr, DP: tl.constexpr, K: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    """Row ``tap`` of the filter gradients of channel group g (a head, or all heads for a shared filter):
    the sum of its ``rows`` partials, stored as dw[g*D + c, tap] (dbias[g*D + c] for tap K*K)."""
    g = tl.program_id(0)
    tap = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, DP)
    acc = tl.zeros((BLOCK_R, DP), tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + offs_r
        ptrs = part_ptr + ((g * rows + r)[:, None] * (K * K + 1) + tap) * DP + offs_c[None, :]
        acc += tl.load(ptrs, mask=(r < rows)[:, None], other=0.0)
    total = tl.sum(acc, axis=0)
    mc = offs_c < D
    chan = g * D + offs_c
    if tap < K * K:
        tl.store(dw_ptr + chan * (K * K) + tap, round_to(total, dw_ptr.dtype.element_ty), mask=mc)
    else:
        tl.store(db_ptr + chan, round_to(total, db_ptr.dtype.element_ty), mask=mc)


# --- launchers ------------------------------------------------------------------------------

def _items(num_prefix: int, frames: int, grid_h: int, grid_w: int, tile_h: int, tile_w: int) -> Tuple[int, int]:
    """(grid tiles, items) of one batch element: the tiles of every frame, plus one prefix item if P > 0."""
    grid_items = frames * cdiv(grid_h, tile_h) * cdiv(grid_w, tile_w)
    return grid_items, grid_items + (num_prefix > 0)


_TAPS: dict[int, tuple] = {}          # id(filter) -> (weak reference, version, taps)


def _taps(weight: Tensor) -> Tensor:
    """The filter as fp32 (k*k, C): a tap's channels are contiguous, so each tap is one vector load. Kept per
    filter tensor while its version counter is unchanged (optimizer steps, ``load_state_dict`` and EMA updates bump
    it; writes through ``.data`` do not, as for the modules' ``cached_for_inference``): four small ops saved per
    call in inference, and in the backward of a training step."""
    kept = _TAPS.get(id(weight))
    if kept is not None and kept[0]() is weight and kept[1] == weight._version:
        return kept[2]
    channels, k = weight.shape[0], weight.shape[-1]
    taps = torch.empty(k * k, channels, device=weight.device, dtype=torch.float32)
    taps.copy_(weight.detach().reshape(channels, -1).t())
    key = id(weight)
    _TAPS[key] = (weakref.ref(weight, lambda _: _TAPS.pop(key, None)), weight._version, taps)
    return taps


def _unit_channel(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _filter_grads_like(weight: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return weight.new_empty(weight.shape), (bias.new_empty(bias.shape) if bias is not None else weight.new_empty(0))


def _output_like(x: Tensor, residual: Optional[Tensor]) -> Tensor:
    """The output in the residual's layout (as residual + conv would be in PyTorch), else x's shape."""
    return torch.empty_like(_unit_channel(residual)) if residual is not None else x.new_empty(x.shape)


def grid_conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], num_prefix: int,
                      frames: int, grid_h: int, grid_w: int) -> Tensor:
    """residual + conv(x) (residual None: 0), in x's dtype; arguments as checked by ``depthwise_conv_on_grid``."""
    b, h, _, d = x.shape
    taps, out = _taps(weight), _output_like(x, residual)
    x, s_xb, s_xh, s_xn = head_strides(x)
    res, s_rb, s_rh, s_rn = head_strides(residual) if residual is not None else (x, 0, 0, 0)
    cfg = CONFIG["forward"]
    grid_items, items = _items(num_prefix, frames, grid_h, grid_w, cfg["TILE_H"], cfg["TILE_W"])
    launch(_forward_kernel, (b * items, h), x, taps, bias.contiguous() if bias is not None else x, res, out,
           num_prefix, grid_h, grid_w, grid_items, items, taps.stride(0), s_xb, s_xh, s_xn, s_rb, s_rh, s_rn,
           out.stride(0), out.stride(1), out.stride(2), D=d, DP=pad_dim(d), K=weight.shape[-1],
           PER_HEAD=taps.shape[1] == h * d, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
           ALIGN=row_alignment(x, res, out), **cfg)
    return out


def grid_conv_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], num_prefix: int, frames: int,
                       grid_h: int, grid_w: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx in x's dtype, dweight and dbias in the parameters' dtypes); dbias is empty when ``bias`` is None."""
    b, h, _, d = x.shape
    k, channels = weight.shape[-1], weight.shape[0]
    (grad, s_gb, s_gh, s_gn), (x, s_xb, s_xh, s_xn) = head_strides(grad), head_strides(x)
    taps = _taps(weight)
    dx = torch.empty_like(x)
    _, s_db, s_dh, s_dn = head_strides(dx)
    dp = pad_dim(d)
    cfg = CONFIG["backward"]
    grid_items, items = _items(num_prefix, frames, grid_h, grid_w, cfg["TILE_H"], cfg["TILE_W"])
    total = b * items
    chunk = max(cfg["min_tiles"], cdiv(total, cdiv(num_programs_target(x.device, cfg["per_sm"]), h)))
    splits = cdiv(total, chunk)
    part = x.new_empty(h, splits, k * k + 1, dp, dtype=torch.float32)
    launch(_backward_kernel, (splits, h), grad, x, taps, dx, part, num_prefix, grid_h, grid_w, grid_items, items,
           total, chunk, taps.stride(0), s_gb, s_gh, s_gn, s_xb, s_xh, s_xn, s_db, s_dh, s_dn, D=d, DP=dp, K=k,
           TAPS=triton.next_power_of_2(k * k + 1), PER_HEAD=channels == h * d, TILE_H=cfg["TILE_H"],
           TILE_W=cfg["TILE_W"], ALIGN=row_alignment(grad, x, dx), num_warps=cfg["num_warps"])
    dw, db = _filter_grads_like(weight, bias)
    groups = channels // d
    cfg = CONFIG["reduce"]
    launch(_reduce_kernel, (groups, k * k + (bias is not None)), part, dw, db if bias is not None else dw,
           h * splits // groups,
           D=d, DP=dp, K=k, BLOCK_R=cfg["BLOCK_R"], num_warps=cfg["num_warps"])
    return dx, dw, db


# --- the op: custom ops for torch.compile, an autograd.Function in eager mode ------------------------

def _forward_fake(x, weight, bias, residual, num_prefix, frames, grid_h, grid_w):
    return _output_like(_unit_channel(x), residual)


def _backward_fake(grad, x, weight, bias, num_prefix, frames, grid_h, grid_w):
    return (torch.empty_like(_unit_channel(x)), *_filter_grads_like(weight, bias))


def _gradients(run_backward, grad, saved, args, needs):
    """d residual = grad; the kernels run only if x, the filter or the bias need a gradient."""
    x, weight, bias = saved
    need_x, need_w, need_b, need_r = needs
    dx = dw = db = None
    if need_x or need_w or need_b:
        dx, dw, db = run_backward(grad, x, weight, bias if need_b else None, *args)
    return dx if need_x else None, dw if need_w else None, db if need_b else None, grad if need_r else None


_grid_conv = triton_op("grid_conv", grid_conv_forward, grid_conv_backward, num_tensors=4, forward_fake=_forward_fake,
                       backward_fake=_backward_fake, save=lambda inputs, outputs: inputs[:3], gradients=_gradients)


def depthwise_conv_on_grid_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], grid: Tuple[int, ...],
                                  num_prefix: int, residual: Optional[Tensor]) -> Tensor:
    """residual + depthwise conv of the grid tokens of x (see the module docstring)."""
    *frames, grid_h, grid_w = grid
    return _grid_conv(x, weight, bias, residual, num_prefix, frames[0] if frames else 1, grid_h, grid_w)
