"""RMSNorm of queries or keys followed by their rotary embedding, written where the attention reads them.

Diffusion transformers (FLUX, Wan, SD3) normalise q and k with an RMSNorm and rotate them by RoPE before
attention; diffusers writes both as a dozen float32 PyTorch passes over each (B, N, H, D) tensor (casts, powers,
means, the rotated copy, stacks), then concatenates the text and image tokens. ``rms_norm_rope`` does it in one
read and one write, into a slice of the joint buffer if asked (text tokens first, as the structured ops read their
prefix).
"""
from __future__ import annotations

import torch

from ..core import checks
from ..core.dispatch import TRITON, TRITON_DTYPES, choose_backend, dtypes, register_backend, triton_device
from .reference import rms_norm_rope_reference


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor | None = None,
                  sin: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """rotate(RMSNorm(x) * weight) of x (B, N, H, D), into ``out`` (default: a new (B, N, H, D) tensor of x's
    dtype; else a tensor of x's shape, e.g. a slice of a joint text + image buffer).

    The RMSNorm runs over each head's D channels when ``weight`` is (D,) (FLUX's and SD3's q/k norms) and over
    the token's H * D channels when it is (H * D,) (Wan's): y = x / sqrt(mean(x^2) + eps) * weight. The rotation
    (optional: ``cos`` and ``sin`` both None skips it) turns each interleaved channel pair (2i, 2i + 1) of every
    head by token n's angle i: (a, b) -> (a cos[n, i] - b sin[n, i], a sin[n, i] + b cos[n, i]), with ``cos`` and
    ``sin`` (N, D / 2) (diffusers' FLUX tables are (N, D) with each value repeated per pair: pass ``cos[:, ::2]``).
    All in float32, rounded once. Inference only on Triton (no autograd): with a gradient to record, the
    reference runs. Backends: ``triton`` (the default on CUDA), ``reference`` (PyTorch ops; also what runs under
    ``torch.compile``, whose compiler fuses them itself).
    """
    checks.check_rms_norm_rope(x, weight, cos, sin, out)
    eps = checks.check_float(eps, "eps", "rms_norm_rope", positive=True)
    if out is None:
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if x.numel() == 0:
        return out
    if torch.compiler.is_compiling():
        return rms_norm_rope_reference(x, weight, eps, cos, sin, out)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, cos, sin))
    fn = choose_backend("rms_norm_rope", backend, x, recording_grad=grad)
    return fn(x, weight, eps, cos, sin, out)


if TRITON:
    from .triton import INFERENCE, rms_norm_rope_triton
    register_backend("rms_norm_rope", "triton", rms_norm_rope_triton,
                     requires=(triton_device(), dtypes(*TRITON_DTYPES), INFERENCE))
register_backend("rms_norm_rope", "reference", rms_norm_rope_reference)
