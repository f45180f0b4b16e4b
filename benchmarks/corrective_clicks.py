"""Corrective clicks: does each click make the mask better? A simulated user, a frozen backbone, CPU.

    python benchmarks/corrective_clicks.py [--clicks 5] [--choose] [--cache DIR] [--backbone mobilesam]
                                           [--out benchmarks/results/corrective_clicks[_BACKBONE]_cpu.md]

Each case starts with ONE positive click at the object's pixel nearest its centroid. Every
next click goes to the centre (the point farthest from its border) of the largest error
region of the current mask: positive where the object was missed, negative where the mask
leaks. Two ways to send the clicks to ``CASamPredictor.predict`` are compared:

- ``clicks + earlier logits`` (what the widget does): all clicks so far, with the previous
  result's low-res logits as ``mask_input``. On a box-only backbone the predictor searches
  boxes around the earlier mask (grown to each positive click, cut back from each negative
  one) and around the clicks, and makes local edits of the earlier mask at the newest click
  (``LOCAL_EDIT_FRACTIONS``); it keeps the candidate that honours most clicks, a local edit
  first (``LOCAL_EDIT_BONUS``), then the highest predicted IoU and closeness to the earlier
  mask, and keeps the earlier mask when no candidate honours more clicks than it did;
- ``clicks only``: the same clicks, no earlier logits (the box search around the clicks).

On a point-trained backbone (``--backbone mobilesam``) the clicks go to its prompt encoder as
points, as segment-anything's predictor sends them (with the earlier logits in the first mode).

Target (issue 16): averaged over the cases, Dice must not drop from one click to the next.
Cases: the committed 2D sample (HC18 006), the middle slices of the two 3D samples
(hippocampus_003, BraTS pat0005 whole tumour; both from their sets' test splits) and the
first three kvasir_polyp test images.

``--choose`` first runs the local-edit rules tried on 13 TRAINING cases (``train_cases``),
where the shipped rule was chosen: the one with no drop of the mean, then the best last click.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from _common import DATA, REPO  # noqa: E402

from casam_core import CASamPredictor, build_backbone  # noqa: E402
from casam_core.io import read_image, read_labels  # noqa: E402
from casam_core.metrics import dice  # noqa: E402
from casam_core.prompts import click_from_mask  # noqa: E402

MODES = ("clicks + earlier logits", "clicks only")


def cases(predictor):
    s = REPO / "samples"
    im = read_image(s / "hc18_fetal_head" / "006_HC.png")
    yield "HC18 006 (2D sample)", (lambda: predictor.set_image(im.array)), \
        read_labels(s / "hc18_fetal_head" / "006_HC_mask.png", like=im).array > 0
    for name, vol, msk in (("hippocampus_003 middle slice", "hippocampus_mri/hippocampus_003.nii.gz",
                            "hippocampus_mri/hippocampus_003_mask.nii.gz"),
                           ("BraTS pat0005 middle slice", "brats_glioma/brats_2013_pat0005_1.nii.gz",
                            "brats_glioma/brats_2013_pat0005_1_mask.nii.gz")):
        v = read_image(s / vol)
        gt = read_labels(s / msk, like=v).array > 0
        k = int(np.median(np.nonzero(gt.any(axis=(1, 2)))[0]))

        def setter(v=v, k=k):
            predictor.set_volume(v.array, axis=0)
            predictor.set_slice(k)

        yield name, setter, gt[k]
    root = DATA / "kvasir_polyp"
    if (root / "dataset.json").is_file():
        for case in json.loads((root / "dataset.json").read_text())["test"][:3]:
            img = read_image(root / case["image"])
            yield f"kvasir {Path(case['image']).stem}", (lambda img=img: predictor.set_image(img.array)), \
                read_labels(root / case["mask"], like=img).array > 0


def train_cases(predictor):
    """Cases from the TRAIN splits, on which the click rules are chosen: the first 4 kvasir_polyp,
    3 hc18_fetal_head and 2 skin_lesion training images, and the middle slices of the first 2
    training volumes of brats_glioma (whole tumour) and hippocampus_mri."""
    for name, n in (("kvasir_polyp", 4), ("hc18_fetal_head", 3), ("skin_lesion", 2)):
        root = DATA / name
        for case in json.loads((root / "dataset.json").read_text())["train"][:n]:
            img = read_image(root / case["image"])
            yield f"{name} {Path(case['image']).stem}", (lambda img=img: predictor.set_image(img.array)), \
                read_labels(root / case["mask"], like=img).array > 0
    for name in ("brats_glioma", "hippocampus_mri"):
        root = DATA / name
        for case in json.loads((root / "dataset.json").read_text())["train"][:2]:
            v = read_image(root / case["image"])
            gt = read_labels(root / case["mask"], like=v).array > 0
            k = int(np.median(np.nonzero(gt.any(axis=(1, 2)))[0]))

            def setter(v=v, k=k):
                predictor.set_volume(v.array, axis=0)
                predictor.set_slice(k)

            yield f"{name} {Path(case['image']).name.split('.')[0]} middle slice", setter, gt[k]


def next_click(pred: np.ndarray, gt: np.ndarray):
    """((x, y), label) at the centre of the largest error region, or None when there is no error."""
    error = pred ^ gt
    components, n = ndimage.label(error)
    if n == 0:
        return None
    sizes = ndimage.sum(error, components, range(1, n + 1))
    region = components == 1 + int(np.argmax(sizes))
    depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return (float(x), float(y)), int(gt[y, x])


def run_case(predictor, gt, mode: str, clicks: int):
    coords, labels = [click_from_mask(gt)], [1]
    masks, _, low = predictor.predict_batch(point_coords=np.array(coords, float), point_labels=np.array(labels))
    pred, logits, scores = masks[0, 0], low[0], [dice(masks[0, 0], gt)]
    for _ in range(clicks - 1):
        click = next_click(pred, gt)
        if click is None:
            scores.append(scores[-1])
            continue
        coords.append(click[0])
        labels.append(click[1])
        kw = {"mask_input": logits} if mode == MODES[0] else {}
        masks, _, low = predictor.predict_batch(point_coords=np.array(coords, float), point_labels=np.array(labels), **kw)
        pred, logits = masks[0, 0], low[0]
        scores.append(dice(pred, gt))
    return scores


RULES = (("no local edits", (), 0.0, 1.0), ("local edits 0.06-0.1, equal", (0.06, 0.1), 0.0, 1.0),
         ("local edits 0.06-0.16, equal", (0.06, 0.1, 0.16), 0.0, 1.0),
         ("local edits 0.06-0.16, preferred", (0.06, 0.1, 0.16), 2.0, 1.0),
         ("local edits 0.06-0.16, preferred, closeness x3", (0.06, 0.1, 0.16), 2.0, 3.0),
         ("local edits 0.06-0.16, preferred, closeness x9", (0.06, 0.1, 0.16), 2.0, 9.0),
         ("local edits 0.03-0.16, preferred, closeness x3", (0.03, 0.06, 0.1, 0.16), 2.0, 3.0))


def choose(predictor, clicks: int) -> list:
    """Mean Dice per click on the training cases under each rule in RULES -> table lines."""
    import casam_core.clicks as P

    shipped = (P.LOCAL_EDIT_FRACTIONS, P.LOCAL_EDIT_BONUS, P.CLOSENESS_WEIGHT)
    cases = list(train_cases(predictor))
    lines = ["", f"Rules tried on {len(cases)} training cases (kvasir_polyp 4, hc18_fetal_head 3, skin_lesion 2, "
             "middle slices of brats_glioma 2 and hippocampus_mri 2 training volumes), `--choose`:", "",
             "| rule | " + " | ".join(f"{i} click{'s' if i > 1 else ''}" for i in range(1, clicks + 1)) +
             " | drops of the mean | worst single step |", "|---|" + "---:|" * (clicks + 2)]
    try:
        for name, fractions, bonus, weight in RULES:
            P.LOCAL_EDIT_FRACTIONS, P.LOCAL_EDIT_BONUS, P.CLOSENESS_WEIGHT = fractions, bonus, weight
            rows = []
            for _, setter, gt in cases:
                setter()
                rows.append(run_case(predictor, gt, MODES[0], clicks))
            mean = np.mean(rows, axis=0)
            drops = sum(mean[i + 1] < mean[i] for i in range(clicks - 1))
            worst = min(r[i + 1] - r[i] for r in rows for i in range(clicks - 1))
            tag = " (shipped)" if (fractions, bonus, weight) == shipped else ""
            lines.append(f"| {name}{tag} | " + " | ".join(f"{v:.3f}" for v in mean) + f" | {drops} | {worst:+.3f} |")
            print(lines[-1], flush=True)
    finally:
        P.LOCAL_EDIT_FRACTIONS, P.LOCAL_EDIT_BONUS, P.CLOSENESS_WEIGHT = shipped
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--choose", action="store_true", help="also run the rules tried on the training cases")
    ap.add_argument("--cache", default=str(REPO / "runs" / ".embeddings"))
    ap.add_argument("--backbone", default="litemedsam", choices=("litemedsam", "mobilesam"))
    ap.add_argument("--out", default=None, help="default benchmarks/results/corrective_clicks[_BACKBONE]_cpu.md")
    args = ap.parse_args(argv)
    if args.choose and args.backbone != "litemedsam":
        ap.error("--choose tunes the box-only click policy: LiteMedSAM only")
    stem = "corrective_clicks" + ("" if args.backbone == "litemedsam" else f"_{args.backbone}")
    args.out = args.out or str(REPO / "benchmarks" / "results" / f"{stem}_cpu.md")
    backbone = build_backbone(args.backbone, device="cpu")
    predictor = CASamPredictor(backbone, disk_cache=args.cache)
    chosen = choose(predictor, args.clicks) if args.choose else []
    table = {m: [] for m in MODES}
    names = []
    for name, setter, gt in cases(predictor):
        setter()
        names.append(name)
        for mode in MODES:
            table[mode].append(run_case(predictor, gt, mode, args.clicks))
            print(name, mode, " ".join(f"{v:.3f}" for v in table[mode][-1]), flush=True)
    head = " | ".join(f"{i} click{'s' if i > 1 else ''}" for i in range(1, args.clicks + 1))
    title = {"litemedsam": "LiteMedSAM", "mobilesam": "MobileSAM"}[args.backbone]
    run = "--choose" if args.choose else f"--backbone {args.backbone}"
    lines = [f"# Corrective clicks (frozen {title}, CPU): Dice after each click", "",
             f"`python benchmarks/corrective_clicks.py {run}`: first click at the object's centre, each next one at "
             "the centre of the largest error region. Target: the mean must not drop from one click to the next.", "",
             f"| case | mode | {head} |", "|---|---|" + "---:|" * args.clicks]
    for mode in MODES:
        for name, row in zip(names, table[mode]):
            lines.append(f"| {name} | {mode} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    verdict = []
    for mode in MODES:
        mean = np.mean(table[mode], axis=0)
        drops = [f"{i + 1} -> {i + 2}" for i in range(len(mean) - 1) if mean[i + 1] < mean[i]]
        lines.append(f"| **mean** | {mode} | " + " | ".join(f"**{v:.3f}**" for v in mean) + " |")
        verdict.append(f"- {mode}: " + ("no drop of the mean (met)" if not drops else
                                       "the mean drops at " + ", ".join(drops) + " (not met)"))
        print(mode, "mean", " ".join(f"{v:.3f}" for v in mean), f"({len(drops)} drops)")
    lines += ["", "Target, on these cases:", ""] + verdict + chosen
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
