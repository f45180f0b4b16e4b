"""The clinician's workflow on a volume (issue 14): named classes, correct-and-repropagate, a
propagation that can be stopped, napari's own undo; in a real viewer with the real weights."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from casam_core.io import read_image, read_labels
from casam_core.metrics import dice

from conftest import SAMPLES
from test_plugin_safety import _draw_box, _embed

SCREENSHOTS = os.environ.get("CASAM_SCREENSHOTS")  # a folder: the tests save what they show (make screenshots)


def _screenshot(viewer, qtbot, name, w=None):
    """The whole window as the user sees it, saved when CASAM_SCREENSHOTS names a folder."""
    if not SCREENSHOTS:
        return
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QDockWidget

    viewer.window.show()
    viewer.window.resize(1400, 900)
    qtbot.wait(300)
    dock = w.parentWidget() if w is not None else None
    while dock is not None and not isinstance(dock, QDockWidget):
        dock = dock.parentWidget()
    if dock is not None:  # the dock as wide as its content wants
        viewer.window._qt_window.resizeDocks([dock], [440], Qt.Horizontal)
    qtbot.wait(500)
    Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(Path(SCREENSHOTS) / f"{name}.png"), canvas_only=False)

napari = pytest.importorskip("napari", reason="napari is an optional extra ([napari])")


def _volume():
    image = read_image(SAMPLES / "hippocampus_mri" / "hippocampus_003.nii.gz")
    labels = read_labels(SAMPLES / "hippocampus_mri" / "hippocampus_003_mask.nii.gz", like=image).array
    return image.array.astype(np.float32), labels.astype(np.int32)


def _go_to(viewer, k):
    viewer.dims.set_current_step(0, k)


def _preview(viewer, w, qtbot):
    from napari_casam._widget import PREVIEW

    qtbot.waitUntil(lambda: viewer.layers[PREVIEW].data.any() and w.preview_is_current(), timeout=60000)


def _eight_slices(viewer, w, qtbot):
    """Slices 12-19 of the hippocampus sample embedded (the current one at least): (labels, k)."""
    vol, gt = _volume()
    viewer.add_image(vol[12:20], name="hippo")
    _embed(viewer, w, qtbot, "hippo", all_slices=False)
    return gt[12:20], w.current_slice()


def test_two_named_classes_are_committed_on_one_slice_and_undone_with_napari(widget, qtbot):
    from napari_casam._widget import LABELS

    viewer, w = widget
    gt, k = _eight_slices(viewer, w, qtbot)
    labels = viewer.layers[LABELS]
    for name, value in (("anterior", 1), ("posterior", 2)):
        w.class_combo.setCurrentText(name)  # typed in: the next free class id
        assert w.target_label() == value and w.class_combo.currentText() == f"{value}: {name}"
        assert labels.selected_label == value  # the brush paints the same class
        _draw_box(viewer, gt[k] == value, z=k)
        _preview(viewer, w, qtbot)
        assert w.commit() == [value]
    painted = labels.data[k]
    _screenshot(viewer, qtbot, "classes", w)
    assert set(np.unique(painted)) == {0, 1, 2}
    assert dice(painted == 1, gt[k] == 1) > 0.5 and dice(painted == 2, gt[k] == 2) > 0.5
    w.class_combo.setCurrentText("anterior")  # a known name picks its class again
    assert w.target_label() == 1
    labels.undo()  # napari's own history: the last commit goes, the first stays
    assert set(np.unique(labels.data[k])) == {0, 1}
    labels.redo()
    assert set(np.unique(labels.data[k])) == {0, 1, 2}
    w.class_combo.setCurrentIndex(0)  # instance mode: a new id per object
    assert w.target_label() is None


def test_a_corrected_slice_then_repropagation_improves_the_hippocampus(widget, qtbot):
    """One box on the middle slice, propagated; then the user corrects two slices (one with a box, one
    by painting) and propagates again: the result keeps both corrections and the 3D Dice rises."""
    from napari_casam._widget import LABELS

    viewer, w = widget
    vol, gt = _volume()
    gt = gt > 0
    viewer.add_image(vol, name="hippo")
    present = np.nonzero(gt.any(axis=(1, 2)))[0]
    k = int(np.median(present))
    _go_to(viewer, k)
    _embed(viewer, w, qtbot, "hippo")
    labels = viewer.layers[LABELS]
    _draw_box(viewer, gt[k], z=k)
    _preview(viewer, w, qtbot)
    w.propagate()
    qtbot.waitUntil(lambda: labels.data.any() and not w.is_propagating, timeout=240000)
    first = dice(labels.data > 0, gt)
    label = int(labels.data[k].max())

    low, high = (int(v) for v in np.percentile(present, [20, 80]))
    # a correction painted by hand (napari's history, as brush and eraser strokes are)
    _go_to(viewer, high)
    row = labels.data[high].copy()
    for where, value in (((row == label) & ~gt[high], 0), (gt[high] & (row != label), label)):
        idx = np.nonzero(where)
        labels.data_setitem((np.full(len(idx[0]), high), *idx), value)
    assert w.annotations.slices[label][high] == "drawn"
    # a correction with a new box, for the same structure, chosen in the class picker
    _go_to(viewer, low)
    w.class_combo.setCurrentText(str(label))
    assert w.target_label() == label
    _draw_box(viewer, gt[low], z=low)
    _preview(viewer, w, qtbot)
    corrected_low = np.asarray(viewer.layers["CA-SAM preview"].data[low]) > 0
    before = labels.data.copy()
    w.propagate()
    qtbot.waitUntil(lambda: not w.is_propagating, timeout=240000)
    assert "from 3 annotated" in w.status_label.text(), w.status_label.text()
    result = labels.data == label
    assert np.array_equal(result[high], gt[high]) and np.array_equal(result[low], corrected_low)
    second = dice(result, gt)
    _screenshot(viewer, qtbot, "corrected_and_repropagated", w)
    assert second > first + 0.1, (first, second)  # measured 0.35 -> 0.58 with the same slices in the core
    labels.undo()  # the whole re-propagation is one step of napari's history
    assert np.array_equal(labels.data, before)


def test_a_propagation_can_be_stopped_and_leaves_the_labels_as_they_were(widget, qtbot):
    from napari_casam._widget import LABELS

    viewer, w = widget
    vol, gt = _volume()
    gt = gt > 0
    viewer.add_image(vol, name="hippo")
    k = int(np.median(np.nonzero(gt.any(axis=(1, 2)))[0]))
    _go_to(viewer, k)
    _embed(viewer, w, qtbot, "hippo", all_slices=False)
    _draw_box(viewer, gt[k], z=k)
    _preview(viewer, w, qtbot)
    before = viewer.layers[LABELS].data.copy()
    w.propagate()
    assert w.is_propagating and w.stop_button.isEnabled()
    w.stop_work()
    qtbot.waitUntil(lambda: not w.is_propagating, timeout=120000)
    assert "stopped" in w.status_label.text() and not w.stop_button.isEnabled()
    assert np.array_equal(viewer.layers[LABELS].data, before)


def test_several_boxes_on_one_slice_preview_one_object_each_and_commit_one_id_each(widget, qtbot):
    from napari_casam._widget import LABELS, PREVIEW

    viewer, w = widget
    gt, k = _eight_slices(viewer, w, qtbot)
    _draw_box(viewer, gt[k] == 1, z=k)
    _draw_box(viewer, gt[k] == 2, z=k)
    qtbot.waitUntil(lambda: set(np.unique(viewer.layers[PREVIEW].data[k])) == {0, 1, 2} and w.preview_is_current(),
                    timeout=60000)
    _screenshot(viewer, qtbot, "several_boxes", w)
    assert w.commit() == [1, 2]  # instance mode: a new id for each object
    painted = viewer.layers[LABELS].data[k]
    assert dice(painted == 1, gt[k] == 1) > 0.5 and dice(painted == 2, gt[k] == 2) > 0.5
    viewer.layers[LABELS].undo()  # both objects were one commit
    assert not viewer.layers[LABELS].data.any()


def test_segmenting_and_propagation_follow_a_transposed_view(widget, qtbot):
    """Slices along another axis (the view rolled to coronal): the box is read on the slice shown,
    the preview lands on it, and propagation runs along that axis; turning the view back re-embeds."""
    from napari_casam._widget import BOXES, LABELS, PREVIEW

    viewer, w = widget
    vol, gt = _volume()
    gt = gt > 0
    viewer.add_image(vol, name="hippo")
    viewer.dims.order = (1, 0, 2)  # data axis 1 is sliced; axes 0 and 2 are displayed
    k = int(gt.sum(axis=(0, 2)).argmax())  # the largest coronal section
    viewer.dims.set_current_step(1, k)
    _embed(viewer, w, qtbot, "hippo", all_slices=False)
    assert w.layers.axis == 1 and w.current_slice() == k and w.predictor.volume.axis == 1
    target = gt[:, k, :]
    ys, xs = np.nonzero(target)
    y0, y1, x0, x1 = ys.min() - 1, ys.max() + 1, xs.min() - 1, xs.max() + 1
    viewer.layers[BOXES].add_rectangles(np.array([[y0, k, x0], [y0, k, x1], [y1, k, x1], [y1, k, x0]], float))
    qtbot.waitUntil(lambda: viewer.layers[PREVIEW].data[:, k, :].any() and w.preview_is_current(), timeout=60000)
    preview = viewer.layers[PREVIEW].data
    assert not np.delete(preview, k, axis=1).any()  # only on the slice shown
    assert dice(preview[:, k, :] > 0, target) > 0.6
    _screenshot(viewer, qtbot, "coronal_view", w)
    w.propagate()
    qtbot.waitUntil(lambda: not w.is_propagating, timeout=240000)
    labels = viewer.layers[LABELS].data > 0
    filled = np.nonzero(labels.any(axis=(0, 2)))[0]
    text = w.status_label.text()
    assert k in filled and (len(filled) > 1 or (f"slice {k - 1}" in text and f"slice {k + 1}" in text)), text
    assert set(filled) <= set(np.nonzero(gt.any(axis=(0, 2)))[0]), (filled, text)  # carried along axis 1
    # learning from this view cuts the volume along the axis the user saw and annotated
    assert w.learn(name="coronal", labels_layer=LABELS)
    assert w.learn_job.kwargs["axis"] == 1
    w.cancel_learning()
    qtbot.waitUntil(lambda: w.learn_job is None, timeout=120000)
    viewer.dims.order = (0, 1, 2)  # back to axial: embedded again along axis 0
    qtbot.waitUntil(lambda: w.layers.axis == 0 and w.is_ready, timeout=120000)
    assert w.predictor.volume.axis == 0
