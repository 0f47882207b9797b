"""LayerNorm after a residual add in Triton: one pass forward, one pass backward (plus a small reduction).

Rows of C channels (C = the model width), BLOCK_M rows per program, all C channels of a row in one tile. The
parameters w, b and the gate g are each shared by all rows ((C,)) or one per group of ``group_rows`` consecutive
rows ((G, C): one per sample, DiT's adaLN), read through a group stride that is 0 when shared:

  forward    s = x + g * y (rounded to s's dtype, as PyTorch's add), mean = sum(s) / C,
             rstd = 1 / sqrt(sum((s - mean)^2) / C + eps), out = (s - mean) * rstd * w + b
  backward   with s_hat = (s - mean) * rstd and h = w * d_out:
             ds_total = d_s + rstd * (h - s_hat * mean(h * s_hat) - mean(h))      (d_s: the gradient of s)
             dx = ds_total, dy = g * ds_total;  dw = sum d_out * s_hat, db = sum d_out, dg = sum ds_total * y
             (the sums over a group's rows, or all rows for a shared parameter)

x, y and s are read and written once each, out written once, in fp32 arithmetic; mean and rstd (fp32, one per
row) are kept for the backward, and so is s, or s_hat in out's dtype where that is narrower (bf16 under autocast:
half the bytes of the float32 stream, which is then free once the next block has read it; the backward reads
s_hat rounded once, an error of about 2^-9 per term, the size of the 16-bit rounding of d_out itself). A backward
program walks a chunk of one group's rows and holds its dw, db, dg partials in registers; one more launch sums
every requested partial per group (then a shared parameter's over its groups, which are one unless another
parameter is per sample). s may be narrower than x + g * y's type (``residual_dtype``): rounded once there.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..core.dispatch import records_grad
from ..core.triton_common import cdiv, launch, next_power_of_2, num_programs_target, round_to
from .reference import add_layer_norm_reference, per_sample

# Rows per program and warps, by the padded width: a tile of about 4096 fp32 values per operand.
TILE_ELEMENTS = 4096
REDUCE = dict(BLOCK_R=32, num_warps=4)
PARTIALS = 3          # dw, db, dg


def _config(c: int) -> dict:
    block_c = next_power_of_2(c)
    return dict(BLOCK_M=max(1, TILE_ELEMENTS // block_c), BLOCK_C=block_c, num_warps=4 if block_c <= 2048 else 8)


@triton.jit
def _rows(row0, end, c, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """(row offsets, channel offsets, mask) of the tile of rows row0 .. row0 + BLOCK_M - 1 below ``end``."""
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    return offs_m.to(tl.int64), offs_c, (offs_m < end)[:, None] & (offs_c < c)[None, :]


@triton.jit
def _param(ptr, group, s_group, offs_c, mask):
    """A parameter's fp32 values for the rows' groups (``group`` a scalar or a column of row groups)."""
    return tl.load(ptr + group * s_group + offs_c, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _normalized(s, mask, c, eps):
    """(s_hat, mean, rstd) of the rows of the fp32 tile s (zero outside the mask)."""
    mean = tl.sum(s, axis=1) / c
    centred = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / c + eps)
    return centred * rstd[:, None], mean, rstd


@triton.jit(do_not_specialize=["rows", "eps", "group_rows"])
def _add_layer_norm_kernel(x_ptr, y_ptr, g_ptr, w_ptr, b_ptr, s_ptr, out_ptr, stats_ptr, hat_ptr, rows, c, eps,
                           group_rows, s_gg, s_wg, s_bg, HAS_Y: tl.constexpr, HAS_G: tl.constexpr, HAS_W: tl.constexpr,
                           HAS_B: tl.constexpr, SAVE: tl.constexpr, SAVE_HAT: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    offs_m, offs_c, mask = _rows(tl.program_id(0) * BLOCK_M, rows, c, BLOCK_M, BLOCK_C)
    at = offs_m[:, None] * c + offs_c[None, :]
    group = (offs_m // group_rows)[:, None]
    s = tl.load(x_ptr + at, mask=mask, other=0.0)
    if HAS_Y:
        y = tl.load(y_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if HAS_G:
            y = y * _param(g_ptr, group, s_gg, offs_c[None, :], mask)
        s = round_to(s.to(tl.float32) + y, s_ptr.dtype.element_ty)
        tl.store(s_ptr + at, s, mask=mask)
    s_hat, mean, rstd = _normalized(s.to(tl.float32), mask, c, eps)
    if SAVE_HAT:
        tl.store(hat_ptr + at, round_to(s_hat, hat_ptr.dtype.element_ty), mask=mask)
    out = s_hat
    if HAS_W:
        out = out * _param(w_ptr, group, s_wg, offs_c[None, :], mask)
    if HAS_B:
        out = out + _param(b_ptr, group, s_bg, offs_c[None, :], mask)
    tl.store(out_ptr + at, round_to(out, out_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        in_rows = offs_m < rows
        tl.store(stats_ptr + offs_m, mean, mask=in_rows)
        tl.store(stats_ptr + rows + offs_m, rstd, mask=in_rows)


@triton.jit(do_not_specialize=["rows", "group_rows", "chunk"])
def _add_layer_norm_backward_kernel(dout_ptr, ds_ptr, s_ptr, y_ptr, g_ptr, w_ptr, stats_ptr, dx_ptr, dy_ptr, part_ptr,
                                    rows, c, group_rows, chunk, s_gg, s_wg, HAS_DS: tl.constexpr, HAS_G: tl.constexpr,
                                    HAS_W: tl.constexpr, HAS_DY: tl.constexpr, PARAM_GRADS: tl.constexpr,
                                    HAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """ds_total of rows [chunk k of group j] into dx (and g * ds_total into dy) for program (j, k); the chunk's
    fp32 partials of dw, db, dg into part[j, k] when PARAM_GRADS; stats: the forward's (mean, rstd), (2, rows);
    s_ptr: s, or s_hat itself when HAT."""
    group = tl.program_id(0)
    lo = group * group_rows + tl.program_id(1) * chunk
    end = tl.minimum(lo + chunk, (group + 1) * group_rows)
    offs_c = tl.arange(0, BLOCK_C)
    mc = offs_c < c
    w = _param(w_ptr, group, s_wg, offs_c, mc) if HAS_W else 1.0
    gate = _param(g_ptr, group, s_gg, offs_c, mc) if HAS_G else 1.0
    dw = tl.zeros((BLOCK_C,), tl.float32)
    db = tl.zeros((BLOCK_C,), tl.float32)
    dg = tl.zeros((BLOCK_C,), tl.float32)
    for row0 in range(lo, end, BLOCK_M):
        offs_m, offs_c, mask = _rows(row0, end, c, BLOCK_M, BLOCK_C)
        in_rows = offs_m < end
        at = offs_m[:, None] * c + offs_c[None, :]
        rstd = tl.load(stats_ptr + rows + offs_m, mask=in_rows, other=0.0)
        if HAT:
            s_hat = tl.load(s_ptr + at, mask=mask, other=0.0).to(tl.float32)
        else:
            mean = tl.load(stats_ptr + offs_m, mask=in_rows, other=0.0)
            s_hat = tl.where(mask, (tl.load(s_ptr + at, mask=mask, other=0.0).to(tl.float32) - mean[:, None])
                             * rstd[:, None], 0.0)
        dout = tl.load(dout_ptr + at, mask=mask, other=0.0).to(tl.float32)
        h = dout * w
        ds = (h - s_hat * (tl.sum(h * s_hat, axis=1) / c)[:, None] - (tl.sum(h, axis=1) / c)[:, None]) * rstd[:, None]
        if HAS_DS:
            ds += tl.load(ds_ptr + at, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + at, round_to(ds, dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DY:
            tl.store(dy_ptr + at, round_to(ds * gate, dy_ptr.dtype.element_ty), mask=mask)
        if PARAM_GRADS:
            dw += tl.sum(dout * s_hat, axis=0)
            db += tl.sum(dout, axis=0)
            if HAS_G:
                dg += tl.sum(ds * tl.load(y_ptr + at, mask=mask, other=0.0).to(tl.float32), axis=0)
    if PARAM_GRADS:
        part = part_ptr + (group * tl.num_programs(1) + tl.program_id(1)) * 3 * c + offs_c
        tl.store(part, dw, mask=mc)
        tl.store(part + c, db, mask=mc)
        tl.store(part + 2 * c, dg, mask=mc)


@triton.jit(do_not_specialize=["per_output"])
def _param_grads_kernel(part_ptr, grad_ptr, per_output, which0, which1, which2, c, BLOCK_R: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """Row o of the j-th requested gradient (j = pid(2); its partial is which_j: 0 dw, 1 db, 2 dg), channels
    [pid(1) * BLOCK_C, ...), into grad[j, o]: the sum of that partial over the programs o * per_output .. (o + 1) *
    per_output - 1."""
    o = tl.program_id(0)
    j = tl.program_id(2)
    which = tl.where(j == 0, which0, tl.where(j == 1, which1, which2))
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for r0 in range(0, per_output, BLOCK_R):
        r = r0 + offs_r
        acc += tl.load(part_ptr + (((o * per_output + r) * 3 + which) * c)[:, None] + offs_c[None, :],
                       mask=(r < per_output)[:, None] & (offs_c < c)[None, :], other=0.0)
    tl.store(grad_ptr + (j * tl.num_programs(0) + o) * c + offs_c, tl.sum(acc, axis=0), mask=offs_c < c)


# --- launchers ------------------------------------------------------------------------------

def _group_stride(p: Optional[Tensor]) -> int:
    """A parameter's stride between groups: 0 when shared by all rows ((C,)) or absent."""
    return p.stride(0) if p is not None and p.dim() == 2 else 0


