"""Named DeiT models with efficient attention: ``{family}_deit_{tiny,small,base}_patch16_224``.

Each family sets which blocks use its attention and with which options; where the papers give a
DeiT configuration, it is theirs:
- Agent-DeiT (Agent Attention, official ``agent_deit.py`` and cfgs): every block agent attention with
  49 agents for tiny/small; the first 4 blocks with 81 agents for base (softmax after).
- FLatten-DeiT (FLatten Transformer): every block, focusing factor 3, 5x5 DWC, positional
  encoding on K.
- MALA-DeiT (MALA): every block, ELU+1 map with 2D RoPE and a 5x5 LePE.
- NAT-DeiT: every block a 7x7 neighbourhood with NAT's relative position bias.
- Radial-DeiT: the 2D energy-decay mask on 2x2 tiles (the 14x14 grid has too few 8x8 tiles).
- LLSA-DeiT: 4x4-token blocks, top-4 selection (one level at 14x14).
Densities at 224px: NAT 0.25, radial 0.30, LLSA 0.33 of the dense attention's pairs.
"""
from __future__ import annotations

from typing import Any, Callable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.vision_transformer import checkpoint_filter_fn

from .registry import register_variant
from .vit import GridVisionTransformer

DEIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}


def _all(name: str, **options: Any) -> Callable[[str], dict[str, Any]]:
    return lambda size: dict(attn=name, attn_kwargs={name: options} if options else None)


def _agent(size: str) -> dict[str, Any]:
    if size == "base":
        return dict(attn=["agent"] * 4 + ["softmax"] * 8, attn_kwargs={"agent": dict(num_agents=81)})
    return dict(attn="agent", attn_kwargs={"agent": dict(num_agents=49)})


# model-name prefix -> (attention family, size -> GridVisionTransformer attention arguments)
DEIT_FAMILIES: dict[str, tuple[str, Callable[[str], dict[str, Any]]]] = {
    "softmax": ("softmax", _all("softmax")),
    "agent": ("agent", _agent),
    "flatten": ("focused_linear", _all("focused_linear", focusing_factor=3, kernel_size=5, pos_grid=(14, 14))),
    "mala": ("mala", _all("mala", rope=True, lepe=True)),
    "nat": ("neighborhood", _all("neighborhood", kernel_size=7, dilation=1, rpb=True)),
    "radial": ("radial", _all("radial", tile=(2, 2))),
    "llsa": ("loglinear", _all("loglinear", block_size=16, top_k=4)),
}


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0", **kwargs,
    }


def deit_model_names() -> list[str]:
    return [f"{family}_deit_{size}_patch16_224" for family in DEIT_FAMILIES for size in DEIT_SIZES]


default_cfgs = generate_default_cfgs({name: _cfg() for name in deit_model_names()})


def create_deit(variant: str, pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """Build a named model; user keywords (``attn``, ``attn_kwargs``, ``num_classes``, ...) override."""
    family, size = variant.split("_deit_")[0], variant.split("_deit_")[1].split("_")[0]
    args = dict(patch_size=16, **DEIT_SIZES[size], **DEIT_FAMILIES[family][1](size))
    args.update(kwargs)
    out_indices = args.pop("out_indices", 3)
    return build_model_with_cfg(
        GridVisionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **args)


for _variant in deit_model_names():
    register_variant(__name__, _variant, create_deit, f"{_variant}: DeiT-{_variant.split('_')[2].capitalize()} with "
                                                      f"{DEIT_FAMILIES[_variant.split('_deit_')[0]][0]} attention.")
