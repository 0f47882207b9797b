"""depthwise_conv_on_grid: the reference against a brute force written with explicit loops over the filter
taps (no F.conv2d), in float64, forward and gradients; the argument checks of the functional entry point."""
import math

import pytest
import torch

from subquad.kernels import available_backends, depthwise_conv_on_grid
from subquad.kernels.core.testing import assert_rel_close


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
