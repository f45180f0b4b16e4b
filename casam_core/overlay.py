"""Overlay pictures of masks on images (PNG), for the CLI and reports."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .images import normalize_intensity, take_slice, to_rgb
from .files import atomic_write

COLORS = np.array([[255, 64, 64], [64, 200, 255], [255, 200, 0], [120, 255, 120], [220, 120, 255]], np.float32)


def _edges(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask)


def overlay(image: np.ndarray, mask: np.ndarray, box: Optional[Sequence[float]] = None,
            alpha: float = 0.4) -> np.ndarray:
    """RGB uint8 picture: the image, each label of ``mask`` tinted with its outline, and the box."""
    rgb = to_rgb(normalize_intensity(image)).astype(np.float32)
    mask = np.asarray(mask)
    for i, value in enumerate(v for v in np.unique(mask) if v != 0):
        m = mask == value
        color = COLORS[i % len(COLORS)]
        rgb[m] = (1 - alpha) * rgb[m] + alpha * color
        rgb[_edges(m)] = color
    out = np.clip(rgb, 0, 255).astype(np.uint8)
    if box is not None:
        h, w = out.shape[:2]
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        x0, x1 = np.clip([x0, x1], 0, w - 1)
        y0, y1 = np.clip([y0, y1], 0, h - 1)
        green = np.array([0, 255, 0], np.uint8)
        out[y0, x0:x1 + 1] = out[y1, x0:x1 + 1] = green
        out[y0:y1 + 1, x0] = out[y0:y1 + 1, x1] = green
    return out


def volume_montage(volume: np.ndarray, mask: np.ndarray, axis: int = 0, n: int = 6,
                   box_slice: Optional[int] = None, box: Optional[Sequence[float]] = None) -> np.ndarray:
    """Up to ``n`` slices across the segmented range, side by side.

    ``volume``: an already windowed uint8 volume (e.g. ``predictor.volume.volume``), used
    as it is, or a raw one, windowed here once for the whole volume.
    """
    vol8 = volume if volume.dtype == np.uint8 else normalize_intensity(volume, keep_uint8=False)
    other = tuple(a for a in range(3) if a != axis)
    present = np.nonzero(np.asarray(mask).any(axis=other))[0]
    if present.size == 0:
        present = np.array([volume.shape[axis] // 2])
    picks = np.unique(np.linspace(present.min(), present.max(), min(n, present.size)).round().astype(int))
    tiles = [overlay(take_slice(vol8, k, axis), take_slice(mask, k, axis), box if k == box_slice else None)
             for k in picks]
    gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
    row = [t for tile in tiles for t in (tile, gap)][:-1]
    return np.concatenate(row, axis=1)


def save_png(rgb: np.ndarray, path) -> Path:
    from PIL import Image

    path = Path(path)
    with atomic_write(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return path
