"""The sparse family's modules (neighborhood / nat, radial, loglinear / llsa): registry, the
module against its functional op, NAT's rpb parameter, prefix tokens, small-grid fallbacks."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import subquad.attention as attention
from subquad.kernels import loglinear_attention, neighborhood_attention, radial_attention
from subquad.kernels.core.testing import assert_rel_close

# options under which a 13 x 17 grid is a real (sparse, non-fallback) case
OPTIONS = {"neighborhood": dict(kernel_size=5, dilation=2), "radial": dict(tile=(4, 4)),
           "loglinear": dict(top_k=4)}


def build(name, dim=16, num_heads=2, **kw):
    return attention.build(name, dim=dim, num_heads=num_heads, **{**OPTIONS[attention.canonical_name(name)], **kw})


def split_heads(m, x):
    b, n, c = x.shape
    q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).reshape(b, n, 3, m.num_heads, c // m.num_heads).permute(2, 0, 3, 1, 4)
    return q, k, v


def merge_heads(m, y):
    b, h, n, d = y.shape
    return F.linear(y.transpose(1, 2).reshape(b, n, h * d), m.proj.weight, m.proj.bias)


def test_names_and_aliases():
    for name, alias in (("neighborhood", "nat"), ("radial", "radial"), ("loglinear", "llsa")):
        assert name in attention.list()
        assert type(attention.build(alias, dim=16, num_heads=2)) is attention.get(name)


def module_by_hand(name, m, x, grid, p):
    q, k, v = split_heads(m, x)
    if name == "neighborhood":
        y = neighborhood_attention(q, k, v, grid=grid, kernel_size=5, dilation=2, rpb=m.rpb, num_prefix=p)
    elif name == "radial":
        y = radial_attention(q, k, v, grid=grid, num_prefix=p, tile=(4, 4))
    else:
        y = loglinear_attention(q, k, v, grid=grid, num_prefix=p, top_k=4)
    return merge_heads(m, y)


@pytest.mark.parametrize("name", ["neighborhood", "radial", "loglinear"])
def test_module_is_its_op_between_the_projections(name):
    m = build(name, qkv_bias=True)
    x = torch.randn(2, 1 + 13 * 17, 16, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # no dense fallback on this grid
        y = m(x, grid=(13, 17), num_prefix=1)
    assert_rel_close(y, module_by_hand(name, m, x, (13, 17), 1))
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert x.grad.abs().sum() > 0


def test_nat_relative_position_bias_parameter():
    m = attention.build("nat", dim=24, num_heads=3, kernel_size=7)
    assert tuple(m.rpb.shape) == (3, 13, 13) and "rpb" in dict(m.named_parameters())
    assert 0.01 < float(m.rpb.detach().std()) < 0.03                                     # NAT: trunc_normal(std=0.02)
    assert attention.build("nat", dim=24, num_heads=3, rpb=False).rpb is None
    with pytest.raises(ValueError, match="odd"):
        attention.build("nat", dim=24, num_heads=3, kernel_size=6)


@pytest.mark.parametrize("name", ["neighborhood", "radial", "loglinear"])
def test_prefix_tokens_attend_to_all_and_are_attended_by_all(name):
    m = build(name).double()
    grid, p = (13, 17), 2
    x = torch.randn(1, p + 221, 16, dtype=torch.float64, requires_grad=True)
    y = m(x, grid=grid, num_prefix=p)
    for i in range(p):
        grad_in = torch.autograd.grad(y[:, i].square().sum(), x, retain_graph=True)[0].abs().amax(dim=(0, 2))
        assert (grad_in > 1e-12).all()
        grad_out = torch.autograd.grad(y.square().sum(dim=2)[0], x, torch.ones(p + 221, dtype=torch.float64),
                                       retain_graph=True)[0]
        assert grad_out[0, i].abs().sum() > 0
    moved = x.detach().clone()
    moved[:, 0] += 0.1
    change = (m(moved, grid=grid, num_prefix=p) - y).detach().abs().amax(dim=(0, 2))
    assert (change > 1e-12).all()


def dense_module(m, x):
    q, k, v = split_heads(m, x)
    return merge_heads(m, torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1) @ v)


@pytest.mark.parametrize("name,grid", [("radial", (8, 8)), ("llsa", (8, 8))])
def test_small_grids_fall_back_to_dense_with_one_warning(name, grid):
    m = attention.build(name, dim=16, num_heads=2).double()       # defaults: 8x8 tiles, K=8
    x = torch.randn(2, 1 + math.prod(grid), 16, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert_rel_close(m(x, grid=grid, num_prefix=1), dense_module(m, x), torch.float64)
    assert len([w for w in caught if "dense" in str(w.message)]) == 1


@pytest.mark.parametrize("grid,p", [((5, 9), 1), ((3, 4), 0), ((12, 7), 2)])
def test_nat_pads_small_grids_like_nattens_module(grid, p):
    """Sides < kernel_size * dilation: NATTEN's NeighborhoodAttention2D zero-pads the input at the
    bottom and right and crops the output; prefix queries still see only the real tokens."""
    m = attention.build("nat", dim=16, num_heads=2, qkv_bias=True, kernel_size=5, dilation=2).double()
    x = torch.randn(2, p + math.prod(grid), 16, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = m(x, grid=grid, num_prefix=p)
    h, w = max(grid[0], 10), max(grid[1], 10)
    padded = torch.zeros(2, h, w, 16, dtype=torch.float64)
    padded[:, :grid[0], :grid[1]] = x[:, p:].reshape(2, *grid, 16)
    y_padded = m(torch.cat([x[:, :p], padded.reshape(2, -1, 16)], 1), grid=(h, w), num_prefix=p)
    want = y_padded[:, p:].reshape(2, h, w, 16)[:, :grid[0], :grid[1]].reshape(2, -1, 16)
    assert_rel_close(y[:, p:], want, torch.float64)
    assert_rel_close(y[:, :p], dense_module(m, x)[:, :p], torch.float64)


def test_radial_on_video_and_image_only_families_refuse_it():
    x = torch.randn(1, 1 + 8 * 8 * 8, 16)
    for opts in (dict(tile=(1, 4, 4)), dict(layout="official", block_size=32)):
        m = attention.build("radial", dim=16, num_heads=2, **opts)
        assert not m.needs_dense((8, 8, 8))
        y = m(x, grid=(8, 8, 8), num_prefix=1)
        assert y.shape == x.shape and torch.isfinite(y).all()
    for name in ("nat", "llsa"):
        with pytest.raises(ValueError, match=r"\(8, 8, 8\)"):
            attention.build(name, dim=16, num_heads=2)(x, grid=(8, 8, 8), num_prefix=1)


@pytest.mark.parametrize("name", ["neighborhood", "radial", "loglinear"])
def test_timm_block_builds_the_module(name):
    from timm.models.vision_transformer import Block
    block = Block(16, 2, qkv_bias=True, attn_layer=attention.get(name), dtype=torch.float64)
    assert {p.dtype for p in block.attn.parameters()} == {torch.float64}
