"""'Learn new task' in a separate process (no Qt here).

The viewer stays responsive, the training's memory (and GPU memory) goes back to the
system when the process ends, and a Cancel only has to set an event: ``learn_task``
checks it between steps and nothing is written to the task library before the very end
(``TaskLibrary.save`` is atomic). Messages on the queue:
``("progress", done, total, message)``, then one of ``("done", card)``,
``("cancelled",)`` or ``("error", message)``.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from typing import Optional

import numpy as np


def learn_in_process(queue, cancel_event, name: str, image: np.ndarray, labels: np.ndarray, backbone: str,
                     checkpoint: Optional[str], device: str, library: str, cache_dir: Optional[str],
                     epochs: int, form: str, label_names: dict, modality: Optional[str]) -> None:
    try:
        from casam_core.backbones import build_backbone
        from casam_core.library import TaskLibrary
        from casam_core.predictor import CASamPredictor
        from casam_core.progress import Cancelled
        from casam_core.training import LearnConfig, TaskData, image_slice_from_array, learn_task, volume_slices

        lib = TaskLibrary(library)
        if name in lib:
            raise ValueError(f"a task named {name!r} already exists in {lib.root}")
        if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4) and labels.ndim == 2):
            slices = [image_slice_from_array(image, labels, name)]
        else:
            slices = volume_slices(image, labels, source=name)
        data = TaskData(slices, "class", label_names, modality, [name])
        predictor = CASamPredictor(build_backbone(backbone, checkpoint, device), disk_cache=cache_dir)
        try:
            task = learn_task(predictor, name, data, LearnConfig(epochs=epochs, form=form),
                              progress=lambda d, t, m: queue.put(("progress", d, t, m)),
                              cancel=cancel_event.is_set)
        except Cancelled:
            queue.put(("cancelled",))
            return
        if cancel_event.is_set():
            queue.put(("cancelled",))
            return
        lib.save(task)
        queue.put(("done", lib.card(name)))
    except Exception as exc:  # reported in the viewer; the library is untouched
        queue.put(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))


class LearnJob:
    """One training process with its message queue and cancel event."""

    def __init__(self, **kwargs) -> None:
        ctx = mp.get_context("spawn")
        self.queue = ctx.Queue()
        self.cancel_event = ctx.Event()
        self.process = ctx.Process(target=learn_in_process, args=(self.queue, self.cancel_event),
                                   kwargs=kwargs, daemon=True)

    def start(self) -> None:
        self.process.start()

    def cancel(self) -> None:
        self.cancel_event.set()

    def messages(self):
        """Messages received so far (non-blocking)."""
        import queue as _queue

        out = []
        while True:
            try:
                out.append(self.queue.get_nowait())
            except _queue.Empty:
                return out

    def alive(self) -> bool:
        return self.process.is_alive()
