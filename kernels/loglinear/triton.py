"""LLSA in Triton: the hierarchical top-K below the coarsest level (Zhou et al. 2025, Sec. 3.2), one launch per
level instead of the gathers, masks, matrix product and top-K of ``plan.select_blocks``; and the whole
attention (pooling, selection, the core over the tokens in place and the pooled keys as extra key tiles) as
one differentiable op whose backward spreads the pooled keys' gradients over their blocks' tokens directly.

One program per (parent block, batch x head): the pooled queries of the parent's s x s children against
the pooled keys of the candidates (the children of the blocks the parent selected), float32 products, then
K rounds of a row maximum. Same selection as ``select_blocks`` (ties aside: float32 sums in another order).
The warps grow with the candidate tile (one warp per 1,024 of its float32 values, 4 to 16): at four, the
product of 16 pooled queries with 128 candidates (K = 8, d = 64) spills to local memory (sm_90, ptxas).
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..block_sparse.layout import fixed_width_row_ptr
from ..block_sparse.triton import backward as core_backward
from ..block_sparse.triton import forward as core_forward
from ..core.heads_last import heads_last_empty
from ..core.triton_common import launch
from ..core.triton_op import triton_op
from ..softmax import with_prefix_queries
from .block_sparse import key_tile_lists, pooled_key_counts, pooled_key_tiles
from .plan import BlockHierarchy, block_hierarchy
from .triton_pool import pool_into_buffers, spread_pooled_gradients


@triton.jit(do_not_specialize=["n_fine", "n_up", "K_up", "K"])
def _select_children_kernel(PQ, PK, SelUp, Children, Out, n_fine, n_up, K_up, K,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SS: tl.constexpr,
                            BLOCK_UP: tl.constexpr):
    group = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    kids = tl.load(Children + group * SS + tl.arange(0, SS))                          # (SS,), -1: none
    q = tl.load(PQ + (bh * n_fine + kids[:, None]) * HEAD_DIM + cols[None, :],
                mask=(kids[:, None] >= 0) & (cols[None, :] < HEAD_DIM), other=0.0)
    ups = tl.arange(0, BLOCK_UP)
    up = tl.load(SelUp + (bh * n_up + group) * K_up + ups, mask=ups < K_up, other=-1)  # the parent's choices
    cand = tl.load(Children + up[:, None] * SS + tl.arange(0, SS)[None, :], mask=up[:, None] >= 0, other=-1)
    cand = tl.reshape(cand, (BLOCK_UP * SS,))
    k = tl.load(PK + (bh * n_fine + cand[:, None]) * HEAD_DIM + cols[None, :],
                mask=(cand[:, None] >= 0) & (cols[None, :] < HEAD_DIM), other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision="ieee")
    s = tl.where(cand[None, :] >= 0, s, float("-inf"))
    slots = tl.arange(0, BLOCK_UP * SS)
    out = Out + (bh * n_fine + kids) * K
    for j in range(K):
        best = tl.max(s, 1)
        at = tl.argmax(s, 1)
        hit = slots[None, :] == at[:, None]
        pick = tl.sum(tl.where(hit, cand[None, :], 0), 1)
        tl.store(out + j, tl.where(best > float("-inf"), pick, -1), mask=kids >= 0)
        s = tl.where(hit, float("-inf"), s)


def select_children(pooled_q: torch.Tensor, pooled_k: torch.Tensor, selected_up: torch.Tensor,
                    children: torch.Tensor, top_k: int) -> torch.Tensor:
    """(B, h, n_l, K) the top-K key blocks of every level-l query block among the children (``children``
    (n_{l+1}, s*s), -1 none) of the blocks its parent selected (``selected_up`` (B, h, n_{l+1}, K_up), -1
    none), by pooled q . pooled k (float32, (B, h, n_l, d)); -1 where fewer than K candidates exist."""
    b, h, n_fine, d = pooled_q.shape
    n_up, k_up = selected_up.shape[2:]
    ss = children.shape[1]
    out = torch.empty(b, h, n_fine, top_k, dtype=torch.int64, device=pooled_q.device)
    block_d, block_up = max(16, triton.next_power_of_2(d)), triton.next_power_of_2(k_up)
    warps = min(16, max(4, block_up * ss * block_d // 1024))
    launch(_select_children_kernel, (n_up, b * h), pooled_q.contiguous(), pooled_k.contiguous(),
           selected_up.contiguous(), children.contiguous(), out, n_fine, n_up, k_up, top_k,
           HEAD_DIM=d, BLOCK_D=block_d, SS=ss, BLOCK_UP=block_up, num_warps=warps)
    return out


@torch.no_grad()
def select_blocks_triton(pooled_q: Sequence[torch.Tensor], pooled_k: Sequence[torch.Tensor],
                         hierarchy: BlockHierarchy, top_k: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """``plan.select_blocks``' selected blocks of every level (finest first): torch's top-K over every block
    at the coarsest level, ``select_children`` below it."""
    top = hierarchy.num_levels - 1
    scores = pooled_q[top] @ pooled_k[top].transpose(-2, -1)
    selected = [scores.topk(top_k[top], dim=-1).indices]
    for level in range(top - 1, -1, -1):
        selected.insert(0, select_children(pooled_q[level], pooled_k[level], selected[0],
                                           hierarchy.children[level], top_k[level]))
    return tuple(selected)


def _forward(q: Tensor, k: Tensor, v: Tensor, grid: list[int], num_prefix: int, side: int,
             top_k: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The core's output (prefix rows 0) and log-sum-exp, and what the backward reads: the pooled keys and values
    (the core's extra key tiles; the tokens are read in place) and the key-tile lists."""
    grid, levels, t = tuple(grid), len(top_k), side * side
    pooled_keys, pooled_values, pooled = pool_into_buffers(q, k, v, grid, num_prefix, side, levels)
    selected = select_blocks_triton([p[0] for p in pooled], [p[1] for p in pooled],
                                    block_hierarchy(grid, side, levels, q.device), top_k)
    row_ptr, col_idx = key_tile_lists(selected, grid, num_prefix, side)
    _, key_bias, _, _, _, tile_rows = pooled_key_tiles(grid, side, levels, num_prefix, q.device)
    out, lse = core_forward(q, k, v, row_ptr, col_idx, None, None, key_bias, tile_rows, t, t, num_prefix,
                            q.shape[-1] ** -0.5, extra=(pooled_keys, pooled_values))
    return out, lse, pooled_keys, pooled_values, col_idx


