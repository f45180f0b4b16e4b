"""The class picker: which label a commit or a propagation writes.

"new label per object" (instance mode) gives each commit the next free id. Otherwise a class
"id: name" is written: the chosen task's labels fill the list (a learned hippocampus task
knows "1: anterior" and "2: posterior"), and the user can type a new name (it gets the next
free class id). Each entry shows its colour in the labels layer, and choosing one also makes
it the labels layer's selected label, so the brush paints the same class.
"""

from __future__ import annotations

import re
from typing import Dict, Optional

INSTANCE = "new label per object"
_ENTRY = re.compile(r"^\s*(\d+)\s*(?::\s*(.*))?$")


def parse_entry(text: str) -> Optional[int]:
    """The label id of an entry "3: liver" or "3" (None for anything else)."""
    m = _ENTRY.match(text or "")
    return int(m.group(1)) if m and int(m.group(1)) > 0 else None


class ClassPicker:
    """Manages the dock's editable class combo box ``combo``; ``labels_layer()`` returns the
    CA-SAM labels layer or None."""

    def __init__(self, combo, labels_layer) -> None:
        self.combo = combo
        self.labels_layer = labels_layer
        from qtpy.QtWidgets import QComboBox

        combo.setEditable(True)
        combo.setInsertPolicy(QComboBox.NoInsert)  # a typed name becomes "id: name" in current()
        combo.addItem(INSTANCE)
        combo.lineEdit().editingFinished.connect(self.current)
        combo.currentIndexChanged.connect(lambda _: self.sync())

    def entries(self) -> Dict[int, str]:
        out = {}
        for i in range(self.combo.count()):
            text = self.combo.itemText(i)
            k = parse_entry(text)
            if k is not None:
                out[k] = text
        return out

    def add(self, label: int, name: str = "") -> str:
        """The entry for ``label`` (added when missing); returns its text."""
        existing = self.entries()
        if label in existing:
            return existing[label]
        text = f"{label}: {name}" if name else str(label)
        self.combo.addItem(text)
        self.colour(self.combo.count() - 1, label)
        if name:
            self.sync()
        return text

    def set_task_labels(self, labels: Dict[str, str]) -> None:
        """The chosen task's {id: name} join the list (typed classes stay)."""
        for key, name in sorted(labels.items(), key=lambda kv: int(kv[0])):
            if int(key) > 0:
                self.add(int(key), name)

    def current(self) -> Optional[int]:
        """The chosen label id; None in instance mode. A typed name not in the list becomes a new
        class with the next free id (past the listed classes and the labels already painted)."""
        text = self.combo.currentText().strip()
        if not text or text == INSTANCE:
            return None
        k = parse_entry(text)
        if k is None:  # a typed name: an existing class of that name, or a new one
            for label, entry in self.entries().items():
                if entry.split(":", 1)[-1].strip().lower() == text.lower():
                    k = label
                    break
            else:
                layer = self.labels_layer()
                painted = int(layer.data.max()) if layer is not None and layer.data.size else 0
                k = max([painted, *self.entries()]) + 1
                self.add(k, text)
        entry = self.add(k)
        index = self.combo.findText(entry)
        if self.combo.currentIndex() != index:  # the entry itself chosen (setCurrentText on an editable
            self.combo.setCurrentIndex(index)  # combo only changed the text: the old class stayed current)
        elif self.combo.currentText() != entry:
            self.combo.setEditText(entry)
        self.sync()
        return k

    def names(self) -> Dict[int, str]:
        """{label id: class name} of the named entries."""
        return {k: text.split(":", 1)[1].strip() for k, text in self.entries().items() if ":" in text}

    def sync(self) -> None:
        """The labels layer's brush paints the chosen class, and its metadata keeps the classes' names
        (a DICOM SEG names its segments from them); each entry shows its colour."""
        layer = self.labels_layer()
        if layer is not None and layer.metadata.get("casam_label_names") != self.names():
            layer.metadata = {**layer.metadata, "casam_label_names": self.names()}
        k = parse_entry(self.combo.currentText())
        if layer is not None and k is not None and layer.selected_label != k:
            layer.selected_label = k
        for i in range(self.combo.count()):
            label = parse_entry(self.combo.itemText(i))
            if label is not None:
                self.colour(i, label)

    def colour(self, index: int, label: int) -> None:
        from qtpy.QtGui import QColor, QIcon, QPixmap

        layer = self.labels_layer()
        if layer is None:
            return
        r, g, b, _ = (float(v) for v in layer.get_color(label))
        pixmap = QPixmap(12, 12)
        pixmap.fill(QColor.fromRgbF(r, g, b))
        self.combo.setItemIcon(index, QIcon(pixmap))
