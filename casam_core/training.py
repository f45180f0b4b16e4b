"""Learning one task: an Alignment Layer (only it learns) and the task's router VAE.

    data = load_task_data(["../shared/data/kvasir_polyp"])          # casam_core.task_data
    task = learn_task(predictor, "kvasir", data, learn_config(epochs=24), progress, cancel)
    TaskLibrary().save(task)                                         # atomic; nothing before

The recipe is method.md's "Training one task": Adam 1e-4, batches of 6 images x 5 masks,
prompts 50/50 one positive point (from the half of the mask nearest its centroid) or the
box of the largest connected region shifted by up to 5 px at 1024 scale, Focal + Dice +
IoU-MSE, gradients through the frozen decoder into the layer. The frozen embeddings are
computed once (through the predictor's caches) and the layer trains on them.

Our choices, documented in README: the loss is computed on the decoder's 256 x 256
low-resolution logits against the mask resized to that grid (the decoder's native
output, 16x fewer pixels than 1024 x 1024); a validation part of the annotated images is
held out and the task routes to the frozen model when the layer does not beat it there
("never worse than frozen"); intensity augmentation is a number of fixed augmented copies
per training image, embedded once (``augment_copies``, default 0: see README for why).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import __version__
from .alignment import FORMS, MAX_BLOCKS, PAPER, RESIDUAL, AlignmentLayer, count_parameters, run_layer
from .distributed import Dist
from .evaluate import ESTIMATE, object_metrics
from .finder import STEPS as FINDER_STEPS
from .learn_structures import choose_propagation, learn_finder
from .errors import OptionError, TaskDataError, check_number, look_up_option
from .predictor import CASamPredictor, ImageRecord
from .progress import CancelFn, ProgressFn, check_cancel, report
from .prompts import object_masks
from .router import BETA, fit_threshold, router_feature, train_vae
from .task_data import TaskData, source_file
from .losses import TrainingObject, augment_intensity, objects_for, task_loss
from .tasks import Task, check_task_name

# ---------------------------------------------------------------------------------
# learning
# ---------------------------------------------------------------------------------
@dataclass
class LearnConfig:
    """How one task is learned. The defaults are the product's recipe (README, "Choosing the
    learning recipe"); ``LearnConfig.paper()`` is method.md's recipe (the GPU profile).

    Budget: ``steps`` optimiser steps if set, else ``epochs`` passes over the training
    images; ``time_budget_s`` (if set) caps the training time: after the first steps the
    schedule is shortened to what fits. ``val_every`` > 0 scores the held-out images every
    that many steps (and at the end) and keeps the layer that scored best.
    """

    epochs: int = 24
    batch_images: int = 1
    masks_per_image: int = 5
    lr: float = 3e-4
    point_fraction: float = 0.5  # share of steps prompted by one click (else a jittered box)
    click_prompt: str = "box"  # a click step's prompt: "point" (method.md) or "box" (the click_box, below)
    jitter_px: float = 5.0  # box shift, in pixels at 1024 scale
    form: str = RESIDUAL  # RESIDUAL (identity start), PAPER (PyTorch default init) or GATED (alignment.FORMS)
    n_blocks: int = 3
    val_fraction: float = 0.2
    augment_copies: int = 0
    seed: int = 0
    vae_epochs: int = 10
    steps: Optional[int] = 200
    time_budget_s: Optional[float] = 120.0
    warmup_steps: int = 5
    schedule: str = "cosine"  # "cosine" (after the warm-up) or "constant"
    val_every: int = 25
    val_max_objects: int = 16  # per held-out image, for the checks during training
    val_final_max_objects: int = 64  # per held-out image, for frozen vs learned (decoding is ~80 ms an object on a CPU)
    finder_steps: Optional[int] = None  # the structure finder's steps; None: 2.5 x the layer's step budget, 25..500

    def check(self) -> "LearnConfig":
        """Every field within its range (an ``OptionError`` naming it otherwise); returns self."""
        look_up_option(self.form, FORMS, "layer form")
        look_up_option(self.schedule, SCHEDULES, "schedule")
        look_up_option(self.click_prompt, CLICK_PROMPTS, "click prompt")
        for name, low, high, low_open in _LIMITS:
            value = getattr(self, name)
            if value is None and name in ("steps", "time_budget_s", "finder_steps"):  # no step / time budget
                continue
            check_number(value, _LIMIT_NAMES.get(name, name), low, high,
                         integer=isinstance(low, int) and isinstance(high, int), low_open=low_open)
        return self

    @classmethod
    def paper(cls, **overrides) -> "LearnConfig":
        """method.md's recipe: paper init, Adam 1e-4, 24 epochs of 6 images x 5 masks, no
        schedule, the last epoch's weights."""
        base = dict(epochs=24, batch_images=6, lr=1e-4, form=PAPER, steps=None, time_budget_s=None,
                    warmup_steps=0, schedule="constant", val_every=0, click_prompt="point")
        base.update(overrides)
        return cls(**base)


