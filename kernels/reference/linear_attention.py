"""The non-causal linear attention core: the KV state and normaliser in one pass over the tokens."""
from __future__ import annotations

import torch

LINEAR_EPS = 1e-6


def normalized_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """O_i = phi(q_i) S / (phi(q_i) z),  S = sum_j phi(k_j)^T v_j,  z = sum_j phi(k_j).

    (FLatten Eq. 3.) Written with means over the M keys, as the official code does, so that
    the epsilon in the normaliser is independent of M: O_i = phi(q_i) S / M / (phi(q_i) z / M + eps).
    The epsilon is the official one, applied to the focused phi(q_i) itself. It is not negligible:
    phi(q_i) carries the query's whole-token factor ||r_i|| / ||r_i^p||, which cancels between
    numerator and denominator only up to this eps, and a head whose channels are small next to the
    token's other heads has phi(q_i) . z / M down near eps. Inputs (B, h, N, d); out in phi's dtype.
    """
    m = phi_k.shape[-2]
    state = phi_k.transpose(-2, -1) @ (v.to(phi_k.dtype) / m)         # (B, h, d, dv)
    k_mean = phi_k.mean(dim=-2, keepdim=True)                          # (B, h, 1, d)
    denom = (phi_q * k_mean).sum(dim=-1, keepdim=True) + LINEAR_EPS    # (B, h, N, 1)
    return (phi_q @ state) / denom


def magnitude_aware_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                                     rot_q: torch.Tensor | None = None,
                                     rot_k: torch.Tensor | None = None) -> torch.Tensor:
    """MALA (Fan et al., ICCV 2025, Eq. 9-11): Y_i = beta_i phi(q_i) S - gamma_i sum_j v_j.

    With z_i = phi(q_i) . mean_j phi(k_j) / sqrt(d) the weights are
    w_ij = (1 + 1/z_i) phi(q_i).phi(k_j) / (sqrt(d) M) - z_i / M, so sum_j w_ij = 1 and a larger
    query magnitude gives a sharper distribution. ``rot_q``/``rot_k`` are phi(q), phi(k) with
    2D RoPE applied: used inside the KV product only (not in z), as in the paper's MAViT.
    """
    m, d = phi_k.shape[-2], phi_k.shape[-1]
    scale = d ** -0.5
    rot_q = phi_q if rot_q is None else rot_q
    rot_k = phi_k if rot_k is None else rot_k
    z = (phi_q * phi_k.mean(dim=-2, keepdim=True)).sum(dim=-1, keepdim=True) * scale  # (B, h, N, 1)
    state = rot_k.transpose(-2, -1) @ (v.to(phi_k.dtype) * (scale / m))               # (B, h, d, dv)
    v_mean = v.to(phi_k.dtype).mean(dim=-2, keepdim=True)                             # (B, h, 1, dv)
    return (rot_q @ state) * (1.0 + 1.0 / (z + LINEAR_EPS)) - z * v_mean
