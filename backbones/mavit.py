"""MAViT-T/S/B/L, the hierarchical models of MALA (Fan et al., "Rectifying Magnitude Neglect in Linear
Attention", ICCV 2025), as in the official ``classfication_release/model.py`` (``MALA_T/S/B/L``).

A convolutional BatchNorm stem, 3x3/2 conv + BatchNorm downsampling, and blocks with a 3x3
depthwise positional conv before pre-norm attention and a depthwise-conv FFN (ratio 3.5), layer
scale throughout. Stages 1-2 use MALA (phi = ELU + 1, 2D RoPE inside the KV product, 5x5 LePE,
output gate); stages 3-4 softmax attention with the same RoPE, LePE and gate (the official default
``flagss``). The head projects each position to 2048 (2560 for L) channels with BatchNorm and swish
before pooling.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from timm.models import generate_default_cfgs, register_model

from .hierarchical import HierarchicalTransformer, check_converted, create_hierarchical, hierarchical_cfg, rename_keys

STAGE_ATTENTION = ("mala", "mala", "softmax_rope", "softmax_rope")


def mavit_attention(depths: Sequence[int]) -> list[str]:
    """MALA in stages 1-2, RoPE softmax in stages 3-4."""
    return [name for name, depth in zip(STAGE_ATTENTION, depths) for _ in range(depth)]


def _split_qkvo(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official attention projects q, k, v and the gate o with one 1x1 conv: split [q; k; v] | [o]."""
    out = {}
    for key, value in state_dict.items():
        if ".attn.qkvo." in key:
            dim = value.shape[0] // 4
            out[key.replace(".qkvo.", ".qkv.")], out[key.replace(".qkvo.", ".gate.")] = value[:3 * dim], value[3 * dim:]
        else:
            out[key] = value
    return out


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor],
                         model: HierarchicalTransformer) -> dict[str, torch.Tensor]:
    """Official MAViT (``MALA_*``) state dict to ours.

    ``layers.i.blocks`` -> ``stages.i.blocks`` with ``pos`` -> ``cpe``, ``norm{1,2}.norm`` ->
    ``norm{1,2}``, ``ffn`` -> ``mlp``, ``gamma_{1,2}`` (1, C, 1, 1) -> ``ls{1,2}.gamma`` (C,),
    ``attn.qkvo`` split into ``attn.qkv`` and ``attn.gate``; ``layers.i.downsample`` (end of stage i)
    -> ``stages.{i+1}.downsample`` with ``reduction`` -> ``proj``; the top-level ``proj``, ``norm`` and
    ``head`` -> ``head.proj``, ``head.norm``, ``head.fc``; every 1x1 conv becomes a linear (same
    numbers). The RoPE ``angle`` buffers are recomputed: dropped. Our own state dicts pass through.
    """
    state_dict = state_dict.get("model", state_dict)
    if not any(k.startswith("stages.") for k in state_dict):
        state_dict = _split_qkvo(rename_keys(state_dict, [
            (r"^layers\.(\d+)\.downsample\.reduction\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample.proj."),
            (r"^layers\.(\d+)\.downsample\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample."),
            (r"^layers\.(\d+)\.blocks\.(\d+)\.pos\.", r"stages.\1.blocks.\2.cpe."),
            (r"^layers\.(\d+)\.blocks\.(\d+)\.(norm\d)\.norm\.", r"stages.\1.blocks.\2.\3."),
            (r"^layers\.(\d+)\.blocks\.(\d+)\.ffn\.", r"stages.\1.blocks.\2.mlp."),
            (r"^layers\.(\d+)\.blocks\.(\d+)\.gamma_(\d)$", r"stages.\1.blocks.\2.ls\3.gamma"),
            (r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks."),
            (r"^(proj|norm)\.", r"head.\1."),
            (r"^head\.", "head.fc."),
        ], drop=[r"\.RoPE\.angle$"]))
        target = model.state_dict()
        state_dict = {k: v.reshape(target[k].shape) if k in target and v.dim() != target[k].dim() else v
                      for k, v in state_dict.items()}
    return check_converted(state_dict, model, "the official MAViT layout")


def _create_mavit(variant: str, pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """The MALA/softmax split by stage stays when ``depths`` is changed (unless ``attn`` is given)."""
    kwargs.setdefault("attn", mavit_attention(kwargs["depths"]))
    kwargs = {**dict(stem="conv_bn", downsample="conv_bn", cpe=True, mlp="dwconv", mlp_ratios=3.5, norm_eps=1e-6,
                     final_norm=False, attn_kwargs={"mala": dict(rope=True, lepe=True, lepe_kernel_size=5, gate=True),
                                                    "softmax_rope": dict(lepe_kernel_size=5)}), **kwargs}
    return create_hierarchical(variant, pretrained, checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return hierarchical_cfg(license="apache-2.0", paper_ids="arXiv:2507.00698", crop_pct=0.875,
                            paper_name="Rectifying Magnitude Neglect in Linear Attention",
                            origin_url="https://github.com/qhfan/MALA", **kwargs)


default_cfgs = generate_default_cfgs({
    "mavit_tiny": _cfg(),
    "mavit_small": _cfg(),
    "mavit_base": _cfg(),
    "mavit_large": _cfg(),
})


@register_model
def mavit_tiny(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """MAViT-T at 224x224."""
    model_args = dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8),
                      drop_path_rate=0.1, head_hidden_size=2048, layer_scale=(1., 1., 1., 1.))
    return _create_mavit("mavit_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mavit_small(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """MAViT-S at 224x224."""
    model_args = dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 9, 3), num_heads=(1, 2, 5, 8),
                      drop_path_rate=0.15, head_hidden_size=2048, layer_scale=(1., 1., 1., 1.))
    return _create_mavit("mavit_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mavit_base(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """MAViT-B at 224x224."""
    model_args = dict(embed_dims=(96, 192, 384, 512), depths=(4, 6, 12, 6), num_heads=(1, 2, 6, 8),
                      drop_path_rate=0.4, head_hidden_size=2048, layer_scale=(1., 1., 1e-6, 1e-6))
    return _create_mavit("mavit_base", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mavit_large(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """MAViT-L at 224x224."""
    model_args = dict(embed_dims=(96, 192, 448, 640), depths=(4, 7, 19, 8), num_heads=(1, 2, 7, 10),
                      drop_path_rate=0.55, head_hidden_size=2560, layer_scale=(1e-6, 1e-6, 1e-6, 1e-6))
    return _create_mavit("mavit_large", pretrained=pretrained, **dict(model_args, **kwargs))
