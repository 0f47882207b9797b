"""Radial attention's full frames read as contiguous key ranges (inference on the block-sparse core).

In the ``frames`` layout on a video grid, a query frame f attends every token of the frames f - 1, f, f + 1 and,
with the sink, frame 0 (Sec. 4: frame distances d <= 1 are dense): on Wan's 21 latent frames 18% of all pairs, most
of the ~22% the mask keeps. In raster order those keys are at most two runs of consecutive rows, which the core's
forward reads as spans (no tile table, no per-tile list entries, steps of consecutive rows) before the listed
tiles of the farther frames: the same pairs as the tile lists alone. Two tiles of a frame attend the same full
frames, so a query tile of the forward is two tiles of one frame (``frame_tile_pairs``, ``QueryTiles``): the
frames' keys are read once for both and the products are twice as high; each tile's farther tiles are its own
entries (masked to its rows). Forward only (under autograd the core runs the whole mask as tiles); under
``torch.compile`` one custom op (``subquad::radial_full_frames``).
"""
from __future__ import annotations

import torch

from ..block_sparse.layout import fixed_width_row_ptr
from ..block_sparse.triton import QueryTiles
from ..block_sparse.triton import forward as core_forward
from ..core.compile_constant import compile_constant
from ..core.dispatch import records_grad
from ..core.heads_last import heads_last_empty
from ..core.triton_op import forward_only_op
from .block_sparse import radial_attention_on_core, radial_core_layout
from .plan import far_key_tiles, frame_tile_pairs, full_frame_spans, radial_plan, tile_size

PAIR = 2        # tiles of a frame per query tile of the forward


@compile_constant
def radial_spans_layout(grid: tuple[int, ...], options: tuple, device: torch.device
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cached) Per query tile of two tiles of one frame (``frame_tile_pairs``): its full frames as spans, and the
    core's CSR (row_ptr, col_idx) of each of its tiles' farther tiles (-1 padded to one width, tile after tile);
    the key tiles' rows and the query tiles' rows (N, no query, for a missing second tile)."""
    plan = radial_plan(grid, options, device)
    sink = bool(options[4])
    tile_rows = radial_core_layout(grid, options, 0, device)[2]
    pairs = frame_tile_pairs(plan)
    far = far_key_tiles(plan, sink).sort(dim=1, descending=True).values         # listed tiles first, then -1
    far = far[:, :max(1, int((far >= 0).sum(1).max()))]          # one column at least: no empty list tensor
    lists = torch.where(pairs[..., None] >= 0, far[pairs.clamp_min(0)], -1).reshape(len(pairs), -1)
    query_rows = torch.where(pairs[..., None] >= 0, tile_rows.view(plan.layout.num_tiles, -1)[pairs.clamp_min(0)],
                             plan.layout.num_tokens)
    row_ptr = fixed_width_row_ptr(1, 1, len(pairs), lists.shape[1], device)
    return (full_frame_spans(plan, sink)[pairs[:, 0]], row_ptr, lists.reshape(-1).to(torch.int32), tile_rows,
            query_rows.reshape(-1).to(torch.int32))


def _full_frames_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor,
                         row_ptr: torch.Tensor, col_idx: torch.Tensor, tile_rows: torch.Tensor,
                         query_rows: torch.Tensor, tile: int) -> torch.Tensor:
    return core_forward(q, k, v, row_ptr, col_idx, None, None, None, tile_rows, PAIR * tile, tile, 0,
                        q.shape[-1] ** -0.5, False, query_tiles=QueryTiles(query_rows, 0, PAIR), spans=spans)[0]


def _full_frames_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *layout) -> torch.Tensor:
    b, h, n, _ = q.shape
    return heads_last_empty(q, b, h, n, v.shape[-1])


_full_frames = forward_only_op("radial_full_frames", _full_frames_forward, _full_frames_fake)


def radial_attention_full_frames(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...],
                                 options: tuple) -> torch.Tensor:
    """Radial attention of the ``frames`` layout on a video grid without prefix, forward only: the full frames as
    spans read once for two tiles of a frame, each tile's farther frames' windows as its own listed tiles."""
    return _full_frames(q, k, v, *radial_spans_layout(grid, options, q.device), tile_size(options))


def takes_full_frames(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...], num_prefix: int,
                      options: tuple) -> bool:
    """True where ``radial_attention_full_frames`` serves the call: the frames layout on a video grid without
    prefix, no autograd."""
    return options[0] == "frames" and len(grid) == 3 and num_prefix == 0 and not records_grad(q, k, v)


def radial_attention_on_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...],
                               num_prefix: int, options: tuple) -> torch.Tensor:
    """The ``triton`` backend: ``radial_attention_full_frames`` where it serves the call, else the core (Triton)."""
    if takes_full_frames(q, k, v, grid, num_prefix, options):
        return radial_attention_full_frames(q, k, v, grid, options)
    return radial_attention_on_core(q, k, v, grid, num_prefix, options, core_backend="triton")
