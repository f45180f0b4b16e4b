"""Prompts: checked and carried into the model frame once (``model_prompts``), derived from masks, and boxes
propagated through a volume."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import NoImageError, PromptError
from .images import put_slice
from .progress import CancelFn, ProgressFn, check_cancel, report


def check_prompts_given(point_coords, point_labels, box, mask_input) -> None:
    """The checks every way of prompting shares: labels with points, and some prompt at all."""
    if point_coords is not None and point_labels is None:
        raise PromptError("point_labels are needed with point_coords (1 = foreground, 0 = background)")
    if point_coords is None and box is None and mask_input is None:
        raise PromptError("give at least one prompt: a point, a box or a mask")


def model_prompts(backbone, original_size: Tuple[int, int], point_coords, point_labels, box, mask_input, device):
    """Prompts in pixels of the original image, checked (one ``PromptError`` line each: shape,
    range, finiteness, order) and carried into the model's frame as torch tensors -> (points
    (coords (B, N, 2), labels (B, N)) or None, boxes (B, 4) or None, masks (B, 1, S, S) or None)."""
    import torch

    check_prompts_given(point_coords, point_labels, box, mask_input)
    h, w = original_size
    dev = device
    boxes_t = points = masks_t = None
    batch = 1
    if box is not None:
        b = np.asarray(box, dtype=np.float64)
        if b.ndim == 1:
            b = b[None]
        if b.ndim != 2 or b.shape[1] != 4 or b.shape[0] == 0:
            raise PromptError(f"box must be (4,) or (B, 4) as x0, y0, x1, y1; got shape {np.shape(box)}")
        if not np.isfinite(b).all():
            raise PromptError("box coordinates must be finite numbers")
        if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
            raise PromptError(f"box needs x0 <= x1 and y0 <= y1; got {b.tolist()}")
        outside = (b[:, 2] < 0) | (b[:, 0] > w - 1) | (b[:, 3] < 0) | (b[:, 1] > h - 1)
        if outside.any():
            raise PromptError(f"box {b[outside][0].tolist()} lies entirely outside the {w}x{h} image")
        b = np.stack([np.clip(b[:, 0], 0, w - 1), np.clip(b[:, 1], 0, h - 1),
                      np.clip(b[:, 2], 0, w - 1), np.clip(b[:, 3], 0, h - 1)], axis=1)
        batch = b.shape[0]
        boxes_t = torch.as_tensor(backbone.transform_boxes(b, (h, w)), dtype=torch.float32, device=dev)
    if point_coords is not None:
        c = np.asarray(point_coords, dtype=np.float64)
        lab = np.asarray(point_labels)
        if c.ndim == 2:
            c, lab = c[None], lab.reshape(1, -1)
        if c.ndim != 3 or c.shape[2] != 2 or lab.shape != c.shape[:2] or c.shape[1] == 0:
            raise PromptError(
                f"point_coords must be (N, 2) with point_labels (N,); got {np.shape(point_coords)} "
                f"and {np.shape(point_labels)}"
            )
        if not np.isfinite(c).all():
            raise PromptError("point coordinates must be finite numbers")
        if (c[..., 0] < 0).any() or (c[..., 0] > w - 1).any() or (c[..., 1] < 0).any() or (c[..., 1] > h - 1).any():
            raise PromptError(f"a point lies outside the {w}x{h} image")
        if not np.isin(lab, (0, 1)).all():
            raise PromptError("point labels must be 1 (foreground) or 0 (background)")
        if c.shape[0] == 1 and batch > 1:
            c, lab = np.repeat(c, batch, 0), np.repeat(lab, batch, 0)
        elif c.shape[0] != batch and box is not None:
            raise PromptError(f"{c.shape[0]} point sets for {batch} boxes")
        batch = c.shape[0]
        coords_t = torch.as_tensor(backbone.transform_coords(c, (h, w)), dtype=torch.float32, device=dev)
        points = (coords_t, torch.as_tensor(lab, dtype=torch.int, device=dev))
    if mask_input is not None:
        m = torch.as_tensor(np.asarray(mask_input), dtype=torch.float32, device=dev)
        if m.ndim == 3:
            m = m[None]
        size = 4 * backbone.embedding_shape[1]
        if m.ndim != 4 or m.shape[1:] != (1, size, size):
            raise PromptError(f"mask_input must be (1, {size}, {size}) low-res logits; got {tuple(m.shape)}")
        if m.shape[0] == 1 and batch > 1:
            m = m.expand(batch, -1, -1, -1)
        masks_t = m
    return points, boxes_t, masks_t


def box_from_mask(mask: np.ndarray) -> Optional[np.ndarray]:
    """Tight box (x0, y0, x1, y1) in pixel coordinates of a 2D mask; None if empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)


