"""Runtimes in one run: eager PyTorch with float32 embeddings (the reference) against the
default path, OpenVINO (the encoder in float32 and, in inference, the mask decoder in bfloat16
on a CPU that computes it natively, ``$CASAM_PRECISION``) with embeddings kept as float16, on the CPU; and, for
the encoder and propagation, the opt-in ``$CASAM_PRECISION=bf16`` (the encoder in bfloat16 too).

    python benchmarks/runtime.py [--faith-limit N] [--out benchmarks/results/runtime_cpu.md]

Measured, each as a ratio to the reference in the same run (issue 12's targets):
1. the encoder per slice (fresh pixels each time; the two runtimes interleaved), and a click on
   a cached embedding: a box click and a point-only click (``SamPredictor.predict``, masks at
   the original size; interleaved, median of 30);
2. faithfulness: frozen GT-box Dice on the kvasir_polyp and hc18_fetal_head test splits with
   each runtime, and the largest absolute embedding difference (first 10 images of each);
   (both through the predictor: the default keeps embeddings as float16, the reference as
   float32, so the difference includes the float16 rounding);
3. ``casam demo``'s volume: one box on the tumour core's largest slice, propagated, with the
   embeddings of every slice it visits (no cache), with each runtime;
4. the peak resident memory (VmHWM) of a session (its own process, default runtime) that
   embeds all 155 slices of that BraTS volume and propagates through it, with float32 and
   with float16 embeddings;
5. one learning step (``training.fit``: Alignment Layer forward, the eager decoder, the loss,
   backward, Adam) on cached embeddings of that volume's tumour slices: the product's recipe
   (1 image x 5 masks) and the paper's (6 images x 5 masks); float32 (the reference) against
   the default, bfloat16 autocast where the decoder runs in bfloat16 (``training.learning_arithmetic``);
6. the floor this CPU sets: the encoder's arithmetic (counted by PyTorch's FlopCounterMode) over
   the best rate of one large matrix product (2048^3, float32 and bfloat16, PyTorch; best of 10 at
   the start and 10 at the end) on the same threads, against the encoder and propagation targets.
The prompt encoder and the Alignment Layers stay in PyTorch; learning back-propagates through
the eager decoder.

The learning steps run first, and training leaves glibc's allocator warm (its mmap threshold
raised, so large tensors reuse heap pages instead of page-faulting fresh mmaps): every later
eager-PyTorch measurement here is of that warm state, about 2x faster than in a fresh process
(measured: encoder 1216 -> 692 ms); OpenVINO, with its own allocator, is unaffected. Runs before
2026-12-01 (second run) measured eager PyTorch cold.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from _common import DATA, REPO, machine  # noqa: E402

from casam_core import CASamPredictor, build_backbone  # noqa: E402
from casam_core.evaluate import evaluate_dataset  # noqa: E402
from casam_core.io import read_image, read_labels  # noqa: E402
from casam_core.datasets import read_dataset  # noqa: E402
from casam_core.metrics import dice  # noqa: E402
from casam_core.prompts import box_from_mask, click_from_mask, propagate_box  # noqa: E402
from casam_core.losses import objects_for  # noqa: E402
from casam_core.task_data import volume_slices  # noqa: E402
from casam_core.training import fit, learn_config, learning_arithmetic  # noqa: E402
from training.continual import encoder_gflops  # noqa: E402

BRATS = REPO / "samples" / "brats_glioma"
FAITH_SETS = ("kvasir_polyp", "hc18_fetal_head")
DIFF_IMAGES = 10  # per set, for the largest embedding difference
STORED = {"torch": torch.float32, "openvino": torch.float16, "bf16": torch.float16}  # reference, default, opt-in
DECODER_ARITHMETIC = {"bf16": "bfloat16", "f32": "float32", None: "eager PyTorch"}


def predictor_for(name, backbone, **kw):
    return CASamPredictor(backbone, embedding_dtype=STORED[name], **kw)


def encoder_ms(backbones, n: int = 7):
    image = read_image(REPO / "samples" / "hc18_fetal_head" / "006_HC.png").array
    rng = np.random.default_rng(0)
    times = {name: [] for name in backbones}
    predictors = {name: CASamPredictor(b) for name, b in backbones.items()}
    for i in range(n + 1):
        for name, p in predictors.items():
            noisy = image.copy()
            noisy[0, :8] = rng.integers(0, 255, 8)
            t = time.perf_counter()
            p.set_image(noisy)
            if i:  # the first round warms up
                times[name].append((time.perf_counter() - t) * 1000)
    return {name: statistics.median(v) for name, v in times.items()}


def clicks_ms(backbones, n: int = 30):
    """Median ms of a box click and of a point-only click on a cached embedding, per runtime."""
    image = read_image(REPO / "samples" / "hc18_fetal_head" / "006_HC.png").array
    gt = read_labels(REPO / "samples" / "hc18_fetal_head" / "006_HC_mask.png").array > 0
    box, point = box_from_mask(gt), click_from_mask(gt)[None]
    predictors = {name: CASamPredictor(b) for name, b in backbones.items()}
    prompts = {"box": {"box": box}, "point": {"point_coords": point, "point_labels": np.array([1])}}
    times = {(name, kind): [] for name in backbones for kind in prompts}
    for p in predictors.values():
        p.set_image(image)
    for i in range(n + 2):
        for name, p in predictors.items():
            for kind, kw in prompts.items():
                t = time.perf_counter()
                p.predict(**kw)
                if i >= 2:  # two rounds warm up
                    times[(name, kind)].append((time.perf_counter() - t) * 1000)
    return {key: statistics.median(v) for key, v in times.items()}


def faithfulness(backbones, limit):
    dices, diff = {}, 0.0
    for dataset in FAITH_SETS:
        root = DATA / dataset
        for name, b in backbones.items():
            dices[(dataset, name)] = evaluate_dataset(predictor_for(name, b), root, task="none", limit=limit)["dice"]
        ds = read_dataset(root)
        ref, other = (predictor_for(name, b) for name, b in backbones.items())
        for case in ds.cases("test")[:DIFF_IMAGES]:
            image = read_image(case.image).array
            ref.set_image(image)
            other.set_image(image)
            diff = max(diff, float((ref.embedding() - other.embedding()).abs().max()))
    return dices, diff


def learning_step_ms(backbones, rounds: int = 5, steps: int = 3):
    """Median ms of one learning step per runtime and recipe ("fast": 1 image x 5 masks, "paper":
    6 x 5), on the frozen embeddings of six tumour slices of the demo volume; the runtimes
    interleaved, ``rounds`` fits of ``steps`` steps each after one warm-up fit."""
    from casam_core.alignment import AlignmentLayer

    vol = read_image(BRATS / "brats_2013_pat0005_1.nii.gz")
    labels = read_labels(BRATS / "brats_2013_pat0005_1_mask.nii.gz", like=vol).array
    slices = volume_slices(vol.array, labels)
    area = [int((s.labels > 0).sum()) for s in slices]
    chosen = [slices[k] for k in np.argsort(area)[::-1][:6]]
    data = {}
    for name, b in backbones.items():
        p = CASamPredictor(b)
        records = [p.embed_rgb(s.rgb) for s in chosen]
        z_all = [p.embedding(r).detach().float().clone() for r in records]
        low = 4 * b.embedding_shape[1]
        data[name] = (z_all, {i: objects_for(s.labels, "class", records[i], b.img_size, low, i)
                              for i, s in enumerate(chosen)})
    recipes = {"fast": {}, "paper": {"batch_images": 6}}
    times = {(name, r): [] for name in backbones for r in recipes}
    for i in range(rounds + 1):
        for recipe, kw in recipes.items():
            for name, b in backbones.items():
                z_all, per_image = data[name]
                config = learn_config("fast", steps=steps, val_every=0, time_budget_s=None, warmup_steps=0, **kw)
                torch.manual_seed(0)
                layer = AlignmentLayer(n_blocks=config.n_blocks, form=config.form).train()
                t = time.perf_counter()
                fit(b, z_all, per_image, config, np.random.default_rng(i), layer=layer)
                if i:  # the first round warms up
                    times[(name, recipe)].append((time.perf_counter() - t) * 1000 / steps)
    return {key: statistics.median(v) for key, v in times.items()}


def demo_volume():
    vol = read_image(BRATS / "brats_2013_pat0005_1.nii.gz")
    gt = np.isin(read_labels(BRATS / "brats_2013_pat0005_1_mask.nii.gz", like=vol).array, (1, 3, 4))
    k = int(gt.sum(axis=(1, 2)).argmax())
    return vol, gt, k, box_from_mask(gt[k])


def propagation(name, backbone):
    vol, gt, k, box = demo_volume()
    predictor = predictor_for(name, backbone)  # no disk cache: every visited slice is embedded
    t = time.perf_counter()
    predictor.set_volume(vol.array, axis=0)
    mask, summary = propagate_box(predictor, k, box)
    return time.perf_counter() - t, len(summary["slices"]), dice(mask > 0, gt)


def status_mb(key: str) -> Optional[float]:
    """A memory line of /proc/self/status in MB ("VmHWM": peak, "VmRSS": now); None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM, which starts afresh at exec; the
    rusage maximum is kept across exec, so a child started from this (large) benchmark
    process would report the parent's memory at the fork."""
    peak = status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def session_rss(stored: str) -> dict:
    """Run in a child: embed every slice of the demo volume and propagate; report peak RSS."""
    vol, gt, k, box = demo_volume()
    predictor = CASamPredictor(build_backbone("litemedsam", device="cpu"),  # the default runtime
                               embedding_dtype=getattr(torch, stored))
    predictor.set_volume(vol.array, axis=0)
    predictor.embed_slices()
    propagate_box(predictor, k, box)
    return {"slices": int(vol.array.shape[0]), "peak_rss_mb": peak_rss_mb(),
            "runtime": predictor.backbone.runtime_note, "stored": str(predictor.embedding_dtype)}


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, rounds: int = 10) -> float:
    """The best rate (GFLOP/s) of one n^3 matrix product on this process's threads (this CPU's rate
    varies with its load and clock: the benchmark keeps the best of two such measurements, at its
    start and at its end)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    for i in range(rounds + 1):
        t = time.perf_counter()
        a @ b
        if i:  # the first warms up
            best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faith-limit", type=int, default=None, help="images per test split (default all)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "runtime_cpu.md"))
    ap.add_argument("--session-rss", choices=("float16", "float32"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.session_rss:
        print(json.dumps(session_rss(args.session_rss)))
        return 0
    backbones = {"torch": build_backbone("litemedsam", device="cpu", runtime="torch"),
                 "openvino": build_backbone("litemedsam", device="cpu", runtime="openvino")}
    print("runtime:", backbones["openvino"].runtime_note, flush=True)
    optin = None  # $CASAM_PRECISION=bf16 (the encoder in bfloat16 too), where this CPU computes it natively
    if getattr(backbones["openvino"]._fast_decoder, "precision", None) == "bf16":
        optin = build_backbone("litemedsam", device="cpu", runtime="openvino", precision="bf16")
    peak_before = {dtype: matmul_peak_gflops(dtype) for dtype in (torch.float32, torch.bfloat16)}
    learning = learning_step_ms(backbones)
    print("learning step ms", learning, flush=True)
    enc = encoder_ms({**backbones, **({"bf16": optin} if optin else {})})
    print("encoder ms", enc, flush=True)
    clicks = clicks_ms(backbones)
    print("click ms", clicks, flush=True)
    dices, diff = faithfulness(backbones, args.faith_limit)
    print("dice", dices, "max diff", diff, flush=True)
    prop = {name: propagation(name, b) for name, b in {**backbones, **({"bf16": optin} if optin else {})}.items()}
    print("propagation", prop, flush=True)
    rss = {}
    for stored in ("float32", "float16"):  # each in a fresh process
        child = subprocess.run([sys.executable, __file__, "--session-rss", stored], capture_output=True, text=True,
                               check=True)
        rss[stored] = json.loads(child.stdout.strip().splitlines()[-1])
        print("session", rss[stored], flush=True)

    gflop = encoder_gflops(backbones["torch"])
    peak = {str(dtype).split(".")[1]: max(rate, matmul_peak_gflops(dtype)) for dtype, rate in peak_before.items()}
    print("encoder GFLOP", gflop, "matmul peak GFLOP/s", peak, flush=True)

    ratio = enc["openvino"] / enc["torch"]
    p_ratio = prop["openvino"][0] / prop["torch"][0]
    lines = [f"# Runtimes, LiteMedSAM ({backbones['torch'].fingerprint}) on the CPU", "",
             f"Machine: {machine()}. Run: `python benchmarks/runtime.py` on {time.strftime('%Y-%m-%d')}. "
             f"OpenVINO: {backbones['openvino'].runtime_note}.", "",
             "| measure | eager PyTorch, float32 embeddings (reference) | default: OpenVINO, float16 embeddings "
             f"({DECODER_ARITHMETIC[getattr(backbones['openvino']._fast_decoder, 'precision', None)]} decoder) | ratio "
             "| target |", "|---|---:|---:|---:|---|",
             f"| encoder per slice (ms, median of 7) | {enc['torch']:.0f} | {enc['openvino']:.0f} | {ratio:.2f} | "
             f"<= 0.4: {'met' if ratio <= 0.4 else 'NOT met'} |"]
    if optin:
        r = enc["bf16"] / enc["torch"]
        lines.append(f"| encoder per slice, opt-in `$CASAM_PRECISION=bf16` (bfloat16 encoder; not the default) (ms) | "
                     f"{enc['torch']:.0f} | {enc['bf16']:.0f} | {r:.2f} | <= 0.4: {'met' if r <= 0.4 else 'NOT met'} |")
    for kind, what, target in (("box", "box click", 0.5), ("point", "point-only click (box search)", 0.3)):
        a, b = clicks[("torch", kind)], clicks[("openvino", kind)]
        lines.append(f"| {what} on a cached embedding, mask at the original size (ms, median of 30) | {a:.1f} | "
                     f"{b:.1f} | {b / a:.2f} | <= {target}: {'met' if b / a <= target else 'NOT met'} |")
    for dataset in FAITH_SETS:
        a, b = dices[(dataset, "torch")], dices[(dataset, "openvino")]
        lines.append(f"| {dataset} test, frozen GT-box Dice | {a:.4f} | {b:.4f} | diff {b - a:+.4f} | "
                     f"within 0.003: {'met' if abs(b - a) <= 0.003 else 'NOT met'} |")
    lines.append(f"| largest absolute embedding difference ({DIFF_IMAGES} images of each set) | | {diff:.1e} | | "
                 "reported |")
    (ta, na, da), (tb, nb, db) = prop["torch"], prop["openvino"]
    lines.append(f"| demo volume: propagate {na} slices with their embeddings (s; 3D Dice) | {ta:.1f} ({da:.3f}) | "
                 f"{tb:.1f} ({db:.3f}, {nb} slices) | {p_ratio:.2f} | <= 0.45: {'met' if p_ratio <= 0.45 else 'NOT met'} |")
    if optin:
        tc, nc, dc = prop["bf16"]
        r = tc / ta
        lines.append(f"| demo volume, opt-in `$CASAM_PRECISION=bf16` (s; 3D Dice) | {ta:.1f} ({da:.3f}) | {tc:.1f} "
                     f"({dc:.3f}, {nc} slices) | {r:.2f} | <= 0.45: {'met' if r <= 0.45 else 'NOT met'} |")
    arithmetic = learning_arithmetic(backbones["openvino"])
    for recipe, what in (("fast", "the product's recipe, 1 image x 5 masks"), ("paper", "the paper's, 6 images x 5 masks")):
        a, b = learning[("torch", recipe)], learning[("openvino", recipe)]
        lines.append(f"| one learning step, {what} (ms, median of 5 x 3; default: {arithmetic} forward) | {a:.0f} | "
                     f"{b:.0f} | {b / a:.2f} | <= 0.7: {'met' if b / a <= 0.7 else 'NOT met'} |")
    a, b = rss["float32"]["peak_rss_mb"], rss["float16"]["peak_rss_mb"]
    lines.append(f"| peak RSS (VmHWM), a session on the default runtime embedding all {rss['float16']['slices']} slices "
                 f"and propagating (MB; reference column: float32 embeddings) | {a:.0f} | {b:.0f} | {b / a:.2f} | "
                 f"<= 2048: {'met' if b <= 2048 else 'NOT met'} |")
    floor = {k: gflop / v * 1000 for k, v in peak.items()}  # ms per slice at the peak rate
    lines.append(f"| encoder per slice at this CPU's matrix-product peak ({gflop:.1f} GFLOP per slice, counted; best "
                 f"2048^3 product on {torch.get_num_threads()} threads: {peak['float32']:.0f} GFLOP/s float32, "
                 f"{peak['bfloat16']:.0f} bfloat16) (ms) | target 0.4 x {enc['torch']:.0f} = {0.4 * enc['torch']:.0f} | "
                 f"{floor['float32']:.0f} float32, {floor['bfloat16']:.0f} bfloat16 | | reported |")
    lines.append(f"| demo volume: the encoder alone at that peak, {na} slices (s) | target 0.45 x {ta:.1f} = "
                 f"{0.45 * ta:.1f} | {na * floor['float32'] / 1000:.1f} float32, {na * floor['bfloat16'] / 1000:.1f} "
                 "bfloat16 | | reported |")
    table = "\n".join(lines) + "\n"
    print(table)
    Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
