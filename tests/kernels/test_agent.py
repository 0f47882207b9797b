"""agent_attention against Agent Attention (Han et al., ECCV 2024, Eq. 3-5) written out as N x N weights.

A = adaptive average pooling of the grid queries to a x a agents (prefix queries excluded);
W = softmax(Q A^T / sqrt(d) + B2) softmax(A K^T / sqrt(d) + B1), an N x N matrix, and O = W V.
"""
import math

import pytest
import torch

from subquad.kernels import agent_attention
from subquad.kernels.core.testing import assert_rel_close


def pooling_matrix(h, w, a):
    """(a*a, h*w): adaptive average pooling as a matrix; bin i covers [floor(i*H/a), ceil((i+1)*H/a))."""
    def bins(size):
        return [(math.floor(i * size / a), math.ceil((i + 1) * size / a)) for i in range(a)]
    p = torch.zeros(a * a, h * w, dtype=torch.float64)
    for i, (r0, r1) in enumerate(bins(h)):
        for j, (c0, c1) in enumerate(bins(w)):
            for r in range(r0, r1):
                for c in range(c0, c1):
                    p[i * a + j, r * w + c] = 1.0 / ((r1 - r0) * (c1 - c0))
    return p


def softmax_rows(s):
    e = torch.exp(s - s.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def explicit_agent_weights(q, k, grid, num_agents, num_prefix, bias=None):
    """The composed (B, h, N, N) weights of agent attention, in float64."""
    q, k = q.double(), k.double()
    scale = q.shape[-1] ** -0.5
    agents = pooling_matrix(*grid, math.isqrt(num_agents)) @ q[:, :, num_prefix:]      # (B, h, n, d)
    aggregation = softmax_rows(scale * agents @ k.transpose(-2, -1) + (0 if bias is None else bias[0].double()))
    broadcast = softmax_rows(scale * q @ agents.transpose(-2, -1) + (0 if bias is None else bias[1].double()))
    return broadcast @ aggregation


def random_bias(h, n, big_n, dtype=torch.float64, requires_grad=False):
    return (torch.randn(h, n, big_n, dtype=dtype, requires_grad=requires_grad),
            torch.randn(h, big_n, n, dtype=dtype, requires_grad=requires_grad))


CASES = [  # grid, num_agents, num_prefix, batch, heads
    ((4, 4), 4, 0, 1, 1),
    ((6, 6), 9, 1, 2, 3),
    ((5, 7), 9, 1, 2, 2),       # 3 divides neither 5 nor 7
    ((5, 7), 49, 0, 1, 2),      # more agents than rows and columns
    ((7, 5), 4, 4, 2, 1),       # 4 registers, non-square
    ((3, 10), 16, 1, 1, 2),
    ((1, 6), 4, 0, 2, 1),       # a single row
]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("grid,num_agents,num_prefix,b,h", CASES)
def test_matches_explicit_weights_float64(grid, num_agents, num_prefix, b, h, with_bias):
    n_tokens = num_prefix + math.prod(grid)
    q, k, v = (torch.randn(b, h, n_tokens, 8, dtype=torch.float64) for _ in range(3))
    bias = random_bias(h, num_agents, n_tokens) if with_bias else None
    w = explicit_agent_weights(q, k, grid, num_agents, num_prefix, bias)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))        # both stages are row-stochastic
    out = agent_attention(q, k, v, grid=grid, num_agents=num_agents, agent_bias=bias, num_prefix=num_prefix)
    assert_rel_close(out, w @ v, torch.float64)


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_matches_float64(seed):
    torch.manual_seed(seed)
    q, k, v = (torch.randn(2, 2, 1 + 63, 16) for _ in range(3))
    bias = random_bias(2, 9, 64, dtype=torch.float32)
    out = agent_attention(q, k, v, grid=(7, 9), num_agents=9, agent_bias=bias, num_prefix=1)
    w = explicit_agent_weights(q, k, (7, 9), 9, 1, bias)
    assert out.dtype == torch.float32
    assert_rel_close(out, w @ v.double(), torch.float32)


