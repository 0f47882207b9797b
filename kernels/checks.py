"""Argument checks shared by every functional op: one place, sentences a user can act on."""
from __future__ import annotations

import math
from typing import Sequence

import torch

Grid = tuple[int, ...]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_grid(grid: Sequence[int]) -> Grid:
    """Return ``grid`` as a tuple of 2 (H, W) or 3 (T, H, W) positive ints."""
    try:
        grid = tuple(int(g) for g in grid)
    except TypeError:
        raise ValueError(f"grid must be a tuple (H, W) or (T, H, W), got {grid!r}") from None
    if len(grid) not in (2, 3) or any(g < 1 for g in grid):
        raise ValueError(f"grid must be (H, W) or (T, H, W) with every side >= 1, got {grid}")
    return grid


def check_image_grid(grid: Sequence[int], op: str) -> tuple[int, int]:
    grid = check_grid(grid)
    if len(grid) != 2:
        raise ValueError(f"{op} works on image grids (H, W); got the video grid {grid}")
    return grid


def check_tokens(num_tokens: int, grid: Sequence[int], num_prefix: int) -> None:
    """N must equal P + prod(grid); the error names all three."""
    if num_prefix < 0:
        raise ValueError(f"num_prefix must be >= 0, got {num_prefix}")
    if num_tokens != num_prefix + math.prod(grid):
        raise ValueError(
            f"token count N={num_tokens} does not match num_prefix P={num_prefix} plus the grid "
            f"{tuple(grid)} ({math.prod(grid)} tokens): expected N = {num_prefix + math.prod(grid)}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, op: str) -> None:
    """q, k, v: (B, heads, N, d), same dtype and device, floating point."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must have shape (B, heads, N, head_dim), got {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be a floating point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"{op}: shapes do not agree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(need q (B, h, N, d), k (B, h, M, d), v (B, h, M, dv))")


def check_self_attention(q, k, v, grid, num_prefix: int, op: str) -> Grid:
    """Checks for ops where q, k, v are the same tokens on one grid."""
    check_qkv(q, k, v, op)
    grid = check_grid(grid)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: q and k must have the same token count, got {q.shape[2]} and {k.shape[2]}")
    check_tokens(q.shape[2], grid, num_prefix)
    return grid


def check_perfect_square(n: int, what: str) -> int:
    a = math.isqrt(n)
    if n < 1 or a * a != n:
        raise ValueError(f"{what} must be a perfect square (agents are pooled to an a x a grid), got {n}")
    return a
