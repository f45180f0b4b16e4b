"""The image encoder in float32 (the default) or in bfloat16 (``$CASAM_PRECISION=bf16``, OpenVINO
on a CPU that computes bfloat16 natively): its speed, and what its embeddings change downstream,
in one run.

    python benchmarks/encoder_arithmetic.py [--learn hc18_fetal_head,hippocampus_mri,em_membranes]
                                            [--learn-bf16 hippocampus_mri]
                                            [--route kvasir_polyp,cxr_lungs] [--max-test-volumes 4]

Both columns use the same decoder (bfloat16) and keep embeddings as float16, as the product
does. Measured:
1. the encoder per slice (fresh pixels each time, the two interleaved, median of 7);
2. the embeddings' differences on 10 test images of each set (largest absolute, and the RMS
   difference relative to the embeddings' RMS);
3. frozen GT-box Dice on the kvasir_polyp and hc18_fetal_head test splits;
4. tasks learned with float32 embeddings (``casam learn``'s default recipe, from
   ``gain_data.training_data``), then used with each encoder: the learned GT-box Dice on each
   task's test split (the task forced), and the router's choice ("auto") on every test image
   of the learned sets and of foreign sets: how many images change route;
5. tasks learned with bfloat16 embeddings (``--learn-bf16``), used with each encoder: is a loss
   in (4) a mismatch between learning and use, or the bfloat16 embeddings themselves?
A task learned on one machine is used on others, so (4) is the question that matters: does a
task's layer and router threshold, fitted on float32 embeddings, hold on bfloat16 ones?
Results: ``benchmarks/results/encoder_arithmetic_cpu.md`` (+ ``.json``).
"""

from __future__ import annotations

import argparse
import json
from datetime import date

import numpy as np
import torch

from _common import DATA, REPO, machine  # noqa: E402

from casam_core import CASamPredictor, build_backbone  # noqa: E402
from casam_core.evaluate import evaluate_dataset  # noqa: E402
from casam_core.io import read_image  # noqa: E402
from casam_core.datasets import read_dataset  # noqa: E402
from casam_core.library import TaskLibrary  # noqa: E402
from casam_core.training import learn_config, learn_task  # noqa: E402
from gain_data import training_data  # noqa: E402
from learn_gain import test_split  # noqa: E402
from runtime import encoder_ms  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "encoder_arithmetic_cpu"
WORK = REPO / "runs" / "encoder_arithmetic"
FAITH_SETS = ("kvasir_polyp", "hc18_fetal_head")
DIFF_IMAGES = 10


def embedding_differences(backbones, sets):
    largest, rel = 0.0, []
    ref, other = (CASamPredictor(b, embedding_dtype=torch.float16) for b in backbones.values())
    for name in sets:
        ds = read_dataset(DATA / name)
        for case in ds.cases("test")[:DIFF_IMAGES]:
            image = read_image(case.image)
            if image.is_volume:
                image = image.array[image.array.shape[0] // 2]
            else:
                image = image.array
            ref.set_image(image)
            other.set_image(image)
            a, b = ref.embedding().float(), other.embedding().float()
            largest = max(largest, float((a - b).abs().max()))
            rel.append(float((a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()))
    return largest, float(np.mean(rel))


def learned(backbone, names, library, suffix=""):
    """Tasks learned with ``backbone``'s embeddings, kept in ``library`` as <set><suffix> (a rerun
    loads them)."""
    for name in names:
        if name + suffix in library:
            continue
        print(f"{name}: learning with the {backbone.embedding_arithmetic} encoder", flush=True)
        task = learn_task(CASamPredictor(backbone), name + suffix, training_data(name), learn_config("fast"),
                          progress=lambda d, t, m: print(f"  {m}", flush=True) if d == t else None)
        library.save(task)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--learn", default="hc18_fetal_head,hippocampus_mri,em_membranes")
    ap.add_argument("--learn-bf16", default="hippocampus_mri")
    ap.add_argument("--route", default="kvasir_polyp,cxr_lungs")
    ap.add_argument("--max-test-volumes", type=int, default=4)
    args = ap.parse_args(argv)
    learn_sets, foreign = args.learn.split(","), args.route.split(",")
    learn16 = [s for s in args.learn_bf16.split(",") if s]

    f32, bf16 = build_backbone("litemedsam", precision="auto"), build_backbone("litemedsam", precision="bf16")
    assert f32.embedding_arithmetic == "float32" and bf16.embedding_arithmetic == "bfloat16", bf16.runtime_note
    backbones = {"float32": f32, "bfloat16": bf16}
    result = {"date": date.today().isoformat(), "machine": machine(), "runtime": bf16.runtime_note}

    result["encoder_ms"] = encoder_ms(backbones)
    print("encoder ms", result["encoder_ms"], flush=True)
    largest, rel = embedding_differences(backbones, FAITH_SETS + tuple(learn_sets))
    result["embedding_difference"] = {"largest": largest, "relative_rms": rel}
    print("embedding difference", result["embedding_difference"], flush=True)

    caches = {name: WORK / f"embeddings-{name}" for name in backbones}
    result["frozen_dice"] = {}
    for dataset in FAITH_SETS:
        for name, b in backbones.items():
            p = CASamPredictor(b, disk_cache=caches[name])
            result["frozen_dice"][f"{dataset}/{name}"] = evaluate_dataset(p, DATA / dataset, task="none")["dice"]
        print(dataset, {k: round(v, 4) for k, v in result["frozen_dice"].items() if k.startswith(dataset)}, flush=True)

    library = TaskLibrary(WORK / "tasks")
    learned(f32, learn_sets, library)
    learned(bf16, learn16, library, "-bf16")
    result["learned_dice"], result["learned_bf16_dice"], result["routes"] = {}, {}, {}
    per_image = {}
    for name, b in backbones.items():
        p = CASamPredictor(b, disk_cache=caches[name])
        assert p.load_tasks(library, learn_sets) == {}  # the router: one task per learned set
        for dataset in learn16:  # forced only: a second task of the same set would split its routes
            task = library.load(dataset + "-bf16")
            p.add_task(task.name, task.layer if task.use_alignment else None, None, None, task.card)
        for dataset in learn_sets + foreign:
            ds = test_split(dataset, args.max_test_volumes)
            if dataset in learn_sets:
                r = evaluate_dataset(p, ds, task=dataset)
                result["learned_dice"][f"{dataset}/{name}"] = r["dice"]
            if dataset in learn16:
                r = evaluate_dataset(p, ds, task=dataset + "-bf16")
                result["learned_bf16_dice"][f"{dataset}/{name}"] = r["dice"]
            r = evaluate_dataset(p, ds, task="auto")
            result["routes"][f"{dataset}/{name}"] = r["routes"]
            per_image[(dataset, name)] = [row["route"] for row in r["per_image"]]
            print(name, dataset, r["routes"], flush=True)
    result["route_changes"] = {
        dataset: sum(a != b for a, b in zip(per_image[(dataset, "float32")], per_image[(dataset, "bfloat16")]))
        for dataset in learn_sets + foreign}
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=1))
    OUT.with_suffix(".md").write_text(table(result, learn_sets, learn16, foreign, args))
    print(OUT.with_suffix(".md").read_text())
    return 0


