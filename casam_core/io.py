"""Medical image I/O and intensity handling (SimpleITK; geometry is always kept).

Arrays follow SimpleITK's numpy order: a volume is (z, y, x), a 2D image (y, x) or
(y, x, channels). ``spacing``, ``origin`` and ``direction`` stay in SimpleITK's
(x, y, z) order so they can be written back unchanged.

Intensities (``normalize_intensity``) become uint8 for the backbone:
- uint8 input (PNG/JPEG and 8-bit volumes) is already display-ready: unchanged;
- CT in Hounsfield units: a window preset (``WINDOWS``) when asked for;
- anything else (MR, 16-bit, float): clipped to the 0.5-99.5 percentiles of the
  whole image or volume, then scaled to 0..255;
- NaN/Inf become the lowest finite value; a constant image becomes zeros.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from .errors import ImageIOError, OptionError, PromptError, look_up_option

PathLike = Union[str, os.PathLike]

# (width, level) in Hounsfield units
WINDOWS: Dict[str, Tuple[float, float]] = {
    "soft_tissue": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
}
PERCENTILES = (0.5, 99.5)

IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")


@dataclass
class MedicalImage:
    """Pixel data plus the geometry needed to write results back in place."""

    array: np.ndarray
    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]
    path: Optional[str] = None
    is_volume: bool = False
    metadata: Dict[str, str] = field(default_factory=dict)

    @property
    def is_rgb(self) -> bool:
        return not self.is_volume and self.array.ndim == 3

    @property
    def spatial_shape(self) -> Tuple[int, ...]:
        return tuple(self.array.shape[:3] if self.is_volume else self.array.shape[:2])

    def geometry(self) -> Dict[str, List[float]]:
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}


def path_suffix(path: PathLike) -> str:
    name = str(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


# ---------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------
def _sitk():
    import SimpleITK as sitk

    return sitk


def _from_sitk(img, path: str, is_volume: Optional[bool] = None) -> MedicalImage:
    sitk = _sitk()
    array = sitk.GetArrayFromImage(img)
    dim = img.GetDimension()
    if dim == 3 and img.GetSize()[2] == 1 and is_volume is not True:
        # A single-slice 3D file (e.g. some TIFFs): treat as a 2D image.
        array = array[0]
        img = img[:, :, 0]
        dim = 2
    if dim not in (2, 3):
        raise ImageIOError(f"{path}: {dim}-D images are not supported (2D images and 3D volumes only)")
    vol = dim == 3
    if vol and img.GetNumberOfComponentsPerPixel() > 1:
        raise ImageIOError(f"{path}: multi-channel volumes are not supported; give one channel per file")
    if not vol and array.ndim == 3:
        channels = array.shape[2]
        if channels == 4:  # RGBA: drop alpha
            array = array[..., :3]
        elif channels == 2:  # gray + alpha
            array = array[..., 0]
        elif channels != 3:
            raise ImageIOError(f"{path}: {channels} channels per pixel; expected gray, RGB or RGBA")
    meta = {k: img.GetMetaData(k) for k in img.GetMetaDataKeys()} if hasattr(img, "GetMetaDataKeys") else {}
    return MedicalImage(
        array=array, spacing=tuple(img.GetSpacing()), origin=tuple(img.GetOrigin()),
        direction=tuple(img.GetDirection()), path=path, is_volume=vol,
        metadata={k: v for k, v in meta.items() if len(v) < 256},
    )


def read_image(path: PathLike) -> MedicalImage:
    """Read a 2D image (PNG/JPEG/TIFF/BMP), a volume (NIfTI/MHA/MHD/NRRD) or a DICOM series folder."""
    sitk = _sitk()
    p = Path(path)
    if not p.exists():
        raise ImageIOError(f"{p}: no such file or folder")
    if p.is_dir():
        return read_dicom_series(p)
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else "unreadable"
        raise ImageIOError(f"{p}: cannot read as an image ({reason})") from exc
    return _from_sitk(img, str(p))


def read_dicom_series(folder: PathLike) -> MedicalImage:
    sitk = _sitk()
    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise ImageIOError(f"{folder}: a folder must hold a DICOM series, and none was found")
    if len(series) > 1:
        sizes = {s: len(reader.GetGDCMSeriesFileNames(str(folder), s)) for s in series}
        chosen = max(sizes, key=sizes.get)
    else:
        chosen = series[0]
    files = reader.GetGDCMSeriesFileNames(str(folder), chosen)
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise ImageIOError(f"{folder}: cannot read DICOM series {chosen} ({str(exc).strip()[:200]})") from exc
    out = _from_sitk(img, str(folder), is_volume=True)
    out.metadata["dicom_series"] = chosen
    return out


def read_labels(path: PathLike, like: Optional[MedicalImage] = None) -> MedicalImage:
    """Read a label map (integer values, 0 = background); check it matches ``like``."""
    lab = read_image(path)
    arr = lab.array
    if lab.is_rgb:
        if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
            arr = arr[..., 0]
        else:
            raise ImageIOError(f"{path}: a label map must have one channel, this one is colour")
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all() or not np.array_equal(arr, np.round(arr)):
            raise ImageIOError(f"{path}: label maps must hold whole numbers; found non-integer values")
    if arr.min() < 0:
        raise ImageIOError(f"{path}: label maps cannot hold negative values")
    lab.array = arr.astype(np.uint16 if arr.max() > 255 else np.uint8)
    if like is not None:
        check_same_grid(like, lab)
    return lab


def check_same_grid(image: MedicalImage, labels: MedicalImage, atol: float = 1e-3) -> None:
    if image.spatial_shape != labels.spatial_shape:
        raise ImageIOError(
            f"{labels.path}: label map shape {labels.spatial_shape} does not match image "
            f"{image.path} shape {image.spatial_shape}"
        )
    if image.is_volume:
        for what in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(image, what)), np.asarray(getattr(labels, what))
            if a.shape != b.shape or not np.allclose(a, b, atol=atol, rtol=1e-4):
                raise ImageIOError(
                    f"{labels.path}: label map {what} {tuple(np.round(b, 4))} does not match image "
                    f"{image.path} {what} {tuple(np.round(a, 4))}"
                )


# ---------------------------------------------------------------------------------
# Intensities
# ---------------------------------------------------------------------------------
def normalize_intensity(array: np.ndarray, window: Optional[Union[str, Tuple[float, float]]] = None,
                        percentiles: Tuple[float, float] = PERCENTILES, keep_uint8: bool = True) -> np.ndarray:
    """Any numeric image or volume -> uint8 of the same shape (see the module notes).

    ``keep_uint8``: return uint8 input unchanged (2D photos, PNG/JPEG); volumes pass
    False so that an 8-bit MR volume is still windowed to its percentiles.
    """
    a = np.asarray(array)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    if not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"cannot normalise an array of dtype {a.dtype}")
    if a.dtype == np.uint8 and window is None and keep_uint8:
        return a
    a = a.astype(np.float32, copy=True)
    finite = np.isfinite(a)
    if not finite.all():
        fill = float(a[finite].min()) if finite.any() else 0.0
        a[~finite] = fill
    if window is not None:
        if isinstance(window, str):
            width, level = WINDOWS[look_up_option(window, WINDOWS, "CT window")]
        else:
            width, level = (float(v) for v in window)
        if width <= 0:
            raise OptionError(f"a window width must be positive, got {width}")
        lo, hi = level - width / 2.0, level + width / 2.0
    else:
        sample = a if a.size <= 4_000_000 else a.ravel()[:: a.size // 4_000_000 + 1]
        lo, hi = (float(v) for v in np.percentile(sample, percentiles))
        if hi <= lo:  # e.g. mostly background: fall back to the full range
            lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    out = (np.clip(a, lo, hi) - lo) * (255.0 / (hi - lo))
    return np.round(out).astype(np.uint8)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) -> contiguous (H, W, 3)."""
    if image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[..., None], 3, axis=2))
    if image.ndim == 3 and image.shape[2] == 3:
        return np.ascontiguousarray(image)
    raise ImageIOError(f"expected a gray or RGB image, got shape {image.shape}")


