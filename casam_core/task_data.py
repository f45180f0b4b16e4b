"""A task's training data: annotated images and volume slices, read and normalised once.

    data = load_task_data(["../shared/data/kvasir_polyp"])   # dataset folders, image/mask pairs, volumes
    data = TaskData([image_slice_from_array(image, labels)])  # or arrays (the plugin)

A volume gives one ``TrainingSlice`` per slice (background slices: only as many as asked for);
a slice keeps the volume file's name (``brain.nii.gz[57]``) so that learning holds out whole
volumes, not neighbouring slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .datasets import read_dataset
from .errors import TaskDataError
from .files import file_stem, path_suffix
from .images import normalize_intensity, take_slice, to_rgb
from .io import VOLUME_SUFFIXES, is_dicom_folder, read_image, read_labels
from .progress import CancelFn, ProgressFn, check_cancel, report

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class TrainingSlice:
    """One 2D image as the encoder sees it, with its label map (None: router only)."""

    rgb: np.ndarray  # uint8 (H, W, 3)
    labels: Optional[np.ndarray]  # integer (H, W), 0 = background
    source: str

    @property
    def annotated(self) -> bool:
        return self.labels is not None and bool((self.labels != 0).any())


@dataclass
class TaskData:
    slices: List[TrainingSlice]
    objects: str = "class"  # "class" or "instance"
    label_names: Dict[int, str] = field(default_factory=dict)
    modality: Optional[str] = None
    sources: List[str] = field(default_factory=list)  # the files, for the task card

    def summary(self) -> dict:
        annotated = [s for s in self.slices if s.annotated]
        return {"images_or_slices": len(self.slices), "annotated": len(annotated),
                "files": len(self.sources), "file_names": [Path(s).name for s in self.sources[:50]],
                "objects": self.objects}


def source_file(source: str) -> str:
    """The file a training slice came from: ``brain.nii.gz[57]`` -> ``brain.nii.gz``."""
    return source.rsplit("[", 1)[0] if source.endswith("]") else source


def _check_labels(labels: np.ndarray, path) -> np.ndarray:
    if not (labels != 0).any():
        raise TaskDataError(f"{path}: the mask has no foreground (all zero)")
    return labels


def volume_slices(image, labels: Optional[np.ndarray], axis: int = 0, window=None,
                  background_slices: Optional[int] = None, source: str = "") -> List[TrainingSlice]:
    """A volume (array or MedicalImage) as training slices, normalised once for the whole volume.

    Slices whose labels have no foreground still feed the router; ``background_slices``
    caps how many of those are kept (evenly spaced), None = all.
    """
    array = getattr(image, "array", image)
    vol = normalize_intensity(np.asarray(array), window, keep_uint8=False)
    n = vol.shape[axis]
    fg = [labels is not None and bool(take_slice(labels, i, axis).any()) for i in range(n)]
    background = [i for i in range(n) if not fg[i]]
    if background_slices is not None and len(background) > background_slices:
        keep = np.linspace(0, len(background) - 1, background_slices).round().astype(int) if background_slices else []
        background = [background[k] for k in sorted(set(keep))]
    chosen = sorted([i for i in range(n) if fg[i]] + background)
    return [TrainingSlice(to_rgb(take_slice(vol, i, axis)),
                          take_slice(labels, i, axis) if labels is not None else None, f"{source}[{i}]")
            for i in chosen]


def image_slice(path, mask_path=None, window=None) -> TrainingSlice:
    image = read_image(path)
    if image.is_volume:
        raise TaskDataError(f"{path}: a volume among 2D images; give volumes with their label volumes")
    labels = None
    if mask_path is not None:
        labels = _check_labels(read_labels(mask_path, like=image).array, mask_path)
    return image_slice_from_array(image.array, labels, str(path), window)


def image_slice_from_array(image: np.ndarray, labels: Optional[np.ndarray], source: str = "",
                           window=None) -> TrainingSlice:
    """One 2D image (gray or RGB array) with its label map as a training slice."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[..., :3]
    if labels is not None and np.asarray(labels).shape != arr.shape[:2]:
        raise TaskDataError(f"{source}: labels of shape {np.shape(labels)} for an image of shape {arr.shape[:2]}")
    return TrainingSlice(to_rgb(normalize_intensity(arr, window)), labels, source)


