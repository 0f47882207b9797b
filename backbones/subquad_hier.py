"""``subquad_hier_{tiny,small,base}``: the Swin-T/S/B layout (Liu et al., ICCV 2021: 4x4 patch
embedding, patch merging, MLP ratio 4) with any attention family in every block, chosen by ``attn=``.

The default, ``attn="window"``, is Swin itself (7x7 shifted windows; same parameters and, at
224x224, the same outputs as timm's ``swin_*_patch4_window7_224``). ``attn="mala"`` (or a list with
one family per block, or one ``(family, options)`` entry per block) swaps the attention; options
that depend on the stage (agent count, bias and position maps on the stage grid) get the papers'
choices, and ``attn_kwargs={family: options}`` sets the rest.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs

from .hierarchical import HierarchicalTransformer, check_converted, create_hierarchical, hierarchical_cfg
from .registry import register_variant
from .subquad_swin import SWIN_SIZES


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor],
                         model: HierarchicalTransformer) -> dict[str, torch.Tensor]:
    """subquad state dicts only (strict key check): there are no official weights for the generic models."""
    return check_converted(state_dict.get("model", state_dict), model, "a subquad checkpoint")


default_cfgs = generate_default_cfgs({f"subquad_hier_{size}": hierarchical_cfg(license="apache-2.0")
                                      for size in SWIN_SIZES})


def create_hier(variant: str, pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """Build ``subquad_hier_{size}``; user keywords (``attn``, ``attn_kwargs``, ...) override."""
    args = dict(stem="patch", downsample="merge", mlp_ratios=4., attn="window", **SWIN_SIZES[variant.split("_")[-1]])
    return create_hierarchical(variant, pretrained, checkpoint_filter_fn, **dict(args, **kwargs))


for _size in SWIN_SIZES:
    register_variant(__name__, f"subquad_hier_{_size}", create_hier,
                     f"Swin-{_size[0].upper()} layout with any attention family (attn=...).")
