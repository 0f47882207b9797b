"""Attention over disjoint key sets, merged from the parts' outputs and log-sum-exps (FlashAttention's combine of
split-KV partial results; Dao 2023): with w_i = exp(lse_i), o = sum_i w_i o_i / sum_i w_i and lse = log sum_i w_i.

The running state is ``out`` (H, N, d) with its base-2 log-sum-exp ``lse`` (H, N) float32, as the block-sparse
core keeps it (its forward's ``resume``); a part ``x`` (G, H, L, d) with its natural log-sum-exp ``x_lse`` (G, H, L)
(as SDPA kernels return it) covers the query rows first_row + g L + t: a run of frames attended as a batch.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ..core.alignment import row_alignment
from ..core.triton_common import LOG2E, cdiv, launch, load_tile, pad_dim, store_tile

BLOCK_ROWS = 64


@triton.jit(do_not_specialize=["first_row", "L", "num_rows"])
def _merge_kernel(O, LSE, X, XLSE, soh, son, slh, sln, sxg, sxh, sxt, sqg, sqh, sqt, first_row, L, num_rows,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROWS: tl.constexpr, INIT: tl.constexpr,
                  ALIGN: tl.constexpr):
    """One block of the part's rows of one head: the state becomes the part (INIT) or the merge of both."""
    h = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    inside = i < num_rows
    g, t = i // L, i % L
    cols = tl.arange(0, BLOCK_D)
    mc = cols < HEAD_DIM
    x = tl.load(tl.multiple_of(X + h * sxh + g * sxg + t * sxt, ALIGN)[:, None] + cols[None, :],
                mask=inside[:, None] & mc[None, :], other=0.0).to(tl.float32)
    x_lse = tl.load(XLSE + h * sqh + g * sqg + t * sqt, mask=inside, other=float("-inf")) * LOG2E
    rows = first_row + i
    if INIT:
        out, lse = x, x_lse
    else:
        cur = load_tile(O + h * soh, rows, cols, son, inside, mc, ALIGN).to(tl.float32)
        cur_lse = tl.load(LSE + h * slh + rows * sln, mask=inside, other=float("-inf"))
        m = tl.maximum(cur_lse, x_lse)
        m = tl.where(m == float("-inf"), 0.0, m)          # no keys on either side: weights 0, not NaN
        wc, wx = tl.math.exp2(cur_lse - m), tl.math.exp2(x_lse - m)
        total = wc + wx
        seen = total > 0.0
        out = (cur * wc[:, None] + x * wx[:, None]) / tl.where(seen, total, 1.0)[:, None]
        lse = tl.where(seen, m + tl.math.log2(tl.where(seen, total, 1.0)), float("-inf"))
    store_tile(O + h * soh, rows, cols, son, inside, mc, out, ALIGN)
    tl.store(LSE + h * slh + rows * sln, lse, mask=inside)


def merge_state(out: Tensor, lse: Tensor, x: Tensor, x_lse: Tensor, first_row: int, init: bool = False) -> None:
    """Merge the part (x, x_lse) into the state (out, lse) in place (``init``: the state becomes the part);
    ``reference.merge_state_reference`` is the ground truth."""
    g, h, length, d = x.shape
    rows = g * length
    launch(_merge_kernel, (cdiv(rows, BLOCK_ROWS), h), out, lse, x, x_lse, out.stride(0), out.stride(1),
           lse.stride(0), lse.stride(1), *x.stride()[:3], *x_lse.stride()[:3], first_row, length, rows,
           HEAD_DIM=d, BLOCK_D=pad_dim(d), BLOCK_ROWS=BLOCK_ROWS, INIT=init, ALIGN=row_alignment(out, x))
