"""2D rotary position embedding on the grid tokens (Su et al., 2021; the 2D form of MALA's MAViT)."""
from __future__ import annotations

import torch

from .precision import compute_dtype


def rope_2d_angles(grid: tuple[int, int], head_dim: int, device, base: float = 10000.0,
                   dtype: torch.dtype = torch.float32):
    """sin, cos of shape (H*W, head_dim): the first half of the channels rotate with the row index,
    the second half with the column index; channels (2i, 2i+1) form one rotation pair."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    h, w = grid
    freqs = 1.0 / (base ** torch.linspace(0, 1, head_dim // 4, device=device, dtype=dtype))
    freqs = freqs.repeat_interleave(2)                                            # (d/2,)
    rows = torch.arange(h, device=device, dtype=dtype)[:, None] * freqs           # (H, d/2)
    cols = torch.arange(w, device=device, dtype=dtype)[:, None] * freqs           # (W, d/2)
    angle = torch.cat([rows[:, None, :].expand(h, w, -1), cols[None, :, :].expand(h, w, -1)], dim=-1)
    angle = angle.reshape(h * w, head_dim)
    return angle.sin(), angle.cos()


_TABLES: dict = {}       # (grid, head_dim, device, dtype) -> (sin, cos) in x's dtype, built once outside torch.compile
_TABLES_MAX = 64


def _sin_cos(grid: tuple[int, int], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope_2d_angles`` for x's grid and head dim (angles in x's compute dtype), cast to x's dtype; cached per
    grid, head dim, device and dtype (a dozen small launches per call otherwise). Built outside inference mode,
    so that training may save them for its backward."""
    if torch.compiler.is_compiling():
        sin, cos = rope_2d_angles(grid, x.shape[-1], x.device, dtype=compute_dtype(x))
        return sin.to(x.dtype), cos.to(x.dtype)
    key = (tuple(grid), x.shape[-1], x.device, x.dtype)
    tables = _TABLES.get(key)
    if tables is None:
        with torch.inference_mode(False), torch.no_grad():
            sin, cos = rope_2d_angles(grid, x.shape[-1], x.device, dtype=compute_dtype(x))
            tables = sin.to(x.dtype), cos.to(x.dtype)
        if len(_TABLES) >= _TABLES_MAX:
            _TABLES.clear()
        _TABLES[key] = tables
    return tables


def apply_rope_2d(x: torch.Tensor, grid: tuple[int, int], num_prefix: int = 0) -> torch.Tensor:
    """Rotate the grid tokens of x (B, h, N, d); prefix tokens sit at no position (left unrotated)."""
    sin, cos = _sin_cos(grid, x)
    g = x[..., num_prefix:, :] if num_prefix else x
    pairs = g.unflatten(-1, (-1, 2))
    rotated_half = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    g = torch.addcmul(g * cos, rotated_half, sin)
    return torch.cat([x[..., :num_prefix, :], g], dim=-2) if num_prefix else g
