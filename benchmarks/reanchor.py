"""Propagation from ONE user box with a learned task: carried blindly vs re-anchored by the
task's structure finder (issue 31), and the re-anchoring rule chosen on validation volumes.

    python benchmarks/reanchor.py [--sets hippocampus_mri,brats_glioma] [--test-volumes 12]

The task is the effort benchmark's "learned from 4 volumes" (``runs/effort/library``,
learned there if missing: the product's ``fast`` recipe, every slice of the first 4 training
volumes). Per structure (label value; BraTS also the tumour core 1+3+4): the box of the
truth on the slice where the structure is largest, segmented with the task and propagated
(``prompts.propagate_masks``) under each rule; 3D Dice against the truth.

Rules (``prompts.ANCHORED_GROWTH``, ``prompts.FINDER_STOPS``, ``reanchor``):
- blind: the box is carried (grown 5 %) from slice to slice, growth limit 1.5x (before);
- finder: each slice's box is the finder's component under the carried box; where the finder
  sees nothing there the carry stops; the growth limit stays 1.5x;
- finder, no growth limit: the same, a finder-placed slice has no growth limit (the default
  since 2026-12-06, chosen here);
- finder, carried where unseen: the finder's box where it sees the structure, else the
  carried box (no finder stop); growth 1.5x;
- finder, carried where unseen, no growth limit.

The rule is chosen on VALIDATION volumes: training volumes the task did not learn from
(hippocampus: training volumes 5-12; BraTS: the 5th training volume). The test volumes
(evenly spaced over the test split) are reported for the chosen rule and the others.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date

import numpy as np

from _common import DATA, REPO, machine  # noqa: E402

import effort  # noqa: E402
import casam_core.prompts as prompts  # noqa: E402
from casam_core import CASamPredictor, build_backbone  # noqa: E402
from casam_core.datasets import read_dataset  # noqa: E402
from casam_core.io import read_image, read_labels  # noqa: E402
from casam_core.metrics import dice  # noqa: E402

RULES = {  # name: (reanchor, ANCHORED_GROWTH, FINDER_STOPS)
    "blind": (False, None, True),
    "finder": (True, None, True),
    "finder, no growth limit": (True, float("inf"), True),
    "finder, carried where unseen": (True, None, False),
    "finder, carried where unseen, no growth limit": (True, float("inf"), False),
}
OUT = REPO / "benchmarks" / "results" / "reanchor_cpu"


def one_box(predictor, layer, gt: np.ndarray, rule: str) -> tuple:
    reanchor, growth, stops = RULES[rule]
    default = prompts.ANCHORED_GROWTH, prompts.FINDER_STOPS
    prompts.ANCHORED_GROWTH, prompts.FINDER_STOPS = growth, stops
    try:
        k = int(gt.sum(axis=(1, 2)).argmax())
        predictor.set_slice(k)
        start = predictor.predict_batch(box=prompts.box_from_mask(gt[k]), task=layer)[0][0, 0]
        out, summary = prompts.propagate_masks(predictor, {k: start}, task=layer, reanchor=reanchor)
    finally:
        prompts.ANCHORED_GROWTH, prompts.FINDER_STOPS = default
    return dice(out, gt), len(summary["reanchored"]), [s["reason"] for s in summary["stops"]]


def run(name: str, predictor, n_test: int) -> dict:
    ds = read_dataset(DATA / name)
    task = f"{name}-4v"
    card = effort._task(predictor, task, lambda: effort._volume_data(name, 4))
    layer = task if card.get("use_alignment", True) else None
    splits = {"validation": ds.cases("train")[4:12], "test": effort._even(ds.cases("test"), n_test)}
    rows = []
    for split, cases in splits.items():
        for case in cases:
            image = read_image(case.image)
            labels = read_labels(case.mask, like=image).array
            predictor.set_volume(image.array)
            for which, gt in effort._structures(name, labels):
                if not gt.any():
                    continue
                row = {"split": split, "case": case.image.name, "structure": which}
                for rule in RULES:
                    d, n_anchored, stops = one_box(predictor, layer, gt, rule)
                    row[rule] = {"dice": round(d, 4), "reanchored": n_anchored, "stops": stops}
                rows.append(row)
                print(f"  {name} {split} {case.image.name} {which}: "
                      + ", ".join(f"{r} {row[r]['dice']:.3f}" for r in RULES), flush=True)
    return {"set": name, "task": task, "rows": rows}


def table(results: list) -> str:
    lines = ["# Propagation from one box with a learned task: blind vs re-anchored by the finder (issue 31)", "",
             f"Machine: {machine()}. Run: `python benchmarks/reanchor.py` (latest {date.today()}). Task: learned "
             "from 4 training volumes (the effort benchmark's). Mean 3D Dice of one true box on the structure's "
             "largest slice, propagated. The rule is chosen on the validation rows (training volumes the task did "
             "not learn from); test rows are reported, not used.", "",
             "| set | split | structures | " + " | ".join(RULES) + " |",
             "|---|---|---:|" + "---:|" * len(RULES)]
    for r in results:
        for split in ("validation", "test"):
            rows = [x for x in r["rows"] if x["split"] == split]
            if rows:
                lines.append(f"| {r['set']} | {split} | {len(rows)} | "
                             + " | ".join(f"{np.mean([x[rule]['dice'] for x in rows]):.3f}" for rule in RULES) + " |")
    val = {rule: np.mean([x[rule]["dice"] for r in results for x in r["rows"] if x["split"] == "validation"])
           for rule in RULES}
    best = max(val, key=val.get)
    lines += ["", "Validation mean over every set's rows: " + ", ".join(f"{k} {v:.3f}" for k, v in val.items())
              + f". Chosen: **{best}**."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default="hippocampus_mri,brats_glioma")
    parser.add_argument("--test-volumes", type=int, default=12)
    parser.add_argument("--cache", default=str(REPO / "runs" / ".embeddings"))
    args = parser.parse_args()
    predictor = CASamPredictor(build_backbone("litemedsam", device="cpu"), disk_cache=args.cache)
    OUT.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.sets.split(","):
        t0 = time.perf_counter()
        r = run(name, predictor, args.test_volumes)
        r.update(date=date.today().isoformat(), machine=machine(), seconds=round(time.perf_counter() - t0, 1))
        (OUT / f"{name}.json").write_text(json.dumps(r, indent=1, default=float))
        results.append(r)
    text = table(results)
    (REPO / "benchmarks" / "results" / "reanchor_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
