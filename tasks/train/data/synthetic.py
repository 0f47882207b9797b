"""A small synthetic data set generated in code: coloured shapes on textured backgrounds.

Six shape classes (``SHAPES``); each class has its own hue (jittered), so a tiny model learns it in a
few hundred steps on a CPU, while the shape is what separates neighbouring hues. Written in the folder
layouts of the real data sets, so the real loaders read it:

- classification: an ImageFolder, ``<root>/{train,val}/<shape>/<n>.png``;
- segmentation: ``<root>/ADEChallengeData2016/`` with ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png`` (0 = ignore on a 1-pixel outline of each shape,
  1 = background, 2.. = the shapes) plus ``objectInfo150.txt`` naming the classes.

Generation is deterministic in ``seed`` and atomic (written beside the target, then renamed).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
SEGMENTATION_CLASSES = ("background",) + SHAPES


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A muted background: stripes, a checkerboard or smooth noise, (h, w, 3) floats in [0, 1]."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
    elif kind == 1:
        cell = rng.integers(3, 9)
        pattern = ((x // cell + y // cell) % 2).astype(np.float32)
    else:
        coarse = rng.uniform(size=(h // 8 + 2, w // 8 + 2)).astype(np.float32)
        pattern = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))
    low, high = rng.uniform(0.15, 0.5, size=3), rng.uniform(0.4, 0.75, size=3)
    return low + (high - low) * pattern[..., None]


def _shape_mask(kind: int, h: int, w: int, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = y - cy, x - cx
    u, v = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
    name = SHAPES[kind]
    if name == "circle":
        return u ** 2 + v ** 2 <= r ** 2
    if name == "square":
        return np.maximum(abs(u), abs(v)) <= 0.8 * r
    if name == "triangle":      # three half-planes of an equilateral triangle with circumradius r
        normals = [(np.cos(a), np.sin(a)) for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)]
        return np.all([u * nx + v * ny <= 0.5 * r for nx, ny in normals], axis=0)
    if name == "cross":
        return ((abs(u) <= r / 3) & (abs(v) <= r)) | ((abs(v) <= r / 3) & (abs(u) <= r))
    if name == "ring":
        return ((0.55 * r) ** 2 <= u ** 2 + v ** 2) & (u ** 2 + v ** 2 <= r ** 2)
    return abs(u) + abs(v) <= r                                                          # diamond


def _colour(rng: np.random.Generator, kind: int) -> np.ndarray:
    """The class hue (six hues around the wheel) jittered, bright and saturated."""
    hue = (kind / len(SHAPES) + rng.normal(0, 0.04)) % 1.0
    rgb = np.clip(np.abs((hue * 6 + np.array([0, 4, 2])) % 6 - 3) - 1, 0, 1)
    return 0.25 + 0.75 * rgb * rng.uniform(0.8, 1.0)


def _plain(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A muted background of one colour, (h, w, 3) floats in [0, 1]."""
    return np.broadcast_to(rng.uniform(0.15, 0.6, size=3), (h, w, 3)).astype(np.float64)


# style -> (background, shapes rotated at random): "textured" is the classification and segmentation sets';
# "simple" (one-colour backgrounds, upright shapes, so that a square and a diamond differ by more than their
# colour) is the diffusion recipe's, whose small model has minutes to learn the shapes
STYLES = {"textured": (_texture, True), "simple": (_plain, False)}


def render(rng: np.random.Generator, h: int, w: int, kinds: list[int],
           style: str = "textured") -> tuple[np.ndarray, np.ndarray]:
    """An image with the given shapes (later ones on top) and its ADE-style label map, in ``style``
    (``STYLES``).

    Returns ``image`` (h, w, 3) uint8 and ``labels`` (h, w) uint8: 1 background, ``2 + kind`` for a
    shape, 0 (ignore) on each shape's 1-pixel outline.
    """
    background, rotate = STYLES[style]
    image = background(rng, h, w).copy()
    labels = np.ones((h, w), np.uint8)
    size = min(h, w)
    for kind in kinds:
        r = rng.uniform(0.3, 0.45) * size if len(kinds) == 1 else rng.uniform(0.25, 0.4) * size
        cy, cx = rng.uniform(r * 0.8, h - r * 0.8), rng.uniform(r * 0.8, w - r * 0.8)
        angle = rng.uniform(0, np.pi)
        mask = _shape_mask(kind, h, w, cy, cx, r, angle if rotate else 0.0)
        image[mask] = _colour(rng, kind)
        labels[mask] = 2 + kind
        inner = mask.copy()
        inner[1:] &= mask[:-1]
        inner[:-1] &= mask[1:]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        labels[mask & ~inner] = 0
    image = image + rng.normal(0, 0.03, size=image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), labels


def _publish(tmp: Path, root: Path) -> Path:
    """Rename a finished folder into place; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, root)
    except OSError:
        if not root.exists():
            raise
        shutil.rmtree(tmp)
    return root


def write_classification(root: Path, train_per_class: int = 200, val_per_class: int = 50, size: int = 32,
                         seed: int = 0, style: str = "textured") -> Path:
    """Write the classification set as an ImageFolder at ``root`` (``train/``, ``val/``) in ``style``
    (``STYLES``: ``textured``, or ``simple`` for the diffusion recipe)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    root = Path(root)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for kind, name in enumerate(SHAPES):
            folder = tmp / split / name
            folder.mkdir(parents=True)
            for n in range(count):
                image, _ = render(rng, size, size, [kind], style)
                Image.fromarray(image).save(folder / f"{n:05d}.png")
    return _publish(tmp, root)


def write_segmentation(root: Path, train: int = 400, val: int = 100, size_range: tuple[int, int] = (48, 96),
                       seed: int = 0) -> Path:
    """Write the segmentation set at ``root`` in the ``ADEChallengeData2016`` layout."""
    root = Path(root)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    rng = np.random.default_rng(seed)
    for split, count in (("training", train), ("validation", val)):
        (tmp / "images" / split).mkdir(parents=True)
        (tmp / "annotations" / split).mkdir(parents=True)
        for n in range(count):
            h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
            kinds = [int(k) for k in rng.integers(len(SHAPES), size=rng.integers(1, 4))]
            image, labels = render(rng, h, w, kinds)
            stem = f"ADE_{'train' if split == 'training' else 'val'}_{n:08d}"
            Image.fromarray(image).save(tmp / "images" / split / f"{stem}.jpg", quality=95)
            Image.fromarray(labels).save(tmp / "annotations" / split / f"{stem}.png")
    rows = [f"{i + 1}\t0\t0\t0\t{name}" for i, name in enumerate(SEGMENTATION_CLASSES)]
    (tmp / "objectInfo150.txt").write_text("\n".join(["Idx\tRatio\tTrain\tVal\tName", *rows]) + "\n")
    return _publish(tmp, root)
