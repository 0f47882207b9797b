"""Segmentation decode heads in plain PyTorch, for any timm ``features_only`` backbone.

- ``UPerHead``: UPerNet (Xiao et al., "Unified Perceptual Parsing for Scene Understanding",
  ECCV 2018), laid out as mmsegmentation's ``UPerHead``: PSPNet's pyramid pooling on the last level,
  an FPN top-down path over the others, all levels fused at the finest one.
- ``SemanticFPNHead``: Semantic FPN (Kirillov et al., "Panoptic Feature Pyramid Networks",
  CVPR 2019): an FPN neck, then per level 3x3 conv + 2x upsampling stages down to the finest
  stride, summed.
- ``FCNHead``: the auxiliary head of the UPerNet recipe (one 3x3 conv on an intermediate level).

Levels may have any strides, equal ones included (an isotropic ViT gives four stride-16 maps):
every merge resizes to the finer level's size.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel_size: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module (Zhao et al., CVPR 2017): pooled context at several scales."""

    def __init__(self, cin: int, channels: int, scales: Sequence[int]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(cin, channels)) for s in scales)
        self.bottleneck = ConvBNReLU(cin + len(scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([x] + [resize(stage(x), x.shape[-2:]) for stage in self.stages], dim=1))


class UPerHead(nn.Module):
    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.lateral = nn.ModuleList(ConvBNReLU(c, channels) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        levels = [conv(f) for conv, f in zip(self.lateral, features)] + [self.ppm(features[-1])]
        for i in range(len(levels) - 1, 0, -1):
            levels[i - 1] = levels[i - 1] + resize(levels[i], levels[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn, levels)] + [levels[-1]]
        size = outs[0].shape[-2:]
        return self.classifier(self.fuse(torch.cat([resize(o, size) for o in outs], dim=1)))


class SemanticFPNHead(nn.Module):
    """FPN neck of width ``channels``, scale heads of width ``channels // 2`` (mmseg: 256 and 128)."""

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], num_classes: int, channels: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        head = channels // 2
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            upsamplings = round(math.log2(stride / strides[0])) if stride > strides[0] else 0
            stages = []
            for j in range(max(1, upsamplings)):
                stages.append(ConvBNReLU(channels if j == 0 else head, head, 3))
                if j < upsamplings:
                    stages.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*stages))
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(head, num_classes, 1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        levels = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(levels) - 1, 0, -1):
            levels[i - 1] = levels[i - 1] + resize(levels[i], levels[i - 1].shape[-2:])
        size = levels[0].shape[-2:]
        return self.classifier(sum(resize(head(out(x)), size)
                                   for head, out, x in zip(self.scale_heads, self.output, levels)))


class FCNHead(nn.Module):
    def __init__(self, cin: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = ConvBNReLU(cin, channels, 3)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(x))


class SegmentationModel(nn.Module):
    """Backbone + decode head (+ auxiliary head while training); logits at the input's size.

    ``forward`` returns ``{"out": logits}`` and, in training mode with an auxiliary head,
    ``"aux"`` too (torchvision's segmentation convention).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, aux_head: nn.Module | None = None,
                 aux_index: int = 0) -> None:
        super().__init__()
        self.backbone, self.head, self.aux_head, self.aux_index = backbone, head, aux_head, aux_index
        self.channels_last = getattr(backbone, "output_fmt", "NCHW") == "NHWC"   # e.g. timm's Swin

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        if self.channels_last:
            features = [f.permute(0, 3, 1, 2) for f in features]
        out = {"out": resize(self.head(features), x.shape[-2:])}
        if self.training and self.aux_head is not None:
            out["aux"] = resize(self.aux_head(features[self.aux_index]), x.shape[-2:])
        return out
