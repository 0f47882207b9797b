"""subquad.backbones: timm-registered models (importing this registers them).

``DiT`` loads on first use: it is a diffusers model, and importing diffusers is slow.
"""
from __future__ import annotations

import importlib
from typing import Any

from . import cswin, deit, dit, mavit, nat, pvt, pvt_v2, swin
from .attention_schedule import AttentionSchedule
from .hierarchical import HierarchicalTransformer
from .vit import GridBlock, GridVisionTransformer

__all__ = ["AttentionSchedule", "DiT", "GridBlock", "GridVisionTransformer", "HierarchicalTransformer",
           "cswin", "deit", "dit", "mavit", "nat", "pvt", "pvt_v2", "swin"]


def __getattr__(name: str) -> Any:
    if name == "DiT":      # imports diffusers: only on first use
        return importlib.import_module(f"{__name__}.diffusion_transformer").DiT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
