"""The napari plugin under xvfb: manifest, reader/writer, samples, widget, learning in a process."""

from __future__ import annotations

import numpy as np
import pytest

from casam_core.io import read_image, read_labels
from casam_core.metrics import dice

from conftest import SAMPLES
from test_plugin_workflow import _screenshot

napari = pytest.importorskip("napari", reason="napari is an optional extra ([napari])")


def test_manifest_is_valid():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-casam")
    kinds = {c.id.split(".")[-1] for c in manifest.contributions.commands}
    assert {"widget", "get_reader", "write_labels", "sample_2d", "sample_3d"} <= kinds


def test_reader_writer_round_trip_keeps_geometry(tmp_path):
    from napari_casam._reader import get_reader
    from napari_casam._writer import LabelsNotWritten, write_labels

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
    with pytest.raises(LabelsNotWritten, match="do not match the source image"):  # napari shows it (issue 30)
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
    # the session's first embedding also converts the encoder for OpenVINO (a minute on a busy CPU)
    qtbot.waitUntil(lambda: viewer.layers[PREVIEW].data.any(), timeout=180000)
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
    assert w.commit() == [1]
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


def test_learn_new_task_then_auto_routes_to_it(widget, qtbot, tmp_path):
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
    # the route strip: one column per slice, the slice shown described under it
    qtbot.waitUntil(lambda: w.route_strip.slices == vol.shape[0], timeout=30000)
    assert not w.route_strip.isHidden()  # shown in the dock (visible once the window is)
    viewer.dims.set_current_step(0, 2)
    assert w.route_strip.text.text().startswith("slice 2: ") and "score/tau" in w.route_strip.text.text()
    _screenshot(viewer, qtbot, "route_strip", w)
    # "Uncovered images": a 2D ultrasound image open beside the volume is not covered by the hippocampus
    # task, the volume it was learned on is: the ultrasound image comes first
    from napari_casam._sample_data import sample_2d

    (img, kw, _), _ = sample_2d()
    viewer.add_image(img, **dict(kw, name="other image"))
    w.rank_open_images()
    qtbot.waitUntil(lambda: w.last_ranking is not None, timeout=120000)
    ranked = {r["name"]: r for r in w.last_ranking}
    assert [r["name"] for r in w.last_ranking] == ["other image", "hippo"], w.last_ranking
    assert not ranked["other image"]["covered"] and ranked["hippo"]["covered"]
    assert "least covered first" in w.status_label.text()
    _screenshot(viewer, qtbot, "uncovered_images", w)
    # with a folder: its images join the ranking (here the same six slices, saved as a NIfTI file)
    import SimpleITK as sitk

    folder = tmp_path / "archive"
    folder.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(folder / "case.nii.gz"))
    (folder / "notes.txt").write_text("not an image")
    w.last_ranking = None
    w.rank_open_images(str(folder))
    qtbot.waitUntil(lambda: w.last_ranking is not None, timeout=180000)
    assert {r["name"] for r in w.last_ranking} == {"other image", "hippo", "archive/case.nii.gz"}
    qtbot.waitUntil(lambda: w.route_label.text().startswith("route: task hippo_test"), timeout=30000)  # restored


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


GUARDLESS_SCRIPT = '''
import json, sys, time
import numpy as np
from napari_casam._learn_process import LearnJob

# no `if __name__ == "__main__":` guard, as in many users' scripts
image, labels = np.load(sys.argv[1]), np.load(sys.argv[2])
job = LearnJob(name="scripted", image=image, labels=labels, backbone="litemedsam", checkpoint=None, device="cpu",
               library=sys.argv[3], cache_dir=None, profile="fast", steps=2, label_names={1: "anterior"},
               modality=None)
job.start()
final, progress = None, 0
deadline = time.time() + 400
while final is None and time.time() < deadline:
    for message in job.messages():
        if message[0] == "progress":
            progress += 1
        else:
            final = message
    time.sleep(0.1)
job.join(60)
print(json.dumps({"final": final[0] if final else None, "detail": final[1] if final and final[0] == "error" else "",
                  "progress": progress, "folder_left": job.folder is not None and job.folder.exists()}))
'''