SCHEDULES = ("cosine", "constant")
# (field, low, high, low bound excluded): bounds that keep a typo from running for days or writing nonsense
_LIMITS = (("epochs", 1, 10_000, False), ("steps", 1, 1_000_000, False), ("time_budget_s", 0.0, 7 * 24 * 3600.0, True),
           ("lr", 0.0, 1.0, True), ("n_blocks", 1, MAX_BLOCKS, False), ("val_fraction", 0.0, 0.5, True),
           ("augment_copies", 0, 16, False), ("batch_images", 1, 64, False), ("masks_per_image", 1, 64, False),
           ("seed", 0, 2**32 - 1, False), ("point_fraction", 0.0, 1.0, False), ("jitter_px", 0.0, 1024.0, False),
           ("vae_epochs", 1, 10_000, False), ("warmup_steps", 0, 1_000_000, False), ("val_every", 0, 1_000_000, False),
           ("val_max_objects", 1, 100_000, False), ("val_final_max_objects", 1, 100_000, False),
           ("finder_steps", 1, 1_000_000, False))
_LIMIT_NAMES = {"time_budget_s": "the time budget (seconds)", "lr": "the learning rate", "n_blocks": "blocks",
                "val_fraction": "the validation fraction", "augment_copies": "augmented copies"}
CLICK_PROMPTS = ("box", "point")
PROFILES = ("fast", "paper")


def learn_config(profile: str = "fast", **overrides) -> LearnConfig:
    """The recipe of a profile with some fields overridden (None = keep the profile's; an
    ``epochs`` override without ``steps`` makes the budget epochs):
    ``fast`` is the product's default (minutes on a CPU), ``paper`` method.md's recipe."""
    look_up_option(profile, PROFILES, "learning profile")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "epochs" in overrides and "steps" not in overrides:  # an epoch budget replaces a step budget
        overrides["steps"] = None
    return (LearnConfig.paper(**overrides) if profile == "paper" else LearnConfig(**overrides)).check()


def validation_split(annotated: List[int], fraction: float,
                     sources: Optional[List[str]] = None) -> Tuple[List[int], List[int]]:
    """Held-out images among the annotated ones (deterministic).

    When the slices come from 3 or more files (volumes) and some file gave several slices,
    whole files are held out, evenly spaced: neighbouring slices of one volume are nearly
    the same image, so holding out single slices would measure memory, not what a layer does
    on the next patient. Otherwise evenly spaced images (spanning a volume) are held out.
    """
    n = len(annotated)
    if n < 2:
        raise TaskDataError("at least 2 annotated images or slices are needed (one is held out to validate)")
    if sources is not None:
        groups: Dict[str, List[int]] = {}
        for i in annotated:
            groups.setdefault(source_file(sources[i]), []).append(i)
        if len(groups) >= 3 and len(groups) < n:
            names = list(groups)
            n_val = min(len(names) - 2, max(1, int(round(fraction * len(names)))))
            pick = sorted(set(np.linspace(0, len(names) - 1, n_val + 2)[1:-1].round().astype(int).tolist()))
            val = sorted(i for k in pick for i in groups[names[k]])
            held = set(val)
            return [i for i in annotated if i not in held], val
    n_val = min(n - 1, max(1, int(round(fraction * n))))
    pick = set(np.linspace(0, n - 1, n_val + 2)[1:-1].round().astype(int).tolist()) if n_val < n - 1 else None
    if pick is None or len(pick) < n_val:
        pick = set(np.linspace(0, n - 1, n_val).round().astype(int).tolist())
    val = [annotated[i] for i in sorted(pick)]
    train = [i for i in annotated if i not in set(val)]
    return train, val


