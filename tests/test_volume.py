"""Volumes: lazy embedding with progress and cancellation; box propagation (real MRI)."""

import numpy as np
import pytest

from casam_core import CASamPredictor
from casam_core.io import read_image, read_labels
from casam_core.metrics import dice
from casam_core.progress import Cancelled
from casam_core.prompts import box_from_mask, propagate_box, propagate_masks

from conftest import SAMPLES


@pytest.fixture(scope="module")
def hippocampus():
    image = read_image(SAMPLES / "hippocampus_mri" / "hippocampus_003.nii.gz")
    labels = read_labels(SAMPLES / "hippocampus_mri" / "hippocampus_003_mask.nii.gz", like=image)
    return image, labels.array


def test_slices_are_embedded_lazily_with_progress_and_cancel(backbone, hippocampus):
    image, _ = hippocampus
    predictor = CASamPredictor(backbone)
    predictor.set_volume(image.array, axis=0)
    assert predictor.encoder_calls == 0
    calls = []
    predictor.embed_slices([3, 4, 5], progress=lambda d, t, m: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)] and predictor.encoder_calls == 3
    predictor.embed_slices([3, 4, 5])  # cached: no more encoder calls
    assert predictor.encoder_calls == 3
    with pytest.raises(Cancelled):
        predictor.embed_slices([6, 7, 8], cancel=lambda: predictor.encoder_calls >= 4)
    assert predictor.encoder_calls == 4 and predictor.is_embedded(6) and not predictor.is_embedded(7)


def test_whole_volume_is_windowed_once(backbone, hippocampus):
    image, _ = hippocampus
    predictor = CASamPredictor(backbone)
    state = predictor.set_volume(image.array.astype(np.float32) * 3.7 - 100, axis=1)
    assert state.volume.dtype == np.uint8 and state.n_slices == image.array.shape[1]
    assert state.volume.min() == 0 and state.volume.max() == 255


def test_box_propagates_through_real_mri(backbone, hippocampus):
    image, labels = hippocampus
    gt = labels > 0
    k = int(gt.sum(axis=(1, 2)).argmax())
    lo, hi = k - 3, k + 4  # a 7-slice sub-volume keeps the test at ~15 s on a CPU
    predictor = CASamPredictor(backbone)
    predictor.set_volume(image.array[lo:hi])
    mask, summary = propagate_box(predictor, k - lo, box_from_mask(gt[k]))
    assert mask.shape == gt[lo:hi].shape
    # the hippocampus runs through all 7 slices: propagation reaches both edges, or stops one slice short
    # where the mask has grown past 1.5 x the start slice's area (it is drifting off the structure there)
    assert set(range(1, 6)) <= set(summary["slices"]), summary
    for side in ("stopped_up", "stopped_down"):
        assert summary[side] == "volume edge" or "x the start slice's" in summary[side], summary
    assert all(mask[i].any() for i in summary["slices"])
    # zero-shot LiteMedSAM on this small target (measured 0.55 on the prompted slice,
    # 0.46 over the sub-volume); CA-SAM's Alignment Layer exists to raise exactly this
    assert dice(mask[k - lo], gt[k]) > 0.45
    assert dice(mask, gt[lo:hi]) > 0.35


def test_propagation_stops_where_the_object_ends(backbone):
    image = read_image(SAMPLES / "brats_glioma" / "brats_2013_pat0005_1.nii.gz")
    core = np.isin(read_labels(SAMPLES / "brats_glioma" / "brats_2013_pat0005_1_mask.nii.gz").array, (1, 3, 4))
    present = np.nonzero(core.any(axis=(1, 2)))[0]
    top = int(present.max())  # last slice with tumour core
    lo, hi = top - 2, min(top + 5, core.shape[0])
    predictor = CASamPredictor(backbone)
    predictor.set_volume(image.array[lo:hi])
    mask, summary = propagate_box(predictor, 1, box_from_mask(core[top - 1]))
    assert mask[1].any()
    assert max(summary["slices"]) <= top - lo + 2, summary  # no run-away past the tumour


