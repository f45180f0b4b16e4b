"""The catalogue of bad inputs and hostile task packs that ``casam`` must refuse (issue 13).

Each case builds its files in a workspace and gives the command line a user (or an attacker)
would type. ``run_case`` runs it through ``casam_core.cli.main`` and checks the rule: exit code
2, one line on stderr that says what is expected, and nothing written (the workspace, task
library included, is byte-identical; only the embedding cache may change).
``tests/test_inputs.py`` runs every case in CI; ``benchmarks/faults.py`` writes the report.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import SimpleITK as sitk
import torch
from PIL import Image

from casam_core.cli import main
from casam_core.samples import SAMPLES
from casam_core.task_files import ALIGNMENT, CARD, MANIFEST, ROUTER, sha256_bytes

HC18 = SAMPLES / "hc18_fetal_head" / "006_HC.png"
HC18_MASK = SAMPLES / "hc18_fetal_head" / "006_HC_mask.png"
HIPPO = SAMPLES / "hippocampus_mri" / "hippocampus_003.nii.gz"
HIPPO_MASK = SAMPLES / "hippocampus_mri" / "hippocampus_003_mask.nii.gz"
CPU = ["--device", "cpu"]


@dataclass
class Case:
    group: str  # "input" or "pack"
    name: str
    argv: Callable[[Path], List]  # builds its files in the workspace, returns casam's arguments
    says: str  # the one line must contain this ("{ws}" is the workspace)


# ---------------------------------------------------------------------------------
# file builders
# ---------------------------------------------------------------------------------
def _write(ws: Path, name: str, data: bytes) -> Path:
    path = ws / "in" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _array(ws: Path, name: str, array, spacing=None, origin=None) -> Path:
    path = ws / "in" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(array, isVector=array.ndim == 3 and name.endswith((".png", ".tif")))
    if spacing:
        img.SetSpacing(spacing)
    if origin:
        img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return path


def _volume3(ws: Path) -> Path:
    """Three slices of the hippocampus sample (a volume that is quick to segment)."""
    path = ws / "in" / "vol3.nii.gz"
    if not path.exists():
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(HIPPO)))[16:19]
        _array(ws, "vol3.nii.gz", arr)
    return path


def _nifti_bomb(ws: Path) -> Path:
    path = _array(ws, "bomb.nii", np.zeros((4, 4, 4), np.uint8))
    raw = bytearray(path.read_bytes())
    raw[40:56] = struct.pack("<8h", 3, 32767, 32767, 32767, 1, 1, 1, 1)
    path.write_bytes(bytes(raw))
    return path


def _big_png(ws: Path) -> Path:
    path = ws / "in" / "big.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (12000, 12000)).save(path)
    return path


def _dataset(ws: Path, cases=None, meta=None, raw: bytes = None) -> Path:
    root = ws / "in" / "dataset"
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "a.png")
    if raw is not None:
        (root / "dataset.json").write_bytes(raw)
        return root
    cases = [{"image": "a.png", "mask": "a.png"}] if cases is None else cases
    body = {"name": "x", "labels": {"1": "thing"}, "train": cases, "test": cases}
    body.update(meta or {})
    (root / "dataset.json").write_text(json.dumps({k: v for k, v in body.items() if v is not None}))
    return root


def _masks_folder(ws: Path, mask: np.ndarray) -> List:
    img_dir, mask_dir = ws / "in" / "imgs", ws / "in" / "masks"
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros(mask.shape[:2], np.uint8)).save(img_dir / "a.png")
    Image.fromarray(mask).save(mask_dir / "a.png")
    return [img_dir, "--masks", mask_dir]


def small_annotated_set(root: Path) -> Path:
    """Four annotated 2D images (crops of the fetal-head sample) in ``root/images`` and
    ``root/masks``: enough for a short ``casam learn``."""
    image, mask = np.asarray(Image.open(HC18)), np.asarray(Image.open(HC18_MASK))
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i, (y, x) in enumerate(((0, 0), (40, 60), (80, 120), (20, 180))):
        Image.fromarray(image[y:y + 420, x:x + 560]).save(root / "images" / f"c{i}.png")
        Image.fromarray(((mask[y:y + 420, x:x + 560] > 0) * 255).astype(np.uint8)).save(root / "masks" / f"c{i}.png")
    return root


def make_workspace(ws: Path) -> Path:
    """The catalogue's workspace: a library holding a real task "kvasir" (learned in two steps
    from ``small_annotated_set``) and its exported pack, ``good.casam-task``."""
    from casam_core.library import TaskLibrary

    data = small_annotated_set(ws / "train")
    code = main(["learn", "kvasir", str(data / "images"), "--masks", str(data / "masks"), "--steps", "2",
                 "--library", str(ws / "lib"), "--cache-dir", str(ws / "cache"), "--json", *CPU])
    if code != 0:
        raise RuntimeError("the catalogue's task could not be learned")
    TaskLibrary(ws / "lib").export("kvasir", _good(ws))
    return ws


def _truncated_copy(ws: Path, name: str) -> Path:
    """The hippocampus sample written as ``name``, then cut in half."""
    path = ws / "in" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.ReadImage(str(HIPPO)), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def _segv(path) -> List:
    return ["segment", path, "--out", "{ws}/out/m.nii.gz", "--box", "1,1,5,5", "--slice", "0", *CPU]


def _seg(path, *extra) -> List:
    return ["segment", path, "--out", "{ws}/out/m.png", *extra, *CPU]


def _seg3(ws, *extra) -> List:
    return ["segment", _volume3(ws), "--out", "{ws}/out/m.nii.gz", *extra, *CPU]


def _learn(ws, *data, extra=()) -> List:
    return ["learn", "newtask", *data, "--library", "{ws}/lib", *extra, *CPU]


INPUTS: List[Case] = [
    # files that are not images
    Case("input", "missing file", lambda ws: _seg(ws / "in" / "none.png", "--box", "1,1,5,5"), "none.png: no such file"),
    Case("input", "empty file", lambda ws: _seg(_write(ws, "empty.png", b""), "--box", "1,1,5,5"),
         "empty.png: cannot read as an image"),
    Case("input", "text named .png", lambda ws: _seg(_write(ws, "text.png", b"hello" * 20), "--box", "1,1,5,5"),
         "text.png: cannot read as an image"),
    Case("input", "text named .nii.gz", lambda ws: _seg(_write(ws, "t.nii.gz", b"not a nifti"), "--box", "1,1,5,5"),
         "t.nii.gz: cannot read as an image"),
    Case("input", "truncated NIfTI (gzip)", lambda ws: _segv(_write(ws, "half.nii.gz", HIPPO.read_bytes()[:3000])),
         "half.nii.gz: the file is truncated or damaged"),
    Case("input", "truncated NIfTI (uncompressed)", lambda ws: _segv(_truncated_copy(ws, "half.nii")),
         "half.nii: the file is truncated or damaged (it ends before its pixel data does)"),
    Case("input", "truncated MetaImage", lambda ws: _segv(_truncated_copy(ws, "half.mha")),
         "half.mha: the file is truncated or damaged (it ends before its pixel data does)"),
    Case("input", "folder without DICOM", lambda ws: _seg(_write(ws, "nodicom/x.dcm", b"x").parent,
                                                          "--box", "1,1,5,5", "--slice", "0"),
         "a folder must hold a DICOM series, and none was found (SimpleITK: No Series were found)"),
    # sizes and values
    Case("input", "12000 x 12000 PNG (small file)", lambda ws: _seg(_big_png(ws), "--box", "1,1,5,5"),
         "12000 x 12000 pixels is more than CA-SAM reads"),
    Case("input", "NIfTI header of 32767^3", lambda ws: _seg(_nifti_bomb(ws), "--box", "1,1,5,5", "--slice", "0"),
         "32767 x 32767 x 32767 voxels is more than"),
    Case("input", "MHA header of 100000^3", lambda ws: _seg(_write(
        ws, "bomb.mha", b"ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\nElementType = MET_UCHAR\n"
                        b"ElementDataFile = LOCAL\n" + b"x" * 64), "--box", "1,1,5,5", "--slice", "0"),
         "100000 x 100000 x 100000 voxels"),
    Case("input", "all-NaN volume", lambda ws: _seg(_array(ws, "nan.mha", np.full((3, 20, 20), np.nan, np.float32)),
                                                    "--box", "1,1,5,5", "--slice", "0"),
         "nan.mha: the image has no finite pixel value"),
    Case("input", "all-infinite 2D image", lambda ws: _seg(_array(ws, "inf.mha", np.full((20, 20), np.inf,
                                                                                        np.float32)), "--box", "1,1,5,5"),
         "inf.mha: the image has no finite pixel value"),
    Case("input", "4-D NIfTI", lambda ws: _seg(_array(ws, "t4.nii.gz", np.zeros((2, 3, 8, 8), np.int16)),
                                               "--box", "1,1,5,5", "--slice", "0"),
         "4-D images are not supported"),
    Case("input", "5-channel TIFF", lambda ws: _seg(_array(ws, "c5.tif", np.zeros((8, 8, 5), np.uint8)),
                                                    "--box", "1,1,5,5"), "5 channels per pixel"),
    # prompts
    Case("input", "no prompt", lambda ws: _seg(HC18), "give a prompt"),
    Case("input", "box of three numbers", lambda ws: _seg(HC18, "--box", "1,1,5"), "a box is x0,y0,x1,y1"),
    Case("input", "box with words", lambda ws: _seg(HC18, "--box", "a,b,c,d"), "a box is four numbers"),
    Case("input", "box NaN", lambda ws: _seg(HC18, "--box", "nan,1,5,5"), "box coordinates must be finite"),
    Case("input", "box x1 < x0", lambda ws: _seg(HC18, "--box", "50,1,5,5"), "box needs x0 <= x1"),
    Case("input", "box wholly outside the image", lambda ws: _seg(HC18, "--box", "900,600,950,700"),
         "lies entirely outside the 800x540 image"),
    Case("input", "point outside the image", lambda ws: _seg(HC18, "--point", "900,10"),
         "a point lies outside the 800x540 image"),
    Case("input", "point label 2", lambda ws: _seg(HC18, "--point", "10,10,2"), "a point label is 1"),
    Case("input", "--slice past the volume", lambda ws: _seg3(ws, "--box", "1,1,5,5", "--slice", "9"),
         "--slice 9 is outside 0..2"),
    Case("input", "--slice on a 2D image", lambda ws: _seg(HC18, "--box", "1,1,5,5", "--slice", "3"),
         "is a 2D image: --slice is for volumes"),
    Case("input", "volume without --slice", lambda ws: _seg3(ws, "--box", "1,1,5,5"), "say which slice"),
    # outputs
    Case("input", "volume mask as .png", lambda ws: ["segment", _volume3(ws), "--out", "{ws}/out/m.png", "--box",
                                                     "1,1,5,5", "--slice", "0", *CPU], "holds a 2D mask"),
    Case("input", "mask as .jpg", lambda ws: ["segment", HC18, "--out", "{ws}/out/m.jpg", "--box", "1,1,5,5", *CPU],
         "unsupported mask format '.jpg'"),
    Case("input", "DICOM SEG for a NIfTI volume", lambda ws: ["segment", _volume3(ws), "--out", "{ws}/out/m.dcm",
                                                              "--box", "1,1,5,5", "--slice", "0", *CPU],
         "a .dcm mask is a DICOM SEG, written only for a DICOM series"),
    Case("input", "--out is a folder", lambda ws: ["segment", HC18, "--out", _write(ws, "f.png/x", b"").parent,
                                                   "--box", "1,1,5,5", *CPU], "f.png: is a folder"),
    Case("input", "--out inside a file", lambda ws: ["segment", HC18, "--out", _write(ws, "afile", b"x") / "m.png",
                                                     "--box", "1,1,5,5", *CPU], "afile/m.png: cannot write here"),
    # label maps for learning
    Case("input", "colour label map", lambda ws: _learn(ws, *_masks_folder(ws, np.dstack(
        [np.eye(16, dtype=np.uint8) * 255, np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8)]))),
         "a label map must have one channel"),
    Case("input", "empty label map", lambda ws: _learn(ws, *_masks_folder(ws, np.zeros((16, 16), np.uint8))),
         "the mask has no foreground"),
    Case("input", "label volume of another shape", lambda ws: _learn(
        ws, _volume3(ws), "--masks", _array(ws, "lab.nii.gz", np.ones((3, 5, 5), np.uint8))),
         "does not match image"),
    Case("input", "label volume at another origin", lambda ws: _learn(
        ws, _volume3(ws), "--masks", _array(ws, "lab2.nii.gz", np.ones(sitk.GetArrayFromImage(
            sitk.ReadImage(str(_volume3(ws)))).shape, np.uint8), origin=(9.0, 9.0, 9.0))),
         "label map origin (9, 9, 9) does not match"),
    Case("input", "fractional label volume", lambda ws: _learn(
        ws, _volume3(ws), "--masks", _array(ws, "frac.mha", np.full(sitk.GetArrayFromImage(
            sitk.ReadImage(str(_volume3(ws)))).shape, 0.5, np.float32))), "whole numbers"),
    # datasets
    Case("input", "dataset.json not JSON", lambda ws: ["eval", _dataset(ws, raw=b"{oops"), *CPU], "invalid JSON"),
    Case("input", "dataset.json without a test split", lambda ws: ["eval", _dataset(ws, meta={"test": None}), *CPU],
         "dataset.json has no 'test' entry"),
    Case("input", "dataset case with '..'", lambda ws: ["eval", _dataset(ws, [{"image": "../../etc/passwd",
                                                                             "mask": "a.png"}]), *CPU],
         "leaves the dataset folder"),
    Case("input", "dataset case with an absolute path", lambda ws: ["eval", _dataset(ws, [{"image": "a.png",
                                                                                        "mask": "/etc/passwd"}]), *CPU],
         "'mask' '/etc/passwd' leaves the dataset folder"),
    Case("input", "dataset case without a mask", lambda ws: ["eval", _dataset(ws, [{"image": "a.png"}]), *CPU],
         "case 0 of the 'train' split has no 'mask' entry"),
    Case("input", "eval of a split that is not there", lambda ws: ["eval", _dataset(ws), "--split", "val", *CPU],
         "dataset.json has no 'val' split"),
    # options
    Case("input", "--epochs 99999999999999", lambda ws: _learn(ws, "{ws}/nothing", extra=["--epochs", "99999999999999"]),
         "epochs must be an integer in [1, 10000]"),
    Case("input", "--val-fraction -3", lambda ws: _learn(ws, "{ws}/nothing", extra=["--val-fraction", "-3"]),
         "the validation fraction must be a number in (0, 0.5]"),
    Case("input", "--lr nan", lambda ws: _learn(ws, "{ws}/nothing", extra=["--lr", "nan"]), "the learning rate"),
    Case("input", "--blocks 100000", lambda ws: _learn(ws, "{ws}/nothing", extra=["--blocks", "100000"]),
         "blocks must be"),
    Case("input", "--time-budget 0", lambda ws: _learn(ws, "{ws}/nothing", extra=["--time-budget", "0"]),
         "the time budget"),
    Case("input", "--batch-images 0", lambda ws: _learn(ws, "{ws}/nothing", extra=["--batch-images", "0"]),
         "batch_images must be an integer in [1, 64]"),
    Case("input", "--val-every -1", lambda ws: _learn(ws, "{ws}/nothing", extra=["--val-every", "-1"]),
         "val_every must be an integer in [0, 1e+06]; got -1"),
    # archives (casam embed, casam segment-batch)
    Case("input", "embed a missing folder", lambda ws: ["embed", "{ws}/in/archive", *CPU],
         "archive: no such file or folder"),
    Case("input", "segment-batch with prompt files and coarse masks", lambda ws: [
        "segment-batch", HC18, "--out", "{ws}/out", "--prompts", _write(ws, "p/x.json", b"{}").parent,
        "--coarse", _write(ws, "c/x.png", b"").parent, *CPU], "give the prompts as prompt files"),
    Case("input", "segment-batch prompts folder missing", lambda ws: [
        "segment-batch", HC18, "--out", "{ws}/out", "--prompts", "{ws}/in/prompts", *CPU], "prompts: no such folder"),
    Case("input", "segment-batch --out is a file", lambda ws: [
        "segment-batch", HC18, "--out", _write(ws, "out.txt", b"x"), "--prompts", _write(ws, "p/x.json", b"{}").parent,
        *CPU], "out.txt is a file: give a folder for the masks"),
    Case("input", "segment-batch inputs with one name", lambda ws: [
        "segment-batch", _write(ws, "a/x.png", HC18.read_bytes()), _write(ws, "b/x.png", HC18.read_bytes()),
        "--out", "{ws}/out", "--prompts", _write(ws, "p/x.json", b"{}").parent, *CPU],
         "have the same name 'x': their outputs would collide"),
    Case("input", "--library is a file", lambda ws: ["tasks", "list", "--library", _write(ws, "lib.txt", b"x")],
         "the task library must be a folder"),
    Case("input", "task name with a slash", lambda ws: ["learn", "a/b", "{ws}/nothing", "--library", "{ws}/lib", *CPU],
         "task name 'a/b'"),
    Case("input", "reserved task name", lambda ws: ["learn", "auto", "{ws}/nothing", "--library", "{ws}/lib", *CPU],
         "task name 'auto' is reserved"),
    Case("input", "learn under a name that is taken", lambda ws: ["learn", "kvasir", "{ws}/nothing",
                                                                   "--library", "{ws}/lib", *CPU],
         "a task named 'kvasir' already exists"),
    Case("input", "unknown task", lambda ws: _seg(HC18, "--box", "1,1,5,5", "--task", "livr", "--library",
                                                  "{ws}/lib"), "unknown task 'livr'"),
    Case("input", "SAM checkpoint missing", lambda ws: _seg(HC18, "--box", "1,1,5,5", "--backbone", "sam_vit_b",
                                                            "--checkpoint", "{ws}/in/none.pth"), "none.pth"),
    Case("input", "pickled checkpoint", lambda ws: _seg(HC18, "--box", "1,1,5,5", "--backbone", "sam_vit_b",
                                                        "--checkpoint", _pickled(ws)),
         "pickled Python objects, which CA-SAM never loads"),
]


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def _pickled(ws: Path) -> Path:
    path = ws / "in" / "sam_vit_b_01ec64.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": _Payload()}, path)
    return path


# ---------------------------------------------------------------------------------
# hostile packs: built from a real exported pack (``ws/good.casam-task``)
# ---------------------------------------------------------------------------------
def repack(src: Path, dst: Path, edit) -> Path:
    """Copy a pack, passing each member through ``edit(name, bytes) -> [(name, bytes), ...]``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            for n, b in edit(name, zin.read(name)):
                zout.writestr(n, b)
    return dst


