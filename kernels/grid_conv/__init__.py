"""Depthwise convolution over the grid tokens (DWC / LePE), prefix tokens untouched: the local term
that agent attention, FLatten and MALA add to their global mixing."""
from __future__ import annotations

from typing import Sequence

import torch

from ..core import checks
from ..core.dispatch import TRITON, TRITON_DTYPES, choose_backend, dtypes, register_backend, triton_device
from .reference import depthwise_conv_on_grid_reference


def depthwise_conv_on_grid(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                           grid: Sequence[int], num_prefix: int = 0, residual: torch.Tensor | None = None,
                           backend: str | None = None) -> torch.Tensor:
    """residual + a depthwise k x k conv of the grid tokens of x (B, heads, N, d) (DWC / LePE).

    ``weight`` (C, 1, k, k), k odd: C = heads*d is one filter per channel (agent attention, MALA), C = d one
    filter per head channel shared by the heads (FLatten); ``bias`` None or (C,). Zero padding keeps the
    grid; a video grid (T, H, W) convolves each frame with the 2D filter. The conv is 0 on the prefix rows,
    so there the output is the residual (0 when ``residual`` is None). Backends: ``reference`` (F.conv2d on
    permuted copies), ``triton`` (in place on the token layout, the residual add fused; the default on CUDA).
    """
    grid = checks.check_grid_conv(x, weight, bias, grid, num_prefix, residual)
    fn = choose_backend("depthwise_conv_on_grid", backend, x, grid=grid)
    if x.shape[0] == 0 or x.shape[1] == 0:       # no batch or no heads: an empty output (conv2d rejects 0 groups)
        params = weight.sum() if bias is None else weight.sum() + bias.sum()
        return (x * 0 if residual is None else residual) + params * 0
    return fn(x, weight, bias, grid, num_prefix, residual)


if TRITON:
    from .triton import depthwise_conv_on_grid_triton
    register_backend("depthwise_conv_on_grid", "triton", depthwise_conv_on_grid_triton,
                     requires=(triton_device(), dtypes(*TRITON_DTYPES)))
register_backend("depthwise_conv_on_grid", "reference", depthwise_conv_on_grid_reference)
