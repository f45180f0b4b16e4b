"""The dock's layout: five panels (image, task, segment, learn, task library), built onto the
widget as attributes and wired to its public methods. No logic lives here."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFormLayout, QFrame, QGroupBox, QHBoxLayout, QLabel, QLineEdit,
                            QListWidget, QPushButton, QScrollArea, QSpinBox, QVBoxLayout, QWidget)

from casam_core.backbones import BACKBONES, DEFAULT_BACKBONE
from casam_core.training import PROFILES, LearnConfig

from ._route_strip import RouteStrip

DEVICES = ("auto", "cpu", "cuda", "mps")


def steady(label: QLabel) -> QLabel:
    """A wrapped label that keeps room for three lines: a new text repaints the label but does not
    re-lay out the dock (which, over napari's OpenGL canvas, means a whole-window redraw)."""
    label.setWordWrap(True)
    label.setMinimumHeight(3 * label.fontMetrics().lineSpacing() + 4)
    return label


def _buttons(pairs) -> QHBoxLayout:
    row = QHBoxLayout()
    for text, slot in pairs:
        b = QPushButton(text)
        b.clicked.connect(slot)
        row.addWidget(b)
    return row


def build_panels(w) -> None:
    """Lay out the dock ``w`` (a QWidget with the CASamWidget methods)."""
    outer = QVBoxLayout(w)
    outer.setContentsMargins(0, 0, 0, 0)
    scroll = QScrollArea()  # the dock fits a 1366x768 screen: what does not fit scrolls
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.NoFrame)
    content = QWidget()
    scroll.setWidget(content)
    outer.addWidget(scroll)
    layout = QVBoxLayout(content)
    for panel in (_image_panel, _task_panel, _segment_panel, _learn_panel, _library_panel):
        layout.addWidget(panel(w))
    layout.addStretch(1)
    # scroll up and down only: the dock is made as wide as its widest row, so no button or field is cut
    # off at the right (napari gave the dock less, and a horizontal scroll bar hid "Undo", "Propagate")
    for combo in content.findChildren(QComboBox):  # a long layer name must not widen the dock past that
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(12)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    scroll.setMinimumWidth(content.minimumSizeHint().width() + scroll.verticalScrollBar().sizeHint().width())


def _image_panel(w) -> QGroupBox:
    box = QGroupBox("Image")
    form = QFormLayout(box)
    w.image_combo = QComboBox()
    w.backbone_combo = QComboBox()
    w.backbone_combo.addItems(sorted(BACKBONES))
    w.backbone_combo.setCurrentText(DEFAULT_BACKBONE)
    w.device_combo = QComboBox()
    w.device_combo.addItems(list(DEVICES))
    w.checkpoint_edit = QLineEdit()
    w.checkpoint_edit.setPlaceholderText("checkpoint .pth (SAM ViT backbones only)")
    w.embed_button = QPushButton("Embed image")
    w.embed_button.clicked.connect(w.embed)
    form.addRow("image layer", w.image_combo)
    form.addRow("backbone", w.backbone_combo)
    form.addRow("device", w.device_combo)
    form.addRow("checkpoint", w.checkpoint_edit)
    form.addRow(w.embed_button)
    return box


def _task_panel(w) -> QGroupBox:
    box = QGroupBox("Task")
    form = QFormLayout(box)
    w.task_combo = QComboBox()
    w.task_combo.currentTextChanged.connect(w.on_task_change)
    w.route_label = steady(QLabel("route: -"))
    w.route_strip = RouteStrip()
    w.route_strip.setToolTip("per slice: the learned task that recognises it (colour) or the frozen model (grey)")
    w.scores_button = QPushButton("All scores")
    w.scores_button.clicked.connect(w.show_scores)
    w.uncovered_button = QPushButton("Uncovered images")
    w.uncovered_button.setToolTip("routes every open image: those no learned task covers first (annotate them next)")
    w.uncovered_button.clicked.connect(w.rank_open_images)
    form.addRow("task", w.task_combo)
    form.addRow(w.route_label)
    form.addRow(w.route_strip)
    w.rank_folder_button = QPushButton("Rank a folder...")
    w.rank_folder_button.setToolTip("the open images and a folder's images, least covered by a learned task first")
    w.rank_folder_button.clicked.connect(w.rank_folder)
    form.addRow(w.scores_button)
    row = QHBoxLayout()  # two buttons a row: the dock fits a 1366x768 screen
    row.addWidget(w.uncovered_button)
    row.addWidget(w.rank_folder_button)
    form.addRow(row)
    return box


