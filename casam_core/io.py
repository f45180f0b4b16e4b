"""Medical image I/O (SimpleITK; geometry is always kept).

Arrays follow SimpleITK's numpy order: a volume is (z, y, x), a 2D image (y, x) or
(y, x, channels). ``spacing``, ``origin`` and ``direction`` stay in SimpleITK's
(x, y, z) order so they can be written back unchanged. Files are checked before their pixels
are read (size limits, truncation); a mask is written atomically and read back whole.
Intensities for the backbone: ``casam_core.images``; dataset folders: ``casam_core.datasets``.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import threading
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from .errors import ImageIOError, ImageWarning
from .files import PathLike, atomic_write, path_suffix
from .images import check_finite

# Size limits, checked on the file's header before any pixel is read
MAX_PIXELS_2D = 8192 * 8192  # 67 M pixels
MAX_VOXELS_3D = 1024 * 1024 * 512  # 537 M voxels (a 512 x 512 CT of 2048 slices)
MAX_IMAGE_BYTES = 2 * 1024 ** 3  # 2 GiB of pixel data in memory

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


# ---------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------
_ITK = threading.local()  # .notes: the list collecting SimpleITK's messages in this thread, if any
_ITK_LOGGER = None


def _sitk():
    """SimpleITK, with its warnings routed to Python: inside ``_itk_notes()`` they are collected
    (and become part of one line), elsewhere they are Python warnings (one line each)."""
    import SimpleITK as sitk

    global _ITK_LOGGER
    if _ITK_LOGGER is None:
        class _Logger(sitk.LoggerBase):
            def _note(self, text):
                note = _itk_note(text)
                notes = getattr(_ITK, "notes", None)
                if notes is not None:
                    notes.append(note)
                elif note:
                    warnings.warn(f"SimpleITK: {note}", ImageWarning, stacklevel=2)

            DisplayText = DisplayErrorText = DisplayWarningText = DisplayGenericOutputText = _note

            def DisplayDebugText(self, text):
                pass

        _ITK_LOGGER = _Logger()
        _ITK_LOGGER.SetAsGlobalITKLogger()
    return sitk


def _itk_note(text: str) -> str:
    """ITK's "WARNING: In <source file>, line N\n<Class> (0x...): message" -> "message"."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not re.match(r"^(WARNING|ERROR): In .*, line \d+$", ln)]
    text = " ".join(re.sub(r"^\w+ \(0x[0-9a-fA-F]+\): ", "", ln) for ln in lines)
    return text[:200]


@contextmanager
def _itk_notes() -> Iterator[List[str]]:
    """Collect what SimpleITK/ITK/GDCM say during the block (this thread only)."""
    _sitk()
    outer = getattr(_ITK, "notes", None)
    _ITK.notes = notes = []
    try:
        yield notes
    finally:
        _ITK.notes = outer


def _said(notes: List[str]) -> str:
    notes = [n for n in dict.fromkeys(notes) if n]
    return f" (SimpleITK: {'; '.join(notes)[:200]})" if notes else ""


def check_image_size(path: PathLike, shape: Tuple[int, ...], components: int, itemsize: int) -> None:
    """Refuse an image whose header promises more than the limits, before its pixels are read."""
    shape = tuple(int(v) for v in shape)
    count = int(np.prod(shape, dtype=np.float64)) if shape else 0
    volume = sum(v > 1 for v in shape) >= 3
    limit = MAX_VOXELS_3D if volume else MAX_PIXELS_2D
    nbytes = float(count) * components * itemsize
    size = " x ".join(map(str, shape))
    if count > limit:
        raise ImageIOError(f"{path}: {size} {'voxels' if volume else 'pixels'} is more than CA-SAM reads "
                           f"({limit / 1e6:.0f} M {'voxels for a volume' if volume else 'pixels for a 2D image'})")
    if nbytes > MAX_IMAGE_BYTES:
        raise ImageIOError(f"{path}: {size} x {components} channel(s) of {itemsize} byte(s) is "
                           f"{nbytes / 1024 ** 3:.1f} GiB of pixels, more than CA-SAM reads "
                           f"({MAX_IMAGE_BYTES / 1024 ** 3:.0f} GiB)")


