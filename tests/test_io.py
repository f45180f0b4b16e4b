"""Medical I/O: readers keep geometry, intensities are robust, bad files are named."""

import numpy as np
import pytest
import SimpleITK as sitk

from casam_core.io import ImageIOError, read_image, read_labels, write_mask
from casam_core.datasets import read_dataset
from casam_core.images import normalize_intensity

from conftest import DATA, SAMPLES


def _volume(shape=(6, 20, 24), dtype=np.int16):
    rng = np.random.default_rng(0)
    arr = (rng.random(shape) * 2000 - 1000).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-10.0, 20.0, 5.5))
    img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    return arr, img


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd"])
def test_volume_formats_keep_geometry_and_masks_write_back(tmp_path, suffix):
    arr, img = _volume()
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(img, str(path))
    vol = read_image(path)
    assert vol.is_volume and vol.array.shape == arr.shape and np.array_equal(vol.array, arr)
    assert np.allclose(vol.spacing, (0.7, 0.8, 2.5)) and np.allclose(vol.origin, (-10, 20, 5.5))
    mask = vol.array > 0
    out = write_mask(mask, tmp_path / f"mask{suffix}", reference=vol)
    back = read_labels(out, like=vol)  # like= checks shape, spacing, origin, direction
    assert np.array_equal(back.array, mask.astype(np.uint8))
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temp file


def _dicom_series(tmp_path):
    """A 4-slice CT series written by SimpleITK, with its geometry."""
    arr = (np.random.default_rng(1).random((4, 16, 16)) * 2000 - 1000).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-10.0, 20.0, 5.5))
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(arr.shape[0]):
        sl = img[:, :, k]
        sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")  # series instance UID
        sl.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.2")  # study instance UID
        sl.SetMetaData("0020|0052", "1.2.826.0.1.3680043.2.1125.3")  # frame of reference UID
        sl.SetMetaData("0020|0013", str(k + 1))  # instance number
        sl.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k)))))
        sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        sl.SetMetaData("0008|0060", "CT")
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)
    return folder, arr


def test_dicom_series_folder(tmp_path):
    folder, arr = _dicom_series(tmp_path)
    vol = read_image(folder)
    assert vol.is_volume and np.array_equal(vol.array, arr)
    assert np.allclose(vol.spacing, (0.7, 0.8, 2.5)) and np.allclose(vol.origin, (-10, 20, 5.5))
    with pytest.raises(ImageIOError, match="none was found"):
        read_image(tmp_path)


