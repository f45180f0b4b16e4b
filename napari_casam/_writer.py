"""Writer: a Labels layer to NIfTI/MHA/NRRD, keeping the geometry of the image it came from, or to
a DICOM SEG (.dcm) that references the DICOM series it was drawn on, with the classes' names and
colours."""

from __future__ import annotations

from typing import List

import numpy as np

from casam_core.dicom_seg import SUFFIX, save_mask
from casam_core.errors import CASamError
from casam_core.io import MedicalImage

from ._reader import geometry_reference


class LabelsNotWritten(RuntimeError):
    """Why the labels could not be written. Not a ValueError: napari takes a writer's ValueError to
    mean "this writer does not apply" and showed only "not a valid writer", never the reason."""


def write_labels(path: str, data, meta: dict) -> List[str]:
    try:
        return _write_labels(path, data, meta)
    except (CASamError, ValueError) as exc:
        raise LabelsNotWritten(f"CA-SAM: {exc}") from None


def _write_labels(path: str, data, meta: dict) -> List[str]:
    data = np.asarray(data)
    metadata = meta.get("metadata") or {}
    names, colours = None, None
    if str(path).lower().endswith(SUFFIX):
        source = metadata.get("casam_dicom_series")
        if not source:
            raise ValueError(f"{path}: a DICOM SEG is written only for labels drawn on a DICOM series opened "
                             f"with the CA-SAM reader; save these labels as .nii.gz, .mha or .nrrd")
        reference = MedicalImage(np.zeros((0,), np.uint8), (), (), (), path=source["folder"], is_volume=True,
                                 metadata={"dicom_series": source["series"]})
        names = {int(k): str(v) for k, v in (metadata.get("casam_label_names") or {}).items()}
        colours = _colours(meta.get("colormap"), data)
    else:
        reference = geometry_reference(metadata, data.shape)
    if reference is None:  # no source geometry: use the layer's scale and translate
        scale = tuple(meta.get("scale", (1.0,) * data.ndim))[::-1]
        translate = tuple(meta.get("translate", (0.0,) * data.ndim))[::-1]
        direction = tuple(np.eye(data.ndim).ravel())
        reference = MedicalImage(np.zeros(data.shape, np.uint8), tuple(map(float, scale)),
                                 tuple(map(float, translate)), direction, is_volume=data.ndim == 3)
    return [str(save_mask(data, path, reference=reference, names=names, colours=colours))]


def _colours(colormap, data: np.ndarray) -> dict:
    """{label: RGB} from the layer's colormap (none when it cannot map label ids)."""
    values = [int(v) for v in np.unique(data) if v > 0]
    if colormap is None or not hasattr(colormap, "map") or not values:
        return {}
    try:
        rgba = np.asarray(colormap.map(np.asarray(values)), float).reshape(len(values), -1)
    except (TypeError, ValueError):
        return {}
    return {v: tuple(rgba[i, :3]) for i, v in enumerate(values)}
