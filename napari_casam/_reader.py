"""Reader: NIfTI, MHA/MHD, NRRD and DICOM series folders through casam_core.io (SimpleITK).

Spacing becomes the layer scale and the origin its translate (both reversed to napari's
z, y, x axis order); the full geometry (with the direction matrix) is kept in the layer
metadata so that the writer puts masks back on the source grid. A file that holds a label
map (whole numbers, few values, or "mask"/"label"/"seg" in its name) opens as a Labels layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np

from casam_core.io import ImageIOError, MedicalImage, read_image, VOLUME_SUFFIXES
from casam_core.files import path_suffix

LABEL_HINTS = ("mask", "label", "seg")


def _accepts(path: Path) -> bool:
    if path.is_dir():
        return any(f.suffix.lower() == ".dcm" for f in path.iterdir())
    return path_suffix(path) in VOLUME_SUFFIXES + (".mhd", ".dcm")


def get_reader(path):
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if not p.exists() or not _accepts(p):
        return None
    return read_layers


def is_label_map(image: MedicalImage, name: str) -> bool:
    a = image.array
    if not np.issubdtype(a.dtype, np.integer):
        return False
    hint = any(h in name.lower() for h in LABEL_HINTS)
    n_values = len(np.unique(a[:: max(1, a.shape[0] // 16)]))
    return (hint and n_values <= 256) or n_values <= 8


def layer_kwargs(image: MedicalImage, name: str) -> dict:
    """scale/translate/metadata for a napari layer from the image geometry."""
    ndim = 3 if image.is_volume else 2
    spacing = tuple(float(s) for s in image.spacing[:ndim])[::-1]
    origin = tuple(float(o) for o in image.origin[:ndim])[::-1]
    metadata = {"casam_geometry": dict(image.geometry(), shape=list(image.spatial_shape)), "casam_source": image.path}
    if image.metadata.get("dicom_series"):  # labels drawn on it can be saved as a DICOM SEG referencing it
        metadata["casam_dicom_series"] = {"folder": image.path, "series": image.metadata["dicom_series"]}
    return {"name": name, "scale": spacing, "translate": origin, "metadata": metadata}


def read_layers(path) -> List[tuple]:
    if isinstance(path, list):
        path = path[0]
    p = Path(path)
    try:
        image = read_image(p)
    except ImageIOError as exc:
        raise ValueError(str(exc)) from None
    name = p.name.replace(".nii.gz", "").rsplit(".", 1)[0] if p.is_file() else p.name
    kwargs = layer_kwargs(image, name)
    if is_label_map(image, name):
        return [(image.array.astype(np.int32), kwargs, "labels")]
    rgb = image.is_rgb
    return [(image.array, dict(kwargs, rgb=rgb), "image")]


def geometry_reference(metadata: Optional[dict], shape) -> Optional[MedicalImage]:
    """A MedicalImage carrying the geometry saved by the reader, to write masks back."""
    geo = (metadata or {}).get("casam_geometry")
    if not geo:
        return None
    if "shape" in geo and tuple(geo["shape"]) != tuple(shape):
        raise ValueError(f"labels of shape {tuple(shape)} do not match the source image {tuple(geo['shape'])} "
                         f"({(metadata or {}).get('casam_source')})")
    return MedicalImage(np.zeros(shape, np.uint8), tuple(geo["spacing"]), tuple(geo["origin"]),
                        tuple(geo["direction"]), is_volume=len(shape) == 3)
