"""Radial attention (Li et al., "Radial Attention: O(n log n) Sparse Attention with Energy Decay for
Long Video Generation", 2025, Sec. 4): a static mask whose compute density decays with distance.

Tokens at frame distance d (g = bit_length(d)) are attended within a spatial window whose area
halves each time d doubles; once the window would be smaller than one block, only every
(block / window)-th frame distance is kept. Summed over distances, each query sees O(S log T) keys
for T frames of S tokens: O(n log n) in total. The mask is stated on blocks and built once per grid
and options (cached). Layouts:

- ``official``: the official code's mask (radial_attn/attn_mask.py at 72788d4) for video grids,
  exactly: 1D blocks of ``block_size`` raster tokens; per frame pair a token band
  |i - j| <= w, w = max(2^bit_length(S) / 2^g * decay_factor, block) (full frame for d <= 1);
  frame distances subsampled once 2^bit_length(S) / 2^g < 128 (the official threshold); the first
  frame a sink (``sink=True``, as for Wan; HunyuanVideo has none); each frame pair's token mask
  reduced to blocks (a block is kept when more than 60% of its non-empty columns are more than
  1/3 dense); the trailing partial block dense.
- ``frames`` (the default for video): the same schedule with the band replaced by a window of tiles
  (tiles of one frame) of about the band's area and about square in tokens whatever the tile's shape,
  centred on the query tile. A band on the raster index is a horizontal stripe; the window is a
  neighbourhood. On an image grid the rows of tiles play the frames.
- ``distance`` (the default for images): decay with 2D tile distance. Tiles within Chebyshev
  distance ``dense_radius`` are kept; farther, distances double from shell to shell and each shell
  keeps the tiles on a lattice of stride 2^shell (relative to the query tile), so every shell costs
  the same and a query tile sees O(log N) tiles.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..core import checks
from ..core.compile_constant import compile_constant, fields_of
from ..core.tiles import TileLayout, packed_frames_layout, tile_centers, tile_layout

LAYOUTS = ("official", "frames", "distance")
OFFICIAL_SPLIT_THRESHOLD = 128      # hard-coded in the official code, independent of block_size


@dataclass(frozen=True, eq=False)
class RadialPlan:
    """The tiles of the grid and, per query tile, the key tiles it attends (-1 pads the lists)."""

    layout: TileLayout               # official: 1D blocks, the grid seen as (1, T*H*W)
    key_tiles: torch.Tensor          # (num_tiles, max_listed) long
    density: float                   # listed tile pairs / all tile pairs


def _official_band(d: int, tokens_per_frame: int, block_size: int, decay_factor: float) -> float:
    if d <= 1:
        return tokens_per_frame
    return max(2 ** tokens_per_frame.bit_length() / 2 ** d.bit_length() * decay_factor, block_size)


def _kept_distance(d: int, tokens_per_frame: int, threshold: int) -> bool:
    """Temporal subsampling: below one block of density, keep every (block / density)-th distance."""
    density = 2 ** tokens_per_frame.bit_length() / 2 ** d.bit_length()
    return density >= threshold or d % int(threshold / density) == 0


@functools.lru_cache(maxsize=4096)
def _official_pair_blocks(tokens_per_frame: int, block_size: int, band: int, row_offset: int,
                          col_offset: int) -> torch.Tensor:
    """The official reduction to blocks of one frame pair's band mask, computed from counts.

    The frame pair's S x S mask |r - c| <= band sits at (row_offset, col_offset) inside a window of
    ceil(S / block) blocks per side (tokens beyond it are cut off, as in the official code). For
    each block and each of its columns, count the rows of the block that attend it.
    """
    s, bs = tokens_per_frame, block_size
    nb = -(-s // bs)
    rows0 = torch.arange(nb)[:, None, None] * bs - row_offset                  # first frame row of each block
    c = (torch.arange(nb)[None, :, None] * bs + torch.arange(bs)) - col_offset  # frame column of each slot
    lo = torch.maximum(rows0.clamp_min(0), c - band)
    hi = torch.minimum((rows0 + bs).clamp_max(s), c + band + 1)
    count = (hi - lo).clamp_min(0) * ((c >= 0) & (c < s))                       # (nb, nb, bs)
    nonzero = (count > 0).sum(-1)
    dense = (3 * count > bs).sum(-1)                                           # column density > 1/3
    return (nonzero > 0) & (5 * dense > 3 * nonzero)                           # > 60% of non-empty columns


def official_block_mask(num_frames: int, tokens_per_frame: int, block_size: int, decay_factor: float,
                        sink: bool) -> torch.Tensor:
    """(nb, nb) bool over 1D blocks of ``block_size`` raster tokens, nb = ceil(T*S / block)."""
    s, bs = tokens_per_frame, block_size
    total = num_frames * s
    nb, nbf = -(-total // bs), -(-s // bs)
    mask = torch.zeros(nb, nb, dtype=torch.bool)
    if total % bs:                    # the official code keeps the block straddling the video's end dense
        mask[total // bs:] = True
        mask[:, total // bs:] = True
    for i in range(num_frames):
        for j in range(num_frames):
            d = abs(i - j)
            if sink and j == 0:
                band = s
            elif _kept_distance(d, s, OFFICIAL_SPLIT_THRESHOLD):
                band = math.floor(_official_band(d, s, bs, decay_factor))
            else:
                continue
            blocks = _official_pair_blocks(s, bs, min(band, s), (i * s) % bs, (j * s) % bs)
            r, c = (i * s) // bs, (j * s) // bs
            mask[r:r + nbf, c:c + nbf] |= blocks[:nb - r, :nb - c]
    return mask


def frames_block_mask(frame: torch.Tensor, centers: torch.Tensor, tokens_per_frame: int, tile: tuple[int, int],
                      decay_factor: float, sink: bool) -> torch.Tensor:
    """(tiles, tiles) bool over tiles of (th, tw) = ``tile`` tokens; ``frame`` (tiles,) each tile's frame,
    ``centers`` (tiles, 2) the mean (row, column) of its tokens in the frame.

    Frame distances d <= 1 (and the sink frame) are full; farther, a window centred on the query tile,
    about as many tokens as the official band's 2w + 1 and about square in tokens: the tiles whose centres
    lie within (r + 1/2) t of the query tile's on each axis, r ~ (sqrt(2w + 1) / t - 1) / 2 (for tiles cut
    from a grid, (2 ry + 1) x (2 rx + 1) tiles; tile centres of border tiles, shifted by less than t / 2,
    change nothing).
    """
    th, tw = tile
    s = tokens_per_frame
    num_frames = int(frame.max()) + 1
    radii = torch.full((num_frames, 2), -1.0)                                 # per frame distance; -1: dropped
    for d in range(2, num_frames):
        if _kept_distance(d, s, th * tw):
            side = math.sqrt(2 * 2 ** s.bit_length() / 2 ** d.bit_length() * decay_factor + 1)
            radii[d] = torch.tensor([max(0, round((side / t - 1) / 2)) for t in (th, tw)], dtype=torch.float)
    d = (frame[:, None] - frame[None, :]).abs()
    reach = (radii[d] + 0.5) * torch.tensor([th, tw])                         # (tiles, tiles, 2) in tokens
    within = ((centers[:, None, :] - centers[None, :, :]).abs() < reach).all(-1)
    mask = (d <= 1) | ((radii[d, 0] >= 0) & within)
    if sink:
        mask |= (frame == 0)[None, :]
    return mask


def distance_block_mask(tiles_per_side: tuple[int, int], dense_radius: int) -> torch.Tensor:
    """(tiles, tiles) bool for an image: near tiles kept, farther shells on doubling lattices."""
    th, tw = tiles_per_side
    t = torch.arange(th * tw)
    dy = (t // tw)[None, :] - (t // tw)[:, None]
    dx = (t % tw)[None, :] - (t % tw)[:, None]
    shell = torch.maximum(dy.abs(), dx.abs()) // (dense_radius + 1)
    stride = 2 ** _bit_length(shell)
    return (dy % stride == 0) & (dx % stride == 0)


def _bit_length(x: torch.Tensor) -> torch.Tensor:
    bits, x = torch.zeros_like(x), x.clone()
    while bool((x > 0).any()):
        bits += (x > 0).long()
        x >>= 1
    return bits


def _lists(mask: torch.Tensor) -> torch.Tensor:
    """(Q, K) bool -> (Q, max per row) long key indices, ascending, -1 padded."""
    rows, cols = mask.nonzero(as_tuple=True)                       # row-major: ascending within a row
    counts = mask.sum(-1)
    slot = torch.arange(rows.numel()) - (counts.cumsum(0) - counts)[rows]
    lists = torch.full((mask.shape[0], max(int(counts.max()), 1)), -1, dtype=torch.long)
    lists[rows, slot] = cols
    return lists


def check_mask_options(options: Mapping[str, Any], op: str = "radial_attention") -> None:
    """The mask options' values that need no grid: ``layout`` one of LAYOUTS (or None), ``tile`` None or
    2 or 3 ints >= 1, ``block_size`` and ``dense_radius`` ints >= 1 (at dense_radius 0 the lattices miss
    their shells), ``decay_factor`` a finite number > 0, ``sink`` and ``pack`` True, False or None."""
    if "layout" in options:
        checks.check_choice(options["layout"], "layout", LAYOUTS, op, allow_none=True)
    if options.get("tile") is not None:
        checks.check_ints(options["tile"], "tile", op)
    for name in ("block_size", "dense_radius"):
        if name in options:
            checks.check_int(options[name], name, op)
    if "decay_factor" in options:
        checks.check_float(options["decay_factor"], "decay_factor", op, positive=True)
    for name in ("sink", "pack"):
        if name in options:
            checks.check_bool(options[name], name, op, allow_none=True)


def _covering_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def normalize_options(grid: tuple[int, ...], layout: str | None = None, tile: tuple[int, ...] | None = None,
                      block_size: int = 128, decay_factor: float = 1.0, sink: bool | None = None,
                      dense_radius: int = 1, pack: bool | None = None) -> tuple:
    """Check the mask options for this grid; return them as a hashable tuple with defaults filled in.

    A tile side larger than the grid side shrinks to the smallest power of two that covers the side
    (a tile of (1000, 1000) on a 4x4 grid is one 4x4 tile, not a million padded slots); one tile spans
    that side either way, so the distance layout's mask is the same, and the frames layout counts the
    tile's tokens closer to the real ones. Likewise an official ``block_size`` larger than the video
    shrinks to the smallest power of two above its token count: one block, dense, either way. ``pack``
    (frames layout on video): tiles cut from each frame without padding inside it (``packed_frames_layout``);
    None: packed.
    """
    check_mask_options(dict(layout=layout, tile=tile, block_size=block_size, decay_factor=decay_factor, sink=sink,
                            dense_radius=dense_radius, pack=pack))
    video = len(grid) == 3
    layout = layout or ("frames" if video else "distance")
    if layout == "distance" and video:
        raise ValueError(f"radial_attention: layout='distance' is image-only; got the video grid {grid} "
                         "(use layout='frames' or 'official')")
    if layout == "official" and not video:
        raise ValueError(f"radial_attention: layout='official' is the official video mask and needs a "
                         f"(T, H, W) grid; got the image grid {grid} (use 'distance' or 'frames')")
    if layout == "official":
        if tile is not None:
            raise ValueError("radial_attention: layout='official' uses 1D blocks of block_size tokens, not tile")
        block_size = min(checks.as_int(block_size), _covering_power_of_two(math.prod(grid) + 1))
    else:
        tile = checks.check_ints(tile, "tile", "radial_attention") if tile is not None else ((1, 8, 8) if video else (8, 8))
        if len(tile) != len(grid):
            raise ValueError(f"radial_attention: tile {tile} must give one int >= 1 per axis of the grid {grid}")
        if video and tile[0] != 1:
            raise ValueError(f"radial_attention: layout='frames' needs tiles within one frame, tile[0] == 1; got {tile}")
        tile = tuple(min(t, _covering_power_of_two(side)) for t, side in zip(tile, grid))
    frames_video = video and layout == "frames"
    if pack and not frames_video:
        raise ValueError(f"radial_attention: pack=True packs the frames layout's tiles of a video grid; got "
                         f"layout={layout!r} on the grid {grid}")
    sink = video if sink is None else bool(sink)
    return (layout, tile, block_size if layout == "official" else None, float(decay_factor), sink,
            checks.as_int(dense_radius) if layout == "distance" else None, frames_video and pack is not False)


def tile_size(options: tuple) -> int:
    """Tokens per tile of the plan for ``normalize_options``' result (a block of ``block_size`` tokens for
    the official layout), without building the plan."""
    layout_name, tile, block_size = options[:3]
    return block_size if layout_name == "official" else math.prod(tile)


@compile_constant
def _plan_parts(grid: tuple[int, ...], options: tuple,
                device: torch.device | None) -> tuple[tuple, torch.Tensor, float]:
    """``radial_plan``'s parts: the TileLayout's fields, the key-tile lists and the density."""
    layout_name, tile, block_size, decay_factor, sink, dense_radius, pack = options
    if layout_name == "official":
        t, h, w = grid
        layout = tile_layout((1, t * h * w), (1, block_size), False, device)
        mask = official_block_mask(t, h * w, block_size, decay_factor, sink)
    elif layout_name == "distance":
        layout = tile_layout(grid, tile, False, device)
        mask = distance_block_mask(layout.tiles_per_side, dense_radius)
    else:
        layout = packed_frames_layout(grid, tile, device) if pack else tile_layout(grid, tile, False, device)
        centers = tile_centers(layout)
        if len(grid) == 3:
            frame, centers, tokens_per_frame = centers[:, 0].long(), centers[:, 1:], math.prod(grid[1:])
        else:                                                   # image: each row of tiles is a frame
            frame, tokens_per_frame = (centers[:, 0] // tile[0]).long(), tile[0] * grid[1]
            centers = torch.stack([torch.zeros_like(centers[:, 1]), centers[:, 1]], -1)
        mask = frames_block_mask(frame, centers, tokens_per_frame, tile[-2:], decay_factor, sink)
    return fields_of(layout), _lists(mask).to(device), float(mask.sum()) / mask.numel()


def radial_plan(grid: tuple[int, ...], options: tuple, device: torch.device | None = None) -> RadialPlan:
    """The tiles and key-tile lists for a grid and ``normalize_options(grid, ...)``: built once per
    (grid, options, device) and cached; under ``torch.compile`` constants, not traced (see
    ``compile_constant``), and specialized to the grid and options."""
    layout, key_tiles, density = _plan_parts(grid, options, device)
    return RadialPlan(TileLayout(*layout), key_tiles, density)


def _tile_frames(plan: RadialPlan) -> torch.Tensor:
    """(num_tiles,) long on the plan's device: the frame of each tile of a video plan (frames layout: tiles one frame
    deep, so a tile's first coordinate is its frame)."""
    return plan.layout.coords[:, 0].to(plan.key_tiles.device)


