"""Odd and hostile inputs (issue 13, part 2): each is one line on stderr, exit code 2, nothing
written, and it is refused before pixels are read or work is done."""

import json
import os
import struct

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from casam_core.cli import main
from casam_core.errors import ImageIOError
from casam_core.io import read_dataset, read_image, write_mask

from conftest import SAMPLES

HC18 = SAMPLES / "hc18_fetal_head" / "006_HC.png"


def _run(capfd, *argv):
    code = main([str(a) for a in argv])
    out, err = capfd.readouterr()  # file descriptors: SimpleITK's own output would show here too
    return code, out, err


def _one_line(code, err, *says):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for s in says:
        assert s in err, (s, err)


def _nifti_header_bomb(path, dims=(32767, 32767, 32767)):
    """A real NIfTI file of a 4x4x4 volume whose header then claims ``dims``."""
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.uint8)), str(path))
    raw = bytearray(path.read_bytes())
    raw[40:56] = struct.pack("<8h", 3, *dims, 1, 1, 1, 1)
    path.write_bytes(bytes(raw))


def _peak_rss_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_huge_images_are_refused_from_their_header(tmp_path, capfd):
    """A 12000 x 12000 PNG (a few hundred KB) and header bombs: refused before any pixel is read."""
    big = tmp_path / "big.png"
    Image.new("L", (12000, 12000)).save(big)
    assert big.stat().st_size < 1_000_000
    nii = tmp_path / "bomb.nii"
    _nifti_header_bomb(nii)
    mha = tmp_path / "bomb.mha"
    mha.write_text("ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\nElementType = MET_UCHAR\n"
                   "ElementDataFile = LOCAL\n" + "x" * 64)
    before = _peak_rss_mb()
    for path, says in ((big, "12000 x 12000 pixels is more than CA-SAM reads"),
                       (nii, "32767 x 32767 x 32767 voxels is more than"),
                       (mha, "100000 x 100000 x 100000 voxels")):
        code, _, err = _run(capfd, "segment", path, "--out", tmp_path / "m.nii.gz", "--box", "1,1,5,5",
                            "--slice", "0", "--device", "cpu")
        _one_line(code, err, str(path), says)
    assert _peak_rss_mb() - before < 300  # nothing the size of those images was allocated
    assert not list(tmp_path.glob("m.*"))


def test_an_image_with_no_finite_pixel_and_a_box_outside_the_image_are_refused(tmp_path, capfd):
    nan = tmp_path / "nan.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((3, 40, 50), np.nan, np.float32)), str(nan))
    code, _, err = _run(capfd, "segment", nan, "--out", tmp_path / "m.nii.gz", "--box", "1,1,5,5", "--slice", 0,
                        "--device", "cpu")
    _one_line(code, err, "nan.mha: the image has no finite pixel value")
    code, _, err = _run(capfd, "segment", HC18, "--out", tmp_path / "m.png", "--box", "900,600,950,700",
                        "--device", "cpu")  # the image is 800 x 540
    _one_line(code, err, "lies entirely outside the 800x540 image")
    assert not list(tmp_path.glob("m.*"))
    # a box that is partly inside is clipped to the image, as before
    code, _, err = _run(capfd, "segment", HC18, "--out", tmp_path / "m.png", "--box", "500,300,900,700",
                        "--device", "cpu")
    assert code == 0, err


def test_simpleitk_messages_become_part_of_one_line(tmp_path, capfd):
    folder = tmp_path / "not-dicom"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    (folder / "x.dcm").write_bytes(b"x")
    code, _, err = _run(capfd, "segment", folder, "--out", tmp_path / "m.nii.gz", "--box", "1,1,5,5",
                        "--slice", 0, "--device", "cpu")
    _one_line(code, err, f"{folder}: a folder must hold a DICOM series", "(SimpleITK: No Series were found)")
    assert "WARNING" not in err and ".cxx" not in err


