"""Neighborhood attention (kernels/neighborhood): the reference and the natten/flex backends against the
definition, the Triton kernels against the reference.

neighborhood_attention against its definition (NAT / DiNAT, as NATTEN computes it) and against natten.

The definition, per axis of length L with kernel k and dilation d: position i belongs to group
i mod d, which holds the positions i mod d, i mod d + d, ...; its window is k consecutive members of
the group centred on i, shifted inward at the group's ends. A grid token sees the product of its
row and column windows, plus every prefix token; prefix tokens see everything.

The Triton neighborhood attention kernels (forward, gradients of q, k, v and the relative position
bias) against the reference: on the CPU interpreter with small shapes, on a GPU at real sizes and in a
random fuzz.
"""
from __future__ import annotations

import random

import pytest
import torch

from subquad.kernels import available_backends, neighborhood_attention
from subquad.kernels.core.testing import assert_rel_close

needs_triton = pytest.mark.skipif("triton" not in available_backends("neighborhood_attention"),
                                  reason="triton is not installed")


# --- the reference and the natten, flex backends against the definition ---------------------------


pytestmark = [pytest.mark.filterwarnings("ignore:.*without torch.compile:UserWarning"),
              pytest.mark.filterwarnings("ignore:return_lse is deprecated:FutureWarning")]


def axis_window(length, k, d, i):
    members = list(range(i % d, length, d))
    pos = members.index(i)
    start = min(max(pos - k // 2, 0), len(members) - k)
    return members[start:start + k], start - pos


def explicit_mask_and_bias(grid, k, d, num_prefix, rpb=None):
    """(N, N) bool mask and (h, N, N) bias (RPB of grid pairs), by the definition, with loops."""
    h_, w_ = grid
    n = num_prefix + h_ * w_
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:num_prefix] = True
    mask[:, :num_prefix] = True
    pairs = []                                           # (query, key, rpb row, rpb column)
    for r in range(h_):
        rows, r_off = axis_window(h_, k, d, r)
        for c in range(w_):
            cols, c_off = axis_window(w_, k, d, c)
            pairs += [(num_prefix + r * w_ + c, num_prefix + kr * w_ + kc, r_off + a + k - 1, c_off + b + k - 1)
                      for a, kr in enumerate(rows) for b, kc in enumerate(cols)]
    qi, ki, ri, ci = torch.tensor(pairs).T
    mask[qi, ki] = True
    if rpb is None:
        return mask, torch.zeros(1, n, n, dtype=torch.float64)
    bias = torch.zeros(n, n, rpb.shape[0], dtype=torch.float64).index_put((qi, ki), rpb[:, ri, ci].double().T)
    return mask, bias.permute(2, 0, 1)


def masked_attention(q, k, v, mask, bias=0.0):
    s = (q.double() @ k.double().transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias
    return (s.masked_fill(~mask, float("-inf")).softmax(-1) @ v.double()).to(q.dtype)


def qkv(b, h, n, d, dtype=torch.float32, grad=False):
    return [torch.randn(b, h, n, d, dtype=dtype, requires_grad=grad) for _ in range(3)]


@pytest.mark.parametrize("grid,k,d,p", [((13, 17), 3, 1, 0), ((13, 17), 5, 2, 1), ((6, 11), 5, 1, 2),
                                        ((9, 7), 3, 2, 0), ((1, 1), 1, 1, 1), ((9, 10), 3, 3, 0)])
def test_reference_equals_explicit_mask_forward_and_backward(grid, k, d, p):
    heads = 2
    q, kk, v = qkv(2, heads, p + grid[0] * grid[1], 8, grad=True)
    rpb = (torch.randn(heads, 2 * k - 1, 2 * k - 1) * 0.5).requires_grad_()
    out = neighborhood_attention(q, kk, v, grid=grid, kernel_size=k, dilation=d, rpb=rpb, num_prefix=p)
    mask, bias = explicit_mask_and_bias(grid, k, d, p, rpb)
    want = masked_attention(q, kk, v, mask, bias)
    assert_rel_close(out, want, what="forward")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, kk, v, rpb), g)
    wants = torch.autograd.grad(want, (q, kk, v, rpb), g)
    for name, a, b in zip("q k v rpb".split(), grads, wants):
        assert_rel_close(a, b, torch.float32, what=f"d{name}")


