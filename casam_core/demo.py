"""The demo (``casam demo``, ``make demo``): the committed samples segmented with a box, scored.

A 2D fetal-head ultrasound (HC18 006) with its annotation's tight box, and a 3D glioma MRI
(BraTS pat0005, tumour core) with one box on the slice where the annotation is largest,
propagated up and down. Masks and overlay pictures are written to ``out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np

from .errors import CASamError
from .io import read_image, read_labels
from .metrics import dice
from .predictor import CASamPredictor
from .progress import ProgressFn
from .prompts import box_from_mask
from .samples import SAMPLES
from .segment import segment_file

TUMOUR_CORE = (1, 3, 4)  # what T1c shows of a glioma; the edema is not visible on it


def run_demo(predictor: CASamPredictor, out: Path, progress: Optional[ProgressFn] = None) -> List[dict]:
    """Both cases segmented and written under ``out``; one result row each (Dice, files, seconds)."""
    if not SAMPLES.is_dir():
        raise CASamError(f"the samples folder {SAMPLES} is missing (the demo runs from a source checkout)")
    out = Path(out)
    results = []
    image = read_image(SAMPLES / "hc18_fetal_head" / "006_HC.png")
    gt = read_labels(SAMPLES / "hc18_fetal_head" / "006_HC_mask.png", like=image).array > 0
    box = box_from_mask(gt).tolist()
    pred, info = segment_file(predictor, image, out / "hc18_006_mask.png",
                              prompts={"slices": {None: {"boxes": [box], "points": []}}},
                              overlay_path=out / "hc18_006_overlay.png")
    results.append({"case": "hc18_fetal_head/006_HC (2D ultrasound)", "prompt": f"box {box}",
                    "dice": round(dice(pred > 0, gt), 4), "out": str(out / "hc18_006_mask.png"),
                    "overlay": info["overlay"], "seconds": info["seconds"]})

    vol = read_image(SAMPLES / "brats_glioma" / "brats_2013_pat0005_1.nii.gz")
    gt3 = np.isin(read_labels(SAMPLES / "brats_glioma" / "brats_2013_pat0005_1_mask.nii.gz", like=vol).array,
                  TUMOUR_CORE)
    k = int(gt3.sum(axis=(1, 2)).argmax())
    box3 = box_from_mask(gt3[k]).tolist()
    pred3, info3 = segment_file(predictor, vol, out / "brats_pat0005_tumour_core.nii.gz",
                                prompts={"slices": {k: {"boxes": [box3], "points": []}}, "propagate": True},
                                overlay_path=out / "brats_pat0005_overlay.png", progress=progress)
    pred3 = pred3 > 0
    results.append({"case": "brats_glioma/pat0005 (3D MRI T1c, tumour core)",
                    "prompt": f"box {box3} on slice {k}, propagated",
                    "dice": round(dice(pred3, gt3), 4), "slice_dice": round(dice(pred3[k], gt3[k]), 4),
                    "slices": len(info3["propagation"]["slices"]), "out": str(out / "brats_pat0005_tumour_core.nii.gz"),
                    "overlay": info3["overlay"], "seconds": info3["seconds"]})
    return results
