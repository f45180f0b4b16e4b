"""What one learning step optimises: a training image's objects with the prompts drawn from them,
method.md's intensity augmentation, and the task loss (Focal + Dice + IoU-MSE, all weight 1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
import torch
import torch.nn.functional as F

from .predictor import ImageRecord
from .prompts import box_from_mask, object_masks


@dataclass
class TrainingObject:
    """One object of a training image, on the decoder's low-res grid, with what its prompts are drawn from."""

    slice_index: int  # into the embedded list
    target: torch.Tensor  # (L, L) float, L = low-res size
    near_points: np.ndarray  # (K, 2) x, y on the low-res grid: the half nearest the centroid
    box: np.ndarray  # x0, y0, x1, y1 of the largest connected region, low-res grid


def augment_intensity(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """method.md's intensity augmentation on the [0, 1] image: scale by up to +-20 % (p 0.2),
    shift by up to +-0.2 (p 0.2). For a fixed copy at least one of the two is applied."""
    x = rgb.astype(np.float32) / 255.0
    while True:
        do_scale, do_shift = rng.random() < 0.2, rng.random() < 0.2
        if do_scale or do_shift:
            break
    if do_scale:
        x = x * (1.0 + rng.uniform(-0.2, 0.2))
    if do_shift:
        x = x + rng.uniform(-0.2, 0.2)
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def objects_for(labels: np.ndarray, objects: str, record: ImageRecord, img_size: int, low: int,
                slice_index: int) -> List[TrainingObject]:
    """The objects of a label map (``objects``: "class" or "instance") as ``TrainingObject``s on the
    ``low`` x ``low`` grid of an image embedded as ``record`` (objects smaller than one cell are left out)."""
    out = []
    from scipy import ndimage

    h_in, w_in = record.input_size
    for _, mask in object_masks(labels, objects):
        m = torch.from_numpy(mask.astype(np.float32))[None, None]
        m = F.interpolate(m, size=(h_in, w_in), mode="bilinear", align_corners=False)
        m = F.pad(m, (0, img_size - w_in, 0, img_size - h_in))
        if low != img_size:
            m = F.interpolate(m, size=(low, low), mode="bilinear", align_corners=False)
        target = (m[0, 0] >= 0.5)
        if not target.any():  # smaller than one low-res pixel: cannot be learned at this scale
            continue
        t = target.numpy()
        comp, n = ndimage.label(t, structure=np.ones((3, 3), bool))
        largest = comp == (1 + int(np.argmax(ndimage.sum(t, comp, range(1, n + 1))))) if n > 1 else t
        ys, xs = np.nonzero(t)
        d = (xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2
        near = np.argsort(d, kind="stable")[: max(1, (len(d) + 1) // 2)]
        out.append(TrainingObject(slice_index, target.float(), np.stack([xs[near], ys[near]], 1).astype(np.float32),
                           box_from_mask(largest).astype(np.float32)))
    return out


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25) -> torch.Tensor:
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    p = torch.sigmoid(logits)
    return 1 - (2 * (p * target).sum() + smooth) / (p.sum() + target.sum() + smooth)


def soft_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    inter = (p * t).sum(1)
    return inter / (p.sum(1) + t.sum(1) - inter + 1e-6)


def task_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Focal + Dice + MSE(IoU prediction, soft IoU of the prediction), all weight 1.

    ``logits`` (M, L, L), ``iou_pred`` (M,), ``target`` (M, L, L) in {0, 1}.
    """
    return (focal_loss(logits, target) + dice_loss(logits, target)
            + F.mse_loss(iou_pred, soft_iou(logits, target).detach()))
