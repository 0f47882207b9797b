"""CSWin-layout models (Dong et al., "CSWin Transformer: A General Vision Transformer Backbone with
Cross-Shaped Windows", CVPR 2022: a 7x7/4 convolutional stem padded by 2, 3x3/2 conv merging with
LayerNorm between stages, cross-shaped window attention with LePE, MLP ratio 4): the efficient-attention
papers' Agent-CSWin (Han et al., "Agent Attention", ECCV 2024) and FLatten-CSWin (Han et al., "FLatten
Transformer", ICCV 2023) with their official configs (``agent_cswin.py`` / ``flatten_cswin.py`` and
``cfgs/*_cswin_*.yaml``).

Both papers keep CSWin's layout and put their attention in every block of stages 1-2, over the whole
stage map (official ``ATTN_TYPE`` AABB / LLSS with ``CSWIN_LA_SPLIT_SIZE`` 56-28-14-7 at 224x224,
96-48-24-12 at 384x384: one window the size of the map); stages 3-4 keep CSWin's cross-shaped windows
(``cross_window``), stripes of 7 (12 at 384x384) in stage 3 and the whole map in stage 4:
- Agent-CSWin: 9 / 16 agents in stages 1 / 2, the block's 3x3 LePE conv as the agent DWC;
- FLatten-CSWin: focusing factor 3, a 5x5 DWC shared by the heads, a learnable positional encoding on
  K over the stage map, and CSWin's 3x3 LePE conv over all channels besides (``lepe=True``).
Depths: T 2-4-18-1 for both papers; S 3-6-29-2 (Agent) or CSWin-S's 2-4-32-2 (FLatten); B 3-6-29-2.
Widths 64 (T, S) or 96 (B), doubling per stage; heads 2-4-8-16 (T, S) or 4-8-16-32 (B). Global
attention stays global at other input sizes (its maps are resized); the stripes keep their widths.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model

from .hierarchical import (AGENT_PAPER, FLATTEN_PAPER, HierarchicalTransformer, check_converted, create_hierarchical,
                           hierarchical_cfg, rename_keys)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor],
                         model: HierarchicalTransformer) -> dict[str, torch.Tensor]:
    """Official CSWin / Agent-CSWin / FLatten-CSWin state dict (CSWin's layout) to ours.

    ``stage1_conv_embed.{0,2}`` -> ``patch_embed.{proj,norm}``; ``merge{i}.conv`` / ``.norm`` -> stage i's
    ``downsample.proj`` / ``.norm``; ``stage{i}.{j}`` -> ``stages.{i-1}.blocks.{j}``, whose ``qkv``, ``proj``
    and ``attns.0.*`` go to ``attn``; the two branches' LePE convs ``attns.{0,1}.get_v`` are concatenated
    into ``attn.lepe`` (an agent block's LePE is its ``attn.dwc``); ``head`` -> ``head.fc``. Our own state
    dicts pass through.
    """
    state_dict = dict(state_dict.get("model", state_dict))
    if not any(k.startswith("stages.") for k in state_dict):
        for key in [k for k in state_dict if ".attns.1.get_v." in k]:
            first = key.replace(".attns.1.", ".attns.0.")
            state_dict[first] = torch.cat([state_dict[first], state_dict.pop(key)])
        agent_blocks = {k.split(".attns.")[0] for k in state_dict if k.endswith(".attns.0.an_bias")}

        def block(m: re.Match) -> str:
            return f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}."

        def lepe(m: re.Match) -> str:
            kind = "dwc" if f"stage{m.group(1)}.{m.group(2)}" in agent_blocks else "lepe"
            return f"{block(m)}attn.{kind}."

        state_dict = rename_keys(state_dict, [
            (r"^stage1_conv_embed\.0\.", "patch_embed.proj."),
            (r"^stage1_conv_embed\.2\.", "patch_embed.norm."),
            (r"^merge(\d)\.conv\.", r"stages.\1.downsample.proj."),
            (r"^merge(\d)\.norm\.", r"stages.\1.downsample.norm."),
            (r"^stage(\d)\.(\d+)\.attns\.0\.get_v\.", lepe),
            (r"^stage(\d)\.(\d+)\.(qkv|proj)\.", lambda m: f"{block(m)}attn.{m.group(3)}."),
            (r"^stage(\d)\.(\d+)\.attns\.0\.", lambda m: f"{block(m)}attn."),
            (r"^stage(\d)\.(\d+)\.", block),
            (r"^head\.", "head.fc."),
        ])
    return check_converted(state_dict, model, "the official CSWin layout")


def _create_cswin(variant: str, paper_attn: str, pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """``paper_attn`` in every block of stages 1-2 and CSWin's cross-shaped windows in stages 3-4, also
    when ``depths`` is changed (unless ``attn`` is given)."""
    kwargs.setdefault("attn", [paper_attn if stage < 2 else "cross_window"
                               for stage, depth in enumerate(kwargs["depths"]) for _ in range(depth)])
    kwargs = {**dict(stem="cswin", downsample="overlap", mlp_ratios=4.), **kwargs}
    return create_hierarchical(variant, pretrained, checkpoint_filter_fn, **kwargs)


# the fine-tuned 384x384 configs: evaluated on the whole image (official ``crop_pct=1.0``)
HIGH_RES = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
AGENT_KWARGS = {"agent": dict(dwc_kernel_size=3)}
FLATTEN_KWARGS = {"flatten": dict(focusing_factor=3, kernel_size=5, lepe=True)}
TINY = dict(embed_dims=(64, 128, 256, 512), depths=(2, 4, 18, 1), num_heads=(2, 4, 8, 16))
BASE = dict(embed_dims=(96, 192, 384, 768), depths=(3, 6, 29, 2), num_heads=(4, 8, 16, 32))

default_cfgs = generate_default_cfgs({
    "agent_cswin_tiny_224": hierarchical_cfg(license="mit", **AGENT_PAPER),
    "agent_cswin_small_224": hierarchical_cfg(license="mit", **AGENT_PAPER),
    "agent_cswin_base_224": hierarchical_cfg(license="mit", **AGENT_PAPER),
    "agent_cswin_base_384": hierarchical_cfg(license="mit", **HIGH_RES, **AGENT_PAPER),
    "flatten_cswin_tiny_224": hierarchical_cfg(license="mit", **FLATTEN_PAPER),
    "flatten_cswin_small_224": hierarchical_cfg(license="mit", **FLATTEN_PAPER),
    "flatten_cswin_base_224": hierarchical_cfg(license="mit", **FLATTEN_PAPER),
    "flatten_cswin_base_384": hierarchical_cfg(license="mit", **HIGH_RES, **FLATTEN_PAPER),
})


@register_model
def agent_cswin_tiny_224(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """Agent-CSWin-T (AABB) at 224x224."""
    model_args = dict(**TINY, drop_path_rate=0.2, attn_kwargs=AGENT_KWARGS)
    return _create_cswin("agent_cswin_tiny_224", "agent", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_cswin_small_224(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """Agent-CSWin-S (AABB) at 224x224."""
    model_args = dict(TINY, depths=(3, 6, 29, 2), drop_path_rate=0.4, attn_kwargs=AGENT_KWARGS)
    return _create_cswin("agent_cswin_small_224", "agent", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_cswin_base_224(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """Agent-CSWin-B (AABB) at 224x224."""
    model_args = dict(**BASE, drop_path_rate=0.5, attn_kwargs=AGENT_KWARGS)
    return _create_cswin("agent_cswin_base_224", "agent", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_cswin_base_384(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """Agent-CSWin-B (AABB) at 384x384: agent attention over the whole stage map, stripes of 12."""
    model_args = dict(img_size=384, **BASE, drop_path_rate=0.7, attn_kwargs=AGENT_KWARGS)
    return _create_cswin("agent_cswin_base_384", "agent", pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_cswin_tiny_224(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """FLatten-CSWin-T (LLSS) at 224x224."""
    model_args = dict(**TINY, drop_path_rate=0.2, attn_kwargs=FLATTEN_KWARGS)
    return _create_cswin("flatten_cswin_tiny_224", "flatten", pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_cswin_small_224(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """FLatten-CSWin-S (LLSS) at 224x224."""
    model_args = dict(TINY, depths=(2, 4, 32, 2), drop_path_rate=0.4, attn_kwargs=FLATTEN_KWARGS)
    return _create_cswin("flatten_cswin_small_224", "flatten", pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_cswin_base_224(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """FLatten-CSWin-B (LLSS) at 224x224."""
    model_args = dict(**BASE, drop_path_rate=0.5, attn_kwargs=FLATTEN_KWARGS)
    return _create_cswin("flatten_cswin_base_224", "flatten", pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_cswin_base_384(pretrained: bool = False, **kwargs: Any) -> HierarchicalTransformer:
    """FLatten-CSWin-B (LLSS) at 384x384: focused linear attention over the whole stage map, stripes of 12."""
    model_args = dict(img_size=384, **BASE, drop_path_rate=0.7, attn_kwargs=FLATTEN_KWARGS)
    return _create_cswin("flatten_cswin_base_384", "flatten", pretrained, **dict(model_args, **kwargs))
