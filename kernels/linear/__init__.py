"""Linear attention with kernel feature maps: focused linear attention (FLatten, Han et al., ICCV 2023)
and magnitude-aware linear attention (MALA, Fan et al., ICCV 2025), O(N d^2)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..core import checks
from ..core.dispatch import (TRITON, TRITON_DTYPES, choose_backend, dtypes, empty_output, register_backend,
                             triton_device)
from ..core.family import Family, register_family
from .reference import focused_linear_attention_reference, mala_attention_reference


def check_focused_options(options: Mapping[str, Any], op: str) -> None:
    """``focusing_factor``: a finite number > 0."""
    if "focusing_factor" in options:
        checks.check_float(options["focusing_factor"], "focusing_factor", op, positive=True)


def check_mala_options(options: Mapping[str, Any], op: str) -> None:
    """``rope``: True or False."""
    if "rope" in options:
        checks.check_bool(options["rope"], "rope", op)


FOCUSED_FAMILY = register_family(Family(
    name="focused_linear", aliases=("flatten",), title="focused linear attention", paper="Han et al., ICCV 2023",
    cost="O(N d²)", op="focused_linear_attention", options={"focusing_factor": 3}, check=check_focused_options))
MALA_FAMILY = register_family(Family(
    name="mala", title="magnitude-aware linear attention", paper="Fan et al., ICCV 2025", cost="O(N d²)",
    op="mala_attention", options={"rope": False}, check=check_mala_options))


def focused_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: Sequence[int],
                             focusing_factor: float = 3, scale: torch.Tensor | None = None,
                             num_prefix: int = 0, backend: str | None = None) -> torch.Tensor:
    """Focused linear attention (FLatten, Eq. 3-6), without its DWC term.

    ``scale`` is the learnable s of r = ReLU(x) / softplus(s), shape (heads, head_dim) or
    broadcastable to it; None means no rescaling. The focused map's norms run over the whole token
    (all heads and channels of q[b, :, n, :]), as in the official code; prefix tokens are ordinary tokens.
    Backends: ``reference``, ``triton`` (the default on CUDA).
    """
    grid = checks.check_self_attention(q, k, v, grid, num_prefix, "focused_linear_attention")
    focusing_factor = checks.check_float(focusing_factor, "focusing_factor", "focused_linear_attention",
                                         positive=True)
    if scale is not None and scale.numel() not in (1, q.shape[-1], q.shape[1] * q.shape[-1]):
        raise ValueError(f"scale must have 1, head_dim={q.shape[-1]} or heads*head_dim="
                         f"{q.shape[1] * q.shape[-1]} elements, got shape {tuple(scale.shape)}")
    fn = choose_backend("focused_linear_attention", backend, q, v=v, grid=grid)
    empty = empty_output(q, k, v)
    if empty is not None:
        return empty
    return fn(q, k, v, focusing_factor, scale)


def mala_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: Sequence[int],
                   num_prefix: int = 0, rope: bool = False, backend: str | None = None) -> torch.Tensor:
    """Magnitude-aware linear attention (MALA, Eq. 9-11) with phi = ELU + 1.

    ``rope=True`` applies 2D RoPE to phi(q), phi(k) inside the KV product (MAViT); needs an image grid
    and a head_dim divisible by 4. Backends: ``reference``, ``triton`` (the default on CUDA).
    """
    grid = checks.check_self_attention(q, k, v, grid, num_prefix, "mala_attention")
    rope = checks.check_bool(rope, "rope", "mala_attention")
    if rope:
        grid = checks.check_image_grid(grid, "mala_attention(rope=True)")
        if q.shape[-1] % 4:
            raise ValueError(f"mala_attention(rope=True): 2D RoPE needs head_dim divisible by 4, got {q.shape[-1]}")
    fn = choose_backend("mala_attention", backend, q, v=v, grid=grid)
    empty = empty_output(q, k, v)
    if empty is not None:
        return empty
    return fn(q, k, v, grid if rope else None, num_prefix)


if TRITON:
    from .triton import focused_linear_attention_triton, mala_attention_triton
    register_backend("focused_linear_attention", "triton", focused_linear_attention_triton,
                     requires=(triton_device(), dtypes(*TRITON_DTYPES)))
    register_backend("mala_attention", "triton", mala_attention_triton,
                     requires=(triton_device(), dtypes(*TRITON_DTYPES)))
register_backend("focused_linear_attention", "reference", focused_linear_attention_reference)
register_backend("mala_attention", "reference", mala_attention_reference)
