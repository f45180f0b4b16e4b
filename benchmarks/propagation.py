"""Propagation through a volume from ONE ground-truth box on the structure's middle slice.

    python benchmarks/propagation.py [--cache DIR] [--out benchmarks/results/propagation_cpu.md]

For each volume: the box of the annotation on its middle slice (the median of the slices that
hold it) goes to ``casam_core.prompts.propagate_box``, once per growth limit (``max_growth``:
how far the mask may grow past the start slice's area; the shipped default and the others
tried). Reported: 3D Dice against the annotation, the slices segmented vs the slices that
hold the structure, how many slices past the structure it went (target: at most 2), and why
each direction stopped.

Two models: the frozen LiteMedSAM, and a hippocampus task learned the way a clinician would
(``casam learn``'s default recipe, from 40 slices of the first 4 training volumes, as in
``learn_gain.py``), which is what the product propagates with once such a task exists.

Volumes: the two committed samples (hippocampus_003 and BraTS pat0005, both from their
sets' test splits: whole tumour and tumour core as in ``casam demo``), and hippocampus
training volumes on which the growth limit is chosen (the mean 3D Dice over those rows, both
models): the first 3 (frozen) and the next 3, not used to learn the task (learned).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from _common import DATA, REPO  # noqa: E402

from casam_core import CASamPredictor, build_backbone  # noqa: E402
from casam_core.io import read_image, read_labels  # noqa: E402
from casam_core.metrics import dice  # noqa: E402
from casam_core.prompts import DEFAULT_MAX_GROWTH, box_from_mask, propagate_box  # noqa: E402
from casam_core.training import learn_config, learn_task  # noqa: E402

from gain_data import training_data  # noqa: E402



GROWTH = (1.5, 2.0, 3.0, float("inf"))


def volumes():
    """(name, (image, mask), label values or None, model, chooses the rule)."""
    s = REPO / "samples"
    hip = (s / "hippocampus_mri" / "hippocampus_003.nii.gz", s / "hippocampus_mri" / "hippocampus_003_mask.nii.gz")
    brats = (s / "brats_glioma" / "brats_2013_pat0005_1.nii.gz", s / "brats_glioma" / "brats_2013_pat0005_1_mask.nii.gz")
    yield "sample hippocampus_003", hip, None, "frozen", False
    yield "sample hippocampus_003", hip, None, "learned", False
    yield "sample BraTS pat0005, whole tumour", brats, None, "frozen", False
    yield "sample BraTS pat0005, tumour core", brats, (1, 3, 4), "frozen", False
    root = DATA / "hippocampus_mri"
    train = json.loads((root / "dataset.json").read_text())["train"]
    for model, cases in (("frozen", train[:3]), ("learned", train[4:7])):
        for case in cases:
            yield f"train {Path(case['image']).name.split('.')[0]}", (root / case["image"], root / case["mask"]), \
                None, model, True


def growth_name(g: float) -> str:
    return "none" if g == float("inf") else f"{g:g}x"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(REPO / "runs" / ".embeddings"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "propagation_cpu.md"))
    args = ap.parse_args(argv)
    backbone = build_backbone("litemedsam", device="cpu")
    predictor = CASamPredictor(backbone, disk_cache=args.cache)
    task = learn_task(CASamPredictor(backbone, disk_cache=args.cache), "hippocampus",
                      training_data("hippocampus_mri"), learn_config("fast"))
    predictor.add_task("hippocampus", task.layer if task.use_alignment else None, task.vae, task.tau, task.card)
    print(f"hippocampus task learned (layer used: {task.use_alignment})", flush=True)
    rows = []
    for name, (img_path, mask_path), values, model, chooses in volumes():
        image = read_image(img_path)
        labels = read_labels(mask_path, like=image).array
        gt = np.isin(labels, values) if values else labels > 0
        zs = np.nonzero(gt.any(axis=(1, 2)))[0]
        k = int(np.median(zs))
        predictor.set_volume(image.array, axis=0)
        chosen = "hippocampus" if model == "learned" else "none"
        ceiling = np.zeros_like(gt)  # the ground-truth box on every slice that holds the structure
        for z in zs:
            predictor.set_slice(int(z))
            ceiling[z] = predictor.predict_batch(box=box_from_mask(gt[z]), task=chosen)[0][0, 0]
        for g in GROWTH:
            mask, summary = propagate_box(predictor, k, box_from_mask(gt[k]), max_growth=g,
                                          task=chosen)
            sl = summary["slices"]
            beyond = max(0, int(zs.min()) - min(sl), max(sl) - int(zs.max()))
            rows.append({"volume": name, "model": model, "growth": g, "chooses": chooses, "dice3d": dice(mask, gt),
                         "start_dice": dice(mask[k], gt[k]), "ceiling": dice(ceiling, gt), "segmented": f"{min(sl)}-{max(sl)}",
                         "structure": f"{zs.min()}-{zs.max()}", "beyond": beyond,
                         "stopped": f"{summary['stopped_down']} / {summary['stopped_up']}"})
            print(rows[-1], flush=True)
    choice = {g: float(np.mean([r["dice3d"] for r in rows if r["chooses"] and r["growth"] == g])) for g in GROWTH}
    best = max(choice, key=choice.get)
    lines = ["# Propagation from one box on the middle slice (LiteMedSAM, CPU)", "",
             "`python benchmarks/propagation.py`. Targets (issue 16): hippocampus 3D Dice >= 0.6 from one box on "
             "the middle slice; no slice past the structure + 2. Models: the frozen backbone, and a hippocampus "
             f"task learned with `casam learn`'s default recipe from 40 slices of 4 training volumes (its layer "
             f"{'is used' if task.use_alignment else 'lost to frozen on its held-out volume, so frozen features are used'}).",
             "", "Growth limit, mean 3D Dice on the training volumes that choose it (rows marked *): " +
             ", ".join(f"{growth_name(g)} {v:.3f}" for g, v in choice.items()) +
             f"; best {growth_name(best)}; shipped {growth_name(DEFAULT_MAX_GROWTH)}.", "",
             "Ceiling: the 3D Dice the same model reaches with the ground-truth box on EVERY slice that holds the "
             "structure (no propagation): what a perfect box carry could give.", "",
             "| volume | model | growth limit | 3D Dice | ceiling | start-slice Dice | slices segmented | structure | "
             "past it | stopped (down / up) |", "|---|---|---|---:|---:|---:|---|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['volume']}{' *' if r['chooses'] else ''} | {r['model']} | {growth_name(r['growth'])}"
                     f"{' (shipped)' if r['growth'] == DEFAULT_MAX_GROWTH else ''} | {r['dice3d']:.3f} | {r['ceiling']:.3f} | "
                     f"{r['start_dice']:.3f} | {r['segmented']} | {r['structure']} | {r['beyond']} | {r['stopped']} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
