"""Depthwise convolution over the grid tokens (DWC / LePE), prefix tokens untouched."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _GradInLayout(torch.autograd.Function):
    """The identity whose backward hands the gradient back in the input's strides (see grad_in_layout)."""

    @staticmethod
    def forward(ctx, param: torch.Tensor) -> torch.Tensor:
        ctx.layout = (param.shape, param.stride())
        return param.view_as(param)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        shape, stride = ctx.layout
        if not torch.compiler.is_compiling():     # traced strides need not be the kernels' own: always copy there
            if grad.stride() == stride:
                return grad
            if all(n == 1 or a == b for n, a, b in zip(shape, grad.stride(), stride)):
                return grad.as_strided(shape, stride)       # the same memory, only a size-1 dim's stride differs
        return grad.new_empty_strided(shape, stride).copy_(grad)


def grad_in_layout(param: torch.Tensor | None) -> torch.Tensor | None:
    """``param`` itself, whose gradient comes back with ``param``'s strides, size-1 dims included.

    Depthwise conv backwards (PyTorch's on CPU, cudnn's when it picks channels_last) return a (C, 1, k, k)
    filter's gradient with strides (k*k, 1, k, 1) instead of the parameter's (k*k, k*k, k, 1). Autograd
    keeps that gradient (its layout contract ignores size-1 dims); DDP compares every stride with its bucket
    view's and warns "Grad strides do not match bucket view strides" on every rank. Wrap a (small,
    dense) parameter at its use, before any cast. In eager mode a mismatch costs a view (only size-1 dims
    differ) or a copy of the parameter's size; a compiled graph always copies (its traced strides need not
    be the kernels'). No tensor hook, so deep copies (timm's EMA) keep the behaviour. ``param`` itself where
    no gradient is being recorded for it.
    """
    if param is None or not (param.requires_grad and torch.is_grad_enabled()):
        return param
    return _GradInLayout.apply(param)


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
    weight, bias = grad_in_layout(weight), grad_in_layout(bias)
    y = F.conv2d(g, weight.to(g.dtype), None if bias is None else bias.to(g.dtype),
                 padding=weight.shape[-1] // 2, groups=channels)
    if channels == h * d:
        y = y.reshape(b, t, h, d, gh, gw).permute(0, 2, 1, 4, 5, 3)
    else:
        y = y.reshape(b, h, t, d, gh, gw).permute(0, 1, 2, 4, 5, 3)
    y = y.reshape(b, h, t * gh * gw, d)
    y = torch.cat([y.new_zeros(b, h, num_prefix, d), y], dim=2)
    return y if residual is None else residual + y
