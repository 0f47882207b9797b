"""Log-linear sparse attention (Zhou et al., "Log-linear Sparse Attention", 2025, arXiv 2512.16615)."""
from __future__ import annotations

from typing import Sequence

from ..kernels import family, loglinear_attention
from ..kernels.core.family import check_options
from ..kernels.loglinear import selects_every_block
from .base import GridAttention
from .registry import register


@register("loglinear")
class LogLinearSparseAttention(GridAttention):
    """Hierarchical top-K block selection over mean-pooled q, k, then attention over the selected
    blocks plus the pooled tokens met on the way (Sec. 3), O(N log N).

    Options (the official defaults): ``block_size`` (16: 4x4 patches), ``top_k`` (8, or one per
    level, finest first), ``levels`` (None: chosen from the grid). A grid with no more blocks than
    top_k would select everything; the module then attends densely.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, block_size: int = 16, top_k: int | Sequence[int] = 8,
                 levels: int | None = None, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        check_options(family("loglinear"), dict(block_size=block_size, top_k=top_k, levels=levels), type(self).__name__)
        self.block_size, self.levels = block_size, levels
        self.top_k = tuple(top_k) if isinstance(top_k, (tuple, list)) else top_k

    def needs_dense(self, grid):
        return len(grid) == 2 and selects_every_block(grid, self.block_size, self.top_k, self.levels)

    def attend(self, x, q, k, v, grid, num_prefix):
        return loglinear_attention(q, k, v, grid=grid, num_prefix=num_prefix, backend=self.backend,
                                   block_size=self.block_size, top_k=self.top_k, levels=self.levels)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}, top_k={self.top_k}, levels={self.levels}"
