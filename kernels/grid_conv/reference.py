"""Depthwise convolution over the grid tokens (DWC / LePE), prefix tokens untouched."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def depthwise_conv_on_grid_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                     grid: tuple[int, ...], num_prefix: int,
                                     residual: torch.Tensor | None = None) -> torch.Tensor:
    """residual + depthwise 2D conv of the grid tokens of x (B, h, N, d); the conv is 0 at the prefix positions.

    ``weight`` is (C, 1, k, k) with C = h*d (one filter per channel) or C = d (one filter per head
    channel, shared by all heads, as FLatten does). A video grid (T, H, W) convolves each
    frame. Zero padding keeps the grid size. ``residual`` None adds nothing.
    """
    b, h, _, d = x.shape
    *frames, gh, gw = grid
    t = frames[0] if frames else 1
    channels = weight.shape[0]
    g = x[:, :, num_prefix:].reshape(b, h, t, gh, gw, d)
    if channels == h * d:
        g = g.permute(0, 2, 1, 5, 3, 4).reshape(b * t, h * d, gh, gw)
    elif channels == d:
        g = g.permute(0, 1, 2, 5, 3, 4).reshape(b * h * t, d, gh, gw)
    else:
        raise ValueError(f"depthwise conv weight has {channels} channels; need heads*head_dim={h * d} or head_dim={d}")
    y = F.conv2d(g, weight.to(g.dtype), None if bias is None else bias.to(g.dtype),
                 padding=weight.shape[-1] // 2, groups=channels)
    if channels == h * d:
        y = y.reshape(b, t, h, d, gh, gw).permute(0, 2, 1, 4, 5, 3)
    else:
        y = y.reshape(b, h, t, d, gh, gw).permute(0, 1, 2, 4, 5, 3)
    y = y.reshape(b, h, t * gh * gw, d)
    y = torch.cat([y.new_zeros(b, h, num_prefix, d), y], dim=2)
    return y if residual is None else residual + y