def _segment_panel(w) -> QGroupBox:
    box = QGroupBox("Segment")
    v = QVBoxLayout(box)
    w.positive_check = QCheckBox("positive clicks (T toggles)")
    w.positive_check.setChecked(True)
    w.positive_check.toggled.connect(w.set_positive)
    w.auto_check = QCheckBox("segment on every prompt change")
    w.auto_check.setChecked(True)
    v.addWidget(w.positive_check)
    v.addWidget(w.auto_check)
    row = QHBoxLayout()
    row.addWidget(QLabel("label"))
    w.class_combo = QComboBox()
    w.class_combo.setToolTip("what a commit or a propagation writes: a new label per object, or a class "
                             "(the task's structures, or type a name and press Enter)")
    row.addWidget(w.class_combo, 1)
    v.addLayout(row)
    v.addLayout(_buttons((("Segment (S)", w.segment), ("Commit (C)", w.commit), ("Undo", w.undo),
                          ("Clear", w.clear))))
    w.propagate_button = QPushButton("Propagate through the volume")
    w.propagate_button.setToolTip("fills the label from every slice you annotated for it (commits, brush "
                                  "corrections, this slice's preview); correct a slice and propagate again")
    w.propagate_button.clicked.connect(w.propagate)
    w.stop_button = QPushButton("Stop")
    w.stop_button.setEnabled(False)
    w.stop_button.setToolTip("cancels a propagation (the labels stay as they were), a segmentation with the task "
                             "or a ranking")
    w.stop_button.clicked.connect(w.stop_work)
    w.auto_button = QPushButton("Segment with task")
    w.auto_button.setToolTip("the learned task finds its structures on the whole image or volume, no prompts; "
                             "C approves, then correct with clicks, the brush or propagation")
    w.auto_button.clicked.connect(w.segment_with_task)
    row = QHBoxLayout()
    row.addWidget(w.auto_button, 1)
    row.addWidget(w.propagate_button, 1)
    row.addWidget(w.stop_button)
    v.addLayout(row)
    w.status_label = steady(QLabel(""))
    v.addWidget(w.status_label)
    return box


def _learn_panel(w) -> QGroupBox:
    box = QGroupBox("Learn new task")
    form = QFormLayout(box)
    w.task_name_edit = QLineEdit()
    w.task_name_edit.setPlaceholderText("e.g. liver_ct")
    w.labels_combo = QComboBox()
    w.profile_combo = QComboBox()
    w.profile_combo.addItems(list(PROFILES))
    w.profile_combo.setToolTip("fast: minutes on a CPU (identity-start layer, the best of the held-out "
                               "checks); paper: the paper's 24 epochs, for a GPU")
    w.steps_spin = QSpinBox()
    w.steps_spin.setRange(1, 100000)
    w.steps_spin.setValue(LearnConfig.steps)
    w.steps_spin.setToolTip(f"optimiser steps of the fast recipe ({LearnConfig.batch_images} image x "
                            f"{LearnConfig.masks_per_image} masks each); it also stops after "
                            f"{LearnConfig.time_budget_s:.0f} s of training")
    w.profile_combo.currentTextChanged.connect(lambda p: w.steps_spin.setEnabled(p == "fast"))
    w.learn_button = QPushButton("Learn new task")
    w.learn_button.clicked.connect(lambda: w.learn())
    w.cancel_button = QPushButton("Cancel")
    w.cancel_button.setEnabled(False)
    w.cancel_button.clicked.connect(w.cancel_learning)
    w.label_name_edit = QLineEdit()
    w.label_name_edit.setPlaceholderText("e.g. liver (default: label 1, label 2, ...)")
    w.modality_edit = QLineEdit()
    w.modality_edit.setPlaceholderText("e.g. CT, T1 MRI, endoscopy")
    form.addRow("task name", w.task_name_edit)
    form.addRow("structure", w.label_name_edit)
    form.addRow("modality", w.modality_edit)
    form.addRow("annotations", w.labels_combo)
    form.addRow("recipe", w.profile_combo)
    form.addRow("steps", w.steps_spin)
    row = QHBoxLayout()
    row.addWidget(w.learn_button)
    row.addWidget(w.cancel_button)
    form.addRow(row)
    return box


def _library_panel(w) -> QGroupBox:
    box = QGroupBox("Task library")
    v = QVBoxLayout(box)
    w.task_list = QListWidget()
    w.task_list.currentTextChanged.connect(w.tasks.show_card)
    w.card_label = QLabel("")
    w.card_label.setWordWrap(True)
    v.addWidget(w.task_list)
    v.addWidget(w.card_label)
    v.addLayout(_buttons((("Rename", w.tasks.rename_dialog), ("Delete", w.tasks.delete_dialog),
                          ("Export", w.tasks.export_dialog), ("Import", w.tasks.import_dialog))))
    return box