def _forward(x: Tensor, y: Optional[Tensor], gate: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
             eps: float, out_dtype: torch.dtype, residual_dtype: torch.dtype, save: bool
             ) -> Tuple[Tensor, Tensor, Optional[Tuple[Tensor, Tensor]]]:
    """(s, out, kept) of row-contiguous x and y: s (in ``residual_dtype``) is x itself when y is None; when
    ``save``, kept = (s, or s_hat in out's dtype where that is narrower than s's; the rows' (mean, rstd), (2, rows)
    fp32), else None."""
    c = x.shape[-1]
    s = torch.empty(x.shape, device=x.device, dtype=residual_dtype) if y is not None else x
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    rows = x.numel() // c
    stats = torch.empty(2, rows, device=x.device, dtype=torch.float32) if save else None
    hat = torch.empty_like(out) if save and out.element_size() < s.element_size() else None
    cfg = _config(c)
    launch(_add_layer_norm_kernel, (cdiv(rows, cfg["BLOCK_M"]),), x, y if y is not None else x,
           _or(gate, x), _or(weight, x), _or(bias, x), s, out, _or(stats, out), _or(hat, out), rows, c, eps,
           _group_rows(x, _shapes(gate, weight, bias)), _group_stride(gate), _group_stride(weight), _group_stride(bias),
           HAS_Y=y is not None, HAS_G=gate is not None, HAS_W=weight is not None, HAS_B=bias is not None, SAVE=save,
           SAVE_HAT=hat is not None, **cfg)
    return s, out, (_or(hat, s), stats) if save else None


