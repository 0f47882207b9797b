"""softmax_attention (both backends) against softmax(q k^T / sqrt(d)) v written out by hand; the block-sparse
families' prefix queries (dense softmax over all keys) joined to their output."""
import math

import pytest
import torch

from subquad import kernels
from subquad.kernels import softmax_attention
from subquad.kernels.core.heads_last import cat_tokens
from subquad.kernels.core.dispatch import INTERPRET, TRITON
from subquad.kernels.core.testing import assert_rel_close
from subquad.kernels.softmax import reference as softmax_reference

if TRITON:
    from subquad.kernels.softmax import prefix_triton

BACKENDS = ["sdpa", "reference"]


def explicit_softmax_weights(q, k):
    """W_ij = exp(s_ij) / sum_j exp(s_ij), s_ij = q_i . k_j / sqrt(d), in float64."""
    q, k = q.double(), k.double()
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,h,n,m,d,dv", [(1, 1, 5, 5, 4, 4), (2, 3, 7, 11, 8, 6), (3, 2, 16, 1, 4, 4)])
def test_matches_explicit_weights_float64(backend, b, h, n, m, d, dv):
    q, k, v = torch.randn(b, h, n, d).double(), torch.randn(b, h, m, d).double(), torch.randn(b, h, m, dv).double()
    w = explicit_softmax_weights(q, k)
    assert_rel_close(softmax_attention(q, k, v, backend=backend), w @ v, torch.float64, what=backend)


@pytest.mark.parametrize("seed", [1, 2])
def test_backends_agree_float32(seed):
    torch.manual_seed(seed)
    q, k, v = (torch.randn(2, 3, 37, 16) for _ in range(3))
    assert_rel_close(softmax_attention(q, k, v, backend="reference"), softmax_attention(q, k, v, backend="sdpa"),
                     torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    q, k, v = (torch.randn(2, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: softmax_attention(q, k, v, backend=backend), (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,magnitude", [(torch.bfloat16, 30.0), (torch.bfloat16, 1e3), (torch.float16, 30.0),
                                             (torch.float16, 200.0)])
def test_low_precision_large_scores(backend, dtype, magnitude):
    """Scores far outside exp's range in 16 bits: finite, and within the bf16/fp16 tolerance of float64."""
    q, k = (torch.randn(2, 2, 33, 16) * magnitude).to(dtype), (torch.randn(2, 2, 33, 16) * magnitude).to(dtype)
    v = torch.randn(2, 2, 33, 16).to(dtype)
    out = softmax_attention(q, k, v, backend=backend)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_rel_close(out, explicit_softmax_weights(q, k) @ v.double(), dtype)


def test_bad_input_names_the_values():
    q = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"\(2, 5, 4\)"):
        softmax_attention(q, q, q)
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="float64"):
        softmax_attention(q, q, q.double())
    with pytest.raises(ValueError, match=r"no backend 'nope'.*reference.*sdpa"):
        softmax_attention(q, q, q, backend="nope")


@pytest.mark.parametrize("op", ["radial_attention", "loglinear_attention"])
@pytest.mark.parametrize("backend", ["block_sparse", "triton"])
def test_prefix_queries_filled_in_place_without_autograd(op, backend, monkeypatch):
    """The block-sparse families' prefix queries (dense over all keys) go into the core's output in place when no
    gradient is recorded (no concatenation of the whole output) and are concatenated when one is, except by the
    Triton ops, which write them into their own output with autograd too (their gradients in their backward): the
    same values either way, those of SDPA for the prefix queries."""
    if "triton" not in kernels.available_backends(op) and backend == "triton":
        pytest.skip("no Triton")
    grid, p = (8, 8), 3
    q, k, v = (torch.randn(2, 2, p + 64, 16) for _ in range(3))
    options = dict(top_k=(2,)) if op == "loglinear_attention" else {}
    fn = lambda *qkv: getattr(kernels, op)(*qkv, grid=grid, num_prefix=p, backend=backend, **options)  # noqa: E731
    joins = []
    monkeypatch.setattr(softmax_reference, "cat_tokens", lambda *parts: joins.append(1) or cat_tokens(*parts))
    with torch.no_grad():
        filled = fn(q, k, v)
    assert not joins
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    joined = fn(*leaves)
    concatenated = backend != "triton"
    assert bool(joins) == concatenated and joined.grad_fn is not None
    torch.testing.assert_close(filled, joined.detach())
    assert_rel_close(filled[:, :, :p], softmax_attention(q[:, :, :p], k, v), torch.float32)


@pytest.mark.parametrize("num_prefix,n", [(1, 37), (3, 20), (150, 41)])
def test_prefix_queries_backward_equals_autograd(num_prefix, n):
    """The prefix queries' explicit backward (float32; 150 queries: three steps of 64) against autograd through the
    float64 reference."""
    q = torch.randn(2, 3, num_prefix, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    scale = 8 ** -0.5
    out = softmax_reference.softmax_attention_reference(q, k, v, scale)
    do = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), do)
    got = softmax_reference.prefix_queries_backward(do, q.detach(), k.detach(), v.detach(), out.detach(), scale)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_rel_close(g.double(), w, torch.float32, what=name)


@pytest.mark.skipif(not (TRITON and INTERPRET), reason="the Triton kernels on CPU tensors: Triton's interpreter")
@pytest.mark.parametrize("b,h,n,d,num_prefix,dtype", [
    (2, 3, 70, 16, 1, torch.float32),         # one cls token, keys over two tiles, the last one partial
    (2, 1, 50, 16, 20, torch.float32),        # more prefix queries than one block
    (1, 2, 130, 24, 3, torch.bfloat16),       # padded head dim
    (1, 2, 33, 64, 2, torch.float16),
])
def test_prefix_queries_gradients_triton_match_the_reference(b, h, n, d, num_prefix, dtype):
    """The Triton prefix backward (CPU interpreter here) writes dq's prefix rows and adds the keys' and values'
    shares into dk, dv as the explicit reference does, from the same inputs (in float32 dk, dv start nonzero: an
    add, not an overwrite; in 16 bits at zero, whose sum rounds no increment away); dq's grid rows stay untouched."""
    q, k, v, do = (torch.randn(b, h, n, d).to(dtype) for _ in range(4))
    o = softmax_reference.softmax_attention_reference(q, k, v)
    start = [torch.randn(b, h, n, d)] + [torch.randn(b, h, n, d) * (dtype == torch.float32) for _ in range(2)]
    want = [t.clone() for t in start]
    softmax_reference.add_prefix_queries_gradients(*want, do.float(), q.float(), k.float(), v.float(), o.float(),
                                                   num_prefix)
    got = [t.to(dtype, copy=True) for t in start]
    prefix_triton.add_prefix_queries_gradients_triton(*got, do, q, k, v, o, num_prefix)
    p = num_prefix
    assert_rel_close(got[0][:, :, :p].float(), want[0][:, :, :p], dtype, what="dq prefix rows")
    assert torch.equal(got[0][:, :, p:], start[0][:, :, p:].to(dtype)), "grid rows of dq changed"
    for name, g, w, s in zip(("dk", "dv"), got[1:], want[1:], start[1:]):
        assert_rel_close(g.float() - s.to(dtype).float(), w - s, dtype, what=f"{name} increment")
