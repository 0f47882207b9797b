"""radial_attention: the masks against their definitions (and the official code's output), the
reference against dense attention under the explicit token mask, and O(N log N) attended pairs."""
import math

import pytest
import torch

from subquad.kernels import radial_attention
from subquad.kernels.radial.full_frames import radial_attention_full_frames, takes_full_frames
from subquad.kernels.radial.plan import (attended_pairs, far_key_tiles, frame_tile_pairs, full_frame_spans,
                                         normalize_options, official_block_mask, radial_plan)
from subquad.kernels.core.testing import assert_compiles_to_the_same, assert_rel_close

# official radial_attn/attn_mask.py (72788d4), gen_log_mask_shrinked(...)[:nb, :nb], recorded on CPU
OFFICIAL = {
    (9, 77, 64, 1.0, True): ["11........1", "111.......1", "1111......1", "11111.....1", "11.11.....1",
                             "11..11....1", "11....11..1", "11.....11.1", "11.....1111", "11......111",
                             "11111111111"],
    (13, 100, 128, 1.0, False): ["1.........1", ".1........1", "..1.......1", "...1......1", "..........1",
                                 ".....1....1", "......1...1", ".......1..1", "........1.1", ".........11",
                                 "11111111111"],
}


@pytest.mark.parametrize("case", sorted(OFFICIAL))
def test_official_layout_matches_the_official_code(case):
    t, s, block, decay, sink = case
    got = official_block_mask(t, s, block, decay, sink)
    assert ["".join("1" if b else "." for b in row) for row in got.tolist()] == OFFICIAL[case]


