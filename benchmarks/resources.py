"""Memory of everyday commands, each in its own process (issue 13, part 5).

    python benchmarks/resources.py [--clicks 1000] [--out benchmarks/results/resources_cpu.md]

Measured (peak resident memory = VmHWM of the process, which starts afresh at exec):
1. ``casam segment`` on the 155-slice BraTS sample: one box on the tumour core's largest
   slice, propagated, cold embedding cache, empty task library (a user's first run);
2. ``casam eval`` over the first 20 kvasir_polyp test images, frozen model, cold cache;
3. one predictor session of ``--clicks`` clicks (box clicks with jittered boxes, every tenth
   switching between three images, every fifth with ``multimask_output``): the resident
   memory (VmRSS) after 100 clicks and after the last; growth should be none.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DATA, REPO, machine  # noqa: E402

BRATS = REPO / "samples" / "brats_glioma"
MARK = "RESOURCES-JSON "

from runtime import peak_rss_mb, status_mb  # noqa: E402  (one reader of /proc/self/status)


def _child_cli(argv) -> None:
    from casam_core.cli import main

    t0 = time.perf_counter()
    code = main(argv)
    print(MARK + json.dumps({"rc": code, "seconds": time.perf_counter() - t0,
                             "peak_rss_mb": peak_rss_mb()}), file=sys.stderr)


def _child_clicks(n: int) -> None:
    import numpy as np

    from casam_core import CASamPredictor, build_backbone
    from casam_core.io import read_image, read_labels
    from casam_core.datasets import read_dataset
    from casam_core.prompts import box_from_mask

    ds = read_dataset(DATA / "kvasir_polyp")
    cases = ds.cases("test")[:3]
    images = [read_image(c.image).array for c in cases]
    boxes = [box_from_mask(read_labels(c.mask).array > 0).astype(float) for c in cases]
    predictor = CASamPredictor(build_backbone("litemedsam", device="cpu"))
    rng = np.random.default_rng(0)
    current, rss = 0, {}
    predictor.set_image(images[0])
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        if i % 10 == 0:
            current = (current + 1) % len(images)
            predictor.set_image(images[current])  # cached after the first time
        box = boxes[current] + rng.normal(0, 4, 4)
        predictor.predict(box=box, multimask_output=i % 5 == 0)
        if i in (100, n // 2, n):
            rss[i] = status_mb("VmRSS")
    print(MARK + json.dumps({"clicks": n, "rss_mb": rss, "seconds": time.perf_counter() - t0,
                             "peak_rss_mb": peak_rss_mb()}), file=sys.stderr)


def _measure(argv, env) -> dict:
    proc = subprocess.run([sys.executable, __file__] + argv, env=env, capture_output=True, text=True)
    for line in reversed(proc.stderr.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"{argv}: no measurement (rc {proc.returncode}): {proc.stderr[-2000:]}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["--child", "cli"]:  # the measured process: the rest is casam's command line
        _child_cli(argv[2:])
        return 0
    if argv[:2] == ["--child", "clicks"]:
        _child_clicks(int(argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clicks", type=int, default=1000)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "resources_cpu.md"))
    ap.add_argument("--note", default="", help="a sentence for the table (e.g. what else ran meanwhile)")
    args = ap.parse_args(argv)

    import numpy as np

    from casam_core.io import read_image, read_labels
    from casam_core.prompts import box_from_mask

    vol_path = BRATS / "brats_2013_pat0005_1.nii.gz"
    vol = read_image(vol_path)
    gt = np.isin(read_labels(BRATS / "brats_2013_pat0005_1_mask.nii.gz", like=vol).array, (1, 3, 4))
    k = int(gt.sum(axis=(1, 2)).argmax())
    box = ",".join(str(int(v)) for v in box_from_mask(gt[k]))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, CASAM_LIBRARY=str(tmp / "library"))  # the encoder's model stays where it is
        rows["segment"] = _measure(["--child", "cli", "segment", str(vol_path), "--out", str(tmp / "m.nii.gz"),
                                    "--box", box, "--slice", str(k), "--device", "cpu",
                                    "--cache-dir", str(tmp / "cache1"), "--json"], env)
        rows["eval"] = _measure(["--child", "cli", "eval", str(DATA / "kvasir_polyp"), "--limit", "20",
                                 "--task", "none", "--device", "cpu", "--cache-dir", str(tmp / "cache2"),
                                 "--json"], env)
        rows["clicks"] = _measure(["--child", "clicks", str(args.clicks)], env)
    rss = rows["clicks"]["rss_mb"]
    first, last = rss["100"], rss[str(args.clicks)]
    rows["machine"] = machine()
    lines = [
        "# Memory of everyday commands (`benchmarks/resources.py`)", "",
        f"{time.strftime('%Y-%m-%d')}, {rows['machine']}; each command in its own process (peak = VmHWM).", "",
        "| what | peak resident memory | wall time | exit code |", "|---|---:|---:|---:|",
        f"| `casam segment` BraTS sample, {vol.array.shape[0]} slices, box on slice {k}, propagated, cold cache "
        f"| {rows['segment']['peak_rss_mb']:.0f} MB | {rows['segment']['seconds']:.1f} s | {rows['segment']['rc']} |",
        f"| `casam eval` kvasir_polyp, 20 test images, frozen, cold cache | {rows['eval']['peak_rss_mb']:.0f} MB "
        f"| {rows['eval']['seconds']:.1f} s | {rows['eval']['rc']} |",
        f"| {args.clicks} box clicks in one predictor session (3 images) | {rows['clicks']['peak_rss_mb']:.0f} MB "
        f"| {rows['clicks']['seconds']:.1f} s | 0 |", "",
        f"Resident memory of the click session: after 100 clicks {first:.1f} MB, after {args.clicks // 2} "
        f"{rss[str(args.clicks // 2)]:.1f} MB, after {args.clicks} {last:.1f} MB: growth {last - first:+.1f} MB "
        f"over {args.clicks - 100} clicks.", "",
    ] + ([args.note, ""] if args.note else [])
    out = Path(args.out)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
