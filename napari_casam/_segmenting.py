"""Segmenting, routing, committing and propagating: the dock's prompt-to-mask loop.

A mixin of ``CASamWidget`` (in the way napari-nninteractive stacks its GUI, layer controls
and session): it uses the widget's session, layers, workers and status line, and gives the
widget its public segment / commit / undo / clear / propagate actions.

Every answer is checked against the image generation (a result for another image is
dropped) and the prompt version (a preview older than the prompts is never committed).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from casam_core.progress import Cancelled
from casam_core.tasks import TaskChoice, describe_route, describe_scores

from ._layers import LABELS, PREVIEW
from ._workers import task_status


class SegmentingMixin:
    # ------------------------------------------------------------------ segmenting and routing
    def _not_ready_reason(self) -> Optional[str]:
        """Why prompts cannot be segmented now (None when they can)."""
        if self.image_layer is None or self.predictor is None:
            return "CA-SAM: choose an image and press Embed first"
        if not self._ready:
            return "CA-SAM: the image is still being embedded; prompts are segmented as soon as it is ready"
        if not self.layers.present():
            return "CA-SAM: the CA-SAM layers were removed: press Embed again"
        return None

    def segment(self, quiet: bool = False) -> None:
        """Segment the current slice/image from the prompts, in a worker; the preview shows the result.
        The status line says "segmenting..." until the preview shows the current prompts."""
        why = self._not_ready_reason()
        if why is not None:
            if not quiet:
                self.error(why)
            return
        coords, labels, boxes = self.current_prompts()
        version = self._prompt_version
        if coords is None and boxes is None:
            self.layers.clear_preview()
            self._preview_version = version
            return
        k, task, session = self.current_slice(), self.task_choice(), self.session
        generation = session.generation
        key = (generation, k)
        # corrective clicks: the last result on this slice goes along (SAM's mask_input); on a box-only
        # backbone the predictor then searches boxes around it and never trades it for a mask that
        # honours fewer clicks
        prior = self._last_logits[1] if (coords is not None and self._last_logits is not None
                                         and self._last_logits[0] == key
                                         and (boxes is None or len(boxes) == 1)) else None
        self._in_flight += 1
        self.status("segmenting...")

        def done(result):
            if not session.is_current(generation) or PREVIEW not in self.viewer.layers:
                return  # another image since, or the preview layer was removed: dropped
            mask, choice, low = result
            if version == self._prompt_version:
                self._last_logits = (key, low) if low is not None else None
            self.layers.show_preview(mask, k if self.is_volume else None)
            self._preview_version = version
            self._show_route(choice)
            if version == self._prompt_version:
                self.status(f"preview ready ({int(mask.sum())} px); C commits it")
                if self._commit_pending:
                    self._commit_pending = False
                    self.commit()

        def finished():
            self._in_flight -= 1
            if not self._in_flight and not self._debounce.isActive() and not self.preview_is_current():
                self._commit_pending = False  # the segmentation failed: a commit never takes an old preview

        self._run(lambda: session.segment(k, coords, labels, boxes, task, prior), returned=done, finished=finished)

    def update_route(self) -> None:
        """Recompute the route shown for the current image, in a worker (the UI never waits on the model)."""
        if self.predictor is None or self.image_layer is None or not self._ready:
            return
        task, session = self.task_choice(), self.session
        generation = session.generation

        def done(choice):
            if choice is not None and session.is_current(generation):
                self._show_route(choice)

        self._run(lambda: session.route(task, generation), returned=done)

    def _show_route(self, choice: TaskChoice) -> None:
        self.last_route = choice
        self.route_label.setText(f"route: {describe_route(choice)}")

    def show_scores(self) -> None:
        self.notify("CA-SAM scores:\n" + (describe_scores(self.last_route) if self.last_route else "no learned task"))

    # ------------------------------------------------------------------ commit, undo, clear
    def preview_is_current(self) -> bool:
        """The preview shows the current prompts (no prompt changed since it was computed)."""
        return self._preview_version == self._prompt_version and not self._debounce.isActive()

    def commit(self) -> Optional[int]:
        """Write the preview into the labels layer with the next free label id (napari's undo history).
        A preview older than the prompts is never committed: when a segmentation is on its way the
        commit waits for it, otherwise the user is asked to segment first."""
        why = self._not_ready_reason()
        if why is not None:
            self.error(why)
            return None
        if not self.preview_is_current():
            if self._in_flight or self._debounce.isActive():
                self._commit_pending = True
                self.status("segmenting... the commit follows when the preview shows the current prompts")
            else:
                self.error("CA-SAM: the preview is older than the prompts: press Segment (S) before committing")
            return None
        mask = np.asarray(self.viewer.layers[PREVIEW].data) > 0
        if not mask.any():
            self.notify("CA-SAM: nothing to commit: the preview is empty")
            return None
        label_id = self._write_label(mask)
        self.clear_prompts()
        return label_id

    def _write_label(self, mask: np.ndarray, labels=None) -> int:
        label_id, voxels = self.layers.write_label(mask, labels)
        self.status(f"committed label {label_id} ({voxels} voxels)")
        return label_id

    def undo(self) -> None:
        """Undo the last change of the CA-SAM labels layer (napari's history: a commit or a manual edit)."""
        if LABELS not in self.viewer.layers:
            self.error("CA-SAM: there is no CA-SAM labels layer to undo")
            return
        self.viewer.layers[LABELS].undo()  # nothing happens when its history is empty
        self.status("undid the last change of the labels")

    def clear_prompts(self) -> None:
        self.layers.clear_prompts()
        self._prompt_version += 1
        self._commit_pending = False
        self._last_logits = None  # the next prompts start a new object

    def clear(self) -> None:
        self.clear_prompts()
        if PREVIEW in self.viewer.layers:
            self.layers.clear_preview()
            self._preview_version = self._prompt_version

    # ------------------------------------------------------------------ propagation
    def propagate(self) -> None:
        """Carry the current slice's mask (or box) up and down the volume; one undoable commit.
        The approved preview is kept as it is on its slice; the result goes to the volume it came
        from, or is dropped with a message when that volume is gone or was replaced meanwhile."""
        from napari.utils import progress

        why = self._not_ready_reason()
        if why is None and not self.is_volume:
            why = "CA-SAM: propagation needs a volume (a 3D image)"
        if why is not None:
            self.error(why)
            return
        k = self.current_slice()
        start = np.asarray(self.viewer.layers[PREVIEW].data)[k] > 0
        if start.any() and not self.preview_is_current():
            self.error("CA-SAM: the preview is older than the prompts: wait for it, or press Segment (S)")
            return
        box = None
        if not start.any():
            start = None
            _, _, boxes = self.current_prompts()
            box = boxes[0] if boxes is not None else None
            if box is None:
                self.error("CA-SAM: segment the current slice (or draw a box) before propagating")
                return
        task, session, stop = self.task_choice(), self.session, self.workers.stop
        generation, source, labels = session.generation, self.image_layer.name, self.viewer.layers[LABELS]
        bar = progress(total=0, desc="CA-SAM: propagating")  # a busy bar: propagate_box reports from the worker
        finished_status = task_status(self.viewer, f"propagating through {source}", self.workers.shutdown)

        def work():
            return session.propagate(k, box, start, task,
                                     cancel=lambda: stop.is_set() or not session.is_current(generation))

        def done(result):
            mask, summary = result
            if not session.is_current(generation) or labels not in self.viewer.layers:
                self.error(f"CA-SAM: the propagation through {source} was dropped: the image changed meanwhile")
                return
            if mask.any():
                self._write_label(mask > 0, labels)
                self.clear_prompts()
            self.notify(f"CA-SAM: propagated over {len(summary['slices'])} slices")

        def failed(exc):
            if isinstance(getattr(exc, "__cause__", None), Cancelled) or isinstance(exc, Cancelled):
                self.status(f"the propagation through {source} was stopped")
                return
            self.error(f"CA-SAM: {exc}")

        def end():
            bar.close()
            finished_status()

        self._run(work, returned=done, errored=failed, finished=end)
