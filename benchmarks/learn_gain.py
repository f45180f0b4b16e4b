"""Does learning pay? Frozen vs learned Dice on each set's test split, with GT boxes and with
one click per object, and what learning costs on this machine.

    python benchmarks/learn_gain.py [--sets all|a,b,...] [--cap 40] [--max-test-volumes N]
                                    [--backbone litemedsam|mobilesam] [--device cpu]

Results: ``benchmarks/results/learn_gain/`` and ``learn_gain_cpu.md`` for LiteMedSAM (the
default), ``learn_gain_<backbone>/`` and ``learn_gain_<backbone>_cpu.md`` for another backbone.

For each set in ../shared/data:
- learn a task with the product's default recipe (``casam learn``'s ``fast`` profile) from
  ``gain_data.training_data``: the train split, capped at 40 annotated images or slices
  (3D sets: slices from 4 volumes), on a COLD embedding cache (a fresh predictor, no disk
  cache), timing embedding, training and router;
- zero-click: the learned task's finder and decoder with no prompt (``segment_auto``, the task
  forced; a volume segmented whole), scored on the same test images (3D: the slices with
  foreground) per object: each label value of a class set, the union of the objects of an
  instance set;
- evaluate the frozen model and the learned task (the task forced, as the product uses it:
  a task whose layer lost to frozen on its held-out images decodes with frozen features) on
  the test split with ``casam eval``'s two prompt modes: the GT box of each object, and ONE
  positive click per object at its pixel nearest the centroid, no box (a learned layer that
  learned clicks decodes it once; the frozen box-trained LiteMedSAM needs the box search).
Test embeddings go through a disk cache (``--cache``) so the four evaluations and reruns
embed each test image once. Each set's result is one JSON file; a rerun skips the sets
already done (``--redo`` to recompute). The table is rebuilt from the JSON files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from datetime import date
from pathlib import Path

import numpy as np

from _common import DATA, REPO, machine  # noqa: E402

from casam_core import CASamPredictor, build_backbone  # noqa: E402
from casam_core.evaluate import evaluate_dataset  # noqa: E402
from casam_core.io import read_image, read_labels  # noqa: E402
from casam_core.datasets import read_dataset  # noqa: E402
from casam_core.images import take_slice  # noqa: E402
from casam_core.metrics import dice  # noqa: E402
from casam_core.training import learn_config, learn_task  # noqa: E402
from gain_data import training_data  # noqa: E402

ALL = ["kvasir_polyp", "cxr_lungs", "hc18_fetal_head", "skin_lesion", "covid19_ct_infection", "monuseg_nuclei",
       "hippocampus_mri", "brats_glioma", "drive_vessels", "em_membranes"]
CLICKS = {"click_box": "once, as a task-sized box", "direct": "once, as a point", "default": "box search"}
WITH_ROOM = ["hippocampus_mri", "covid19_ct_infection", "monuseg_nuclei", "brats_glioma", "drive_vessels",
             "em_membranes"]


def _even(items: list, n) -> list:
    if n is None or len(items) <= n:
        return list(items)
    return [items[int(k)] for k in np.linspace(0, len(items) - 1, n).round().astype(int)]


def test_split(name: str, max_volumes):
    """The set's Dataset with its test split (3D sets: ``max_volumes`` evenly spaced volumes)."""
    ds = read_dataset(DATA / name)
    test = ds.cases("test")
    if ds.dimensions == 3:
        test = _even(test, max_volumes)
    return dataclasses.replace(ds, splits={**ds.splits, "test": test})


def prewarm(name: str, backbone, args) -> None:
    """Embed the test images (3D: the slices with foreground) into the disk cache, as the
    evaluation will, so that a later run only decodes."""
    from casam_core.io import read_image, read_labels
    from casam_core.images import take_slice

    ev = CASamPredictor(backbone, disk_cache=args.cache)
    for case in test_split(name, args.max_test_volumes).cases("test"):
        image = read_image(case.image)
        if not image.is_volume:
            ev.set_image(image.array)
            continue
        labels = read_labels(case.mask, like=image).array
        ev.set_volume(image.array, axis=0)
        ev.embed_slices([k for k in range(labels.shape[0]) if take_slice(labels, k, 0).any()])
    print(f"{name}: test images embedded ({ev.encoder_calls} new)", flush=True)


