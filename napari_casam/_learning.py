"""'Learn new task' in the dock: checks the user's choice, starts the learning process
(``_learn_process``), shows its progress, cancels it, and reports its outcome."""

from __future__ import annotations

import threading
from typing import Optional

import numpy as np

from casam_core.errors import TaskNameError
from casam_core.tasks import check_task_name


class LearnController:
    """The learning job of one dock ``w`` (a CASamWidget: its fields, status line and task list)."""

    POLL_MS = 200

    def __init__(self, w) -> None:
        from qtpy.QtCore import QTimer

        self.w = w
        self.job = None
        self.result = None  # the last job's final message: ("done", card), ("cancelled",) or ("error", ...)
        self._bar = None
        self._name = ""
        self._description = ""
        self._status_done = lambda: None
        self._poll = QTimer(w)
        self._poll.timeout.connect(self.poll)

    def _check(self, name: str, image_name: str, labels_name: str) -> Optional[str]:
        """Why learning cannot start (None when it can)."""
        w = self.w
        if self.job is not None:
            return "CA-SAM: a task is already being learned"
        if not name or not image_name or not labels_name:
            return "CA-SAM: choose an image, an annotated Labels layer and a task name"
        try:
            check_task_name(name)
        except TaskNameError as exc:
            return f"CA-SAM: {exc}"
        if name in w.library:
            return f"CA-SAM: a task named {name!r} already exists in {w.library.root}"
        return None

    def start(self, name: Optional[str] = None, labels_layer: Optional[str] = None) -> bool:
        """Start learning a task from the image layer and an annotated Labels layer (separate process)."""
        from napari.utils import progress

        from ._learn_process import LearnJob
        from ._workers import task_status

        w = self.w
        name = (name or w.task_name_edit.text()).strip()
        labels_name = labels_layer or w.labels_combo.currentText()
        image_name = w.image_layer.name if w.image_layer is not None else w.image_combo.currentText()
        why = self._check(name, image_name, labels_name)
        if why is None:
            image = np.asarray(w.viewer.layers[image_name].data)
            labels = np.asarray(w.viewer.layers[labels_name].data)
            if labels.shape != image.shape[: labels.ndim] or labels.ndim not in (2, 3):
                why = f"CA-SAM: {labels_name} ({labels.shape}) does not match {image_name} ({image.shape})"
            elif not labels.any():
                why = f"CA-SAM: {labels_name} has no annotation"
        if why is not None:
            w.error(why)
            return False
        fast = w.profile_combo.currentText() == "fast"
        self.job = LearnJob(
            name=name, image=image, labels=labels.astype(np.int32), backbone=w.backbone_combo.currentText(),
            checkpoint=w.checkpoint_edit.text().strip() or None, device=w.device_combo.currentText(),
            library=str(w.library.root), cache_dir=str(w.session.cache_dir), profile=w.profile_combo.currentText(),
            steps=int(w.steps_spin.value()) if fast else None, label_names=self._label_names(labels),
            modality=w.modality_edit.text().strip() or None,
            axis=w.layers.axis if labels.ndim == 3 else 0)  # the slices the user saw and annotated
        w.workers.jobs.append(self.job)
        self._status_done = task_status(w.viewer, f"learning task {name}", w.workers.shutdown)
        self.job.start()
        self._name, self._description = name, ""
        self._bar = progress(total=1, desc=f"CA-SAM: learning {name}")
        w.learn_button.setEnabled(False)
        w.cancel_button.setEnabled(True)
        self._poll.start(self.POLL_MS)
        w.status_label.setText(f"learning task {name} in a separate process...")
        return True

    def _label_names(self, labels: np.ndarray) -> Optional[dict]:
        """{label value: name} from the structure field (None: the learning process names them)."""
        text = self.w.label_name_edit.text().strip()
        if not text:
            return None
        values = [int(v) for v in np.unique(labels) if v]
        return {v: text if len(values) == 1 else f"{text} {v}" for v in values}

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.w.status_label.setText("cancelling...")

    def stop_polling(self) -> None:
        self._poll.stop()

    def poll(self) -> None:
        """Read the job's messages: the progress bar moves, and the outcome is reported once."""
        job, w = self.job, self.w
        if job is None or not w.workers.alive:
            self._poll.stop()
            return
        final = latest = None
        for msg in job.messages():
            if msg[0] == "progress":
                latest = msg
            else:
                final = msg
        if latest is not None:  # one progress bar update per poll, however many steps were reported
            self._show_progress(*latest[1:])
        if final is None and not job.alive():  # it ended since: its last words, or a generic error
            final = next((m for m in job.messages() if m[0] != "progress"),
                         ("error", "the learning process ended unexpectedly", ""))
        if final is None:
            return
        self._poll.stop()
        self._bar.close()
        self._status_done()
        self.job = None
        w.learn_button.setEnabled(True)
        w.cancel_button.setEnabled(False)
        # the child may take seconds to exit after its last message (interpreter and torch teardown):
        # it is reaped off the UI thread
        threading.Thread(target=job.join, args=(60,), name="casam-learn-reap", daemon=True).start()
        self.result = final
        if final[0] == "done":
            card = final[1]
            v = card["validation"]
            text = (f"CA-SAM: learned task {card['name']}: validation Dice frozen {v['dice_zero_shot']:.3f} "
                    f"vs aligned {v['dice_aligned']:.3f}")
            if "warning" in card:
                text += " - the layer did not beat the frozen model; this task will use the frozen model"
            w.library_changed()
            w.notify_soon(text)
        elif final[0] == "cancelled":
            w.notify_soon("CA-SAM: learning cancelled; the task library is unchanged")
        else:
            w.error(f"CA-SAM: learning failed: {final[1]}")

    def _show_progress(self, done: int, total: int, text: str) -> None:
        bar = self._bar
        if bar.total != total:
            bar.total = total
        bar.n = done
        description = f"CA-SAM {self._name}: {text}"
        if description != self._description:
            bar.set_description(description)
            self._description = description
        bar.refresh()
        percent = f"learning {self._name}: {100 * done // max(total, 1)} % ({text}); Cancel stops it"
        if self.w.status_label.text() != percent:  # the dock says it too, not only napari's activity dock
            self.w.status_label.setText(percent)
