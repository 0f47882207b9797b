"""Tolerances for comparing a kernel with its reference (the project's rule, used by tests and bench), and inputs
laid out as the models make them."""
from __future__ import annotations

import torch

# relative error ||actual - expected|| / ||expected||, by the dtype the kernel computed in
REL_TOL = {torch.float64: 1e-7, torch.float32: 1e-4, "tf32": 3e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; inf if either holds a NaN or an inf."""
    a, e = actual.detach().double(), expected.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return float("inf")
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, tol: float | None = None,
                     what: str = "") -> None:
    """Fail unless shapes match and the relative error is under the tolerance for ``dtype``."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what} shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    tol = REL_TOL[dtype or actual.dtype] if tol is None else tol
    err = relative_error(actual, expected)
    if not err < tol:
        raise AssertionError(f"{what} relative error {err:.3e} exceeds {tol:.1e}")


def assert_compiles_to_the_same(fn, *inputs: torch.Tensor, what: str = "compiled") -> None:
    """``torch.compile(fn, fullgraph=True)`` (aot_eager) gives eager ``fn``'s output and input gradients
    (float32 tolerance): the op is one graph, and tracing it changes nothing."""
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*inputs)
    want = fn(*inputs)
    assert_rel_close(out, want, what=what)
    g = torch.randn_like(out)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(want, inputs, g))):
        assert_rel_close(a, b, torch.float32, what=f"{what} grad of input {i}")


def projection_views(b: int, n: int, h: int, d: int, offset: int = 0, device: str | torch.device = "cpu"
                     ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """q, k, v (B, h, N, d) bf16 as a model's attention makes them: views of one (B, N, 3, h, d) leaf (token
    stride 3hd, head stride d), which starts ``offset`` values into its allocation; the leaf, for gradients."""
    flat = torch.randn(offset + b * n * 3 * h * d, device=device).bfloat16()
    leaf = flat[offset:].view(b, n, 3, h, d).requires_grad_()
    return tuple(leaf.permute(2, 0, 3, 1, 4)), leaf
