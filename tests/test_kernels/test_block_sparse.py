"""Block-sparse attention core: reference vs brute force, triton vs reference (CPU interpreter and GPU)."""
from __future__ import annotations

import importlib
import math
import random
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from subquad.kernels import available_backends, block_sparse_attention
from subquad.kernels.block_sparse.layout import (block_mask_to_csr, chunk_key_tiles, csr_to_block_mask,
                                                    fixed_width_row_ptr, num_tiles, pack_tile_masks, transpose_csr,
                                                    unpack_tile_masks)
from subquad.kernels.core.testing import assert_rel_close
from subquad.kernels.core.tiles import tile_layout

requires_triton = pytest.mark.skipif("triton" not in available_backends("block_sparse_attention"),
                                     reason="triton is not installed")
block_sparse_triton = pytest.importorskip("subquad.kernels.block_sparse.triton") if "triton" in available_backends(
    "block_sparse_attention") else None


def make_layout(b, h, nq, nk, block_m, block_n, num_prefix=0, density=0.5, per_head=True, masks=False,
                bias=False, empty_rows=True, device="cpu", generator=None):
    """A random layout: CSR (per head or broadcast), optional tile masks and key bias (-inf padding)."""
    g = generator
    nqt, nkt = num_tiles(nq, block_m), num_tiles(nk - num_prefix, block_n)
    shape = (b, h, nqt, nkt) if per_head else (1, 1, nqt, nkt)
    block_mask = torch.rand(shape, generator=g) < density
    if empty_rows and nqt > 1:
        block_mask[..., 0, :] = False
    row_ptr, col_idx = block_mask_to_csr(block_mask)
    kw = {}
    if masks:
        patterns = torch.rand(4, block_m, block_n, generator=g) < 0.6
        patterns[0] = False                               # a listed tile that masks every key
        kw["tile_masks"] = pack_tile_masks(patterns).to(device)
        kw["tile_mask_idx"] = torch.randint(-1, 4, col_idx.shape, generator=g, dtype=torch.int32).to(device)
    if bias:
        key_bias = torch.randn(b, 1, nk, generator=g)
        key_bias[torch.rand(b, 1, nk, generator=g) < 0.1] = float("-inf")
        kw["key_bias"] = key_bias.to(device)
    return dict(row_ptr=row_ptr.to(device), col_idx=col_idx.to(device), block_m=block_m, block_n=block_n,
                num_prefix=num_prefix, **kw)


def brute_force(q, k, v, layout, scale=None):
    """Dense attention with the explicit (B, H, Nq, Nk) mask and bias the layout stands for, in float64."""
    b, h, nq, d = q.shape
    nk, p = k.shape[2], layout["num_prefix"]
    bm, bn = layout["block_m"], layout["block_n"]
    nqt, nkt = num_tiles(nq, bm), num_tiles(nk - p, bn)
    allowed = torch.zeros(b, h, nqt * bm, p + nkt * bn, dtype=torch.bool)
    allowed[..., :p] = True
    row_ptr, col_idx = layout["row_ptr"].cpu(), layout["col_idx"].cpu()
    mask_idx = layout.get("tile_mask_idx")
    dense_masks = None if mask_idx is None else unpack_tile_masks(layout["tile_masks"].cpu(), bn)
    for bi in range(b):
        for hi in range(h):
            rp = row_ptr[min(bi, row_ptr.shape[0] - 1), min(hi, row_ptr.shape[1] - 1)]
            for i in range(nqt):
                for e in range(int(rp[i]), int(rp[i + 1])):
                    j = int(col_idx[e])
                    tile = torch.ones(bm, bn, dtype=torch.bool)
                    if mask_idx is not None and int(mask_idx[e]) >= 0:
                        tile = dense_masks[int(mask_idx[e])]
                    allowed[bi, hi, i * bm:(i + 1) * bm, p + j * bn:p + (j + 1) * bn] = tile
    allowed = allowed[:, :, :nq, :nk]
    scale = d ** -0.5 if scale is None else scale
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    if layout.get("key_bias") is not None:
        scores = scores + layout["key_bias"].cpu().double()[:, :, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, -1).nan_to_num(0.0)          # a query with no key: output 0
    return weights @ v.double()


def qkv(b, h, nq, nk, d, dtype, device="cpu"):
    return [torch.randn(b, h, n, d, device=device).to(dtype).requires_grad_() for n in (nq, nk, nk)]


