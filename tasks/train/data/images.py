"""Reading image files: one that cannot be decoded (truncated, not an image) is a ``ValueError`` naming it."""
from __future__ import annotations

from pathlib import Path

from PIL import Image


def read_image(path: str | Path, mode: str | None = "RGB") -> Image.Image:
    """The decoded image at ``path``, converted to ``mode`` (None: as stored, e.g. label maps)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode) if mode else image.copy()
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError) as e:     # PIL: UnidentifiedImageError, "image file is truncated", broken chunks
        raise ValueError(f"image {path} cannot be read, it is truncated or not an image ({e})") from e
