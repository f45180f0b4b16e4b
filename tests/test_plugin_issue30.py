"""The plugin used as a clinician would (issue 30): each test is one defect found that way, in a
real viewer with the real LiteMedSAM weights, and fails on the code before its fix."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from casam_core.metrics import dice

from conftest import SAMPLES
from test_plugin_safety import _draw_box, _embed, _hippocampus

napari = pytest.importorskip("napari", reason="napari is an optional extra ([napari])")


def _sample_2d(viewer, w, qtbot):
    from napari_casam._sample_data import sample_2d

    (img, kw, _), (gt, _, _) = sample_2d()
    viewer.add_image(img, **kw)
    _embed(viewer, w, qtbot, kw["name"])
    return kw["name"], gt > 0


def test_t_after_a_commit_and_a_new_embed_toggles_without_an_error(widget, qtbot):
    """Item 1: the emptied points layer kept selected_data {1}; T then raised "index 1 is out of bounds"."""
    from napari_casam._widget import POINTS, PREVIEW

    viewer, w = widget
    name, gt = _sample_2d(viewer, w, qtbot)
    ys, xs = np.nonzero(gt)
    points = viewer.layers[POINTS]
    points.add([[ys.mean(), xs.mean()], [ys.mean() + 5, xs.mean()]])
    points.selected_data = {1}
    qtbot.waitUntil(lambda: viewer.layers[PREVIEW].data.any() and w.preview_is_current(), timeout=60000)
    assert w.commit()
    _embed(viewer, w, qtbot, name)
    errors = []
    from napari.utils.notifications import notification_manager

    notification_manager.notification_ready.connect(lambda n: errors.append(str(n.message)))
    w.toggle_positive()
    w.toggle_positive()
    qtbot.wait(200)
    assert points.selected_data == set() and not [e for e in errors if "out of bounds" in e], errors
    points.add([[ys.mean(), xs.mean()]])
    assert list(points.features["kind"]) == ["positive"]


def test_a_second_typed_class_name_becomes_the_current_class(widget, qtbot):
    """Item 2: typing "posterior" + Enter added "3: posterior" but left "2: anterior" current, so the
    next propagation overwrote the first class."""
    viewer, w = widget
    _sample_2d(viewer, w, qtbot)
    for name, expected in (("anterior", 1), ("posterior", 2)):
        w.class_combo.lineEdit().setText(name)
        qtbot.keyClick(w.class_combo.lineEdit(), "\r")
        qtbot.wait(50)
        assert w.class_combo.currentText() == f"{expected}: {name}", w.class_combo.currentText()
        assert w.target_label() == expected


def test_a_box_drawn_after_a_click_changes_the_preview(widget, qtbot):
    """Item 4: the click's result went along as the prior and the box was silently ignored."""
    from napari_casam._widget import POINTS, PREVIEW

    viewer, w = widget
    _, gt = _sample_2d(viewer, w, qtbot)
    ys, xs = np.nonzero(gt)
    viewer.layers[POINTS].add([[ys.mean(), xs.mean()]])  # a click in the middle of the head
    qtbot.waitUntil(lambda: viewer.layers[PREVIEW].data.any() and w.preview_is_current(), timeout=60000)
    clicked = viewer.layers[PREVIEW].data.copy()
    _draw_box(viewer, gt)
    qtbot.waitUntil(lambda: w.preview_is_current() and not w.is_segmenting, timeout=60000)
    boxed = viewer.layers[PREVIEW].data > 0
    assert not np.array_equal(boxed, clicked > 0)
    assert dice(boxed, gt) > 0.85, (dice(boxed, gt), dice(clicked > 0, gt))


def test_saving_labels_as_dicom_seg_for_a_non_dicom_image_says_why(tmp_path):
    """Item 5: napari took the writer's ValueError for "not my format" and said only "not a valid writer"."""
    from napari.layers import Labels
    from napari.plugins.io import save_layers

    from napari_casam._writer import LabelsNotWritten

    layer = Labels(np.ones((3, 8, 8), np.int32), name="CA-SAM labels")
    with pytest.raises(LabelsNotWritten, match="a DICOM SEG is written only for labels drawn on a DICOM series"):
        save_layers(str(tmp_path / "x.dcm"), [layer], plugin="napari-casam")
    assert not (tmp_path / "x.dcm").exists()


def test_closing_the_dock_while_a_second_volume_embeds_stops_everything(make_napari_viewer, qtbot, tmp_path):
    """Item 6: a volume removed mid-embedding, another embedding, the dock closed: workers still alive 30 s later."""
    from napari_casam._widget import CASamWidget

    viewer = make_napari_viewer()
    w = CASamWidget(viewer, library=str(tmp_path / "library"), cache_dir=str(tmp_path / "cold-cache"))
    viewer.window.add_dock_widget(w, name="CA-SAM")
    w.device_combo.setCurrentText("cpu")
    vol, _ = _hippocampus(0, 35)
    viewer.add_image(vol, name="first")
    _embed(viewer, w, qtbot, "first", all_slices=False)
    viewer.layers.remove("first")  # mid-embedding
    viewer.add_image(vol[::-1].copy(), name="second")
    _embed(viewer, w, qtbot, "second", all_slices=False)
    assert w.workers.running()
    viewer.window.remove_dock_widget(w)
    qtbot.waitUntil(lambda: not w.workers.alive, timeout=60000)
    assert w.workers.joined  # the close waited for the running work, which stopped (not the 30 s limit)
    assert w.workers.running() == 0
    calls = w.predictor.encoder_calls
    qtbot.wait(2000)
    assert w.predictor.encoder_calls == calls


