"""LLSA in Triton: the whole attention (pooling, hierarchical top-K selection and key-tile lists, the core over the
tokens in place with the pooled keys as extra key tiles) as one differentiable op whose backward spreads the
pooled keys' gradients over their blocks' tokens directly (Zhou et al. 2025, Sec. 3). The pooling kernels are
in ``triton_pool``, the selection and lists kernels in ``triton_select``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..block_sparse.layout import fixed_width_row_ptr
from ..block_sparse.triton import backward as core_backward
from ..block_sparse.triton import QueryTiles
from ..block_sparse.triton import forward as core_forward
from ..core.heads_last import heads_last_empty
from ..core.triton_op import triton_op
from .block_sparse import pooled_key_counts, pooled_key_tiles, sibling_group, sibling_query_tiles
from .plan import block_hierarchy
from .triton_pool import pool_into_buffers, spread_pooled_gradients
from .triton_select import key_tile_lists_triton, select_blocks_triton

# the largest head dim whose forward takes query tiles of sibling blocks (compiled for sm_90 without register spills)
SIBLING_HEAD_DIM = 128


def _row_ptr(q: Tensor, grid: tuple[int, int], side: int, top_k: list[int]) -> Tensor:
    """The core's row pointers: every finest block lists as many key tiles."""
    _, n1, width = pooled_key_counts(grid, side, tuple(top_k))
    return fixed_width_row_ptr(q.shape[0], q.shape[1], n1, width, q.device)


def _forward(q: Tensor, k: Tensor, v: Tensor, grid: list[int], num_prefix: int, side: int,
             top_k: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The output (the prefix queries' rows by SDPA, dense over the tokens) and the core's log-sum-exp, and what the
    backward reads: the pooled keys and values (the core's extra key tiles; the tokens are read in place) and the
    key-tile lists."""
    grid, levels, t = tuple(grid), len(top_k), side * side
    pooled_keys, pooled_values, pooled = pool_into_buffers(q, k, v, grid, num_prefix, side, levels)
    selected = select_blocks_triton([p[0] for p in pooled], [p[1] for p in pooled],
                                    block_hierarchy(grid, side, levels, q.device), top_k)
    col_idx = key_tile_lists_triton(selected, grid, num_prefix, side)
    _, key_bias, _, _, _, tile_rows = pooled_key_tiles(grid, side, levels, num_prefix, q.device)
    # query tiles of sibling blocks, their shared pooled tiles read once (up to SIBLING_HEAD_DIM)
    group = sibling_group(side) if q.shape[-1] <= SIBLING_HEAD_DIM else 1
    if group > 1:
        b, h = q.shape[:2]
        query_rows, gather, shared, num_tiles = sibling_query_tiles(grid, side, tuple(top_k), num_prefix, q.device)
        lists = col_idx.view(b * h, -1).index_select(1, gather).view(-1)
        row_ptr = fixed_width_row_ptr(b, h, num_tiles, gather.numel() // num_tiles, q.device)
        query_tiles = QueryTiles(query_rows, shared, group)
    else:
        row_ptr, lists, query_tiles = _row_ptr(q, grid, side, top_k), col_idx, None
    out, lse = core_forward(q, k, v, row_ptr, lists, None, None, key_bias, tile_rows, group * t, t, num_prefix,
                            q.shape[-1] ** -0.5, num_prefix > 0, extra=(pooled_keys, pooled_values),
                            query_tiles=query_tiles)
    return out, lse, pooled_keys, pooled_values, col_idx


def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, pooled_keys: Tensor,
              pooled_values: Tensor, col_idx: Tensor, grid: list[int], num_prefix: int, side: int,
              top_k: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv: the core's backward over the tokens, the pooled keys and the prefix queries, then each pooled
    row's gradient spread over its block's tokens (``spread_pooled_gradients``)."""
    grid, levels, t = tuple(grid), len(top_k), side * side
    _, key_bias, _, _, _, tile_rows = pooled_key_tiles(grid, side, levels, num_prefix, q.device)
    row_ptr = _row_ptr(q, grid, side, top_k)
    pooled_grads = (torch.empty_like(pooled_keys), torch.empty_like(pooled_values))
    dq, dk, dv = core_backward(do, q, k, v, out, lse, row_ptr, col_idx, None, None, key_bias, tile_rows, t, t,
                               num_prefix, q.shape[-1] ** -0.5, num_prefix > 0, extra=(pooled_keys, pooled_values),
                               extra_grads=pooled_grads)
    spread_pooled_gradients(dk, dv, *pooled_grads, grid, num_prefix, side, levels)
    return dq, dk, dv


def _forward_fake(q, k, v, grid, num_prefix, side, top_k):
    b, h, n, _ = q.shape
    pooled, n1, width = pooled_key_counts(tuple(grid), side, tuple(top_k))
    rows = pooled + side * side
    return (heads_last_empty(q, b, h, n, v.shape[-1]), q.new_empty(b, h, n, dtype=torch.float32),
            k.new_empty(b, h, rows, k.shape[-1]), v.new_empty(b, h, rows, v.shape[-1]),
            q.new_empty(b * h * n1 * width, dtype=torch.int32))


def _backward_fake(do, q, k, v, out, lse, pooled_keys, pooled_values, col_idx, grid, num_prefix, side, top_k):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


_loglinear_attention = triton_op("loglinear_attention", _forward, _backward, num_tensors=3,
                                 forward_fake=_forward_fake, backward_fake=_backward_fake,
                                 save=lambda inputs, outputs: (*inputs[:3], *outputs))


def loglinear_attention_on_triton(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int], num_prefix: int, side: int,
                                  top_k: tuple[int, ...]) -> Tensor:
    """LLSA on the Triton core and selection as one op (one autograd node: no graph over the pooling and
    the buffers; under ``torch.compile`` one custom op); the prefix queries, dense over all keys, by SDPA into
    the same output (their gradients in the op's backward: no concatenated copy with autograd)."""
    return _loglinear_attention(q, k, v, list(grid), num_prefix, side, list(top_k))
