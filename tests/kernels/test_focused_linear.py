"""focused_linear_attention against FLatten (Han et al., ICCV 2023, Eq. 3-6) written out as N x N weights.

The feature map is brute-forced as the official code applies it: on (B, N, C) tokens before the heads are
split, C = heads * head_dim, so its norms run over all C channels of a token:
r = (ReLU(x) + 1e-6) / softplus(s),  phi_p(x) = ||r|| / ||r^p|| r^p  (elementwise power p),
then per head w_ij = phi(q_i).phi(k_j) / (sum_j phi(q_i).phi(k_j) + M eps),  O = W V.

eps = 1e-6 is the official code's: it divides by mean_j phi(q_i).phi(k_j) + eps. It matters (1e-2 relative
error and more) for a query whose r is mostly the 1e-6 floor, so the weights here keep it.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from subquad.kernels import focused_linear_attention
from subquad.kernels.core.testing import assert_rel_close

NORMALISER_EPS = 1e-6


def to_tokens(x):
    """(B, h, N, d) -> (B, N, h*d): the official layout."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def to_heads(x, h):
    b, n, c = x.shape
    return x.reshape(b, n, h, c // h).transpose(1, 2)


def focused_map(x, p, s):
    """phi_p of (B, h, N, d) heads, straight from the definition on the (B, N, C) tokens in float64 (no range
    tricks). s: None or (h, d) / (d,) / scalar, laid out over C as the official (1, 1, C) parameter."""
    h, d = x.shape[1], x.shape[-1]
    r = F.relu(to_tokens(x.double())) + 1e-6
    if s is not None:
        s = s.double()
        r = r / F.softplus(s.reshape(h * d) if s.dim() == 2 else s.repeat(h) if s.dim() == 1 else s)
    rp = r ** p
    return to_heads(r.norm(dim=-1, keepdim=True) / rp.norm(dim=-1, keepdim=True) * rp, h)


def explicit_focused_weights(q, k, p, s):
    phi_q, phi_k = focused_map(q, p, s), focused_map(k, p, s)
    scores = torch.einsum("bhid,bhjd->bhij", phi_q, phi_k)
    return scores / (scores.sum(dim=-1, keepdim=True) + scores.shape[-1] * NORMALISER_EPS)


CASES = [  # grid, num_prefix, batch, heads
    ((4, 4), 0, 1, 1),
    ((3, 5), 1, 2, 3),
    ((6, 2), 4, 2, 2),
    ((2, 3, 4), 1, 2, 2),       # a video grid: FLatten needs no image structure
]
SCALES = ["none", "scalar", "channel", "head_channel"]


def make_scale(kind, h, d):
    return {"none": None, "scalar": torch.randn(()), "channel": torch.randn(d),
            "head_channel": torch.randn(h, d)}[kind]


@pytest.mark.parametrize("scale_kind", SCALES)
@pytest.mark.parametrize("p", [1, 2, 3, 4.5])
@pytest.mark.parametrize("grid,num_prefix,b,h", CASES)
def test_matches_explicit_weights_float64(grid, num_prefix, b, h, p, scale_kind):
    n_tokens, d = num_prefix + math.prod(grid), 8
    q, k, v = (torch.randn(b, h, n_tokens, d, dtype=torch.float64) for _ in range(3))
    s = make_scale(scale_kind, h, d)
    s = None if s is None else s.double()
    w = explicit_focused_weights(q, k, p, s)
    out = focused_linear_attention(q, k, v, grid=grid, focusing_factor=p, scale=s, num_prefix=num_prefix)
    assert_rel_close(out, w @ v, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_prefix,p", [(0, 3), (1, 2.5)])
def test_gradients_match_explicit_weights(dtype, num_prefix, p):
    """Forward and gradients of q, k, v and the scale s at fp32 / bf16 inputs against the float64 brute force."""
    grid, h, d = (3, 5), 3, 8
    n_tokens = num_prefix + math.prod(grid)
    q, k, v = (torch.randn(2, h, n_tokens, d).to(dtype).requires_grad_() for _ in range(3))
    s = torch.randn(h, d, requires_grad=True)
    out = focused_linear_attention(q, k, v, grid=grid, focusing_factor=p, scale=s, num_prefix=num_prefix)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, s), grad)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v, s)]
    expected = explicit_focused_weights(exact[0], exact[1], p, exact[3]) @ exact[2]
    expected_grads = torch.autograd.grad(expected, exact, grad.double())
    assert_rel_close(out, expected, dtype, what="out")
    for what, a, e in zip(("dq", "dk", "dv", "ds"), grads, expected_grads):
        assert_rel_close(a, e, dtype, what=what)


