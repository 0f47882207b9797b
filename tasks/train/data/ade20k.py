"""ADE20K (SceneParsing, ``ADEChallengeData2016``) for semantic segmentation.

Layout: ``images/{training,validation}/<stem>.jpg`` with ``annotations/{training,validation}/<stem>.png``
(one label per pixel: 0 = "other", ignored; 1..150 = the classes). Labels are mapped as
mmsegmentation's ``reduce_zero_label``: 0 -> 255 (the ignore index), k -> k - 1. Class names come
from ``objectInfo150.txt`` when the folder has it.

Every annotation is checked when the data set is built, before any training: it must exist for
each image, have the image's size, and hold no label above ``num_classes``.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from .images import data_not_found, read_image

IGNORE_INDEX = 255
SPLITS = ("training", "validation")


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K's 0..150 annotation values -> 0..149 training labels, 0 -> 255 (ignored)."""
    out = label.astype(np.int64) - 1
    out[label == 0] = IGNORE_INDEX
    return out.astype(np.uint8)


def read_class_names(root: Path, num_classes: int) -> list[str]:
    """Names from ``objectInfo150.txt`` (Idx, Ratio, Train, Val, Name; first synonym kept), else numbers."""
    path = Path(root) / "objectInfo150.txt"
    if path.is_file():
        rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
        names = [r[-1].split(",")[0].strip() for r in rows]
        if len(names) == num_classes:
            return names
    return [f"class_{i}" for i in range(num_classes)]


def _check_pair(image: Path, annotation: Path, num_classes: int) -> str | None:
    """None if the pair is usable, else a sentence saying why not."""
    if not annotation.is_file():
        return f"{image.name} has no annotation {annotation}"
    try:
        with Image.open(image) as im, Image.open(annotation) as ann:
            if im.size != ann.size:
                return f"{annotation} is {ann.size[0]}x{ann.size[1]} but its image is {im.size[0]}x{im.size[1]}"
            if ann.mode not in ("L", "P"):
                return f"{annotation} is a {ann.mode} image, expected 8-bit labels (mode L or P)"
            high = int(np.asarray(ann).max())
    except (OSError, SyntaxError) as e:     # PIL: not an image, or a truncated one
        return f"{image} or its annotation {annotation} cannot be read ({e})"
    if high > num_classes:
        return f"{annotation} has label {high}, above the {num_classes} classes (valid: 0 = ignore, 1..{num_classes})"
    return None


class ADE20K(Dataset):
    """One split of ``ADEChallengeData2016``; items are ``transform(image uint8 HxWx3, labels uint8 HxW)``."""

    def __init__(self, root: str | Path, split: str, num_classes: int = 150, transform: Callable | None = None,
                 check_workers: int = 8) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root, self.num_classes, self.transform = Path(root), num_classes, transform
        images_dir, annotations_dir = self.root / "images" / split, self.root / "annotations" / split
        for folder in (images_dir, annotations_dir):
            if not folder.is_dir():
                raise data_not_found(folder, self.root, "ADE20K is read from data.root = the ADEChallengeData2016 "
                                     "folder, with images/{training,validation}/*.jpg and "
                                     "annotations/{training,validation}/*.png")
        self.images = sorted(images_dir.glob("*.jpg"))
        if not self.images:
            raise ValueError(f"{images_dir} has no .jpg images")
        self.annotations = [annotations_dir / f"{p.stem}.png" for p in self.images]
        self.class_names = read_class_names(self.root, num_classes)
        self._check(check_workers)

    def _check(self, workers: int) -> None:
        pairs = list(zip(self.images, self.annotations))
        with ThreadPoolExecutor(workers) as pool:
            problems = pool.map(lambda pair: _check_pair(*pair, self.num_classes), pairs)
            for problem in tqdm(problems, total=len(pairs), desc=f"checking {self.images[0].parent.name} labels",
                                leave=False, disable=len(pairs) < 2000):
                if problem:
                    raise ValueError(problem)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = np.asarray(read_image(self.images[index]))
        label = reduce_zero_label(np.asarray(read_image(self.annotations[index], mode=None)))
        return self.transform(image, label) if self.transform else (image, label)
