"""The residual add and the norm after it as one step of a pre-norm block (with adaLN's modulation in diffusion
transformers)."""
from __future__ import annotations

import torch
from timm.layers import DropPath, LayerNorm, LayerScale
from torch import nn

from ..kernels.layer_norm import add_layer_norm

LAYER_NORMS = (nn.LayerNorm, LayerNorm)    # exactly these: a subclass may change what forward computes


def add_norm(norm: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
             gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, norm(s)) with s = x + gate * y (x when ``y`` is None; gate (C,) or one per sample (B, C), 1 when None).
    A LayerNorm (torch's or timm's) over the last axis runs as one fused pass (``add_layer_norm``: one read of x and
    y, its output already in the autocast dtype); any other norm as written."""
    if type(norm) in LAYER_NORMS and len(norm.normalized_shape) == 1:
        return add_layer_norm(x, y, norm.weight, norm.bias, norm.eps, gate=gate)
    if gate is not None:
        y = y * (gate if gate.dim() == 1 else gate.reshape(gate.shape[0], *[1] * (y.dim() - 2), -1))
    s = x if y is None else x + y
    return s, norm(s)


def add_norm_modulate(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                      y: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                      residual_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, norm(s) * (1 + scale) + shift) with s = x + gate * y (x when y is None), shift, scale and gate (B, C)
    per sample: adaLN's residual add, norm and modulation (DiT, Peebles & Xie 2023) as one fused pass
    (``add_layer_norm``; s in ``residual_dtype``, default by type promotion). ``norm`` is a LayerNorm without affine
    parameters (DiT's: the modulation is its only scale and shift); its eps is used."""
    return add_layer_norm(x, y, 1 + scale, shift, norm.eps, gate=gate, residual_dtype=residual_dtype)


def residual_branch(layer_scale: nn.Module, drop_path: nn.Module, y: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, gate) for ``add_norm``: the factor by which timm's LayerScale (gamma, (C,)) and DropPath (in training, a
    sample's keep mask over the keep probability: (B, C)) multiply the residual branch y (B, ..., C), so that the
    fused add applies it instead of one pass each; with other modules, (drop_path(layer_scale(y)), None)."""
    scales = type(layer_scale) is LayerScale and not layer_scale.inplace
    if not (scales or type(layer_scale) is nn.Identity) or type(drop_path) not in (DropPath, nn.Identity):
        return drop_path(layer_scale(y)), None
    gamma = layer_scale.gamma if scales else None
    if type(drop_path) is nn.Identity or not drop_path.training or drop_path.drop_prob == 0.:
        return y, gamma
    keep = 1. - drop_path.drop_prob       # the mask as timm's drop_path draws it (one value per sample)
    mask = y.new_empty((y.shape[0],) + (1,) * (y.dim() - 1),
                       dtype=torch.promote_types(y.dtype, gamma.dtype) if scales else y.dtype).bernoulli_(keep)
    if keep > 0. and drop_path.scale_by_keep:
        mask.div_(keep)
    mask = mask.reshape(-1, 1)
    return y, mask * gamma if scales else mask.expand(-1, y.shape[-1])
