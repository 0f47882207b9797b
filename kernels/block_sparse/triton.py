"""Block-sparse flash attention in Triton, forward and backward (FlashAttention-2, Dao 2023, Alg. 1-2).

The layout (CSR of key tiles per query tile, prefix keys, tile bit masks, key bias) is described in
``kernels.block_sparse.layout``. Forward: one program per (query tile, batch x head) runs the
online softmax over the prefix keys and the listed key tiles and saves the log-sum-exp. Backward:
delta = rowsum(dO * O); dK, dV per key tile over the query tiles that list it (the transposed CSR and
its work list, built on the device: ``transpose_triton``); dK, dV of prefix keys per chunk of query tiles, summed after; dQ
per query tile over its keys. Scores live in the log2 domain (exp2) with float32 accumulation.

Small tiles are stepped through several at a time: a step of the forward and of dQ takes the keys of
``STEP_ROWS // block_n`` listed key tiles, one of dK/dV the queries of ``STEP_ROWS // block_m`` query tiles
(LLSA's 16-token tiles: 64 keys per step, as the official kernels gather four selected blocks), so that
each step's products are large enough for the tensor cores and the loop runs a quarter as often. Layouts
with tile masks step one tile at a time.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..core.alignment import row_alignment
from ..core.triton_common import (LOG2E, delta_kernel, dkdv_step, dq_step, launch,
                                  load_block, load_row_stats, pad_dim, row_ptrs, rows_contiguous, scores,
                                  softmax_finish, softmax_step, store_block, strides, transposed_scores)
from ..core.heads_last import heads_last_empty
from ..core.triton_op import triton_op
from ..softmax import fill_prefix_queries
from ..softmax.prefix_triton import add_prefix_queries_gradients_triton
from .layout import num_tiles
from .transpose_triton import transposed_work

PREFIX_CHUNK = 16       # query tiles per program in the prefix keys' dK/dV (partial sums, added with torch)
KEY_CHUNK = 32          # loop steps per program in a key tile's dK/dV (more: the tile is split, ``KeyTileWork``)
STEP_ROWS = 64          # rows of the tiles taken per loop step (one tile at least)
GROUP_STEP_ROWS = 32    # keys per row group of a step over the row groups' own tiles (``QueryTiles``; 64 spill)
GROUP_MMA_ROWS = tl.constexpr(64)    # row groups this high take their own tiles masked, not batched


@triton.jit
def _mask_scores(s, KeyBias, TileMasks, keys, key_limit, mask_id,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_WORDS: tl.constexpr, MASK_BITS: tl.constexpr,
                 HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, CHECK_K: tl.constexpr,
                 TRANSPOSED: tl.constexpr):
    """Add the key bias and set -inf where a key is absent or masked; s is (M, N), or (N, M) if TRANSPOSED; or a
    batch (G, M, N) of scores with keys (G, N) (tile masks: unbatched only)."""
    if HAS_BIAS:
        bias = tl.load(KeyBias + keys, mask=keys < key_limit, other=0.0) * LOG2E
        if TRANSPOSED:
            s += bias[:, None]
        else:
            s += tl.expand_dims(bias, -2)
    if CHECK_K:
        if TRANSPOSED:
            s = tl.where(keys[:, None] < key_limit, s, float("-inf"))
        else:
            s = tl.where(tl.expand_dims(keys, -2) < key_limit, s, float("-inf"))
    if HAS_MASK:
        if mask_id >= 0:
            # expand (BLOCK_M, words) words to (BLOCK_M, BLOCK_N) bits in registers: far fewer live
            # registers than a gather of one word per score
            rows = tl.arange(0, BLOCK_M)
            words = tl.load(TileMasks + mask_id * (BLOCK_M * MASK_WORDS) + rows[:, None] * MASK_WORDS
                            + tl.arange(0, MASK_WORDS)[None, :])
            bits = (words[:, :, None] >> tl.arange(0, MASK_BITS)[None, None, :]) & 1
            keep = tl.reshape(bits, (BLOCK_M, BLOCK_N)) != 0
            if TRANSPOSED:
                keep = tl.trans(keep)
            s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def _tile_rows(TileRows, tile, offset, BLOCK: tl.constexpr, TABLE: tl.constexpr):
    """Token rows of a tile: read from the table (tokens in place, e.g. a 2D tile of a raster grid; a
    padding slot holds N) or the tile's consecutive rows after ``offset``."""
    slots = tile * BLOCK + tl.arange(0, BLOCK)
    if TABLE:
        return tl.load(TileRows + slots)
    return offset + slots


@triton.jit
def _key_rows(TileRows, tile, P, Nq, Nk, num_table_tiles, BLOCK_N: tl.constexpr, TABLE: tl.constexpr):
    """Key rows of a key tile: consecutive rows after the P prefix keys; with a table, the table's rows for
    its tiles (a padding slot, which holds Nq, becomes Nk: no key), then extra tiles of consecutive rows
    from Nq on (keys past the tokens, e.g. LLSA's pooled ones)."""
    slots = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    if TABLE:
        table_slots = num_table_tiles * BLOCK_N
        rows = tl.load(TileRows + slots, mask=slots < table_slots, other=0)
        rows = tl.where(rows < Nq, rows, Nk)
        return tl.where(tile < num_table_tiles, rows, Nq + slots - table_slots)
    return P + slots


@triton.jit
def _row_ptrs(X, XE, rows, Nq, sxn, sen, EXTRA: tl.constexpr, ALIGN: tl.constexpr):
    """Pointers to the rows of the keys (values, or their gradients): with ``EXTRA`` the rows from Nq on (extra key
    tiles) are rows of a second tensor XE, else all rows are X's; ALIGN bytes aligned (``row_ptrs``: a choice
    between two pointers also hides the alignment from Triton)."""
    if EXTRA:
        ptrs = tl.where(rows < Nq, X + rows * sxn, XE + (rows - Nq) * sen)
        if len(rows.shape) == 2:
            ptrs = tl.multiple_of(ptrs, (ALIGN, ALIGN))
        else:
            ptrs = tl.multiple_of(ptrs, ALIGN)
        return ptrs
    return row_ptrs(X, rows, sxn, ALIGN)


