"""Latency of the embedded default backbone: embedding, click, bare decoder, Alignment Layer.

    python benchmarks/latency.py [--device cpu|cuda] [--clicks 60] [--out benchmarks/results/latency_cpu.md]

Prints a Markdown table and writes it (with the machine it ran on) to ``--out``.
"Click" is what the plugin and CLI pay per prompt on an image whose embedding is
cached: ``CASamPredictor.predict`` (prompt transform, prompt encoder, mask decoder,
upsampling to the original grid, copy to numpy). "Bare decoder" is the prompt
encoder + mask decoder alone on the same embedding, measured in the same run.
Target: click <= 1.1 x bare decoder.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


from _common import REPO, machine  # noqa: E402
from casam_core import AlignmentLayer, CASamPredictor, build_backbone  # noqa: E402
from casam_core.alignment import run_layer  # noqa: E402
from casam_core.io import read_image, read_labels  # noqa: E402
from casam_core.prompts import box_from_mask  # noqa: E402


def timed(fn, n: int, warmup: int = 3):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def summary(ms):
    ms = sorted(ms)
    return statistics.median(ms), ms[int(0.95 * (len(ms) - 1))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clicks", type=int, default=60)
    ap.add_argument("--embeds", type=int, default=5)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/latency_cpu.md, or latency_gpu.md "
                    "for a CUDA device")
    args = ap.parse_args(argv)
    if args.out is None:
        kind = "gpu" if args.device.startswith("cuda") else "cpu"
        args.out = str(REPO / "benchmarks" / "results" / f"latency_{kind}.md")

    backbone = build_backbone("litemedsam", device=args.device)
    predictor = CASamPredictor(backbone)
    image = read_image(REPO / "samples" / "hc18_fetal_head" / "006_HC.png").array
    gt = read_labels(REPO / "samples" / "hc18_fetal_head" / "006_HC_mask.png").array > 0
    box = box_from_mask(gt)
    sync = torch.cuda.synchronize if backbone.device.type == "cuda" else (lambda: None)

    # 1. embedding per slice (fresh pixels every time so no cache can answer)
    rng = np.random.default_rng(0)

    def embed():
        noisy = image.copy()
        noisy[0, : 8] = rng.integers(0, 255, 8)
        predictor.set_image(noisy)
        sync()

    embed_ms = timed(embed, args.embeds, warmup=1)

    predictor.set_image(image)
    record = predictor.current_record()
    z = predictor.get_image_embedding()
    box_t = torch.as_tensor(backbone.transform_boxes(box, record.original_size), dtype=torch.float32,
                            device=backbone.device)

    # 2. bare decoder vs 3. click, interleaved so drift in machine load hits both alike
    def bare():
        with torch.inference_mode():
            backbone.decode(z, None, box_t, None, False)
        sync()

    def click(task=None):
        predictor.predict(box=box, multimask_output=False, task=task)
        sync()

    bare_ms, click_ms = [], []
    for _ in range(3):
        bare(), click()
    for _ in range(args.clicks):
        bare_ms += timed(bare, 1, warmup=0)
        click_ms += timed(click, 1, warmup=0)

    # 4. Alignment Layer cost per slice, and a click on cached aligned features
    rows_al = []
    for form in ("paper", "gated"):
        layer = AlignmentLayer(form=form).to(backbone.device).eval()
        with torch.inference_mode():
            al_ms = timed(lambda: (run_layer(layer, z, backbone.layer_dtype), sync()), 5, warmup=1)
        predictor.add_task(form, layer)
        aligned_click = timed(lambda: click(form), args.clicks // 2)
        rows_al.append((form, summary(al_ms)[0], summary(aligned_click)[0]))

    # 5. point-only click (box search around the click on box-only LiteMedSAM)
    ys, xs = np.nonzero(gt)
    pt = [[int(xs.mean()), int(ys.mean())]]
    point_ms = timed(lambda: (predictor.predict(point_coords=np.array(pt), point_labels=np.array([1]), multimask_output=False), sync()), 10)

    e_med, _ = summary(embed_ms)
    b_med, b_p95 = summary(bare_ms)
    c_med, c_p95 = summary(click_ms)
    ratio = c_med / b_med
    card = f"; GPU: {torch.cuda.get_device_name(backbone.device)}" if backbone.device.type == "cuda" else ""
    lines = [
        f"# Latency, LiteMedSAM ({backbone.fingerprint}) on {backbone.device}",
        "",
        f"Machine: {machine()}{card}. Image: samples/hc18_fetal_head/006_HC.png "
        f"({image.shape[1]}x{image.shape[0]}), box prompt. {args.clicks} clicks, medians (p95).",
        f"Run: `python benchmarks/latency.py --device {args.device}` on {time.strftime('%Y-%m-%d')}.",
        "",
        "| measure | median ms | p95 ms |",
        "|---|---:|---:|",
        f"| embedding per slice (encoder, 256x256) | {e_med:.0f} | {summary(embed_ms)[1]:.0f} |",
        f"| bare decoder (prompt encoder + mask decoder) | {b_med:.1f} | {b_p95:.1f} |",
        f"| click, cached embedding (`predict`, full-res mask) | {c_med:.1f} | {c_p95:.1f} |",
        f"| **click / bare decoder** | **{ratio:.3f}** (target <= 1.1: {'met' if ratio <= 1.1 else 'NOT met'}) | |",
    ]
    for form, al, ac in rows_al:
        lines.append(f"| Alignment Layer `{form}` (3 blocks), once per slice and task | {al:.0f} | |")
        lines.append(f"| click on cached `{form}`-aligned features | {ac:.1f} | |")
    lines.append(f"| point-only click (box search, 6 candidates) | {summary(point_ms)[0]:.0f} | "
                 f"{summary(point_ms)[1]:.0f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