def batch_loss(backbone, z: torch.Tensor, batch: List[int], per_image: Dict[int, List[TrainingObject]],
               config: LearnConfig, rng: np.random.Generator, use_point: bool,
               mask_decoder: Optional[torch.nn.Module] = None,
               click_box: Optional[Tuple[float, float]] = None, own: Optional[Sequence[int]] = None,
               world: int = 1) -> torch.Tensor:
    """The task loss of one batch: ``z`` (B, 256, 64, 64) decoder features of the images ``batch``;
    ``masks_per_image`` objects per image, each with its own prompt: a jittered box, or (``use_point``)
    one click drawn from the half of the mask nearest its centroid, given as a point
    (``click_prompt="point"``) or as a box of ``click_box`` (w, h; fractions of the long side)
    centred on it (``"box"``), the way a learned task decodes a click.

    Data parallel (``world`` processes): ``own`` lists the positions in ``batch`` this process
    decodes, and ``z`` holds only theirs, in that order. The prompts of every image are still
    drawn, so ``rng`` stays the same on every process, and the loss is scaled so that the
    average over the processes (DistributedDataParallel's) is the whole batch's loss."""
    device = backbone.device
    low = 4 * backbone.embedding_shape[1]
    img_size = backbone.img_size
    scale = img_size / low
    jitter = config.jitter_px * img_size / 1024.0
    row = {b: k for k, b in enumerate(range(len(batch)) if own is None else own)}
    loss = 0.0
    for b, i in enumerate(batch):
        objs = per_image[i]
        pick = rng.choice(len(objs), config.masks_per_image, replace=len(objs) < config.masks_per_image)
        chosen = [objs[k] for k in pick]
        target = torch.stack([o.target for o in chosen]).to(device)
        points = boxes_t = None
        if use_point and config.click_prompt == "box" and click_box is not None:
            pts = np.stack([o.near_points[rng.integers(len(o.near_points))] for o in chosen])
            half = np.array(click_box) * low / 2
            boxes_t = torch.as_tensor(np.clip(np.concatenate([pts - half, pts + half], 1) * scale, 0, img_size - 1),
                                      dtype=torch.float32, device=device)
        elif use_point:
            pts = np.stack([o.near_points[rng.integers(len(o.near_points))] for o in chosen])[:, None]
            coords = torch.as_tensor(pts * scale, dtype=torch.float32, device=device)
            points = (coords, torch.ones(coords.shape[:2], dtype=torch.int, device=device))
        else:
            boxes = []
            for o in chosen:
                x0, y0, x1, y1 = o.box * scale
                lim = min(jitter, 0.5 * min(x1 - x0, y1 - y0))
                dx, dy = rng.uniform(-lim, lim, 2) if lim > 0 else (0.0, 0.0)
                boxes.append([x0 + dx, y0 + dy, x1 + dx, y1 + dy])
            boxes_t = torch.as_tensor(np.clip(boxes, 0, img_size - 1), dtype=torch.float32, device=device)
        if b not in row:  # another process decodes this image
            continue
        logits, iou = backbone.decode(z[row[b]:row[b] + 1], points, boxes_t, None, False, mask_decoder)
        loss = loss + task_loss(logits[:, 0].float(), iou[:, 0].float(), target)
    return loss * world / len(batch)


@dataclass
class FitResult:
    steps: int
    last_loss: float
    best_step: Optional[int] = None  # the step whose layer was kept (None: the last)
    best_score: Optional[float] = None
    history: List[Tuple[int, float]] = field(default_factory=list)  # (step, held-out score)
    stopped_by_time: bool = False


