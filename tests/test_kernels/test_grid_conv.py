"""Depthwise conv on the grid (kernels/grid_conv): the reference against a brute force, the Triton kernels
against the reference.

depthwise_conv_on_grid: the reference against a brute force written with explicit loops over the filter
taps (no F.conv2d), in float64, forward and gradients; the argument checks of the functional entry point.

The Triton backend of depthwise_conv_on_grid (kernels/triton/grid_conv.py) against the reference.

The ground truth is the reference evaluated in float64 on the same inputs (16-bit values upcast). CPU tests
run the kernels under TRITON_INTERPRET=1 (tests/conftest.py) with small shapes; the `gpu` tests use real
sizes and a fuzz over random configurations. Fresh allocations are filled with NaN, so an output element
that a kernel forgets to write fails the comparison.
"""
import math
import random
import warnings

import pytest
import torch

from subquad.kernels import available_backends, choose_backend, depthwise_conv_on_grid
from subquad.kernels.core.dispatch import backends_of
from subquad.kernels.core.testing import REL_TOL, assert_compiles_to_the_same, assert_rel_close, relative_error


# --- the reference against a brute force ----------------------------------------------------------


def brute_force(x, weight, bias, grid, num_prefix, residual=None):
    """out[b, h, P + t*H*W + y*W + x, c] = residual + bias[ch] + sum_ij w[ch, i, j] x[.., y+i-r, x+j-r, c],
    ch = h*d + c (one filter per channel) or c (shared), taps outside the grid skipped (zero padding)."""
    b, h, n, d = x.shape
    *frames, gh, gw = grid
    k = weight.shape[-1]
    r = k // 2
    w = weight.reshape(-1, d, k, k) if weight.shape[0] == h * d else weight.reshape(1, d, k, k)   # (h or 1, d, k, k)
    g = x[:, :, num_prefix:].reshape(b, h, -1, gh, gw, d)
    conv = torch.zeros_like(g)
    for i in range(k):
        for j in range(k):
            di, dj = i - r, j - r
            rows, cols = slice(max(0, -di), min(gh, gh - di)), slice(max(0, -dj), min(gw, gw - dj))
            src_rows, src_cols = slice(rows.start + di, rows.stop + di), slice(cols.start + dj, cols.stop + dj)
            tap = w[:, :, i, j][None, :, None, None, None, :]                                  # (1, h or 1, 1, 1, 1, d)
            conv[:, :, :, rows, cols] = conv[:, :, :, rows, cols] + tap * g[:, :, :, src_rows, src_cols]
    if bias is not None:
        conv = conv + bias.reshape(-1, d)[None, :, None, None, None, :]
    out = torch.cat([torch.zeros_like(x[:, :, :num_prefix]), conv.reshape(b, h, -1, d)], dim=2)
    return out if residual is None else residual + out


CASES = [  # batch, heads, grid, prefix, head_dim, kernel, shared filter, bias, residual
    (2, 2, (5, 7), 1, 4, 3, False, True, True),
    (1, 3, (3, 9), 4, 5, 5, True, True, True),
    (2, 2, (1, 6), 0, 3, 5, False, False, True),
    (1, 2, (2, 3, 5), 2, 4, 3, False, True, False),
    (1, 2, (2, 3, 5), 0, 4, 5, True, False, False),
    (1, 1, (4, 4), 1, 6, 7, False, True, True),                 # filter wider than the grid
]