def check_against(fn, ref_fn, q, k, v, dtype, what, grads=True, vanishing=""):
    """Forward and q/k/v gradients of fn (inputs as given) vs ref_fn (float32/64 copies of them).

    ``vanishing`` names gradients ("q", "k") that are exactly 0 in exact arithmetic, e.g. when every
    query sees one key (softmax over one key is constant): both sides are then rounding noise
    (~1e-6 per element), so a relative error means nothing; they must be ~0 instead (a wrong
    gradient is O(1) per element for these randn inputs).
    """
    out = fn(q, k, v)
    ref_in = [x.detach().double().requires_grad_() if x.device.type == "cpu" else x.detach().float().requires_grad_()
              for x in (q, k, v)]
    ref = ref_fn(*ref_in)
    assert_rel_close(out, ref, dtype=dtype, what=f"{what} out")
    if not grads:
        return
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    want = torch.autograd.grad(ref, ref_in, do.to(ref.dtype))
    for name, a, e in zip("qkv", got, want):
        if name in vanishing:
            worst = max(float(a.detach().abs().max()), float(e.detach().abs().max())) if a.numel() else 0.0
            assert worst < 1e-3, f"{what} d{name} should vanish (one key per query), max |d{name}| = {worst:.3e}"
        else:
            assert_rel_close(a, e, dtype=dtype, what=f"{what} d{name}")


# --- layout helpers ------------------------------------------------------------------------------

def test_pack_unpack_roundtrip():
    for bn in (16, 32, 64, 128):
        masks = torch.rand(5, 32, bn) < 0.5
        packed = pack_tile_masks(masks)
        assert packed.dtype == torch.int32 and packed.shape == (5, 32, num_tiles(bn, 32))
        assert torch.equal(unpack_tile_masks(packed, bn), masks)


def test_csr_roundtrip_and_transpose():
    block_mask = torch.rand(2, 3, 7, 5) < 0.4
    row_ptr, col_idx = block_mask_to_csr(block_mask)
    assert row_ptr.shape == (2, 3, 8) and int(row_ptr[-1, -1, -1]) == int(block_mask.sum())
    assert torch.equal(csr_to_block_mask(row_ptr, col_idx, 5), block_mask)
    col_ptr, row_idx, _ = transpose_csr(row_ptr, col_idx, None, 5)
    assert torch.equal(csr_to_block_mask(col_ptr, row_idx, 7), block_mask.transpose(-1, -2))


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunk_key_tiles_cover_every_entry_once(chunk):
    """Each key tile's transposed-CSR entries (per (b, h) row) are split into programs of at most ``chunk``
    entries that cover them once; every tile of every row has a program (unlisted ones too); split tiles,
    and only they, own a hot slot, one per tile; idle programs and free slots have row -1."""
    block_mask = torch.rand(2, 3, 40, 6) < 0.5
    block_mask[0, 0, :, 2] = True                      # a tile every query tile lists
    block_mask[1, 2, :, 4] = False                     # a tile nobody lists
    row_ptr, col_idx = block_mask_to_csr(block_mask)
    col_ptr, _, _ = transpose_csr(row_ptr, col_idx, None, 6)
    work = chunk_key_tiles(col_ptr, col_idx.numel(), chunk)
    items, hot_tiles = work.items.long(), work.hot_tiles.long()
    real = items[items[:, 0] >= 0]
    assert ((real[:, 3] - real[:, 2]) <= chunk).all() and ((real[:, 3] - real[:, 2]) >= 0).all()
    ptr = col_ptr.reshape(6, 7).long()
    for row in range(6):
        for t in range(6):
            mine = real[(real[:, 0] == row) & (real[:, 1] == t)]
            assert len(mine) >= 1
            covered = torch.cat([torch.arange(int(lo), int(hi)) for lo, hi in mine[:, 2:4]])
            assert torch.equal(covered.sort().values, torch.arange(int(ptr[row, t]), int(ptr[row, t + 1])))
            hot = int(ptr[row, t + 1] - ptr[row, t]) > chunk
            slots = mine[:, 4].unique()
            assert (slots.numel() == 1) and ((int(slots) >= 0) == hot)
            if hot:
                assert hot_tiles[int(slots)].tolist() == [row, t]
    owners = hot_tiles[hot_tiles[:, 0] >= 0]
    assert owners.unique(dim=0).shape == owners.shape


@requires_triton
@pytest.mark.parametrize("shape,density,chunk,masks", [((2, 3, 40, 6), 0.5, 3, False), ((1, 1, 70, 9), 0.3, 32, True),
                                                       ((4, 1, 5, 300), 0.2, 2, False), ((1, 2, 3, 4), 0.0, 2, False)])
