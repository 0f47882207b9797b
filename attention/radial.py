"""Radial attention (Li et al., "Radial Attention: O(n log n) Sparse Attention with Energy Decay for
Long Video Generation", 2025)."""
from __future__ import annotations

from ..kernels import family, radial_attention
from ..kernels.core.family import check_options
from ..kernels.radial import keeps_every_pair
from .base import GridAttention
from .registry import register


@register("radial")
class RadialAttention(GridAttention):
    """Softmax attention under a static block mask whose density decays with distance (Sec. 4).

    Options, as ``subquad.kernels.radial_attention``: ``layout`` ("frames" for video, "distance"
    for images, or "official"), ``tile``, ``block_size``, ``decay_factor``, ``sink``,
    ``dense_radius``, ``pack``. Where the mask keeps every tile pair (small grids) the module attends densely,
    which is the same result.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, layout: str | None = None,
                 tile: tuple[int, ...] | None = None, block_size: int = 128, decay_factor: float = 1.0,
                 sink: bool | None = None, dense_radius: int = 1, pack: bool | None = None, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        options = dict(layout=layout, tile=tile, block_size=block_size, decay_factor=decay_factor, sink=sink,
                       dense_radius=dense_radius, pack=pack)
        check_options(family("radial"), options, type(self).__name__)
        self.mask_opts = {**options, "tile": None if tile is None else tuple(tile)}

    def needs_dense(self, grid):
        return keeps_every_pair(grid, **self.mask_opts)

    def attend(self, x, q, k, v, grid, num_prefix):
        return radial_attention(q, k, v, grid=grid, num_prefix=num_prefix, backend=self.backend, **self.mask_opts)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.mask_opts.items() if v is not None)
        return f"{super().extra_repr()}, {opts}"