def table(r, learn_sets, learn16, foreign, args) -> str:
    ms = r["encoder_ms"]
    lines = ["# The image encoder in float32 or bfloat16 (OpenVINO, LiteMedSAM, CPU)", "",
             f"Machine: {r['machine']}. Run: `python benchmarks/encoder_arithmetic.py` on {r['date']}. "
             f"`$CASAM_PRECISION=bf16`: {r['runtime']}. The default differs only in its float32 encoder. "
             "Embeddings kept as float16 in both. Tasks: `casam learn`'s default recipe (120 s budget) "
             "from at most 40 training images or slices (`gain_data.py`).", "",
             "| measure | float32 encoder | bfloat16 encoder | difference |", "|---|---:|---:|---:|",
             f"| encoder per slice (ms, median of 7) | {ms['float32']:.0f} | {ms['bfloat16']:.0f} | "
             f"ratio {ms['bfloat16'] / ms['float32']:.2f} |",
             f"| embeddings: largest absolute difference / RMS difference relative to RMS ({DIFF_IMAGES} "
             f"test images of each of {len(FAITH_SETS) + len(learn_sets)} sets) | | | "
             f"{r['embedding_difference']['largest']:.3f} / {r['embedding_difference']['relative_rms']:.4f} |"]
    for dataset in FAITH_SETS:
        a, b = r["frozen_dice"][f"{dataset}/float32"], r["frozen_dice"][f"{dataset}/bfloat16"]
        lines.append(f"| {dataset} test, frozen GT-box Dice | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    for dataset in learn_sets:
        a, b = r["learned_dice"][f"{dataset}/float32"], r["learned_dice"][f"{dataset}/bfloat16"]
        lines.append(f"| {dataset} test, learned GT-box Dice (task learned with float32 embeddings) | "
                     f"{a:.4f} | {b:.4f} | {b - a:+.4f} |")
    for dataset in learn16:
        a, b = r["learned_bf16_dice"][f"{dataset}/float32"], r["learned_bf16_dice"][f"{dataset}/bfloat16"]
        lines.append(f"| {dataset} test, learned GT-box Dice (task learned with bfloat16 embeddings) | "
                     f"{a:.4f} | {b:.4f} | {b - a:+.4f} |")
    for dataset in learn_sets + foreign:
        a, b = r["routes"][f"{dataset}/float32"], r["routes"][f"{dataset}/bfloat16"]
        kind = "learned" if dataset in learn_sets else "foreign"
        show = (lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items())))
        lines.append(f"| {dataset} test ({kind}), routes (images per choice; 3D: slices of "
                     f"{args.max_test_volumes} volumes) | {show(a)} | {show(b)} | "
                     f"{r['route_changes'][dataset]} images change route |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
