"""Odd and hostile inputs (issue 13, part 2): each is one line on stderr, exit code 2, nothing
written, and it is refused before pixels are read or work is done. The catalogue of cases
(bad inputs and hostile task packs) is ``tests/fault_cases.py``; every case runs here."""

import os

import numpy as np
import pytest

from casam_core.cli import main
from casam_core.io import read_image, write_mask

from conftest import SAMPLES
from fault_cases import CASES, make_workspace, run_case

HC18 = SAMPLES / "hc18_fetal_head" / "006_HC.png"


def _run(capfd, *argv):
    code = main([str(a) for a in argv])
    out, err = capfd.readouterr()  # file descriptors: SimpleITK's own output would show here too
    return code, out, err


def _peak_rss_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_huge_images_are_refused_before_their_pixels_are_read(workspace):
    """A 12000 x 12000 PNG of a few hundred KB, and NIfTI/MHA headers promising 32767^3 and
    100000^3 voxels: refused from the header, with no allocation of their size."""
    sizes = [c for c in CASES if c.name in ("12000 x 12000 PNG (small file)", "NIfTI header of 32767^3",
                                            "MHA header of 100000^3")]
    assert len(sizes) == 3
    before = _peak_rss_mb()
    for case in sizes:
        assert run_case(case, workspace)["passed"]
    assert _peak_rss_mb() - before < 300  # a 12000^2 image alone is 144 MB per channel; the bombs are TBs
    assert (workspace / "in" / "big.png").stat().st_size < 1_000_000


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
    import casam_core.segment as segment

    def no_overlay(*args, **kwargs):
        raise AssertionError("an overlay was built although none was asked for")

    monkeypatch.setattr(segment, "overlay", no_overlay)
    monkeypatch.setattr(segment, "volume_montage", no_overlay)
    code, _, err = _run(capfd, "segment", HC18, "--out", tmp_path / "m.png", "--box", "100,100,300,300",
                        "--device", "cpu")
    assert code == 0, err
    assert read_image(tmp_path / "m.png").array.any()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, backbone):
    return make_workspace(tmp_path_factory.mktemp("fault_cases"))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.group}: {c.name}" for c in CASES])
def test_every_catalogued_case_is_one_line_rc_2_with_nothing_written(workspace, case):
    row = run_case(case, workspace)
    assert row["passed"], row


def test_a_box_partly_outside_the_image_is_clipped(tmp_path, capfd):
    code, _, err = _run(capfd, "segment", HC18, "--out", tmp_path / "m.png", "--box", "500,300,900,700",
                        "--device", "cpu")  # the image is 800 x 540
    assert code == 0, err
    assert read_image(tmp_path / "m.png").array.any()