@pytest.mark.parametrize("b,h,grid,num_prefix,d,k,shared,with_bias,with_residual", CASES)
def test_reference_matches_brute_force(b, h, grid, num_prefix, d, k, shared, with_bias, with_residual):
    n = num_prefix + math.prod(grid)
    channels = d if shared else h * d
    inputs = [torch.randn(b, h, n, d, dtype=torch.float64), torch.randn(channels, 1, k, k, dtype=torch.float64),
              torch.randn(channels, dtype=torch.float64) if with_bias else None,
              torch.randn(b, h, n, d, dtype=torch.float64) if with_residual else None]
    leaves = [t.requires_grad_() for t in inputs if t is not None]
    out = depthwise_conv_on_grid(inputs[0], inputs[1], inputs[2], grid=grid, num_prefix=num_prefix,
                                 residual=inputs[3], backend="reference")
    want = brute_force(*inputs[:3], grid, num_prefix, inputs[3])
    assert_rel_close(out, want, what="out")
    g = torch.randn_like(out)
    for i, (a, e) in enumerate(zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(want, leaves, g))):
        assert_rel_close(a, e, what=f"grad of input {i}")


def test_prefix_rows_are_the_residual():
    x, res = torch.randn(2, 2, 4 + 12, 8), torch.randn(2, 2, 4 + 12, 8)
    out = depthwise_conv_on_grid(x, torch.randn(16, 1, 3, 3), torch.randn(16), grid=(3, 4), num_prefix=4,
                                 residual=res)
    assert torch.equal(out[:, :, :4], res[:, :, :4])
    assert not depthwise_conv_on_grid(x, torch.randn(8, 1, 3, 3), grid=(3, 4), num_prefix=4)[:, :, :4].any()


def test_backends_registered():
    assert "reference" in available_backends("depthwise_conv_on_grid")
    assert "triton" in available_backends("depthwise_conv_on_grid")


def _args(**change):
    args = dict(x=torch.randn(2, 2, 1 + 12, 8), weight=torch.randn(16, 1, 3, 3), bias=torch.randn(16), grid=(3, 4),
                num_prefix=1, residual=torch.randn(2, 2, 1 + 12, 8))
    args.update(change)
    return args


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("change,message", [
    (dict(weight=torch.randn(12, 1, 3, 3)), "weight has 12 channels; need heads\\*head_dim = 16"),
    (dict(weight=torch.randn(16, 1, 4, 4)), "kernel size must be odd"),
    (dict(weight=torch.randn(16, 3, 3)), "weight must have shape \\(C, 1, k, k\\)"),
    (dict(bias=torch.randn(8)), "bias must have shape \\(C,\\) = \\(16,\\)"),
    (dict(grid=(3, 5)), "token count N=13 does not match num_prefix P=1 plus the grid \\(3, 5\\)"),
    (dict(num_prefix=2), "token count N=13 does not match num_prefix P=2"),
    (dict(residual=torch.randn(2, 2, 13, 4)), "residual must have x's shape"),
    (dict(residual=torch.randn(2, 2, 13, 8, dtype=torch.float64)), "residual must have x's dtype"),
    (dict(x=torch.randn(2, 13, 16)), "x must be a floating point tensor \\(B, heads, N, head_dim\\)"),
    (dict(x=torch.ones(2, 2, 13, 8, dtype=torch.int64)), "x must be a floating point tensor"),
    (dict(grid=(13,)), "grid must be \\(H, W\\) or \\(T, H, W\\)"),
])
def test_bad_arguments_raise(backend, change, message):
    args = _args(**change)
    x, weight, bias = args.pop("x"), args.pop("weight"), args.pop("bias")
    with pytest.raises(ValueError, match=message):
        depthwise_conv_on_grid(x, weight, bias, backend=backend, **args)


# --- the Triton kernels against the reference -----------------------------------------------------


def _inputs(b, h, grid, num_prefix, d, k, shared, dtype, device, bias=True, residual=True, strided=False,
            param_dtype=torch.float32):
    """x, weight, bias, residual; ``strided``: x and the residual as (B, N, h, d)-layout views with unit channel
    stride (x is one third of a qkv projection, as in the modules)."""
    n = num_prefix + math.prod(grid)
    if strided:
        x = torch.randn(b, n, 3, h, d, device=device).to(dtype)[:, :, 2].transpose(1, 2)
        res = torch.randn(b, n, h, d, device=device).to(dtype).transpose(1, 2)
    else:
        x, res = (torch.randn(b, h, n, d, device=device).to(dtype) for _ in range(2))
    channels = d if shared else h * d
    weight = torch.randn(channels, 1, k, k, device=device).to(param_dtype)
    return [x, weight, torch.randn(channels, device=device).to(param_dtype) if bias else None,
            res if residual else None]


