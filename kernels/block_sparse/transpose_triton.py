"""The backward's layout per key tile in Triton: ``layout.transpose_csr`` and ``layout.chunk_key_tiles`` (their
torch reference) in three launches and a sort, for layouts that change every call (LLSA's selection).

Each CSR entry gets the key ((row * key tiles + key tile) * query tiles + query tile); sorted, the entries of
one key tile are contiguous with their query tiles ascending. Per key tile a binary search finds its range;
a first pass counts each block of tiles' programs (chunks of at most ``chunk`` entries) and hot tiles, a
second writes them at the offsets the counts before it give, and fills the rest of the bounds with idle
programs and free slots.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..core.triton_common import cdiv, launch
from .layout import KeyTileWork

BLOCK = 256


@triton.jit(do_not_specialize=["nqt", "nkt"])
def _entry_keys_kernel(RowPtr, ColIdx, Keys, nqt, nkt, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)          # the flattened (CSR row r, query tile i)
    r, i = row // nqt, row % nqt
    lo = tl.load(RowPtr + r * (nqt + 1) + i)
    hi = tl.load(RowPtr + r * (nqt + 1) + i + 1)
    for start in range(lo, hi, BLOCK):
        e = start + tl.arange(0, BLOCK)
        col = tl.load(ColIdx + e, mask=e < hi, other=0).to(tl.int64)
        tl.store(Keys + e, (r * nkt + col) * nqt + i, mask=e < hi)


@triton.jit
def _lower_bound(Sorted, n, target, steps):
    """The first index of the sorted keys whose key is >= target (vectorised binary search)."""
    lo = tl.zeros_like(target)
    hi = lo + n
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) // 2
        below = tl.load(Sorted + mid, mask=active, other=0) < target
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & ~below, mid, hi)
    return lo


@triton.jit
def _tile_chunks(Sorted, nnz, steps, block, num_tiles, nqt, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    tile = block * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = tile < num_tiles
    lo = _lower_bound(Sorted, nnz, tile * nqt, steps)
    hi = _lower_bound(Sorted, nnz, (tile + 1) * nqt, steps)
    chunks = tl.where(valid, tl.maximum((hi - lo + CHUNK - 1) // CHUNK, 1), 0)
    return tile, lo, hi, chunks


@triton.jit(do_not_specialize=["nnz", "steps", "num_tiles", "nqt"])
def _count_kernel(Sorted, Totals, nnz, steps, num_tiles, nqt, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    _, _, _, chunks = _tile_chunks(Sorted, nnz, steps, block, num_tiles, nqt, CHUNK, BLOCK)
    tl.store(Totals + block * 2, tl.sum(chunks, 0))
    tl.store(Totals + block * 2 + 1, tl.sum((chunks > 1).to(tl.int64), 0))


@triton.jit
def _totals_before(Totals, count, BLOCK: tl.constexpr):
    """(programs, hot tiles) of the first ``count`` blocks."""
    programs = tl.zeros([BLOCK], dtype=tl.int64)
    hot = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(0, count, BLOCK):
        j = start + tl.arange(0, BLOCK)
        programs += tl.load(Totals + j * 2, mask=j < count, other=0)
        hot += tl.load(Totals + j * 2 + 1, mask=j < count, other=0)
    return tl.sum(programs, 0), tl.sum(hot, 0)


@triton.jit(do_not_specialize=["nnz", "steps", "num_tiles", "nqt", "nkt", "num_blocks", "width", "slots"])
def _write_kernel(Sorted, Totals, Items, HotTiles, nnz, steps, num_tiles, nqt, nkt, num_blocks, width, slots,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    if block >= num_blocks:                  # idle programs and free slots past the real ones
        programs, hot = _totals_before(Totals, num_blocks, BLOCK)
        idle = programs + (block - num_blocks) * BLOCK + lane
        tl.store(Items + idle * 5, tl.full([BLOCK], -1, tl.int32), mask=idle < width)
        free = hot + (block - num_blocks) * BLOCK + lane
        tl.store(HotTiles + free * 2, tl.full([BLOCK], -1, tl.int32), mask=free < slots)
        return
    first_program, first_hot = _totals_before(Totals, block, BLOCK)
    tile, lo, hi, chunks = _tile_chunks(Sorted, nnz, steps, block, num_tiles, nqt, CHUNK, BLOCK)
    is_hot = chunks > 1
    first = first_program + tl.cumsum(chunks, 0) - chunks
    rank = first_hot + tl.cumsum(is_hot.to(tl.int64), 0) - is_hot.to(tl.int64)
    row, key_tile = tile // nkt, tile % nkt
    slot = tl.where(is_hot, rank, -1)
    for c in range(0, tl.max(chunks, 0)):
        write = c < chunks
        item = Items + (first + c) * 5
        start = lo + c * CHUNK
        tl.store(item, row.to(tl.int32), mask=write)
        tl.store(item + 1, key_tile.to(tl.int32), mask=write)
        tl.store(item + 2, start.to(tl.int32), mask=write)
        tl.store(item + 3, tl.minimum(start + CHUNK, hi).to(tl.int32), mask=write)
        tl.store(item + 4, slot.to(tl.int32), mask=write)
    tl.store(HotTiles + rank * 2, row.to(tl.int32), mask=is_hot)
    tl.store(HotTiles + rank * 2 + 1, key_tile.to(tl.int32), mask=is_hot)


def transposed_work(row_ptr: torch.Tensor, col_idx: torch.Tensor, tile_mask_idx: torch.Tensor | None,
                    num_k_tiles: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor | None, KeyTileWork]:
    """(row_idx, mask_idx, work): ``transpose_csr``'s query tiles (and tile masks) per key tile and
    ``chunk_key_tiles``' work list over them, the same values (idle programs and free slots: row -1 only)."""
    bq, hq, n1 = row_ptr.shape
    nqt, nnz, dev = n1 - 1, col_idx.numel(), row_ptr.device
    num_tiles = bq * hq * num_k_tiles
    width, slots = num_tiles + nnz // chunk, min(num_tiles, nnz // (chunk + 1) + 1)
    if num_tiles == 0:
        return (col_idx.new_empty(0), None if tile_mask_idx is None else tile_mask_idx.new_empty(0),
                KeyTileWork(col_idx.new_empty(0, 5), col_idx.new_empty(0, 2)))
    keys = torch.empty(nnz, dtype=torch.int64, device=dev)
    if nnz:
        launch(_entry_keys_kernel, (bq * hq * nqt,), row_ptr, col_idx, keys, nqt, num_k_tiles, BLOCK=64)
    keys, order = torch.sort(keys)
    num_blocks = cdiv(num_tiles, BLOCK)
    steps = max(1, nnz.bit_length())
    totals = torch.empty(num_blocks, 2, dtype=torch.int64, device=dev)
    launch(_count_kernel, (num_blocks,), keys, totals, nnz, steps, num_tiles, nqt, CHUNK=chunk, BLOCK=BLOCK)
    items = torch.empty(width, 5, dtype=torch.int32, device=dev)
    hot_tiles = torch.empty(slots, 2, dtype=torch.int32, device=dev)
    idle = cdiv(max(width - num_tiles, slots), BLOCK)
    launch(_write_kernel, (num_blocks + idle,), keys, totals, items, hot_tiles, nnz, steps, num_tiles, nqt,
           num_k_tiles, num_blocks, width, slots, CHUNK=chunk, BLOCK=BLOCK)
    mask_idx = None if tile_mask_idx is None else tile_mask_idx[order]
    return (keys % nqt).to(torch.int32), mask_idx, KeyTileWork(items, hot_tiles)