def zero_click(ev: CASamPredictor, ds, task: str) -> dict:
    """Mean Dice of the task's zero-click result over the test images (3D: slices with foreground)."""
    per_image, seconds = [], 0.0
    for case in ds.cases("test"):
        image = read_image(case.image)
        labels = read_labels(case.mask, like=image).array
        t = time.perf_counter()
        if image.is_volume:
            ev.set_volume(image.array, axis=0)
        else:
            ev.set_image(image.array)
        auto = ev.segment_auto(task).labels
        seconds += time.perf_counter() - t
        pairs = ([(take_slice(auto, k, 0), take_slice(labels, k, 0)) for k in range(labels.shape[0])]
                 if image.is_volume else [(auto, labels)])
        for a, g in pairs:
            if not g.any():
                continue
            if ds.objects == "instance":
                per_image.append(dice(a > 0, g > 0))
            else:
                per_image.append(float(np.mean([dice(a == v, g == v) for v in np.unique(g) if v])))
    return {"dice": float(np.mean(per_image)), "n_images": len(per_image), "seconds": round(seconds, 1)}


def run_set(name: str, backbone, args) -> dict:
    data = training_data(name, cap=args.cap)
    cold = CASamPredictor(backbone)  # no disk cache: every training image through the encoder
    t0 = time.perf_counter()
    task = learn_task(cold, name, data, learn_config("fast"),
                      progress=lambda d, t, m: print(f"  {name}: {m}", flush=True) if d == t else None)
    wall = time.perf_counter() - t0
    card = task.card
    ds = test_split(name, args.max_test_volumes)
    test = ds.cases("test")
    ev = CASamPredictor(backbone, disk_cache=args.cache)
    ev.add_task(name, task.layer if task.use_alignment else None, task.vae, task.tau, card, task.finder)
    scores = {"zero_click": zero_click(ev, ds, name)}
    print(f"  {name}: zero-click Dice {scores['zero_click']['dice']:.4f}", flush=True)
    for prompt in ("box", "point"):
        for mode, which in (("frozen", "none"), ("learned", name)):
            t = time.perf_counter()
            r = evaluate_dataset(ev, ds, split="test", task=which, prompt=prompt)
            scores[f"{mode}_{prompt}"] = {"dice": r["dice"], "iou": r["iou"], "biou": r["biou"],
                                          "n_images": r["n_images"], "seconds": round(time.perf_counter() - t, 1)}
            print(f"  {name}: {mode} {prompt} Dice {r['dice']:.4f} ({r['n_images']} images)", flush=True)
    s = card["seconds"]
    return {
        "set": name, "dimensions": ds.dimensions, "objects": ds.objects,
        "train": {"annotated": len(data.slices), "files": len(data.sources), "held_out": card["validation"]["images"]},
        "test": {"cases": len(test), "of": len(read_dataset(DATA / name).cases("test")),
                 "images": scores["frozen_box"]["n_images"]},
        "learn_seconds": {"embedding": s["embedding"], "training": s["training"],
                          "validation_and_router": round(s["total"] - s["embedding"] - s["training"], 1),
                          "total": round(wall, 1)},
        "steps": card["training"]["steps"], "kept_step": card["training"]["kept_step"],
        "steps_per_s": round(card["training"]["steps"] / max(s["training"], 1e-9), 3),
        "use_alignment": card["use_alignment"], "point_prompts": card["point_prompts"],
        "held_out": {k: card["validation"][k] for k in ("dice_zero_shot", "dice_aligned", "point_dice", "history")},
        "scores": scores, "recipe": card["training"], "date": date.today().isoformat(), "machine": machine(),
    }


def _zero(scores: dict, box: float) -> str:
    if "zero_click" not in scores:  # sets run before the finder existed
        return "- | -"
    z = scores["zero_click"]["dice"]
    return f"{z:.3f} | {z / box if box else float('nan'):.2f}"


