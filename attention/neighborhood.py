"""Neighborhood attention (Hassani et al., "Neighborhood Attention Transformer", CVPR 2023) and its
dilated form (Hassani & Shi, "Dilated Neighborhood Attention Transformer", 2022)."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import checks
from ..kernels.functional import neighborhood_attention
from .base import GridAttention
from .registry import register


@register("neighborhood", "nat")
class NeighborhoodAttention(GridAttention):
    """Each grid token attends to the k x k window around it (every ``dilation``-th token), shifted
    inward at borders, plus the prefix tokens (NAT Eq. 2-3), with NAT's relative position bias.

    Options (NAT's defaults): ``kernel_size`` (7), ``dilation`` (1), ``rpb`` (True: a learnable
    bias ``rpb`` of shape (heads, 2k-1, 2k-1), named as in NAT so its checkpoints load). On a grid
    with a side smaller than kernel_size * dilation the window cannot be placed; the module then
    attends densely (without the bias).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, kernel_size: int = 7, dilation: int = 1,
                 rpb: bool = True, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        checks.check_neighborhood((), kernel_size, dilation, "NeighborhoodAttention")
        self.kernel_size, self.dilation = kernel_size, dilation
        if rpb:
            like = self.qkv.weight                # follows the device/dtype the base module was built with
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1,
                                                device=like.device, dtype=like.dtype))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)

    def needs_dense(self, grid):
        return len(grid) == 2 and min(grid) < self.kernel_size * self.dilation

    def attend(self, x, q, k, v, grid, num_prefix):
        return neighborhood_attention(q, k, v, grid=grid, kernel_size=self.kernel_size, dilation=self.dilation,
                                      rpb=self.rpb, num_prefix=num_prefix, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"rpb={self.rpb is not None}")