def test_2d_gray_and_rgb(tmp_path):
    case = read_image(SAMPLES / "hc18_fetal_head" / "006_HC.png")
    assert not case.is_volume and case.array.ndim == 2 and case.array.dtype == np.uint8
    rgb = np.zeros((10, 12, 4), np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgba.png"))
    assert read_image(tmp_path / "rgba.png").array.shape == (10, 12, 3)  # alpha dropped


def test_bad_files_are_named(tmp_path):
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(ImageIOError, match=r"scan\.nii\.gz: cannot read"):
        read_image(bad)
    with pytest.raises(ImageIOError, match="no such file"):
        read_image(tmp_path / "missing.png")


def test_label_checks(tmp_path):
    arr, img = _volume()
    sitk.WriteImage(img, str(tmp_path / "img.nii.gz"))
    vol = read_image(tmp_path / "img.nii.gz")
    wrong = sitk.GetImageFromArray(np.zeros((6, 20, 25), np.uint8))
    wrong.CopyInformation(sitk.GetImageFromArray(np.zeros((6, 20, 25), np.uint8)))
    sitk.WriteImage(wrong, str(tmp_path / "shape.nii.gz"))
    with pytest.raises(ImageIOError, match=r"shape.nii.gz: label map shape"):
        read_labels(tmp_path / "shape.nii.gz", like=vol)
    moved = sitk.GetImageFromArray(np.zeros(arr.shape, np.uint8))
    moved.CopyInformation(img)
    moved.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(moved, str(tmp_path / "moved.nii.gz"))
    with pytest.raises(ImageIOError, match=r"origin \(0, 0, 0\) does not match image .* origin \(-10, 20, 5.5\)"):
        read_labels(tmp_path / "moved.nii.gz", like=vol)  # plain numbers, not np.float64(...)
    frac = sitk.GetImageFromArray(np.full(arr.shape, 0.5, np.float32))
    frac.CopyInformation(img)
    sitk.WriteImage(frac, str(tmp_path / "frac.nii.gz"))
    with pytest.raises(ImageIOError, match="whole numbers"):
        read_labels(tmp_path / "frac.nii.gz")
    with pytest.raises(ImageIOError, match="2D mask"):
        write_mask(np.zeros((2, 3, 3)), tmp_path / "m.png")


def test_intensity_windows_and_percentiles():
    hu = np.array([[-1000.0, -160.0], [40.0, 240.0]])
    soft = normalize_intensity(hu, "soft_tissue")  # W400 L40 -> -160..240
    assert soft.dtype == np.uint8 and soft.tolist() == [[0, 0], [128, 255]]
    lung = normalize_intensity(hu, "lung")  # -1350..150
    assert lung[0, 0] > 0 and lung[1, 1] == 255
    with pytest.raises(ValueError, match="unknown CT window"):
        normalize_intensity(hu, "liver")
    rng = np.random.default_rng(0)
    mr = rng.normal(300, 50, (8, 32, 32))
    mr[0, 0, 0] = 1e6  # an outlier does not squash the range
    out = normalize_intensity(mr)
    assert out.max() == 255 and 100 < np.median(out) < 155
    for dtype in (np.int16, np.uint16, np.float64, np.float32):
        assert normalize_intensity((mr % 3000).astype(dtype)).dtype == np.uint8
    photo = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    assert normalize_intensity(photo) is photo  # 8-bit 2D images are already display-ready
    assert normalize_intensity(photo, keep_uint8=False).max() == 255


def test_nan_inf_and_constant_images():
    a = np.ones((16, 16), np.float32)
    assert not normalize_intensity(a).any()  # constant: zeros, no division by zero
    a[0, 0], a[1, 1], a[2, 2] = np.nan, np.inf, -np.inf
    a[3:, :] = np.linspace(0, 1, 16)
    out = normalize_intensity(a)
    assert out.dtype == np.uint8 and out.max() == 255
    with pytest.raises(ImageIOError, match="no finite pixel value"):
        normalize_intensity(np.full((4, 4), np.nan))


def test_dataset_json():
    if not (DATA / "kvasir_polyp" / "dataset.json").is_file():
        pytest.skip(f"real data not found at {DATA}")
    ds = read_dataset(DATA / "kvasir_polyp")
    assert ds.objects == "class" and ds.labels[1] == "polyp" and len(ds.cases("test")) == 40
    assert all(c.image.is_file() and c.mask.is_file() for c in ds.cases("test")[:3])


def test_dicom_seg_round_trip_keeps_voxels_names_and_references_the_series(tmp_path):
    """Labels of a DICOM series saved as a DICOM SEG (highdicom), read back with the library: the same
    voxels, one named and coloured segment per label, referencing every source instance."""
    import highdicom as hd
    import pydicom

    from casam_core.dicom_seg import read_dicom_seg, write_dicom_seg

    folder, arr = _dicom_series(tmp_path)
    vol = read_image(folder)
    labels = np.zeros(vol.array.shape, np.int32)
    labels[1, 3:9, 4:10] = 1
    labels[2, 5:12, 2:6] = 4
    labels[2, 0:2, 0:2] = 1
    out = write_dicom_seg(labels, folder, tmp_path / "result.dcm", names={1: "anterior", 4: "posterior"},
                          colours={1: (1.0, 0.0, 0.0)})
    seg = hd.seg.segread(str(out))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    sources = {str(pydicom.dcmread(str(f)).SOPInstanceUID) for f in sorted(folder.glob("*.dcm"))}
    assert {str(u[2]) for u in seg.get_source_image_uids()} == sources
    assert [seg.get_segment_description(n).segment_label for n in seg.get_segment_numbers()] == ["anterior", "posterior"]
    back, names = read_dicom_seg(out, folder)
    assert np.array_equal(back, labels) and names == {1: "anterior", 4: "posterior"}
    assert not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(ImageIOError, match="do not match the 4 slices"):
        write_dicom_seg(labels[:3], folder, tmp_path / "bad.dcm")
    with pytest.raises(ImageIOError, match="empty"):
        write_dicom_seg(np.zeros_like(labels), folder, tmp_path / "empty.dcm")
    assert not (tmp_path / "bad.dcm").exists() and not (tmp_path / "empty.dcm").exists()