def _header(sitk, path: str) -> Tuple[Tuple[int, ...], int, int]:
    """(size in x, y[, z] order, components per pixel, bytes per component) from the header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    probe = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID())
    itemsize = sitk.GetArrayViewFromImage(probe).itemsize
    return tuple(reader.GetSize()), int(reader.GetNumberOfComponents()), int(itemsize)


_MET_BYTES = {"MET_UCHAR": 1, "MET_CHAR": 1, "MET_USHORT": 2, "MET_SHORT": 2, "MET_UINT": 4, "MET_INT": 4,
              "MET_ULONG_LONG": 8, "MET_LONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _nifti_need(head: bytes) -> Optional[int]:
    """Bytes a NIfTI-1/2 file holds up to the end of its pixel data, from its header (None if
    the header is not one)."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = max(int(struct.unpack(endian + "f", head[108:112])[0]), 348)
        elif len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = max(struct.unpack(endian + "q", head[168:176])[0], 540)
        else:
            continue
        n = int(dims[0])
        if not 1 <= n <= 7 or bitpix <= 0:
            return None
        return offset + int(np.prod([max(int(d), 1) for d in dims[1:n + 1]], dtype=np.float64)) * bitpix // 8
    return None


def _meta_need(path: Path) -> Optional[int]:
    """Bytes a MetaImage (.mha) file with LOCAL data holds, from its text header (None if not known)."""
    with open(path, "rb") as fh:
        head = fh.read(65536)
    keys, end = {}, 0
    for line in head.split(b"\n"):
        end += len(line) + 1
        key, _, value = line.decode("latin-1").partition("=")
        keys[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    else:
        return None
    if keys.get("ElementDataFile") != "LOCAL":
        return None
    if keys.get("CompressedData", "False").lower() == "true":
        size = keys.get("CompressedDataSize", "")
        return end + int(size) if size.isdigit() else None
    item = _MET_BYTES.get(keys.get("ElementType", ""))
    try:
        count = np.prod([int(v) for v in keys.get("DimSize", "").split()], dtype=np.float64)
        channels = int(keys.get("ElementNumberOfChannels", "1"))
    except ValueError:
        return None
    return None if item is None else end + int(count) * channels * item


def check_complete(path: PathLike) -> None:
    """Refuse a NIfTI or MetaImage file that ends before its pixel data does (a truncated copy or
    download): SimpleITK reads a truncated NIfTI without a word, filling the rest with zeros.
    A gzipped file is read through once, which also checks its CRC."""
    path = Path(path)
    suffix = path_suffix(path)
    truncated = ImageIOError(f"{path}: the file is truncated or damaged (it ends before its pixel data does)")
    if suffix == ".nii":
        with open(path, "rb") as fh:
            need = _nifti_need(fh.read(544))
        if need is not None and path.stat().st_size < need:
            raise truncated
    elif suffix == ".nii.gz":
        total, head = 0, b""
        try:
            with gzip.open(path, "rb") as fh:
                while True:
                    chunk = fh.read(1 << 22)
                    if not chunk:
                        break
                    if len(head) < 544:
                        head += chunk[:544 - len(head)]
                    total += len(chunk)
        except (EOFError, OSError, zlib.error) as exc:
            raise ImageIOError(f"{path}: the file is truncated or damaged ({exc})") from None
        need = _nifti_need(head)
        if need is not None and total < need:
            raise truncated
    elif suffix == ".mha":
        need = _meta_need(path)
        if need is not None and path.stat().st_size < need:
            raise truncated


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
    check_finite(array, f"{path}: the image")
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
    if path_suffix(p) in (".png", ".tif", ".tiff", ".bmp") and _pillow_only(p):
        return _read_with_pillow(p)
    with _itk_notes() as notes:
        try:
            size, components, itemsize = _header(sitk, str(p))
            check_image_size(p, tuple(reversed(size)), components, itemsize)
            check_complete(p)
            img = sitk.ReadImage(str(p))
        except RuntimeError as exc:
            reason = _itk_note(str(exc).strip().splitlines()[-1]) if str(exc).strip() else "unreadable"
            raise ImageIOError(f"{p}: cannot read as an image ({reason}){_said(notes)}") from exc
        except PermissionError as exc:
            raise ImageIOError(f"{p}: cannot read it ({exc.strerror})") from exc
    for note in dict.fromkeys(notes):
        warnings.warn(f"{p}: SimpleITK: {note}", ImageWarning, stacklevel=2)
    return _from_sitk(img, str(p))


_PILLOW_MODES = {"LA": "L", "La": "L", "PA": "RGB", "I;16": None, "I;16B": None}  # mode -> converted to


def _pillow_only(path: Path) -> bool:
    """A 2D file SimpleITK cannot read but Pillow can: grey + alpha (mode LA) and palette + alpha
    PNGs ("Unknown PixelType" in SimpleITK)."""
    try:
        from PIL import Image

        with warnings.catch_warnings():  # Pillow's decompression-bomb note: the size is checked by us
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                return im.mode in ("LA", "La", "PA")
    except Exception:  # not an image Pillow knows: SimpleITK reads it, or says why not
        return False


def _read_with_pillow(path: Path) -> MedicalImage:
    """A grey + alpha or palette + alpha 2D image: alpha dropped (as for RGBA), size checked first."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # Pillow's decompression-bomb note: the size is checked here
            warnings.simplefilter("ignore")
            im = Image.open(path)
        with im:
            check_image_size(path, (im.height, im.width), len(im.getbands()), 1)
            array = np.asarray(im.convert(_PILLOW_MODES[im.mode]))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageIOError(f"{path}: cannot read as an image ({exc})") from exc
    return MedicalImage(array=array, spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0),
                        path=str(path), is_volume=False)


def read_dicom_series(folder: PathLike) -> MedicalImage:
    sitk = _sitk()
    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    with _itk_notes() as notes:
        series = reader.GetGDCMSeriesIDs(str(folder))
        if not series:
            raise ImageIOError(f"{folder}: a folder must hold a DICOM series, and none was found{_said(notes)}")
        if len(series) > 1:
            sizes = {s: len(reader.GetGDCMSeriesFileNames(str(folder), s)) for s in series}
            chosen = max(sizes, key=sizes.get)
        else:
            chosen = series[0]
        files = reader.GetGDCMSeriesFileNames(str(folder), chosen)
        try:
            size, components, itemsize = _header(sitk, files[0])
            check_image_size(folder, (len(files),) + tuple(reversed(size[:2])), components, itemsize)
            reader.SetFileNames(files)
            img = reader.Execute()
        except RuntimeError as exc:
            raise ImageIOError(f"{folder}: cannot read DICOM series {chosen} "
                               f"({_itk_note(str(exc))}){_said(notes)}") from exc
    for note in dict.fromkeys(notes):
        warnings.warn(f"{folder}: SimpleITK: {note}", ImageWarning, stacklevel=2)
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
                    f"{labels.path}: label map {what} {_numbers(b)} does not match image "
                    f"{image.path} {what} {_numbers(a)}"
                )


def _numbers(values) -> str:
    """(1.0, 2.5, 3.0): plain numbers, not numpy reprs."""
    return "(" + ", ".join(f"{float(v):.4g}" for v in np.asarray(values).ravel()) + ")"


# ---------------------------------------------------------------------------------
# Intensities
# ---------------------------------------------------------------------------------
def image_inputs(folder: PathLike) -> List[Path]:
    """The images, volumes and DICOM series folders directly inside ``folder``, sorted."""
    found = []
    for p in sorted(Path(folder).iterdir()):
        if p.name.startswith("."):
            continue
        if (p.is_file() and path_suffix(p) in IMAGE_2D_SUFFIXES + VOLUME_SUFFIXES) or is_dicom_folder(p):
            found.append(p)
    return found


def is_dicom_folder(path: PathLike) -> bool:
    """A folder that holds .dcm files (a DICOM series is read from a folder)."""
    p = Path(path)
    return p.is_dir() and any(f.suffix.lower() == ".dcm" for f in p.iterdir())


def check_mask_path(path: PathLike, volume: bool, reference: Optional[MedicalImage] = None) -> None:
    """Refuse a mask file name that cannot be written (a folder, a format that does not fit):
    called before the work, so nobody waits for a result that cannot be saved. A ``.dcm`` mask
    is a DICOM SEG: it needs a DICOM series as the source (``reference``)."""
    path = Path(path)
    suffix = path_suffix(path)
    if path.is_dir():
        raise ImageIOError(f"{path}: is a folder; give a file name to write")
    if suffix == ".dcm":
        if reference is None or not reference.metadata.get("dicom_series"):
            raise ImageIOError(f"{path}: a .dcm mask is a DICOM SEG, written only for a DICOM series as the "
                               f"source image; write this one as .nii.gz, .mha or .nrrd")
        check_seg_source(reference.path, reference.metadata["dicom_series"], path)
        return
    if suffix not in IMAGE_2D_SUFFIXES + VOLUME_SUFFIXES or suffix in (".jpg", ".jpeg"):
        raise ImageIOError(f"{path}: unsupported mask format {suffix!r}; use .png, .nii.gz, .mha, .nrrd "
                           f"(or .dcm, a DICOM SEG, for a DICOM series)")
    if volume and suffix not in VOLUME_SUFFIXES:
        raise ImageIOError(f"{path}: a {suffix} file holds a 2D mask; write a volume as .nii.gz, .nii, .mha "
                           f"or .nrrd")


SEG_SOURCE_ATTRIBUTES = ("FrameOfReferenceUID", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient",
                         "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def check_seg_source(series_folder: PathLike, series: str, path: PathLike) -> None:
    """Refuse, before any work, a DICOM series a DICOM SEG (``path``) cannot reference: each slice
    needs the attributes that place it (Frame of Reference, spacing, orientation, position) and
    its UIDs (highdicom failed on them after the work, with a traceback)."""
    import pydicom

    files = _sitk().ImageSeriesReader().GetGDCMSeriesFileNames(str(series_folder), series)
    for f in map(Path, files):
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception as exc:  # pydicom's errors are of many kinds
            raise ImageIOError(f"{path}: cannot read the source slice {f} ({exc})") from None
        missing = [a for a in SEG_SOURCE_ATTRIBUTES if not str(getattr(ds, a, "") or "").strip()]
        if missing:
            raise ImageIOError(f"{path}: a DICOM SEG cannot reference the series in {series_folder}: slice {f.name} "
                               f"has no {', '.join(missing)}; write the mask as .nii.gz, .mha or .nrrd")


def write_mask(mask: np.ndarray, path: PathLike, reference: Optional[MedicalImage] = None) -> Path:
    """Write a label map: PNG/TIFF for 2D, NIfTI/MHA/NRRD (with ``reference``'s geometry) for 2D or
    3D. (A DICOM SEG, ``.dcm``: ``dicom_seg.save_mask``, the front door for every format.)"""
    sitk = _sitk()
    path = Path(path)
    suffix = path_suffix(path)
    mask = np.asarray(mask)
    if suffix == ".dcm":
        raise ImageIOError(f"{path}: a DICOM SEG is written by casam_core.dicom_seg.save_mask")
    if mask.dtype == np.bool_:
        mask = mask.astype(np.uint8)
    if mask.max(initial=0) <= 255:
        mask = mask.astype(np.uint8)
    else:
        mask = mask.astype(np.uint16)
    check_mask_path(path, volume=mask.ndim == 3)
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
        try:
            sitk.WriteImage(img, str(tmp), True if suffix in VOLUME_SUFFIXES else False)
            if suffix in (".nii", ".nii.gz") and reference is not None:
                _copy_nifti_orientation(reference, tmp)
            back = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp)))
        except (RuntimeError, OSError, EOFError, zlib.error) as exc:
            raise ImageIOError(f"{path}: cannot write it ({_write_failure(path, exc)})") from None
        if back.shape != mask.shape or not np.array_equal(back, mask):  # a full disk can truncate silently
            raise ImageIOError(f"{path}: cannot write it (the file written does not read back whole: "
                               f"{_write_failure(path, None)})")
    return path


def _write_failure(path: Path, exc: Optional[BaseException]) -> str:
    """Why a write failed, in words: no space left, or the writer's own reason."""
    import shutil

    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if free is not None and free < 1024 ** 2:
        return f"no space left on the device: {free // 1024} KiB free in {path.parent}"
    text = _itk_note(str(exc).strip().splitlines()[-1]) if exc is not None and str(exc).strip() else ""
    text = text.replace(str(path.parent) + os.sep, "")  # never the temporary file's name
    return text or "the disk may be full or failing"


NIFTI1_ORIENTATION = ((76, 92), (123, 124), (252, 328))  # pixdim[0..3] (qfac, spacing), xyzt_units,
# qform_code .. srow_z: the header fields that place the voxels in space


def _nifti1_header(path: PathLike) -> Optional[bytes]:
    """The 348-byte header of a little-endian NIfTI-1 file (None for anything else)."""
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(348)
    except (OSError, EOFError, zlib.error):
        return None
    ok = len(head) == 348 and struct.unpack("<i", head[:4])[0] == 348 and head[344:347] in (b"n+1", b"ni1")
    return head if ok else None


def _copy_nifti_orientation(reference: MedicalImage, written: Path) -> None:
    """Give a NIfTI mask the input's own orientation records (qform and sform, codes, qfac, units).
    SimpleITK reads one of them and writes both from it, so where the input's two disagree (or
    pixdim[1] is negative) a viewer using the other showed the mask misplaced or mirrored."""
    if reference.path is None or path_suffix(reference.path) not in (".nii", ".nii.gz"):
        return
    source, mask = _nifti1_header(reference.path), _nifti1_header(written)
    if source is None or mask is None or struct.unpack("<4h", source[40:48]) != struct.unpack("<4h", mask[40:48]):
        return  # another layout or grid: SimpleITK's header stays
    gz = str(written).lower().endswith(".gz")
    data = bytearray(gzip.decompress(written.read_bytes()) if gz else written.read_bytes())
    for start, end in NIFTI1_ORIENTATION:
        data[start:end] = source[start:end]
    if gz:
        with gzip.open(written, "wb", compresslevel=6) as fh:
            fh.write(bytes(data))
    else:
        written.write_bytes(bytes(data))
