"""Depthwise convolution over the grid tokens (DWC / LePE), prefix tokens untouched: the local term
that agent attention, FLatten and MALA add to their global mixing."""
from __future__ import annotations

from typing import Sequence

import torch

from ..core import checks
from ..core.dispatch import (TRITON, TRITON_DTYPES, Requirement, choose_backend, dtypes, records_grad,
                             register_backend, triton_device)
from .reference import depthwise_conv_on_grid_reference

# A filter shared by the heads (FLatten) runs cudnn's conv by default when a gradient is needed: the Triton
# backward, which also sums dweight over the heads, measured slower there, while its forward (in place, the
# residual add fused) is faster than cudnn's on permuted copies (docs/bench_grid_conv_h200.csv).
PER_CHANNEL_FILTER = Requirement("one filter per channel (weight of heads*head_dim channels), or no gradient, when "
                                 "chosen automatically",
                                 lambda f: f.get("named", False) or f["per_channel"] or not f["needs_grad"],
                                 preference=True)


def depthwise_conv_on_grid(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                           grid: Sequence[int], num_prefix: int = 0, residual: torch.Tensor | None = None,
                           backend: str | None = None) -> torch.Tensor:
    """residual + a depthwise k x k conv of the grid tokens of x (B, heads, N, d) (DWC / LePE).

    ``weight`` (C, 1, k, k), k odd: C = heads*d is one filter per channel (agent attention, MALA), C = d one
    filter per head channel shared by the heads (FLatten); ``bias`` None or (C,). Zero padding keeps the
    grid; a video grid (T, H, W) convolves each frame with the 2D filter. The conv is 0 on the prefix rows,
    so there the output is the residual (0 when ``residual`` is None). Backends: ``reference`` (F.conv2d on
    permuted copies), ``triton`` (in place on the token layout, the residual add fused; the default on CUDA
    for per-channel filters, and for shared ones when no gradient is needed; else ``reference``).
    """
    grid = checks.check_grid_conv(x, weight, bias, grid, num_prefix, residual)
    per_channel = weight.shape[0] == x.shape[1] * x.shape[-1]
    needs_grad = records_grad(x, weight, bias, residual)
    fn = choose_backend("depthwise_conv_on_grid", backend, x, grid=grid, per_channel=per_channel, needs_grad=needs_grad)
    if x.shape[0] == 0 or x.shape[1] == 0:       # no batch or no heads: an empty output (conv2d rejects 0 groups)
        params = weight.sum() if bias is None else weight.sum() + bias.sum()
        return (x * 0 if residual is None else residual) + params * 0
    return fn(x, weight, bias, grid, num_prefix, residual)


if TRITON:
    from .triton import depthwise_conv_on_grid_triton
    register_backend("depthwise_conv_on_grid", "triton", depthwise_conv_on_grid_triton,
                     requires=(triton_device(), dtypes(*TRITON_DTYPES), PER_CHANNEL_FILTER))
register_backend("depthwise_conv_on_grid", "reference", depthwise_conv_on_grid_reference)
