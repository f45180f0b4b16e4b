"""The next case is cheaper, in the viewer (issue 31): a task learned in the plugin from one
annotated volume routes the next patient to itself and segments it with no prompt ("Segment
with task", approved with C); between two annotated slices propagation leaves no slice empty."""

from __future__ import annotations

import json

import numpy as np
import pytest

from casam_core.io import read_image, read_labels
from casam_core.metrics import dice

from conftest import dataset_root
from test_plugin import _wait_for_learning
from test_plugin_workflow import _go_to, _preview, _screenshot, _volume
from test_plugin_safety import _draw_box, _embed

napari = pytest.importorskip("napari", reason="napari is an optional extra ([napari])")


def _new_patient():
    root = dataset_root("hippocampus_mri")
    case = json.loads((root / "dataset.json").read_text())["test"][0]
    image = read_image(root / case["image"])
    return image.array.astype(np.float32), read_labels(root / case["mask"], like=image).array


def test_a_task_learned_on_one_volume_routes_and_segments_the_next_patient(widget, qtbot, monkeypatch):
    from napari_casam._widget import LABELS, PREVIEW

    viewer, w = widget
    vol, lab = _volume()
    viewer.add_image(vol, name="patient 1")
    viewer.add_labels(lab, name="patient 1 annotation")
    _embed(viewer, w, qtbot, "patient 1")
    # on the frozen model there is nothing to find with: one line says why
    w.segment_with_task()
    qtbot.waitUntil(lambda: "cannot find structures" in w.status_label.text()
                    or "no learned task for this backbone" in w.status_label.text(), timeout=60000)
    assert "draw a box" in w.status_label.text()
    w.steps_spin.setValue(10)
    assert w.learn(name="hippo", labels_layer="patient 1 annotation")
    result = _wait_for_learning(w, qtbot, timeout=480000)
    assert result[0] == "done", result
    assert "finder" in w.library.card("hippo")
    qtbot.wait(1500)  # the learning's note is shown again, as a toast, a second later
    # the next patient: another volume of the same kind
    other, gt = _new_patient()
    viewer.add_image(other, name="patient 2")
    _embed(viewer, w, qtbot, "patient 2")
    qtbot.waitUntil(lambda: w.route_label.text().startswith("route: task hippo"), timeout=60000)
    w.segment_with_task()
    qtbot.waitUntil(lambda: w._auto is None and ("found" in w.status_label.text() or "CA-SAM: " in
                                                 w.status_label.text()), timeout=180000)
    assert "task hippo found" in w.status_label.text(), w.status_label.text()
    preview = np.asarray(viewer.layers[PREVIEW].data)
    assert preview.shape == gt.shape and set(np.unique(preview)) <= {0, 1, 2} and preview.any()
    _go_to(viewer, int(np.argmax((preview > 0).sum(axis=(1, 2)))))
    _screenshot(viewer, qtbot, "segment_with_task", w)
    assert w.commit() is not None
    labels = np.asarray(viewer.layers[LABELS].data)
    assert set(np.unique(labels)) == set(np.unique(preview))  # the task's classes, not new ids
    assert dice(labels > 0, gt > 0) > 0.3  # measured 0.5-0.6 after 10 steps on one volume
    # Stop while it segments: the labels stay as they were
    w.segment_with_task()
    w.stop_work()
    qtbot.waitUntil(lambda: w._auto is None, timeout=120000)
    assert np.array_equal(np.asarray(viewer.layers[LABELS].data), labels)
    # one box on the new patient, propagated: the task's finder places the box on the slices (where
    # it agrees with the box on the annotated slice: prompts.AGREEMENT; once always, once never)
    from casam_core import prompts

    anterior = gt == 1
    k = int(np.argmax(anterior.sum(axis=(1, 2))))
    for agreement, note in ((0.0, "the task's finder placed the box"),
                            (1.01, "the task's finder did not see what you annotated: the box was carried")):
        monkeypatch.setattr(prompts, "AGREEMENT", agreement)
        _go_to(viewer, k)
        _draw_box(viewer, anterior[k], z=k)
        _preview(viewer, w, qtbot)
        w.propagate()
        qtbot.waitUntil(lambda: not w.is_propagating and "filled on" in w.status_label.text(), timeout=240000)
        assert note in w.status_label.text(), w.status_label.text()
        w.status("")


def test_two_annotated_slices_leave_no_empty_slice_between_them(widget, qtbot):
    """The issue's hippocampus_003 case: boxes on slices 4 and 17, committed, then propagated."""
    from napari_casam._widget import LABELS

    viewer, w = widget
    vol, gt = _volume()
    gt = gt > 0
    viewer.add_image(vol, name="hippo")
    _embed(viewer, w, qtbot, "hippo")
    w.class_combo.setCurrentText("hippocampus")
    for k in (4, 17):
        _go_to(viewer, k)
        _draw_box(viewer, gt[k], z=k)
        _preview(viewer, w, qtbot)
        assert w.commit() == [1]
    w.propagate()
    labels = viewer.layers[LABELS]
    qtbot.waitUntil(lambda: not w.is_propagating and "filled on" in w.status_label.text(), timeout=240000)
    empty = [k for k in range(4, 18) if not (labels.data[k] == 1).any()]
    assert not empty, (empty, w.status_label.text())
