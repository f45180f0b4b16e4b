"""The napari plugin under xvfb: manifest, reader/writer, samples, widget, learning in a process."""

from __future__ import annotations

import numpy as np
import pytest

from casam_core.io import read_image, read_labels
from casam_core.metrics import dice

from conftest import SAMPLES

napari = pytest.importorskip("napari", reason="napari is an optional extra ([napari])")


def test_manifest_is_valid():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-casam")
    kinds = {c.id.split(".")[-1] for c in manifest.contributions.commands}
    assert {"widget", "get_reader", "write_labels", "sample_2d", "sample_3d"} <= kinds


def test_reader_writer_round_trip_keeps_geometry(tmp_path):
    from napari_casam._reader import get_reader
    from napari_casam._writer import write_labels

    path = SAMPLES / "brats_glioma" / "brats_2013_pat0005_1.nii.gz"
    source = read_image(path)
    reader = get_reader(str(path))
    assert reader is not None and get_reader(str(SAMPLES / "hc18_fetal_head" / "006_HC.png")) is None
    data, kwargs, kind = reader(str(path))[0]
    assert kind == "image" and data.shape == source.array.shape
    assert tuple(kwargs["scale"]) == tuple(source.spacing[::-1])
    assert tuple(kwargs["translate"]) == tuple(source.origin[::-1])

    labels_path = SAMPLES / "brats_glioma" / "brats_2013_pat0005_1_mask.nii.gz"
    ldata, lkwargs, lkind = get_reader(str(labels_path))(str(labels_path))[0]
    assert lkind == "labels"
    out = tmp_path / "labels.nii.gz"
    written = write_labels(str(out), ldata, {"metadata": lkwargs["metadata"], "scale": lkwargs["scale"]})
    back = read_image(written[0])
    assert np.array_equal(back.array, ldata)
    assert np.allclose(back.spacing, source.spacing) and np.allclose(back.origin, source.origin)
    assert np.allclose(back.direction, source.direction)
    with pytest.raises(ValueError, match="do not match the source image"):
        write_labels(str(tmp_path / "bad.nii.gz"), ldata[:10], {"metadata": lkwargs["metadata"]})


def test_sample_data_is_real_with_annotations():
    from napari_casam._sample_data import sample_2d, sample_3d

    (img, _, k1), (lab, _, k2) = sample_2d()
    assert (k1, k2) == ("image", "labels") and img.shape[:2] == lab.shape and lab.max() > 0
    (vol, meta, _), (vlab, _, kind) = sample_3d()
    assert vol.ndim == 3 and vlab.shape == vol.shape and kind == "labels"
    assert "CC BY-NC-SA" in meta["metadata"]["licence"]


def _box_on_the_2d_sample(viewer, w, qtbot):
    """Open the real 2D sample, embed it, draw its ground-truth box; returns once the preview shows a mask."""
    from napari_casam._sample_data import sample_2d
    from napari_casam._widget import BOXES, PREVIEW

    (img, kw, _), (gt, _, _) = sample_2d()
    viewer.add_image(img, **kw)
    w.image_combo.setCurrentText(kw["name"])
    w.embed()
    ys, xs = np.nonzero(gt)
    viewer.layers[BOXES].add_rectangles(np.array([[ys.min(), xs.min()], [ys.max(), xs.max()]], float))
    qtbot.waitUntil(lambda: viewer.layers[PREVIEW].data.any(), timeout=30000)
    return kw, gt


