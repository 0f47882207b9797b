"""Named DeiT models with efficient attention: ``{family}_deit_{tiny,small,base}_patch16_224``, the
family being a name or alias of its record (``subquad.kernels.family``).

Each family sets which blocks use its attention and with which options; where the papers give a
DeiT configuration, it is theirs:
- Agent-DeiT (Agent Attention, official ``agent_deit.py`` and cfgs): every block agent attention with
  49 agents for tiny/small; the first 4 blocks with 81 agents for base (softmax after); small also at
  448x448 (``agent_deit_small_patch16_448``).
- FLatten-DeiT (FLatten Transformer): every block, focusing factor 3, 5x5 DWC, positional
  encoding on K.
- MALA-DeiT (MALA): every block, ELU+1 map with 2D RoPE and a 5x5 LePE.
- NAT-DeiT: every block a 7x7 neighbourhood with NAT's relative position bias.
- Radial-DeiT: the 2D energy-decay mask on 8x8-token tiles.
- LLSA-DeiT: 8x8-token blocks, top-4 selection.
Radial and LLSA tiles are the block-sparse core's (64 tokens): at 224px the 14x14 grid has 2x2 tiles, every
pair is kept and the blocks attend densely (exactly the dense model); the sparsity starts at larger inputs
(radial keeps 0.25 of the pairs at 1024px, 0.09 at 2048px). NAT keeps 0.25 of the pairs at 224px.
"""
from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import checkpoint_filter_fn

from ..kernels import family
from .pretrained import build_with_pretrained
from .vit import GridVisionTransformer


def _create_deit(variant: str, pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """``attn`` defaults to the family that the name's prefix names (``flatten_deit_*``: focused_linear)."""
    kwargs.setdefault("attn", family(variant.split("_deit_")[0]).name)
    out_indices = kwargs.pop("out_indices", 3)
    return build_with_pretrained(
        GridVisionTransformer, variant, pretrained, checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "softmax_deit_tiny_patch16_224": _cfg(),
    "softmax_deit_small_patch16_224": _cfg(),
    "softmax_deit_base_patch16_224": _cfg(),
    "agent_deit_tiny_patch16_224": _cfg(),
    "agent_deit_small_patch16_224": _cfg(),
    "agent_deit_base_patch16_224": _cfg(),
    "flatten_deit_tiny_patch16_224": _cfg(),
    "flatten_deit_small_patch16_224": _cfg(),
    "flatten_deit_base_patch16_224": _cfg(),
    "mala_deit_tiny_patch16_224": _cfg(),
    "mala_deit_small_patch16_224": _cfg(),
    "mala_deit_base_patch16_224": _cfg(),
    "nat_deit_tiny_patch16_224": _cfg(),
    "nat_deit_small_patch16_224": _cfg(),
    "nat_deit_base_patch16_224": _cfg(),
    "radial_deit_tiny_patch16_224": _cfg(),
    "radial_deit_small_patch16_224": _cfg(),
    "radial_deit_base_patch16_224": _cfg(),
    "llsa_deit_tiny_patch16_224": _cfg(),
    "llsa_deit_small_patch16_224": _cfg(),
    "llsa_deit_base_patch16_224": _cfg(),
    "agent_deit_small_patch16_448": _cfg(input_size=(3, 448, 448), crop_pct=1.0),
})