def check_against_reference(b, h, grid, num_prefix, d, k, shared, dtype, device="cpu", **opts):
    """Forward and the gradients of x, weight, bias and residual (those given) of backend="triton" vs the
    float64 reference; returns the list of (what, error, tolerance) that failed."""
    inputs = _inputs(b, h, grid, num_prefix, d, k, shared, dtype, torch.device(device), **opts)
    names = [n for n, t in zip(("dx", "dweight", "dbias", "dresidual"), inputs) if t is not None]
    leaves = [t.requires_grad_() for t in inputs if t is not None]
    x, weight, bias, res = inputs
    out = depthwise_conv_on_grid(x, weight, bias, grid=grid, num_prefix=num_prefix, residual=res, backend="triton")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad)

    ref_inputs = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    ref_leaves = [t for t in ref_inputs if t is not None]
    ref = depthwise_conv_on_grid(*ref_inputs[:3], grid=grid, num_prefix=num_prefix, residual=ref_inputs[3],
                                 backend="reference")
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())

    tol = REL_TOL[dtype]
    failed = []
    for what, a, e, leaf in zip(["out", *names], [out, *grads], [ref, *ref_grads], [x, *leaves]):
        assert a.dtype == leaf.dtype, what
        err = relative_error(a, e)
        if not err < tol:
            failed.append((what, err, tol))
    return failed


CPU_CASES = [  # batch, heads, grid, prefix, head_dim, kernel, shared filter, dtype, options
    (2, 2, (5, 7), 1, 16, 3, False, torch.float32, dict()),                        # agent: C = h*d, k = 3
    (1, 3, (3, 9), 4, 24, 5, True, torch.bfloat16, dict()),                        # FLatten: C = d, padded d
    (2, 2, (1, 6), 0, 16, 5, False, torch.float32, dict()),                        # MALA's LePE: C = h*d, k = 5
    (1, 2, (2, 3, 5), 1, 16, 3, False, torch.bfloat16, dict()),                    # video: per frame
    (1, 2, (2, 3, 5), 0, 16, 5, True, torch.float32, dict()),
    (1, 2, (4, 4), 1, 72, 7, False, torch.float32, dict()),                        # k = 7 > grid, d = 72
    (2, 1, (11, 19), 1, 16, 3, False, torch.float32, dict()),                      # 2 x 3 tiles per frame
    (1, 2, (9, 10), 2, 16, 5, True, torch.bfloat16, dict()),                       # 2 x 2 tiles, shared filter
    (2, 2, (5, 7), 1, 16, 3, False, torch.bfloat16, dict(bias=False, residual=False)),
    (1, 2, (6, 5), 0, 24, 5, True, torch.float32, dict(bias=False)),
    (1, 3, (3, 4), 1, 16, 3, False, torch.float32, dict(residual=False)),
    (1, 2, (5, 7), 1, 16, 3, False, torch.float16, dict()),
    (2, 2, (4, 6), 1, 16, 3, False, torch.bfloat16, dict(strided=True)),           # qkv view, (B, N, h, d) residual
    (1, 2, (5, 3), 1, 16, 5, True, torch.bfloat16, dict(param_dtype=torch.bfloat16)),
]


@pytest.mark.parametrize("b,h,grid,num_prefix,d,k,shared,dtype,opts", CPU_CASES)
def test_triton_matches_reference_cpu(poisoned, b, h, grid, num_prefix, d, k, shared, dtype, opts):
    assert check_against_reference(b, h, grid, num_prefix, d, k, shared, dtype, **opts) == []


