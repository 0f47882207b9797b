"""Neighborhood attention (Hassani et al., "Neighborhood Attention Transformer", CVPR 2023) and its
dilated form (Hassani & Shi, "Dilated Neighborhood Attention Transformer", 2022)."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import checks, neighborhood_attention, softmax_attention
from .base import GridAttention
from .registry import register


@register("neighborhood")
class NeighborhoodAttention(GridAttention):
    """Each grid token attends to the k x k window around it (every ``dilation``-th token), shifted
    inward at borders, plus the prefix tokens (NAT Eq. 2-3), with NAT's relative position bias.

    Options (NAT's defaults): ``kernel_size`` (7), ``dilation`` (1), ``rpb`` (True: a learnable
    bias ``rpb`` of shape (heads, 2k-1, 2k-1), named as in NAT so its checkpoints load). A grid
    with a side smaller than kernel_size * dilation is padded at the bottom and right with tokens
    whose input is zero, and the output cropped, as NATTEN's NeighborhoodAttention2D (which the
    official NAT/DiNAT models use) does, so official checkpoints behave the same at any resolution.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, kernel_size: int = 7, dilation: int = 1,
                 rpb: bool = True, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        name = type(self).__name__
        self.kernel_size, self.dilation = checks.check_neighborhood((), kernel_size, dilation, name)
        kernel_size = self.kernel_size
        if checks.check_bool(rpb, "rpb", name):
            like = self.qkv.weight                # follows the device/dtype the base module was built with
            self.rpb = nn.Parameter(torch.zeros(self.num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1,
                                                device=like.device, dtype=like.dtype))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)

    def attend(self, x, q, k, v, grid, num_prefix):
        dilation, padded = (checks.padded_neighborhood(grid, self.kernel_size, self.dilation) if len(grid) == 2
                            else (self.dilation, grid))
        if padded == grid:
            return neighborhood_attention(q, k, v, grid=grid, kernel_size=self.kernel_size, dilation=dilation,
                                          rpb=self.rpb, num_prefix=num_prefix, backend=self.backend)
        fills = self._zero_input_qkv(x)
        qp, kp, vp = (self._pad(t, fill, grid, padded, num_prefix) for t, fill in zip((q, k, v), fills))
        y = neighborhood_attention(qp, kp, vp, grid=padded, kernel_size=self.kernel_size, dilation=dilation,
                                   rpb=self.rpb, num_prefix=num_prefix, backend=self.backend)
        b, h, _, d = y.shape
        grid_out = y[:, :, num_prefix:].reshape(b, h, *padded, d)[:, :, :grid[0], :grid[1]].reshape(b, h, -1, d)
        # the padding only places the windows: prefix queries attend to the real tokens alone
        return torch.cat([softmax_attention(q[:, :, :num_prefix], k, v), grid_out], dim=2)

    def _zero_input_qkv(self, x):
        """q, k, v (1, heads, 1, head_dim) of a token whose input is zero: the padding tokens."""
        q, k, v = self.qkv(x.new_zeros(1, 1, self.dim)).reshape(1, 1, 3, self.num_heads, self.head_dim) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    @staticmethod
    def _pad(t, fill, grid, padded, num_prefix):
        b, h, _, d = t.shape
        out = fill.reshape(1, h, 1, 1, d).expand(b, h, *padded, d).clone()
        out[:, :, :grid[0], :grid[1]] = t[:, :, num_prefix:].reshape(b, h, *grid, d)
        return torch.cat([t[:, :, :num_prefix], out.reshape(b, h, -1, d)], dim=2)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"rpb={self.rpb is not None}")
