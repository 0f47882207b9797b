"""The Triton backend of focused_linear_attention (FLatten) and mala_attention (MALA) against the references.

The ground truth is the reference evaluated in float64 on the same inputs (the 16-bit values upcast), so
each comparison measures the kernel's own error against the project's tolerance for its input dtype.
CPU tests run the kernels under TRITON_INTERPRET=1 (set by tests/conftest.py) with small shapes; the
`gpu` tests use real sizes and a fuzz over random configurations.
"""
import math
import random

import pytest
import torch

from subquad.kernels import focused_linear_attention, mala_attention
from subquad.kernels.core.testing import REL_TOL, relative_error


def _poison_allocator(device, numel):
    """Leave NaN in the caching allocator's free blocks, so an output element the kernel forgets to write
    shows up as NaN rather than as a stale plausible value."""
    if device.type == "cuda":
        torch.empty(numel, device=device).fill_(float("nan"))


def _run(kind, q, k, v, scale, grid, num_prefix, opts, backend):
    if kind == "flatten":
        return focused_linear_attention(q, k, v, grid=grid, focusing_factor=opts["p"], scale=scale,
                                        num_prefix=num_prefix, backend=backend)
    return mala_attention(q, k, v, grid=grid, num_prefix=num_prefix, rope=opts.get("rope", False), backend=backend)


def check_against_reference(kind, b, h, grid, num_prefix, d, dtype, device="cpu", dv=None, scale_shape=None,
                            head_gain=1.0, **opts):
    """Forward and gradients (q, k, v and FLatten's scale) of backend="triton" vs the float64 reference;
    returns the list of (what, error, tolerance) that failed. (A single scalar scale is not drawn: the
    output depends on it only through the epsilons, so its gradient is a cancellation down to ~eps.)
    ``head_gain`` scales head 0 of q and k: small gains make FLatten's whole-token norms shrink that head's
    features until its normaliser is close to the epsilon."""
    device = torch.device(device)
    n = num_prefix + math.prod(grid)
    dv = dv or d
    gain = torch.ones(h, 1, 1, device=device)
    gain[0] = head_gain
    q, k = ((torch.randn(b, h, n, d, device=device) * gain).to(dtype).requires_grad_() for _ in range(2))
    v = torch.randn(b, h, n, dv, device=device).to(dtype).requires_grad_()
    scale = (torch.randn(scale_shape, device=device).requires_grad_()
             if kind == "flatten" and scale_shape is not None else None)
    inputs = [q, k, v] + ([scale] if scale is not None else [])
    _poison_allocator(device, 4 * b * h * n * max(d, dv))
    out = _run(kind, q, k, v, scale, grid, num_prefix, opts, "triton")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad)

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_scale = ref_inputs[3] if scale is not None else None
    ref = _run(kind, *ref_inputs[:3], ref_scale, grid, num_prefix, opts, "reference")
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.double())

    tol = REL_TOL[dtype]
    failed = []
    for what, a, e in zip(["out", "dq", "dk", "dv", "dscale"], [out, *grads], [ref, *ref_grads]):
        assert a.dtype == (dtype if what != "dscale" else torch.float32), what
        err = relative_error(a, e)
        if not err < tol:
            failed.append((what, err, tol))
    return failed


CPU_CASES = [  # kind, batch, heads, grid, num_prefix, d, dtype, options
    ("flatten", 2, 2, (5, 7), 1, 16, torch.float32, dict(p=3, scale_shape=(2, 16))),
    ("flatten", 1, 2, (6, 4), 0, 24, torch.bfloat16, dict(p=2.5, scale_shape=(24,))),       # padded d, real p
    ("flatten", 2, 1, (3, 9), 4, 16, torch.float32, dict(p=3, dv=8)),                       # no scale, dv != d
    ("flatten", 1, 2, (4, 5), 1, 16, torch.float16, dict(p=2, scale_shape=(2, 16))),
    ("flatten", 2, 3, (3, 4), 2, 16, torch.float32, dict(p=3, scale_shape=(3, 16), head_gain=0.03)),  # eps-bound head
    ("flatten", 1, 3, (5, 3), 0, 16, torch.bfloat16, dict(p=3, scale_shape=(16,), head_gain=0.1)),
    ("flatten", 2, 5, (7, 9), 2, 40, torch.bfloat16, dict(p=3, scale_shape=(5, 40))),      # 5 heads, N = 65
    ("flatten", 1, 2, (4, 4), 0, 72, torch.float32, dict(p=3, scale_shape=(2, 72))),        # DiT's head_dim 72
    # more heads than one (tokens, heads, channels) tile of the norms kernel holds: norms over head blocks
    ("flatten", 1, 6, (3, 4), 1, 72, torch.bfloat16, dict(p=3, scale_shape=(6, 72))),
    ("flatten", 1, 8, (2, 5), 0, 64, torch.bfloat16, dict(p=2.5, scale_shape=(8, 64))),
    ("mala", 2, 2, (5, 7), 1, 16, torch.float32, dict()),
    ("mala", 1, 2, (1, 6), 0, 16, torch.bfloat16, dict()),
    ("mala", 2, 2, (6, 8), 2, 16, torch.bfloat16, dict(rope=True)),
    ("mala", 1, 1, (7, 5), 0, 12, torch.float32, dict(rope=True, dv=20)),                    # padded d with RoPE
    ("mala", 2, 3, (7, 9), 2, 40, torch.bfloat16, dict(rope=True)),                          # N = 65: several tiles
    ("mala", 1, 2, (3, 4), 1, 72, torch.bfloat16, dict()),
]


