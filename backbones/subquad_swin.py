"""Swin-layout models of the efficient-attention papers: Agent-Swin (Han et al., "Agent Attention",
ECCV 2024) and FLatten-Swin (Han et al., "FLatten Transformer", ICCV 2023), with their official configs.

Both papers keep Swin-T/S/B (Liu et al., ICCV 2021) and swap the attention of chosen stages for their
own with a window of 56, i.e. over the whole stage map at 224x224 (official ``cfgs/*_swin_*.yaml``):
- Agent-Swin ("A" = agent attention, "B" = Swin's 7x7 shifted windows): T ``AAAB``, S ``AABB``,
  B ``AAMB2`` (stage 3: 2 agent blocks, then windows); 9/16/49/49 agents per stage, 3x3 DWC;
- FLatten-Swin ("L" = focused linear attention, "S" = Swin windows): ``LLSS`` for T/S/B; focusing
  factor 3, 5x5 DWC, a learnable positional encoding on K over the stage map.
Global attention stays global at other input sizes (the maps are resized).
"""
from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs

from .hierarchical import HierarchicalTransformer, check_converted, create_hierarchical, hierarchical_cfg, rename_keys
from .registry import register_variant

SWIN_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "small": dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "base": dict(embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
}

# Per stage, how many leading blocks use the paper's attention (the rest use Swin's windows).
PAPER_BLOCKS: dict[str, dict[str, tuple[int, ...]]] = {
    "agent": {"tiny": (2, 2, 6, 0), "small": (2, 2, 0, 0), "base": (2, 2, 2, 0)},
    "flatten": {size: (2, 2, 0, 0) for size in SWIN_SIZES},
}
FAMILY: dict[str, tuple[str, dict[str, Any]]] = {
    "agent": ("agent", dict(dwc_kernel_size=3)),
    "flatten": ("focused_linear", dict(focusing_factor=3, kernel_size=5)),
}
PAPERS = {"agent": ("Agent Attention", "arXiv:2312.08874", "https://github.com/LeapLabTHU/Agent-Attention"),
          "flatten": ("FLatten Transformer", "arXiv:2308.00442", "https://github.com/LeapLabTHU/FLatten-Transformer")}


def swin_attention(family: str, size: str, depths: tuple[int, ...]) -> dict[str, Any]:
    """``attn`` (one entry per block) and ``attn_kwargs`` of ``{family}_swin_{size}`` (``depths`` may be changed)."""
    name, options = FAMILY[family]
    attn = [name if i < n else "window" for n, depth in zip(PAPER_BLOCKS[family][size], depths) for i in range(depth)]
    return dict(attn=attn, attn_kwargs={name: options, "window": dict(window_size=7)})


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor],
                         model: HierarchicalTransformer) -> dict[str, torch.Tensor]:
    """Official Agent-Swin / FLatten-Swin state dict (Swin's layout) to ours.

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


def _model_names() -> list[str]:
    return [f"{family}_swin_{size}_patch4_window7_224" for family in PAPER_BLOCKS for size in SWIN_SIZES]


default_cfgs = generate_default_cfgs({
    name: hierarchical_cfg(license="mit", paper_name=PAPERS[name.split("_")[0]][0],
                           paper_ids=PAPERS[name.split("_")[0]][1], origin_url=PAPERS[name.split("_")[0]][2])
    for name in _model_names()})


def create_swin(variant: str, pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """Build ``{agent,flatten}_swin_{size}_patch4_window7_224``; user keywords override (changed ``depths``
    keep the paper's attention in the leading blocks of each stage)."""
    family, _, size = variant.split("_")[:3]
    depths = kwargs.get("depths", SWIN_SIZES[size]["depths"])
    args = dict(stem="patch", downsample="merge", mlp_ratios=4., **SWIN_SIZES[size],
                **swin_attention(family, size, depths))
    return create_hierarchical(variant, pretrained, checkpoint_filter_fn, **dict(args, **kwargs))


for _variant in _model_names():
    _family, _, _size = _variant.split("_")[:3]
    register_variant(__name__, _variant, create_swin,
                     f"{PAPERS[_family][0]}: {_family.capitalize()}-Swin-{_size[0].upper()} at 224x224.")
