"""The attention interface (DESIGN.md §1): registry, bad input, prefix tokens, the small-grid fallback,
timm's constructor keywords, and the softmax module against softmax(q k^T / sqrt(d)) v by hand."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import subquad.attention as attention
from subquad.kernels.core.testing import assert_rel_close

FAMILIES = ["softmax", "agent", "focused_linear", "mala"]
# per-family options that make a (6, 6) grid a real (non-fallback) case
OPTIONS = {"agent": {"num_agents": 9, "bias_grid": 6}, "mala": {"rope": True, "lepe": True, "gate": True},
           "focused_linear": {"pos_grid": (6, 6)}, "softmax": {}}


def build(name, dim=16, num_heads=2, **kw):
    return attention.build(name, dim=dim, num_heads=num_heads, **{**OPTIONS[name], **kw})


def re_shape(shape):
    return r"\(" + r", ".join(str(s) for s in shape) + r"\)"


def test_list_names_the_families():
    names = attention.list()
    assert set(FAMILIES) <= set(names)
    for name in FAMILIES:
        assert isinstance(attention.build(name, dim=16, num_heads=2), attention.GridAttention)
    assert type(attention.build("flatten", dim=16, num_heads=2)) is type(attention.build("focused_linear", dim=16))


def test_unknown_family_lists_the_valid_names():
    with pytest.raises(ValueError, match="no_such_attention") as info:
        attention.build("no_such_attention", dim=16, num_heads=2)
    for name in attention.list():
        assert name in str(info.value)


@pytest.mark.parametrize("name", FAMILIES)
def test_bad_input_raises_value_error_naming_the_values(name):
    m = build(name)
    x = torch.randn(2, 1 + 36, 16)
    with pytest.raises(ValueError, match=r"N=37.*P=4.*\(6, 6\).*N = 40"):
        m(x, grid=(6, 6), num_prefix=4)
    with pytest.raises(ValueError, match=r"N=37.*P=1.*\(6, 7\)"):
        m(x, grid=(6, 7), num_prefix=1)
    for bad in (x[0], x[None]):
        with pytest.raises(ValueError, match=re_shape(bad.shape)):
            m(bad, grid=(6, 6), num_prefix=1)
    with pytest.raises(ValueError, match=r"16.*\(2, 37, 12\)"):
        m(torch.randn(2, 37, 12), grid=(6, 6), num_prefix=1)
    with pytest.raises(ValueError, match=r"\(0, 6\)"):
        m(x, grid=(0, 6), num_prefix=1)
    with pytest.raises(ValueError, match=r"num_heads=3.*dim=16"):
        build(name, num_heads=3)


def test_family_specific_bad_input():
    with pytest.raises(ValueError, match="perfect square.*8"):
        attention.build("agent", dim=16, num_heads=2, num_agents=8)
    with pytest.raises(ValueError, match=r"\(2, 6, 6\)"):
        attention.build("agent", dim=16, num_heads=2, num_agents=9)(torch.randn(1, 72, 16), grid=(2, 6, 6))
    with pytest.raises(ValueError, match="divisible by 4.*6"):
        attention.build("mala", dim=12, num_heads=2, rope=True)(torch.randn(1, 36, 12), grid=(6, 6))


@pytest.mark.parametrize("num_prefix", [1, 4])
@pytest.mark.parametrize("name", FAMILIES)
def test_prefix_tokens_attend_to_all_and_are_attended_by_all(name, num_prefix):
    """Moving a prefix token's input moves every output token; a prefix token's output has a non-zero
    gradient with respect to every input token."""
    m = build(name).double()
    n = num_prefix + 36
    x = torch.randn(2, n, 16, dtype=torch.float64, requires_grad=True)
    y = m(x, grid=(6, 6), num_prefix=num_prefix)
    for p in range(num_prefix):
        moved = x.detach().clone()
        moved[:, p] += 0.1 * torch.randn(2, 16, dtype=torch.float64)
        change = (m(moved, grid=(6, 6), num_prefix=num_prefix) - y).detach().abs().amax(dim=(0, 2))
        assert (change > 1e-10).all(), f"tokens {torch.nonzero(change <= 1e-10).flatten().tolist()} ignore prefix {p}"
        grad = torch.autograd.grad(y[:, p].pow(2).sum(), x, retain_graph=True)[0].abs().amax(dim=(0, 2))
        assert (grad > 1e-10).all(), f"prefix {p} ignores tokens {torch.nonzero(grad <= 1e-10).flatten().tolist()}"


def explicit_dense_module(m, x):
    """proj(softmax(q k^T / sqrt(d)) v), heads split from qkv(x) by hand, q/k norms applied."""
    b, n, c = x.shape
    h, d = m.num_heads, c // m.num_heads
    q, k, v = (t.reshape(b, n, h, d).transpose(1, 2) for t in F.linear(x, m.qkv.weight, m.qkv.bias).split(c, -1))
    q, k = m.q_norm(q), m.k_norm(k)
    s = q @ k.transpose(-2, -1) / math.sqrt(d)
    w = torch.exp(s - s.amax(-1, keepdim=True))
    y = (w / w.sum(-1, keepdim=True)) @ v
    return F.linear(y.transpose(1, 2).reshape(b, n, c), m.proj.weight, m.proj.bias)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("grid,num_prefix", [((5, 7), 0), ((4, 4), 1), ((2, 3, 4), 4)])
def test_softmax_module_matches_hand_composition(grid, num_prefix, qk_norm):
    m = attention.build("softmax", dim=24, num_heads=3, qkv_bias=True, qk_norm=qk_norm).double()
    x = torch.randn(2, num_prefix + math.prod(grid), 24, dtype=torch.float64)
    assert_rel_close(m(x, grid=grid, num_prefix=num_prefix), explicit_dense_module(m, x), torch.float64)


def test_agent_small_grid_stays_agent_attention():
    """Grid tokens <= num_agents: still agent attention (agents pooled by repetition), no fallback, no
    warning, so a trained model computes the same function at any input size."""
    m = attention.build("agent", dim=16, num_heads=2, num_agents=49).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for grid, num_prefix in [((5, 7), 1), ((7, 7), 0), ((2, 3), 4)]:     # 35, 49 (= num_agents), 6 tokens
            x = torch.randn(2, num_prefix + math.prod(grid), 16, dtype=torch.float64)
            y = m(x, grid=grid, num_prefix=num_prefix)
            assert torch.isfinite(y).all()
            assert (y - explicit_dense_module(m, x)).norm() / y.norm() > 1e-3


def test_agent_without_prefix_bias_has_no_prefix_parameters():
    m = attention.build("agent", dim=16, num_heads=2, num_agents=9, prefix_bias=False)
    names = {n for n, _ in m.named_parameters()}
    assert "ac_bias" not in names and "ca_bias" not in names and "an_bias" in names
    assert "ac_bias" not in m.state_dict()
    x = torch.randn(1, 36, 16)
    m(x, grid=(6, 6)).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("name", FAMILIES)
def test_timm_keywords_and_block(name):
    """timm Attention's keywords are accepted, and timm's own Block can build the module (it passes dtype)."""
    from timm.models.vision_transformer import Block
    m = build(name, qkv_bias=True, qk_norm=True, scale_norm=True, proj_bias=False, attn_drop=0.0, proj_drop=0.0,
              norm_layer=nn.LayerNorm)
    assert m.qkv.bias is not None and m.proj.bias is None and isinstance(m.q_norm, nn.LayerNorm)
    y = m(torch.randn(2, 1 + 36, 16), grid=(6, 6), num_prefix=1)
    assert y.shape == (2, 37, 16) and torch.isfinite(y).all()
    block = Block(16, 2, qkv_bias=True, attn_layer=attention.get(name), dtype=torch.float64)
    assert isinstance(block.attn, attention.get(name))
    assert {p.dtype for p in block.attn.parameters()} == {torch.float64}


@pytest.mark.parametrize("used", [(True, True, True), (True, False, True), (False, True, False)])
def test_heads_of_qkv_gradient_is_the_views_gradient_in_the_product_layout(used):
    """q, k, v split from the qkv product (B * N, 3 C) get their gradient back as one stack in that layout, equal to
    autograd's through the plain views (a part that gets no gradient gives zeros), for any gradient strides."""
    from subquad.attention.base import split_heads_of_qkv
    b, n, h, d = 2, 5, 3, 4
    base = torch.randn(b * n, 3 * h * d, dtype=torch.float64)
    weights = [torch.randn(b, h, n, d, dtype=torch.float64).transpose(1, 2).contiguous().transpose(1, 2)
               for _ in range(3)]

    def loss(parts):
        return sum((part * w).sum() for part, w, use in zip(parts, weights, used) if use)

    qkv = base.clone().requires_grad_()
    parts = split_heads_of_qkv(qkv * 1.0, b, h)
    assert [tuple(p.shape) for p in parts] == [(b, h, n, d)] * 3
    (got,) = torch.autograd.grad(loss(parts), qkv)
    plain = base.clone().requires_grad_()
    (want,) = torch.autograd.grad(loss((plain * 1.0).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)), plain)
    assert got.shape == (b * n, 3 * h * d) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
