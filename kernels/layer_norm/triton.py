"""LayerNorm after a residual add in Triton: one pass forward, one pass backward (plus a small reduction).

Rows of C channels (C = the model width), BLOCK_M rows per program, all C channels of a row in one tile:

  forward    s = x + y (rounded to s's dtype, as PyTorch's add), mean = sum(s) / C,
             rstd = 1 / sqrt(sum((s - mean)^2) / C + eps), out = (s - mean) * rstd * w + b
  backward   with s_hat = (s - mean) * rstd and g = w * d_out:
             ds_total = d_s + rstd * (g - s_hat * mean(g * s_hat) - mean(g))      (d_s: the gradient of s)
             dx = dy = ds_total;  dw = sum_rows d_out * s_hat;  db = sum_rows d_out

x, y and s are read and written once each, out written once, in fp32 arithmetic; mean and rstd (fp32, one per
row) are kept for the backward. A backward program walks a chunk of rows and holds its dw / db partials in
registers; a second kernel sums the programs' partials.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..core.dispatch import records_grad
from ..core.triton_common import cdiv, launch, num_programs_target, round_to

# Rows per program and warps, by the padded width: a tile of about 4096 fp32 values per operand.
TILE_ELEMENTS = 4096
REDUCE = dict(BLOCK_R=32, num_warps=4)


def _config(c: int) -> dict:
    block_c = triton.next_power_of_2(c)
    return dict(BLOCK_M=max(1, TILE_ELEMENTS // block_c), BLOCK_C=block_c, num_warps=4 if block_c <= 2048 else 8)


@triton.jit
def _rows(row0, rows, c, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """(row offsets, channel offsets, mask) of the tile of rows row0 .. row0 + BLOCK_M - 1."""
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    return offs_m.to(tl.int64), offs_c, (offs_m < rows)[:, None] & (offs_c < c)[None, :]


@triton.jit
def _normalized(s, mask, c, eps):
    """(s_hat, mean, rstd) of the rows of the fp32 tile s (zero outside the mask)."""
    mean = tl.sum(s, axis=1) / c
    centred = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / c + eps)
    return centred * rstd[:, None], mean, rstd


@triton.jit(do_not_specialize=["rows", "eps"])
def _add_layer_norm_kernel(x_ptr, y_ptr, w_ptr, b_ptr, s_ptr, out_ptr, stats_ptr, rows, c, eps,
                    HAS_Y: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SAVE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_m, offs_c, mask = _rows(tl.program_id(0) * BLOCK_M, rows, c, BLOCK_M, BLOCK_C)
    at = offs_m[:, None] * c + offs_c[None, :]
    s = tl.load(x_ptr + at, mask=mask, other=0.0)
    if HAS_Y:
        s = round_to(s.to(tl.float32) + tl.load(y_ptr + at, mask=mask, other=0.0).to(tl.float32),
                     s_ptr.dtype.element_ty)
        tl.store(s_ptr + at, s, mask=mask)
    s_hat, mean, rstd = _normalized(s.to(tl.float32), mask, c, eps)
    out = s_hat
    if HAS_W:
        out = out * tl.load(w_ptr + offs_c, mask=offs_c < c, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        out = out + tl.load(b_ptr + offs_c, mask=offs_c < c, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + at, round_to(out, out_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        in_rows = offs_m < rows
        tl.store(stats_ptr + offs_m, mean, mask=in_rows)
        tl.store(stats_ptr + rows + offs_m, rstd, mask=in_rows)


@triton.jit(do_not_specialize=["rows", "chunk"])
def _add_layer_norm_backward_kernel(dout_ptr, ds_ptr, s_ptr, w_ptr, stats_ptr, dx_ptr, dy_ptr, part_ptr, rows, c, chunk,
                     HAS_DS: tl.constexpr, HAS_W: tl.constexpr, HAS_DY: tl.constexpr, WEIGHT_GRADS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """ds_total of rows [pid * chunk, (pid + 1) * chunk) into dx (and dy), the chunk's fp32 partials of dw and
    db into part[pid] (rows 0 and 1) when WEIGHT_GRADS; stats: the forward's (mean, rstd), (2, rows)."""
    pid = tl.program_id(0)
    offs_c = tl.arange(0, BLOCK_C)
    mc = offs_c < c
    w = tl.load(w_ptr + offs_c, mask=mc, other=0.0).to(tl.float32) if HAS_W else 1.0
    dw = tl.zeros((BLOCK_C,), tl.float32)
    db = tl.zeros((BLOCK_C,), tl.float32)
    lo = pid * chunk
    for row0 in range(lo, tl.minimum(lo + chunk, rows), BLOCK_M):
        offs_m, offs_c, mask = _rows(row0, tl.minimum(lo + chunk, rows), c, BLOCK_M, BLOCK_C)
        in_rows = offs_m < tl.minimum(lo + chunk, rows)
        at = offs_m[:, None] * c + offs_c[None, :]
        mean = tl.load(stats_ptr + offs_m, mask=in_rows, other=0.0)
        rstd = tl.load(stats_ptr + rows + offs_m, mask=in_rows, other=0.0)
        s_hat = tl.where(mask, (tl.load(s_ptr + at, mask=mask, other=0.0).to(tl.float32) - mean[:, None])
                         * rstd[:, None], 0.0)
        dout = tl.load(dout_ptr + at, mask=mask, other=0.0).to(tl.float32)
        g = dout * w
        ds = (g - s_hat * (tl.sum(g * s_hat, axis=1) / c)[:, None] - (tl.sum(g, axis=1) / c)[:, None]) * rstd[:, None]
        if HAS_DS:
            ds += tl.load(ds_ptr + at, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + at, round_to(ds, dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DY:
            tl.store(dy_ptr + at, round_to(ds, dy_ptr.dtype.element_ty), mask=mask)
        if WEIGHT_GRADS:
            dw += tl.sum(dout * s_hat, axis=0)
            db += tl.sum(dout, axis=0)
    if WEIGHT_GRADS:
        tl.store(part_ptr + pid * 2 * c + offs_c, dw, mask=mc)
        tl.store(part_ptr + (pid * 2 + 1) * c + offs_c, db, mask=mc)


@triton.jit(do_not_specialize=["programs"])
def _weight_grads_kernel(part_ptr, dw_ptr, db_ptr, programs, c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dw (which = 0) or db (which = 1) of channels [pid * BLOCK_C, ...): the sum of the programs' partials."""
    which = tl.program_id(1)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for r0 in range(0, programs, BLOCK_R):
        r = r0 + offs_r
        acc += tl.load(part_ptr + ((r * 2 + which) * c)[:, None] + offs_c[None, :],
                       mask=(r < programs)[:, None] & (offs_c < c)[None, :], other=0.0)
    total = tl.sum(acc, axis=0)
    if which == 0:
        tl.store(dw_ptr + offs_c, round_to(total, dw_ptr.dtype.element_ty), mask=offs_c < c)
    else:
        tl.store(db_ptr + offs_c, round_to(total, db_ptr.dtype.element_ty), mask=offs_c < c)


# --- launchers ------------------------------------------------------------------------------

def _forward(x: Tensor, y: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
             out_dtype: torch.dtype, save: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(s, out, stats), each row-contiguous: s is x itself when y is None, stats the rows' (mean, rstd), (2, rows)
    fp32, when ``save`` (else None)."""
    c = x.shape[-1]
    x = x.contiguous()
    if y is not None:
        y = y.contiguous()
        s = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(x.dtype, y.dtype))
    else:
        s = x
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    rows = x.numel() // c
    stats = torch.empty(2, rows, device=x.device, dtype=torch.float32) if save else None
    cfg = _config(c)
    launch(_add_layer_norm_kernel, (cdiv(rows, cfg["BLOCK_M"]),), x, y if y is not None else x,
           weight if weight is not None else x, bias if bias is not None else x, s, out,
           stats if save else out, rows, c, eps, HAS_Y=y is not None, HAS_W=weight is not None,
           HAS_B=bias is not None, SAVE=save, **cfg)
    return s, out, stats


def _backward(dout: Tensor, ds: Optional[Tensor], s: Tensor, weight: Optional[Tensor], stats: Tensor, dtypes: Tuple,
              weight_grads: bool) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dx, dy, dw, db) for ``dtypes`` = those of (x, y, weight, bias) (None for an absent one): dy is dx when y has
    x's dtype, dw and db are None unless ``weight_grads``."""
    x_dtype, y_dtype, w_dtype, b_dtype = dtypes
    c = s.shape[-1]
    rows = s.numel() // c
    dout = dout.contiguous()
    ds = ds.contiguous() if ds is not None else None
    dx = torch.empty(s.shape, device=s.device, dtype=x_dtype)
    dy = torch.empty(s.shape, device=s.device, dtype=y_dtype) if y_dtype not in (None, x_dtype) else None
    cfg = _config(c)
    programs = max(1, min(cdiv(rows, cfg["BLOCK_M"]), num_programs_target(s.device)))
    chunk = cdiv(cdiv(rows, programs), cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    programs = cdiv(rows, chunk)
    part = torch.empty(programs, 2, c, device=s.device, dtype=torch.float32) if weight_grads else dx
    launch(_add_layer_norm_backward_kernel, (programs,), dout, ds if ds is not None else dout, s,
           weight if weight is not None else s, stats, dx, dy if dy is not None else dx, part, rows, c, chunk,
           HAS_DS=ds is not None, HAS_W=weight is not None, HAS_DY=dy is not None, WEIGHT_GRADS=weight_grads,
           **cfg)
    if y_dtype == x_dtype:
        dy = dx
    if not weight_grads:
        return dx, dy, None, None
    dw = torch.empty(c, device=s.device, dtype=w_dtype or torch.float32)
    db = torch.empty(c, device=s.device, dtype=b_dtype or torch.float32)
    block_c = min(256, cfg["BLOCK_C"])
    launch(_weight_grads_kernel, (cdiv(c, block_c), 2), part, dw, db, programs, c, BLOCK_C=block_c, **REDUCE)
    return dx, dy, dw, db


class _AddLayerNorm(torch.autograd.Function):
    """(s, out) = (x + y, LN(x + y)) when y is given, else out = LN(x)."""

    @staticmethod
    def forward(ctx, x, y, weight, bias, eps, out_dtype):
        s, out, stats = _forward(x, y, weight, bias, eps, out_dtype, save=True)
        ctx.save_for_backward(s, weight, stats)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (x, y, weight, bias))
        ctx.set_materialize_grads(False)
        return (s, out) if y is not None else out

    @staticmethod
    def backward(ctx, *grads):
        ds, dout = grads if len(grads) == 2 else (None, grads[0])
        s, weight, stats = ctx.saved_tensors
        need_x, need_y, need_w, need_b = ctx.needs_input_grad[:4]
        if dout is None:                # only s was used: its gradient passes through the add
            return ds if need_x else None, ds.to(ctx.dtypes[1]) if need_y else None, None, None, None, None
        dx, dy, dw, db = _backward(dout, ds, s, weight, stats, ctx.dtypes, need_w or need_b)
        return (dx if need_x else None, dy if need_y else None, dw if need_w else None, db if need_b else None,
                None, None)


def add_layer_norm_triton(x: Tensor, y: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                          eps: float, out_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(x + y, LayerNorm(x + y) in ``out_dtype``) of tensors (..., C) (see the module docstring); x and LN(x)
    when y is None."""
    if x.numel() == 0:
        s = x if y is None else x + y
        return s, s.to(out_dtype)
    if records_grad(x, y, weight, bias):
        result = _AddLayerNorm.apply(x, y, weight, bias, eps, out_dtype)
        return result if y is not None else (x, result)
    s, out, _ = _forward(x, y, weight, bias, eps, out_dtype, save=False)
    return s if y is not None else x, out
