"""Focused linear attention (Han et al., "FLatten Transformer: Vision Transformer using Focused
Linear Attention", ICCV 2023). Parameter names follow the official code."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import checks, depthwise_conv_on_grid, family, focused_linear_attention
from ..kernels.core.family import check_options
from .base import GridAttention
from .grid_maps import depthwise_conv, resize_map
from .registry import register


@register("focused_linear")
class FocusedLinearAttention(GridAttention):
    """O = phi_p(Q) (phi_p(K)^T V) / (phi_p(Q) sum_j phi_p(k_j)) + DWC(V)  (Eq. 3-7).

    phi_p's norms span the whole token (all ``dim`` channels, every head), as in the official code, which
    applies the focused map before splitting heads; ``scale`` is its learnable s, one per channel.

    Options: ``focusing_factor`` p (3), ``kernel_size`` of the depthwise conv on V (5; one
    head_dim-channel conv shared by every head, as in the official code), and ``pos_grid``: if set,
    the learnable positional encoding added to K, defined on that grid and resized to the grid at
    hand (prefix keys get none); ``lepe``: also add a depthwise ``lepe_kernel_size`` conv of V with one
    filter per channel (FLatten-CSWin keeps CSWin's 3x3 LePE, Dong et al., CVPR 2022, Eq. 4).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, focusing_factor: float = 3, kernel_size: int = 5,
                 pos_grid: tuple[int, int] | None = None, lepe: bool = False, lepe_kernel_size: int = 3,
                 **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        name = type(self).__name__
        check_options(family("focused_linear"), dict(focusing_factor=focusing_factor), name)
        self.focusing_factor = focusing_factor
        self.dwc = depthwise_conv(self.head_dim, checks.check_int(kernel_size, "kernel_size", name, odd=True))
        self.scale = nn.Parameter(torch.zeros(1, 1, self.dim))
        self.pos_grid = checks.check_ints(pos_grid, "pos_grid", name, lengths=(2,)) if pos_grid is not None else None
        self.positional_encoding = (nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], dim))
                                    if pos_grid is not None else None)
        lepe_kernel_size = checks.check_int(lepe_kernel_size, "lepe_kernel_size", name, odd=True)
        self.lepe = depthwise_conv(dim, lepe_kernel_size) if checks.check_bool(lepe, "lepe", name) else None
        self.to(**self.factory_kwargs)

    def key_encoding(self, grid: tuple[int, ...]) -> torch.Tensor:
        """The positional encoding resized bilinearly to the grid (``resize_map``: two small products; on its own
        grid a view of the parameter) and split into heads, (h, N, d) in the parameter's dtype; each frame of a
        video grid alike."""
        (sh, sw), h, d = self.pos_grid, self.num_heads, self.head_dim
        pe = resize_map(self.positional_encoding.view(sh, sw, h * d), tuple(grid[-2:]))
        pe = pe.view(-1, h, d)                                          # (H * W, h, d)
        if len(grid) == 3:
            pe = pe.repeat(grid[0], 1, 1)
        return pe.transpose(0, 1)

    def key_offset(self, grid, activation):
        if self.positional_encoding is None:
            return None
        return self.cached_for_inference("key_encoding", grid, (self.positional_encoding,),
                                         lambda: self.key_encoding(grid), activation)

    def attend(self, x, q, k, v, grid, num_prefix):
        y = focused_linear_attention(q, k, v, grid=grid, focusing_factor=self.focusing_factor,
                                     scale=self.scale.reshape(self.num_heads, self.head_dim),
                                     num_prefix=num_prefix, backend=self.backend)
        y = depthwise_conv_on_grid(v, self.dwc.weight, self.dwc.bias, grid=grid, num_prefix=num_prefix, residual=y,
                                   backend=self.backend)
        if self.lepe is not None:
            y = depthwise_conv_on_grid(v, self.lepe.weight, self.lepe.bias, grid=grid, num_prefix=num_prefix,
                                       residual=y, backend=self.backend)
        return y

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, focusing_factor={self.focusing_factor}, pos_grid={self.pos_grid}, "
                f"lepe={self.lepe is not None}")