def click_from_mask(mask: np.ndarray) -> Optional[np.ndarray]:
    """One positive click for an object: (x, y) of the mask pixel nearest the mask's centroid
    (ties: the first in row-major order). None for an empty mask."""
    ys, xs = np.nonzero(np.asarray(mask))
    if len(xs) == 0:
        return None
    d = (xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2
    k = int(np.argmin(d))
    return np.array([xs[k], ys[k]], dtype=np.float64)


def expand_box(box: np.ndarray, shape, margin: float = 0.05, min_px: float = 3.0) -> np.ndarray:
    """Grow a box by ``margin`` of its size on each side (at least ``min_px``), inside the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    dx = max(min_px, margin * (x1 - x0 + 1))
    dy = max(min_px, margin * (y1 - y0 + 1))
    h, w = shape[:2]
    return np.array([max(0.0, x0 - dx), max(0.0, y0 - dy), min(w - 1.0, x1 + dx), min(h - 1.0, y1 + dy)])


def parse_box(text: str) -> List[float]:
    """'x0,y0,x1,y1' -> four floats (CLI and widget fields)."""
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if len(parts) != 4:
        raise PromptError(f"a box is x0,y0,x1,y1; got {text!r}")
    try:
        return [float(p) for p in parts]
    except ValueError as exc:
        raise PromptError(f"a box is four numbers x0,y0,x1,y1; got {text!r}") from exc


def parse_point(text: str) -> Tuple[List[float], int]:
    """'x,y' or 'x,y,label' -> ([x, y], label); label 1 = foreground (default), 0 = background."""
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if len(parts) not in (2, 3):
        raise PromptError(f"a point is x,y or x,y,label; got {text!r}")
    try:
        xy = [float(parts[0]), float(parts[1])]
        label = int(parts[2]) if len(parts) == 3 else 1
    except ValueError as exc:
        raise PromptError(f"a point is x,y[,0|1] with numbers; got {text!r}") from exc
    if label not in (0, 1):
        raise PromptError(f"a point label is 1 (foreground) or 0 (background); got {label}")
    return xy, label


STOP_WORDS = {"volume edge": "it reached the end of the volume",
              "met the other annotation's half": "it met the part filled from the next annotated slice"}
# each stop's "why": the reason in a clinician's words ("reason" keeps the measured numbers)
DEFAULT_MAX_GROWTH = 1.5  # never past the structure on any volume measured: benchmarks/propagation.py
# Re-anchoring by a learned task's finder (benchmarks/reanchor.py: chosen on hippocampus validation volumes, one
# box propagated, mean 3D Dice blind 0.209, finder 0.431, finder without a growth limit 0.496):
ANCHORED_GROWTH = float("inf")  # growth limit on a slice the finder placed (None: max_growth): the finder vouches
FINDER_STOPS = True  # a carry stops where the finder sees nothing in its box (else: carried blindly there)
# Where the decoder is unsure of a finder-placed box (its IoU estimate < min_score), the carried box is decoded on that
# slice instead of stopping the run (BraTS: re-anchored runs stopped within 1-3 slices of the annotated one on the
# decoder's doubt about the finder's box, 3D Dice 0.03-0.06 where the carried box gave 0.30-0.35).
UNSURE_CARRIED = True
# A learned task's features move the decoder's own IoU estimate (it was trained on frozen features only): on BraTS
# true boxes its median fell from 0.82 to 0.51, so learned runs stopped "unsure" within 1-3 slices of the annotated
# one (hippocampus 0.79 -> 0.57). With SCORE_CALIBRATION, a carried (not re-anchored) run reads min_score on the
# task's scale (``score_floor``). Validation volumes, one box carried blindly, mean 3D Dice over four relearnings of
# the tasks: hippocampus 0.310 / 0.385 / 0.353 / 0.342 -> 0.338 / 0.437 / 0.384 / 0.410, BraTS 0.145 / 0.326 / 0.518 /
# 0.297 -> 0.463 / 0.480 / 0.484 / 0.485. A re-anchored run keeps min_score as it is: it has no growth limit on the slices the finder places,
# and the decoder's doubt on the frozen scale is what ends it past the structure (hippocampus re-anchored, the same
# three: 0.541 / 0.556 / 0.560 as it is, 0.505 / 0.532 / 0.544 calibrated).
SCORE_CALIBRATION = True
# A run is re-anchored only where the finder's box on the annotated slice has at least this IoU with the user's box
# (0: wherever the finder has a box there). Chosen among no check and 0.3 / 0.5 / 0.7 on the hippocampus and BraTS
# validation volumes (benchmarks/reanchor.py, 2026-12-07, four relearnings of the tasks): 0.3 had the best mean 3D
# Dice in each (0.457 / 0.497 / 0.494 / 0.487; without the check 0.431 / 0.453 / 0.460 / 0.456): on BraTS's
# validation volume re-anchoring lost badly (0.15-0.20 against 0.46-0.49 carried) and the check keeps 3 of its 5
# structures on the carry; on hippocampus alone the check costs a little (0.529 against 0.553 in the last).
AGREEMENT = 0.3


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x0, y0, x1, y1) boxes in pixels (inclusive ends, as ``box_from_mask``)."""
    inter = (max(min(a[2], b[2]) - max(a[0], b[0]) + 1, 0) * max(min(a[3], b[3]) - max(a[1], b[1]) + 1, 0))
    size_a, size_b = (a[2] - a[0] + 1) * (a[3] - a[1] + 1), (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return float(inter / (size_a + size_b - inter))


def score_floor(predictor, task, min_score: float) -> float:
    """``min_score`` on the scale of the decoder's IoU estimates with ``task``'s features (a carried
    run's "unsure" stop in ``propagate_masks``): scaled by the ratio of its mean estimate on the
    task's held-out objects with the layer to that with the frozen model (the task's card,
    ``validation.iou_estimate``). Unchanged for the frozen model, a task decoded with frozen
    features, a task learned before the card kept the estimates, or with ``SCORE_CALIBRATION`` off."""
    card = predictor.cards.get(task) if task is not None and SCORE_CALIBRATION else None
    if not card or not card.get("use_alignment", True):
        return min_score
    estimate = card.get("validation", {}).get("iou_estimate") or {}
    frozen, aligned = estimate.get("frozen"), estimate.get("aligned")
    return min_score * aligned / frozen if frozen and aligned else min_score


def finder_agreement(predictor, task, index: int, mask: np.ndarray) -> Optional[float]:
    """How well the task's finder outlines, on annotated slice ``index``, the structure the user
    annotated there (``mask``): the IoU of the finder's box under the mask's box with the mask's
    box; 0 when it sees nothing there, ``None`` when the task has no finder."""
    from . import finder  # torch: imported when a volume is propagated, not with the prompts

    own = box_from_mask(mask)
    found = finder.finder_box(predictor, task, predictor.slice_record(index), expand_box(own, mask.shape), mask)
    if found is NotImplemented:
        return None
    return 0.0 if found is None else box_iou(found, own)


def propagate_box(predictor, start: int, box: Optional[Sequence[float]], task=None, max_area_ratio: float = 3.0,
                  min_score: float = 0.5, max_growth: float = DEFAULT_MAX_GROWTH,
                  progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
                  task_for_slice=None, start_mask: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Dict[str, object]]:
    """Segment slice ``start`` of the predictor's volume with ``box``, then carry it up and down
    (``propagate_masks`` with that one slice). With ``start_mask`` (the slice's approved mask,
    in the slice's array order), that mask is kept as it is on slice ``start`` and ``box`` is
    not needed. The summary also has ``start``, ``stopped_up`` and ``stopped_down``.
    """
    vol = _volume_of(predictor)
    if not 0 <= start < vol.n_slices:
        raise PromptError(f"start slice {start} is outside 0..{vol.n_slices - 1}")
    if start_mask is None:
        if box is None:
            raise ValueError("propagate_box needs a box or a start_mask")
        predictor.set_slice(start)
        masks, _, _ = predictor.predict_batch(box=box, task=task_for_slice(start) if task_for_slice else task)
        start_mask = masks[0, 0]
    out, summary = propagate_masks(predictor, {start: start_mask}, task, max_area_ratio, min_score, max_growth,
                                   progress, cancel, task_for_slice)
    stops = {s["direction"]: s["reason"] for s in summary["stops"]}
    summary.update(start=start, stopped_up=stops.get("up", "empty start mask"),
                   stopped_down=stops.get("down", "empty start mask"))
    return out, summary


def _volume_of(predictor):
    vol = predictor.volume
    if vol is None:
        raise NoImageError("propagation needs a volume: call predictor.set_volume() first")
    return vol


def propagate_masks(predictor, annotated: Dict[int, np.ndarray], task=None, max_area_ratio: float = 3.0,
                    min_score: float = 0.5, max_growth: float = DEFAULT_MAX_GROWTH,
                    progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
                    task_for_slice=None, reanchor: bool = True) -> Tuple[np.ndarray, Dict[str, object]]:
    """Fill a volume from the masks of some annotated slices (``{slice: mask}``, each in the
    slice's array order along the predictor's volume axis), as a user annotates: one slice,
    then corrections on others. Annotated slices are kept exactly as they are; an empty one
    says "the structure is not here" and nothing is carried across it.

    - Between two annotated slices with a mask, each end is carried towards the other and they
      meet half-way: every slice is decided by its nearer annotation. The structure is known to
      run between them, so the growth limit is relative to the larger of the two ends' areas, and
      no slice between them is left empty: a slice that neither carry reached (a stop) is
      segmented with the box interpolated between the two annotations' boxes (``summary
      ["bridged"]`` lists them).
    - Below the lowest and above the highest annotated slice, the mask is carried outwards.

    Carrying: each next slice gets the box of the previous slice's mask, grown by 5 % of its
    size (at least 3 px: a tight box makes the mask shrink slice after slice). A direction
    stops when the mask vanishes, when the decoder's own IoU estimate falls under
    ``min_score`` (for a carried run with a learned task, on its scale: ``score_floor``;
    measured on BraTS: past the tumour's end the box keeps catching small
    bright spots, at scores of 0.1-0.5), when the area changes by more than
    ``max_area_ratio`` from one slice to the next (the object ended and the box caught
    something else), or when it exceeds ``max_growth`` x the area of the slice it started
    from: the user annotates where the structure is large, and a mask that keeps growing
    away from there has left it (measured on hippocampus training volumes: the grown box
    drifts into the surrounding tissue and the mask grows slice after slice, up to 10x, with
    the decoder still confident). On six hippocampus training volumes (3 frozen, 3 with a
    learned task) 2x gave the best mean 3D Dice of 1.5, 2, 3 and no limit, but it ran 4
    slices past the structure on the hippocampus sample; ``DEFAULT_MAX_GROWTH`` = 1.5 never
    went past the structure on any volume measured.

    Re-anchoring (``reanchor``, on by default): when the slice's task has a structure finder
    (a learned task, ``casam_core.finder``) and re-anchoring did not lose to the blind carry
    on the task's held-out volume while it learned (its card's ``propagation.reanchor``; on
    BraTS validation volumes it lost, on hippocampus it won; ``summary["carried_by_task"]``
    lists the annotated slices whose runs were carried so), the carried box only says which
    structure to follow; the box given to the decoder is the box of the finder's component
    under it (``finder.finder_box``), so the box follows the structure instead of drifting; a slice so
    placed has no growth limit (the finder vouches for the structure's size there), and a
    direction stops where the finder sees nothing inside the carried box. Where the decoder is
    unsure of the finder's box (its IoU estimate under ``min_score``), the carried box is decoded
    on that slice instead (``UNSURE_CARRIED``; ``summary["carried_where_unsure"]``). ``summary
    ["reanchored"]`` lists the slices segmented from a finder's box. With ``AGREEMENT`` above 0
    the finder is trusted only where it sees what the user annotated: a run is re-anchored when,
    on its annotated slice, the finder's box under the user's mask has IoU >= ``AGREEMENT`` with
    the mask's box, otherwise it is carried as below (``summary["finder_disagreed"]`` lists those
    slices); the default is 0.3 (the constants' comments give the numbers). The frozen model, and
    tasks without a finder, carry the box as described above. ``task`` is the task's name as
    ``predict_batch`` takes it (not ``TaskChoice.layer``): a task whose layer lost to the frozen
    model decodes with frozen features and is still re-anchored by its finder.

    Progress counts the slices still expected: when a direction stops early, the slices it
    would have covered leave the total, so the bar ends full. ``task_for_slice(index)``, when
    given, chooses the task per slice (e.g. the router); otherwise ``task`` is used
    throughout. Returns the (Z, Y, X) mask in the volume's array order and a summary:
    ``annotated``, ``slices`` (every slice that holds the mask), ``stops`` (per carried run:
    from, direction, reason).
    """
    vol = _volume_of(predictor)
    n = vol.n_slices
    expected_shape = tuple(np.delete(vol.volume.shape[:3], vol.axis))
    anchors: Dict[int, np.ndarray] = {}
    for k, m in annotated.items():
        k = int(k)
        if not 0 <= k < n:
            raise PromptError(f"annotated slice {k} is outside 0..{n - 1}")
        m = np.asarray(m, dtype=bool)
        if m.shape != expected_shape:
            raise ValueError(f"the mask of slice {k} has shape {m.shape}; the volume's slices have {expected_shape}")
        anchors[k] = m
    if not anchors:
        raise ValueError("propagation needs at least one annotated slice")
    out = np.zeros(vol.volume.shape, dtype=bool)

    def put(index: int, m: np.ndarray) -> None:
        put_slice(out, index, m, vol.axis)

    def task_of(index: int):
        return task_for_slice(index) if task_for_slice is not None else task

    def segment(index: int, b):
        predictor.set_slice(index)
        masks, scores, _ = predictor.predict_batch(box=b, task=task_of(index))
        return masks[0, 0], float(scores[0, 0])

    floors: Dict[object, float] = {}

    def floor(index: int) -> float:
        """``min_score`` on the scale of the slice's task (``score_floor``)."""
        t = task_of(index)
        if t not in floors:
            floors[t] = score_floor(predictor, t, min_score)
        return floors[t]

    agrees: Dict[int, bool] = {}

    def finder_trusted(a: int) -> bool:
        """Whether runs from annotated slice ``a`` are re-anchored (the finder sees the user's structure)."""
        if a not in agrees:
            chosen = ((predictor.cards.get(task_of(a)) or {}).get("propagation") or {}).get("reanchor", True)
            score = finder_agreement(predictor, task_of(a), a, anchors[a]) if reanchor and chosen else None
            agrees[a] = score is not None and score >= AGREEMENT
            if reanchor and not chosen:
                summary["carried_by_task"].append(a)
            if score is not None and not agrees[a]:
                summary["finder_disagreed"].append(a)
        return agrees[a]

    def anchored_box(index: int, prev: np.ndarray, use_finder: bool):
        """(the box to decode, whether the finder placed it, the carried box); box None: the finder
        sees nothing."""
        carried = expand_box(box_from_mask(prev), prev.shape)
        if not use_finder:
            return carried, False, carried
        from . import finder  # torch: imported when a volume is propagated, not with the prompts

        found = finder.finder_box(predictor, task_of(index), predictor.slice_record(index), carried, prev)
        if found is NotImplemented or (found is None and not FINDER_STOPS):
            return carried, False, carried
        return (None if found is None else expand_box(found, prev.shape)), True, carried

    # the runs to carry: (from slice, direction, last slice it may fill, why it ends there)
    keys = sorted(anchors)
    runs = []
    bridges = []  # (a, b): two annotated slices with a mask, every slice between them to be filled
    growth_base: Dict[Tuple[int, int], int] = {}  # a run's area for the growth limit (between two ends: the larger)
    if anchors[keys[0]].any():
        runs.append((keys[0], -1, 0, "volume edge"))
    for a, b in zip(keys, keys[1:]):
        if anchors[a].any() and anchors[b].any():
            middle = (a + b) // 2
            runs += [(a, 1, middle, "met the other annotation's half"), (b, -1, middle + 1, "met the other annotation's half")]
            bridges.append((a, b))
            larger = max(int(anchors[a].sum()), int(anchors[b].sum()))
            growth_base[(a, 1)] = growth_base[(b, -1)] = larger
        elif anchors[a].any():
            runs.append((a, 1, b - 1, f"annotated as empty at slice {b}"))
        elif anchors[b].any():
            runs.append((b, -1, a + 1, f"annotated as empty at slice {a}"))
    if anchors[keys[-1]].any():
        runs.append((keys[-1], 1, n - 1, "volume edge"))
    for k in keys:
        put(k, anchors[k])
    summary: Dict[str, object] = {"annotated": keys, "slices": [k for k in keys if anchors[k].any()], "stops": [],
                                  "reanchored": [], "finder_disagreed": [], "carried_where_unsure": [],
                                  "carried_by_task": []}
    total = sum((last - a) * direction for a, direction, last, _ in runs)  # slices still expected
    done = 0
    filled = set(summary["slices"])
    for a, direction, last, reason in runs:
        plain = STOP_WORDS.get(reason.split(" at slice")[0], reason)
        if reason.startswith("annotated as empty"):
            plain = f"slice {reason.rsplit(' ', 1)[-1]} was annotated as empty"
        first = anchors[a]
        start_area = growth_base.get((a, direction), int(first.sum()))
        prev = first
        index = a + direction
        use_finder = reanchor and (index - last) * direction <= 0 and finder_trusted(a)
        while (index - last) * direction <= 0:
            check_cancel(cancel)
            box, by_finder, carried = anchored_box(index, prev, use_finder)
            mask, score = segment(index, box) if box is not None else (np.zeros_like(prev), 0.0)
            unsure = min_score if use_finder else floor(index)  # (SCORE_CALIBRATION: carried runs)
            if by_finder and box is not None and score < unsure and UNSURE_CARRIED:
                mask, score = segment(index, carried)  # the decoder doubts the finder's box: the carried one
                by_finder = False
                summary["carried_where_unsure"].append(index)
            done += 1
            report(progress, done, total, f"propagating: slice {index}")
            area, prev_area = int(mask.sum()), int(prev.sum())
            why = words = None
            if box is None:
                why = f"the task's finder sees nothing in the carried box at slice {index}"
                words = f"the learned task no longer finds the structure at slice {index}"
            elif area == 0:
                why = f"mask vanished at slice {index}"
                words = f"the structure is no longer found at slice {index}"
            elif score < unsure:
                why = f"predicted IoU {score:.2f} < {unsure:.2f} at slice {index}"
                words = f"the model was unsure of the outline at slice {index}"
            elif area > max_area_ratio * prev_area or area * max_area_ratio < prev_area:
                why = f"area jumped from {prev_area} to {area} px at slice {index}"
                words = f"the outline changed size abruptly at slice {index} ({prev_area} to {area} pixels)"
            elif area > (limit := ANCHORED_GROWTH if by_finder and ANCHORED_GROWTH else max_growth) * start_area:
                why = f"area {area} px > {limit} x the start slice's {start_area} px at slice {index}"
                words = (f"the outline grew to {area / max(start_area, 1):.1f} times its size on the annotated "
                         f"slice at slice {index}, as when it spills into a neighbouring structure")
            if why is not None:
                reason, plain = why, words
                total -= (last - index) * direction  # the slices this run will not reach
                report(progress, done, total, f"propagating: stopped at slice {index}")
                break
            put(index, mask)
            summary["slices"].append(index)
            if by_finder:
                summary["reanchored"].append(index)
            filled.add(index)
            prev = mask
            index += direction
        summary["stops"].append({"from": a, "direction": "up" if direction > 0 else "down", "reason": reason,
                                 "why": plain})
    summary["bridged"] = []
    for a, b in bridges:  # slices between two annotations that neither carry reached
        box_a, box_b = box_from_mask(anchors[a]), box_from_mask(anchors[b])
        for index in range(a + 1, b):
            if index in filled:
                continue
            check_cancel(cancel)
            t = (index - a) / (b - a)
            mask, _ = segment(index, expand_box((1 - t) * box_a + t * box_b, anchors[a].shape))
            if mask.any():
                put(index, mask)
                summary["slices"].append(index)
                summary["bridged"].append(index)
    summary["slices"] = sorted(summary["slices"])
    return out, summary


def object_masks(labels: np.ndarray, objects: str = "class",
                 label_values: Optional[Sequence[int]] = None) -> List[Tuple[int, np.ndarray]]:
    """The objects a label map holds, one binary mask each, as (label value, mask).

    ``objects="class"``: one mask per non-zero label value present; ``"instance"``: one
    mask per 8-connected component of the foreground (label value = component number).
    ``label_values`` restricts which values count as foreground.
    """
    labels = np.asarray(labels)
    if objects not in ("class", "instance"):
        raise ValueError(f"objects must be 'class' or 'instance', got {objects!r}")
    values = [int(v) for v in np.unique(labels) if v != 0]
    if label_values is not None:
        values = [v for v in values if v in set(int(x) for x in label_values)]
    if objects == "class":
        return [(v, labels == v) for v in values]
    from scipy import ndimage

    comp, n = ndimage.label(np.isin(labels, values), structure=np.ones((3, 3), bool))
    return [(i, comp == i) for i in range(1, n + 1)]
