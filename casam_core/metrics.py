"""Segmentation metrics on binary masks."""

from __future__ import annotations

import numpy as np


def _pair(pred: np.ndarray, gt: np.ndarray):
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {gt.shape}")
    return pred, gt


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2|P∩G| / (|P| + |G|); 1.0 when both are empty."""
    pred, gt = _pair(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & gt).sum()) / total


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """|P∩G| / |P∪G|; 1.0 when both are empty."""
    pred, gt = _pair(pred, gt)
    union = int((pred | gt).sum())
    return 1.0 if union == 0 else int((pred & gt).sum()) / union


def boundary_band(mask: np.ndarray, width: int) -> np.ndarray:
    """The mask's boundary (mask minus its 3x3 erosion) dilated by a ``width`` x ``width`` square."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    edge = mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)
    if width <= 1 or not edge.any():
        return edge
    return ndimage.maximum_filter(edge.astype(np.uint8), size=width, mode="constant") > 0


def boundary_width(shape) -> int:
    """round(0.02 x image diagonal), forced odd (method.md)."""
    width = int(round(0.02 * float(np.hypot(shape[0], shape[1]))))
    return max(1, width if width % 2 == 1 else width + 1)


def boundary_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of the two masks' boundary bands; 1.0 when both are empty."""
    pred, gt = _pair(pred, gt)
    width = boundary_width(gt.shape)
    return iou(boundary_band(pred, width), boundary_band(gt, width))


def forgetting(matrix: np.ndarray) -> float:
    """F = mean over i < T of (max_{t<T} a[t, i] - a[T, i]); ``matrix[t, i]`` = score on task i after stage t.

    Entries for tasks not seen yet (i > t) are ignored; needs at least two stages.
    """
    a = np.asarray(matrix, dtype=float)
    last = a.shape[0] - 1
    if last < 1:
        return 0.0
    return float(np.mean([np.max(a[i:last, i]) - a[last, i] for i in range(last)]))


def backward_transfer(matrix: np.ndarray) -> float:
    """BWT = mean over i < T of (a[T, i] - a[i, i])."""
    a = np.asarray(matrix, dtype=float)
    last = a.shape[0] - 1
    if last < 1:
        return 0.0
    return float(np.mean([a[last, i] - a[i, i] for i in range(last)]))