def test_triton_transposed_work_equals_the_torch_layout(shape, density, chunk, masks):
    """transposed_work (entry keys, a sort, two passes over the key tiles) gives transpose_csr's query tiles and
    mask ids and chunk_key_tiles' programs and hot slots exactly; idle programs and free slots have row -1."""
    transpose_triton = importlib.import_module("subquad.kernels.block_sparse.transpose_triton")
    g = torch.Generator().manual_seed(sum(shape))
    block_mask = torch.rand(shape, generator=g) < density
    if density:
        block_mask[0, 0, :, 1] = True                  # a hot tile
    row_ptr, col_idx = block_mask_to_csr(block_mask)
    mask_idx = torch.randint(-1, 4, col_idx.shape, generator=g, dtype=torch.int32) if masks else None
    col_ptr, want_rows, want_masks = transpose_csr(row_ptr, col_idx, mask_idx, shape[-1])
    want = chunk_key_tiles(col_ptr, col_idx.numel(), chunk)
    rows, got_masks, got = transpose_triton.transposed_work(row_ptr, col_idx, mask_idx, shape[-1], chunk)
    assert torch.equal(rows, want_rows)
    assert (got_masks is None) == (not masks) and (not masks or torch.equal(got_masks, want_masks))
    assert got.items.shape == want.items.shape and got.hot_tiles.shape == want.hot_tiles.shape
    real, used = want.items[:, 0] >= 0, want.hot_tiles[:, 0] >= 0
    assert torch.equal(got.items[real], want.items[real]) and (got.items[~real, 0] == -1).all()
    assert torch.equal(got.hot_tiles[used], want.hot_tiles[used]) and (got.hot_tiles[~used, 0] == -1).all()


# --- reference vs brute force ---------------------------------------------------------------------

@pytest.mark.parametrize("case", [
    dict(nq=64, nk=64, p=0),                                             # divisible, no extras
    dict(nq=50, nk=75, p=3, masks=True, bias=True),                      # padding, prefix, masks, bias
    dict(nq=33, nk=41, p=0, per_head=False, masks=True, density=0.3),    # broadcast layout, sparse rows
])
def test_reference_matches_brute_force(case):
    b, h, d, bm, bn = 2, 3, 8, 16, 16
    layout = make_layout(b, h, case["nq"], case["nk"], bm, bn, case["p"], density=case.get("density", 0.5),
                         per_head=case.get("per_head", True), masks=case.get("masks", False),
                         bias=case.get("bias", False))
    q, k, v = qkv(b, h, case["nq"], case["nk"], d, torch.float32)
    check_against(lambda q, k, v: block_sparse_attention(q, k, v, backend="reference", **layout),
                  lambda q, k, v: brute_force(q, k, v, layout), q, k, v, torch.float32, "reference")


def test_reference_dense_is_sdpa():
    q, k, v = qkv(1, 2, 48, 48, 16, torch.float32)
    row_ptr, col_idx = block_mask_to_csr(torch.ones(1, 1, 3, 3, dtype=torch.bool))
    out = block_sparse_attention(q, k, v, row_ptr=row_ptr, col_idx=col_idx, block_m=16, block_n=16,
                                 backend="reference")
    assert_rel_close(out, F.scaled_dot_product_attention(q, k, v), what="dense reference")


# --- triton vs reference (CPU interpreter here, GPU on the device) -------------------------------

TRITON_CASES = [
    dict(b=1, h=2, nq=64, nk=64, p=0, bm=32, bn=16, d=16),
    dict(b=2, h=2, nq=45, nk=70, p=5, bm=16, bn=32, d=32, masks=True, bias=True),
    dict(b=1, h=3, nq=40, nk=52, p=20, bm=16, bn=16, d=24, per_head=False, density=0.3, masks=True),
    # small unmasked tiles, stepped through several at a time (tiles_per_step), rows of any length
    dict(b=2, h=2, nq=45, nk=70, p=5, bm=16, bn=16, d=32, bias=True),
    dict(b=1, h=3, nq=40, nk=100, p=20, bm=16, bn=16, d=24, per_head=False, density=0.3),
]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", range(len(TRITON_CASES)))
def test_triton_matches_reference(case, dtype):
    c = TRITON_CASES[case]
    layout = make_layout(c["b"], c["h"], c["nq"], c["nk"], c["bm"], c["bn"], c["p"], density=c.get("density", 0.5),
                         per_head=c.get("per_head", True), masks=c.get("masks", False), bias=c.get("bias", False))
    q, k, v = qkv(c["b"], c["h"], c["nq"], c["nk"], c["d"], dtype)
    check_against(lambda q, k, v: block_sparse_attention(q, k, v, backend="triton", **layout),
                  lambda q, k, v: block_sparse_attention(q, k, v, backend="reference", **layout),
                  q, k, v, dtype, f"triton {c}")


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_head", [True, False])
def test_triton_split_key_tiles(per_head, dtype, monkeypatch):
    """Key tiles listed by more query tiles than a program takes (2 here) are split into chunks whose
    float32 partial dK, dV add up."""
    monkeypatch.setattr(block_sparse_triton, "KEY_CHUNK", 2)
    layout = make_layout(2, 2, 100, 75, 16, 16, 5, density=0.7, per_head=per_head, masks=True, bias=True,
                         empty_rows=False)
    q, k, v = qkv(2, 2, 100, 75, 16, dtype)
    check_against(lambda q, k, v: block_sparse_attention(q, k, v, backend="triton", **layout),
                  lambda q, k, v: block_sparse_attention(q, k, v, backend="reference", **layout),
                  q, k, v, dtype, f"split key tiles, per head {per_head}")


