"""Swin-layout models (Liu et al., "Swin Transformer", ICCV 2021: 4x4 patch embedding, patch merging,
MLP ratio 4): the efficient-attention papers' Agent-Swin (Han et al., "Agent Attention", ECCV 2024)
and FLatten-Swin (Han et al., "FLatten Transformer", ICCV 2023) with their official configs, and the
generic ``subquad_hier_{tiny,small,base}`` with any attention in every block.

Both papers keep Swin-T/S/B and swap the attention of chosen stages for their own with a window of
56, i.e. over the whole stage map at 224x224 (official ``cfgs/*_swin_*.yaml``):
- Agent-Swin ("A" = agent attention, "B" = Swin's 7x7 shifted windows): T ``AAAB``, S ``AABB``,
  B ``AAMB2`` (stage 3: 2 agent blocks, then windows); 9/16/49/49 agents per stage, 3x3 DWC;
- FLatten-Swin ("L" = focused linear attention, "S" = Swin windows): ``LLSS`` for T/S/B; focusing
  factor 3, 5x5 DWC, a learnable positional encoding on K over the stage map.
Global attention stays global at other input sizes (the maps are resized). The fine-tuned
high-resolution configs (Agent-Swin-S 288, Agent-Swin-B 384, FLatten-Swin-B 384) define their maps on
the larger stage grids and set Swin's windows to the official window // 8 (9 at 288, 12 at 384).

``subquad_hier_*`` default to ``attn="window"``, Swin itself (7x7 shifted windows; same parameters
and, at 224x224, the same outputs as timm's ``swin_*_patch4_window7_224``). ``attn="mala"`` (or one
entry per block, a name or ``(name, options)``) swaps the attention; options that depend on the
stage (agent count, bias and position maps on the stage grid) get the papers' choices, and
``attn_kwargs={name: options}`` sets the rest.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from timm.models import generate_default_cfgs, register_model

from .hierarchical import (AGENT_PAPER, FLATTEN_PAPER, HierarchicalTransformer, check_converted, create_hierarchical,
                           hierarchical_cfg, rename_keys)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor],
                         model: HierarchicalTransformer) -> dict[str, torch.Tensor]:
    """Official Swin / Agent-Swin / FLatten-Swin state dict (Swin's layout) to ours.

    ``layers.i.blocks`` -> ``stages.i.blocks``; Swin merges patches at the end of stage i, we at the
    start of stage i + 1; the classifier ``head`` -> ``head.fc``; the persistent buffers
    ``relative_position_index`` and ``attn_mask`` are recomputed here, so they are dropped. Our own
    state dicts pass through. Every other name and layout is already the official one.
    """
    state_dict = state_dict.get("model", state_dict)
    if not any(k.startswith("stages.") for k in state_dict):
        state_dict = rename_keys(state_dict, [
            (r"^layers\.(\d+)\.downsample\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample."),
            (r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks."),
            (r"^head\.", "head.fc."),
        ], drop=[r"relative_position_index$", r"attn_mask$"])
    return check_converted(state_dict, model, "the official Swin layout")


def _create_swin(variant: str, pretrained: bool = False, *, paper_attn: tuple[str, Sequence[int]] | None = None,
                 **kwargs: Any) -> HierarchicalTransformer:
    """``paper_attn=(name, blocks per stage)``: that attention in the leading blocks of each stage and
    Swin's windows in the rest, also when ``depths`` is changed (unless ``attn`` is given)."""
    if paper_attn is not None:
        name, leading = paper_attn
        kwargs.setdefault("attn", [name if i < n else "window"
                                   for n, depth in zip(leading, kwargs["depths"]) for i in range(depth)])
    kwargs = {**dict(stem="patch", downsample="merge", mlp_ratios=4.), **kwargs}
    return create_hierarchical(variant, pretrained, checkpoint_filter_fn, **kwargs)


# the fine-tuned high-resolution configs: evaluated on the whole image (official ``TEST.CROP: False``)
HIGH_RES = {size: dict(input_size=(3, size, size), pool_size=(size // 32, size // 32), crop_pct=1.0)
            for size in (288, 384)}

default_cfgs = generate_default_cfgs({
    "agent_swin_tiny_patch4_window7_224": hierarchical_cfg(license="mit", **AGENT_PAPER),
    "agent_swin_small_patch4_window7_224": hierarchical_cfg(license="mit", **AGENT_PAPER),
    "agent_swin_base_patch4_window7_224": hierarchical_cfg(license="mit", **AGENT_PAPER),
    "flatten_swin_tiny_patch4_window7_224": hierarchical_cfg(license="mit", **FLATTEN_PAPER),
    "flatten_swin_small_patch4_window7_224": hierarchical_cfg(license="mit", **FLATTEN_PAPER),
    "flatten_swin_base_patch4_window7_224": hierarchical_cfg(license="mit", **FLATTEN_PAPER),
    "agent_swin_small_patch4_window9_288": hierarchical_cfg(license="mit", **HIGH_RES[288], **AGENT_PAPER),
    "agent_swin_base_patch4_window12_384": hierarchical_cfg(license="mit", **HIGH_RES[384], **AGENT_PAPER),
    "flatten_swin_base_patch4_window12_384": hierarchical_cfg(license="mit", **HIGH_RES[384], **FLATTEN_PAPER),
    "subquad_hier_tiny": hierarchical_cfg(license="apache-2.0"),
    "subquad_hier_small": hierarchical_cfg(license="apache-2.0"),
    "subquad_hier_base": hierarchical_cfg(license="apache-2.0"),
})


@register_model
def agent_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """Agent-Swin-T (AAAB) at 224x224."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      drop_path_rate=0.2, paper_attn=("agent", (2, 2, 6, 0)),
                      attn_kwargs={"agent": dict(dwc_kernel_size=3), "window": dict(window_size=7)})
    return _create_swin("agent_swin_tiny_patch4_window7_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """Agent-Swin-S (AABB) at 224x224."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                      drop_path_rate=0.3, paper_attn=("agent", (2, 2, 0, 0)),
                      attn_kwargs={"agent": dict(dwc_kernel_size=3), "window": dict(window_size=7)})
    return _create_swin("agent_swin_small_patch4_window7_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """Agent-Swin-B (AAMB2) at 224x224."""
    model_args = dict(embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                      drop_path_rate=0.5, paper_attn=("agent", (2, 2, 2, 0)),
                      attn_kwargs={"agent": dict(dwc_kernel_size=3), "window": dict(window_size=7)})
    return _create_swin("agent_swin_base_patch4_window7_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """FLatten-Swin-T (LLSS) at 224x224."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      drop_path_rate=0.2, paper_attn=("flatten", (2, 2, 0, 0)),
                      attn_kwargs={"flatten": dict(focusing_factor=3, kernel_size=5), "window": dict(window_size=7)})
    return _create_swin("flatten_swin_tiny_patch4_window7_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """FLatten-Swin-S (LLSS) at 224x224."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                      drop_path_rate=0.3, paper_attn=("flatten", (2, 2, 0, 0)),
                      attn_kwargs={"flatten": dict(focusing_factor=3, kernel_size=5), "window": dict(window_size=7)})
    return _create_swin("flatten_swin_small_patch4_window7_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """FLatten-Swin-B (LLSS) at 224x224."""
    model_args = dict(embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                      drop_path_rate=0.5, paper_attn=("flatten", (2, 2, 0, 0)),
                      attn_kwargs={"flatten": dict(focusing_factor=3, kernel_size=5), "window": dict(window_size=7)})
    return _create_swin("flatten_swin_base_patch4_window7_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_small_patch4_window9_288(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """Agent-Swin-S (AABB) at 288x288: agent attention over the whole stage map, Swin windows of 9
    (the official config's window 72 // 8)."""
    model_args = dict(img_size=288, embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                      drop_path_rate=0.3, paper_attn=("agent", (2, 2, 0, 0)),
                      attn_kwargs={"agent": dict(dwc_kernel_size=3), "window": dict(window_size=9)})
    return _create_swin("agent_swin_small_patch4_window9_288", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_swin_base_patch4_window12_384(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """Agent-Swin-B (AAMB2) at 384x384: agent attention over the whole stage map, Swin windows of 12
    (the official config's window 96 // 8)."""
    model_args = dict(img_size=384, embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                      drop_path_rate=0.5, paper_attn=("agent", (2, 2, 2, 0)),
                      attn_kwargs={"agent": dict(dwc_kernel_size=3), "window": dict(window_size=12)})
    return _create_swin("agent_swin_base_patch4_window12_384", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_swin_base_patch4_window12_384(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """FLatten-Swin-B (LLSS) at 384x384: focused linear attention over the whole stage map, Swin windows
    of 12 (the official code's window for a focused-linear window above 56)."""
    model_args = dict(img_size=384, embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                      drop_path_rate=0.5, paper_attn=("flatten", (2, 2, 0, 0)),
                      attn_kwargs={"flatten": dict(focusing_factor=3, kernel_size=5), "window": dict(window_size=12)})
    return _create_swin("flatten_swin_base_patch4_window12_384", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def subquad_hier_tiny(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """Swin-T layout with any attention (``attn=``), Swin's shifted windows by default."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      drop_path_rate=0.2, attn="window")
    return _create_swin("subquad_hier_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def subquad_hier_small(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """Swin-S layout with any attention (``attn=``), Swin's shifted windows by default."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                      drop_path_rate=0.3, attn="window")
    return _create_swin("subquad_hier_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def subquad_hier_base(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """Swin-B layout with any attention (``attn=``), Swin's shifted windows by default."""
    model_args = dict(embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                      drop_path_rate=0.5, attn="window")
    return _create_swin("subquad_hier_base", pretrained=pretrained, **dict(model_args, **kwargs))
