"""Agent attention (kernels/agent): the reference against the definition, the Triton kernels against the
reference.

agent_attention against Agent Attention (Han et al., ECCV 2024, Eq. 3-5) written out as N x N weights.

A = adaptive average pooling of the grid queries to a x a agents (prefix queries excluded);
W = softmax(Q A^T / sqrt(d) + B2) softmax(A K^T / sqrt(d) + B1), an N x N matrix, and O = W V.

The Triton backend of agent_attention (kernels/triton/agent.py) against the reference.

The ground truth is the reference evaluated in float64 on the same inputs (16-bit values upcast).
CPU tests run under TRITON_INTERPRET=1 (tests/conftest.py) with small shapes; `gpu` tests use real
sizes and a fuzz over random configurations.
"""
import math
import random

import pytest
import torch

from subquad.kernels import agent_attention
from subquad.kernels.core.testing import REL_TOL, assert_rel_close, relative_error


# --- the reference against the definition ---------------------------------------------------------


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


# --- the Triton kernels against the reference -----------------------------------------------------


def check_against_reference(b, h, grid, num_agents, num_prefix, d, dtype, device="cpu", bias="grad",
                            magnitude=1.0, bias_scale=1.0, tol=None):
    """Forward and gradients (q, k, v and, with bias="grad", both agent biases) of backend="triton" vs the
    float64 reference; bias is None, "fixed" or "grad". Returns the list of (what, error, tolerance) that failed."""
    device = torch.device(device)
    n = num_prefix + math.prod(grid)
    q, k = ((torch.randn(b, h, n, d, device=device) * magnitude).to(dtype).requires_grad_() for _ in range(2))
    v = torch.randn(b, h, n, d, device=device).to(dtype).requires_grad_()
    biases = None
    if bias is not None:
        biases = ((bias_scale * torch.randn(h, num_agents, n, device=device)).requires_grad_(bias == "grad"),
                  (bias_scale * torch.randn(h, n, num_agents, device=device)).requires_grad_(bias == "grad"))
    inputs = [q, k, v] + (list(biases) if bias == "grad" else [])
    if device.type == "cuda":                      # NaN in the allocator's free blocks exposes unwritten outputs
        torch.empty(4 * b * h * n * d, device=device).fill_(float("nan"))
    out = agent_attention(q, k, v, grid=grid, num_agents=num_agents, agent_bias=biases, num_prefix=num_prefix,
                          backend="triton")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad)

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_bias = None if bias is None else (tuple(ref_inputs[3:]) if bias == "grad"
                                          else tuple(t.double() for t in biases))
    ref = agent_attention(*ref_inputs[:3], grid=grid, num_agents=num_agents, agent_bias=ref_bias,
                          num_prefix=num_prefix, backend="reference")
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.double())

    tol = REL_TOL[dtype] if tol is None else tol
    failed = []
    for what, a, e in zip(["out", "dq", "dk", "dv", "dB1", "dB2"], [out, *grads], [ref, *ref_grads]):
        err = relative_error(a, e)
        if not err < tol:
            failed.append((what, err, tol))
    return failed


CPU_CASES = [  # batch, heads, grid, agents, prefix tokens, head dim, dtype, bias
    (2, 2, (5, 7), 9, 1, 16, torch.float32, "grad"),       # 3 divides neither 5 nor 7
    (1, 2, (5, 7), 49, 0, 16, torch.bfloat16, "grad"),     # more agents than rows and columns (bins overlap)
    (2, 1, (7, 5), 4, 4, 16, torch.float32, None),         # 4 registers
    (1, 2, (12, 9), 16, 1, 24, torch.bfloat16, "grad"),    # padded head dim
    (1, 2, (1, 6), 4, 0, 16, torch.float16, "grad"),       # a single row
    (2, 2, (3, 10), 16, 1, 16, torch.float32, "fixed"),    # biases without gradient
]


@pytest.mark.parametrize("b,h,grid,num_agents,num_prefix,d,dtype,bias", CPU_CASES)
def test_triton_matches_reference_cpu(b, h, grid, num_agents, num_prefix, d, dtype, bias):
    assert check_against_reference(b, h, grid, num_agents, num_prefix, d, dtype, bias=bias) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_scores_cpu(dtype):
    """Scores in the thousands: the fp32 agents enter the 16-bit score products as hi + lo parts, so the
    exponentiated scores keep fp32 accuracy and the output matches; gradients stay finite. (Their accuracy
    at such a peaked softmax is bounded, as in flash attention, by the cancellation in dP - rowsum(dO O),
    computed from 2^-16-accurate products.) Scores of tens: gradients within tolerance as well."""
    failed = check_against_reference(1, 2, (6, 8), 9, 1, 16, dtype, magnitude=30.0)
    assert [f for f in failed if f[0] == "out" or not math.isfinite(f[1])] == []
    assert check_against_reference(1, 2, (6, 8), 9, 1, 16, dtype, magnitude=3.0) == []


