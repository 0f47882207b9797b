"""NAT-Mini/Tiny/Small/Base (Hassani et al., "Neighborhood Attention Transformer", CVPR 2023) and
DiNAT-Mini/Tiny/Small/Base (Hassani & Shi, "Dilated Neighborhood Attention Transformer", arXiv
2209.15001), as in the official ``classification/nat.py`` and ``dinat.py``.

A tokenizer of two 3x3/2 convs, 3x3/2 conv downsampling (no bias) with LayerNorm, and blocks of 7x7
neighborhood attention with a relative position bias. DiNAT alternates plain and dilated blocks,
the dilation being the largest that fits the stage map at 224x224 (side // 7: 8, 4, 2, 1).
Layer scale 1e-5 in NAT-S/B and DiNAT-B.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs

from .hierarchical import HierarchicalTransformer, check_converted, create_hierarchical, hierarchical_cfg, rename_keys
from .registry import register_variant

KERNEL_SIZE = 7
DILATION = (8, 4, 2, 1)   # DiNAT's odd blocks, per stage: stage side at 224x224 // KERNEL_SIZE
NAT_SIZES: dict[str, dict[str, Any]] = {
    "mini": dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratios=3.,
                 drop_path_rate=0.2),
    "tiny": dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratios=3.,
                 drop_path_rate=0.2),
    "small": dict(embed_dims=(96, 192, 384, 768), depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratios=2.,
                  drop_path_rate=0.3),
    "base": dict(embed_dims=(128, 256, 512, 1024), depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratios=2.,
                 drop_path_rate=0.5),
}
LAYER_SCALE: dict[str, dict[str, float | None]] = {
    "nat": {"mini": None, "tiny": None, "small": 1e-5, "base": 1e-5},
    "dinat": {"mini": None, "tiny": None, "small": None, "base": 1e-5},
}
PAPERS = {"nat": ("NAT", "Neighborhood Attention Transformer", "arXiv:2204.07143"),
          "dinat": ("DiNAT", "Dilated Neighborhood Attention Transformer", "arXiv:2209.15001")}


def nat_attention(family: str, depths: tuple[int, ...]) -> list[tuple[str, dict[str, Any]]]:
    """One neighborhood-attention entry per block; DiNAT dilates every second block of a stage."""
    return [("neighborhood", dict(kernel_size=KERNEL_SIZE,
                                  dilation=DILATION[stage] if family == "dinat" and i % 2 else 1))
            for stage, depth in enumerate(depths) for i in range(depth)]


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor],
                         model: HierarchicalTransformer) -> dict[str, torch.Tensor]:
    """Official NAT / DiNAT state dict to ours.

    ``levels.i.blocks`` -> ``stages.i.blocks`` with ``gamma{1,2}`` -> ``ls{1,2}.gamma``; NAT
    downsamples at the end of level i, we at the start of stage i + 1 (``reduction`` -> ``proj``);
    ``head`` -> ``head.fc``. The tokenizer, norms, MLPs and attention (``qkv``, ``rpb``, ``proj``)
    keep their names. Our own state dicts pass through.
    """
    state_dict = state_dict.get("model", state_dict)
    if not any(k.startswith("stages.") for k in state_dict):
        state_dict = rename_keys(state_dict, [
            (r"^levels\.(\d+)\.downsample\.reduction\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample.proj."),
            (r"^levels\.(\d+)\.downsample\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample."),
            (r"^levels\.(\d+)\.blocks\.(\d+)\.gamma(\d)$", r"stages.\1.blocks.\2.ls\3.gamma"),
            (r"^levels\.(\d+)\.blocks\.", r"stages.\1.blocks."),
            (r"^head\.", "head.fc."),
        ])
    return check_converted(state_dict, model, "the official NAT layout")


def _model_names() -> list[str]:
    return [f"{family}_{size}" for family in LAYER_SCALE for size in NAT_SIZES]


default_cfgs = generate_default_cfgs({
    name: hierarchical_cfg(license="mit", paper_name=PAPERS[name.split("_")[0]][1],
                           paper_ids=PAPERS[name.split("_")[0]][2],
                           origin_url="https://github.com/SHI-Labs/Neighborhood-Attention-Transformer", crop_pct=0.875)
    for name in _model_names()})


def create_nat(variant: str, pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """Build ``{nat,dinat}_{size}``; user keywords override (changed ``depths`` keep DiNAT's alternation)."""
    family, size = variant.split("_")
    depths = kwargs.get("depths", NAT_SIZES[size]["depths"])
    args = dict(stem="conv", downsample="conv", layer_scale=LAYER_SCALE[family][size], **NAT_SIZES[size],
                attn=nat_attention(family, depths))
    return create_hierarchical(variant, pretrained, checkpoint_filter_fn, **dict(args, **kwargs))


for _variant in _model_names():
    _family, _size = _variant.split("_")
    register_variant(__name__, _variant, create_nat,
                     f"{PAPERS[_family][1]}: {PAPERS[_family][0]}-{_size.capitalize()} at 224x224.")
