"""The tile layout shared by the sparse kernels: grid tokens regrouped into 2D (or 3D) tiles.

A band on the raster index is a horizontal stripe of the image; a tile of 8x8 tokens is a compact
square, so a sparse pattern stated on tiles (and a kernel working on 64-query blocks) follows the
2D geometry. Grids that are not multiples of the tile are padded; ``valid`` marks the real tokens.
Optionally the tiles themselves are put in Morton (Z) order, which makes every level of a quadtree
over the tiles a contiguous range (the token order of LLSA, Zhou et al. 2025, Sec. 3).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

DEFAULT_TILE_2D = (8, 8)
DEFAULT_TILE_3D = (4, 4, 4)


@dataclass(frozen=True, eq=False)
class TileLayout:
    """Where every grid token goes when the grid is cut into tiles.

    ``slots`` (num_tiles * tile_size,): the raster index of the token in each tile slot, or
    ``num_tokens`` for a padding slot. ``position`` (num_tokens,): the inverse, the slot of each
    raster token. ``valid`` (num_tiles, tile_size): real tokens. ``coords`` (num_tiles, ndim): each
    tile's coordinates in tile units, in the tiles' order. Tokens inside a tile are in raster order
    (``packed_frames_layout``'s: in its band order).
    """

    grid: tuple[int, ...]
    tile: tuple[int, ...]
    tiles_per_side: tuple[int, ...]
    slots: torch.Tensor
    position: torch.Tensor
    valid: torch.Tensor
    coords: torch.Tensor
    morton: bool = False

    @property
    def num_tiles(self) -> int:
        return math.prod(self.tiles_per_side)

    @property
    def tile_size(self) -> int:
        return math.prod(self.tile)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def is_exact_raster(self) -> bool:
        """Tiles in raster order that fill the grid exactly: tiling is then a reshape and a permute."""
        return not self.morton and all(g % t == 0 for g, t in zip(self.grid, self.tile))


def morton_codes(coords: torch.Tensor) -> torch.Tensor:
    """Z-order codes of integer coordinates (n, ndim): bits interleaved, the first axis the most
    significant of each group, so a 2x2 quad is ordered (0,0), (0,1), (1,0), (1,1)."""
    ndim = coords.shape[1]
    bits = max(int(coords.max()).bit_length(), 1)
    code = torch.zeros(coords.shape[0], dtype=torch.long, device=coords.device)
    for b in range(bits):
        for axis in range(ndim):
            code |= ((coords[:, axis] >> b) & 1) << (b * ndim + ndim - 1 - axis)
    return code


def default_tile(grid: Sequence[int]) -> tuple[int, ...]:
    return DEFAULT_TILE_2D if len(grid) == 2 else DEFAULT_TILE_3D


@functools.lru_cache(maxsize=256)
def tile_layout(grid: tuple[int, ...], tile: tuple[int, ...] | None = None, morton: bool = False,
                device: torch.device | None = None) -> TileLayout:
    """The (cached) layout of ``grid`` (H, W) or (T, H, W) cut into ``tile`` (default 8x8 / 4x4x4)."""
    grid = tuple(int(g) for g in grid)
    tile = default_tile(grid) if tile is None else tuple(int(t) for t in tile)
    if len(tile) != len(grid) or any(t < 1 for t in tile):
        raise ValueError(f"tile {tile} must have one positive size per grid axis of {grid}")
    tiles_per_side = tuple(-(-g // t) for g, t in zip(grid, tile))
    coords = torch.cartesian_prod(*(torch.arange(n) for n in tiles_per_side)).reshape(-1, len(grid))
    if morton:
        coords = coords[torch.argsort(morton_codes(coords), stable=True)]
    offsets = torch.cartesian_prod(*(torch.arange(t) for t in tile)).reshape(-1, len(grid))
    pos = coords[:, None, :] * torch.tensor(tile) + offsets[None, :, :]      # (tiles, tile_size, ndim)
    valid = (pos < torch.tensor(grid)).all(dim=-1)
    strides = torch.tensor([math.prod(grid[a + 1:]) for a in range(len(grid))])
    num_tokens = math.prod(grid)
    slots = torch.where(valid, (pos * strides).sum(-1), num_tokens).reshape(-1)
    position = torch.empty(num_tokens, dtype=torch.long)
    position[slots[slots < num_tokens]] = torch.arange(slots.numel())[slots < num_tokens]
    return TileLayout(grid, tile, tiles_per_side, slots.to(device), position.to(device), valid.to(device),
                      coords.to(device), morton)


@functools.lru_cache(maxsize=64)
def packed_frames_layout(grid: tuple[int, int, int], tile: tuple[int, int, int],
                         device: torch.device | None = None) -> TileLayout:
    """Tiles of th * tw tokens cut from each frame of a video grid (T, H, W) without padding inside the frame:
    the frame's tokens in bands of th rows, each band column by column, every other band right to left (a tile
    that runs into the next band stays at the same edge), cut into runs of th * tw; only each frame's last tile
    is padded. Inside the bands the tiles are th x tw. Where th and tw divide H and W this is ``tile_layout``.
    ``tiles_per_side``: (T, 1, tiles per frame); ``coords``: (frame, 0, tile of the frame)."""
    t, h, w = grid
    _, th, tw = tile
    if h % th == 0 and w % tw == 0:
        return tile_layout(grid, tile, False, device)
    size, frame_tokens = th * tw, h * w
    order = []
    for band, top in enumerate(range(0, h, th)):
        rows = torch.arange(top, min(top + th, h))
        cols = torch.arange(w) if band % 2 == 0 else torch.arange(w - 1, -1, -1)
        order.append((rows[None, :] * w + cols[:, None]).reshape(-1))          # column by column
    per_frame = -(-frame_tokens // size)
    frame_slots = torch.cat([*order, torch.full((per_frame * size - frame_tokens,), -1)])
    num_tokens = t * frame_tokens
    slots = torch.where(frame_slots >= 0, frame_slots + torch.arange(t)[:, None] * frame_tokens, num_tokens)
    slots = slots.reshape(-1)
    valid = (slots < num_tokens).reshape(-1, size)
    position = torch.empty(num_tokens, dtype=torch.long)
    position[slots[slots < num_tokens]] = torch.arange(slots.numel())[slots < num_tokens]
    coords = torch.cartesian_prod(torch.arange(t), torch.zeros(1, dtype=torch.long), torch.arange(per_frame))
    return TileLayout(grid, tile, (t, 1, per_frame), slots.to(device), position.to(device), valid.to(device),
                      coords.to(device))


def tile_centers(layout: TileLayout) -> torch.Tensor:
    """(num_tiles, ndim) float64 on the CPU: the mean grid coordinates of each tile's real tokens."""
    grid = layout.grid
    index = layout.slots.cpu().clamp_max(layout.num_tokens - 1)
    coords = torch.stack([(index // math.prod(grid[a + 1:])) % grid[a] for a in range(len(grid))], -1).double()
    weight = layout.valid.cpu().reshape(-1, 1).double()
    per_tile = lambda x: x.reshape(layout.num_tiles, layout.tile_size, -1).sum(1)      # noqa: E731
    return per_tile(coords * weight) / per_tile(weight)


def to_tiles(x: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """(..., num_tokens, d) in raster order -> (..., num_tiles, tile_size, d); padding slots are 0."""
    if x.shape[-2] != layout.num_tokens:
        raise ValueError(f"to_tiles: {x.shape[-2]} tokens do not fill the grid {layout.grid}")
    if layout.is_exact_raster:                  # (..., n0, t0, n1, t1, ..., d) -> (..., n0, n1, ..., t0, t1, ..., d)
        ndim = len(layout.grid)
        split = x.unflatten(-2, [s for pair in zip(layout.tiles_per_side, layout.tile) for s in pair])
        lead = split.dim() - 2 * ndim - 1
        order = [*range(lead), *(lead + 2 * a for a in range(ndim)), *(lead + 2 * a + 1 for a in range(ndim)),
                 split.dim() - 1]
        return split.permute(order).reshape(*x.shape[:-2], layout.num_tiles, layout.tile_size, x.shape[-1])
    padded = torch.cat([x, x.new_zeros(*x.shape[:-2], 1, x.shape[-1])], dim=-2)
    tiled = padded.index_select(-2, layout.slots.to(x.device))
    return tiled.unflatten(-2, (layout.num_tiles, layout.tile_size))


def from_tiles(x: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """(..., num_tiles, tile_size, d) -> (..., num_tokens, d) in raster order (padding dropped)."""
    if layout.is_exact_raster:
        ndim = len(layout.grid)
        split = x.unflatten(-2, layout.tile).unflatten(-2 - ndim, layout.tiles_per_side)
        lead = split.dim() - 2 * ndim - 1
        order = [*range(lead), *(a for pair in zip(range(lead, lead + ndim), range(lead + ndim, lead + 2 * ndim))
                                 for a in pair), split.dim() - 1]
        return split.permute(order).reshape(*x.shape[:-3], layout.num_tokens, x.shape[-1])
    return x.flatten(-3, -2).index_select(-2, layout.position.to(x.device))


def tile_sums(x: torch.Tensor, layout: TileLayout, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(..., num_tokens, d) in raster order -> (..., num_tiles, d): the sum of each tile's tokens (padding
    adds 0), in ``dtype``; a reduction over a view of x when the tiles fill the grid (no copy into tile
    order), else over ``to_tiles``."""
    if not layout.is_exact_raster:
        return to_tiles(x, layout).sum(-2, dtype=dtype)
    return exact_tile_sums(x, layout.grid, layout.tile, dtype)


def exact_tile_sums(x: torch.Tensor, grid: Sequence[int], tile: Sequence[int],
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tile_sums`` for tiles that fill the grid exactly: a reduction over a view of x."""
    ndim = len(grid)
    split = x.unflatten(-2, [s for g, t in zip(grid, tile) for s in (g // t, t)])
    inner = tuple(-2 - 2 * a for a in range(ndim))             # the within-tile axes
    return split.sum(inner, dtype=dtype).flatten(-1 - ndim, -2)
