"""A task's files read as untrusted input: size limits, JSON depth, the card's schema, safetensors
headers checked against the expected tensors before any is loaded, SHA-256. Nothing is unpickled.
The library (``casam_core.library``) and task packs read every task through here.
"""

from __future__ import annotations

import hashlib
import json
import os
import math
import stat
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from .alignment import FORMS, MAX_BLOCKS, AlignmentLayer
from .errors import CASamError, TaskLibraryError, check_number
from .finder import Finder
from .router import TaskVAE
from .tasks import Task, check_task_name

CARD = "task.json"
ALIGNMENT = "alignment.safetensors"
ROUTER = "router.safetensors"
FINDER = "finder.safetensors"
MANIFEST = "manifest.json"
MAX_CARD_BYTES = 4 * 1024**2  # task.json / manifest.json
MAX_JSON_DEPTH = 32
MAX_FINDER_OUTPUTS = 64
LAYER_CHANNELS = 256  # the prompt decoder's width, the same for every registered backbone
MAX_SAFETENSORS_HEADER = 1024**2
POINT_PROMPTS = ("default", "direct", "click_box")  # how a task decodes clicks (clicks.decoding_for)


def read_task_file(path: Path, limit: int) -> bytes:
    """The bytes of one file of a task folder, checked before anything is read: a regular file (not a
    symbolic link, FIFO or device: a FIFO blocked reading forever, a link to /dev/zero read until
    memory ran out) of at most ``limit`` bytes."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        why = "is a symbolic link; task files must be the folder's own files" if path.is_symlink() else \
            (exc.strerror or str(exc))
        raise TaskLibraryError(f"{path}: {why}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TaskLibraryError(f"{path}: not a regular file (a FIFO, device or socket); task files are plain files")
        if info.st_size > limit:
            raise TaskLibraryError(f"{path}: {info.st_size} bytes is too large for a task file (at most {limit})")
        chunks, left = [], info.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise TaskLibraryError(f"{path}: unreadable ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_json(data: Union[bytes, str], what: str) -> dict:
    """A JSON object from untrusted bytes: bounded in size and nesting, one clear error otherwise."""
    if len(data) > MAX_CARD_BYTES:
        raise TaskLibraryError(f"{what} is too large ({len(data)} bytes; at most {MAX_CARD_BYTES})")
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise TaskLibraryError(f"{what} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise TaskLibraryError(f"{what} must be a JSON object")
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise TaskLibraryError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return value


def check_card(card: dict, where: str) -> None:
    """The card's fields that decide what is built and how it is used: known values and ranges,
    checked before any model is allocated."""
    for key in ("name", "backbone_fingerprint", "alignment", "router", "files"):
        if key not in card:
            raise TaskLibraryError(f"{where}: task.json has no {key!r}")
    try:
        check_task_name(card["name"])
    except (CASamError, TypeError) as exc:
        raise TaskLibraryError(f"{where}: task.json: {exc}") from None
    align, router = card["alignment"], card["router"]
    if not isinstance(align, dict) or not isinstance(router, dict) or not isinstance(card["files"], dict):
        raise TaskLibraryError(f"{where}: task.json: alignment, router and files must be JSON objects")
    check_number(align.get("channels"), f"{where}: task.json alignment.channels", LAYER_CHANNELS, LAYER_CHANNELS,
                 integer=True, error=TaskLibraryError)
    check_number(align.get("n_blocks"), f"{where}: task.json alignment.n_blocks", 1, MAX_BLOCKS, integer=True,
                 error=TaskLibraryError)
    if align.get("form") not in FORMS:
        raise TaskLibraryError(f"{where}: task.json alignment.form must be one of {list(FORMS)}; got {align.get('form')!r}")
    check_number(router.get("tau"), f"{where}: task.json router.tau", 0, 1e12, low_open=True, error=TaskLibraryError)
    if "click_box" in card:
        box = card["click_box"]
        if not isinstance(box, list) or len(box) != 2:
            raise TaskLibraryError(f"{where}: task.json click_box must be [width, height]; got {box!r}")
        for v in box:
            check_number(v, f"{where}: task.json click_box", 0, 1.0, low_open=True, error=TaskLibraryError)
    if card.get("point_prompts", "default") not in POINT_PROMPTS:
        raise TaskLibraryError(f"{where}: task.json point_prompts must be one of {list(POINT_PROMPTS)}; "
                               f"got {card.get('point_prompts')!r}")
    if not isinstance(card.get("use_alignment", True), bool):
        raise TaskLibraryError(f"{where}: task.json use_alignment must be true or false")
    if "finder" in card:
        finder = card["finder"]
        outputs = finder.get("outputs") if isinstance(finder, dict) else None
        if not (isinstance(outputs, list) and 1 <= len(outputs) <= MAX_FINDER_OUTPUTS):
            raise TaskLibraryError(f"{where}: task.json finder.outputs must list 1-{MAX_FINDER_OUTPUTS} label values")
        for v in outputs:
            check_number(v, f"{where}: task.json finder.outputs", 1, 65535, integer=True, error=TaskLibraryError)
        check_number(finder.get("threshold"), f"{where}: task.json finder.threshold", 0.0, 1.0, low_open=True,
                     error=TaskLibraryError)
        if finder.get("objects", "class") not in ("class", "instance"):
            raise TaskLibraryError(f"{where}: task.json finder.objects must be 'class' or 'instance'")
    validation = card.get("validation", {})
    if not isinstance(validation, dict):
        raise TaskLibraryError(f"{where}: task.json validation must be a JSON object")
    estimate = validation.get("iou_estimate")
    if estimate is not None:  # scales propagation's "unsure" stop (prompts.score_floor)
        if not isinstance(estimate, dict):
            raise TaskLibraryError(f"{where}: task.json validation.iou_estimate must be a JSON object")
        for key in ("frozen", "aligned"):
            check_number(estimate.get(key), f"{where}: task.json validation.iou_estimate.{key}", 0.0, 2.0,
                         low_open=True, error=TaskLibraryError)
    if "propagation" in card:
        chosen = card["propagation"]
        if not isinstance(chosen, dict) or not isinstance(chosen.get("reanchor"), bool):
            raise TaskLibraryError(f"{where}: task.json propagation.reanchor must be true or false")


def _check_header(data: bytes, expected: Dict[str, torch.Tensor], what: str) -> None:
    """The safetensors header against the module's own tensors (names, float32, shapes, byte
    ranges), read before any tensor data is allocated."""
    bad = TaskLibraryError(f"{what} is not a valid safetensors file (bad header)")
    if len(data) < 8:
        raise bad
    n = int.from_bytes(data[:8], "little")
    if n > MAX_SAFETENSORS_HEADER or 8 + n > len(data):
        raise bad
    try:
        header = json.loads(data[8: 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise bad from None
    if not isinstance(header, dict):
        raise bad
    header.pop("__metadata__", None)
    unknown, missing = sorted(set(header) - set(expected)), sorted(set(expected) - set(header))
    if unknown or missing:
        raise TaskLibraryError(f"{what}: unknown tensors {unknown[:5]} / missing tensors {missing[:5]}")
    body = len(data) - 8 - n
    for key, info in header.items():
        want = tuple(expected[key].shape)
        if not isinstance(info, dict) or info.get("dtype") != "F32" or tuple(info.get("shape", ())) != want:
            raise TaskLibraryError(f"{what}: tensor {key} must be float32 of shape {want}; got "
                                   f"{info.get('dtype') if isinstance(info, dict) else info} "
                                   f"{info.get('shape') if isinstance(info, dict) else ''}")
        start, end = (info.get("data_offsets") or [None, None])[:2]
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= body
                and end - start == 4 * math.prod(want)):
            raise bad


def _tensors_from_bytes(data: bytes, what: str) -> Dict[str, torch.Tensor]:
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise TaskLibraryError(f"{what} is not a valid safetensors file ({exc})") from None


def _load_state(module: torch.nn.Module, data: bytes, what: str) -> None:
    expected = module.state_dict()
    _check_header(data, expected, what)
    tensors = _tensors_from_bytes(data, what)
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:
        raise TaskLibraryError(f"{what}: unknown tensors {unknown[:5]} / missing tensors {missing[:5]}")
    for key, t in tensors.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise TaskLibraryError(f"{what}: tensor {key} has shape {tuple(t.shape)}, "
                                   f"expected {tuple(expected[key].shape)}")
    for key, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise TaskLibraryError(f"{what}: tensor {key} holds NaN or infinite values")
    module.load_state_dict(tensors, strict=True)


def task_from_files(card: dict, alignment: Optional[bytes], router: bytes, where: str,
                    fingerprint: Optional[str] = None, finder: Optional[bytes] = None) -> Task:
    """Build a Task from a card and its safetensors files' bytes, checking everything
    (``alignment`` None: the router only, ``layer`` None; ``load_layer`` builds it later;
    ``finder``: the finder's file, needed exactly when the card has a finder)."""
    check_card(card, where)
    files = card["files"]
    if ("finder" in card) != (finder is not None) or ("finder" in card) != (FINDER in files):
        raise TaskLibraryError(f"{where}: task.json and {FINDER} disagree (a finder in one and not the other)")
    for fname, data in ((ALIGNMENT, alignment), (ROUTER, router), (FINDER, finder)):
        if data is not None and files.get(fname) != sha256_bytes(data):
            raise TaskLibraryError(f"{where}: {fname} does not match its SHA-256 in task.json (changed or damaged)")
    if fingerprint is not None and card["backbone_fingerprint"] != fingerprint:
        raise TaskLibraryError(
            f"{where}: task {card['name']!r} was learned on backbone {card['backbone_fingerprint']}; "
            f"the current backbone is {fingerprint}. Its Alignment Layer only fits the backbone it was learned on.")
    try:
        tau = float(card["router"]["tau"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TaskLibraryError(f"{where}: task.json has a bad alignment/router entry ({exc})") from None
    layer = None if alignment is None else layer_from_bytes(card, alignment, where)
    vae = TaskVAE()
    _load_state(vae, router, f"{where}/{ROUTER}")
    found = None
    if finder is not None:
        found = Finder(len(card["finder"]["outputs"]))
        _load_state(found, finder, f"{where}/{FINDER}")
        found.eval()
    return Task(card["name"], layer, vae.eval(), tau, card, found)


def layer_from_bytes(card: dict, alignment: bytes, where: str) -> AlignmentLayer:
    try:
        layer = AlignmentLayer.from_config(card["alignment"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TaskLibraryError(f"{where}: task.json has a bad alignment/router entry ({exc})") from None
    _load_state(layer, alignment, f"{where}/{ALIGNMENT}")
    return layer.eval()
