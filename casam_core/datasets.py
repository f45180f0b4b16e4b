"""Dataset folders in the shared/data format: ``dataset.json`` (name, labels, objects, a fixed
train/test split) beside the images and masks it names, relative to the folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

from .errors import ImageIOError
from .files import PathLike


@dataclass
class DatasetCase:
    image: Path
    mask: Path


@dataclass
class Dataset:
    root: Path
    name: str
    modality: str
    dimensions: int
    labels: Dict[int, str]
    objects: str  # "class" or "instance"
    role: str
    source: str
    splits: Dict[str, List[DatasetCase]]

    def cases(self, split: str = "test") -> List[DatasetCase]:
        if split not in self.splits:
            raise ImageIOError(f"{self.root}: dataset.json has no {split!r} split (has {', '.join(self.splits)})")
        return self.splits[split]


def _inside(root: Path, meta_path: Path, split: str, index: int, case, key: str) -> Path:
    """A case's file: a relative path inside the dataset folder (no absolute path, no ``..``)."""
    where = f"{meta_path}: case {index} of the {split!r} split"
    if not isinstance(case, dict) or key not in case:
        raise ImageIOError(f"{where} has no {key!r} entry (each case needs an image and a mask file)")
    name = case[key]
    if not isinstance(name, str) or not name.strip():
        raise ImageIOError(f"{where}: {key!r} must be a file name, not {name!r}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ImageIOError(f"{where}: {key!r} {name!r} leaves the dataset folder; files must be named "
                           f"relative to it, without '..'")
    return root / rel  # a symbolic link inside the folder is the folder owner's choice, and is followed


def read_dataset(root: PathLike) -> Dataset:
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise ImageIOError(f"{root}: not a dataset folder (no dataset.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ImageIOError(f"{meta_path}: invalid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ImageIOError(f"{meta_path}: dataset.json must hold an object with name, labels, train and test")
    for key in ("name", "labels", "train", "test"):
        if key not in meta:
            raise ImageIOError(f"{meta_path}: dataset.json has no {key!r} entry (it needs name, labels, train "
                               f"and test)")
    if not isinstance(meta["labels"], dict):
        raise ImageIOError(f"{meta_path}: 'labels' must map label values to names, like {{\"1\": \"tumour\"}}")
    splits = {}
    for split in ("train", "test"):
        if not isinstance(meta[split], list):
            raise ImageIOError(f"{meta_path}: {split!r} must be a list of cases")
        splits[split] = [DatasetCase(_inside(root, meta_path, split, i, c, "image"),
                                     _inside(root, meta_path, split, i, c, "mask"))
                         for i, c in enumerate(meta[split])]
    objects = meta.get("objects", "class")
    if objects not in ("class", "instance"):
        raise ImageIOError(f"{meta_path}: 'objects' must be 'class' or 'instance', not {objects!r}")
    return Dataset(
        root=root, name=str(meta["name"]), modality=str(meta.get("modality", "")),
        dimensions=int(meta.get("dimensions", 2)), labels={int(k): v for k, v in meta["labels"].items()},
        objects=objects, role=str(meta.get("role", "task")), source=str(meta.get("source", "")), splits=splits,
    )
