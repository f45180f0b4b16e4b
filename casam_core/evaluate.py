"""The paper's evaluation on a dataset folder (the ../shared/data format).

Prompts (``prompt="box"``, the paper's protocol): the tight ground-truth box of each
foreground class present in an image (or of each connected component for "instance"
datasets); one binary mask per box. ``prompt="point"``: ONE positive click per object, at
the mask pixel nearest the object's centroid, and no box. A click is decoded the way the
chosen model decodes clicks (``CASamPredictor.click_decoding``): once, on a learned task that
learned clicks; on the frozen LiteMedSAM (box-trained) through the predictor's box search. Metrics per
mask: IoU, Dice, boundary IoU; averaged over an image's masks, then over the images.

Volumes are evaluated slice by slice along ``axis``: every slice with foreground is an
image; the volume is routed once (``CASamPredictor.route_volume``) and its slices share
that route.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

from .io import read_image, read_labels
from .datasets import Dataset, read_dataset
from .images import take_slice
from .metrics import boundary_iou, dice, iou
from .errors import look_up_option
from .predictor import CASamPredictor
from .progress import CancelFn, ProgressFn, check_cancel, report
from .prompts import box_from_mask, click_from_mask, object_masks
from .tasks import AUTO, TaskChoice, coverage

BOX_CHUNK = 64  # boxes decoded per call (instance sets have hundreds of nuclei per image)
FROZEN = "frozen"
PROMPTS = ("box", "point")


def _route_label(choice: TaskChoice) -> str:
    return FROZEN if choice.decision is None else choice.decision


METRICS = {"iou": iou, "dice": dice, "biou": boundary_iou}
ESTIMATE = "estimate"  # beside METRICS' names: the decoder's own IoU estimate of each object's mask


def object_metrics(predictor: CASamPredictor, z, record, objs, prompt: str = "box",
                   metrics=tuple(METRICS), **click_decoding) -> Dict[str, List[float]]:
    """IoU, Dice and boundary IoU (or the named ``metrics``; ``ESTIMATE``: the decoder's own IoU
    estimate) of each object (label, mask), segmented on features ``z`` from its GT box, or from
    one click at its pixel nearest the centroid (``prompt="point"``)."""
    look_up_option(prompt, PROMPTS, "prompt")
    out = {name: [] for name in metrics}
    for start in range(0, len(objs), BOX_CHUNK):
        chunk = objs[start:start + BOX_CHUNK]
        if prompt == "box":
            masks, scores, _ = predictor.predict_features(z, record,
                                                          box=np.stack([box_from_mask(m) for _, m in chunk]))
        else:
            clicks = np.stack([click_from_mask(m) for _, m in chunk])[:, None]
            masks, scores, _ = predictor.predict_features(z, record, point_coords=clicks,
                                                          point_labels=np.ones(clicks.shape[:2], int),
                                                          **click_decoding)
        for i, (_, gt) in enumerate(chunk):
            for name in metrics:
                out[name].append(float(scores[i, 0]) if name == ESTIMATE else METRICS[name](masks[i, 0], gt))
    return out


def score_current(predictor: CASamPredictor, labels: np.ndarray, objects: str, choice: TaskChoice,
                  prompt: str = "box") -> Dict:
    """Segment every object of the current image from its GT box (or one click) with the chosen layer."""
    record = predictor.current_record()
    z = predictor.task_features(choice.layer, record)
    return object_metrics(predictor, z, record, object_masks(labels, objects), prompt,
                          **predictor.click_decoding(choice.layer))


def evaluate_dataset(predictor: CASamPredictor, dataset: Union[str, Path, Dataset], split: str = "test",
                     task: Optional[str] = "auto", limit: Optional[int] = None, axis: int = 0,
                     progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
                     prompt: str = "box") -> dict:
    """Evaluate ``task`` ("auto" = routed, "none" = frozen, or a task name) on a split, with GT
    boxes or one click per object (``prompt``).

    Returns ``{"dataset", "split", "task", "prompt", "n_images", "iou", "dice", "biou", "routes",
    "per_image"}``; ``routes`` counts images per chosen task (``"frozen"`` for the frozen model).
    """
    look_up_option(prompt, PROMPTS, "prompt")
    ds = dataset if isinstance(dataset, Dataset) else read_dataset(dataset)
    cases = ds.cases(split)[:limit]
    mode = "none" if task is None else task
    per_image: List[dict] = []
    routes: Dict[str, int] = {}
    for done, case in enumerate(cases, start=1):
        check_cancel(cancel)
        image = read_image(case.image)
        labels = read_labels(case.mask, like=image).array
        if not image.is_volume:
            predictor.set_image(image.array)
            chosen = predictor.choose_task(task)
            if not (labels != 0).any():
                continue
            m = score_current(predictor, labels, ds.objects, chosen, prompt)
            per_image.append(_row(case.image.name, chosen, m))
            routes[_route_label(chosen)] = routes.get(_route_label(chosen), 0) + 1
        else:
            predictor.set_volume(image.array, axis=axis)
            if task is not None and task.lower() == "auto":
                predictor.route_volume(cancel=cancel)  # every slice embedded, with cancel, before the choice
            chosen = predictor.choose_task(task)
            for k in range(labels.shape[axis]):
                lab = take_slice(labels, k, axis)
                if not (lab != 0).any():
                    continue
                check_cancel(cancel)
                predictor.set_slice(k)
                m = score_current(predictor, lab, ds.objects, chosen, prompt)
                per_image.append(_row(f"{case.image.name}[{k}]", chosen, m))
                routes[_route_label(chosen)] = routes.get(_route_label(chosen), 0) + 1
        report(progress, done, len(cases), f"evaluating: {case.image.name}")
    mean = (lambda key: float(np.mean([r[key] for r in per_image])) if per_image else float("nan"))
    return {"dataset": ds.name, "split": split, "task": mode, "prompt": prompt, "n_images": len(per_image),
            "iou": mean("iou"), "dice": mean("dice"), "biou": mean("biou"), "routes": routes,
            "per_image": per_image}


def _row(name: str, chosen: TaskChoice, m: Dict[str, List[float]]) -> dict:
    return {"image": name, "route": _route_label(chosen), "objects": len(m["dice"]),
            "iou": float(np.mean(m["iou"])), "dice": float(np.mean(m["dice"])), "biou": float(np.mean(m["biou"]))}


def rank_by_coverage(predictor: CASamPredictor, items, axis: int = 0, window=None,
                     progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None) -> List[dict]:
    """Which images the learned tasks do not cover, least covered first: the to-do list of what
    to annotate next. ``items``: (name, array, is_volume). Each is routed as ``--task auto``
    routes it (a volume once, from all its slices); the predictor's current image changes.
    Rows: name, decision (None: frozen model), nearest_task, score_over_tau (None without
    tasks), covered, rank."""
    rows = []
    items = list(items)
    for k, (name, array, is_volume) in enumerate(items, start=1):
        check_cancel(cancel)
        if is_volume:
            predictor.set_volume(array, axis=axis, window=window)
        else:
            predictor.set_image(array, window=window)
        choice = predictor.choose_task(AUTO, cancel=cancel)
        ratio = coverage(choice)
        nearest = min(choice.scores, key=lambda t: choice.scores[t] / choice.tau[t]) if ratio is not None else None
        rows.append({"name": name, "decision": choice.decision, "nearest_task": nearest,
                     "score_over_tau": None if ratio is None else round(float(ratio), 4),
                     "covered": choice.decision is not None})
        report(progress, k, len(items), f"routing: {name}")
    rows.sort(key=lambda r: -np.inf if r["score_over_tau"] is None else -r["score_over_tau"])
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows
