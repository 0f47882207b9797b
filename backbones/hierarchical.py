"""A 4-stage hierarchical vision transformer with any attention per block.

One machinery for the papers' hierarchical models (each configured in its own model file):
Swin-style (Agent-Swin, FLatten-Swin: Liu et al., ICCV 2021), PVT-style (Agent-PVT, FLatten-PVT:
Wang et al., ICCV 2021), PVTv2-style (FLatten-PVTv2: Wang et al., CVMJ 2022), CSWin-style
(Agent-CSWin, FLatten-CSWin: Dong et al., CVPR 2022), NAT/DiNAT (Hassani et al., CVPR 2023 /
arXiv 2209.15001) and MALA's MAViT (Fan et al., ICCV 2025). A convolutional stem
takes the image to stride 4; stage i (downsampling by 2 first, for i > 0) runs pre-norm blocks on an
NHWC map of stride 4 * 2^i; every block's attention gets the grid explicitly, ``attn(x, grid=(H, W))``.
Differences between the families are options: the stem and downsampling convolutions, absolute
position embeddings (PVT), a convolutional position encoding before each block and a depthwise-conv
MLP (MAViT), PVTv2's overlapping patch embeddings, convolutional FFN and per-stage norms, layer
scale, the final norm and the head.

Attention per block: ``attn`` and ``attn_kwargs`` as in ``AttentionSchedule``, any name that
``subquad.attention.build`` takes (``window``: Swin's shifted windows; ``cross_window``: CSWin's
cross-shaped windows; ``softmax_rope``: MAViT's softmax blocks). Where a block sits sets some options
(``placement_options``).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, LayerScale, Mlp, calculate_drop_path_rates, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models.swin_transformer import PatchMerging
from torch import nn

from ..attention import build
from ..attention.grid_maps import depthwise_conv, resize_map
from .attention_schedule import AttentionSchedule, AttnEntry
from .fused_norm import add_norm, residual_branch
from .patchify import PatchifyConv2d
from .pretrained import build_with_pretrained, check_state_dict

NUM_STAGES = 4
STRIDE = 32                       # of the last stage: input sides must be multiples of it
AGENTS_PER_STAGE = (9, 16, 49, 49)  # Agent Attention's Swin/PVT configs ("9-16-49-49")


def placement_options(family: str, stage: int, index: int, grid: tuple[int, int]) -> dict[str, Any]:
    """Options that depend on where a block sits, with the papers' choices: 9/16/49/49 agents per stage,
    agent bias maps on the stage grid and no prefix-token biases (Agent Attention's Swin/PVT/CSWin),
    FLatten's positional encoding on the stage grid, Swin's shifted windows on every second block,
    CSWin's stripe widths 1, 2, half the stage-3 map (7 at 224x224, 12 at 384x384) and the whole map
    in stage 4. ``grid`` is the stage grid at the model's ``img_size``; the maps are resized when the
    input differs."""
    if family == "agent":
        return dict(num_agents=AGENTS_PER_STAGE[stage], bias_grid=grid, prefix_bias=False)
    if family == "focused_linear":
        return dict(pos_grid=grid)
    if family == "window":
        return dict(shift=index % 2 == 1)
    if family == "cross_window":
        return dict(stripe_width=(1, 2, max(1, min(grid) // 2), None)[stage])
    return {}


# --- building blocks ------------------------------------------------------------------------

class BatchNormNHWC(nn.BatchNorm2d):
    """BatchNorm2d on channels-last maps (B, H, W, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ConvEmbed(nn.Module):
    """Convolutions, then a norm on the channels: the stems and the convolutional downsamplers.

    Takes NCHW (the image) or, with ``channels_last_input``, NHWC; returns NHWC."""

    def __init__(self, proj: nn.Module, norm: nn.Module, channels_last_input: bool) -> None:
        super().__init__()
        self.proj, self.norm = proj, norm
        self.channels_last_input = channels_last_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last_input:
            x = x.permute(0, 3, 1, 2)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def _conv(in_dim: int, out_dim: int, kernel_size: int, stride: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_dim, out_dim, kernel_size, stride, padding=(kernel_size - stride + 1) // 2, bias=bias)


def make_stem(kind: str, in_chans: int, dim: int) -> nn.Module:
    """Image to a stride-4 NHWC map.

    ``patch``: a 4x4/4 conv + LayerNorm (Swin, PVT); ``overlap``: a 7x7/4 conv padded by 3 + LayerNorm
    (PVTv2's overlapping patch embedding); ``cswin``: a 7x7/4 conv padded by 2 + LayerNorm (CSWin's
    convolutional token embedding); ``conv``: two 3x3/2 convs + LayerNorm (NAT's tokenizer, no
    activation between); ``conv_bn``: MAViT's 3x3 convs of strides 2, 1, 1, 2, each with BatchNorm and all
    but the last with GELU."""
    if kind == "patch":
        proj = PatchifyConv2d.from_conv(_conv(in_chans, dim, 4, 4))
        return ConvEmbed(proj, nn.LayerNorm(dim), channels_last_input=False)
    if kind == "overlap":
        return ConvEmbed(nn.Conv2d(in_chans, dim, 7, 4, padding=3), nn.LayerNorm(dim), channels_last_input=False)
    if kind == "cswin":
        return ConvEmbed(nn.Conv2d(in_chans, dim, 7, 4, padding=2), nn.LayerNorm(dim), channels_last_input=False)
    if kind == "conv":
        proj = nn.Sequential(_conv(in_chans, dim // 2, 3, 2), _conv(dim // 2, dim, 3, 2))
        return ConvEmbed(proj, nn.LayerNorm(dim), channels_last_input=False)
    if kind == "conv_bn":
        layers, widths, strides = [], (in_chans, dim // 2, dim // 2, dim // 2, dim), (2, 1, 1, 2)
        for i, stride in enumerate(strides):
            layers += [_conv(widths[i], widths[i + 1], 3, stride), nn.BatchNorm2d(widths[i + 1]), nn.GELU()]
        return ConvEmbed(nn.Sequential(*layers[:-1]), nn.Identity(), channels_last_input=False)
    raise ValueError(f"unknown stem {kind!r}; valid: 'patch', 'overlap', 'cswin', 'conv', 'conv_bn'")


def make_downsample(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """Halve the NHWC map between stages.

    ``merge``: Swin's 2x2 patch merging (LayerNorm, linear); ``patch``: PVT's 2x2/2 conv + LayerNorm;
    ``overlap``: PVTv2's (and CSWin's) 3x3/2 conv with bias + LayerNorm; ``conv``: NAT's 3x3/2 conv
    without bias + LayerNorm; ``conv_bn``: MAViT's 3x3/2 conv + BatchNorm."""
    if kind == "merge":
        return PatchMerging(in_dim, out_dim)
    if kind == "patch":
        return ConvEmbed(_conv(in_dim, out_dim, 2, 2), nn.LayerNorm(out_dim), channels_last_input=True)
    if kind == "overlap":
        return ConvEmbed(_conv(in_dim, out_dim, 3, 2), nn.LayerNorm(out_dim), channels_last_input=True)
    if kind == "conv":
        return ConvEmbed(_conv(in_dim, out_dim, 3, 2, bias=False), nn.LayerNorm(out_dim), channels_last_input=True)
    if kind == "conv_bn":
        return ConvEmbed(_conv(in_dim, out_dim, 3, 2), BatchNormNHWC(out_dim), channels_last_input=True)
    raise ValueError(f"unknown downsample {kind!r}; valid: 'merge', 'patch', 'overlap', 'conv', 'conv_bn'")


class DwConvMlp(nn.Module):
    """MAViT's FFN on NHWC maps: fc1, GELU, a residual 3x3 depthwise conv of the hidden map, fc2."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: type[nn.Module] = nn.GELU,
                 drop: float = 0.) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.dwconv = depthwise_conv(hidden_features, 3)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        return self.drop(self.fc2(self.dwconv.forward_nhwc(x, residual=x)))


class ConvFfn(nn.Module):
    """PVTv2's convolutional FFN on NHWC maps: fc1, a 3x3 depthwise conv of the hidden map (not residual),
    GELU, fc2."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: type[nn.Module] = nn.GELU,
                 drop: float = 0.) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = depthwise_conv(hidden_features, 3)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dwconv.forward_nhwc(self.fc1(x))
        return self.drop(self.fc2(self.drop(self.act(x))))


MLPS = {"mlp": Mlp, "dwconv": DwConvMlp, "conv_ffn": ConvFfn}


class HierarchicalBlock(nn.Module):
    """Pre-norm transformer block on an NHWC map; its attention gets the grid.

    x = x + CPE(x) (optional 3x3 depthwise conv, MAViT); x = x + DropPath(LS(Attn(Norm(x))));
    x = x + DropPath(LS(MLP(Norm(x)))). LS is layer scale (NAT-S/B, DiNAT-B, MAViT) or identity. MLP:
    ``mlp`` (timm's), ``dwconv`` (MAViT's) or ``conv_ffn`` (PVTv2's)."""

    def __init__(self, dim: int, num_heads: int, attn: tuple[str, Mapping[str, Any]], mlp_ratio: float = 4.,
                 qkv_bias: bool = True, mlp: str = "mlp", cpe: bool = False, layer_scale: float | None = None,
                 drop_path: float = 0., proj_drop: float = 0., norm_eps: float = 1e-5) -> None:
        super().__init__()
        name, options = attn
        self.cpe = depthwise_conv(dim, 3) if cpe else None
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = build(name, dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop,
                                    **options)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        if mlp not in MLPS:
            raise ValueError(f"unknown mlp {mlp!r}; valid: {', '.join(repr(m) for m in MLPS)}")
        self.mlp = MLPS[mlp](dim, int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        if self.cpe is not None:
            x = self.cpe.forward_nhwc(x, residual=x)
        x, y = add_norm(self.norm1, x)
        y = self.attn(y.reshape(b, h * w, c), grid=(h, w)).reshape(b, h, w, c)
        x, y = add_norm(self.norm2, x, *residual_branch(self.ls1, self.drop_path1, y))
        return x + self.drop_path2(self.ls2(self.mlp(y)))


class HierarchicalStage(nn.Module):
    """Downsampling (identity in stage 0, after the stem), an optional absolute position embedding
    defined on ``pos_grid`` and resized to the map (PVT), the blocks, then an optional norm (PVTv2 norms
    every stage's output); NHWC in and out."""

    def __init__(self, downsample: nn.Module, blocks: Sequence[nn.Module], dim: int,
                 pos_grid: tuple[int, int] | None = None, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.downsample = downsample
        self.pos_grid = pos_grid
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid[0] * pos_grid[1], dim)) if pos_grid else None
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm if norm is not None else nn.Identity()
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.pos_embed is not None:
            x = x + resize_map(self.pos_embed.reshape(*self.pos_grid, -1), tuple(x.shape[1:3]))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self.norm(checkpoint_seq(self.blocks, x))
        return self.norm(self.blocks(x))


class ProjectionHead(nn.Module):
    """MAViT's classifier: per position a linear projection, BatchNorm and SiLU (swish), then global
    average pooling and the linear classifier. NHWC in."""

    def __init__(self, in_features: int, hidden_features: int, num_classes: int, drop_rate: float = 0.) -> None:
        super().__init__()
        self.num_features = hidden_features
        self.proj = nn.Linear(in_features, hidden_features)
        self.norm = BatchNormNHWC(hidden_features)
        self.act = nn.SiLU()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(hidden_features, num_classes) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int, pool_type: str | None = None) -> None:
        if pool_type not in (None, "avg"):
            raise ValueError(f"this head pools by averaging only; got global_pool={pool_type!r}")
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.act(self.norm(self.proj(x))).mean(dim=(1, 2)))
        return x if pre_logits else self.fc(x)


def _per_stage(value: Any, name: str) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * NUM_STAGES
    if len(values) != NUM_STAGES:
        raise ValueError(f"{name} needs one value per stage ({NUM_STAGES}), got {values}")
    return values


class HierarchicalTransformer(nn.Module):
    """4-stage hierarchical transformer (module docstring): timm's model API (``forward_features``,
    ``forward_head``, ``forward_intermediates``, ``feature_info``, grad checkpointing, classifier reset).

    Input height and width must be multiples of 32. ``img_size`` fixes the reference grids of the
    learnable maps (agent biases, FLatten's and PVT's position embeddings), resized at other sizes.
    ``stage_norm``: a LayerNorm at the end of every stage (PVTv2; its stage outputs are the features).
    """

    def __init__(self, *, img_size: int | tuple[int, int] = 224, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", embed_dims: Sequence[int] = (96, 192, 384, 768),
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 mlp_ratios: float | Sequence[float] = 4., attn: AttnEntry | Sequence[AttnEntry] = "softmax",
                 attn_kwargs: Mapping[str, Mapping[str, Any]] | None = None, stem: str = "patch",
                 downsample: str = "merge", pos_embed: bool = False, cpe: bool = False, mlp: str = "mlp",
                 layer_scale: float | None | Sequence[float | None] = None, qkv_bias: bool = True,
                 norm_eps: float = 1e-5, final_norm: bool = True, stage_norm: bool = False,
                 head_hidden_size: int | None = None,
                 drop_rate: float = 0., proj_drop_rate: float = 0., drop_path_rate: float = 0.1) -> None:
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        _check_input_size(img_size, "img_size")
        embed_dims, depths, num_heads = (_per_stage(v, n) for v, n in
                                         ((embed_dims, "embed_dims"), (depths, "depths"), (num_heads, "num_heads")))
        mlp_ratios, layer_scale = _per_stage(mlp_ratios, "mlp_ratios"), _per_stage(layer_scale, "layer_scale")
        grids = [(img_size[0] // (4 * 2 ** i), img_size[1] // (4 * 2 ** i)) for i in range(NUM_STAGES)]

        def placement(name: str, stage: int, index: int) -> dict[str, Any]:
            return placement_options(name, stage, index, grids[stage])

        self.attn_schedule = AttentionSchedule(attn, attn_kwargs, depths, placement)
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = embed_dims[-1]
        self.patch_embed = make_stem(stem, in_chans, embed_dims[0])
        drop_paths = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages, block_specs = [], iter(self.attn_schedule)
        for i in range(NUM_STAGES):
            blocks = [HierarchicalBlock(embed_dims[i], num_heads[i], next(block_specs), mlp_ratio=mlp_ratios[i],
                                        qkv_bias=qkv_bias, mlp=mlp, cpe=cpe, layer_scale=layer_scale[i],
                                        drop_path=drop_paths[i][j], proj_drop=proj_drop_rate, norm_eps=norm_eps)
                      for j in range(depths[i])]
            down = make_downsample(downsample, embed_dims[i - 1], embed_dims[i]) if i else nn.Identity()
            stages.append(HierarchicalStage(down, blocks, embed_dims[i], grids[i] if pos_embed else None,
                                            nn.LayerNorm(embed_dims[i], eps=norm_eps) if stage_norm else None))
        self.stages = nn.Sequential(*stages)
        self.feature_info = [dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f"stages.{i}")
                             for i in range(NUM_STAGES)]
        self.norm = nn.LayerNorm(self.num_features, eps=norm_eps) if final_norm else nn.Identity()
        if head_hidden_size:
            self.head = ProjectionHead(self.num_features, head_hidden_size, num_classes, drop_rate)
        else:
            self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                       input_fmt="NHWC")
        self.head_hidden_size = head_hidden_size or self.num_features
        self.apply(_init_weights)
        for stage in self.stages:
            if stage.pos_embed is not None:
                trunc_normal_(stage.pos_embed, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        keys = ("pos_embed", "relative_position_bias_table", "rpb")
        return {n for n, _ in self.named_parameters() if any(k in n for k in keys)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^patch_embed", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.\w+\.(\d+)", None),
            (r"^stages\.(\d+)\.norm", (99998,)), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)
        if global_pool is not None:
            self.global_pool = global_pool

    def _take_indices(self, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
        check_out_indices(indices, len(self.stages), type(self).__name__)
        return feature_take_indices(len(self.stages), indices)

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's contract: NCHW stage outputs at ``indices`` (all by default) and, unless
        ``intermediates_only``, the final normed NHWC features."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = self._take_indices(indices)
        _check_input_size(x.shape[-2:], "input")
        x = self.patch_embed(x)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates, last = [], len(self.stages) - 1
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if i == last else x), intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take_indices, max_index = self._take_indices(indices)
        prune_end = max_index < len(self.stages) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.feature_info[max_index]["num_chs"]
        if prune_end or prune_head:   # the whole head: parameters left unused would trouble DDP
            self.head = ClassifierHead(self.num_features, 0, pool_type="", input_fmt="NHWC")
            self.head_hidden_size = self.num_features
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        _check_input_size(x.shape[-2:], "input")
        return self.norm(self.stages(self.patch_embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def check_out_indices(indices: int | Sequence[int] | None, num_stages: int, model: str) -> None:
    """timm's feature indices: None (all), an int n (the last n) or a list of stage indices (negative from the end)."""
    if indices is None:
        return
    ok = 0 < indices <= num_stages if isinstance(indices, int) else all(-num_stages <= i < num_stages for i in indices)
    if not ok:
        raise ValueError(f"out_indices / indices {indices!r} out of range: {model} has {num_stages} stages "
                         f"(strides {[4 * 2 ** i for i in range(num_stages)]}); give stage indices in "
                         f"0..{num_stages - 1} (or -{num_stages}..-1), or an int n in 1..{num_stages} for the last n")


def _check_input_size(size: Sequence[int], what: str) -> None:
    if any(int(s) % STRIDE for s in size) or any(int(s) < STRIDE for s in size):
        raise ValueError(f"hierarchical backbones take {what} height and width that are multiples of {STRIDE} "
                         f"(the stride of the last stage); got {tuple(int(s) for s in size)}: resize or pad to "
                         f"{tuple(max(STRIDE, -(-int(s) // STRIDE) * STRIDE) for s in size)}")


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# --- helpers of the model files ------------------------------------------

# the papers whose Swin and PVT variants the model files register (their pretrained_cfg entries)
AGENT_PAPER = dict(paper_name="Agent Attention", paper_ids="arXiv:2312.08874",
                   origin_url="https://github.com/LeapLabTHU/Agent-Attention")
FLATTEN_PAPER = dict(paper_name="FLatten Transformer", paper_ids="arXiv:2308.00442",
                     origin_url="https://github.com/LeapLabTHU/FLatten-Transformer")


def hierarchical_cfg(**kwargs: Any) -> dict[str, Any]:
    """A pretrained_cfg for a hierarchical model at 224x224. No hosted weights: load an official
    checkpoint with ``pretrained=True, pretrained_cfg_overlay=dict(file=path)``; a training checkpoint
    that also pickles its config (timm loads files with ``weights_only=True``) goes in as
    ``pretrained_cfg_overlay=dict(state_dict=torch.load(path, weights_only=False))`` (trusted files only)."""
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
            "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head.fc", **kwargs}


def create_hierarchical(variant: str, pretrained: bool, filter_fn: Callable, **kwargs: Any) -> HierarchicalTransformer:
    """``build_model_with_cfg`` with the papers' checkpoint filter and timm's feature getter
    (``features_only=True`` returns the stage outputs at ``out_indices``, strides 4, 8, 16, 32)."""
    out_indices = kwargs.pop("out_indices", tuple(range(NUM_STAGES)))
    check_out_indices(out_indices, NUM_STAGES, variant)
    return build_with_pretrained(HierarchicalTransformer, variant, pretrained, filter_fn,
                                 feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


def rename_keys(state_dict: Mapping[str, torch.Tensor], rules: Sequence[tuple[str, str]],
                drop: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Rename every key by the first matching ``(pattern, replacement)`` regex rule (unchanged if none
    matches); keys matching a ``drop`` pattern (e.g. persistent buffers of the official code) are left out."""
    out = {}
    for key, value in state_dict.items():
        if any(re.search(pattern, key) for pattern in drop):
            continue
        for pattern, replacement in rules:
            if re.search(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        out[key] = value
    return out


def check_converted(state_dict: Mapping[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """Strict check of a state dict converted from the layout ``source``: ``check_state_dict``'s ValueError
    naming the missing and unexpected keys and the shape mismatches (the classifier aside: timm drops it
    itself when ``num_classes`` differs from the checkpoint's)."""
    return check_state_dict(state_dict, model, converted_from=source)