@pytest.mark.parametrize("tile", [(4, 16), (16, 8)])
def test_other_tile_shapes_cpu(poisoned, monkeypatch, tile):
    """Tile shapes other than the default (the benchmark's sweep tries them) cover the same grid."""
    from subquad.kernels.grid_conv.triton import CONFIG
    for key in ("forward", "backward"):
        monkeypatch.setitem(CONFIG, key, dict(CONFIG[key], TILE_H=tile[0], TILE_W=tile[1]))
    assert check_against_reference(2, 2, (9, 17), 1, 16, 3, False, torch.float32) == []


def test_output_takes_the_residual_layout():
    x, weight, bias, res = _inputs(1, 2, (3, 4), 1, 16, 3, False, torch.float32, "cpu", strided=True)
    out = depthwise_conv_on_grid(x, weight, bias, grid=(3, 4), num_prefix=1, residual=res, backend="triton")
    assert out.stride() == res.stride()


def test_gradients_of_a_subset():
    """Only the inputs that need a gradient get one (frozen x, residual without grad)."""
    x, weight, bias, res = _inputs(1, 2, (3, 4), 1, 16, 3, False, torch.float32, "cpu")
    weight.requires_grad_()
    out = depthwise_conv_on_grid(x, weight, bias, grid=(3, 4), num_prefix=1, residual=res, backend="triton")
    (dw,) = torch.autograd.grad(out, weight, torch.ones_like(out))
    want = depthwise_conv_on_grid(x, weight, bias, grid=(3, 4), num_prefix=1, residual=res, backend="reference")
    assert relative_error(dw, torch.autograd.grad(want, weight, torch.ones_like(want))[0]) < 1e-5


def test_a_filter_changed_in_place_is_laid_out_again():
    """The taps kept per filter tensor follow its version: an in-place update (an optimizer step, a load) is seen."""
    x, weight, bias, res = _inputs(1, 2, (3, 4), 1, 16, 3, False, torch.float32, "cpu")
    conv = lambda backend: depthwise_conv_on_grid(x, weight, bias, grid=(3, 4), num_prefix=1, residual=res,  # noqa: E731
                                                  backend=backend)
    first = conv("triton")
    assert torch.equal(conv("triton"), first)
    with torch.no_grad():
        weight.mul_(-2.0)
    assert relative_error(conv("triton"), conv("reference")) < 1e-6 and not torch.allclose(conv("triton"), first)


def test_no_grad_forward_has_no_autograd_node():
    x, weight, bias, res = (t.requires_grad_() for t in _inputs(1, 2, (3, 4), 1, 16, 3, True, torch.float32, "cpu"))
    with torch.no_grad():
        out = depthwise_conv_on_grid(x, weight, bias, grid=(3, 4), num_prefix=1, residual=res, backend="triton")
        want = depthwise_conv_on_grid(x, weight, bias, grid=(3, 4), num_prefix=1, residual=res, backend="reference")
    assert out.grad_fn is None and relative_error(out, want) < 1e-6


def test_float64_is_the_reference_only():
    """The kernels compute in fp32: float64 named for Triton is an error saying so; unnamed, the reference runs."""
    x, weight, bias, res = _inputs(1, 2, (3, 4), 1, 8, 3, False, torch.float64, "cpu", param_dtype=torch.float64)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        depthwise_conv_on_grid(x, weight, bias, grid=(3, 4), num_prefix=1, residual=res, backend="triton")
    torch.testing.assert_close(depthwise_conv_on_grid(x, weight, bias, grid=(3, 4), num_prefix=1, residual=res),
                               depthwise_conv_on_grid(x, weight, bias, grid=(3, 4), num_prefix=1, residual=res,
                                                      backend="reference"))


