"""Embedding caches: an in-memory LRU bounded in bytes, and an optional on-disk store.

Keys are signatures of the data the encoder saw (the uint8 RGB slice) and of the
backbone (its fingerprint), so a cached embedding is never used for other pixels or
another model. On disk each entry is one safetensors file whose metadata repeats
the key, fingerprint and a checksum of the tensor's bytes; an entry that disagrees
(stale, truncated, damaged or tampered with, another format) is detected, deleted and
recomputed, never used. Temporary files left by a killed writer are swept.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Hashable, Optional, Tuple

import numpy as np
import torch

from .config import cache_limit_bytes
from .errors import ImageIOError
from .files import atomic_write, sweep_temporaries

DISK_FORMAT = "casam-embedding-2"  # 2: a checksum of the data in the metadata


def data_signature(image: np.ndarray, fingerprint: str) -> str:
    """Hash of the pixels the encoder sees, their shape and the backbone fingerprint."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(fingerprint.encode())
    digest.update(str(image.shape).encode())
    digest.update(str(image.dtype).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def tensor_checksum(tensor: torch.Tensor) -> str:
    """Hash of a CPU tensor's bytes, dtype and shape."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class TensorLRU:
    """Least-recently-used tensor store with a bound on total bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: "OrderedDict[Hashable, torch.Tensor]" = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> Optional[torch.Tensor]:
        value = self._items.get(key)
        if value is None:
            return None
        self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if key in self._items:
            self.nbytes -= self._size(self._items.pop(key))
        self._items[key] = value
        self.nbytes += size
        while self.nbytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.nbytes -= self._size(old)

    def discard_where(self, predicate) -> int:
        keys = [k for k in self._items if predicate(k)]
        for k in keys:
            self.nbytes -= self._size(self._items.pop(k))
        return len(keys)

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0

    @staticmethod
    def _size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()


class DiskEmbeddingCache:
    """Embeddings on disk, one safetensors file per slice: ``<root>/<key[:2]>/<key>.safetensors``.

    Bounded in size (``max_bytes``, default ``config.cache_limit_bytes()``): when a save takes
    the folder over the bound, the least recently used entries (a read marks an entry used)
    are deleted until it is back under 90 % of it. Several processes may share the folder
    (the viewer, the CLI, a learning process): each counts what it adds and measures the
    folder again before deleting anything.
    """

    PRUNE_TO = 0.9

    def __init__(self, root: os.PathLike, fingerprint: str, max_bytes: Optional[int] = None) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.max_bytes = cache_limit_bytes(max_bytes)
        self.stale_found = 0
        self.pruned = 0  # entries this process deleted to keep the bound
        self.swept = sweep_temporaries(self.root, pattern="*/.*.tmp*")  # what killed writers left
        self._used: Optional[int] = None  # bytes in the folder, measured at the first save

    def _entries(self):
        """(last use, size, path) of every entry in the folder."""
        found = []
        for path in self.root.glob("*/*.safetensors"):
            if path.name.startswith("."):  # another writer's temporary file
                continue
            try:
                st = path.stat()
            except OSError:  # deleted meanwhile by another process
                continue
            found.append((st.st_mtime, st.st_size, path))
        return found

    def prune(self, target: Optional[int] = None) -> int:
        """Delete least recently used entries until the folder holds at most ``target`` bytes
        (default 90 % of the bound); returns how many were deleted."""
        target = int(self.PRUNE_TO * self.max_bytes) if target is None else target
        entries = sorted(self._entries())
        used = sum(size for _, size, _ in entries)
        deleted = 0
        for _, size, path in entries:
            if used <= target:
                break
            path.unlink(missing_ok=True)
            used -= size
            deleted += 1
        self._used = used
        self.pruned += deleted
        return deleted

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        """An entry is stored under ``key`` (not read: ``load`` checks it when it is used)."""
        return self._path(key).is_file()

    def load(self, key: str, shape: Tuple[int, ...]) -> Optional[torch.Tensor]:
        from safetensors import safe_open

        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                ok = (
                    meta.get("format") == DISK_FORMAT
                    and meta.get("key") == key
                    and meta.get("fingerprint") == self.fingerprint
                    and tuple(fh.get_slice("embedding").get_shape()) == tuple(shape)
                )
                tensor = fh.get_tensor("embedding") if ok else None
            if tensor is not None and meta.get("blake2b") != tensor_checksum(tensor):
                tensor = None  # the data changed after it was written
        except Exception:  # truncated or foreign file
            tensor = None
        if tensor is None:
            self.stale_found += 1
            path.unlink(missing_ok=True)
        else:
            try:
                os.utime(path)  # used now: the last to go when the cache is pruned
            except OSError:
                pass
        return tensor

    def save(self, key: str, embedding: torch.Tensor) -> None:
        from safetensors.torch import save_file

        from safetensors import SafetensorError

        path = self._path(key)
        tensor = embedding.detach().to("cpu").contiguous()  # its dtype: float16 or 32
        with atomic_write(path) as tmp:
            try:
                save_file({"embedding": tensor}, str(tmp), metadata={
                    "format": DISK_FORMAT, "key": key, "fingerprint": self.fingerprint,
                    "blake2b": tensor_checksum(tensor)})
            except SafetensorError as exc:  # a full disk: one line naming the cache, no entry left
                raise ImageIOError(f"{self.root}: cannot write to the embedding cache "
                                   f"({str(exc).split(': ')[-1]})") from None
        if self._used is None:  # the first save of this process: measure the folder
            self._used = sum(size for _, size, _ in self._entries())
        else:
            self._used += path.stat().st_size
        if self._used > self.max_bytes:
            self.prune()