def take_slice(volume: np.ndarray, index: int, axis: int = 0) -> np.ndarray:
    if not 0 <= index < volume.shape[axis]:
        raise PromptError(f"slice {index} is outside 0..{volume.shape[axis] - 1} along axis {axis}")
    return np.take(volume, index, axis=axis)


# ---------------------------------------------------------------------------------
# Writing (atomic: temp file in the same folder, then rename)
# ---------------------------------------------------------------------------------
@contextmanager
def atomic_write(path: PathLike) -> Iterator[Path]:
    """The one way CA-SAM writes a file: ``with atomic_write(path) as tmp:`` write ``tmp`` (a new
    file beside ``path``, with the same suffix); on success it is renamed over ``path``, and on
    any error or cancel it is removed, so ``path`` is never left half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path_suffix(path)}", dir=str(path.parent))
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def is_dicom_folder(path: PathLike) -> bool:
    """A folder that holds .dcm files (a DICOM series is read from a folder)."""
    p = Path(path)
    return p.is_dir() and any(f.suffix.lower() == ".dcm" for f in p.iterdir())


def write_mask(mask: np.ndarray, path: PathLike, reference: Optional[MedicalImage] = None) -> Path:
    """Write a label map: PNG/TIFF for 2D, NIfTI/MHA/NRRD (with ``reference``'s geometry) for 2D or 3D."""
    sitk = _sitk()
    path = Path(path)
    suffix = path_suffix(path)
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        mask = mask.astype(np.uint8)
    if mask.max(initial=0) <= 255:
        mask = mask.astype(np.uint8)
    else:
        mask = mask.astype(np.uint16)
    if suffix in (".png", ".tif", ".tiff", ".bmp") and mask.ndim != 2:
        raise ImageIOError(f"{path}: a {suffix} file holds a 2D mask; write a volume as .nii.gz, .mha or .nrrd")
    if suffix not in IMAGE_2D_SUFFIXES + VOLUME_SUFFIXES or suffix in (".jpg", ".jpeg"):
        raise ImageIOError(f"{path}: unsupported mask format {suffix!r}; use .png, .nii.gz, .mha or .nrrd")
    img = sitk.GetImageFromArray(mask)
    if reference is not None:
        if reference.spatial_shape != mask.shape:
            raise ImageIOError(
                f"{path}: mask shape {mask.shape} does not match the source image {reference.spatial_shape}"
            )
        img.SetSpacing(reference.spacing)
        img.SetOrigin(reference.origin)
        img.SetDirection(reference.direction)
    with atomic_write(path) as tmp:
        sitk.WriteImage(img, str(tmp), True if suffix in VOLUME_SUFFIXES else False)
    return path


def write_json(data, path: PathLike) -> Path:
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


# ---------------------------------------------------------------------------------
# Datasets in the shared/data format
# ---------------------------------------------------------------------------------
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


def read_dataset(root: PathLike) -> Dataset:
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise ImageIOError(f"{root}: not a dataset folder (no dataset.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ImageIOError(f"{meta_path}: invalid JSON ({exc})") from exc
    for key in ("name", "labels", "train", "test"):
        if key not in meta:
            raise ImageIOError(f"{meta_path}: missing key {key!r}")
    splits = {}
    for split in ("train", "test"):
        splits[split] = [DatasetCase(root / c["image"], root / c["mask"]) for c in meta[split]]
    objects = meta.get("objects", "class")
    if objects not in ("class", "instance"):
        raise ImageIOError(f"{meta_path}: 'objects' must be 'class' or 'instance', not {objects!r}")
    return Dataset(
        root=root, name=str(meta["name"]), modality=str(meta.get("modality", "")),
        dimensions=int(meta.get("dimensions", 2)), labels={int(k): v for k, v in meta["labels"].items()},
        objects=objects, role=str(meta.get("role", "task")), source=str(meta.get("source", "")), splits=splits,
    )