def forge(src: Path, dst: Path, card_edit=None, alignment=None, card_bytes=None) -> Path:
    """A self-consistent pack (every hash matches) with an edited card and/or other alignment tensors."""
    from safetensors.torch import save as save_bytes

    with zipfile.ZipFile(src) as z:
        data = {n: z.read(n) for n in z.namelist()}
    if alignment is not None:
        data[ALIGNMENT] = alignment if isinstance(alignment, bytes) else save_bytes(alignment)
    card = json.loads(data[CARD])
    if card_edit:
        card_edit(card)
    card["files"][ALIGNMENT] = sha256_bytes(data[ALIGNMENT])
    data[CARD] = card_bytes if card_bytes is not None else json.dumps(card).encode()
    manifest = json.loads(data[MANIFEST])
    manifest["files"] = {n: sha256_bytes(b) for n, b in data.items() if n != MANIFEST}
    data[MANIFEST] = json.dumps(manifest).encode()
    with zipfile.ZipFile(dst, "w") as z:
        for n, b in data.items():
            z.writestr(n, b)
    return dst


def _deep(card, depth):
    node = card
    for _ in range(depth):
        node["x"] = {}
        node = node["x"]


def layer_tensors(**kw) -> Dict[str, torch.Tensor]:
    from casam_core import AlignmentLayer

    return {k: v.contiguous() for k, v in AlignmentLayer(**kw).state_dict().items()}