def test_norms_span_all_heads():
    """Scaling one head's channels of a token changes the other heads' outputs (per-head norms would not)."""
    q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64).abs() + 0.1 for _ in range(3))
    s = torch.randn(2, 8, dtype=torch.float64)
    base = focused_linear_attention(q, k, v, grid=(4, 4), scale=s)
    k2 = k.clone()
    k2[:, 1] *= 3.0
    moved = focused_linear_attention(q, k2, v, grid=(4, 4), scale=s)
    assert (moved[:, 0] - base[:, 0]).norm() / base[:, 0].norm() > 1e-2


def test_implied_weights_are_a_distribution():
    """The op is linear in v: with v = I its output is its N x N weight matrix, non-negative with rows summing to 1
    up to the epsilon: every q and k has positive entries, but the whole-token norms leave a head whose r is
    small next to the other head's with normalisers down to ~1e-2, where eps = 1e-6 shows at ~1e-5."""
    q, k = (torch.randn(2, 2, 1 + 20, 8, dtype=torch.float64).abs() + 0.1 for _ in range(2))
    eye = torch.eye(21, dtype=torch.float64).expand(2, 2, 21, 21)
    w = focused_linear_attention(q, k, eye, grid=(4, 5), scale=torch.randn(2, 8, dtype=torch.float64), num_prefix=1)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 21, dtype=torch.float64), rtol=0, atol=1e-4)


def test_per_channel_scale_matters():
    """A per-channel s changes the direction of r, hence the weights (a uniform s cancels: phi is 1-homogeneous)."""
    q, k = (torch.randn(1, 2, 16, 8, dtype=torch.float64).abs() + 0.1 for _ in range(2))
    v = torch.randn(1, 2, 16, 8, dtype=torch.float64)
    base = focused_linear_attention(q, k, v, grid=(4, 4))
    uniform = focused_linear_attention(q, k, v, grid=(4, 4), scale=torch.tensor(2.0, dtype=torch.float64))
    per_channel = focused_linear_attention(q, k, v, grid=(4, 4), scale=torch.randn(2, 8, dtype=torch.float64))
    assert_rel_close(uniform, base, tol=1e-5)        # up to the epsilons
    assert (per_channel - base).norm() / base.norm() > 1e-2


@pytest.mark.parametrize("p,num_prefix,fast", [(3, 1, False), (2.5, 0, True), (3, 4, True)])
def test_gradcheck_float64(p, num_prefix, fast):
    """Gradients of q, k, v and the learnable scale s."""
    grid = (2, 3) if not fast else (3, 4)
    n_tokens, d = num_prefix + math.prod(grid), 4
    q, k, v = (torch.randn(2, 2, n_tokens, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    s = torch.randn(2, d, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, s):
        return focused_linear_attention(q, k, v, grid=grid, focusing_factor=p, scale=s, num_prefix=num_prefix)
    assert torch.autograd.gradcheck(fn, (q, k, v, s), fast_mode=fast)


@pytest.mark.parametrize("dtype,magnitude", [(torch.bfloat16, 1e2), (torch.bfloat16, 1e4), (torch.bfloat16, 1e15),
                                             (torch.float16, 1e2), (torch.float16, 1e4)])
def test_low_precision_large_magnitudes(dtype, magnitude):
    """Large q, k in 16 bits (1e15: r^3 alone would overflow float32): finite, within the bf16 tolerance of float64."""
    q, k = ((torch.randn(2, 2, 1 + 48, 16) * magnitude).to(dtype) for _ in range(2))
    v = torch.randn(2, 2, 1 + 48, 16).to(dtype)
    s = torch.randn(2, 16)
    out = focused_linear_attention(q, k, v, grid=(6, 8), scale=s, num_prefix=1)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_rel_close(out, explicit_focused_weights(q, k, 3, s) @ v.double(), dtype)


def test_bad_input_names_the_values():
    q = torch.randn(1, 2, 12, 8)
    with pytest.raises(ValueError, match=r"N=12.*P=1.*\(3, 4\)"):
        focused_linear_attention(q, q, q, grid=(3, 4), num_prefix=1)
    with pytest.raises(ValueError, match="focusing_factor.*-1"):
        focused_linear_attention(q, q, q, grid=(3, 4), focusing_factor=-1)
    with pytest.raises(ValueError, match=r"head_dim=8.*heads\*head_dim=16.*\(3,\)"):
        focused_linear_attention(q, q, q, grid=(3, 4), scale=torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(2, 12, 8\)"):
        focused_linear_attention(q[0], q[0], q[0], grid=(3, 4))
