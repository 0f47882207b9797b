"""loglinear_attention (LLSA): the hierarchical selection against a brute-force top-K recomputed
level by level, the output against dense attention over the explicit selected key set (tokens and
weighted pooled tokens), and the selection cost O(N log N)."""
import importlib
import math

import pytest
import torch

from subquad.kernels import available_backends, loglinear_attention
from subquad.kernels.loglinear.block_sparse import (core_inputs, key_tile_lists, pooled_key_counts,
                                                     pooled_key_gradients, pooled_key_tiles, sibling_group,
                                                     sibling_query_tiles, with_pooled_keys)
from subquad.kernels.loglinear.plan import auto_levels, block_hierarchy, normalize_options, pool_levels, select_blocks
from subquad.kernels.core.testing import assert_compiles_to_the_same, assert_rel_close
from subquad.kernels.core.tiles import to_tiles


def blocks_of(grid, size):
    """Per block of side ``size`` (raster order of the block grid): the raster grid tokens it holds."""
    h, w = grid
    nby, nbx = -(-h // size), -(-w // size)
    return [[r * w + c for r in range(by * size, min(h, by * size + size)) for c in range(bx * size, min(w, bx * size + size))]
            for by in range(nby) for bx in range(nbx)], nbx


def brute_force_selection(q, k, grid, side, top_k):
    """{(b, h, level, query block): selected key blocks} and the candidates, recomputed with loops
    from the definition; level 0 is the finest. q, k: (B, h, HW, d) grid tokens, float64."""
    levels = len(top_k)
    info = [blocks_of(grid, side ** (l + 1)) for l in range(levels)]
    pooled = [[torch.stack([x[:, :, toks].mean(2) for toks in info[l][0]], 2) for l in range(levels)] for x in (q, k)]
    selected, candidates = {}, {}
    for b in range(q.shape[0]):
        for hd in range(q.shape[1]):
            for level in range(levels - 1, -1, -1):
                n, nbx = len(info[level][0]), info[level][1]
                for qb in range(n):
                    if level == levels - 1:
                        cand = list(range(n))
                    else:
                        pnbx = info[level + 1][1]
                        parent = (qb // nbx // side) * pnbx + (qb % nbx) // side
                        cand = []
                        for p in selected[b, hd, level + 1, parent]:
                            py, px = divmod(p, pnbx)
                            cand += [y * nbx + x for y in range(py * side, py * side + side)
                                     for x in range(px * side, px * side + side)
                                     if y < -(-grid[0] // side ** (level + 1)) and x < nbx]
                    score = {c: float(pooled[0][level][b, hd, qb] @ pooled[1][level][b, hd, c]) for c in cand}
                    selected[b, hd, level, qb] = sorted(cand, key=lambda c: -score[c])[:top_k[level]]
                    candidates[b, hd, level, qb] = cand
    return selected, candidates, info


def pool_blocks(x, layout):
    """The mean of each block's real tokens, pooled directly from the tokens at any level."""
    return to_tiles(x.double(), layout).sum(-2) / layout.valid.sum(-1, keepdim=True)


def package_selection(q, k, grid, side, top_k):
    hierarchy = block_hierarchy(grid, side, len(top_k))
    pq = [pool_blocks(q, layout) for layout in hierarchy.layouts]
    pk = [pool_blocks(k, layout) for layout in hierarchy.layouts]
    return select_blocks(pq, pk, hierarchy, top_k)


CASES = [((13, 17), 4, (3, 2, 2), 0), ((40, 36), 16, (5, 3), 1), ((21, 10), 4, (4, 3), 2), ((9, 11), 9, (4,), 1),
         ((30, 7), 4, (3, 2, 1), 0), ((32, 48), 16, (4, 2), 0)]


@pytest.mark.parametrize("grid,block,top_k,p", CASES)
def test_selection_equals_brute_force_top_k_level_by_level(grid, block, top_k, p):
    q, k = torch.randn(2, 2, grid[0] * grid[1], 8, dtype=torch.float64), torch.randn(2, 2, grid[0] * grid[1], 8, dtype=torch.float64)
    side = math.isqrt(block)
    selection = package_selection(q, k, grid, side, top_k)
    hierarchy = block_hierarchy(grid, side, len(top_k))
    want, want_cand, _ = brute_force_selection(q, k, grid, side, top_k)
    for (b, hd, level, qb), blocks in want.items():
        got = selection.selected[level][b, hd, qb].tolist()
        assert sorted(x for x in got if x >= 0) == sorted(blocks), (level, qb)
        top = level == len(top_k) - 1          # candidates are kept per group: the parent, one group at the top
        got_cand = selection.candidates[level][(0, 0, 0) if top else (b, hd, int(hierarchy.parent[level][qb]))]
        assert sorted(x for x in got_cand.tolist() if x >= 0) == sorted(want_cand[b, hd, level, qb])


@pytest.mark.parametrize("grid,block,top_k,p", CASES)
def test_pool_levels_equals_pooling_each_level_directly(grid, block, top_k, p):
    hierarchy = block_hierarchy(grid, math.isqrt(block), len(top_k))
    x = torch.randn(2, 3, grid[0] * grid[1], 5)
    for got, layout in zip(pool_levels(x, hierarchy), hierarchy.layouts):
        assert_rel_close(got, pool_blocks(x, layout), torch.float32)


TRITON_SELECTION_CASES = [((13, 17), 16, (4, 2)), ((40, 36), 16, (5, 3)), ((32, 48), 16, (4, 2)),
                          ((70, 50), 16, (8, 4, 1)), ((50, 41), 64, (3, 1)), ((9, 8), 16, (3,))]


@pytest.mark.skipif("triton" not in available_backends("loglinear_attention"), reason="no Triton")
@pytest.mark.parametrize("grid,block,top_k", TRITON_SELECTION_CASES)
@pytest.mark.parametrize("top_in_torch", [False, True])
def test_triton_selection_equals_select_blocks(grid, block, top_k, top_in_torch, monkeypatch):
    """The Triton selection picks the blocks of ``select_blocks`` at every level (as sets: the order of equal
    picks is free), -1 where fewer than K candidates exist; the coarsest level in Triton or, past
    ``MAX_TOP_BLOCKS`` blocks, by torch's top-K."""
    triton_select = importlib.import_module("subquad.kernels.loglinear.triton_select")
    if top_in_torch:
        monkeypatch.setattr(triton_select, "MAX_TOP_BLOCKS", 0)
    hierarchy = block_hierarchy(grid, math.isqrt(block), len(top_k))
    pq, pk = (pool_levels(torch.randn(2, 3, grid[0] * grid[1], 24), hierarchy) for _ in range(2))
    want = select_blocks(pq, pk, hierarchy, top_k).selected
    got = triton_select.select_blocks_triton(pq, pk, hierarchy, top_k)
    for level, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a.sort(-1).values, b.sort(-1).values), f"level {level + 1}"


@pytest.mark.skipif("triton" not in available_backends("loglinear_attention"), reason="no Triton")
@pytest.mark.parametrize("grid,block,top_k", TRITON_SELECTION_CASES)
@pytest.mark.parametrize("p", [0, 2])
def test_triton_key_tile_lists_equal_the_torch_lists(grid, block, top_k, p):
    """The lists kernel writes ``key_tile_lists``' col_idx from the same selection (packed as the Triton
    selection keeps it: every level in one buffer), -1 entries (fewer candidates than K) on the null tile."""
    triton_select = importlib.import_module("subquad.kernels.loglinear.triton_select")
    side = math.isqrt(block)
    hierarchy = block_hierarchy(grid, side, len(top_k))
    pq, pk = (pool_levels(torch.randn(2, 3, grid[0] * grid[1], 24), hierarchy) for _ in range(2))
    selected = select_blocks(pq, pk, hierarchy, top_k).selected
    buffer = torch.cat([s.flatten(2) for s in selected], -1)
    sizes = [s[0, 0].numel() for s in selected]
    packed = [part.unflatten(-1, s.shape[2:]) for part, s in zip(buffer.split(sizes, -1), selected)]
    _, want = key_tile_lists(selected, grid, p, side)
    got = triton_select.key_tile_lists_triton(packed, grid, p, side)
    assert got.dtype == want.dtype and torch.equal(got, want)


def explicit_llsa(q, k, v, grid, side, top_k, p):
    """Dense attention over [prefix, grid tokens, pooled tokens of every level] with an explicit
    mask from the brute-force selection and log(block size) added to pooled tokens' scores."""
    qg, kg = q[:, :, p:].detach().double(), k[:, :, p:].detach().double()
    selected, candidates, info = brute_force_selection(qg, kg, grid, side, top_k)
    hw = grid[0] * grid[1]
    pool = [torch.zeros(len(blocks), hw, dtype=torch.float64) for blocks, _ in info]   # pooling matrices
    for l, (blocks, _) in enumerate(info):
        for i, toks in enumerate(blocks):
            pool[l][i, toks] = 1.0 / len(toks)
    keys = torch.cat([k.double()] + [m @ k[:, :, p:].double() for m in pool], 2)
    values = torch.cat([v.double()] + [m @ v[:, :, p:].double() for m in pool], 2)
    offsets = [p + hw]
    for m in pool:
        offsets.append(offsets[-1] + m.shape[0])
    bsz, heads, n, _ = q.shape
    mask = torch.zeros(bsz, heads, n, keys.shape[2], dtype=torch.bool)
    mask[:, :, :p, :p + hw] = True
    mask[:, :, p:, :p] = True
    bias = torch.zeros(keys.shape[2], dtype=torch.float64)
    for l, (blocks, _) in enumerate(info):
        bias[offsets[l]:offsets[l + 1]] = torch.tensor([math.log(len(t)) for t in blocks], dtype=torch.float64)
    fine, nbx = info[0]
    for b in range(bsz):
        for hd in range(heads):
            for qb, q_toks in enumerate(fine):
                rows = [p + t for t in q_toks]
                for kb in selected[b, hd, 0, qb]:
                    mask[b, hd, torch.tensor(rows)[:, None], torch.tensor([p + t for t in fine[kb]])[None, :]] = True
                for l in range(len(top_k)):
                    anc = blocks_of(grid, side ** (l + 1))
                    r, c = divmod(fine[qb][0], grid[1])
                    a = (r // side ** (l + 1)) * anc[1] + c // side ** (l + 1)
                    for kb in candidates[b, hd, l, a]:
                        mask[b, hd, rows, offsets[l] + kb] = True
    s = (q.double() @ keys.transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias
    return (s.masked_fill(~mask, float("-inf")).softmax(-1) @ values).to(q.dtype)


@pytest.mark.parametrize("grid,block,top_k,p", CASES[:4])
def test_output_equals_dense_attention_over_the_explicit_selection(grid, block, top_k, p):
    n = p + grid[0] * grid[1]
    q, k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for _ in range(3))
    out = loglinear_attention(q, k, v, grid=grid, num_prefix=p, block_size=block, top_k=top_k)
    want = explicit_llsa(q, k, v, grid, math.isqrt(block), top_k, p)
    assert_rel_close(out, want, what="forward")
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        assert a.abs().sum() > 0
        assert_rel_close(a, b, torch.float32, what=f"d{name}")
    out16 = loglinear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), grid=grid, num_prefix=p, block_size=block,
                                top_k=top_k)
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()


@pytest.mark.parametrize("grid,levels", [((32, 32), 1), ((64, 64), 1), ((127, 129), 1), ((128, 128), 2),
                                         ((96, 200), 2), ((256, 256), 3)])
def test_default_levels_one_below_16384_tokens(grid, levels):
    """The paper's recommendation: one level below 16,384 tokens; above, levels while the coarsest selection
    costs more per query block than a finer one (block 16, top-K 8)."""
    assert auto_levels(grid, 4, 8) == levels
    assert len(normalize_options(grid)[1]) == levels


def test_selection_cost_grows_as_n_log_n():
    """Block pairs scored, with the default options (block 16, K = 8, levels chosen per grid; two
    levels from 64x64 on)."""
    sides, cost = (64, 128, 256), []
    for s in sides:
        q = torch.randn(1, 1, s * s, 8)
        side, top_k = normalize_options((s, s))
        cost.append(package_selection(q, q, (s, s), side, top_k).cost(block_hierarchy((s, s), side, len(top_k))))
    per = [c / (s * s * math.log2(s * s)) for s, c in zip(sides, cost)]
    assert per == sorted(per, reverse=True), (cost, per)
    assert all(math.log(b / a) / math.log(4) < 1.2 for a, b in zip(cost, cost[1:])), cost


@pytest.mark.parametrize("grid,opts,match", [
    ((8, 8), dict(top_k=5), "top_k=5 is larger than the 4 level-1 blocks"),
    ((16, 16), dict(top_k=(8, 2)), "top_k=2 is larger than the 1 level-2 blocks"),
    ((64, 64), dict(top_k=(40, 2)), "larger than its 32 candidates"),
    ((4, 8, 8), dict(), "image grids"),
    ((8, 8), dict(block_size=8), "perfect square"),
    ((8, 8), dict(top_k=(2, 1), levels=3), "2 values for 3 levels"),
    ((8, 8), dict(topk=2), "unknown options"),
])
def test_bad_options_are_value_errors(grid, opts, match):
    q = torch.randn(1, 1, math.prod(grid), 8)
    with pytest.raises(ValueError, match=match):
        loglinear_attention(q, q, q, grid=grid, **opts)


def test_float64_gradcheck():
    q, k, v = (torch.randn(1, 2, 1 + 7 * 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fn = lambda q, k, v: loglinear_attention(q, k, v, grid=(7, 9), num_prefix=1, block_size=4, top_k=(3, 2))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


# --- on the block-sparse core ------------------------------------------------------------------


def check_backend(backend, grid, p, opts, dtype=torch.float32, heads=2, d=16, device="cpu"):
    n = p + grid[0] * grid[1]
    q, k, v = (torch.randn(2, heads, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    want = loglinear_attention(q, k, v, grid=grid, num_prefix=p, backend="reference", **opts)
    out = loglinear_attention(q, k, v, grid=grid, num_prefix=p, backend=backend, **opts)
    assert_rel_close(out, want, dtype, what=backend)
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        assert_rel_close(a, b, dtype, what=f"{backend} d{name}")


@pytest.mark.parametrize("grid,p,opts", [((13, 17), 1, dict(top_k=4)), ((40, 36), 0, dict(top_k=(5, 3))),
                                         ((70, 50), 2, dict(top_k=(8, 4)))])
def test_block_sparse_core_backend_equals_reference(grid, p, opts):
    """Selected tiles plus pooled tokens as extra key tiles of the core's CSR (run by the core's
    reference here)."""
    check_backend("block_sparse", grid, p, opts)


def test_blocks_the_core_cannot_run():
    """3x3 blocks are too small for the core: naming the core's backend is an error that says why;
    with no backend named the reference runs."""
    q = torch.randn(1, 1, 9 * 11, 16)
    with pytest.raises(ValueError, match="power of two >= 16"):
        loglinear_attention(q, q, q, grid=(9, 11), backend="block_sparse", block_size=9, top_k=3)
    assert_rel_close(loglinear_attention(q, q, q, grid=(9, 11), block_size=9, top_k=3),
                     loglinear_attention(q, q, q, grid=(9, 11), backend="reference", block_size=9, top_k=3))


@pytest.mark.skipif("triton" not in available_backends("loglinear_attention"), reason="no Triton")
@pytest.mark.parametrize("grid,p,opts,key_chunk,dtype", [
    ((9, 8), 1, dict(top_k=3), None, torch.float32), ((13, 17), 1, dict(top_k=4), 2, torch.float32),
    ((20, 17), 0, dict(top_k=(4, 2)), 3, torch.bfloat16)])
def test_triton_core_backend_equals_reference(grid, p, opts, key_chunk, dtype, monkeypatch):
    """The Triton core on the CPU interpreter; ``key_chunk``: query tiles per dK/dV program, small here so
    that the pooled key tiles (listed by many query blocks) are split as on large grids."""
    if key_chunk is not None:
        monkeypatch.setattr(importlib.import_module("subquad.kernels.block_sparse.triton"), "KEY_CHUNK", key_chunk)
    check_backend("triton", grid, p, opts, dtype=dtype, heads=1)


@pytest.mark.skipif("triton" not in available_backends("loglinear_attention"), reason="no Triton")
@pytest.mark.parametrize("grid,p,top_k,dtype", [((20, 28), 0, (5, 2), torch.float32), ((20, 28), 2, (3, 2), torch.bfloat16),
                                                ((36, 44), 1, (5, 3), torch.bfloat16), ((36, 44), 0, (3, 1), torch.float32)])
def test_triton_sibling_tiles_forward_equals_reference(grid, p, top_k, dtype):
    """The forward over query tiles of 4 sibling blocks (``sibling_query_tiles``), each block's own tiles taken for
    the 4 at once (a batched product per step), at K_1 not a multiple of the tiles of a step, on non-square grids
    with partial blocks and strips, with and without prefix tokens."""
    assert sibling_group(4) == 4
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, p + math.prod(grid), 32, generator=g).to(dtype) for _ in range(3))
    want = loglinear_attention(q, k, v, grid=grid, num_prefix=p, backend="reference", top_k=top_k)
    out = loglinear_attention(q, k, v, grid=grid, num_prefix=p, backend="triton", top_k=top_k)
    assert_rel_close(out, want, dtype, what="triton sibling tiles")


@pytest.mark.parametrize("grid,p,top_k", [((13, 17), 1, (4,)), ((40, 37), 2, (5, 3)), ((70, 66), 0, (2, 2, 1))])
def test_sibling_query_tiles_cover_the_grid_with_blocks_of_one_parent(grid, p, top_k):
    """The forward's query tiles: every grid token's row once (the rest padding), each tile's blocks children of
    one parent (so that the shared columns, taken from its first block, are every member's), the lists gathered as
    shared columns then each block's own (group-major, as ``QueryTiles`` takes them)."""
    side, group = 4, sibling_group(4)
    rows, gather, num_shared, tiles = sibling_query_tiles(grid, side, top_k, p, torch.device("cpu"))
    n = math.prod(grid)
    assert group == 4 and rows.numel() == tiles * group * 16
    real = rows[rows < p + n]
    assert torch.equal(real.sort().values, torch.arange(p, p + n, dtype=real.dtype))
    assert bool((rows[rows >= p + n] == p + n).all())
    hierarchy = block_hierarchy(grid, side, len(top_k))
    position = hierarchy.layouts[0].position
    blocks = torch.full((tiles, group), -1)
    for i, r in enumerate(rows.reshape(tiles, group, 16)):
        for j, slot in enumerate(r):
            if bool((slot < p + n).any()):
                blocks[i, j] = int(position[slot[slot < p + n][0] - p]) // 16
    if len(top_k) > 1:
        parents = hierarchy.parent[0][blocks.clamp_min(0)]
        assert bool(((parents == parents[:, :1]) | (blocks < 0)).all())
    width = pooled_key_counts(grid, side, top_k)[2]
    shared = width - top_k[0]
    assert num_shared == shared
    columns = gather.reshape(tiles, -1)
    assert torch.equal(columns[:, :shared], blocks[:, :1] * width + top_k[0] + torch.arange(shared))
    own = columns[:, shared:].reshape(tiles, group, top_k[0])
    members = torch.where(blocks >= 0, blocks, blocks[:, :1])
    assert torch.equal(own, members[..., None] * width + torch.arange(top_k[0]))


@pytest.mark.parametrize("grid,p,block,top_k", [((13, 17), 1, 16, (4,)), ((40, 36), 0, 16, (5, 3)),
                                                 ((30, 7), 2, 4, (3, 2, 1)), ((64, 64), 0, 16, (8, 8))])
def test_pooled_key_counts_are_the_sizes_of_the_core_inputs(grid, p, block, top_k):
    """The sizes a call's fake (torch.compile) gives without running it equal the real buffers and lists."""
    side = math.isqrt(block)
    q, k, v = (torch.randn(2, 3, p + math.prod(grid), 8) for _ in range(3))
    c = core_inputs(q, k, v, grid, p, side, top_k)
    pooled, n1, width = pooled_key_counts(grid, side, top_k)
    assert c.keys.shape == c.values.shape == (2, 3, p + math.prod(grid) + pooled + side * side, 8)
    assert c.col_idx.shape == (2 * 3 * n1 * width,) and c.row_ptr.shape == (2, 3, n1 + 1)


def test_pooled_key_gradients_equal_autograd_through_the_pooling():
    """The Triton op's backward spreads each pooled key's gradient over its block's tokens: the same as
    autograd through ``with_pooled_keys`` and the pooling (non-square grid, partial blocks, three levels)."""
    grid, p, side, top_k = (30, 7), 2, 2, (3, 2, 1)
    k = torch.randn(1, 2, p + math.prod(grid), 8, dtype=torch.float64, requires_grad=True)
    hierarchy = block_hierarchy(grid, side, len(top_k))
    rows = pooled_key_tiles(grid, side, len(top_k), p, k.device)[0]
    buffer = with_pooled_keys(k, pool_levels(k[:, :, p:], hierarchy), rows, side * side)
    g = torch.randn_like(buffer)
    (want,) = torch.autograd.grad(buffer, k, g)
    assert_rel_close(pooled_key_gradients(g, grid, side, len(top_k), p), want, torch.float64)


requires_triton_backend = pytest.mark.skipif("triton" not in available_backends("loglinear_attention"),
                                             reason="no Triton")


@requires_triton_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("grid,p,side,levels", [((13, 17), 1, 4, 1), ((40, 36), 0, 4, 2), ((30, 7), 2, 2, 3)])
def test_triton_pooling_equals_the_torch_pooling(grid, p, side, levels, dtype):
    """pool_into_buffers (one launch per level) against pool_levels and the rows with_pooled_keys appends after the
    tokens; the padding rows, which the torch version fills with block 0's pooled row under a -inf bias, are zero
    here. Its backward spread against pooled_key_gradients."""
    triton_pool = importlib.import_module("subquad.kernels.loglinear.triton_pool")
    b, h, d = 2, 3, 24
    n = p + math.prod(grid)
    q, k, v = (torch.randn(b, h, n, d).to(dtype) for _ in range(3))
    k = k.transpose(1, 2).contiguous().transpose(1, 2)            # strided, as the qkv projection's views
    keys, values, pooled = triton_pool.pool_into_buffers(q, k, v, grid, p, side, levels)
    hierarchy = block_hierarchy(grid, side, levels)
    rows = pooled_key_tiles(grid, side, levels, p, q.device)[0]
    zero = triton_pool.pooling_tables(grid, side, levels, q.device)[1].long()
    for i, x in enumerate((q, k, v)):
        for level, want in enumerate(pool_levels(x[:, :, p:], hierarchy)):
            assert_rel_close(pooled[level][i], want, torch.float32, what=f"pooled {'qkv'[i]} level {level}")
    for x, buffer in ((k, keys), (v, values)):
        want = with_pooled_keys(x, pool_levels(x[:, :, p:], hierarchy), rows, side * side)[:, :, n:]
        kept = torch.ones(want.shape[2], dtype=torch.bool)
        kept[zero] = False
        assert buffer.shape == want.shape
        assert_rel_close(buffer[:, :, kept], want[:, :, kept], dtype, what="pooled rows")
        assert torch.equal(buffer[:, :, zero], torch.zeros_like(buffer[:, :, zero]))
    grads = [torch.randn(b, h, n, d).to(dtype) for _ in range(2)]
    pooled_grads = [torch.randn_like(keys), torch.randn_like(values)]
    for g in pooled_grads:
        g[:, :, zero] = 0                      # the core gives no gradient to padding rows (-inf bias)
    want = [pooled_key_gradients(torch.cat([g, pg], 2), grid, side, levels, p) for g, pg in zip(grads, pooled_grads)]
    triton_pool.spread_pooled_gradients(*grads, *pooled_grads, grid, p, side, levels)
    assert_rel_close(grads[0], want[0], dtype, what="dk")
    assert_rel_close(grads[1], want[1], dtype, what="dv")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid", [(64, 64), (128, 96)])
def test_gpu_triton_backend_equals_reference(grid, dtype):
    check_backend("triton", grid, 1, {}, dtype=dtype, heads=4, d=64, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,p,opts", [(128, 16, {}), (64, 0, dict(top_k=(5, 2))), (72, 1, dict(top_k=3))])
def test_gpu_sibling_tiles_at_other_head_dims_and_top_k_equal_reference(head_dim, p, opts):
    """The forward's sibling query tiles (each block's own tiles as one batched product) at head dim 128 (FLUX) and
    72 (DiT-XL/2), with prefix tokens, and at a top-K that no step width divides, forward and backward."""
    check_backend("triton", (64, 96), p, opts, dtype=torch.bfloat16, heads=2, d=head_dim, device="cuda")


# --- under torch.compile ----------------------------------------------------------------------

@pytest.mark.parametrize("backend,grid,p,opts", [
    ("reference", (33, 20), 0, {}), ("reference", (13, 17), 1, dict(top_k=4)),
    ("reference", (21, 10), 2, dict(block_size=4, top_k=(4, 3))),
    *(pytest.param("triton", grid, p, opts, marks=pytest.mark.skipif(
        "triton" not in available_backends("loglinear_attention"), reason="no Triton"))
      for grid, p, opts in (((9, 8), 1, dict(top_k=3)), ((17, 9), 1, dict(top_k=(3, 1)))))])
def test_compile_fullgraph(backend, grid, p, opts):
    """The options and the block hierarchy are constants under torch.compile (built eagerly, not
    traced); pooling, the top-K selection, the gathers and the core's fixed-width CSR are traced:
    the whole op is one graph. ``triton`` is the block-sparse core's kernel (the ``block_sparse``
    backend's choice on CUDA); on CPU ``block_sparse`` runs the core's reference, whose CSR checks
    read the indices on the host."""
    q, k, v = (torch.randn(1, 2, p + math.prod(grid), 16, requires_grad=True) for _ in range(3))
    fn = lambda q, k, v: loglinear_attention(q, k, v, grid=grid, num_prefix=p, backend=backend, **opts)  # noqa: E731
    assert_compiles_to_the_same(fn, q, k, v)


def test_compile_fullgraph_at_new_grids():
    """A recompile at a new grid makes the sizes symbolic; the options and the hierarchy specialize
    them (one hierarchy per grid). ``top_k`` as a list: made a tuple for the cache."""
    opts = dict(block_size=4, top_k=[3, 2])
    fn = torch.compile(lambda q, grid: loglinear_attention(q, q, q, grid=grid, num_prefix=1, **opts),
                       fullgraph=True, backend="eager")
    for grid in ((13, 17), (21, 10), (30, 7)):
        q = torch.randn(1, 2, 1 + math.prod(grid), 8)
        assert_rel_close(fn(q, grid), loglinear_attention(q, q, q, grid=grid, num_prefix=1, **opts), what=f"grid {grid}")
