"""Kernel feature maps phi(x) of linear attention, computed in at least float32."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import compute_dtype

FOCUSED_EPS = 1e-6
TOKEN_DIMS = (-3, -1)       # (heads, head_dim) of a (B, heads, N, head_dim) tensor: all channels of a token


def focused_feature_map(x: torch.Tensor, focusing_factor: float, scale: torch.Tensor | None) -> torch.Tensor:
    """FLatten's focused map (Han et al., ICCV 2023, Eq. 5-6) on x of shape (B, heads, N, head_dim).

    r = (ReLU(x) + eps) / softplus(s);  phi_p(x) = ||r|| / ||r^p|| * r^p  (elementwise power p), where the
    norms run over the whole token, i.e. over all heads * head_dim channels, as in the official code (it
    applies the map to (B, N, C) tensors before splitting heads). ``scale`` is the learnable s,
    broadcastable to x; None means softplus(s) = 1.
    """
    r = F.relu(x.to(compute_dtype(x))) + FOCUSED_EPS
    if scale is not None:
        r = r / F.softplus(scale.to(r.dtype))
    # r^p / ||r^p|| is invariant to rescaling r, so divide by max(r) first to keep r^p in range
    r_max = r.amax(dim=TOKEN_DIMS, keepdim=True)
    rp = (r / r_max) ** focusing_factor
    return rp * (torch.linalg.vector_norm(r, dim=TOKEN_DIMS, keepdim=True)
                 / torch.linalg.vector_norm(rp, dim=TOKEN_DIMS, keepdim=True))


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = ELU(x) + 1 (Katharopoulos et al., 2020), MALA's feature map."""
    return F.elu(x.to(compute_dtype(x))) + 1.0