def far_key_tiles(plan: RadialPlan, sink: bool) -> torch.Tensor:
    """A video plan's key-tile lists (frames layout) without the tiles of the full frames, frame distance <= 1 and,
    with ``sink``, the first frame (``full_frame_spans``): the windows of the farther frames; -1 pads."""
    frame = _tile_frames(plan)
    key_frame = frame[plan.key_tiles.clamp_min(0)]
    full = ((frame[:, None] - key_frame).abs() <= 1) | ((key_frame == 0) & sink)
    return torch.where(full, -1, plan.key_tiles)


def full_frame_spans(plan: RadialPlan, sink: bool) -> torch.Tensor:
    """(num_tiles, 2, 2) int32: per query tile of a video plan (frames layout, frame f), its full frames as ranges
    [start, end) of raster token rows: frames f - 1 .. f + 1, and frame 0 (the sink) where it lies outside them
    (else an empty range)."""
    num_frames, tokens = plan.layout.grid[0], math.prod(plan.layout.grid[1:])
    frame = _tile_frames(plan)
    band = torch.stack([(frame - 1).clamp_min(0), (frame + 2).clamp_max(num_frames)], -1) * tokens
    sink_end = torch.where((frame >= 2) & sink, tokens, 0)
    return torch.stack([band, torch.stack([torch.zeros_like(sink_end), sink_end], -1)], 1).to(torch.int32)


