"""Run one ``subquad bench`` suite other than ``families``: its rows as a table and ``bench_<suite>.csv``."""
from __future__ import annotations

from pathlib import Path

import torch

from ..tables import format_table, save_csv


def run_suite(suite: str, out_dir: Path, families: list[str] | None = None, modes: tuple[str, ...] = ("eager",),
              models: list[str] | None = None, profile: bool = False,
              sizes: list[tuple[int, int, int]] | None = None, repeats: int | None = None) -> list[dict]:
    """The CUDA-only suites: ``linear`` (FLatten, MALA, agent attention against their references and
    SDPA), ``block-sparse`` (the core against SDPA and FlexAttention), ``grid-conv`` (the depthwise conv on
    the grid, DWC / LePE, against the cuDNN reference) or ``dit`` (DiT training step and sampling per
    family against the SDPA DiT; ``families`` picks the families), ``models`` (whole models against timm's
    dense peers in each of ``modes``: eager, compile, cuda-graph; ``models`` picks models by name substring;
    ``profile``: instead, each model's GPU time per kernel and block; ``sizes`` (batch, H, W) picks the cases,
    ``repeats`` the timed calls) or
    ``pipeline`` (diffusers transformers of the released sizes, one call dense vs each attention swap, with the
    bound from skipping the attention; ``families`` picks the swaps, ``models`` the cases by label substring, e.g.
    ``720x1280``)."""
    if not torch.cuda.is_available():
        raise ValueError(f"the {suite!r} suite times CUDA kernels and needs a CUDA GPU")
    # each suite is imported when run: the kernel suites need triton, the DiT suite diffusers
    if suite == "linear":
        from .linear import bench_linear_family
        rows = bench_linear_family()
    elif suite == "grid-conv":
        from .grid_conv import bench_grid_conv
        rows = bench_grid_conv()
    elif suite == "dit":
        from .dit import bench_dit
        rows = bench_dit(families)
    elif suite == "models":
        from .models import run_models_bench, run_models_profile, select_cases
        cases = select_cases(sizes)
        if profile:
            return run_models_profile(out_dir, cases, models=models)
        return run_models_bench(out_dir, modes=modes, models=models, cases=cases, repeats=repeats or 10)
    elif suite == "pipeline":
        from .pipelines import run_pipeline_bench
        return run_pipeline_bench(out_dir, families, models)
    elif suite == "block-sparse":
        from .block_sparse import bench_block_sparse
        rows = bench_block_sparse()
    else:
        raise ValueError(f"unknown bench suite {suite!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_csv(rows, out_dir / f"bench_{suite}.csv")
    print(format_table(rows))
    print(f"saved {out_dir / f'bench_{suite}.csv'}")
    return rows
