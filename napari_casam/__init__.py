"""napari plugin for CA-SAM: a thin layer over ``casam_core`` (no model logic here).

The dock widget (``CASamWidget``), the names of its layers and the sample data are exported
lazily: napari imports this package to read a file, and the reader must not load the model.
"""

import importlib

from casam_core import __version__

_LAZY = {"CASamWidget": "_widget", "BOXES": "_layers", "LABELS": "_layers", "POINTS": "_layers",
         "PREVIEW": "_layers", "sample_2d": "_sample_data", "sample_3d": "_sample_data"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
