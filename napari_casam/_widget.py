"""The CA-SAM dock widget: click-to-segment on 2D images and volumes, routing, learning.

Thin over casam_core: every model call goes through the one ``CASamPredictor``, run in
worker threads (never on the UI thread) and serialised by a lock; learning a task runs in
a separate process (``_learn_process``). Layers the widget manages:

* ``CA-SAM points``  positive (green) / negative (red) clicks; ``T`` toggles the kind
* ``CA-SAM boxes``   rectangles drawn with the Shapes tools
* ``CA-SAM preview`` the current mask (not saved)
* ``CA-SAM labels``  committed masks, one label id per commit (``C`` commits, ``Ctrl+Z`` undoes)
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from typing import List, Optional

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QInputDialog,
                            QLabel, QLineEdit, QListWidget, QMessageBox, QPushButton, QSpinBox, QVBoxLayout, QWidget)

from ._runtime import avoid_llvm_clash

avoid_llvm_clash()  # before anything imports torch (see _runtime)

from casam_core.backbones import BACKBONES, DEFAULT_BACKBONE, build_backbone
from casam_core.library import TaskLibrary, TaskLibraryError, TaskNameClash
from casam_core.predictor import CASamPredictor
from casam_core.progress import Cancelled
from casam_core.prompts import propagate_box
from casam_core.training import PROFILES as LEARN_PROFILES
from casam_core.training import LearnConfig, check_task_name

POINTS, BOXES, PREVIEW, LABELS = "CA-SAM points", "CA-SAM boxes", "CA-SAM preview", "CA-SAM labels"
AUTO, FROZEN = "Auto (router)", "Frozen model"
DEBOUNCE_MS = 150
DEFAULT_STEPS = LearnConfig.steps
CLICK_TEXT = {"click_box": "one box of the task's typical object size, centred on the click",
              "direct": "decoded as points", "default": "the backbone's own way (LiteMedSAM: box search)"}
POSITIVE, NEGATIVE = "positive", "negative"
COLOURS = {POSITIVE: "lime", NEGATIVE: "red"}
PREVIEW_COLOUR = "cyan"  # unlike any colour of napari's label cycle, and visible on endoscopy and greyscale
POINT_PIXELS = (10, 40)  # clicks are drawn 10-40 screen pixels wide


class CASamWidget(QWidget):
    def __init__(self, napari_viewer, library: Optional[str] = None, cache_dir: Optional[str] = None):
        super().__init__()
        import os
        from pathlib import Path

        self.viewer = napari_viewer
        self.library = TaskLibrary(library)
        self.cache_dir = cache_dir or os.environ.get("CASAM_CACHE_DIR") or str(
            Path.home() / ".cache" / "casam" / "embeddings")
        self.predictor: Optional[CASamPredictor] = None
        self._predictor_key = None
        self.lock = threading.Lock()  # one model call at a time
        from qtpy.QtCore import QThreadPool

        pool = QThreadPool.globalInstance()  # workers waiting on the lock must not starve napari's own
        pool.setMaxThreadCount(max(pool.maxThreadCount(), 8))
        self.image_layer = None
        self.is_volume = False
        self.learn_job = None
        self._learn_progress = None
        self._embed_worker = None
        self._ready = False  # the current image (or volume slice) is embedded
        self._generation = 0  # bumps when the image changes: stale worker results are dropped
        self.last_route = None
        self.last_seconds = None
        self._positive = True
        self._life = _Life()  # what outlives the Qt object: running work, and how to stop and join it
        self.destroyed.connect(self._life.shutdown)
        self._prompt_version = 0  # bumps on every prompt, slice or task change
        self._preview_version = -1  # the prompt version the preview shows
        self._in_flight = 0  # segment requests not yet answered
        self._commit_pending = False  # C pressed while the preview was not yet current
        self._last_logits = None  # ((generation, slice), low-res logits) of the last segmentation
        from qtpy.QtWidgets import QApplication

        app = QApplication.instance()
        if app is not None:  # quitting napari stops and joins every worker and the learning process
            app.aboutToQuit.connect(self._life.shutdown)
        self._layers_source = None  # the image the prompt/preview/labels layers belong to
        threading.Thread(target=_prewarm_imports, name="casam-prewarm", daemon=True).start()
        self._build_ui()
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.timeout.connect(lambda: self.segment(quiet=True))
        self._toast = QTimer(self)
        self._toast.setSingleShot(True)
        self._toast.timeout.connect(lambda: self._notify(self._toast_text))
        self._toast_text = ""
        self._poll = QTimer(self)
        self._poll.timeout.connect(self._poll_learning)
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.viewer.dims.events.current_step.connect(self._on_slice_change)
        self._bind_keys()
        self._refresh_layers()
        self.refresh_tasks()

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        from qtpy.QtWidgets import QFrame, QScrollArea

        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()  # the dock fits a 1366x768 screen: what does not fit scrolls
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.NoFrame)
        content = QWidget()
        scroll.setWidget(content)
        outer.addWidget(scroll)
        layout = QVBoxLayout(content)

        box = QGroupBox("Image")
        form = QFormLayout(box)
        self.image_combo = QComboBox()
        self.backbone_combo = QComboBox()
        self.backbone_combo.addItems(sorted(BACKBONES))
        self.backbone_combo.setCurrentText(DEFAULT_BACKBONE)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("checkpoint .pth (SAM ViT backbones only)")
        self.embed_button = QPushButton("Embed image")
        self.embed_button.clicked.connect(self.embed)
        form.addRow("image layer", self.image_combo)
        form.addRow("backbone", self.backbone_combo)
        form.addRow("device", self.device_combo)
        form.addRow("checkpoint", self.checkpoint_edit)
        form.addRow(self.embed_button)
        layout.addWidget(box)

        box = QGroupBox("Task")
        form = QFormLayout(box)
        self.task_combo = QComboBox()
        self.task_combo.currentTextChanged.connect(self._on_task_change)
        self.route_label = QLabel("route: -")
        _steady(self.route_label)
        self.scores_button = QPushButton("All scores")
        self.scores_button.clicked.connect(self.show_scores)
        form.addRow("task", self.task_combo)
        form.addRow(self.route_label)
        form.addRow(self.scores_button)
        layout.addWidget(box)

        box = QGroupBox("Segment")
        v = QVBoxLayout(box)
        self.positive_check = QCheckBox("positive clicks (T toggles)")
        self.positive_check.setChecked(True)
        self.positive_check.toggled.connect(self._set_positive)
        self.auto_check = QCheckBox("segment on every prompt change")
        self.auto_check.setChecked(True)
        v.addWidget(self.positive_check)
        v.addWidget(self.auto_check)
        row = QHBoxLayout()
        for text, slot in (("Segment (S)", self.segment), ("Commit (C)", self.commit), ("Undo", self.undo),
                           ("Clear", self.clear)):
            b = QPushButton(text)
            b.clicked.connect(slot)
            row.addWidget(b)
        v.addLayout(row)
        self.propagate_button = QPushButton("Propagate through the volume")
        self.propagate_button.clicked.connect(self.propagate)
        v.addWidget(self.propagate_button)
        self.status_label = QLabel("")
        _steady(self.status_label)
        v.addWidget(self.status_label)
        layout.addWidget(box)

        box = QGroupBox("Learn new task")
        form = QFormLayout(box)
        self.task_name_edit = QLineEdit()
        self.task_name_edit.setPlaceholderText("e.g. liver_ct")
        self.labels_combo = QComboBox()
        self.profile_combo = QComboBox()
        self.profile_combo.addItems(list(LEARN_PROFILES))
        self.profile_combo.setToolTip("fast: minutes on a CPU (identity-start layer, the best of the held-out "
                                      "checks); paper: the paper's 24 epochs, for a GPU")
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100000)
        self.steps_spin.setValue(DEFAULT_STEPS)
        self.steps_spin.setToolTip(f"optimiser steps of the fast recipe (1 image x 5 masks each); it also "
                                   f"stops after {LearnConfig.time_budget_s:.0f} s of training")
        self.profile_combo.currentTextChanged.connect(lambda p: self.steps_spin.setEnabled(p == "fast"))
        self.learn_button = QPushButton("Learn new task")
        self.learn_button.clicked.connect(self.learn)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel_learning)
        self.label_name_edit = QLineEdit()
        self.label_name_edit.setPlaceholderText("e.g. liver (default: label 1, label 2, ...)")
        self.modality_edit = QLineEdit()
        self.modality_edit.setPlaceholderText("e.g. CT, T1 MRI, endoscopy")
        form.addRow("task name", self.task_name_edit)
        form.addRow("structure", self.label_name_edit)
        form.addRow("modality", self.modality_edit)
        form.addRow("annotations", self.labels_combo)
        form.addRow("recipe", self.profile_combo)
        form.addRow("steps", self.steps_spin)
        row = QHBoxLayout()
        row.addWidget(self.learn_button)
        row.addWidget(self.cancel_button)
        form.addRow(row)
        layout.addWidget(box)

        box = QGroupBox("Task library")
        v = QVBoxLayout(box)
        self.task_list = QListWidget()
        self.task_list.currentTextChanged.connect(self._show_card)
        self.card_label = QLabel("")
        self.card_label.setWordWrap(True)
        v.addWidget(self.task_list)
        v.addWidget(self.card_label)
        row = QHBoxLayout()
        for text, slot in (("Rename", self._rename_clicked), ("Delete", self._delete_clicked),
                           ("Export", self._export_clicked), ("Import", self._import_clicked)):
            b = QPushButton(text)
            b.clicked.connect(slot)
            row.addWidget(b)
        v.addLayout(row)
        layout.addWidget(box)
        layout.addStretch(1)

    def _keys(self):
        return (("t", self.toggle_positive), ("s", self.segment), ("c", self.commit), ("Control-z", self.undo))

    def _bind_keys(self, target=None) -> None:
        """T, S, C and Ctrl+Z on the viewer, and on each CA-SAM prompt layer: a layer's own bindings
        come first in napari (S selects on a Points layer, T draws paths on a Shapes layer)."""
        target = self.viewer if target is None else target
        for key, fn in self._keys():
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
            self._forget_image("the image was removed: choose an image and press Embed")
        self._refresh_layers()

    def _forget_image(self, why: str) -> None:
        self._generation += 1  # results of running work for the old image are dropped
        self._debounce.stop()
        self.image_layer = None
        self.is_volume = False
        self._ready = False
        self._layers_source = None
        self._commit_pending = False
        self.status_label.setText(why)
        self.route_label.setText("route: -")

    def _notify(self, text: str) -> None:
        from napari.utils.notifications import show_info

        self.status_label.setText(text)
        show_info(text)

    def _error(self, text: str) -> None:
        from napari.utils.notifications import show_error

        self.status_label.setText(text)
        show_error(text)

    def _guarded(self, fn):
        """``fn`` as a worker callback that does nothing once the widget has been destroyed (a worker can
        finish after napari closed: its callback must not touch deleted Qt objects)."""
        life = self._life

        def call(*args):
            if life.alive:
                return fn(*args)

        return call

    def _run_worker(self, work, *, returned=None, yielded=None, finished=None, errored=None):
        """Start ``work`` (a function or generator function) in a napari worker. RuntimeErrors reach
        ``errored`` (by default an error shown as 'CA-SAM: ...'), and no callback runs after the widget
        has been destroyed. Returns the worker."""
        from napari.qt.threading import create_worker

        if not self._life.alive:
            return None
        from qtpy.QtCore import Qt

        done = threading.Event()
        worker = create_worker(_reraise(work), _start_thread=False, _ignore_errors=True)
        # set in the worker's own thread as it ends (a shutdown waits on it without Qt's event loop)
        worker.finished.connect(done.set, Qt.DirectConnection)
        self._life.track(worker, done)
        for signal, fn in (("returned", returned), ("yielded", yielded), ("finished", finished),
                           ("errored", errored or (lambda exc: self._error(f"CA-SAM: {exc}")))):
            if fn is not None:
                getattr(worker, signal).connect(self._guarded(fn))
        worker.start()
        return worker

    def _task_status(self, description: str):
        """Tell napari that a long job runs: its close dialog lists it, and closing the window cancels it
        (which stops and joins all of the widget's work). Returns a function that marks the job done.
        napari 0.9 offers this only as private Window methods (it warns that plugins lose them from 0.10):
        without them, aboutToQuit and the dock's destruction still stop the work."""
        import warnings

        window = getattr(self.viewer, "window", None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            register = getattr(window, "_register_task_status", None)
            update = getattr(window, "_update_task_status", None)
        if register is None or update is None:
            return lambda: None
        from napari.utils.task_status import Status

        status_id = register("CA-SAM", Status.BUSY, description, cancel_callback=self._life.shutdown)

        def finished():
            try:
                update(status_id, Status.COMPLETED)
            except Exception:  # the window is being torn down
                pass

        return finished

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop every worker and the learning process, and wait for them (at most ``timeout`` s).
        Called when the dock is closed, the viewer closes or napari quits; True when all stopped."""
        self._debounce.stop()
        self._poll.stop()
        return self._life.shutdown(timeout)

    def event(self, ev) -> bool:
        from qtpy.QtCore import QEvent

        if ev.type() == QEvent.ParentChange:  # docked (or moved): find the dock once napari has built it
            QTimer.singleShot(0, self._watch_dock)
        return super().event(ev)

    def _watch_dock(self) -> None:
        """Closing the dock (napari deletes its QDockWidget) stops and joins the widget's work."""
        from qtpy.QtWidgets import QDockWidget

        if not self._life.alive:
            return
        parent = self.parentWidget()
        while parent is not None and not isinstance(parent, QDockWidget):
            parent = parent.parentWidget()
        if parent is not None and parent is not getattr(self, "_dock", None):
            self._dock = parent
            parent.destroyed.connect(self._life.shutdown)

    # ------------------------------------------------------------------ embedding
    def _backbone_key(self):
        return (self.backbone_combo.currentText(), self.checkpoint_edit.text().strip() or None,
                self.device_combo.currentText())

    def _predictor_for(self, key):
        """The predictor for (backbone, checkpoint, device), built when needed (called in a worker).
        Returns (predictor, {task not loaded: reason})."""
        if self.predictor is None or key != self._predictor_key:
            backbone = build_backbone(key[0], key[1], key[2])
            predictor = CASamPredictor(backbone, disk_cache=self.cache_dir)
            skipped = predictor.load_tasks(self.library)
            self.predictor, self._predictor_key = predictor, key
            return predictor, skipped
        return self.predictor, {}

    def _load_tasks(self) -> dict:
        """(Re)register the library's tasks with the predictor; returns {skipped task: reason}."""
        if self.predictor is None:
            return {}
        for name in list(self.predictor.layers):
            self.predictor.remove_task(name)
        return self.predictor.load_tasks(self.library)

    def _reload_tasks(self) -> None:
        """After a library change: reload the tasks in a worker (under the model lock), then re-route."""

        def work():
            with self.lock:
                return self._load_tasks()

        def done(skipped):
            for name, why in skipped.items():
                self.status_label.setText(f"task {name} not loaded: {why}")
            self.update_route()

        self._run_worker(work, returned=done,
                         errored=lambda exc: self._error(f"CA-SAM: reloading the tasks failed: {exc}"))

    def embed(self) -> None:
        """Embed the chosen image layer: the current slice first (so clicks work at once), then the rest."""

        name = self.image_combo.currentText()
        if not name:
            self._error("CA-SAM: open an image first")
            return
        key = self._backbone_key()
        layer = self.viewer.layers[name]
        data = layer.data  # read into memory in the worker (a lazy array would block the UI here)
        spatial = len(data.shape) - (1 if layer.rgb else 0)
        if layer.multiscale or spatial not in (2, 3) or (layer.rgb and spatial != 2):  # before any CA-SAM layer
            what = ("a multiscale image" if layer.multiscale else
                    f"{'RGB ' if layer.rgb else ''}{spatial}D data of shape {tuple(data.shape)}")
            self._error(f"CA-SAM: {name} is {what}; CA-SAM segments 2D images (grey or RGB) and 3D volumes")
            return
        self.image_layer = layer
        self.is_volume = spatial == 3
        self._generation += 1
        self._ready = False
        self._ensure_layers(data.shape[:3] if self.is_volume else data.shape[:2], layer)
        generation = self._generation
        current = self._current_slice()
        order = [current] + [i for i in range(data.shape[0]) if i != current] if self.is_volume else [0]
        is_volume = self.is_volume
        life = self._life
        # said now, with the click, rather than when the slice is ready: each text change costs a redraw
        self.status_label.setText("embedding the current slice first: prompts work as soon as it is ready"
                                  + ("; the other slices follow in the background" if is_volume else ""))

        def work():  # every model call off the UI thread; the lock is released between slices
            array = np.asarray(data)
            with self.lock:
                predictor, skipped = self._predictor_for(key)  # a bad checkpoint path fails here
                if is_volume:
                    predictor.set_volume(array, axis=0)
                else:
                    predictor.set_image(array)
            yield 0, len(order), skipped
            for done, index in enumerate(order, start=1):
                if generation != self._generation or life.stop.is_set():
                    return
                if is_volume:
                    with self.lock:
                        predictor.slice_record(index)
                yield done, len(order), index

        from napari.utils import progress

        bar = progress(total=len(order), desc="CA-SAM: embedding" + (" slices" if is_volume else ""))
        def on_yield(value):
            done, total, index = value
            if done == 0:  # the predictor is ready; index = tasks not loaded
                for task, why in index.items():
                    self.status_label.setText(f"task {task} not loaded: {why}")
                return
            bar.update(1)
            if done == 1 and generation == self._generation:
                self._ready = True
                self._after_embedding()

        finished_status = self._task_status(f"embedding {name}") if is_volume else (lambda: None)

        def finish():
            bar.close()
            finished_status()
            if self._embed_worker is worker:
                self._embed_worker = None
            if generation == self._generation and not failed:
                self.status_label.setText(f"embedded all {len(order)} slices" if is_volume else "image embedded")
                self.update_route()

        failed = []

        def on_error(exc):  # finish() runs after it and closes the bar
            failed.append(exc)
            self._error(f"CA-SAM: embedding failed: {exc}")

        worker = self._embed_worker = self._run_worker(work, yielded=on_yield, finished=finish, errored=on_error)

    def _after_embedding(self) -> None:
        self.update_route()
        if self._prompts_present():
            self.segment()

    def _ensure_layers(self, shape, image_layer) -> None:
        """The prompt, preview and labels layers for this image. Existing layers are reused where they fit:
        adding a napari layer costs the UI thread several times more than giving one new data. Labels
        committed on another image are never overwritten: that layer is kept under a new name."""
        ndim = len(shape)
        kw = {"scale": image_layer.scale[-ndim:], "translate": image_layer.translate[-ndim:]}
        source = image_layer.name
        new_image = source != self._layers_source
        for name in (POINTS, BOXES):
            if name in self.viewer.layers and self.viewer.layers[name].ndim != ndim:
                self.viewer.layers.remove(name)
        if PREVIEW in self.viewer.layers and self.viewer.layers[PREVIEW].ndim != ndim:
            self.viewer.layers.remove(PREVIEW)  # a 3D layer given 2D data keeps its 3D scale: napari fails
        if new_image:
            self.clear_prompts()
        if POINTS not in self.viewer.layers:
            pts = self.viewer.add_points(np.empty((0, ndim)), name=POINTS, size=max(shape) / 80,
                                         canvas_size_limits=POINT_PIXELS,  # visible at any zoom and image size
                                         face_color=COLOURS[POSITIVE], features={"kind": np.array([], dtype=object)},
                                         **kw)
            pts.feature_defaults["kind"] = POSITIVE
            pts.events.data.connect(self._on_prompt_change)
            pts.mode = "add"
            self._bind_keys(pts)
        if BOXES not in self.viewer.layers:
            shapes = self.viewer.add_shapes(name=BOXES, ndim=ndim, edge_color="yellow", face_color="transparent",
                                            edge_width=max(shape) / 300, **kw)
            shapes.events.data.connect(self._on_prompt_change)
            self._bind_keys(shapes)
        for name in (POINTS, BOXES):
            self._place(self.viewer.layers[name], kw)
        metadata = {**image_layer.metadata, "casam_source": source}
        labels = self.viewer.layers[LABELS] if LABELS in self.viewer.layers else None
        if labels is not None:
            mine = labels.metadata.get("casam_source", source) == source and labels.data.shape == tuple(shape)
            if not mine and np.any(labels.data):  # another image's work: keep it, under its image's name
                labels.name = self._free_name(f"{LABELS} [{labels.metadata.get('casam_source', 'previous image')}]")
                labels.visible = False  # it belongs to another image
                self.status_label.setText(f"the labels committed before are kept in the hidden layer {labels.name}")
            elif labels.ndim != ndim:  # empty, but of another dimensionality: replaced below
                self.viewer.layers.remove(LABELS)
        for name in (PREVIEW, LABELS):
            layer = self.viewer.layers[name] if name in self.viewer.layers else None
            if layer is None:
                extra = {"colormap": _preview_colours()} if name == PREVIEW else {}
                self.viewer.add_labels(np.zeros(shape, np.int32), name=name, opacity=0.5 if name == PREVIEW else 0.6,
                                       metadata=metadata, **extra, **kw)
                continue
            if layer.data.shape != tuple(shape) or (name == PREVIEW and np.any(layer.data)):
                layer.data = np.zeros(shape, np.int32)  # (a new data array also starts a new undo history)
            layer.metadata = metadata
            self._place(layer, kw)
        layers = self.viewer.layers
        order = [layers.index(name) for name in (LABELS, PREVIEW, BOXES, POINTS)]
        if min(order) < layers.index(image_layer) or order != sorted(order):
            for name in (LABELS, PREVIEW, BOXES, POINTS):  # reused layers lay under an image opened since, or a
                layers.move(layers.index(name), len(layers))  # replaced one above the prompts: prompts uppermost
        self._layers_source = source
        self._refresh_layers()  # a kept labels layer was renamed: the Labels choice must list it
        if new_image:  # napari keeps the camera while layers remain: frame the new image
            try:
                self.viewer.reset_view(layers=[image_layer])
            except (TypeError, IndexError):  # napari < 0.6 frames every layer; napari 0.9 cannot frame a 2D
                self.viewer.reset_view()  # layer alone while a 3D one is open ("index 2 is out of bounds")
        self.viewer.layers.selection.active = self.viewer.layers[POINTS]

    @staticmethod
    def _place(layer, kw) -> None:
        """Give a reused layer the image's scale and translate (only when they differ: each set redraws)."""
        for attr in ("scale", "translate"):
            if not np.allclose(getattr(layer, attr), kw[attr]):
                setattr(layer, attr, kw[attr])

    def _free_name(self, name: str) -> str:
        base, k = name, 2
        while name in self.viewer.layers:
            name, k = f"{base} {k}", k + 1
        return name

    # ------------------------------------------------------------------ prompts
    def _current_slice(self) -> int:
        """The image's slice index shown in the viewer: the dims point in world coordinates mapped into
        the image's data coordinates (the slider step differs when layers have other origins or spacings)."""
        if not self.is_volume or self.image_layer is None:
            return 0
        return _slice_index(self.image_layer, self.viewer.dims.point)

    def _to_image(self, layer, coords: np.ndarray) -> np.ndarray:
        """(N, D) data coordinates of a prompt layer as (N, D) data coordinates of the image."""
        coords = np.atleast_2d(np.asarray(coords, float))
        if len(coords) == 0 or self.image_layer is None:
            return coords
        same = (np.allclose(layer.scale, self.image_layer.scale[-layer.ndim:])
                and np.allclose(layer.translate, self.image_layer.translate[-layer.ndim:]))
        if same and layer.ndim == self.image_layer.ndim:
            return coords
        return np.array([self.image_layer.world_to_data(layer.data_to_world(c)) for c in coords])

    def toggle_positive(self) -> None:
        self.positive_check.setChecked(not self.positive_check.isChecked())

    def _set_positive(self, positive: bool) -> None:
        self._positive = positive
        if POINTS in self.viewer.layers:
            pts = self.viewer.layers[POINTS]
            kind = POSITIVE if positive else NEGATIVE
            pts.feature_defaults["kind"] = kind
            pts.current_face_color = COLOURS[kind]

    def _on_prompt_change(self, event=None) -> None:
        self._prompt_version += 1  # the preview no longer shows the prompts until the next answer
        if POINTS in self.viewer.layers:  # colour each point by its kind
            pts = self.viewer.layers[POINTS]
            kinds = list(pts.features["kind"]) if "kind" in pts.features else []
            if len(kinds) == len(pts.data) and len(kinds):
                colours = np.array([_rgba(COLOURS.get(k, COLOURS[POSITIVE])) for k in kinds])
                if not np.allclose(np.asarray(pts.face_color), colours):
                    pts.face_color = colours
        if self.auto_check.isChecked():
            self._debounce.start(DEBOUNCE_MS)

    def _prompts_present(self) -> bool:
        coords, _, boxes = self.current_prompts()
        return coords is not None or boxes is not None

    def current_prompts(self):
        """Points (x, y) with labels and boxes (x0, y0, x1, y1) on the current slice/image."""
        k = self._current_slice()
        coords = labels = boxes = None
        if POINTS in self.viewer.layers:
            pts = self.viewer.layers[POINTS]
            data = self._to_image(pts, pts.data)
            if len(data):
                kinds = np.asarray(pts.features["kind"]) if "kind" in pts.features else np.full(len(data), POSITIVE)
                keep = np.ones(len(data), bool) if data.shape[1] == 2 else np.round(data[:, 0]) == k
                if keep.any():
                    coords = data[keep][:, -2:][:, ::-1]
                    labels = (kinds[keep] != NEGATIVE).astype(int)
        if BOXES in self.viewer.layers:
            out = []
            shapes = self.viewer.layers[BOXES]
            for shape, verts in zip(shapes.shape_type, shapes.data):
                verts = self._to_image(shapes, verts)
                if shape != "rectangle" or (verts.shape[1] == 3 and np.round(verts[0, 0]) != k):
                    continue
                ys, xs = verts[:, -2], verts[:, -1]
                out.append([xs.min(), ys.min(), xs.max(), ys.max()])
            if out:
                boxes = np.array(out)
        if coords is not None and self.image_layer is not None:
            h, w = self.image_layer.data.shape[-2:] if not self.image_layer.rgb else self.image_layer.data.shape[:2]
            coords = np.clip(coords, 0, [w - 1, h - 1])
        return (coords, labels, boxes) if coords is not None else (None, None, boxes)

    def task_choice(self) -> Optional[str]:
        text = self.task_combo.currentText()
        if text == AUTO or not text:
            return "auto"
        if text == FROZEN:
            return None
        return text

    # ------------------------------------------------------------------ segmenting
    def _not_ready_reason(self) -> Optional[str]:
        """Why prompts cannot be segmented now (None when they can)."""
        if self.image_layer is None or self.predictor is None:
            return "CA-SAM: choose an image and press Embed first"
        if not self._ready:
            return "CA-SAM: the image is still being embedded; prompts are segmented as soon as it is ready"
        if PREVIEW not in self.viewer.layers or LABELS not in self.viewer.layers:
            return "CA-SAM: the CA-SAM layers were removed: press Embed again"
        return None

    def segment(self, quiet: bool = False) -> None:
        """Segment the current slice/image from the prompts, in a worker; the preview shows the result.
        The status line says "segmenting..." until the preview shows the current prompts."""
        why = self._not_ready_reason()
        if why is not None:
            if not quiet:
                self._error(why)
            return
        coords, labels, boxes = self.current_prompts()
        version = self._prompt_version
        if coords is None and boxes is None:
            self.viewer.layers[PREVIEW].data = np.zeros_like(self.viewer.layers[PREVIEW].data)
            self._preview_version = version
            return
        k = self._current_slice()
        task = self.task_choice()
        generation = self._generation
        key = (generation, k)
        # corrective clicks: the last result on this slice goes along (SAM's mask_input); on a box-only
        # backbone the predictor then searches boxes around it and never trades it for a mask that
        # honours fewer clicks
        prior = self._last_logits[1] if (coords is not None and self._last_logits is not None
                                         and self._last_logits[0] == key
                                         and (boxes is None or len(boxes) == 1)) else None
        t0 = time.perf_counter()
        self._in_flight += 1
        self.status_label.setText("segmenting...")

        def work():
            with self.lock:
                p = self.predictor
                if self.is_volume:
                    p.set_slice(k)
                chosen, route = self._resolve(task)
                masks, scores, low = p.predict(point_coords=coords, point_labels=labels, box=boxes, task=chosen,
                                               mask_input=prior)
            return masks[:, 0].any(0), route, low[0] if len(low) == 1 else None

        def done(result):
            if generation != self._generation or PREVIEW not in self.viewer.layers:
                return  # another image since, or the preview layer was removed: dropped
            mask, route, low = result
            if version == self._prompt_version:
                self._last_logits = (key, low) if low is not None else None
            preview = self.viewer.layers[PREVIEW]
            data = np.zeros_like(preview.data)
            if self.is_volume:
                data[k] = mask
            else:
                data[:] = mask
            preview.data = data
            self._preview_version = version
            self.last_seconds = time.perf_counter() - t0
            self._show_route(route)
            if version == self._prompt_version:
                self.status_label.setText(f"preview ready ({int(mask.sum())} px); C commits it")
                if self._commit_pending:
                    self._commit_pending = False
                    self.commit()

        def finished():
            self._in_flight -= 1
            if not self._in_flight and not self._debounce.isActive() and not self._preview_is_current():
                self._commit_pending = False  # the segmentation failed: a commit never takes an old preview

        self._run_worker(work, returned=done, finished=finished)

    def _resolve(self, task):
        """(layer to use, route report) for the current image; call with the lock held."""
        p = self.predictor
        if task != "auto":
            return p.resolve_task(task), {"mode": "named" if task else "frozen", "decision": task}
        if self.is_volume:
            route = p.route_volume(embed_missing=False)
            complete = p.volume.route is not None
        else:
            route, complete = p.route(), True
        chosen = route.decision
        layer = chosen if chosen is not None and p.layers.get(chosen) is not None else None
        return layer, {"mode": "auto", "decision": chosen, "scores": route.scores, "tau": route.tau,
                       "best": route.best, "complete": complete}

    def update_route(self) -> None:
        """Recompute the route shown for the current image, in a worker (the UI never waits on the model)."""

        if self.predictor is None or self.image_layer is None or not self._ready:
            return
        task = self.task_choice()
        generation = self._generation

        def work():
            with self.lock:
                if generation != self._generation:  # another image since: its route comes with it
                    return None
                return self._resolve(task)[1]

        def done(route):
            if route is not None and generation == self._generation:
                self._show_route(route)

        self._run_worker(work, returned=done)

    def _show_route(self, route: dict) -> None:
        self.last_route = route
        if route["mode"] == "frozen":
            text = "route: frozen model (chosen)"
        elif route["mode"] == "named":
            text = f"route: task {route['decision']} (chosen)"
        elif not route["scores"]:
            text = "route: frozen model (no learned task for this backbone)"
        else:
            best = route["best"]
            s, t = route["scores"][best], route["tau"][best]
            provisional = "" if route.get("complete", True) else " [provisional: volume still embedding]"
            if route["decision"] is None:
                text = f"route: frozen model, out of distribution (closest {best}: {s:.3g} > tau {t:.3g}){provisional}"
            else:
                card = self.predictor.cards.get(best, {})
                note = "" if card.get("use_alignment", True) else " (its layer lost to frozen: frozen model used)"
                text = f"route: task {best} (score {s:.3g} <= tau {t:.3g}){note}{provisional}"
        self.route_label.setText(text)

    def show_scores(self) -> None:
        route = self.last_route or {}
        scores = route.get("scores") or {}
        lines = [f"{n}: score {s:.4g}, tau {route['tau'][n]:.4g} {'in' if s <= route['tau'][n] else 'out'}"
                 for n, s in sorted(scores.items(), key=lambda kv: kv[1])]
        self._notify("CA-SAM scores:\n" + ("\n".join(lines) if lines else "no learned task"))

    def _on_task_change(self, text: str) -> None:
        self._prompt_version += 1
        if self.predictor is not None and self.image_layer is not None and self._ready:
            self.update_route()
            if self._prompts_present():
                self.segment()  # aligned features come from the cached embedding: no re-embedding

    def _on_slice_change(self, event=None) -> None:
        if not self.is_volume or self.image_layer is None:
            return
        self._prompt_version += 1  # the preview shows another slice's prompts
        if self.predictor is not None and self._prompts_present() and self.auto_check.isChecked():
            self._debounce.start(DEBOUNCE_MS)

    # ------------------------------------------------------------------ commit / undo
    def _preview_is_current(self) -> bool:
        return self._preview_version == self._prompt_version and not self._debounce.isActive()

    def commit(self) -> Optional[int]:
        """Write the preview into the labels layer with the next free label id (napari's undo history).
        A preview older than the prompts is never committed: when a segmentation is on its way the
        commit waits for it, otherwise the user is asked to segment first."""
        why = self._not_ready_reason()
        if why is not None:
            self._error(why)
            return None
        if not self._preview_is_current():
            if self._in_flight or self._debounce.isActive():
                self._commit_pending = True
                self.status_label.setText("segmenting... the commit follows when the preview shows the current prompts")
            else:
                self._error("CA-SAM: the preview is older than the prompts: press Segment (S) before committing")
            return None
        mask = np.asarray(self.viewer.layers[PREVIEW].data) > 0
        if not mask.any():
            self._notify("CA-SAM: nothing to commit: the preview is empty")
            return None
        label_id = self._write_label(mask)
        self.clear_prompts()
        return label_id

    def _write_label(self, mask: np.ndarray, labels=None) -> int:
        """Give the mask's pixels the next free label id, as one step of the Labels layer's own undo history
        (the widget's Undo and napari's Ctrl+Z are the same history)."""
        labels = labels if labels is not None else self.viewer.layers[LABELS]
        label_id = int(np.asarray(labels.data).max()) + 1
        index = np.nonzero(mask)
        labels.data_setitem(index, label_id)
        if PREVIEW in self.viewer.layers:
            self.viewer.layers[PREVIEW].data = np.zeros_like(self.viewer.layers[PREVIEW].data)
        self.status_label.setText(f"committed label {label_id} ({len(index[0])} voxels)")
        return label_id

    def undo(self) -> None:
        """Undo the last change of the CA-SAM labels layer (napari's history: a commit or a manual edit)."""
        if LABELS not in self.viewer.layers:
            self._error("CA-SAM: there is no CA-SAM labels layer to undo")
            return
        labels = self.viewer.layers[LABELS]
        labels.undo()  # nothing happens when its history is empty
        self.status_label.setText("undid the last change of the labels")

    def clear_prompts(self) -> None:
        for name in (POINTS, BOXES):
            if name in self.viewer.layers:
                layer = self.viewer.layers[name]
                layer.events.data.disconnect(self._on_prompt_change)
                if name == POINTS:
                    layer.data = np.empty((0, layer.ndim))
                else:
                    layer.data = []
                layer.events.data.connect(self._on_prompt_change)
        self._prompt_version += 1
        self._commit_pending = False
        self._last_logits = None  # the next prompts start a new object

    def clear(self) -> None:
        self.clear_prompts()
        if PREVIEW in self.viewer.layers:
            self.viewer.layers[PREVIEW].data = np.zeros_like(self.viewer.layers[PREVIEW].data)
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
            self._error(why)
            return
        k = self._current_slice()
        start = np.asarray(self.viewer.layers[PREVIEW].data)[k] > 0
        if start.any() and not self._preview_is_current():
            self._error("CA-SAM: the preview is older than the prompts: wait for it, or press Segment (S)")
            return
        box = None
        if not start.any():
            start = None
            _, _, boxes = self.current_prompts()
            box = boxes[0] if boxes is not None else None
            if box is None:
                self._error("CA-SAM: segment the current slice (or draw a box) before propagating")
                return
        task = self.task_choice()
        generation, source, labels = self._generation, self.image_layer.name, self.viewer.layers[LABELS]
        life = self._life
        bar = progress(total=0, desc="CA-SAM: propagating")  # a busy bar: propagate_box reports from the worker
        finished_status = self._task_status(f"propagating through {source}")

        def work():
            with self.lock:
                chosen, _ = self._resolve(task)
                return propagate_box(self.predictor, k, box, task=chosen, start_mask=start,
                                     cancel=lambda: life.stop.is_set() or generation != self._generation)

        def done(result):
            mask, summary = result
            if generation != self._generation or labels not in self.viewer.layers:
                self._error(f"CA-SAM: the propagation through {source} was dropped: the image changed meanwhile")
                return
            if mask.any():
                self._write_label(mask > 0, labels)
                self.clear_prompts()
            self._notify(f"CA-SAM: propagated over {len(summary['slices'])} slices")

        def failed(exc):
            if isinstance(getattr(exc, "__cause__", None), Cancelled) or isinstance(exc, Cancelled):
                self.status_label.setText(f"the propagation through {source} was stopped")
                return
            self._error(f"CA-SAM: {exc}")

        def end():
            bar.close()
            finished_status()

        self._run_worker(work, returned=done, errored=failed, finished=end)

    # ------------------------------------------------------------------ learning
    def learn(self, name: Optional[str] = None, labels_layer: Optional[str] = None) -> bool:
        """Start learning a task from the image layer and an annotated Labels layer (separate process)."""
        from napari.utils import progress

        from ._learn_process import LearnJob

        name = (name or self.task_name_edit.text()).strip()
        labels_name = labels_layer or self.labels_combo.currentText()
        image_name = self.image_layer.name if self.image_layer is not None else self.image_combo.currentText()
        if self.learn_job is not None:
            self._error("CA-SAM: a task is already being learned")
            return False
        if not name or not image_name or not labels_name:
            self._error("CA-SAM: choose an image, an annotated Labels layer and a task name")
            return False
        try:
            check_task_name(name)
        except ValueError as exc:
            self._error(f"CA-SAM: {exc}")
            return False
        if name in self.library:
            self._error(f"CA-SAM: a task named {name!r} already exists in {self.library.root}")
            return False
        image = np.asarray(self.viewer.layers[image_name].data)
        labels = np.asarray(self.viewer.layers[labels_name].data)
        if labels.shape != image.shape[: labels.ndim] or labels.ndim not in (2, 3):
            self._error(f"CA-SAM: {labels_name} ({labels.shape}) does not match {image_name} ({image.shape})")
            return False
        if not labels.any():
            self._error(f"CA-SAM: {labels_name} has no annotation")
            return False
        self.learn_job = LearnJob(
            name=name, image=image, labels=labels.astype(np.int32), backbone=self.backbone_combo.currentText(),
            checkpoint=self.checkpoint_edit.text().strip() or None, device=self.device_combo.currentText(),
            library=str(self.library.root), cache_dir=self.cache_dir, profile=self.profile_combo.currentText(),
            steps=int(self.steps_spin.value()) if self.profile_combo.currentText() == "fast" else None,
            label_names=self._label_names(labels), modality=self.modality_edit.text().strip() or None)
        self._life.jobs.append(self.learn_job)
        self._learn_status_done = self._task_status(f"learning task {name}")
        self.learn_job.start()
        self._learn_name = name
        self._learn_description = ""
        self._learn_progress = progress(total=1, desc=f"CA-SAM: learning {name}")
        self.learn_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self._poll.start(200)
        self.status_label.setText(f"learning task {name} in a separate process...")
        return True

    def _label_names(self, labels: np.ndarray) -> Optional[dict]:
        """{label value: name} from the structure field (None: the learning process names them)."""
        text = self.label_name_edit.text().strip()
        if not text:
            return None
        values = [int(v) for v in np.unique(labels) if v]
        return {v: text if len(values) == 1 else f"{text} {v}" for v in values}

    def cancel_learning(self) -> None:
        if self.learn_job is not None:
            self.learn_job.cancel()
            self.status_label.setText("cancelling...")

    def _poll_learning(self) -> None:
        job = self.learn_job
        if job is None or not self._life.alive:
            self._poll.stop()
            return
        final = latest = None
        for msg in job.messages():
            if msg[0] == "progress":
                latest = msg
            else:
                final = msg
        if latest is not None:  # one progress bar update per poll, however many steps were reported
            _, done, total, text = latest
            bar = self._learn_progress
            if bar.total != total:
                bar.total = total
            bar.n = done
            description = f"CA-SAM {self._learn_name}: {text}"
            if description != self._learn_description:
                bar.set_description(description)
                self._learn_description = description
            bar.refresh()
        if final is None and not job.alive():
            final = ("error", "the learning process ended unexpectedly", "")
        if final is None:
            return
        self._poll.stop()
        self._learn_progress.close()
        self._learn_status_done()
        self.learn_job = None
        self.learn_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        # the child may take seconds to exit after its last message (interpreter and torch teardown):
        # it is reaped off the UI thread
        threading.Thread(target=job.join, args=(60,), name="casam-learn-reap", daemon=True).start()
        if final[0] == "done":
            card = final[1]
            v = card["validation"]
            text = (f"CA-SAM: learned task {card['name']}: validation Dice frozen {v['dice_zero_shot']:.3f} "
                    f"vs aligned {v['dice_aligned']:.3f}")
            if "warning" in card:
                text += " - the layer did not beat the frozen model; this task will use the frozen model"
            self.refresh_tasks()
            self._reload_tasks()
            self._notify_soon(text)
        elif final[0] == "cancelled":
            self._notify_soon("CA-SAM: learning cancelled; the task library is unchanged")
        else:
            self._error(f"CA-SAM: learning failed: {final[1]}")
        self.last_learn_result = final

    def _notify_soon(self, text: str) -> None:
        """The status line now, the toast a moment later: not in the same UI turn as the progress bar
        closing, the task list refreshing and the task reload (together they stalled the viewer ~0.12 s here)."""
        self.status_label.setText(text)
        self._toast_text = text
        self._toast.start(1000)  # a child of the widget: it dies with it

    # ------------------------------------------------------------------ task library
    def refresh_tasks(self) -> None:
        names = self.library.names()
        current = self.task_combo.currentText()
        self.task_combo.blockSignals(True)
        self.task_combo.clear()
        self.task_combo.addItems([AUTO, FROZEN] + names)
        self.task_combo.setCurrentText(current if current in [AUTO, FROZEN] + names else AUTO)
        self.task_combo.blockSignals(False)
        self.task_list.clear()
        self.task_list.addItems(names)

    def _show_card(self, name: str) -> None:
        if not name:
            self.card_label.setText("")
            return
        try:
            c = self.library.card(name)
        except TaskLibraryError as exc:
            self.card_label.setText(str(exc))
            return
        v = c.get("validation", {})
        self.card_label.setText(
            f"{name}: {c.get('modality') or 'modality unknown'}; labels {', '.join((c.get('labels') or {}).values())}\n"
            f"backbone {c.get('backbone_fingerprint')}; {c.get('alignment', {}).get('form')} layer, "
            f"{c.get('training_data', {}).get('annotated')} annotated images\n"
            f"validation Dice frozen {v.get('dice_zero_shot')} vs aligned {v.get('dice_aligned')}"
            f"{'' if c.get('use_alignment', True) else ' (uses the frozen model)'}; created {c.get('created')}\n"
            f"clicks: {CLICK_TEXT.get(c.get('point_prompts'), CLICK_TEXT['default'])}")

    def _after_library_change(self) -> None:
        self.refresh_tasks()
        self._reload_tasks()

    def rename_task(self, old: str, new: str) -> None:
        self.library.rename(old, new)
        self._after_library_change()

    def delete_task(self, name: str) -> None:
        self.library.remove(name)
        self._after_library_change()

    def export_task(self, name: str, path: str) -> None:
        self.library.export(name, path)
        self._notify(f"CA-SAM: exported task {name} to {path}")

    def import_task(self, path: str, name: Optional[str] = None) -> None:
        fingerprint = self.predictor.backbone.fingerprint if self.predictor is not None else None
        task = self.library.import_pack(path, fingerprint=fingerprint, name=name)
        self._after_library_change()
        self._notify(f"CA-SAM: imported task {task.name} from {path}")

    def _selected(self) -> Optional[str]:
        item = self.task_list.currentItem()
        return item.text() if item is not None else None

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except (TaskLibraryError, ValueError, OSError) as exc:
            self._error(f"CA-SAM: {exc}")

    def _rename_clicked(self) -> None:
        name = self._selected()
        if name:
            new, ok = QInputDialog.getText(self, "Rename task", f"new name for {name}:")
            if ok and new.strip():
                self._guard(self.rename_task, name, new.strip())

    def _delete_clicked(self) -> None:
        name = self._selected()
        if name and QMessageBox.question(self, "Delete task", f"Delete task {name!r} from {self.library.root}? "
                                         "This cannot be undone.") == QMessageBox.Yes:
            self._guard(self.delete_task, name)

    def _export_clicked(self) -> None:
        name = self._selected()
        if name:
            path, _ = QFileDialog.getSaveFileName(self, "Export task pack", f"{name}.casam-task")
            if path:
                self._guard(self.export_task, name, path)

    def _import_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import task pack", "", "CA-SAM task packs (*.casam-task *.zip)")
        name = None
        while path:
            try:
                self.import_task(path, name)
                return
            except TaskNameClash as exc:  # offer another name, as the message suggests
                name, ok = QInputDialog.getText(self, "Import task pack", f"{exc}\n\nimport it as:",
                                                text=f"{exc.name}_2")
                if not ok or not name.strip():
                    self.status_label.setText("import cancelled; the task library is unchanged")
                    return
                name = name.strip()
            except (TaskLibraryError, ValueError, OSError) as exc:
                self._error(f"CA-SAM: {exc}")
                return


def _preview_colours():
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: PREVIEW_COLOUR})


