"""Is the next case cheaper? The work a simulated user does per case, frozen vs learned vs the
learned task's zero-click start (issue 31).

    python benchmarks/effort.py [--sets all|a,b] [--test-images 20] [--test-volumes 8] [--redo]
                                [--backbone litemedsam|mobilesam]

(another backbone than LiteMedSAM: ``effort_<backbone>/``, ``effort_<backbone>_cpu.md`` and
``runs/effort/library_<backbone>``)

For each set in ../shared/data a task is learned with the product's default recipe (``casam
learn``'s ``fast`` profile; 2D: ``gain_data.training_data``, at most 40 annotated images; 3D: the
first 1, 2 and 4 training volumes, every slice, the effort curve) and kept in
``runs/effort/library`` (a rerun reuses it). Then on the test split (evenly spaced cases):

2D, per object (class sets: one per class; instance sets: the 4 largest per image), the
standard interactive protocol: a simulated user clicks at the centre (the pixel farthest from
the region's edge) of the largest error region, positive in a miss and negative in a leak, each
click decoded with the earlier ones and the last result (SAM's mask_input), at most 20 clicks;
NoC@85 / NoC@90 = clicks until IoU reaches 0.85 / 0.90 (20 when never).
- frozen: the frozen model; learned: the task's features and its click decoding;
- zero-click start: the task's finder places a box on the object (0 interactions when that
  result is already good enough); clicks then correct inside that box.
Also: Dice of the zero-click result (no interaction at all) and of the learned task given the
true box (the ceiling the finder's box is compared with).

3D, per structure (label value; BraTS also the tumour core 1+3+4), interactions until the 3D
Dice reaches 0.9 x the ceiling (the learned task given the true box on every slice), at most 10:
frozen / learned start with ONE box on the slice where the structure is largest, propagated
(``propagate_masks``; with a learned task, re-anchored by its finder since 2026-12-06); every further interaction corrects the slice with the most wrong voxels
(set to the truth, as a brush correction) and propagates again from every corrected slice;
zero-click starts from the task's result (0 interactions) and its corrections propagate from
the corrected slices and the zero-click slices.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import numpy as np

from _common import DATA, REPO, machine  # noqa: E402

from casam_core import CASamPredictor, build_backbone  # noqa: E402
from casam_core.io import read_image, read_labels  # noqa: E402
from casam_core.datasets import read_dataset  # noqa: E402
from casam_core.library import TaskLibrary  # noqa: E402
from casam_core.metrics import dice, iou  # noqa: E402
from casam_core.prompts import box_from_mask, object_masks, propagate_masks  # noqa: E402
from casam_core.training import learn_config, learn_task  # noqa: E402
from casam_core.task_data import TaskData, volume_slices  # noqa: E402
from gain_data import training_data  # noqa: E402

ALL = ["kvasir_polyp", "cxr_lungs", "hc18_fetal_head", "skin_lesion", "covid19_ct_infection", "monuseg_nuclei",
       "hippocampus_mri", "brats_glioma", "drive_vessels", "em_membranes"]
WITH_ROOM = ["hippocampus_mri", "covid19_ct_infection", "monuseg_nuclei", "brats_glioma", "drive_vessels",
             "em_membranes"]
MAX_CLICKS, MAX_VOLUME_STEPS, INSTANCES_PER_IMAGE = 20, 10, 4
RESULTS = REPO / "benchmarks" / "results" / "effort"
LIBRARY = REPO / "runs" / "effort" / "library"
CORE = (1, 3, 4)  # BraTS tumour core


def _even(items: list, n) -> list:
    if n is None or len(items) <= n:
        return list(items)
    return [items[int(k)] for k in np.linspace(0, len(items) - 1, n).round().astype(int)]


def _task(predictor: CASamPredictor, name: str, data_fn) -> dict:
    """Learn (or reuse from the benchmark's library) task ``name``; register it; returns its card."""
    library = TaskLibrary(LIBRARY)
    if name not in library:
        t0 = time.perf_counter()
        task = learn_task(predictor, name, data_fn(), learn_config("fast"),
                          progress=lambda d, t, m: print(f"  {name}: {m}", flush=True) if d == t else None)
        task.card["benchmark_learn_seconds"] = round(time.perf_counter() - t0, 1)
        library.save(task)
    assert predictor.load_tasks(library, [name]) == {}
    return predictor.cards[name]


# ------------------------------------------------------------------ the simulated user (2D)
def next_click(mask: np.ndarray, gt: np.ndarray):
    """(x, y, positive) at the centre of the largest error region, or None without an error."""
    from scipy import ndimage

    best = None
    for region, positive in ((gt & ~mask, True), (mask & ~gt, False)):
        comp, n = ndimage.label(region)
        if not n:
            continue
        sizes = ndimage.sum(region, comp, range(1, n + 1))
        k = int(np.argmax(sizes)) + 1
        if best is None or sizes[k - 1] > best[0]:
            best = (sizes[k - 1], comp == k, positive)
    if best is None:
        return None
    dist = ndimage.distance_transform_edt(np.pad(best[1], 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x), float(y), best[2]


def clicks_to(predictor, z, record, gt, decoding: dict, box=None, start=None, thresholds=(0.85, 0.9)) -> dict:
    """NoC per IoU threshold (MAX_CLICKS when never reached). ``start``: a mask the user has before
    any click (0 interactions if already good enough); ``box``: kept with every click."""
    noc = {}
    mask = start if start is not None else np.zeros_like(gt)
    for t in thresholds:
        if start is not None and iou(mask, gt) >= t:
            noc[t] = 0
    coords, labels, prior = [], [], None
    for n in range(1, MAX_CLICKS + 1):
        if len(noc) == len(thresholds):
            break
        click = next_click(mask, gt)
        if click is None:
            break
        coords.append(click[:2])
        labels.append(1 if click[2] else 0)
        masks, _, low = predictor.predict_features(z, record, np.array(coords), np.array(labels),
                                                   box=None if box is None else np.asarray(box)[None],
                                                   mask_input=prior, **({} if box is not None else decoding))
        mask, prior = masks[0, 0], low[0]
        for t in thresholds:
            if t not in noc and iou(mask, gt) >= t:
                noc[t] = n
    return {str(t): noc.get(t, MAX_CLICKS) for t in thresholds}


def run_flat(name: str, predictor: CASamPredictor, args) -> dict:
    from casam_core.auto import heat_of
    from casam_core.finder import find_objects

    ds = read_dataset(DATA / name)
    card = _task(predictor, name, lambda: training_data(name))
    layer = name if card.get("use_alignment", True) else None
    spec = card["finder"]
    rows = []
    for case in _even(ds.cases("test"), args.test_images):
        image = read_image(case.image)
        gt_labels = read_labels(case.mask, like=image).array
        record = predictor.set_image(image.array)
        objs = object_masks(gt_labels, ds.objects)
        if ds.objects == "instance":
            objs = sorted(objs, key=lambda o: -int(o[1].sum()))[:INSTANCES_PER_IMAGE]
        z_frozen, z_task = predictor.task_features(None, record), predictor.task_features(layer, record)
        found = find_objects(heat_of(predictor, predictor.finders[name], record), spec["outputs"], spec["threshold"],
                             spec.get("objects", "class"))
        auto = predictor.segment_auto(name).labels
        for value, gt in objs:
            gt_box = box_from_mask(gt)
            ceiling = dice(predictor.predict_features(z_task, record, box=gt_box[None])[0][0, 0], gt)
            start_box = _matching_box(found, value, gt_box, ds.objects)
            start = None
            if start_box is not None:
                start = predictor.predict_features(z_task, record, box=start_box[None])[0][0, 0]
            zero = dice(auto == value, gt) if ds.objects == "class" else (dice(start, gt) if start is not None else 0.0)
            rows.append({"case": Path(case.image).name, "object": int(value), "box_dice": ceiling, "zero_dice": zero,
                         "frozen": clicks_to(predictor, z_frozen, record, gt, {}),
                         "learned": clicks_to(predictor, z_task, record, gt, predictor.click_decoding(layer)),
                         "zero_click": clicks_to(predictor, z_task, record, gt, predictor.click_decoding(layer),
                                                 box=start_box, start=start)})
        print(f"  {name}: {case.image.name} done ({len(rows)} objects)", flush=True)
    return {"set": name, "dimensions": 2, "objects": ds.objects, "test_images": len({r["case"] for r in rows}),
            "card": _card_summary(card), "rows": rows}


def _matching_box(found, value: int, gt_box, objects: str):
    """The finder's box for this object: its class's (class sets), or the found box that overlaps
    the object's box most (instance sets, IoU > 0.3), else None."""
    if objects == "class":
        boxes = [o.boxes[0] for o in found if o.label == value]
        return boxes[0] if boxes else None
    best, best_iou = None, 0.3
    for o in found:
        b = o.boxes[0]
        ix = max(0.0, min(b[2], gt_box[2]) - max(b[0], gt_box[0]) + 1)
        iy = max(0.0, min(b[3], gt_box[3]) - max(b[1], gt_box[1]) + 1)
        inter = ix * iy
        area = lambda q: (q[2] - q[0] + 1) * (q[3] - q[1] + 1)  # noqa: E731
        v = inter / (area(b) + area(gt_box) - inter)
        if v > best_iou:
            best, best_iou = b, v
    return best


def _card_summary(card: dict) -> dict:
    return {"use_alignment": card.get("use_alignment"), "finder": card.get("finder"),
            "validation": {k: card["validation"][k] for k in ("dice_zero_shot", "dice_aligned")},
            "seconds": card.get("seconds"), "benchmark_learn_seconds": card.get("benchmark_learn_seconds"),
            "training_files": card.get("training_data", {}).get("files")}


# ------------------------------------------------------------------ 3D
def _volume_data(name: str, n_volumes: int) -> TaskData:
    ds = read_dataset(DATA / name)
    slices, sources = [], []
    for case in ds.cases("train")[:n_volumes]:
        image = read_image(case.image)
        slices += volume_slices(image, read_labels(case.mask, like=image).array, source=case.image.name)
        sources.append(str(case.image))
    return TaskData(slices, ds.objects, {k: v for k, v in ds.labels.items() if k != 0}, ds.modality, sources)


def _structures(name: str, labels: np.ndarray):
    values = [int(v) for v in np.unique(labels) if v]
    out = [(str(v), labels == v) for v in values]
    if name == "brats_glioma":
        out.append(("core", np.isin(labels, CORE)))
    return out


def _pick(labels: np.ndarray, which: str) -> np.ndarray:
    return np.isin(labels, CORE) if which == "core" else labels == int(which)


def true_box_volume(predictor, gt: np.ndarray, task) -> np.ndarray:
    """The volume segmented with the true box on every slice where ``gt`` has the structure (the
    ceiling a one-box start is compared with)."""
    out = np.zeros_like(gt)
    for k in np.nonzero(gt.any(axis=(1, 2)))[0]:
        predictor.set_slice(int(k))
        out[k] = predictor.predict_batch(box=box_from_mask(gt[k]), task=task)[0][0, 0]
    return out


def volume_steps(predictor, layer, gt, ceiling, start=None) -> dict:
    """Interactions until 3D Dice >= 0.9 x ceiling (MAX_VOLUME_STEPS + 1 when never)."""
    target = 0.9 * ceiling
    anchors = {}
    if start is None:
        k = int(gt.sum(axis=(1, 2)).argmax())
        predictor.set_slice(k)
        anchors[k] = predictor.predict_batch(box=box_from_mask(gt[k]), task=layer)[0][0, 0]
        result = propagate_masks(predictor, anchors, task=layer)[0]
        steps = 1
    else:
        result, steps = start.copy(), 0
    base = {k: start[k] for k in range(start.shape[0]) if start[k].any()} if start is not None else {}
    trace = [dice(result, gt)]
    while trace[-1] < target and steps < MAX_VOLUME_STEPS:
        wrong = (result != gt).sum(axis=(1, 2))
        k = int(wrong.argmax())
        anchors[k] = gt[k].copy()
        steps += 1
        merged = {j: m for j, m in base.items() if j not in anchors}
        merged.update(anchors)
        if any(m.any() for m in merged.values()):
            result = propagate_masks(predictor, merged, task=layer)[0]
        else:
            result = np.zeros_like(gt)
        trace.append(dice(result, gt))
    return {"steps": steps if trace[-1] >= target else MAX_VOLUME_STEPS + 1, "dice": [round(d, 4) for d in trace]}


def run_volumes(name: str, predictor: CASamPredictor, args) -> dict:
    ds = read_dataset(DATA / name)
    tests = _even(ds.cases("test"), args.test_volumes)
    curve = []
    for n_volumes in (1, 2, 4):
        if n_volumes > len(ds.cases("train")):
            continue
        task_name = f"{name}-{n_volumes}v"
        card = _task(predictor, task_name, lambda: _volume_data(name, n_volumes))
        layer = task_name  # as the product passes it: decoded with its layer if that is used, re-anchored by its finder
        rows = []
        for case in tests:
            image = read_image(case.image)
            labels = read_labels(case.mask, like=image).array
            predictor.set_volume(image.array)
            t0 = time.perf_counter()
            predictor.embed_slices()
            embed_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            auto = predictor.segment_auto(task_name)
            auto_s = time.perf_counter() - t0
            choice = predictor.choose_task("auto")
            for which, gt in _structures(name, labels):
                if not gt.any():
                    continue
                ceiling = dice(true_box_volume(predictor, gt, layer), gt)
                zero = _pick(auto.labels, which)
                row = {"case": case.image.name, "structure": which, "ceiling": ceiling, "zero_dice": dice(zero, gt),
                       "routed_to_task": choice.decision == task_name, "embed_s": round(embed_s, 2),
                       "auto_s": round(auto_s, 2)}
                for mode, use_layer, start in (("frozen", None, None), ("learned", layer, None),
                                               ("zero_click", layer, zero)):
                    row[mode] = volume_steps(predictor, use_layer, gt, ceiling, start)
                rows.append(row)
                print(f"  {task_name}: {case.image.name} {which}: ceiling {ceiling:.3f} zero-click "
                      f"{row['zero_dice']:.3f} steps frozen {row['frozen']['steps']} learned "
                      f"{row['learned']['steps']} zero-click {row['zero_click']['steps']}", flush=True)
        curve.append({"volumes": n_volumes, "task": task_name, "card": _card_summary(card), "rows": rows})
    return {"set": name, "dimensions": 3, "test_volumes": len(tests), "of": len(ds.cases("test")), "curve": curve}


# ------------------------------------------------------------------ table
def _mean(values):
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def table(results: dict) -> str:
    lines = ["# Work per case: frozen vs learned vs zero-click start (issue 31)", "",
             f"Machine: {machine()}. Run: `python benchmarks/effort.py` (latest {date.today()}). Tasks learned "
             "with the product's default recipe (`fast`). The protocol is in the script's docstring.", "",
             "## 2D: clicks per object (NoC, at most 20), test split", "",
             "| set | objects | NoC@85 frozen | learned | zero-click start | NoC@90 frozen | learned | zero-click start "
             "| zero-click Dice | learned box Dice | zero-click / box |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ALL:
        r = results.get(name)
        if r is None or r["dimensions"] != 2:
            continue
        rows = r["rows"]
        noc = {(m, t): _mean(x[m][t] for x in rows) for m in ("frozen", "learned", "zero_click") for t in ("0.85", "0.9")}
        z, b = _mean(x["zero_dice"] for x in rows), _mean(x["box_dice"] for x in rows)
        lines.append(f"| {name} | {len(rows)} | {noc['frozen', '0.85']:.2f} | {noc['learned', '0.85']:.2f} | "
                     f"{noc['zero_click', '0.85']:.2f} | {noc['frozen', '0.9']:.2f} | {noc['learned', '0.9']:.2f} | "
                     f"{noc['zero_click', '0.9']:.2f} | {z:.3f} | {b:.3f} | {z / b if b else float('nan'):.2f} |")
    lines += ["", "## 3D: interactions per structure until 3D Dice >= 0.9 x the true-box ceiling (at most 10; 11 = "
              "never), and the effort curve", "",
              "| set | learned from | structures | routed to the task | ceiling | zero-click 3D Dice | frozen | learned "
              "| zero-click start | embed s / volume | zero-click s / volume |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ALL:
        r = results.get(name)
        if r is None or r["dimensions"] != 3:
            continue
        for point in r["curve"]:
            rows = point["rows"]
            routed = {x["case"]: x["routed_to_task"] for x in rows}
            per_case = {x["case"]: (x["embed_s"], x["auto_s"]) for x in rows}
            lines.append(
                f"| {name} | {point['volumes']} volume{'s' if point['volumes'] > 1 else ''} | {len(rows)} | "
                f"{sum(routed.values())}/{len(routed)} | {_mean(x['ceiling'] for x in rows):.3f} | "
                f"{_mean(x['zero_dice'] for x in rows):.3f} | {_mean(x['frozen']['steps'] for x in rows):.2f} | "
                f"{_mean(x['learned']['steps'] for x in rows):.2f} | {_mean(x['zero_click']['steps'] for x in rows):.2f} | "
                f"{_mean(v[0] for v in per_case.values()):.1f} | {_mean(v[1] for v in per_case.values()):.1f} |")
        lines.append(f"| ({name} measured {r['date']}"
                     + (", before propagation was re-anchored by the finder (2026-12-06)" if r["date"] < "2026-12-06"
                        else "") + ") |||||||||||")
        core = [x for p in r["curve"] for x in p["rows"] if x["structure"] == "core"]
        if core:
            lines.append("")
            lines.append(f"{name} tumour core (labels 1+3+4), zero-click 3D Dice by training volumes: " + ", ".join(
                f"{p['volumes']}: {_mean(x['zero_dice'] for x in p['rows'] if x['structure'] == 'core'):.3f}"
                for p in r["curve"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default="all")
    parser.add_argument("--test-images", type=int, default=20)
    parser.add_argument("--test-volumes", type=int, default=8)
    parser.add_argument("--cache", default=str(REPO / "runs" / ".embeddings"))
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--backbone", default="litemedsam", choices=("litemedsam", "mobilesam"))
    args = parser.parse_args()
    global RESULTS, LIBRARY
    suffix = "" if args.backbone == "litemedsam" else f"_{args.backbone}"
    RESULTS, LIBRARY = RESULTS.with_name(RESULTS.name + suffix), LIBRARY.with_name(LIBRARY.name + suffix)
    sets = ALL if args.sets == "all" else args.sets.split(",")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        predictor = CASamPredictor(build_backbone(args.backbone, device="cpu"), disk_cache=args.cache)
        for name in sets:
            out = RESULTS / f"{name}.json"
            if out.exists() and not args.redo:
                continue
            t0 = time.perf_counter()
            ds = read_dataset(DATA / name)
            result = (run_volumes if ds.dimensions == 3 else run_flat)(name, predictor, args)
            result.update(date=date.today().isoformat(), machine=machine(),
                          seconds=round(time.perf_counter() - t0, 1))
            out.write_text(json.dumps(result, indent=1, default=float))
            print(f"{name}: done in {result['seconds']:.0f} s", flush=True)
    results = {p.stem: json.loads(p.read_text()) for p in RESULTS.glob("*.json")}
    text = table(results).replace("(issue 31)", f"(issue 31; {args.backbone})", 1)
    (REPO / "benchmarks" / "results" / f"effort{suffix}_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