@pytest.mark.parametrize("grid,num_agents,num_prefix,fast", [((2, 3), 4, 1, False), ((3, 2), 4, 0, True),
                                                             ((5, 7), 9, 4, True)])
def test_gradcheck_float64(grid, num_agents, num_prefix, fast):
    """Gradients of q, k, v and both biases; fast: gradcheck's random-projection mode, to keep it quick."""
    n_tokens = num_prefix + math.prod(grid)
    q, k, v = (torch.randn(2, 2, n_tokens, 2 if not fast else 4, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    b1, b2 = random_bias(2, num_agents, n_tokens, requires_grad=True)

    def fn(q, k, v, b1, b2):
        return agent_attention(q, k, v, grid=grid, num_agents=num_agents, agent_bias=(b1, b2), num_prefix=num_prefix)
    assert torch.autograd.gradcheck(fn, (q, k, v, b1, b2), fast_mode=fast)


def test_prefix_queries_are_not_pooled():
    """Agents pool the grid queries only, so a prefix query changes its own output row and nothing else."""
    q, k, v = (torch.randn(1, 2, 1 + 30, 8, dtype=torch.float64) for _ in range(3))
    out = agent_attention(q, k, v, grid=(5, 6), num_agents=9, num_prefix=1)
    q2 = q.clone()
    q2[:, :, 0] += 3.0
    out2 = agent_attention(q2, k, v, grid=(5, 6), num_agents=9, num_prefix=1)
    torch.testing.assert_close(out2[:, :, 1:], out[:, :, 1:], rtol=0, atol=1e-12)
    assert (out2[:, :, 0] - out[:, :, 0]).abs().max() > 1e-3
    q3 = q.clone()                                             # while a grid query moves every token's output
    q3[:, :, 7] += 3.0
    out3 = agent_attention(q3, k, v, grid=(5, 6), num_agents=9, num_prefix=1)
    assert ((out3 - out).abs().amax(dim=-1) > 1e-6).all()


@pytest.mark.parametrize("dtype,magnitude", [(torch.bfloat16, 30.0), (torch.bfloat16, 1e3), (torch.float16, 30.0),
                                             (torch.float16, 200.0)])
def test_low_precision_large_scores(dtype, magnitude):
    """Large q, k in 16 bits: the softmax normalisers are computed in float32, no overflow or NaN."""
    q, k = ((torch.randn(2, 2, 1 + 48, 16) * magnitude).to(dtype) for _ in range(2))
    v = torch.randn(2, 2, 1 + 48, 16).to(dtype)
    bias = random_bias(2, 9, 49, dtype=torch.float32)
    out = agent_attention(q, k, v, grid=(6, 8), num_agents=9, agent_bias=bias, num_prefix=1)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_rel_close(out, explicit_agent_weights(q, k, (6, 8), 9, 1, bias) @ v.double(), dtype)


def test_bad_input_names_the_values():
    q = torch.randn(1, 2, 1 + 20, 8)
    with pytest.raises(ValueError, match=r"N=21.*P=0.*\(4, 5\)"):
        agent_attention(q, q, q, grid=(4, 5), num_agents=4)
    with pytest.raises(ValueError, match="perfect square.*8"):
        agent_attention(q, q, q, grid=(4, 5), num_agents=8, num_prefix=1)
    with pytest.raises(ValueError, match=r"\(2, 4, 21\).*\(2, 21, 4\).*\(2, 4, 20\)"):
        agent_attention(q, q, q, grid=(4, 5), num_agents=4, num_prefix=1,
                        agent_bias=(torch.zeros(2, 4, 20), torch.zeros(2, 21, 4)))
    with pytest.raises(ValueError, match=r"\(1, 4, 5\)"):
        agent_attention(q, q, q, grid=(1, 4, 5), num_agents=4, num_prefix=1)
    with pytest.raises(ValueError, match=r"\(2, 21, 8\)"):
        agent_attention(q[0], q[0], q[0], grid=(4, 5), num_agents=4, num_prefix=1)
