"""Evaluation metrics: top-k accuracy for classification; mIoU, mAcc and aAcc for segmentation.

The segmentation scores follow mmsegmentation's ``IoUMetric``: from the confusion matrix summed over
the whole validation set, IoU_c = TP_c / (TP_c + FP_c + FN_c) and Acc_c = TP_c / (TP_c + FN_c); a
class with an empty denominator is NaN and left out of the means; aAcc = sum TP / labelled pixels.
"""
from __future__ import annotations

import torch


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """How many rows have the target among their top-k logits, one count per k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == target[:, None]
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction; ignored pixels skipped."""
    keep = label != ignore_index
    if (label[keep] >= num_classes).any() or (label[keep] < 0).any():
        raise ValueError(f"labels must be in [0, {num_classes}) or {ignore_index}, got {label[keep].unique().tolist()}")
    index = label[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """mIoU, mAcc, aAcc (in percent) and the per-class IoU and accuracy from a confusion matrix."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    gt, predicted = confusion.sum(1), confusion.sum(0)
    iou = tp / (gt + predicted - tp)                 # 0/0 = NaN for a class neither present nor predicted
    acc = tp / gt
    names = class_names or [str(i) for i in range(len(tp))]
    return {
        "mIoU": 100 * iou.nanmean().item(),
        "mAcc": 100 * acc.nanmean().item(),
        "aAcc": 100 * (tp.sum() / gt.sum()).item(),
        "per_class": {n: {"IoU": 100 * i, "Acc": 100 * a} for n, i, a in zip(names, iou.tolist(), acc.tolist())},
    }