def _lr_factor(step: int, total: int, config: LearnConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total`` (or constant)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant" or total <= config.warmup_steps:
        return 1.0
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def learning_arithmetic(backbone) -> str:
    """The arithmetic of a learning step's forward pass: "bfloat16" (autocast; the backward pass
    follows it) on a CPU where the backbone's decoder runs in bfloat16 (a CPU that computes it
    natively, ``$CASAM_PRECISION`` not "f32", the eager runtime not asked for; its speed:
    ``benchmarks/results/learn_arithmetic_cpu.md``), else "float32". The weights, their gradients, the
    optimiser and the loss stay float32; the held-out checks run the layer as use does
    (``alignment.run_layer``: bfloat16 autocast on the same CPUs)."""
    bf16 = backbone.device.type == "cpu" and backbone.layer_dtype == torch.bfloat16
    return "bfloat16" if bf16 else "float32"


def fit(backbone, z_all: Sequence[torch.Tensor], per_image: Dict[int, List[TrainingObject]], config: LearnConfig,
        rng: np.random.Generator, layer: Optional[torch.nn.Module] = None,
        mask_decoder: Optional[torch.nn.Module] = None, penalty=None,
        progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
        validate=None, click_box: Optional[Tuple[float, float]] = None, dist: Optional[Dist] = None) -> FitResult:
    """The training loop on cached embeddings.

    Trains ``layer`` (an Alignment Layer, the product) or, for the benchmark's baselines, a
    copy of the mask decoder (``mask_decoder``, with ``layer`` None); ``penalty()`` adds a
    regulariser (EWC). ``per_image`` maps an index of ``z_all`` to that image's objects.
    Budget, schedule and ``validate`` (a function of the module returning a held-out score,
    higher is better; the best-scoring weights are restored at the end) follow ``config``.

    ``dist`` (a torchrun job, the layer only): each batch of ``batch_images`` images is split
    over the processes and ``layer`` trains wrapped in DistributedDataParallel; every process
    draws the same batches and prompts, so the steps are those of one process with the same
    batch and seed. ``validate`` must then give the same score on every process.
    """
    look_up_option(config.schedule, SCHEDULES, "schedule")
    look_up_option(config.click_prompt, CLICK_PROMPTS, "click prompt")
    device = backbone.device
    module = layer if layer is not None else mask_decoder
    dist = dist or Dist()
    forward = layer
    if dist.active:
        if layer is None:
            raise OptionError("data-parallel training is for an Alignment Layer, not a decoder copy")
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(layer, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr)
    images = sorted(per_image)
    steps_per_epoch = math.ceil(len(images) / config.batch_images)
    total = int(config.steps) if config.steps else steps_per_epoch * config.epochs
    if total < 1:
        raise OptionError(f"the training budget must be at least one step, got {total}")
    result = FitResult(0, float("nan"))
    best_state = None
    autocast = learning_arithmetic(backbone) == "bfloat16"  # the forward pass; weights, Adam and loss stay float32
    check_every = config.val_every if validate is not None else 0

    def check(step: int) -> None:
        nonlocal best_state
        module.eval()
        score = float(validate(module))
        module.train()
        result.history.append((step, score))
        if result.best_score is None or score > result.best_score:
            result.best_score, result.best_step = score, step
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}

    if check_every:
        check(0)
    t0 = time.perf_counter()
    planned, paced = total, (t0, 0)  # paced: (time, step) of the last fit to the budget
    order: List[int] = []
    step = 0
    while step < total:
        if not order:
            order = rng.permutation(images).tolist()
        batch, order = order[:config.batch_images], order[config.batch_images:]
        check_cancel(cancel)
        for group in opt.param_groups:
            group["lr"] = config.lr * _lr_factor(step, total, config)
        use_point = rng.random() < config.point_fraction
        own = dist.shard(range(len(batch)))
        z = torch.stack([z_all[batch[b]] for b in (own or [0])]).to(device)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if forward is not None:
                z = forward(z)
            if own:
                loss = batch_loss(backbone, z, batch, per_image, config, rng, use_point, mask_decoder, click_box,
                                  own=own, world=dist.world)
            else:  # a short last batch left this process nothing: it still joins the gradient average
                batch_loss(backbone, z[:0], batch, per_image, config, rng, use_point, mask_decoder, click_box,
                           own=own, world=dist.world)  # (draws the same prompts as the others)
                loss = z.float().sum() * 0.0
        if penalty is not None:
            loss = loss + penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        result.steps = step
        result.last_loss = float(loss.detach()) if not dist.active else dist.sum([float(loss.detach())])[0] / dist.world
        if config.time_budget_s and (step == min(3, planned) or step % 10 == 0 or step == total):
            # fit the schedule to the time budget after 3 steps, and again every 10 steps and before
            # stopping, at the pace of the steps since the last fit: a few slow steps (another program
            # busy for a moment) cut learning to 38 of 200 steps when the budget was fitted only once
            now = time.perf_counter()
            pace = dist.max((now - paced[0]) / (step - paced[1]))  # the slowest process sets the pace
            left = config.time_budget_s - dist.max(now - t0)
            total = max(step, min(planned, step + int(left / pace)))
            result.stopped_by_time, paced = total < planned, (now, step)
        epoch = 1 + (step - 1) // steps_per_epoch
        report(progress, step, total, f"training: step {step}/{total} (epoch {epoch}) loss {result.last_loss:.4f}")
        if check_every and (step % check_every == 0 or step == total):
            check(step)
    if best_state is not None:
        module.load_state_dict(best_state)
    return result