@triton.jit
def _step_key_rows(TileRows, ColIdx, e, hi, P, Nq, Nk, num_table_tiles, BLOCK_N: tl.constexpr,
                   TILES: tl.constexpr, TABLE: tl.constexpr):
    """Key rows (TILES * BLOCK_N,) of the key tiles of CSR entries e .. e + TILES - 1; entries from ``hi`` on
    and negative ones (padding of a row group's own entries, ``QueryTiles``) are absent (row Nk: no key). With e
    and hi (G, 1), the (G, TILES * BLOCK_N) rows of G such runs."""
    entries = e + tl.arange(0, TILES)
    tiles = tl.load(ColIdx + entries, mask=entries < hi, other=-1)
    listed = tiles >= 0
    rows = _key_rows(TileRows, tl.expand_dims(tl.maximum(tiles, 0), -1), P, Nq, Nk, num_table_tiles, BLOCK_N,
                     TABLE)
    rows = tl.where(tl.expand_dims(listed, -1), rows, Nk)
    if len(rows.shape) == 3:
        rows = tl.reshape(rows, (rows.shape[0], TILES * BLOCK_N))
    else:
        rows = tl.reshape(rows, (TILES * BLOCK_N,))
    return rows


@triton.jit
def _step_query_rows(TileRows, RowIdx, e, hi, Nq, BLOCK_M: tl.constexpr, TILES: tl.constexpr,
                     TABLE: tl.constexpr, LISTED: tl.constexpr):
    """Query rows (TILES * BLOCK_M,) of the query tiles of transposed-CSR entries e .. e + TILES - 1
    (``LISTED``; else the tiles e .. e + TILES - 1 themselves); from ``hi`` on absent (row Nq: no query)."""
    g = tl.arange(0, TILES)
    listed = e + g < hi
    if LISTED:
        tiles = tl.load(RowIdx + e + g, mask=listed, other=0)
    else:
        tiles = tl.where(listed, e + g, 0)
    rows = _tile_rows(TileRows, tiles[:, None], 0, BLOCK_M, TABLE)
    return tl.reshape(tl.where(listed[:, None], rows, Nq), (TILES * BLOCK_M,))


@triton.jit
def _key_block_scores(q, K, V, KX, VX, KeyBias, TileMasks, keys, key_limit, mask_id, skn, svn, sxkn, sxvn, Nq,
                      qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, MASK_WORDS: tl.constexpr, MASK_BITS: tl.constexpr, HAS_MASK: tl.constexpr,
                      HAS_BIAS: tl.constexpr, CHECK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, EXTRA: tl.constexpr,
                      ALIGN: tl.constexpr):
    """The masked log2-domain scores (M, N) of queries q (M, d) and the keys of rows ``keys`` (N,), and the keys
    and values read; or of a batch, q (G, M, d) and keys (G, N) to scores (G, M, N) (``_own_tiles_step``)."""
    cols = tl.arange(0, BLOCK_D)
    k = load_block(tl.expand_dims(_row_ptrs(K, KX, keys, Nq, skn, sxkn, EXTRA, ALIGN), -1) + cols, keys, key_limit,
                   cols, HEAD_DIM, BLOCK_D, CHECK_K)
    v = load_block(tl.expand_dims(_row_ptrs(V, VX, keys, Nq, svn, sxvn, EXTRA, ALIGN), -1) + cols, keys, key_limit,
                   cols, HEAD_DIM, BLOCK_D, CHECK_K)
    s = scores(q, k, DOT_PRECISION) * qk_scale
    s = _mask_scores(s, KeyBias, TileMasks, keys, key_limit, mask_id, BLOCK_M, BLOCK_N, MASK_WORDS, MASK_BITS,
                     HAS_MASK, HAS_BIAS, CHECK_K, False)
    return s, k, v


@triton.jit
def _own_tiles_step(acc, m_i, l_i, q, K, V, KX, VX, KeyBias, TileRows, ColIdx, first, own, P, Nq, Nk,
                    num_table_tiles, skn, svn, sxkn, sxvn, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    TABLE: tl.constexpr, EXTRA: tl.constexpr, ALIGN: tl.constexpr, OWN_TILES: tl.constexpr,
                    ROW_GROUPS: tl.constexpr):
    """The entries each row group of a query tile sees alone (``QueryTiles``): ``own`` per group, group after group
    from entry ``first`` on, OWN_TILES per step. Groups of fewer rows than a tensor-core tile (LLSA's 16-row
    blocks): OWN_TILES of every group per step as one batched product of each group's rows and keys, so that no
    score of another group's keys is computed. Larger groups (radial attention's 64-row tiles, where the batched
    product spills): each group's entries in turn against all rows, the other groups' rows masked. acc, m_i, l_i
    as the kernel's."""
    rows_per_group: tl.constexpr = BLOCK_M // ROW_GROUPS
    if rows_per_group >= GROUP_MMA_ROWS:
        group = tl.arange(0, BLOCK_M) // rows_per_group
        for j in tl.static_range(ROW_GROUPS):
            for e in range(first + j * own, first + (j + 1) * own, OWN_TILES):
                keys = _step_key_rows(TileRows, ColIdx, e, first + (j + 1) * own, P, Nq, Nk, num_table_tiles, BLOCK_N,
                                      OWN_TILES, TABLE)
                s, _, v = _key_block_scores(q, K, V, KX, VX, KeyBias, KeyBias, keys, Nk, -1, skn, svn, sxkn, sxvn,
                                            Nq, qk_scale, HEAD_DIM, BLOCK_M, OWN_TILES * BLOCK_N, BLOCK_D, 1, 1,
                                            False, HAS_BIAS, True, DOT_PRECISION, EXTRA, ALIGN)
                s = tl.where(group[:, None] == j, s, float("-inf"))
                acc, m_i, l_i = softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION)
    else:
        qg = tl.reshape(q, (ROW_GROUPS, rows_per_group, BLOCK_D))
        acc = tl.reshape(acc, (ROW_GROUPS, rows_per_group, BLOCK_D))
        m_i = tl.reshape(m_i, (ROW_GROUPS, rows_per_group))
        l_i = tl.reshape(l_i, (ROW_GROUPS, rows_per_group))
        starts = first + tl.arange(0, ROW_GROUPS)[:, None] * own
        for t in range(0, own, OWN_TILES):
            keys = _step_key_rows(TileRows, ColIdx, starts + t, starts + own, P, Nq, Nk, num_table_tiles, BLOCK_N,
                                  OWN_TILES, TABLE)
            s, _, v = _key_block_scores(qg, K, V, KX, VX, KeyBias, KeyBias, keys, Nk, -1, skn, svn, sxkn, sxvn, Nq,
                                        qk_scale, HEAD_DIM, rows_per_group, OWN_TILES * BLOCK_N, BLOCK_D, 1, 1, False,
                                        HAS_BIAS, True, DOT_PRECISION, EXTRA, ALIGN)
            acc, m_i, l_i = softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION)
        acc = tl.reshape(acc, (BLOCK_M, BLOCK_D))
        m_i = tl.reshape(m_i, (BLOCK_M,))
        l_i = tl.reshape(l_i, (BLOCK_M,))
    return acc, m_i, l_i


