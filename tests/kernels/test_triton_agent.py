"""The Triton backend of agent_attention (kernels/triton/agent.py) against the reference.

The ground truth is the reference evaluated in float64 on the same inputs (16-bit values upcast).
CPU tests run under TRITON_INTERPRET=1 (tests/conftest.py) with small shapes; `gpu` tests use real
sizes and a fuzz over random configurations.
"""
import math
import random

import pytest
import torch

from subquad.kernels import agent_attention
from subquad.kernels.core.testing import REL_TOL, relative_error


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


# --- GPU ------------------------------------------------------------------------------------

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
