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


# --- sparse families: neighborhood, radial, log-linear ------------------------------------

def check_neighborhood(grid: Sequence[int], kernel_size: int, dilation: int, op: str) -> None:
    """An odd kernel >= 1 and a dilation >= 1 whose dilated window fits every grid side.

    NATTEN's rule is kernel_size * dilation <= side: each of the ``dilation`` interleaved groups of a
    side must hold a whole window (kernel_size * dilation > side implies dilation * (k-1) + 1 may
    still fit, but the smallest group does not).
    """
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{op}: kernel_size must be an odd int >= 1 (the window is centred on the query), got {kernel_size!r}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"{op}: dilation must be an int >= 1, got {dilation!r}")
    for side in grid:
        if kernel_size * dilation > side:
            raise ValueError(
                f"{op}: kernel_size * dilation = {kernel_size} * {dilation} = {kernel_size * dilation} is larger "
                f"than the grid side {side} of {tuple(grid)}; every dilation group of a side must hold "
                "kernel_size tokens: use a smaller kernel or dilation, or dense attention")


def check_rpb(rpb, num_heads: int, kernel_size: int, op: str) -> None:
    if rpb is not None and tuple(rpb.shape) != (num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1):
        raise ValueError(f"{op}: rpb must have shape (heads, 2k-1, 2k-1) = ({num_heads}, {2 * kernel_size - 1}, "
                         f"{2 * kernel_size - 1}), got {tuple(rpb.shape)}")


def check_top_k(top_k: int, num_blocks: int, what: str, op: str) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"{op}: top_k must be an int >= 1, got {top_k!r}")
    if top_k > num_blocks:
        raise ValueError(f"{op}: top_k={top_k} is larger than the {num_blocks} {what}; "
                         "use a smaller top_k (or dense attention for so small a grid)")


# --- depthwise conv on the grid (DWC / LePE) ------------------------------------------------

def check_grid_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grid: Sequence[int],
                    num_prefix: int, residual: torch.Tensor | None, op: str = "depthwise_conv_on_grid") -> Grid:
    """x (B, heads, N, d) floating point; weight (C, 1, k, k) with k odd and C = heads*d or d; bias None
    or (C,); N = P + prod(grid); residual None or x's shape, dtype and device."""
    if x.dim() != 4 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: x must be a floating point tensor (B, heads, N, head_dim), got {x.dtype} "
                         f"{tuple(x.shape)}")
    h, d = x.shape[1], x.shape[-1]
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"{op}: weight must have shape (C, 1, k, k) (a depthwise k x k filter per channel), "
                         f"got {tuple(weight.shape)}")
    channels, k = weight.shape[0], weight.shape[-1]
    if channels not in (h * d, d):
        raise ValueError(f"{op}: weight has {channels} channels; need heads*head_dim = {h * d} (one filter per "
                         f"channel) or head_dim = {d} (one filter shared by the heads)")
    if k % 2 == 0:
        raise ValueError(f"{op}: the kernel size must be odd (the filter is centred on its token), got {k}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype not in _FLOAT_DTYPES or t.device != x.device):
            raise ValueError(f"{op}: {name} must be floating point on x's device {x.device}, got {t.dtype} on "
                             f"{t.device}")
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"{op}: bias must have shape (C,) = ({channels},), got {tuple(bias.shape)}")
    grid = check_grid(grid)
    check_tokens(x.shape[2], grid, num_prefix)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"{op}: residual must have x's dtype and device ({x.dtype} on {x.device}), got "
                             f"{residual.dtype} on {residual.device}")
    return grid
