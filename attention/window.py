"""Shifted-window attention (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using
Shifted Windows", ICCV 2021). Parameter names follow the official code so its checkpoints load."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from ..kernels import checks
from .base import GridAttention
from .registry import register_standalone


@register_standalone("window")
class WindowAttention(GridAttention):
    """Softmax attention inside non-overlapping windows with a relative position bias; with
    ``shift=True`` the windows are shifted by half a window (W-MSA / SW-MSA, Sec. 3.2, Eq. 4).

    As in Swin, a window at least as large as a grid side shrinks to that side (and does not shift
    along it); the bias table, defined for ``window_size``, is then read at the smaller offsets.
    Grids that are not multiples of the window are zero-padded at the bottom and right and the
    padded keys are masked, so any grid works. Keys from another region of a cyclically rolled
    window get Swin's additive -100, which keeps the official checkpoints' outputs exact.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, window_size: int = 7, shift: bool = False, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        name = type(self).__name__
        self.window_size = window_size = checks.check_int(window_size, "window_size", name)
        self.shift = checks.check_bool(shift, "shift", name)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.to(**self.factory_kwargs)

    def position_bias(self, window: tuple[int, int], device: torch.device) -> torch.Tensor:
        """(heads, A, A) for a window of A = wh * ww tokens: table[offset of query from key]."""
        size = self.window_size
        coords = torch.stack(torch.meshgrid(torch.arange(window[0], device=device),
                                            torch.arange(window[1], device=device), indexing="ij")).flatten(1)
        offset = coords[:, :, None] - coords[:, None, :] + (size - 1)
        return self.relative_position_bias_table[offset[0] * (2 * size - 1) + offset[1]].permute(2, 0, 1)

    def layout(self, grid: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(window, shift, padded grid) for this grid."""
        window = tuple(min(self.window_size, side) for side in grid)
        shift = tuple(w // 2 if self.shift and side > self.window_size else 0 for w, side in zip(window, grid))
        padded = tuple(side + (-side % w) for side, w in zip(grid, window))
        return window, shift, padded

    def window_mask(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        """(windows, A, A) additive mask, or None when every window is whole and unrolled.

        Tokens get a label per region of the rolled map (Swin's 3 x 3 regions) and padding a label of
        its own; a query attends only the keys with its label."""
        window, shift, padded = self.layout(grid)
        if not any(shift) and padded == tuple(grid):
            return None
        labels = []
        for side, w, s, p in zip(grid, window, shift, padded):
            rolled = torch.arange(p, device=device)
            region = (rolled >= p - w).long() + (rolled >= p - s).long() if s else torch.zeros_like(rolled)
            labels.append(torch.where((rolled + s) % p < side, region, 3))    # 3: padding
        label = labels[0][:, None] * 4 + labels[1][None, :]
        label = label.reshape(padded[0] // window[0], window[0], padded[1] // window[1], window[1])
        label = label.transpose(1, 2).reshape(-1, window[0] * window[1])
        return (label[:, :, None] != label[:, None, :]).float() * -100.0

    def attend(self, x, q, k, v, grid, num_prefix):
        if num_prefix:
            raise ValueError("window attention takes no prefix tokens (it is for the hierarchical backbones); "
                             f"got num_prefix={num_prefix}")
        grid = checks.check_image_grid(grid, "window attention")
        window, shift, padded = self.layout(grid)
        rows, cols = padded[0] // window[0], padded[1] // window[1]

        def to_windows(t: torch.Tensor) -> torch.Tensor:          # (B, h, N, d) -> (B, h, windows, A, d)
            b, h, _, d = t.shape
            t = F.pad(t.reshape(b, h, *grid, d), (0, 0, 0, padded[1] - grid[1], 0, padded[0] - grid[0]))
            t = t.roll((-shift[0], -shift[1]), dims=(2, 3)) if any(shift) else t
            return t.reshape(b, h, rows, window[0], cols, window[1], d).transpose(3, 4).flatten(2, 3).flatten(3, 4)

        scores = (to_windows(q) * self.head_dim ** -0.5) @ to_windows(k).transpose(-2, -1)
        scores = scores + self.position_bias(window, q.device)[:, None].to(scores.dtype)
        mask = self.window_mask(grid, q.device)
        if mask is not None:
            scores = scores + mask.to(scores.dtype)
        y = scores.softmax(dim=-1) @ to_windows(v)                  # (B, h, windows, A, d)
        b, h, _, _, d = y.shape
        y = y.reshape(b, h, rows, cols, *window, d).transpose(3, 4).reshape(b, h, *padded, d)
        y = y.roll(shift, dims=(2, 3)) if any(shift) else y
        return y[:, :, :grid[0], :grid[1]].reshape(b, h, grid[0] * grid[1], d)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window_size={self.window_size}, shift={self.shift}"
