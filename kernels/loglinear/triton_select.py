"""LLSA's hierarchical top-K and key-tile lists in Triton (Zhou et al. 2025, Sec. 3.2): one launch per level and
one for the lists, instead of the gathers, masks, matrix products and top-Ks of ``plan.select_blocks`` and the
concatenations of ``block_sparse.key_tile_lists``; no host synchronisation (CUDA-graph capturable).

Selection, one program per (group of query blocks, batch x head): the pooled queries of the group's blocks
against the pooled keys of its candidates, float32 products, then K rounds of a row maximum (of int64 keys
holding a score and its candidate: one reduction a round). Below the coarsest
level a group is a parent's s x s children and its candidates the children of the blocks the parent selected;
at the coarsest level the blocks are cut into groups of s x s and every group's candidates are all blocks (the
same kernel: each group "selected" every group). Same selection as ``select_blocks`` (ties aside: float32 sums
in another order). The warps grow with the candidate tile (one warp per 1,024 of its float32 values, 4 to 16):
at four, the product of 16 pooled queries with 128 candidates (K = 8, d = 64) spills to local memory (sm_90).

Every level's selection is written into one buffer (B, h, sum_l n_l K_l); the lists kernel then writes each
finest block's row of the core's CSR: its selected blocks, the pooled tiles of the blocks its ancestors
selected, every coarsest pooled tile (``key_tile_lists``' layout).
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..core.compile_constant import compile_constant
from ..core.triton_common import cdiv, launch, next_power_of_2, pad_dim
from .block_sparse import pooled_key_tiles
from .plan import BlockHierarchy, block_hierarchy

MAX_TOP_BLOCKS = 256    # the coarsest level scored in Triton up to this many blocks (else torch's top-K)
NO_KEY = tl.constexpr(-2**63)   # the selection's key of no candidate, below every score's
LIST_BLOCKS = 16        # finest blocks per program of the lists kernel


@triton.jit(do_not_specialize=["n_fine", "K_up", "K", "s_up", "s_out"])
def _select_kernel(PQ, PK, SelUp, Groups, Out, n_fine, K_up, K, s_up, s_out,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SS: tl.constexpr, BLOCK_UP: tl.constexpr):
    group = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    kids = tl.load(Groups + group * SS + tl.arange(0, SS))                            # (SS,), -1: none
    q = tl.load(PQ + (bh * n_fine + kids[:, None]) * HEAD_DIM + cols[None, :],
                mask=(kids[:, None] >= 0) & (cols[None, :] < HEAD_DIM), other=0.0)
    ups = tl.arange(0, BLOCK_UP)
    up = tl.load(SelUp + bh * s_up + group * K_up + ups, mask=ups < K_up, other=-1)    # the groups selected
    cand = tl.load(Groups + up[:, None] * SS + tl.arange(0, SS)[None, :], mask=up[:, None] >= 0, other=-1)
    cand = tl.reshape(cand, (BLOCK_UP * SS,))
    k = tl.load(PK + (bh * n_fine + cand[:, None]) * HEAD_DIM + cols[None, :],
                mask=(cand[:, None] >= 0) & (cols[None, :] < HEAD_DIM), other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision="ieee")
    # each score with its candidate as one int64 key (score bits made to order as the floats, candidate below):
    # a round of the top-K is one row maximum, which names its candidate; a picked key is unique (candidates are)
    bits = s.to(tl.int32, bitcast=True)
    order = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
    keys = tl.where(cand[None, :] >= 0, (order << 32) | cand.to(tl.int64)[None, :], NO_KEY)
    out = Out + bh * s_out + kids * K
    for j in range(K):
        best = tl.max(keys, 1)
        tl.store(out + j, tl.where(best != NO_KEY, best & 0x7FFFFFFF, -1), mask=kids >= 0)
        keys = tl.where(keys == best[:, None], NO_KEY, keys)


def _bh_stride(x: Tensor) -> int:
    """The stride of x (B, h, ...) per flattened (batch, head) index b * h + head (batch-major)."""
    return x.stride(1) if x.shape[1] > 1 else x.stride(0)


def _select(pooled_q: Tensor, pooled_k: Tensor, selected_up: Tensor, groups: Tensor, out: Tensor) -> None:
    """Writes into ``out`` (B, h, n_l, K) the top-K blocks of every block of ``groups`` (G, s*s), -1 none, among
    the blocks of the groups in its group's row of ``selected_up`` (B, h, G, K_up), -1 none; pooled q, k float32
    (B, h, n_l, d). ``selected_up`` and ``out``: rows of K contiguous, a common stride per (batch, head) (views into one buffer, or
    stride 0)."""
    b, h, n_fine, d = pooled_q.shape
    num_groups, k_up = selected_up.shape[2:]
    ss = groups.shape[1]
    block_d, block_up = pad_dim(d), next_power_of_2(k_up)
    warps = min(16, max(4, block_up * ss * block_d // 1024))
    launch(_select_kernel, (num_groups, b * h), pooled_q.contiguous(), pooled_k.contiguous(), selected_up, groups,
           out, n_fine, k_up, out.shape[-1], _bh_stride(selected_up), _bh_stride(out),
           HEAD_DIM=d, BLOCK_D=block_d, SS=ss, BLOCK_UP=block_up, num_warps=warps)


@compile_constant
def _top_groups(num_blocks: int, side: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The coarsest level as groups of s*s blocks ((G, s*s), -1 past the end) and the selection of every group by
    every group ((1, 1, G, G), to be expanded over batch and heads: stride 0)."""
    t = side * side
    num_groups = -(-num_blocks // t)
    slots = torch.arange(num_groups * t, device=device)
    groups = slots.masked_fill(slots >= num_blocks, -1).reshape(num_groups, t)
    every = torch.arange(num_groups, device=device).repeat(num_groups, 1)[None, None]
    return groups, every


@torch.no_grad()
def select_blocks_triton(pooled_q: Sequence[Tensor], pooled_k: Sequence[Tensor], hierarchy: BlockHierarchy,
                         top_k: Sequence[int]) -> tuple[Tensor, ...]:
    """``plan.select_blocks``' selected blocks of every level (finest first), (B, h, n_l, K_l) int64 views into
    one buffer: the coarsest level in Triton up to ``MAX_TOP_BLOCKS`` blocks (torch's top-K beyond), every finer
    one in Triton."""
    b, h = pooled_q[0].shape[:2]
    sizes = [hierarchy.num_blocks(level) * k for level, k in enumerate(top_k)]
    buffer = pooled_q[0].new_empty(b, h, sum(sizes), dtype=torch.int64)
    selected = [part.unflatten(-1, (-1, k)) for part, k in zip(buffer.split(sizes, -1), top_k)]
    top, side = hierarchy.num_levels - 1, hierarchy.side
    if hierarchy.num_blocks(top) <= MAX_TOP_BLOCKS:
        groups, every = _top_groups(hierarchy.num_blocks(top), side, pooled_q[0].device)
        _select(pooled_q[top], pooled_k[top], every.expand(b, h, -1, -1), groups, selected[top])
    else:
        scores = pooled_q[top] @ pooled_k[top].transpose(-2, -1)
        selected[top].copy_(scores.topk(top_k[top], dim=-1).indices)
    for level in range(top - 1, -1, -1):
        _select(pooled_q[level], pooled_k[level], selected[level + 1], hierarchy.children[level], selected[level])
    return tuple(selected)


@triton.jit(do_not_specialize=["n_fine", "s_sel", "width", "null_tile", "coarsest_first", "n_coarsest"])
def _key_tile_lists_kernel(Sel, Ancestors, Levels, ColIdx, n_fine, s_sel, width, null_tile, coarsest_first,
                           n_coarsest, LEVELS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCKS: tl.constexpr):
    blocks = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    bh = tl.program_id(1).to(tl.int64)
    listed = blocks < n_fine
    row = ColIdx + (bh * n_fine + blocks[:, None]) * width
    j = tl.arange(0, BLOCK_K)
    for level in tl.static_range(LEVELS):
        offset = tl.load(Levels + level * 4)          # the level's selection in a (batch, head)'s buffer row
        k = tl.load(Levels + level * 4 + 1)
        column = tl.load(Levels + level * 4 + 2)      # its first column in the list
        first = tl.load(Levels + level * 4 + 3)       # the key-tile id of its block 0
        ancestor = tl.load(Ancestors + level * n_fine + blocks, mask=listed, other=0)
        entry = listed[:, None] & (j[None, :] < k)
        sel = tl.load(Sel + bh * s_sel + offset + ancestor[:, None] * k + j[None, :], mask=entry, other=-1)
        tl.store(row + column + j[None, :], tl.where(sel >= 0, sel + first, null_tile).to(tl.int32), mask=entry)
    c = tl.arange(0, BLOCK_C)
    tiles = tl.zeros([BLOCKS, BLOCK_C], dtype=tl.int32) + (coarsest_first + c)[None, :]
    tl.store(row + width - n_coarsest + c[None, :], tiles, mask=listed[:, None] & (c[None, :] < n_coarsest))


@compile_constant
def _list_tables(grid: tuple[int, int], side: int, top_k: tuple[int, ...], num_prefix: int,
                 device: torch.device) -> tuple:
    """The lists kernel's tables for a grid: each level's (selection offset, K, first column, tile id of its
    block 0) (levels, 4) int32, the level-l ancestor of each finest block (levels, n_1) int32, the null tile, the
    first coarsest pooled tile and their number."""
    levels = len(top_k)
    hierarchy = block_hierarchy(grid, side, levels, device)
    _, _, firsts, null_tile, coarsest, _ = pooled_key_tiles(grid, side, levels, num_prefix, device)
    offsets = [0]
    for level, k in enumerate(top_k[:-1]):
        offsets.append(offsets[-1] + hierarchy.num_blocks(level) * k)
    columns = [sum(top_k[:level]) for level in range(levels)]
    rows = [(offsets[l], top_k[l], columns[l], 0 if l == 0 else firsts[l - 1]) for l in range(levels)]
    table = torch.tensor(rows, dtype=torch.int32, device=device)
    ancestors = torch.stack(list(hierarchy.ancestor)).to(torch.int32)
    return table, ancestors, null_tile, firsts[-1], coarsest.numel()


def key_tile_lists_triton(selected: Sequence[Tensor], grid: tuple[int, int], num_prefix: int, side: int) -> Tensor:
    """``block_sparse.key_tile_lists``' col_idx (flat int32; every row ``sum(K) + coarsest tiles`` wide) from
    ``select_blocks_triton``'s selection (views into one buffer, read there)."""
    top_k = tuple(s.shape[-1] for s in selected)
    table, ancestors, null_tile, coarsest_first, n_coarsest = _list_tables(tuple(grid), side, top_k, num_prefix,
                                                                           selected[0].device)
    buffer = selected[0]
    b, h, n_fine = buffer.shape[:3]
    width = sum(top_k) + n_coarsest
    col_idx = torch.empty(b * h * n_fine * width, dtype=torch.int32, device=buffer.device)
    launch(_key_tile_lists_kernel, (cdiv(n_fine, LIST_BLOCKS), b * h), buffer, ancestors, table, col_idx,
           n_fine, _bh_stride(buffer), width, null_tile, coarsest_first, n_coarsest, LEVELS=len(top_k),
           BLOCK_K=next_power_of_2(max(top_k)), BLOCK_C=next_power_of_2(n_coarsest),
           BLOCKS=LIST_BLOCKS)
    return col_idx
