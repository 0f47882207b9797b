"""The block-sparse flash attention core: softmax attention of each query tile over a CSR list of key
tiles plus the prefix keys (forward and backward). Neighborhood-style masks inside tiles, radial and
log-linear attention are index generators on top of it; dense attention is the core with every tile listed."""
from __future__ import annotations

import torch

from ..core import checks
from ..core.dispatch import (TRITON, TRITON_DTYPES, Requirement, choose_backend, dtypes, head_dim_at_most,
                             register_backend, triton_device)
from .layout import check_block_sparse_args, core_fits
from .reference import block_sparse_attention_reference

TRITON_REQUIRES = (triton_device(), dtypes(*TRITON_DTYPES), head_dim_at_most(128))
# for the families that run on the core: the facts' ``tile_size`` is the tokens of one of their tiles
CORE_TILES = Requirement("tiles of a power of two >= 16 tokens (the block-sparse core's tiles)",
                         lambda f: core_fits(f["tile_size"]))


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, row_ptr: torch.Tensor,
                           col_idx: torch.Tensor, block_m: int, block_n: int, num_prefix: int = 0,
                           tile_mask_idx: torch.Tensor | None = None, tile_masks: torch.Tensor | None = None,
                           key_bias: torch.Tensor | None = None, scale: float | None = None,
                           tile_rows: torch.Tensor | None = None, prefix_queries: bool = False,
                           backend: str | None = None) -> torch.Tensor:
    """Softmax attention of each query tile over its listed key tiles plus the prefix keys.

    Tokens are in tile order: query tile i = q[:, :, i*block_m:(i+1)*block_m], key tile j =
    k[:, :, P + j*block_n : P + (j+1)*block_n] after P = ``num_prefix`` prefix keys that every query
    attends. ``row_ptr`` (1|B, 1|heads, num_q_tiles+1) and ``col_idx`` (nnz,) int32 are a CSR of key
    tiles per query tile; ``tile_mask_idx``/``tile_masks`` mask keys inside listed tiles;
    ``key_bias`` (1|B, 1|heads, Nk) is added to the scores (-inf drops a key). A query with no key
    gets 0. ``tile_rows`` (self-attention): the tiles' token rows, so that tokens stay in place (a 2D
    tile of a raster grid, no permutation); the prefix rows of the output are then 0, or with ``prefix_queries``
    the prefix queries' dense attention over the tokens (k's first N rows; SDPA), computed and differentiated by
    the op itself (no concatenated copy in training). Layout details:
    ``subquad.kernels.block_sparse.layout``. Backends: ``reference``, ``triton`` (the default on CUDA).
    """
    checks.check_qkv(q, k, v, "block_sparse_attention")
    if prefix_queries and tile_rows is None:
        raise ValueError("block_sparse_attention: prefix_queries=True needs tile_rows (tokens in place, the prefix "
                         "rows free)")
    check_block_sparse_args(q, k, v, row_ptr, col_idx, block_m, block_n, num_prefix, tile_mask_idx, tile_masks,
                            key_bias, tile_rows)
    fn = choose_backend("block_sparse_attention", backend, q, v=v)
    return fn(q, k, v, row_ptr, col_idx, block_m, block_n, num_prefix, tile_mask_idx, tile_masks, key_bias, scale,
              tile_rows, bool(prefix_queries))


if TRITON:
    from .triton import block_sparse_attention_triton
    register_backend("block_sparse_attention", "triton", block_sparse_attention_triton, requires=TRITON_REQUIRES)
register_backend("block_sparse_attention", "reference", block_sparse_attention_reference)
