""""Segment with task": the learned task finds its structures on the whole image or volume.

A mixin of ``CASamWidget`` beside ``SegmentingMixin``: one action, run in a worker with a
progress bar and Stop, whose result fills the preview (every slice of a volume). C approves it
(the task's class values are kept: anterior stays 1, posterior 2); the user then corrects with
the existing tools (clicks, the brush, propagation). The frozen model, an image no task
recognises and a task without a finder get one line saying why (``NoAutoSegmentation``).
"""

from __future__ import annotations

import threading

import numpy as np

from casam_core.progress import Cancelled

from ._layers import PREVIEW
from ._parts import WidgetParts
from ._workers import bar_follows, reporting, task_status


class AutoMixin(WidgetParts):
    _auto = None  # the running zero-click segmentation's cancel event
    auto_preview = None  # "class" / "instance": the preview holds a zero-click label map (its values kept)

    def segment_with_task(self) -> None:
        from napari.utils import progress

        why = self._not_ready_reason()
        if why is None and self._auto is not None:
            why = "CA-SAM: the task is already segmenting this image (Stop cancels it)"
        if why is not None:
            self.error(why)
            return
        task, session, stop = self.task_choice(), self.session, self.workers.stop
        generation, source = session.generation, self.image_layer.name
        cancel = self._auto = threading.Event()
        self.stop_button.setEnabled(True)
        bar = progress(total=0, desc="CA-SAM: segmenting with the task")
        finished_status = task_status(self.viewer, f"segmenting {source} with the task", self.workers.shutdown)
        self.status("segmenting with the task: finding its structures...")

        def work():
            return (yield from reporting(session.segment_auto, task=task, cancel=lambda: (
                cancel.is_set() or stop.is_set() or not session.is_current(generation))))

        def done(result):
            if not session.is_current(generation) or PREVIEW not in self.viewer.layers:
                self.error(f"CA-SAM: the segmentation of {source} was dropped: the image changed meanwhile")
                return
            preview = self.viewer.layers[PREVIEW]
            preview.data = np.asarray(result.labels).astype(preview.data.dtype)
            self._preview_version = self._prompt_version
            self.auto_preview = (self.predictor.cards.get(result.choice.decision, {}).get("finder", {})
                                 .get("objects", "class"))
            self._show_route(result.choice)
            found = result.objects
            if not found:
                self.notify(f"CA-SAM: task {result.choice.decision} found none of its structures here; draw a box")
                return
            labels = sorted({o["label"] for o in found})
            where = ""
            if self.is_volume:
                slices = sorted({k for o in found for k in o["slices"]})
                where = f" on slices {slices[0]}-{slices[-1]}"
            self.notify(f"CA-SAM: task {result.choice.decision} found {len(found)} structure"
                        f"{'s' if len(found) > 1 else ''} (label{'s' if len(labels) > 1 else ''} "
                        f"{', '.join(map(str, labels))}){where}; C approves, then correct with clicks, the "
                        f"brush or propagation")

        def failed(exc):
            if isinstance(getattr(exc, "__cause__", None), Cancelled) or isinstance(exc, Cancelled):
                self.say(f"the segmentation of {source} was stopped")
                return
            self.error(f"CA-SAM: {exc}")

        def end():
            bar.close()
            finished_status()
            if self._auto is cancel:
                self._auto = None
                self.stop_button.setEnabled(self._ranking is not None or self._propagation is not None)

        self._run(work, yielded=bar_follows(bar), returned=done, errored=failed, finished=end)
