"""Reading image files: one that cannot be decoded (truncated, not an image) is a ``ValueError`` naming it;
a data folder that is not there is one that says where ``data.root`` points and the layout it needs."""
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


def data_not_found(folder: Path, root: Path, layout: str) -> ValueError:
    """The error for a missing data folder: what the recipe reads, and how to point it at the data."""
    return ValueError(f"data folder {folder} not found: {layout}; point data.root at your copy with "
                      f"--set data.root=/path/to/it (now {root}); the README's section 'Train on real data' shows "
                      f"the folder layouts")