@requires_triton
def test_transposed_layout_cache_drops_freed_layouts(monkeypatch):
    """Layouts made afresh every call (LLSA's) are not kept alive by the cache of transposed layouts: an entry whose
    layout tensors are gone is dropped at the next insert."""
    monkeypatch.setattr(block_sparse_triton, "_TRANSPOSED_CACHE", OrderedDict())
    row_ptr, col_idx = block_mask_to_csr(torch.rand(1, 1, 4, 4) < 0.5)
    for _ in range(3):
        fresh = col_idx.clone()
        block_sparse_triton._transposed_layout(row_ptr, fresh, None, 4, 32)
        del fresh
    assert len(block_sparse_triton._TRANSPOSED_CACHE) == 1
    kept = col_idx.clone()
    first = block_sparse_triton._transposed_layout(row_ptr, kept, None, 4, 32)
    assert block_sparse_triton._transposed_layout(row_ptr, kept, None, 4, 32) is first       # a live layout: a hit


@requires_triton
@pytest.mark.parametrize("masks,p", [(False, 3), (True, 0)])
def test_extra_key_tiles_from_their_own_tensors_equal_the_concatenation(masks, p):
    """Keys past the tokens read from tensors of their own (``extra``: LLSA's pooled keys, no concatenation) give
    the output and gradients of the same keys appended to k and v."""
    layout, (q, k, v), _ = in_place_case((7, 10), (4, 4), p, masks=masks, extra=37)
    args = [layout.get(name) for name in ("row_ptr", "col_idx", "tile_mask_idx", "tile_masks", "key_bias",
                                          "tile_rows")] + [16, 16, p, 0.25, False]
    n = q.shape[2]
    k, v = k.detach(), v.detach()
    out, lse = block_sparse_triton.forward(q, k, v, *args)
    extra = (k[:, :, n:].contiguous(), v[:, :, n:].contiguous())
    out_x, lse_x = block_sparse_triton.forward(q, k[:, :, :n], v[:, :, :n], *args, extra=extra)
    assert torch.equal(out, out_x) and torch.equal(lse, lse_x)
    do = torch.randn_like(out)
    dq, dk, dv = block_sparse_triton.backward(do, q.detach(), k, v, out, lse, *args)
    extra_grads = (torch.empty_like(extra[0]), torch.empty_like(extra[1]))
    dq_x, dk_x, dv_x = block_sparse_triton.backward(do, q.detach(), k[:, :, :n], v[:, :, :n], out, lse, *args,
                                                    extra=extra, extra_grads=extra_grads)
    assert torch.equal(dq, dq_x)
    assert torch.equal(dk, torch.cat([dk_x, extra_grads[0]], 2)) and torch.equal(dv, torch.cat([dv_x, extra_grads[1]], 2))


@requires_triton
@pytest.mark.parametrize("masks,grid", [(True, (7, 10)), (False, (13, 17))])
def test_tile_rows_split_key_tiles(masks, grid, monkeypatch):
    """Programs of at most KEY_CHUNK steps: 2 tiles with tile masks (one per step), 4 without (a step takes four
    16-token query tiles): key tiles listed more often are split."""
    monkeypatch.setattr(block_sparse_triton, "KEY_CHUNK", 2 if masks else 1)
    layout, (q, k, v), brute = in_place_case(grid, (4, 4), 3, masks=masks, extra=21)
    listings = csr_to_block_mask(layout["row_ptr"], layout["col_idx"], int(layout["col_idx"].max()) + 1).sum(2)
    assert int(listings.max()) > (2 if masks else 4)                # some key tile of some (b, h) is split
    check_against(lambda q, k, v: block_sparse_attention(q, k, v, backend="triton", **layout), brute, q, k, v,
                  torch.float32, f"triton in place, split key tiles, masks {masks}")


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_one_key_per_query(dtype):
    """One prefix key and no listed tile: out = v[0] everywhere, dv[0] = sum of dO, and dq = dk = 0
    exactly (a softmax over one key is constant), which both sides give only up to rounding noise."""
    layout = make_layout(1, 2, 40, 1 + 50, 16, 16, 1, density=0.0)
    q, k, v = qkv(1, 2, 40, 51, 16, dtype)
    check_against(lambda q, k, v: block_sparse_attention(q, k, v, backend="triton", **layout),
                  lambda q, k, v: block_sparse_attention(q, k, v, backend="reference", **layout),
                  q, k, v, dtype, "one key", vanishing="qk")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
