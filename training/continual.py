"""The continual benchmark: CA-SAM's protocol (method.md, "Evaluation protocol") on real data.

    python -m training.continual --stream hippocampus_mri,covid19_ct_infection,monuseg_nuclei,brats_glioma,\
drive_vessels,em_membranes,kvasir_polyp --unseen skin_lesion --profile quick --out runs/quick3

Tasks are learned one after another from their training split; after each, every seen
task's test split is evaluated with ground-truth boxes (one per class, or per connected
component for "instance" sets). All methods run on the same cached frozen embeddings:

  zero_shot   the frozen backbone
  casam       CA-SAM, routed (the task is not known at test time): the product
  oracle      CA-SAM with the true task id
  naive_al      one shared Alignment Layer fine-tuned task after task
  decoder_ft    the mask decoder fine-tuned task after task
  decoder_task  a copy of the mask decoder fine-tuned per task, chosen by CA-SAM's router (the
                same VAEs and thresholds): "routing + any per-task module" without the layer
  ewc_al        the shared Alignment Layer with EWC
  joint_al      one Alignment Layer on all tasks' data pooled (after the last task only; the
                budget of all the tasks together): the upper reference
  + with --variants, CA-SAM (oracle) variants: the other layer form, 1 block, one augmented copy

Every method learns with the same recipe, budget and held-out selection as CA-SAM's
``learn_task``: the same images are held out (whole volumes for 3D sets), the held-out Dice
is checked every ``val_every`` steps from step 0 (the starting weights) and the best-scoring
weights are kept. A per-task module whose best is step 0 (it never beat the frozen decoder)
is not used: the frozen model is, as for CA-SAM's layer.

Volumes are handled as slices: training slices are annotated slices (evenly spaced) plus
a few background slices for the router; test images are annotated slices of the test
volumes, each routed on its own (the product routes a whole volume once; the benchmark
scores slices so that 2D and 3D sets count alike).

Every finished piece (embeddings on disk, each stage's results) is saved as it completes;
a rerun with the same --out resumes after the last finished stage.

Under torchrun (``torchrun --nproc_per_node N -m training.continual ...``) the images are
embedded once, each by one process, into the shared cache; every Alignment Layer (CA-SAM's,
the shared baselines', the variants') trains with DistributedDataParallel, each batch split
over the processes; the test images are evaluated in shares and the scores summed. The
decoder baseline and the EWC Fisher are computed on every process alike (same seed, same
result). Rank 0 writes; --out and the cache must be on a filesystem all processes share.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from casam_core.alignment import PAPER, RESIDUAL, AlignmentLayer, count_parameters
from casam_core.build import build_predictor
from casam_core.distributed import Dist, device_for_rank, init_distributed
from casam_core.evaluate import object_metrics
from casam_core.io import read_image, read_labels
from casam_core.datasets import read_dataset
from casam_core.files import write_json
from casam_core.metrics import backward_transfer, forgetting
from casam_core.predictor import CASamPredictor
from casam_core.progress import TqdmProgress
from casam_core.prompts import object_masks
from casam_core.router import Router, router_feature
from casam_core.training import batch_loss, fit, learn_config, learn_task, LearnConfig, validation_split
from casam_core.losses import augment_intensity, objects_for
from casam_core.task_data import image_slice, TaskData, TrainingSlice, volume_slices

from .report import matrix, other_form, write_report

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DEFAULT_STREAM = ("hippocampus_mri,covid19_ct_infection,monuseg_nuclei,brats_glioma,drive_vessels,em_membranes,"
                  "kvasir_polyp")
METHODS = ("zero_shot", "casam", "oracle", "naive_al", "decoder_ft", "decoder_task", "ewc_al", "joint_al")


@dataclass
class Profile:
    train_images: Optional[int]  # per 2D task (None = all)
    test_images: Optional[int]
    train_volumes: Optional[int]
    test_volumes: Optional[int]
    slices_per_volume: Optional[int]  # annotated slices kept per volume
    background_per_volume: int
    max_objects: Optional[int]  # per test image, instance sets
    epochs: Optional[int] = None  # None: the recipe's budget
    lr: Optional[float] = None  # None: the recipe's
    form: str = PAPER  # the Alignment Layer form of CA-SAM and the layer baselines
    ewc_lambda: float = 100.0
    variants: bool = True
    recipe: str = "paper"  # the learning profile every layer and baseline trains with (casam learn --profile)
    steps: Optional[int] = None  # None: the recipe's budget
    test_slices_per_volume: Optional[int] = None  # annotated slices scored per test volume (None: slices_per_volume)


PROFILES = {
    # a 2-core CPU in <= 2.5 h: 30 training and 20 test images or slices per task, every layer and
    # baseline trained with the product's recipe (casam learn's default, "fast")
    # 3D sets: 5 training volumes x 6 slices (so that the held-out check is a whole volume of 5), 20
    # slices scored per test volume
    "quick": Profile(train_images=30, test_images=20, train_volumes=5, test_volumes=2, slices_per_volume=6,
                     background_per_volume=1, max_objects=24, form=RESIDUAL, recipe="fast", variants=False,
                     test_slices_per_volume=20),
    # a check that the whole pipeline runs (tests; a few minutes on a CPU): no result to read
    "smoke": Profile(train_images=3, test_images=2, train_volumes=1, test_volumes=1, slices_per_volume=2,
                     background_per_volume=1, max_objects=4, form=RESIDUAL, recipe="fast", steps=4, variants=False),
    "paper": Profile(train_images=None, test_images=None, train_volumes=None, test_volumes=None,
                     slices_per_volume=None, background_per_volume=4, max_objects=None, epochs=24),
}


@dataclass
class TestImage:
    name: str
    rgb: np.ndarray
    labels: np.ndarray


@dataclass
class TaskSet:
    name: str
    objects: str
    train: List[TrainingSlice]
    test: List[TestImage]
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------
def _even(items: list, n: Optional[int]) -> list:
    if n is None or len(items) <= n:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def load_taskset(root: Path, profile: Profile, with_train: bool = True) -> TaskSet:
    ds = read_dataset(root)
    if ds.dimensions == 2:
        train = [image_slice(c.image, c.mask) for c in _even(ds.cases("train"), profile.train_images)
                 if with_train]
        test = []
        for c in _even(ds.cases("test"), profile.test_images):
            s = image_slice(c.image, c.mask)
            test.append(TestImage(c.image.name, s.rgb, s.labels))
    else:
        train, test = [], []
        for c in (_even(ds.cases("train"), profile.train_volumes) if with_train else []):
            image = read_image(c.image)
            slices = volume_slices(image, read_labels(c.mask, like=image).array, source=c.image.name)
            fg = [s for s in slices if s.annotated]
            bg = [s for s in slices if not s.annotated]
            train += _even(fg, profile.slices_per_volume) + _even(bg, profile.background_per_volume)
        for c in _even(ds.cases("test"), profile.test_volumes):
            image = read_image(c.image)
            slices = volume_slices(image, read_labels(c.mask, like=image).array, source=c.image.name)
            per_volume = profile.test_slices_per_volume or profile.slices_per_volume
            for s in _even([s for s in slices if s.annotated], per_volume):
                test.append(TestImage(s.source, s.rgb, s.labels))
    return TaskSet(ds.name, ds.objects, train, test,
                   {"modality": ds.modality, "dimensions": ds.dimensions, "train": len(train), "test": len(test),
                    "labels": {str(k): v for k, v in ds.labels.items() if k}})


# ---------------------------------------------------------------------------------
# training pieces (all on cached embeddings)
# ---------------------------------------------------------------------------------
class Stream:
    def __init__(self, predictor: CASamPredictor, profile: Profile, seed: int = 0, dist: Optional[Dist] = None):
        self.dist = dist or Dist()
        self.predictor = predictor
        self.backbone = predictor.backbone
        self.profile = profile
        self.seed = seed
        self.low = 4 * self.backbone.embedding_shape[1]

    def embed(self, rgb: np.ndarray):
        rec = self.predictor.embed_rgb(rgb)
        return rec, self.predictor.embedding(rec).detach().clone()

    def split(self, ts: TaskSet):
        """(training, held-out) indices of a task's slices: learn_task's split (whole volumes held out)."""
        annotated = [i for i, s in enumerate(ts.train) if s.annotated]
        return validation_split(annotated, self.config().val_fraction, [s.source for s in ts.train])

    def objects(self, ts: TaskSet, augment: int = 0):
        """(z list, per-image objects, router features, held-out images) of a task's training slices;
        objects only for the training part of the split."""
        zs, per_image, feats = [], {}, []
        rng = np.random.default_rng(self.seed)
        train_idx, val_idx = self.split(ts)
        train_set = set(train_idx)
        held_out = [TestImage(f"{ts.name}:{ts.train[i].source}", ts.train[i].rgb, ts.train[i].labels) for i in val_idx]
        for k, s in enumerate(ts.train):
            rec, z = self.embed(s.rgb)
            feats.append(router_feature(z))
            if s.annotated and k in train_set:
                objs = objects_for(s.labels, ts.objects, rec, self.backbone.img_size, self.low, len(zs))
                if objs:
                    per_image[len(zs)] = objs
            zs.append(z)
            for _ in range(augment if s.annotated and k in train_set else 0):
                rec2, z2 = self.embed(augment_intensity(s.rgb, rng))
                objs = objects_for(s.labels, ts.objects, rec2, self.backbone.img_size, self.low, len(zs))
                if objs:
                    per_image[len(zs)] = objs
                zs.append(z2)
        return zs, per_image, torch.stack(feats), held_out

    def dist_mean(self, rows: List[Dict[str, float]]) -> Dict[str, float]:
        keys = ("iou", "dice", "biou")
        sums = self.dist.sum([sum(r[k] for r in rows) for k in keys] + [len(rows)])
        return {k: sums[i] / sums[-1] for i, k in enumerate(keys)}

    def config(self, tasks: int = 1, **kw) -> LearnConfig:
        """The recipe every method learns with; ``tasks`` > 1 multiplies its budget (steps, epochs
        and time), for the joint layer."""
        kw.setdefault("form", self.profile.form)
        cfg = learn_config(self.profile.recipe, epochs=self.profile.epochs, steps=self.profile.steps,
                           lr=self.profile.lr, seed=self.seed, **kw)
        if tasks > 1:
            cfg.steps = cfg.steps * tasks if cfg.steps else None
            cfg.epochs *= tasks
            cfg.time_budget_s = cfg.time_budget_s * tasks if cfg.time_budget_s else None
        return cfg

    def train_layer(self, zs, per_image, layer=None, form=None, n_blocks=3, penalty=None, validate=None,
                    tasks: int = 1, history: Optional[list] = None):
        """A layer trained on cached embeddings, the best held-out step kept (``validate``); ``tasks``
        multiplies the budget (the joint layer learns all the tasks at once). Returns (layer, kept step);
        ``history`` (a list) gets the (step, held-out score) of every check."""
        form = form or self.profile.form
        torch.manual_seed(self.seed)
        layer = layer or AlignmentLayer(n_blocks=n_blocks, form=form)
        layer = layer.to(self.backbone.device).train()
        fitted = fit(self.backbone, zs, per_image, self.config(form=form, n_blocks=n_blocks, tasks=tasks),
                     np.random.default_rng(self.seed), layer=layer, penalty=penalty, dist=self.dist,
                     validate=validate)
        if history is not None:
            history.extend(fitted.history)
        return layer.eval(), fitted.best_step

    def train_decoder(self, zs, per_image, decoder, validate=None):
        """The mask decoder (a copy) fine-tuned, the best held-out step kept. Returns (decoder, kept step)."""
        decoder.train().requires_grad_(True)
        fitted = fit(self.backbone, zs, per_image, self.config(), np.random.default_rng(self.seed),
                     mask_decoder=decoder, validate=validate)
        decoder.eval().requires_grad_(False)
        return decoder, fitted.best_step

    def fisher(self, layer, zs, per_image, batches: int = 2):
        """Diagonal Fisher of the shared layer on a task's data: mean squared gradient of the task loss."""
        fisher = {n: torch.zeros_like(p) for n, p in layer.named_parameters()}
        cfg = self.config()
        rng = np.random.default_rng(self.seed)
        images = sorted(per_image)
        layer.train()
        for k in range(batches):
            batch = rng.choice(images, min(cfg.batch_images, len(images)), replace=False).tolist()
            layer.zero_grad(set_to_none=True)
            z = layer(torch.stack([zs[i] for i in batch]).to(self.backbone.device))
            batch_loss(self.backbone, z, batch, per_image, cfg, rng, use_point=bool(k % 2)).backward()
            for n, p in layer.named_parameters():
                fisher[n] += p.grad.detach() ** 2 / batches
        layer.zero_grad(set_to_none=True)
        layer.eval()
        return fisher


