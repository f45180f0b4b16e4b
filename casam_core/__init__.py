"""CA-SAM core: frozen SAM backbones, per-task Alignment Layers, routing and learning.

No Qt here: the napari plugin, the CLI, the benchmark and the tests all use these
modules the same way.
"""

__version__ = "0.1.0"

from .alignment import AlignmentLayer  # noqa: E402
from .backbones import BACKBONES, DEFAULT_BACKBONE, Backbone, BackboneError, build_backbone  # noqa: E402
from .predictor import CASamPredictor  # noqa: E402

__all__ = [
    "__version__", "AlignmentLayer", "BACKBONES", "DEFAULT_BACKBONE", "Backbone", "BackboneError",
    "build_backbone", "CASamPredictor",
]
