"""Zero-click segmentation with a learned task: its finder says where, its decoder draws.

``CASamPredictor.segment_auto`` is the entry point; this module holds the steps it runs on
the predictor's current image or volume (no prompts):

1. the task: the one asked for, or the router's ("auto"); the frozen model and images no
   task recognises get ``NoAutoSegmentation`` with the reason in one line;
2. the finder's heat on the frozen embedding of the image, or of every slice of the volume;
3. the structures (``finder.find_objects``; a volume's are linked through its slices);
4. each structure's box on each of its slices, decoded with the task's features.

``auto_dice`` is the finder's held-out check during learning (the same steps on one image).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from .errors import PromptError
from .finder import FoundObject, find_objects, heat_on_image, heat_on_slices
from .metrics import dice
from .progress import CancelFn, ProgressFn, check_cancel, report
from .tasks import TaskChoice, describe_route


HEAT_BATCH = 16  # slices per finder call in a volume


class NoAutoSegmentation(PromptError):
    """This image cannot be segmented without prompts (the reason is the message)."""


@dataclass
class AutoResult:
    """``labels``: the label map (image (H, W) or volume in its array order), 0 = background;
    ``objects``: one entry per structure found (label value, slices, the finder's certainty);
    ``choice``: the task that segmented it."""

    labels: np.ndarray
    objects: List[dict] = field(default_factory=list)
    choice: Optional[TaskChoice] = None


def check_task(predictor, choice: TaskChoice):
    """The finder of the chosen task, or ``NoAutoSegmentation`` saying why there is none."""
    if choice.decision is None:
        if choice.mode == "frozen":
            raise NoAutoSegmentation("the frozen model cannot find structures without a prompt: choose a learned "
                                     "task (or auto), or draw a box")
        if not choice.scores:
            raise NoAutoSegmentation("no learned task for this backbone: learn one first, or draw a box")
        raise NoAutoSegmentation(f"no learned task recognises this image ({describe_route(choice)}): draw a box "
                                 f"or click")
    finder = predictor.finders.get(choice.decision)
    if finder is None:
        raise NoAutoSegmentation(f"task {choice.decision} has no structure finder (learned before tasks had one): "
                                 f"learn it again to segment without prompts, or draw a box")
    return finder


def _spec(predictor, name: str) -> dict:
    return predictor.cards.get(name, {}).get("finder", {})


def decode_objects(predictor, found: List[FoundObject], layer: Optional[str], record_of, shape,
                   cancel: Optional[CancelFn] = None, progress: Optional[ProgressFn] = None,
                   objects: str = "class") -> np.ndarray:
    """Decode every found structure's box on each of its slices; a label map of ``shape``
    ((H, W) for one image with slice key 0, else (S, H, W) in slice order along axis 0)."""
    out = np.zeros(shape, dtype=np.int32)
    per_slice: Dict[int, List[tuple]] = {}
    for n, obj in enumerate(sorted(found, key=lambda o: o.heat), start=1):  # instances numbered surest last
        value = n if objects == "instance" else obj.label
        for k, box in obj.boxes.items():
            per_slice.setdefault(k, []).append((value, box))
    for done, (k, items) in enumerate(sorted(per_slice.items()), start=1):
        check_cancel(cancel)
        record = record_of(k)
        z = predictor.task_features(layer, record)
        logits, _, _ = predictor.predict_features(z, record, box=np.stack([b for _, b in items]), return_logits=True)
        target = out if len(shape) == 2 else out[k]
        _paint(target, [v for v, _ in items], logits[:, 0])
        report(progress, done, len(per_slice), f"segmenting: slice {k}" if len(shape) == 3 else "segmenting")
    return out


def _paint(target: np.ndarray, values: List[int], logits: np.ndarray) -> None:
    """Each pixel where some object's logit is positive gets the value of the object whose logit is
    highest there: neighbouring structures (e.g. anterior and posterior hippocampus), whose boxes
    overlap, split the pixels they both claim instead of the last one taking them all."""
    best = logits.argmax(0)
    inside = logits.max(0) > 0
    for j, value in enumerate(values):
        target[inside & (best == j)] = value


def heat_of(predictor, finder, record) -> np.ndarray:
    z = predictor.embedding(record)
    return heat_on_image(finder, z, record.input_size, record.original_size, predictor.backbone.img_size)


def segment_image(predictor, choice: TaskChoice, record, cancel=None, progress=None) -> AutoResult:
    finder = check_task(predictor, choice)
    spec = _spec(predictor, choice.decision)
    heat = heat_of(predictor, finder, record)
    found = find_objects(heat, spec["outputs"], spec["threshold"], spec.get("objects", "class"))
    labels = decode_objects(predictor, found, choice.layer, lambda k: record, tuple(record.original_size), cancel,
                            progress, spec.get("objects", "class"))
    return AutoResult(labels, [_describe(o) for o in found], choice)


def segment_volume(predictor, choice: TaskChoice, cancel=None, progress=None) -> AutoResult:
    finder = check_task(predictor, choice)
    spec = _spec(predictor, choice.decision)
    vol = predictor.volume
    records = predictor.embed_slices(None, progress=progress, cancel=cancel)
    first, chunks = records[0], [records[k:k + HEAT_BATCH] for k in range(0, len(records), HEAT_BATCH)]
    heat = np.concatenate([heat_on_slices(finder, torch.stack([predictor.embedding(r) for r in chunk]),
                                          first.input_size, first.original_size, predictor.backbone.img_size)
                           for chunk in chunks])  # (S, L, H, W)
    found = find_objects(heat, spec["outputs"], spec["threshold"], spec.get("objects", "class"))
    labels = decode_objects(predictor, found, choice.layer, predictor.slice_record, (len(records),) + heat.shape[2:],
                            cancel, progress, spec.get("objects", "class"))
    return AutoResult(np.moveaxis(labels, 0, vol.axis), [_describe(o) for o in found], choice)


def _describe(obj: FoundObject) -> dict:
    return {"label": obj.label, "slices": sorted(obj.boxes), "heat": round(obj.heat, 3)}


def auto_dice(predictor, finder, spec: dict, z_frozen: torch.Tensor, z_task: torch.Tensor, record,
              labels: np.ndarray) -> float:
    """The finder's check on one held-out image: the mean Dice, over the label values present in
    the ground truth or found, of the zero-click mask against the truth (a class found where there
    is none, or missed, scores 0). Instance tasks: the Dice of all objects' union."""
    heat = heat_on_image(finder, z_frozen, record.input_size, record.original_size, predictor.backbone.img_size)
    found = find_objects(heat, spec["outputs"], spec["threshold"], spec.get("objects", "class"))
    out = np.zeros(labels.shape, dtype=np.int32)
    boxes = [(o.label, o.boxes[0]) for o in found]
    if boxes:
        logits, _, _ = predictor.predict_features(z_task, record, box=np.stack([b for _, b in boxes]),
                                                  return_logits=True)
        _paint(out, [v for v, _ in boxes], logits[:, 0])
    if spec.get("objects", "class") == "instance":
        return float(dice(out > 0, labels > 0))
    values = sorted(({int(v) for v in np.unique(labels) if v} | {o.label for o in found}) & set(spec["outputs"]))
    if not values:
        return 1.0  # nothing there and nothing found
    return float(np.mean([dice(out == v, labels == v) for v in values]))
