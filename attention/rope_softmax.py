"""MAViT's softmax blocks (Fan et al., "Rectifying Magnitude Neglect in Linear Attention", ICCV 2025;
official ``classfication_release/model.py``). Parameter names follow the official code (its ``qkvo``
split into ``qkv`` and ``gate``) so its checkpoints load."""
from __future__ import annotations

from torch import nn

from ..kernels import apply_rope_2d, checks, depthwise_conv_on_grid, softmax_attention
from .base import GridAttention
from .grid_maps import depthwise_conv
from .registry import register_standalone


@register_standalone("softmax_rope")
class RoPESoftmaxAttention(GridAttention):
    """Softmax attention of 2D-RoPE-rotated q and k, plus a depthwise ``lepe_kernel_size`` LePE of V,
    the sum multiplied by a linear gate of the input before the projection (the MALA blocks' extras,
    around softmax instead of MALA)."""

    def __init__(self, dim: int, num_heads: int = 8, *, lepe_kernel_size: int = 5, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        if self.head_dim % 4:
            raise ValueError(f"{type(self).__name__}: 2D RoPE needs head_dim divisible by 4, got head_dim={self.head_dim} "
                             f"(dim={self.dim} / num_heads={self.num_heads})")
        self.lepe = depthwise_conv(dim, checks.check_int(lepe_kernel_size, "lepe_kernel_size", type(self).__name__,
                                                         odd=True))
        self.gate = nn.Linear(dim, dim)
        self.to(**self.factory_kwargs)

    def attend(self, x, q, k, v, grid, num_prefix):
        grid = checks.check_image_grid(grid, "RoPE softmax attention")
        y = softmax_attention(apply_rope_2d(q, grid, num_prefix), apply_rope_2d(k, grid, num_prefix), v,
                              backend=self.backend)
        y = depthwise_conv_on_grid(v, self.lepe.weight, self.lepe.bias, grid=grid, num_prefix=num_prefix, residual=y,
                                   backend=self.backend)
        b, n, _ = x.shape
        return y * self.gate(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