def test_every_grid_token_sees_k_squared_keys():
    mask, _ = explicit_mask_and_bias((13, 17), 5, 2, 0)
    out = neighborhood_attention(*qkv(1, 1, 13 * 17, 8), grid=(13, 17), kernel_size=5, dilation=2)
    assert (mask.sum(-1) == 25).all() and out.shape == (1, 1, 221, 8)


def natten_grid(x, grid):
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, *grid, h, d)


NATTEN_CASES = [((13, 17), 3, 1), ((13, 17), 5, 1), ((13, 17), 7, 1), ((13, 17), 3, 2), ((13, 17), 5, 2),
                ((15, 19), 7, 2), ((8, 21), 7, 1)]


@pytest.mark.parametrize("grid,k,d", NATTEN_CASES)
def test_reference_equals_natten_na2d(grid, k, d):
    natten = pytest.importorskip("natten")
    q, kk, v = qkv(2, 2, grid[0] * grid[1], 16)
    out = neighborhood_attention(q, kk, v, grid=grid, kernel_size=k, dilation=d)
    want = natten.na2d(natten_grid(q, grid), natten_grid(kk, grid), natten_grid(v, grid), kernel_size=k, dilation=d)
    assert_rel_close(out, want.reshape(2, -1, 2, 16).transpose(1, 2), what="vs natten.na2d")


@pytest.mark.parametrize("grid,k,d", NATTEN_CASES[::2])
def test_gradients_equal_dense_attention_on_nattens_neighbourhood(grid, k, d):
    """natten has no backward on CPU; its neighbourhood is read off as the weights of uniform
    attention (q = k = 0) over one-hot values, and the reference's gradients are compared with
    autograd through dense attention restricted to it."""
    natten = pytest.importorskip("natten")
    n = grid[0] * grid[1]
    width = 1 << (n - 1).bit_length()                                  # natten wants a power-of-2 head dim
    zeros = torch.zeros(1, *grid, 1, width)
    onehot = torch.eye(n, width).reshape(1, *grid, 1, width)
    weights = natten.na2d(zeros, zeros, onehot, kernel_size=k, dilation=d).reshape(n, width)[:, :n]
    mask = weights > 0
    assert (mask.sum(-1) == k * k).all()
    q, kk, v = qkv(2, 2, n, 8, grad=True)
    out = neighborhood_attention(q, kk, v, grid=grid, kernel_size=k, dilation=d)
    want = masked_attention(q, kk, v, mask)
    assert_rel_close(out, want, what="forward")
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, kk, v), g), torch.autograd.grad(want, (q, kk, v), g)):
        assert_rel_close(a, b, torch.float32, what=f"d{name}")


