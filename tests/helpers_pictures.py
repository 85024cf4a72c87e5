"""Checks of a written picture: a real PNG of a sensible size that is not blank (never pixels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def assert_picture(path: Path, min_width: int = 300, min_height: int = 200, min_colors: int = 20):
    """`path` is a PNG at least `min_width` x `min_height` pixels with at least `min_colors`
    distinct colours (a blank or one-colour image has 1 or 2); returns the (H, W, C) array."""
    from matplotlib.image import imread

    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    image = imread(path)  # (H, W, 3 or 4) floats in [0, 1]
    height, width = image.shape[:2]
    assert width >= min_width and height >= min_height, f"{path}: {width} x {height} pixels"
    rgb = (image[..., :3] * 255).round().astype(np.int64).reshape(-1, 3)  # (H*W, 3)
    colors = len(np.unique(rgb @ np.array([1 << 16, 1 << 8, 1])))  # one integer per colour
    assert colors >= min_colors, f"{path}: only {colors} distinct colours"
    return image
