"""Neighborhood attention (NAT, Hassani et al., CVPR 2023; dilated: DiNAT, Hassani & Shi, 2022): each
grid token attends to the k x k window around it, O(N k^2)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..core import checks
from ..core.dispatch import (TRITON, TRITON_DTYPES, choose_backend, dtypes, empty_output, head_dim_at_most,
                             register_backend, triton_device)
from ..core.family import Family, register_family
from .flex import neighborhood_attention_flex
from .natten import neighborhood_attention_natten
from .reference import neighborhood_attention_reference



def check_neighborhood_options(options: Mapping[str, Any], op: str) -> None:
    """``kernel_size``: an odd int >= 1; ``dilation``: an int >= 1 (whether the window fits a grid is
    checked on the grid)."""
    if "kernel_size" in options:
        checks.check_int(options["kernel_size"], "kernel_size", op, odd=True)
    if "dilation" in options:
        checks.check_int(options["dilation"], "dilation", op)


FAMILY = register_family(Family(
    name="neighborhood", aliases=("nat",), title="2D neighborhood attention (dilated)",
    paper="Hassani et al., CVPR 2023 / DiNAT", cost="O(N k²)", op="neighborhood_attention",
    options={"kernel_size": 7, "dilation": 1}, grid_ranks=(2,), training_free=True,
    check=check_neighborhood_options))


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: Sequence[int],
                           kernel_size: int, dilation: int = 1, rpb: torch.Tensor | None = None,
                           num_prefix: int = 0, backend: str | None = None) -> torch.Tensor:
    """Neighborhood attention (NAT Eq. 2-3; DiNAT's dilation).

    Each grid token attends to the ``kernel_size`` x ``kernel_size`` window around it (every
    ``dilation``-th token), shifted inward at borders, plus the prefix tokens; prefix queries attend
    to everything. ``rpb``: None or NAT's relative position bias (heads, 2k-1, 2k-1). Backends:
    ``reference`` (O(N k^2) memory), ``natten`` (the natten package, no rpb), ``flex`` (FlexAttention),
    ``triton`` (fused forward and backward, the default on CUDA).
    """
    grid = checks.check_self_attention(q, k, v, grid, num_prefix, "neighborhood_attention")
    grid = checks.check_image_grid(grid, "neighborhood_attention")
    kernel_size, dilation = checks.check_neighborhood(grid, kernel_size, dilation, "neighborhood_attention")
    checks.check_rpb(rpb, q.shape[1], kernel_size, "neighborhood_attention")
    fn = choose_backend("neighborhood_attention", backend, q, v=v, grid=grid)
    empty = empty_output(q, k, v)
    if empty is not None:
        return empty
    return fn(q, k, v, grid, kernel_size, dilation, rpb, num_prefix)


if TRITON:
    from .triton import neighborhood_attention_triton
    register_backend("neighborhood_attention", "triton", neighborhood_attention_triton,
                     requires=(triton_device(), dtypes(*TRITON_DTYPES), head_dim_at_most(128, same_value_dim=True)))
register_backend("neighborhood_attention", "reference", neighborhood_attention_reference)
register_backend("neighborhood_attention", "natten", neighborhood_attention_natten, auto=False)
register_backend("neighborhood_attention", "flex", neighborhood_attention_flex, auto=False)