def test_empty_rows_give_zero(backend):
    """A query tile with no key tile and no prefix outputs 0 and passes no gradient."""
    block_mask = torch.ones(1, 1, 3, 2, dtype=torch.bool)
    block_mask[..., 1, :] = False
    row_ptr, col_idx = block_mask_to_csr(block_mask)
    q, k, v = qkv(1, 1, 48, 32, 16, torch.float32)
    out = block_sparse_attention(q, k, v, row_ptr=row_ptr, col_idx=col_idx, block_m=16, block_n=16,
                                 backend=backend)
    assert torch.isfinite(out).all() and (out[:, :, 16:32] == 0).all() and out[:, :, :16].abs().sum() > 0
    dq, = torch.autograd.grad(out.sum(), (q,))
    assert torch.isfinite(dq).all() and (dq[:, :, 16:32] == 0).all()


@requires_triton
def test_triton_dense_matches_sdpa():
    q, k, v = qkv(1, 2, 64, 64, 32, torch.float32)
    row_ptr, col_idx = block_mask_to_csr(torch.ones(1, 1, 2, 4, dtype=torch.bool))
    check_against(lambda q, k, v: block_sparse_attention(q, k, v, row_ptr=row_ptr, col_idx=col_idx, block_m=32,
                                                         block_n=16, backend="triton"),
                  F.scaled_dot_product_attention, q, k, v, torch.float32, "dense triton")


@requires_triton
def test_layout_reuse_and_in_place_change():
    """The cached transposed layout serves a reused layout and is rebuilt after an in-place change."""
    layout = make_layout(1, 2, 48, 48, 16, 16, density=0.6)
    q, k, v = qkv(1, 2, 48, 48, 16, torch.float32)
    for step in range(3):
        if step == 2:
            layout["col_idx"][:] = (layout["col_idx"] + 1) % 3
        check_against(lambda q, k, v: block_sparse_attention(q, k, v, backend="triton", **layout),
                      lambda q, k, v: block_sparse_attention(q, k, v, backend="reference", **layout),
                      q, k, v, torch.float32, f"step {step}")


@requires_triton
def test_compile_fullgraph():
    layout = make_layout(1, 2, 32, 40, 16, 16, 8, masks=True, bias=True)
    q, k, v = qkv(1, 2, 32, 40, 16, torch.float32)
    fn = lambda q, k, v: block_sparse_attention(q, k, v, backend="triton", **layout)  # noqa: E731
    check_against(torch.compile(fn, fullgraph=True, backend="aot_eager"),
                  lambda q, k, v: block_sparse_attention(q, k, v, backend="reference", **layout),
                  q, k, v, torch.float32, "compiled")


def in_place_case(grid, tile, p, b=2, h=2, d=16, masks=False, dtype=torch.float32, device="cpu", extra=0):
    """A layout over the 2D tiles of a raster grid after ``p`` prefix tokens, with its tile_rows (and
    ``extra`` keys after the tokens: extra key tiles), and the brute force of the same attention: the
    tokens gathered into tile order by hand (padding slots dropped by a -inf key bias), attended with the
    explicit mask, scattered back (prefix rows 0)."""
    slots = tile_layout(grid, tile).slots
    n, t = math.prod(grid), math.prod(tile)
    layout = make_layout(b, h, slots.numel(), p + slots.numel() + extra, t, t, p, masks=masks, device=device)
    layout["tile_rows"] = (slots + p).to(device=device, dtype=torch.int32)
    real = slots < n
    rows = p + slots.clamp(max=n - 1)

    def brute(q, k, v):
        bias = torch.zeros(1, 1, p + slots.numel() + extra, dtype=torch.float64)
        bias[..., p:p + slots.numel()][..., ~real] = float("-inf")
        keys = [torch.cat([x[:, :, :p], x[:, :, rows.to(x.device)], x[:, :, p + n:]], 2) for x in (k, v)]
        out_t = brute_force(q[:, :, rows.to(q.device)], *keys,
                            {**{k_: v_ for k_, v_ in layout.items() if k_ != "tile_rows"}, "key_bias": bias})
        out = out_t.new_zeros(b, h, p + n, d)
        out[:, :, (p + slots[real]).to(out.device)] = out_t[:, :, real.to(out.device)]
        return out
    return layout, qkv(b, h, p + n, p + n + extra, d, dtype, device), brute


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("grid,tile,p,masks", [((8, 12), (4, 4), 0, False), ((7, 10), (4, 4), 3, True),
                                               ((5, 9), (2, 8), 17, False)])
