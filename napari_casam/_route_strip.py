"""The route strip: where in a volume the router is sure, slice by slice.

One column per slice, coloured by the learned task that recognises that slice on its own, or
grey where none does (the frozen model's ground); the darker the colour, the further the slice
is from the task (score / tau near 1). A white tick marks the slice shown, and a line of text
says its task and score / tau. Drawn from the slice scores the router computes for a volume's
route: nothing is embedded or scored for it.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from qtpy.QtGui import QColor, QPainter, QPixmap
from qtpy.QtWidgets import QLabel, QSizePolicy, QVBoxLayout, QWidget

from casam_core.tasks import TaskChoice, slice_route

TASK_COLOURS = ("#1f9ede", "#e8a33d", "#7ac74f", "#c4579c", "#8c6bd6", "#d9534f")
FROZEN_COLOUR = "#555555"
HEIGHT = 12


class RouteStrip(QWidget):
    def __init__(self) -> None:
        super().__init__()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.bar = QLabel()
        self.bar.setFixedHeight(HEIGHT)
        # the picture is scaled to the bar, never the bar to the picture: drawn before the first layout
        # (640 px wide) it widened the dock past the window and cut its right side off
        self.bar.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.bar.setScaledContents(True)
        self.text = QLabel("")
        self.text.setWordWrap(True)
        layout.addWidget(self.bar)
        layout.addWidget(self.text)
        self.routes: List[Tuple[Optional[str], Optional[float]]] = []
        self.tasks: List[str] = []
        self.current = 0
        self.setVisible(False)

    @property
    def slices(self) -> int:
        return len(self.routes)

    def show_choice(self, choice: Optional[TaskChoice], n_slices: int) -> None:
        """A volume's complete auto route (anything else hides the strip)."""
        if choice is None or not choice.slice_scores or n_slices < 1:
            self.routes, self.tasks = [], []
            self.setVisible(False)
            return
        self.tasks = sorted(choice.slice_scores)
        self.routes = [slice_route(choice, k) for k in range(n_slices)]
        self.setVisible(True)
        self.draw()

    def set_current(self, k: int) -> None:
        if k != self.current:
            self.current = k
            if self.routes:
                self.draw()

    def describe(self, k: int) -> str:
        task, ratio = self.routes[k] if 0 <= k < len(self.routes) else (None, None)
        if ratio is None:
            return ""
        return f"slice {k}: {'task ' + task if task else 'frozen model'} (score/tau {ratio:.2g})"

    def draw(self) -> None:
        n = len(self.routes)
        width = max(2 * n, 400)  # scaled to the bar's width
        pixmap = QPixmap(width, HEIGHT)
        pixmap.fill(QColor(FROZEN_COLOUR))
        painter = QPainter(pixmap)
        for k, (task, ratio) in enumerate(self.routes):
            x0, x1 = int(k * width / n), int((k + 1) * width / n)
            if task is not None:
                colour = QColor(TASK_COLOURS[self.tasks.index(task) % len(TASK_COLOURS)])
                painter.fillRect(x0, 0, max(1, x1 - x0), HEIGHT, colour.darker(100 + int(60 * min(1.0, ratio))))
        if 0 <= self.current < n:
            x = int((self.current + 0.5) * width / n)
            painter.fillRect(max(0, x - 1), 0, 2, HEIGHT, QColor("white"))
        painter.end()
        self.bar.setPixmap(pixmap)
        self.text.setText(self.describe(self.current))