def table(results: dict, args) -> str:
    rows = [results[n] for n in ALL if n in results]
    first = rows[0]["machine"] if rows else machine()
    elsewhere = {}  # sets run on another machine than the first set's (a rerun of some sets)
    for r in rows:
        if r["machine"] != first:
            elsewhere.setdefault(r["machine"], []).append(f"{r['set']} ({r['date']})")
    where = first + "".join(f"; {', '.join(sets)} on {m}" for m, sets in elsewhere.items())
    lines = [f"# Learning pays? Frozen vs learned on each test split ({args.backbone}, CPU)", "",
             f"Machine: {where}. Run: `python benchmarks/learn_gain.py"
             f"{'' if args.backbone == 'litemedsam' else ' --backbone ' + args.backbone}` "
             f"(latest set {max((r['date'] for r in rows), default='-')}). Recipe: `casam learn`'s default "
             f"(`fast` profile) from at most {args.cap} annotated training images or slices (3D: 4 volumes), "
             "cold embedding cache. Learned = the task forced, as the product decodes it (a task whose layer "
             "lost to frozen on its held-out images uses frozen features).", "",
             "| set | test images | frozen box | learned box | gain | frozen click | learned click | click / box "
             "(learned) | zero-click | zero-click / box | layer used | clicks decoded | learn s (embed + train + "
             "val/router/finder) | steps/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for r in rows:
        sc = r["scores"]
        fb, lb, fp, lp = (sc[k]["dice"] for k in ("frozen_box", "learned_box", "frozen_point", "learned_point"))
        t = r["learn_seconds"]
        part = "" if r["test"]["cases"] == r["test"]["of"] else f" ({r['test']['cases']} of {r['test']['of']} volumes)"
        lines.append(
            f"| {r['set']} | {r['test']['images']}{part} | {fb:.3f} | {lb:.3f} | {100 * (lb - fb):+.1f} | {fp:.3f} | "
            f"{lp:.3f} | {lp / lb if lb else float('nan'):.2f} | {_zero(sc, lb)} | {'yes' if r['use_alignment'] else 'no (lost on held-out)'} | "
            f"{CLICKS.get(r['point_prompts'], 'box search' if args.backbone == 'litemedsam' else 'as points')} | {t['total']:.0f} ({t['embedding']:.0f} + "
            f"{t['training']:.0f} + {t['validation_and_router']:.0f}) | {r['steps_per_s']:.2f} |")
    room = [r for r in rows if r["set"] in WITH_ROOM]
    gains = {r["set"]: 100 * (r["scores"]["learned_box"]["dice"] - r["scores"]["frozen_box"]["dice"]) for r in rows}
    lines += ["", "Targets (gains in Dice points):", ""]
    if room:
        mean = float(np.mean([gains[r["set"]] for r in room]))
        lines.append(f"- box, mean gain on the sets with room ({len(room)} of 6 done): {mean:+.1f} "
                     f"({'met' if mean >= 5 and len(room) == 6 else 'not met' if len(room) == 6 else 'open'}; target +5)")
        low = [f"{r['set']} {gains[r['set']]:+.1f}" for r in room if gains[r["set"]] < 1]
        lines.append(f"- box, each set with room at least +1: {'met' if not low else 'not met: ' + ', '.join(low)}")
    worse = [f"{n} {g:+.1f}" for n, g in gains.items() if g < -0.5]
    lines.append(f"- box, no set below frozen - 0.5: {'met' if not worse else 'not met: ' + ', '.join(worse)}")
    ok = [r["set"] for r in rows if r["scores"]["learned_point"]["dice"] >= 0.9 * r["scores"]["learned_box"]["dice"]]
    lines.append(f"- one click at least 0.9 x box Dice (learned): {len(ok)} of {len(rows)} sets "
                 f"({', '.join(ok) or 'none'}); target 8 of 10")
    zc = [r for r in rows if "zero_click" in r["scores"]]
    ok = [r["set"] for r in zc if r["scores"]["zero_click"]["dice"] >= 0.9 * r["scores"]["learned_box"]["dice"]]
    lines.append(f"- zero-click at least 0.9 x box Dice (learned): {len(ok)} of {len(zc)} sets measured "
                 f"({', '.join(ok) or 'none'}); target 6 of 10")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="all")
    ap.add_argument("--cap", type=int, default=40)
    ap.add_argument("--max-test-volumes", type=int, default=None,
                    help="3D sets: evaluate this many evenly spaced test volumes (default all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbone", default="litemedsam", choices=("litemedsam", "mobilesam"))
    ap.add_argument("--cache", default=str(REPO / "runs" / ".embeddings"))
    ap.add_argument("--results", default=None, help="default benchmarks/results/learn_gain[_BACKBONE]")
    ap.add_argument("--out", default=None, help="default benchmarks/results/learn_gain[_BACKBONE]_cpu.md")
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--prewarm", action="store_true", help="only embed the test images into the cache")
    args = ap.parse_args()
    stem = "learn_gain" + ("" if args.backbone == "litemedsam" else f"_{args.backbone}")
    args.results = args.results or str(REPO / "benchmarks" / "results" / stem)
    args.out = args.out or str(REPO / "benchmarks" / "results" / f"{stem}_cpu.md")
    names = ALL if args.sets == "all" else args.sets.split(",")
    res_dir = Path(args.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    backbone = build_backbone(args.backbone, device=args.device)
    if args.prewarm:
        for name in names:
            prewarm(name, backbone, args)
        return
    for name in names:
        path = res_dir / f"{name}.json"
        if path.is_file() and not args.redo:
            continue
        print(f"{name}: learning and evaluating", flush=True)
        result = run_set(name, backbone, args)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)
    results = {p.stem: json.loads(p.read_text()) for p in sorted(res_dir.glob("*.json"))}
    text = table(results, args)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
