"""A learned task's Alignment Layer in use, in float32 or in bfloat16 autocast (the default where the
decoder runs in bfloat16: ``alignment.run_layer``, ``Backbone.layer_dtype``): its speed, and what it
changes in the results, in one run.

    python benchmarks/layer_arithmetic.py [--hippocampus-volumes 12] [--timing-rounds 2]

Learning's forward pass already runs the layer in bfloat16 autocast on such a CPU
(``training.learning_arithmetic``); until 2026-12-07 use and the held-out checks ran it in float32.
The tasks are the effort benchmark's (``runs/effort/library``; learned there with the default
recipe if missing). Measured, both arithmetics on the same embeddings:
1. the layer per slice (a real slice's embedding, the two interleaved, median of 7);
2. the zero-click cost on the 155-slice BraTS test volume (``brats_glioma-1v``): the embedding
   (cold, no disk cache) and a first zero-click call with each arithmetic (the aligned features
   dropped before each; interleaved, ``--timing-rounds`` each, the fastest kept), as a share of
   the embedding time (issue 31's target: at most 10 %);
3. per structure on test volumes (hippocampus: ``--hippocampus-volumes`` evenly spaced, task from 4
   volumes; BraTS: its test volume, tasks from 1 and 4 volumes): the learned task's 3D Dice given
   the true box on every slice, and the zero-click 3D Dice.
Results: ``benchmarks/results/layer_arithmetic_cpu.md`` (+ ``.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date

import numpy as np
import torch

from _common import DATA, REPO, machine  # noqa: E402

from casam_core import CASamPredictor, build_backbone  # noqa: E402
from casam_core.alignment import run_layer  # noqa: E402
from casam_core.datasets import read_dataset  # noqa: E402
from casam_core.io import read_image, read_labels  # noqa: E402
from casam_core.metrics import dice  # noqa: E402
from casam_core.library import TaskLibrary  # noqa: E402
from effort import LIBRARY, _even, _pick, _structures, _task, _volume_data, true_box_volume  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "layer_arithmetic_cpu"
ARITHMETICS = {"float32": None, "bfloat16": torch.bfloat16}
TASKS = (("hippocampus_mri", 4), ("brats_glioma", 1), ("brats_glioma", 4))


def _use(predictor, dtype) -> None:
    predictor.backbone.layer_dtype = dtype
    predictor.aligned.discard_where(lambda key: True)  # aligned features are recomputed in this arithmetic


def layer_ms(predictor, task: str, z: torch.Tensor) -> dict:
    layer = predictor.alignment_layer(task)
    times = {a: [] for a in ARITHMETICS}
    with torch.inference_mode():
        for a, dtype in ARITHMETICS.items():
            run_layer(layer, z, dtype)  # warm-up
        for _ in range(7):
            for a, dtype in ARITHMETICS.items():
                t0 = time.perf_counter()
                run_layer(layer, z, dtype)
                times[a].append(time.perf_counter() - t0)
        change = {a: run_layer(layer, z, dtype) - z for a, dtype in ARITHMETICS.items()}
    rel = float((change["bfloat16"] - change["float32"]).norm() / change["float32"].norm())
    return {"ms": {a: 1000 * float(np.median(t)) for a, t in times.items()}, "relative_change_difference": rel}


def zero_click_timing(backbone, volume: np.ndarray, task: str, rounds: int) -> dict:
    cold = CASamPredictor(backbone)  # no disk cache: a new patient's volume
    assert cold.load_tasks(TaskLibrary(LIBRARY), [task]) == {}
    cold.set_volume(volume)
    t0 = time.perf_counter()
    cold.embed_slices()
    embed_s = time.perf_counter() - t0
    seconds = {a: [] for a in ARITHMETICS}
    for _ in range(rounds):
        for a, dtype in ARITHMETICS.items():
            _use(cold, dtype)
            t0 = time.perf_counter()
            cold.segment_auto(task)
            seconds[a].append(time.perf_counter() - t0)
    best = {a: min(s) for a, s in seconds.items()}
    return {"slices": int(volume.shape[0]), "embed_s": embed_s, "zero_click_s": best, "all_s": seconds,
            "share_of_embedding": {a: s / embed_s for a, s in best.items()}}


def quality(predictor, name: str, task: str, cases) -> list:
    rows = []
    for case in cases:
        image = read_image(case.image)
        labels = read_labels(case.mask, like=image).array
        predictor.set_volume(image.array)
        predictor.embed_slices()
        for a, dtype in ARITHMETICS.items():
            _use(predictor, dtype)
            auto = predictor.segment_auto(task)
            for which, gt in _structures(name, labels):
                if not gt.any():
                    continue
                rows.append({"case": case.image.name, "structure": which, "arithmetic": a,
                             "box_dice": dice(true_box_volume(predictor, gt, task), gt),
                             "zero_dice": dice(_pick(auto.labels, which), gt)})
        print(f"  {task}: {case.image.name} done", flush=True)
    return rows


def table(result: dict) -> str:
    t, lay = result["timing"], result["layer"]
    lines = ["# A learned task's Alignment Layer in use: float32 or bfloat16 autocast (LiteMedSAM, CPU)", "",
             f"Machine: {result['machine']}. Run: `python benchmarks/layer_arithmetic.py` on {result['date']}. "
             f"Default here: {result['default']} (the layer follows the decoder's arithmetic, as learning does). "
             "Tasks: the effort benchmark's (`runs/effort/library`, the default recipe).", "",
             "| measure | float32 | bfloat16 | ratio or difference |", "|---|---:|---:|---:|",
             f"| layer per slice (ms, median of 7, interleaved) | {lay['ms']['float32']:.0f} | {lay['ms']['bfloat16']:.0f} "
             f"| ratio {lay['ms']['bfloat16'] / lay['ms']['float32']:.2f} |",
             f"| the layer's change to the features: bfloat16 vs float32 (relative) | | | "
             f"{lay['relative_change_difference']:.4f} |",
             f"| zero-click, {t['slices']}-slice BraTS test volume, first call (s; embedding {t['embed_s']:.1f} s) | "
             f"{t['zero_click_s']['float32']:.1f} | {t['zero_click_s']['bfloat16']:.1f} | "
             f"ratio {t['zero_click_s']['bfloat16'] / t['zero_click_s']['float32']:.2f} |",
             f"| zero-click as a share of the embedding time (target <= 10 %) | "
             f"{100 * t['share_of_embedding']['float32']:.1f} % | {100 * t['share_of_embedding']['bfloat16']:.1f} % | |"]
    for task, rows in result["quality"].items():
        for key, what in (("box_dice", "3D Dice, true box on every slice"), ("zero_dice", "zero-click 3D Dice")):
            v = {a: float(np.mean([r[key] for r in rows if r["arithmetic"] == a])) for a in ARITHMETICS}
            n = len([r for r in rows if r["arithmetic"] == "float32"])
            lines.append(f"| {task}: {what} ({n} structures) | {v['float32']:.4f} | {v['bfloat16']:.4f} | "
                         f"{v['bfloat16'] - v['float32']:+.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hippocampus-volumes", type=int, default=12)
    parser.add_argument("--timing-rounds", type=int, default=2)
    parser.add_argument("--cache", default=str(REPO / "runs" / ".embeddings"))
    args = parser.parse_args()
    backbone = build_backbone("litemedsam", device="cpu")
    default = "bfloat16" if backbone.layer_dtype == torch.bfloat16 else "float32"
    predictor = CASamPredictor(backbone, disk_cache=args.cache)
    for name, n in TASKS:
        _task(predictor, f"{name}-{n}v", lambda: _volume_data(name, n))
    brats = read_dataset(DATA / "brats_glioma").cases("test")[0]
    volume = read_image(brats.image).array
    predictor.set_volume(volume)
    z = predictor.embedding(predictor.set_slice(volume.shape[0] // 2))[None]
    result = {"date": date.today().isoformat(), "machine": machine(), "default": default,
              "layer": layer_ms(predictor, "brats_glioma-1v", z)}
    print("layer:", result["layer"], flush=True)
    result["timing"] = zero_click_timing(backbone, volume, "brats_glioma-1v", args.timing_rounds)
    print("timing:", result["timing"], flush=True)
    result["quality"] = {}
    for name, n in TASKS:
        cases = read_dataset(DATA / name).cases("test")
        cases = _even(cases, args.hippocampus_volumes) if name == "hippocampus_mri" else cases
        result["quality"][f"{name}-{n}v"] = quality(predictor, name, f"{name}-{n}v", cases)
    backbone.layer_dtype = ARITHMETICS[default]
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    text = table(result)
    OUT.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
