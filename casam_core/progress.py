"""Progress reporting and cancellation, as plain callbacks.

Core functions take ``progress`` and ``cancel`` arguments so the same code runs in
the CLI (a tqdm bar), in a napari worker (a progress bar and a Cancel button) and
in tests (a list that records the calls).

- ``progress(done, total, message)``: called after each unit of work.
- ``cancel()``: returns True when the caller wants the work stopped; the core
  function then raises :class:`Cancelled` before it writes anything lasting.
"""

from __future__ import annotations

import signal
from typing import Callable, List, Optional

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]


class Cancelled(Exception):
    """Raised by a core function when its ``cancel`` callback returned True."""


def check_cancel(cancel: Optional[CancelFn]) -> None:
    if cancel is not None and cancel():
        raise Cancelled("cancelled by the user")


def report(progress: Optional[ProgressFn], done: int, total: int, message: str = "") -> None:
    if progress is not None:
        progress(done, total, message)


class TqdmProgress:
    """A ``progress`` callback that drives one tqdm bar per message prefix."""

    def __init__(self, disable: bool = False):
        self.disable = disable
        self._bars: dict = {}

    def __call__(self, done: int, total: int, message: str = "") -> None:
        from tqdm import tqdm

        key = message.split(":")[0]
        bar = self._bars.get(key)
        if bar is None:
            bar = tqdm(total=total, desc=key, disable=self.disable, leave=False)
            self._bars[key] = bar
        bar.total = total
        bar.n = done
        if ":" in message:
            bar.set_postfix_str(message.split(":", 1)[1].strip(), refresh=False)
        bar.refresh()
        if done >= total:
            bar.close()
            del self._bars[key]

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler's or a user's ``kill``): unwinds like Ctrl+C, so every atomic write
    is cleaned up, and ends the command with one line and exit code 143."""

    @staticmethod
    def raise_it(signum, frame):
        raise Terminated()


INTERRUPTED_WHILE_LOADING: List[int] = []  # Ctrl+C seen while the libraries loaded


def interrupts_while_loading():
    """Ctrl+C while the libraries load, remembered as well as raised: a library that catches
    everything during its import cannot swallow it, and the import it breaks is known to be the
    user's cancel. Returns the handler it replaced (to put back once loaded)."""
    def interrupted(signum, frame):
        INTERRUPTED_WHILE_LOADING.append(signum)
        raise KeyboardInterrupt

    return signal.signal(signal.SIGINT, interrupted)

