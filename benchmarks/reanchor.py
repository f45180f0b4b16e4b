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
- finder, carried where unseen, no growth limit;
- finder, no growth limit, carried where unsure: where the decoder's IoU estimate for the
  finder's box is under 0.5, the carried box is decoded on that slice instead of stopping
  (``prompts.UNSURE_CARRIED``, added 2026-12-07).

Carried (blind) runs read ``min_score`` on the task's scale (``prompts.SCORE_CALIBRATION``,
added 2026-12-07 later: the layer lowers the decoder's IoU estimates; re-anchored runs keep it
as it is); "blind, min_score uncalibrated" is the blind rule as it ran before.

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

RULES = {  # name: (reanchor, ANCHORED_GROWTH, FINDER_STOPS, UNSURE_CARRIED, SCORE_CALIBRATION); without the
    # agreement check (AGREEMENT 0)
    "blind": (False, None, True, False, True),
    "finder": (True, None, True, False, True),
    "finder, no growth limit": (True, float("inf"), True, False, True),
    "finder, carried where unseen": (True, None, False, False, True),
    "finder, carried where unseen, no growth limit": (True, float("inf"), False, False, True),
    "finder, no growth limit, carried where unsure": (True, float("inf"), True, True, True),
    "blind, min_score uncalibrated": (False, None, True, False, False),
}
UNSURE = "finder, no growth limit, carried where unsure"
# without --all-rules: the rules the agreement check chooses between, and blind without the score calibration
RUN = ["blind", "finder, no growth limit", UNSURE, "blind, min_score uncalibrated"]
GATES = {"finder, no growth limit": "agreement >= {t}", UNSURE: "unsure carried, agreement >= {t}"}  # rule: column
THRESHOLDS = (0.3, 0.5, 0.7)  # candidate prompts.AGREEMENT values
OUT = REPO / "benchmarks" / "results" / "reanchor_cpu"
# the default since 2026-12-07 (latest): blind where the task's card says so (``propagation.reanchor``, chosen on its
# held-out volume), else UNSURE gated at prompts.AGREEMENT
CHOICE = "the task's own choice, then the check (default)"


def one_box(predictor, layer, gt: np.ndarray, rule: str) -> tuple:
    reanchor, growth, stops, unsure, calibrated = RULES[rule]
    default = (prompts.ANCHORED_GROWTH, prompts.FINDER_STOPS, prompts.AGREEMENT, prompts.UNSURE_CARRIED,
               prompts.SCORE_CALIBRATION)
    (prompts.ANCHORED_GROWTH, prompts.FINDER_STOPS, prompts.AGREEMENT, prompts.UNSURE_CARRIED,
     prompts.SCORE_CALIBRATION) = growth, stops, 0.0, unsure, calibrated
    try:
        k = int(gt.sum(axis=(1, 2)).argmax())
        predictor.set_slice(k)
        start = predictor.predict_batch(box=prompts.box_from_mask(gt[k]), task=layer)[0][0, 0]
        out, summary = prompts.propagate_masks(predictor, {k: start}, task=layer, reanchor=reanchor)
    finally:
        (prompts.ANCHORED_GROWTH, prompts.FINDER_STOPS, prompts.AGREEMENT, prompts.UNSURE_CARRIED,
         prompts.SCORE_CALIBRATION) = default
    return dice(out, gt), len(summary["reanchored"]), [s["reason"] for s in summary["stops"]]


def agreement(predictor, layer, gt: np.ndarray) -> float:
    """``prompts.finder_agreement`` on the slice the user boxes (the task's mask of the true box)."""
    k = int(gt.sum(axis=(1, 2)).argmax())
    predictor.set_slice(k)
    start = predictor.predict_batch(box=prompts.box_from_mask(gt[k]), task=layer)[0][0, 0]
    return prompts.finder_agreement(predictor, layer, k, start) if start.any() else 0.0


def gated(row: dict, threshold: float, rule: str) -> float:
    """The Dice with the agreement check at ``threshold``: finder ``rule`` where it agrees, else blind
    (the same propagation as those rules' runs: the check only chooses between them)."""
    return row[rule]["dice"] if row["agreement"] >= threshold else row["blind"]["dice"]


