"""Kernel feature maps phi(x) of linear attention, computed in at least float32."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import compute_dtype

FOCUSED_EPS = 1e-6


def focused_feature_map(x: torch.Tensor, focusing_factor: float, scale: torch.Tensor | None) -> torch.Tensor:
    """FLatten's focused map (Han et al., ICCV 2023, Eq. 5-6).

    r = (ReLU(x) + eps) / softplus(s);  phi_p(x) = ||r|| / ||r^p|| * r^p  (elementwise power p).
    ``scale`` is the learnable s, broadcastable to x's last dims (heads, d); None means softplus(s) = 1.
    """
    r = F.relu(x.to(compute_dtype(x))) + FOCUSED_EPS
    if scale is not None:
        r = r / F.softplus(scale.to(r.dtype))
    # r^p / ||r^p|| is invariant to rescaling r, so divide by max(r) first to keep r^p in range
    r_max = r.amax(dim=-1, keepdim=True)
    rp = (r / r_max) ** focusing_factor
    return rp * (r.norm(dim=-1, keepdim=True) / rp.norm(dim=-1, keepdim=True))


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = ELU(x) + 1 (Katharopoulos et al., 2020), MALA's feature map."""
    return F.elu(x.to(compute_dtype(x))) + 1.0
