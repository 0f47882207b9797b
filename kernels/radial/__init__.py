"""Radial attention (Li et al., "Radial Attention: O(n log n) Sparse Attention with Energy Decay for
Long Video Generation", 2025): a static block mask whose density decays with distance."""
from __future__ import annotations

from typing import Sequence

import torch

from ..block_sparse import CORE_TILES, TRITON_REQUIRES
from ..core import checks
from ..core.dispatch import TRITON, choose_backend, empty_output, register_backend
from ..core.family import Family, check_options, register_family
from .block_sparse import radial_attention_on_core
from .plan import attended_pairs, check_mask_options, keeps_every_pair, normalize_options, radial_plan, tile_size
from .reference import radial_attention_reference

FAMILY = register_family(Family(
    name="radial", title="radial attention", paper="Li et al., 2025", cost="O(N log N)", op="radial_attention",
    options={"layout": None, "tile": None, "block_size": 128, "decay_factor": 1.0, "sink": None, "dense_radius": 1,
             "pack": None},
    grid_ranks=(2, 3), training_free=True, check=check_mask_options, dense_on=keeps_every_pair))


def radial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: Sequence[int],
                     num_prefix: int = 0, backend: str | None = None, **mask_opts) -> torch.Tensor:
    """Radial attention (Sec. 4): a static energy-decay block mask, O(n log n) pairs.

    ``mask_opts``: ``layout`` ("official", "frames" (video default), "distance" (image default)),
    ``tile`` (frames/distance tiles; (1, 8, 8) for video, (8, 8) for images), ``block_size``
    (official, 128), ``decay_factor`` (1.0), ``sink`` (attend the first frame; default on for
    video), ``dense_radius`` (distance, 1), ``pack`` (frames layout on video: tiles cut from each frame without
    padding inside it, e.g. 25 tiles of 64 tokens a 30x52 frame instead of 28; default on). Prefix tokens attend
    and are attended densely.
    A tile side larger than the grid's is clamped to the smallest power of two covering that side
    (an official ``block_size`` larger than the video to the smallest power of two above its token
    count): one tile spans the side either way, without a huge padded tile.
    Backends: ``reference`` (gathers the listed tiles), ``block_sparse`` / ``triton`` (the block-sparse
    core; ``triton`` is the default on CUDA, and in inference on a video grid without prefix it reads the
    ``frames`` layout's full frames as runs of consecutive key rows: ``full_frames``). Details:
    ``subquad.kernels.radial.plan``.
    """
    grid = checks.check_self_attention(q, k, v, grid, num_prefix, "radial_attention")
    check_options(FAMILY, mask_opts)
    options = normalize_options(grid, **mask_opts)
    fn = choose_backend("radial_attention", backend, q, v=v, grid=grid, tile_size=tile_size(options))
    empty = empty_output(q, k, v)
    if empty is not None:
        return empty
    return fn(q, k, v, grid, num_prefix, options)


if TRITON:
    from .full_frames import radial_attention_on_triton
    register_backend("radial_attention", "triton", radial_attention_on_triton, requires=(*TRITON_REQUIRES, CORE_TILES))
register_backend("radial_attention", "block_sparse", radial_attention_on_core, requires=(CORE_TILES,), auto=False)
register_backend("radial_attention", "reference", radial_attention_reference)

__all__ = ["FAMILY", "attended_pairs", "check_mask_options", "keeps_every_pair", "normalize_options", "radial_attention", "radial_plan", "tile_size"]