def _good(ws):
    return ws / "good.casam-task"


def _blocks(ws) -> int:
    with zipfile.ZipFile(_good(ws)) as z:
        return int(json.loads(z.read(CARD))["alignment"]["n_blocks"])


def _imp(pack_fn, *extra) -> Callable[[Path], List]:
    """``casam tasks import``; the backbone check is skipped (``--any-backbone``): it is its own case."""
    return lambda ws: ["tasks", "import", pack_fn(ws), "--library", "{ws}/lib", "--any-backbone", *extra, *CPU]


def _forged(name, **kw):
    return lambda ws: forge(_good(ws), ws / f"{name}.casam-task", **{k: (v(ws) if callable(v) and k != "card_edit"
                                                                        else v) for k, v in kw.items()})


def _edited(name, edit):
    return lambda ws: repack(_good(ws), ws / f"{name}.casam-task", edit)


def _flip_alignment(name, data):
    return [(name, data[:-1] + bytes([data[-1] ^ 1]) if name == ALIGNMENT else data)]


def _add_member(member, payload):
    return lambda name, data: [(name, data)] + ([(member, payload)] if name == MANIFEST else [])


def _manifest(edit):
    def apply(name, data):
        if name == MANIFEST:
            m = json.loads(data)
            edit(m)
            data = json.dumps(m).encode()
        return [(name, data)]
    return apply


