"""The Triton kernels at the edges of their inputs' range, against the float32 references on the same inputs.

- FLatten and MALA in float16 with inputs whose intermediates leave fp16's range although every result fits it:
  q = k = 0 and q, k = 1e-3 randn (FLatten: features near its eps, 1 / den near 1e6), one head of a token
  1e-3 times the others, MALA's q, k = randn - 8 (phi = exp(x) ~ 3e-4, 1 / (s + eps) ~ 1e3 and more);
- NaN in q, k or v of FLatten and MALA: NaN exactly where the reference has NaN, forward and gradients;
- the block-sparse core (radial and log-linear attention) with q, k = 1e4 randn: scores of ~1e8, where one fp32
  rounding step of a score is many units of log2 probability.

Each Triton result is checked against the float32 reference evaluated on the same 16-bit inputs (upcast): NaN
exactly where the reference has NaN, finite wherever it is finite, and within the 16-bit tolerance (relative
error 1e-2, kernels.core.testing.REL_TOL) over the entries finite in both. CPU runs use the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU) on small shapes; the `gpu` variants run the same
checks on CUDA, on the small shapes and on real head dims.
"""
from __future__ import annotations

import math

import pytest
import torch

from subquad.kernels import focused_linear_attention, loglinear_attention, mala_attention, radial_attention
from subquad.kernels.core.dispatch import INTERPRET
from subquad.kernels.core.testing import REL_TOL, relative_error

