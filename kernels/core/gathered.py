"""Softmax attention over gathered key lists: the reference core of the sparse families.

Each query group (a token for neighborhood attention, a tile for radial and log-linear attention)
gets its own list of keys, gathered from the grid; the attention is then dense within the list.
Memory is O(pairs attended), never O(N^2). Prefix tokens (cls, registers) are global: every grid
query also attends to them, and they attend densely to everything.
"""
from __future__ import annotations

from typing import Callable

import torch

from .precision import compute_dtype


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of x (B, h, T, ...) picked by ``index``: (Q, L) shared by every batch and head, or
    (B, h, Q, L) per batch and head; gives (B, h, Q, L, ...). Entries < 0 pick row 0: mask them."""
    index = index.clamp_min(0)
    if index.dim() == 2:
        return x[:, :, index]
    b = torch.arange(x.shape[0], device=x.device)[:, None, None, None]
    h = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return x[b, h, index]


def mask_to_bias(keep: torch.Tensor) -> torch.Tensor:
    """Additive score bias: 0 where ``keep``, -inf elsewhere (float32)."""
    return torch.zeros(keep.shape, device=keep.device).masked_fill(~keep, float("-inf"))


def attend_gathered(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                    scale: float | None = None) -> torch.Tensor:
    """softmax(q keys^T * scale + bias) values per query group, in float32 (float64 for float64).

    q (B, h, Q, t, d): Q groups of t queries; keys (B, h, Q, M, d), values (B, h, Q, M, dv): each
    group's M keys; ``bias`` broadcastable to (B, h, Q, t, M), -inf for keys a query must not see.
    A query that sees no key gets 0 (the block-sparse core's convention), not NaN.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = compute_dtype(q)
    scores = (q.to(dtype) * scale) @ keys.to(dtype).transpose(-2, -1) + bias
    peak = scores.amax(dim=-1, keepdim=True).detach()
    weights = torch.exp(scores - torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)))
    total = weights.sum(dim=-1, keepdim=True)
    return (weights @ values.to(dtype)) / torch.where(total > 0, total, torch.ones_like(total))


def append_global_keys(keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                       k_global: torch.Tensor, v_global: torch.Tensor):
    """Add keys that every query group sees (prefix tokens) to each group's list.

    keys (B, h, Q, M, d), bias (..., Q, t or 1, M); k_global (B, h, P, d). Returns the three with
    M + P keys; the global keys get bias 0.
    """
    q_groups, p = keys.shape[2], k_global.shape[2]
    if p == 0:
        return keys, values, bias
    expand = lambda g: g[:, :, None].expand(-1, -1, q_groups, -1, -1)   # noqa: E731
    keys = torch.cat([keys, expand(k_global).to(keys.dtype)], dim=3)
    values = torch.cat([values, expand(v_global).to(values.dtype)], dim=3)
    bias = torch.cat([bias, bias.new_zeros(*bias.shape[:-1], p)], dim=-1)
    return keys, values, bias


GridAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def with_global_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_prefix: int,
                       attend_grid: GridAttention, dense: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Split (B, h, N, d) into prefix and grid tokens: the prefix queries attend densely to all N
    keys (``dense``: the explicit reference, or SDPA where speed matters);
    ``attend_grid(q_grid, k_grid, v_grid, k_prefix, v_prefix)`` gives the grid queries'
    output (B, h, N - P, dv), raster order, float32 or wider. Returns (B, h, N, dv) in q's dtype."""
    p = num_prefix
    grid_out = attend_grid(q[:, :, p:], k[:, :, p:], v[:, :, p:], k[:, :, :p], v[:, :, :p])
    if p == 0:
        return grid_out.to(q.dtype)
    prefix_out = dense(q[:, :, :p], k, v)
    return torch.cat([prefix_out, grid_out.to(q.dtype)], dim=2)
