"""The tile layout: exact round trip on odd grids, tiles are boxes of the grid, Morton order of tiles."""
import math

import pytest
import torch

from subquad.kernels.core.tiles import (from_tiles, morton_codes, packed_frames_layout, tile_centers, tile_layout,
                                       to_tiles)

GRIDS = [((13, 17), None), ((1, 1), None), ((3, 5, 7), None), ((16, 16), (4, 4)), ((9, 4), (2, 3)),
         ((5, 6, 7), (1, 4, 4)), ((2, 3), (8, 8))]


@pytest.mark.parametrize("morton", [False, True])
@pytest.mark.parametrize("grid,tile", GRIDS)
def test_round_trip_is_exact(grid, tile, morton):
    layout = tile_layout(grid, tile, morton)
    x = torch.randn(2, 3, math.prod(grid), 5)
    tiled = to_tiles(x, layout)
    assert tiled.shape == (2, 3, layout.num_tiles, layout.tile_size, 5)
    assert torch.equal(from_tiles(tiled, layout), x)
    assert int(layout.valid.sum()) == math.prod(grid)
    assert (tiled[:, :, ~layout.valid] == 0).all()


@pytest.mark.parametrize("grid,tile", GRIDS)
def test_each_tile_is_a_box_of_the_grid(grid, tile):
    layout = tile_layout(grid, tile, True)
    strides = [math.prod(grid[a + 1:]) for a in range(len(grid))]
    slots = layout.slots.reshape(layout.num_tiles, layout.tile_size)
    for t in range(layout.num_tiles):
        lo = [int(c) * s for c, s in zip(layout.coords[t], layout.tile)]
        expected = [sum(p * st for p, st in zip(pos, strides))
                    for pos in _box(lo, layout.tile, grid)]
        assert slots[t][layout.valid[t]].tolist() == expected      # raster order inside the tile


def _box(lo, size, grid):
    ranges = [range(l, min(l + s, g)) for l, s, g in zip(lo, size, grid)]
    out = [[]]
    for r in ranges:
        out = [p + [i] for p in out for i in r]
    return out


def test_morton_order_makes_quadtree_levels_contiguous():
    layout = tile_layout((32, 32), (4, 4), True)                   # an 8x8 grid of tiles
    coords = layout.coords
    for level in (1, 2, 3):                                        # 2x2, 4x4, 8x8 groups of tiles
        side = 2 ** level
        parents = (coords // side).reshape(-1, side * side, 2)
        assert (parents == parents[:, :1]).all()
    assert coords[:4].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_morton_order_of_a_ragged_grid_is_a_subsequence_of_the_full_one():
    ragged = tile_layout((13, 17), (4, 4), True).coords           # 4 x 5 tiles
    codes = morton_codes(ragged)
    assert torch.equal(codes, codes.sort().values)
    assert len({tuple(c) for c in ragged.tolist()}) == 20


def test_bad_tile_is_a_value_error():
    with pytest.raises(ValueError, match="tile"):
        tile_layout((4, 4), (2, 2, 2))
    with pytest.raises(ValueError, match="tokens"):
        to_tiles(torch.zeros(1, 15, 2), tile_layout((4, 4), (2, 2)))


@pytest.mark.parametrize("grid,tile", [((16, 24), (8, 8)), ((12, 8), (4, 2)), ((4, 6, 8), (2, 3, 4)), ((1, 64), (1, 16))])
def test_exact_raster_tiling_is_the_slot_gather(grid, tile):
    """Grids that tiles fill exactly are tiled by a reshape and a permute: the same tokens in the
    same slots as the general gather by ``slots``, and from_tiles inverts it (gradients too)."""
    layout = tile_layout(grid, tile)
    assert layout.is_exact_raster and not tile_layout(grid, tile, morton=True).is_exact_raster
    x = torch.randn(2, 3, layout.num_tokens, 5, requires_grad=True)
    tiled = to_tiles(x, layout)
    want = x.index_select(-2, layout.slots).unflatten(-2, (layout.num_tiles, layout.tile_size))
    assert torch.equal(tiled, want)
    assert torch.equal(from_tiles(tiled, layout), x)
    g = torch.randn_like(tiled)
    (grad,) = torch.autograd.grad(tiled, x, g)
    assert torch.equal(grad, from_tiles(g, layout))


@pytest.mark.parametrize("grid,tile", [((3, 30, 52), (1, 8, 8)), ((2, 9, 10), (1, 4, 4)), ((2, 5, 7), (1, 2, 8))])
def test_packed_frames_layout(grid, tile):
    """Every token once, only each frame's last tile padded, each tile within one frame; tiles that lie inside a
    band of th rows are th x tw boxes; the round trip through the tiles is exact."""
    t, h, w = grid
    layout = packed_frames_layout(grid, tile)
    per_frame = -(-h * w // layout.tile_size)
    assert layout.num_tiles == t * per_frame
    assert sorted(layout.slots[layout.slots < layout.num_tokens].tolist()) == list(range(layout.num_tokens))
    padded = ~layout.valid.all(-1)
    assert padded.nonzero().flatten().tolist() == [f * per_frame + per_frame - 1 for f in range(t)
                                                     if h * w % layout.tile_size]
    x = torch.randn(2, layout.num_tokens, 3)
    assert torch.equal(from_tiles(to_tiles(x, layout), layout), x)
    slots = layout.slots.reshape(layout.num_tiles, layout.tile_size)
    boxes = 0
    for i in range(layout.num_tiles):
        tokens = slots[i][layout.valid[i]]
        frame, rows, cols = tokens // (h * w), tokens % (h * w) // w, tokens % w
        assert (frame == i // per_frame).all()
        if rows.min() // tile[1] == rows.max() // tile[1] and len(tokens) == layout.tile_size:
            boxes += int(cols.max() - cols.min() + 1 == tile[2])
    assert boxes >= t * (h // tile[1]) * (w // tile[2] - 1)     # all but the seam tile of each full band


def test_packed_frames_layout_of_divisible_frames_is_the_tile_layout():
    packed, tiled = packed_frames_layout((2, 16, 24), (1, 8, 8)), tile_layout((2, 16, 24), (1, 8, 8))
    assert packed.tiles_per_side == tiled.tiles_per_side and torch.equal(packed.slots, tiled.slots)


def test_tile_centers():
    layout = tile_layout((2, 5, 7), (1, 4, 4))
    centers = tile_centers(layout)
    assert centers[0].tolist() == [0, 1.5, 1.5]
    assert centers[1].tolist() == [0, 1.5, 5.0]          # columns 4..6 of a 7-wide frame
    assert centers[3].tolist() == [0, 4.0, 5.0]          # the corner tile: row 4, columns 4..6