def learn_task(predictor: CASamPredictor, name: str, data: TaskData, config: Optional[LearnConfig] = None,
               progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
               dist: Optional[Dist] = None) -> Task:
    """Learn one task's Alignment Layer and router VAE from ``data``. Writes nothing.

    Progress messages: ``embedding: ...``, ``training: epoch e/E loss x``, ``router: ...``.
    ``cancel`` is checked between every unit of work; it raises ``Cancelled``.

    ``dist`` (every process of a torchrun job calls this with the same data and config): the
    images are embedded once, each by one process, and sent to the others; each batch is
    split over the processes (``fit``); the held-out checks are split too and summed, so
    every process keeps the same layer. Every process returns the same task; one saves it.
    """
    dist = dist or Dist()
    config = config or LearnConfig()
    check_task_name(name)
    config.check()
    backbone = predictor.backbone
    device = predictor.device
    rng = np.random.default_rng(config.seed)
    t_start = time.perf_counter()

    # 1. frozen embeddings, once (the predictor's caches: memory and optional disk)
    annotated = [i for i, s in enumerate(data.slices) if s.annotated]
    train_idx, val_idx = validation_split(annotated, config.val_fraction, [s.source for s in data.slices])
    n_aug = config.augment_copies * len(train_idx)
    total = len(data.slices) + n_aug
    records: List[ImageRecord] = []
    z_all: List[torch.Tensor] = []

    def embed(rgb: np.ndarray) -> None:
        owner = dist.owner(len(records))
        if owner == dist.rank:
            rec = predictor.embed_rgb(rgb)
            z = predictor.embedding(rec).detach().clone()
        else:  # another process embeds it: its record (key, sizes) is computed here, its tensor sent
            rec = predictor.record_of(rgb)
            z = torch.empty(backbone.embedding_shape, dtype=torch.float32, device=device)
        records.append(rec)
        z_all.append(dist.broadcast(z, owner))

    for i, s in enumerate(data.slices):
        check_cancel(cancel)
        embed(s.rgb)
        report(progress, i + 1, total, f"embedding: {i + 1}/{total}")
    router_features = torch.stack([router_feature(z) for z in z_all]).cpu()
    aug_of: Dict[int, int] = {}
    for k in range(config.augment_copies):
        for i in train_idx:
            check_cancel(cancel)
            aug_of[len(records)] = i
            embed(augment_intensity(data.slices[i].rgb, rng))
            report(progress, len(records), total, f"embedding: {len(records)}/{total} (augmented copies)")
    t_embed = time.perf_counter() - t_start

    # 2. objects and prompts of the training images, on the decoder's low-res grid
    low = 4 * backbone.embedding_shape[1]
    img_size = backbone.img_size
    per_image: Dict[int, List[TrainingObject]] = {}
    for i in train_idx + list(aug_of):
        src = aug_of.get(i, i)
        objs = objects_for(data.slices[src].labels, data.objects, records[i], img_size, low, i)
        if objs:
            per_image[i] = objs
    if not per_image:
        raise TaskDataError("no training object is large enough to learn from at the decoder's resolution")
    # the task's typical object size (median box width and height, fractions of the long side):
    # a click on this task's images is decoded as a box of this size centred on it
    sizes = np.array([o.box[2:] - o.box[:2] for objs in per_image.values() for o in objs], dtype=np.float64)
    click_box = tuple(float(round(v, 4)) for v in np.clip(np.median(sizes, 0) / low, 1.0 / low, 1.0))

    # 3. held-out objects: fixed subsets for the final frozen-vs-learned check and for the
    #    checks during training (instance sets have hundreds of objects per image)
    sub_rng = np.random.default_rng(config.seed + 1)

    def subset(objs: list, n: int) -> list:
        return [objs[k] for k in sorted(sub_rng.choice(len(objs), n, replace=False))] if n and len(objs) > n else objs

    val_objs = {i: subset(object_masks(data.slices[i].labels, data.objects), config.val_final_max_objects)
                for i in val_idx}
    val_sub = {i: subset(o, config.val_max_objects) for i, o in val_objs.items()}

    def features(layer: Optional[AlignmentLayer], i: int) -> torch.Tensor:
        z = z_all[i][None].to(device)
        if layer is not None:
            with torch.inference_mode():
                z = run_layer(layer, z, backbone.layer_dtype)  # in use's arithmetic
        return z

    def held_out(layer: Optional[AlignmentLayer], objs=None, prompt: str = "box", metrics=("dice",),
                 **click_decoding) -> Dict[str, float]:
        """The mean of each of ``metrics`` over the held-out objects (``object_metrics``' names)."""
        sums, count = [0.0] * len(metrics), 0
        for i in dist.shard(val_idx):  # each process scores its share; the sums make the mean
            check_cancel(cancel)
            got = object_metrics(predictor, features(layer, i), records[i], (objs or val_objs)[i], prompt,
                                 metrics, **click_decoding)
            sums = [a + float(np.sum(got[m])) for a, m in zip(sums, metrics)]
            count += len(got[metrics[0]])
        *totals, count = dist.sum(sums + [count])
        return {m: (v / count if count else float("nan")) for m, v in zip(metrics, totals)}

    def validate(layer: Optional[AlignmentLayer], objs=None, prompt: str = "box", **click_decoding) -> float:
        return held_out(layer, objs, prompt, ("dice",), **click_decoding)["dice"]

    # the decoder's own IoU estimate on the held-out objects, frozen and aligned: the layer moves the
    # decoder's estimates (BraTS: median 0.82 -> 0.51 on a validation volume's true boxes), and
    # propagation's "unsure" stop is read on the frozen scale (prompts.score_floor)
    zero_shot, frozen_estimate = held_out(None, metrics=("dice", ESTIMATE)).values()

    # 4. the Alignment Layer: only it learns; gradients flow through the frozen decoder
    torch.manual_seed(config.seed)
    layer = AlignmentLayer(n_blocks=config.n_blocks, form=config.form).to(device).train()
    t_train = time.perf_counter()
    fitted = fit(backbone, z_all, per_image, config, rng, layer=layer, progress=progress, cancel=cancel,
                 validate=lambda m: validate(m, val_sub), click_box=click_box, dist=dist)
    layer.eval()
    t_train = time.perf_counter() - t_train
    aligned, aligned_estimate = held_out(layer, metrics=("dice", ESTIMATE)).values()
    use_alignment = aligned > zero_shot

    # clicks: decoded once on the learned features (as a box of the task's typical size, or as
    # a point), or the backbone's own way (LiteMedSAM: the box search), whichever did best on
    # the held-out objects
    ways = {"default": {}, "direct": {"point_search": False}, "click_box": {"click_box": click_box}}
    point = {"frozen": round(validate(None, val_sub, "point"), 4)}
    if use_alignment:
        point.update({f"aligned_{k}": round(validate(layer, val_sub, "point", **kw), 4) for k, kw in ways.items()})
    point_prompts = max(ways, key=lambda k: point[f"aligned_{k}"]) if use_alignment else "default"

    # 5. the router: a VAE on every image's feature (annotated or not), tau by 5-fold CV
    report(progress, 0, 1, "router: training the VAE and its threshold")
    vae = train_vae(router_features, epochs=config.vae_epochs, seed=config.seed, cancel=cancel)
    tau = fit_threshold(router_features, cancel=cancel, epochs=config.vae_epochs,
                        groups=[source_file(s.source) for s in data.slices])
    report(progress, 1, 1, "router: done")

    # 6. the structure finder (zero-click): trained on the frozen embeddings of the training
    #    slices (with those annotated as empty), its threshold chosen on the held-out images
    t_finder = time.perf_counter()
    # the budget asked for, not what the time budget left of it: a layer cut to 20 steps on a busy
    # CPU left the finder 25 steps, and it found nothing (benchmarks/results/effort_cpu.md, 2 volumes)
    # 2.5 x the layer's steps: chosen on held-out hippocampus training volumes (docs/benchmarks.md, the effort
    # benchmark)
    finder_steps = config.finder_steps or (FINDER_STEPS if config.steps is None
                                           else min(FINDER_STEPS, max(25, round(2.5 * config.steps))))
    finder, finder_card = learn_finder(predictor, data, records, z_all, train_idx, val_idx,
                                       layer if use_alignment else None, config.seed, finder_steps, cancel, progress)
    t_finder = time.perf_counter() - t_finder
    finder_card["validation"]["dice_box"] = round(aligned if use_alignment else zero_shot, 4)

    # 7. propagation from one box: blind or re-anchored by the finder, whichever did better on the
    #    held-out volumes (re-anchoring won on hippocampus and lost on BraTS validation volumes)
    t_propagation = time.perf_counter()
    partial = {"use_alignment": use_alignment, "finder": finder_card,
               "validation": {"iou_estimate": {"frozen": frozen_estimate, "aligned": aligned_estimate}}}
    propagation = choose_propagation(predictor, name, data, records, z_all, train_idx, val_idx, partial,
                                     layer if use_alignment else None, finder, cancel, progress)
    t_propagation = time.perf_counter() - t_propagation

    card = {
        "name": name,
        "backbone": backbone.spec.name,
        "backbone_fingerprint": backbone.fingerprint,
        "alignment": {"form": config.form, "n_blocks": config.n_blocks, "channels": 256,
                      "parameters": count_parameters(layer)},
        "router": {"tau": tau, "beta": BETA, "feature": "attention-pooled frozen embedding",
                   "vae_parameters": sum(p.numel() for p in vae.parameters())},
        "use_alignment": use_alignment,
        "labels": {str(k): v for k, v in data.label_names.items()},
        "objects": data.objects,
        "modality": data.modality,
        "training_data": {**data.summary(), "train_images": len(train_idx), "validation_images": len(val_idx),
                          "augmented_copies": n_aug, "objects_per_image": round(
                              float(np.mean([len(v) for v in per_image.values()])), 2)},
        "validation": {"images": len(val_idx),
                       "held_out_files": sorted({source_file(data.slices[i].source) for i in val_idx})[:50],
                       "dice_zero_shot": round(zero_shot, 4),
                       "dice_aligned": round(aligned, 4), "aligned_better": use_alignment,
                       "iou_estimate": {"frozen": round(frozen_estimate, 4), "aligned": round(aligned_estimate, 4)},
                       "point_dice": point, "history": [[k, round(v, 4)] for k, v in fitted.history]},
        "point_prompts": point_prompts,
        "click_box": list(click_box),
        "training": {**asdict(config), "steps": fitted.steps, "final_loss": round(fitted.last_loss, 5),
                     "kept_step": fitted.best_step, "stopped_by_time": fitted.stopped_by_time,
                     "device": str(device), "arithmetic": learning_arithmetic(backbone),
                     "embeddings": backbone.embedding_arithmetic},
        "finder": finder_card,
        "propagation": propagation,
        "seconds": {"embedding": round(t_embed, 1), "training": round(t_train, 1), "finder": round(t_finder, 1),
                    "propagation": round(t_propagation, 1), "total": round(time.perf_counter() - t_start, 1)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "casam_version": __version__,
    }
    if not use_alignment:
        card["warning"] = (f"the Alignment Layer did not beat the frozen model on the held-out images "
                           f"(Dice {aligned:.3f} vs {zero_shot:.3f}): images routed to this task are "
                           f"segmented by the frozen model")
    return Task(name, layer.cpu(), vae, tau, card, finder)
