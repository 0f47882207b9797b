"""Every op's Triton kernels on q, k, v as the models make them: views of one (B, N, 3, h, d) projection (token
stride 3hd, head stride d), at head dim 64 and at DiT-XL/2's and PixArt's 72 (16-byte aligned rows whose strides
Triton's JIT does not mark aligned: the kernels state the alignment, ``row_alignment``), and once more starting
one value past an allocation (2-byte aligned rows: the kernels must not assume more). Forward and gradients
against each op's reference in float32 on the same values; on CPU under the Triton interpreter on a small grid,
on CUDA (``gpu``) on a larger one, where a wrong alignment claim is a misaligned-address fault or a wrong
result."""
from __future__ import annotations

import math

import pytest
import torch

from subquad import kernels
from subquad.kernels.core.dispatch import INTERPRET
from subquad.kernels.core.testing import assert_rel_close, projection_views

OPS = {"radial_attention": {}, "neighborhood_attention": dict(kernel_size=5), "loglinear_attention": dict(top_k=(2,)),
       "mala_attention": {}, "focused_linear_attention": {}, "agent_attention": dict(num_agents=16)}
DEVICES = [pytest.param("cpu", (8, 8), marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1"),
                        id="cpu"),
           pytest.param("cuda", (48, 40), marks=pytest.mark.gpu, id="cuda")]


@pytest.mark.parametrize("device,grid", DEVICES)
@pytest.mark.parametrize("d,offset", [(64, 0), (72, 0), (72, 1)])
@pytest.mark.parametrize("op", list(OPS))
def test_triton_on_projection_views_equals_reference(op, d, offset, device, grid):
    fn = getattr(kernels, op)
    b, h, p = 2, 2, 1
    (q, k, v), leaf = projection_views(b, p + math.prod(grid), h, d, offset, device)
    out = fn(q, k, v, grid=grid, num_prefix=p, backend="triton", **OPS[op])
    leaf32 = leaf.detach().float().requires_grad_()           # the reference in float32 on the same values
    want = fn(*leaf32.permute(2, 0, 3, 1, 4), grid=grid, num_prefix=p, backend="reference", **OPS[op])
    assert_rel_close(out, want, torch.bfloat16, what=f"{op} d={d} offset={offset}")
    g = torch.randn_like(want)
    (grad,), (grad_want,) = torch.autograd.grad(out, leaf, g.bfloat16()), torch.autograd.grad(want, leaf32, g)
    assert_rel_close(grad, grad_want, torch.bfloat16, what=f"{op} d={d} offset={offset} gradient")


@pytest.mark.parametrize("device,grid", DEVICES)
@pytest.mark.parametrize("d,offset", [(64, 0), (72, 0), (72, 1)])
def test_depthwise_conv_on_projection_views_equals_reference(d, offset, device, grid):
    """The DWC / LePE conv on the value view with a residual view (the q of the same projection)."""
    b, h, p = 2, 2, 1
    (q, _, v), leaf = projection_views(b, p + math.prod(grid), h, d, offset, device)
    weight = torch.randn(h * d, 1, 3, 3, device=device).requires_grad_()
    out = kernels.depthwise_conv_on_grid(v, weight, None, grid=grid, num_prefix=p, residual=q, backend="triton")
    leaf32 = leaf.detach().float().requires_grad_()
    q32, _, v32 = leaf32.permute(2, 0, 3, 1, 4)
    want = kernels.depthwise_conv_on_grid(v32, weight, None, grid=grid, num_prefix=p, residual=q32,
                                          backend="reference")
    assert_rel_close(out, want, torch.bfloat16, what=f"conv d={d} offset={offset}")
    g = torch.randn_like(want)
    grad, grad_w = torch.autograd.grad(out, (leaf, weight), g.bfloat16())
    grad_want, grad_w_want = torch.autograd.grad(want, (leaf32, weight), g)
    assert_rel_close(grad, grad_want, torch.bfloat16, what=f"conv d={d} offset={offset} gradient")
    assert_rel_close(grad_w, grad_w_want, torch.bfloat16, what=f"conv d={d} offset={offset} filter gradient")