def test_widget_box_segments_commit_and_undo(widget, qtbot):
    from napari_casam._widget import BOXES, LABELS, POINTS, PREVIEW

    viewer, w = widget
    kw, gt = _box_on_the_2d_sample(viewer, w, qtbot)
    preview = viewer.layers[PREVIEW].data > 0
    assert dice(preview, gt > 0) >= 0.8
    qtbot.waitUntil(lambda: w.route_label.text().startswith("route: frozen model"), timeout=10000)
    # keys go through napari's key map with a CA-SAM prompt layer active, as a real key press does:
    # the widget's S, C and Ctrl+Z must win over the layer's own (S = select mode on a Points layer)
    keys = viewer.window._qt_viewer._key_map_handler
    viewer.layers.selection.active = viewer.layers[POINTS]
    viewer.layers[PREVIEW].data = np.zeros_like(viewer.layers[PREVIEW].data)
    keys.press_key("S")
    qtbot.waitUntil(lambda: viewer.layers[PREVIEW].data.any(), timeout=30000)
    assert viewer.layers[POINTS].mode == "add"
    assert np.array_equal(viewer.layers[PREVIEW].data > 0, preview)
    keys.press_key("C")
    labels = viewer.layers[LABELS].data
    assert labels.max() == 1 and np.array_equal(labels > 0, preview) and not viewer.layers[PREVIEW].data.any()
    assert len(viewer.layers[BOXES].data) == 0
    keys.press_key("Control-Z")
    assert not viewer.layers[LABELS].data.any()


def _hippocampus_stack():
    """Six annotated slices of the committed hippocampus sample (a small real volume)."""
    image = read_image(SAMPLES / "hippocampus_mri" / "hippocampus_003.nii.gz")
    labels = read_labels(SAMPLES / "hippocampus_mri" / "hippocampus_003_mask.nii.gz", like=image).array
    return image.array[14:20].astype(np.float32), labels[14:20].astype(np.int32)


def test_next_image_keeps_the_labels_committed_on_the_last(widget, qtbot):
    """Embedding another image reuses the CA-SAM layers but never overwrites committed labels."""
    from napari_casam._widget import BOXES, LABELS, POINTS, PREVIEW

    viewer, w = widget
    kw, gt = _box_on_the_2d_sample(viewer, w, qtbot)
    assert w.commit() == 1
    committed = viewer.layers[LABELS].data.copy()

    vol, _ = _hippocampus_stack()
    viewer.layers.remove(kw["name"])  # the user closes the 2D image and opens a volume
    viewer.add_image(vol, name="hippo")
    w.image_combo.setCurrentText("hippo")
    w.embed()
    kept = viewer.layers[f"{LABELS} [{kw['name']}]"]
    assert np.array_equal(kept.data, committed) and not kept.visible
    assert viewer.layers[LABELS].data.shape == vol.shape and not viewer.layers[LABELS].data.any()
    assert viewer.layers[PREVIEW].data.shape == vol.shape  # replaced: a 2D Labels layer cannot take 3D data safely
    assert viewer.layers[POINTS].ndim == 3 and viewer.layers[BOXES].ndim == 3
    above = viewer.layers.index("hippo")
    assert all(viewer.layers.index(name) > above for name in (LABELS, PREVIEW, POINTS, BOXES))  # drawn on top
    assert viewer.layers.index(POINTS) > viewer.layers.index(LABELS)  # prompts above the masks
    assert np.allclose(viewer.camera.center[-2:], (np.array(vol.shape[1:]) - 1) / 2, atol=1)  # framed
    w.undo()  # the undo history belonged to the 2D image's layer: nothing to undo here
    assert np.array_equal(kept.data, committed) and not viewer.layers[LABELS].data.any()
    qtbot.waitUntil(lambda: not w.is_embedding, timeout=120000)


def _wait_for_learning(w, qtbot, timeout=240000):
    qtbot.waitUntil(lambda: w.learn_job is None, timeout=timeout)
    return w.last_learn_result


def test_learn_new_task_then_auto_routes_to_it(widget, qtbot):
    viewer, w = widget
    vol, lab = _hippocampus_stack()
    viewer.add_image(vol, name="hippo")
    viewer.add_labels(lab, name="hippo annotation")
    w.image_combo.setCurrentText("hippo")
    w.embed()
    qtbot.waitUntil(lambda: not w.is_embedding, timeout=120000)
    qtbot.waitUntil(lambda: w.route_label.text() == "route: frozen model (no learned task for this backbone)",
                    timeout=10000)
    w.steps_spin.setValue(2)
    assert w.learn(name="hippo_test", labels_layer="hippo annotation")
    result = _wait_for_learning(w, qtbot)
    assert result[0] == "done", result
    assert w.library.names() == ["hippo_test"]
    assert w.task_combo.findText("hippo_test") >= 0 and w.task_list.count() == 1
    qtbot.waitUntil(lambda: "hippo_test" in w.predictor.router, timeout=30000)
    assert w.task_choice() == "auto"
    qtbot.waitUntil(lambda: w.route_label.text().startswith("route: task hippo_test"), timeout=30000)


