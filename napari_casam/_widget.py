"""The CA-SAM dock: click-to-segment on 2D images and volumes, routing, learning.

This file wires the parts; each concern lives in its own module:

* ``_panels``        the layout (five panels, no logic)
* ``_layers``        the CA-SAM layers and pure layer-to-prompt converters
* ``_segmenting``    segment, route, commit, undo and propagate (a mixin of the widget)
* ``_classes``       the class picker: which label a commit or a propagation writes
* ``_session``       the model session without Qt: predictor, lock, image generation, task choice
* ``_workers``       worker discipline: no model call on the UI thread, stop and join on close
* ``_learning``      "Learn new task" in a separate process
* ``_task_library``  the task list, task cards and library actions

Shortcuts: ``T`` toggles positive/negative clicks, ``S`` segments, ``C`` commits the preview,
``Ctrl+Z`` undoes the last change of the labels.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QWidget

from ._runtime import avoid_llvm_clash

avoid_llvm_clash()  # before anything imports torch (see _runtime)

from casam_core.config import cache_dir as default_cache_dir  # noqa: E402
from casam_core.library import TaskLibrary  # noqa: E402
from casam_core.tasks import TaskChoice  # noqa: E402

from ._classes import ClassPicker  # noqa: E402
from ._layers import (BOXES, LABELS, POINTS, PREVIEW, Annotations, PromptLayers, slice_index,  # noqa: E402
                      slicing_axis)
from ._learning import LearnController  # noqa: E402
from ._panels import build_panels  # noqa: E402
from ._auto import AutoMixin  # noqa: E402
from ._segmenting import SegmentingMixin  # noqa: E402
from ._session import ModelSession  # noqa: E402
from ._task_library import TaskLibraryPanel, task_from_text  # noqa: E402
from ._workers import Workers, start_prewarm, task_status  # noqa: E402

__all__ = ["CASamWidget", "POINTS", "BOXES", "PREVIEW", "LABELS"]  # the layer names, for scripts and tests
DEBOUNCE_MS = 150


class CASamWidget(SegmentingMixin, AutoMixin, QWidget):
    def __init__(self, napari_viewer, library: Optional[str] = None, cache_dir: Optional[str] = None):
        super().__init__()
        from qtpy.QtCore import QThreadPool
        from qtpy.QtWidgets import QApplication

        self.viewer = napari_viewer
        self.library = TaskLibrary(library)
        self.session = ModelSession(self.library, default_cache_dir(cache_dir))
        self.workers = Workers()  # outlives the Qt object: running work, and how to stop and join it
        self.destroyed.connect(self.workers.shutdown)
        app = QApplication.instance()
        if app is not None:  # quitting napari stops and joins every worker and the learning process
            app.aboutToQuit.connect(self.workers.shutdown)
        pool = QThreadPool.globalInstance()  # workers waiting on the lock must not starve napari's own
        pool.setMaxThreadCount(max(pool.maxThreadCount(), 8))
        self.image_layer = None
        self.last_route: Optional[TaskChoice] = None
        self._embed_worker = None
        self._ready = False  # the current image (or volume slice) is embedded
        self._prompt_version = 0  # bumps on every prompt, slice or task change
        self._preview_version = -1  # the prompt version the preview shows
        self._in_flight = 0  # segment requests not yet answered
        self._commit_pending = False  # C pressed while the preview was not yet current
        self._last_logits = None  # ((generation, slice), low-res logits) of the last segmentation
        self.layers = PromptLayers(self.viewer, self._on_prompt_change, self._bind_keys, self.status)
        self.learning = LearnController(self)
        self.tasks = TaskLibraryPanel(self)
        start_prewarm()
        build_panels(self)
        self.classes = ClassPicker(self.class_combo, lambda: self.layers.get(LABELS))
        self.annotations = Annotations()  # the slices the user annotated, per label: propagation's anchors
        self._propagation = None  # the running propagation's cancel event
        self._ranking = None  # the running ranking's cancel event
        self.last_ranking = None  # the last ranking of the open images (rows of evaluate.rank_by_coverage)
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.timeout.connect(lambda: self.segment(quiet=True))
        self._toast = QTimer(self)
        self._toast.setSingleShot(True)
        self._toast.timeout.connect(lambda: self.notify(self._toast_text))
        self._toast_text = ""
        self._said = 0  # notes and errors written so far: a finishing embedding does not hide a newer one
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.viewer.dims.events.current_step.connect(self.on_slice_change)
        self.viewer.dims.events.order.connect(self.on_view_change)
        self._bind_keys()
        self._refresh_layers()
        self.tasks.refresh()

    # ------------------------------------------------------------------ state, for the user and for tests
    @property
    def predictor(self):
        return self.session.predictor

    @property
    def is_volume(self) -> bool:
        return self.session.is_volume

    @property
    def is_ready(self) -> bool:
        """The current image (or the volume's first slice) is embedded: prompts are segmented."""
        return self._ready

    @property
    def is_embedding(self) -> bool:
        return self._embed_worker is not None

    @property
    def is_segmenting(self) -> bool:
        return self._in_flight > 0

    @property
    def commit_pending(self) -> bool:
        """C was pressed while a segmentation was on its way: the commit follows its answer."""
        return self._commit_pending

    @property
    def learn_job(self):
        return self.learning.job

    @property
    def last_learn_result(self):
        return self.learning.result

    # ------------------------------------------------------------------ messages and workers
    def status(self, text: str) -> None:
        self.status_label.setText(text)

    def say(self, text: str) -> None:
        """The end of a piece of work on the status line: a later "embedded all N slices" keeps off it."""
        self._said += 1
        self.status_label.setText(text)

    def notify(self, text: str) -> None:
        from napari.utils.notifications import show_info

        self.say(text)
        show_info(text)

    def error(self, text: str) -> None:
        from napari.utils.notifications import show_error

        self.say(text)
        show_error(text)

    def notify_soon(self, text: str) -> None:
        """The status line now, the toast a moment later: not in the same UI turn as the progress bar
        closing, the task list refreshing and the task reload (together they stalled the viewer ~0.12 s here)."""
        self.say(text)
        self._toast_text = text
        self._toast.start(1000)  # a child of the widget: it dies with it

    def _run(self, work, errored=None, **callbacks):
        return self.workers.start(work, errored=errored or (lambda exc: self.error(f"CA-SAM: {exc}")), **callbacks)

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop every worker and the learning process, and wait for them (at most ``timeout`` s).
        Called when the dock is closed, the viewer closes or napari quits; True when all stopped."""
        self._debounce.stop()
        self.learning.stop_polling()
        return self.workers.shutdown(timeout)

    def event(self, ev) -> bool:
        from qtpy.QtCore import QEvent

        if ev.type() == QEvent.ParentChange:  # docked (or moved): find the dock once napari has built it
            QTimer.singleShot(0, self._watch_dock)
        return super().event(ev)

    def _watch_dock(self) -> None:
        """Closing the dock (napari deletes its QDockWidget) stops and joins the widget's work."""
        from qtpy.QtWidgets import QDockWidget

        if not self.workers.alive:
            return
        parent = self.parentWidget()
        while parent is not None and not isinstance(parent, QDockWidget):
            parent = parent.parentWidget()
        if parent is not None and parent is not getattr(self, "_dock", None):
            self._dock = parent
            parent.destroyed.connect(self.workers.shutdown)

    # ------------------------------------------------------------------ layers
    def _bind_keys(self, target=None) -> None:
        """T, S, C and Ctrl+Z on the viewer, and on each CA-SAM prompt layer: a layer's own bindings
        come first in napari (S selects on a Points layer, T draws paths on a Shapes layer)."""
        target = self.viewer if target is None else target
        for key, fn in (("t", self.toggle_positive), ("s", self.segment), ("c", self.commit),
                        ("Control-z", self.undo)):
            try:
                target.bind_key(key, lambda _, fn=fn: fn(), overwrite=True)
            except TypeError:  # older napari
                target.bind_key(key, lambda _, fn=fn: fn())

    def _refresh_layers(self, event=None) -> None:
        from napari.layers import Image, Labels

        for combo, kind, skip in ((self.image_combo, Image, ()), (self.labels_combo, Labels, (PREVIEW,))):
            current = combo.currentText()
            names = [layer.name for layer in self.viewer.layers if isinstance(layer, kind) and layer.name not in skip]
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            combo.blockSignals(False)

    def _on_layer_removed(self, event=None) -> None:
        """The embedded image removed: forget it (running work for it is dropped), until the next Embed."""
        if self.image_layer is not None and self.image_layer not in self.viewer.layers:
            self._debounce.stop()
            self.session.new_image()  # results of running work for the old image are dropped
            self.image_layer = None
            self._ready = False
            self.layers.source = None
            self._commit_pending = False
            self.status("the image was removed: choose an image and press Embed")
            self.route_label.setText("route: -")
            self.route_strip.show_choice(None, 0)
        self._refresh_layers()

    # ------------------------------------------------------------------ embedding
    def embed(self) -> None:
        """Embed the chosen image layer: the current slice first (so clicks work at once), then the rest."""
        from napari.utils import progress

        name = self.image_combo.currentText()
        if not name:
            self.error("CA-SAM: open an image first")
            return
        key = (self.backbone_combo.currentText(), self.checkpoint_edit.text().strip() or None,
               self.device_combo.currentText())
        layer = self.viewer.layers[name]
        data = layer.data  # read into memory in the worker (a lazy array would block the UI here)
        spatial = len(data.shape) - (1 if layer.rgb else 0)
        if layer.multiscale or spatial not in (2, 3) or (layer.rgb and spatial != 2):  # before any CA-SAM layer
            what = ("a multiscale image" if layer.multiscale else
                    f"{'RGB ' if layer.rgb else ''}{spatial}D data of shape {tuple(data.shape)}")
            self.error(f"CA-SAM: {name} is {what}; CA-SAM segments 2D images (grey or RGB) and 3D volumes")
            return
        self.image_layer = layer
        is_volume = spatial == 3
        axis = slicing_axis(layer, self.viewer.dims) if is_volume else 0  # the slices the user sees
        session, stop = self.session, self.workers.stop
        generation = session.new_image(is_volume)
        self._ready = False
        new_image = self.layers.ensure(data.shape[:3] if is_volume else data.shape[:2], layer)
        try:  # Ctrl+Z on the labels layer too (napari's own undo there left the dock's status stale)
            self.viewer.layers[LABELS].bind_key("Control-z", lambda _: self.undo(), overwrite=True)
        except TypeError:  # older napari
            self.viewer.layers[LABELS].bind_key("Control-z", lambda _: self.undo())
        new_axis, self.layers.axis = axis != self.layers.axis, axis
        if new_axis:  # clicks and boxes lie on the slices of the other view
            self.clear_prompts()
        if new_image or new_axis or self.annotations.layer is not self.viewer.layers[LABELS]:
            self.annotations.watch(self.viewer.layers[LABELS], axis)
        self.classes.sync()
        self._refresh_layers()  # a kept labels layer was renamed: the Labels choice must list it
        current = self.current_slice()
        order = [current] + [i for i in range(data.shape[axis]) if i != current] if is_volume else [0]
        # said now, with the click, rather than when the slice is ready: each text change costs a redraw
        self.status("embedding the current slice first: prompts work as soon as it is ready"
                    + ("; the other slices follow in the background" if is_volume else ""))

        def work():  # every model call off the UI thread; the lock is released between slices
            skipped = session.open(key, np.asarray(data), is_volume, axis)  # a bad checkpoint path fails here
            yield 0, skipped
            for done, index in enumerate(order, start=1):
                if not session.is_current(generation) or stop.is_set():
                    return
                if is_volume:
                    session.embed_slice(index)
                yield done, index

        bar = progress(total=len(order), desc="CA-SAM: embedding" + (" slices" if is_volume else ""))
        failed = []

        def on_yield(value):
            done, index = value
            if done == 0:  # the predictor is ready; index = tasks not loaded
                for task, why in index.items():
                    self.status(f"task {task} not loaded: {why}")
                return
            bar.update(1)
            if done == 1 and session.is_current(generation):
                self._ready = True
                self.update_route()
                if self._prompts_present():
                    self.segment()

        finished_status = (task_status(self.viewer, f"embedding {name}", self.workers.shutdown) if is_volume
                           else (lambda: None))
        said = self._said

        def finish():
            bar.close()
            finished_status()
            if self._embed_worker is worker:
                self._embed_worker = None
            if session.is_current(generation) and not failed:
                if self._said == said:  # else a result or an error said meanwhile stays on the status line
                    self.status(f"embedded all {len(order)} slices" if is_volume else "image embedded")
                self.update_route()

        def on_error(exc):  # finish() runs after it and closes the bar
            failed.append(exc)
            self.error(f"CA-SAM: embedding failed: {exc}")

        worker = self._embed_worker = self._run(work, yielded=on_yield, finished=finish, errored=on_error)

    # ------------------------------------------------------------------ prompts
    def current_slice(self) -> int:
        """The image's slice index shown in the viewer (0 for a 2D image)."""
        if not self.is_volume or self.image_layer is None:
            return 0
        return slice_index(self.image_layer, self.viewer.dims.point, self.layers.axis)

    def current_prompts(self):
        """Points (x, y) with labels and boxes (x0, y0, x1, y1) on the current slice/image."""
        return self.layers.prompts(self.image_layer, self.current_slice())

    def _prompts_present(self) -> bool:
        coords, _, boxes = self.current_prompts()
        return coords is not None or boxes is not None

    def task_choice(self) -> Optional[str]:
        """The task as ``predict(task=)`` takes it: "auto", None (frozen) or a task name."""
        return task_from_text(self.task_combo.currentText())

    def toggle_positive(self) -> None:
        self.positive_check.setChecked(not self.positive_check.isChecked())

    def set_positive(self, positive: bool) -> None:
        self.layers.set_kind(positive)

    def _on_prompt_change(self, event=None) -> None:
        self._prompt_version += 1  # the preview no longer shows the prompts until the next answer
        self.layers.colour_points()
        if self.auto_check.isChecked():
            self._debounce.start(DEBOUNCE_MS)

    def on_task_change(self, text: str = "") -> None:
        self._prompt_version += 1
        if self.predictor is not None and self.image_layer is not None and self._ready:
            self.update_route()
            if self._prompts_present():
                self.segment()  # aligned features come from the cached embedding: no re-embedding

    def on_view_change(self, event=None) -> None:
        """The user rolled or transposed the view: an embedded volume is embedded again along the axis
        now sliced, so that clicks, boxes and propagation follow the slices shown."""
        if not self.is_volume or self.image_layer is None or self.image_layer not in self.viewer.layers:
            return
        axis = slicing_axis(self.image_layer, self.viewer.dims)
        if axis != self.layers.axis and self.viewer.dims.ndisplay == 2:
            self.status(f"the view now shows slices along axis {axis}: embedding them")
            self.image_combo.setCurrentText(self.image_layer.name)
            self.embed()

    def on_slice_change(self, event=None) -> None:
        if not self.is_volume or self.image_layer is None:
            return
        self.route_strip.set_current(self.current_slice())
        self._prompt_version += 1  # the preview shows another slice's prompts
        if self.auto_preview is not None:  # a zero-click preview covers every slice: still the one to commit
            self._preview_version = self._prompt_version
        if self.predictor is not None and self._prompts_present() and self.auto_check.isChecked():
            self._debounce.start(DEBOUNCE_MS)

    # ------------------------------------------------------------------ learning and the task library
    def learn(self, name: Optional[str] = None, labels_layer: Optional[str] = None) -> bool:
        """Start learning a task from the image and an annotated Labels layer (a separate process)."""
        return self.learning.start(name, labels_layer)

    def cancel_learning(self) -> None:
        self.learning.cancel()

    def library_changed(self) -> None:
        """After a task was learned, renamed, deleted or imported: the task lists, then the predictor's
        tasks reloaded in a worker (under the model lock), then the route recomputed."""
        self.tasks.refresh()

        def done(skipped):
            for name, why in skipped.items():
                self.status(f"task {name} not loaded: {why}")
            self.update_route()

        self._run(self.session.reload_tasks, returned=done,
                  errored=lambda exc: self.error(f"CA-SAM: reloading the tasks failed: {exc}"))