@triton.jit
def _fwd_step(acc, m_i, l_i, q, K, V, KX, VX, KeyBias, TileMasks, keys, key_limit, mask_id, skn, svn, sxkn,
              sxvn, Nq, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, MASK_WORDS: tl.constexpr, MASK_BITS: tl.constexpr, HAS_MASK: tl.constexpr,
              HAS_BIAS: tl.constexpr, CHECK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, EXTRA: tl.constexpr,
              ALIGN: tl.constexpr):
    s, _, v = _key_block_scores(q, K, V, KX, VX, KeyBias, TileMasks, keys, key_limit, mask_id, skn, svn, sxkn, sxvn,
                                Nq, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, MASK_WORDS, MASK_BITS, HAS_MASK,
                                HAS_BIAS, CHECK_K, DOT_PRECISION, EXTRA, ALIGN)
    return softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION)


@triton.jit(do_not_specialize=["H", "Nq", "Nk", "P", "num_table_tiles", "num_shared"])
def _fwd_kernel(Q, K, V, KX, VX, O, LSE, RowPtr, ColIdx, MaskIdx, TileMasks, KeyBias, TileRows, QueryRows,
                Spans, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sxkb, sxkh, sxkn, sxvb, sxvh, sxvn, sob, soh, son,
                srb, srh, sbb, sbh, H, Nq, Nk, P, num_table_tiles, num_shared, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                MASK_WORDS: tl.constexpr, MASK_BITS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                CHECK_Q: tl.constexpr, CHECK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, TABLE: tl.constexpr,
                EXTRA: tl.constexpr, ALIGN: tl.constexpr, KEY_TILES: tl.constexpr, ROW_GROUPS: tl.constexpr,
                OWN_TILES: tl.constexpr, NUM_SPANS: tl.constexpr):
    """NUM_SPANS > 0: each query tile also attends NUM_SPANS ranges of consecutive key rows, Spans (query tiles,
    NUM_SPANS, 2) int32 [start, end) (dense blocks of the mask, read without a table, e.g. whole frames).
    ROW_GROUPS > 1 (``QueryTiles``): the first ``num_shared`` entries of a list are seen by all rows, the rest by
    one row group each, OWN_TILES of each group's per step (``_own_tiles_step``)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = _tile_rows(QueryRows, tile, 0, BLOCK_M, TABLE)
    cols = tl.arange(0, BLOCK_D)
    q = load_block(row_ptrs(Q + b * sqb + h * sqh, rows, sqn, ALIGN)[:, None] + cols[None, :], rows, Nq, cols,
                    HEAD_DIM, BLOCK_D, CHECK_Q)
    K += b * skb + h * skh
    V += b * svb + h * svh
    KX += b * sxkb + h * sxkh
    VX += b * sxvb + h * sxvh
    KeyBias += b * sbb + h * sbh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for span in tl.static_range(NUM_SPANS + 1):         # the prefix keys [0, P), then the spans
        if span == 0:
            first, end = 0, P
        else:
            first = tl.load(Spans + (tile * NUM_SPANS + span - 1) * 2)
            end = tl.load(Spans + (tile * NUM_SPANS + span - 1) * 2 + 1)
        for start in range(first, end, KEY_TILES * BLOCK_N):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K, V, KX, VX, KeyBias, TileMasks,
                                      start + tl.arange(0, KEY_TILES * BLOCK_N), end, -1, skn, svn, sxkn, sxvn,
                                      Nq, qk_scale, HEAD_DIM, BLOCK_M, KEY_TILES * BLOCK_N, BLOCK_D, MASK_WORDS,
                                      MASK_BITS, False, HAS_BIAS, True, DOT_PRECISION, EXTRA, ALIGN)
    row = RowPtr + b * srb + h * srh + tile
    lo = tl.load(row)
    hi = tl.load(row + 1)
    shared_end = hi
    if ROW_GROUPS > 1:
        shared_end = lo + num_shared
    for e in range(lo, shared_end, KEY_TILES):
        keys = _step_key_rows(TileRows, ColIdx, e, shared_end, P, Nq, Nk, num_table_tiles, BLOCK_N, KEY_TILES,
                              TABLE)
        mask_id = -1
        if HAS_MASK:
            mask_id = tl.load(MaskIdx + e)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K, V, KX, VX, KeyBias, TileMasks, keys, Nk, mask_id, skn,
                                  svn, sxkn, sxvn, Nq, qk_scale, HEAD_DIM, BLOCK_M, KEY_TILES * BLOCK_N, BLOCK_D,
                                  MASK_WORDS, MASK_BITS, HAS_MASK, HAS_BIAS, CHECK_K, DOT_PRECISION, EXTRA, ALIGN)
    if ROW_GROUPS > 1:
        acc, m_i, l_i = _own_tiles_step(acc, m_i, l_i, q, K, V, KX, VX, KeyBias, TileRows, ColIdx, shared_end,
                                        (hi - shared_end) // ROW_GROUPS, P, Nq, Nk, num_table_tiles, skn, svn, sxkn,
                                        sxvn, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, HAS_BIAS, DOT_PRECISION,
                                        TABLE, EXTRA, ALIGN, OWN_TILES, ROW_GROUPS)
    out, lse = softmax_finish(acc, m_i, l_i)
    store_block(row_ptrs(O + b * sob + h * soh, rows, son, ALIGN)[:, None] + cols[None, :],
                out.to(O.dtype.element_ty), rows, Nq, cols, HEAD_DIM, BLOCK_D, CHECK_Q)
    if CHECK_Q:
        tl.store(LSE + bh * Nq + rows, lse, mask=rows < Nq)
    else:
        tl.store(LSE + bh * Nq + rows, lse)


@triton.jit(do_not_specialize=["H", "Hq", "Nq", "Nk", "P", "num_q_tiles", "num_chunks", "num_hot"])
def _bwd_kv_kernel(Q, K, V, KX, VX, DO, DK, DV, DKX, DVX, LSE, Delta, Work, RowIdx, MaskIdx, TileMasks, KeyBias,
                   TileRows, Hot, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sxkb, sxkh, sxkn, sxvb, sxvh, sxvn,
                   sdb, sdh, sdn, skgb, skgh, skgn, svgb, svgh, svgn, sxkgb, sxkgh, sxkgn, sxvgb, sxvgh, sxvgn, sbb, sbh,
                   H, Hq, Nq, Nk, P, num_q_tiles, num_chunks, num_hot, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   MASK_WORDS: tl.constexpr, MASK_BITS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                   CHECK_Q: tl.constexpr, CHECK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   TABLE: tl.constexpr, PREFIX: tl.constexpr, CHUNK: tl.constexpr, QUERY_TILES: tl.constexpr,
                   EXTRA: tl.constexpr, ALIGN: tl.constexpr):
    """dK, dV of one work item of ``KeyTileWork`` (a hot tile's chunk adds its float32 partial sums into its
    slot of ``Hot``), for each (b, h) the item's CSR row stands for (program axis 1: all of them, or one when
    the CSR is per batch and head); PREFIX: of one prefix block over one chunk of query tiles (float32
    partials), program axis 1 = b * H + h."""
    program = tl.program_id(0)
    if PREFIX:
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        chunk = program % num_chunks
        keys = (program // num_chunks) * BLOCK_N + tl.arange(0, BLOCK_N)
        key_limit = P
        lo = chunk * CHUNK
        hi = tl.minimum(lo + CHUNK, num_q_tiles)
    else:
        item = Work + program * 5
        row = tl.load(item)
        if row < 0:     # an idle program (the work list's bound exceeds its items)
            return
        b, h = _batch_head(row, Hq, H)
        bh = b * H + h
        tile = tl.load(item + 1)
        lo = tl.load(item + 2)
        hi = tl.load(item + 3)
        hot_slot = tl.load(item + 4)
        keys = _key_rows(TileRows, tile, P, Nq, Nk, num_q_tiles, BLOCK_N, TABLE)
        key_limit = Nk
    cols = tl.arange(0, BLOCK_D)
    k_rows = _row_ptrs(K + b * skb + h * skh, KX + b * sxkb + h * sxkh, keys, Nq, skn, sxkn, EXTRA, ALIGN)
    v_rows = _row_ptrs(V + b * svb + h * svh, VX + b * sxvb + h * sxvh, keys, Nq, svn, sxvn, EXTRA, ALIGN)
    k = load_block(k_rows[:, None] + cols[None, :], keys, key_limit, cols, HEAD_DIM, BLOCK_D, CHECK_K)
    v = load_block(v_rows[:, None] + cols[None, :], keys, key_limit, cols, HEAD_DIM, BLOCK_D, CHECK_K)
    Q += b * sqb + h * sqh
    DO += b * sdb + h * sdh
    LSE += bh * Nq
    Delta += bh * Nq
    KeyBias += b * sbb + h * sbh
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for e in range(lo, hi, QUERY_TILES):
        mask_id = -1
        if HAS_MASK:
            mask_id = tl.load(MaskIdx + e)
        rows = _step_query_rows(TileRows, RowIdx, e, hi, Nq, BLOCK_M, QUERY_TILES, TABLE, not PREFIX)
        q = load_block(row_ptrs(Q, rows, sqn, ALIGN)[:, None] + cols[None, :], rows, Nq, cols, HEAD_DIM, BLOCK_D,
                       CHECK_Q)
        do = load_block(row_ptrs(DO, rows, sdn, ALIGN)[:, None] + cols[None, :], rows, Nq, cols, HEAD_DIM, BLOCK_D,
                        CHECK_Q)
        lse, delta = load_row_stats(LSE, Delta, rows, rows < Nq)
        s_t = transposed_scores(k, q, DOT_PRECISION) * qk_scale
        s_t = _mask_scores(s_t, KeyBias, TileMasks, keys, key_limit, mask_id, QUERY_TILES * BLOCK_M, BLOCK_N,
                           MASK_WORDS, MASK_BITS, HAS_MASK, HAS_BIAS, CHECK_K, True)
        dk, dv, _ = dkdv_step(dk, dv, s_t, lse, delta, q, do, v, DOT_PRECISION)
    dk *= sm_scale
    if PREFIX:
        # partials (num_chunks, B*H, prefix blocks * BLOCK_N, BLOCK_D): always in bounds
        out_rows = ((chunk * tl.num_programs(1) + bh) * (tl.num_programs(0) // num_chunks) * BLOCK_N
                    + keys)
        tl.store(DK + out_rows[:, None] * BLOCK_D + cols[None, :], dk)
        tl.store(DV + out_rows[:, None] * BLOCK_D + cols[None, :], dv)
    elif hot_slot >= 0:
        # Hot (2, num_hot, programs on axis 1, BLOCK_N, BLOCK_D) float32, zeroed: a tile's chunks add up here
        out_rows = (hot_slot * tl.num_programs(1) + tl.program_id(1)) * BLOCK_N + tl.arange(0, BLOCK_N)
        slab = tl.num_programs(1) * num_hot * BLOCK_N * BLOCK_D
        tl.atomic_add(Hot + out_rows[:, None] * BLOCK_D + cols[None, :], dk)
        tl.atomic_add(Hot + slab + out_rows[:, None] * BLOCK_D + cols[None, :], dv)
    else:
        dk_rows = _row_ptrs(DK + b * skgb + h * skgh, DKX + b * sxkgb + h * sxkgh, keys, Nq, skgn, sxkgn, EXTRA,
                            ALIGN)
        dv_rows = _row_ptrs(DV + b * svgb + h * svgh, DVX + b * sxvgb + h * sxvgh, keys, Nq, svgn, sxvgn, EXTRA,
                            ALIGN)
        store_block(dk_rows[:, None] + cols[None, :], dk.to(DK.dtype.element_ty), keys, key_limit, cols, HEAD_DIM,
                    BLOCK_D, CHECK_K)
        store_block(dv_rows[:, None] + cols[None, :], dv.to(DV.dtype.element_ty), keys, key_limit, cols, HEAD_DIM,
                    BLOCK_D, CHECK_K)


@triton.jit
def _batch_head(row, Hq, H):
    """(b, h) of work for CSR row ``row`` = b_q * Hq + h_q on program axis 1: a per-(b, h) CSR has one program
    there (b, h = b_q, h_q); a broadcast one has one per batch and/or head it stands for."""
    heads_per_row = H // Hq
    j = tl.program_id(1)
    return (row // Hq + j // heads_per_row).to(tl.int64), (row % Hq + j % heads_per_row).to(tl.int64)


@triton.jit
def _hot_tiles_kernel(Hot, HotTiles, DK, DV, DKX, DVX, TileRows, skgb, skgh, skgn, svgb, svgh, svgn,
                      sxkgb, sxkgh, sxkgn, sxvgb, sxvgh, sxvgn, H, Hq, Nq, Nk, P, num_table_tiles,
                      HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_K: tl.constexpr,
                      TABLE: tl.constexpr, EXTRA: tl.constexpr, ALIGN: tl.constexpr):
    """dK, dV of each hot key tile from its summed float32 partials, in the gradients' dtype."""
    slot = tl.program_id(0)
    row = tl.load(HotTiles + slot * 2)
    if row < 0:
        return
    b, h = _batch_head(row, Hq, H)
    keys = _key_rows(TileRows, tl.load(HotTiles + slot * 2 + 1), P, Nq, Nk, num_table_tiles, BLOCK_N, TABLE)
    cols = tl.arange(0, BLOCK_D)
    rows = (slot * tl.num_programs(1) + tl.program_id(1)) * BLOCK_N + tl.arange(0, BLOCK_N)
    slab = tl.num_programs(0) * tl.num_programs(1) * BLOCK_N * BLOCK_D
    dk = tl.load(Hot + rows[:, None] * BLOCK_D + cols[None, :])
    dv = tl.load(Hot + slab + rows[:, None] * BLOCK_D + cols[None, :])
    dk_rows = _row_ptrs(DK + b * skgb + h * skgh, DKX + b * sxkgb + h * sxkgh, keys, Nq, skgn, sxkgn, EXTRA, ALIGN)
    dv_rows = _row_ptrs(DV + b * svgb + h * svgh, DVX + b * sxvgb + h * sxvgh, keys, Nq, svgn, sxvgn, EXTRA, ALIGN)
    store_block(dk_rows[:, None] + cols[None, :], dk.to(DK.dtype.element_ty), keys, Nk, cols, HEAD_DIM, BLOCK_D,
                CHECK_K)
    store_block(dv_rows[:, None] + cols[None, :], dv.to(DV.dtype.element_ty), keys, Nk, cols, HEAD_DIM, BLOCK_D,
                CHECK_K)


