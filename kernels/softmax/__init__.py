"""Dense softmax attention (Vaswani et al., 2017): the baseline every figure is compared with."""
from __future__ import annotations

import torch

from ..core import checks
from ..core.dispatch import choose_backend, register_backend
from ..core.family import Family, register_family
from .reference import (fill_prefix_queries, prefix_attention_sdpa, softmax_attention_reference,
                        softmax_attention_sdpa, with_prefix_queries)

FAMILY = register_family(Family(
    name="softmax", aliases=("sdpa", "dense"), title="dense softmax (SDPA)", paper="the baseline", cost="O(N²)",
    op="softmax_attention", training_free=True))


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      backend: str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v; ``sdpa`` (PyTorch's fused kernel, the default) or the explicit ``reference``."""
    checks.check_qkv(q, k, v, "softmax_attention")
    return choose_backend("softmax_attention", backend, q, v=v)(q, k, v)


register_backend("softmax_attention", "sdpa", softmax_attention_sdpa)
register_backend("softmax_attention", "reference", softmax_attention_reference, auto=False)