def _slice_index(layer, world_point) -> int:
    """The index along a 3D layer's first axis of the slice napari shows at ``world_point``."""
    point = np.asarray(world_point, float)[-layer.ndim:]
    index = float(np.asarray(layer.world_to_data(point))[0])
    return int(np.clip(np.round(index), 0, layer.data.shape[0] - 1))


def _rgba(colour: str) -> np.ndarray:
    from napari.utils.colormaps.standardize_color import transform_color

    return transform_color(colour)[0]


def _prewarm_imports() -> None:
    """Import, off the UI thread, what the first Embed click would otherwise import on it
    (napari's Points layer features need pandas: about 0.4 s here)."""
    try:
        import pandas  # noqa: F401
    except ImportError:  # napari without pandas: the Points layer then imports what it needs itself
        pass


class _Life:
    """A plain object that outlives the widget's C++ object: whether the widget still exists, the work it
    started (workers with their 'finished' events, learning jobs), and how to stop and join that work."""

    def __init__(self) -> None:
        self.alive = True
        self.stop = threading.Event()  # workers check it between units of work
        self.workers: List[tuple] = []  # (worker, threading.Event set when its function has returned)
        self.jobs: List = []  # learning processes

    def track(self, worker, done: threading.Event) -> None:
        self.workers = [(w, d) for w, d in self.workers if not d.is_set()] + [(worker, done)]

    def running(self) -> int:
        return sum(not d.is_set() for _, d in self.workers) + sum(job.alive() for job in self.jobs)

    def shutdown(self, timeout: float = 30.0, *_) -> bool:
        """Ask all work to stop, then wait for it; True when nothing is left running. No callback runs after."""
        if not isinstance(timeout, (int, float)):  # called by a Qt signal with its own argument
            timeout = 30.0
        self.alive = False
        self.stop.set()
        for worker, done in self.workers:
            if not done.is_set() and hasattr(worker, "quit"):
                try:
                    worker.quit()  # a generator worker stops at its next yield
                except RuntimeError:  # its Qt object is gone: the event below still tells
                    pass
        for job in self.jobs:
            job.cancel()
        deadline = time.monotonic() + timeout
        for _, done in self.workers:
            done.wait(max(0.0, deadline - time.monotonic()))
        for job in self.jobs:
            job.stop(max(1.0, deadline - time.monotonic()))
        return self.running() == 0


def _steady(label) -> None:
    """A wrapped label that keeps room for three lines: a new text repaints the label but does not
    re-lay out the dock (which, over napari's OpenGL canvas, means a whole-window redraw)."""
    label.setWordWrap(True)
    label.setMinimumHeight(3 * label.fontMetrics().lineSpacing() + 4)


class WorkerError(Exception):
    """An error raised in a CA-SAM worker thread, re-raised under a type that reaches the widget."""


def _reraise(fn):
    """``fn`` (a function or a generator function) with RuntimeError re-raised as WorkerError. superqt's
    workers drop a RuntimeError without emitting ``errored`` or ``finished`` (it takes it for a deleted
    Qt object), and torch (CUDA out of memory) and casam_core (a bad checkpoint) raise RuntimeErrors."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                return (yield from fn(*args, **kwargs))
            except RuntimeError as exc:
                raise WorkerError(str(exc)) from exc

        return generator

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:
            raise WorkerError(str(exc)) from exc

    return call
