"""``backend="flex"`` for neighborhood attention: torch's FlexAttention with a mask_mod stating the
same neighbourhood (and a score_mod adding the RPB), for comparison. Compiled on CUDA; on CPU it
runs un-compiled (it then forms the full score matrix) and has no backward.
"""
from __future__ import annotations

import functools
import warnings

import torch

from .reference import window_start


@functools.lru_cache(maxsize=32)
def _neighborhood_tables(grid: tuple[int, int], kernel_size: int, dilation: int, num_prefix: int,
                         device: torch.device):
    """Per token of the whole sequence (prefix first): is it a grid token, and per axis its
    dilation group, index in the group, and window start (0 for prefix tokens). Plus the block mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    height, width = grid
    n = num_prefix + height * width
    g = torch.arange(height * width)
    rows = [t[g // width] for t in window_start(height, kernel_size, dilation)]
    cols = [t[g % width] for t in window_start(width, kernel_size, dilation)]
    pad = lambda t: torch.cat([t.new_zeros(num_prefix), t]).to(device)   # noqa: E731
    is_grid = pad(torch.ones(height * width, dtype=torch.bool))
    (r_group, r_idx, r_start), (c_group, c_idx, c_start) = ([pad(t) for t in rows], [pad(t) for t in cols])

    def in_window(group, idx, start, qi, ki):
        return (group[ki] == group[qi]) & (idx[ki] >= start[qi]) & (idx[ki] < start[qi] + kernel_size)

    def mask_mod(b, h, qi, ki):
        near = in_window(r_group, r_idx, r_start, qi, ki) & in_window(c_group, c_idx, c_start, qi, ki)
        return ~is_grid[qi] | ~is_grid[ki] | near

    def rpb_index(qi, ki):
        k = kernel_size
        return ((r_idx[ki] - r_idx[qi]).clamp(-k + 1, k - 1) + k - 1,
                (c_idx[ki] - c_idx[qi]).clamp(-k + 1, k - 1) + k - 1, is_grid[qi] & is_grid[ki])

    return create_block_mask(mask_mod, None, None, n, n, device=device), rpb_index


def neighborhood_attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int],
                                kernel_size: int, dilation: int, rpb: torch.Tensor | None,
                                num_prefix: int) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    block_mask, rpb_index = _neighborhood_tables(grid, kernel_size, dilation, num_prefix, q.device)
    score_mod = None
    if rpb is not None:
        table = rpb.to(q.dtype)

        def score_mod(score, b, h, qi, ki):
            row, col, both_grid = rpb_index(qi, ki)
            return score + torch.where(both_grid, table[h, row, col], 0)

    if q.is_cuda:
        return torch.compile(flex_attention)(q, k, v, score_mod=score_mod, block_mask=block_mask)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*without torch.compile.*")
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
