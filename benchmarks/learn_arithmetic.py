"""Learning in bfloat16 or float32: held-out (validation) Dice of the product's recipe, on
validation images carved from the train split (never the test split).

    python benchmarks/learn_arithmetic.py [--sets hippocampus_mri,covid19_ct_infection,...]
                                          [--out benchmarks/results/learn_arithmetic_cpu.md]
    python benchmarks/learn_arithmetic.py --table-from benchmarks/results/learn_arithmetic_cpu.jsonl
                                          # the table again from the JSON lines a run printed

For each set, a task is learned twice from the same annotated data (``gain_data.training_data``,
40 images or slices) with ``casam learn``'s ``fast`` recipe (its 120 s time budget), once with
the learning step's forward pass in float32 and once in bfloat16 autocast
(``training.learning_arithmetic``); inference (the held-out checks) runs the same way in both.
Reported: steps done in the budget, the held-out Dice of the frozen model and of the kept layer,
and the click Dice of the chosen click decoding. One JSON line per learned task goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from _common import REPO, machine  # noqa: E402

from casam_core import CASamPredictor, build_backbone  # noqa: E402
from casam_core.training import learn_config, learn_task  # noqa: E402
from gain_data import training_data  # noqa: E402

SETS = "hippocampus_mri,covid19_ct_infection,em_membranes,hc18_fetal_head"


def run(names, backbone):
    for name in names:
        data = training_data(name, cap=40)
        predictor = CASamPredictor(backbone)  # one memory cache: both runs learn from the same embeddings
        for dtype in (None, torch.bfloat16):
            backbone.layer_dtype = dtype
            t = time.perf_counter()
            card = learn_task(predictor, name, data, learn_config("fast")).card
            v = card["validation"]
            point = v["point_dice"]
            yield {"set": name, "arith": card["training"]["arithmetic"], "steps": card["training"]["steps"],
                   "kept": card["training"]["kept_step"], "train_s": card["seconds"]["training"],
                   "val_frozen": v["dice_zero_shot"], "val_aligned": v["dice_aligned"],
                   "point": point, "history": v["history"], "wall": round(time.perf_counter() - t)}


def table(rows, note: str) -> str:
    by = {(r["set"], r["arith"]): r for r in rows}
    names = list(dict.fromkeys(r["set"] for r in rows))
    lines = ["# Learning in float32 or bfloat16 (held-out images carved from train)", "", note, "",
             "| set | held-out frozen | float32: steps, held-out Dice | bfloat16: steps, held-out Dice | "
             "difference (points) |", "|---|---:|---:|---:|---:|"]
    diffs = []
    for name in names:
        a, b = by[(name, "float32")], by[(name, "bfloat16")]
        d = 100 * (b["val_aligned"] - a["val_aligned"])
        diffs.append(d)
        lines.append(f"| {name} | {a['val_frozen']:.3f} | {a['steps']}, {a['val_aligned']:.3f} | "
                     f"{b['steps']}, {b['val_aligned']:.3f} | {d:+.1f} |")
    lines.append(f"| mean | | | | {sum(diffs) / len(diffs):+.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default=SETS)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "learn_arithmetic_cpu.md"))
    ap.add_argument("--table-from", help="build the table from the JSON lines of a run's log")
    args = ap.parse_args()
    note = (f"Machine: {machine()}. Run: `python benchmarks/learn_arithmetic.py` on {time.strftime('%Y-%m-%d')}; "
            "the `fast` recipe (120 s of training), the same data, embeddings and inference for both.")
    if args.table_from:
        rows = [json.loads(line) for line in Path(args.table_from).read_text().splitlines() if line.startswith("{")]
    else:
        backbone = build_backbone("litemedsam", device="cpu")
        rows = []
        for row in run(args.sets.split(","), backbone):
            print(json.dumps(row), flush=True)
            rows.append(row)
    text = table(rows, note)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
