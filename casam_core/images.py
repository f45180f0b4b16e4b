"""Image arrays for the backbone: intensities to uint8, RGB, and slices of a volume.

Intensities (``normalize_intensity``) become uint8 for the backbone:
- uint8 input (PNG/JPEG and 8-bit volumes) is already display-ready: unchanged;
- CT in Hounsfield units: a window preset (``WINDOWS``) when asked for;
- anything else (MR, 16-bit, float): clipped to the 0.5-99.5 percentiles of the
  whole image or volume, then scaled to 0..255;
- NaN/Inf become the lowest finite value; a constant image becomes zeros; an image with no
  finite value is refused.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import numpy as np

from .errors import ImageIOError, OptionError, PromptError, look_up_option

# (width, level) in Hounsfield units
WINDOWS: Dict[str, Tuple[float, float]] = {
    "soft_tissue": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
}
PERCENTILES = (0.5, 99.5)


def check_finite(array: np.ndarray, what) -> None:
    """Refuse an image with no finite pixel value (all NaN or infinite)."""
    if np.issubdtype(array.dtype, np.floating) and array.size and not np.isfinite(array).any():
        raise ImageIOError(f"{what} has no finite pixel value (all NaN or infinite)")


def normalize_intensity(array: np.ndarray, window: Optional[Union[str, Tuple[float, float]]] = None,
                        percentiles: Tuple[float, float] = PERCENTILES, keep_uint8: bool = True) -> np.ndarray:
    """Any numeric image or volume -> uint8 of the same shape (see the module notes).

    ``keep_uint8``: return uint8 input unchanged (2D photos, PNG/JPEG); volumes pass
    False so that an 8-bit MR volume is still windowed to its percentiles.
    """
    a = np.asarray(array)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    if not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"cannot normalise an array of dtype {a.dtype}")
    if a.dtype == np.uint8 and window is None and keep_uint8:
        return a
    check_finite(a, "the image")
    a = a.astype(np.float32, copy=True)
    finite = np.isfinite(a)
    if not finite.all():
        fill = float(a[finite].min()) if finite.any() else 0.0
        a[~finite] = fill
    if window is not None:
        if isinstance(window, str):
            width, level = WINDOWS[look_up_option(window, WINDOWS, "CT window")]
        else:
            width, level = (float(v) for v in window)
        if width <= 0:
            raise OptionError(f"a window width must be positive, got {width}")
        lo, hi = level - width / 2.0, level + width / 2.0
    else:
        sample = a if a.size <= 4_000_000 else a.ravel()[:: a.size // 4_000_000 + 1]
        lo, hi = (float(v) for v in np.percentile(sample, percentiles))
        if hi <= lo:  # e.g. mostly background: fall back to the full range
            lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    out = (np.clip(a, lo, hi) - lo) * (255.0 / (hi - lo))
    return np.round(out).astype(np.uint8)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) -> contiguous (H, W, 3)."""
    if image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[..., None], 3, axis=2))
    if image.ndim == 3 and image.shape[2] == 3:
        return np.ascontiguousarray(image)
    raise ImageIOError(f"expected a gray or RGB image, got shape {image.shape}")


def take_slice(volume: np.ndarray, index: int, axis: int = 0) -> np.ndarray:
    """Slice ``index`` of a volume along ``axis`` (a view where numpy can give one)."""
    if not 0 <= index < volume.shape[axis]:
        raise PromptError(f"slice {index} is outside 0..{volume.shape[axis] - 1} along axis {axis}")
    return np.take(volume, index, axis=axis)


def put_slice(volume: np.ndarray, index: int, values: np.ndarray, axis: int = 0) -> None:
    """Write ``values`` into slice ``index`` of ``volume`` along ``axis``, in place (``take_slice``'s other half)."""
    if not 0 <= index < volume.shape[axis]:
        raise PromptError(f"slice {index} is outside 0..{volume.shape[axis] - 1} along axis {axis}")
    where = [slice(None)] * volume.ndim
    where[axis] = index
    volume[tuple(where)] = values
