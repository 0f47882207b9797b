"""NAT-Mini/Tiny/Small/Base (Hassani et al., "Neighborhood Attention Transformer", CVPR 2023) and
DiNAT-Mini/Tiny/Small/Base (Hassani & Shi, "Dilated Neighborhood Attention Transformer", arXiv
2209.15001), as in the official ``classification/nat.py`` and ``dinat.py``.

A tokenizer of two 3x3/2 convs, 3x3/2 conv downsampling (no bias) with LayerNorm, and blocks of 7x7
neighborhood attention with a relative position bias. DiNAT alternates plain and dilated blocks,
the dilation being the largest that fits the stage map at 224x224 (side // 7: 8, 4, 2, 1).
Layer scale 1e-5 in NAT-S/B and DiNAT-B.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from timm.models import generate_default_cfgs, register_model

from .hierarchical import HierarchicalTransformer, check_converted, create_hierarchical, hierarchical_cfg, rename_keys

KERNEL_SIZE = 7
DILATION = (8, 4, 2, 1)   # DiNAT's odd blocks, per stage: stage side at 224x224 // KERNEL_SIZE


def nat_attention(depths: Sequence[int], dilated: bool) -> list[tuple[str, dict[str, Any]]]:
    """One neighborhood-attention entry per block; ``dilated`` (DiNAT) dilates every second block of a stage."""
    return [("neighborhood", dict(kernel_size=KERNEL_SIZE, dilation=DILATION[stage] if dilated and i % 2 else 1))
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


def _create_nat(variant: str, pretrained: bool = False, *, dilated: bool = False,
                **kwargs: Any) -> HierarchicalTransformer:
    """``dilated``: DiNAT's alternation, also when ``depths`` is changed (unless ``attn`` is given)."""
    kwargs.setdefault("attn", nat_attention(kwargs["depths"], dilated))
    kwargs = {**dict(stem="conv", downsample="conv"), **kwargs}
    return create_hierarchical(variant, pretrained, checkpoint_filter_fn, **kwargs)


NAT = dict(paper_name="Neighborhood Attention Transformer", paper_ids="arXiv:2204.07143")
DINAT = dict(paper_name="Dilated Neighborhood Attention Transformer", paper_ids="arXiv:2209.15001")


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return hierarchical_cfg(license="mit", origin_url="https://github.com/SHI-Labs/Neighborhood-Attention-Transformer",
                            crop_pct=0.875, **kwargs)


default_cfgs = generate_default_cfgs({
    "nat_mini": _cfg(**NAT),
    "nat_tiny": _cfg(**NAT),
    "nat_small": _cfg(**NAT),
    "nat_base": _cfg(**NAT),
    "dinat_mini": _cfg(**DINAT),
    "dinat_tiny": _cfg(**DINAT),
    "dinat_small": _cfg(**DINAT),
    "dinat_base": _cfg(**DINAT),
})


@register_model
def nat_mini(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """NAT-Mini at 224x224."""
    model_args = dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratios=3.,
                      drop_path_rate=0.2)
    return _create_nat("nat_mini", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_tiny(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """NAT-Tiny at 224x224."""
    model_args = dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratios=3.,
                      drop_path_rate=0.2)
    return _create_nat("nat_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_small(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """NAT-Small at 224x224."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratios=2.,
                      drop_path_rate=0.3, layer_scale=1e-5)
    return _create_nat("nat_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_base(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """NAT-Base at 224x224."""
    model_args = dict(embed_dims=(128, 256, 512, 1024), depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratios=2.,
                      drop_path_rate=0.5, layer_scale=1e-5)
    return _create_nat("nat_base", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_mini(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """DiNAT-Mini at 224x224."""
    model_args = dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratios=3.,
                      drop_path_rate=0.2, dilated=True)
    return _create_nat("dinat_mini", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_tiny(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """DiNAT-Tiny at 224x224."""
    model_args = dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratios=3.,
                      drop_path_rate=0.2, dilated=True)
    return _create_nat("dinat_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_small(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """DiNAT-Small at 224x224."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratios=2.,
                      drop_path_rate=0.3, dilated=True)
    return _create_nat("dinat_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_base(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """DiNAT-Base at 224x224."""
    model_args = dict(embed_dims=(128, 256, 512, 1024), depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratios=2.,
                      drop_path_rate=0.5, layer_scale=1e-5, dilated=True)
    return _create_nat("dinat_base", pretrained=pretrained, **dict(model_args, **kwargs))