def test_learning_works_from_a_script_without_a_main_guard(tmp_path):
    """The learner is its own program (``python -m``), so a user's script without a main guard is
    never re-run in the child (a multiprocessing spawn child did, and died while bootstrapping)."""
    import json
    import subprocess
    import sys

    from casam_core.library import TaskLibrary

    vol, lab = _hippocampus_stack()
    np.save(tmp_path / "image.npy", vol)
    np.save(tmp_path / "labels.npy", lab)
    script = tmp_path / "my_analysis.py"
    script.write_text(GUARDLESS_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "image.npy"), str(tmp_path / "labels.npy"),
                          str(tmp_path / "library")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["final"] == "done", result
    assert result["progress"] > 0 and not result["folder_left"]
    card = TaskLibrary(tmp_path / "library").card("scripted")
    assert card["labels"] == {"1": "anterior"} and card["training"]["steps"] == 2


def test_a_learning_process_that_dies_is_reported_with_its_last_words(tmp_path, monkeypatch):
    """A learner killed from outside (out of memory, a crash in native code) is an error message naming
    its exit code, never a widget that waits for ever; its job folder goes."""
    import time

    from napari_casam._learn_process import LearnJob

    vol, lab = _hippocampus_stack()
    job = LearnJob(name="killed", image=vol, labels=lab, backbone="litemedsam", checkpoint=None, device="cpu",
                   library=str(tmp_path / "library"), cache_dir=None, profile="fast", steps=50, label_names=None,
                   modality=None)
    job.start()
    deadline = time.time() + 120
    while job.process is None and job.alive() and time.time() < deadline:
        time.sleep(0.05)
    assert job.process is not None
    job.process.kill()
    while job.alive() and time.time() < deadline:
        time.sleep(0.05)
    messages = [m for m in job.messages() if m[0] != "progress"]
    assert len(messages) == 1 and messages[0][0] == "error" and "ended unexpectedly (exit code -9)" in messages[0][1]
    folder = job.folder
    job.join(10)
    assert not folder.exists() and not (tmp_path / "library").exists()


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


def test_the_viewer_runs_on_a_supported_qt_binding_without_the_pyqt5_notice(make_napari_viewer, qtbot):
    """napari 0.9 warned every user that its PyQt5 support is deprecated: the plugin installs PyQt6."""
    import qtpy
    from napari.utils.notifications import notification_manager

    make_napari_viewer(show=True)
    qtbot.wait(200)
    assert qtpy.API_NAME in ("PyQt6", "PySide6")
    assert not [n for n in notification_manager.records if "PyQt5" in str(n.message)]


def test_labels_drawn_on_a_dicom_series_save_as_dicom_seg_with_names_and_colours(tmp_path):
    """The reader keeps where a DICOM series came from; the writer saves labels drawn on it as a
    DICOM SEG (File > Save Selected Layer... > result.dcm) referencing it, named and coloured."""
    import highdicom as hd
    from napari.utils.colormaps import label_colormap

    from casam_core.dicom_seg import read_dicom_seg
    from napari_casam._reader import get_reader
    from napari_casam._writer import LabelsNotWritten, write_labels
    from test_io import _dicom_series

    folder, arr = _dicom_series(tmp_path)
    data, kwargs, kind = get_reader(str(folder))(str(folder))[0]
    assert kind == "image" and data.shape == arr.shape and kwargs["metadata"]["casam_dicom_series"]["folder"]
    labels = np.zeros(data.shape, np.int32)
    labels[1:3, 4:9, 4:9] = 2
    metadata = dict(kwargs["metadata"], casam_label_names={2: "lesion"})
    colormap = label_colormap(49)
    out = write_labels(str(tmp_path / "result.dcm"), labels, {"metadata": metadata, "colormap": colormap})
    back, names = read_dicom_seg(out[0], folder)
    assert np.array_equal(back, labels) and names == {2: "lesion"}
    description = hd.seg.segread(out[0]).get_segment_description(1)
    assert len(description.RecommendedDisplayCIELabValue) == 3  # the layer's colour for label 2
    nifti = write_labels(str(tmp_path / "result.nii.gz"), labels, {"metadata": metadata})  # geometry kept
    assert read_labels(nifti[0], like=read_image(folder)).array.shape == labels.shape
    with pytest.raises(LabelsNotWritten, match="only for labels drawn on a DICOM series"):
        write_labels(str(tmp_path / "other.dcm"), labels, {"metadata": {}})