def _crc_damage(ws):
    path = ws / "crc.casam-task"
    raw = bytearray(_good(ws).read_bytes())
    with zipfile.ZipFile(_good(ws)) as z:
        info = z.getinfo(ALIGNMENT)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 20
    raw[start] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


def _truncated(ws):
    path = ws / "truncated.casam-task"
    path.write_bytes(_good(ws).read_bytes()[:-200])
    return path


def _zip_bomb(ws, name="bomb", sizes_mb=None):
    """Members of zeros that compress to almost nothing: ``sizes_mb`` = {member: MB}
    (default: the router, 300 MB)."""
    sizes_mb = sizes_mb or {ROUTER: 300}
    path = ws / f"{name}.casam-task"
    with zipfile.ZipFile(_good(ws)) as z:
        data = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for n, b in data.items():
            if n in sizes_mb:
                with z.open(n, "w", force_zip64=True) as fh:
                    block = bytes(1 << 20)
                    for _ in range(sizes_mb[n]):
                        fh.write(block)
            else:
                z.writestr(n, b)
    return path


def _bad_header(ws):
    """Alignment tensors whose header claims byte ranges past the end of the file."""
    from safetensors.torch import save as save_bytes

    raw = bytearray(save_bytes(layer_tensors(n_blocks=_blocks(ws))))
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] += 10 ** 9
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + bytes(raw[8 + n:])


