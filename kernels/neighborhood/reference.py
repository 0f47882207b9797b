"""Neighborhood attention (NAT, Hassani et al., CVPR 2023, Eq. 2-3; dilated: DiNAT, Hassani & Shi,
2022, Sec. 3.1), plain PyTorch with memory O(N k^2).

Each grid token attends to the k x k window around it. Near a border the window shifts inward
instead of being cut, so every token sees exactly k^2 keys. With dilation delta the keys are every
delta-th token: each axis splits into delta interleaved groups (positions congruent mod delta) and
the window is taken within the query's group, shifted inward at that group's borders, as NATTEN
does. The optional relative position bias (NAT's RPB) is B[h, di + k - 1, dj + k - 1] for the key
offset (di, dj) counted in dilated steps.
"""
from __future__ import annotations

import functools

import torch

from ..core.gathered import append_global_keys, attend_gathered, gather_rows, with_global_prefix
from ..core.precision import compute_dtype
from ..softmax import softmax_attention_reference


def window_start(length: int, kernel_size: int, dilation: int):
    """Per position of an axis: its dilation group, its index within the group, and the index
    (within the group) where its window starts, shifted inward at the group's borders. (length,) each."""
    i = torch.arange(length)
    group, index_in_group = i % dilation, i // dilation
    group_len = (length - group + dilation - 1) // dilation
    start = torch.minimum((index_in_group - kernel_size // 2).clamp_min(0), group_len - kernel_size)
    return group, index_in_group, start


def window_1d(length: int, kernel_size: int, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of an axis: the k key positions of its window and their offsets from it in
    dilated steps, in [-(k-1), k-1]. Both (length, k)."""
    group, index_in_group, start = window_start(length, kernel_size, dilation)
    steps = start[:, None] + torch.arange(kernel_size)
    return steps * dilation + group[:, None], steps - index_in_group[:, None]


@functools.lru_cache(maxsize=64)
def neighborhood_index(grid: tuple[int, int], kernel_size: int, dilation: int,
                       device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cached) For each raster grid token: the raster indices of its k*k keys (N, k*k) and the
    RPB row and column index of each key (N, k*k), values in [0, 2k-2]."""
    (rows, row_off), (cols, col_off) = (window_1d(n, kernel_size, dilation) for n in grid)
    h, w, k = grid[0], grid[1], kernel_size
    keys = rows[:, None, :, None] * w + cols[None, :, None, :]                # (H, W, k, k)
    rpb_row = (row_off[:, None, :, None] + k - 1).expand(h, w, k, k)
    rpb_col = (col_off[None, :, None, :] + k - 1).expand(h, w, k, k)
    flat = lambda t: t.reshape(h * w, k * k).contiguous().to(device)         # noqa: E731
    return flat(keys), flat(rpb_row), flat(rpb_col)


def neighborhood_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     grid: tuple[int, int], kernel_size: int, dilation: int,
                                     rpb: torch.Tensor | None, num_prefix: int) -> torch.Tensor:
    """Gather each grid query's k*k neighbours (plus the prefix keys) and attend; prefix queries
    attend densely. q, k, v (B, h, N, d); rpb None or (h, 2k-1, 2k-1). Keys and values are cast to
    ``compute_dtype`` before the gather, so each key's k*k gradient copies are summed in float32."""
    keys_of, rpb_row, rpb_col = neighborhood_index(grid, kernel_size, dilation, q.device)
    dtype = compute_dtype(q)

    def attend_grid(qg, kg, vg, kp, vp):
        kg, vg, kp, vp = (x.to(dtype) for x in (kg, vg, kp, vp))
        keys, values = gather_rows(kg, keys_of), gather_rows(vg, keys_of)      # (B, h, HW, k*k, d)
        bias = torch.zeros(1, 1, *keys_of.shape, device=q.device, dtype=dtype)
        if rpb is not None:
            bias = bias + rpb.to(bias.dtype)[None, :, rpb_row, rpb_col]        # (1, h, HW, k*k)
        keys, values, bias = append_global_keys(keys, values, bias[..., None, :], kp, vp)
        return attend_gathered(qg[:, :, :, None], keys, values, bias).squeeze(3)

    return with_global_prefix(q, k, v, num_prefix, attend_grid, dense=softmax_attention_reference)
