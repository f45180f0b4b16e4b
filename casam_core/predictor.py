"""The one predictor: segment-anything's ``SamPredictor`` contract, with CA-SAM's Alignment Layers.

    predictor = CASamPredictor(build_backbone())
    predictor.set_image(image)                 # frozen embedding Z, computed once, cached
    masks, scores, logits = predictor.predict(box=np.array([x0, y0, x1, y1]), multimask_output=False)
    masks, scores, logits = predictor.predict(box=..., task="auto")   # the router's task

Code written for segment-anything runs unchanged: ``set_image``, ``predict`` (one prompt:
masks (C, H, W), scores (C,), logits (C, 256, 256); ``multimask_output`` defaults to True),
``predict_torch`` (prompts already in the model frame, batched), ``get_image_embedding``,
``reset_image``, ``is_image_set``, ``original_size``, ``input_size``, ``transform`` and
``features``. CA-SAM's additions sit beside that contract: the ``task=`` keyword,
``predict_batch`` (several boxes in pixel coordinates, masks (B, C, H, W)), volumes,
``choose_task`` and the caches.

``task`` names an Alignment Layer registered with ``add_task`` (``None`` = the
frozen model). The layer is applied to the cached frozen embedding, and the aligned
embedding is cached per (image, task), so a click costs only the prompt encoder and
decoder, and changing the task never re-runs the encoder.

Volumes: ``set_volume`` normalises the whole volume once (so every slice shares one
intensity window), ``embed_slices`` embeds some or all slices with progress and
cancellation, ``set_slice`` selects the slice that ``predict`` works on.
"""

from __future__ import annotations

from contextlib import contextmanager

import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import auto
from .auto import AutoResult
from .backbones import Backbone, preprocess_shape
from .cache import DiskEmbeddingCache, TensorLRU, data_signature
from .io import normalize_intensity, take_slice, to_rgb
from .progress import CancelFn, ProgressFn, check_cancel, report
from .errors import ImageIOError, OptionError, PromptError, TaskLibraryError, UnknownTask
from .router import RouteDecision, Router, TaskVAE, router_feature
from .tasks import TaskChoice, check_task_name, task_mode

DEFAULT_MEMORY_BYTES = 2 * 1024**3
DEFAULT_ALIGNED_BYTES = 512 * 1024**2
# Box sizes tried around point-only clicks on box-only backbones, as fractions of the
# longest side of the image (plus the spread of the positive clicks).
POINT_SEARCH_FRACTIONS = (0.06, 0.1, 0.16, 0.25, 0.4, 0.6)
# Corrective clicks on an earlier mask: box sizes of the local edits (same units), and the
# score bonus that makes a local edit win over a restart honouring as many clicks. Chosen on
# training images: benchmarks/corrective_clicks.py --choose.
LOCAL_EDIT_FRACTIONS = (0.06, 0.1, 0.16)
LOCAL_EDIT_BONUS = 2.0
# Weight of closeness to the earlier mask (IoU, 0-1) among candidates that honour as many
# clicks; the predicted IoU counts once.
CLOSENESS_WEIGHT = 1.0


@dataclass(frozen=True)
class ImageRecord:
    """What the predictor knows of one encoded image (or volume slice)."""

    key: str
    original_size: Tuple[int, int]
    input_size: Tuple[int, int]


@dataclass
class VolumeState:
    volume: np.ndarray  # uint8, normalised once for the whole volume
    axis: int
    records: Dict[int, ImageRecord] = field(default_factory=dict)
    route: Optional[RouteDecision] = None  # one decision for the whole volume, once computed

    @property
    def n_slices(self) -> int:
        return int(self.volume.shape[self.axis])

    def slice_rgb(self, index: int) -> np.ndarray:
        return to_rgb(take_slice(self.volume, index, self.axis))


class DeferredLayer:
    """A registered task's Alignment Layer, not yet read: ``CASamPredictor.alignment_layer`` reads
    it from ``library`` (checked against ``card``) when the task is first used."""

    def __init__(self, library, name: str, card: dict) -> None:
        self.library, self.name, self.card = library, name, card


