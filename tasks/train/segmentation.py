"""Semantic segmentation: a ``features_only`` backbone with a UPerNet or Semantic-FPN head on ADE20K.

mmsegmentation's recipe: pixel cross-entropy ignoring 255, plus 0.4 x the auxiliary FCN head's
loss; evaluation single-scale with sliding windows (``crop_size`` windows every ``eval_stride``
pixels, overlapping logits averaged) on the image resized into ``scale``, scored at the original
resolution.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm import tqdm

from .config import SegModelConfig, TrainConfig
from .data.ade20k import ADE20K, IGNORE_INDEX
from .data.sampling import eval_loader
from .data.seg_transforms import SegEvalTransform, SegTrainTransform
from .data.synthetic import write_segmentation
from .heads import FCNHead, SegmentationModel, SemanticFPNHead, UPerHead, resize
from .metrics import confusion_matrix, segmentation_scores
from .pretrained import create_model, input_normalization


def build_segmentation_model(cfg: SegModelConfig, num_classes: int) -> SegmentationModel:
    """The backbone (``features_only``, weights from ``cfg.checkpoint`` if set) under the chosen head."""
    backbone = create_model(cfg.backbone, cfg.kwargs, 0, cfg.checkpoint, features_only=True,
                            out_indices=cfg.out_indices)
    channels, strides = backbone.feature_info.channels(), backbone.feature_info.reduction()
    if cfg.head == "upernet":
        head: nn.Module = UPerHead(channels, num_classes, cfg.head_channels or 512, cfg.pool_scales, cfg.dropout)
    else:
        head = SemanticFPNHead(channels, strides, num_classes, cfg.head_channels or 256, cfg.dropout)
    aux_index = max(len(channels) - 2, 0)
    aux = FCNHead(channels[aux_index], num_classes, cfg.aux_channels, cfg.dropout) if cfg.aux_weight > 0 else None
    return SegmentationModel(backbone, head, aux, aux_index)


def slide_inference(model: nn.Module, image: torch.Tensor, num_classes: int, crop: int, stride: int,
                    batch_size: int) -> torch.Tensor:
    """Logits (1, C, H, W) of one image (1, 3, H, W) from overlapping ``crop`` windows, averaged.

    Windows are placed as mmseg's ``slide_inference``; a window larger than the image is padded
    (so backbones with a fixed input size work) and its padding cut from the logits.
    """
    h, w = image.shape[-2:]
    rows, cols = (max(n - crop + stride - 1, 0) // stride + 1 for n in (h, w))
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    logits = image.new_zeros(1, num_classes, h, w, dtype=torch.float32)
    count = image.new_zeros(1, 1, h, w, dtype=torch.float32)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        windows = torch.cat([F.pad(image[..., y1:y2, x1:x2], (0, crop - (x2 - x1), 0, crop - (y2 - y1)))
                             for y1, y2, x1, x2 in chunk])
        out = model(windows)["out"].float()
        for o, (y1, y2, x1, x2) in zip(out, chunk):
            logits[0, :, y1:y2, x1:x2] += o[:, :y2 - y1, :x2 - x1]
            count[0, :, y1:y2, x1:x2] += 1
    return logits / count


class SegmentationTask:
    """Model, data and loss of a ``seg`` recipe (the interface ``trainer.Trainer`` drives)."""

    sync_batchnorm = True

    def __init__(self, cfg: TrainConfig) -> None:
        data, self.cfg = cfg.data, cfg
        root = Path(data.root)
        if data.synthetic and not root.exists():
            print(f"writing the synthetic segmentation set to {root}")
            write_segmentation(root)
        mean, std = input_normalization(cfg.model.backbone)
        scale = (max(data.scale), min(data.scale))
        self.train_set = ADE20K(root, "training", data.num_classes, SegTrainTransform(
            data.crop_size, scale, tuple(data.ratio_range), data.cat_max_ratio, data.hflip, data.photometric,
            mean, std))
        self.val_set = ADE20K(root, "validation", data.num_classes, SegEvalTransform(scale, mean, std))
        self.class_names, self.num_classes = self.train_set.class_names, data.num_classes
        self.model = build_segmentation_model(cfg.model, data.num_classes)
        self.collate_fn = None

    def loss(self, model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        out = model(images)
        loss = F.cross_entropy(out["out"], labels, ignore_index=IGNORE_INDEX)
        if "aux" in out:
            loss = loss + self.cfg.model.aux_weight * F.cross_entropy(out["aux"], labels, ignore_index=IGNORE_INDEX)
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, accelerator: Accelerator) -> dict:
        """mIoU, mAcc, aAcc (percent) and per-class IoU/Acc over the validation set."""
        model.eval()
        data = self.cfg.data
        confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=accelerator.device)
        loader = eval_loader(self.val_set, 1, data.workers, accelerator.process_index, accelerator.num_processes)
        for image, label in tqdm(loader, desc="eval", leave=False, disable=not accelerator.is_main_process):
            with accelerator.autocast():
                logits = slide_inference(model, image.to(accelerator.device), self.num_classes, data.crop_size,
                                         data.eval_stride, data.batch_size)
            pred = resize(logits, label.shape[-2:]).argmax(1)
            confusion += confusion_matrix(pred[0], label[0].to(accelerator.device), self.num_classes)
        return segmentation_scores(accelerator.reduce(confusion, "sum").cpu(), self.class_names)