@register_model
def softmax_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """DeiT-T: dense softmax attention (the baseline)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_deit("softmax_deit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def softmax_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """DeiT-S: dense softmax attention (the baseline)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_deit("softmax_deit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def softmax_deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """DeiT-B: dense softmax attention (the baseline)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_deit("softmax_deit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """Agent-DeiT-T: agent attention with 49 agents in every block."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, attn_kwargs={"agent": dict(num_agents=49)})
    return _create_deit("agent_deit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """Agent-DeiT-S: agent attention with 49 agents in every block."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, attn_kwargs={"agent": dict(num_agents=49)})
    return _create_deit("agent_deit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """Agent-DeiT-B: agent attention with 81 agents in the first 4 blocks, softmax after."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                      attn=["agent"] * 4 + ["softmax"] * 8, attn_kwargs={"agent": dict(num_agents=81)})
    return _create_deit("agent_deit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """FLatten-DeiT-T: focused linear attention in every block."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                      attn_kwargs={"flatten": dict(focusing_factor=3, kernel_size=5, pos_grid=(14, 14))})
    return _create_deit("flatten_deit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """FLatten-DeiT-S: focused linear attention in every block."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                      attn_kwargs={"flatten": dict(focusing_factor=3, kernel_size=5, pos_grid=(14, 14))})
    return _create_deit("flatten_deit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """FLatten-DeiT-B: focused linear attention in every block."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                      attn_kwargs={"flatten": dict(focusing_factor=3, kernel_size=5, pos_grid=(14, 14))})
    return _create_deit("flatten_deit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mala_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """MALA-DeiT-T: magnitude-aware linear attention in every block."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                      attn_kwargs={"mala": dict(rope=True, lepe=True)})
    return _create_deit("mala_deit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mala_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """MALA-DeiT-S: magnitude-aware linear attention in every block."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                      attn_kwargs={"mala": dict(rope=True, lepe=True)})
    return _create_deit("mala_deit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mala_deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """MALA-DeiT-B: magnitude-aware linear attention in every block."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                      attn_kwargs={"mala": dict(rope=True, lepe=True)})
    return _create_deit("mala_deit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """NAT-DeiT-T: 7x7 neighborhood attention in every block."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                      attn_kwargs={"nat": dict(kernel_size=7, dilation=1, rpb=True)})
    return _create_deit("nat_deit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """NAT-DeiT-S: 7x7 neighborhood attention in every block."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                      attn_kwargs={"nat": dict(kernel_size=7, dilation=1, rpb=True)})
    return _create_deit("nat_deit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def nat_deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """NAT-DeiT-B: 7x7 neighborhood attention in every block."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                      attn_kwargs={"nat": dict(kernel_size=7, dilation=1, rpb=True)})
    return _create_deit("nat_deit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def radial_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """Radial-DeiT-T: radial attention on 8x8-token tiles in every block."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                      attn_kwargs={"radial": dict(tile=(8, 8))})
    return _create_deit("radial_deit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def radial_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """Radial-DeiT-S: radial attention on 8x8-token tiles in every block."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                      attn_kwargs={"radial": dict(tile=(8, 8))})
    return _create_deit("radial_deit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def radial_deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """Radial-DeiT-B: radial attention on 8x8-token tiles in every block."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                      attn_kwargs={"radial": dict(tile=(8, 8))})
    return _create_deit("radial_deit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def llsa_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """LLSA-DeiT-T: log-linear sparse attention (8x8-token blocks, top 4) in every block."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                      attn_kwargs={"llsa": dict(block_size=64, top_k=4)})
    return _create_deit("llsa_deit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def llsa_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """LLSA-DeiT-S: log-linear sparse attention (8x8-token blocks, top 4) in every block."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                      attn_kwargs={"llsa": dict(block_size=64, top_k=4)})
    return _create_deit("llsa_deit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def llsa_deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """LLSA-DeiT-B: log-linear sparse attention (8x8-token blocks, top 4) in every block."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                      attn_kwargs={"llsa": dict(block_size=64, top_k=4)})
    return _create_deit("llsa_deit_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_small_patch16_448(pretrained: bool = False, **kwargs: Any) -> GridVisionTransformer:
    """Agent-DeiT-S at 448x448: 49 agents in every block, the agent biases' row and column terms and the
    position embedding on the 28x28 grid (official ``cfgs/agent_deit_s_448.yaml``)."""
    model_args = dict(img_size=448, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                      attn_kwargs={"agent": dict(num_agents=49, bias_grid=(28, 28))})
    return _create_deit("agent_deit_small_patch16_448", pretrained=pretrained, **dict(model_args, **kwargs))
