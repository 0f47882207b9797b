"""LLSA's pooling in Triton (Zhou et al. 2025, Sec. 3.1): the block means of q, k, v at every level and the
pooled keys / values the core reads as extra key tiles (the rows ``block_sparse.with_pooled_keys`` appends
after the tokens, here in tensors of their own: the tokens are read in place), in one launch per level; and
the backward's spreading of the pooled rows' gradients over their blocks' tokens in one launch.

Forward: one program per ``POOL_TILE // d`` finest blocks (x batch * head) reads their tokens once, the t-th
token of every block at step t (q, k and v together), so that each thread sums its own values (no reduction
across threads), and writes their float32 means (the selection's pooled q, k and the coarser levels' inputs)
and the pooled row of k, v; extra programs zero the padding and null rows. Each coarser level: one program per
block averages its children's means (weighted by their token counts). Backward: one program per as many finest
blocks adds to its tokens' gradient the gradient of the pooled row of each of its ancestors (itself at level 1)
divided by that block's token count.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..core.alignment import row_alignment
from ..core.compile_constant import compile_constant
from ..core.triton_common import cdiv, launch, pad_dim, row_ptrs, strides
from .block_sparse import pooled_key_tiles, pooled_tile_slots
from .plan import block_hierarchy

POOL_ROWS = 64          # token rows per program of the spreading (several blocks)
POOL_TILE = 2048        # values per token step of a finest pooling program: 8 per thread at POOL_WARPS
POOL_WARPS = 8          # at 4, spreading 64 rows of head dim 64 spills registers (sm_90, ptxas)


@compile_constant
def pooling_tables(grid: tuple[int, int], side: int, levels: int, device: torch.device) -> tuple:
    """What the kernels read, per grid: each level's row of every block in the pooled buffer (n_l,) int32; the
    rows to zero (padding slots and the null tile), padded to whole tiles by repeating the last one; each level's
    token counts (n_l,) float32 and children (n_{l+1}, s*s) int32; the pooled row of each finest block's
    ancestor at every level and 1 / its count, (levels, n_1)."""
    hierarchy = block_hierarchy(grid, side, levels, device)
    t = side * side
    start = 0
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


@triton.jit(do_not_specialize=["n_blocks", "n_programs", "H", "Nq"])
def _pool_finest_kernel(Q, K, V, KB, VB, PQ, PK, PV, TileRows, BufferRows, ZeroRows, Counts, n_blocks, n_programs, H,
                        Nq, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sbb, sbh, sbn, scb, sch, scn,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr, BLOCKS: tl.constexpr,
                        ALIGN: tl.constexpr):
    program = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols[None, :] < HEAD_DIM
    KB += b * sbb + h * sbh
    VB += b * scb + h * sch
    if program >= n_programs:                    # zero T padding / null rows of the buffers
        rows = tl.load(ZeroRows + (program - n_programs) * T + tl.arange(0, T)).to(tl.int64)
        zeros = tl.zeros([T, BLOCK_D], dtype=KB.dtype.element_ty)
        tl.store(row_ptrs(KB, rows, sbn, ALIGN)[:, None] + cols[None, :], zeros, mask=col_ok)
        tl.store(row_ptrs(VB, rows, scn, ALIGN)[:, None] + cols[None, :], zeros, mask=col_ok)
        return
    blocks = program * BLOCKS + tl.arange(0, BLOCKS)
    ok = blocks < n_blocks
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    q_sum = tl.zeros([BLOCKS, BLOCK_D], dtype=tl.float32)
    k_sum = tl.zeros([BLOCKS, BLOCK_D], dtype=tl.float32)
    v_sum = tl.zeros([BLOCKS, BLOCK_D], dtype=tl.float32)
    for t in tl.static_range(T):        # the t-th token of every block: sums in each thread's registers
        rows = tl.load(TileRows + blocks * T + t, mask=ok, other=Nq).to(tl.int64)
        real = (rows[:, None] < Nq) & col_ok
        q_sum += tl.load(row_ptrs(Q, rows, sqn, ALIGN)[:, None] + cols[None, :], mask=real, other=0.0).to(tl.float32)
        k_sum += tl.load(row_ptrs(K, rows, skn, ALIGN)[:, None] + cols[None, :], mask=real, other=0.0).to(tl.float32)
        v_sum += tl.load(row_ptrs(V, rows, svn, ALIGN)[:, None] + cols[None, :], mask=real, other=0.0).to(tl.float32)
    scale = 1.0 / tl.load(Counts + blocks, mask=ok, other=1.0)
    row = tl.load(BufferRows + blocks, mask=ok, other=0).to(tl.int64)
    q_mean = q_sum * scale[:, None]
    k_mean = k_sum * scale[:, None]
    v_mean = v_sum * scale[:, None]
    out = bh * n_blocks * HEAD_DIM + blocks[:, None] * HEAD_DIM + cols[None, :]
    store = ok[:, None] & col_ok
    tl.store(PQ + out, q_mean, mask=store)
    tl.store(PK + out, k_mean, mask=store)
    tl.store(PV + out, v_mean, mask=store)
    tl.store(row_ptrs(KB, row, sbn, ALIGN)[:, None] + cols[None, :], k_mean.to(KB.dtype.element_ty), mask=store)
    tl.store(row_ptrs(VB, row, scn, ALIGN)[:, None] + cols[None, :], v_mean.to(VB.dtype.element_ty), mask=store)


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
    """The pooled keys and values the core reads as extra key tiles (the rows ``block_sparse.with_pooled_keys``
    appends after the tokens: every level's pooled rows, zero padding and null rows) and the float32 block
    means of q, k, v per level, finest first, each (3, B, h, n_l, d)."""
    b, h, _, d = q.shape
    rows, _, _, _, _, tile_rows = pooled_key_tiles(grid, side, levels, num_prefix, q.device)
    buffer_rows, zero, counts, children, _, _ = pooling_tables(grid, side, levels, q.device)
    t = side * side
    total = sum(r.numel() for r in rows) + t
    keys, values = k.new_empty(b, h, total, d), v.new_empty(b, h, total, v.shape[-1])
    pooled = [q.new_empty(3, b, h, c.numel(), d, dtype=torch.float32) for c in counts]
    consts = dict(HEAD_DIM=d, BLOCK_D=pad_dim(d), T=t)
    n1 = counts[0].numel()
    blocks = max(1, POOL_TILE // consts["BLOCK_D"])
    programs = cdiv(n1, blocks)
    launch(_pool_finest_kernel, (programs + zero.numel() // t, b * h), q, k, v, keys, values, *pooled[0], tile_rows,
           buffer_rows[0], zero, counts[0], n1, programs, h, q.shape[2], *strides(q), *strides(k), *strides(v),
           *strides(keys), *strides(values), **consts, BLOCKS=blocks, ALIGN=row_alignment(q, k, v, keys, values),
           num_warps=POOL_WARPS)
    for level in range(1, levels):
        launch(_pool_parents_kernel, (counts[level].numel(), b * h), *pooled[level - 1], *pooled[level], keys, values,
               children[level - 1], counts[level - 1], counts[level], buffer_rows[level], counts[level - 1].numel(),
               counts[level].numel(), h, *strides(keys), *strides(values), **consts)
    return keys, values, pooled


@triton.jit(do_not_specialize=["n_blocks", "H", "Nq"])
def _spread_pooled_kernel(DK, DV, DKX, DVX, TileRows, AncestorRows, AncestorScale, n_blocks, H, Nq,
                          skb, skh, skn, svb, svh, svn, sxkb, sxkh, sxkn, sxvb, sxvh, sxvn,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr, LEVELS: tl.constexpr,
                          BLOCKS: tl.constexpr, ALIGN: tl.constexpr):
    program = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    cols = tl.arange(0, BLOCK_D)
    slots = program * BLOCKS * T + tl.arange(0, BLOCKS * T)
    block = slots // T
    listed = block < n_blocks
    rows = tl.load(TileRows + slots, mask=listed, other=Nq).to(tl.int64)
    real = (rows[:, None] < Nq) & (cols[None, :] < HEAD_DIM)
    DK += b * skb + h * skh
    DV += b * svb + h * svh
    DKX += b * sxkb + h * sxkh
    DVX += b * sxvb + h * sxvh
    dk_rows = row_ptrs(DK, rows, skn, ALIGN)[:, None] + cols[None, :]
    dv_rows = row_ptrs(DV, rows, svn, ALIGN)[:, None] + cols[None, :]
    dk = tl.load(dk_rows, mask=real, other=0.0).to(tl.float32)
    dv = tl.load(dv_rows, mask=real, other=0.0).to(tl.float32)
    for level in tl.static_range(LEVELS):
        row = tl.load(AncestorRows + level * n_blocks + block, mask=listed, other=0).to(tl.int64)
        scale = tl.load(AncestorScale + level * n_blocks + block, mask=listed, other=0.0)[:, None]
        dk += tl.load(row_ptrs(DKX, row, sxkn, ALIGN)[:, None] + cols[None, :], mask=real,
                      other=0.0).to(tl.float32) * scale
        dv += tl.load(row_ptrs(DVX, row, sxvn, ALIGN)[:, None] + cols[None, :], mask=real,
                      other=0.0).to(tl.float32) * scale
    tl.store(dk_rows, dk.to(DK.dtype.element_ty), mask=real)
    tl.store(dv_rows, dv.to(DV.dtype.element_ty), mask=real)


def spread_pooled_gradients(dk: Tensor, dv: Tensor, d_pooled_keys: Tensor, d_pooled_values: Tensor,
                            grid: tuple[int, int], num_prefix: int, side: int, levels: int) -> None:
    """Adds to the tokens' dk, dv (B, h, P + N, d), in place, the gradients of the pooled keys and values
    (``pool_into_buffers``' rows): to each token, per level, its block's pooled row's gradient over the block's
    token count (``block_sparse.pooled_key_gradients``, fused)."""
    b, h, n, d = dk.shape
    tile_rows = pooled_key_tiles(grid, side, levels, num_prefix, dk.device)[-1]
    _, _, counts, _, ancestor_rows, ancestor_scale = pooling_tables(grid, side, levels, dk.device)
    n1 = counts[0].numel()
    t = side * side
    blocks = max(1, POOL_ROWS // t)
    launch(_spread_pooled_kernel, (cdiv(n1, blocks), b * h), dk, dv, d_pooled_keys, d_pooled_values, tile_rows,
           ancestor_rows, ancestor_scale, n1, h, n, *strides(dk), *strides(dv), *strides(d_pooled_keys),
           *strides(d_pooled_values), HEAD_DIM=d, BLOCK_D=pad_dim(d), T=t, LEVELS=levels,
           BLOCKS=blocks, ALIGN=row_alignment(dk, dv, d_pooled_keys, d_pooled_values), num_warps=POOL_WARPS)
