"""Learnable maps defined on a reference grid, resized to the grid at hand, and depthwise convs."""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.grid_conv import depthwise_conv_on_grid
from ..kernels.grid_conv.reference import grad_in_layout


# the most bytes the kept constants may hold together (an agent block's bias matrix at a 2048x2048 image, patch
# 16, is 5 MiB): the least recently used go first, so that images of ever new sizes do not grow the cache
CONSTANT_BYTES = 64 * 2 ** 20
_CONSTANTS: OrderedDict[tuple, torch.Tensor] = OrderedDict()


def cached_constant(key: tuple, like: torch.Tensor, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``build()``, a constant of the sizes in ``key`` (e.g. an interpolation matrix), kept per (key, device,
    dtype of ``like``) in eager mode, where building it every call cost a dozen small launches; at most
    ``CONSTANT_BYTES`` are kept (least recently used dropped first)."""
    if torch.compiler.is_compiling():           # traced once into the graph: no cache to guard on
        return build()
    key = (*key, like.device, like.dtype)
    if key in _CONSTANTS:
        _CONSTANTS.move_to_end(key)
        return _CONSTANTS[key]
    value = _CONSTANTS[key] = build()
    while len(_CONSTANTS) > 1 and sum(t.nbytes for t in _CONSTANTS.values()) > CONSTANT_BYTES:
        _CONSTANTS.popitem(last=False)
    return value


def linear_resize_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in): linear interpolation (align_corners=False) of a length-n_in axis as a matrix (the identity
    when n_in == n_out), on ``like``'s device and dtype."""
    def build() -> torch.Tensor:
        eye = torch.eye(n_in, device=like.device, dtype=like.dtype)[None]
        return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.contiguous()
    return cached_constant(("linear_resize", n_in, n_out), like, build)


def grid_resize_matrix(src: tuple[int, int], grid: tuple[int, ...], num_prefix: int,
                       like: torch.Tensor) -> torch.Tensor:
    """(num_prefix + prod(grid), sh * sw): a map on the ``src`` grid (raster order) resized bilinearly to the
    grid's (H, W) (align_corners=False; the identity when they match), the same on every frame of a (T, H, W)
    grid, zero on the prefix rows: ``grid_resize_matrix(...) @ m.flatten()`` is ``F.interpolate``'s map in
    one product."""
    def build() -> torch.Tensor:
        (sh, sw), (gh, gw) = src, grid[-2:]
        rows, cols = linear_resize_matrix(sh, gh, like), linear_resize_matrix(sw, gw, like)
        on_grid = (rows[:, None, :, None] * cols[None, :, None, :]).reshape(gh * gw, sh * sw)     # R_h x R_w
        frames = grid[0] if len(grid) == 3 else 1
        return torch.cat([like.new_zeros(num_prefix, sh * sw), on_grid.repeat(frames, 1)])
    return cached_constant(("grid_resize", tuple(src), tuple(grid), num_prefix), like, build)


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on the devices that have it (not the meta device, on which FLOPs are counted)."""
    return contextlib.nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)


def resize_map(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a channels-last map (sh, sw, C) to (H, W, C) = ``size`` + (C,), bilinearly (align_corners=False).

    The identity when the size already matches, so a model at its training resolution uses its parameters
    exactly. Bilinear interpolation is separable: two products on the channels-last map, R_h m (rows) then R_w
    per row (one batched product), with no permuted copies; the same values as ``F.interpolate``, whose backward
    scatters into the small map with atomics. Computed in float32 or wider (also under autocast), returned in
    m's dtype.
    """
    (sh, sw, c), (h, w) = m.shape, size
    if (sh, sw) == (h, w):
        return m
    work = m.to(torch.promote_types(m.dtype, torch.float32))
    with without_autocast(work.device):
        rows = linear_resize_matrix(sh, h, work) @ work.reshape(sh, sw * c)                      # (H, sw C)
        out = torch.bmm(linear_resize_matrix(sw, w, work).expand(h, -1, -1), rows.view(h, sw, c))
    return out.to(m.dtype)


class DepthwiseConv2d(nn.Conv2d):
    """nn.Conv2d whose filter and bias get their gradients in their own strides (``grad_in_layout``): a
    depthwise conv's backward returns the (C, 1, k, k) filter's gradient with another stride on the size-1
    dim, which DDP warns about on every rank. Same parameters and state dict as nn.Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, grad_in_layout(self.weight), grad_in_layout(self.bias))

    def forward_nhwc(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual + this conv of an NHWC map x (B, H, W, C) (residual None: 0), through ``depthwise_conv_on_grid``
        (on CUDA one Triton pass, the add fused) with the channels as groups of up to 64 (its heads: views of x,
        no permuted copy, and no cast of a float32 x under autocast)."""
        b, h, w, c = x.shape
        group = math.gcd(c, 64)                            # the largest power of two up to 64 dividing C
        as_heads = lambda t: t.reshape(b, h * w, c // group, group).transpose(1, 2)     # noqa: E731
        out = depthwise_conv_on_grid(as_heads(x), self.weight, self.bias, grid=(h, w),
                                     residual=as_heads(residual) if residual is not None else None)
        return out.transpose(1, 2).reshape(b, h, w, c)


def depthwise_conv(channels: int, kernel_size: int) -> nn.Conv2d:
    """A depthwise k x k conv with bias, zero-padded to keep the grid size (DWC / LePE); called as a module
    (MAViT's CPE and FFN) or through ``depthwise_conv_on_grid`` with its weight and bias."""
    if kernel_size % 2 == 0:
        raise ValueError(f"depthwise conv kernel_size must be odd, got {kernel_size}")
    return DepthwiseConv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