# ---------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------
class Evaluator:
    def __init__(self, stream: Stream, max_objects: Optional[int]):
        self.s = stream
        self.max_objects = max_objects
        self._prep: Dict[str, tuple] = {}

    def prepared(self, img: TestImage, objects: str):
        key = img.name + str(id(img))
        if key not in self._prep:
            rec, z = self.s.embed(img.rgb)
            objs = object_masks(img.labels, objects)
            if self.max_objects and len(objs) > self.max_objects:
                objs = sorted(objs, key=lambda o: -int(o[1].sum()))[: self.max_objects]
            self._prep[key] = (rec, z, objs, router_feature(z))
        return self._prep[key]

    @torch.inference_mode()
    def score(self, img: TestImage, objects: str, layer=None, decoder=None) -> Dict[str, float]:
        rec, z, objs, _ = self.prepared(img, objects)
        feats = z[None].to(self.s.backbone.device)
        if layer is not None:
            feats = layer(feats)
        backbone = self.s.backbone
        original = backbone.mask_decoder
        try:
            if decoder is not None:
                backbone.mask_decoder = decoder
            out = object_metrics(self.s.predictor, feats, rec, objs)
        finally:
            backbone.mask_decoder = original
        return {k: float(np.mean(v)) for k, v in out.items()}

    def dataset(self, ts: TaskSet, **kw) -> Dict[str, float]:
        """Mean scores over the test images (each process scores its share; the sums make the mean)."""
        return self.s.dist_mean([self.score(img, ts.objects, **kw) for img in self.s.dist.shard(ts.test)])

    def validator(self, held_out: Dict[str, tuple], kind: str, record: Optional[list] = None):
        """The held-out check a method's training keeps its best step by: a function of the module
        (``kind`` "layer" or "decoder") giving the mean over tasks of the held-out images' mean Dice.
        ``held_out``: task name -> (objects kind, held-out images). Every process scores every image
        (the same score everywhere, as ``fit`` needs under torchrun). ``record`` (a list) gets each
        check's {task: held-out Dice}."""
        def validate(module) -> float:
            per_task = {name: float(np.mean([self.score(img, objects, **{kind: module})["dice"] for img in images]))
                        for name, (objects, images) in held_out.items() if images}
            if record is not None:
                record.append(per_task)
            return float(np.mean(list(per_task.values())))
        return validate


