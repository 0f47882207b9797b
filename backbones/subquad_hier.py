"""``subquad_hier_{tiny,small,base}``: the Swin-T/S/B layout (Liu et al., ICCV 2021: 4x4 patch
embedding, patch merging, MLP ratio 4) with any attention family in every block, chosen by ``attn=``.

The default, ``attn="window"``, is Swin itself (7x7 shifted windows; same parameters and, at
224x224, the same outputs as timm's ``swin_*_patch4_window7_224``). ``attn="mala"`` (or a list with
one family per block, or one ``(family, options)`` entry per block) swaps the attention; options
that depend on the stage (agent count, bias and position maps on the stage grid) get the papers'
choices, and ``attn_kwargs={family: options}`` sets the rest.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model

from .hierarchical import HierarchicalTransformer, check_converted, create_hierarchical, hierarchical_cfg
from .subquad_swin import SWIN_SIZES


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor],
                         model: HierarchicalTransformer) -> dict[str, torch.Tensor]:
    """subquad state dicts only (strict key check): there are no official weights for the generic models."""
    return check_converted(state_dict.get("model", state_dict), model, "a subquad checkpoint")


default_cfgs = generate_default_cfgs({f"subquad_hier_{size}": hierarchical_cfg(license="apache-2.0")
                                      for size in SWIN_SIZES})


def _register(size: str) -> None:
    variant = f"subquad_hier_{size}"

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
        args = dict(stem="patch", downsample="merge", mlp_ratios=4., attn="window", **SWIN_SIZES[size])
        return create_hierarchical(variant, pretrained, checkpoint_filter_fn, **dict(args, **kwargs))

    entrypoint.__name__ = entrypoint.__qualname__ = variant
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"Swin-{size[0].upper()} layout with any attention family (attn=...)."
    setattr(sys.modules[__name__], variant, register_model(entrypoint))


for _size in SWIN_SIZES:
    _register(_size)
