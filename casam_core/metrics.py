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