def load_task_data(inputs: Sequence, masks: Sequence = (), axis: int = 0, window=None, split: str = "train",
                   limit: Optional[int] = None, background_slices: Optional[int] = None,
                   progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None) -> TaskData:
    """Training data from one of three kinds of input.

    * a dataset folder with ``dataset.json`` (the ../shared/data format; its ``split``);
    * a folder of 2D images and (``masks``) a folder of masks matched by file stem;
      images without a mask feed the router only;
    * volume files (NIfTI/MHA/NRRD) or DICOM folders with as many label volumes in ``masks``.
    ``limit`` keeps the first N cases.
    """
    inputs = [Path(p) for p in inputs]
    masks = [Path(p) for p in masks]
    if not inputs:
        raise TaskDataError("no training data given")
    for p in inputs + masks:
        if not p.exists():
            raise TaskDataError(f"{p}: no such file or folder")
    if len(inputs) == 1 and (inputs[0] / "dataset.json").is_file():
        if masks:
            raise TaskDataError(f"{inputs[0]} is a dataset folder: its masks come from dataset.json")
        ds = read_dataset(inputs[0])
        pairs = [(c.image, c.mask) for c in ds.cases(split)][:limit]
        data = TaskData([], ds.objects, {k: v for k, v in ds.labels.items() if k != 0}, ds.modality)
    elif len(inputs) == 1 and inputs[0].is_dir() and not is_dicom_folder(inputs[0]):
        if len(masks) != 1 or not masks[0].is_dir():
            raise TaskDataError(f"{inputs[0]} is a folder of images: give the folder of masks too (--masks DIR)")
        by_stem = {file_stem(p): p for p in sorted(masks[0].iterdir()) if path_suffix(p) in IMAGE_SUFFIXES}
        images = [p for p in sorted(inputs[0].iterdir()) if path_suffix(p) in IMAGE_SUFFIXES]
        if not images:
            raise TaskDataError(f"{inputs[0]}: no images ({', '.join(IMAGE_SUFFIXES)})")
        stems = {file_stem(p) for p in images}
        orphans = sorted(set(by_stem) - stems)
        if orphans:
            raise TaskDataError(f"{by_stem[orphans[0]]}: a mask with no image of the same name in {inputs[0]}")
        pairs = [(p, by_stem.get(file_stem(p))) for p in images][:limit]
        data = TaskData([], "class")
    else:
        if len(masks) != len(inputs):
            raise TaskDataError(f"{len(inputs)} volumes but {len(masks)} label volumes: give one --masks per volume")
        pairs = list(zip(inputs, masks))[:limit]
        data = TaskData([], "class")
    for done, (img, msk) in enumerate(pairs, start=1):
        check_cancel(cancel)
        data.slices.extend(_case_slices(img, msk, axis, window, background_slices))
        data.sources.append(str(img))
        report(progress, done, len(pairs), f"reading: {Path(img).name}")
    if not any(s.annotated for s in data.slices):
        raise TaskDataError("no annotated image or slice among the training data")
    if not data.label_names:
        data.label_names = {v: f"label {v}" for v in label_values(data)}
    return data


def label_values(data: TaskData) -> List[int]:
    """The label values a task learns: its named labels, else every non-zero value in its slices."""
    if data.label_names:
        return sorted(int(v) for v in data.label_names)
    return sorted({int(v) for s in data.slices if s.labels is not None for v in np.unique(s.labels) if v})


def _case_slices(img: Path, msk: Optional[Path], axis, window, background_slices) -> List[TrainingSlice]:
    if path_suffix(img) in VOLUME_SUFFIXES or is_dicom_folder(img):
        image = read_image(img)
        labels = None
        if msk is not None:
            labels = _check_labels(read_labels(msk, like=image).array, msk)
        return volume_slices(image, labels, axis, window, background_slices, source=img.name)
    return [image_slice(img, msk, window)]
