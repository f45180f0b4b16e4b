"""``casam``: the command line, thin over casam_core.

Every command takes ``--json`` for machine-readable output on stdout; errors go to
stderr as one line and the exit code is non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from . import __version__
from .backbones import BACKBONES, DEFAULT_BACKBONE, BackboneError, build_backbone
from .io import VOLUME_SUFFIXES, WINDOWS, ImageIOError, path_suffix, read_image, read_labels, write_mask
from .metrics import dice
from .overlay import overlay, save_png, volume_montage
from .predictor import CASamPredictor, PromptError
from .progress import Cancelled, TqdmProgress
from .prompts import box_from_mask, parse_box, parse_point, propagate_box

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=sorted(BACKBONES),
                   help=f"frozen backbone (default {DEFAULT_BACKBONE}, bundled weights)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file for the SAM ViT backbones")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--cache-dir", default=None, help="on-disk embedding cache folder (optional)")


def _predictor(args) -> CASamPredictor:
    backbone = build_backbone(args.backbone, args.checkpoint, args.device)
    return CASamPredictor(backbone, disk_cache=args.cache_dir)


def _echo(args, text: str) -> None:
    if not args.json:
        print(text, file=sys.stderr)


# ---------------------------------------------------------------------------------
# segment
# ---------------------------------------------------------------------------------
def segment_file(predictor: CASamPredictor, input_path: str, out: str, boxes: List[List[float]],
                 points: List, slice_index: Optional[int] = None, axis: int = 0, window=None,
                 propagate: bool = True, overlay_path: Optional[str] = None, progress=None) -> dict:
    """Segment one 2D image or volume with box/point prompts and write the mask (+ overlay)."""
    if not boxes and not points:
        raise CLIError("give a prompt: --box x0,y0,x1,y1 and/or --point x,y[,label]")
    image = read_image(input_path)
    if image.is_volume and path_suffix(out) not in VOLUME_SUFFIXES:
        raise CLIError(f"{out}: a volume's mask is written as .nii.gz, .nii, .mha or .nrrd")
    if not image.is_volume and slice_index is not None:
        raise CLIError(f"{input_path} is a 2D image: --slice is for volumes")
    coords = np.array([p[0] for p in points]) if points else None
    labels = np.array([p[1] for p in points]) if points else None
    box = np.array(boxes) if boxes else None
    info = {"input": str(input_path), "out": str(out), "route": None}
    t0 = time.perf_counter()
    if not image.is_volume:
        predictor.set_image(image.array, window=window)
        result, info["scores"] = _labelled(predictor, coords, labels, box)
        picture = overlay(image.array, result, boxes[0] if boxes else None)
    else:
        n = image.array.shape[axis]
        if slice_index is None:
            raise CLIError(f"{input_path} is a volume: say which slice the prompt is on (--slice 0..{n - 1})")
        if not 0 <= slice_index < n:
            raise CLIError(f"--slice {slice_index} is outside 0..{n - 1} for {input_path} along axis {axis}")
        predictor.set_volume(image.array, axis=axis, window=window)
        if propagate and box is not None and len(box) == 1 and coords is None:
            result, summary = propagate_box(predictor, slice_index, box[0], progress=progress)
            info["propagation"] = summary
        else:
            predictor.set_slice(slice_index)
            result = np.zeros(image.array.shape, np.uint8)
            index = [slice(None)] * 3
            index[axis] = slice_index
            result[tuple(index)], info["scores"] = _labelled(predictor, coords, labels, box)
        result = result.astype(np.uint8)
        # the montage reuses the predictor's once-windowed uint8 volume
        picture = volume_montage(predictor.volume.volume, result, axis, box_slice=slice_index,
                                 box=boxes[0] if boxes else None)
    write_mask(result, out, reference=image)
    if overlay_path:
        save_png(picture, overlay_path)
        info["overlay"] = str(overlay_path)
    info["mask_voxels"] = int((result > 0).sum())
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return info


def _labelled(predictor: CASamPredictor, coords, labels, box):
    """Predict on the current image; several boxes -> one label each (1, 2, ...), later on top."""
    masks, scores, _ = predictor.predict(point_coords=coords, point_labels=labels, box=box)
    result = np.zeros(masks.shape[2:], np.uint8)
    for i in range(masks.shape[0]):
        result[masks[i, 0]] = i + 1
    return result, [float(v) for v in scores[:, 0]]


def cmd_segment(args) -> dict:
    boxes = [parse_box(b) for b in args.box]
    points = [parse_point(p) for p in args.point]
    predictor = _predictor(args)
    progress = None if args.json else TqdmProgress()
    info = segment_file(predictor, args.input, args.out, boxes, points, args.slice, args.axis, args.window,
                        not args.no_propagate, args.overlay, progress)
    _echo(args, f"wrote {info['out']} ({info['mask_voxels']} foreground pixels/voxels)")
    return {"out": info["out"], "route": info["route"], "mask_voxels": info["mask_voxels"], "details": info}


# ---------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------
def cmd_demo(args) -> dict:
    """Segment the committed samples with a box on the default backbone; report Dice."""
    if not SAMPLES.is_dir():
        raise CLIError(f"the samples folder {SAMPLES} is missing (the demo runs from a source checkout)")
    out = Path(args.out)
    predictor = _predictor(args)
    progress = None if args.json else TqdmProgress()
    results = []

    # 2D: fetal head ultrasound, box = the annotation's tight box
    img_path = SAMPLES / "hc18_fetal_head" / "006_HC.png"
    gt = read_labels(SAMPLES / "hc18_fetal_head" / "006_HC_mask.png").array > 0
    box = box_from_mask(gt).tolist()
    info = segment_file(predictor, str(img_path), str(out / "hc18_006_mask.png"), [box], [],
                        overlay_path=str(out / "hc18_006_overlay.png"))
    pred = read_labels(info["out"]).array > 0
    results.append({"case": "hc18_fetal_head/006_HC (2D ultrasound)", "prompt": f"box {box}",
                    "dice": round(dice(pred, gt), 4), "out": info["out"], "overlay": info["overlay"],
                    "seconds": info["seconds"]})

    # 3D: glioma MRI, tumour core (labels 1, 3, 4: what T1c shows; edema is not visible on it),
    # box on the slice where the annotation is largest, propagated up and down
    vol_path = SAMPLES / "brats_glioma" / "brats_2013_pat0005_1.nii.gz"
    vol = read_image(vol_path)
    gt3 = np.isin(read_labels(SAMPLES / "brats_glioma" / "brats_2013_pat0005_1_mask.nii.gz", like=vol).array,
                  (1, 3, 4))
    k = int(gt3.sum(axis=(1, 2)).argmax())
    box3 = box_from_mask(gt3[k]).tolist()
    info3 = segment_file(predictor, str(vol_path), str(out / "brats_pat0005_tumour_core.nii.gz"), [box3], [],
                         slice_index=k, overlay_path=str(out / "brats_pat0005_overlay.png"), progress=progress)
    pred3 = read_labels(info3["out"], like=vol).array > 0
    results.append({"case": "brats_glioma/pat0005 (3D MRI T1c, tumour core)",
                    "prompt": f"box {box3} on slice {k}, propagated",
                    "dice": round(dice(pred3, gt3), 4), "slice_dice": round(dice(pred3[k], gt3[k]), 4),
                    "slices": len(info3["propagation"]["slices"]), "out": info3["out"],
                    "overlay": info3["overlay"], "seconds": info3["seconds"]})
    if not args.json:
        print(f"backbone {predictor.backbone.fingerprint} on {predictor.device}")
        for r in results:
            extra = f", slice Dice {r['slice_dice']:.3f}, {r['slices']} slices" if "slices" in r else ""
            print(f"{r['case']}: Dice {r['dice']:.3f}{extra} ({r['seconds']:.1f} s)\n"
                  f"    prompt: {r['prompt']}\n    mask: {r['out']}\n    overlay: {r['overlay']}")
    return {"backbone": predictor.backbone.fingerprint, "device": str(predictor.device), "results": results}


def cmd_backbones(args) -> dict:
    rows = {name: {"input": spec.img_size, "checkpoint": spec.checkpoint_name, "description": spec.description,
                   "point_prompts": spec.point_prompts} for name, spec in BACKBONES.items()}
    if not args.json:
        for name, row in rows.items():
            print(f"{name:12s} {row['input']:5d}px  {row['checkpoint']:24s} {row['description']}")
    return rows


# ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="casam", description="CA-SAM: continual alignment for SAM")
    parser.add_argument("--version", action="version", version=f"casam {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment a 2D image or a volume with box/point prompts")
    p.add_argument("input", help="image (PNG/JPEG/TIFF), volume (NIfTI/MHA/NRRD) or DICOM folder")
    p.add_argument("--out", required=True, help="mask file: .png for 2D; .nii.gz/.mha/.nrrd (geometry kept)")
    p.add_argument("--box", action="append", default=[], help="x0,y0,x1,y1 in pixels (repeatable)")
    p.add_argument("--point", action="append", default=[], help="x,y[,1|0] in pixels (repeatable)")
    p.add_argument("--slice", type=int, default=None, help="volumes: index of the prompted slice")
    p.add_argument("--axis", type=int, default=0, choices=(0, 1, 2), help="volumes: slicing axis of the array")
    p.add_argument("--window", default=None, choices=sorted(WINDOWS), help="CT window preset (Hounsfield units)")
    p.add_argument("--no-propagate", action="store_true", help="volumes: segment the prompted slice only")
    p.add_argument("--overlay", default=None, help="also write an overlay PNG here")
    p.add_argument("--json", action="store_true")
    _add_backbone_args(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("demo", help="segment the bundled samples (2D ultrasound, 3D MRI) and report Dice")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--json", action="store_true")
    _add_backbone_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("backbones", help="list the backbones")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_backbones)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (CLIError, BackboneError, ImageIOError, PromptError, ValueError, IndexError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"casam {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except Cancelled:
        print(f"casam {args.command}: cancelled", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