class CASamPredictor:
    def __init__(self, backbone: Backbone, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 aligned_bytes: int = DEFAULT_ALIGNED_BYTES,
                 disk_cache: Optional[Union[str, os.PathLike]] = None,
                 embedding_dtype: torch.dtype = torch.float16) -> None:
        """``embedding_dtype``: how cached frozen embeddings are kept, in memory and on disk
        (float16 by default: half the memory and disk of float32, same masks within the
        benchmark's tolerance, ``benchmarks/runtime.py``; float32 is the reference). They
        are computed, aligned and decoded in float32 whatever is stored."""
        if embedding_dtype not in (torch.float16, torch.float32):
            raise OptionError(f"embeddings are stored as torch.float16 or torch.float32, not {embedding_dtype}")
        self.backbone = backbone
        self.embedding_dtype = embedding_dtype
        self._float32: Optional[Tuple[str, torch.Tensor]] = None  # the last embedding used, as float32
        self.embeddings = TensorLRU(memory_bytes)
        self.aligned = TensorLRU(aligned_bytes)
        self.disk = DiskEmbeddingCache(disk_cache, backbone.embedding_key) if disk_cache else None
        self.disk_error: Optional[str] = None  # why the on-disk cache was given up (``_save_to_disk``)
        self.layers: Dict[str, Optional[nn.Module]] = {}
        self.cards: Dict[str, dict] = {}
        self.finders: Dict[str, nn.Module] = {}  # tasks' structure finders (zero-click: ``segment_auto``)
        self.router = Router()
        self._features: Dict[str, torch.Tensor] = {}
        self.encoder_calls = 0  # how many slices went through the image encoder
        self._current: Optional[ImageRecord] = None
        self._current_rgb: Optional[np.ndarray] = None  # to re-embed if the LRU evicted it
        self._current_index = -1
        self._volume: Optional[VolumeState] = None
        self._transform = None

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    # -- tasks ----------------------------------------------------------------------
    def add_task(self, name: str, layer: Optional[nn.Module], vae: Optional[TaskVAE] = None,
                 tau: Optional[float] = None, card: Optional[dict] = None, finder: Optional[nn.Module] = None) -> None:
        """Register (or replace) a task.

        ``layer`` is the Alignment Layer used by ``predict(task=name)``; ``None`` means the
        task's images are segmented by the frozen model (a task whose layer did not beat
        the frozen model on validation). With ``vae`` and ``tau`` the task joins the router.
        ``finder`` (with ``card["finder"]``) lets ``segment_auto`` segment its images without prompts.
        """
        check_task_name(name)
        if layer is not None and not isinstance(layer, DeferredLayer):
            layer = layer.to(self.device).eval()
            layer.requires_grad_(False)
        self.layers[name] = layer
        if vae is not None:
            if tau is None:
                raise ValueError(f"task {name!r}: a router VAE needs its threshold tau")
            self.router.add(name, vae, tau)
        else:
            self.router.remove(name)
        self.cards[name] = dict(card or {})
        if finder is not None and "finder" in self.cards[name]:
            self.finders[name] = finder.to(self.device).eval()
        else:
            self.finders.pop(name, None)
        self.aligned.discard_where(lambda k: k[1] == name)
        self._forget_routes()

    def remove_task(self, name: str) -> None:
        self.layers.pop(name, None)
        self.cards.pop(name, None)
        self.finders.pop(name, None)
        self.router.remove(name)
        self.aligned.discard_where(lambda k: k[1] == name)
        self._forget_routes()

    def load_tasks(self, library, names: Optional[Iterable[str]] = None) -> Dict[str, str]:
        """Register the library's tasks made for this backbone; returns {skipped task: reason}. Each
        task's card and router are read and checked now; its Alignment Layer when it is first used
        (``DeferredLayer``): routing a library of 200 tasks read 3 GB of layers it never used."""
        skipped = {}
        for name in (library.names() if names is None else names):
            try:
                task = library.load(name, self.backbone.fingerprint, with_layer=False)
            except TaskLibraryError as exc:
                skipped[name] = str(exc)
                continue
            layer = DeferredLayer(library, task.name, task.card) if task.use_alignment else None
            self.add_task(task.name, layer, task.vae, task.tau, task.card, task.finder)
        return skipped

    def _forget_routes(self) -> None:
        if self._volume is not None:
            self._volume.route = None

    # -- routing --------------------------------------------------------------------
    def router_feature(self, record: Optional[ImageRecord] = None) -> torch.Tensor:
        """The router feature (256,) of an image, from its frozen embedding (cached)."""
        record = record or self._require_current()
        f = self._features.get(record.key)
        if f is None:
            f = router_feature(self.embedding(record)).cpu()
            self._features[record.key] = f
            if len(self._features) > 100_000:
                self._features.pop(next(iter(self._features)))
        return f

    def route(self, record: Optional[ImageRecord] = None) -> RouteDecision:
        """Which task the image belongs to (``decision`` None: the frozen model)."""
        if not len(self.router):
            return RouteDecision(None, {}, {})
        return self.router.route(self.router_feature(record))

    def route_volume(self, progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
                     embed_missing: bool = True) -> RouteDecision:
        """One route for the current volume from all its slices (embedding those not cached yet).

        With ``embed_missing=False`` the route uses only the slices embedded so far (a
        provisional answer while a viewer embeds in the background); it is kept once
        every slice has been seen.
        """
        vol = self._require_volume()
        if vol.route is None and not len(self.router):
            return RouteDecision(None, {}, {})  # no task to recognise: nothing to embed for it
        if vol.route is not None:
            return vol.route
        if embed_missing:
            records = self.embed_slices(None, progress=progress, cancel=cancel)
        else:
            records = [vol.records[i] for i in sorted(vol.records) if vol.records[i].key in self.embeddings]
            if not records:
                raise RuntimeError("no slice of this volume is embedded yet")
        decision = self.router.route_volume(torch.stack([self.router_feature(r) for r in records]))
        if len(records) == vol.n_slices:
            vol.route = decision
        return decision

    def choose_task(self, task: Optional[str], record: Optional[ImageRecord] = None,
                    provisional: bool = False, progress: Optional[ProgressFn] = None,
                    cancel: Optional[CancelFn] = None) -> TaskChoice:
        """The one resolution of ``task`` as the user gives it (see ``casam_core.tasks``): the task,
        the Alignment Layer to use and, for "auto", the router's scores.

        "auto" asks the router: one decision per volume when a volume is set (with
        ``provisional``, from the slices embedded so far, without embedding the rest).
        A task whose layer lost to the frozen model on its held-out images is chosen with
        ``layer`` None. An unregistered name raises ``UnknownTask``.
        """
        mode = task_mode(task)
        if mode == "frozen":
            return TaskChoice("frozen")
        complete = True
        slice_scores = {}
        if mode == "auto":
            if self._volume is not None:
                decision = self.route_volume(progress=progress, cancel=cancel, embed_missing=not provisional)
                complete = self._volume.route is not None or not len(self.router)
                if complete and decision.slice_scores:  # every slice, in order
                    slice_scores = {t: list(v) for t, v in decision.slice_scores.items()}
            else:
                decision = self.route(record)
            name, scores, tau = decision.decision, decision.scores, decision.tau
        else:
            name, scores, tau = task, {}, {}
        if name is not None and name not in self.layers:
            raise UnknownTask(f"unknown task {name!r}; registered: {', '.join(self.layers) or 'none'}")
        layer = name if name is not None and self.layers[name] is not None else None
        return TaskChoice(mode, name, layer, dict(scores), dict(tau), complete, slice_scores)

    # -- images ---------------------------------------------------------------------
    def prepare(self, image: np.ndarray, window=None) -> np.ndarray:
        """Any gray/RGB image -> the uint8 RGB the encoder sees (see io.normalize_intensity)."""
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[2] in (3, 4):
            image = image[..., :3]
        elif image.ndim != 2:
            raise ImageIOError(f"expected a 2D gray (H, W) or RGB (H, W, 3) image, got shape {image.shape}")
        if min(image.shape[:2]) < 2:
            raise ImageIOError(f"image of shape {image.shape} is too small to segment")
        return to_rgb(normalize_intensity(image, window))

    def set_image(self, image: np.ndarray, image_format: str = "RGB", window=None) -> ImageRecord:
        """Encode a 2D image (or take its embedding from the caches) and make it current.

        As segment-anything: ``image`` (H, W, 3) uint8 in ``image_format`` "RGB" or "BGR".
        Beyond it: grey (H, W) and any dtype (see ``prepare``; ``window`` for CT).
        """
        if image_format not in ("RGB", "BGR"):
            raise PromptError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = np.asarray(image)
        if image_format == "BGR" and image.ndim == 3:
            image = image[..., 2::-1]
        self._volume = None
        self._current_rgb = self.prepare(image, window)
        self._current = self.embed_rgb(self._current_rgb)
        return self._current

    @contextmanager
    def keeping_current(self):
        """Work on other images inside the block; the current image or volume comes back after it,
        as it was (its embedded slices, its route)."""
        saved = (self._volume, self._current, self._current_rgb, self._current_index)
        try:
            yield self
        finally:
            self._volume, self._current, self._current_rgb, self._current_index = saved

    def reset_image(self) -> None:
        """Forget the current image or volume (the caches keep their embeddings)."""
        self._current = self._current_rgb = None
        self._current_index = -1
        self._volume = None

    @property
    def is_image_set(self) -> bool:
        return self._current is not None

    @property
    def original_size(self) -> Optional[Tuple[int, int]]:
        """(H, W) of the current image or slice (None when none is set)."""
        return None if self._current is None else self._current.original_size

    @property
    def input_size(self) -> Optional[Tuple[int, int]]:
        """(h, w) of the current image resized for the encoder (None when none is set)."""
        return None if self._current is None else self._current.input_size

    @property
    def transform(self):
        """segment-anything's ``ResizeLongestSide`` for this backbone: maps prompts in pixel
        coordinates into the model frame that ``predict_torch`` takes."""
        if self._transform is None:
            from segment_anything.utils.transforms import ResizeLongestSide

            self._transform = ResizeLongestSide(self.backbone.img_size)
        return self._transform

    @property
    def features(self) -> torch.Tensor:
        """The current image's frozen embedding (1, 256, 64, 64), as segment-anything's attribute."""
        return self.get_image_embedding()

    def get_image_embedding(self) -> torch.Tensor:
        """The current image's frozen embedding (1, 256, 64, 64)."""
        if self._current is None:
            raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
        return self.embedding()[None]

    def record_of(self, rgb: np.ndarray) -> ImageRecord:
        """The record of a prepared uint8 RGB image, without embedding it (its cache key and sizes)."""
        return ImageRecord(data_signature(rgb, self.backbone.embedding_key), (int(rgb.shape[0]), int(rgb.shape[1])),
                           tuple(preprocess_shape(rgb.shape[0], rgb.shape[1], self.backbone.img_size)))

    def _save_to_disk(self, key: str, z: torch.Tensor) -> None:
        """Keep an embedding in the on-disk cache. A cache that cannot be written (a full disk, a folder
        gone read-only) is given up for this predictor with one warning: the work goes on in memory,
        and ``disk_error`` says why (``casam embed``, whose work is the cache, reports it as its error)."""
        try:
            self.disk.save(key, z)
        except ImageIOError as exc:
            import warnings

            from .errors import ImageWarning

            self.disk, self.disk_error = None, str(exc)
            warnings.warn(f"{exc}; going on without the on-disk cache", ImageWarning, stacklevel=3)

    def embed_rgb(self, rgb: np.ndarray) -> ImageRecord:
        """Ensure the frozen embedding of a prepared uint8 RGB image is cached; return its record."""
        key = data_signature(rgb, self.backbone.embedding_key)
        x, input_size = None, None
        if key not in self.embeddings:
            z = self.disk.load(key, self.backbone.embedding_shape) if self.disk else None
            if z is None:
                x, input_size = self.backbone.preprocess(rgb)
                z = self.backbone.encode(x)[0]
                self.encoder_calls += 1
            z = z.to(self.device, self.embedding_dtype)
            if self.disk and x is not None:
                self._save_to_disk(key, z)
            self.embeddings.put(key, z)
        if input_size is None:
            input_size = preprocess_shape(rgb.shape[0], rgb.shape[1], self.backbone.img_size)
        return ImageRecord(key, (int(rgb.shape[0]), int(rgb.shape[1])), tuple(input_size))

    def embedding(self, record: Optional[ImageRecord] = None) -> torch.Tensor:
        """The frozen embedding Z (256, 64, 64) of ``record`` (default: the current image)."""
        record = record or self._require_current()
        z = self.embeddings.get(record.key)
        if z is None and record == self._current:  # evicted by the LRU: recompute (or reload)
            source = self._current_rgb if self._volume is None else self._volume.slice_rgb(self._current_index)
            self.embed_rgb(source)
            z = self.embeddings.get(record.key)
        if z is None:
            raise LookupError("this image's embedding is no longer cached; set it again")
        if z.dtype == torch.float32:
            return z
        if self._float32 is None or self._float32[0] != record.key:  # once per image, not once per click
            self._float32 = (record.key, z.float())
        return self._float32[1]

    # -- volumes --------------------------------------------------------------------
    def set_volume(self, volume: np.ndarray, axis: int = 0, window=None) -> VolumeState:
        """Normalise a 3D volume once (one intensity window for all slices) and make it current;
        slices are embedded on demand (``set_slice``) or ahead (``embed_slices``)."""
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise ImageIOError(f"expected a 3D volume, got shape {volume.shape}")
        if axis not in (0, 1, 2):
            raise OptionError(f"axis must be 0, 1 or 2, got {axis}")
        self._volume = VolumeState(normalize_intensity(volume, window, keep_uint8=False), axis)
        self._current = self._current_rgb = None
        return self._volume

    @property
    def volume(self) -> Optional[VolumeState]:
        return self._volume

    def slice_record(self, index: int) -> ImageRecord:
        vol = self._require_volume()
        record = vol.records.get(index)
        if record is None or record.key not in self.embeddings:
            record = self.embed_rgb(vol.slice_rgb(index))
            vol.records[index] = record
        return record

    def is_embedded(self, index: int) -> bool:
        vol = self._require_volume()
        record = vol.records.get(index)
        return record is not None and record.key in self.embeddings

    def embed_slices(self, indices: Optional[Iterable[int]] = None, progress: Optional[ProgressFn] = None,
                     cancel: Optional[CancelFn] = None) -> List[ImageRecord]:
        """Embed the given slices (default: all), in order, skipping cached ones."""
        vol = self._require_volume()
        order = list(range(vol.n_slices)) if indices is None else [int(i) for i in indices]
        records = []
        for done, index in enumerate(order, start=1):
            check_cancel(cancel)
            records.append(self.slice_record(index))
            report(progress, done, len(order), f"embedding: slice {index}")
        return records

    def set_slice(self, index: int) -> ImageRecord:
        self._current = self.slice_record(index)
        self._current_index = int(index)
        return self._current

    def alignment_layer(self, name: str) -> nn.Module:
        """Task ``name``'s Alignment Layer, read from the library on first use (``DeferredLayer``)."""
        layer = self.layers[name]
        if isinstance(layer, DeferredLayer):
            with torch.inference_mode(False):  # real parameters, not inference tensors
                layer = layer.library.load_layer(layer.name, layer.card).to(self.device).eval()
            layer.requires_grad_(False)
            self.layers[name] = layer
        return layer

    # -- features -------------------------------------------------------------------
    @torch.inference_mode()
    def task_features(self, layer: Optional[str] = None, record: Optional[ImageRecord] = None) -> torch.Tensor:
        """Decoder input (1, 256, 64, 64): frozen Z, or A_layer(Z) cached per (image, layer).
        ``layer`` is a ``TaskChoice.layer`` (None: the frozen features)."""
        record = record or self._require_current()
        if layer is None:
            return self.embedding(record)[None]
        if self.layers.get(layer) is None:
            raise UnknownTask(f"no Alignment Layer for task {layer!r}; with layers: "
                              f"{', '.join(n for n, l in self.layers.items() if l is not None) or 'none'}")
        cache_key = (record.key, layer)
        aligned = self.aligned.get(cache_key)
        if aligned is None:
            aligned = self.alignment_layer(layer)(self.embedding(record)[None])
            self.aligned.put(cache_key, aligned)
        return aligned

    # -- prediction: segment-anything's contract ----------------------------------------
    def predict(self, point_coords: Optional[np.ndarray] = None, point_labels: Optional[np.ndarray] = None,
                box: Optional[np.ndarray] = None, mask_input: Optional[np.ndarray] = None,
                multimask_output: bool = True, return_logits: bool = False,
                task: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """segment-anything's ``SamPredictor.predict`` on the current image, for one object.

        ``point_coords`` (N, 2) as (x, y) pixels with ``point_labels`` (N,) 1 = foreground,
        0 = background; ``box`` (4,) or (1, 4) as x0, y0, x1, y1; ``mask_input`` (1, 256, 256)
        low-res logits from an earlier call (e.g. ``logits[np.argmax(scores)][None]``).
        Returns masks (C, H, W) bool (logits with ``return_logits``), scores (C,) the decoder's
        IoU predictions and low-res logits (C, 256, 256); C = 3 with ``multimask_output``.
        ``task``: CA-SAM's addition (default None: the frozen model; "auto": the router).
        Several objects at once: ``predict_batch`` or ``predict_torch``.
        """
        if box is not None and np.asarray(box).ndim == 2 and np.asarray(box).shape[0] != 1:
            raise PromptError(f"predict takes one box; for {np.asarray(box).shape[0]} boxes use predict_batch "
                              f"(or predict_torch)")
        if point_coords is not None and np.asarray(point_coords).ndim != 2:
            raise PromptError(f"point_coords must be (N, 2); got shape {np.shape(point_coords)} "
                              f"(point sets per box: predict_batch)")
        masks, scores, logits = self.predict_batch(point_coords, point_labels, box, mask_input, multimask_output,
                                                   task, return_logits)
        return masks[0], scores[0], logits[0]

    @torch.inference_mode()
    def predict_torch(self, point_coords: Optional[torch.Tensor], point_labels: Optional[torch.Tensor],
                      boxes: Optional[torch.Tensor] = None, mask_input: Optional[torch.Tensor] = None,
                      multimask_output: bool = True, return_logits: bool = False,
                      task: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """segment-anything's ``SamPredictor.predict_torch``: prompts already in the model frame
        (``predictor.transform.apply_coords_torch`` / ``apply_boxes_torch``), batched over B:
        ``point_coords`` (B, N, 2), ``point_labels`` (B, N), ``boxes`` (B, 4), ``mask_input``
        (B, 1, 256, 256). Returns torch masks (B, C, H, W), scores (B, C), logits (B, C, 256, 256)."""
        record = self._require_current()
        dev = self.device
        points = None
        if point_coords is not None:
            if point_labels is None:
                raise PromptError("point_labels are needed with point_coords (1 = foreground, 0 = background)")
            points = (torch.as_tensor(point_coords, dtype=torch.float32, device=dev),
                      torch.as_tensor(point_labels, dtype=torch.int, device=dev))
        boxes = None if boxes is None else torch.as_tensor(boxes, dtype=torch.float32, device=dev).reshape(-1, 4)
        masks = None if mask_input is None else torch.as_tensor(mask_input, dtype=torch.float32, device=dev)
        if points is None and boxes is None and masks is None:
            raise PromptError("give at least one prompt: a point, a box or a mask")
        choice = self.choose_task(task, record)
        low_res, iou = self._decode(self.task_features(choice.layer, record), record, points, boxes, masks,
                                    multimask_output, **self.click_decoding(choice.layer))
        full = self.backbone.postprocess_masks(low_res, record.input_size, record.original_size)
        return (full if return_logits else full > 0.0), iou, low_res

    # -- prediction: CA-SAM's zero-click ------------------------------------------------
    @torch.inference_mode()
    def segment_auto(self, task: Optional[str] = "auto", progress: Optional[ProgressFn] = None,
                     cancel: Optional[CancelFn] = None) -> AutoResult:
        """Segment the current image, or the whole current volume, with a learned task and no
        prompts: the task's finder says where each of its structures is (a volume's are linked
        through its slices, one object each) and its decoder draws them. ``task``: "auto" (the
        router; one decision per volume) or a task's name. Returns an ``AutoResult`` (label map,
        objects, task choice); ``NoAutoSegmentation`` (one line: why) for the frozen model, an
        image no task recognises, or a task without a finder."""
        if self._volume is not None:
            return auto.segment_volume(self, self.choose_task(task, progress=progress, cancel=cancel), cancel, progress)
        record = self._require_current()
        return auto.segment_image(self, self.choose_task(task, record), record, cancel, progress)

    # -- prediction: CA-SAM's batches --------------------------------------------------
    @torch.inference_mode()
    def predict_batch(self, point_coords=None, point_labels=None, box=None, mask_input=None,
                      multimask_output: bool = False, task: Optional[str] = None,
                      return_logits: bool = False) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Segment several objects of the current image in one decoder call.

        Prompts are in pixel coordinates of the original image: ``point_coords`` (N, 2)
        as (x, y) with ``point_labels`` (N,) 1 = foreground / 0 = background; ``box``
        (4,) or several boxes (B, 4) as x0, y0, x1, y1; ``mask_input`` (1, 256, 256) or
        (B, 1, 256, 256) low-res logits from an earlier call. Points are shared by all
        boxes unless given per box as (B, N, 2).

        Returns ``masks`` (B, C, H, W) bool at the original resolution (logits if
        ``return_logits``), ``scores`` (B, C) the decoder's IoU predictions and
        ``low_res_logits`` (B, C, 256, 256); C = 3 with ``multimask_output`` else 1.
        """
        record = self._require_current()
        choice = self.choose_task(task, record)
        return self.predict_features(self.task_features(choice.layer, record), record, point_coords, point_labels,
                                     box, mask_input, multimask_output, return_logits,
                                     **self.click_decoding(choice.layer))

    def click_decoding(self, layer: Optional[str]) -> Dict[str, object]:
        """How point-only prompts are decoded on ``layer``'s features (``predict_features``
        keywords), from its task card's ``point_prompts``: ``"click_box"`` (a box of the task's
        typical object size, ``card["click_box"]``, decoded once), ``"direct"`` (the points
        decoded once) or anything else (the backbone's default)."""
        card = self.cards.get(layer, {}) if layer is not None else {}
        mode = card.get("point_prompts")
        if mode == "click_box" and card.get("click_box"):
            return {"click_box": tuple(float(v) for v in card["click_box"])}
        if mode == "direct":
            return {"point_search": False}
        return {}

    @torch.inference_mode()
    def predict_features(self, z: torch.Tensor, record: ImageRecord, point_coords=None, point_labels=None, box=None,
                         mask_input=None, multimask_output: bool = False, return_logits: bool = False,
                         point_search: Optional[bool] = None, click_box: Optional[Sequence[float]] = None
                         ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``predict_batch`` on given decoder features ``z`` (1, 256, 64, 64) of the image ``record``:
        task learning calls it with a layer that is still being validated."""
        points, boxes, masks = self._prompts(record, point_coords, point_labels, box, mask_input)
        low_res, iou = self._decode(z, record, points, boxes, masks, multimask_output, point_search, click_box)
        full = self.backbone.postprocess_masks(low_res, record.input_size, record.original_size)
        if box is not None and point_coords is not None:  # corrective clicks never take a mask out of its box
            low_res, full = self._keep_in_boxes(record, low_res, full, box, point_coords, point_labels)
        out = full if return_logits else full > 0.0
        return out.cpu().numpy(), iou.float().cpu().numpy(), low_res.float().cpu().numpy()

    def _keep_in_boxes(self, record: ImageRecord, low_res: torch.Tensor, full: torch.Tensor, box, point_coords,
                       point_labels) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits outside each object's box (grown to take in its positive clicks) made negative, at
        full resolution and in the low-res logits a next corrective click starts from (there with one
        low-res pixel to spare, so that upsampling keeps the edge). The user's box says where the
        object is: a click inside it must not make the mask spill out (measured on kvasir_polyp: a
        click on a 110-pixel miss took box Dice 0.982 -> 0.881, 2289 pixels outside the box)."""
        boxes = np.asarray(box, np.float64).reshape(-1, 4)
        coords = np.asarray(point_coords, np.float64)
        labels = np.ones(coords.shape[:-1]) if point_labels is None else np.asarray(point_labels)
        coords = np.broadcast_to(coords if coords.ndim == 3 else coords[None], (len(boxes),) + coords.shape[-2:])
        labels = np.broadcast_to(labels if labels.ndim == 2 else labels[None], coords.shape[:2])
        lo, hi = boxes[:, :2].copy(), boxes[:, 2:].copy()
        for b in range(len(boxes)):
            positive = coords[b][labels[b] == 1]
            if len(positive):
                lo[b], hi[b] = np.minimum(lo[b], positive.min(0)), np.maximum(hi[b], positive.max(0))
        lo, hi = np.floor(lo), np.ceil(hi)
        (h, w), (h_in, w_in) = record.original_size, record.input_size
        device = full.device

        def inside(ys: torch.Tensor, xs: torch.Tensor, spare: Tuple[float, float]) -> torch.Tensor:
            lo_t = torch.as_tensor(lo - spare, dtype=torch.float32, device=device)
            hi_t = torch.as_tensor(hi + spare, dtype=torch.float32, device=device)
            in_x = (xs[None] >= lo_t[:, :1]) & (xs[None] <= hi_t[:, :1])
            in_y = (ys[None] >= lo_t[:, 1:]) & (ys[None] <= hi_t[:, 1:])
            return (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (B, 1, rows, columns)

        out = torch.tensor(-20.0, device=device)
        full = torch.where(inside(torch.arange(h, device=device, dtype=torch.float32),
                                  torch.arange(w, device=device, dtype=torch.float32), (0.0, 0.0)),
                           full, torch.minimum(full, out.to(full.dtype)))
        n = low_res.shape[-1]
        step = self.backbone.img_size / n  # one low-res pixel in the model's input frame
        centres = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) * step
        sx, sy = w / w_in, h / h_in  # input frame -> original pixels
        keep = inside(centres * sy, centres * sx, (step * sx, step * sy))
        low_res = torch.where(keep, low_res, torch.minimum(low_res, out.to(low_res.dtype)))
        return low_res, full

    def _decode(self, z: torch.Tensor, record: ImageRecord, points, boxes, masks, multimask_output: bool,
                point_search: Optional[bool] = None, click_box: Optional[Sequence[float]] = None):
        """The one decoding path, on prompts in the model frame -> (low-res logits, IoU predictions).

        Point-only prompts (no box): with ``click_box`` = (w, h), fractions of the image's
        long side (a learned task's typical object size), positive clicks become one box of
        that size centred on them (grown to span them), decoded once; else ``point_search``
        sends them through the box search (``True``) or decodes them once as points
        (``False``); ``None``: search only on a box-trained backbone.
        """
        if click_box is not None and boxes is None and points is not None and bool((points[1] == 1).all()):
            coords = points[0]
            (h, w), (h_in, w_in) = record.original_size, record.input_size
            to_input = torch.tensor([w_in / w, h_in / h], dtype=torch.float32, device=coords.device)
            half = torch.as_tensor(click_box, dtype=torch.float32, device=coords.device) * max(h, w) / 2 * to_input
            lo, hi = coords.min(1).values, coords.max(1).values
            centre, spread = (lo + hi) / 2, (hi - lo) / 2
            half = torch.maximum(half[None], spread)
            boxes, points = torch.cat([centre - half, centre + half], dim=1), None
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, (w - 1) * float(to_input[0]))  # inside the image, as box prompts
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, (h - 1) * float(to_input[1]))
        if point_search is None:
            point_search = not self.backbone.spec.point_prompts
        if points is not None and point_search:
            return self._point_box_search(z, record, points, masks, multimask_output, boxes)
        return self.backbone.decode(z, points, boxes, masks, multimask_output)

    def _prompts(self, record: ImageRecord, point_coords, point_labels, box, mask_input):
        h, w = record.original_size
        dev = self.device
        boxes_t = points = masks_t = None
        batch = 1
        if box is not None:
            b = np.asarray(box, dtype=np.float64)
            if b.ndim == 1:
                b = b[None]
            if b.ndim != 2 or b.shape[1] != 4 or b.shape[0] == 0:
                raise PromptError(f"box must be (4,) or (B, 4) as x0, y0, x1, y1; got shape {np.shape(box)}")
            if not np.isfinite(b).all():
                raise PromptError("box coordinates must be finite numbers")
            if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
                raise PromptError(f"box needs x0 <= x1 and y0 <= y1; got {b.tolist()}")
            outside = (b[:, 2] < 0) | (b[:, 0] > w - 1) | (b[:, 3] < 0) | (b[:, 1] > h - 1)
            if outside.any():
                raise PromptError(f"box {b[outside][0].tolist()} lies entirely outside the {w}x{h} image")
            b = np.stack([np.clip(b[:, 0], 0, w - 1), np.clip(b[:, 1], 0, h - 1),
                          np.clip(b[:, 2], 0, w - 1), np.clip(b[:, 3], 0, h - 1)], axis=1)
            batch = b.shape[0]
            boxes_t = torch.as_tensor(self.backbone.transform_boxes(b, (h, w)), dtype=torch.float32, device=dev)
        if point_coords is not None:
            if point_labels is None:
                raise PromptError("point_labels are needed with point_coords (1 = foreground, 0 = background)")
            c = np.asarray(point_coords, dtype=np.float64)
            lab = np.asarray(point_labels)
            if c.ndim == 2:
                c, lab = c[None], lab.reshape(1, -1)
            if c.ndim != 3 or c.shape[2] != 2 or lab.shape != c.shape[:2] or c.shape[1] == 0:
                raise PromptError(
                    f"point_coords must be (N, 2) with point_labels (N,); got {np.shape(point_coords)} "
                    f"and {np.shape(point_labels)}"
                )
            if not np.isfinite(c).all():
                raise PromptError("point coordinates must be finite numbers")
            if (c[..., 0] < 0).any() or (c[..., 0] > w - 1).any() or (c[..., 1] < 0).any() or (c[..., 1] > h - 1).any():
                raise PromptError(f"a point lies outside the {w}x{h} image")
            if not np.isin(lab, (0, 1)).all():
                raise PromptError("point labels must be 1 (foreground) or 0 (background)")
            if c.shape[0] == 1 and batch > 1:
                c, lab = np.repeat(c, batch, 0), np.repeat(lab, batch, 0)
            elif c.shape[0] != batch and box is not None:
                raise PromptError(f"{c.shape[0]} point sets for {batch} boxes")
            batch = c.shape[0]
            coords_t = torch.as_tensor(self.backbone.transform_coords(c, (h, w)), dtype=torch.float32, device=dev)
            points = (coords_t, torch.as_tensor(lab, dtype=torch.int, device=dev))
        if mask_input is not None:
            m = torch.as_tensor(np.asarray(mask_input), dtype=torch.float32, device=dev)
            if m.ndim == 3:
                m = m[None]
            size = 4 * self.backbone.embedding_shape[1]
            if m.ndim != 4 or m.shape[1:] != (1, size, size):
                raise PromptError(f"mask_input must be (1, {size}, {size}) low-res logits; got {tuple(m.shape)}")
            if m.shape[0] == 1 and batch > 1:
                m = m.expand(batch, -1, -1, -1)
            masks_t = m
        if boxes_t is None and points is None and masks_t is None:
            raise PromptError("give at least one prompt: a point, a box or a mask")
        return points, boxes_t, masks_t

    def _point_box_search(self, z, record: ImageRecord, points, masks, multimask_output: bool, boxes=None):
        """Clicks on a box-only backbone (LiteMedSAM), alone or with a box or earlier logits.

        The backbone ignores points, so clicks choose among boxes. For each point set, the
        candidates are boxes of several sizes centred on the positive clicks and, when there
        is a prior box (the prompt's box, or the box of the earlier logits in ``masks``),
        variants of that box: as is, grown to take in each positive click, cut back on the
        side that excludes each negative click, and both, each also 10 % larger and smaller.
        All are decoded in one batch (without the earlier logits: this backbone was not
        trained with mask prompts). With earlier logits, the newest click also edits the
        earlier mask locally: boxes of ``LOCAL_EDIT_FRACTIONS`` centred on it are decoded, and
        the part of each that touches the click, inside its box, is added to the earlier mask
        (positive click) or cut out of it (negative; where the click is background in the
        local decode, the box keeps only what both call foreground). The winner satisfies
        the most clicks (positives inside, negatives outside); among those a local edit comes
        first (``LOCAL_EDIT_BONUS``: a correction fixes, it does not restart), then the
        highest predicted IoU plus closeness to the earlier mask. So a corrective click can
        only move the result towards a mask that agrees with it; earlier clicks stay
        honoured where any candidate honours them.
        """
        coords, labels = points
        h_in, w_in = record.input_size
        long_side = max(h_in, w_in)
        low_size = 4 * self.backbone.embedding_shape[1]
        scale = low_size / self.backbone.img_size
        out_low, out_iou = [], []
        for b in range(coords.shape[0]):
            pos, neg = coords[b][labels[b] == 1], coords[b][labels[b] == 0]
            prior = boxes[b] if boxes is not None else (
                _logits_box(masks[b, 0], self.backbone.img_size / low_size) if masks is not None else None)
            if pos.shape[0] == 0 and prior is None:
                raise PromptError("this backbone needs a box or at least one foreground point (label 1)")
            cand = []
            if pos.shape[0]:
                lo, hi = pos.min(0).values, pos.max(0).values
                centre, spread = (lo + hi) / 2, (hi - lo) / 2
                half = torch.stack([spread + f * long_side / 2 for f in POINT_SEARCH_FRACTIONS])  # (K, 2)
                cand.append(torch.cat([centre - half, centre + half], dim=1))
            if prior is not None:
                cand.append(_box_variants(prior, pos, neg))
            last = coords[b][-1]
            n_local = len(LOCAL_EDIT_FRACTIONS) if masks is not None else 0
            if n_local:  # boxes centred on the newest click, for local edits of the earlier mask
                half = torch.tensor(LOCAL_EDIT_FRACTIONS, device=coords.device)[:, None] * long_side / 2
                cand.append(torch.cat([last - half, last + half], dim=1))
            cand = torch.cat(cand)
            cand[:, 0::2] = cand[:, 0::2].clamp(0, w_in - 1)
            cand[:, 1::2] = cand[:, 1::2].clamp(0, h_in - 1)
            # a first click needs each candidate's logits only at the clicks; a correction compares
            # whole masks with the earlier one
            found = self.backbone.decode_candidates(z, cand, whole=masks is not None)
            iou = found.iou[:, :1]
            if masks is not None:
                low = found.whole[:, :1]
                if n_local:
                    edits = _local_edits(masks[b, 0], low[-n_local:, 0], cand[-n_local:] * scale,
                                         (last * scale).long().clamp(0, low_size - 1), bool(labels[b][-1] == 1))
                    low = torch.cat([low, edits[:, None]])
                    iou = torch.cat([iou, iou[-n_local:]])
                    cand = torch.cat([cand, cand[-n_local:]])
                logits = low[:, 0]

            def inside(pts):
                ij = (pts * scale).long().clamp(0, low_size - 1)
                at = logits[:, ij[:, 1], ij[:, 0]] if masks is not None else found.logits_at(ij)[:, 0]
                return at > 0  # (K, n_points)

            satisfied = inside(pos).sum(1) + (~inside(neg)).sum(1)
            score = satisfied.float() * 10.0 + iou[:, 0]  # most clicks honoured, then predicted IoU ...
            keep = None
            if masks is not None:  # ... plus closeness to the earlier mask: a correction fixes, it does not restart
                before = masks[b, 0] > 0
                now = logits > 0
                closeness = (now & before).flatten(1).sum(1) / (now | before).flatten(1).sum(1).clamp(min=1)
                score = score + CLOSENESS_WEIGHT * closeness
                ij_pos, ij_neg = ((pts * scale).long().clamp(0, low_size - 1) for pts in (pos, neg))
                honoured_before = int(before[ij_pos[:, 1], ij_pos[:, 0]].sum() + (~before[ij_neg[:, 1], ij_neg[:, 0]]).sum())
                if int(satisfied.max()) <= honoured_before:  # no candidate honours more clicks: keep the mask
                    keep = int(closeness.argmax())
            if n_local:
                score[-n_local:] += LOCAL_EDIT_BONUS  # a local edit beats a restart that honours no more clicks
            best = int(score.argmax())
            if int(satisfied.max()) == 0 and pos.shape[0]:
                best = len(POINT_SEARCH_FRACTIONS) - 1  # nothing honours a click: the largest centred box
            if keep is not None:
                low_b, iou_b = masks[b: b + 1].expand(-1, 3 if multimask_output else 1, -1, -1), iou[keep: keep + 1]
                if multimask_output:
                    iou_b = iou_b.expand(-1, 3)
            elif best >= len(cand) - n_local:  # a local edit: the one mask (three times for multimask)
                low_b, iou_b = low[best: best + 1], iou[best: best + 1]
                if multimask_output:
                    low_b, iou_b = low_b.expand(-1, 3, -1, -1), iou_b.expand(-1, 3)
            else:  # a candidate as decoded: its outputs need no second decode
                chosen = slice(1, None) if multimask_output else slice(0, 1)
                low_b, iou_b = found.masks(best)[:, chosen], found.iou[best: best + 1, chosen]
            out_low.append(low_b)
            out_iou.append(iou_b)
        return torch.cat(out_low), torch.cat(out_iou)

    # -- helpers --------------------------------------------------------------------
    def current_record(self) -> ImageRecord:
        """The record of the current image or slice (an error when none is set)."""
        return self._require_current()

    def _require_current(self) -> ImageRecord:
        if self._current is None:
            raise RuntimeError("no image is set: call set_image(), or set_volume() then set_slice()")
        return self._current

    def _require_volume(self) -> VolumeState:
        if self._volume is None:
            raise RuntimeError("no volume is set: call set_volume() first")
        return self._volume


