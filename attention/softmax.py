"""Dense softmax attention (SDPA): the baseline every figure is compared with."""
from __future__ import annotations

from ..kernels import softmax_attention
from .base import GridAttention
from .registry import register


@register("softmax")
class SoftmaxAttention(GridAttention):
    """softmax(q k^T / sqrt(d)) v over all tokens (Vaswani et al., 2017); the grid only gets checked."""

    def attend(self, x, q, k, v, grid, num_prefix):
        return softmax_attention(q, k, v, backend=self.backend)