def test_tile_rows_attend_tokens_in_place(backend, grid, tile, p, masks):
    """tile_rows: 2D tiles of a raster grid (non-divisible ones padded) read in place equal the tokens
    permuted into tile order by hand; forward and gradients, prefix rows of the output 0."""
    layout, (q, k, v), brute = in_place_case(grid, tile, p, masks=masks)
    check_against(lambda q, k, v: block_sparse_attention(q, k, v, backend=backend, **layout), brute, q, k, v,
                  torch.float32, f"{backend} in place")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("grid,p,extra", [((8, 12), 0, 32), ((7, 10), 3, 21)])
def test_tile_rows_extra_key_tiles(backend, grid, p, extra):
    """Keys after the tokens in place are extra key tiles of consecutive rows (the last one partial)."""
    layout, (q, k, v), brute = in_place_case(grid, (4, 4), p, masks=True, extra=extra)
    check_against(lambda q, k, v: block_sparse_attention(q, k, v, backend=backend, **layout), brute, q, k, v,
                  torch.float32, f"{backend} in place, {extra} extra keys")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("grid,p,extra", [((7, 10), 3, 0), ((8, 12), 1, 21)])
def test_prefix_queries_in_the_output(backend, grid, p, extra):
    """prefix_queries: the prefix rows hold the prefix queries' dense attention over the tokens (not the extra
    keys), forward and gradients, the Triton op computing and differentiating them itself."""
    layout, (q, k, v), brute = in_place_case(grid, (4, 4), p, masks=True, extra=extra)
    n = p + math.prod(grid)

    def with_prefix(q, k, v):
        scores = (q[:, :, :p].double() @ k[:, :, :n].double().transpose(-2, -1)) / math.sqrt(q.shape[-1])
        dense = scores.softmax(-1) @ v[:, :, :n].double()
        return torch.cat([dense, brute(q, k, v)[:, :, p:]], 2)
    check_against(lambda q, k, v: block_sparse_attention(q, k, v, backend=backend, prefix_queries=True, **layout),
                  with_prefix, q, k, v, torch.float32, f"{backend} prefix queries")
    without_rows = {key: value for key, value in layout.items() if key != "tile_rows"}
    with pytest.raises(ValueError, match="prefix_queries=True needs tile_rows"):
        block_sparse_attention(q, k, v, backend=backend, prefix_queries=True, **without_rows)


@requires_triton
def test_prefix_queries_keep_sdpa_scale_under_a_custom_scale():
    """With a custom scale for the listed tiles, the prefix rows stay SDPA's (default scale) in the Triton op's
    forward and backward alike, as in the reference."""
    layout, (q, k, v), _ = in_place_case((7, 10), (4, 4), 2, masks=True)

    def run(backend):
        return lambda q, k, v: block_sparse_attention(q, k, v, backend=backend, prefix_queries=True, scale=0.3,
                                                      **layout)
    check_against(run("triton"), run("reference"), q, k, v, torch.float32, "triton prefix queries, scale 0.3")