def test_hippocampus_propagation_stops_at_the_structure(backbone, hippocampus):
    """It ran through every slice to the volume's edge (3D Dice 0.14): the box grew around a mask that
    drifted off the hippocampus. Now it stops once the mask outgrows the start slice's by 1.5x."""
    image, labels = hippocampus
    gt = labels > 0
    present = np.nonzero(gt.any(axis=(1, 2)))[0]
    k = int(np.median(present))
    lo = k - 2  # the upper half of the volume, past the structure's end to the volume's edge (keeps the test short)
    predictor = CASamPredictor(backbone)
    predictor.set_volume(image.array[lo:])
    mask, summary = propagate_box(predictor, k - lo, box_from_mask(gt[k]))
    assert max(summary["slices"]) + lo <= present.max() + 2, summary
    assert "x the start slice's" in summary["stopped_up"], summary
    assert dice(mask, gt[lo:]) > 0.2


def test_corrected_slices_constrain_the_propagation_between_them(backbone, hippocampus):
    """The way people annotate a volume: one slice, then corrections on others. Every annotated slice
    is kept as drawn, each slice between two of them is carried from the nearer one, an empty
    annotation stops the mask there, progress ends full, and a cancel stops it."""
    image, labels = hippocampus
    gt = labels > 0
    present = np.nonzero(gt.any(axis=(1, 2)))[0]
    lo, hi = present.min() - 2, present.max() + 3
    g = gt[lo:hi]
    predictor = CASamPredictor(backbone)
    predictor.set_volume(image.array[lo:hi])
    k = int(np.median(present)) - lo
    one, _ = propagate_masks(predictor, {k: g[k]})
    low, high = (int(v) - lo for v in np.percentile(present, [20, 80]))
    calls = []
    three, summary = propagate_masks(predictor, {k: g[k], low: g[low], high: g[high]},
                                     progress=lambda d, t, m: calls.append((d, t)))
    assert summary["annotated"] == [low, k, high]
    assert all(np.array_equal(three[i], g[i]) for i in (low, k, high))
    # measured: 0.35 from the middle slice alone, 0.58 with the two corrections
    assert dice(three, g) > dice(one, g) + 0.15, (dice(three, g), dice(one, g))
    assert calls[-1][0] == calls[-1][1] and all(d <= t for d, t in calls), calls[-3:]  # the bar ends full
    stops = {(s["from"], s["direction"]) for s in summary["stops"]}
    assert {(low, "down"), (low, "up"), (k, "down"), (k, "up"), (high, "down"), (high, "up")} == stops

    # "not here": an empty annotation above the middle ends the mask below it
    stopped, summary = propagate_masks(predictor, {k: g[k], k + 3: np.zeros_like(g[k])})
    assert not stopped[k + 3:].any() and stopped[k].any()
    with pytest.raises(Cancelled):
        propagate_masks(predictor, {k: g[k]}, cancel=lambda: True)
    with pytest.raises(ValueError, match="shape"):
        propagate_masks(predictor, {k: g[k][:-1]})


def test_no_slice_between_two_annotated_slices_is_left_empty(backbone, hippocampus):
    """Issue 31: boxes on slices 4 and 17 of hippocampus_003 left slices between them empty (the
    carry from slice 4, where the structure is small, stopped on the growth limit). Between two annotations the structure is known to run: every slice gets a mask,
    by carrying or, where the carry stopped, by the box interpolated between the two."""
    image, labels = hippocampus
    gt = labels > 0
    predictor = CASamPredictor(backbone)
    predictor.set_volume(image.array)
    anchors = {}
    for k in (4, 17):
        predictor.set_slice(k)
        anchors[k] = predictor.predict_batch(box=box_from_mask(gt[k]))[0][0, 0]
    out, summary = propagate_masks(predictor, anchors)
    assert all(out[k].any() for k in range(4, 18)), [k for k in range(4, 18) if not out[k].any()]
    assert set(range(4, 18)) <= set(summary["slices"])
    assert summary["bridged"] and all(4 < k < 17 for k in summary["bridged"])
    between = slice(4, 18)
    # measured on the frozen model: 0.262 between the two with slices 5-10 empty, 0.380 now
    assert dice(out[between], gt[between]) > 0.33