PACKS: List[Case] = [
    Case("pack", "not a zip at all", _imp(lambda ws: _write(ws, "x.casam-task", b"hello")), "not a task pack"),
    Case("pack", "truncated zip", _imp(_truncated), "not a task pack"),
    Case("pack", "a flipped byte in compressed data (bad CRC)", _imp(_crc_damage), "damaged task pack"),
    Case("pack", "weights changed after export", _imp(_edited("flip", _flip_alignment)),
         "does not match its SHA-256"),
    Case("pack", "zip-slip member ../evil.json", _imp(_edited("slip", _add_member("../evil.json", b"{}"))),
         "refused member '../evil.json' (a path outside the pack)"),
    Case("pack", "absolute member /etc/passwd", _imp(_edited("abs", _add_member("/etc/passwd", b"x"))),
         "refused member '/etc/passwd'"),
    Case("pack", "pickle member alignment.pt", _imp(_edited("pt", _add_member("alignment.pt", pickle.dumps(1)))),
         "refused member 'alignment.pt'"),
    Case("pack", "duplicate member", _imp(_edited("dup", lambda n, d: [(n, d)] * (2 if n == CARD else 1))),
         "a task pack holds exactly"),
    Case("pack", "missing member", _imp(_edited("miss", lambda n, d: [] if n == ROUTER else [(n, d)])),
         "a task pack holds exactly"),
    Case("pack", "unknown manifest key", _imp(_edited("key", _manifest(lambda m: m.update(run="rm -rf /")))),
         "unknown manifest keys ['run']"),
    Case("pack", "another format", _imp(_edited("fmt", _manifest(lambda m: m.update(format="zip")))),
         "not a casam-task-pack file of version 1 or 2"),
    Case("pack", "pickled weights under the right name", _imp(_forged(
        "pickled", alignment=lambda ws: pickle.dumps({"w": [0.0]}))), "not a valid safetensors file"),
    Case("pack", "8-channel layer, self-consistent", _imp(_forged(
        "c8", card_edit=lambda c: c["alignment"].update(channels=8), alignment=lambda ws: layer_tensors(
            channels=8, n_blocks=_blocks(ws)))), "alignment.channels must be an integer in [256, 256]"),
    Case("pack", "100000 channels", _imp(_forged("c100k", card_edit=lambda c: c["alignment"].update(channels=100000))),
         "alignment.channels"),
    Case("pack", "100000 blocks", _imp(_forged("b100k", card_edit=lambda c: c["alignment"].update(n_blocks=100000))),
         "alignment.n_blocks"),
    Case("pack", "unknown layer form", _imp(_forged("form", card_edit=lambda c: c["alignment"].update(form="xyz"))),
         "form"),
    Case("pack", "tau NaN", _imp(_forged("taunan", card_edit=lambda c: c["router"].update(tau=float("nan")))),
         "router.tau"),
    Case("pack", "tau Infinity", _imp(_forged("tauinf", card_edit=lambda c: c["router"].update(tau=float("inf")))),
         "router.tau"),
    Case("pack", "tau negative", _imp(_forged("tauneg", card_edit=lambda c: c["router"].update(tau=-1.0))),
         "router.tau"),
    Case("pack", "NaN weights", _imp(_forged("nanw", alignment=lambda ws: {
        k: torch.full_like(v, float("nan")) for k, v in layer_tensors(n_blocks=_blocks(ws)).items()})),
         "NaN or infinite"),
    Case("pack", "float16 weights", _imp(_forged("half", alignment=lambda ws: {
        k: v.half() for k, v in layer_tensors(n_blocks=_blocks(ws)).items()})), "must be float32"),
    Case("pack", "tensor byte range past the file", _imp(_forged("hdr", alignment=_bad_header)), ALIGNMENT),
    Case("pack", "card 100 levels deep", _imp(_forged("deep", card_edit=lambda c: _deep(c, 100))),
         "nested more than 32"),
    Case("pack", "card 200000 levels deep", _imp(_forged("deeper", card_bytes=b"[" * 200000 + b"]" * 200000)),
         "not valid JSON"),
    Case("pack", "card over 4 MB", _imp(_forged("huge", card_edit=lambda c: c.update(pad="x" * (5 << 20))))
         , "task.json"),
    Case("pack", "a 300 MB member (zip bomb)", _imp(_zip_bomb), "router.safetensors is too large"),
    Case("pack", "two 200 MB members (400 MB in all)", _imp(lambda ws: _zip_bomb(
        ws, "bomb2", {ROUTER: 200, ALIGNMENT: 200})), "the pack unpacks to"),
    Case("pack", "a 20 MB task.json declared in the zip", _imp(lambda ws: _zip_bomb(ws, "bomb3", {CARD: 20})),
         "task.json is too large"),
    Case("pack", "task name with a path", _imp(_forged("name", card_edit=lambda c: c.update(name="../../x"))),
         "task name '../../x'"),
    Case("pack", "reserved task name", _imp(_forged("auto", card_edit=lambda c: c.update(name="auto"))),
         "task name 'auto' is reserved"),
    Case("pack", "click box of 5 images", _imp(_forged("cb", card_edit=lambda c: c.update(click_box=[5.0, 0.1]))),
         "click_box"),
    Case("pack", "unknown click decoding", _imp(_forged("pp", card_edit=lambda c: c.update(point_prompts="shell"))),
         "point_prompts"),
    Case("pack", "IoU estimate of 1e9", _imp(_forged("est", card_edit=lambda c: c["validation"].update(
        iou_estimate={"frozen": 0.8, "aligned": 1e9}))), "validation.iou_estimate.aligned"),
    Case("pack", "validation not an object", _imp(_forged("val", card_edit=lambda c: c.update(validation=[1]))),
         "validation must be a JSON object"),
    Case("pack", "propagation choice not true or false", _imp(_forged("prop", card_edit=lambda c: c.update(
        propagation={"reanchor": "yes"}))), "propagation.reanchor"),
    Case("pack", "a task of another backbone", lambda ws: ["tasks", "import", forge(
        _good(ws), ws / "vitb.casam-task", card_edit=lambda c: c.update(backbone_fingerprint="sam_vit_b:0123")),
        "--library", "{ws}/lib", *CPU], "was learned on backbone sam_vit_b:0123"),
    Case("pack", "a name that is taken", _imp(lambda ws: _good(ws)), "a task named 'kvasir' already exists"),
]