# (device, size): CPU under the interpreter on the small shape only; CUDA on both
# tile: the side of the block-sparse core's square tiles (radial's tile, log-linear's blocks)
SIZES = {"small": dict(b=1, h=2, grid=(8, 8), d=16, tile=4), "large": dict(b=2, h=4, grid=(16, 16), d=64, tile=8)}
ON_CPU = pytest.mark.skipif(not INTERPRET, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
DEVICES = [pytest.param("cpu", "small", marks=ON_CPU, id="cpu-small"),
           pytest.param("cuda", "small", marks=pytest.mark.gpu, id="cuda-small"),
           pytest.param("cuda", "large", marks=pytest.mark.gpu, id="cuda-large")]


def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """NaN exactly where ``expected`` is NaN, finite where it is finite, relative error within REL_TOL[dtype]
    over the entries finite in both."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), (f"{what}: NaN in {int(nan_a.sum())} entries, the reference in "
                                       f"{int(nan_e.sum())}; they differ in {int((nan_a != nan_e).sum())}")
    finite = torch.isfinite(e)
    assert torch.isfinite(a[finite]).all(), (f"{what}: {int((~torch.isfinite(a[finite])).sum())} of "
                                             f"{int(finite.sum())} entries not finite where the reference is")
    both = finite & torch.isfinite(a)
    if both.any():
        err = relative_error(a[both], e[both])
        assert err < REL_TOL[dtype], f"{what}: relative error {err:.3e} exceeds {REL_TOL[dtype]:.0e}"


def run_with_grads(fn, inputs, grad):
    """fn(*inputs) and the gradients of <fn(*inputs), grad> with respect to every input."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, grad.to(out.dtype)))


def compare(fn, inputs, grad, dtype, what, names=("out", "dq", "dk", "dv", "dscale"), skip=()):
    """fn with backend="triton" on ``inputs`` against backend="reference" on their float32 copies, output and
    every gradient, at the tolerance of the inputs' dtype (FLatten's float32 scale takes theirs too)."""
    got = run_with_grads(lambda *x: fn(*x, backend="triton"), inputs, grad)
    want = run_with_grads(lambda *x: fn(*x, backend="reference"), [x.float() for x in inputs], grad.float())
    for name, a, e in zip(names, got, want):
        if name not in skip:
            check(a, e, dtype, f"{what} {name}")
    return got, want


def _tokens(size):
    s = SIZES[size]
    return s["b"], s["h"], math.prod(s["grid"]), s["d"], s["grid"]


# --- FLatten and MALA: small and zero inputs in float16 ----------------------------------------------------

# name: (op, q and k as a function of standard normals of their shape, v scale, upstream-gradient scale, scale)
# The scales of v and of the upstream gradient keep the true output and dv out of fp16's subnormals, where the
# output's own rounding would be ~1% (q = k = 0: O ~ 1.6e-5 mean(v), dv ~ 4e-6 per unit of gradient).
SMALL_INPUTS = {
    "flatten-zero": ("flatten", lambda x: 0 * x, 1e3, 1e3, None),
    "flatten-1e-3": ("flatten", lambda x: 1e-3 * x, 1.0, 1.0, None),
    "flatten-1e-3-scale": ("flatten", lambda x: 1e-3 * x, 1.0, 1.0, "per-head"),
    "flatten-quiet-head": ("flatten", lambda x: x * torch.tensor([1e-3] + [1.0] * (x.shape[1] - 1))[:, None, None],
                           1.0, 1.0, None),
    "mala-minus-8": ("mala", lambda x: x - 8, 1.0, 1.0, None),
}


def _linear_op(kind, grid):
    if kind == "flatten":
        return lambda q, k, v, *s, backend: focused_linear_attention(q, k, v, grid=grid, scale=s[0] if s else None,
                                                                     backend=backend)
    return lambda q, k, v, backend: mala_attention(q, k, v, grid=grid, backend=backend)


@pytest.mark.parametrize("device,size", DEVICES)
@pytest.mark.parametrize("case", list(SMALL_INPUTS))
def test_linear_float16_small_inputs(case, device, size):
    """float16 FLatten/MALA where the reference's float32 gradients are finite and representable in fp16:
    each result finite and within 1e-2 of it (the kernels used to give inf/NaN: every dv at q = k = 0, half of
    dq and dk and every dv at 1e-3, every gradient of MALA at q, k ~ -8)."""
    kind, make, v_scale, g_scale, scale_kind = SMALL_INPUTS[case]
    b, h, n, d, grid = _tokens(size)
    g = torch.Generator().manual_seed(0)
    q, k = (make(torch.randn(b, h, n, d, generator=g)) for _ in range(2))
    v = v_scale * torch.randn(b, h, n, d, generator=g)
    grad = g_scale * torch.randn(b, h, n, d, generator=g)
    inputs = [x.to(device=device, dtype=torch.float16) for x in (q, k, v)]
    if scale_kind:
        inputs.append(torch.randn(h, d, generator=g).to(device))
    got, _ = compare(_linear_op(kind, grid), inputs, grad.to(device), torch.float16, case)
    assert got[0].dtype == torch.float16


# --- FLatten and MALA: NaN inputs --------------------------------------------------------------------------

NAN_CASES = [("flatten", "q", torch.float16), ("flatten", "k", torch.float16), ("flatten", "v", torch.float16),
             ("flatten", "q", torch.bfloat16), ("flatten", "k", torch.float32),
             ("mala", "q", torch.float16), ("mala", "k", torch.bfloat16), ("mala", "v", torch.float32)]


@pytest.mark.parametrize("device,size", DEVICES)
@pytest.mark.parametrize("kind,where,dtype", NAN_CASES, ids=lambda x: str(x).removeprefix("torch."))
def test_linear_nan_inputs(kind, where, dtype, device, size):
    """One NaN in q, k or v: NaN exactly where the reference has NaN, in the output and in every gradient
    (FLatten: a NaN in a query makes its token's features NaN in every head, as the focused map's norms run over
    the whole token; a NaN in a key, every output of its batch), the rest as the reference."""
    b, h, n, d, grid = _tokens(size)
    g = torch.Generator().manual_seed(1)
    q, k, v, grad = (torch.randn(b, h, n, d, generator=g) for _ in range(4))
    {"q": q, "k": k, "v": v}[where][0, h - 1, n // 3, d // 2] = float("nan")
    inputs = [x.to(device=device, dtype=dtype) for x in (q, k, v)]
    got, want = compare(_linear_op(kind, grid), inputs, grad.to(device), dtype, f"{kind} NaN in {where}")
    assert torch.isnan(want[0]).any()


# --- the block-sparse core (radial, log-linear): scores of ~1e8 --------------------------------------------

SPARSE_OPS = {   # (grid, tile side) -> op; 4 tiles per side of the grid, each attending a part of the others
    "radial": lambda grid, t: (lambda q, k, v, backend: radial_attention(q, k, v, grid=grid, tile=(t, t),
                                                                         backend=backend)),
    "loglinear": lambda grid, t: (lambda q, k, v, backend: loglinear_attention(q, k, v, grid=grid, block_size=t * t,
                                                                               top_k=2, backend=backend)),
}


@pytest.mark.parametrize("device,size", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("op", list(SPARSE_OPS))
def test_block_sparse_large_scores(op, dtype, device, size):
    """q, k = 1e4 randn: scores q.k / sqrt(d) of ~1e8 (2^27 and more in the log2 domain, where an fp32 rounding
    step is 16 units). The softmax is one-hot, and the backward's recomputed scores must round as the forward's
    did, else exp2(s - lse) is 2^16 or more (inf once cast to fp16: the kernels gave inf in up to a quarter of
    dv, and bf16 dv 1e8 times too large) or 2^-16 instead of 1. Output and dv within 1e-2 of the reference.
    dq and dk are pure cancellation here (dS = P (dP - delta) with dP = delta up to rounding for a one-hot P):
    the reference's own values are fp32 rounding noise, so they are checked for finiteness and against the size
    of their terms, 2 scale max_j ||v_j|| ||dO|| times max_j ||k_j|| (dq) or ||Q|| (dk), times the tolerance."""
    b, h, n, d, grid = _tokens(size)
    g = torch.Generator().manual_seed(2)
    q, k = (1e4 * torch.randn(b, h, n, d, generator=g) for _ in range(2))
    v, grad = (torch.randn(b, h, n, d, generator=g) for _ in range(2))
    inputs = [x.to(device=device, dtype=dtype) for x in (q, k, v)]
    got, want = compare(SPARSE_OPS[op](grid, SIZES[size]["tile"]), inputs, grad.to(device), dtype, f"{op} 1e4",
                        skip=("dq", "dk"))
    q32, k32, v32, g32 = (x.to(device=device, dtype=dtype).double() for x in (q, k, v, grad))
    v_max = v32.norm(dim=-1).max()
    terms = {"dq": 2 * d ** -0.5 * v_max * k32.norm(dim=-1).max() * g32.norm(),
             "dk": 2 * d ** -0.5 * v_max * q32.norm() * g32.norm()}
    for name, a, e in zip(("dq", "dk"), got[1:3], want[1:3]):
        assert torch.isfinite(a).all() and torch.isfinite(e).all(), f"{op} 1e4 {name}: not finite"
        err = float((a.double() - e.double()).norm())
        assert err < REL_TOL[dtype] * float(terms[name]), f"{op} 1e4 {name}: error {err:.3e}, terms {terms[name]:.3e}"


@pytest.mark.parametrize("device,size", DEVICES)
@pytest.mark.parametrize("op", list(SPARSE_OPS))
def test_block_sparse_float16(op, device, size):
    """float16 at ordinary scales (the other block-sparse tests run float32 and bf16): all four within 1e-2."""
    b, h, n, d, grid = _tokens(size)
    g = torch.Generator().manual_seed(3)
    q, k, v, grad = (torch.randn(b, h, n, d, generator=g) for _ in range(4))
    inputs = [x.to(device=device, dtype=torch.float16) for x in (q, k, v)]
    compare(SPARSE_OPS[op](grid, SIZES[size]["tile"]), inputs, grad.to(device), torch.float16, f"{op} fp16")