def official_by_definition(t, s, block, decay, sink):
    """The official construction at token level, pair by pair: a band mask, placed at its offset
    in a window of ceil(S / block) blocks, reduced to blocks (kept when > 60% of the non-empty
    columns are > 1/3 dense), OR-ed into the block mask; the block straddling the end dense."""
    total, nbf = t * s, -(-s // block)
    nb = -(-total // block)
    mask = torch.zeros(nb, nb, dtype=torch.bool)
    mask[total // block:] = mask[:, total // block:] = total % block != 0
    idx = torch.arange(s)
    for i in range(t):
        for j in range(t):
            d = abs(i - j)
            density = 2 ** s.bit_length() / 2 ** d.bit_length()
            if not (sink and j == 0) and density < 128 and d % int(128 / density):
                continue
            width = s if (sink and j == 0) or d <= 1 else max(density * decay, block)
            local = (idx[None, :] - idx[:, None]).abs() <= width
            ro, co = (i * s) % block, (j * s) % block
            window = torch.zeros(ro + nbf * block, co + nbf * block, dtype=torch.bool)
            window[ro:ro + s, co:co + s] = local
            window = window[:nbf * block, :nbf * block].reshape(nbf, block, nbf, block)
            col_density = window.sum(1) / block                                     # (nbf, nbf, block)
            nonzero = (col_density > 0).sum(-1)
            kept = (col_density > 1 / 3).sum(-1) / (nonzero + 1e-9) > 0.6
            r, c = (i * s) // block, (j * s) // block
            mask[r:r + nbf, c:c + nbf] |= kept[:nb - r, :nb - c]
    return mask


@pytest.mark.parametrize("case", [(12, 40, 16, 0.5, True), (7, 96, 32, 1.0, False), (20, 33, 16, 0.2, True),
                                  (5, 64, 64, 1.0, True)])
def test_official_layout_equals_its_token_level_definition(case):
    assert torch.equal(official_block_mask(*case), official_by_definition(*case))


def test_distance_layout_by_definition():
    plan = radial_plan((40, 56), normalize_options((40, 56), layout="distance", tile=(4, 4), dense_radius=1))
    tw = 14
    for qt in (0, 37, 69, 139):
        want = set()
        for kt in range(10 * 14):
            dy, dx = kt // tw - qt // tw, kt % tw - qt % tw
            shell = max(abs(dy), abs(dx)) // 2
            stride = 2 ** shell.bit_length()
            if dy % stride == 0 and dx % stride == 0:
                want.add(kt)
        assert set(plan.key_tiles[qt].tolist()) - {-1} == want


@pytest.mark.parametrize("tile", [(1, 4, 4), (1, 2, 8)])
def test_frames_layout_by_definition(tile):
    """Video (T, H, W), tiles cut from the grid (``pack=False``): full frames at distance <= 1 and the sink frame;
    farther, a window of tiles about square in tokens whose area is about the official band's, kept every
    (tile / density) frames; non-square tiles too."""
    grid, (_, th, tw) = (12, 8, 12), tile
    plan = radial_plan(grid, normalize_options(grid, tile=tile, pack=False))
    s, fh, fw = 96, 8 // th, -(-12 // tw)
    per_frame = fh * fw
    for qt in (0, 7, 40, 71):
        want = set()
        for kt in range(12 * per_frame):
            fq, fk = qt // per_frame, kt // per_frame
            d = abs(fq - fk)
            dy, dx = abs((qt % per_frame) // fw - (kt % per_frame) // fw), abs(qt % fw - kt % fw)
            density = 2 ** s.bit_length() / 2 ** d.bit_length()
            side = math.sqrt(2 * density + 1)
            ry, rx = (max(0, round((side / t - 1) / 2)) for t in (th, tw))
            if d <= 1 or fk == 0 or ((density >= 16 or d % int(16 / density) == 0) and dy <= ry and dx <= rx):
                want.add(kt)
        assert set(plan.key_tiles[qt].tolist()) - {-1} == want


def test_packed_frames_cut_the_padding_and_keep_the_mask_by_definition():
    """Packed tiles (the default on video): a 30x52 frame in 25 tiles of 64 instead of 28; full frames at distance
    <= 1 and the sink frame; farther, the tiles whose token centres are within (r + 1/2) tile sides of the query
    tile's on each axis. At Wan's 480x832 latent size (21 frames) 19% fewer token pairs are computed for as
    many attended ones (within 2%)."""
    grid = (21, 30, 52)
    packed, unpacked = (radial_plan(grid, normalize_options(grid, decay_factor=0.2, pack=p)) for p in (None, False))
    assert (packed.layout.num_tiles, unpacked.layout.num_tiles) == (21 * 25, 21 * 28)
    computed = [int((p.key_tiles >= 0).sum()) * 64 * 64 for p in (packed, unpacked)]
    assert computed[0] < 0.82 * computed[1]
    assert attended_pairs(packed) == pytest.approx(attended_pairs(unpacked), rel=0.02)
    grid, s, per_frame = (12, 9, 10), 90, 6                           # tiles of 16: 6 a frame, the last padded
    plan = radial_plan(grid, normalize_options(grid, tile=(1, 4, 4)))
    slots = plan.layout.slots.reshape(-1, 16)
    centre = [(slots[t][plan.layout.valid[t]] % s).double() for t in range(len(slots))]
    centre = [torch.stack([c // 10, c % 10]).mean(-1) for c in centre]
    for qt in (0, 7, 40, 71):
        want = set()
        for kt in range(12 * per_frame):
            fq, fk = qt // per_frame, kt // per_frame
            d = abs(fq - fk)
            density = 2 ** s.bit_length() / 2 ** d.bit_length()
            r = max(0, round((math.sqrt(2 * density + 1) / 4 - 1) / 2))
            near = bool(((centre[qt] - centre[kt]).abs() < (r + 0.5) * 4).all())
            if d <= 1 or fk == 0 or ((density >= 16 or d % int(16 / density) == 0) and near):
                want.add(kt)
        assert set(plan.key_tiles[qt].tolist()) - {-1} == want


@pytest.mark.parametrize("grid,opts", [((9, 10), dict(pack=True)), ((4, 9, 10), dict(layout="official", pack=True))])
def test_pack_needs_the_frames_layout_of_a_video(grid, opts):
    with pytest.raises(ValueError, match="pack=True"):
        normalize_options(grid, **opts)


def token_mask(grid, num_prefix, **opts):
    """(N, N) bool: the plan's tile lists expanded to tokens, prefix rows and columns dense."""
    plan = radial_plan(tuple(grid), normalize_options(tuple(grid), **opts))
    n = plan.layout.num_tokens
    mask = torch.ones(num_prefix + n, num_prefix + n, dtype=torch.bool)
    mask[num_prefix:, num_prefix:] = token_mask_of(plan)
    return mask


def tile_of_tokens(layout):
    """(N,) long: the tile of each token."""
    n = layout.num_tokens
    tile_of = torch.empty(n, dtype=torch.long)
    tile_of[layout.slots[layout.slots < n]] = (torch.arange(layout.slots.numel()) // layout.tile_size)[layout.slots < n]
    return tile_of


def token_mask_of(plan):
    """(N, N) bool: a plan's tile lists expanded to tokens."""
    layout = plan.layout
    tile_of = tile_of_tokens(layout)
    listed = torch.zeros(layout.num_tiles, layout.num_tiles, dtype=torch.bool)
    rows = torch.arange(layout.num_tiles)[:, None].expand_as(plan.key_tiles)
    listed[rows[plan.key_tiles >= 0], plan.key_tiles[plan.key_tiles >= 0]] = True
    return listed[tile_of[:, None], tile_of[None, :]]


def masked_attention(q, k, v, mask):
    s = (q.double() @ k.double().transpose(-2, -1)) * q.shape[-1] ** -0.5
    return (s.masked_fill(~mask, float("-inf")).softmax(-1) @ v.double()).to(q.dtype)


CASES = [((13, 17), 1, dict(tile=(4, 4))), ((30, 21), 0, dict()), ((19, 33), 2, dict(layout="frames", tile=(4, 8))),
         ((6, 9, 10), 1, dict(tile=(1, 4, 4))), ((6, 9, 10), 1, dict(tile=(1, 4, 4), pack=False)),
         ((7, 5, 6), 1, dict(layout="official", block_size=16)),
         ((9, 7, 11), 0, dict(layout="official", block_size=32, decay_factor=0.5, sink=False))]


@pytest.mark.parametrize("grid,p,opts", CASES)
def test_reference_equals_dense_attention_with_the_mask(grid, p, opts):
    n = p + math.prod(grid)
    q, k, v = (torch.randn(2, 2, n, 8, requires_grad=True) for _ in range(3))
    out = radial_attention(q, k, v, grid=grid, num_prefix=p, **opts)
    mask = token_mask(grid, p, **opts)
    assert not mask.all()
    want = masked_attention(q, k, v, mask)
    assert_rel_close(out, want, what="forward")
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        assert_rel_close(a, b, torch.float32, what=f"d{name}")
    out16 = radial_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), grid=grid, num_prefix=p, **opts)
    assert_rel_close(out16, want, torch.bfloat16, what="bf16")


def keys_per_query(grid, **opts):
    return attended_pairs(radial_plan(grid, normalize_options(grid, **opts))) / math.prod(grid)


def steps(values):
    return [b - a for a, b in zip(values, values[1:])]


def test_attended_pairs_grow_as_n_log_n():
    """pairs / N must be affine in log N: equal steps for each doubling of the side (or of T)."""
    image = [keys_per_query((s, s)) for s in (32, 64, 128, 256)]
    assert max(steps(image)) / min(steps(image)) < 1.3, image
    for opts in (dict(), dict(layout="official", block_size=64)):     # 16x16 frames, T doubling
        video = [keys_per_query((t, 16, 16), **opts) for t in (8, 16, 32, 64)]
        assert max(steps(video)) / min(steps(video)) < 1.3, (opts, video)
    # the rows-as-frames image layout keeps whole rows of tiles: its pairs grow as N^1.5
    rows = [keys_per_query((s, s), layout="frames") for s in (32, 64, 128, 256)]
    assert steps(rows)[-1] > 1.8 * steps(rows)[-2], rows


def test_plans_are_cached():
    options = normalize_options((20, 20))
    first, again = radial_plan((20, 20), options), radial_plan((20, 20), options)
    assert first.key_tiles is again.key_tiles and first.layout.slots is again.layout.slots


@pytest.mark.parametrize("grid,opts,match", [
    ((4, 8, 8), dict(layout="distance"), "image-only"),
    ((8, 8), dict(layout="official"), "needs a"),
    ((8, 8), dict(layout="radial"), "layout must be one of"),
    ((8, 8), dict(tile=(4, 4, 4)), "one int >= 1 per axis"),
    ((4, 8, 8), dict(tile=(2, 4, 4)), r"tile\[0\] == 1"),
    ((8, 8), dict(decay_factor=0), "decay_factor"),
    ((8, 8), dict(dense_radius=0), "dense_radius must be an int >= 1"),
    ((8, 8), dict(window=3), "unknown options"),
])
def test_bad_options_are_value_errors(grid, opts, match):
    q = torch.randn(1, 1, math.prod(grid), 8)
    with pytest.raises(ValueError, match=match):
        radial_attention(q, q, q, grid=grid, **opts)


def test_float64_gradcheck():
    q, k, v = (torch.randn(1, 2, 1 + 7 * 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fn = lambda q, k, v: radial_attention(q, k, v, grid=(7, 9), num_prefix=1, tile=(2, 2))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("grid,opts", [((8, 16, 16), dict(tile=(1, 4, 4))),
                                       ((8, 16, 16), dict(layout="official", block_size=16))])
def test_bf16_reference_gradients_match_float64(grid, opts):
    """Fed bf16, the reference gathers float32 key/value copies: a key tile listed by ~100 query
    tiles sums its gradient copies in float32 (in bf16, dk and dv were ~1.4e-2 off float64)."""
    n = 1 + math.prod(grid)
    q, k, v = (torch.randn(1, 2, n, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    want = radial_attention(q, k, v, grid=grid, num_prefix=1, backend="reference", **opts)
    g = torch.randn_like(want)
    q16, k16, v16 = (x.detach().bfloat16().requires_grad_() for x in (q, k, v))
    out = radial_attention(q16, k16, v16, grid=grid, num_prefix=1, backend="reference", **opts)
    assert_rel_close(out, want, torch.bfloat16, what="bf16 forward")
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q16, k16, v16), g.bfloat16()),
                          torch.autograd.grad(want, (q, k, v), g)):
        assert a.dtype == torch.bfloat16
        assert_rel_close(a, b, torch.bfloat16, what=f"bf16 d{name}")


# --- on the block-sparse core ------------------------------------------------------------------

from subquad.kernels import available_backends  # noqa: E402

CORE_CASES = [((13, 17), 1, dict(tile=(4, 4))), ((30, 21), 0, dict()), ((6, 9, 10), 1, dict(tile=(1, 4, 4))),
              ((7, 5, 6), 2, dict(layout="official", block_size=16))]


def check_backend(backend, grid, p, opts, dtype=torch.float32, heads=2, d=16, device="cpu"):
    n = p + math.prod(grid)
    q, k, v = (torch.randn(2, heads, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    want = radial_attention(q, k, v, grid=grid, num_prefix=p, backend="reference", **opts)
    out = radial_attention(q, k, v, grid=grid, num_prefix=p, backend=backend, **opts)
    assert_rel_close(out, want, dtype, what=backend)
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        assert_rel_close(a, b, dtype, what=f"{backend} d{name}")


@pytest.mark.parametrize("grid,p,opts", CORE_CASES)
def test_block_sparse_core_backend_equals_reference(grid, p, opts):
    """The plan as the core's CSR (run by the core's reference here)."""
    check_backend("block_sparse", grid, p, opts)


def test_tiles_the_core_cannot_run():
    """A tile of 4 tokens is too small for the core: naming the core's backend is an error that says
    why; with no backend named the reference runs."""
    q = torch.randn(1, 1, 1 + 9 * 11, 16)
    with pytest.raises(ValueError, match="power of two >= 16"):
        radial_attention(q, q, q, grid=(9, 11), num_prefix=1, backend="block_sparse", tile=(2, 2))
    assert_rel_close(radial_attention(q, q, q, grid=(9, 11), num_prefix=1, tile=(2, 2)),
                     radial_attention(q, q, q, grid=(9, 11), num_prefix=1, backend="reference", tile=(2, 2)))


@pytest.mark.skipif("triton" not in available_backends("radial_attention"), reason="no Triton")
@pytest.mark.parametrize("grid,opts", [((5, 9), dict(tile=(4, 4))), ((3, 6, 9), dict(tile=(1, 4, 4), decay_factor=0.3))])
def test_triton_core_backend_equals_reference(grid, opts):
    check_backend("triton", grid, 1, opts, heads=1)


FULL_FRAMES_CASES = [((6, 9, 10), dict(tile=(1, 4, 4), decay_factor=0.3)),
                     ((5, 8, 8), dict(tile=(1, 4, 4), sink=False)),
                     ((7, 6, 11), dict(tile=(1, 4, 4), pack=False)), ((2, 8, 8), dict(tile=(1, 4, 4))),
                     ((4, 12, 4), dict(tile=(1, 4, 4)))]       # three tiles a frame: a pair without its second


@pytest.mark.parametrize("grid,opts", FULL_FRAMES_CASES)
def test_frame_tile_pairs_take_every_tile_once_two_of_one_frame(grid, opts):
    plan = radial_plan(grid, normalize_options(grid, **opts))
    pairs = frame_tile_pairs(plan)
    assert torch.equal(pairs[pairs >= 0].sort().values, torch.arange(plan.layout.num_tiles))
    frame = plan.layout.coords[:, 0]
    both = pairs[:, 1] >= 0
    assert torch.equal(frame[pairs[both, 0]], frame[pairs[both, 1]])
    tiles_per_frame = plan.layout.num_tiles // grid[0]
    assert int((~both).sum()) == grid[0] * (tiles_per_frame % 2)


@pytest.mark.parametrize("grid,opts", FULL_FRAMES_CASES)
def test_full_frame_spans_and_far_tiles_split_the_mask(grid, opts):
    """The full frames' spans (frame distance <= 1, the sink) and the far key tiles partition the mask's pairs."""
    options = normalize_options(grid, **opts)
    plan = radial_plan(grid, options)
    sink = bool(options[4])
    spans = full_frame_spans(plan, sink).long()
    n = plan.layout.num_tokens
    tile_of = tile_of_tokens(plan.layout)
    keys = torch.arange(n)
    full = torch.zeros(n, n, dtype=torch.bool)
    for s in range(spans.shape[1]):
        start, end = spans[tile_of, s, 0], spans[tile_of, s, 1]
        inside = (keys[None, :] >= start[:, None]) & (keys[None, :] < end[:, None])
        assert not (full & inside).any()                # the spans are disjoint
        full |= inside
    far = token_mask_of(type(plan)(plan.layout, far_key_tiles(plan, sink), plan.density))
    assert not (full & far).any() and torch.equal(full | far, token_mask(grid, 0, **opts))


@pytest.mark.skipif("triton" not in available_backends("radial_attention"), reason="no Triton")
@pytest.mark.parametrize("grid,opts", FULL_FRAMES_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_frame_spans_on_the_core_equal_dense_attention_with_the_mask(grid, opts, dtype):
    """The core's forward with the full frames as key spans and the far tiles listed (Triton; the interpreter on
    CPU): dense attention with the token mask."""
    q, k, v = (torch.randn(2, 2, math.prod(grid), 8, dtype=dtype) for _ in range(3))
    out = radial_attention_full_frames(q, k, v, grid, normalize_options(grid, **opts))
    want = masked_attention(q.float(), k.float(), v.float(), token_mask(grid, 0, **opts))
    assert_rel_close(out, want, dtype, what="full frames as spans + far tiles")


@pytest.mark.skipif("triton" not in available_backends("radial_attention"), reason="no Triton")
def test_full_frames_compile_fullgraph_in_inference_as_one_op():
    """Inference under torch.compile(fullgraph) traces the full frames' forward as one custom op (the spans, not the
    listed tiles): eager's output."""
    grid, opts = FULL_FRAMES_CASES[-1]
    q, k, v = (torch.randn(1, 2, math.prod(grid), 8) for _ in range(3))
    fn = lambda q, k, v: radial_attention(q, k, v, grid=grid, backend="triton", **opts)  # noqa: E731
    traced = []

    def backend(graph_module, example_inputs):
        traced.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module

    with torch.no_grad():
        out = torch.compile(fn, fullgraph=True, backend=backend)(q, k, v)
        assert_rel_close(out, fn(q, k, v), what="compiled full frames")
    assert any("radial_full_frames" in target for target in traced), traced


@pytest.mark.parametrize("backend,grid,opts", [
    ("reference", (9, 11), dict(tile=(2, 2))), ("reference", (6, 9, 10), dict(tile=(1, 4, 4))),
    ("reference", (7, 5, 6), dict(layout="official", block_size=16)),
    pytest.param("triton", (5, 9), dict(tile=(4, 4)), marks=pytest.mark.skipif(
        "triton" not in available_backends("radial_attention"), reason="no Triton"))])
def test_compile_fullgraph(backend, grid, opts):
    """The plan is a constant under torch.compile (built eagerly, not traced): the whole op is one graph."""
    q, k, v = (torch.randn(1, 2, 1 + math.prod(grid), 16, requires_grad=True) for _ in range(3))
    fn = lambda q, k, v: radial_attention(q, k, v, grid=grid, num_prefix=1, backend=backend, **opts)  # noqa: E731
    assert_compiles_to_the_same(fn, q, k, v)


def test_compile_fullgraph_at_new_grids():
    """A recompile at a new grid makes the sizes symbolic; the plan specializes them (one plan per grid)."""
    fn = torch.compile(lambda q, grid: radial_attention(q, q, q, grid=grid, tile=(2, 2)), fullgraph=True,
                       backend="eager")
    for grid in ((8, 10), (12, 6), (9, 14)):
        q = torch.randn(1, 2, math.prod(grid), 8)
        assert_rel_close(fn(q, grid), radial_attention(q, q, q, grid=grid, tile=(2, 2)), what=f"grid {grid}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid,opts", [((64, 64), {}), ((16, 32, 32), {}), ((16, 32, 32), dict(layout="official")),
                                       ((6, 30, 52), dict(decay_factor=0.2))])
def test_gpu_triton_backend_equals_reference(grid, opts, dtype):
    check_backend("triton", grid, 1, opts, dtype=dtype, heads=4, d=64, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("grid,opts", [((6, 30, 52), dict(decay_factor=0.2)),
                                       ((5, 16, 24), dict(sink=False, pack=False))])
def test_gpu_inference_reads_full_frames_as_spans(grid, opts):
    """Inference on CUDA in bf16 (heads-last views, as the pipelines pass them) reads the full frames as key spans
    and the far tiles from their lists: the reference's output."""
    x = torch.randn(2, math.prod(grid), 3, 4, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.transpose(1, 2) for t in x.unbind(2))
    assert takes_full_frames(q, k, v, grid, 0, normalize_options(grid, **opts))
    with torch.no_grad():
        out = radial_attention(q, k, v, grid=grid, **opts)
    want = radial_attention(q.float(), k.float(), v.float(), grid=grid, backend="reference", **opts)
    assert_rel_close(out, want, torch.bfloat16, what="full frames as spans")

