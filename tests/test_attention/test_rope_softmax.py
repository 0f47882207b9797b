"""MAViT's RoPE softmax blocks: built by name (not a family), and the module against a hand composition
(qkv split by hand, 2D RoPE on q and k, softmax attention, the LePE as F.conv2d, the gate, proj)."""
import math

import pytest
import torch
import torch.nn.functional as F

import subquad.attention as attention
from subquad.attention import RoPESoftmaxAttention
from subquad.kernels import apply_rope_2d
from subquad.kernels.core.testing import assert_rel_close


def test_built_by_name_not_listed_among_the_families():
    attn = attention.build("softmax_rope", dim=16, num_heads=2, lepe_kernel_size=3)
    assert type(attn) is RoPESoftmaxAttention and attn.family == "softmax_rope"
    assert attn.lepe.weight.shape == (16, 1, 3, 3)
    assert "softmax_rope" not in attention.list() and "softmax_rope" in attention.standalone_names()


@pytest.mark.parametrize("grid,num_prefix", [((6, 6), 0), ((5, 7), 1), ((3, 8), 4)])
def test_module_matches_hand_composition(grid, num_prefix):
    m = attention.build("softmax_rope", dim=16, num_heads=2, qkv_bias=True).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    b, n, c, h = 2, num_prefix + math.prod(grid), 16, 2
    x = torch.randn(b, n, c, dtype=torch.float64)
    q, k, v = [t.reshape(b, n, h, c // h).transpose(1, 2) for t in F.linear(x, m.qkv.weight, m.qkv.bias).split(c, -1)]
    q, k = apply_rope_2d(q, grid, num_prefix), apply_rope_2d(k, grid, num_prefix)
    y = ((q @ k.transpose(-2, -1)) * (c // h) ** -0.5).softmax(-1) @ v
    y = y.transpose(1, 2).reshape(b, n, c)
    values = v.transpose(1, 2).reshape(b, n, c)
    g = values[:, num_prefix:].reshape(b, *grid, c).permute(0, 3, 1, 2)
    lepe = F.conv2d(g, m.lepe.weight, m.lepe.bias, padding=2, groups=c).permute(0, 2, 3, 1).reshape(b, -1, c)
    y = y + torch.cat([torch.zeros_like(values[:, :num_prefix]), lepe], dim=1)
    y = y * F.linear(x, m.gate.weight, m.gate.bias)
    assert_rel_close(m(x, grid=grid, num_prefix=num_prefix), F.linear(y, m.proj.weight, m.proj.bias), torch.float64)


def test_rope_tables_built_in_inference_mode_serve_training():
    """The sin/cos tables are cached per grid and dtype: a first call under inference mode must not leave
    inference tensors that a later training call would save for its backward."""
    grid = (3, 5)
    with torch.inference_mode():
        apply_rope_2d(torch.randn(1, 2, 16, 8, dtype=torch.float64), grid, 1)
    x = torch.randn(1, 2, 16, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rope_2d(t, grid, 1), (x,))
