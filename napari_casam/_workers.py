"""Worker discipline for the dock: model calls run in napari workers (never on the UI thread),
no callback runs once the dock is gone, and one object stops and joins all running work.

``Workers`` is a plain Python object, not a Qt one: it outlives the widget's C++ object, so
napari quitting, the dock closing or the widget being deleted can all still stop the work.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from typing import Callable, List


class WorkerError(Exception):
    """An error raised in a CA-SAM worker thread, re-raised under a type that reaches the widget."""


def reraise(fn):
    """``fn`` (a function or a generator function) with RuntimeError re-raised as WorkerError. superqt's
    workers drop a RuntimeError without emitting ``errored`` or ``finished`` (it takes it for a deleted
    Qt object), and torch (CUDA out of memory) and casam_core (a bad checkpoint) raise RuntimeErrors."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                return (yield from fn(*args, **kwargs))
            except RuntimeError as exc:
                raise WorkerError(str(exc)) from exc

        return generator

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:
            raise WorkerError(str(exc)) from exc

    return call


class Workers:
    """The work a dock started (napari workers, learning processes), whether the dock still exists,
    and how to stop and join that work."""

    def __init__(self) -> None:
        self.alive = True
        self.stop = threading.Event()  # workers check it between units of work
        # (worker, Event set when it has ended, Event set when its function began in a pool thread)
        self.workers: List[tuple] = []
        self.jobs: List = []  # learning processes
        self.joined = False  # the last shutdown left nothing running

    def guarded(self, fn: Callable) -> Callable:
        """``fn`` as a worker callback that does nothing once the dock is gone (a worker can finish
        after napari closed: its callback must not touch deleted Qt objects)."""

        def call(*args):
            if self.alive:
                return fn(*args)

        return call

    def start(self, work, *, errored: Callable, returned=None, yielded=None, finished=None):
        """Run ``work`` (a function or generator function) in a napari worker. Errors (RuntimeErrors
        included) reach ``errored``; no callback runs once the dock is gone. Returns the worker
        (None when the dock is already gone)."""
        from napari.qt.threading import create_worker
        from qtpy.QtCore import Qt

        if not self.alive:
            return None
        done, began = threading.Event(), threading.Event()
        worker = create_worker(reraise(self._unless_stopped(work, began)), _start_thread=False,
                               _ignore_errors=True)
        # set in the worker's own thread as it ends (a shutdown waits on it without Qt's event loop)
        worker.finished.connect(done.set, Qt.DirectConnection)
        self.workers = [entry for entry in self.workers if not entry[1].is_set()] + [(worker, done, began)]
        for signal, fn in (("returned", returned), ("yielded", yielded), ("finished", finished),
                           ("errored", errored)):
            if fn is not None:
                getattr(worker, signal).connect(self.guarded(fn))
        worker.start()
        return worker

    def _unless_stopped(self, work, began: threading.Event):
        """``work`` that notes when it begins and does nothing once a shutdown asked all work to stop.
        A worker started from Qt's event loop begins only after a timer (superqt), and one in a busy
        thread pool only when a thread is free: a shutdown cannot wait for those (it blocks the loop
        that would start them) and need not: when they begin, they return at once."""
        stop = self.stop
        if inspect.isgeneratorfunction(work):
            @functools.wraps(work)
            def generator(*args, **kwargs):
                began.set()
                if stop.is_set():
                    return None
                return (yield from work(*args, **kwargs))

            return generator

        @functools.wraps(work)
        def call(*args, **kwargs):
            began.set()
            return None if stop.is_set() else work(*args, **kwargs)

        return call

    def running(self) -> int:
        """How many workers and learning processes are still running (after a shutdown, a worker that
        has not begun yet is not: it will return as it begins)."""
        stopped = self.stop.is_set()
        return (sum(not done.is_set() and (began.is_set() or not stopped) for _, done, began in self.workers)
                + sum(job.alive() for job in self.jobs))

    def shutdown(self, timeout: float = 30.0, *_) -> bool:
        """Ask all work to stop, then wait for it; True when nothing is left running. No callback runs after."""
        if not isinstance(timeout, (int, float)):  # called by a Qt signal with its own argument
            timeout = 30.0
        self.alive = False
        self.stop.set()
        for worker, done, _ in self.workers:
            if not done.is_set() and hasattr(worker, "quit"):
                try:
                    worker.quit()  # a generator worker stops at its next yield
                except RuntimeError:  # its Qt object is gone: the event below still tells
                    pass
        for job in self.jobs:
            job.cancel()
        deadline = time.monotonic() + timeout
        for _, done, began in self.workers:
            if began.is_set():  # set before its stop check: one that begins after this returns at once
                done.wait(max(0.0, deadline - time.monotonic()))
        for job in self.jobs:
            job.stop(max(1.0, deadline - time.monotonic()))
        self.joined = self.running() == 0
        return self.joined


def task_status(viewer, description: str, cancel: Callable) -> Callable[[], None]:
    """Tell napari that a long job runs: its close dialog lists it, and closing the window calls
    ``cancel``. Returns a function that marks the job done. napari 0.9 offers this only as private
    Window methods (it warns that plugins lose them from 0.10): without them, aboutToQuit and the
    dock's destruction still stop the work."""
    import warnings

    window = getattr(viewer, "window", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        register = getattr(window, "_register_task_status", None)
        update = getattr(window, "_update_task_status", None)
    if register is None or update is None:
        return lambda: None
    from napari.utils.task_status import Status

    status_id = register("CA-SAM", Status.BUSY, description, cancel_callback=cancel)

    def finished():
        try:
            update(status_id, Status.COMPLETED)
        except Exception:  # the window is being torn down
            pass

    return finished


def prewarm_imports() -> None:
    """Import, off the UI thread, what the first Embed click would otherwise import on it
    (napari's Points layer features need pandas, slow to import)."""
    try:
        import pandas  # noqa: F401
    except ImportError:  # napari without pandas: the Points layer then imports what it needs itself
        pass


def start_prewarm() -> None:
    threading.Thread(target=prewarm_imports, name="casam-prewarm", daemon=True).start()


def reporting(fn: Callable, **kwargs):
    """The body of a generator worker for a blocking ``fn(progress=..., **kwargs)``: ``fn`` runs in a
    helper thread, each (done, total, message) it reports is yielded (to the UI thread, through the
    worker's ``yielded`` signal), and its result is returned or its error raised."""
    import queue

    reports: "queue.Queue" = queue.Queue()
    outcome = {}

    def run():
        try:
            outcome["value"] = fn(progress=lambda d, t, m: reports.put((d, t, m)), **kwargs)
        except BaseException as exc:  # re-raised in the worker below
            outcome["error"] = exc
        finally:
            reports.put(None)

    thread = threading.Thread(target=run, name="casam-reporting", daemon=True)
    thread.start()
    while True:
        item = reports.get()
        if item is None:
            break
        yield item
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def bar_follows(bar):
    """A worker's ``yielded`` callback that moves napari's progress ``bar`` to each (done, total, message)
    a ``reporting`` body yields (the total may shrink: a propagation that stops early)."""
    def on_progress(value):
        done, total, _ = value
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    return on_progress
