"""Radial and log-linear attention run by the block-sparse core (``block_sparse_attention``, Triton
on CUDA): the references' index lists rewritten as the core's CSR of key tiles per query tile.

Grid tokens go in tile order; padding slots are dropped with ``key_bias = -inf``. Log-linear
attention's pooled tokens become extra key tiles: the pooled tokens of one block's s x s children
form one tile (the tile size), the coarsest level's pooled tokens are cut into tiles, and
``key_bias`` carries log(token count) of each. The core's tiles hold a power of two >= 16 tokens;
other tile sizes run the reference.
"""
from __future__ import annotations

import functools

import torch

from .backends import choose_backend
from .compile_constant import compile_constant
from .reference.gathered import gather_rows, with_global_prefix
from .reference.loglinear import (BlockHierarchy, block_hierarchy, loglinear_attention_reference, pool_levels,
                                 select_blocks)
from .reference.radial import radial_attention_reference, radial_plan
from .reference.softmax import softmax_attention_sdpa
from .tiles import TileLayout, from_tiles, to_tiles


def core_fits(tile_size: int) -> bool:
    return tile_size >= 16 and tile_size & (tile_size - 1) == 0


def csr_from_lists(lists: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Bq, Hq, Q, L) key-tile lists, -1 padded -> the core's (row_ptr (Bq, Hq, Q + 1), col_idx)."""
    bq, hq, nq, _ = lists.shape
    counts = (lists >= 0).sum(-1).flatten()
    cum = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    starts = torch.arange(bq * hq, device=lists.device)[:, None] * nq + torch.arange(nq + 1, device=lists.device)
    return cum[starts].reshape(bq, hq, nq + 1).to(torch.int32), lists[lists >= 0].to(torch.int32)


def padding_bias(layout: TileLayout, num_prefix: int) -> torch.Tensor:
    """0 for the prefix keys and the real tokens of the tiled grid, -inf for padding slots."""
    bias = torch.zeros(num_prefix + layout.valid.numel(), device=layout.valid.device)
    bias[num_prefix:] = bias[num_prefix:].masked_fill(~layout.valid.flatten(), float("-inf"))
    return bias


def fixed_width_csr(lists: torch.Tensor, null_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, h, Q, L) key-tile lists, -1 padded -> a CSR of L entries per row where -1 lists
    ``null_tile`` (a tile whose keys are all dropped): no device-to-host sync, for lists that
    change every call and are (nearly) full."""
    b, h, nq, width = lists.shape
    starts = torch.arange(b * h, device=lists.device)[:, None] * nq + torch.arange(nq + 1, device=lists.device)
    return ((starts * width).reshape(b, h, nq + 1).to(torch.int32),
            lists.masked_fill(lists < 0, null_tile).flatten().to(torch.int32))


def run_core(core, layout: TileLayout, qg, kg, vg, kp, vp, csr, extra_keys=(), extra_values=(), extra_bias=()):
    """Grid queries over prefix keys, the grid's tiles and extra key tiles, as listed per query tile
    by ``csr`` (row_ptr, col_idx)."""
    t = layout.tile_size
    keys = torch.cat([kp, to_tiles(kg, layout).flatten(2, 3), *extra_keys], 2)
    values = torch.cat([vp, to_tiles(vg, layout).flatten(2, 3), *extra_values], 2)
    bias = torch.cat([padding_bias(layout, kp.shape[2]), *extra_bias])[None, None]
    out = core(to_tiles(qg, layout).flatten(2, 3), keys, values, *csr, t, t, kp.shape[2],
               None, None, bias, None)
    return from_tiles(out.unflatten(2, (layout.num_tiles, t)), layout)


@compile_constant
def radial_core_layout(grid: tuple[int, ...], options: tuple, num_prefix: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cached; a constant under torch.compile) The radial plan as the core's CSR (row_ptr, col_idx) and
    tile_rows (each tile slot's token row after the prefix: the tokens stay in raster order), built
    once per grid, not per call (the CSR's boolean indexing waits for the device)."""
    plan = radial_plan(grid, options, device)
    return (*csr_from_lists(plan.key_tiles[None, None]), (plan.layout.slots + num_prefix).to(torch.int32))


def radial_attention_on_core(q, k, v, grid, num_prefix, options, core_backend=None):
    """The grid queries on the core with the tokens in place (no copy into tile order); the prefix
    queries, dense over all keys, by SDPA."""
    plan = radial_plan(grid, options, q.device)
    if not core_fits(plan.layout.tile_size):
        return radial_attention_reference(q, k, v, grid, num_prefix, options)
    core = choose_backend("block_sparse_attention", core_backend, q)
    row_ptr, col_idx, tile_rows = radial_core_layout(grid, options, num_prefix, q.device)
    t = plan.layout.tile_size
    out = core(q, k, v, row_ptr, col_idx, t, t, num_prefix, None, None, None, None, tile_rows)
    if num_prefix == 0:
        return out
    return torch.cat([softmax_attention_sdpa(q[:, :, :num_prefix], k, v), out[:, :, num_prefix:]], dim=2)


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


def loglinear_attention_on_core(q, k, v, grid, num_prefix, side, top_k, core_backend=None):
    if not core_fits(side * side):
        return loglinear_attention_reference(q, k, v, grid, num_prefix, side, top_k)
    hierarchy = block_hierarchy(grid, side, len(top_k), q.device)
    core = choose_backend("block_sparse_attention", core_backend, q)
    t = side * side

    def attend_grid(qg, kg, vg, kp, vp):
        pooled = [pool_levels(x, hierarchy) for x in (qg, kg, vg)]
        selection = select_blocks(pooled[0], pooled[1], hierarchy, top_k)
        b, h, n1 = selection.selected[0].shape[:3]
        lists, offset = [selection.selected[0]], hierarchy.num_blocks(0)
        extra_k, extra_v, extra_bias = [], [], []
        for level in range(hierarchy.num_levels):
            slots, bias = pooled_tile_slots(hierarchy, level)
            extra_k.append(gather_rows(pooled[1][level].to(kg.dtype), slots).flatten(2, 3))
            extra_v.append(gather_rows(pooled[2][level].to(vg.dtype), slots).flatten(2, 3))
            extra_bias.append(bias)
            groups = bias.numel() // t
            if level + 1 < hierarchy.num_levels:     # the children of the blocks selected one level up
                chosen = selection.selected[level + 1][:, :, hierarchy.ancestor[level + 1]]
                lists.append(torch.where(chosen >= 0, chosen + offset, -1))
            else:                                    # every block of the coarsest level
                lists.append((torch.arange(groups, device=q.device) + offset).expand(b, h, n1, groups))
            offset += groups
        extra_k.append(kg.new_zeros(b, h, t, kg.shape[-1]))          # the null tile: -1 entries list it
        extra_v.append(vg.new_zeros(b, h, t, vg.shape[-1]))
        extra_bias.append(torch.full((t,), float("-inf"), device=q.device))
        csr = fixed_width_csr(torch.cat(lists, -1), offset)
        return run_core(core, hierarchy.layouts[0], qg, kg, vg, kp, vp, csr, extra_k, extra_v, extra_bias)

    return with_global_prefix(q, k, v, num_prefix, attend_grid, dense=softmax_attention_sdpa)


def with_core_backend(fn, core_backend: str):
    """``fn`` with the core's backend fixed (e.g. "triton"), for registering as a backend."""
    return functools.partial(fn, core_backend=core_backend)