def _logits_box(logits: torch.Tensor, to_input: float) -> Optional[torch.Tensor]:
    """The (4,) box, in model input pixels, of the positive part of low-res logits (None if empty)."""
    ys, xs = torch.nonzero(logits > 0, as_tuple=True)
    if len(xs) == 0:
        return None
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float() * to_input


def _local_edits(before: torch.Tensor, local: torch.Tensor, boxes: torch.Tensor, click, positive: bool) -> torch.Tensor:
    """Earlier logits ``before`` (S, S) edited at one corrective click (``click`` = (x, y) in
    low-res pixels) by each of the ``local`` (K, S, S) decodes of the ``boxes`` (K, 4; low-res
    pixels) centred on it: the part of each local mask inside its box and connected to the
    click is added (positive click) or cut out (negative). The edit stays inside the box."""
    from scipy import ndimage

    out = []
    x, y = int(click[0]), int(click[1])
    size = before.shape[-1]
    for lk, box in zip(local, boxes):
        x0, y0 = (int(v) for v in box[:2].floor().clamp(0, size - 1))
        x1, y1 = (int(v) for v in box[2:].ceil().clamp(0, size - 1))
        inside = np.zeros((size, size), bool)
        inside[y0: y1 + 1, x0: x1 + 1] = True
        comp, _ = ndimage.label((lk > 0).cpu().numpy() & inside)
        region = torch.as_tensor(comp == comp[y, x], device=lk.device) if comp[y, x] else None
        if positive:
            out.append(before if region is None else torch.where(region, torch.maximum(before, lk), before))
        elif region is not None:  # the click is on something else: cut that out
            out.append(torch.where(region, torch.minimum(before, -lk), before))
        else:  # the click is background here: inside the box, keep what both call foreground
            out.append(torch.where(torch.as_tensor(inside, device=lk.device), torch.minimum(before, lk), before))
    return torch.stack(out)


