"""napari plugin for CA-SAM: a thin layer over ``casam_core`` (no model logic here)."""

from casam_core import __version__

__all__ = ["__version__"]