@triton.jit
def _bwd_q_step(dq, q, do, lse, delta, K, V, KX, VX, KeyBias, TileMasks, keys, key_limit, mask_id, skn, svn, sxkn,
                sxvn, Nq, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, MASK_WORDS: tl.constexpr, MASK_BITS: tl.constexpr, HAS_MASK: tl.constexpr,
                HAS_BIAS: tl.constexpr, CHECK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, EXTRA: tl.constexpr,
                ALIGN: tl.constexpr):
    s, k, v = _key_block_scores(q, K, V, KX, VX, KeyBias, TileMasks, keys, key_limit, mask_id, skn, svn, sxkn, sxvn,
                                Nq, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, MASK_WORDS, MASK_BITS, HAS_MASK,
                                HAS_BIAS, CHECK_K, DOT_PRECISION, EXTRA, ALIGN)
    return dq_step(dq, s, lse, delta, do, k, v, DOT_PRECISION)[0]


@triton.jit(do_not_specialize=["H", "Nq", "Nk", "P", "num_table_tiles"])
def _bwd_q_kernel(Q, K, V, KX, VX, DO, DQ, LSE, Delta, RowPtr, ColIdx, MaskIdx, TileMasks, KeyBias, TileRows,
                  sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sxkb, sxkh, sxkn, sxvb, sxvh, sxvn, sdb, sdh, sdn,
                  sgb, sgh, sgn, srb, srh, sbb, sbh,
                  H, Nq, Nk, P, num_table_tiles, qk_scale, sm_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  MASK_WORDS: tl.constexpr, MASK_BITS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                  CHECK_Q: tl.constexpr, CHECK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  TABLE: tl.constexpr, EXTRA: tl.constexpr, ALIGN: tl.constexpr, KEY_TILES: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = _tile_rows(TileRows, tile, 0, BLOCK_M, TABLE)
    cols = tl.arange(0, BLOCK_D)
    q = load_block(row_ptrs(Q + b * sqb + h * sqh, rows, sqn, ALIGN)[:, None] + cols[None, :], rows, Nq, cols,
                    HEAD_DIM, BLOCK_D, CHECK_Q)
    do = load_block(row_ptrs(DO + b * sdb + h * sdh, rows, sdn, ALIGN)[:, None] + cols[None, :], rows, Nq, cols,
                     HEAD_DIM, BLOCK_D, CHECK_Q)
    lse, delta = load_row_stats(LSE + bh * Nq, Delta + bh * Nq, rows, rows < Nq)
    K += b * skb + h * skh
    V += b * svb + h * svh
    KX += b * sxkb + h * sxkh
    VX += b * sxvb + h * sxvh
    KeyBias += b * sbb + h * sbh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, P, KEY_TILES * BLOCK_N):
        dq = _bwd_q_step(dq, q, do, lse, delta, K, V, KX, VX, KeyBias, TileMasks,
                         start + tl.arange(0, KEY_TILES * BLOCK_N), P, -1, skn, svn, sxkn, sxvn, Nq, qk_scale,
                         HEAD_DIM, BLOCK_M, KEY_TILES * BLOCK_N, BLOCK_D, MASK_WORDS, MASK_BITS, False, HAS_BIAS, True,
                         DOT_PRECISION, EXTRA, ALIGN)
    row = RowPtr + b * srb + h * srh + tile
    lo = tl.load(row)
    hi = tl.load(row + 1)
    for e in range(lo, hi, KEY_TILES):
        keys = _step_key_rows(TileRows, ColIdx, e, hi, P, Nq, Nk, num_table_tiles, BLOCK_N, KEY_TILES, TABLE)
        mask_id = -1
        if HAS_MASK:
            mask_id = tl.load(MaskIdx + e)
        dq = _bwd_q_step(dq, q, do, lse, delta, K, V, KX, VX, KeyBias, TileMasks, keys, Nk, mask_id, skn, svn, sxkn,
                         sxvn, Nq, qk_scale, HEAD_DIM, BLOCK_M, KEY_TILES * BLOCK_N, BLOCK_D, MASK_WORDS, MASK_BITS,
                         HAS_MASK, HAS_BIAS, CHECK_K, DOT_PRECISION, EXTRA, ALIGN)
    dq *= sm_scale
    store_block(row_ptrs(DQ + b * sgb + h * sgh, rows, sgn, ALIGN)[:, None] + cols[None, :],
                dq.to(DQ.dtype.element_ty), rows, Nq, cols, HEAD_DIM, BLOCK_D, CHECK_Q)