def _box_variants(box: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """(K, 4) boxes around a prior box: itself; grown to take in each positive click; cut back to
    exclude each negative click on the side that loses least; all clicks at once; each x0.9 and x1.1."""
    margin = 0.05 * (box[2:] - box[:2]).clamp(min=8.0)
    variants = [box]

    def grow(b, p):
        return torch.cat([torch.minimum(b[:2], p - margin), torch.maximum(b[2:], p + margin)])

    def cut(b, q):
        options = [b.clone() for _ in range(4)]
        options[0][0] = torch.maximum(b[0], q[0] + margin[0])  # move the left side right of the click
        options[1][2] = torch.minimum(b[2], q[0] - margin[0])
        options[2][1] = torch.maximum(b[1], q[1] + margin[1])
        options[3][3] = torch.minimum(b[3], q[1] - margin[1])
        valid = [o for o in options if (o[2] > o[0]) and (o[3] > o[1])]
        if not valid:
            return b
        return max(valid, key=lambda o: float((o[2] - o[0]) * (o[3] - o[1])))

    all_clicks = box
    for p in pos:
        variants.append(grow(box, p))
        all_clicks = grow(all_clicks, p)
    for q in neg:
        inside = bool((q >= box[:2]).all() and (q <= box[2:]).all())
        if inside:
            variants.append(cut(box, q))
            all_clicks = cut(all_clicks, q)
    variants.append(all_clicks)
    out = torch.stack(variants)
    centre, half = (out[:, :2] + out[:, 2:]) / 2, (out[:, 2:] - out[:, :2]) / 2
    scaled = [torch.cat([centre - f * half, centre + f * half], dim=1) for f in (0.9, 1.1)]
    return torch.cat([out] + scaled)

