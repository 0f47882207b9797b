"""Isotropic ViT / DeiT (Dosovitskiy et al., 2021; Touvron et al., 2021) with any attention family.

timm's ``VisionTransformer`` with one change: every block receives the token grid explicitly,
``blk(x, grid, num_prefix)``. Block attribute names are timm's, so DeiT/timm checkpoints (and the
official Agent-DeiT ones) load with timm's ``checkpoint_filter_fn``.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch
from timm.layers import DropPath, LayerScale, Mlp
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..attention import build
from .attention_schedule import AttentionSchedule, AttnEntry
from .fused_norm import add_norm, residual_branch
from .patchify import PatchifyConv2d


class GridBlock(nn.Module):
    """Pre-norm transformer block (timm's ``Block`` layout) whose attention gets the grid."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = False,
                 qk_norm: bool = False, scale_attn_norm: bool = False, scale_mlp_norm: bool = False,
                 proj_bias: bool = True, proj_drop: float = 0., attn_drop: float = 0.,
                 init_values: float | None = None, drop_path: float = 0., act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm, mlp_layer=Mlp, attn_layer=None, depth: int = 0,
                 device=None, dtype=None, *, attn_schedule: AttentionSchedule) -> None:
        super().__init__()
        name, options = attn_schedule[depth]
        self.norm1 = norm_layer(dim)
        self.attn = build(name, dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
                          scale_norm=scale_attn_norm, proj_bias=proj_bias, attn_drop=attn_drop,
                          proj_drop=proj_drop, norm_layer=norm_layer, **options)
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                             norm_layer=norm_layer if scale_mlp_norm else None, bias=proj_bias, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
        x, h = add_norm(self.norm1, x)
        x, h = add_norm(self.norm2, x, *residual_branch(self.ls1, self.drop_path1, self.attn(h, grid, num_prefix)))
        return x + self.drop_path2(self.ls2(self.mlp(h)))


class GridVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` whose blocks get the patch grid; ``attn`` picks the attention.

    ``attn``: a name (or ``(name, options)``) for every block, or one per block; ``attn_kwargs``:
    ``{name: options}`` (``AttentionSchedule``). Everything else is timm's (``dynamic_img_size=True``
    lets the grid follow the input).
    """

    def __init__(self, *, attn: AttnEntry | Sequence[AttnEntry] = "softmax",
                 attn_kwargs: dict[str, dict[str, Any]] | None = None, depth: int = 12, **kwargs) -> None:
        if kwargs.get("patch_drop_rate"):
            raise ValueError("patch_drop_rate drops grid tokens, which breaks the grid the attention needs")
        self.attn_schedule = AttentionSchedule(attn, attn_kwargs, depth)
        super().__init__(depth=depth, block_fn=partial(GridBlock, attn_schedule=self.attn_schedule), **kwargs)
        self.patch_embed.proj = PatchifyConv2d.from_conv(self.patch_embed.proj)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        grid = tuple(self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:])))
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        return x, grid

    def _run_block(self, blk: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(blk, x, grid, self.num_prefix_tokens, use_reentrant=False)
        return blk(x, grid, self.num_prefix_tokens)

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("grid attention takes no attn_mask / is_causal: its pattern comes from the grid")
        x, grid = self._tokens(x)
        for blk in self.blocks:
            x = self._run_block(blk, x, grid)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, output_dict: bool = False,
                              attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        """timm's ``forward_intermediates`` contract (NCHW or NLC features of chosen blocks)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if attn_mask is not None or is_causal:
            raise ValueError("grid attention takes no attn_mask / is_causal: its pattern comes from the grid")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        b = x.shape[0]
        x, grid = self._tokens(x)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = self._run_block(blk, x, grid)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        p = self.num_prefix_tokens
        prefix = [y[:, :p] for y in intermediates] if p else None
        intermediates = [y[:, p:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(b, *grid, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            out = {"image_intermediates": intermediates}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and prefix is not None:
            intermediates = list(zip(intermediates, prefix))
        return intermediates if intermediates_only else (self.norm(x), intermediates)