def run(name: str, predictor, n_test: int, rules) -> dict:
    ds = read_dataset(DATA / name)
    task = f"{name}-4v"
    card = effort._task(predictor, task, lambda: effort._volume_data(name, 4))
    layer = task if card.get("use_alignment", True) else None
    # the rules below are forced; the task's own choice (made on its held-out volume while it learned) is a column
    choice = predictor.cards[task].pop("propagation", None) or {}
    reanchors = choice.get("reanchor", True)
    print(f"  {task}: its held-out volume chose {'re-anchored' if reanchors else 'blind'} ({choice})", flush=True)
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
                row = {"split": split, "case": case.image.name, "structure": which,
                       "agreement": round(agreement(predictor, layer, gt), 4)}
                for rule in rules:
                    d, n_anchored, stops = one_box(predictor, layer, gt, rule)
                    row[rule] = {"dice": round(d, 4), "reanchored": n_anchored, "stops": stops}
                rows.append(row)
                print(f"  {name} {split} {case.image.name} {which}: agreement {row['agreement']:.2f} "
                      + ", ".join(f"{r} {row[r]['dice']:.3f}" for r in rules), flush=True)
    predictor.cards[task]["propagation"] = choice
    return {"set": name, "task": task, "propagation": choice, "rows": rows}


def table(results: list) -> str:
    rules = [r for r in RULES if all(r in x for res in results for x in res["rows"])]
    gates = {form.format(t=t): (rule, t) for rule, form in GATES.items() if rule in rules for t in THRESHOLDS}
    reanchors = {r["set"]: r.get("propagation", {}).get("reanchor", True) for r in results}
    with_choice = UNSURE in rules and "blind" in rules

    def score(row: dict, column: str, name: str) -> float:
        if column == CHOICE:  # the product's default: the task's choice, then the check
            return gated(row, prompts.AGREEMENT, UNSURE) if reanchors[name] else row["blind"]["dice"]
        return row[column]["dice"] if column in rules else gated(row, gates[column][1], gates[column][0])

    columns = rules + ([CHOICE] if with_choice else []) + list(gates)
    lines = ["# Propagation from one box with a learned task: blind vs re-anchored by the finder (issue 31)", "",
             f"Machine: {machine()}. Run: `python benchmarks/reanchor.py` (latest {date.today()}). Task: learned "
             "from 4 training volumes (the effort benchmark's). Mean 3D Dice of one true box on the structure's "
             "largest slice, propagated. The rules run without the agreement check; \"agreement >= t\": "
             "'finder, no growth limit' (\"unsure carried, agreement >= t\": the last rule) where the finder's box "
             "on the boxed slice has IoU >= t with the user's, else blind "
             "(`prompts.AGREEMENT`). \"" + CHOICE + "\": blind where the task chose it on its held-out volume "
             f"while it learned, else the last rule checked at {prompts.AGREEMENT} (the cards' `propagation`: "
             + "; ".join(
                 f"{r['task']} {'re-anchored' if r.get('propagation', {}).get('reanchor', True) else 'blind'}"
                 for r in results) + "). The rule is chosen on the validation rows (training volumes the task did "
             "not learn from); test rows are reported, not used.", "",
             f"| set | split | structures | finder agrees (IoU >= {THRESHOLDS[0]}) | " + " | ".join(columns) + " |",
             "|---|---|---:|---:|" + "---:|" * len(columns)]
    for r in results:
        for split in ("validation", "test"):
            rows = [x for x in r["rows"] if x["split"] == split]
            if rows:
                agree = sum(x["agreement"] >= THRESHOLDS[0] for x in rows)
                lines.append(f"| {r['set']} | {split} | {len(rows)} | {agree}/{len(rows)} | "
                             + " | ".join(f"{np.mean([score(x, c, r['set']) for x in rows]):.3f}" for c in columns)
                             + " |")
    val = {c: np.mean([score(x, c, r["set"]) for r in results for x in r["rows"] if x["split"] == "validation"])
           for c in columns}
    best = max(val, key=val.get)
    lines += ["", "Validation mean over every set's rows: " + ", ".join(f"{k} {v:.3f}" for k, v in val.items())
              + f". Chosen: **{best}**."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default="hippocampus_mri,brats_glioma")
    parser.add_argument("--test-volumes", type=int, default=12)
    parser.add_argument("--all-rules", action="store_true", help="all six rules (default: blind and the two finder rules the check gates)")
    parser.add_argument("--cache", default=str(REPO / "runs" / ".embeddings"))
    parser.add_argument("--table-only", action="store_true", help="the table again from the saved runs")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rules = list(RULES) if args.all_rules else RUN
    predictor = None if args.table_only else CASamPredictor(build_backbone("litemedsam", device="cpu"),
                                                            disk_cache=args.cache)
    for name in [] if args.table_only else args.sets.split(","):
        t0 = time.perf_counter()
        r = run(name, predictor, args.test_volumes, rules)
        r.update(date=date.today().isoformat(), machine=machine(), seconds=round(time.perf_counter() - t0, 1))
        (OUT / f"{name}.json").write_text(json.dumps(r, indent=1, default=float))
    results = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    text = table(results)
    (REPO / "benchmarks" / "results" / "reanchor_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