def test_cancel_leaves_the_library_unchanged(widget, qtbot):
    viewer, w = widget
    vol, lab = _hippocampus_stack()
    viewer.add_image(vol, name="hippo")
    viewer.add_labels(lab, name="hippo annotation")
    w.image_combo.setCurrentText("hippo")
    before = sorted(p.name for p in w.library.root.rglob("*")) if w.library.root.exists() else []
    assert w.learn(name="never", labels_layer="hippo annotation")
    w.cancel_learning()
    result = _wait_for_learning(w, qtbot)
    assert result[0] == "cancelled"
    after = sorted(p.name for p in w.library.root.rglob("*")) if w.library.root.exists() else []
    assert after == before and "never" not in w.library.names()


def test_learn_job_reports_a_process_that_cannot_start():
    """The process starts from a helper thread; a failure there reaches the widget as an error message."""
    import time

    from napari_casam._learn_process import LearnJob

    job = LearnJob(name="x", image=np.zeros((4, 4)), labels=lambda: None)  # a lambda cannot be pickled
    job.start()
    deadline = time.time() + 30
    while job.alive() and time.time() < deadline:
        time.sleep(0.05)
    assert not job.alive()
    messages = job.messages()
    assert len(messages) == 1 and messages[0][0] == "error" and "could not start" in messages[0][1]
    assert job.messages() == []
    job.join(timeout=1)


def test_worker_results_after_the_widget_is_gone_are_dropped(make_napari_viewer, qtbot, tmp_path):
    """A worker may finish after napari closed the widget: its callback must not touch deleted Qt objects."""
    from napari_casam._widget import CASamWidget

    viewer = make_napari_viewer()
    w = CASamWidget(viewer, library=str(tmp_path / "library"), cache_dir=str(tmp_path / "cache"))
    calls = []
    callback = w.workers.guarded(lambda *args: calls.append(w.status_label.text()))
    callback(1)
    assert calls == [""]
    life = w.workers
    w.deleteLater()
    qtbot.waitUntil(lambda: not life.alive, timeout=5000)
    callback(2)  # would raise "wrapped C/C++ object ... has been deleted" if it ran
    assert calls == [""]


def test_a_library_that_is_a_file_is_said_not_shown_as_empty(make_napari_viewer, qtbot, tmp_path):
    from napari_casam._widget import CASamWidget

    afile = tmp_path / "tasks.txt"
    afile.write_text("not a library")
    viewer = make_napari_viewer()
    w = CASamWidget(viewer, library=str(afile), cache_dir=str(tmp_path / "cache"))
    assert "the task library must be a folder" in w.status_label.text() and str(afile) in w.status_label.text()
    w.tasks.refresh()  # said once: a refresh does not pop the error up again
    assert afile.read_text() == "not a library"
    w.deleteLater()


def test_a_bad_checkpoint_is_reported_and_not_overwritten(widget, qtbot, tmp_path):
    from napari_casam._sample_data import sample_2d

    viewer, w = widget
    (img, kw, _), _ = sample_2d()
    viewer.add_image(img, **kw)
    w.image_combo.setCurrentText(kw["name"])
    w.backbone_combo.setCurrentText("sam_vit_b")
    assert w.backbone_combo.currentText() == "sam_vit_b"
    missing = tmp_path / "sam_vit_b.pth"
    w.checkpoint_edit.setText(str(missing))
    w.embed()
    qtbot.waitUntil(lambda: not w.is_embedding, timeout=30000)
    qtbot.wait(100)
    text = w.status_label.text()
    assert text.startswith("CA-SAM: embedding failed") and "sam_vit_b.pth" in text, text
    assert not w.is_ready
