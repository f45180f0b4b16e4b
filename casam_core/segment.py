"""Segment one file: the one path behind ``casam segment`` and each input of ``casam segment-batch``.

    result, info = segment_file(predictor, read_image("brain.nii.gz"), "mask.nii.gz",
                                prompts={"slices": {40: {"boxes": [[x0, y0, x1, y1]], "points": []}},
                                         "propagate": True}, task="auto")

Exactly one source of prompts: ``prompts`` (boxes and points per slice, the prompt-file
format of ``batch.read_prompt_file``; a 2D image's one entry is keyed ``None``), ``coarse`` (a
label map of the image's shape: each label re-segmented from its box, slice by slice) or
``auto`` (the learned task's finder, no prompt). The mask is written atomically.
"""

from __future__ import annotations

import time
from typing import List, Optional, Tuple

import numpy as np

from .dicom_seg import save_mask
from .images import put_slice, take_slice
from .io import MedicalImage, check_mask_path
from .overlay import overlay, save_png, volume_montage
from .predictor import CASamPredictor
from .progress import CancelFn, ProgressFn, check_cancel
from .prompts import box_from_mask, object_masks, propagate_box, propagate_masks


def label_prompts(predictor: CASamPredictor, coords, labels, box, task: Optional[str] = None):
    """The current image or slice segmented in one decoder call: several boxes -> one label each
    (1, 2, ... in order, later on top; points go with every box), points alone -> label 1.
    Returns (label map, the decoder's score of each)."""
    masks, scores, _ = predictor.predict_batch(point_coords=coords, point_labels=labels, box=box, task=task)
    result = np.zeros(masks.shape[2:], np.uint8)
    for i in range(masks.shape[0]):
        result[masks[i, 0]] = i + 1
    return result, [float(v) for v in scores[:, 0]]


def _prompt_slice(predictor: CASamPredictor, entry: dict, task: Optional[str]) -> Tuple[np.ndarray, List[float]]:
    """One slice's prompt-file entry ({"boxes": [[x0, y0, x1, y1], ...], "points": [[x, y, label], ...]})."""
    points = entry.get("points") or []
    coords = np.array([p[:2] for p in points], float) if points else None
    labels = np.array([int(p[2]) for p in points]) if points else None
    boxes = np.array(entry["boxes"], float) if entry.get("boxes") else None
    return label_prompts(predictor, coords, labels, boxes, task)


def _coarse_slice(predictor: CASamPredictor, coarse: np.ndarray, task: Optional[str]) -> np.ndarray:
    """The current image or slice re-segmented from a coarse label map: each label's box."""
    objs = object_masks(coarse, "class")
    result = np.zeros(coarse.shape, np.uint8 if coarse.max() < 256 else np.uint16)
    if not objs:
        return result
    masks, _, _ = predictor.predict_batch(box=np.stack([box_from_mask(m) for _, m in objs]), task=task)
    for (value, _), mask in zip(objs, masks[:, 0]):
        result[mask] = value
    return result


def segment_auto_image(predictor: CASamPredictor, image: MedicalImage, task: Optional[str], axis: int = 0,
                       window=None, progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None):
    """An image or volume as read made current and segmented with no prompt
    (``CASamPredictor.segment_auto``) -> ``AutoResult``."""
    if image.is_volume:
        predictor.set_volume(image.array, axis=axis, window=window)
    else:
        predictor.set_image(image.array, window=window)
    return predictor.segment_auto(task, progress=progress, cancel=cancel)


def auto_label_map(labels: np.ndarray) -> np.ndarray:
    """A zero-click label map in the smallest unsigned type that holds it."""
    return labels.astype(np.uint8 if labels.max(initial=0) <= 255 else np.uint16)


