"""Image + label transforms of mmsegmentation's ADE20K recipe, in NumPy/PIL/torch.

Training (``SegTrainTransform``): random resize to ``scale`` x a ratio in ``ratio_range`` (keeping the
aspect ratio, the image inside the (long, short) bound), random crop with ``cat_max_ratio`` (up to 10
tries for a crop where no class covers more than that share), horizontal flip, photometric distortion,
normalisation, padding to the crop size (image 0, labels 255). Evaluation (``SegEvalTransform``): the
image resized into ``scale`` (keeping the ratio) and normalised; labels stay at full size, because
scores are computed at the original resolution.

Randomness comes from Python's ``random`` (seeded per sample by ``sampling.SeededSamples``).
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .ade20k import IGNORE_INDEX


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(h, w) scaled, aspect kept, to fit ``scale`` = (long bound, short bound), mmcv's ``rescale_size``."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _resize(array: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), resample))


def _to_tensor(image: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 255 - mean) / std


def photometric_distortion(image: np.ndarray, brightness: float = 32, contrast: tuple[float, float] = (0.5, 1.5),
                           saturation: tuple[float, float] = (0.5, 1.5), hue: int = 18) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion``: each step with probability 1/2, contrast first or last.

    ``hue`` is in OpenCV's 8-bit units (180 per turn), as in mmseg; applied in PIL's 256 per turn.
    """
    img = image.astype(np.float32)
    if random.random() < 0.5:
        img = np.clip(img + random.uniform(-brightness, brightness), 0, 255)
    contrast_first = random.random() < 0.5
    if contrast_first and random.random() < 0.5:
        img = np.clip(img * random.uniform(*contrast), 0, 255)
    do_saturation, do_hue = random.random() < 0.5, random.random() < 0.5
    if do_saturation or do_hue:
        hsv = np.asarray(Image.fromarray(img.astype(np.uint8)).convert("HSV")).astype(np.float32)
        if do_saturation:
            hsv[..., 1] = np.clip(hsv[..., 1] * random.uniform(*saturation), 0, 255)
        if do_hue:
            hsv[..., 0] = (hsv[..., 0] + random.randint(-hue, hue) * 256 / 180) % 256
        img = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if not contrast_first and random.random() < 0.5:
        img = np.clip(img * random.uniform(*contrast), 0, 255)
    return img.astype(np.uint8)


class SegTrainTransform:
    def __init__(self, crop_size: int, scale: tuple[int, int], ratio_range: tuple[float, float], cat_max_ratio: float,
                 hflip: float, photometric: bool, mean: tuple, std: tuple) -> None:
        self.crop, self.scale, self.ratio_range = crop_size, scale, ratio_range
        self.cat_max_ratio, self.hflip, self.photometric = cat_max_ratio, hflip, photometric
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def _crop_box(self, h: int, w: int) -> tuple[int, int]:
        return random.randint(0, max(h - self.crop, 0)), random.randint(0, max(w - self.crop, 0))

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = random.uniform(*self.ratio_range)
        size = rescale_size(*label.shape, (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
        image, label = _resize(image, size, Image.BILINEAR), _resize(label, size, Image.NEAREST)
        y, x = self._crop_box(*label.shape)
        if self.cat_max_ratio < 1:
            for _ in range(10):
                classes, counts = np.unique(label[y:y + self.crop, x:x + self.crop], return_counts=True)
                counts = counts[classes != IGNORE_INDEX]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                y, x = self._crop_box(*label.shape)
        image, label = image[y:y + self.crop, x:x + self.crop], label[y:y + self.crop, x:x + self.crop]
        if random.random() < self.hflip:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(image)
        h, w = label.shape
        image = F.pad(_to_tensor(image, self.mean, self.std), (0, self.crop - w, 0, self.crop - h), value=0.0)
        label = F.pad(torch.from_numpy(np.array(label, dtype=np.int64)), (0, self.crop - w, 0, self.crop - h),
                      value=IGNORE_INDEX)
        return image, label


class SegEvalTransform:
    def __init__(self, scale: tuple[int, int], mean: tuple, std: tuple) -> None:
        self.scale = scale
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        image = _resize(image, rescale_size(*label.shape, self.scale), Image.BILINEAR)
        return _to_tensor(image, self.mean, self.std), torch.from_numpy(np.array(label, dtype=np.int64))