@pytest.mark.parametrize("p", [0, 2])
def test_natten_backend_with_prefix_tokens(p):
    pytest.importorskip("natten")
    q, kk, v = qkv(2, 2, p + 13 * 17, 16)
    kw = dict(grid=(13, 17), kernel_size=5, dilation=2, num_prefix=p)
    assert_rel_close(neighborhood_attention(q, kk, v, backend="natten", **kw), neighborhood_attention(q, kk, v, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_backend_with_rpb_and_prefix(dtype):
    heads, k = 2, 5
    q, kk, v = qkv(1, heads, 2 + 13 * 17, 16)
    rpb = torch.randn(heads, 2 * k - 1, 2 * k - 1)
    kw = dict(grid=(13, 17), kernel_size=k, dilation=2, rpb=rpb, num_prefix=2)
    want = neighborhood_attention(q, kk, v, **kw)
    out = neighborhood_attention(q.to(dtype), kk.to(dtype), v.to(dtype), backend="flex", **kw)
    assert_rel_close(out, want, dtype)


def test_bf16_reference():
    q, kk, v = qkv(2, 2, 1 + 13 * 17, 16)
    kw = dict(grid=(13, 17), kernel_size=7, rpb=torch.randn(2, 13, 13), num_prefix=1)
    out = neighborhood_attention(q.bfloat16(), kk.bfloat16(), v.bfloat16(), **kw)
    assert out.dtype == torch.bfloat16
    assert_rel_close(out, neighborhood_attention(q, kk, v, **kw), torch.bfloat16)


@pytest.mark.parametrize("kw,match", [
    (dict(grid=(13, 17), kernel_size=4), "odd"),
    (dict(grid=(13, 17), kernel_size=15), "larger than the grid side 13"),
    (dict(grid=(13, 17), kernel_size=5, dilation=3), r"5 \* 3 = 15"),
    (dict(grid=(13, 17), kernel_size=7, dilation=2), "every dilation group"),   # 2*(7-1)+1 = 13 fits, 7*2 does not
    (dict(grid=(1, 13, 17), kernel_size=3), "image grids"),
    (dict(grid=(13, 17), kernel_size=3, rpb=torch.zeros(2, 3, 3)), r"\(heads, 2k-1, 2k-1\)"),
    (dict(grid=(13, 17), kernel_size=3, rpb=torch.zeros(2, 5, 5), backend="natten"), "relative position bias"),
])
def test_bad_arguments_are_value_errors(kw, match):
    q, kk, v = qkv(1, 2, 221, 8)
    with pytest.raises(ValueError, match=match):
        neighborhood_attention(q, kk, v, **kw)


def test_natten_backend_refuses_bf16_on_cpu():
    q, kk, v = qkv(1, 2, 221, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        neighborhood_attention(q, kk, v, grid=(13, 17), kernel_size=3, backend="natten")


def test_float64_gradcheck():
    q, kk, v = (torch.randn(1, 2, 1 + 5 * 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    fn = lambda q, kk, v, rpb: neighborhood_attention(q, kk, v, grid=(5, 6), kernel_size=3, rpb=rpb, num_prefix=1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, kk, v, rpb), fast_mode=True)


def test_bf16_reference_gradients_match_float64():
    """Fed bf16, the reference gathers float32 key/value copies: each key's k*k gradient copies
    (here 81, plus a prefix key seen by every query) are summed in float32, not in bf16."""
    grid, n = (17, 14), 1 + 17 * 14
    q, k, v = (torch.randn(1, 2, n, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 17, 17, dtype=torch.float64) * 0.1
    want = neighborhood_attention(q, k, v, grid=grid, kernel_size=9, rpb=rpb, num_prefix=1, backend="reference")
    g = torch.randn_like(want)
    q16, k16, v16 = (x.detach().bfloat16().requires_grad_() for x in (q, k, v))
    out = neighborhood_attention(q16, k16, v16, grid=grid, kernel_size=9, rpb=rpb.bfloat16(), num_prefix=1,
                                 backend="reference")
    assert_rel_close(out, want, torch.bfloat16, what="bf16 forward")
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q16, k16, v16), g.bfloat16()),
                          torch.autograd.grad(want, (q, k, v), g)):
        assert a.dtype == torch.bfloat16
        assert_rel_close(a, b, torch.bfloat16, what=f"bf16 d{name}")


# --- the Triton kernels against the reference -----------------------------------------------------


def check_case(grid, kernel_size, dilation, num_prefix, use_rpb, dtype, batch=1, heads=2, head_dim=16,
               device="cpu", config=None, generator=None):
    """Output and gradients of q, k, v (and rpb) of the triton backend vs the reference on float64
    (CPU) or float32 (GPU) copies of the same inputs."""
    n = num_prefix + grid[0] * grid[1]
    q, k, v = (torch.randn(batch, heads, n, head_dim, device=device, generator=generator).to(dtype)
               .requires_grad_() for _ in range(3))
    side = 2 * kernel_size - 1
    rpb = (torch.randn(heads, side, side, device=device, generator=generator).requires_grad_()
           if use_rpb else None)
    opts = dict(grid=grid, kernel_size=kernel_size, dilation=dilation, num_prefix=num_prefix)
    if config is None:
        out = neighborhood_attention(q, k, v, rpb=rpb, backend="triton", **opts)
    else:
        out = _with_config(q, k, v, rpb, config, **opts)
    wide = torch.float64 if device == "cpu" else torch.float32
    ref_in = [x.detach().to(wide).requires_grad_() for x in (q, k, v)]
    ref_rpb = rpb.detach().to(wide).requires_grad_() if use_rpb else None
    ref = neighborhood_attention(*ref_in, rpb=ref_rpb, backend="reference", **opts)
    what = f"grid={grid} k={kernel_size} dilation={dilation} prefix={num_prefix} rpb={use_rpb} {dtype}"
    assert_rel_close(out, ref, dtype=dtype, what=f"{what} out")
    if config is None:      # with autograd too, one heads-last output (prefix rows included): the next layer's view
        assert out.transpose(1, 2).is_contiguous(), "with autograd: not in SDPA's heads-last layout"
    if config is None:      # inference: the prefix queries' output written into the rows the kernel leaves
        with torch.no_grad():
            inferred = neighborhood_attention(q, k, v, rpb=rpb, backend="triton", **opts)
        assert inferred.transpose(1, 2).is_contiguous(), "not in SDPA's heads-last layout"
        assert_rel_close(inferred, ref, dtype=dtype, what=f"{what} out without autograd")
    do = torch.randn(out.shape, device=device, generator=generator).to(dtype)
    inputs, ref_inputs = [q, k, v], ref_in
    if use_rpb:
        inputs, ref_inputs = inputs + [rpb], ref_inputs + [ref_rpb]
    got = torch.autograd.grad(out, inputs, do)
    want = torch.autograd.grad(ref, ref_inputs, do.to(wide))
    for name, a, e in zip(["dq", "dk", "dv", "drpb"], got, want):
        assert_rel_close(a, e, dtype=dtype, what=f"{what} {name}")


def _with_config(q, k, v, rpb, config, grid, kernel_size, dilation, num_prefix):
    """The grid queries' attention through explicitly tiled kernels (num_prefix = 0 only)."""
    from subquad.kernels.neighborhood import triton as na

    assert num_prefix == 0

    class Tiled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, rpb):
            o, lse = na.forward(q, k, v, rpb, *grid, kernel_size, dilation, 0, q.shape[-1] ** -0.5, config)
            ctx.save_for_backward(q, k, v, rpb, o, lse)
            return o

        @staticmethod
        def backward(ctx, do):
            q, k, v, rpb, o, lse = ctx.saved_tensors
            dq, dk, dv, drpb = na.backward(do, q, k, v, o, lse, rpb, *grid, kernel_size, dilation, 0,
                                           q.shape[-1] ** -0.5, config)
            return dq, dk, dv, drpb if rpb is not None else None

    return Tiled.apply(q, k, v, rpb)


@needs_triton
@pytest.mark.parametrize("grid,kernel_size,dilation,num_prefix,use_rpb,dtype", [
    ((9, 13), 3, 1, 0, True, torch.float32),
    ((12, 7), 5, 1, 1, False, torch.float32),
    ((16, 16), 7, 1, 1, True, torch.float32),
    ((11, 13), 5, 2, 0, True, torch.float32),
    ((9, 10), 3, 3, 1, True, torch.float32),
    ((16, 16), 5, 3, 1, True, torch.bfloat16),
    ((12, 7), 3, 2, 0, False, torch.bfloat16),
    ((9, 13), 7, 1, 2, True, torch.bfloat16),
    ((20, 9), 3, 1, 3, True, torch.float16),
])
def test_triton_matches_reference(grid, kernel_size, dilation, num_prefix, use_rpb, dtype):
    check_case(grid, kernel_size, dilation, num_prefix, use_rpb, dtype)


@needs_triton
@pytest.mark.parametrize("config", [
    # tiles smaller than the grid in one axis and larger in the other, key blocks of other shapes
    {"fwd": dict(TH=4, TW=8, KH=4, KW=4), "bwd_q": dict(TH=2, TW=16, KH=8, KW=2),
     "bwd_kv": dict(TH=4, TW=4, QH=2, QW=8)},
    # the GPU defaults for large kernels with 16-bit inputs
    {"fwd": dict(TH=8, TW=8, KH=4, KW=16), "bwd_q": dict(TH=8, TW=8, KH=4, KW=16),
     "bwd_kv": dict(TH=8, TW=8, QH=8, QW=16)},
])
def test_other_tile_shapes(config):
    check_case((10, 13), 5, 2, 0, True, torch.float32, head_dim=32, heads=1, config=config)


@needs_triton
def test_rejects_unsupported_inputs():
    q = torch.randn(1, 1, 16, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32.*reference"):
        neighborhood_attention(q, q, q, grid=(4, 4), kernel_size=3, backend="triton")


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("batch,side,kernel_size,dilation,num_prefix,use_rpb", [
    (2, 56, 7, 1, 0, True), (1, 128, 13, 1, 1, True), (1, 256, 21, 1, 0, False),
    (2, 56, 7, 4, 1, True), (1, 128, 13, 3, 0, True), (1, 64, 9, 7, 1, True),
])
def test_gpu_real_sizes(batch, side, kernel_size, dilation, num_prefix, use_rpb):
    # bf16, 4 heads, d = 64, as the benchmark; batches reduced so that the gathered float32 reference fits
    check_case((side, side), kernel_size, dilation, num_prefix, use_rpb, torch.bfloat16, batch=batch,
               heads=4 if side < 256 else 1, head_dim=64, device="cuda")


@needs_triton
@pytest.mark.gpu
def test_gpu_fuzz():
    """200 random configurations (grid, kernel, dilation, prefix, bias, dtype, head dim), no failure.
    bfloat16 with every head dim, float32 with d = 64: few kernel variants to compile."""
    rng = random.Random(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(200):
        kernel_size = rng.choice([3, 3, 5, 5, 7, 9, 11, 13])
        dilation = rng.choice([1, 1, 1, 2, 3])
        low = kernel_size * dilation
        grid = (rng.randint(low, max(low, 40)), rng.randint(low, max(low, 40)))
        dtype, head_dim = rng.choice([(torch.bfloat16, 32), (torch.bfloat16, 64), (torch.bfloat16, 128),
                                      (torch.float32, 64)])
        check_case(grid, kernel_size, dilation, rng.choice([0, 0, 1, 3]), rng.random() < 0.5,
                   dtype, batch=rng.randint(1, 2), heads=rng.randint(1, 3), head_dim=head_dim, device="cuda",
                   generator=gen)


@needs_triton
@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    grid, kernel_size = (24, 20), 5
    q, k, v = (torch.randn(2, 2, 1 + 24 * 20, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    rpb = torch.randn(2, 9, 9, device="cuda", requires_grad=True)

    def attend(q, k, v, rpb):
        return neighborhood_attention(q, k, v, grid=grid, kernel_size=kernel_size, rpb=rpb, num_prefix=1)

    compiled = torch.compile(attend, fullgraph=True)
    out = compiled(q, k, v, rpb)
    ref = attend(q, k, v, rpb)
    assert_rel_close(out, ref, dtype=torch.bfloat16, what="compiled out")
    do = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, (q, k, v, rpb), do), torch.autograd.grad(ref, (q, k, v, rpb), do)):
        assert_rel_close(a, e, dtype=torch.bfloat16, what="compiled grad")
