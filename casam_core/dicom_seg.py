"""DICOM SEG: a label volume as a standard DICOM Segmentation object that references its
source series (highdicom), and back.

``write_dicom_seg`` takes labels in the array order ``read_image`` gives for the series
folder (slice k = the k-th file of SimpleITK's ordering), one segment per label value, named
and coloured as given. ``read_dicom_seg`` returns the label volume in the same order, with
the segments' names, for checking a round trip or re-opening a result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from . import __version__
from .errors import ImageIOError
from .io import check_mask_path, MedicalImage, write_mask
from .files import atomic_write, path_suffix, PathLike

SUFFIX = ".dcm"


def _series_files(folder: Path, series: Optional[str]):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise ImageIOError(f"{folder}: a folder must hold a DICOM series, and none was found")
    if series is None:
        series = max(ids, key=lambda s: len(reader.GetGDCMSeriesFileNames(str(folder), s)))
    elif series not in ids:
        raise ImageIOError(f"{folder}: DICOM series {series} is not in this folder")
    return [Path(f) for f in reader.GetGDCMSeriesFileNames(str(folder), series)]


def _lab(rgb) -> "object":
    """An RGB colour (0-1 floats) as DICOM's CIELab display colour."""
    from highdicom.color import CIELabColor

    r, g, b = (float(np.clip(v, 0, 1)) for v in rgb[:3])

    def linear(c):
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    rl, gl, bl = linear(r), linear(g), linear(b)
    x = (0.4124 * rl + 0.3576 * gl + 0.1805 * bl) / 0.95047
    y = 0.2126 * rl + 0.7152 * gl + 0.0722 * bl
    z = (0.0193 * rl + 0.1192 * gl + 0.9505 * bl) / 1.08883

    def f(t):
        return t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116

    lab = (116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z)))
    return CIELabColor(float(np.clip(lab[0], 0, 100)), float(np.clip(lab[1], -128, 127)),
                       float(np.clip(lab[2], -128, 127)))


def write_dicom_seg(labels: np.ndarray, series_folder: PathLike, path: PathLike,
                    names: Optional[Dict[int, str]] = None, colours: Optional[Dict[int, Tuple[float, ...]]] = None,
                    series: Optional[str] = None) -> Path:
    """Write ``labels`` (Z, Y, X; 0 = background) as a DICOM SEG file at ``path`` (atomically),
    referencing the series in ``series_folder``. Each label value present is one segment, named
    by ``names`` (default "label N") and coloured by ``colours`` (RGB 0-1)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    path, folder = Path(path), Path(series_folder)
    if not path.name.lower().endswith(SUFFIX):
        raise ImageIOError(f"{path}: a DICOM SEG file must end in {SUFFIX}")
    files = _series_files(folder, series)
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.shape[0] != len(files):
        raise ImageIOError(f"{path}: labels of shape {labels.shape} do not match the {len(files)} slices of "
                           f"the DICOM series in {folder}")
    sources = [pydicom.dcmread(str(f)) for f in files]
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if labels.shape[1:] != (rows, cols):
        raise ImageIOError(f"{path}: labels of shape {labels.shape} do not match the series' {rows}x{cols} slices")
    # pixel measures from the source (slice thickness: the file's, else the distance between slices)
    thickness = getattr(sources[0], "SliceThickness", None)
    if thickness in (None, "") and len(sources) > 1:
        a, b = (np.asarray(s.ImagePositionPatient, float) for s in sources[:2])
        thickness = float(np.linalg.norm(b - a))
    thickness = float(thickness or 1.0)
    for ds in sources:  # highdicom reads it from every source (in memory only; the files are untouched)
        if "SliceThickness" not in ds or ds.SliceThickness in (None, ""):
            ds.SliceThickness = thickness
    measures = hd.PixelMeasuresSequence(pixel_spacing=[float(v) for v in sources[0].PixelSpacing],
                                        slice_thickness=thickness)
    values = [int(v) for v in np.unique(labels) if v > 0]
    if not values:
        raise ImageIOError(f"{path}: the labels are empty: a DICOM SEG needs at least one segment")
    names, colours = names or {}, colours or {}
    algorithm = hd.AlgorithmIdentificationSequence(name="CA-SAM", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for number, value in enumerate(values, start=1):
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=str(names.get(value) or f"label {value}"),
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC, algorithm_identification=algorithm,
            tracking_id=f"label {value}", tracking_uid=hd.UID(),
            display_color=_lab(colours[value]) if value in colours else None))
    numbered = np.zeros(labels.shape, np.uint8 if len(values) < 256 else np.uint16)
    for number, value in enumerate(values, start=1):
        numbered[labels == value] = number
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=numbered, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="CA-SAM", manufacturer_model_name="napari-casam",
        software_versions=__version__, device_serial_number="none", content_label="CASAM",
        content_description="CA-SAM segmentation", pixel_measures=measures)
    with atomic_write(path) as tmp:
        seg.save_as(str(tmp))
    return path


def save_mask(mask: np.ndarray, path: PathLike, reference: Optional[MedicalImage] = None,
              names: Optional[Dict[int, str]] = None, colours: Optional[Dict[int, Tuple[float, ...]]] = None) -> Path:
    """Write a mask in the format its name asks for: a DICOM SEG (``.dcm``) referencing
    ``reference``'s DICOM series, or ``io.write_mask``'s formats with ``reference``'s geometry."""
    if path_suffix(Path(path)) == SUFFIX:
        check_mask_path(path, volume=True, reference=reference)
        return write_dicom_seg(mask, reference.path, path, names=names, colours=colours,
                               series=reference.metadata["dicom_series"])
    return write_mask(mask, path, reference=reference)


def read_dicom_seg(path: PathLike, series_folder: PathLike, series: Optional[str] = None
                   ) -> Tuple[np.ndarray, Dict[int, str]]:
    """A DICOM SEG written for the series in ``series_folder``, as (labels (Z, Y, X), {value: name}):
    label values come back from the segments' tracking ids ("label N"), else their numbers."""
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(str(path))
    files = _series_files(Path(series_folder), series)
    uids = [str(pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID) for f in files]
    value_of, names = {}, {}
    for number in seg.get_segment_numbers():
        d = seg.get_segment_description(number)
        tracking = str(getattr(d, "tracking_id", "") or "")
        value = int(tracking.split()[-1]) if tracking.startswith("label ") else int(number)
        value_of[number], names[value] = value, str(d.segment_label)
    shape = (len(uids),) + tuple(int(v) for v in (seg.Rows, seg.Columns))
    out = np.zeros(shape, np.int32)
    referenced = set(str(u[2]) for u in seg.get_source_image_uids())
    present = [k for k, u in enumerate(uids) if u in referenced]
    if present:
        frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=[uids[k] for k in present],
                                                   ignore_spatial_locations=True)
        for i, k in enumerate(present):
            for j, number in enumerate(seg.get_segment_numbers()):
                out[k][frames[i, :, :, j] > 0] = value_of[number]
    return out, names
