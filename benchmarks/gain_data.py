"""The annotated data a clinician would learn from, drawn the same way for every benchmark
of learning (``learn_gain.py``, ``learn_recipe.py``): the train split of a ../shared/data set,
capped at ``cap`` annotated images or slices.

2D sets: the first ``cap`` training images with foreground, in dataset.json order.
3D sets: the first ``volumes`` training volumes (at least 2 where the set has them), each
normalised as a whole, and from each an evenly spaced share of its slices with foreground
(``cap`` in all). Nothing here reads the test split.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np

from _common import DATA
from casam_core.io import read_image, read_labels
from casam_core.datasets import read_dataset
from casam_core.task_data import image_slice, TaskData, TrainingSlice, volume_slices


def _even(items: list, n: int) -> list:
    if len(items) <= n:
        return list(items)
    return [items[int(k)] for k in np.linspace(0, len(items) - 1, n).round().astype(int)]


def training_data(name: str, cap: int = 40, volumes: int = 4, data_root: Path = DATA) -> TaskData:
    ds = read_dataset(Path(data_root) / name)
    labels = {k: v for k, v in ds.labels.items() if k != 0}
    slices: List[TrainingSlice] = []
    sources: List[str] = []
    if ds.dimensions == 2:
        for case in ds.cases("train"):
            if len(slices) == cap:
                break
            s = image_slice(case.image, case.mask)
            if s.annotated:
                slices.append(s)
                sources.append(str(case.image))
    else:
        cases = ds.cases("train")[:max(2, volumes)]
        shares = [cap // len(cases) + (1 if k < cap % len(cases) else 0) for k in range(len(cases))]
        for case, share in zip(cases, shares):
            image = read_image(case.image)
            lab = read_labels(case.mask, like=image).array
            fg = [s for s in volume_slices(image, lab, background_slices=0, source=case.image.name) if s.annotated]
            slices += _even(fg, share)
            sources.append(str(case.image))
    return TaskData(slices, ds.objects, labels, ds.modality, sources)