@requires_triton
def test_tile_rows_bf16():
    layout, (q, k, v), brute = in_place_case((7, 10), (4, 4), 2, dtype=torch.bfloat16)
    check_against(lambda q, k, v: block_sparse_attention(q, k, v, backend="triton", **layout), brute, q, k, v,
                  torch.bfloat16, "triton in place bf16")


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("grid,p,shared,own", [((9, 14), 2, 3, 2), ((13, 17), 0, 5, 3), ((11, 21), 1, 4, 6)])
def test_query_tiles_of_grouped_key_tiles_equal_the_tiles_own_lists(grid, p, shared, own, dtype):
    """Forward with ``QueryTiles``: query tiles of 4 key tiles' rows side by side (the last one short of tiles),
    each listing ``shared`` key tiles for all its rows and ``own`` per key tile for that tile's rows only, equal
    the forward over the key tiles as query tiles, each listing its shared and own entries (output and
    log-sum-exp); the own entries are a part of a loop step or one and a part (4 tiles a step)."""
    forward, QueryTiles = block_sparse_triton.forward, block_sparse_triton.QueryTiles
    g = torch.Generator().manual_seed(0)
    b, h, d, group = 2, 2, 16, 4
    layout = tile_layout(grid, (4, 4), False, "cpu")
    tiles, n = layout.num_tiles, p + math.prod(grid)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3))
    key_bias = torch.randn(b, 1, n, generator=g)
    tile_rows = (layout.slots + p).to(torch.int32)
    num_groups = -(-tiles // group)
    shared_lists = torch.randint(0, tiles, (b, h, num_groups, shared), generator=g)
    own_lists = torch.randint(0, tiles, (b, h, num_groups, group, own), generator=g)
    grouped = torch.cat([shared_lists, own_lists.flatten(-2)], -1).to(torch.int32)
    member = torch.arange(tiles)
    per_tile = torch.cat([shared_lists[:, :, member // group], own_lists[:, :, member // group, member % group]], -1)
    padded = torch.cat([tile_rows, torch.full((num_groups * group * 16 - tile_rows.numel(),), n, dtype=torch.int32)])
    scale = d ** -0.5
    out, lse = forward(q, k, v, fixed_width_row_ptr(b, h, num_groups, shared + group * own, "cpu"),
                       grouped.flatten(), None, None, key_bias, tile_rows, group * 16, 16, p, scale, False,
                       query_tiles=QueryTiles(padded, shared, group))
    want, want_lse = forward(q, k, v, fixed_width_row_ptr(b, h, tiles, shared + own, "cpu"),
                             per_tile.to(torch.int32).flatten(), None, None, key_bias, tile_rows, 16, 16, p, scale,
                             False)
    assert_rel_close(out, want, dtype, what="output")
    assert_rel_close(lse[:, :, p:], want_lse[:, :, p:], torch.float32, what="log-sum-exp")
    assert torch.equal(out[:, :, :p], want[:, :, :p]) and torch.equal(lse[:, :, :p], want_lse[:, :, :p])


def test_tile_rows_argument_errors():
    layout, (q, k, v), _ = in_place_case((8, 8), (4, 4), 0)
    with pytest.raises(ValueError, match="block_m == block_n and Nk >= Nq"):
        block_sparse_attention(q, k[:, :, :-1], v[:, :, :-1], **layout)
    with pytest.raises(ValueError, match="1-D int32"):
        block_sparse_attention(q, k, v, **{**layout, "tile_rows": layout["tile_rows"].long()})
    with pytest.raises(ValueError, match="row_ptr must have shape"):
        block_sparse_attention(q, k, v, **{**layout, "tile_rows": layout["tile_rows"][:-16]})


def test_dispatch_and_argument_errors():
    q, k, v = qkv(1, 1, 32, 32, 16, torch.float32)
    row_ptr, col_idx = block_mask_to_csr(torch.ones(1, 1, 2, 2, dtype=torch.bool))
    out = block_sparse_attention(q, k, v, row_ptr=row_ptr, col_idx=col_idx, block_m=16, block_n=16)
    assert_rel_close(out, F.scaled_dot_product_attention(q, k, v), what="dispatched on CPU")
    with pytest.raises(ValueError, match="power of two"):
        block_sparse_attention(q, k, v, row_ptr=row_ptr, col_idx=col_idx, block_m=24, block_n=16)
    with pytest.raises(ValueError, match="row_ptr must have shape"):
        block_sparse_attention(q, k, v, row_ptr=row_ptr, col_idx=col_idx, block_m=32, block_n=16)
    with pytest.raises(ValueError, match="int32"):
        block_sparse_attention(q, k, v, row_ptr=row_ptr.long(), col_idx=col_idx, block_m=16, block_n=16)
    with pytest.raises(ValueError, match="go together"):
        block_sparse_attention(q, k, v, row_ptr=row_ptr, col_idx=col_idx, block_m=16, block_n=16,
                               tile_mask_idx=col_idx)
    with pytest.raises(ValueError, match="col_idx must lie"):
        block_sparse_attention(q, k, v, row_ptr=row_ptr, col_idx=col_idx + 1, block_m=16, block_n=16,
                               backend="reference")
    if "triton" in available_backends("block_sparse_attention"):
        with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
            block_sparse_attention(q.double(), k.double(), v.double(), row_ptr=row_ptr, col_idx=col_idx,
                                   block_m=16, block_n=16, backend="triton")
    with pytest.raises(ValueError, match="no backend"):
        block_sparse_attention(q, k, v, row_ptr=row_ptr, col_idx=col_idx, block_m=16, block_n=16, backend="natten")


# --- GPU: real sizes, dense vs SDPA, fuzz --------------------------------------------------------

def _gpu_check(b, h, nq, nk, d, dtype, layout, what, grads=True, vanishing=""):
    q, k, v = qkv(b, h, nq, nk, d, dtype, "cuda")
    check_against(lambda q, k, v: block_sparse_attention(q, k, v, **layout),
                  lambda q, k, v: block_sparse_attention(q, k, v, backend="reference", **layout),
                  q, k, v, dtype, what, grads, vanishing)


@pytest.mark.gpu
@pytest.mark.parametrize("n,bm", [(16384, 128), (32768, 64), (65536, 128)])
def test_gpu_real_sizes(n, bm):
    """16k-64k tokens, bf16, d=64, 4 heads: ~8 key tiles per query tile, a cls prefix, masks and bias."""
    p, bn = 1, 64
    nkt = num_tiles(n, bn)
    layout = make_layout(1, 4, n, n + p, bm, bn, p, density=8 / nkt, masks=True, bias=True, device="cuda")
    _gpu_check(1, 4, n, n + p, 64, torch.bfloat16, layout, f"N={n}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 32), (torch.float16, 128), (torch.float32, 64),
                                     (torch.bfloat16, 72)])
def test_gpu_dtypes_and_head_dims(dtype, d):
    layout = make_layout(2, 3, 3000, 3010, 128, 64, 10, density=0.3, masks=True, bias=True, device="cuda")
    _gpu_check(2, 3, 3000, 3010, d, dtype, layout, f"{dtype} d={d}")


@pytest.mark.gpu
@pytest.mark.parametrize("bm,bn", [(128, 64), (64, 64), (128, 128)])
def test_gpu_dense_matches_sdpa(bm, bn):
    n = 16384
    row_ptr, col_idx = block_mask_to_csr(torch.ones(1, 1, n // bm, n // bn, dtype=torch.bool, device="cuda"))
    q, k, v = qkv(1, 4, n, n, 64, torch.bfloat16, "cuda")
    check_against(lambda q, k, v: block_sparse_attention(q, k, v, row_ptr=row_ptr, col_idx=col_idx, block_m=bm,
                                                         block_n=bn),
                  F.scaled_dot_product_attention, q, k, v, torch.bfloat16, "dense vs SDPA")


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    layout = make_layout(2, 4, 1000, 1001, 128, 64, 1, masks=True, bias=True, device="cuda")
    q, k, v = qkv(2, 4, 1000, 1001, 64, torch.bfloat16, "cuda")
    fn = lambda q, k, v: block_sparse_attention(q, k, v, **layout)  # noqa: E731
    check_against(torch.compile(fn, fullgraph=True),
                  lambda q, k, v: block_sparse_attention(q, k, v, backend="reference", **layout),
                  q, k, v, torch.bfloat16, "compiled")


@pytest.mark.gpu
def test_gpu_fuzz():
    """200 random configurations (shapes, padding, prefix, density incl. empty rows, masks, bias)."""
    rng = random.Random(1234)
    failures = []
    for trial in range(200):
        b, h = rng.choice([1, 2]), rng.choice([1, 2, 4])
        nq = rng.randint(1, 2500)
        p = rng.choice([0, 0, 1, 4, 77])
        nk = p + rng.randint(1, 2500)
        # one tile shape, dtype and masks+bias switch: 8 kernel variants to compile (most of the test's
        # time went to compiling 32); other tiles and dtypes: test_gpu_dtypes_and_head_dims, real sizes
        bm, bn = 64, 64
        dtype = torch.bfloat16
        masked = rng.random() < 0.5
        layout = make_layout(b, h, nq, nk, bm, bn, p, density=rng.choice([0.0, 0.05, 0.3, 1.0]),
                             per_head=rng.random() < 0.5, masks=masked, bias=masked,
                             empty_rows=rng.random() < 0.5, device="cuda",
                             generator=torch.Generator().manual_seed(trial))
        # one prefix key and no listed tile: every query sees that one key, so dq = dk = 0 exactly
        one_key = p == 1 and layout["col_idx"].numel() == 0
        try:
            _gpu_check(b, h, nq, nk, 64, dtype, layout, f"trial {trial}", vanishing="qk" if one_key else "")
        except AssertionError as err:
            failures.append(f"trial {trial} (b={b} h={h} nq={nq} nk={nk} p={p} bm={bm} bn={bn} {dtype}): {err}")
    assert not failures, "\n".join(failures)
