"""Log-linear attention on the block-sparse core: the selection's index lists as the core's CSR of key
tiles per query tile.

The tokens stay in place (``tile_rows``: each finest block's token rows, the core's tiles); the pooled
tokens are extra key tiles appended after them: the pooled tokens of one block's s x s children form one
tile (the tile size), the coarsest level's pooled tokens are cut into tiles, and ``key_bias`` carries
log(token count) of each.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..block_sparse.layout import fixed_width_row_ptr
from ..core.compile_constant import compile_constant
from ..core.dispatch import choose_backend
from ..softmax import fill_prefix_queries
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


def pooled_key_counts(grid: tuple[int, int], side: int, top_k: tuple[int, ...]) -> tuple[int, int, int]:
    """(pooled key rows of every level, finest blocks, key tiles per finest block's list) of ``core_inputs``,
    from the grid alone (the sizes of a call without running it)."""
    t, levels = side * side, len(top_k)
    blocks = [math.prod(-(-g // side ** l) for g in grid) for l in range(1, levels + 1)]
    top_tiles = -(-blocks[-1] // t)
    return sum(blocks[1:]) * t + top_tiles * t, blocks[0], sum(top_k) + top_tiles


SIBLING_ROWS = 64       # query rows of the forward's tiles of sibling blocks (``sibling_query_tiles``)


def sibling_group(side: int) -> int:
    """Finest blocks per query tile of the forward: ``SIBLING_ROWS`` tokens of side-by-side siblings (s = 4: a
    1 x 4 strip of 4 x 4 blocks, a row of their parent's children), or 1 (no grouping) where that is not a part
    of a parent's row."""
    group = SIBLING_ROWS // (side * side)
    return group if 1 < group <= side and side % group == 0 else 1


@compile_constant
def sibling_query_tiles(grid: tuple[int, int], side: int, top_k: tuple[int, ...], num_prefix: int,
                        device: torch.device) -> tuple:
    """The forward's query tiles of ``sibling_group(side)`` side-by-side finest blocks of one parent, which list
    the same pooled tiles (their ancestors' selections and the coarsest level): (token rows (tiles * g * s^2,)
    int32, the padding rows Nq; the gather from ``key_tile_lists``' rows (n_1, W) to the tiles' lists (tiles,
    S + g * K_1): the S shared pooled tiles once, then each block's K_1 selected ones (a missing block at the
    grid's edge repeats the first one's, for padding rows); S, the shared columns (``QueryTiles.shared``); the number
    of tiles). Keys shared by the g blocks are then read once for g * s^2 query rows, and the products have 64 rows
    (tensor-core sized) instead of 16; the core's forward takes each block's own tiles for all g blocks at once as
    one batched product of 16-row blocks (two selected tiles of each block per step)."""
    g, t, k1 = sibling_group(side), side * side, top_k[0]
    hierarchy = block_hierarchy(grid, side, len(top_k), device)
    finest = hierarchy.layouts[0]
    width = pooled_key_counts(grid, side, top_k)[2]
    rows_high, cols = finest.tiles_per_side
    strips = -(-cols // g)
    members = torch.arange(strips * g, device=device).reshape(1, strips, g)                # block columns
    blocks = torch.arange(rows_high, device=device)[:, None, None] * cols + members       # (rows, strips, g)
    blocks = torch.where(members < cols, blocks, -1).reshape(-1, g)                       # (tiles, g), -1: none
    padding = finest.num_tokens + num_prefix
    slots = finest.slots.to(torch.int64).reshape(-1, t) + num_prefix
    rows = torch.where(blocks[..., None] >= 0, slots[blocks.clamp_min(0)], padding).reshape(-1).to(torch.int32)
    first = blocks[:, :1]
    own_block = torch.where(blocks >= 0, blocks, first)
    shared = first * width + k1 + torch.arange(width - k1, device=device)
    own = (own_block[..., None] * width + torch.arange(k1, device=device)).reshape(len(blocks), -1)
    gather = torch.cat([shared, own], -1).reshape(-1)
    return rows, gather, width - k1, len(blocks)


@compile_constant
def token_blocks(grid: tuple[int, int], side: int, levels: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per level, the block of each raster token (N,)."""
    hierarchy = block_hierarchy(grid, side, levels, device)
    return tuple(layout.position // layout.tile_size for layout in hierarchy.layouts)


def pooled_key_gradients(d_keys: torch.Tensor, grid: tuple[int, int], side: int, levels: int,
                         num_prefix: int) -> torch.Tensor:
    """The gradient of the (B, h, P + N, d) keys (or values) from the gradient of ``with_pooled_keys``' buffer
    (B, h, P + N + pooled + tile, d): the tokens' own rows, plus, per level, each pooled row's gradient spread
    evenly over the real tokens of its block (a pooled row is their mean), summed in float32. The reference of
    ``triton_pool.spread_pooled_gradients`` (the CPU path's autograd gives the same through the pooling)."""
    hierarchy = block_hierarchy(grid, side, levels, d_keys.device)
    rows = pooled_key_tiles(grid, side, levels, num_prefix, d_keys.device)[0]
    b, h, _, d = d_keys.shape
    start = end = num_prefix + hierarchy.layouts[0].num_tokens
    spread = 0
    for level, (level_rows, blocks) in enumerate(zip(rows, token_blocks(grid, side, levels, d_keys.device))):
        pooled = d_keys.new_zeros(b, h, hierarchy.num_blocks(level), d, dtype=torch.float32)
        pooled.index_add_(2, level_rows, d_keys[:, :, start:start + level_rows.numel()].float())
        start += level_rows.numel()
        spread = spread + (pooled / hierarchy.counts[level][:, None]).index_select(2, blocks)
    d_tokens = d_keys[:, :, :end].clone()
    d_tokens[:, :, num_prefix:] = d_tokens[:, :, num_prefix:] + spread
    return d_tokens


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


@dataclass(frozen=True)
class CoreInputs:
    """What the core takes for one LLSA call: the keys and values with the pooled ones appended
    (``with_pooled_keys``), the CSR of key tiles per finest block (``key_tile_lists``), the key bias and the
    tokens' tile rows."""

    keys: torch.Tensor
    values: torch.Tensor
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    key_bias: torch.Tensor
    tile_rows: torch.Tensor


def key_tile_lists(selected: Sequence[torch.Tensor], grid: tuple[int, int], num_prefix: int, side: int,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_ptr, col_idx) of the core: per finest block its selected blocks, the pooled tiles of the blocks
    scored on the way and every coarsest pooled tile (null-tile entries where fewer were selected)."""
    levels = len(selected)
    hierarchy = block_hierarchy(grid, side, levels, selected[0].device)
    _, _, firsts, null_tile, coarsest, _ = pooled_key_tiles(grid, side, levels, num_prefix, selected[0].device)
    b, h, n1 = selected[0].shape[:3]
    lists = [selected[0].masked_fill(selected[0] < 0, null_tile)]
    for level in range(levels - 1):         # the children of the blocks selected one level up
        chosen = selected[level + 1][:, :, hierarchy.ancestor[level + 1]]
        lists.append(torch.where(chosen >= 0, chosen + firsts[level], null_tile))
    lists.append(coarsest.expand(b, h, n1, coarsest.numel()))         # every block of the coarsest level
    col_idx = torch.cat(lists, -1).to(torch.int32)
    return fixed_width_row_ptr(b, h, n1, col_idx.shape[-1], col_idx.device), col_idx.flatten()


def core_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], num_prefix: int,
                side: int, top_k: tuple[int, ...]) -> CoreInputs:
    """Pool q, k, v at every level, select (``select_blocks``), list the key tiles (``key_tile_lists``) and
    append the pooled keys and values (``with_pooled_keys``)."""
    levels, p = len(top_k), num_prefix
    hierarchy = block_hierarchy(grid, side, levels, q.device)
    rows, key_bias, _, _, _, tile_rows = pooled_key_tiles(grid, side, levels, p, q.device)
    pooled = [pool_levels(x[:, :, p:], hierarchy) for x in (q, k, v)]
    selected = select_blocks(pooled[0], pooled[1], hierarchy, top_k).selected
    row_ptr, col_idx = key_tile_lists(selected, grid, p, side)
    keys, values = (with_pooled_keys(x, pool, rows, side * side) for x, pool in ((k, pooled[1]), (v, pooled[2])))
    return CoreInputs(keys, values, row_ptr, col_idx, key_bias, tile_rows)


def loglinear_attention_on_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int],
                                num_prefix: int, side: int, top_k: tuple[int, ...],
                                core_backend: str | None = None) -> torch.Tensor:
    """The grid queries on the core (``core_backend``: the core's own choice when None), the tokens read in
    place and the pooled ones appended to k, v (gradients through the pooling by autograd); the prefix
    queries, dense over all keys, by SDPA."""
    t = side * side
    core = choose_backend("block_sparse_attention", core_backend, q, v=v)
    c = core_inputs(q, k, v, grid, num_prefix, side, top_k)
    out = core(q, c.keys, c.values, c.row_ptr, c.col_idx, t, t, num_prefix, None, None, c.key_bias, None,
               c.tile_rows)
    return fill_prefix_queries(out, q, k, v, num_prefix)