def gflops(backbone, layer=None) -> float:
    """GFLOPs per image for the decoder side (one box), plus the Alignment Layer if given."""
    from torch.utils.flop_counter import FlopCounterMode

    z = torch.zeros(1, 256, 64, 64, device=backbone.device)
    box = torch.tensor([[10.0, 10.0, 100.0, 100.0]], device=backbone.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        if layer is not None:
            z = layer(z)
        backbone.decode(z, None, box, mask_decoder=backbone.mask_decoder)  # the eager graph: counted
    return counter.get_total_flops() / 1e9


def encoder_gflops(backbone) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, backbone.img_size, backbone.img_size, device=backbone.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        backbone.image_encoder(x)  # the eager graph (encode() may run it in OpenVINO, which is not counted)
    return counter.get_total_flops() / 1e9


VARIANTS = {"other_form": {}, "1_block": {"n_blocks": 1}, "augment_1": {}}  # other_form: see other_form()


def save_models(path: Path, layers, variants, naive, ewc, decoder, router, ewc_terms, task_decoders) -> None:
    """Every model of the run after a stage, as one safetensors file (written atomically)."""
    from safetensors.torch import save_file

    from casam_core.files import atomic_write

    t: Dict[str, torch.Tensor] = {}

    def put(prefix, module):
        for k, v in module.state_dict().items():
            t[prefix + k] = v.detach().cpu().contiguous()

    for name, layer in layers.items():
        if layer is not None:
            put(f"casam.{name}.", layer)
        put(f"vae.{name}.", router.vaes[name])
        for v, vl in variants.get(name, {}).items():
            put(f"variant.{name}.{v}.", vl)
    if naive is not None:
        put("naive.", naive)
    if ewc is not None:
        put("ewc.", ewc)
    put("decoder.", decoder)
    for name, d in task_decoders.items():
        if d is not None:
            put(f"dtask.{name}.", d)
    for j, (F, p0, n) in enumerate(ewc_terms):
        t[f"ewc_F.{j}.{n}"] = F.detach().cpu().contiguous()
        t[f"ewc_P.{j}.{n}"] = p0.detach().cpu().contiguous()
    with atomic_write(path) as tmp:
        save_file(t, str(tmp))


def load_models(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise SystemExit(f"{path} is missing: cannot resume; use another --out")
    return load_file(str(path))


def _layer_from(saved, prefix, form=PAPER, n_blocks=3):
    state = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
    layer = AlignmentLayer(n_blocks=n_blocks, form=form)
    layer.load_state_dict(state)
    return layer.eval()


def _vae_from(saved, prefix):
    from casam_core.router import TaskVAE

    vae = TaskVAE()
    vae.load_state_dict({k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)})
    return vae.eval()


# ---------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------
def run(stream_names: List[str], unseen: List[str], profile_name: str, out: Path, data_root: Path = DATA,
        device: str = "auto", cache_dir: Optional[Path] = None, seed: int = 0, methods: Optional[List[str]] = None,
        log: Callable[[str], None] = print, dist: Optional[Dist] = None) -> dict:
    dist = dist or Dist()
    if not dist.is_main:
        log = _silent
    profile = PROFILES[profile_name] if isinstance(profile_name, str) else profile_name
    methods = list(methods or METHODS)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = cache_dir or out.parent / ".embeddings"
    predictor, _ = build_predictor("litemedsam", device=device_for_rank(device, dist.local_rank) if dist.active
                                   else device, cache_dir=cache_dir)
    backbone = predictor.backbone
    st = Stream(predictor, profile, seed, dist)
    ev = Evaluator(st, profile.max_objects)
    val_ev = Evaluator(st, st.config().val_max_objects)  # the held-out checks during training, as learn_task's
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state and (state.get("stream") != stream_names or state.get("profile") != asdict(profile)):
        raise SystemExit(f"{out} holds a run with another stream or profile; use another --out")
    state.update({"stream": stream_names, "unseen": unseen, "profile": asdict(profile), "profile_name": str(profile_name) if isinstance(profile_name, str) else "custom",
                  "backbone": backbone.fingerprint, "methods": methods})
    state.setdefault("stages", [])
    # wall time, summed over the invocations that made this result (a resumed run has several;
    # each one's time counts up to its last save, so work an interruption lost is not counted)
    state.setdefault("invocations", [])
    state["invocations"].append({"resumed_after_stage": len(state["stages"]), "seconds": 0.0,
                                 "embedding_seconds": 0.0})
    t0 = time.perf_counter()

    def save(path: Path) -> None:
        state["invocations"][-1]["seconds"] = round(time.perf_counter() - t0, 1)
        state["seconds_total"] = round(sum(i["seconds"] for i in state["invocations"]), 1)
        write_json(state, path)
    tasks = []
    bar = TqdmProgress(disable=not dist.is_main)
    for i, name in enumerate(stream_names + unseen):
        tasks.append(load_taskset(Path(data_root) / name, profile, with_train=name in stream_names))
        bar(i + 1, len(stream_names) + len(unseen), f"loading data: {name}")
    seen_sets, unseen_sets = tasks[: len(stream_names)], tasks[len(stream_names):]
    state["data"] = {t.name: t.meta for t in tasks}

    # embeddings once (the disk cache makes a rerun skip them)
    all_imgs = [s.rgb for t in tasks for s in t.train] + [x.rgb for t in tasks for x in t.test]
    te = time.perf_counter()
    mine = dist.shard(all_imgs)  # each image by one process, into the shared cache
    for k, rgb in enumerate(mine):
        predictor.embed_rgb(rgb)
        bar(k + 1, len(mine), "embedding: train and test images")
    dist.barrier()  # every embedding is on disk before anyone reads it
    seconds = round(time.perf_counter() - te, 1)
    state["invocations"][-1]["embedding_seconds"] = seconds
    state["embedding_seconds"] = round(sum(i["embedding_seconds"] for i in state["invocations"]), 1)
    log(f"embedded {len(all_imgs)} images in {seconds} s ({predictor.encoder_calls} encoder calls)")

    router = Router()
    layers: Dict[str, Optional[AlignmentLayer]] = {}
    variants: Dict[str, Dict[str, AlignmentLayer]] = {}
    shared_naive = shared_ewc = None
    decoder = copy.deepcopy(backbone.mask_decoder)
    task_decoders: Dict[str, Optional[torch.nn.Module]] = {}  # decoder_task: None = the frozen decoder
    ewc_terms = []
    zero_shot = {}
    oracle_scores: Dict[str, Dict[str, Dict[str, float]]] = {}
    routed_cache: Dict[tuple, Dict[str, float]] = {}
    done_stages = len(state["stages"])

    def routed_dataset(ts: TaskSet, method: str = "casam"):
        """A routed method on a task's test images: CA-SAM's layers, or decoder_task's decoders."""
        rows, routes = [], []
        for img in dist.shard(ts.test):
            _, _, _, f = ev.prepared(img, ts.objects)
            decision = router.route(f).decision
            routes.append(decision or "frozen")
            key = (img.name, id(img), decision, method)
            if key not in routed_cache:
                if method == "decoder_task":
                    routed_cache[key] = ev.score(img, ts.objects, decoder=task_decoders.get(decision))
                else:
                    routed_cache[key] = ev.score(img, ts.objects, layer=layers.get(decision) if decision else None)
            rows.append(routed_cache[key])
        shares = dist.gather_json(routes)  # the routes in the test images' order
        routes = [shares[k % dist.world][k // dist.world] for k in range(len(ts.test))]
        return st.dist_mean(rows), routes

    models = out / "models"
    if done_stages:  # resume: the models as they were after the last finished stage
        saved = load_models(models / f"stage_{done_stages}.safetensors")
        for ts in seen_sets[:done_stages]:
            layers[ts.name] = (_layer_from(saved, f"casam.{ts.name}.", form=profile.form)
                               if state["cards"][ts.name]["use_alignment"] else None)
            router.add(ts.name, _vae_from(saved, f"vae.{ts.name}."), state["taus"][ts.name])
            other = other_form(profile.form)
            variants[ts.name] = {v: _layer_from(saved, f"variant.{ts.name}.{v}.",
                                                form=other if v == "other_form" else profile.form, **kw)
                                 for v, kw in VARIANTS.items() if any(k.startswith(f"variant.{ts.name}.{v}.")
                                                                      for k in saved)}
        shared_naive = (_layer_from(saved, "naive.", form=profile.form)
                        if any(k.startswith("naive.") for k in saved) else None)
        shared_ewc = (_layer_from(saved, "ewc.", form=profile.form)
                      if any(k.startswith("ewc.") for k in saved) else None)
        decoder.load_state_dict({k[len("decoder."):]: v for k, v in saved.items() if k.startswith("decoder.")})
        for ts in seen_sets[:done_stages]:
            prefix = f"dtask.{ts.name}."
            task_decoders[ts.name] = None
            if any(k.startswith(prefix) for k in saved):
                task_decoders[ts.name] = copy.deepcopy(backbone.mask_decoder).eval().requires_grad_(False)
                task_decoders[ts.name].load_state_dict({k[len(prefix):]: v for k, v in saved.items()
                                                        if k.startswith(prefix)})
        for n in {k.split(".", 2)[2] for k in saved if k.startswith("ewc_F.")}:
            for k in sorted(k for k in saved if k.startswith("ewc_F.") and k.split(".", 2)[2] == n):
                j = k.split(".")[1]
                ewc_terms.append((saved[k], saved[f"ewc_P.{j}.{n}"], n))
        last = state["stages"][-1]
        for ts in seen_sets[:done_stages]:
            zero_shot[ts.name] = last["results"]["zero_shot"][ts.name]
            oracle_scores[ts.name] = last["oracle_variants"][ts.name]
        log(f"resuming after stage {done_stages} from {models}")

    for t, ts in enumerate(seen_sets):
        if t < done_stages:
            continue
        tl = time.perf_counter()
        zs, per_image, feats, held_out = st.objects(ts)
        check = {ts.name: (ts.objects, held_out)}
        kept = {}  # the step each method kept by the held-out check (0: its starting weights)
        # CA-SAM is the product's learn_task: 20 % held out, "never worse than frozen", router VAE and tau
        task = learn_task(predictor, ts.name, TaskData(ts.train, ts.objects), st.config(), dist=dist)
        router.add(ts.name, task.vae, task.tau)
        state.setdefault("taus", {})[ts.name] = task.tau
        state.setdefault("cards", {})[ts.name] = {k: task.card[k] for k in ("validation", "use_alignment")}
        layer = task.layer.to(backbone.device).eval()
        zero_shot[ts.name] = ev.dataset(ts)
        oracle_raw = ev.dataset(ts, layer=layer)
        layers[ts.name] = layer if task.use_alignment else None
        casam_seconds = time.perf_counter() - tl
        timings = {"casam": round(casam_seconds, 1)}
        kept["casam"] = task.card["training"]["kept_step"] if task.use_alignment else 0
        if "naive_al" in methods:
            tm = time.perf_counter()
            shared_naive, kept["naive_al"] = st.train_layer(zs, per_image, layer=shared_naive,
                                                            validate=val_ev.validator(check, "layer"))
            timings["naive_al"] = round(time.perf_counter() - tm, 1)
        if "ewc_al" in methods:
            tm = time.perf_counter()
            terms = list(ewc_terms)

            def penalty():
                return sum(profile.ewc_lambda / 2 * (F * (p - p0) ** 2).sum()
                           for (F, p0, name) in terms for n, p in shared_ewc.named_parameters() if n == name)
            shared_ewc, kept["ewc_al"] = st.train_layer(zs, per_image, layer=shared_ewc,
                                                        penalty=penalty if terms else None,
                                                        validate=val_ev.validator(check, "layer"))
            fisher = st.fisher(shared_ewc, zs, per_image, batches=2)
            ewc_terms += [(fisher[n], p.detach().clone(), n) for n, p in shared_ewc.named_parameters()]
            timings["ewc_al"] = round(time.perf_counter() - tm, 1)
        if "decoder_ft" in methods:
            tm = time.perf_counter()
            decoder, kept["decoder_ft"] = st.train_decoder(zs, per_image, decoder,
                                                           validate=val_ev.validator(check, "decoder"))
            timings["decoder_ft"] = round(time.perf_counter() - tm, 1)
        if "decoder_task" in methods:
            tm = time.perf_counter()
            own = copy.deepcopy(backbone.mask_decoder)  # the frozen decoder's copy, this task's alone
            own, kept["decoder_task"] = st.train_decoder(zs, per_image, own,
                                                         validate=val_ev.validator(check, "decoder"))
            task_decoders[ts.name] = None if kept["decoder_task"] == 0 else own  # never beat frozen: frozen
            timings["decoder_task"] = round(time.perf_counter() - tm, 1)
        if profile.variants:
            tv = time.perf_counter()
            variants[ts.name] = {}
            for vname, kw in VARIANTS.items():
                if vname == "augment_1":
                    zs_a, per_a, _, _ = st.objects(ts, augment=1)
                    variants[ts.name][vname] = st.train_layer(zs_a, per_a)[0]
                elif vname == "other_form":
                    variants[ts.name][vname] = st.train_layer(
                        zs, per_image, form=other_form(profile.form))[0]
                else:
                    variants[ts.name][vname] = st.train_layer(zs, per_image, **kw)[0]
            timings["variants"] = round(time.perf_counter() - tv, 1)
        oracle_scores[ts.name] = {"product": oracle_raw if task.use_alignment else zero_shot[ts.name],
                                  "layer_no_fallback": oracle_raw}
        for vname, vl in variants.get(ts.name, {}).items():
            oracle_scores[ts.name][vname] = ev.dataset(ts, layer=vl)
        row = {"stage": t + 1, "task": ts.name, "train_seconds": timings, "kept_step": kept, "results": {}}
        seen = seen_sets[: t + 1]
        for m in methods:
            if m == "joint_al":
                continue
            row["results"][m] = {}
            for s in seen:
                if m == "zero_shot":
                    r = zero_shot[s.name]
                elif m == "oracle":
                    r = oracle_scores[s.name]["product"]
                elif m in ("casam", "decoder_task"):
                    r, routes = routed_dataset(s, m)
                    r = dict(r, routes=routes)
                elif m == "naive_al":
                    r = ev.dataset(s, layer=shared_naive)
                elif m == "ewc_al":
                    r = ev.dataset(s, layer=shared_ewc)
                elif m == "decoder_ft":
                    r = ev.dataset(s, decoder=decoder)
                row["results"][m][s.name] = r
        correct = sum(r == s.name for s in seen for r in row["results"].get("casam", {}).get(s.name, {})
                      .get("routes", []))
        total = sum(len(s.test) for s in seen)
        row["routing_accuracy"] = correct / total if total else float("nan")
        row["oracle_variants"] = {s.name: oracle_scores[s.name] for s in seen if s.name in oracle_scores}
        row["seconds"] = round(time.perf_counter() - tl, 1)  # the stage's wall time, evaluation included
        state["stages"].append(row)
        if dist.is_main:
            save_models(models / f"stage_{t + 1}.safetensors", layers, variants, shared_naive, shared_ewc, decoder,
                        router, ewc_terms, task_decoders)
            save(state_path)  # after the models: a stage counts as done only when both exist
        dist.barrier()
        log(f"stage {t + 1}/{len(seen_sets)} {ts.name}: casam Dice "
            f"{np.mean([v['dice'] for v in row['results'].get('casam', {}).values()] or [np.nan]):.3f}, routing "
            f"{row['routing_accuracy']:.3f}, {row['seconds']:.0f} s")

    # joint training on pooled data (privacy forbids it: the upper reference)
    final = {"unseen": {}, "confusion": {}}
    if "joint_al" in methods and "joint" not in state:
        tj = time.perf_counter()
        zs_all, per_all, check_all = [], {}, {}
        for ts in seen_sets:
            zs, per_image, _, held_out = st.objects(ts)
            for i, objs in per_image.items():
                per_all[len(zs_all) + i] = objs
            zs_all += zs
            check_all[ts.name] = (ts.objects, held_out)
        # the budget of all the tasks together, the best step on all their held-out images (each task weighs alike)
        checks, per_task = [], []
        joint, kept_joint = st.train_layer(zs_all, per_all, validate=val_ev.validator(check_all, "layer", per_task),
                                           tasks=len(seen_sets), history=checks)
        state["joint"] = {"results": {s.name: ev.dataset(s, layer=joint) for s in seen_sets},
                          "seconds": round(time.perf_counter() - tj, 1), "kept_step": kept_joint,
                          # every check: step, mean held-out Dice, each task's (what the kept step traded)
                          "history": [[step, round(score, 4), {k: round(v, 4) for k, v in tasks.items()}]
                                      for (step, score), tasks in zip(checks, per_task)]}
        if dist.is_main:
            save(state_path)
    # unseen sets and the routing confusion matrix after the last task
    names = [t.name for t in seen_sets]
    for ts in seen_sets + unseen_sets:
        r, routes = routed_dataset(ts)
        final["confusion"][ts.name] = {c: routes.count(c) for c in names + ["frozen"]}
        if ts in unseen_sets:
            final["unseen"][ts.name] = {"zero_shot": ev.dataset(ts), "casam": r}
    state["final"] = final
    layer0 = AlignmentLayer(form=profile.form)
    state["efficiency"] = {
        "params_per_task_casam": count_parameters(layer0) + sum(p.numel() for p in router.vaes[names[0]].parameters()),
        "params_shared_al": count_parameters(layer0),
        "params_decoder": sum(p.numel() for p in backbone.mask_decoder.parameters()),
        "params_al_1_block": count_parameters(AlignmentLayer(n_blocks=1)),
        "gflops_encoder": round(encoder_gflops(backbone), 2),
        "gflops_decoder": round(gflops(backbone), 3),
        "gflops_decoder_with_al": round(gflops(backbone, layer0.to(backbone.device).eval()), 3),
    }
    state["processes"] = dist.world
    summarise(state)
    if not dist.is_main:
        return state
    save(state_path)
    write_json(state, out / "results.json")
    write_report(state, out)
    log(f"wrote {out / 'results.json'} and {out / 'report.md'}: {state['invocations'][-1]['seconds']:.0f} s "
        f"this invocation, {state['seconds_total']:.0f} s in all")
    return state


def _silent(_: str) -> None:
    pass


def summarise(state: dict) -> None:
    """Final Avg, forgetting, BWT per method (Dice), gains over zero-shot."""
    out = {}
    for m in state["methods"]:
        if m == "joint_al":
            if "joint" in state:
                out[m] = {"avg_dice": float(np.mean([r["dice"] for r in state["joint"]["results"].values()]))}
            continue
        a = matrix(state, m)
        if not a.size:
            continue
        out[m] = {"avg_dice": float(np.nanmean(a[-1])), "forgetting": forgetting(a), "bwt": backward_transfer(a),
                  "avg_by_stage": [float(np.nanmean(r)) for r in a]}
    if "zero_shot" in out and "oracle" in out:
        z, o = matrix(state, "zero_shot")[-1], matrix(state, "oracle")[-1]
        out["per_task_gain_oracle"] = {n: float(o[i] - z[i]) for i, n in enumerate(state["stream"])}
    if state["stages"]:
        out["routing_accuracy_final"] = state["stages"][-1]["routing_accuracy"]
    state["summary"] = out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training.continual", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stream", default=DEFAULT_STREAM, help="comma-separated dataset names or folders, in order")
    ap.add_argument("--unseen", default="skin_lesion", help="comma-separated sets never learned ('' for none)")
    ap.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=str(DATA), help="folder holding the datasets")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache-dir", default=None, help="embedding cache (default: OUT/../.embeddings)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to run (default all)")
    ap.add_argument("--variants", action="store_true",
                    help="also train the Alignment Layer variants (other form, 1 block, 1 augmented copy)")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or "casam" not in methods:
        print(f"training.continual: error: --methods {args.methods!r}: "
              + (f"unknown {unknown[0]!r} (choose from {', '.join(METHODS)})" if unknown else "casam must be one"),
              file=sys.stderr)
        raise SystemExit(2)
    stream = [s for s in args.stream.split(",") if s]
    unseen = [s for s in args.unseen.split(",") if s]
    for name in stream + unseen:
        if not (Path(args.data) / name / "dataset.json").is_file():
            print(f"training.continual: error: {Path(args.data) / name} has no dataset.json", file=sys.stderr)
            raise SystemExit(2)
    dist = init_distributed(args.device)  # under torchrun: this process's place in the job
    try:
        profile = PROFILES[args.profile]
        if args.variants and not profile.variants:
            profile = replace(profile, variants=True)
        run(stream, unseen, profile if profile is not PROFILES[args.profile] else args.profile, Path(args.out), Path(args.data), args.device,
            Path(args.cache_dir) if args.cache_dir else None, args.seed, methods, dist=dist)
    finally:
        dist.close()


if __name__ == "__main__":
    main()
