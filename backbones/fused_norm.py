"""The residual add and the norm after it as one step of a pre-norm block."""
from __future__ import annotations

import torch
from timm.layers import LayerNorm
from torch import nn

from ..kernels.layer_norm import add_layer_norm

LAYER_NORMS = (nn.LayerNorm, LayerNorm)    # exactly these: a subclass may change what forward computes


def add_norm(norm: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, norm(s)) with s = x + y (x when ``y`` is None). A LayerNorm (torch's or timm's) over the last axis runs
    as one fused pass (``add_layer_norm``: one read of x and y, its output already in the autocast dtype); any
    other norm as written."""
    if type(norm) in LAYER_NORMS and len(norm.normalized_shape) == 1:
        return add_layer_norm(x, y, norm.weight, norm.bias, norm.eps)
    s = x if y is None else x + y
    return s, norm(s)
