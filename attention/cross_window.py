"""Cross-shaped window attention with LePE (Dong et al., "CSWin Transformer: A General Vision Transformer
Backbone with Cross-Shaped Windows", CVPR 2022). The official code's two branches each have a LePE conv
of half the channels; here they are one depthwise conv over all channels (the checkpoint filter
concatenates them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import checks, depthwise_conv_on_grid
from .base import GridAttention
from .grid_maps import depthwise_conv
from .registry import register_standalone


def stripe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lepe_weight: torch.Tensor,
                     lepe_bias: torch.Tensor, grid: tuple[int, int], width: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V + LePE(V) inside vertical stripes of ``width`` columns and full height
    (Sec. 3.2-3.3, Eq. 2 and 4); (B, h, H*W, d) in and out. LePE is the depthwise conv of the stripe's V,
    zero-padded at the stripe's borders. A width that does not divide W pads the last stripe with
    zeros, whose keys are masked."""
    b, h, _, d = q.shape
    rows, cols = grid
    pad = -cols % width
    stripes = (cols + pad) // width

    def to_stripes(t: torch.Tensor) -> torch.Tensor:          # (B, h, H*W, d) -> (B * stripes, h, H * width, d)
        t = F.pad(t.reshape(b, h, rows, cols, d), (0, 0, 0, pad))
        return t.reshape(b, h, rows, stripes, width, d).permute(0, 3, 1, 2, 4, 5).reshape(-1, h, rows * width, d)

    q, k, v = to_stripes(q), to_stripes(k), to_stripes(v)
    mask = None
    if pad:
        real = torch.arange(stripes * width, device=q.device).reshape(stripes, 1, width) < cols
        mask = real.expand(stripes, rows, width).reshape(1, stripes, 1, 1, rows * width)
        mask = mask.expand(b, -1, -1, -1, -1).reshape(b * stripes, 1, 1, rows * width)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    y = depthwise_conv_on_grid(v, lepe_weight, lepe_bias, grid=(rows, width), residual=y)
    y = y.reshape(b, stripes, h, rows, width, d).permute(0, 2, 3, 1, 4, 5).reshape(b, h, rows, stripes * width, d)
    return y[:, :, :, :cols].reshape(b, h, rows * cols, d)


def _transposed(t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Tokens (B, h, H*W, d) of the grid (H, W) in the raster order of its transpose (W, H)."""
    b, h, _, d = t.shape
    return t.reshape(b, h, *grid, d).transpose(2, 3).reshape(b, h, -1, d)


@register_standalone("cross_window")
class CrossWindowAttention(GridAttention):
    """Cross-shaped window self-attention (Sec. 3.2, Eq. 1-3) with locally-enhanced positional
    encoding (LePE, Sec. 3.3, Eq. 4): the first half of the heads attends within vertical stripes of
    ``stripe_width`` columns, the second half within horizontal stripes of ``stripe_width`` rows, each
    adding a 3x3 depthwise conv of its V inside the stripe.

    ``stripe_width=None``: every head attends over the whole map (CSWin's last stage). A stripe at least
    as wide as its grid side covers that side; a grid side that is no multiple of the width is padded
    with masked keys, so any grid works.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, stripe_width: int | None = 7, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        name = type(self).__name__
        self.stripe_width = None if stripe_width is None else checks.check_int(stripe_width, "stripe_width", name)
        if self.stripe_width is not None and num_heads % 2:
            raise ValueError(f"{name}: cross-shaped windows split the heads into two halves, so num_heads must be "
                             f"even, got {num_heads} (or stripe_width=None: every head over the whole map)")
        self.lepe = depthwise_conv(dim, 3)
        self.to(**self.factory_kwargs)

    def attend(self, x, q, k, v, grid, num_prefix):
        if num_prefix:
            raise ValueError("cross-shaped window attention takes no prefix tokens (it is for the hierarchical "
                             f"backbones); got num_prefix={num_prefix}")
        rows, cols = checks.check_image_grid(grid, "cross-shaped window attention")
        weight, bias = self.lepe.weight, self.lepe.bias
        if self.stripe_width is None:
            return stripe_attention(q, k, v, weight, bias, (rows, cols), cols)
        half, channels = self.num_heads // 2, self.dim // 2
        vertical = stripe_attention(q[:, :half], k[:, :half], v[:, :half], weight[:channels], bias[:channels],
                                    (rows, cols), min(self.stripe_width, cols))
        q, k, v = (_transposed(t[:, half:], (rows, cols)) for t in (q, k, v))
        horizontal = stripe_attention(q, k, v, weight[channels:].transpose(-2, -1), bias[channels:], (cols, rows),
                                      min(self.stripe_width, rows))
        return torch.cat([vertical, _transposed(horizontal, (cols, rows))], dim=1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stripe_width={self.stripe_width}"
