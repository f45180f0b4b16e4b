"""The dock's model session, without Qt: testable with no viewer.

One predictor (rebuilt when the backbone, checkpoint or device changes), the lock that makes
model calls one at a time, the image generation that tells a stale worker result from a
current one, and the task choice. Every method that touches the model takes the lock itself
and is meant to run in a worker thread.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from casam_core.build import build_predictor
from casam_core.evaluate import rank_by_coverage
from casam_core.library import TaskLibrary
from casam_core.predictor import CASamPredictor
from casam_core.prompts import propagate_masks
from casam_core.tasks import TaskChoice

BackboneKey = Tuple[str, Optional[str], str]  # (backbone, checkpoint, device)


class ModelSession:
    def __init__(self, library: TaskLibrary, cache_dir) -> None:
        self.library = library
        self.cache_dir = cache_dir
        self.predictor: Optional[CASamPredictor] = None
        self._key: Optional[BackboneKey] = None
        self.lock = threading.Lock()  # one model call at a time
        self.generation = 0  # bumps when the image changes: results for an older one are dropped
        self.is_volume = False
        self.axis = 0  # a volume's slicing axis

    # -- the image ---------------------------------------------------------------------
    def new_image(self, is_volume: bool = False) -> int:
        """A new image (or none): results of work for the previous one become stale."""
        self.generation += 1
        self.is_volume = is_volume
        return self.generation

    def is_current(self, generation: int) -> bool:
        return generation == self.generation

    def n_slices(self) -> int:
        """The volume's slices (0 for a 2D image or none)."""
        p = self.predictor
        return p.volume.n_slices if self.is_volume and p is not None and p.volume is not None else 0

    def open(self, key: BackboneKey, array: np.ndarray, is_volume: bool, axis: int = 0) -> Dict[str, str]:
        """Build (or reuse) the predictor for ``key`` and give it the image or volume (nothing
        embedded yet for a volume). Returns {task not loaded: why}; a bad checkpoint raises here."""
        with self.lock:
            skipped = {}
            if self.predictor is None or key != self._key:
                self.predictor, skipped = build_predictor(*key, cache_dir=self.cache_dir, library=self.library)
                self._key = key
            self.axis = axis
            if is_volume:
                self.predictor.set_volume(array, axis=axis)
            else:
                self.predictor.set_image(array)
            return skipped

    def embed_slice(self, index: int) -> None:
        """Embed one slice of the volume (a cached slice costs nothing)."""
        with self.lock:
            self.predictor.slice_record(index)

    def reload_tasks(self) -> Dict[str, str]:
        """(Re)register the library's tasks after a library change; returns {skipped task: why}."""
        with self.lock:
            if self.predictor is None:
                return {}
            for name in list(self.predictor.layers):
                self.predictor.remove_task(name)
            return self.predictor.load_tasks(self.library)

    # -- tasks and prompts ---------------------------------------------------------------
    def _choose(self, task: Optional[str]) -> TaskChoice:
        # a volume's route comes from the slices embedded so far until all are (never waits for the rest)
        return self.predictor.choose_task(task, provisional=self.is_volume)

    def route(self, task: Optional[str], generation: int) -> Optional[TaskChoice]:
        """The task choice for the current image (None once another image was opened)."""
        with self.lock:
            return self._choose(task) if self.is_current(generation) else None

    def segment(self, slice_index: int, coords, labels, boxes, task: Optional[str],
                prior: Optional[np.ndarray]) -> Tuple[np.ndarray, TaskChoice, Optional[np.ndarray]]:
        """(masks (B, H, W), one per object: each box with the clicks, or the clicks alone; the task
        choice; low-res logits of a single object for the next corrective click, else None).
        ``prior``: the last logits on this slice."""
        with self.lock:
            p = self.predictor
            if self.is_volume:
                p.set_slice(slice_index)
            choice = self._choose(task)
            masks, _, low = p.predict_batch(point_coords=coords, point_labels=labels, box=boxes, task=choice.layer,
                                            mask_input=prior)
        return masks[:, 0], choice, (low[0] if len(low) == 1 else None)

    def rank(self, items, cancel: Callable[[], bool], progress=None):
        """The open images ``items`` ((name, array, is_volume)) least covered by the learned tasks
        first (``evaluate.rank_by_coverage``); the image being segmented stays current."""
        with self.lock, self.predictor.keeping_current() as p:
            return rank_by_coverage(p, items, progress=progress, cancel=cancel)

    def segment_auto(self, task: Optional[str], cancel: Callable[[], bool], progress=None):
        """The current image or whole volume segmented by its learned task, no prompts
        (``CASamPredictor.segment_auto``; a volume's route needs all its slices)."""
        with self.lock:
            return self.predictor.segment_auto(task, progress=progress, cancel=cancel)

    def propagate(self, slice_index: int, box, start: Optional[np.ndarray], anchors: Dict[int, np.ndarray],
                  task: Optional[str], cancel: Callable[[], bool], progress=None):
        """Fill the volume from the user's annotated slices (``anchors``: {slice: mask}) and the
        current slice: its approved mask ``start``, or the mask of ``box`` on it, or (both None)
        its anchor. Returns (mask volume, summary, the current slice's mask)."""
        with self.lock:
            p = self.predictor
            choice = self._choose(task)
            if start is None and box is not None:
                p.set_slice(slice_index)
                masks, _, _ = p.predict_batch(box=box, task=choice.layer)
                start = masks[0, 0]
            annotated = dict(anchors)
            if start is not None:
                annotated[slice_index] = np.asarray(start, bool)
            # the task itself, not its layer: its finder re-anchors even where its layer lost to frozen
            out, summary = propagate_masks(p, annotated, task=choice.decision, cancel=cancel, progress=progress)
            return out, summary, start
