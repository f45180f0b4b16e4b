"""Whole archives: embed them into the shared cache (``casam embed``) and segment them from
prompt files or coarse masks (``casam segment-batch``), on one process or sharded over a
``torchrun`` job (``distributed.Dist``: each process takes a disjoint share of the files).

A file that cannot be read or segmented is reported in the summary with its error and the
others go on; the command then exits with an error naming it. Outputs are written
atomically, so a rerun skips what is finished and redoes what was not.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .distributed import Dist
from .errors import BatchInputError, CASamError, ImageIOError, PromptError
from .io import image_inputs, is_dicom_folder, read_image, read_labels, VOLUME_SUFFIXES
from .datasets import read_dataset
from .files import file_stem, path_suffix
from .metrics import dice
from .predictor import CASamPredictor
from .progress import CancelFn, ProgressFn, check_cancel, report
from .segment import segment_file
from .tasks import describe_route

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp") + VOLUME_SUFFIXES
SPLITS = ("train", "test", "all")


@dataclass
class Item:
    """One input of a batch: an image, a volume or a DICOM series folder (with, from a dataset
    folder, its reference mask)."""

    path: Path
    reference: Optional[Path] = None

    @property
    def size(self) -> int:
        """Bytes on disk: what sharding balances."""
        if self.path.is_dir():
            return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())
        return self.path.stat().st_size


def list_inputs(paths: Sequence, split: str = "all") -> List[Item]:
    """The inputs named on a command line: image, volume and DICOM folder paths as they are; a
    dataset folder (dataset.json) gives its cases of ``split`` ("train", "test" or "all") with
    their masks as references; any other folder gives the images, volumes and DICOM series
    folders directly inside it. Each file once, in the order given."""
    if split not in SPLITS:
        raise BatchInputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    items: List[Item] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise BatchInputError(f"{p}: no such file or folder")
        if p.is_dir() and (p / "dataset.json").is_file():
            ds = read_dataset(p)
            cases = ds.cases("train") + ds.cases("test") if split == "all" else ds.cases(split)
            items.extend(Item(c.image, c.mask) for c in cases)
        elif p.is_dir() and not is_dicom_folder(p):
            found = image_inputs(p)
            if not found:
                raise BatchInputError(f"{p}: no image, volume or DICOM series folder in it")
            items.extend(Item(f) for f in found)
        else:
            items.append(Item(p))
    seen, unique = set(), []
    for item in items:
        key = item.path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(item)
    if not unique:
        raise BatchInputError("no input to work on")
    stems: Dict[str, Path] = {}
    for item in unique:  # outputs and prompt files are named by stem: two inputs must not share one
        other = stems.setdefault(file_stem(item.path), item.path)
        if other != item.path:
            raise BatchInputError(f"{item.path} and {other} have the same name {file_stem(item.path)!r}: their "
                                  f"outputs would collide; give them different names or run them separately")
    return unique


def _slices_of(predictor: CASamPredictor, image, axis: int, window):
    """(slice index or None, prepared RGB) of every 2D image the encoder sees for ``image``."""
    if image.is_volume:
        vol = predictor.set_volume(image.array, axis=axis, window=window)
        return [(k, vol.slice_rgb(k)) for k in range(vol.n_slices)]
    return [(None, predictor.prepare(image.array, window))]


# ---------------------------------------------------------------------------------
# casam embed
# ---------------------------------------------------------------------------------
def embed_inputs(predictor: CASamPredictor, items: Sequence[Item], dist: Optional[Dist] = None, axis: int = 0,
                 window=None, progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None) -> dict:
    """Put the frozen embedding of every slice of ``items`` into the predictor's disk cache;
    this process takes its share of the files (balanced by size). Slices already cached are
    skipped without being read back. Returns this process's report; ``merge_embed_reports``
    joins those of all processes."""
    dist = dist or Dist()
    if predictor.disk is None:
        raise BatchInputError("embedding into a cache needs a cache folder (--cache-dir)")
    mine = dist.shard_by_size(items, [item.size for item in items])
    t0 = time.perf_counter()
    row = {"rank": dist.rank, "files": [], "slices": 0, "computed": 0, "cached": 0, "failed": []}
    pruned_before = predictor.disk.pruned
    for done, item in enumerate(mine, start=1):
        check_cancel(cancel)
        try:
            image = read_image(item.path)
            slices = _slices_of(predictor, image, axis, window)
        except (CASamError, OSError) as exc:
            row["failed"].append({"input": str(item.path), "error": str(exc)})
            continue
        for k, rgb in slices:
            check_cancel(cancel)
            if predictor.disk.has(predictor.record_of(rgb).key):
                row["cached"] += 1
            else:
                predictor.embed_rgb(rgb)
                if predictor.disk is None:  # the cache could not be written: this command's whole work
                    raise ImageIOError(predictor.disk_error)
                row["computed"] += 1
            row["slices"] += 1
        predictor.reset_image()
        row["files"].append(str(item.path))
        report(progress, done, len(mine), f"embedding: {item.path.name} ({dist.describe()})")
    row["seconds"] = round(time.perf_counter() - t0, 3)
    row["pruned"] = predictor.disk.pruned - pruned_before
    return row


def merge_embed_reports(rows: List[dict], cache: Path, max_bytes: int) -> dict:
    computed = sum(r["computed"] for r in rows)
    seconds = max(r["seconds"] for r in rows)
    return {"cache": str(cache), "processes": len(rows), "files": sum(len(r["files"]) for r in rows),
            "slices": sum(r["slices"] for r in rows), "computed": computed,
            "already_cached": sum(r["cached"] for r in rows), "failed": [f for r in rows for f in r["failed"]],
            "pruned": sum(r["pruned"] for r in rows), "cache_limit_bytes": max_bytes, "seconds": seconds,
            "computed_per_second": round(computed / seconds, 3) if seconds > 0 else None, "per_process": rows}


# ---------------------------------------------------------------------------------
# casam segment-batch
# ---------------------------------------------------------------------------------
def output_path(item: Item, out_dir: Path, is_volume: bool) -> Path:
    """Where an input's mask goes: ``<stem>_mask`` + ``.png`` (2D), the volume's own format, or a
    DICOM SEG (``.dcm``) for a DICOM series."""
    if not is_volume:
        suffix = ".png"
    elif is_dicom_folder(item.path):
        suffix = ".dcm"
    else:
        suffix = path_suffix(item.path) if path_suffix(item.path) in (".nii", ".nii.gz", ".mha", ".nrrd") else ".nii.gz"
    return out_dir / f"{file_stem(item.path)}_mask{suffix}"


def _existing_output(item: Item, out_dir: Path) -> Optional[Path]:
    for volume in (False, True):
        path = output_path(item, out_dir, volume)
        if path.is_file() and path.stat().st_size > 0:  # an empty file is no finished mask: redone
            return path
    return None


def _find_by_stem(folder: Optional[Path], stem: str, suffixes) -> Optional[Path]:
    if folder is None:
        return None
    for suffix in suffixes:
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def _number_list(value, what: str, where: str, width: int) -> List[List[float]]:
    if not isinstance(value, list) or not all(
            isinstance(v, list) and len(v) == width and all(isinstance(x, (int, float)) for x in v) for v in value):
        raise PromptError(f"{where}: {what!r} must be a list of [{', '.join(['x0', 'y0', 'x1', 'y1'] if width == 4 else ['x', 'y', 'label'])}] "
                          f"number lists")
    return [[float(x) for x in v] for v in value]


def read_prompt_file(path: Path, is_volume: bool) -> dict:
    """A prompt file: ``{"boxes": [[x0, y0, x1, y1], ...], "points": [[x, y, 1 or 0], ...]}`` for
    a 2D image; for a volume ``{"slices": {"12": {"boxes": ..., "points": ...}, ...},
    "propagate": true}`` (slices along the command's axis; ``propagate``: carry the prompted
    slices' masks through the volume, the default). Pixel coordinates, x to the right."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PromptError(f"{path}: not a readable JSON prompt file ({exc})") from exc
    if not isinstance(raw, dict):
        raise PromptError(f"{path}: a prompt file holds a JSON object")

    def prompts(entry, where) -> dict:
        if not isinstance(entry, dict):
            raise PromptError(f"{where}: give an object with 'boxes' and/or 'points'")
        boxes = _number_list(entry.get("boxes", []), "boxes", where, 4)
        points = _number_list(entry.get("points", []), "points", where, 3)
        if any(p[2] not in (0.0, 1.0) for p in points):
            raise PromptError(f"{where}: a point's label is 1 (positive) or 0 (negative)")
        if not boxes and not points:
            raise PromptError(f"{where}: no box and no point")
        return {"boxes": boxes, "points": points}

    if not is_volume:
        return {"slices": {None: prompts(raw, str(path))}, "propagate": False}
    slices = raw.get("slices")
    if not isinstance(slices, dict) or not slices:
        raise PromptError(f"{path}: a volume's prompt file needs \"slices\": {{\"index\": {{\"boxes\": ...}}}}")
    parsed = {}
    for key, entry in slices.items():
        try:
            index = int(key)
        except ValueError:
            raise PromptError(f"{path}: slice {key!r} is not an index") from None
        parsed[index] = prompts(entry, f"{path} slice {index}")
    propagate = raw.get("propagate", True)
    if not isinstance(propagate, bool):
        raise PromptError(f"{path}: 'propagate' is true or false")
    return {"slices": parsed, "propagate": propagate}


def segment_item(predictor: CASamPredictor, item: Item, out_dir: Path, task: Optional[str],
                 prompts_dir: Optional[Path] = None, coarse_dir: Optional[Path] = None,
                 reference_dir: Optional[Path] = None, axis: int = 0, window=None,
                 cancel: Optional[CancelFn] = None, auto: bool = False) -> dict:
    """Segment one input from its prompt file (``prompts_dir/<stem>.json``), its coarse mask
    (``coarse_dir/<stem>.<mask suffix>``) or (``auto``) with no prompt, by the task's finder
    (``segment.segment_file``), and write its mask; returns its summary row."""
    t0 = time.perf_counter()
    stem = file_stem(item.path)
    image = read_image(item.path)
    out = output_path(item, out_dir, image.is_volume)
    spec = coarse = None
    if auto:
        pass
    elif prompts_dir is not None:
        prompt_path = _find_by_stem(prompts_dir, stem, (".json",))
        if prompt_path is None:
            raise PromptError(f"{item.path}: no prompt file {prompts_dir / (stem + '.json')}")
        spec = read_prompt_file(prompt_path, image.is_volume)
        if image.is_volume:
            n = image.array.shape[axis]
            bad = [k for k in spec["slices"] if not 0 <= k < n]
            if bad:
                raise PromptError(f"{item.path}: slice {bad[0]} is outside 0..{n - 1} along axis {axis}")
    else:
        coarse_path = _find_by_stem(coarse_dir, stem, MASK_SUFFIXES)
        if coarse_path is None:
            raise PromptError(f"{item.path}: no coarse mask named {stem}.* in {coarse_dir}")
        coarse = read_labels(coarse_path, like=image).array
    result, info = segment_file(predictor, image, out, prompts=spec, coarse=coarse, auto=auto, task=task, axis=axis,
                                window=window, cancel=cancel)
    choice = info["route"]
    row = {"input": str(item.path), "out": str(out), "status": "done", "route": describe_route(choice),
           "task": choice.layer or "frozen", "mask_voxels": info["mask_voxels"]}
    reference = item.reference or _find_by_stem(reference_dir, stem, MASK_SUFFIXES)
    if reference is not None:
        row["reference"] = str(reference)
        row["dice"] = round(dice(result > 0, read_labels(reference, like=image).array > 0), 4)
    predictor.reset_image()
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def check_prompt_sources(prompts_dir, coarse_dir, reference_dir=None, auto: bool = False) -> None:
    """Exactly one source of prompts (or none with ``auto``), and every folder named exists
    (checked before any work)."""
    if auto and (prompts_dir is not None or coarse_dir is not None):
        raise BatchInputError("--auto segments without prompts: leave out --prompts and --coarse")
    if not auto and (prompts_dir is None) == (coarse_dir is None):
        raise BatchInputError("give the prompts as prompt files (--prompts DIR) or as coarse masks (--coarse DIR), "
                              "or segment with the learned task alone (--auto)")
    for folder in (prompts_dir, coarse_dir, reference_dir):
        if folder is not None and not Path(folder).is_dir():
            raise BatchInputError(f"{folder}: no such folder")


def segment_inputs(predictor: CASamPredictor, items: Sequence[Item], out_dir: Path, task: Optional[str] = "auto",
                   prompts_dir: Optional[Path] = None, coarse_dir: Optional[Path] = None,
                   reference_dir: Optional[Path] = None, dist: Optional[Dist] = None, axis: int = 0, window=None,
                   progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
                   auto: bool = False) -> List[dict]:
    """Segment this process's share of ``items`` (balanced by size) into ``out_dir``; an input
    whose output exists is skipped. Returns one row per input of the share."""
    check_prompt_sources(prompts_dir, coarse_dir, reference_dir, auto)
    dist = dist or Dist()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = dist.shard_by_size(items, [item.size for item in items])
    rows = []
    for done, item in enumerate(mine, start=1):
        check_cancel(cancel)
        existing = _existing_output(item, out_dir)
        if existing is not None:
            rows.append({"input": str(item.path), "out": str(existing), "status": "exists"})
        else:
            try:
                rows.append(segment_item(predictor, item, out_dir, task, prompts_dir, coarse_dir, reference_dir,
                                         axis, window, cancel, auto))
            except (CASamError, OSError, LookupError) as exc:
                predictor.reset_image()
                rows.append({"input": str(item.path), "status": "error", "error": str(exc)})
        rows[-1]["rank"] = dist.rank
        report(progress, done, len(mine), f"segmenting: {item.path.name} ({dist.describe()})")
    return rows


def batch_summary(rows: List[dict], items: Sequence[Item], out_dir: Path, task: Optional[str], processes: int,
                  seconds: float) -> dict:
    """The summary of a whole run, rows in the inputs' order."""
    order = {str(item.path): i for i, item in enumerate(items)}
    rows = sorted(rows, key=lambda r: order.get(r["input"], len(order)))
    dices = [r["dice"] for r in rows if "dice" in r]
    return {"out": str(out_dir), "task": task, "processes": processes, "seconds": round(seconds, 3),
            "inputs": len(rows), "done": sum(r["status"] == "done" for r in rows),
            "exists": sum(r["status"] == "exists" for r in rows), "errors": sum(r["status"] == "error" for r in rows),
            "mean_dice": round(float(np.mean(dices)), 4) if dices else None, "images": rows}
