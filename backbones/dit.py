"""DiT models registered with timm: ``dit_{s,b,l,xl}_{1,2,4,8}`` (Peebles & Xie, "Scalable Diffusion
Models with Transformers", ICCV 2023, Table 1 sizes).

``timm.create_model("dit_s_2", attn="loglinear")``; the default input is a 32x32x4 latent (a 256x256
image through the SD VAE) with 1000 classes and learned sigma, as in the paper. The model class,
``DiT``, is in ``diffusion_transformer``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from timm.models import generate_default_cfgs, model_entrypoint, register_model

from .pretrained import build_with_pretrained

if TYPE_CHECKING:
    from .diffusion_transformer import DiT


def _create_dit(variant: str, pretrained: bool = False, **kwargs: Any) -> DiT:
    from .diffusion_transformer import DiT     # imports diffusers: only when a DiT is built
    kwargs.pop("pretrained_cfg", None)
    return build_with_pretrained(DiT, variant, pretrained, kwargs_filter=("in_chans",), **kwargs)


def create_dit(variant: str, pretrained: bool = False, **kwargs: Any) -> DiT:
    """The DiT named ``variant`` (``dit_{s,b,l,xl}_{1,2,4,8}``) with ``kwargs`` over its configuration."""
    if variant not in default_cfgs:
        raise ValueError(f"unknown DiT model {variant!r}; valid: {', '.join(default_cfgs)}")
    return model_entrypoint(variant)(pretrained=pretrained, **kwargs)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {"url": "", "num_classes": 1000, "input_size": (4, 32, 32), "first_conv": "x_embedder.proj",
            "classifier": "final_layer.linear", "license": "apache-2.0", **kwargs}


default_cfgs = generate_default_cfgs({
    "dit_s_1": _cfg(),
    "dit_s_2": _cfg(),
    "dit_s_4": _cfg(),
    "dit_s_8": _cfg(),
    "dit_b_1": _cfg(),
    "dit_b_2": _cfg(),
    "dit_b_4": _cfg(),
    "dit_b_8": _cfg(),
    "dit_l_1": _cfg(),
    "dit_l_2": _cfg(),
    "dit_l_4": _cfg(),
    "dit_l_8": _cfg(),
    "dit_xl_1": _cfg(),
    "dit_xl_2": _cfg(),
    "dit_xl_4": _cfg(),
    "dit_xl_8": _cfg(),
})


@register_model
def dit_s_1(pretrained: bool = False, **kwargs: Any) -> DiT:
    """DiT-S/1."""
    model_args = dict(patch_size=1, hidden_size=384, depth=12, num_heads=6)
    return _create_dit("dit_s_1", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dit_s_2(pretrained: bool = False, **kwargs: Any) -> DiT:
    """DiT-S/2."""
    model_args = dict(patch_size=2, hidden_size=384, depth=12, num_heads=6)
    return _create_dit("dit_s_2", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dit_s_4(pretrained: bool = False, **kwargs: Any) -> DiT:
    """DiT-S/4."""
    model_args = dict(patch_size=4, hidden_size=384, depth=12, num_heads=6)
    return _create_dit("dit_s_4", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dit_s_8(pretrained: bool = False, **kwargs: Any) -> DiT:
    """DiT-S/8."""
    model_args = dict(patch_size=8, hidden_size=384, depth=12, num_heads=6)
    return _create_dit("dit_s_8", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dit_b_1(pretrained: bool = False, **kwargs: Any) -> DiT:
    """DiT-B/1."""
    model_args = dict(patch_size=1, hidden_size=768, depth=12, num_heads=12)
    return _create_dit("dit_b_1", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dit_b_2(pretrained: bool = False, **kwargs: Any) -> DiT:
    """DiT-B/2."""
    model_args = dict(patch_size=2, hidden_size=768, depth=12, num_heads=12)
    return _create_dit("dit_b_2", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dit_b_4(pretrained: bool = False, **kwargs: Any) -> DiT:
    """DiT-B/4."""
    model_args = dict(patch_size=4, hidden_size=768, depth=12, num_heads=12)
    return _create_dit("dit_b_4", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dit_b_8(pretrained: bool = False, **kwargs: Any) -> DiT:
    """DiT-B/8."""
    model_args = dict(patch_size=8, hidden_size=768, depth=12, num_heads=12)
    return _create_dit("dit_b_8", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dit_l_1(pretrained: bool = False, **kwargs: Any) -> DiT:
    """DiT-L/1."""
    model_args = dict(patch_size=1, hidden_size=1024, depth=24, num_heads=16)
    return _create_dit("dit_l_1", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dit_l_2(pretrained: bool = False, **kwargs: Any) -> DiT:
    """DiT-L/2."""
    model_args = dict(patch_size=2, hidden_size=1024, depth=24, num_heads=16)
    return _create_dit("dit_l_2", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dit_l_4(pretrained: bool = False, **kwargs: Any) -> DiT:
    """DiT-L/4."""
    model_args = dict(patch_size=4, hidden_size=1024, depth=24, num_heads=16)
    return _create_dit("dit_l_4", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dit_l_8(pretrained: bool = False, **kwargs: Any) -> DiT:
    """DiT-L/8."""
    model_args = dict(patch_size=8, hidden_size=1024, depth=24, num_heads=16)
    return _create_dit("dit_l_8", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dit_xl_1(pretrained: bool = False, **kwargs: Any) -> DiT:
    """DiT-XL/1."""
    model_args = dict(patch_size=1, hidden_size=1152, depth=28, num_heads=16)
    return _create_dit("dit_xl_1", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dit_xl_2(pretrained: bool = False, **kwargs: Any) -> DiT:
    """DiT-XL/2."""
    model_args = dict(patch_size=2, hidden_size=1152, depth=28, num_heads=16)
    return _create_dit("dit_xl_2", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dit_xl_4(pretrained: bool = False, **kwargs: Any) -> DiT:
    """DiT-XL/4."""
    model_args = dict(patch_size=4, hidden_size=1152, depth=28, num_heads=16)
    return _create_dit("dit_xl_4", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def dit_xl_8(pretrained: bool = False, **kwargs: Any) -> DiT:
    """DiT-XL/8."""
    model_args = dict(patch_size=8, hidden_size=1152, depth=28, num_heads=16)
    return _create_dit("dit_xl_8", pretrained=pretrained, **dict(model_args, **kwargs))
