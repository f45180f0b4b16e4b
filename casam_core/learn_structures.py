"""What a task learns besides its layer and router: where its structures are (the finder,
for zero-click) and how a box is propagated through its volumes (blind or re-anchored).
Both are learned by ``training.learn_task`` after the layer, on the same embeddings."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from .alignment import AlignmentLayer, run_layer
from .auto import auto_dice
from .finder import HIDDEN as FINDER_HIDDEN, THRESHOLDS as FINDER_THRESHOLDS
from .finder import grid_targets, outputs_for, train_finder
from .predictor import CASamPredictor, ImageRecord
from .progress import check_cancel, report
from .task_data import TaskData, label_values, source_file


def learn_finder(predictor: CASamPredictor, data: TaskData, records: List[ImageRecord], z_all, train_idx: List[int],
                 val_idx: List[int], layer: Optional[AlignmentLayer], seed: int, steps: int, cancel, progress):
    """The task's structure finder and its card entry (``casam_core.finder``). Trained on the
    training images and every slice annotated as empty of the same files (held-out files stay
    out); its threshold is the one of ``finder.THRESHOLDS`` with the best zero-click Dice on the
    held-out images, decoded the way the task decodes (its layer, when it won)."""
    backbone = predictor.backbone
    values = outputs_for(data.objects, label_values(data))
    train_files = {source_file(data.slices[i].source) for i in train_idx}
    held = set(val_idx)
    fit_idx = sorted(set(train_idx) | {i for i, s in enumerate(data.slices) if s.labels is not None and i not in held
                                       and not s.annotated and source_file(s.source) in train_files})
    grid = backbone.embedding_shape[1]

    def target(i: int) -> torch.Tensor:
        return grid_targets(data.slices[i].labels, values, data.objects, records[i].input_size, backbone.img_size, grid)

    report(progress, 0, 1, "finder: learning where the structures are")
    finder = train_finder([z_all[i].cpu() for i in fit_idx], [target(i) for i in fit_idx], len(values), steps=steps,
                          seed=seed, cancel=cancel)
    z_task = {}
    for i in val_idx:
        z = z_all[i][None].to(predictor.device)
        if layer is not None:
            with torch.inference_mode():
                z = run_layer(layer, z, predictor.backbone.layer_dtype)
        z_task[i] = z
    by_threshold = {}
    for t in FINDER_THRESHOLDS:
        check_cancel(cancel)
        spec = {"outputs": values, "threshold": t, "objects": data.objects}
        by_threshold[t] = float(np.mean([auto_dice(predictor, finder, spec, z_all[i], z_task[i], records[i],
                                                   data.slices[i].labels) for i in val_idx]))
    best = max(by_threshold, key=by_threshold.get)
    report(progress, 1, 1, "finder: done")
    card = {"outputs": values, "objects": data.objects, "threshold": best, "hidden": FINDER_HIDDEN,
            "parameters": sum(p.numel() for p in finder.parameters()), "training_images": len(fit_idx), "steps": steps,
            "validation": {"dice_auto": round(by_threshold[best], 4),
                           "by_threshold": {str(k): round(v, 4) for k, v in by_threshold.items()}}}
    return finder, card


MAX_PROPAGATION_STRUCTURES = 8  # per task: one box propagated twice each (about 4 s a structure on a 2-core CPU)
# The blind carry replaces re-anchoring only when it wins by this much mean 3D Dice on the held-out volumes: one
# volume holds 2-8 structures, and relearning the same hippocampus task moved a rule's validation mean by up to 0.1
# (benchmarks/results/reanchor_cpu.md); its held-out volume once chose blind by 0.031 where re-anchoring won
# validation by 0.1, while BraTS's chose blind by 0.196, as validation did (0.480 against 0.199).
BLIND_MARGIN = 0.05


def held_out_volumes(data: TaskData, train_idx: List[int], val_idx: List[int]) -> List[List[int]]:
    """The files held out whole (none of their slices learned from) that are whole volumes (every
    slice ``name[0..n-1]`` present, labelled): for each, the indices in ``data.slices`` of its
    slices in order."""
    held = {source_file(data.slices[i].source) for i in val_idx} - {source_file(data.slices[i].source) for i in train_idx}
    slices: Dict[str, Dict[int, int]] = {}
    for i, s in enumerate(data.slices):
        group = source_file(s.source)
        if group in held and s.source.endswith("]") and s.labels is not None:
            slices.setdefault(group, {})[int(s.source.rsplit("[", 1)[1][:-1])] = i
    return [[by_index[k] for k in range(len(by_index))] for by_index in slices.values()
            if sorted(by_index) == list(range(len(by_index))) and len(by_index) >= 3]


def choose_propagation(predictor: CASamPredictor, name: str, data: TaskData, records: List[ImageRecord], z_all,
                       train_idx: List[int], val_idx: List[int], card: dict, layer: Optional[AlignmentLayer],
                       finder, cancel, progress) -> dict:
    """Whether propagation from a user's box is re-anchored by the task's finder
    (``prompts.propagate_masks``' ``reanchor``): on each held-out whole volume, each structure's
    true box on its largest slice is decoded with the task and propagated blind and re-anchored,
    as a user's one box is; the blind carry is kept where it wins by ``BLIND_MARGIN`` or more.
    Without a held-out volume (a task learned from 1 or 2 volumes, or from 2D images) the task
    re-anchors, the rule chosen on hippocampus and BraTS validation volumes."""
    from .metrics import dice
    from .prompts import box_from_mask, propagate_masks

    volumes = held_out_volumes(data, train_idx, val_idx) if data.objects == "class" else []
    structures = [(v, int(value)) for v in volumes
                  for value in np.unique(np.stack([data.slices[i].labels for i in v])) if value != 0]
    structures = structures[:MAX_PROPAGATION_STRUCTURES]
    if not structures:
        return {"reanchor": True, "held_out_volumes": 0,
                "why": "no held-out volume to compare on: re-anchored, the default"}
    # a predictor of its own (the task is not the user's yet) on the same caches: nothing is embedded again
    scratch = CASamPredictor(predictor.backbone, embedding_dtype=predictor.embedding_dtype)
    scratch.embeddings, scratch.disk = predictor.embeddings, predictor.disk
    scratch.add_task(name, layer, card=card, finder=finder)
    scores: Dict[str, List[float]] = {"blind": [], "reanchored": []}
    current = None
    for n, (volume, value) in enumerate(structures):
        check_cancel(cancel)
        report(progress, n, len(structures), "propagation: blind or re-anchored, on the held-out volumes")
        if volume is not current:
            for i in volume:  # (the memory cache may have let them go while learning)
                scratch.embeddings.put(records[i].key, z_all[i].to(scratch.embedding_dtype))
            scratch.set_volume(np.stack([data.slices[i].rgb[..., 0] for i in volume]), prepared=True)
            current = volume
        truth = np.stack([data.slices[i].labels == value for i in volume])
        k = int(truth.sum(axis=(1, 2)).argmax())
        scratch.set_slice(k)
        start = scratch.predict_batch(box=box_from_mask(truth[k]), task=name)[0][0, 0]
        for rule, reanchor in (("blind", False), ("reanchored", True)):
            out, _ = propagate_masks(scratch, {k: start}, task=name, cancel=cancel, reanchor=reanchor)
            scores[rule].append(dice(out, truth))
    report(progress, 1, 1, "propagation: chosen")
    blind, reanchored = float(np.mean(scores["blind"])), float(np.mean(scores["reanchored"]))
    return {"reanchor": blind < reanchored + BLIND_MARGIN, "held_out_volumes": len({id(v) for v, _ in structures}),
            "structures": len(structures), "dice_blind": round(blind, 4), "dice_reanchored": round(reanchored, 4)}