def test_flat_softmax_cpu():
    """Small scores and biases (as at initialisation): both softmaxes are nearly flat, so the agents' rows of
    V_A differ by little more than 1/sqrt(N) and dB2 (and dq) depend on those differences. V_A must stay
    fp32-accurate: with P rounded to bf16 in P V the dB2 error was 6.6e-3 here (1.4e-5 with P as hi + lo)."""
    assert check_against_reference(2, 1, (24, 24), 49, 0, 32, torch.bfloat16, bias_scale=0.1, tol=5e-3) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_programs_cpu(dtype, monkeypatch):
    """The launch shapes of a large GPU on small inputs: the forward split over many key chunks (merged
    BLOCK_S splits at a time, over several blocks), the backward split over token chunks and over uneven
    groups of batch elements, each group with its own bias-gradient slice summed afterwards."""
    from subquad.kernels.agent import triton as agent_kernels
    config = {key: dict(cfg) for key, cfg in agent_kernels.CONFIG.items()}
    for key in ("pool", "aggregate", "broadcast", "broadcast_bwd", "aggregate_bwd", "unpool"):
        config[key].update(BLOCK_N=16)
    config["merge"]["BLOCK_S"] = 2
    for key in ("broadcast_bwd", "aggregate_bwd"):
        config[key]["min_chunk"] = 16
    monkeypatch.setattr(agent_kernels, "CONFIG", config)
    monkeypatch.setattr(agent_kernels, "num_programs_target", lambda device, per_sm=4: 16 * per_sm)
    splits, _, groups, per_group = agent_kernels.backward_split(5, 2, 1 + 9 * 11, 16, 32, 16)
    assert splits == 7 and groups == 3 and per_group == 2          # the last group holds one batch element
    assert check_against_reference(5, 2, (9, 11), 9, 1, 16, dtype) == []
    assert check_against_reference(2, 3, (7, 6), 16, 0, 16, dtype, bias="fixed") == []


def test_custom_op_registration():
    q, k, v = (torch.randn(2, 2, 21, 16, requires_grad=True) for _ in range(3))
    b1, b2 = torch.randn(2, 4, 21, requires_grad=True), torch.randn(2, 21, 4, requires_grad=True)
    for args in ((q, k, v, b1, b2, 4, 1, 4, 5), (q, k, v, None, None, 9, 1, 5, 4)):
        torch.library.opcheck(torch.ops.subquad.agent_attention.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compile_fullgraph_cpu():
    q, k, v = (torch.randn(2, 2, 21, 16, requires_grad=True) for _ in range(3))
    b1, b2 = torch.randn(2, 4, 21, requires_grad=True), torch.randn(2, 21, 4, requires_grad=True)

    def fn(q, k, v, b1, b2):
        return agent_attention(q, k, v, grid=(4, 5), num_agents=4, agent_bias=(b1, b2), num_prefix=1,
                               backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, expected = compiled(q, k, v, b1, b2), fn(q, k, v, b1, b2)
    torch.testing.assert_close(out, expected)
    for a, e in zip(torch.autograd.grad(out.sum(), (q, k, v, b1, b2)),
                    torch.autograd.grad(expected.sum(), (q, k, v, b1, b2))):
        torch.testing.assert_close(a, e)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid,b,num_prefix", [((56, 56), 32, 1), ((128, 128), 4, 0), ((256, 256), 1, 0)])
def test_gpu_real_sizes(grid, b, num_prefix, dtype):
    assert check_against_reference(b, 4, grid, 49, num_prefix, 64, dtype, device="cuda") == []


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    q, k, v = (torch.randn(2, 4, 1 + 14 * 14, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    b1 = torch.randn(4, 49, 197, device="cuda", requires_grad=True)
    b2 = torch.randn(4, 197, 49, device="cuda", requires_grad=True)

    def fn(q, k, v, b1, b2):
        return agent_attention(q, k, v, grid=(14, 14), num_agents=49, agent_bias=(b1, b2), num_prefix=1)

    compiled = torch.compile(fn, fullgraph=True)
    out, expected = compiled(q, k, v, b1, b2), fn(q, k, v, b1, b2)
    torch.testing.assert_close(out, expected)
    for a, e in zip(torch.autograd.grad(out.float().sum(), (q, k, v, b1, b2)),
                    torch.autograd.grad(expected.float().sum(), (q, k, v, b1, b2))):
        torch.testing.assert_close(a, e)


@pytest.mark.gpu
def test_gpu_fuzz():
    """200 random configurations (batch, heads, grid, prefix, dtype, bias): zero failures. Grids from 1x1 up,
    so agents' bins often overlap; 49 agents and head dim 64 keep the compiled variants few (the CPU tests
    cover other agent counts and padded dims)."""
    rng = random.Random(4321)
    failures = []
    for i in range(200):
        config = dict(b=rng.randint(1, 3), h=rng.randint(1, 4), grid=(rng.randint(1, 40), rng.randint(1, 40)),
                      num_agents=49, num_prefix=rng.choice([0, 0, 1, 4]), d=64,
                      dtype=rng.choice([torch.float32, torch.bfloat16]), bias=rng.choice(["grad", "grad", None]))
        torch.manual_seed(i)
        failed = check_against_reference(device="cuda", **config)
        if failed:
            failures.append((config, failed))
    assert not failures, f"{len(failures)} of 200 configurations failed: {failures[:5]}"
