"""The attention families a pipeline can take, from the family records (``subquad.kernels.families()``):
those that replace dense attention without training (``training_free``), dense softmax itself aside.
A family's record gives its names and aliases, its op (``getattr(subquad.kernels, record.op)``), the
options the op takes and the grid ranks it handles (2: images, 3: video)."""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from ... import kernels
from ...kernels import Family

AttentionOp = Callable[..., torch.Tensor]     # op(q, k, v, *, grid, num_prefix, **options) on (B, heads, N, d)
DENSE = kernels.family("softmax").name       # what the pipeline runs already


def pipeline_families() -> dict[str, Family]:
    """Name -> record of every family ``accelerate_pipeline`` accepts by name, in table order."""
    return {r.name: r for r in kernels.families() if r.training_free and r.name != DENSE}


def pipeline_aliases() -> dict[str, str]:
    """Alias -> name of the pipeline families."""
    return {alias: r.name for r in pipeline_families().values() for alias in r.aliases}


# Options a family takes on video grids unless given. Radial at decay 0.2 (the radial-attention authors' Wan
# value): at the op's default 1.0 the mask keeps 62% and 43% of the token pairs of Wan at 480x832 (33 and 81
# frames), too dense to beat dense attention there (`subquad bench --suite pipeline`, README).
VIDEO_DEFAULTS: dict[str, dict] = {"radial": {"decay_factor": 0.2}}


def pipeline_options(attn: str | AttentionOp, options: dict, grid_rank: int) -> dict:
    """``options`` with the family's ``VIDEO_DEFAULTS`` filled in on video grids (rank 3)."""
    name = pipeline_aliases().get(attn, attn) if isinstance(attn, str) else None
    return {**VIDEO_DEFAULTS.get(name, {}), **options} if grid_rank == 3 else dict(options)


def _window_fits(grid: tuple[int, ...], options: dict) -> bool:
    """A window family's window (``kernel_size`` x ``dilation``) must fit in every side of the grid."""
    return all(side >= options.get("kernel_size", 1) * options.get("dilation", 1) for side in grid)


def _always_fits(grid: tuple[int, ...], options: dict) -> bool:
    return True


def _sparse_on(dense_on: Callable[..., bool], fits: Callable[[tuple[int, ...], dict], bool]
               ) -> Callable[[tuple[int, ...], dict], bool]:
    """``fits``, and the family keeps fewer than every pair of the grid (``Family.dense_on``)."""
    return lambda grid, options: fits(grid, options) and not dense_on(grid, **options)


def resolve_family(attn: str | AttentionOp, options: dict, grid_rank: int, transformer_name: str,
                   ) -> tuple[str, AttentionOp, Callable[[tuple[int, ...]], bool]]:
    """(name, op, fits) for a family name or a user op ``op(q, k, v, *, grid, num_prefix, **options)``;
    ``fits(grid)`` says whether the op makes sense on a grid. A ValueError for a name, options or a grid
    rank that do not fit."""
    if callable(attn):
        name, op, fits = getattr(attn, "__name__", repr(attn)), attn, _always_fits
    else:
        families, aliases = pipeline_families(), pipeline_aliases()
        name = aliases.get(attn, attn)
        if name not in families:
            raise ValueError(f"unknown attention family {attn!r} for a pipeline; choose one of "
                             f"{', '.join(sorted(families) + sorted(aliases))} (or pass an op)")
        record = families[name]
        op = getattr(kernels, record.op)
        if grid_rank not in record.grid_ranks:
            takes = [f for f, r in families.items() if grid_rank in r.grid_ranks]
            kind = "video grids (T, H, W)" if grid_rank == 3 else "image grids (H, W)"
            raise ValueError(f"{name} attention cannot take {transformer_name}'s {kind}; families that can: "
                             f"{', '.join(takes)}")
        unknown = sorted(set(options) - set(record.options))
        if unknown:
            raise ValueError(f"options {unknown} do not fit {name}; its options: {', '.join(record.options)}")
        fits = _window_fits if "kernel_size" in record.options else _always_fits
        if record.dense_on is not None:       # a mask or selection that keeps every pair: the original call
            fits = _sparse_on(record.dense_on, fits)
    probe = torch.zeros(1, 1, 1, 1)
    try:
        inspect.signature(op).bind(probe, probe, probe, grid=(1, 1), num_prefix=0, **options)
    except TypeError as e:
        raise ValueError(f"options {options} do not fit {name}: {e}") from None
    return name, op, lambda grid: fits(grid, options)
