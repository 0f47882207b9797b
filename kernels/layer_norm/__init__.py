"""LayerNorm fused with the residual add before it and the cast after it: the norms of a pre-norm
transformer block as one pass over the residual stream each.

A pre-norm block under autocast spends three passes per norm on the residual stream outside its matrix
products: the residual add (fp32), the LayerNorm (fp32 in, fp32 out) and the cast of its output to the
autocast dtype before the next projection. ``add_layer_norm`` reads x and y once and writes s = x + y and
LN(s), already in the projection's dtype.
"""
from __future__ import annotations

import torch

from ..core import checks
from ..core.dispatch import (TRITON, TRITON_DTYPES, Requirement, choose_backend, dtypes, register_backend,
                             triton_device)
from ..core.precision import autocast_dtype
from .reference import add_layer_norm_reference, sum_dtype

OUTPUT_DTYPES = Requirement("y, the residual and the output in float16, bfloat16 or float32",
                            lambda f: all(f[k] in (None, *TRITON_DTYPES) for k in ("out_dtype", "y_dtype",
                                                                                   "residual_dtype")))


def add_layer_norm(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5, *, gate: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                   residual_dtype: torch.dtype | None = None, backend: str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, LN(s) * weight + bias) with s = x + gate * y (s = x when ``y`` is None, gate 1 when None) and
    LN(s) = (s - mean) / sqrt(var + eps) over the last axis.

    ``weight``, ``bias`` and ``gate``: None, (C,), or one per sample (B, C) of x (B, ..., C): DiT's adaLN
    modulation is ``weight = 1 + scale``, ``bias = shift`` and the gate of the residual branch. s has
    ``residual_dtype`` (default: the dtype of x + gate * y by type promotion; x's dtype keeps a 16-bit residual
    stream 16-bit under a float32 gate, as Wan's blocks round it back), computed in float32 and rounded once; the
    normalized output has ``out_dtype`` (default: the autocast dtype under autocast, which the next linear layer
    computes in, else s's dtype). Backends: ``triton`` (one pass, forward
    and backward; the default on CUDA), ``reference`` (PyTorch ops; also what runs under ``torch.compile``,
    whose compiler fuses them itself).
    """
    checks.check_add_layer_norm(x, y, weight, bias, gate, residual_dtype)
    eps = checks.check_float(eps, "eps", "add_layer_norm", positive=True)
    if residual_dtype is None:
        residual_dtype = sum_dtype(x, y, gate)
    if out_dtype is None:
        out_dtype = autocast_dtype(x.device.type) or residual_dtype
    if torch.compiler.is_compiling():
        return add_layer_norm_reference(x, y, weight, bias, eps, out_dtype, gate, residual_dtype)
    fn = choose_backend("add_layer_norm", backend, x, out_dtype=out_dtype, y_dtype=None if y is None else y.dtype,
                        residual_dtype=residual_dtype)
    return fn(x, y, weight, bias, eps, out_dtype, gate, residual_dtype)


if TRITON:
    from .triton import add_layer_norm_triton
    register_backend("add_layer_norm", "triton", add_layer_norm_triton,
                     requires=(triton_device(), dtypes(*TRITON_DTYPES), OUTPUT_DTYPES))
register_backend("add_layer_norm", "reference", add_layer_norm_reference)
