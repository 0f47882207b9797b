"""NAT-Mini/Tiny/Small/Base (Hassani et al., "Neighborhood Attention Transformer", CVPR 2023) and
DiNAT-Mini/Tiny/Small/Base (Hassani & Shi, "Dilated Neighborhood Attention Transformer", arXiv
2209.15001), as in the official ``classification/nat.py`` and ``dinat.py``.

A tokenizer of two 3x3/2 convs, 3x3/2 conv downsampling (no bias) with LayerNorm, and blocks of 7x7
neighborhood attention with a relative position bias. DiNAT alternates plain and dilated blocks,
the dilation being the largest that fits the stage map at the model's resolution (side // kernel:
8, 4, 2, 1 at 224x224). Layer scale 1e-5 in NAT-S/B and DiNAT-B. DiNAT-Large (ImageNet-22K
pre-trained, fine-tuned on ImageNet-1K) at 224x224, at 384x384 with 7x7 neighborhoods (dilations
13, 6, 3, 1) and at 384x384 with 11x11 neighborhoods (dilations 8, 4, 2, 1), as the official
``dinat_large``, ``dinat_large_384`` and ``dinat_large_384_11x11``.

DiNAT_s-Tiny/Small/Base/Large (and Large at 384x384), the paper's alternative (official ``dinats.py``):
Swin's layout (4x4 patch embedding, patch merging, MLP ratio 4, Swin's depths and widths, Swin's
checkpoint layout) with DiNAT's alternating 7x7 neighborhoods in place of the shifted windows.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from timm.models import generate_default_cfgs, register_model

from . import swin
from .hierarchical import HierarchicalTransformer, check_converted, create_hierarchical, hierarchical_cfg, rename_keys

KERNEL_SIZE = 7


def dinat_dilations(img_size: int = 224, kernel_size: int = KERNEL_SIZE) -> tuple[int, ...]:
    """DiNAT's dilation of the odd blocks, per stage: the stage side at ``img_size`` // the kernel size
    (8, 4, 2, 1 at 224 with 7x7; 13, 6, 3, 1 at 384 with 7x7; 8, 4, 2, 1 at 384 with 11x11)."""
    return tuple(max(1, img_size // (4 * 2 ** stage) // kernel_size) for stage in range(4))


def nat_attention(depths: Sequence[int], dilated: bool, kernel_size: int = KERNEL_SIZE,
                  img_size: int = 224) -> list[tuple[str, dict[str, Any]]]:
    """One neighborhood-attention entry per block; ``dilated`` (DiNAT) dilates every second block of a stage."""
    dilation = dinat_dilations(img_size, kernel_size)
    return [("neighborhood", dict(kernel_size=kernel_size, dilation=dilation[stage] if dilated and i % 2 else 1))
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


def _create_dinat_s(variant: str, pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """DiNAT_s: Swin's stem, patch merging and checkpoint layout, DiNAT's alternation (unless ``attn`` is given)."""
    img_size = kwargs.get("img_size", 224)
    size = img_size if isinstance(img_size, int) else min(img_size)
    kwargs.setdefault("attn", nat_attention(kwargs["depths"], True, KERNEL_SIZE, size))
    kwargs = {**dict(stem="patch", downsample="merge", mlp_ratios=4.), **kwargs}
    return create_hierarchical(variant, pretrained, swin.checkpoint_filter_fn, **kwargs)


def _create_nat(variant: str, pretrained: bool = False, *, dilated: bool = False, kernel_size: int = KERNEL_SIZE,
                **kwargs: Any) -> HierarchicalTransformer:
    """``dilated``: DiNAT's alternation, also when ``depths`` is changed (unless ``attn`` is given); the
    dilations are those of the model's ``img_size`` and ``kernel_size``."""
    img_size = kwargs.get("img_size", 224)
    size = img_size if isinstance(img_size, int) else min(img_size)
    kwargs.setdefault("attn", nat_attention(kwargs["depths"], dilated, kernel_size, size))
    kwargs = {**dict(stem="conv", downsample="conv"), **kwargs}
    return create_hierarchical(variant, pretrained, checkpoint_filter_fn, **kwargs)