def frame_tile_pairs(plan: RadialPlan) -> torch.Tensor:
    """(pairs, 2) long: a video plan's tiles (frames layout) two by two in their order within each frame, -1 for
    the second of a frame's last pair where the frame has an odd number of tiles. Both tiles of a pair have the
    same full frames (``full_frame_spans``)."""
    frame = _tile_frames(plan)
    index = torch.arange(frame.numel(), device=frame.device)
    firsts = index[(index - torch.searchsorted(frame, frame)) % 2 == 0]      # tiles are in frame order
    seconds = firsts + 1
    alone = (seconds >= frame.numel()) | (frame[seconds.clamp_max(frame.numel() - 1)] != frame[firsts])
    return torch.stack([firsts, torch.where(alone, -1, seconds)], -1)


def attended_pairs(plan: RadialPlan, num_prefix: int = 0) -> int:
    """Number of (query, key) token pairs the mask lets through, prefix pairs included."""
    per_tile = plan.layout.valid.sum(-1)
    listed = plan.key_tiles >= 0
    keys = (per_tile[plan.key_tiles.clamp_min(0)] * listed).sum(-1)
    n = plan.layout.num_tokens
    return int((per_tile * keys).sum()) + num_prefix * (num_prefix + n) + n * num_prefix


@compile_constant
def keeps_every_pair(grid: tuple[int, ...], **mask_opts) -> bool:
    """True where the mask on ``grid`` keeps every tile pair (small grids): exact dense attention (the
    family record's ``dense_on``)."""
    return radial_plan(grid, normalize_options(grid, **mask_opts)).density == 1.0