def segment_file(predictor: CASamPredictor, image: MedicalImage, out, *, prompts: Optional[dict] = None,
                 coarse: Optional[np.ndarray] = None, auto: bool = False, task: Optional[str] = None,
                 axis: int = 0, window=None, overlay_path=None, progress: Optional[ProgressFn] = None,
                 cancel: Optional[CancelFn] = None) -> Tuple[np.ndarray, dict]:
    """Segment ``image`` (as read: ``io.read_image``) and write its mask to ``out`` (+ a PNG overlay).

    ``task``: "auto" (the router; one route per image or volume), "none"/None (the frozen model)
    or a task's name. A volume's prompts with ``"propagate": true`` fill the volume from the
    annotated slices (``prompts.propagate_masks``; from one slice, ``propagate_box``); without
    it, only the annotated slices are segmented. Returns (the label map written, info: ``route``
    (the ``TaskChoice``), ``scores`` (of one annotated slice's prompts), ``propagation``
    (the summary), ``objects`` (zero-click), ``mask_voxels``, ``seconds``).
    """
    if sum((prompts is not None, coarse is not None, bool(auto))) != 1:
        raise ValueError("segment_file takes exactly one of prompts, coarse and auto")
    t0 = time.perf_counter()
    check_mask_path(out, volume=image.is_volume, reference=image)  # before any work
    info: dict = {}
    if auto:
        found = segment_auto_image(predictor, image, task, axis, window, progress=progress, cancel=cancel)
        choice, result = found.choice, auto_label_map(found.labels)
        info["objects"] = found.objects
    elif image.is_volume:
        predictor.set_volume(image.array, axis=axis, window=window)
        choice = predictor.choose_task(task, progress=progress, cancel=cancel)
        wide = coarse is not None and coarse.max() > 255
        result = np.zeros(image.array.shape, np.uint16 if wide else np.uint8)
        if prompts is not None:
            drawn = {}
            for k, entry in sorted(prompts["slices"].items()):
                check_cancel(cancel)
                predictor.set_slice(k)
                drawn[k], info["scores"] = _prompt_slice(predictor, entry, choice.layer)
            if len(drawn) > 1:
                del info["scores"]
            if prompts.get("propagate") and len(drawn) == 1:
                (k, mask), = drawn.items()
                filled, info["propagation"] = propagate_box(predictor, k, None, task=choice.decision, progress=progress,
                                                            cancel=cancel, start_mask=mask > 0)
                result[:] = filled
            elif prompts.get("propagate"):
                filled, info["propagation"] = propagate_masks(predictor, {k: m > 0 for k, m in drawn.items()},
                                                              task=choice.decision, progress=progress, cancel=cancel)
                result[:] = filled > 0
            else:
                for k, mask in drawn.items():
                    put_slice(result, k, mask, axis)
        else:
            for k in range(image.array.shape[axis]):
                check_cancel(cancel)
                coarse_k = take_slice(coarse, k, axis)
                if coarse_k.any():
                    predictor.set_slice(k)
                    put_slice(result, k, _coarse_slice(predictor, coarse_k, choice.layer), axis)
    else:
        predictor.set_image(image.array, window=window)
        choice = predictor.choose_task(task, cancel=cancel)
        if prompts is not None:
            result, info["scores"] = _prompt_slice(predictor, prompts["slices"][None], choice.layer)
        else:
            result = _coarse_slice(predictor, coarse, choice.layer)
    save_mask(result, out, reference=image)  # atomic
    if overlay_path:  # built only when asked for: a full-size picture can be large
        first = next(iter(prompts["slices"].items()), (None, {})) if prompts is not None else (None, {})
        box = first[1]["boxes"][0] if first[1].get("boxes") else None
        # a volume's montage reuses the predictor's once-windowed uint8 volume
        picture = (volume_montage(predictor.volume.volume, result, axis, box_slice=first[0], box=box)
                   if image.is_volume else overlay(image.array, result, box))
        save_png(picture, overlay_path)
        info["overlay"] = str(overlay_path)
    info.update(route=choice, mask_voxels=int((result > 0).sum()), seconds=round(time.perf_counter() - t0, 3))
    return result, info