# --- launch ------------------------------------------------------------------------------------

# (kind, block_m, block_n, padded head dim, bytes per element) -> the fastest launch config of the sweep of
# ``python -m subquad.tasks.bench.block_sparse --sweep`` (bf16; head dim 64: 32k tokens, 4 heads, 25% of the
# tiles; head dim 128: FLUX/Wan-sized calls, 16k tokens, 24 heads, 15% of the tiles); other shapes use
# ``launch_config``'s rule.
TUNED_CONFIGS: dict[tuple, dict] = {
    ("fwd", 128, 64, 64, 2): {"num_warps": 8, "num_stages": 4},
    ("bwd_kv", 128, 64, 64, 2): {"num_warps": 4, "num_stages": 2},
    ("bwd_q", 128, 64, 64, 2): {"num_warps": 4, "num_stages": 3},
    ("fwd", 64, 64, 64, 2): {"num_warps": 4, "num_stages": 3},
    ("bwd_kv", 64, 64, 64, 2): {"num_warps": 4, "num_stages": 2},
    ("bwd_q", 64, 64, 64, 2): {"num_warps": 4, "num_stages": 2},
    ("fwd", 128, 128, 64, 2): {"num_warps": 4, "num_stages": 3},
    ("bwd_kv", 128, 128, 64, 2): {"num_warps": 8, "num_stages": 2},
    ("bwd_q", 128, 128, 64, 2): {"num_warps": 8, "num_stages": 2},
    ("fwd", 64, 64, 128, 2): {"num_warps": 4, "num_stages": 3},
    ("bwd_kv", 64, 64, 128, 2): {"num_warps": 4, "num_stages": 2},
    ("bwd_q", 64, 64, 128, 2): {"num_warps": 4, "num_stages": 2},
    ("fwd", 128, 128, 128, 2): {"num_warps": 8, "num_stages": 3},
    ("fwd", 128, 64, 128, 2): {"num_warps": 4, "num_stages": 2},
    ("fwd_grouped", 64, 64, 64, 2): {"num_warps": 4, "num_stages": 2},      # LLSA's sibling blocks; 3 stages spill
    ("fwd_grouped", 64, 64, 128, 2): {"num_warps": 8, "num_stages": 2},     # not swept: 4 warps spill
    ("bwd_kv", 128, 128, 128, 2): {"num_warps": 8, "num_stages": 2},
    ("bwd_q", 128, 128, 128, 2): {"num_warps": 8, "num_stages": 2},
}


