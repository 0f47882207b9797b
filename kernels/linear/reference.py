"""Linear attention, plain PyTorch: the kernel feature maps phi(x) (in at least float32) and the
non-causal core, the KV state and normaliser in one pass over the tokens, for FLatten and MALA."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.precision import compute_dtype
from ..core.rope import apply_rope_2d

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


def focused_linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, focusing_factor: float,
                                       scale: torch.Tensor | None) -> torch.Tensor:
    """FLatten (Eq. 3-6): the focused map of q and k, then ``normalized_linear_attention``."""
    if scale is not None:
        scale = scale.reshape(-1, q.shape[-1]) if scale.numel() > 1 else scale.reshape(1)
        scale = scale[:, None, :] if scale.dim() == 2 else scale     # (h or 1, 1, d) over (B, h, N, d)
    phi_q = focused_feature_map(q, focusing_factor, scale)
    phi_k = focused_feature_map(k, focusing_factor, scale)
    return normalized_linear_attention(phi_q, phi_k, v).to(q.dtype)


def mala_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope_grid: tuple[int, int] | None,
                             num_prefix: int) -> torch.Tensor:
    """MALA (Eq. 9-11) with phi = ELU + 1; 2D RoPE on phi(q), phi(k) inside the KV product when ``rope_grid``."""
    phi_q, phi_k = elu_feature_map(q), elu_feature_map(k)
    rot_q = rot_k = None
    if rope_grid is not None:
        rot_q, rot_k = apply_rope_2d(phi_q, rope_grid, num_prefix), apply_rope_2d(phi_k, rope_grid, num_prefix)
    return magnitude_aware_linear_attention(phi_q, phi_k, v, rot_q, rot_k).to(q.dtype)
