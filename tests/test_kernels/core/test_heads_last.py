"""Each family's Triton output is stored as (B, N, h, d), as SDPA's is, so that merging the heads after attention
(``y.transpose(1, 2).reshape(B, N, h * d)``) is a view, not a copy; prefix queries joined in the same layout."""
import pytest
import torch

from subquad.kernels import (agent_attention, focused_linear_attention, loglinear_attention, mala_attention,
                             neighborhood_attention, radial_attention)
from subquad.kernels.core.heads_last import cat_tokens, heads_last_empty
from subquad.kernels.core.testing import relative_error

OPS = {
    "agent": lambda q, k, v, **kw: agent_attention(q, k, v, num_agents=4, **kw),
    "focused_linear": focused_linear_attention,
    "mala": mala_attention,
    "neighborhood": lambda q, k, v, **kw: neighborhood_attention(q, k, v, kernel_size=3, **kw),
    "radial": radial_attention,
}


@pytest.mark.parametrize("family", sorted(OPS))
@pytest.mark.parametrize("num_prefix", [0, 1])
def test_triton_output_is_heads_last(family, num_prefix):
    grid = (8, 12)
    n = num_prefix + grid[0] * grid[1]
    qkv = torch.randn(2, n, 3, 2, 16)                       # a qkv projection's output, split as the modules do
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = OPS[family](q, k, v, grid=grid, num_prefix=num_prefix, backend="triton")
    reference = OPS[family](q, k, v, grid=grid, num_prefix=num_prefix, backend="reference")
    assert out.shape == (2, 2, n, 16) and out.transpose(1, 2).is_contiguous()
    merged = out.transpose(1, 2).reshape(2, n, 32)
    assert merged.data_ptr() == out.data_ptr()              # a view
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_helpers():
    like = torch.zeros(1, dtype=torch.bfloat16)
    out = heads_last_empty(like, 2, 3, 5, 4)
    assert out.shape == (2, 3, 5, 4) and out.dtype == torch.bfloat16 and out.transpose(1, 2).is_contiguous()
    a, b = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 5, 4)
    joined = cat_tokens(a, b)
    assert torch.equal(joined, torch.cat([a, b], dim=2)) and joined.transpose(1, 2).is_contiguous()


PREFIXED = {
    "neighborhood": lambda q, k, v, **kw: neighborhood_attention(q, k, v, kernel_size=5, **kw),
    "radial": radial_attention,
    "loglinear": loglinear_attention,
}


def gradients_with_heads_last_output_grad(family, grid, dtype, device):
    """(max relative error of dq, dk, dv against the float64 reference, that of dq's prefix row) for an output
    gradient in the heads-last layout, as a model's gradient arrives (a view of the (B, N, h*d) gradient)."""
    n = 1 + grid[0] * grid[1]
    q, k, v = (torch.randn(2, 2, n, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, n, 2, 64, device=device, dtype=dtype).transpose(1, 2)
    out = PREFIXED[family](q, k, v, grid=grid, num_prefix=1, backend="triton")
    got = torch.autograd.grad(out, (q, k, v), grad)
    exact_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = torch.autograd.grad(PREFIXED[family](*exact_in, grid=grid, num_prefix=1, backend="reference"), exact_in,
                                grad.double())
    return (max(relative_error(a, e) for a, e in zip(got, exact)), relative_error(got[0][:, :, :1], exact[0][:, :, :1]))


def test_prefix_gradients_with_a_heads_last_output_gradient_cpu():
    errors = gradients_with_heads_last_output_grad("neighborhood", (8, 12), torch.float32, "cpu")
    assert max(errors) < 1e-4, errors


@pytest.mark.gpu
@pytest.mark.parametrize("family", sorted(PREFIXED))
def test_gpu_prefix_gradients_with_a_heads_last_output_gradient(family):
    """The prefix query's SDPA got a wrong dq (relative error 0.9) from a heads-last output gradient."""
    errors = gradients_with_heads_last_output_grad(family, (32, 40), torch.bfloat16, "cuda")
    assert max(errors) < 1e-2, errors
