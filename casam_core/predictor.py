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
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from . import auto, clicks
from .alignment import run_layer
from .auto import AutoResult
from .backbones import Backbone, preprocess_shape
from .cache import DiskEmbeddingCache, TensorLRU, data_signature
from .files import PathLike
from .images import normalize_intensity, take_slice, to_rgb
from .errors import ImageIOError, NoImageError, OptionError, PromptError, TaskLibraryError, UnknownTask
from .progress import CancelFn, ProgressFn, check_cancel, report
from .prompts import check_prompts_given, model_prompts
from .router import RouteDecision, Router, TaskVAE, router_feature
from .tasks import TaskChoice, check_task_name, task_mode

DEFAULT_MEMORY_BYTES = 2 * 1024**3
DEFAULT_ALIGNED_BYTES = 512 * 1024**2


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
                 disk_cache: Optional[PathLike] = None,
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
                raise NoImageError("no slice of this volume is embedded yet")
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
        """Any gray/RGB image -> the uint8 RGB the encoder sees (see images.normalize_intensity)."""
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
            raise NoImageError("An image must be set with .set_image(...) to generate an embedding.")
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
    def set_volume(self, volume: np.ndarray, axis: int = 0, window=None, prepared: bool = False) -> VolumeState:
        """Normalise a 3D volume once (one intensity window for all slices) and make it current;
        slices are embedded on demand (``set_slice``) or ahead (``embed_slices``). ``prepared``: the
        uint8 the encoder sees (a ``TaskData`` volume's slices, stacked), kept as it is."""
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise ImageIOError(f"expected a 3D volume, got shape {volume.shape}")
        if axis not in (0, 1, 2):
            raise OptionError(f"axis must be 0, 1 or 2, got {axis}")
        if prepared and volume.dtype != np.uint8:
            raise ImageIOError(f"a prepared volume is uint8, not {volume.dtype}")
        self._volume = VolumeState(volume if prepared else normalize_intensity(volume, window, keep_uint8=False), axis)
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
            aligned = run_layer(self.alignment_layer(layer), self.embedding(record)[None], self.backbone.layer_dtype)
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
        check_prompts_given(point_coords, point_labels, boxes, mask_input)
        points = None
        if point_coords is not None:
            points = (torch.as_tensor(point_coords, dtype=torch.float32, device=dev),
                      torch.as_tensor(point_labels, dtype=torch.int, device=dev))
        boxes = None if boxes is None else torch.as_tensor(boxes, dtype=torch.float32, device=dev).reshape(-1, 4)
        masks = None if mask_input is None else torch.as_tensor(mask_input, dtype=torch.float32, device=dev)
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
        """How point-only prompts are decoded on ``layer``'s features (``predict_features`` keywords),
        from its task card (``clicks.decoding_for``)."""
        return clicks.decoding_for(self.cards.get(layer, {}) if layer is not None else {})

    @torch.inference_mode()
    def predict_features(self, z: torch.Tensor, record: ImageRecord, point_coords=None, point_labels=None, box=None,
                         mask_input=None, multimask_output: bool = False, return_logits: bool = False,
                         point_search: Optional[bool] = None, click_box: Optional[Sequence[float]] = None
                         ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``predict_batch`` on given decoder features ``z`` (1, 256, 64, 64) of the image ``record``:
        task learning calls it with a layer that is still being validated."""
        points, boxes, masks = model_prompts(self.backbone, record.original_size, point_coords, point_labels, box,
                                             mask_input, self.device)
        low_res, iou = self._decode(z, record, points, boxes, masks, multimask_output, point_search, click_box)
        full = self.backbone.postprocess_masks(low_res, record.input_size, record.original_size)
        if box is not None and point_coords is not None:  # corrective clicks never take a mask out of its box
            low_res, full = clicks.keep_in_boxes(self.backbone.img_size, record.original_size, record.input_size,
                                                 low_res, full, box, point_coords, point_labels)
        out = full if return_logits else full > 0.0
        return out.cpu().numpy(), iou.float().cpu().numpy(), low_res.float().cpu().numpy()

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
            boxes, points = clicks.task_sized_box(points[0], record.original_size, record.input_size, click_box), None
        if point_search is None:
            point_search = not self.backbone.spec.point_prompts
        if points is not None and point_search:
            return clicks.point_box_search(self.backbone, z, record.input_size, points, masks, multimask_output, boxes)
        return self.backbone.decode(z, points, boxes, masks, multimask_output)

    # -- helpers --------------------------------------------------------------------
    def current_record(self) -> ImageRecord:
        """The record of the current image or slice (an error when none is set)."""
        return self._require_current()

    def _require_current(self) -> ImageRecord:
        if self._current is None:
            raise NoImageError("no image is set: call set_image(), or set_volume() then set_slice()")
        return self._current

    def _require_volume(self) -> VolumeState:
        if self._volume is None:
            raise NoImageError("no volume is set: call set_volume() first")
        return self._volume
