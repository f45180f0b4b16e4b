"""Writer: a Labels layer to NIfTI/MHA/NRRD, keeping the geometry of the image it came from."""

from __future__ import annotations

from typing import List

import numpy as np

from casam_core.io import MedicalImage, write_mask

from ._reader import geometry_reference


def write_labels(path: str, data, meta: dict) -> List[str]:
    data = np.asarray(data)
    reference = geometry_reference(meta.get("metadata"), data.shape)
    if reference is None:  # no source geometry: use the layer's scale and translate
        scale = tuple(meta.get("scale", (1.0,) * data.ndim))[::-1]
        translate = tuple(meta.get("translate", (0.0,) * data.ndim))[::-1]
        direction = tuple(np.eye(data.ndim).ravel())
        reference = MedicalImage(np.zeros(data.shape, np.uint8), tuple(map(float, scale)),
                                 tuple(map(float, translate)), direction, is_volume=data.ndim == 3)
    return [str(write_mask(data, path, reference=reference))]
