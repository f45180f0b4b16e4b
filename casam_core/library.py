"""The task library: one folder per learned task, and task packs to share them.

    <library>/<task name>/task.json              the card (name, backbone fingerprint, tau,
                                                 labels, validation Dice, file hashes, ...)
    <library>/<task name>/alignment.safetensors  the Alignment Layer's weights
    <library>/<task name>/router.safetensors     the task's router VAE
    <library>/<task name>/finder.safetensors     its structure finder (zero-click; tasks learned
                                                 before version 2 of the format have none)

The library folder is ``--library``, else ``$CASAM_LIBRARY``, else ``~/.casam/tasks``.

Every change is atomic: a task is written into a hidden temporary folder and renamed into
place, so a crash or a cancel never leaves a half-written task. Writers take the library's
lock (``.lock``, an OS lock freed even by kill -9) one at a time, and clear what crashed
writers left. Loading checks the backbone
fingerprint, the files' SHA-256 and every tensor's name and shape. Nothing is unpickled.

A task pack is one zip file holding ``manifest.json`` (format, task name, SHA-256 of each
file) and the task's files above (version 1 packs, without a finder, still import): how two hospitals share what was learned without sharing
data. Import refuses unexpected members (so no path traversal and no pickles), bad hashes,
unknown manifest keys, tensors that do not fit, another backbone's task, and name clashes
(unless the task is renamed on import).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

from safetensors import SafetensorError
from safetensors.torch import save_file

from .alignment import AlignmentLayer
from .config import library_dir
from .errors import TaskLibraryError, TaskNameClash
from .files import PathLike, atomic_write, honour_umask, try_lock, unlock
from .task_files import (ALIGNMENT, CARD, FINDER, MANIFEST, MAX_CARD_BYTES, ROUTER, layer_from_bytes, parse_json,
                         read_task_file, sha256_bytes, task_from_files)
from .tasks import Task, check_task_name

PACK_FORMAT = "casam-task-pack"
PACK_VERSION = 2  # 2: a task may hold a structure finder (finder.safetensors)
PACK_VERSIONS = (1, 2)  # what import reads
PACK_MEMBERS = {MANIFEST, CARD, ALIGNMENT, ROUTER}  # every pack; FINDER where the card has a finder
MANIFEST_KEYS = {"format", "version", "task", "files", "casam_version"}
MAX_MEMBER_BYTES = 256 * 1024**2
MAX_PACK_BYTES = 320 * 1024**2  # all members unpacked (a task is about 15 MB)
LOCK = ".lock"  # the writers' lock file in the library folder
LOCK_TIMEOUT_S = 30.0
TASK_SPACE_BYTES = 64 * 1024**2  # free space a save needs (a task is about 15 MB, staged beside the old one)


class TaskLibrary:
    """The task library folder. Reading needs no lock (every change is an atomic rename);
    writers (save, remove, rename, import) take the library's lock one at a time."""

    def __init__(self, root: Optional[PathLike] = None) -> None:
        self.root = library_dir(root)
        self._lock_depth = 0

    def check_folder(self) -> "TaskLibrary":
        """Refuse a library path that exists and is not a folder (it would read as empty)."""
        if self.root.exists() and not self.root.is_dir():
            raise TaskLibraryError(f"{self.root}: the task library must be a folder; this is a file")
        return self

    def check_writable(self, space: int = TASK_SPACE_BYTES) -> "TaskLibrary":
        """Refuse, before any training, a library a new task cannot be saved to: a folder that cannot
        be made or written (read-only), or a disk with less than ``space`` bytes free."""
        self.check_folder()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=str(self.root))
            os.close(fd)
            os.unlink(probe)
            free = shutil.disk_usage(self.root).free
        except OSError as exc:
            raise TaskLibraryError(f"{self.root}: cannot write to the task library ({exc.strerror or exc}); "
                                   f"choose another folder (--library or $CASAM_LIBRARY)") from None
        if free < space:
            raise TaskLibraryError(f"{self.root}: only {free / 1024**2:.0f} MB free on its disk; saving a task needs "
                                   f"{space / 1024**2:.0f} MB: free some space or choose another library")
        return self

    # -- reading ------------------------------------------------------------------
    def names(self) -> List[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()  # a card that is no plain file is listed, and
                      if p.is_dir() and not p.name.startswith(".") and os.path.lexists(p / CARD))  # refused on use

    def __contains__(self, name: str) -> bool:
        return os.path.lexists(self.root / name / CARD)

    def _folder(self, name: str) -> Path:
        check_task_name(name)
        folder = self.root / name
        if not os.path.lexists(folder / CARD):
            raise TaskLibraryError(f"no task {name!r} in {self.root} (tasks: {', '.join(self.names()) or 'none'})")
        if folder.is_symlink():  # renaming or removing through it would change a folder outside the library
            raise TaskLibraryError(f"{folder}: is a symbolic link, not a task folder of the library; copy the task "
                                   f"in (tasks import) or remove the link")
        return folder

    def card(self, name: str) -> dict:
        path = self._folder(name) / CARD
        return parse_json(read_task_file(path, MAX_CARD_BYTES), str(path))

    def load(self, name: str, fingerprint: Optional[str] = None, with_layer: bool = True) -> Task:
        """The task ``name``, checked (card, hashes, tensors, backbone). ``with_layer=False``: its card
        and router only (``task.layer`` None), for routing a library of many tasks without reading
        every Alignment Layer; ``load_layer`` reads one when it is used."""
        folder = self._folder(name)
        card = self.card(name)
        alignment = read_task_file(folder / ALIGNMENT, MAX_MEMBER_BYTES) if with_layer else None
        router = read_task_file(folder / ROUTER, MAX_MEMBER_BYTES)
        finder = read_task_file(folder / FINDER, MAX_MEMBER_BYTES) if "finder" in card else None
        task = task_from_files(card, alignment, router, str(folder), fingerprint, finder)
        task.name = name  # the folder name is the task's name
        return task

    def load_layer(self, name: str, card: dict) -> AlignmentLayer:
        """Task ``name``'s Alignment Layer, checked against ``card`` (the card it was registered with:
        a file changed since then is refused, naming the task)."""
        folder = self._folder(name)
        data = read_task_file(folder / ALIGNMENT, MAX_MEMBER_BYTES)
        if card.get("files", {}).get(ALIGNMENT) != sha256_bytes(data):
            raise TaskLibraryError(f"{folder}: {ALIGNMENT} does not match its SHA-256 in task.json (changed or "
                                   f"damaged since the task was loaded)")
        return layer_from_bytes(card, data, str(folder))

    # -- writing (always atomic, one writer at a time) -------------------------------------
    @contextmanager
    def _writing(self):
        """Hold the library's write lock: an OS lock on ``<library>/.lock``, which the system
        releases when the process ends, even by kill -9. Another writer waits up to
        ``LOCK_TIMEOUT_S``, then gets "the task library is busy". Every staging or trash folder
        found under the lock belongs to a writer that crashed, and is removed."""
        if self._lock_depth:  # already held by this call chain (import -> save)
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise TaskLibraryError(f"{self.root}: cannot write to the task library ({exc.strerror or exc})") \
                from None
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            while not try_lock(fd):
                if time.monotonic() > deadline:
                    raise TaskLibraryError(f"{self.root}: the task library is busy (another CA-SAM process has "
                                           f"been writing to it for {LOCK_TIMEOUT_S:.0f} s); try again later")
                time.sleep(0.05)
            self._lock_depth = 1
            try:
                self._sweep()
                yield
            finally:
                self._lock_depth = 0
                unlock(fd)
        finally:
            os.close(fd)

    def _staging(self, name: str) -> Path:
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=str(self.root)))
        except OSError as exc:
            raise TaskLibraryError(f"{self.root}: cannot write to the task library ({exc.strerror or exc})") \
                from None
        honour_umask(staging, folder=True)
        return staging

    def _sweep(self) -> int:
        """Remove what crashed writers left (hidden staging and trash folders); only called with
        the lock held, when no other writer can be using them. Returns how many."""
        removed = 0
        for p in self.root.iterdir():
            if not (p.name.startswith(".tmp-") or p.name.startswith(".trash-")):
                continue
            if p.is_symlink():  # a link (left by an earlier version's remove): the link goes, never its target
                p.unlink(missing_ok=True)
                removed += 1
            elif p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed += 1
        return removed

    def _commit(self, staging: Path, name: str, replace: bool = False) -> Path:
        for f in staging.iterdir():  # safetensors writes 0600 whatever the umask
            honour_umask(f)
        target = self.root / name
        trash = None
        if target.exists():
            if not replace:
                shutil.rmtree(staging, ignore_errors=True)
                raise TaskLibraryError(f"a task named {name!r} already exists in {self.root}")
            trash = self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(target, trash)
        os.rename(staging, target)
        if trash is not None:
            if trash.is_symlink():
                trash.unlink()
            else:
                shutil.rmtree(trash, ignore_errors=True)
        return target

    def save(self, task: Task, replace: bool = False) -> Path:
        """Write a task (atomically). Refuses an existing name unless ``replace``."""
        name = check_task_name(task.name)
        with self._writing():
            if name in self and not replace:
                raise TaskLibraryError(f"a task named {name!r} already exists in {self.root}; choose another "
                                       f"name or remove it first")
            staging = self._staging(name)
            try:
                save_file({k: v.detach().cpu().contiguous() for k, v in task.layer.state_dict().items()},
                          str(staging / ALIGNMENT))
                save_file({k: v.detach().cpu().contiguous() for k, v in task.vae.state_dict().items()},
                          str(staging / ROUTER))
                files = [ALIGNMENT, ROUTER]
                card = dict(task.card, name=name)
                if task.finder is not None:
                    save_file({k: v.detach().cpu().contiguous() for k, v in task.finder.state_dict().items()},
                              str(staging / FINDER))
                    files.append(FINDER)
                elif "finder" in card:
                    raise TaskLibraryError(f"task {name!r}: its card describes a finder but the task has none")
                card["files"] = {f: sha256_bytes((staging / f).read_bytes()) for f in files}
                (staging / CARD).write_text(json.dumps(card, indent=2) + "\n")
                return self._commit(staging, name, replace)
            except (OSError, SafetensorError) as exc:  # a full disk, a folder gone read-only: one line
                shutil.rmtree(staging, ignore_errors=True)
                why = getattr(exc, "strerror", None) or str(exc).split(": ")[-1]
                raise TaskLibraryError(f"{self.root}: cannot save task {name!r} ({why}); the library is as it "
                                       f"was") from None
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise

    def remove(self, name: str) -> None:
        with self._writing():
            link = self.root / name
            if link.is_symlink():  # the link is the library's entry: it goes; what it points to stays
                check_task_name(name)
                link.unlink()
                return
            folder = self._folder(name)
            trash = self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(folder, trash)  # one step: the task is there or gone; the files go after
            shutil.rmtree(trash, ignore_errors=True)

    def rename(self, old: str, new: str) -> Path:
        """One atomic rename of the task's folder (the folder's name is the task's name), then the
        card's copy of the name is replaced in one step by a card written beforehand in a hidden
        staging folder. A crash leaves the task whole under one of its names, with only its own
        three files; the staging folder goes with the next writer's sweep."""
        check_task_name(new)
        with self._writing():
            folder = self._folder(old)
            target = self.root / new
            if target.exists():  # a task, or any other folder or file of that name
                raise TaskLibraryError(f"a task named {new!r} already exists in {self.root}")
            card = dict(self.card(old), name=new)
            staging = self._staging(new)
            try:
                (staging / CARD).write_text(json.dumps(card, indent=2) + "\n")
                honour_umask(staging / CARD)
                os.rename(folder, target)
                os.replace(staging / CARD, target / CARD)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return target

    # -- packs ----------------------------------------------------------------------
    def export(self, name: str, out: PathLike) -> Path:
        """Write task ``name`` as one pack file (zip + SHA-256 manifest), atomically."""
        folder = self._folder(name)
        out = Path(out)
        members = (CARD, ALIGNMENT, ROUTER) + ((FINDER,) if "finder" in self.card(name) else ())
        files = {f: read_task_file(folder / f, MAX_CARD_BYTES if f == CARD else MAX_MEMBER_BYTES)
                 for f in members}
        self.load(name)  # refuse to export a damaged task
        from . import __version__

        manifest = {"format": PACK_FORMAT, "version": PACK_VERSION, "task": name, "casam_version": __version__,
                    "files": {f: sha256_bytes(b) for f, b in files.items()}}
        with atomic_write(out) as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                zf.writestr(MANIFEST, json.dumps(manifest, indent=2) + "\n")
                for f, b in files.items():
                    zf.writestr(f, b)
        return out

    def import_pack(self, pack: PathLike, fingerprint: Optional[str] = None, name: Optional[str] = None) -> Task:
        """Check a pack completely, then add its task (as ``name`` if given). Returns the task."""
        task = read_pack(pack, fingerprint)
        new_name = check_task_name(name or task.name)
        if new_name in self:
            raise TaskNameClash(f"{pack}: a task named {new_name!r} already exists in {self.root}; "
                                f"import it under another name", new_name)
        task.name = new_name
        task.card = dict(task.card, name=new_name, imported_from=Path(pack).name)
        with self._writing():
            if new_name in self:  # added by another process meanwhile
                raise TaskNameClash(f"{pack}: a task named {new_name!r} already exists in {self.root}; "
                                    f"import it under another name", new_name)
            self.save(task)
        return self.load(new_name, fingerprint)