def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, pooled_keys: Tensor,
              pooled_values: Tensor, col_idx: Tensor, grid: list[int], num_prefix: int, side: int,
              top_k: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv: the core's backward over the tokens and the pooled keys, then each pooled row's gradient
    spread over its block's tokens (``spread_pooled_gradients``)."""
    grid, levels, t = tuple(grid), len(top_k), side * side
    _, key_bias, _, _, _, tile_rows = pooled_key_tiles(grid, side, levels, num_prefix, q.device)
    _, n1, width = pooled_key_counts(grid, side, tuple(top_k))
    row_ptr = fixed_width_row_ptr(q.shape[0], q.shape[1], n1, width, q.device)
    pooled_grads = (torch.empty_like(pooled_keys), torch.empty_like(pooled_values))
    dq, dk, dv = core_backward(do, q, k, v, out, lse, row_ptr, col_idx, None, None, key_bias, tile_rows, t, t,
                               num_prefix, q.shape[-1] ** -0.5, extra=(pooled_keys, pooled_values),
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
    the buffers; under ``torch.compile`` one custom op); the prefix queries, dense over all keys, by SDPA."""
    out = _loglinear_attention(q, k, v, list(grid), num_prefix, side, list(top_k))
    return with_prefix_queries(out[:, :, num_prefix:], q, k, v, num_prefix)
