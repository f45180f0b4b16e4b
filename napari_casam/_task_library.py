"""The dock's task library panel: the task list, each task's card, and rename / delete /
export / import (a name taken on import offers another name)."""

from __future__ import annotations

from typing import Optional

from qtpy.QtWidgets import QFileDialog, QInputDialog, QMessageBox

from casam_core.errors import CASamError, TaskNameClash
from casam_core.tasks import describe_card

AUTO, FROZEN = "Auto (router)", "Frozen model"  # the task list's first two choices


def task_from_text(text: str) -> Optional[str]:
    """The task combo's text as ``predict(task=)`` takes it: "auto", None (frozen) or a task name."""
    if text == AUTO or not text:
        return "auto"
    return None if text == FROZEN else text


class TaskLibraryPanel:
    """The library actions of one dock ``w`` (its library, task combo, task list and card)."""

    def __init__(self, w) -> None:
        self.w = w

    @property
    def library(self):
        return self.w.library

    def refresh(self) -> None:
        """The task choice and the task list, from the library (the current choice kept if it still exists)."""
        w = self.w
        try:
            self.library.check_folder()
        except CASamError as exc:  # said once, not on every refresh
            if not getattr(self, "_said_bad_folder", False):
                self._said_bad_folder = True
                w.error(f"CA-SAM: {exc}")
        names = self.library.names()
        current = w.task_combo.currentText()
        w.task_combo.blockSignals(True)
        w.task_combo.clear()
        w.task_combo.addItems([AUTO, FROZEN] + names)
        w.task_combo.setCurrentText(current if current in [AUTO, FROZEN] + names else AUTO)
        w.task_combo.blockSignals(False)
        w.task_list.clear()
        w.task_list.addItems(names)

    def show_card(self, name: str) -> None:
        if not name:
            self.w.card_label.setText("")
            return
        try:
            self.w.card_label.setText(describe_card(self.library.card(name)))
        except CASamError as exc:
            self.w.card_label.setText(str(exc))

    # -- actions (raise CASamError / OSError; the dialogs below show them) ---------------
    def rename_task(self, old: str, new: str) -> None:
        self.library.rename(old, new)
        self.w.library_changed()

    def delete_task(self, name: str) -> None:
        self.library.remove(name)
        self.w.library_changed()

    def export_task(self, name: str, path: str) -> None:
        self.library.export(name, path)
        self.w.notify(f"CA-SAM: exported task {name} to {path}")

    def import_task(self, path: str, name: Optional[str] = None) -> None:
        predictor = self.w.session.predictor
        task = self.library.import_pack(path, fingerprint=predictor.backbone.fingerprint if predictor else None,
                                        name=name)
        self.w.library_changed()
        self.w.notify(f"CA-SAM: imported task {task.name} from {path}")

    # -- the buttons ---------------------------------------------------------------------
    def _selected(self) -> Optional[str]:
        item = self.w.task_list.currentItem()
        return item.text() if item is not None else None

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except (CASamError, OSError) as exc:
            self.w.error(f"CA-SAM: {exc}")

    def rename_dialog(self) -> None:
        name = self._selected()
        if name:
            new, ok = QInputDialog.getText(self.w, "Rename task", f"new name for {name}:")
            if ok and new.strip():
                self._guard(self.rename_task, name, new.strip())

    def delete_dialog(self) -> None:
        name = self._selected()
        if name and QMessageBox.question(self.w, "Delete task", f"Delete task {name!r} from {self.library.root}? "
                                         "This cannot be undone.") == QMessageBox.Yes:
            self._guard(self.delete_task, name)

    def export_dialog(self) -> None:
        name = self._selected()
        if name:
            path, _ = QFileDialog.getSaveFileName(self.w, "Export task pack", f"{name}.casam-task")
            if path:
                self._guard(self.export_task, name, path)

    def import_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self.w, "Import task pack", "", "CA-SAM task packs (*.casam-task *.zip)")
        name = None
        while path:
            try:
                self.import_task(path, name)
                return
            except TaskNameClash as exc:  # offer another name, as the message suggests
                name, ok = QInputDialog.getText(self.w, "Import task pack", f"{exc}\n\nimport it as:",
                                                text=f"{exc.name}_2")
                if not ok or not name.strip():
                    self.w.status_label.setText("import cancelled; the task library is unchanged")
                    return
                name = name.strip()
            except (CASamError, OSError) as exc:
                self.w.error(f"CA-SAM: {exc}")
                return
