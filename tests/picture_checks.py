"""What a stage's PNG must be: an image PIL opens, of a readable size, not blank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def assert_picture(path: Path, min_width: int = 400, min_height: int = 250) -> np.ndarray:
    """The image's pixels (H, W, 3); fails if it is no PNG, too small or one flat colour."""
    with Image.open(path) as image:
        assert image.format == "PNG", f"{path}: {image.format}"
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width, _ = pixels.shape
    assert width >= min_width and height >= min_height, f"{path}: {width}x{height}"
    assert pixels.var() > 0, f"{path}: blank"
    return pixels