NAT = dict(paper_name="Neighborhood Attention Transformer", paper_ids="arXiv:2204.07143")
DINAT = dict(paper_name="Dilated Neighborhood Attention Transformer", paper_ids="arXiv:2209.15001")


def _cfg(**kwargs: Any) -> dict[str, Any]:
    defaults = {"license": "mit", "crop_pct": 0.875,
                "origin_url": "https://github.com/SHI-Labs/Neighborhood-Attention-Transformer"}
    return hierarchical_cfg(**{**defaults, **kwargs})


default_cfgs = generate_default_cfgs({
    "nat_mini": _cfg(**NAT),
    "nat_tiny": _cfg(**NAT),
    "nat_small": _cfg(**NAT),
    "nat_base": _cfg(**NAT),
    "dinat_mini": _cfg(**DINAT),
    "dinat_tiny": _cfg(**DINAT),
    "dinat_small": _cfg(**DINAT),
    "dinat_base": _cfg(**DINAT),
    "dinat_large": _cfg(**DINAT),
    "dinat_large_384": _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, **DINAT),
    "dinat_large_384_11x11": _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, **DINAT),
    "dinat_s_tiny": _cfg(**DINAT),
    "dinat_s_small": _cfg(**DINAT),
    "dinat_s_base": _cfg(**DINAT),
    "dinat_s_large": _cfg(**DINAT),
    "dinat_s_large_384": _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0, **DINAT),
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


@register_model
def dinat_large(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """DiNAT-Large at 224x224 (ImageNet-22K pre-trained, ImageNet-1K head)."""
    model_args = dict(embed_dims=(192, 384, 768, 1536), depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48),
                      mlp_ratios=2., drop_path_rate=0.35, dilated=True)
    return _create_nat("dinat_large", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_large_384(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """DiNAT-Large at 384x384, 7x7 neighborhoods (dilations 13, 6, 3, 1)."""
    model_args = dict(img_size=384, embed_dims=(192, 384, 768, 1536), depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48),
                      mlp_ratios=2., drop_path_rate=0.35, dilated=True)
    return _create_nat("dinat_large_384", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_large_384_11x11(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """DiNAT-Large at 384x384, 11x11 neighborhoods (dilations 8, 4, 2, 1)."""
    model_args = dict(img_size=384, embed_dims=(192, 384, 768, 1536), depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48),
                      mlp_ratios=2., drop_path_rate=0.35, dilated=True, kernel_size=11)
    return _create_nat("dinat_large_384_11x11", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_tiny(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """DiNAT_s-Tiny (Swin-T layout) at 224x224."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2)
    return _create_dinat_s("dinat_s_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_small(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """DiNAT_s-Small (Swin-S layout) at 224x224."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                      drop_path_rate=0.3)
    return _create_dinat_s("dinat_s_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_base(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """DiNAT_s-Base (Swin-B layout) at 224x224."""
    model_args = dict(embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                      drop_path_rate=0.5)
    return _create_dinat_s("dinat_s_base", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_large(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """DiNAT_s-Large (Swin-L layout) at 224x224 (ImageNet-22K pre-trained, ImageNet-1K head)."""
    model_args = dict(embed_dims=(192, 384, 768, 1536), depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48),
                      drop_path_rate=0.35)
    return _create_dinat_s("dinat_s_large", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_large_384(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """DiNAT_s-Large at 384x384 (dilations 13, 6, 3, 1)."""
    model_args = dict(img_size=384, embed_dims=(192, 384, 768, 1536), depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48),
                      drop_path_rate=0.35)
    return _create_dinat_s("dinat_s_large_384", pretrained=pretrained, **dict(model_args, **kwargs))
