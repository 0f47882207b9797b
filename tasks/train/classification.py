"""Image classification: any timm model on an ImageFolder / Hugging Face folder, timm's recipe.

Mixup/CutMix with label smoothing (soft-target cross-entropy), or label-smoothed cross-entropy
without them, as timm's ``train.py``; evaluation reports top-1, top-5 and the loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from tqdm import tqdm

from .config import TrainConfig
from .data.classification import classification_datasets
from .data.sampling import eval_loader
from .metrics import topk_correct
from .pretrained import create_model, input_normalization


class ClassificationTask:
    """Model, data and loss of a ``cls`` recipe (the interface ``trainer.Trainer`` drives)."""

    sync_batchnorm = False

    def __init__(self, cfg: TrainConfig) -> None:
        data = cfg.data
        self.cfg = cfg
        mean, std = input_normalization(cfg.model.name)
        self.train_set, self.val_set, self.class_names = classification_datasets(data, mean, std)
        self.num_classes = len(self.class_names)
        self.model = create_model(cfg.model.name, cfg.model.kwargs, self.num_classes, cfg.model.checkpoint)
        self.collate_fn = None
        self.mixup = None
        if data.mixup > 0 or data.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=data.mixup, cutmix_alpha=data.cutmix, prob=data.mixup_prob,
                               switch_prob=data.mixup_switch_prob, label_smoothing=data.label_smoothing,
                               num_classes=self.num_classes)
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif data.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(data.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def loss(self, model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        images, targets = batch
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return self.criterion(model(images), targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, accelerator: Accelerator) -> dict[str, float]:
        """Top-1 and top-5 accuracy (percent) and mean cross-entropy over the validation set."""
        model.eval()
        totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)   # top1, top5, loss sum, count
        batch_size = self.cfg.data.eval_batch_size or 2 * self.cfg.data.batch_size
        loader = eval_loader(self.val_set, batch_size, self.cfg.data.workers, accelerator.process_index,
                             accelerator.num_processes)
        for images, targets in tqdm(loader, desc="eval", leave=False, disable=not accelerator.is_main_process):
            images, targets = images.to(accelerator.device), targets.to(accelerator.device)
            with accelerator.autocast():
                logits = model(images).float()
            totals[:2] += topk_correct(logits, targets, (1, 5))
            totals[2] += F.cross_entropy(logits, targets, reduction="sum")
            totals[3] += len(targets)
        top1, top5, loss, count = accelerator.reduce(totals, "sum").tolist()
        return {"top1": 100 * top1 / count, "top5": 100 * top5 / count, "loss": loss / count}
