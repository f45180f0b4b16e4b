"""Routing as the library grows (issue 30): ``casam route`` on one image with a library of 1 task
and of 200 tasks, each run in a fresh process (what a user or a script waits for), warm cache.

    python benchmarks/route_scale.py [--tasks 200] [--repeats 3] [--out benchmarks/results/route_scale_cpu.md]

The tasks are the product's shape (``LearnConfig``'s Alignment Layer and a router VAE, saved by
``TaskLibrary.save``), made for the bundled LiteMedSAM backbone with random weights: loading and
scoring cost the same as learned ones. Target: route with 200 tasks <= 3x route with 1 task.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, machine  # noqa: E402
IMAGE = REPO / "samples" / "hc18_fetal_head" / "006_HC.png"



def make_library(root: Path, n: int, fingerprint: str) -> None:
    import torch

    from casam_core.alignment import AlignmentLayer
    from casam_core.library import TaskLibrary
    from casam_core.router import TaskVAE
    from casam_core.tasks import Task
    from casam_core.training import LearnConfig

    library = TaskLibrary(root)
    for i in range(n):
        torch.manual_seed(i)
        layer, vae = AlignmentLayer(n_blocks=LearnConfig.n_blocks, form=LearnConfig.form), TaskVAE()
        card = {"name": f"task{i:03d}", "backbone_fingerprint": fingerprint, "alignment": layer.config(),
                "router": {"tau": 1.0}, "labels": {"1": "structure"}}
        library.save(Task(card["name"], layer, vae, 1.0, card))


def route_seconds(library: Path, cache: Path) -> float:
    env = dict(os.environ, CASAM_LIBRARY=str(library))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "casam_core.cli", "route", str(IMAGE), "--json", "--device", "cpu",
                          "--cache-dir", str(cache)], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"casam route failed: {out.stderr[-2000:]}")
    json.loads(out.stdout)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "route_scale_cpu.md"))
    args = parser.parse_args()
    from casam_core.backbones import build_backbone

    fingerprint = build_backbone("litemedsam", device="cpu", runtime="torch").fingerprint
    work = Path(tempfile.mkdtemp(prefix="casam-route-scale-"))
    try:
        cache = work / "cache"
        rows = {}
        for n in (1, args.tasks):
            make_library(work / f"lib{n}", n, fingerprint)
        route_seconds(work / "lib1", cache)  # warms the cache: converted graphs and the embedding
        times = {1: [], args.tasks: []}
        for _ in range(args.repeats):  # interleaved: the machine's speed drifts
            for n in times:
                times[n].append(route_seconds(work / f"lib{n}", cache))
        rows = {n: statistics.median(t) for n, t in times.items()}
        ratio = rows[args.tasks] / rows[1]
        size = sum(f.stat().st_size for f in (work / f"lib{args.tasks}").rglob("*") if f.is_file())
        lines = [
            "# Routing as the library grows (`benchmarks/route_scale.py`)", "",
            f"Machine: {machine()}. `casam route` on {IMAGE.name}, a fresh process each run, warm cache; "
            f"median of {args.repeats} interleaved runs. Library of {args.tasks} tasks: {size / 1e9:.2f} GB.", "",
            "| tasks in the library | seconds (median) | runs |", "|---:|---:|---|"]
        lines += [f"| {n} | {rows[n]:.2f} | {', '.join(f'{t:.2f}' for t in times[n])} |" for n in times]
        lines += ["", f"Ratio {args.tasks} / 1 tasks: **{ratio:.2f}x** (target <= 3x: "
                  f"{'met' if ratio <= 3 else 'NOT met'})."]
        Path(args.out).write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
