"""LayerNorm (Ba et al., 2016) after a residual add, in plain PyTorch: the ground truth of the fused kernel."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def add_layer_norm_reference(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor | None,
                             bias: torch.Tensor | None, eps: float,
                             out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, LN(s) in ``out_dtype``) with s = x + y (x when y is None), LN over the last axis."""
    s = x if y is None else x + y
    return s, F.layer_norm(s, s.shape[-1:], weight, bias, eps).to(out_dtype)
