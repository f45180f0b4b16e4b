"""The plugin's Qt-free parts, without a viewer: layers to prompts, and the model session."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import dataset_case

napari = pytest.importorskip("napari", reason="napari is an optional extra ([napari])")


def test_prompts_from_layers_keep_the_slice_the_kind_and_the_image_frame():
    from napari.layers import Image, Points, Shapes

    from napari_casam._layers import NEGATIVE, POSITIVE, prompts_from_layers

    image = Image(np.zeros((5, 40, 60), np.uint8), scale=(2.0, 1.0, 1.0))
    # prompt layers drawn at half the image's in-plane spacing: their pixels are half the image's
    points = Points(np.array([[4.0, 10.0, 20.0], [4.0, 30.0, 40.0], [6.0, 8.0, 8.0]]), scale=(1.0, 0.5, 0.5),
                    features={"kind": np.array([POSITIVE, NEGATIVE, POSITIVE], dtype=object)})
    boxes = Shapes([np.array([[2, 0, 0], [2, 0, 20], [2, 10, 20], [2, 10, 0]], float)], shape_type="rectangle",
                   scale=(2.0, 1.0, 1.0))
    coords, labels, out = prompts_from_layers(points, boxes, image, k=2)  # world z 4 = image slice 2
    assert coords.tolist() == [[10.0, 5.0], [20.0, 15.0]]  # (x, y) in image pixels; slice 3's click left out
    assert labels.tolist() == [1, 0]
    assert out.tolist() == [[0.0, 0.0, 20.0, 10.0]]
    assert prompts_from_layers(points, boxes, image, k=0) == (None, None, None)
    far = Points(np.array([[1.0, 500.0, -7.0]]), scale=(2.0, 1.0, 1.0))  # clicked off the image: clipped
    assert prompts_from_layers(far, None, image, k=1)[0].tolist() == [[0.0, 39.0]]


def test_the_model_session_segments_and_drops_stale_routes(tmp_path, embedding_cache):
    from casam_core.library import TaskLibrary
    from casam_core.metrics import dice
    from napari_casam._session import ModelSession

    image, labels = dataset_case("kvasir_polyp", "test", 0)
    gt = labels > 0
    ys, xs = np.nonzero(gt)
    box = np.array([[xs.min(), ys.min(), xs.max(), ys.max()]], float)
    session = ModelSession(TaskLibrary(tmp_path / "library"), embedding_cache)
    generation = session.new_image(is_volume=False)
    assert session.open(("litemedsam", None, "cpu"), image, is_volume=False) == {}
    masks, choice, low = session.segment(0, None, None, box, "auto", None)
    assert masks.shape == (1,) + gt.shape
    assert choice.mode == "auto" and choice.layer is None and dice(masks[0], gt) > 0.8
    assert low.shape == (1, 256, 256)  # one object: its logits go along with the next click
    assert session.route(None, generation).mode == "frozen"
    session.new_image()
    assert session.route("auto", generation) is None  # asked for the previous image: dropped


def test_the_learning_process_cuts_a_volume_along_the_axis_it_is_given(tmp_path, monkeypatch):
    """A volume annotated in a coronal view is learned from coronal slices, not from axial
    slices that each hold a strip of the annotation."""
    import casam_core.training as training
    from casam_core.progress import Cancelled
    from napari_casam._learn_process import learn

    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 20, 24)).astype(np.float32)
    labels = np.zeros(image.shape, np.int32)
    labels[:, 7, 5:15] = 1  # one annotated coronal slice (axis 1, index 7)
    seen = {}

    def capture(predictor, name, data, config, progress=None, cancel=None):
        seen["slices"] = data.slices
        raise Cancelled("enough")

    monkeypatch.setattr(training, "learn_task", capture)
    messages = []
    learn(messages.append, __import__("threading").Event(), "coronal", image, labels,
          library=str(tmp_path / "lib"), cache_dir=str(tmp_path / "cache"), axis=1)
    assert messages == [["cancelled"]]
    assert len(seen["slices"]) == 20 and all(s.rgb.shape[:2] == (6, 24) for s in seen["slices"])
    annotated = [s for s in seen["slices"] if s.annotated]
    assert len(annotated) == 1 and annotated[0].source == "coronal[7]" and annotated[0].labels.sum() == 6 * 10
