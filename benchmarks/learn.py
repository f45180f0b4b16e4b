"""Time to learn a task from one annotated volume, and routing time per image vs number of tasks.

    python benchmarks/learn.py [--case brats_2013_pat0001_1] [--slices 40] [--configs "fast,paper:epochs=1"]
                               [--device cpu] [--out benchmarks/results/learn_cpu.md]

Learning: ``--slices`` consecutive slices of a brats_glioma training volume centred on the
slice with the most tumour (4 label classes), learned with ``learn_task`` as the CLI does
(20 % of the annotated slices held out for validation). Embedding is timed once from a
cold cache; each config (a learning profile, ``fast`` = the product's default or ``paper``,
with ``key=value;...`` overrides of LearnConfig fields) then trains on the same embeddings.
Total = embedding + training + validation (held-out Dice, frozen and aligned, and the
clicks) + router (VAE and 5-fold threshold).

Routing: ``Router.route`` on one image's feature with 1, 10 and 50 tasks (their VAEs
stacked), plus the attention pooling that makes the feature from a cached embedding.
Target: <= 2 ms per image at 50 tasks; <= 5 min to learn the 40-slice volume on this CPU,
cold cache included.
"""

from __future__ import annotations

import argparse
import time
from datetime import date
from pathlib import Path

import torch

from _common import DATA, REPO, machine  # noqa: E402

from casam_core import CASamPredictor, build_backbone  # noqa: E402
from casam_core.io import read_image, read_labels  # noqa: E402
from casam_core.router import Router, TaskVAE, router_feature  # noqa: E402
from casam_core.training import learn_config, learn_task  # noqa: E402
from casam_core.task_data import TaskData, volume_slices  # noqa: E402
from latency import summary, timed  # noqa: E402
from learn_recipe import parse_configs  # noqa: E402



def volume_data(case: str, n_slices: int) -> TaskData:
    root = DATA / "brats_glioma"
    image = read_image(root / "images" / f"{case}.nii.gz")
    labels = read_labels(root / "masks" / f"{case}.nii.gz", like=image).array
    area = (labels > 0).sum(axis=(1, 2))
    centre = int(area.argmax())
    lo = max(0, min(centre - n_slices // 2, labels.shape[0] - n_slices))
    keep = slice(lo, lo + n_slices)
    slices = volume_slices(image.array[keep], labels[keep], source=case)
    names = {1: "necrosis", 2: "edema", 3: "non-enhancing tumour", 4: "enhancing tumour"}
    return TaskData(slices, "class", names, "brain MRI T1c", [case])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="brats_2013_pat0001_1")
    ap.add_argument("--slices", type=int, default=40)
    ap.add_argument("--configs", default="fast,paper:epochs=1",
                    help="profile[:key=value;...],... trained on the same embeddings")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "learn_cpu.md"))
    args = ap.parse_args()

    predictor = CASamPredictor(build_backbone("litemedsam", device=args.device))
    data = volume_data(args.case, args.slices)
    n_annot = sum(s.annotated for s in data.slices)
    t0 = time.perf_counter()
    for s in data.slices:  # cold: every slice through the encoder once
        predictor.embed_rgb(s.rgb)
    t_embed = time.perf_counter() - t0
    rows = []
    for name, overrides in parse_configs(args.configs).items():
        profile, _, _ = name.partition(":")
        config = learn_config(profile, **overrides)
        task = learn_task(predictor, "bench", data, config)
        c = task.card
        train_s = c["seconds"]["training"]
        router_s = c["seconds"]["total"] - c["seconds"]["embedding"] - train_s
        total = t_embed + c["seconds"]["total"] - c["seconds"]["embedding"]
        label = profile + "".join(f", {k} {v}" for k, v in overrides.items())
        rows.append((label, config.form, config.lr, c["training"]["steps"], config.batch_images, train_s, router_s,
                     total, c["validation"]["dice_zero_shot"], c["validation"]["dice_aligned"]))
        print(rows[-1], flush=True)

    # routing
    z = predictor.embedding(predictor.embed_rgb(data.slices[0].rgb))
    feat = router_feature(z)
    pool_ms = summary(timed(lambda: router_feature(z), 200))
    route_rows = []
    for n_tasks in (1, 10, 50):
        router = Router()
        torch.manual_seed(0)
        for t in range(n_tasks):
            router.add(f"task{t}", TaskVAE(), tau=1.0)
        router.route(feat)  # builds the stack once
        route_rows.append((n_tasks, summary(timed(lambda: router.route(feat), 500))))

    lines = [
        f"# Learning a task and routing, LiteMedSAM ({predictor.backbone.fingerprint}) on {args.device}",
        "",
        f"Machine: {machine()}.",
        f"Run: `python benchmarks/learn.py --configs {args.configs}` on {date.today().isoformat()}.",
        "",
        f"## Learning from one volume: brats_glioma {args.case}, {args.slices} slices around the largest "
        f"tumour area ({n_annot} annotated, 4 label classes; 20 % held out for validation)",
        "",
        f"Embedding all {args.slices} slices from a cold cache: **{t_embed:.0f} s** "
        f"({1000 * t_embed / args.slices:.0f} ms per slice).",
        "",
        "| recipe | form | lr | steps (images x 5 masks) | training s | validation + router s | **total s** (embed + train + validation + router) "
        "| val Dice frozen | val Dice learned |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, form, lr, steps, batch, tr, ro, tot, d0, d1 in rows:
        lines.append(f"| {label} | {form} | {lr:g} | {steps} ({batch}) | {tr:.0f} | {ro:.1f} | **{tot:.0f}** "
                     f"({'<=' if tot <= 300 else '>'} 300) | {d0:.3f} | {d1:.3f} |")
    lines += [
        "",
        "## Routing one image",
        "",
        f"Router feature (attention pooling of a cached 256x64x64 embedding): median {pool_ms[0]:.3f} ms "
        f"(p95 {pool_ms[1]:.3f}); computed once per image and cached.",
        "",
        "| tasks | route median ms | p95 ms | target <= 2 ms |",
        "|---:|---:|---:|---|",
    ]
    for n_tasks, (med, p95) in route_rows:
        lines.append(f"| {n_tasks} | {med:.3f} | {p95:.3f} | {'met' if med <= 2 else 'MISSED'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
