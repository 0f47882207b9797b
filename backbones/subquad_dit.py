"""DiT models registered with timm: ``dit_{s,b,l,xl}_{1,2,4,8}`` (DiT paper, Table 1 sizes).

``timm.create_model("dit_s_2", attn="loglinear")``; the default input is a 32x32x4 latent
(a 256x256 image through the SD VAE) with 1000 classes and learned sigma, as in the paper.
"""
from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs

from .dit import DiT
from .registry import register_variant

DIT_SIZES: dict[str, dict[str, int]] = {
    "s": dict(hidden_size=384, depth=12, num_heads=6),
    "b": dict(hidden_size=768, depth=12, num_heads=12),
    "l": dict(hidden_size=1024, depth=24, num_heads=16),
    "xl": dict(hidden_size=1152, depth=28, num_heads=16),
}
DIT_PATCHES = (1, 2, 4, 8)


def dit_model_names() -> list[str]:
    return [f"dit_{size}_{p}" for size in DIT_SIZES for p in DIT_PATCHES]


default_cfgs = generate_default_cfgs({
    name: {"url": "", "num_classes": 1000, "input_size": (4, 32, 32), "first_conv": "x_embedder.proj",
           "classifier": "final_layer.linear", "license": "apache-2.0"}
    for name in dit_model_names()})


def create_dit(variant: str, pretrained: bool = False, **kwargs: Any) -> DiT:
    """Build ``dit_{size}_{patch}``; user keywords override the size's."""
    _, size, patch = variant.split("_")
    kwargs.pop("pretrained_cfg", None)
    args = dict(patch_size=int(patch), **DIT_SIZES[size])
    args.update(kwargs)
    return build_model_with_cfg(DiT, variant, pretrained, kwargs_filter=("in_chans",), **args)


for _variant in dit_model_names():
    register_variant(__name__, _variant, create_dit,
                     f"DiT-{_variant.split('_')[1].upper()}/{_variant.split('_')[2]} (Peebles & Xie, ICCV 2023).")
