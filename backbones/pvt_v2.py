"""FLatten-PVTv2-b0..b4 (Han et al., "FLatten Transformer", ICCV 2023) on PVTv2 (Wang et al., "PVT v2:
Improved Baselines with Pyramid Vision Transformer", CVMJ 2022), as the official ``flatten_pvt_v2.py``.

PVTv2's layout: an overlapping patch embedding (7x7/4 conv padded by 3, then 3x3/2 convs between
stages, each with LayerNorm), blocks whose FFN runs a 3x3 depthwise conv between its two linears
(``ConvFfn``), a LayerNorm at the end of every stage (the classifier averages the last one) and no
position embedding. FLatten puts focused linear attention (focusing factor 3, 5x5 DWC, a positional
encoding on K over the stage map) in every block over the full stage map: the official config sets the
spatial reduction of its attention to 1 (``PVT_LA_SR_RATIOS: 1111``), so PVTv2's reduced keys are gone.
Dims 32/64/160/256 (b0) or 64/128/320/512, heads 1/2/5/8, MLP ratios 8/8/4/4; drop-path rates from
the official ``cfgs/flatten_pvt_v2_*.yaml``.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model

from .hierarchical import (FLATTEN_PAPER, HierarchicalTransformer, check_converted, create_hierarchical,
                           hierarchical_cfg, rename_keys)
from .pvt import merge_q_kv


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor],
                         model: HierarchicalTransformer) -> dict[str, torch.Tensor]:
    """Official FLatten-PVTv2 state dict (PVTv2 layout) to ours.

    ``patch_embed1`` -> ``patch_embed``; ``patch_embed{i}`` / ``block{i}`` / ``norm{i}`` -> stage i - 1's
    ``downsample`` / ``blocks`` / ``norm``; ``attn.q`` + ``attn.kv`` -> ``attn.qkv``; the FFN's
    ``dwconv.dwconv`` -> ``dwconv``; ``head`` -> ``head.fc``. Our own state dicts pass through.
    """
    state_dict = state_dict.get("model", state_dict)
    if not any(k.startswith("stages.") for k in state_dict):
        state_dict = merge_q_kv(rename_keys(state_dict, [
            (r"^patch_embed1\.", "patch_embed."),
            (r"^patch_embed(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.downsample."),
            (r"^block(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks."
                                                               f"{m.group(2)}.mlp.dwconv."),
            (r"^block(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks."),
            (r"^norm(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.norm."),
            (r"^head\.", "head.fc."),
        ]))
    return check_converted(state_dict, model, "the official PVTv2 layout")


def _create_pvt_v2(variant: str, pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    kwargs = {**dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                     stem="overlap", downsample="overlap", mlp="conv_ffn", stage_norm=True, final_norm=False,
                     norm_eps=1e-6, attn="flatten",
                     attn_kwargs={"flatten": dict(focusing_factor=3, kernel_size=5)}), **kwargs}
    return create_hierarchical(variant, pretrained, checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return hierarchical_cfg(license="apache-2.0", crop_pct=0.9, first_conv="patch_embed.proj", **FLATTEN_PAPER,
                            **kwargs)


default_cfgs = generate_default_cfgs({
    "flatten_pvt_v2_b0": _cfg(),
    "flatten_pvt_v2_b1": _cfg(),
    "flatten_pvt_v2_b2": _cfg(),
    "flatten_pvt_v2_b3": _cfg(),
    "flatten_pvt_v2_b4": _cfg(),
})


@register_model
def flatten_pvt_v2_b0(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """FLatten-PVTv2-b0 at 224x224."""
    model_args = dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), drop_path_rate=0.1)
    return _create_pvt_v2("flatten_pvt_v2_b0", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_pvt_v2_b1(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """FLatten-PVTv2-b1 at 224x224."""
    model_args = dict(depths=(2, 2, 2, 2), drop_path_rate=0.1)
    return _create_pvt_v2("flatten_pvt_v2_b1", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_pvt_v2_b2(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """FLatten-PVTv2-b2 at 224x224."""
    model_args = dict(depths=(3, 4, 6, 3), drop_path_rate=0.1)
    return _create_pvt_v2("flatten_pvt_v2_b2", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_pvt_v2_b3(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """FLatten-PVTv2-b3 at 224x224."""
    model_args = dict(depths=(3, 4, 18, 3), drop_path_rate=0.3)
    return _create_pvt_v2("flatten_pvt_v2_b3", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_pvt_v2_b4(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """FLatten-PVTv2-b4 at 224x224."""
    model_args = dict(depths=(3, 8, 27, 3), drop_path_rate=0.3)
    return _create_pvt_v2("flatten_pvt_v2_b4", pretrained=pretrained, **dict(model_args, **kwargs))
