"""Files, written so that nothing is ever half-written or left behind.

``atomic_write`` is the one way CA-SAM writes a file (a temporary file beside it, renamed over
it on success, removed on any error or cancel); ``sweep_temporaries`` deletes what a killed
writer left; ``honour_umask`` gives files made by mkstemp/mkdtemp the permissions a plain
``open()`` would have had; ``write_json``; ``path_suffix`` and ``file_stem`` (``.nii.gz`` is one
suffix). Errors are ``FileWriteError`` (an ``ImageIOError``), naming the file, never the
temporary one. No image I/O here: the cache, the library and the runtimes write files without it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path
from typing import Iterator, Union

from .errors import FileWriteError

PathLike = Union[str, os.PathLike]


def path_suffix(path: PathLike) -> str:
    name = str(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def file_stem(path: PathLike) -> str:
    """A file's name without its suffix (``.nii.gz`` counts as one): how masks, prompt files
    and outputs are matched to their images."""
    name = Path(path).name
    suffix = path_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else name


def _umask() -> int:
    """The process's umask, read without changing it (Linux: /proc; elsewhere set and restore)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: PathLike, folder: bool = False) -> None:
    """Give a file (0666) or folder (0777) made by mkstemp/mkdtemp (0600/0700) the permissions a
    plain open()/mkdir() would have had, so a library or cache can be shared within a group."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


TEMP_MARK = ".tmp"  # every temporary file CA-SAM writes is ".<name>~<host>~<pid>~<random>.tmp<suffix>"


def _temp_owner() -> str:
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40]
    return f"{host}~{os.getpid()}"


@contextmanager
def atomic_write(path: PathLike) -> Iterator[Path]:
    """The one way CA-SAM writes a file: ``with atomic_write(path) as tmp:`` write ``tmp`` (a new
    file beside ``path``, with the same suffix); on success it is renamed over ``path``, and on
    any error or cancel it is removed, so ``path`` is never left half-written. Errors name
    ``path``, never the temporary file; the result honours the umask. The temporary name
    holds the host and process id, so a file left by a killed writer is swept by the next
    write of the same file (or by the cache's sweep)."""
    path = Path(path)
    if path.is_dir():
        raise FileWriteError(f"{path}: is a folder; give a file name to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_temporaries(path.parent, pattern=f".{glob_escape(path.name)}~*{TEMP_MARK}*")  # a killed writer's
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}~{_temp_owner()}~",
                                   suffix=f"{TEMP_MARK}{path_suffix(path)}", dir=str(path.parent))
    except OSError as exc:
        raise FileWriteError(f"{path}: cannot write here ({exc.strerror or exc})") from exc
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        honour_umask(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename not in (str(tmp), tmp) and exc.filename2 not in (str(path), path):
            raise  # about another file: its own message names it
        raise FileWriteError(f"{path}: cannot write it ({exc.strerror or exc})") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def _writer_is_gone(name: str) -> bool:
    """True when a temporary file's name says it was written by a process of this host that no
    longer runs (POSIX only; elsewhere only the age counts)."""
    m = re.search(r"~([A-Za-z0-9-]*)~(\d+)~[^~]*\.tmp", name)
    if m is None or os.name != "posix" or m.group(1) != _temp_owner().split("~")[0]:
        return False
    try:
        os.kill(int(m.group(2)), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False


def sweep_temporaries(folder: PathLike, older_than_s: float = 3600.0, pattern: str = "**/.*.tmp*") -> int:
    """Delete CA-SAM's temporary files left in ``folder`` by a killed process: those whose writer
    no longer runs, and any older than ``older_than_s`` (a writer on another host sharing the
    folder is given that long). Returns how many were deleted."""
    now, removed = time.time(), 0
    for tmp in Path(folder).glob(pattern):
        try:
            if tmp.is_file() and not tmp.is_symlink() and (
                    _writer_is_gone(tmp.name) or now - tmp.stat().st_mtime > older_than_s):
                tmp.unlink()
                removed += 1
        except OSError:  # gone meanwhile, or not ours to delete
            continue
    return removed


def write_json(data, path: PathLike) -> Path:
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def try_lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; False when another process holds it."""
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    except OSError as exc:  # Windows reports a held lock as EACCES/EDEADLK
        if os.name == "nt":
            return False
        raise exc
    return True


def unlock(fd: int) -> None:
    """Release a lock taken with ``try_lock``."""
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


@contextmanager
def waiting_lock(path: PathLike, timeout_s: float) -> Iterator[bool]:
    """Hold an exclusive lock on the file ``path`` (made if missing) while the block runs, waiting
    up to ``timeout_s`` for another process to release it. Yields True when held; False when the
    lock file cannot be made (a read-only folder) or the wait ran out: the caller goes on unlocked,
    as it would without this lock."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield False
        return
    try:
        deadline = time.monotonic() + timeout_s
        held = try_lock(fd)
        while not held and time.monotonic() < deadline:
            time.sleep(0.1)
            held = try_lock(fd)
        try:
            yield held
        finally:
            if held:
                unlock(fd)
    finally:
        os.close(fd)
