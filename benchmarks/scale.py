"""Scale-out on torch.distributed: embedding throughput and learning steps per second for
1 and 2 processes (issue 15), each run of the real command in its own job.

    python benchmarks/scale.py [--images 16] [--steps 20] [--out benchmarks/results/scale_cpu.md]

Measured with the real LiteMedSAM backbone on kvasir_polyp images:
1. ``casam embed`` of ``--images`` test images into a fresh cache: as one plain process (all
   cores to it), and under ``torchrun --standalone --nproc_per_node N`` (CPU: gloo, one thread
   per process, torchrun's default) for N = 1, 2; slices per second from the command's own
   report (model loading excluded) and the job's wall time (start-up included);
2. ``casam learn`` for ``--steps`` steps with a global batch of 2 images x 5 masks on 12
   training images (cache warm, held-out checks off): steps per second from the task card's
   training time, and the wall time.
On a machine with CUDA the same rows run with one process per GPU (nccl), and the card is named.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import DATA, REPO, machine  # noqa: E402



def _command(nproc, args, threads=None):
    """(argv, env) of one job: a plain process (nproc None) or a torchrun job of nproc processes."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if nproc is None:
        return [sys.executable, "-m", "casam_core.cli", *args], env
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "casam_core.cli", *args], env


def _run(nproc, args, threads=None) -> tuple:
    argv, env = _command(nproc, args, threads)
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout), wall


def dataset(folder: Path, n_train: int, n_test: int) -> Path:
    src = DATA / "kvasir_polyp"
    meta = json.loads((src / "dataset.json").read_text())
    meta["train"], meta["test"] = meta["train"][:n_train], meta["test"][:n_test]
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for case in meta["train"] + meta["test"]:
        for key in ("image", "mask"):
            shutil.copy(src / case[key], folder / case[key])
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    out = Path(args.out or REPO / "benchmarks" / "results" / f"scale_{'gpu' if gpu else 'cpu'}.md")
    jobs = [("1 process", None, None), ("torchrun, 1 process", 1, 1), ("torchrun, 2 processes", 2, 1)]
    if gpu:
        n = torch.cuda.device_count()
        jobs = [("1 process, 1 GPU", None, None)] + [(f"torchrun, {k} GPU", k, None) for k in sorted({1, n})]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = dataset(tmp / "kvasir", 12, args.images)
        device = ["--device", "cuda" if gpu else "cpu"]
        for label, nproc, threads in jobs:
            cache = tmp / f"cache-{len(rows)}"
            report, wall = _run(nproc, ["embed", str(data), "--split", "test", "--cache-dir", str(cache), "--json",
                                        *device], threads)
            assert report["computed"] == args.images, report
            # learning on a warm cache: the images just embedded, plus the training ones
            _run(nproc, ["embed", str(data), "--split", "train", "--cache-dir", str(cache), "--json", *device], threads)
            card, learn_wall = _run(nproc, ["learn", "bench", str(data), "--library", str(tmp / f"lib-{len(rows)}"),
                                            "--cache-dir", str(cache), "--steps", str(args.steps), "--batch-images",
                                            "2", "--val-every", "0", "--time-budget", "3600", "--json", *device],
                                    threads)
            rows.append({"job": label, "processes": report["processes"],
                         "threads_per_process": threads or torch.get_num_threads(),
                         "embed_per_s": report["computed_per_second"], "embed_wall_s": round(wall, 1),
                         "learn_steps": card["training"]["steps"],
                         "learn_steps_per_s": round(card["training"]["steps"] / card["seconds"]["training"], 3),
                         "learn_wall_s": round(learn_wall, 1)})
            print(rows[-1], flush=True)
    base = rows[0]
    card_name = torch.cuda.get_device_name(0) if gpu else None
    lines = [f"# Scale-out: 1 and 2 processes ({'GPU: ' + card_name if gpu else 'CPU'})", "",
             f"Machine: {machine()}. Run: `python benchmarks/scale.py --images {args.images} "
             f"--steps {args.steps}` ({time.strftime('%Y-%m-%d')}). Backend: {'nccl' if gpu else 'gloo'}; "
             "torchrun `--standalone`, one node.", "",
             f"- embed: `casam embed` of {args.images} kvasir_polyp test images into a fresh cache; slices/s from the "
             "command's report (model loading excluded), wall time of the whole job (start-up included).",
             f"- learn: `casam learn`, {args.steps} steps of a global batch of 2 images x 5 masks (12 training "
             "images, warm cache, no held-out checks); steps/s from the card's training time.", "",
             "| job | processes | threads each | embed slices/s | x first row | embed wall s | learn steps/s | "
             "x first row | learn wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['job']} | {r['processes']} | {r['threads_per_process']} | {r['embed_per_s']:.2f} | "
                     f"{r['embed_per_s'] / base['embed_per_s']:.2f} | {r['embed_wall_s']:.1f} | "
                     f"{r['learn_steps_per_s']:.2f} | {r['learn_steps_per_s'] / base['learn_steps_per_s']:.2f} | "
                     f"{r['learn_wall_s']:.1f} |")
    lines.append("")
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
