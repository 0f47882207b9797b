"""Log-linear sparse attention (LLSA; Zhou et al., "Log-linear Sparse Attention", 2025, arXiv 2512.16615):
hierarchical top-K block selection over mean-pooled q, k, then attention over the selected blocks plus
the pooled tokens met on the way, O(N log N)."""
from __future__ import annotations

from typing import Sequence

import torch

from ..block_sparse import CORE_TILES, TRITON_REQUIRES
from ..core import checks
from ..core.dispatch import TRITON, choose_backend, empty_output, register_backend
from ..core.family import Family, check_options, register_family
from .block_sparse import loglinear_attention_on_core
from .plan import check_select_options, normalize_options, selects_every_block
from .reference import loglinear_attention_reference

FAMILY = register_family(Family(
    name="loglinear", aliases=("llsa",), title="log-linear sparse attention", paper="Zhou et al., 2025",
    cost="O(N log N)", op="loglinear_attention", options={"block_size": 16, "top_k": 8, "levels": None},
    grid_ranks=(2,), training_free=True, check=check_select_options, dense_on=selects_every_block))


def loglinear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: Sequence[int],
                        num_prefix: int = 0, backend: str | None = None, **select_opts) -> torch.Tensor:
    """Log-linear sparse attention (Sec. 3) on an image grid.

    ``select_opts``: ``block_size`` (16: 4x4 patches), ``top_k`` (8; or one K per level, finest first),
    ``levels`` (None: one below 16,384 tokens, as the paper recommends, else enough levels that the
    coarsest selection is no costlier than the others; at most until one block covers the grid; a block
    wider than the grid shrinks to the smallest power of two covering it). Hierarchical top-K over
    mean-pooled blocks; each query block attends to its selected blocks plus the pooled tokens of the
    blocks scored on the way (weighted by their sizes) and the prefix tokens (the paper's formulation at
    every grid size: the official kernels drop the pooled-token term when there are fewer than 64
    coarsest blocks; subquad keeps it). Selection is discrete; gradients flow to q, k, v. Backends:
    ``reference`` (explicit index lists), ``block_sparse`` / ``triton`` (the block-sparse core with the
    tokens in place; ``triton``, the default on CUDA, also selects in Triton). Details:
    ``subquad.kernels.loglinear.plan``.
    """
    grid = checks.check_self_attention(q, k, v, grid, num_prefix, "loglinear_attention")
    grid = checks.check_image_grid(grid, "loglinear_attention")
    check_options(FAMILY, select_opts)
    side, top_k = normalize_options(grid, **select_opts)
    fn = choose_backend("loglinear_attention", backend, q, v=v, grid=grid, tile_size=side * side)
    empty = empty_output(q, k, v)
    if empty is not None:
        return empty
    return fn(q, k, v, grid, num_prefix, side, top_k)


if TRITON:
    from .triton import loglinear_attention_on_triton
    register_backend("loglinear_attention", "triton", loglinear_attention_on_triton,
                     requires=(*TRITON_REQUIRES, CORE_TILES))
register_backend("loglinear_attention", "block_sparse", loglinear_attention_on_core, requires=(CORE_TILES,),
                 auto=False)
register_backend("loglinear_attention", "reference", loglinear_attention_reference)
