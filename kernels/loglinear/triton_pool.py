"""LLSA's pooling in Triton (Zhou et al. 2025, Sec. 3.1): the block means of q, k, v at every level and the
keys / values buffers the core reads (``block_sparse.with_pooled_keys``' layout), in one launch per level;
and the backward's spreading of the pooled rows' gradients over their blocks' tokens in one launch.

Forward: one program per finest block (x batch * head) reads its tokens once, writes their float32 means
(the selection's pooled q, k and the coarser levels' inputs), copies the tokens of k, v into the buffers and
writes the pooled row of k, v there; extra programs zero the buffers' padding and null rows. Each coarser
level: one program per block averages its children's means (weighted by their token counts). Backward: one
program per finest block adds to its tokens' gradient the gradient of the pooled row of each of its
ancestors (itself at level 1) divided by that block's token count.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..core.compile_constant import compile_constant
from ..core.triton_common import launch, strides
from .block_sparse import pooled_key_tiles, pooled_tile_slots
from .plan import block_hierarchy


@compile_constant
def pooling_tables(grid: tuple[int, int], side: int, levels: int, num_prefix: int, device: torch.device) -> tuple:
    """What the kernels read, per grid: each level's buffer row of every block (n_l,) int32; the buffer rows
    to zero (padding slots and the null tile), padded to whole tiles by repeating the last one; each level's
    token counts (n_l,) float32 and children (n_{l+1}, s*s) int32; the buffer row of each finest block's
    ancestor at every level and 1 / its count, (levels, n_1)."""
    hierarchy = block_hierarchy(grid, side, levels, device)
    t = side * side
    start = num_prefix + hierarchy.layouts[0].num_tokens
    buffer_rows, zero = [], []
    for level in range(levels):
        slots = pooled_tile_slots(hierarchy, level)[0].flatten()
        rows = torch.arange(start, start + slots.numel(), device=device)
        block_row = torch.empty(hierarchy.num_blocks(level), dtype=torch.long, device=device)
        block_row[slots[slots >= 0]] = rows[slots >= 0]
        buffer_rows.append(block_row.to(torch.int32))
        zero.append(rows[slots < 0])
        start += slots.numel()
    zero.append(torch.arange(start, start + t, device=device))                # the null tile
    zero = torch.cat(zero)
    zero = torch.cat([zero, zero[-1:].expand(-zero.numel() % t)]).to(torch.int32)
    counts = tuple(c.float() for c in hierarchy.counts)
    children = tuple(c.to(torch.int32) for c in hierarchy.children)
    ancestor_rows = torch.stack([buffer_rows[l].long()[hierarchy.ancestor[l]] for l in range(levels)]).to(torch.int32)
    ancestor_scale = torch.stack([1 / counts[l][hierarchy.ancestor[l]] for l in range(levels)])
    return tuple(buffer_rows), zero, counts, children, ancestor_rows, ancestor_scale


@triton.jit(do_not_specialize=["n_blocks", "H", "Nq"])
def _pool_finest_kernel(Q, K, V, KB, VB, PQ, PK, PV, TileRows, BufferRows, ZeroRows, Counts, n_blocks, H, Nq,
                        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sbb, sbh, sbn, scb, sch, scn,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr):
    block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols[None, :] < HEAD_DIM
    if block >= n_blocks:                        # zero T padding / null rows of the buffers
        rows = tl.load(ZeroRows + (block - n_blocks) * T + tl.arange(0, T)).to(tl.int64)
        zeros = tl.zeros([T, BLOCK_D], dtype=KB.dtype.element_ty)
        tl.store(KB + b * sbb + h * sbh + rows[:, None] * sbn + cols[None, :], zeros, mask=col_ok)
        tl.store(VB + b * scb + h * sch + rows[:, None] * scn + cols[None, :], zeros, mask=col_ok)
        return
    rows = tl.load(TileRows + block * T + tl.arange(0, T)).to(tl.int64)
    real = (rows[:, None] < Nq) & col_ok
    scale = 1.0 / tl.load(Counts + block)
    out = bh * n_blocks * HEAD_DIM + block * HEAD_DIM + cols
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + cols[None, :], mask=real, other=0.0)
    tl.store(PQ + out, tl.sum(q.to(tl.float32), 0) * scale, mask=cols < HEAD_DIM)
    row = tl.load(BufferRows + block).to(tl.int64)
    k = tl.load(K + b * skb + h * skh + rows[:, None] * skn + cols[None, :], mask=real, other=0.0)
    k_mean = tl.sum(k.to(tl.float32), 0) * scale
    tl.store(PK + out, k_mean, mask=cols < HEAD_DIM)
    tl.store(KB + b * sbb + h * sbh + rows[:, None] * sbn + cols[None, :], k, mask=real)
    tl.store(KB + b * sbb + h * sbh + row * sbn + cols, k_mean.to(KB.dtype.element_ty), mask=cols < HEAD_DIM)
    v = tl.load(V + b * svb + h * svh + rows[:, None] * svn + cols[None, :], mask=real, other=0.0)
    v_mean = tl.sum(v.to(tl.float32), 0) * scale
    tl.store(PV + out, v_mean, mask=cols < HEAD_DIM)
    tl.store(VB + b * scb + h * sch + rows[:, None] * scn + cols[None, :], v, mask=real)
    tl.store(VB + b * scb + h * sch + row * scn + cols, v_mean.to(VB.dtype.element_ty), mask=cols < HEAD_DIM)


@triton.jit(do_not_specialize=["n_fine", "n_blocks", "H"])
def _pool_parents_kernel(FQ, FK, FV, PQ, PK, PV, KB, VB, Children, FineCounts, Counts, BufferRows, n_fine,
                         n_blocks, H, sbb, sbh, sbn, scb, sch, scn,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr):
    block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    cols = tl.arange(0, BLOCK_D)
    kids = tl.load(Children + block * T + tl.arange(0, T))
    weight = tl.load(FineCounts + kids, mask=kids >= 0, other=0.0) / tl.load(Counts + block)
    fine = bh * n_fine * HEAD_DIM + kids[:, None] * HEAD_DIM + cols[None, :]
    real = (kids[:, None] >= 0) & (cols[None, :] < HEAD_DIM)
    out = bh * n_blocks * HEAD_DIM + block * HEAD_DIM + cols
    row = tl.load(BufferRows + block).to(tl.int64)
    tl.store(PQ + out, tl.sum(tl.load(FQ + fine, mask=real, other=0.0) * weight[:, None], 0), mask=cols < HEAD_DIM)
    k_mean = tl.sum(tl.load(FK + fine, mask=real, other=0.0) * weight[:, None], 0)
    tl.store(PK + out, k_mean, mask=cols < HEAD_DIM)
    tl.store(KB + b * sbb + h * sbh + row * sbn + cols, k_mean.to(KB.dtype.element_ty), mask=cols < HEAD_DIM)
    v_mean = tl.sum(tl.load(FV + fine, mask=real, other=0.0) * weight[:, None], 0)
    tl.store(PV + out, v_mean, mask=cols < HEAD_DIM)
    tl.store(VB + b * scb + h * sch + row * scn + cols, v_mean.to(VB.dtype.element_ty), mask=cols < HEAD_DIM)


def pool_into_buffers(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int], num_prefix: int, side: int,
                      levels: int) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The keys and values buffers of ``block_sparse.with_pooled_keys`` (tokens, every level's pooled rows,
    zero padding and null rows) and the float32 block means of q, k, v per level, finest first, each
    (3, B, h, n_l, d)."""
    b, h, _, d = q.shape
    rows, _, _, _, _, tile_rows = pooled_key_tiles(grid, side, levels, num_prefix, q.device)
    buffer_rows, zero, counts, children, _, _ = pooling_tables(grid, side, levels, num_prefix, q.device)
    t = side * side
    total = q.shape[2] + sum(r.numel() for r in rows) + t
    keys, values = k.new_empty(b, h, total, d), v.new_empty(b, h, total, v.shape[-1])
    if num_prefix:
        keys[:, :, :num_prefix] = k[:, :, :num_prefix]
        values[:, :, :num_prefix] = v[:, :, :num_prefix]
    pooled = [q.new_empty(3, b, h, c.numel(), d, dtype=torch.float32) for c in counts]
    consts = dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), T=t)
    n1 = counts[0].numel()
    launch(_pool_finest_kernel, (n1 + zero.numel() // t, b * h), q, k, v, keys, values, *pooled[0], tile_rows,
           buffer_rows[0], zero, counts[0], n1, h, q.shape[2], *strides(q), *strides(k), *strides(v),
           *strides(keys), *strides(values), **consts)
    for level in range(1, levels):
        launch(_pool_parents_kernel, (counts[level].numel(), b * h), *pooled[level - 1], *pooled[level], keys, values,
               children[level - 1], counts[level - 1], counts[level], buffer_rows[level], counts[level - 1].numel(),
               counts[level].numel(), h, *strides(keys), *strides(values), **consts)
    return keys, values, pooled


@triton.jit(do_not_specialize=["n_blocks", "H", "Nq"])
def _spread_pooled_kernel(DKB, DVB, DK, DV, TileRows, AncestorRows, AncestorScale, n_blocks, H, Nq,
                          sbb, sbh, sbn, scb, sch, scn, skb, skh, skn, svb, svh, svn,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr, LEVELS: tl.constexpr):
    block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    cols = tl.arange(0, BLOCK_D)
    rows = tl.load(TileRows + block * T + tl.arange(0, T)).to(tl.int64)
    real = (rows[:, None] < Nq) & (cols[None, :] < HEAD_DIM)
    DKB += b * sbb + h * sbh
    DVB += b * scb + h * sch
    dk = tl.load(DKB + rows[:, None] * sbn + cols[None, :], mask=real, other=0.0).to(tl.float32)
    dv = tl.load(DVB + rows[:, None] * scn + cols[None, :], mask=real, other=0.0).to(tl.float32)
    for level in tl.static_range(LEVELS):
        row = tl.load(AncestorRows + level * n_blocks + block).to(tl.int64)
        scale = tl.load(AncestorScale + level * n_blocks + block)
        dk += tl.load(DKB + row * sbn + cols, mask=cols < HEAD_DIM, other=0.0).to(tl.float32)[None, :] * scale
        dv += tl.load(DVB + row * scn + cols, mask=cols < HEAD_DIM, other=0.0).to(tl.float32)[None, :] * scale
    tl.store(DK + b * skb + h * skh + rows[:, None] * skn + cols[None, :], dk.to(DK.dtype.element_ty), mask=real)
    tl.store(DV + b * svb + h * svh + rows[:, None] * svn + cols[None, :], dv.to(DV.dtype.element_ty), mask=real)


def spread_pooled_gradients(d_keys: Tensor, d_values: Tensor, grid: tuple[int, int], num_prefix: int, side: int,
                            levels: int) -> tuple[Tensor, Tensor]:
    """dk, dv (B, h, P + N, d) from the gradients of the keys and values buffers (``pool_into_buffers``): each
    token's own row plus, per level, its block's pooled row's gradient over the block's token count
    (``block_sparse.pooled_key_gradients``, fused)."""
    b, h, _, d = d_keys.shape
    tile_rows = pooled_key_tiles(grid, side, levels, num_prefix, d_keys.device)[-1]
    _, _, counts, _, ancestor_rows, ancestor_scale = pooling_tables(grid, side, levels, num_prefix, d_keys.device)
    n = num_prefix + block_hierarchy(grid, side, levels, d_keys.device).layouts[0].num_tokens
    dk, dv = d_keys.new_empty(b, h, n, d), d_values.new_empty(b, h, n, d_values.shape[-1])
    if num_prefix:
        dk[:, :, :num_prefix] = d_keys[:, :, :num_prefix]
        dv[:, :, :num_prefix] = d_values[:, :, :num_prefix]
    n1 = counts[0].numel()
    launch(_spread_pooled_kernel, (n1, b * h), d_keys, d_values, dk, dv, tile_rows, ancestor_rows, ancestor_scale,
           n1, h, n, *strides(d_keys), *strides(d_values), *strides(dk), *strides(dv),
           HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), T=side * side, LEVELS=levels)
    return dk, dv
