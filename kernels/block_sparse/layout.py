"""The layout of block-sparse attention over token tiles, its checks and its CSR tools.

Tokens are in tile order (see ``kernels.core.tiles``), or stay in place (``tile_rows``, below). The layout:

- ``q`` (B, H, Nq, d); ``k``, ``v`` (B, H, Nk, d). The first ``num_prefix`` (P) tokens of k/v are
  prefix (global) keys attended by every query; they are not tiled. Query tile i holds queries
  ``[i*block_m, (i+1)*block_m)``; key tile j holds keys ``[P + j*block_n, P + (j+1)*block_n)``. The
  last tile of each may be partial (tokens past Nq / Nk do not exist).
- CSR over query tiles: ``row_ptr`` int32 (Bq, Hq, num_q_tiles + 1) with Bq in {1, B}, Hq in {1, H}
  (size 1 broadcasts); ``col_idx`` int32 (nnz,). Offsets are absolute into ``col_idx``: row
  (b, h, i) lists ``col_idx[row_ptr[b, h, i]:row_ptr[b, h, i + 1]]``, and the rows, flattened in
  (b, h, i) order, cover ``col_idx`` contiguously from 0 to nnz. A key tile appears at most once
  per row; the order inside a row is free. A row may be empty.
- Fine-grained masking inside a listed tile: ``tile_mask_idx`` int32 (nnz,), one per CSR entry,
  -1 for a full tile, else an index into ``tile_masks`` int32 (num_masks, block_m,
  ceil(block_n / 32)): bit ``c % 32`` of word ``c // 32`` in row r says whether query r of the tile
  attends key c of the tile (``pack_tile_masks`` builds them from booleans). Entries with the same
  pattern share a mask (neighborhood windows repeat across interior tiles).
- Per-key additive bias ``key_bias`` float (Bk, Hk, Nk), Bk in {1, B}, Hk in {1, H}: added to the
  scaled scores of every query (-inf drops a key, e.g. a padding token; log(count) weights a pooled
  key standing for count tokens, as in log-linear attention). No gradient flows into it.

A query that attends no key (empty row, no prefix, everything masked) gets output 0.

Tokens in place (``tile_rows``): for self-attention on a grid the tokens may stay where they are (say,
raster order after the prefix) instead of being permuted into tile order. ``tile_rows`` int32
(num_tiles * block,) then gives the token row of each tile slot, for query and key tiles alike
(block_m == block_n, Nq == Nk); a padding slot holds N (no token). It lists every row in [P, N)
once, so a (B, H, N, d) output has the grid rows filled and the P prefix rows 0. A 2D (or 3D) tile
of a raster grid is then read in place: ``kernels.core.tiles.TileLayout.slots + P`` is such a table.
Keys past the N tokens (Nk > N) are extra key tiles of ``block_n`` consecutive rows, numbered after the
table's tiles (LLSA's pooled tokens: the tokens stay in place, only the extra keys are appended).
The Triton forward also takes query tiles other than the key tiles (``triton.QueryTiles``: several key
tiles' rows side by side; each list holds the entries all rows see, then each row group's own, -1 padded), so
that key tiles listed by all of them are read once (LLSA's sibling blocks; radial attention's full frames, shared
by two tiles of a frame).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.compile_constant import compile_constant


def num_tiles(num_tokens: int, block: int) -> int:
    return -(-num_tokens // block)


def pack_tile_masks(masks: torch.Tensor) -> torch.Tensor:
    """(M, block_m, block_n) bool -> (M, block_m, ceil(block_n / 32)) int32 bit masks."""
    m, bm, bn = masks.shape
    words = num_tiles(bn, 32)
    bits = torch.zeros(m, bm, words * 32, dtype=torch.int64, device=masks.device)
    bits[..., :bn] = masks.to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=masks.device) << torch.arange(32, device=masks.device)
    packed = (bits.view(m, bm, words, 32) * weights).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_tile_masks(packed: torch.Tensor, block_n: int) -> torch.Tensor:
    """Inverse of ``pack_tile_masks``: (M, block_m, words) int32 -> (M, block_m, block_n) bool."""
    cols = torch.arange(block_n, device=packed.device)
    words = packed.to(torch.int64)[..., cols // 32]
    return ((words >> (cols % 32)) & 1).bool()


def block_mask_to_csr(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Bq, Hq, num_q_tiles, num_k_tiles) bool -> (row_ptr, col_idx), columns ascending per row."""
    bq, hq, nqt, _ = block_mask.shape
    cum = torch.zeros(bq * hq * nqt + 1, dtype=torch.int64, device=block_mask.device)
    cum[1:] = block_mask.reshape(bq * hq * nqt, -1).sum(-1).cumsum(0)
    dev = block_mask.device
    starts = torch.arange(bq * hq, device=dev)[:, None] * nqt + torch.arange(nqt + 1, device=dev)
    row_ptr = cum[starts].reshape(bq, hq, nqt + 1).to(torch.int32)
    col_idx = block_mask.nonzero()[:, -1].to(torch.int32)
    return row_ptr, col_idx