def launch_config(kind: str, block_m: int, block_n: int, head_dim: int, dtype: torch.dtype) -> dict:
    """num_warps / num_stages for a kernel ("fwd", "fwd_grouped" (``QueryTiles``), "bwd_kv", "bwd_q") on Hopper-class
    GPUs.

    Measured entries of TUNED_CONFIGS first; else the rule they suggest: 4 warps, 8 for 128x128 score
    tiles in the backward, for 128x64 in the forward, and for 128-row tiles at head dim 128,
    with the deepest pipeline (at most 3) whose buffers fit in ~160 KB of shared memory.
    """
    elem = torch.finfo(dtype).bits // 8
    d = pad_dim(head_dim)
    tuned = TUNED_CONFIGS.get((kind, block_m, block_n, d, elem))
    if tuned is not None:
        return dict(tuned)
    if kind == "bwd_kv":        # k, v resident; q and dO stream
        resident, per_stage = 2 * block_n * d, 2 * block_m * d
    elif kind == "bwd_q":       # q, dO resident; k, v stream
        resident, per_stage = 2 * block_m * d, 2 * block_n * d
    else:
        resident, per_stage = block_m * d, 2 * block_n * d
    wide = block_m * block_n >= 16384 if kind != "fwd" else block_m >= 128 and block_n <= 64
    stages = max(1, min(3, (160 * 1024 // elem - resident) // per_stage))
    return {"num_warps": 8 if wide or (d >= 128 and block_m >= 128) or elem == 4 else 4, "num_stages": stages}


def tiles_per_step(block: int, masked: bool) -> int:
    """Tiles of ``block`` rows a loop step takes: STEP_ROWS rows' worth, one tile with tile masks."""
    return 1 if masked else max(1, STEP_ROWS // block)


def _launch_args(q, k, block_m, block_n, num_prefix, tile_mask_idx, tile_masks, key_bias, tile_rows, scale,
                 placeholder):
    """Launch constants shared by every kernel (a step of several tiles may list absent ones: their rows are
    then checked); the bias and masks arguments (``placeholder``, never read, stands in for an absent one) and
    the log2-domain score scale."""
    head_dim = q.shape[-1]
    nq, nk = q.shape[2], k.shape[2]
    table = tile_rows is not None      # padding slots of the table hold N: the bounds checks drop them
    masked = tile_mask_idx is not None
    consts = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                  BLOCK_D=pad_dim(head_dim), MASK_WORDS=num_tiles(block_n, 32),
                  MASK_BITS=min(32, block_n), HAS_MASK=masked, HAS_BIAS=key_bias is not None,
                  CHECK_Q=table or nq % block_m != 0 or tiles_per_step(block_m, masked) > 1,
                  CHECK_K=table or (nk - num_prefix) % block_n != 0 or tiles_per_step(block_n, masked) > 1,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", TABLE=table)
    if key_bias is not None:
        key_bias = key_bias.float().contiguous()
        bias = (key_bias, *strides(key_bias)[:2])
    else:
        bias = (placeholder, 0, 0)
    masks = tile_masks.contiguous() if tile_masks is not None else placeholder
    return consts, bias, masks, scale * LOG2E.value


class QueryTiles(NamedTuple):
    """Query tiles other than the key tiles (the forward's): ``rows`` (num_q_tiles * block_m,) int32 their token
    rows (a padding slot holds Nq), e.g. ``groups`` key tiles' rows side by side, so that the key tiles all of
    them list are read once for all. Each list (every list as wide, ``fixed_width_row_ptr``) holds ``shared``
    entries for all rows, then as many for each row group (of block_m / groups rows) in turn, seen by its rows
    only (-1 pads a group's entries); no tile masks."""

    rows: Tensor
    shared: int
    groups: int


_TRANSPOSED_CACHE: OrderedDict[tuple, tuple] = OrderedDict()


def _transposed_layout(row_ptr, col_idx, tile_mask_idx, num_k_tiles, chunk):
    """The query tiles (and tile masks) per key tile with the dK/dV work list (``transposed_work``, programs of at
    most ``chunk`` query tiles), cached for layouts used again unchanged (same tensors, same versions)."""
    tensors = (row_ptr, col_idx) if tile_mask_idx is None else (row_ptr, col_idx, tile_mask_idx)
    key = (num_k_tiles, chunk, *((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors))
    hit = _TRANSPOSED_CACHE.get(key)
    if hit is not None and all(ref() is t for ref, t in zip(hit[0], tensors)):
        return hit[1]
    result = transposed_work(row_ptr, col_idx, tile_mask_idx, num_k_tiles, chunk)
    for stale in [k for k, (refs, _) in _TRANSPOSED_CACHE.items() if any(ref() is None for ref in refs)]:
        del _TRANSPOSED_CACHE[stale]            # a layout freed (LLSA's, every call) holds no device memory here
    _TRANSPOSED_CACHE[key] = (tuple(weakref.ref(t) for t in tensors), result)
    while len(_TRANSPOSED_CACHE) > 64:
        _TRANSPOSED_CACHE.popitem(last=False)
    return result


def _num_q_tiles(nq: int, block_m: int, tile_rows: torch.Tensor | None) -> int:
    return num_tiles(nq, block_m) if tile_rows is None else tile_rows.numel() // block_m


def _extra_keys(k: Tensor, v: Tensor, extra: tuple[Tensor, Tensor] | None, tile_rows: Tensor | None
                ) -> tuple[Tensor, Tensor, int, tuple[int, ...]]:
    """(extra keys, extra values, all keys' count, their strides) for the kernels: ``extra`` (keys past the tokens,
    tokens in place only) read from their own tensors, or none (k, v stand in, never read)."""
    if extra is None:
        return k, v, k.shape[2], (0,) * 6
    if tile_rows is None:
        raise ValueError("block_sparse_attention: extra key tiles from their own tensors need tile_rows")
    kx, vx = rows_contiguous(extra[0]), rows_contiguous(extra[1])
    return kx, vx, k.shape[2] + kx.shape[2], (*strides(kx), *strides(vx))


def forward(q: Tensor, k: Tensor, v: Tensor, row_ptr: Tensor, col_idx: Tensor, tile_mask_idx: Tensor | None,
            tile_masks: Tensor | None, key_bias: Tensor | None, tile_rows: Tensor | None, block_m: int, block_n: int,
            num_prefix: int, scale: float, prefix_queries: bool, config: dict | None = None,
            extra: tuple[Tensor, Tensor] | None = None,
            query_tiles: QueryTiles | None = None, spans: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Output (B, H, Nq, d) in q's dtype and the base-2 log-sum-exp (B, H, Nq) float32 (-inf: no key);
    with ``tile_rows`` the rows no tile lists (the prefix) are 0 with log-sum-exp -inf, or with ``prefix_queries``
    the prefix queries' dense attention over the tokens (k's first Nq rows; SDPA). ``extra``: the keys and
    values past k's and v's rows (extra key tiles, tokens in place) in tensors of their own, read there instead
    of from a concatenation (LLSA's pooled keys); ``key_bias`` then covers both. ``query_tiles`` (with
    ``tile_rows``): query tiles of block_m rows of their own, whose lists hold entries for all rows, then entries
    per row group (``QueryTiles``); ``tile_rows`` then describes the key tiles only. ``spans`` (query tiles, S, 2)
    int32: per query tile S ranges [start, end) of consecutive key rows it also attends, disjoint from its listed
    tiles and the prefix (dense blocks of the mask, read without the table; forward only: the backward takes them
    listed as tiles)."""
    q, k, v = rows_contiguous(q), rows_contiguous(k), rows_contiguous(v)
    kx, vx, nk, extra_strides = _extra_keys(k, v, extra, tile_rows)
    b, h, nq, d = q.shape
    o = heads_last_empty(q, b, h, nq, v.shape[-1])
    lse = torch.empty(b, h, nq, device=q.device, dtype=torch.float32)
    if tile_rows is not None and num_prefix > 0:
        if not prefix_queries:               # else fill_prefix_queries writes these rows
            o[:, :, :num_prefix].zero_()
        lse[:, :, :num_prefix].fill_(float("-inf"))
    consts, bias, masks, qk_scale = _launch_args(q, k, block_m, block_n, num_prefix, tile_mask_idx, tile_masks,
                                            key_bias, tile_rows, scale, lse)
    key_tiles = tiles_per_step(block_n, tile_mask_idx is not None)
    config = config or launch_config("fwd" if query_tiles is None else "fwd_grouped", block_m, block_n * key_tiles, d,
                                     q.dtype)
    mask_idx = tile_mask_idx if tile_mask_idx is not None else col_idx
    rows_arg = tile_rows if tile_rows is not None else col_idx
    if query_tiles is None:
        query_rows, shared, groups, nqt = rows_arg, 0, 1, _num_q_tiles(nq, block_m, tile_rows)
        num_key_tiles = nqt
    else:
        if tile_mask_idx is not None:
            raise ValueError("block_sparse forward: query_tiles take no tile masks")
        query_rows, shared, groups = query_tiles
        nqt, num_key_tiles = query_rows.numel() // block_m, tile_rows.numel() // block_n
    launch(_fwd_kernel, (nqt, b * h),
        q, k, v, kx, vx, o, lse, row_ptr, col_idx, mask_idx, masks, bias[0], rows_arg, query_rows,
        spans if spans is not None else col_idx,
        *strides(q), *strides(k), *strides(v), *extra_strides,
        *strides(o), *strides(row_ptr)[:2], *bias[1:], h, nq, nk, num_prefix, num_key_tiles, shared, qk_scale,
        **consts,
        EXTRA=extra is not None, ALIGN=row_alignment(q, k, v, kx, vx, o), KEY_TILES=key_tiles, ROW_GROUPS=groups,
        OWN_TILES=max(1, GROUP_STEP_ROWS // block_n),
        NUM_SPANS=0 if spans is None else spans.shape[1], **config)
    if prefix_queries:
        fill_prefix_queries(o, q, k[:, :, :nq], v[:, :, :nq], num_prefix)
    return o, lse


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, row_ptr: Tensor, col_idx: Tensor,
             tile_mask_idx: Tensor | None, tile_masks: Tensor | None, key_bias: Tensor | None, tile_rows: Tensor | None,
             block_m: int, block_n: int, num_prefix: int, scale: float, prefix_queries: bool,
             configs: dict | None = None, extra: tuple[Tensor, Tensor] | None = None,
             extra_grads: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (no gradient for key_bias); with ``prefix_queries`` (as ``forward``'s) the prefix queries'
    gradients too. ``configs`` maps "bwd_kv"/"bwd_q" to launch configs. With
    ``extra`` (as ``forward``'s), the gradients of its keys and values are written into ``extra_grads``
    (tensors of their shapes, contiguous)."""
    do, q, k, v = rows_contiguous(do), rows_contiguous(q), rows_contiguous(k), rows_contiguous(v)
    b, h, nq, d = q.shape
    kx, vx, nk, extra_strides = _extra_keys(k, v, extra, tile_rows)
    p = num_prefix
    nqt = _num_q_tiles(nq, block_m, tile_rows)
    nkt = num_tiles(nk - p, block_n) if tile_rows is None else nqt + num_tiles(nk - nq, block_n)
    consts, bias, masks, qk_scale = _launch_args(q, k, block_m, block_n, p, tile_mask_idx, tile_masks, key_bias,
                                            tile_rows, scale, lse)
    rows_arg = tile_rows if tile_rows is not None else col_idx
    configs = configs or {}
    delta = torch.empty_like(lse)
    launch(delta_kernel, (num_tiles(nq, block_m), b * h), o, do, delta, *strides(o), *strides(do), h, nq,
           HEAD_DIM=d, BLOCK_M=block_m, BLOCK_D=consts["BLOCK_D"], ALIGN=row_alignment(o, do))
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    if tile_rows is not None and p > 0 and not prefix_queries:    # else the prefix queries' gradients fill them
        dq[:, :, :p].zero_()
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    dkx, dvx = extra_grads if extra is not None else (dk, dv)
    grad_strides = (*strides(dk), *strides(dv), *((*strides(dkx), *strides(dvx)) if extra is not None else (0,) * 6))
    rows_kw = dict(EXTRA=extra is not None, ALIGN=row_alignment(q, k, v, kx, vx, do, dq, dk, dv, dkx, dvx))
    masked = tile_mask_idx is not None
    query_tiles, key_tiles = tiles_per_step(block_m, masked), tiles_per_step(block_n, masked)
    # a program takes at most KEY_CHUNK steps: KEY_CHUNK * query_tiles listings (fewer hot-tile partial slots)
    row_idx, mask_idx_t, work = _transposed_layout(row_ptr, col_idx, tile_mask_idx, nkt, KEY_CHUNK * query_tiles)
    kv_config = configs.get("bwd_kv") or launch_config("bwd_kv", block_m * query_tiles, block_n, d, q.dtype)
    common = (*strides(q), *strides(k), *strides(v), *extra_strides, *strides(do))
    if nkt > 0:
        rows_q, heads_q = row_ptr.shape[:2]
        per_row = (b // rows_q) * (h // heads_q)              # the (b, h) each CSR row stands for
        num_hot = work.hot_tiles.shape[0]
        hot = torch.zeros(2, num_hot, per_row, block_n, consts["BLOCK_D"], device=q.device, dtype=torch.float32)
        launch(_bwd_kv_kernel, (work.items.shape[0], per_row),
            q, k, v, kx, vx, do, dk, dv, dkx, dvx, lse, delta, work.items, row_idx,
            mask_idx_t if mask_idx_t is not None else row_idx, masks, bias[0], rows_arg, hot,
            *common, *grad_strides, bias[1], bias[2], h, heads_q, nq, nk, p, nqt, 1, num_hot, qk_scale, scale,
            **consts, PREFIX=False, CHUNK=PREFIX_CHUNK, QUERY_TILES=query_tiles, **rows_kw, **kv_config)
        launch(_hot_tiles_kernel, (num_hot, per_row), hot, work.hot_tiles, dk, dv, dkx, dvx, rows_arg,
               *grad_strides, h, heads_q, nq, nk, p, nqt,
               HEAD_DIM=d, BLOCK_N=block_n, BLOCK_D=consts["BLOCK_D"], CHECK_K=consts["CHECK_K"],
               TABLE=consts["TABLE"], **rows_kw)
    if p > 0:
        chunks, blocks = num_tiles(nqt, PREFIX_CHUNK), num_tiles(p, block_n)
        parts = torch.empty(2, chunks, b * h, blocks * block_n, consts["BLOCK_D"], device=q.device,
                            dtype=torch.float32)
        launch(_bwd_kv_kernel, (blocks * chunks, b * h),
            q, k, v, kx, vx, do, parts[0], parts[1], parts[0], parts[1], lse, delta, row_idx, row_idx, row_idx, masks,
            bias[0], rows_arg, parts, *common, *grad_strides, bias[1], bias[2], h, 1, nq, nk, p, nqt, chunks, 0,
            qk_scale, scale, **{**consts, "HAS_MASK": False, "CHECK_K": True}, PREFIX=True, CHUNK=PREFIX_CHUNK,
            QUERY_TILES=query_tiles, **rows_kw, **kv_config)
        summed = parts.sum(1)[..., :p, :d].reshape(2, b, h, p, d)
        dk[:, :, :p] = summed[0]
        dv[:, :, :p] = summed[1]
    q_config = configs.get("bwd_q") or launch_config("bwd_q", block_m, block_n * key_tiles, d, q.dtype)
    launch(_bwd_q_kernel, (nqt, b * h),
        q, k, v, kx, vx, do, dq, lse, delta, row_ptr, col_idx,
        tile_mask_idx if tile_mask_idx is not None else col_idx, masks, bias[0], rows_arg,
        *common, *strides(dq), *strides(row_ptr)[:2], *bias[1:], h, nq, nk, p, nqt, qk_scale, scale,
        **consts, **rows_kw, KEY_TILES=key_tiles, **q_config)
    if prefix_queries:
        add_prefix_queries_gradients_triton(dq, dk[:, :, :nq], dv[:, :, :nq], do, q, k[:, :, :nq], v[:, :, :nq], o,
                                            p)
    return dq, dk, dv


# --- the op: custom ops for torch.compile, an autograd.Function in eager mode ------------------------

def _forward_fake(q, k, v, row_ptr, col_idx, tile_mask_idx, tile_masks, key_bias, tile_rows, block_m, block_n,
                  num_prefix, scale, prefix_queries):
    b, h, nq, _ = q.shape
    return heads_last_empty(q, b, h, nq, v.shape[-1]), q.new_empty(b, h, nq, dtype=torch.float32)


def _backward_fake(do, q, k, v, o, lse, row_ptr, col_idx, tile_mask_idx, tile_masks, key_bias, tile_rows, block_m,
                   block_n, num_prefix, scale, prefix_queries):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))   # as backward's


def _gradients(run_backward, do, saved, args, needs):
    """Gradients of q, k, v; the layout tensors (and the key bias) get none."""
    (q, k, v), layout, (o, lse) = saved[:3], saved[3:9], saved[9:]
    return (*run_backward(do, q, k, v, o, lse, *layout, *args), *([None] * len(layout)))


_block_sparse_attention = triton_op(
    "block_sparse_attention", forward, backward, num_tensors=9, forward_fake=_forward_fake,
    backward_fake=_backward_fake, save=lambda inputs, outputs: (*inputs[:9], *outputs), gradients=_gradients)


def block_sparse_attention_triton(q, k, v, row_ptr, col_idx, block_m, block_n, num_prefix=0, tile_mask_idx=None,
                                  tile_masks=None, key_bias=None, scale=None, tile_rows=None,
                                  prefix_queries=False) -> Tensor:
    """The Triton backend of ``block_sparse_attention`` (arguments as the reference's); ``prefix_queries``: the
    prefix rows in the op's own output with autograd too (their gradients in its backward, no concatenation)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _block_sparse_attention(q, k, v, row_ptr, col_idx, tile_mask_idx, tile_masks, key_bias, tile_rows,
                                   block_m, block_n, num_prefix, scale, bool(prefix_queries))
