"""Sample data: one real 2D image and one real 3D volume with their annotations.

They are the committed samples of the source checkout (see samples/README.md for
licences and attribution); they are not copied into the installed package.
"""

from __future__ import annotations

from pathlib import Path

from casam_core.samples import SAMPLES

from ._reader import read_layers


def _sample(*parts) -> Path:
    path = SAMPLES.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path}: the CA-SAM samples come with the source checkout (samples/)")
    return path


def sample_2d():
    from casam_core.io import read_image, read_labels

    img = read_image(_sample("hc18_fetal_head", "006_HC.png"))
    lab = read_labels(_sample("hc18_fetal_head", "006_HC_mask.png"), like=img)
    meta = {"casam_geometry": dict(img.geometry(), shape=list(img.spatial_shape)), "casam_source": img.path,
            "licence": "HC18 (van den Heuvel et al. 2018), CC BY 4.0"}
    return [(img.array, {"name": "hc18_006", "metadata": meta}, "image"),
            (lab.array.astype("int32"), {"name": "hc18_006 annotation", "metadata": meta,
                                         "opacity": 0.4, "visible": False}, "labels")]


def sample_3d():
    image = read_layers(_sample("brats_glioma", "brats_2013_pat0005_1.nii.gz"))[0]
    labels = read_layers(_sample("brats_glioma", "brats_2013_pat0005_1_mask.nii.gz"))[0]
    data, kwargs, _ = image
    kwargs = dict(kwargs, name="brats_pat0005 T1c")
    kwargs["metadata"]["licence"] = "BraTS 2013 (Menze et al. 2015), CC BY-NC-SA 3.0"
    ldata, lkwargs, _ = labels
    lkwargs = dict(lkwargs, name="brats_pat0005 annotation", opacity=0.4, visible=False)
    return [(data, kwargs, "image"), (ldata.astype("int32"), lkwargs, "labels")]