def _or(t: Optional[Tensor], other: Tensor) -> Tensor:
    """t, or ``other`` as a placeholder pointer for an absent tensor (the kernel does not read it)."""
    return t if t is not None else other


def _group_rows(x: Tensor, shapes: Tuple[Optional[torch.Size], ...]) -> int:
    """Rows per parameter group: those of one sample when a parameter is per sample ((B, C)), else all rows."""
    per_sample = any(shape is not None and len(shape) == 2 for shape in shapes)
    return x.numel() // x.shape[-1] // (x.shape[0] if per_sample else 1)


def _shapes(*params: Optional[Tensor]) -> Tuple[Optional[torch.Size], ...]:
    return tuple(None if p is None else p.shape for p in params)


def _backward(dout: Tensor, ds: Optional[Tensor], s: Tensor, y: Optional[Tensor], gate: Optional[Tensor],
              weight: Optional[Tensor], stats: Tensor, dtypes: Tuple, shapes: Tuple, needs: Tuple[bool, ...],
              hat: bool) -> Tuple:
    """(dx, dy, dgate, dweight, dbias) with ``s`` the forward's kept s, or s_hat where ``hat``; ``dtypes`` and
    ``shapes`` are those of (x, y, gate, weight, bias) (None for an absent one), ``needs`` says which of gate,
    weight, bias need a gradient (None for the others); dy is dx when y has x's dtype and there is no gate."""
    x_dtype, y_dtype = dtypes[:2]
    c = s.shape[-1]
    rows = s.numel() // c
    dout = dout.contiguous()
    ds = ds.contiguous() if ds is not None else None
    dx = torch.empty(s.shape, device=s.device, dtype=x_dtype)
    separate_dy = y_dtype is not None and (y_dtype != x_dtype or gate is not None)
    dy = torch.empty(s.shape, device=s.device, dtype=y_dtype) if separate_dy else None
    cfg = _config(c)
    group_rows = _group_rows(s, shapes[2:])
    groups = rows // group_rows
    splits = max(1, min(cdiv(group_rows, cfg["BLOCK_M"]), cdiv(num_programs_target(s.device), groups)))
    chunk = cdiv(cdiv(group_rows, splits), cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    splits = cdiv(group_rows, chunk)
    part = torch.empty(groups * splits, PARTIALS, c, device=s.device, dtype=torch.float32) if any(needs) else dx
    launch(_add_layer_norm_backward_kernel, (groups, splits), dout, _or(ds, dout), s, _or(y, s), _or(gate, s),
           _or(weight, s), stats, dx, _or(dy, dx), part, rows, c, group_rows, chunk, _group_stride(gate),
           _group_stride(weight), HAS_DS=ds is not None, HAS_G=gate is not None, HAS_W=weight is not None,
           HAS_DY=dy is not None, PARAM_GRADS=any(needs), HAT=hat, **cfg)
    if y_dtype is not None and not separate_dy:
        dy = dx
    # partials in the kernel's order (dw, db, dg); the parameters in the op's order (gate, weight, bias)
    return (dx, dy, *_param_grads(part, [which if needs[i] else None for i, which in enumerate((2, 0, 1))], groups,
                                  splits, dtypes[2:], shapes[2:]))


def _param_grads(part: Tensor, which: list, groups: int, splits: int, dtypes: Tuple, shapes: Tuple) -> list:
    """The gradients of (gate, weight, bias) from the backward's partials (``which``: each one's partial index, None
    for no gradient), one launch for all: each partial summed per group, then over the groups for a shared
    parameter ((C,)), in the parameter's dtype."""
    wanted = [i for i, w in enumerate(which) if w is not None]
    if not wanted:
        return [None, None, None]
    c = part.shape[-1]
    sums = torch.empty(len(wanted), groups, c, device=part.device, dtype=torch.float32)
    block_c = min(256, next_power_of_2(c))
    picks = [which[i] for i in wanted] + [0] * (3 - len(wanted))
    launch(_param_grads_kernel, (groups, cdiv(c, block_c), len(wanted)), part, sums, splits, *picks, c,
           BLOCK_C=block_c, **REDUCE)
    grads = [None, None, None]
    for j, i in enumerate(wanted):
        grad = sums[j] if len(shapes[i]) == 2 else (sums[j, 0] if groups == 1 else sums[j].sum(0))
        grads[i] = grad.to(dtypes[i])
    return grads


class _AddLayerNorm(torch.autograd.Function):
    """(s, out) = (x + gate * y, LN(s) * weight + bias) when y is given, else out = LN(x) * weight + bias."""

    @staticmethod
    def forward(ctx, x, y, gate, weight, bias, eps, out_dtype, residual_dtype):
        s, out, (kept, stats) = _forward(x, y, gate, weight, bias, eps, out_dtype, residual_dtype, save=True)
        ctx.save_for_backward(kept, y if gate is not None else None, gate, weight, stats)
        ctx.hat = kept is not s
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (x, y, gate, weight, bias))
        ctx.shapes = _shapes(x, y, gate, weight, bias)
        ctx.set_materialize_grads(False)
        return (s, out) if y is not None else out

    @staticmethod
    def backward(ctx, *grads):
        ds, dout = grads if len(grads) == 2 else (None, grads[0])
        kept, y, gate, weight, stats = ctx.saved_tensors
        need_x, need_y, need_g, need_w, need_b = ctx.needs_input_grad[:5]
        if dout is None:                # only s was used: its gradient passes through the add
            dy = ds * per_sample(gate, ds) if gate is not None else ds
            dg = _per_group_sum(ds * y, gate) if need_g else None
            return (ds if need_x else None, dy.to(ctx.dtypes[1]) if need_y else None,
                    dg.to(ctx.dtypes[2]) if need_g else None, None, None, None, None, None)
        dx, dy, dg, dw, db = _backward(dout, ds, kept, y, gate, weight, stats, ctx.dtypes, ctx.shapes,
                                       (need_g, need_w, need_b), ctx.hat)
        return dx if need_x else None, dy if need_y else None, dg, dw, db, None, None, None


