"""Radial attention on the block-sparse core: the plan's key-tile lists as the core's CSR, with the
grid tokens read in place (``tile_rows``: no copy into tile order) and the prefix queries by SDPA."""
from __future__ import annotations

import torch

from ..block_sparse.layout import csr_from_lists
from ..core.compile_constant import compile_constant
from ..core.dispatch import choose_backend
from .plan import radial_plan, tile_size


@compile_constant
def radial_core_layout(grid: tuple[int, ...], options: tuple, num_prefix: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cached; a constant under torch.compile) The radial plan as the core's CSR (row_ptr, col_idx) and
    tile_rows (each tile slot's token row after the prefix: the tokens stay in raster order), built
    once per grid, not per call (the CSR's boolean indexing waits for the device)."""
    plan = radial_plan(grid, options, device)
    return (*csr_from_lists(plan.key_tiles[None, None]), (plan.layout.slots + num_prefix).to(torch.int32))


def radial_attention_on_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...],
                             num_prefix: int, options: tuple, core_backend: str | None = None) -> torch.Tensor:
    """The grid queries on the core (``core_backend``: the core's own choice when None); the prefix
    queries, dense over all keys, by SDPA in the core op's own output (``prefix_queries``)."""
    row_ptr, col_idx, tile_rows = radial_core_layout(grid, options, num_prefix, q.device)
    t = tile_size(options)
    core = choose_backend("block_sparse_attention", core_backend, q, v=v)
    return core(q, k, v, row_ptr, col_idx, t, t, num_prefix, None, None, None, None, tile_rows, num_prefix > 0)
