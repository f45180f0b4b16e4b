"""CA-SAM core: frozen SAM backbones, per-task Alignment Layers, routing and learning.

No Qt here: the napari plugin, the CLI, the benchmark and the tests all use these
modules the same way.

The model classes below are imported on first use (PEP 562), so that the light modules
(``casam_core.io``, ``casam_core.samples``) load without torch: napari's reader and sample
menus use them in a viewer whose OpenGL context is already up (see ``napari_casam._runtime``).
"""

from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

# No network, no files outside CA-SAM's own folders: OpenVINO's model converter imports
# ``openvino_telemetry``, which writes ~/intel and forks a process that sends a usage event to a
# web analytics service on every conversion (and import). With the module marked absent here,
# before anything imports OpenVINO, the converter uses its own no-op stub instead.
# (tests/test_privacy.py checks that no socket opens, no process is forked, nothing lands in $HOME.)
if "openvino_telemetry" not in sys.modules:
    sys.modules["openvino_telemetry"] = None  # ``import openvino_telemetry`` now raises ImportError

_LAZY = {
    "AlignmentLayer": "alignment",
    "BACKBONES": "backbones", "DEFAULT_BACKBONE": "backbones", "Backbone": "backbones",
    "build_backbone": "backbones",
    "CASamError": "errors", "BackboneError": "errors",
    "CASamPredictor": "predictor", "TaskChoice": "tasks",
    "build_predictor": "build",
    # the front door for learning and files: what a user's script needs, without knowing the modules
    "read_image": "io", "read_labels": "io", "write_mask": "io",
    "load_task_data": "task_data", "learn_config": "training", "learn_task": "training",
    "TaskLibrary": "library",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
