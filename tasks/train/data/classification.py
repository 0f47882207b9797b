"""Classification data: an ImageFolder (``train/``, ``val/``) or a Hugging Face ``datasets`` folder,
with timm's train and eval transforms (RandomResizedCrop, flip, colour jitter, RandAugment, random
erasing; resize + centre crop).

``datasets`` is not a dependency of subquad: ``format: hf`` asks for it only when used.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from timm.data import create_transform
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from ..config import ClsDataConfig
from .images import data_not_found, read_image
from .synthetic import write_classification

IMAGE_FOLDER = ("an ImageFolder recipe reads data.root/train/<class>/<image> and data.root/val/<class>/<image> "
                "(ImageNet-1k: one folder per synset, e.g. train/n01440764/n01440764_10026.JPEG)")


class HFImages(Dataset):
    """One split of a ``datasets.save_to_disk`` folder: its first Image column and first ClassLabel column."""

    def __init__(self, split, transform: Callable) -> None:
        import datasets
        image = [k for k, f in split.features.items() if isinstance(f, datasets.Image)]
        label = [k for k, f in split.features.items() if isinstance(f, datasets.ClassLabel)]
        if not image or not label:
            raise ValueError(f"a Hugging Face split needs an Image and a ClassLabel column, has {dict(split.features)}")
        self.split, self.image, self.label, self.transform = split, image[0], label[0], transform
        self.classes = split.features[self.label].names

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        row = self.split[index]
        return self.transform(row[self.image].convert("RGB")), row[self.label]


def _hf_splits(cfg: ClsDataConfig, train_tf: Callable, eval_tf: Callable) -> tuple[Dataset, Dataset]:
    try:
        import datasets
    except ImportError as e:
        raise ValueError("data.format 'hf' reads a Hugging Face datasets folder and needs the `datasets` "
                         "package (pip install datasets), which is not installed") from e
    folder = datasets.load_from_disk(cfg.root)
    if not isinstance(folder, datasets.DatasetDict) or {cfg.train_split, cfg.val_split} - set(folder):
        splits = list(folder) if isinstance(folder, datasets.DatasetDict) else "none (a single Dataset)"
        raise ValueError(f"{cfg.root}: expected splits {cfg.train_split!r} and {cfg.val_split!r}, found {splits}")
    return HFImages(folder[cfg.train_split], train_tf), HFImages(folder[cfg.val_split], eval_tf)


def _image_folder(root: Path, split: str, transform: Callable) -> ImageFolder:
    if not (root / split).is_dir():
        raise data_not_found(root / split, root, IMAGE_FOLDER)
    return ImageFolder(str(root / split), transform=transform, loader=read_image)


def classification_datasets(cfg: ClsDataConfig, mean: tuple, std: tuple) -> tuple[Dataset, Dataset, list[str]]:
    """Train and validation sets with timm's transforms, and the class names (the same in both splits)."""
    root = Path(cfg.root)
    if cfg.synthetic and not root.exists():
        print(f"writing the synthetic classification set to {root}")
        write_classification(root)
    train_tf = create_transform(cfg.img_size, is_training=True, scale=tuple(cfg.scale), hflip=cfg.hflip,
                                color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment,
                                interpolation=cfg.interpolation, mean=mean, std=std, re_prob=cfg.re_prob,
                                re_mode="pixel")
    eval_tf = create_transform(cfg.img_size, is_training=False, interpolation=cfg.interpolation, mean=mean,
                               std=std, crop_pct=cfg.crop_pct)
    if cfg.format == "hf":
        train, val = _hf_splits(cfg, train_tf, eval_tf)
    else:
        if not root.is_dir():
            raise data_not_found(root, root, IMAGE_FOLDER)
        train, val = _image_folder(root, cfg.train_split, train_tf), _image_folder(root, cfg.val_split, eval_tf)
    if train.classes != val.classes:
        raise ValueError(f"{cfg.root}: the {cfg.train_split} and {cfg.val_split} splits have different classes "
                         f"({len(train.classes)} vs {len(val.classes)})")
    return train, val, list(train.classes)
