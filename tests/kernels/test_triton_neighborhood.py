"""The Triton neighborhood attention kernels (forward, gradients of q, k, v and the relative position
bias) against the reference: on the CPU interpreter with small shapes, on a GPU at real sizes and in a
random fuzz."""
from __future__ import annotations

import random

import pytest
import torch

from subquad.kernels import available_backends, neighborhood_attention
from subquad.kernels.core.testing import assert_rel_close

pytestmark = pytest.mark.skipif("triton" not in available_backends("neighborhood_attention"),
                                reason="triton is not installed")


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


# --- CPU (Triton interpreter) ------------------------------------------------------------------------

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


def test_rejects_unsupported_inputs():
    q = torch.randn(1, 1, 16, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32.*reference"):
        neighborhood_attention(q, q, q, grid=(4, 4), kernel_size=3, backend="triton")


# --- GPU ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("batch,side,kernel_size,dilation,num_prefix,use_rpb", [
    (2, 56, 7, 1, 0, True), (1, 128, 13, 1, 1, True), (1, 256, 21, 1, 0, False),
    (2, 56, 7, 4, 1, True), (1, 128, 13, 3, 0, True), (1, 64, 9, 7, 1, True),
])
def test_gpu_real_sizes(batch, side, kernel_size, dilation, num_prefix, use_rpb):
    # bf16, 4 heads, d = 64, as the benchmark; batches reduced so that the gathered float32 reference fits
    check_case((side, side), kernel_size, dilation, num_prefix, use_rpb, torch.bfloat16, batch=batch,
               heads=4 if side < 256 else 1, head_dim=64, device="cuda")


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
