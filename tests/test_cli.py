"""The casam command line: real runs on the samples, machine-readable output, clear errors."""

import json

import numpy as np
import SimpleITK as sitk

from casam_core.cli import main
from casam_core.io import read_image, read_labels
from casam_core.metrics import dice
from casam_core.prompts import box_from_mask

from conftest import SAMPLES

HC18 = SAMPLES / "hc18_fetal_head" / "006_HC.png"


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_segment_2d_writes_mask_and_overlay(tmp_path, capsys):
    gt = read_labels(SAMPLES / "hc18_fetal_head" / "006_HC_mask.png").array > 0
    box = ",".join(str(int(v)) for v in box_from_mask(gt))
    code, out, err = _run(capsys, "segment", HC18, "--out", tmp_path / "m.png", "--box", box,
                          "--overlay", tmp_path / "o.png", "--json", "--device", "cpu")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) >= {"out", "route", "mask_voxels"}
    assert result["route"] == {"decision": None, "layer": None, "scores": {}, "tau": {}, "mode": "auto"}  # empty library
    mask = read_labels(tmp_path / "m.png").array > 0
    assert mask.shape == gt.shape and result["mask_voxels"] == int(mask.sum())
    assert dice(mask, gt) > 0.8
    overlay = read_image(tmp_path / "o.png").array
    assert overlay.shape == gt.shape + (3,)


def test_segment_volume_keeps_source_geometry(tmp_path, capsys):
    src = read_image(SAMPLES / "hippocampus_mri" / "hippocampus_003.nii.gz")
    gt = read_labels(SAMPLES / "hippocampus_mri" / "hippocampus_003_mask.nii.gz").array > 0
    k = int(gt.sum(axis=(1, 2)).argmax())
    # a 3-slice crop with its own geometry keeps the run short
    img = sitk.GetImageFromArray(src.array[k - 1:k + 2])
    img.SetSpacing((0.9, 1.1, 2.0))
    img.SetOrigin((5.0, -7.0, 3.0))
    sitk.WriteImage(img, str(tmp_path / "vol.nii.gz"))
    box = ",".join(str(int(v)) for v in box_from_mask(gt[k]))
    code, out, err = _run(capsys, "segment", tmp_path / "vol.nii.gz", "--out", tmp_path / "seg.nii.gz",
                          "--box", box, "--slice", 1, "--json", "--device", "cpu")
    assert code == 0, err
    result = json.loads(out)
    seg = read_labels(tmp_path / "seg.nii.gz", like=read_image(tmp_path / "vol.nii.gz"))
    assert np.allclose(seg.spacing, (0.9, 1.1, 2.0)) and np.allclose(seg.origin, (5.0, -7.0, 3.0))
    assert seg.array[1].any() and result["mask_voxels"] == int(seg.array.sum())
    assert result["details"]["propagation"]["start"] == 1


def test_errors_are_one_line_with_a_non_zero_exit(tmp_path, capsys):
    code, _, err = _run(capsys, "segment", HC18, "--out", tmp_path / "m.png")
    assert code == 2 and "give a prompt" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "segment", tmp_path / "none.png", "--out", tmp_path / "m.png", "--box", "1,1,5,5")
    assert code == 2 and "none.png: no such file" in err
    code, _, err = _run(capsys, "segment", HC18, "--out", tmp_path / "m.png", "--box", "1,1,5")
    assert code == 2 and "x0,y0,x1,y1" in err
    vol = SAMPLES / "hippocampus_mri" / "hippocampus_003.nii.gz"
    code, _, err = _run(capsys, "segment", vol, "--out", tmp_path / "m.nii.gz", "--box", "1,1,5,5")
    assert code == 2 and "--slice" in err
    code, _, err = _run(capsys, "segment", vol, "--out", tmp_path / "m.png", "--box", "1,1,5,5", "--slice", 3)
    assert code == 2 and ".nii.gz" in err
    code, _, err = _run(capsys, "segment", HC18, "--out", tmp_path / "m.png", "--box", "1,1,5,5", "--slice", 3)
    assert code == 2 and "2D image: --slice is for volumes" in err
    code, _, err = _run(capsys, "segment", HC18, "--out", tmp_path / "m.png", "--box", "1,1,5,5",
                        "--backbone", "sam_vit_h", "--checkpoint", tmp_path / "x.pth")
    assert code == 2 and "sam_vit_h_4b8939.pth" in err
    assert not list(tmp_path.glob("m.*"))  # nothing half-written


def test_a_bug_keeps_its_traceback_and_an_unknown_task_is_one_line(tmp_path, capsys, monkeypatch):
    """Only CASamError (the user's input) and OSError become one-line errors; a bug is not hidden."""
    import pytest

    import casam_core.cli as cli

    code, _, err = _run(capsys, "segment", HC18, "--out", tmp_path / "m.png", "--box", "1,1,5,5", "--task", "livr",
                        "--device", "cpu")
    assert code == 2 and "unknown task 'livr'" in err and len(err.strip().splitlines()) == 1

    def broken(*args, **kwargs):
        raise KeyError("a bug, not the user's fault")

    monkeypatch.setattr(cli, "read_image", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["segment", str(HC18), "--out", str(tmp_path / "m.png"), "--box", "1,1,5,5", "--device", "cpu"])
    assert not list(tmp_path.glob("m.*"))


def test_backbones_listing(capsys):
    code, out, _ = _run(capsys, "backbones", "--json")
    rows = json.loads(out)
    assert code == 0 and rows["litemedsam"]["input"] == 256 and rows["sam_vit_b"]["input"] == 1024
    assert rows["mobilesam"] == {"input": 1024, "checkpoint": "mobile_sam.pt", "point_prompts": True,
                                 "description": rows["mobilesam"]["description"]} and not rows["litemedsam"]["point_prompts"]


def test_two_boxes_on_a_volume_slice_get_one_label_each(tmp_path, capsys):
    src = read_image(SAMPLES / "hippocampus_mri" / "hippocampus_003.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(src.array[14:16]), str(tmp_path / "v.nii.gz"))
    code, out, err = _run(capsys, "segment", tmp_path / "v.nii.gz", "--out", tmp_path / "s.nii.gz",
                          "--box", "5,5,20,25", "--box", "20,20,33,45", "--slice", 0, "--json", "--device", "cpu")
    assert code == 0, err
    seg = read_labels(tmp_path / "s.nii.gz").array
    assert set(np.unique(seg[0])) <= {0, 1, 2} and 2 in np.unique(seg[0]) and not seg[1].any()
    assert len(json.loads(out)["details"]["scores"]) == 2


def test_learn_options_are_bounded_before_any_data_is_read(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"  # never read: the option is refused first
    for flag, value, says in (("--epochs", "99999999999999", "epochs must be an integer in [1, 10000]"),
                              ("--val-fraction", "-3", "the validation fraction must be a number in (0, 0.5]"),
                              ("--lr", "nan", "the learning rate"), ("--blocks", "100000", "blocks must be"),
                              ("--time-budget", "0", "the time budget")):
        code, out, err = _run(capsys, "learn", "bounded", missing, flag, value, "--library", tmp_path / "lib",
                              "--device", "cpu")
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, (flag, err)
        assert not (tmp_path / "lib" / "bounded").exists()


def test_a_library_that_is_a_file_is_refused(tmp_path, capsys):
    afile = tmp_path / "library.txt"
    afile.write_text("not a library")
    code, out, err = _run(capsys, "tasks", "list", "--library", afile)
    assert code == 2 and "must be a folder" in err and str(afile) in err
    assert afile.read_text() == "not a library"
