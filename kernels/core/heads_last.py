"""Attention outputs in SDPA's memory layout: (B, h, N, d) tensors stored as (B, N, h, d), so that merging the
heads after attention, ``y.transpose(1, 2).reshape(B, N, h * d)``, is a view instead of a copy of the output."""
from __future__ import annotations

import torch


def heads_last_empty(like: torch.Tensor, b: int, h: int, n: int, d: int) -> torch.Tensor:
    """An uninitialised (B, h, N, d) output of ``like``'s dtype and device, stored as (B, N, h, d)."""
    return like.new_empty(b, n, h, d).transpose(1, 2)


def cat_tokens(*parts: torch.Tensor) -> torch.Tensor:
    """(B, h, N_i, d) outputs concatenated along the tokens, stored as (B, N, h, d)."""
    return torch.cat([t.transpose(1, 2) for t in parts], dim=1).transpose(1, 2)
