"""Log-linear attention on the block-sparse core: the selection's index lists as the core's CSR of key
tiles per query tile.

The tokens stay in place (``tile_rows``: each finest block's token rows, the core's tiles); the pooled
tokens are extra key tiles appended after them: the pooled tokens of one block's s x s children form one
tile (the tile size), the coarsest level's pooled tokens are cut into tiles, and ``key_bias`` carries
log(token count) of each.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..block_sparse.layout import fixed_width_row_ptr
from ..core.compile_constant import compile_constant
from ..core.dispatch import choose_backend
from ..softmax import with_prefix_queries
from .plan import BlockHierarchy, block_hierarchy, pool_levels, select_blocks


def pooled_tile_slots(hierarchy: BlockHierarchy, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """How a level's pooled tokens form key tiles: the block in each slot (tiles, s*s), -1 for none,
    grouped by parent block below the coarsest level (tile g = the children of block g), in chunks at
    the top; and each slot's log(token count) bias (-inf for none), flattened."""
    t = hierarchy.side ** 2
    if level + 1 < hierarchy.num_levels:
        slots = hierarchy.children[level]                                    # (n_parent, t), -1: none
    else:
        n = hierarchy.num_blocks(level)
        slots = torch.arange(-(-n // t) * t, device=hierarchy.counts[level].device).reshape(-1, t)
        slots = slots.masked_fill(slots >= n, -1)
    bias = hierarchy.counts[level].float().log()[slots.clamp_min(0)].masked_fill(slots < 0, float("-inf"))
    return slots, bias.flatten()


@compile_constant
def pooled_key_tiles(grid: tuple[int, int], side: int, levels: int, num_prefix: int,
                     device: torch.device) -> tuple:
    """What the core's key tiles need that depends on the grid alone, built once per grid: each level's
    pooled-token rows in key-tile order (``pooled_tile_slots``' slots, a padding slot reading block 0 under a
    -inf bias), the key bias over [prefix | tokens | every level's pooled tiles | the null tile], the
    key-tile id of each level's first pooled tile and of the null tile, the coarsest level's tile ids (every
    query block lists them all) and the finest blocks' token rows."""
    hierarchy = block_hierarchy(grid, side, levels, device)
    t = side * side
    finest = hierarchy.layouts[0]
    rows, bias, firsts = [], [torch.zeros(num_prefix + finest.num_tokens, device=device)], []
    offset = hierarchy.num_blocks(0)
    for level in range(levels):
        level_slots, level_bias = pooled_tile_slots(hierarchy, level)
        rows.append(level_slots.clamp_min(0).flatten())
        bias.append(level_bias)
        firsts.append(offset)
        offset += level_slots.shape[0]
    bias.append(torch.full((t,), float("-inf"), device=device))      # the null tile: -1 entries list it
    coarsest = torch.arange(firsts[-1], offset, device=device)
    tile_rows = (finest.slots + num_prefix).to(torch.int32)
    return tuple(rows), torch.cat(bias)[None, None], tuple(firsts), offset, coarsest, tile_rows


def with_pooled_keys(x: torch.Tensor, pooled: Sequence[torch.Tensor], rows: Sequence[torch.Tensor],
                     tile: int) -> torch.Tensor:
    """(B, h, N + pooled + tile, d): x's tokens, then each level's pooled tokens in key-tile order (in x's
    dtype), then the null tile (zeros), written into one buffer."""
    b, h, n, d = x.shape
    out = x.new_empty(b, h, n + sum(r.numel() for r in rows) + tile, d)
    out[:, :, :n] = x
    start = n
    for level_pooled, level_rows in zip(pooled, rows):
        out[:, :, start:start + level_rows.numel()] = level_pooled.index_select(2, level_rows)
        start += level_rows.numel()
    out[:, :, start:].zero_()
    return out


def _selected_blocks(pooled_q, pooled_k, hierarchy: BlockHierarchy, top_k) -> tuple[torch.Tensor, ...]:
    return select_blocks(pooled_q, pooled_k, hierarchy, top_k).selected


def loglinear_attention_on_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int],
                                num_prefix: int, side: int, top_k: tuple[int, ...],
                                core_backend: str | None = None, select: Callable = _selected_blocks) -> torch.Tensor:
    """The grid queries on the core (``core_backend``: the core's own choice when None), the tokens read in
    place and the pooled ones appended to k, v; the prefix queries, dense over all keys, by SDPA.
    ``select``: the selected blocks of every level (``select_blocks``' or the Triton selection's)."""
    levels, p, t = len(top_k), num_prefix, side * side
    hierarchy = block_hierarchy(grid, side, levels, q.device)
    rows, key_bias, firsts, null_tile, coarsest, tile_rows = pooled_key_tiles(grid, side, levels, p, q.device)
    core = choose_backend("block_sparse_attention", core_backend, q, v=v)
    pooled = [pool_levels(x[:, :, p:], hierarchy) for x in (q, k, v)]
    selected = select(pooled[0], pooled[1], hierarchy, top_k)
    b, h, n1 = selected[0].shape[:3]
    lists = [selected[0].masked_fill(selected[0] < 0, null_tile)]
    for level in range(levels - 1):         # the children of the blocks selected one level up
        chosen = selected[level + 1][:, :, hierarchy.ancestor[level + 1]]
        lists.append(torch.where(chosen >= 0, chosen + firsts[level], null_tile))
    lists.append(coarsest.expand(b, h, n1, coarsest.numel()))         # every block of the coarsest level
    col_idx = torch.cat(lists, -1).to(torch.int32)
    row_ptr = fixed_width_row_ptr(b, h, n1, col_idx.shape[-1], q.device)
    keys, values = (with_pooled_keys(x, pool, rows, t) for x, pool in ((k, pooled[1]), (v, pooled[2])))
    out = core(q, keys, values, row_ptr, col_idx.flatten(), t, t, p, None, None, key_bias, None, tile_rows)
    return with_prefix_queries(out[:, :, p:], q, k, v, p)

