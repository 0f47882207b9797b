"""neighborhood_attention against its definition (NAT / DiNAT, as NATTEN computes it) and against natten.

The definition, per axis of length L with kernel k and dilation d: position i belongs to group
i mod d, which holds the positions i mod d, i mod d + d, ...; its window is k consecutive members of
the group centred on i, shifted inward at the group's ends. A grid token sees the product of its
row and column windows, plus every prefix token; prefix tokens see everything.
"""
import pytest
import torch

from subquad.kernels import neighborhood_attention
from subquad.kernels.core.testing import assert_rel_close

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