def _per_group_sum(t: Tensor, p: Tensor) -> Tensor:
    """t (B, ..., C) summed to the parameter p's shape: over each sample's rows for (B, C), all rows for (C,)."""
    return t.reshape(p.shape[0], -1, p.shape[-1]).sum(1) if p.dim() == 2 else t.reshape(-1, p.shape[-1]).sum(0)


def add_layer_norm_triton(x: Tensor, y: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                          eps: float, out_dtype: torch.dtype, gate: Optional[Tensor],
                          residual_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(x + gate * y in ``residual_dtype``, LayerNorm(x + gate * y) * weight + bias in ``out_dtype``) of tensors
    (B, ..., C), the parameters (C,) or per sample (B, C) (see the module docstring); x and LN(x) * weight + bias
    when y is None. The dtypes are the front door's (``add_layer_norm``)."""
    if x.numel() == 0:
        return add_layer_norm_reference(x, y, weight, bias, eps, out_dtype, gate, residual_dtype)
    # the kernels read rows of x and y and the parameters' channels with unit stride
    rows_x, y = x.contiguous(), y.contiguous() if y is not None else None
    gate, weight, bias = (p if p is None or p.stride(-1) == 1 else p.contiguous() for p in (gate, weight, bias))
    if records_grad(x, y, gate, weight, bias):
        result = _AddLayerNorm.apply(rows_x, y, gate, weight, bias, eps, out_dtype, residual_dtype)
        return result if y is not None else (x, result)
    s, out, _ = _forward(rows_x, y, gate, weight, bias, eps, out_dtype, residual_dtype, save=False)
    return s if y is not None else x, out