def csr_to_block_mask(row_ptr: torch.Tensor, col_idx: torch.Tensor, num_k_tiles: int) -> torch.Tensor:
    """(row_ptr, col_idx) -> (Bq, Hq, num_q_tiles, num_k_tiles) bool."""
    bq, hq, n1 = row_ptr.shape
    rows = _entry_rows(row_ptr, col_idx.numel())
    dense = torch.zeros(bq * hq * (n1 - 1), num_k_tiles, dtype=torch.bool, device=row_ptr.device)
    dense[rows, col_idx.long()] = True
    return dense.reshape(bq, hq, n1 - 1, num_k_tiles)


def _entry_rows(row_ptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """Flattened (b, h, i) row of each CSR entry (no host sync)."""
    counts = (row_ptr[..., 1:] - row_ptr[..., :-1]).reshape(-1).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=row_ptr.device), counts, output_size=nnz)


def transpose_csr(row_ptr: torch.Tensor, col_idx: torch.Tensor, tile_mask_idx: torch.Tensor | None,
                  num_k_tiles: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The same layout listed per key tile: (col_ptr (Bq, Hq, num_k_tiles + 1), row_idx, mask_idx).

    ``row_idx`` gives the query tiles (ascending) that list each key tile; ``mask_idx`` their tile
    masks. Pure torch on the layout's device, no host sync; with ``chunk_key_tiles`` the reference of
    ``transpose_triton.transposed_work``, which the backward runs.
    """
    bq, hq, n1 = row_ptr.shape
    nqt, nnz, dev = n1 - 1, col_idx.numel(), row_ptr.device
    rows = _entry_rows(row_ptr, nnz)
    head, q_tile = rows // nqt, rows % nqt
    column = head * num_k_tiles + col_idx.long()
    order = torch.argsort(column * nqt + q_tile)
    counts = torch.zeros(bq * hq * num_k_tiles, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, column, torch.ones_like(column))
    cum = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=dev)
    cum[1:] = counts.cumsum(0)
    starts = torch.arange(bq * hq, device=dev)[:, None] * num_k_tiles + torch.arange(num_k_tiles + 1, device=dev)
    col_ptr = cum[starts].reshape(bq, hq, num_k_tiles + 1).to(torch.int32)
    mask_idx = None if tile_mask_idx is None else tile_mask_idx[order].contiguous()
    return col_ptr, q_tile[order].to(torch.int32), mask_idx


@dataclass(frozen=True)
class KeyTileWork:
    """The backward's dK/dV work per key tile, split where many query tiles list one key tile.

    A key tile listed by more than ``chunk`` query tiles (a hot tile: LLSA's pooled tokens are listed by
    every query block) would serialise its program over all of them; it is cut into chunks of at most
    ``chunk`` entries, one program each, whose float32 partial sums meet in a buffer slot of the tile.
    One list for every (b, h) row of the CSR: ``items`` int32 (W, 5), per program (the CSR row (b * Hq + h)
    or -1 for none: the rest of that item is then meaningless, key tile, first and end entry of the
    transposed CSR, hot slot or -1); ``hot_tiles`` int32 (S, 2): the (row, key tile) of each slot, row -1 for
    none. W and S are bounds known without reading the layout (no host sync).
    """

    items: torch.Tensor
    hot_tiles: torch.Tensor


def chunk_key_tiles(col_ptr: torch.Tensor, nnz: int, chunk: int) -> KeyTileWork:
    """Split the transposed CSR's key tiles into programs of at most ``chunk`` query tiles each: every key
    tile of every row gets one program at least (tiles nobody lists get zero gradients); W = rows x tiles +
    nnz // chunk programs and S = min(rows x tiles, nnz // (chunk + 1) + 1) hot slots bound any layout of
    ``nnz`` entries (the float32 partials then take at most twice the keys' size)."""
    bq, hq, n1 = col_ptr.shape
    nkt, dev = n1 - 1, col_ptr.device
    ptr = col_ptr.reshape(bq * hq, n1).long()
    starts, ends_ptr = ptr[:, :-1].flatten(), ptr[:, 1:].flatten()         # per (row, tile), flattened
    chunks = ((ends_ptr - starts + chunk - 1) // chunk).clamp_min(1)
    ends = chunks.cumsum(0)
    tiles = bq * hq * nkt
    width, slots = tiles + nnz // chunk, min(tiles, nnz // (chunk + 1) + 1)
    if tiles == 0:                      # no key tile (prefix keys only)
        return KeyTileWork(ptr.new_empty(0, 5, dtype=torch.int32), ptr.new_empty(0, 2, dtype=torch.int32))
    work = torch.arange(width, device=dev)
    flat = torch.searchsorted(ends, work, right=True).clamp_max(tiles - 1)
    real = work < ends[-1]                                              # the rest: idle programs
    lo = starts[flat] + (work - (ends[flat] - chunks[flat])) * chunk
    hot = chunks > 1
    rank = hot.cumsum(0) - 1
    owner = torch.full((slots + 1,), -1, dtype=torch.long, device=dev).scatter_(
        0, torch.where(hot, rank, slots), torch.arange(tiles, device=dev))[:slots]     # slots: the dump entry
    items = torch.stack([torch.where(real, flat // nkt, -1), flat % nkt, lo,
                         torch.minimum(lo + chunk, ends_ptr[flat]), torch.where(hot, rank, -1)[flat]], -1)
    hot_tiles = torch.stack([torch.where(owner >= 0, owner // nkt, -1), owner % nkt], -1)
    return KeyTileWork(items.to(torch.int32), hot_tiles.to(torch.int32))


def check_block_sparse_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_ptr: torch.Tensor,
                            col_idx: torch.Tensor, block_m: int, block_n: int, num_prefix: int,
                            tile_mask_idx: torch.Tensor | None, tile_masks: torch.Tensor | None,
                            key_bias: torch.Tensor | None, tile_rows: torch.Tensor | None = None,
                            op: str = "block_sparse_attention") -> None:
    """Shape, dtype and device checks of the layout (no host sync: index values are not read)."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{op}: {name} must be a power of two >= 16, got {blk}")
    if not 0 <= num_prefix <= nk:
        raise ValueError(f"{op}: num_prefix must be in [0, Nk={nk}], got {num_prefix}")
    if v.shape[-1] != d:
        raise ValueError(f"{op}: v must have the head dim of q ({d}), got {v.shape[-1]}")
    nqt = num_tiles(nq, block_m)
    if tile_rows is not None:
        if block_m != block_n or nk < nq:
            raise ValueError(f"{op}: tile_rows (tokens in place) needs block_m == block_n and Nk >= Nq (the keys "
                             f"of the tokens, then extra key tiles), got blocks {block_m}/{block_n} and Nq/Nk "
                             f"{nq}/{nk}")
        if (tile_rows.dim() != 1 or tile_rows.numel() % block_m or tile_rows.dtype != torch.int32
                or tile_rows.device != q.device):
            raise ValueError(f"{op}: tile_rows must be a 1-D int32 tensor on {q.device} of whole tiles of "
                             f"{block_m} slots, got {tile_rows.dtype} {tuple(tile_rows.shape)} on {tile_rows.device}")
        nqt = tile_rows.numel() // block_m
    if (row_ptr.dim() != 3 or row_ptr.shape[0] not in (1, b) or row_ptr.shape[1] not in (1, h)
            or row_ptr.shape[2] != nqt + 1):
        raise ValueError(f"{op}: row_ptr must have shape (1 or B={b}, 1 or heads={h}, num_q_tiles+1={nqt + 1}) "
                         f"for {'tile_rows' if tile_rows is not None else f'Nq={nq}'} and block_m={block_m}, "
                         f"got {tuple(row_ptr.shape)}")
    index_tensors = [("row_ptr", row_ptr), ("col_idx", col_idx)]
    if (tile_mask_idx is None) != (tile_masks is None):
        raise ValueError(f"{op}: tile_mask_idx and tile_masks go together; got only one of them")
    if tile_mask_idx is not None:
        index_tensors += [("tile_mask_idx", tile_mask_idx), ("tile_masks", tile_masks)]
        if tile_mask_idx.shape != col_idx.shape:
            raise ValueError(f"{op}: tile_mask_idx must have col_idx's shape {tuple(col_idx.shape)}, "
                             f"got {tuple(tile_mask_idx.shape)}")
        want = (block_m, num_tiles(block_n, 32))
        if tile_masks.dim() != 3 or tuple(tile_masks.shape[1:]) != want:
            raise ValueError(f"{op}: tile_masks must have shape (num_masks, {want[0]}, {want[1]}), "
                             f"got {tuple(tile_masks.shape)}")
    if col_idx.dim() != 1:
        raise ValueError(f"{op}: col_idx must be 1-D (nnz,), got shape {tuple(col_idx.shape)}")
    for name, t in index_tensors:
        if t.dtype != torch.int32 or t.device != q.device:
            raise ValueError(f"{op}: {name} must be int32 on {q.device}, got {t.dtype} on {t.device}")
    if key_bias is not None and (key_bias.dim() != 3 or key_bias.shape[0] not in (1, b)
                                 or key_bias.shape[1] not in (1, h) or key_bias.shape[2] != nk
                                 or not key_bias.is_floating_point() or key_bias.device != q.device):
        raise ValueError(f"{op}: key_bias must be a float tensor (1 or B={b}, 1 or heads={h}, Nk={nk}) on "
                         f"{q.device}, got {key_bias.dtype} {tuple(key_bias.shape)} on {key_bias.device}")


def check_block_sparse_layout(row_ptr: torch.Tensor, col_idx: torch.Tensor, num_k_tiles: int,
                              tile_mask_idx: torch.Tensor | None = None, num_masks: int = 0) -> None:
    """Value checks of the CSR (reads the indices: a host sync). Raises ValueError."""
    flat = row_ptr.reshape(row_ptr.shape[0] * row_ptr.shape[1], -1).long()
    if flat.numel() and (flat[0, 0] != 0 or flat[-1, -1] != col_idx.numel()
                         or (flat[1:, 0] != flat[:-1, -1]).any() or (flat.diff(dim=-1) < 0).any()):
        raise ValueError("row_ptr must be nondecreasing, start at 0, end at nnz = len(col_idx), and each "
                         "(b, h) block of rows must start where the previous one ends")
    if col_idx.numel() and (col_idx.min() < 0 or col_idx.max() >= num_k_tiles):
        raise ValueError(f"col_idx must lie in [0, num_k_tiles={num_k_tiles})")
    rows = _entry_rows(row_ptr, col_idx.numel())
    if torch.unique(rows * num_k_tiles + col_idx.long()).numel() != col_idx.numel():
        raise ValueError("a key tile is listed twice in one query tile's row")
    if tile_mask_idx is not None and tile_mask_idx.numel() and (
            tile_mask_idx.min() < -1 or tile_mask_idx.max() >= num_masks):
        raise ValueError(f"tile_mask_idx must lie in [-1, num_masks={num_masks})")


def core_fits(tile_size: int) -> bool:
    """Whether the core's kernels take tiles of ``tile_size`` tokens: a power of two >= 16."""
    return tile_size >= 16 and tile_size & (tile_size - 1) == 0


def csr_from_lists(lists: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Bq, Hq, Q, L) key-tile lists, -1 padded -> the core's (row_ptr (Bq, Hq, Q + 1), col_idx)."""
    bq, hq, nq, _ = lists.shape
    counts = (lists >= 0).sum(-1).flatten()
    cum = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    starts = torch.arange(bq * hq, device=lists.device)[:, None] * nq + torch.arange(nq + 1, device=lists.device)
    return cum[starts].reshape(bq, hq, nq + 1).to(torch.int32), lists[lists >= 0].to(torch.int32)


@compile_constant
def fixed_width_row_ptr(b: int, h: int, nq: int, width: int, device: torch.device) -> torch.Tensor:
    """The row pointers of a CSR of ``width`` entries per row, (B, h, Q + 1) int32: for lists that change
    every call (their ``col_idx`` flattened), built once per shape (no device-to-host sync)."""
    starts = torch.arange(b * h, device=device)[:, None] * nq + torch.arange(nq + 1, device=device)
    return (starts * width).reshape(b, h, nq + 1).to(torch.int32)

