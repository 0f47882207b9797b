"""Block-sparse attention, plain PyTorch: each query tile gathers its listed keys (the layout:
``kernels.block_sparse.layout``)."""
from __future__ import annotations

import torch

from ..softmax import fill_prefix_queries
from .layout import check_block_sparse_layout, num_tiles, unpack_tile_masks


def block_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     row_ptr: torch.Tensor, col_idx: torch.Tensor, block_m: int, block_n: int,
                                     num_prefix: int = 0, tile_mask_idx: torch.Tensor | None = None,
                                     tile_masks: torch.Tensor | None = None, key_bias: torch.Tensor | None = None,
                                     scale: float | None = None,
                                     tile_rows: torch.Tensor | None = None,
                                     prefix_queries: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale + key_bias) v over the listed keys, by gathers, in float32; with ``prefix_queries``
    (and ``tile_rows``) the prefix rows hold the prefix queries' dense attention over the tokens (k's first Nq rows).

    Each query tile gathers its prefix keys and listed key tiles (padded to the longest row), so
    memory is O(N x listed keys). Differentiable in q, k, v and key_bias.
    """
    b, h, nq, d = q.shape
    nk, p = k.shape[2], num_prefix
    scale = d ** -0.5 if scale is None else scale
    if tile_rows is None:
        nqt, nkt = num_tiles(nq, block_m), num_tiles(nk - p, block_n)
        slot_rows = None
    else:
        nqt = tile_rows.numel() // block_m
        nkt = nqt + num_tiles(nk - nq, block_n)
        slot_rows = tile_rows.long()
        key_rows = torch.cat([torch.where(slot_rows < nq, slot_rows, nk),              # padding: no key
                              torch.arange(nq, nq + (nkt - nqt) * block_n, device=q.device)])
    check_block_sparse_layout(row_ptr, col_idx, nkt, tile_mask_idx,
                              0 if tile_masks is None else tile_masks.shape[0])
    dev = q.device
    counts = (row_ptr[..., 1:] - row_ptr[..., :-1]).long()                          # (Bq, Hq, nqt)
    width = max(int(counts.max()) if counts.numel() else 0, 1)      # >= 1 keeps softmax's axis non-empty
    slot = torch.arange(width, device=dev)
    listed = slot < counts[..., None]                                               # (Bq, Hq, nqt, L)
    entry = (row_ptr[..., :-1, None].long() + slot).clamp(max=max(col_idx.numel() - 1, 0))
    tile = col_idx.long()[entry] if col_idx.numel() else torch.zeros_like(entry)
    key_pos = tile[..., None] * block_n + torch.arange(block_n, device=dev)         # (Bq, Hq, nqt, L, BN)
    key_pos = p + key_pos if slot_rows is None else key_rows[key_pos]
    allowed = (listed[..., None] & (key_pos < nk))[..., None, :, :].expand(*listed.shape[:3], block_m, width, block_n)
    if tile_mask_idx is not None:
        mask_id = tile_mask_idx.long()[entry] if col_idx.numel() else torch.full_like(entry, -1)
        bits = unpack_tile_masks(tile_masks, block_n)[mask_id.clamp(min=0)]        # (..., L, BM, BN)
        bits = bits | (mask_id < 0)[..., None, None]
        allowed = allowed & bits.transpose(-3, -2)                                  # (..., BM, L, BN)
    bq, hq = row_ptr.shape[:2]
    allowed = allowed.reshape(bq, hq, nqt, block_m, width * block_n)
    allowed = torch.cat([allowed.new_ones(bq, hq, nqt, block_m, p), allowed], -1)
    key_pos = torch.cat([torch.arange(p, device=dev).expand(bq, hq, nqt, p),
                         key_pos.reshape(bq, hq, nqt, width * block_n)], -1).clamp(max=nk - 1)
    span = key_pos.shape[-1]

    def gather(x: torch.Tensor) -> torch.Tensor:
        idx = key_pos.expand(b, h, nqt, span).reshape(b, h, nqt * span, 1).expand(b, h, nqt * span, x.shape[-1])
        return torch.gather(x.float(), 2, idx).reshape(b, h, nqt, span, x.shape[-1])

    if slot_rows is None:
        q_tiles = torch.nn.functional.pad(q.float(), (0, 0, 0, nqt * block_m - nq)).reshape(b, h, nqt, block_m, d)
    else:
        q_tiles = q.float().index_select(2, slot_rows.clamp(max=nq - 1)).reshape(b, h, nqt, block_m, d)
    scores = (q_tiles * scale) @ gather(k).transpose(-1, -2)                        # (B, H, nqt, BM, S)
    if key_bias is not None:
        bias = torch.gather(key_bias.float().expand(b, h, nk), 2, key_pos.expand(b, h, nqt, span).reshape(b, h, -1))
        scores = scores + bias.reshape(b, h, nqt, 1, span)
    scores = scores.masked_fill(~allowed, float("-inf"))
    peak = scores.amax(-1, keepdim=True).detach()
    weights = torch.exp(scores - torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)))
    total = weights.sum(-1, keepdim=True)
    out = (weights @ gather(v)) / torch.where(total > 0, total, torch.ones_like(total))
    out = out.reshape(b, h, nqt * block_m, -1)
    if slot_rows is None:
        return out[:, :, :nq].to(q.dtype)
    real = slot_rows < nq
    out = out.new_zeros(b, h, nq, out.shape[-1]).index_copy(2, slot_rows[real], out[:, :, real]).to(q.dtype)
    return fill_prefix_queries(out, q, k[:, :, :nq], v[:, :, :nq], p) if prefix_queries else out
