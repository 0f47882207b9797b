"""Patch embedding as one matrix product: a convolution whose kernel equals its stride cuts the image into
disjoint patches, so it is a linear layer over the flattened patches."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.core.precision import autocast_dtype


class PatchifyConv2d(nn.Conv2d):
    """``nn.Conv2d`` with kernel_size == stride, no padding, dilation or groups, computed as
    (B * H/p * W/p, C p p) @ (C p p, D): the patches are one reshape-and-permute copy of the image (in the autocast
    dtype under autocast) and the product one GEMM, where cuDNN's heuristic picks a slow implicit-GEMM conv for
    3-channel bf16 images. Same parameters and state-dict keys as the conv; the output is NCHW-shaped with
    channels-last strides, so flattening it to tokens (B, N, D) is a view. An input whose sides are not multiples
    of the stride runs the conv (which drops the remainder)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> nn.Conv2d:
        """``conv`` as a ``PatchifyConv2d`` sharing its parameters, or ``conv`` itself where it is not a patchify."""
        if (type(conv) is not nn.Conv2d or conv.kernel_size != conv.stride or conv.padding not in ((0, 0), "valid")
                or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros"):
            return conv
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, bias=conv.bias is not None,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        new.weight, new.bias = conv.weight, conv.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (ph, pw), (h, w) = self.kernel_size, x.shape[-2:]
        if x.dim() != 4 or h % ph or w % pw:
            return super().forward(x)
        b, c = x.shape[:2]
        dtype = autocast_dtype(x.device.type) or x.dtype
        patches = x.to(dtype).reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
        weight = self.weight.reshape(self.out_channels, -1)
        out = F.linear(patches.reshape(b * (h // ph) * (w // pw), -1), weight, self.bias)
        return out.reshape(b, h // ph, w // pw, -1).permute(0, 3, 1, 2)