def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration, checked by torch.library.opcheck."""
    x, weight, bias, res = (t.requires_grad_() for t in _inputs(1, 2, (3, 4), 1, 16, 3, False, torch.float32, "cpu"))
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.subquad.grid_conv.default, (x, weight, bias, res, 1, 1, 3, 4), test_utils=utils)
    torch.library.opcheck(torch.ops.subquad.grid_conv.default, (x, weight, None, None, 0, 1, 1, 13), test_utils=utils)
    torch.library.opcheck(torch.ops.subquad.grid_conv_backward.default,
                          (torch.randn_like(x), x.detach(), weight.detach(), bias.detach(), 1, 1, 3, 4),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_cpu():
    """torch.compile(fullgraph=True) traces through the custom op (fake tensors) and its autograd formula."""
    inputs = [t.requires_grad_() for t in _inputs(1, 2, (2, 3, 4), 1, 16, 5, True, torch.float32, "cpu")]

    def fn(x, weight, bias, res):
        return depthwise_conv_on_grid(x, weight, bias, grid=(2, 3, 4), num_prefix=1, residual=res, backend="triton")

    assert_compiles_to_the_same(fn, *inputs)


USES = [(3, False), (5, True), (5, False)]    # (kernel, shared filter): agent's DWC, FLatten's DWC, MALA's LePE


REAL_SIZES = [(32, (56, 56), 1), (1, (256, 256), 1)]       # batch, grid, prefix tokens


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,grid,num_prefix", REAL_SIZES)
@pytest.mark.parametrize("k,shared", USES)
def test_gpu_real_sizes(poisoned, k, shared, b, grid, num_prefix, dtype):
    assert check_against_reference(b, 4, grid, num_prefix, 64, k, shared, dtype, device="cuda") == []


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    inputs = [t.requires_grad_() for t in _inputs(2, 4, (14, 14), 1, 64, 3, False, torch.float32, "cuda")]

    def fn(x, weight, bias, res):
        return depthwise_conv_on_grid(x, weight, bias, grid=(14, 14), num_prefix=1, residual=res, backend="triton")

    assert_compiles_to_the_same(fn, *inputs)


@pytest.mark.gpu
def test_gpu_fuzz(poisoned):
    """200 random configurations (batch, heads, image or video grid, prefix, use, dtype): zero failures.
    Head dims stay at 64 and bias and residual are always given, so that the kernels compile a handful of
    times (the CPU tests cover padded dims, no bias, no residual)."""
    rng = random.Random(1234)
    failures = []
    for i in range(200):
        k, shared = rng.choice(USES)
        if rng.random() < 0.2:
            grid = (rng.randint(2, 3), rng.randint(1, 12), rng.randint(1, 12))
        else:
            grid = (rng.randint(1, 40), rng.randint(1, 40))
        config = dict(b=rng.randint(1, 3), h=rng.randint(1, 4), grid=grid, num_prefix=rng.choice([0, 0, 1, 4]),
                      d=64, k=k, shared=shared, dtype=rng.choice([torch.float32, torch.bfloat16]))
        torch.manual_seed(i)
        failed = check_against_reference(device="cuda", **config)
        if failed:
            failures.append((config, failed))
    assert not failures, f"{len(failures)} of 200 configurations failed: {failures[:5]}"


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("needs_grad", [False, True])
def test_gpu_default_backend_is_triton(shared, needs_grad):
    """On CUDA the default is the Triton kernel, for per-channel filters and filters shared by the heads alike,
    with or without a gradient, and without a warning."""
    h, d = 4, 64
    x = torch.randn(2, h, 1 + 14 * 14, d, device="cuda")
    weight = torch.randn(d if shared else h * d, 1, 5, 5, device="cuda", requires_grad=needs_grad)
    impl = {b.name: b.fn for b in backends_of("depthwise_conv_on_grid")}["triton"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = choose_backend("depthwise_conv_on_grid", None, x, grid=(14, 14))
        depthwise_conv_on_grid(x, weight, None, grid=(14, 14), num_prefix=1)
    assert chosen is impl
