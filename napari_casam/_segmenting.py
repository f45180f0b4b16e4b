"""Segmenting, routing, committing and propagating: the dock's prompt-to-mask loop.

A mixin of ``CASamWidget`` (in the way napari-nninteractive stacks its GUI, layer controls
and session): it uses the widget's session, layers, workers and status line, and gives the
widget its public segment / commit / undo / clear / propagate actions.

Every answer is checked against the image generation (a result for another image is
dropped) and the prompt version (a preview older than the prompts is never committed).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import List, Optional

import numpy as np

from casam_core.progress import Cancelled, check_cancel
from casam_core.tasks import TaskChoice, describe_route, describe_scores

from ._layers import LABELS, PREVIEW, plane
from ._parts import WidgetParts
from ._workers import task_status


class SegmentingMixin(WidgetParts):
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
        # the last result is a corrective click's start only on the same slice with the same boxes: a box
        # drawn after a click is a new prompt (the click-only result was kept, and the box ignored)
        key = (generation, k, None if boxes is None else tuple(np.round(np.asarray(boxes, float), 1).ravel()))
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
            masks, choice, low = result
            mask = masks.any(0)
            if version == self._prompt_version:
                self._last_logits = (key, low) if low is not None else None
            self.layers.show_preview(masks, k if self.is_volume else None)
            self.auto_preview = None
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
        self.route_strip.show_choice(choice if self.is_volume else None, self.session.n_slices())
        self.route_strip.set_current(self.current_slice())
        card = self.predictor.cards.get(choice.decision) if choice.decision and self.predictor else None
        if card and card.get("labels"):  # the task's structures join the class picker
            self.classes.set_task_labels(card["labels"])
        self.route_label.setText(f"route: {describe_route(choice)}")

    def show_scores(self) -> None:
        self.notify("CA-SAM scores:\n" + (describe_scores(self.last_route) if self.last_route else "no learned task"))

    # ------------------------------------------------------------------ commit, undo, clear
    def preview_is_current(self) -> bool:
        """The preview shows the current prompts (no prompt changed since it was computed)."""
        return self._preview_version == self._prompt_version and not self._debounce.isActive()

    def commit(self) -> Optional[List[int]]:
        """Write the preview's objects into the labels layer (napari's undo history): the class chosen in
        the picker, or in instance mode the next free id for each object; returns the ids written.
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
        preview = np.asarray(self.viewer.layers[PREVIEW].data)
        if not preview.any():
            self.notify("CA-SAM: nothing to commit: the preview is empty")
            return None
        keep = self.auto_preview == "class"  # a task's zero-click label map: its class values are the labels
        ids, voxels = self.layers.write_label(preview, label_id=None if keep else self.target_label(), keep_values=keep)
        self.auto_preview = None
        for label_id in ids:
            self.classes.add(label_id)  # listed, so that it can be chosen for corrections
        self.status(f"committed label{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))} ({voxels} voxels)")
        self.clear_prompts()
        return ids

    def undo(self) -> None:
        """Undo the last change of the CA-SAM labels layer (napari's history: a commit or a manual edit).
        Ctrl+Z comes here from the viewer, the prompt layers and the labels layer alike."""
        if LABELS not in self.viewer.layers:
            self.error("CA-SAM: there is no CA-SAM labels layer to undo")
            return
        import warnings

        layer = self.viewer.layers[LABELS]
        with warnings.catch_warnings():  # napari warns plugins off its private attributes: none public says
            warnings.simplefilter("ignore")  # whether there is anything to undo (absent in another version:
            history = getattr(layer, "_undo_history", None)  # undo anyway)
        if history is not None and not len(history):
            self.status("nothing to undo: the labels are as they were when this image was embedded")
            return
        layer.undo()
        left = len(history) if history is not None else None
        self.status("undid the last change of the labels" + (f" ({left} more can be undone)" if left else
                                                              " (nothing more to undo)" if left == 0 else ""))

    def clear_prompts(self) -> None:
        self.layers.clear_prompts()
        self._prompt_version += 1
        self._commit_pending = False
        self._last_logits = None  # the next prompts start a new object

    def clear(self) -> None:
        self.clear_prompts()
        self.auto_preview = None
        if PREVIEW in self.viewer.layers:
            self.layers.clear_preview()
            self._preview_version = self._prompt_version

    # ------------------------------------------------------------------ propagation
    def propagation_label(self, k: int, start: Optional[np.ndarray]) -> Optional[int]:
        """The label a propagation writes: the class chosen in the picker; in instance mode, the
        object the approved mask ``start`` overlaps most on slice ``k`` (a correction of it), else a
        new id; with no mask on this slice, the label the user painted here (napari's selected label)."""
        here = plane(self.viewer.layers[LABELS].data, self.layers.axis, k)
        chosen = self.target_label()
        if chosen is not None:
            return chosen
        if start is not None:
            under = np.asarray(here)[start]
            under = under[under > 0]
            return int(np.bincount(under).argmax()) if under.size else \
                int(np.asarray(self.viewer.layers[LABELS].data).max()) + 1
        selected = int(self.viewer.layers[LABELS].selected_label)
        return selected if selected and (np.asarray(here) == selected).any() else None

    def propagate(self) -> None:
        """Fill the volume for one label from the slices the user annotated: the current slice's
        approved preview (or box, or what was painted there) and every slice committed, propagated
        from or corrected with the brush for that label. Slices between two annotations are carried
        from the nearer one; an erased slice stops the label there. The result replaces the label's
        earlier propagation in one undoable change, on the volume it came from (or is dropped with a
        message when that volume is gone or was replaced meanwhile). Stop (or closing) cancels it
        and leaves the labels as they were."""
        from napari.utils import progress

        from ._layers import propagation_edit
        from ._workers import bar_follows, reporting

        why = self._not_ready_reason()
        if why is None and not self.is_volume:
            why = "CA-SAM: propagation needs a volume (a 3D image)"
        if why is None and self._propagation is not None:
            why = "CA-SAM: a propagation is already running (Stop cancels it)"
        if why is not None:
            self.error(why)
            return
        k = self.current_slice()
        axis = self.layers.axis
        start = np.asarray(plane(self.viewer.layers[PREVIEW].data, axis, k)) > 0
        if start.any() and not self.preview_is_current():
            self.error("CA-SAM: the preview is older than the prompts: wait for it, or press Segment (S)")
            return
        box = None
        if not start.any():
            start = None
            _, _, boxes = self.current_prompts()
            box = boxes[0] if boxes is not None else None
        label = self.propagation_label(k, start)
        if label is None and box is not None:
            label = int(np.asarray(self.viewer.layers[LABELS].data).max()) + 1
        if label is None:
            self.error("CA-SAM: segment the current slice (or draw a box, or paint it) before propagating")
            return
        labels = self.viewer.layers[LABELS]
        anchors = self.annotations.anchors(label, labels.data)
        if start is None and box is None and k not in anchors:
            anchors[k] = np.asarray(plane(labels.data, axis, k)) == label  # painted here, not yet marked
        task, session, stop = self.task_choice(), self.session, self.workers.stop
        generation, source = session.generation, self.image_layer.name
        cancel = self._propagation = threading.Event()
        self.stop_button.setEnabled(True)
        bar = progress(total=0, desc=f"CA-SAM: propagating label {label}")
        finished_status = task_status(self.viewer, f"propagating through {source}", self.workers.shutdown)
        self.status(f"propagating label {label} from slices {sorted(set(anchors) | {k})}...")

        def work():
            return (yield from reporting(session.propagate, slice_index=k, box=box, start=start, anchors=anchors,
                                         task=task, cancel=lambda: (cancel.is_set() or stop.is_set()
                                                                    or not session.is_current(generation))))

        def done(result):
            mask, summary, first = result
            if not session.is_current(generation) or labels not in self.viewer.layers:
                self.error(f"CA-SAM: the propagation through {source} was dropped: the image changed meanwhile")
                return
            fixed = {k: np.asarray(first, bool)} if first is not None else {}
            index, values = propagation_edit(labels.data, label, mask, fixed, axis)
            with self.annotations.quiet():
                if len(index[0]):
                    labels.data_setitem(index, values)
            self.classes.add(label)
            if fixed:
                self.annotations.mark(label, [k], "drawn")
                self.layers.clear_preview()
                self.clear_prompts()
            stops = [f"going {s['direction']} it stopped because {s['why']}" for s in summary["stops"]
                     if not s["reason"].startswith(("volume edge", "met the other", "annotated as empty"))]
            found = (f" (on {len(summary['reanchored'])} of them the task's finder placed the box)"
                     if summary.get("reanchored") else " (the task's finder did not see what you annotated: "
                     "the box was carried)" if summary.get("finder_disagreed")
                     else " (the box was carried: this task did better so on its held-out volume)"
                     if summary.get("carried_by_task") else "")
            self.notify(f"CA-SAM: label {label} filled on {len(summary['slices'])} slices from "
                        f"{len(summary['annotated'])} annotated{found}" + (f"; {'; '.join(stops)}. Check the slices "
                                                                    f"past the stop, annotate one there and "
                                                                    f"propagate again" if stops else ""))

        def failed(exc):
            if isinstance(getattr(exc, "__cause__", None), Cancelled) or isinstance(exc, Cancelled):
                self.say(f"the propagation through {source} was stopped; the labels are as they were")
                return
            self.error(f"CA-SAM: {exc}")

        def end():
            bar.close()
            finished_status()
            if self._propagation is cancel:
                self._propagation = None
                self.stop_button.setEnabled(self._ranking is not None)

        self._run(work, yielded=bar_follows(bar), returned=done, errored=failed, finished=end)

    def stop_work(self) -> None:
        """Stop: cancel the running propagation (the labels stay as they were) or ranking."""
        for event, what in ((self._propagation, "propagation"), (self._ranking, "ranking"),
                            (self._auto, "segmentation with the task")):
            if event is not None:
                event.set()
                self.status(f"stopping the {what}...")

    # ------------------------------------------------------------------ coverage of the open images
    def rank_folder(self) -> None:
        """Ask for a folder, then rank its images with the open ones (``rank_open_images``)."""
        from qtpy.QtWidgets import QFileDialog

        folder = QFileDialog.getExistingDirectory(self, "CA-SAM: a folder of images, volumes or DICOM series")
        if folder:
            self.rank_open_images(folder)

    def rank_open_images(self, folder: Optional[str] = None) -> None:
        """List the open images, and those of ``folder`` (images, volumes, DICOM series folders),
        least covered by the learned tasks first (a worker; the model waits meanwhile, and Stop
        cancels): the to-do list of what to annotate next."""
        from napari.layers import Image
        from napari.utils import progress

        from ._workers import bar_follows, reporting

        if self.predictor is None or self.image_layer is None:
            self.error("CA-SAM: choose an image and press Embed first")
            return
        if self._ranking is not None:
            self.error("CA-SAM: the open images are already being ranked (Stop cancels it)")
            return
        if not self.predictor.layers:
            self.error("CA-SAM: no learned task for this backbone: every image is uncovered")
            return
        items = []
        for layer in self.viewer.layers:
            spatial = layer.ndim - (1 if getattr(layer, "rgb", False) else 0)
            if isinstance(layer, Image) and not layer.multiscale and spatial in (2, 3) and not (layer.rgb and spatial == 3):
                items.append((layer.name, np.asarray(layer.data), spatial == 3))
        session, stop = self.session, self.workers.stop
        cancel = self._ranking = threading.Event()

        def rank(progress):
            found = list(items)
            if folder:  # read in the worker: a folder of volumes takes a while
                from casam_core.io import image_inputs, read_image

                for path in image_inputs(folder):
                    check_cancel(lambda: cancel.is_set() or stop.is_set())
                    image = read_image(path)
                    found.append((f"{Path(folder).name}/{path.name}", image.array, image.is_volume))
            return session.rank(found, cancel=lambda: cancel.is_set() or stop.is_set(), progress=progress)

        self.stop_button.setEnabled(True)
        bar = progress(total=len(items), desc="CA-SAM: routing the open images")
        self.status(f"ranking {len(items)} open images{' and ' + folder if folder else ''} "
                    f"(segmenting waits until it is done)...")

        def done(rows):
            self.last_ranking = rows
            lines = [f"{r['rank']}. {r['name']}: " + (f"task {r['decision']}" if r["covered"] else "not covered")
                     + (f" (score/tau {r['score_over_tau']:.2g})" if r["score_over_tau"] is not None else "")
                     for r in rows]
            self.notify("CA-SAM: open images, least covered first (annotate these next):\n" + "\n".join(lines))

        def failed(exc):
            if isinstance(getattr(exc, "__cause__", None), Cancelled) or isinstance(exc, Cancelled):
                self.say("the ranking was stopped")
                return
            self.error(f"CA-SAM: {exc}")

        def end():
            bar.close()
            if self._ranking is cancel:
                self._ranking = None
                self.stop_button.setEnabled(self._propagation is not None)
            self.update_route()

        self._run(lambda: (yield from reporting(rank)),
                  yielded=bar_follows(bar), returned=done, errored=failed, finished=end)

    @property
    def is_propagating(self) -> bool:
        return self._propagation is not None

    # ------------------------------------------------------------------ classes
    def target_label(self) -> Optional[int]:
        """The label id the class picker names (None: instance mode, a new id per object)."""
        return self.classes.current()