def _dataset(root, cases, **extra):
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "a.png")
    meta = {"name": "x", "labels": {"1": "thing"}, "train": cases, "test": cases, **extra}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize("case, says", [
    ({"image": "../outside.png", "mask": "a.png"}, "'image' '../outside.png' leaves the dataset folder"),
    ({"image": "a.png", "mask": "/etc/passwd"}, "'mask' '/etc/passwd' leaves the dataset folder"),
    ({"image": "a.png", "mask": "sub/../../a.png"}, "leaves the dataset folder"),
    ({"image": "a.png"}, "case 0 of the 'train' split has no 'mask' entry"),
    ({"image": 7, "mask": "a.png"}, "'image' must be a file name, not 7"),
])
def test_a_dataset_may_only_name_files_inside_its_folder(tmp_path, case, says):
    root = _dataset(tmp_path / "ds", [case])
    with pytest.raises(ImageIOError, match="dataset.json") as info:
        read_dataset(root)
    assert says in str(info.value) and str(root) in str(info.value)


def test_dataset_errors_reach_the_cli_as_one_line(tmp_path, capfd):
    root = _dataset(tmp_path / "ds", [{"image": "../../etc/passwd", "mask": "a.png"}])
    for argv in (("eval", root), ("learn", "outside", root, "--library", tmp_path / "lib")):
        code, _, err = _run(capfd, *argv, "--device", "cpu")
        _one_line(code, err, "leaves the dataset folder")
    assert not (tmp_path / "lib").exists()
    (root / "dataset.json").write_text(json.dumps({"name": "x", "labels": {"1": "a"}, "train": []}))
    code, _, err = _run(capfd, "eval", root, "--device", "cpu")
    _one_line(code, err, "dataset.json has no 'test' entry (it needs name, labels, train and test)")


def test_write_errors_name_the_users_path_not_a_temporary_file(tmp_path, capfd):
    folder = tmp_path / "a-folder.png"
    folder.mkdir()
    code, _, err = _run(capfd, "segment", HC18, "--out", folder, "--box", "100,100,300,300", "--device", "cpu")
    _one_line(code, err, f"{folder}: is a folder")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    target = blocker / "mask.png"  # its folder would have to be inside a file
    code, _, err = _run(capfd, "segment", HC18, "--out", target, "--box", "100,100,300,300", "--device", "cpu")
    _one_line(code, err, f"{target}: cannot write here")
    assert ".tmp" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder.png"] and not any(folder.iterdir())


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o002)  # a group-shared setup
    try:
        write_mask(np.ones((4, 4), np.uint8), tmp_path / "m.png")
        assert (tmp_path / "m.png").stat().st_mode & 0o777 == 0o664
        os.umask(0o077)
        write_mask(np.ones((4, 4), np.uint8), tmp_path / "private.png")
        assert (tmp_path / "private.png").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_segment_without_overlay_builds_no_overlay(tmp_path, capfd, monkeypatch):
    import casam_core.cli as cli

    def no_overlay(*args, **kwargs):
        raise AssertionError("an overlay was built although none was asked for")

    monkeypatch.setattr(cli, "overlay", no_overlay)
    monkeypatch.setattr(cli, "volume_montage", no_overlay)
    code, _, err = _run(capfd, "segment", HC18, "--out", tmp_path / "m.png", "--box", "100,100,300,300",
                        "--device", "cpu")
    assert code == 0, err
    assert read_image(tmp_path / "m.png").array.any()


def test_a_pickled_checkpoint_is_refused_without_torchs_advice(tmp_path):
    import torch

    from casam_core.backbones import load_state_dict
    from casam_core.errors import BackboneError

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"w": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(BackboneError) as info:
        load_state_dict(tmp_path / "evil.pth")
    message = str(info.value)
    assert "pickled Python objects, which CA-SAM never loads" in message and "evil.pth" in message
    assert "weights_only" not in message and "\n" not in message
