"""Propagation through a volume from ONE ground-truth box on the structure's middle slice.

    python benchmarks/propagation.py [--cache DIR] [--out benchmarks/results/propagation_cpu.md]

For each volume: the box of the annotation on its middle slice (the median of the slices that
hold it) goes to ``casam_core.prompts.propagate_box`` with the frozen LiteMedSAM, once with
the shipped stop rules and once without the growth limit (``max_growth``: the rule added
after hippocampus propagation ran away). Reported: 3D Dice against the annotation, the
slices segmented vs the slices that hold the structure, how many slices past the structure
it went (target: at most 2), and why each direction stopped.

Volumes: the two committed samples (hippocampus_003, BraTS pat0005: whole tumour and tumour
core as in ``casam demo``) and the first three training volumes of hippocampus_mri, on which
the growth limit was chosen (so they are not a held-out measurement: the samples are).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from casam_core import CASamPredictor, build_backbone  # noqa: E402
from casam_core.io import read_image, read_labels  # noqa: E402
from casam_core.metrics import dice  # noqa: E402
from casam_core.prompts import box_from_mask, propagate_box  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def volumes():
    s = REPO / "samples"
    hip = (s / "hippocampus_mri" / "hippocampus_003.nii.gz", s / "hippocampus_mri" / "hippocampus_003_mask.nii.gz")
    brats = (s / "brats_glioma" / "brats_2013_pat0005_1.nii.gz", s / "brats_glioma" / "brats_2013_pat0005_1_mask.nii.gz")
    yield "sample hippocampus_003", hip, None
    yield "sample BraTS pat0005, whole tumour", brats, None
    yield "sample BraTS pat0005, tumour core", brats, (1, 3, 4)
    root = DATA / "hippocampus_mri"
    if (root / "dataset.json").is_file():
        for case in json.loads((root / "dataset.json").read_text())["train"][:3]:
            yield f"train {Path(case['image']).name.split('.')[0]} (rule chosen here)", \
                (root / case["image"], root / case["mask"]), None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(REPO / "runs" / ".embeddings"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "propagation_cpu.md"))
    args = ap.parse_args(argv)
    predictor = CASamPredictor(build_backbone("litemedsam", device="cpu"), disk_cache=args.cache)
    rows = []
    for name, (img_path, mask_path), values in volumes():
        image = read_image(img_path)
        labels = read_labels(mask_path, like=image).array
        gt = np.isin(labels, values) if values else labels > 0
        zs = np.nonzero(gt.any(axis=(1, 2)))[0]
        k = int(np.median(zs))
        predictor.set_volume(image.array, axis=0)
        for rule, kw in (("shipped", {}), ("no growth limit", {"max_growth": float("inf")})):
            mask, summary = propagate_box(predictor, k, box_from_mask(gt[k]), **kw)
            sl = summary["slices"]
            beyond = max(0, int(zs.min()) - min(sl), max(sl) - int(zs.max()))
            rows.append({"volume": name, "rule": rule, "dice3d": dice(mask, gt), "start_dice": dice(mask[k], gt[k]),
                         "segmented": f"{min(sl)}-{max(sl)}", "structure": f"{zs.min()}-{zs.max()}", "beyond": beyond,
                         "stopped": f"{summary['stopped_down']} / {summary['stopped_up']}"})
            print(rows[-1], flush=True)
    lines = ["# Propagation from one box on the middle slice (frozen LiteMedSAM, CPU)", "",
             "`python benchmarks/propagation.py`. Targets (issue 16): hippocampus 3D Dice >= 0.6 from one box on "
             "the middle slice; no slice past the structure + 2.", "",
             "| volume | stop rules | 3D Dice | start-slice Dice | slices segmented | structure | past it | "
             "stopped (down / up) |", "|---|---|---:|---:|---|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['volume']} | {r['rule']} | {r['dice3d']:.3f} | {r['start_dice']:.3f} | {r['segmented']} | "
                     f"{r['structure']} | {r['beyond']} | {r['stopped']} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