CASES: List[Case] = INPUTS + PACKS


# ---------------------------------------------------------------------------------
def _snapshot(ws: Path) -> Dict[str, str]:
    """Every file under the workspace (not the embedding cache) with a hash of its bytes."""
    out = {}
    for p in sorted(ws.rglob("*")):
        rel = p.relative_to(ws).as_posix()
        if rel.startswith("cache") or not p.is_file():
            continue
        out[rel] = hashlib.blake2b(p.read_bytes(), digest_size=8).hexdigest()
    return out


def run_case(case: Case, ws: Path) -> dict:
    """Build the case in ``ws``, run it, and check the rule. Returns a row for the report."""
    argv = [str(a).replace("{ws}", str(ws)) for a in case.argv(ws)]
    argv += ["--cache-dir", str(ws / "cache")] if argv[0] in ("segment", "eval", "learn", "route", "embed",
                                                              "segment-batch") else []
    before = _snapshot(ws)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    after = _snapshot(ws)
    text = err.getvalue().strip()
    says = case.says.replace("{ws}", str(ws))
    row = {"group": case.group, "case": case.name, "rc": code, "lines": len(text.splitlines()),
           "message": text[-300:], "unchanged": before == after, "says": says in text}
    row["passed"] = code == 2 and row["lines"] == 1 and row["says"] and row["unchanged"]
    return row
