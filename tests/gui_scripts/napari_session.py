"""A napari session driven the way a user drives it, in its own process (a crash must not take pytest down).

    python napari_session.py menus      the viewer is shown first, then the plugin is loaded from napari's
                                        menus: a sample, a NIfTI through the reader, the dock widget; then a
                                        2D image is embedded and segmented
    python napari_session.py quit_busy  a volume is embedding when the user quits napari

Prints one line per step and "SESSION OK" at the end; the exit code must be 0.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from casam_core.samples import SAMPLES


def pump(app, seconds: float, until=None) -> bool:
    end = time.time() + seconds
    while time.time() < end:
        app.processEvents()
        if until is not None and until():
            return True
        time.sleep(0.02)
    return until is None


def main(mode: str, cache: str, library: str) -> None:
    import os

    os.environ["CASAM_CACHE_DIR"], os.environ["CASAM_LIBRARY"] = cache, library
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer()
    app = QApplication.instance()
    pump(app, 1.0)  # the OpenGL context (Mesa's llvmpipe under Xvfb) is up before the plugin loads
    print("viewer shown; torch loaded:", "torch" in sys.modules, flush=True)
    if mode == "menus":
        viewer.open_sample("napari-casam", "brats_3d")  # File > Open Sample > CA-SAM
        viewer.open(str(SAMPLES / "hippocampus_mri" / "hippocampus_003.nii.gz"), plugin="napari-casam")  # reader
        print("sample and reader loaded; torch loaded:", "torch" in sys.modules, flush=True)
        widget, w = viewer.window.add_plugin_dock_widget("napari-casam", "Segment and learn")  # Plugins menu
        print("dock widget loaded", flush=True)
        from napari_casam._sample_data import sample_2d
        from napari_casam._widget import BOXES, PREVIEW

        (img, kw, _), (gt, _, _) = sample_2d()
        viewer.add_image(img, **kw)
        w.device_combo.setCurrentText("cpu")
        w.image_combo.setCurrentText(kw["name"])
        w.embed()
        ys, xs = np.nonzero(gt)
        viewer.layers[BOXES].add_rectangles(np.array([[ys.min(), xs.min()], [ys.max(), xs.max()]], float))
        assert pump(app, 180, lambda: viewer.layers[PREVIEW].data.any()), "no preview"
        print("segmented", int((viewer.layers[PREVIEW].data > 0).sum()), "px", flush=True)
    elif mode == "quit_busy":
        from napari_casam._widget import CASamWidget

        w = CASamWidget(viewer)
        viewer.window.add_dock_widget(w, name="CA-SAM")
        w.device_combo.setCurrentText("cpu")
        viewer.open(str(SAMPLES / "hippocampus_mri" / "hippocampus_003.nii.gz"), plugin="napari-casam")
        w.image_combo.setCurrentText("hippocampus_003")
        w.embed()
        assert pump(app, 180, lambda: w.is_ready), "the first slice was never embedded"
        assert w.workers.running(), "nothing was running when the user quit"
        print("quitting while embedding", flush=True)
        t0 = time.time()
        viewer.close()
        print(f"closed in {time.time() - t0:.1f} s; still running: {w.workers.running()}", flush=True)
        assert w.workers.running() == 0
    print("SESSION OK", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
