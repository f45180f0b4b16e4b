"""'Learn new task' in a separate process (no Qt here).

The learner is its own program, ``python -m napari_casam._learn_process JOB_DIR``, started
with ``subprocess``. It never imports the caller's ``__main__``, so learning works from a
napari started by a user's script that has no ``if __name__ == "__main__":`` guard (a
``multiprocessing`` spawn child re-runs that script and fails while bootstrapping).

- In: ``JOB_DIR/job.json`` (the settings) and ``image.npy`` / ``labels.npy`` (read with
  ``allow_pickle=False``), written by ``LearnJob.start`` in a private folder
  ``$TMPDIR/casam-learn-<viewer pid>-*``. Patient data stays on disk for seconds only: the
  child deletes the two arrays once it has read them. The folder goes when the job is reaped,
  when the child ends after its viewer died, or (a viewer killed with its learner) at the next
  learning job's start, which sweeps folders whose viewer no longer runs.
- Out: one JSON message per line on the child's standard output: ``["progress", done,
  total, message]``, then one of ``["done", card]``, ``["cancelled"]`` or ``["error",
  message, traceback]``. Anything else the child prints goes to ``JOB_DIR/log.txt``.
- Cancel: a line ``cancel`` on the child's standard input, or its end (the viewer is gone):
  ``learn_task`` checks between steps, and nothing is written to the task library before
  the very end (``TaskLibrary.save`` is atomic).

The viewer stays responsive, and the training's memory (and GPU memory) goes back to the
system when the process ends.
"""

from __future__ import annotations

import json
import os
import queue as _queue
import shutil
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from casam_core.config import child_environment  # light: no torch

SETTINGS = ("name", "backbone", "checkpoint", "device", "library", "cache_dir", "profile", "steps", "label_names",
            "modality", "axis")
NICENESS = 10


def learn(put: Callable, cancel_event: threading.Event, name: str, image: np.ndarray, labels: np.ndarray,
          backbone: str = "litemedsam", checkpoint: Optional[str] = None, device: str = "auto", library: str = "",
          cache_dir: Optional[str] = None, profile: str = "fast", steps: Optional[int] = None,
          label_names: Optional[dict] = None, modality: Optional[str] = None, axis: int = 0) -> None:
    """Learn one task from an annotated image or volume and save it to ``library``; every
    outcome is one final message through ``put``. ``axis``: a volume is cut into training
    slices along it (the axis the user viewed and annotated)."""
    try:
        from casam_core.build import NO_CACHE, build_predictor
        from casam_core.errors import TaskLibraryError
        from casam_core.library import TaskLibrary
        from casam_core.progress import Cancelled
        from casam_core.training import learn_config, learn_task
        from casam_core.task_data import image_slice_from_array, TaskData, volume_slices

        lib = TaskLibrary(library)
        if name in lib:
            raise TaskLibraryError(f"a task named {name!r} already exists in {lib.root}")
        lib.check_writable()  # a read-only library or a full disk is said now, not after the training
        if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4) and labels.ndim == 2):
            slices = [image_slice_from_array(image, labels, name)]
        else:
            slices = volume_slices(image, labels, axis=axis, source=name)
        if label_names is None:  # every label value present in the annotation
            label_names = {int(v): f"label {int(v)}" for v in np.unique(labels) if v}
        label_names = {int(k): v for k, v in label_names.items()}  # JSON keys are strings
        data = TaskData(slices, "class", label_names, modality, [name])
        predictor, _ = build_predictor(backbone, checkpoint, device, cache_dir=cache_dir or NO_CACHE)
        try:
            task = learn_task(predictor, name, data, learn_config(profile, steps=steps),
                              progress=lambda d, t, m: put(["progress", d, t, m]), cancel=cancel_event.is_set)
        except Cancelled:
            put(["cancelled"])
            return
        if cancel_event.is_set():
            put(["cancelled"])
            return
        lib.save(task)
        put(["done", lib.card(name)])
    except Exception as exc:  # reported in the viewer; the library is untouched
        from casam_core.errors import CASamError

        text = str(exc) if isinstance(exc, CASamError) else f"{type(exc).__name__}: {exc}"  # a bug: its type too
        put(["error", text, traceback.format_exc()])


