"""``casam``: the command line, thin over casam_core.

Every command takes ``--json`` for machine-readable output on stdout; errors go to
stderr as one line and the exit code is non-zero.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

from .progress import INTERRUPTED_WHILE_LOADING, Terminated, interrupts_while_loading

_DEFAULT_SIGINT = interrupts_while_loading()
try:  # the libraries load for seconds: Ctrl+C meanwhile is a cancel, said in one line (not a traceback)
    from . import __version__
    from .alignment import FORMS
    from .backbones import BACKBONES, DEFAULT_BACKBONE, build_backbone
    from .batch import (SPLITS, batch_summary, check_prompt_sources, embed_inputs, list_inputs, merge_embed_reports,
                        segment_inputs)
    from .build import build_predictor
    from .config import cache_dir as default_cache_dir, library_dir
    from .datasets import read_dataset
    from .demo import run_demo
    from .distributed import DIST_FAILURES, Dist, device_for_rank, init_distributed
    from .errors import CASamError, CLIError, UnknownTask
    from .evaluate import PROMPTS, evaluate_dataset, rank_by_coverage
    from .files import write_json
    from .images import WINDOWS
    from .io import MedicalImage, image_inputs, is_dicom_folder, read_image
    from .library import TaskLibrary, TaskLibraryError
    from .predictor import CASamPredictor
    from .progress import Cancelled, TqdmProgress
    from .prompts import parse_box, parse_point
    from .runtimes import RUNTIMES
    from .samples import SAMPLES
    from .segment import segment_file
    from .task_data import load_task_data
    from .tasks import AUTO, check_task_name, describe_route, task_mode
    from .training import PROFILES, LearnConfig, learn_config, learn_task
    if INTERRUPTED_WHILE_LOADING:
        raise KeyboardInterrupt
except BaseException as exc:  # Ctrl+C, or what it broke: a library interrupted half-way fails to import after
    if not (isinstance(exc, KeyboardInterrupt) or INTERRUPTED_WHILE_LOADING):
        raise
    print("casam: cancelled", file=sys.stderr)
    raise SystemExit(130) from None
finally:
    signal.signal(signal.SIGINT, _DEFAULT_SIGINT)


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=sorted(BACKBONES),
                   help=f"frozen backbone (default {DEFAULT_BACKBONE}, bundled weights)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file for the SAM ViT backbones")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--runtime", default=None, choices=RUNTIMES,
                   help="where the image encoder and mask decoder run: auto (OpenVINO on a CPU), torch (eager, the reference) "
                        "or openvino (default $CASAM_RUNTIME or auto)")
    p.add_argument("--cache-dir", default=None,
                   help=f"on-disk embedding cache, shared with the viewer (default $CASAM_CACHE_DIR or "
                        f"{default_cache_dir()})")


def _add_library_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--library", default=None,
                   help=f"task library folder (default $CASAM_LIBRARY or {library_dir()})")


def _library(args) -> TaskLibrary:
    return TaskLibrary(getattr(args, "library", None)).check_folder()


def _dist(args) -> Dist:
    return getattr(args, "dist", None) or Dist()


def _predictor(args, with_tasks: bool = False) -> CASamPredictor:
    dist = _dist(args)
    device = device_for_rank(args.device, dist.local_rank) if dist.active else args.device
    predictor, skipped = build_predictor(args.backbone, args.checkpoint, device, cache_dir=args.cache_dir,
                                         library=_library(args) if with_tasks else None, runtime=args.runtime)
    for name, why in skipped.items() if dist.is_main else ():
        print(f"casam: task {name!r} not loaded: {why}", file=sys.stderr)
    return predictor


def _unknown_task(task: Optional[str], predictor: CASamPredictor) -> CLIError:
    return CLIError(f"unknown task {task!r}; the library has: {', '.join(predictor.layers) or 'no tasks'}")


def _echo(args, text: str) -> None:
    if not args.json:
        print(text, file=sys.stderr)


# ---------------------------------------------------------------------------------
# segment
# ---------------------------------------------------------------------------------
def segment_one(predictor: CASamPredictor, input_path: str, out: str, boxes: List[List[float]], points: List,
                slice_index: Optional[int] = None, axis: int = 0, window=None, propagate: bool = True,
                overlay_path: Optional[str] = None, progress=None, task: Optional[str] = None,
                image: Optional[MedicalImage] = None, auto: bool = False) -> dict:
    """``casam segment``'s prompts checked and said as ``segment.segment_file`` takes them: the
    boxes and points on one slice (a volume's single box alone is propagated unless
    ``propagate`` is False), or ``auto``. ``image``: the input already read (the CLI reads it
    before it builds a model, so a bad file costs nothing). Returns the report."""
    if auto and (boxes or points or slice_index is not None):
        raise CLIError("--auto segments without prompts: leave out --box, --point and --slice")
    if not auto and not boxes and not points:
        raise CLIError("give a prompt: --box x0,y0,x1,y1 and/or --point x,y[,label], or --auto (a learned task "
                       "finds its structures)")
    image = read_image(input_path) if image is None else image
    if not image.is_volume and slice_index is not None:
        raise CLIError(f"{input_path} is a 2D image: --slice is for volumes")
    if image.is_volume and not auto:
        n = image.array.shape[axis]
        if slice_index is None:
            raise CLIError(f"{input_path} is a volume: say which slice the prompt is on (--slice 0..{n - 1})")
        if not 0 <= slice_index < n:
            raise CLIError(f"--slice {slice_index} is outside 0..{n - 1} for {input_path} along axis {axis}")
    prompts = None if auto else {
        "slices": {slice_index if image.is_volume else None: {
            "boxes": [list(b) for b in boxes], "points": [[p[0][0], p[0][1], p[1]] for p in points]}},
        "propagate": bool(image.is_volume and propagate and len(boxes) == 1 and not points)}
    try:
        _, info = segment_file(predictor, image, out, prompts=prompts, auto=auto, task=task, axis=axis, window=window,
                               overlay_path=overlay_path, progress=progress)
    except UnknownTask as exc:
        raise _unknown_task(task, predictor) from exc
    choice = info.pop("route")
    return {"input": str(input_path), "out": str(out), **info, "route": choice.to_json(),
            "route_text": describe_route(choice)}


def cmd_segment(args) -> dict:
    boxes = [parse_box(b) for b in args.box]
    points = [parse_point(p) for p in args.point]
    image = read_image(args.input)  # a bad file is refused before any model is built
    predictor = _predictor(args, with_tasks=task_mode(args.task) != "frozen")
    progress = None if args.json else TqdmProgress()
    info = segment_one(predictor, args.input, args.out, boxes, points, args.slice, args.axis, args.window,
                       not args.no_propagate, args.overlay, progress, task=args.task, image=image, auto=args.auto)
    _echo(args, f"route: {info['route_text']}")
    _echo(args, f"wrote {info['out']} ({info['mask_voxels']} foreground pixels/voxels)")
    return {"out": info["out"], "route": info["route"], "mask_voxels": info["mask_voxels"], "details": info}


# ---------------------------------------------------------------------------------
# route, eval, learn, tasks
# ---------------------------------------------------------------------------------
def cmd_route_rank(args) -> dict:
    """``casam route FOLDER --rank``: every image of a folder routed, least covered first (the
    to-do list of what to annotate next)."""
    folder = Path(args.input)
    if not folder.is_dir() or is_dicom_folder(folder):
        raise CLIError(f"{args.input}: --rank takes a folder of images, volumes or DICOM series folders")
    inputs = image_inputs(folder)
    if not inputs:
        raise CLIError(f"{args.input}: no image, volume or DICOM series folder in it to rank")
    images = [(p, read_image(p)) for p in inputs]  # a bad file is refused before any model is built
    predictor = _predictor(args, with_tasks=True)
    rows = rank_by_coverage(predictor, [(str(p), im.array, im.is_volume) for p, im in images], axis=args.axis,
                            window=args.window, progress=None if args.json else TqdmProgress())
    for row in rows:
        row["input"] = row.pop("name")
    result = {"folder": str(folder), "tasks": sorted(predictor.layers), "ranked": rows,
              "uncovered": sum(not r["covered"] for r in rows)}
    if not args.json:
        print(f"{folder}: {result['uncovered']} of {len(rows)} not covered by a learned task "
              f"(least covered first: annotate these next)")
        for r in rows:
            ratio = "-" if r["score_over_tau"] is None else f"{r['score_over_tau']:.3g}"
            print(f"  {r['rank']:3d}. {Path(r['input']).name:40s} score/tau {ratio:>8s}   "
                  f"{'task ' + r['decision'] if r['covered'] else 'frozen model'}")
    return result


def cmd_route(args) -> dict:
    if args.rank:
        return cmd_route_rank(args)
    image = read_image(args.input)  # a bad file is refused before any model is built
    predictor = _predictor(args, with_tasks=True)
    if image.is_volume:
        predictor.set_volume(image.array, axis=args.axis, window=args.window)
    else:
        predictor.set_image(image.array, window=args.window)
    choice = predictor.choose_task(AUTO, progress=None if args.json else TqdmProgress())  # one route per volume
    if not args.json:
        print(f"{args.input}: {describe_route(choice)}")
        for name in sorted(choice.scores, key=choice.scores.get):
            flag = "in" if choice.scores[name] <= choice.tau[name] else "out"
            print(f"    {name:24s} score {choice.scores[name]:10.4g}   tau {choice.tau[name]:10.4g}   {flag}")
    return choice.to_json()


def cmd_eval(args) -> dict:
    task = args.task
    dataset = read_dataset(args.dataset)  # a bad dataset.json is refused before any model is built
    predictor = _predictor(args, with_tasks=task_mode(task) != "frozen")
    if task_mode(task) == "named" and task not in predictor.layers:
        raise CLIError(f"unknown task {task!r}; the library has: {', '.join(predictor.layers) or 'no tasks'}")
    progress = None if args.json else TqdmProgress()
    result = evaluate_dataset(predictor, dataset, split=args.split, task=task, limit=args.limit,
                              axis=args.axis, progress=progress, prompt=args.prompt)
    if not args.json:
        print(f"{result['dataset']} ({result['split']}, task {task}, {args.prompt} prompts): {result['n_images']} images  "
              f"IoU {result['iou']:.4f}  Dice {result['dice']:.4f}  boundary IoU {result['biou']:.4f}")
        print("routes: " + ", ".join(f"{k} {v}" for k, v in sorted(result["routes"].items())))
    return result


def cmd_learn(args) -> dict:
    library = _library(args)
    check_task_name(args.name)  # a bad name is refused now, not after the training
    library.check_writable()  # and a read-only library, or a full disk
    if args.name in library and not args.replace:
        raise CLIError(f"a task named {args.name!r} already exists in {library.root} (use --replace, "
                       f"or another name)")
    dist = _dist(args)
    config = learn_config(args.profile, steps=args.steps, epochs=args.epochs, time_budget_s=args.time_budget,
                          form=args.form, lr=args.lr, n_blocks=args.blocks, val_fraction=args.val_fraction,
                          augment_copies=args.augment_copies, seed=args.seed,
                          batch_images=args.batch_images, val_every=args.val_every)  # checked before any data is read
    if dist.active and config.batch_images < dist.world:
        if args.batch_images is not None:
            raise CLIError(f"--batch-images {config.batch_images} cannot be split over {dist.world} processes: "
                           f"give at least {dist.world} (the global batch; each process takes a share)")
        config.batch_images = dist.world  # the profile's batch is smaller than the job: one image per process
    progress = None if args.json or not dist.is_main else TqdmProgress()
    data = load_task_data(args.data, args.masks, axis=args.axis, window=args.window, limit=args.limit,
                          background_slices=args.background_slices, progress=progress)
    predictor = _predictor(args)
    if dist.active and dist.is_main and not args.json:
        print(f"casam learn: {dist.world} processes ({dist.backend}); global batch {config.batch_images} images "
              f"x {config.masks_per_image} masks, split over them", file=sys.stderr)
    task = learn_task(predictor, args.name, data, config, progress=progress, dist=dist)
    if not dist.is_main:  # one writer: rank 0
        return None
    path = library.save(task, replace=args.replace)
    card = library.card(args.name)
    if not args.json:
        v = card["validation"]
        print(f"learned task {args.name!r} -> {path}")
        print(f"    validation Dice on {v['images']} held-out images: frozen {v['dice_zero_shot']:.4f}, "
              f"aligned {v['dice_aligned']:.4f}")
        if "warning" in card:
            print(f"    WARNING: {card['warning']}")
        f = card["finder"]["validation"]
        print(f"    no prompts (--auto): held-out Dice {f['dice_auto']:.4f} vs {f['dice_box']:.4f} with the true box")
        from .tasks import describe_propagation

        print(f"    {describe_propagation(card['propagation'])}")
        print(f"    router threshold tau {card['router']['tau']:.4g}; {card['seconds']['total']:.0f} s")
    return card


def cmd_embed(args) -> Optional[dict]:
    """``casam embed DATA...``: every slice's frozen embedding into the shared cache; under
    torchrun each process takes a share of the files."""
    dist = _dist(args)
    items = list_inputs(args.data, args.split)
    predictor = _predictor(args)  # always with the on-disk cache (--cache-dir, or the default one)
    progress = None if args.json or not dist.is_main else TqdmProgress()
    row = embed_inputs(predictor, items, dist, axis=args.axis, window=args.window, progress=progress)
    rows = dist.gather_json(row)
    if not dist.is_main:
        return None
    result = merge_embed_reports(rows, predictor.disk.root, predictor.disk.max_bytes)
    if not args.json:
        print(f"{result['files']} files, {result['slices']} slices: {result['computed']} embedded, "
              f"{result['already_cached']} already cached, by {result['processes']} process(es) in "
              f"{result['seconds']:.1f} s -> {result['cache']}")
    if result["pruned"]:
        print(f"casam embed: warning: the cache's size bound ({result['cache_limit_bytes'] / 1e9:.1f} GB) is smaller "
              f"than this archive: {result['pruned']} entries were deleted to keep it (raise $CASAM_CACHE_MAX_GB)",
              file=sys.stderr)
    if result["failed"]:
        first = result["failed"][0]
        raise CLIError(f"{len(result['failed'])} of {len(items)} inputs could not be embedded (the others are "
                       f"cached); first: {first['error']}")
    return result


def cmd_segment_batch(args) -> Optional[dict]:
    """``casam segment-batch INPUT... --out DIR``: every input segmented from its prompt file or
    coarse mask; under torchrun each process takes a share; one summary JSON."""
    dist = _dist(args)
    items = list_inputs(args.inputs, args.split)
    check_prompt_sources(args.prompts, args.coarse, args.reference, args.auto)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file: give a folder for the masks")
    summary_path = Path(args.summary) if args.summary else out / "summary.json"
    predictor = _predictor(args, with_tasks=task_mode(args.task) != "frozen")
    if task_mode(args.task) == "named" and args.task not in predictor.layers:
        raise _unknown_task(args.task, predictor)
    progress = None if args.json or not dist.is_main else TqdmProgress()
    t0 = time.perf_counter()
    rows = segment_inputs(predictor, items, out, args.task, args.prompts and Path(args.prompts),
                          args.coarse and Path(args.coarse), args.reference and Path(args.reference), dist,
                          axis=args.axis, window=args.window, progress=progress, auto=args.auto)
    rows = [r for part in dist.gather_json(rows) for r in part]
    if not dist.is_main:
        return None
    summary = batch_summary(rows, items, out, args.task, dist.world, time.perf_counter() - t0)
    write_json(summary, summary_path)
    summary["summary"] = str(summary_path)
    if not args.json:
        mean = "" if summary["mean_dice"] is None else f", mean Dice {summary['mean_dice']:.4f}"
        print(f"{summary['done']} segmented, {summary['exists']} already done, {summary['errors']} failed "
              f"({dist.world} process(es), {summary['seconds']:.1f} s){mean} -> {out}; summary {summary_path}")
    if summary["errors"]:
        first = next(r for r in summary["images"] if r["status"] == "error")
        raise CLIError(f"{summary['errors']} of {summary['inputs']} inputs failed (see {summary_path}); "
                       f"first: {first['error']}")
    return summary


def cmd_tasks(args) -> dict:
    library = _library(args)
    action = args.action
    if action == "list":
        rows = []
        for name in library.names():
            try:
                c = library.card(name)
                rows.append({"name": name, "backbone": c.get("backbone_fingerprint"), "modality": c.get("modality"),
                             "labels": c.get("labels"), "use_alignment": c.get("use_alignment"),
                             "validation": c.get("validation"), "created": c.get("created")})
            except TaskLibraryError as exc:
                rows.append({"name": name, "error": str(exc)})
        if not args.json:
            print(f"{library.root}: {len(rows)} task(s)")
            for r in rows:
                if "error" in r:
                    print(f"  {r['name']:24s} unreadable: {r['error']}")
                    continue
                v = r["validation"] or {}
                print(f"  {r['name']:24s} {r['backbone']}  {r['modality'] or ''}  Dice frozen "
                      f"{v.get('dice_zero_shot', float('nan')):.3f} -> aligned {v.get('dice_aligned', float('nan')):.3f}"
                      f"{'' if r['use_alignment'] else '  (routes to frozen)'}")
        return {"library": str(library.root), "tasks": rows}
    if not args.args:
        raise CLIError(f"casam tasks {action} needs a task name")
    name = args.args[0]
    if action == "show":
        card = library.card(name)
        if not args.json:
            print(json.dumps(card, indent=2))
        return card
    if action == "remove":
        library.remove(name)
        _echo(args, f"removed task {name!r} from {library.root}")
        return {"removed": name}
    if action == "rename":
        if len(args.args) != 2:
            raise CLIError("casam tasks rename OLD NEW")
        library.rename(name, args.args[1])
        _echo(args, f"renamed task {name!r} to {args.args[1]!r}")
        return {"renamed": name, "to": args.args[1]}
    if action == "export":
        out = args.args[1] if len(args.args) > 1 else f"{name}.casam-task"
        path = library.export(name, out)
        _echo(args, f"exported task {name!r} to {path}")
        return {"exported": name, "pack": str(path)}
    if action == "import":
        fingerprint = None
        if not args.any_backbone:
            fingerprint = build_backbone(args.backbone, args.checkpoint, "cpu", runtime="torch").fingerprint
        task = library.import_pack(name, fingerprint=fingerprint, name=args.name)
        _echo(args, f"imported task {task.name!r} into {library.root}")
        return {"imported": task.name, "card": task.card}
    raise CLIError(f"unknown action {action!r}")


# ---------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------
def cmd_demo(args) -> dict:
    """Segment the committed samples with a box on the default backbone; report Dice."""
    if not SAMPLES.is_dir():
        raise CLIError(f"the samples folder {SAMPLES} is missing (the demo runs from a source checkout)")
    predictor = _predictor(args)
    results = run_demo(predictor, Path(args.out), None if args.json else TqdmProgress())
    if not args.json:
        print(f"backbone {predictor.backbone.fingerprint} on {predictor.device}; encoder: "
              f"{predictor.backbone.runtime_note}")
        for r in results:
            extra = f", slice Dice {r['slice_dice']:.3f}, {r['slices']} slices" if "slices" in r else ""
            print(f"{r['case']}: Dice {r['dice']:.3f}{extra} ({r['seconds']:.1f} s)\n"
                  f"    prompt: {r['prompt']}\n    mask: {r['out']}\n    overlay: {r['overlay']}")
    return {"backbone": predictor.backbone.fingerprint, "device": str(predictor.device),
            "runtime": predictor.backbone.runtime_note, "results": results}


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
    p.add_argument("--task", default=AUTO, help="auto (the router decides), none (frozen model) or a task name")
    p.add_argument("--auto", action="store_true",
                   help="no prompts: the learned task (routed or --task) finds its structures; a label map")
    p.add_argument("--json", action="store_true")
    _add_backbone_args(p)
    _add_library_args(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("route", help="which learned task an image or volume belongs to (scores, tau, decision)")
    p.add_argument("input", help="2D image, volume or DICOM folder (with --rank: a folder of them)")
    p.add_argument("--rank", action="store_true",
                   help="route every image of the folder INPUT, least covered by a learned task first")
    p.add_argument("--axis", type=int, default=0, choices=(0, 1, 2), help="volumes: slicing axis of the array")
    p.add_argument("--window", default=None, choices=sorted(WINDOWS), help="CT window preset")
    p.add_argument("--json", action="store_true")
    _add_backbone_args(p)
    _add_library_args(p)
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("eval", help="the paper's evaluation (GT boxes, or one click per object) on a dataset folder")
    p.add_argument("dataset", help="folder with dataset.json (the ../shared/data format)")
    p.add_argument("--prompt", default="box", choices=PROMPTS,
                   help="box: the tight GT box of each object (the paper's protocol); point: one positive click "
                        "per object at its pixel nearest the centroid, no box")
    p.add_argument("--split", default="test")
    p.add_argument("--task", default=AUTO, help="auto (routed), none (frozen model) or a task name")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N cases only")
    p.add_argument("--axis", type=int, default=0, choices=(0, 1, 2), help="volumes: slicing axis of the array")
    p.add_argument("--json", action="store_true")
    _add_backbone_args(p)
    _add_library_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("learn", help="learn a new task (Alignment Layer + router) from annotated data")
    p.add_argument("name", help="task name (letters, digits, _ - .)")
    p.add_argument("data", nargs="+", help="a dataset folder (dataset.json), a folder of 2D images, or volumes")
    p.add_argument("--masks", action="append", default=[],
                   help="the folder of masks (matched by file stem), or one label volume per volume, in order")
    p.add_argument("--profile", default="fast", choices=PROFILES,
                   help=f"fast: the product's recipe (identity-start {LearnConfig.form} layer, up to "
                        f"{LearnConfig.steps} steps of {LearnConfig.batch_images} image x {LearnConfig.masks_per_image} "
                        f"masks, at most {LearnConfig.time_budget_s:.0f} s of training, the best layer on the "
                        "held-out images); paper: "
                        "method.md's recipe (paper init, Adam 1e-4, 24 epochs of 6 images x 5 masks; for a GPU)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (overrides the profile's budget)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs, when no step budget is set")
    p.add_argument("--time-budget", type=float, default=None, help="at most this many seconds of training")
    p.add_argument("--form", default=None, choices=FORMS, help="Alignment Layer form (default: the profile's)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the profile's)")
    p.add_argument("--blocks", type=int, default=None,
                   help=f"CAResBlocks in the Alignment Layer (default {LearnConfig.n_blocks}, the paper's)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help=f"share of annotated images held out (default {LearnConfig.val_fraction})")
    p.add_argument("--augment-copies", type=int, default=None,
                   help=f"intensity-augmented copies per training image (default {LearnConfig.augment_copies})")
    p.add_argument("--limit", type=int, default=None, help="use the first N cases only")
    p.add_argument("--background-slices", type=int, default=None,
                   help="volumes: at most N slices without annotation feed the router (default all)")
    p.add_argument("--axis", type=int, default=0, choices=(0, 1, 2), help="volumes: slicing axis of the array")
    p.add_argument("--window", default=None, choices=sorted(WINDOWS), help="CT window preset")
    p.add_argument("--val-every", type=int, default=None,
                   help=f"score the held-out images every N steps and keep the best layer (default "
                        f"{LearnConfig.val_every}; 0: keep the last)")
    p.add_argument("--batch-images", type=int, default=None,
                   help=f"images per step, over all processes under torchrun (default {LearnConfig.batch_images}, "
                        "or one per process)")
    p.add_argument("--seed", type=int, default=None, help=f"random seed (default {LearnConfig.seed})")
    p.add_argument("--replace", action="store_true", help="replace a task of the same name")
    p.add_argument("--json", action="store_true")
    _add_backbone_args(p)
    _add_library_args(p)
    p.set_defaults(func=cmd_learn, distributed=True)

    p = sub.add_parser("embed", help="precompute the frozen embeddings of datasets, images or volumes into the "
                                     "on-disk cache (shared by torchrun processes)")
    p.add_argument("data", nargs="+", help="dataset folders (dataset.json), folders of images/volumes, images, "
                                           "volumes or DICOM series folders")
    p.add_argument("--split", default="all", choices=SPLITS, help="dataset folders: which cases (default all)")
    p.add_argument("--axis", type=int, default=0, choices=(0, 1, 2), help="volumes: slicing axis of the array")
    p.add_argument("--window", default=None, choices=sorted(WINDOWS), help="CT window preset")
    p.add_argument("--json", action="store_true")
    _add_backbone_args(p)
    p.set_defaults(func=cmd_embed, distributed=True)

    p = sub.add_parser("segment-batch", help="segment many images or volumes from prompt files or coarse masks "
                                             "(sharded under torchrun); one summary JSON")
    p.add_argument("inputs", nargs="+", help="dataset folders, folders of images/volumes, images, volumes or "
                                             "DICOM series folders")
    p.add_argument("--out", required=True, help="folder for the masks (<name>_mask.png, .nii.gz, ... or .dcm)")
    p.add_argument("--prompts", default=None,
                   help="folder of prompt files <name>.json: {\"boxes\": [[x0,y0,x1,y1]], \"points\": [[x,y,1]]}; "
                        "volumes: {\"slices\": {\"12\": {...}}, \"propagate\": true}")
    p.add_argument("--coarse", default=None,
                   help="folder of coarse masks <name>.*: each label's box on each slice is the prompt")
    p.add_argument("--reference", default=None, help="folder of reference masks <name>.*: Dice in the summary "
                                                     "(dataset folders bring their own)")
    p.add_argument("--summary", default=None, help="summary JSON (default OUT/summary.json)")
    p.add_argument("--split", default="test", choices=SPLITS, help="dataset folders: which cases (default test)")
    p.add_argument("--task", default=AUTO, help="auto (the router decides), none (frozen model) or a task name")
    p.add_argument("--auto", action="store_true",
                   help="no prompts: each input segmented by its learned task's finder (routed or --task)")
    p.add_argument("--axis", type=int, default=0, choices=(0, 1, 2), help="volumes: slicing axis of the array")
    p.add_argument("--window", default=None, choices=sorted(WINDOWS), help="CT window preset")
    p.add_argument("--json", action="store_true")
    _add_backbone_args(p)
    _add_library_args(p)
    p.set_defaults(func=cmd_segment_batch, distributed=True)

    p = sub.add_parser("tasks", help="the task library: list, show, remove, rename, export, import")
    p.add_argument("action", choices=("list", "show", "remove", "rename", "export", "import"))
    p.add_argument("args", nargs="*", help="show/remove NAME; rename OLD NEW; export NAME [PACK]; import PACK")
    p.add_argument("--name", default=None, help="import: the name to give the imported task")
    p.add_argument("--any-backbone", action="store_true",
                   help="import: skip the check that the task fits --backbone (it is checked again on use)")
    p.add_argument("--json", action="store_true")
    _add_backbone_args(p)
    _add_library_args(p)
    p.set_defaults(func=cmd_tasks)

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
    args.dist = Dist()
    where = ""
    try:
        previous = signal.signal(signal.SIGTERM, Terminated.raise_it)
    except ValueError:  # not the main thread: the caller's handling stays
        previous = None
    try:
        if getattr(args, "distributed", False):  # under torchrun: this process's place in the job
            args.dist = init_distributed(args.device)
            where = f" [{args.dist.describe()}]" if args.dist.active else ""
        result = args.func(args)
    except DIST_FAILURES as exc:  # a peer process died or hung up mid-job (torchrun stops the others)
        why = str(exc).splitlines()[0][:200] if isinstance(exc, CASamError) else \
            f"a peer process stopped or hung up ({str(exc).splitlines()[0][:160]})"
        kept = ("nothing was written to the task library" if args.command == "learn"
                else "finished outputs are kept and a rerun skips them")
        print(f"casam {args.command}{where}: error: {why}; {kept}", file=sys.stderr)
        return 1
    except (CASamError, OSError) as exc:  # the user's input or files; anything else is a bug: traceback
        print(f"casam {args.command}{where}: error: {exc}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt, Terminated) as exc:
        how = "stopped by SIGTERM" if isinstance(exc, Terminated) else "cancelled"
        kept = (" (nothing was written to the task library)" if args.command == "learn" else
                "; finished outputs are kept and a rerun skips them" if args.command in ("segment-batch", "embed")
                else "")
        print(f"casam {args.command}{where}: {how}{kept}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        args.dist.close()
    if args.json and result is not None:  # under torchrun, rank 0 reports
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