def read_pack(pack: PathLike, fingerprint: Optional[str] = None) -> Task:
    """Read and verify a task pack without touching any library."""
    pack = Path(pack)
    try:
        zf = zipfile.ZipFile(pack)
    except (OSError, zipfile.BadZipFile) as exc:
        raise TaskLibraryError(f"{pack}: not a task pack ({exc})") from None
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        for n in names:
            if n not in PACK_MEMBERS | {FINDER}:
                why = "a path outside the pack" if (".." in n or n.startswith("/") or "\\" in n) else "not part of a task pack"
                raise TaskLibraryError(f"{pack}: refused member {n!r} ({why})")
        if len(names) != len(set(names)) or set(names) - {FINDER} != PACK_MEMBERS:
            raise TaskLibraryError(f"{pack}: a task pack holds exactly {sorted(PACK_MEMBERS)} (and {FINDER} if "
                                   f"the task has a finder); found {sorted(names)}")
        for info in infos:  # sizes as declared: a member is never read past its declared size
            limit = MAX_CARD_BYTES if info.filename in (CARD, MANIFEST) else MAX_MEMBER_BYTES
            if info.file_size > limit:
                raise TaskLibraryError(f"{pack}: {info.filename} is too large ({info.file_size} bytes; at most "
                                       f"{limit})")
        total = sum(info.file_size for info in infos)
        if total > MAX_PACK_BYTES:
            raise TaskLibraryError(f"{pack}: the pack unpacks to {total} bytes; at most {MAX_PACK_BYTES}")
        try:
            data = {n: zf.read(n) for n in names}
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError) as exc:
            raise TaskLibraryError(f"{pack}: damaged task pack ({exc})") from None
    manifest = parse_json(data[MANIFEST], f"{pack}: manifest.json")
    card = parse_json(data[CARD], f"{pack}: task.json")
    unknown = sorted(set(manifest) - MANIFEST_KEYS)
    if unknown:
        raise TaskLibraryError(f"{pack}: unknown manifest keys {unknown}")
    if manifest.get("format") != PACK_FORMAT or manifest.get("version") not in PACK_VERSIONS:
        raise TaskLibraryError(f"{pack}: not a {PACK_FORMAT} file of version {' or '.join(map(str, PACK_VERSIONS))}")
    if FINDER in data and manifest.get("version") < 2:
        raise TaskLibraryError(f"{pack}: refused member {FINDER!r} (not part of a version 1 task pack)")
    hashes = manifest.get("files")
    if not isinstance(hashes, dict) or set(hashes) != set(data) - {MANIFEST}:
        raise TaskLibraryError(f"{pack}: the manifest must list the SHA-256 of {sorted(set(data) - {MANIFEST})}")
    for n, h in hashes.items():
        if sha256_bytes(data[n]) != h:
            raise TaskLibraryError(f"{pack}: {n} does not match its SHA-256 in the manifest (changed or damaged)")
    return task_from_files(card, data[ALIGNMENT], data[ROUTER], str(pack), fingerprint, data.get(FINDER))
