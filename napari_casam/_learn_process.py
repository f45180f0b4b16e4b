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
import os
import sys
import threading
import traceback
from typing import Optional

import numpy as np


def learn_in_process(queue, cancel_event, name: str, image: np.ndarray, labels: np.ndarray, backbone: str,
                     checkpoint: Optional[str], device: str, library: str, cache_dir: Optional[str],
                     profile: str, steps: Optional[int], label_names: Optional[dict], modality: Optional[str]) -> None:
    _lower_priority()
    try:
        from casam_core.build import NO_CACHE, build_predictor
        from casam_core.errors import TaskLibraryError
        from casam_core.library import TaskLibrary
        from casam_core.progress import Cancelled
        from casam_core.training import TaskData, image_slice_from_array, learn_config, learn_task, volume_slices

        lib = TaskLibrary(library)
        if name in lib:
            raise TaskLibraryError(f"a task named {name!r} already exists in {lib.root}")
        if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4) and labels.ndim == 2):
            slices = [image_slice_from_array(image, labels, name)]
        else:
            slices = volume_slices(image, labels, source=name)
        if label_names is None:  # every label value present in the annotation
            label_names = {int(v): f"label {int(v)}" for v in np.unique(labels) if v}
        data = TaskData(slices, "class", label_names, modality, [name])
        predictor, _ = build_predictor(backbone, checkpoint, device, cache_dir=cache_dir or NO_CACHE)
        try:
            task = learn_task(predictor, name, data, learn_config(profile, steps=steps),
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
        from casam_core.errors import CASamError

        text = str(exc) if isinstance(exc, CASamError) else f"{type(exc).__name__}: {exc}"  # a bug: its type too
        queue.put(("error", text, traceback.format_exc()))


NICENESS = 10


def _lower_priority(thread_only: bool = False) -> None:
    """Training yields the CPU to the viewer: on a machine with few cores, an equal-priority
    training process slowed the viewer's own redraws enough to stall it ~0.14 s. With
    ``thread_only`` (Linux, where niceness is per thread and a child inherits its creator's),
    only the calling thread is lowered: the process it then starts runs low from its first
    instruction, interpreter start-up and imports included."""
    try:
        who = threading.get_native_id() if thread_only else 0
        if thread_only and not sys.platform.startswith("linux"):
            return  # elsewhere PRIO_PROCESS would lower the whole viewer
        if os.getpriority(os.PRIO_PROCESS, who) < NICENESS:
            os.setpriority(os.PRIO_PROCESS, who, NICENESS)
    except (AttributeError, OSError):  # no priorities on this platform, or not allowed
        pass


class LearnJob:
    """One training process with its message queue and cancel event."""

    def __init__(self, **kwargs) -> None:
        ctx = mp.get_context("spawn")
        self.queue = ctx.Queue()
        self.cancel_event = ctx.Event()
        self.process = ctx.Process(target=learn_in_process, args=(self.queue, self.cancel_event),
                                   kwargs=kwargs, daemon=True)
        self._starter: Optional[threading.Thread] = None
        self._start_error: Optional[str] = None
        self._error_reported = False

    def start(self) -> None:
        """Start the process from a helper thread and return at once. Spawning pickles the arrays
        into a pipe that the child only reads once its interpreter is up and its imports are done:
        seconds in which the caller (the viewer's UI thread) would be blocked."""
        def run():
            try:
                _lower_priority(thread_only=True)
                self.process.start()
            except Exception as exc:  # reported through messages()
                self._start_error = f"could not start the learning process: {type(exc).__name__}: {exc}"

        self._starter = threading.Thread(target=run, name="casam-learn-start", daemon=True)
        self._starter.start()

    def _starting(self) -> bool:
        return self._starter is not None and self._starter.is_alive()

    def cancel(self) -> None:
        self.cancel_event.set()

    def messages(self):
        """Messages received so far (non-blocking)."""
        import queue as _queue

        out = []
        if self._start_error is not None and not self._error_reported:
            out.append(("error", self._start_error, ""))
            self._error_reported = True
        while True:
            try:
                out.append(self.queue.get_nowait())
            except _queue.Empty:
                return out

    def alive(self) -> bool:
        """Still starting or running."""
        if self._starting():
            return True
        return self._start_error is None and self.process.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel, wait up to ``timeout`` s for the process to end, then terminate it: nothing is left
        running (a cancelled or killed process never writes to the library: it saves atomically at the end)."""
        self.cancel()
        self.join(timeout)
        if self.process.pid is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(5)

    def join(self, timeout: float) -> None:
        if self._starter is not None:
            self._starter.join(timeout)
        if self._start_error is None and self.process.pid is not None:
            self.process.join(timeout)
