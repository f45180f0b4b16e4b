"""Every error a user can cause, under one root: ``CASamError``.

Each message is one line that names the file, task or prompt and the problem. The CLI
prints a ``CASamError`` (and an ``OSError`` for files) as that one line with exit code 2;
anything else is a bug and keeps its traceback. The widget shows the message as it is.

The classes also derive from the built-in type that code written before this root
expects (``ValueError`` for bad input, ``LookupError`` for an unknown task: not
``KeyError``, whose message Python shows quoted).
"""

from __future__ import annotations

import math


class CASamError(Exception):
    """A problem with the user's input, files or tasks; the message says which and why."""


class BackboneError(CASamError, RuntimeError):
    """A backbone cannot be built: unknown name, missing or wrong checkpoint."""


class ImageIOError(CASamError, ValueError):
    """An image or file that cannot be read, written or used; the message names it and the problem."""


class FileWriteError(ImageIOError):
    """A file that cannot be written (a folder in its place, no permission, a full disk)."""


class NoImageError(CASamError, RuntimeError):
    """A call that needs an image or volume set first (``set_image``, ``set_volume``)."""


class CLIError(CASamError):
    """A command line that cannot be carried out: printed as one line, exit code 2."""


class BatchInputError(CASamError):
    """An input list that cannot be worked on (nothing is written)."""


class ImageWarning(UserWarning):
    """Something a reader said about an image that was read anyway (one line, naming the file)."""


class PromptError(CASamError, ValueError):
    """Prompts that cannot be used (shape, range, missing labels)."""


class TaskNameError(CASamError, ValueError):
    """A task name that breaks the naming rule, or a reserved word."""


class UnknownTask(CASamError, LookupError):
    """A task name that is not registered (or not in the library)."""


class TaskLibraryError(CASamError, ValueError):
    """A task or pack that cannot be used; the message says which and why."""


class TaskNameClash(TaskLibraryError):
    """A pack's task name is taken in the library (``name``): import it under another name."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


class TaskDataError(CASamError, ValueError):
    """Training data that cannot be used; the message names the file."""


class OptionError(CASamError, ValueError):
    """An option value that CA-SAM does not offer (a profile, a form, a backbone, a number out of range)."""


def look_up_option(value, choices, what: str):
    """``value`` if it is one of ``choices``; otherwise an OptionError naming ``what``, the
    choices, and the nearest one ("unknown profile 'fsat'; did you mean 'fast'? choose one of ...")."""
    import difflib

    options = list(choices)
    if value in options:
        return value
    near = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise OptionError(f"unknown {what} {value!r}; {hint}choose one of {', '.join(map(str, options))}")


def check_number(value, what: str, low: float, high: float, *, integer: bool = False, low_open: bool = False,
                 error: type = OptionError):
    """``value`` if it is a finite number (an integer with ``integer``) in [low, high] ((low, high]
    with ``low_open``); otherwise ``error`` naming ``what`` and the range ("epochs must be an
    integer in [1, 10000]; got 99999999999999")."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (low < value if low_open else low <= value) and value <= high
          and (not integer or float(value).is_integer()))
    if not ok:
        raise error(f"{what} must be {'an integer' if integer else 'a number'} in "
                    f"{'(' if low_open else '['}{low:g}, {high:g}]; got {value!r}")
    return value
