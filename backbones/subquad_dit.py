"""DiT models registered with timm: ``dit_{s,b,l,xl}_{1,2,4,8}`` (DiT paper, Table 1 sizes).

``timm.create_model("dit_s_2", attn="loglinear")``; the default input is a 32x32x4 latent
(a 256x256 image through the SD VAE) with 1000 classes and learned sigma, as in the paper.
"""
from __future__ import annotations

import sys
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .dit import DiT

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


def _register(variant: str) -> None:
    size, patch = variant.split("_")[1], int(variant.split("_")[2])

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> DiT:
        kwargs.pop("pretrained_cfg", None)
        args = dict(patch_size=patch, **DIT_SIZES[size])
        args.update(kwargs)
        return build_model_with_cfg(DiT, variant, pretrained, kwargs_filter=("in_chans",), **args)

    entrypoint.__name__ = entrypoint.__qualname__ = variant
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"DiT-{size.upper()}/{patch} (Peebles & Xie, ICCV 2023)."
    setattr(sys.modules[__name__], variant, register_model(entrypoint))


for _variant in dit_model_names():
    _register(_variant)
