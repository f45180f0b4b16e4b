"""Nothing lost (issue 30): full disks, read-only and tampered libraries, odd task names, files
whose orientation records disagree, grey + alpha PNGs, DICOM series a SEG cannot reference.
Each case failed before the fix it names."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from casam_core.alignment import AlignmentLayer
from casam_core.cli import main
from casam_core.errors import ImageIOError, TaskLibraryError, TaskNameError
from casam_core.io import read_image, write_mask
from casam_core.library import TaskLibrary
from casam_core.task_files import ALIGNMENT, CARD, check_card, ROUTER
from casam_core.router import TaskVAE
from casam_core.tasks import Task, check_task_name

from conftest import SAMPLES

HC18 = SAMPLES / "hc18_fetal_head" / "006_HC.png"
HIPPO = SAMPLES / "hippocampus_mri" / "hippocampus_003.nii.gz"
CPU = ["--device", "cpu"]


def _task(name: str = "liver") -> Task:
    layer = AlignmentLayer(n_blocks=1, form="residual")
    card = {"name": name, "backbone_fingerprint": "litemedsam:test", "alignment": layer.config(),
            "router": {"tau": 1.0}}
    return Task(name, layer, TaskVAE(), 1.0, card)


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 40 MB tmpfs: a disk that fills up (needs root, as CI and the developers' machines run)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (a full disk is simulated with it)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path, leave: int = 0) -> None:
    """Fill the disk of ``folder`` up to ``leave`` bytes free."""
    import shutil

    free = shutil.disk_usage(folder).free - leave
    with open(folder / "ballast", "wb") as fh:
        while free > 0:
            n = min(free, 1 << 16)
            try:
                fh.write(b"\0" * n)
                fh.flush()
            except OSError:
                break
            free -= n


# ------------------------------------------------------------------ 10: masks on a full disk
@pytest.mark.parametrize("suffix", [".png", ".nii.gz", ".mha", ".nrrd"])
def test_a_mask_that_does_not_fit_on_the_disk_is_an_error_naming_it_and_leaves_no_file(tiny_disk, suffix):
    out = tiny_disk / f"m{suffix}"
    mask = (np.random.default_rng(0).random((40, 300, 300)) > 0.5).astype(np.uint8)
    if suffix == ".png":
        mask = mask[0]
    _fill(tiny_disk, leave=8 * 1024)  # room for a header, not for the pixels
    with pytest.raises(ImageIOError) as err:
        write_mask(mask, out)
    text = str(err.value)
    assert text.startswith(f"{out}: cannot write it") and ".tmp" not in text and "\n" not in text, text
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["ballast"]  # no mask, no 0-byte file, no temporary


def test_segment_on_a_full_disk_exits_2_with_one_line_and_writes_nothing(tiny_disk, capsys):
    _fill(tiny_disk)
    out = tiny_disk / "m.png"
    code = main(["segment", str(HC18), "--box", "100,100,600,500", "--out", str(out), "--task", "none", *CPU])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"casam segment: error: {out}: cannot write it"), err
    assert not out.exists()


def test_segment_batch_redoes_an_empty_mask_left_by_an_earlier_version(tmp_path, capsys):
    images = tmp_path / "in"
    images.mkdir()
    (images / "a.png").write_bytes(HC18.read_bytes())
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "a.json").write_text(json.dumps({"boxes": [[100, 100, 600, 500]]}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_mask.png").write_bytes(b"")  # what a full disk left before masks were checked
    code = main(["segment-batch", str(images), "--out", str(out), "--prompts", str(tmp_path / "prompts"),
                 "--task", "none", "--json", *CPU])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["done"] == 1 and summary["exists"] == 0, summary
    assert read_image(out / "a_mask.png").array.any()


# ------------------------------------------------------------------ 11, 12: saving tasks
def test_saving_a_task_on_a_full_disk_is_one_line_and_leaves_the_library_as_it_was(tiny_disk):
    library = TaskLibrary(tiny_disk / "tasks")
    library.save(_task("first"))
    _fill(tiny_disk, leave=16 * 1024)
    with pytest.raises(TaskLibraryError) as err:
        library.save(_task("second"))
    assert "cannot save task 'second'" in str(err.value) and "No space left" in str(err.value), err.value
    assert library.names() == ["first"] and library.load("first").name == "first"
    assert [p.name for p in library.root.iterdir() if p.name.startswith(".tmp-")] == []


def test_learn_refuses_a_full_disk_or_a_read_only_library_before_training(tiny_disk, tmp_path, capsys):
    _fill(tiny_disk, leave=512 * 1024)
    argv = ["learn", "t1", str(HC18), "--masks", str(SAMPLES / "hc18_fetal_head"), *CPU]
    assert main(argv + ["--library", str(tiny_disk / "tasks")]) == 2
    err = capsys.readouterr().err
    assert "MB free on its disk; saving a task needs 64 MB" in err and "learned" not in err, err
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    subprocess.run(["mount", "--bind", str(readonly), str(readonly)], check=True)  # root writes anywhere:
    subprocess.run(["mount", "-o", "remount,bind,ro", str(readonly)], check=True)  # a read-only mount
    try:
        assert main(argv + ["--library", str(readonly)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot write to the task library (Read-only file system)" in err[0], err
    finally:
        subprocess.run(["umount", "-l", str(readonly)], check=False)


def test_the_embedding_cache_on_a_full_disk_is_given_up_with_a_warning_and_embed_says_why(tiny_disk, backbone,
                                                                                            capsys):
    from casam_core.errors import ImageWarning
    from casam_core.predictor import CASamPredictor

    _fill(tiny_disk, leave=64 * 1024)  # less than one embedding
    predictor = CASamPredictor(backbone, disk_cache=tiny_disk / "cache")
    image = read_image(HC18).array
    with pytest.warns(ImageWarning, match="cannot write to the embedding cache"):
        predictor.set_image(image)
    masks, _, _ = predictor.predict(box=np.array([100, 100, 600, 500]), multimask_output=False)
    assert masks.any() and predictor.disk is None  # the work went on in memory
    assert not [p for p in (tiny_disk / "cache").rglob("*") if p.is_file()]  # no damaged entry
    code = main(["embed", str(HC18), "--cache-dir", str(tiny_disk / "cache2"), "--json", *CPU])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("casam embed: error:") and "embedding cache" in err[-1], err


# ------------------------------------------------------------------ 13, 14, 15: the library's entries
def test_a_task_folder_that_is_a_symbolic_link_is_never_renamed_or_removed_through(tmp_path):
    library, outside = TaskLibrary(tmp_path / "tasks"), TaskLibrary(tmp_path / "elsewhere")
    outside.save(_task("liver"))
    library.save(_task("kidney"))
    (library.root / "liver").symlink_to(outside.root / "liver", target_is_directory=True)
    before = {p.name: p.read_bytes() for p in (outside.root / "liver").iterdir()}
    with pytest.raises(TaskLibraryError, match="is a symbolic link"):
        library.rename("liver", "spleen")
    with pytest.raises(TaskLibraryError, match="is a symbolic link"):
        library.load("liver")
    (library.root / ".trash-old-1234").symlink_to(outside.root / "liver")  # what an earlier remove left
    library.remove("liver")  # the link goes; the folder it pointed to stays as it was
    assert not (library.root / "liver").exists() and not (library.root / ".trash-old-1234").is_symlink()
    assert {p.name: p.read_bytes() for p in (outside.root / "liver").iterdir()} == before
    assert library.names() == ["kidney"]


@pytest.mark.parametrize("damage", ["fifo", "dev_zero", "sparse", "file_link"])
def test_a_tampered_task_is_skipped_with_its_reason_without_reading_it(tmp_path, damage, capsys):
    library = TaskLibrary(tmp_path / "tasks")
    library.save(_task("good"))
    library.save(_task("bad"))
    target = library.root / "bad" / (ROUTER if damage != "fifo" else CARD)
    target.unlink()
    if damage == "fifo":
        os.mkfifo(target)  # reading it blocked forever
    elif damage == "dev_zero":
        target.symlink_to("/dev/zero")  # read until memory ran out
    elif damage == "sparse":
        with open(target, "wb") as fh:
            fh.truncate(20 * 1024**3)  # 20 GB of nothing
    else:
        (tmp_path / "r.safetensors").write_bytes(b"x")
        target.symlink_to(tmp_path / "r.safetensors")
    with pytest.raises(TaskLibraryError) as err:
        library.load("bad")
    why = {"fifo": "not a regular file", "dev_zero": "is a symbolic link", "sparse": "too large",
           "file_link": "is a symbolic link"}[damage]
    assert why in str(err.value), err.value
    assert library.load("good").name == "good"
    code = main(["tasks", "list", "--library", str(library.root), "--json"])  # the library still lists
    assert code == 0 and "good" in capsys.readouterr().out


def test_a_task_name_ending_in_a_newline_is_refused_from_the_cli_and_from_a_card(tmp_path):
    for name in ("liver\n", "liver\r\n", "\nliver"):
        with pytest.raises(TaskNameError):
            check_task_name(name)
    card = dict(_task().card, name="liver\n", files={})
    with pytest.raises(TaskLibraryError, match="task name"):
        check_card(card, "pack.zip")
    assert main(["learn", "liver\n", str(HC18), "--masks", str(SAMPLES / "hc18_fetal_head"),
                 "--library", str(tmp_path / "tasks"), *CPU]) == 2
    assert not (tmp_path / "tasks").exists() or not list((tmp_path / "tasks").iterdir())


# ------------------------------------------------------------------ 17, 18, 19: files
def _nifti_header(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes())[:348]


def _disagreeing_nifti(tmp_path: Path, mirrored_pixdim: bool) -> Path:
    """The hippocampus sample with qform and sform disagreeing (sform: mirrored and shifted), or
    with pixdim[1] = -1 (read by some writers as a flip)."""
    raw = bytearray(gzip.decompress(HIPPO.read_bytes()))
    raw[252:256] = struct.pack("<hh", 1, 2)  # qform_code scanner, sform_code aligned
    srow = list(struct.unpack("<12f", raw[280:328]))
    srow[0], srow[3] = -abs(srow[0] or 1.0), 50.0
    raw[280:328] = struct.pack("<12f", *srow)
    if mirrored_pixdim:
        raw[80:84] = struct.pack("<f", -1.0)
    path = tmp_path / f"odd{int(mirrored_pixdim)}.nii.gz"
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


@pytest.mark.parametrize("mirrored_pixdim", [False, True])
def test_a_nifti_mask_keeps_the_inputs_own_qform_and_sform(tmp_path, mirrored_pixdim):
    src = _disagreeing_nifti(tmp_path, mirrored_pixdim)
    image = read_image(src)
    mask = (image.array > np.percentile(image.array, 90)).astype(np.uint8)
    out = write_mask(mask, tmp_path / "mask.nii.gz", reference=image)
    a, b = _nifti_header(src), _nifti_header(out)
    assert b[252:328] == a[252:328]  # qform/sform codes, quaternion, offsets, srow: the input's own
    assert b[76:92] == a[76:92] and b[123] == a[123]  # qfac and spacing, units
    assert np.array_equal(read_image(out).array, mask)  # and the voxels are where they were


def test_a_grey_plus_alpha_png_is_read_as_grey(tmp_path, capsys):
    grey = np.asarray(Image.open(HC18).convert("L"))
    la = np.stack([grey, np.full_like(grey, 255)], -1)
    path = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(path)
    image = read_image(path)
    assert image.array.shape == grey.shape and np.array_equal(image.array, grey)
    out = tmp_path / "m.png"
    assert main(["segment", str(path), "--box", "100,100,600,500", "--out", str(out), "--task", "none", *CPU]) == 0
    assert read_image(out).array.any()


def test_a_dicom_seg_for_a_series_without_frame_of_reference_is_refused_before_the_work(tmp_path, capsys):
    pydicom = pytest.importorskip("pydicom")
    from test_io import _dicom_series  # the round-trip tests' series writer

    folder, _ = _dicom_series(tmp_path)
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(f)
    out = tmp_path / "seg.dcm"
    code = main(["segment", str(folder), "--slice", "1", "--box", "4,4,20,20", "--out", str(out), "--task", "none",
                 "--json", *CPU])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "has no FrameOfReferenceUID" in err[0], err
    assert not out.exists()


# ------------------------------------------------------------------ 16: signals
def _casam(*argv, env_extra=None):
    import sys

    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "casam_core.cli", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_sigterm_ends_embed_with_one_line_and_exit_143_and_no_damaged_entry(tmp_path):
    import signal
    import time

    cache = tmp_path / "cache"
    proc = _casam("embed", HIPPO, "--cache-dir", cache, *CPU)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not list(cache.rglob("*.safetensors")):
        time.sleep(0.2)  # until the first slice's embedding is in the cache
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln and "it/s" not in ln]
    assert proc.returncode == 143, err[-2000:]
    assert lines[-1] == "casam embed: stopped by SIGTERM; finished outputs are kept and a rerun skips them", lines
    assert "Traceback" not in err
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]  # no temporary file left


def test_ctrl_c_while_the_libraries_load_is_one_line_not_a_traceback(tmp_path):
    import signal
    import time

    proc = _casam("segment", HC18, "--box", "100,100,600,500", "--out", tmp_path / "m.png", "--task", "none", *CPU)
    # Ctrl+C once the libraries load: numpy's shared objects are mapped (the first import inside the
    # CLI's guard; torch, SimpleITK and the rest follow). A fixed 0.6 s wait failed on a loaded
    # machine, the signal arriving while the interpreter itself was still starting.
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.time() + 60
    if maps.exists():
        while time.time() < deadline and proc.poll() is None and "numpy" not in maps.read_text(errors="ignore"):
            time.sleep(0.01)
    else:
        time.sleep(0.6)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert len(err.strip().splitlines()) == 1 and "cancelled" in err, err
    assert not (tmp_path / "m.png").exists()


# ------------------------------------------------------------------ 9: a crash inside OpenVINO
def test_a_crash_in_openvinos_first_run_leaves_the_process_up_and_falls_back_to_pytorch(tmp_path, monkeypatch):
    """The first compile and run of each converted graph happens in a child process (seen: OpenVINO's
    bfloat16 encoder segfaulted on an AMX Xeon and took the viewer down). Here the child dies by
    SIGSEGV: this process carries on in eager PyTorch and says why; asking for OpenVINO is refused."""
    import sys

    from casam_core import runtimes
    from casam_core.backbones import build_backbone
    from casam_core.errors import OptionError

    pytest.importorskip("openvino")
    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    monkeypatch.setattr(runtimes, "CHECK_COMMAND", [sys.executable, "-c", crash])
    backbone = build_backbone("litemedsam", device="cpu", runtime="auto", models_dir=tmp_path / "models")
    assert backbone._fast_encoder is None and backbone._fast_decoder is None
    assert "crashed OpenVINO in a separate process (killed by signal 11" in backbone.runtime_note, backbone.runtime_note
    from casam_core.predictor import CASamPredictor

    predictor = CASamPredictor(backbone)
    predictor.set_image(read_image(HC18).array)
    masks, _, _ = predictor.predict(box=np.array([100, 100, 600, 500]), multimask_output=False)
    assert masks.sum() > 10000  # eager PyTorch segments
    with pytest.raises(OptionError, match="crashed OpenVINO in a separate process"):
        build_backbone("litemedsam", device="cpu", runtime="openvino", models_dir=tmp_path / "models")
    monkeypatch.undo()  # the real check passes, is remembered, and OpenVINO runs
    backbone = build_backbone("litemedsam", device="cpu", runtime="auto", models_dir=tmp_path / "models")
    assert backbone._fast_encoder is not None and backbone._fast_decoder is not None, backbone.runtime_note
    assert sorted(p.name for p in (tmp_path / "models").glob("*.survived-*.json"))


# ------------------------------------------------------------------ 3: a click inside a box
def test_a_corrective_click_inside_a_box_never_takes_the_mask_out_of_it(predictor):
    """kvasir_polyp test case 0: a positive click on the box prediction's largest miss (110 px) took
    box Dice 0.982 -> 0.881 with 2289 pixels outside the user's box."""
    from scipy import ndimage

    from casam_core.metrics import dice
    from casam_core.prompts import box_from_mask
    from conftest import dataset_case

    image, labels = dataset_case("kvasir_polyp", "test", 0)
    gt = labels > 0
    box = box_from_mask(gt)
    predictor.set_image(image)
    masks, _, low = predictor.predict(box=box, multimask_output=False)
    miss, n = ndimage.label(gt & ~masks[0])
    biggest = int(np.argmax(ndimage.sum(miss > 0, miss, range(1, n + 1)))) + 1
    ys, xs = np.nonzero(miss == biggest)
    click = np.array([[xs[len(xs) // 2], ys[len(ys) // 2]]])
    after, _, _ = predictor.predict(point_coords=click, point_labels=np.array([1]), box=box, mask_input=low,
                                    multimask_output=False)
    x0, y0, x1, y1 = box
    outside = after[0].copy()
    outside[int(np.floor(y0)):int(np.ceil(y1)) + 1, int(np.floor(x0)):int(np.ceil(x1)) + 1] = False
    assert outside.sum() == 0
    assert dice(after[0], gt) > 0.95, dice(after[0], gt)  # 0.963 (the box alone: 0.982)
    far = np.array([[x1 + 30, y0 + 5]])  # a positive click beside the box widens where the mask may go
    wide, _, _ = predictor.predict(point_coords=np.concatenate([click, far]), point_labels=np.array([1, 1]),
                                   box=box, multimask_output=False)
    assert not wide[0][:, int(x1 + 31):].any()


# ------------------------------------------------------------------ routing a large library
def test_routing_reads_no_alignment_layer_and_a_damaged_one_is_named_when_used(tmp_path, backbone):
    """``casam route`` with 200 tasks took 48.5 s (1 task: 5.9 s): every task's Alignment Layer was read,
    hashed and built to route. Now the cards and routers are read; a layer when its task is used.
    Here one task's layer file is a FIFO (reading it would block): routing never touches it."""
    from casam_core.predictor import CASamPredictor, DeferredLayer

    library = TaskLibrary(tmp_path / "tasks")
    for name in ("first", "second"):
        task = _task(name)
        task.card["backbone_fingerprint"] = backbone.fingerprint
        library.save(task)
    (library.root / "second" / ALIGNMENT).unlink()
    os.mkfifo(library.root / "second" / ALIGNMENT)
    predictor = CASamPredictor(backbone)
    assert predictor.load_tasks(library) == {}
    assert all(isinstance(layer, DeferredLayer) for layer in predictor.layers.values())
    predictor.set_image(read_image(HC18).array)
    choice = predictor.choose_task("auto")
    assert set(choice.scores) == {"first", "second"}
    predictor.task_features("first")  # read on first use, then kept
    assert isinstance(predictor.alignment_layer("first"), torch.nn.Module)
    with pytest.raises(TaskLibraryError, match="second.*not a regular file"):
        predictor.task_features("second")
