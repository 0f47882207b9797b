"""Log-linear attention on the block-sparse core: the selection's index lists as the core's CSR of key
tiles per query tile.

Grid tokens go in tile order; padding slots are dropped with ``key_bias = -inf``. The pooled tokens
become extra key tiles: the pooled tokens of one block's s x s children form one tile (the tile size),
the coarsest level's pooled tokens are cut into tiles, and ``key_bias`` carries log(token count) of each.
"""
from __future__ import annotations

import functools

import torch

from ..block_sparse.layout import fixed_width_csr
from ..core.compile_constant import compile_constant
from ..core.dispatch import choose_backend
from ..core.gathered import gather_rows, with_global_prefix
from ..core.tiles import TileLayout, from_tiles, to_tiles
from ..softmax import prefix_attention_sdpa
from .plan import BlockHierarchy, block_hierarchy, pool_levels, select_blocks


def padding_bias(layout: TileLayout, num_prefix: int) -> torch.Tensor:
    """0 for the prefix keys and the real tokens of the tiled grid, -inf for padding slots."""
    bias = torch.zeros(num_prefix + layout.valid.numel(), device=layout.valid.device)
    bias[num_prefix:] = bias[num_prefix:].masked_fill(~layout.valid.flatten(), float("-inf"))
    return bias


def run_core(core, layout: TileLayout, qg, kg, vg, kp, vp, csr, key_bias: torch.Tensor, extra_keys=(),
             extra_values=()):
    """Grid queries over prefix keys, the grid's tiles and extra key tiles, as listed per query tile
    by ``csr`` (row_ptr, col_idx); ``key_bias`` (1, 1, keys) covers all of them."""
    t = layout.tile_size
    keys = torch.cat([kp, to_tiles(kg, layout).flatten(2, 3), *extra_keys], 2)
    values = torch.cat([vp, to_tiles(vg, layout).flatten(2, 3), *extra_values], 2)
    out = core(to_tiles(qg, layout).flatten(2, 3), keys, values, *csr, t, t, kp.shape[2],
               None, None, key_bias, None)
    return from_tiles(out.unflatten(2, (layout.num_tiles, t)), layout)


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
    pooled-token slots (``pooled_tile_slots``), the key bias over [prefix | grid tiles | every level's
    pooled tiles | the null tile], the key-tile id of each level's first pooled tile and of the null tile,
    and the coarsest level's tile ids (every query block lists them all)."""
    hierarchy = block_hierarchy(grid, side, levels, device)
    t = side * side
    slots, bias, firsts = [], [padding_bias(hierarchy.layouts[0], num_prefix)], []
    offset = hierarchy.num_blocks(0)
    for level in range(levels):
        level_slots, level_bias = pooled_tile_slots(hierarchy, level)
        slots.append(level_slots)
        bias.append(level_bias)
        firsts.append(offset)
        offset += level_slots.shape[0]
    bias.append(torch.full((t,), float("-inf"), device=device))      # the null tile: -1 entries list it
    coarsest = torch.arange(firsts[-1], offset, device=device)
    return tuple(slots), torch.cat(bias)[None, None], tuple(firsts), offset, coarsest


def loglinear_attention_on_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int],
                                num_prefix: int, side: int, top_k: tuple[int, ...],
                                core_backend: str | None = None) -> torch.Tensor:
    """The grid queries on the core (``core_backend``: the core's own choice when None); the prefix
    queries, dense over all keys, by SDPA."""
    levels = len(top_k)
    hierarchy = block_hierarchy(grid, side, levels, q.device)
    slots, key_bias, firsts, null_tile, coarsest = pooled_key_tiles(grid, side, levels, num_prefix, q.device)
    core = choose_backend("block_sparse_attention", core_backend, q, v=v)
    t = side * side

    def attend_grid(qg, kg, vg, kp, vp):
        pooled = [pool_levels(x, hierarchy) for x in (qg, kg, vg)]
        selection = select_blocks(pooled[0], pooled[1], hierarchy, top_k)
        b, h, n1 = selection.selected[0].shape[:3]
        lists = [selection.selected[0]]
        for level in range(levels - 1):     # the children of the blocks selected one level up
            chosen = selection.selected[level + 1][:, :, hierarchy.ancestor[level + 1]]
            lists.append(torch.where(chosen >= 0, chosen + firsts[level], -1))
        lists.append(coarsest.expand(b, h, n1, coarsest.numel()))     # every block of the coarsest level
        extra_k = [gather_rows(pooled[1][level].to(kg.dtype), slots[level]).flatten(2, 3) for level in range(levels)]
        extra_v = [gather_rows(pooled[2][level].to(vg.dtype), slots[level]).flatten(2, 3) for level in range(levels)]
        extra_k.append(kg.new_zeros(b, h, t, kg.shape[-1]))          # the null tile's keys and values
        extra_v.append(vg.new_zeros(b, h, t, vg.shape[-1]))
        csr = fixed_width_csr(torch.cat(lists, -1), null_tile)
        return run_core(core, hierarchy.layouts[0], qg, kg, vg, kp, vp, csr, key_bias, extra_k, extra_v)

    return with_global_prefix(q, k, v, num_prefix, attend_grid, dense=prefix_attention_sdpa)


loglinear_attention_on_triton = functools.partial(loglinear_attention_on_core, core_backend="triton")
