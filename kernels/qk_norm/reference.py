"""The plain PyTorch form of ``rms_norm_rope``: the ground truth of its tests and what runs without Triton."""
from __future__ import annotations

import torch


def rms_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor | None,
                            sin: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``out`` (B, N, H, D) = rotate(RMSNorm(x) * weight), computed in float32 (or x's wider dtype) and rounded once:
    RMSNorm over the head dim (weight (D,)) or over the whole token (weight (H*D,)); rotate turns each interleaved
    pair (2i, 2i + 1) of a head by the token's angle i: (a cos - b sin, a sin + b cos), cos and sin (N, D/2)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    b, n, h, d = x.shape
    rows = x.to(dtype).reshape(b, n, -1, weight.numel())
    y = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + eps) * weight.to(dtype)
    y = y.reshape(b, n, h, d // 2, 2)
    if cos is not None:
        c, s = cos.to(dtype)[None, :, None], sin.to(dtype)[None, :, None]
        a, bb = y[..., 0], y[..., 1]
        y = torch.stack([a * c - bb * s, a * s + bb * c], dim=-1)
    out.copy_(y.reshape(b, n, h, d))
    return out