@pytest.mark.parametrize("generator", [True, False])
def test_a_worker_started_just_before_the_close_neither_holds_the_close_nor_runs_after_it(qtbot, generator):
    """CI: the dock closed right after a worker was started from Qt's event loop (superqt then starts
    it on a timer, which cannot fire while the close waits): the close hit its 30 s limit."""
    from qtpy.QtCore import QTimer

    from napari_casam._workers import Workers

    workers, ran, out = Workers(), threading.Event(), {}

    def work_generator():
        ran.set()
        yield 1

    def work_function():
        ran.set()

    def in_the_event_loop():
        workers.start(work_generator if generator else work_function, errored=out.setdefault)
        out["joined"] = workers.shutdown(timeout=5)  # before: False after 5 s, the worker never begun

    QTimer.singleShot(0, in_the_event_loop)
    qtbot.waitUntil(lambda: "joined" in out, timeout=30000)
    assert out["joined"] is True
    qtbot.waitUntil(lambda: all(done.is_set() for _, done, _ in workers.workers), timeout=10000)
    assert not ran.is_set() and workers.running() == 0 and set(out) == {"joined"}


def test_undo_says_what_it_did_and_ctrl_z_on_the_labels_layer_updates_the_dock(widget, qtbot):
    """Item 7: Undo with nothing to undo said "undid the last change"; after napari's own Ctrl+Z the
    dock still said "committed label 1"."""
    from napari_casam._widget import LABELS, PREVIEW

    viewer, w = widget
    _, gt = _sample_2d(viewer, w, qtbot)
    w.undo()
    assert w.status_label.text().startswith("nothing to undo")
    _draw_box(viewer, gt)
    qtbot.waitUntil(lambda: viewer.layers[PREVIEW].data.any() and w.preview_is_current(), timeout=60000)
    assert w.commit() == [1] and w.status_label.text().startswith("committed label 1")
    labels = viewer.layers[LABELS]
    viewer.layers.selection.active = labels
    keymap = {str(k).lower(): v for k, v in labels.keymap.items()}  # what a Ctrl+Z on the labels layer runs
    handler = next(v for k, v in keymap.items() if "control" in k or "ctrl" in k)
    handler(labels)
    assert not labels.data.any()
    assert w.status_label.text().startswith("undid the last change"), w.status_label.text()


def test_propagation_stops_are_said_in_plain_words():
    """Item 7: "area 323 px > 1.5 x the start slice's 204 px" meant nothing to a clinician."""
    from casam_core.build import build_predictor
    from casam_core.io import read_image, read_labels
    from casam_core.prompts import box_from_mask, propagate_box

    image = read_image(SAMPLES / "hippocampus_mri" / "hippocampus_003.nii.gz")
    gt = read_labels(SAMPLES / "hippocampus_mri" / "hippocampus_003_mask.nii.gz", like=image).array > 0
    predictor, _ = build_predictor("litemedsam", device="cpu", cache_dir=False)
    predictor.set_volume(image.array)
    k = int(gt.sum((1, 2)).argmax())
    _, summary = propagate_box(predictor, k, box_from_mask(gt[k]))
    for stop in summary["stops"]:
        assert stop["why"] and "px" not in stop["why"] and " x the " not in stop["why"], stop
    grown = [s for s in summary["stops"] if "start slice" in s["reason"]]
    assert grown and "times its size on the annotated slice" in grown[0]["why"], summary["stops"]


# ------------------------------------------------------------------ 21: the learner's job folder
def test_the_learners_patient_data_leaves_the_disk_at_once_and_its_folder_goes_when_the_viewer_dies(tmp_path):
    """Item 21: when napari died, $TMPDIR/casam-learn-* kept image.npy and labels.npy (0644) forever."""
    from napari_casam._learn_process import JOB_PREFIX, sweep_stale_jobs

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    stale = tmp / f"{JOB_PREFIX}999999999-old"  # a viewer that no longer runs
    stale.mkdir()
    (stale / "image.npy").write_bytes(b"patient")
    env = dict(os.environ, TMPDIR=str(tmp), CASAM_LIBRARY=str(tmp_path / "library"))
    viewer = (  # a "viewer" that starts learning, then dies without reaping its learner
        "import time, numpy as np\n"
        "from napari_casam._learn_process import LearnJob\n"
        "job = LearnJob(name='t', image=np.zeros((64, 64), np.uint8), labels=np.zeros((64, 64), np.uint8),"
        " device='cpu', library=%r, steps=1000)\n"
        "job.start(); time.sleep(0.5); print(job.folder, flush=True); time.sleep(600)\n" % str(tmp_path / "library"))
    proc = subprocess.Popen([sys.executable, "-c", viewer], stdout=subprocess.PIPE, text=True, env=env)
    folder = Path(proc.stdout.readline().strip())
    assert folder.parent == tmp and folder.name.startswith(f"{JOB_PREFIX}{proc.pid}-")
    assert not stale.exists()  # swept when this job started: its viewer is gone
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (folder / "labels.npy").exists():
        time.sleep(0.1)
    assert not (folder / "image.npy").exists() and not (folder / "labels.npy").exists()  # read, then deleted
    proc.kill()  # the viewer dies; its learner sees its input end
    proc.wait()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and folder.exists():
        time.sleep(0.2)
    assert not folder.exists()
    assert sweep_stale_jobs(tmp) == 0