def main(argv=None) -> int:
    """The learning process: ``python -m napari_casam._learn_process JOB_DIR``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m napari_casam._learn_process JOB_DIR", file=sys.stderr)
        return 2
    job = Path(argv[0])
    # messages go to a copy of standard output; whatever else is printed (by us, a library or C
    # code) goes to standard error, so it can never corrupt a message line
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    lock = threading.Lock()

    def put(message: list) -> None:
        with lock:
            out.write(json.dumps(message) + "\n")
            out.flush()

    cancel_event, viewer_gone = threading.Event(), threading.Event()

    def watch_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "cancel":
                break
        else:
            viewer_gone.set()  # the end of input: the viewer closed the pipe or died
        cancel_event.set()

    threading.Thread(target=watch_stdin, name="casam-learn-cancel", daemon=True).start()
    try:
        try:
            settings = json.loads((job / "job.json").read_text(encoding="utf-8"))
            image = np.load(job / "image.npy", allow_pickle=False)
            labels = np.load(job / "labels.npy", allow_pickle=False)
        except (OSError, ValueError) as exc:
            put(["error", f"cannot read the learning job in {job}: {exc}", traceback.format_exc()])
            return 1
        finally:
            for name in ("image.npy", "labels.npy"):  # in memory now: no copy of the patient's data on disk
                (job / name).unlink(missing_ok=True)
        learn(put, cancel_event, image=image, labels=labels, **settings)
        return 0
    finally:
        if viewer_gone.is_set():  # nobody will reap this job: its folder goes with it
            shutil.rmtree(job, ignore_errors=True)


def _lower_priority(thread_only: bool = False) -> None:
    """Training yields the CPU to the viewer: on a machine with few cores, an equal-priority
    training process slowed the viewer's own redraws enough to stall it ~0.14 s. With
    ``thread_only`` (Linux, where niceness is per thread and a child inherits its creator's),
    only the calling thread is lowered: the process it then starts runs low from its first
    instruction, interpreter start-up and imports included."""
    try:
        who = threading.get_native_id() if thread_only else 0
        if thread_only and not sys.platform.startswith("linux"):
            return  # elsewhere PRIO_PROCESS would lower the whole viewer
        if os.getpriority(os.PRIO_PROCESS, who) < NICENESS:
            os.setpriority(os.PRIO_PROCESS, who, NICENESS)
    except (AttributeError, OSError):  # no priorities on this platform, or not allowed
        pass


JOB_PREFIX = "casam-learn-"


def sweep_stale_jobs(folder: Optional[Path] = None) -> int:
    """Remove the job folders of viewers that no longer run (killed with their learner: the learner
    removes its folder itself when its viewer dies, unless it was killed too), and folders of the
    earlier naming without a process id older than an hour. Returns how many were removed."""
    import time

    removed = 0
    for path in Path(folder or tempfile.gettempdir()).glob(f"{JOB_PREFIX}*"):
        try:
            if not path.is_dir() or path.is_symlink() or path.stat().st_uid != getattr(os, "getuid", lambda: path.stat().st_uid)():
                continue
            owner = path.name[len(JOB_PREFIX):].split("-", 1)[0]
            if owner.isdigit():
                try:
                    os.kill(int(owner), 0)
                    continue  # its viewer runs: its job
                except ProcessLookupError:
                    pass
                except (PermissionError, OverflowError):
                    continue
            elif time.time() - path.stat().st_mtime < 3600:
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        except OSError:
            continue
    return removed


class LearnJob:
    """One learning process: its job folder, its messages and its cancel line.

    Keyword arguments: ``name``, ``image``, ``labels`` (arrays) and the settings of ``learn``.
    """

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self.process: Optional[subprocess.Popen] = None
        self.folder: Optional[Path] = None
        self._messages: "_queue.Queue[tuple]" = _queue.Queue()
        self._starter: Optional[threading.Thread] = None
        self._reader: Optional[threading.Thread] = None
        self._start_error: Optional[str] = None
        self._error_reported = False
        self._final_seen = False
        self._cancel_sent = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Write the job and start the process from a helper thread, returning at once: writing a
        volume and starting an interpreter take time the viewer's UI thread must not wait."""
        def run():
            try:
                _lower_priority(thread_only=True)
                self._launch()
            except Exception as exc:  # reported through messages()
                self._start_error = f"could not start the learning process: {type(exc).__name__}: {exc}"
                self._remove_folder()

        self._starter = threading.Thread(target=run, name="casam-learn-start", daemon=True)
        self._starter.start()

    def _launch(self) -> None:
        kw = dict(self.kwargs)
        image, labels = kw.pop("image"), kw.pop("labels")
        unknown = sorted(set(kw) - set(SETTINGS))
        if unknown:
            raise TypeError(f"unknown learning settings: {', '.join(unknown)}")
        sweep_stale_jobs()
        self.folder = Path(tempfile.mkdtemp(prefix=f"{JOB_PREFIX}{os.getpid()}-"))  # 0700: this user's alone
        np.save(self.folder / "image.npy", np.asarray(image), allow_pickle=False)
        np.save(self.folder / "labels.npy", np.asarray(labels), allow_pickle=False)
        (self.folder / "job.json").write_text(json.dumps(kw), encoding="utf-8")
        with self._lock:
            if self._cancel_sent:  # cancelled before the process existed
                self._messages.put(("cancelled",))
                self._final_seen = True
                self._remove_folder()
                return
            log = open(self.folder / "log.txt", "wb")
            try:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "napari_casam._learn_process", str(self.folder)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=child_environment())
            finally:
                log.close()
        self._reader = threading.Thread(target=self._read, name="casam-learn-read", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.process.stdout:
            try:
                message = tuple(json.loads(raw))
            except ValueError:
                continue
            if message and message[0] != "progress":
                self._final_seen = True
            self._messages.put(message)
        self.process.stdout.close()

    def _starting(self) -> bool:
        return self._starter is not None and self._starter.is_alive()

    def cancel(self) -> None:
        with self._lock:
            self._cancel_sent = True
            proc = self.process
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.write(b"cancel\n")
                proc.stdin.flush()
            except (OSError, ValueError):  # the process has just ended
                pass

    def messages(self):
        """Messages received so far (non-blocking); a process that ended without its final
        message is reported as an error, with the last line it printed."""
        out = []
        if self._start_error is not None and not self._error_reported:
            out.append(("error", self._start_error, ""))
            self._error_reported = True
        while True:
            try:
                out.append(self._messages.get_nowait())
            except _queue.Empty:
                break
        if (not self._final_seen and not self._error_reported and self.process is not None
                and self.process.poll() is not None and (self._reader is None or not self._reader.is_alive())):
            self._error_reported = True
            out.append(("error", f"the learning process ended unexpectedly (exit code {self.process.returncode})"
                        + self._last_log_line(), ""))
        return out

    def _last_log_line(self) -> str:
        try:
            lines = [ln for ln in (self.folder / "log.txt").read_text(errors="replace").splitlines() if ln.strip()]
        except (OSError, TypeError):
            return ""
        return f": {lines[-1].strip()}" if lines else ""

    def alive(self) -> bool:
        """Still starting or running (or its last messages are still being read)."""
        if self._starting():
            return True
        if self.process is None:
            return False
        return self.process.poll() is None or (self._reader is not None and self._reader.is_alive())

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel, wait up to ``timeout`` s for the process to end, then kill it: nothing is left
        running (a cancelled or killed process never writes to the library: it saves atomically at the end)."""
        self.cancel()
        self.join(timeout)
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.join(5)

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the process to end; once it has, its job folder goes."""
        if self._starter is not None:
            self._starter.join(timeout)
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                return
            if self._reader is not None:
                self._reader.join(timeout)
            try:
                self.process.stdin.close()
            except OSError:
                pass
        self._remove_folder()

    def _remove_folder(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
