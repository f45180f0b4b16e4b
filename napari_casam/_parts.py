"""The widget's parts its mixins use, declared in one place (types only; nothing is set here)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Optional, Tuple

import numpy as np

from casam_core.tasks import TaskChoice

if TYPE_CHECKING:
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QLabel, QPushButton

    from ._classes import ClassPicker
    from ._layers import Annotations, PromptLayers
    from ._route_strip import RouteStrip
    from ._session import ModelSession
    from ._workers import Workers


class WidgetParts:
    """What ``CASamWidget`` gives its mixins (``SegmentingMixin``, ``AutoMixin``), declared once: set
    in its ``__init__``, by ``_panels.build_panels`` and by ``AutoMixin``; and its methods
    ``status``, ``say``, ``notify``, ``error``, ``_run``, ``current_prompts``, ``current_slice``,
    ``task_choice``, ``clear_prompts``, ``update_route``, ``_not_ready_reason``,
    ``_show_route`` and the properties ``predictor`` and ``is_volume``. Declarations only: no
    attribute is set here."""

    viewer: "napari.Viewer"
    session: "ModelSession"
    workers: "Workers"
    layers: "PromptLayers"
    classes: "ClassPicker"
    annotations: "Annotations"
    image_layer: Optional["napari.layers.Image"]
    route_label: "QLabel"
    route_strip: "RouteStrip"
    stop_button: "QPushButton"
    last_route: Optional[TaskChoice]
    last_ranking: Optional[list]
    auto_preview: Optional[str]  # AutoMixin: the preview holds a zero-click label map
    _auto: Optional[threading.Event]  # AutoMixin: the running zero-click segmentation
    _ready: bool  # the current image (or volume slice) is embedded
    _prompt_version: int  # bumps on every prompt, slice or task change
    _preview_version: int  # the prompt version the preview shows
    _in_flight: int  # segment requests not yet answered
    _commit_pending: bool  # C pressed while the preview was not yet current
    _last_logits: Optional[Tuple[tuple, np.ndarray]]  # (key, low-res logits) of the last segmentation
    _propagation: Optional[threading.Event]  # the running propagation's cancel event
    _ranking: Optional[threading.Event]  # the running ranking's cancel event
    _debounce: "QTimer"
