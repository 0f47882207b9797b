"""LLSA's hierarchical top-K below the coarsest level in Triton (Zhou et al. 2025, Sec. 3.2): one launch per
level instead of the gathers, masks, matrix product and top-K of ``plan.select_blocks``.

One program per (parent block, batch x head): the pooled queries of the parent's s x s children against
the pooled keys of the candidates (the children of the blocks the parent selected), float32 products, then
K rounds of a row maximum. Same selection as ``select_blocks`` (ties aside: float32 sums in another order).
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import triton
import triton.language as tl

from ..core.triton_common import launch
from .block_sparse import loglinear_attention_on_core
from .plan import BlockHierarchy


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


def _select_children(pooled_q: torch.Tensor, pooled_k: torch.Tensor, selected_up: torch.Tensor,
                     children: torch.Tensor, top_k: int) -> torch.Tensor:
    b, h, n_fine, d = pooled_q.shape
    n_up, k_up = selected_up.shape[2:]
    ss = children.shape[1]
    out = torch.empty(b, h, n_fine, top_k, dtype=torch.int64, device=pooled_q.device)
    launch(_select_children_kernel, (n_up, b * h), pooled_q.contiguous(), pooled_k.contiguous(),
           selected_up.contiguous(), children.contiguous(), out, n_fine, n_up, k_up, top_k,
           HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), SS=ss, BLOCK_UP=triton.next_power_of_2(k_up))
    return out


@torch.library.custom_op("subquad::loglinear_select_children", mutates_args=())
def _select_children_op(pooled_q: torch.Tensor, pooled_k: torch.Tensor, selected_up: torch.Tensor,
                        children: torch.Tensor, top_k: int) -> torch.Tensor:
    return _select_children(pooled_q, pooled_k, selected_up, children, top_k)


@_select_children_op.register_fake
def _(pooled_q, pooled_k, selected_up, children, top_k):
    return pooled_q.new_empty(*pooled_q.shape[:3], top_k, dtype=torch.int64)


def select_children(pooled_q: torch.Tensor, pooled_k: torch.Tensor, selected_up: torch.Tensor,
                    children: torch.Tensor, top_k: int) -> torch.Tensor:
    """(B, h, n_l, K) the top-K key blocks of every level-l query block among the children (``children``
    (n_{l+1}, s*s), -1 none) of the blocks its parent selected (``selected_up`` (B, h, n_{l+1}, K_up), -1
    none), by pooled q . pooled k (float32, (B, h, n_l, d)); -1 where fewer than K candidates exist."""
    if torch.compiler.is_compiling():
        return _select_children_op(pooled_q, pooled_k, selected_up, children, top_k)
    return _select_children(pooled_q, pooled_k, selected_up, children, top_k)


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


loglinear_attention_on_triton = functools.partial(loglinear_attention_on_core, core_backend="triton",
                                                  select=select_blocks_triton)