@pytest.mark.parametrize("kind,b,h,grid,num_prefix,d,dtype,opts", CPU_CASES)
def test_triton_matches_reference_cpu(kind, b, h, grid, num_prefix, d, dtype, opts):
    assert check_against_reference(kind, b, h, grid, num_prefix, d, dtype, **opts) == []


def test_float64_is_the_reference_only():
    """The kernels compute in fp32: float64 named for Triton is an error saying so; unnamed, the reference runs."""
    q, k, v = (torch.randn(1, 2, 13, 8, dtype=torch.float64) for _ in range(3))
    for op in (mala_attention, focused_linear_attention):
        with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
            op(q, k, v, grid=(3, 4), num_prefix=1, backend="triton")
        torch.testing.assert_close(op(q, k, v, grid=(3, 4), num_prefix=1),
                                   op(q, k, v, grid=(3, 4), num_prefix=1, backend="reference"))


def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration, checked by torch.library.opcheck."""
    q, k, v = (torch.randn(1, 2, 21, 16, requires_grad=True) for _ in range(3))
    c = torch.rand(2, 16) + 0.5
    torch.library.opcheck(torch.ops.subquad.linear_attention.default, (q, k, v, c.requires_grad_(), 0, 3.0, 0, 0, 0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.subquad.linear_attention.default, (q, k, v, c.detach(), 1, 1.0, 1, 4, 5),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compile_fullgraph_cpu():
    """torch.compile(fullgraph=True) traces through the custom op (fake tensors) and its autograd formula."""
    q, k, v = (torch.randn(1, 2, 21, 16, requires_grad=True) for _ in range(3))
    scale = torch.randn(2, 16, requires_grad=True)

    def fn(q, k, v, scale):
        a = focused_linear_attention(q, k, v, grid=(4, 5), scale=scale, num_prefix=1, backend="triton")
        return a + mala_attention(q, k, v, grid=(4, 5), num_prefix=1, rope=True, backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, expected = compiled(q, k, v, scale), fn(q, k, v, scale)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), (q, k, v, scale))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v, scale))
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e)


# --- GPU ------------------------------------------------------------------------------------

REAL_SIZES = [((56, 56), 32, 1), ((128, 128), 4, 0), ((256, 256), 1, 0)]     # grid, batch, prefix tokens


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid,b,num_prefix", REAL_SIZES)
@pytest.mark.parametrize("kind,opts", [("flatten", dict(p=3, scale_shape=(4, 64))), ("mala", dict()),
                                       ("mala", dict(rope=True))])
def test_gpu_real_sizes(kind, opts, grid, b, num_prefix, dtype):
    assert check_against_reference(kind, b, 4, grid, num_prefix, 64, dtype, device="cuda", **opts) == []


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    q, k, v = (torch.randn(2, 4, 1 + 14 * 14, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    scale = torch.randn(4, 64, device="cuda", requires_grad=True)

    def fn(q, k, v, scale):
        a = focused_linear_attention(q, k, v, grid=(14, 14), scale=scale, num_prefix=1)
        return a + mala_attention(q, k, v, grid=(14, 14), num_prefix=1, rope=True)

    compiled = torch.compile(fn, fullgraph=True)
    out, expected = compiled(q, k, v, scale), fn(q, k, v, scale)
    torch.testing.assert_close(out, expected)
    for a, e in zip(torch.autograd.grad(out.float().sum(), (q, k, v, scale)),
                    torch.autograd.grad(expected.float().sum(), (q, k, v, scale))):
        torch.testing.assert_close(a, e)


@pytest.mark.gpu
def test_gpu_fuzz():
    """200 random configurations (op, batch, heads, grid, prefix, dtype, p, scale shape): zero failures.
    Head dims stay at 64 so that the kernels compile a handful of times (the CPU tests cover padded dims)."""
    rng = random.Random(1234)
    failures = []
    for i in range(200):
        kind = rng.choice(["flatten", "mala", "mala_rope"])
        config = dict(kind="mala" if kind == "mala_rope" else kind, b=rng.randint(1, 3), h=rng.randint(1, 4),
                      grid=(rng.randint(1, 40), rng.randint(1, 40)), num_prefix=rng.choice([0, 0, 1, 4]), d=64,
                      dtype=rng.choice([torch.float32, torch.bfloat16]))
        if kind == "flatten":
            config.update(p=rng.choice([3, 3, 2.5]), scale_shape=rng.choice([None, (64,), (config["h"], 64)]))
        else:
            config.update(rope=kind == "mala_rope")
        torch.manual_seed(i)
        failed = check_against_reference(device="cuda", **config)
        if failed:
            failures.append((config, failed))
    assert not failures, f"{len(failures)} of 200 configurations failed: {failures[:5]}"
