"""LayerNorm (Ba et al., 2016) after a residual add, in plain PyTorch: the ground truth of the fused kernel."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (C,) parameter as is, a per-sample (B, C) one shaped to broadcast over x (B, ..., C)."""
    return p if p.dim() == 1 else p.reshape(p.shape[0], *([1] * (x.dim() - 2)), p.shape[-1])


def sum_dtype(x: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None) -> torch.dtype:
    """The dtype of s = x + gate * y under PyTorch's type promotion (x's when y is None; a gate comes with y)."""
    dtype = x.dtype
    for t in (y, gate):
        dtype = dtype if t is None else torch.promote_types(dtype, t.dtype)
    return dtype


def add_layer_norm_reference(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor | None,
                             bias: torch.Tensor | None, eps: float, out_dtype: torch.dtype,
                             gate: torch.Tensor | None = None, residual_dtype: torch.dtype | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, LN(s) * weight + bias in ``out_dtype``) with s = x + gate * y (x when y is None; gate 1 when None) in
    ``residual_dtype`` (default: by type promotion), LN over the last axis; weight, bias and gate (C,) or per sample
    (B, C) (DiT's adaLN modulation)."""
    s = x if y is None else x + (y if gate is None else per_sample(gate, x) * y)
    if residual_dtype is not None and y is not None:
        s = s.to(residual_dtype)
    if all(p is None or p.dim() == 1 for p in (weight, bias)):
        return s, F.layer_norm(s, s.shape[-1:], weight, bias, eps).to(out_dtype)
    out = F.layer_norm(s, s.shape[-1:], None, None, eps)
    if weight is not None:
        out = out * per_sample(weight, s)
    if bias is not None:
        out = out + per_sample(bias, s)
    return s, out.to(out_dtype)
