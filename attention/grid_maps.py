"""Learnable maps defined on a reference grid, resized to the grid at hand, and depthwise convs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def resize_map(m: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Resize the trailing 1 or 2 dims of ``m`` to ``size`` (linear / bilinear, align_corners=False).

    The identity when the size already matches, so a model at its training resolution uses its
    parameters exactly.
    """
    spatial = tuple(m.shape[-len(size):])
    if spatial == tuple(size):
        return m
    lead = m.shape[:-len(size)]
    mode = "linear" if len(size) == 1 else "bilinear"
    work = m.reshape(1, -1, *spatial).to(torch.promote_types(m.dtype, torch.float32))
    out = F.interpolate(work, size=size, mode=mode, align_corners=False)
    return out.reshape(*lead, *size).to(m.dtype)


def depthwise_conv(channels: int, kernel_size: int) -> nn.Conv2d:
    """A depthwise k x k conv with bias, zero-padded to keep the grid size (DWC / LePE)."""
    if kernel_size % 2 == 0:
        raise ValueError(f"depthwise conv kernel_size must be odd, got {kernel_size}")
    return nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
