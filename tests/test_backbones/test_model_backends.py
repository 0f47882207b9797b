"""Every registered model's sparse attention fits the block-sparse core (so CUDA runs the Triton kernel, never
the PyTorch reference) at every input size, or attends densely where its mask keeps every pair."""
import pytest
import timm
import torch

import subquad  # noqa: F401  (registers the models)
from subquad.attention.loglinear import LogLinearSparseAttention
from subquad.attention.radial import RadialAttention
from subquad.kernels.block_sparse.layout import core_fits
from subquad.kernels.loglinear import normalize_options as loglinear_options
from subquad.kernels.radial import normalize_options as radial_options
from subquad.kernels.radial import tile_size

SPARSE_MODELS = [f"{family}_deit_{size}_patch16_224" for family in ("radial", "llsa") for size in ("tiny", "base")]


def _runs_on_core_or_dense(module: torch.nn.Module, grid: tuple[int, int]) -> bool:
    if module.needs_dense(grid):
        return True
    if isinstance(module, RadialAttention):
        return core_fits(tile_size(radial_options(grid, **module.mask_opts)))
    side, _ = loglinear_options(grid, block_size=module.block_size, top_k=module.top_k, levels=module.levels)
    return core_fits(side * side)


@pytest.mark.parametrize("name", SPARSE_MODELS)
@pytest.mark.parametrize("img_size", [224, 240, 384, 512, 1024, 2048])
def test_sparse_deit_attention_fits_the_core_at_every_size(name, img_size):
    with torch.device("meta"):
        model = timm.create_model(name, img_size=img_size)
    grid = (img_size // 16, img_size // 16)
    modules = [m for m in model.modules() if isinstance(m, (RadialAttention, LogLinearSparseAttention))]
    assert modules
    assert all(_runs_on_core_or_dense(m, grid) for m in modules)


@pytest.mark.parametrize("name", SPARSE_MODELS)
def test_sparse_deit_is_exactly_dense_at_224(name):
    """At 224 px the 14x14 grid has 2x2 of the 8x8-token tiles: every pair is kept, attention is dense."""
    with torch.device("meta"):
        model = timm.create_model(name)
    modules = [m for m in model.modules() if isinstance(m, (RadialAttention, LogLinearSparseAttention))]
    assert modules and all(m.needs_dense((14, 14)) for m in modules)
    assert not any(m.needs_dense((64, 64)) for m in modules)
