"""PVT-layout models of the efficient-attention papers: Agent-PVT-T/S/M/L and M at 256x256 (Han et al.,
"Agent Attention", ECCV 2024) and FLatten-PVT-T/S/M/L (Han et al., "FLatten Transformer", ICCV 2023).

Both keep PVT v1 (Wang et al., ICCV 2021: a 4x4/4 then 2x2/2 patch embedding with LayerNorm and a
learned position embedding per stage, dims 64/128/320/512, heads 1/2/5/8, MLP ratios 8/8/4/4) and
put their attention in every block over the full stage map: the official configs set the spatial
reduction of their attention to 1 (``PVT_LA_SR_RATIOS: 1111``), so PVT's reduced keys are gone, and
the class token and final norm are dropped (average pooling). Agent: 9/16/49/49 agents, 3x3 DWC;
FLatten: focusing factor 3, 5x5 DWC, a positional encoding on K. Drop-path rates from the official
``cfgs/*_pvt_*.yaml``.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model

from .hierarchical import (AGENT_PAPER, FLATTEN_PAPER, HierarchicalTransformer, check_converted, create_hierarchical,
                           hierarchical_cfg, rename_keys)


def merge_q_kv(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PVT projects q and (k, v) with two linears; we use one qkv linear: concatenate [q; k; v]."""
    out = {}
    for key, value in state_dict.items():
        if ".attn.kv." in key:
            continue
        if ".attn.q." in key:
            kv = state_dict[key.replace(".attn.q.", ".attn.kv.")]
            key, value = key.replace(".attn.q.", ".attn.qkv."), torch.cat([value, kv])
        out[key] = value
    return out


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor],
                         model: HierarchicalTransformer) -> dict[str, torch.Tensor]:
    """Official Agent-PVT / FLatten-PVT state dict (PVT v1 layout) to ours.

    ``patch_embed1`` -> ``patch_embed``; ``patch_embed{i}`` / ``pos_embed{i}`` / ``block{i}`` ->
    stage i - 1's ``downsample`` / ``pos_embed`` / ``blocks``; ``attn.q`` + ``attn.kv`` -> ``attn.qkv``;
    ``head`` -> ``head.fc``. FLatten-PVT defines a final ``norm`` that its forward never applies: dropped.
    Our own state dicts pass through.
    """
    state_dict = state_dict.get("model", state_dict)
    if not any(k.startswith("stages.") for k in state_dict):
        state_dict = merge_q_kv(rename_keys(state_dict, [
            (r"^patch_embed1\.", "patch_embed."),
            (r"^patch_embed(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.downsample."),
            (r"^pos_embed(\d)$", lambda m: f"stages.{int(m.group(1)) - 1}.pos_embed"),
            (r"^block(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks."),
            (r"^head\.", "head.fc."),
        ], drop=[r"^norm\."]))
    return check_converted(state_dict, model, "the official PVT layout")


def _create_pvt(variant: str, pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    kwargs = {**dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), stem="patch",
                     downsample="patch", pos_embed=True, final_norm=False, norm_eps=1e-6), **kwargs}
    return create_hierarchical(variant, pretrained, checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs({
    "agent_pvt_tiny": hierarchical_cfg(license="apache-2.0", crop_pct=0.875, **AGENT_PAPER),
    "agent_pvt_small": hierarchical_cfg(license="apache-2.0", crop_pct=0.875, **AGENT_PAPER),
    "agent_pvt_medium": hierarchical_cfg(license="apache-2.0", crop_pct=0.875, **AGENT_PAPER),
    "agent_pvt_large": hierarchical_cfg(license="apache-2.0", crop_pct=0.875, **AGENT_PAPER),
    "flatten_pvt_tiny": hierarchical_cfg(license="apache-2.0", crop_pct=0.875, **FLATTEN_PAPER),
    "flatten_pvt_small": hierarchical_cfg(license="apache-2.0", crop_pct=0.875, **FLATTEN_PAPER),
    "flatten_pvt_medium": hierarchical_cfg(license="apache-2.0", crop_pct=0.875, **FLATTEN_PAPER),
    "flatten_pvt_large": hierarchical_cfg(license="apache-2.0", crop_pct=0.875, **FLATTEN_PAPER),
    "agent_pvt_medium_256": hierarchical_cfg(license="apache-2.0", input_size=(3, 256, 256), pool_size=(8, 8),
                                             crop_pct=0.875, **AGENT_PAPER),
})


@register_model
def agent_pvt_tiny(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """Agent-PVT-T at 224x224."""
    model_args = dict(depths=(2, 2, 2, 2), drop_path_rate=0.1,
                      attn="agent", attn_kwargs={"agent": dict(dwc_kernel_size=3)})
    return _create_pvt("agent_pvt_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_small(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """Agent-PVT-S at 224x224."""
    model_args = dict(depths=(3, 4, 6, 3), drop_path_rate=0.1,
                      attn="agent", attn_kwargs={"agent": dict(dwc_kernel_size=3)})
    return _create_pvt("agent_pvt_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_medium(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """Agent-PVT-M at 224x224."""
    model_args = dict(depths=(3, 4, 18, 3), drop_path_rate=0.3,
                      attn="agent", attn_kwargs={"agent": dict(dwc_kernel_size=3)})
    return _create_pvt("agent_pvt_medium", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_large(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """Agent-PVT-L at 224x224."""
    model_args = dict(depths=(3, 8, 27, 3), drop_path_rate=0.3,
                      attn="agent", attn_kwargs={"agent": dict(dwc_kernel_size=3)})
    return _create_pvt("agent_pvt_large", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_pvt_tiny(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """FLatten-PVT-T at 224x224."""
    model_args = dict(depths=(2, 2, 2, 2), drop_path_rate=0.1,
                      attn="flatten", attn_kwargs={"flatten": dict(focusing_factor=3, kernel_size=5)})
    return _create_pvt("flatten_pvt_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_pvt_small(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """FLatten-PVT-S at 224x224."""
    model_args = dict(depths=(3, 4, 6, 3), drop_path_rate=0.1,
                      attn="flatten", attn_kwargs={"flatten": dict(focusing_factor=3, kernel_size=5)})
    return _create_pvt("flatten_pvt_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_pvt_medium(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """FLatten-PVT-M at 224x224."""
    model_args = dict(depths=(3, 4, 18, 3), drop_path_rate=0.3,
                      attn="flatten", attn_kwargs={"flatten": dict(focusing_factor=3, kernel_size=5)})
    return _create_pvt("flatten_pvt_medium", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_pvt_large(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """FLatten-PVT-L at 224x224."""
    model_args = dict(depths=(3, 8, 27, 3), drop_path_rate=0.3,
                      attn="flatten", attn_kwargs={"flatten": dict(focusing_factor=3, kernel_size=5)})
    return _create_pvt("flatten_pvt_large", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_pvt_medium_256(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """Agent-PVT-M at 256x256 (position embeddings and agent biases on the 64/32/16/8 stage grids)."""
    model_args = dict(img_size=256, depths=(3, 4, 18, 3), drop_path_rate=0.3,
                      attn="agent", attn_kwargs={"agent": dict(dwc_kernel_size=3)})
    return _create_pvt("agent_pvt_medium_256", pretrained=pretrained, **dict(model_args, **kwargs))
