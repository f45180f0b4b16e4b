"""What a task is, how tasks are named and chosen, and how a choice is told to the user.

A leaf of the core: it imports no other CA-SAM module at run time, so the predictor,
the library and learning all import it, and it imports none of them.

``task`` as the user gives it (CLI ``--task``, the widget's task list, ``predict(task=)``):
``"auto"`` asks the router; ``None``, ``"none"`` or ``"frozen"`` choose the frozen model;
anything else names a learned task. ``TaskChoice`` is the one answer: the task the image
belongs to, the Alignment Layer used (``None`` when the task's layer lost to the frozen
model on its held-out images), and the router's scores. ``describe_route`` and
``describe_card`` are the one wording of a choice and of a task card.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Tuple

from .errors import TaskNameError

if TYPE_CHECKING:  # types only: the modules holding torch are imported by those who build tasks
    from .alignment import AlignmentLayer
    from .finder import Finder
    from .router import TaskVAE

AUTO = "auto"
FROZEN_NAMES = ("none", "frozen")
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CLICK_TEXT = {"click_box": "one box of the task's typical object size, centred on the click",
              "direct": "decoded as points", "default": "the backbone's own way (LiteMedSAM: box search)"}


def check_task_name(name: str) -> str:
    """``name`` if it can name a task (1-64 letters, digits, '_', '-', '.'; not reserved)."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):  # fullmatch: "$" lets a final newline by
        raise TaskNameError(f"task name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a "
                            f"letter or digit")
    if name.lower() in (AUTO,) + FROZEN_NAMES:
        raise TaskNameError(f"task name {name!r} is reserved")
    return name


def task_mode(task: Optional[str]) -> str:
    """``"auto"``, ``"frozen"`` or ``"named"`` for a ``task`` value as the user gives it."""
    if task is None or task.lower() in FROZEN_NAMES:
        return "frozen"
    return "auto" if task.lower() == AUTO else "named"


@dataclass
class Task:
    """A learned task as the library holds it: its layer, its router VAE and threshold, its card,
    and its structure finder (zero-click; None for a task learned before there were finders)."""

    name: str
    layer: "AlignmentLayer"
    vae: "TaskVAE"
    tau: float
    card: dict
    finder: Optional["Finder"] = None

    @property
    def use_alignment(self) -> bool:
        return bool(self.card.get("use_alignment", True))


@dataclass(frozen=True)
class TaskChoice:
    """Which task an image was given to, and why.

    ``mode``: "auto" (the router chose), "named" or "frozen" (the user chose);
    ``decision``: the task the image belongs to (None: the frozen model);
    ``layer``: the Alignment Layer used (None: frozen features, also for a task whose layer
    lost to the frozen model); ``scores``/``tau``: the router's, per task (auto only);
    ``complete``: False for a volume's provisional route from the slices embedded so far.
    """

    mode: str
    decision: Optional[str] = None
    layer: Optional[str] = None
    scores: Dict[str, float] = field(default_factory=dict)
    tau: Dict[str, float] = field(default_factory=dict)
    complete: bool = True
    slice_scores: Dict[str, List[float]] = field(default_factory=dict)  # auto, a whole volume: per task, per slice

    @property
    def best(self) -> Optional[str]:
        """The task the router found closest (None without scores)."""
        return min(self.scores, key=self.scores.get) if self.scores else None

    def to_json(self) -> dict:
        return {"mode": self.mode, "decision": self.decision, "layer": self.layer,
                "scores": dict(self.scores), "tau": dict(self.tau)}


def describe_route(choice: TaskChoice) -> str:
    """One line for the user: what segments this image, and why."""
    if choice.mode == "frozen":
        return "frozen model (chosen)"
    if choice.mode == "named":
        note = "" if choice.layer is not None else " (its layer lost to frozen: frozen model used)"
        return f"task {choice.decision} (chosen){note}"
    if not choice.scores:
        return "frozen model (no learned task for this backbone)"
    best = choice.best
    s, t = choice.scores[best], choice.tau[best]
    provisional = "" if choice.complete else " [provisional: volume still embedding]"
    if choice.decision is None:
        return f"frozen model, out of distribution (closest {best}: {s:.4g} > tau {t:.4g}){provisional}"
    note = "" if choice.layer is not None else " (its layer lost to frozen: frozen model used)"
    return f"task {choice.decision} (score {s:.4g} <= tau {t:.4g}){note}{provisional}"


def coverage(choice: TaskChoice) -> Optional[float]:
    """How far an image is from every learned task: the smallest score / tau over the tasks
    (at most 1: a task recognises it). None without scores (no learned task)."""
    ratios = [choice.scores[t] / choice.tau[t] for t in choice.scores if choice.tau.get(t)]
    return min(ratios) if ratios else None


def slice_route(choice: TaskChoice, k: int) -> Tuple[Optional[str], Optional[float]]:
    """Slice ``k`` of a routed volume on its own: (the task that recognises it, or None for the
    frozen model; its smallest score / tau over the tasks), or (None, None) without slice scores."""
    ratios = {t: v[k] / choice.tau[t] for t, v in choice.slice_scores.items() if choice.tau.get(t) and k < len(v)}
    if not ratios:
        return None, None
    best = min(ratios, key=ratios.get)
    return (best if ratios[best] <= 1.0 else None), float(ratios[best])


def describe_scores(choice: TaskChoice) -> str:
    """Every learned task's router score against its threshold, closest first (one line each)."""
    if not choice.scores:
        return "no learned task"
    return "\n".join(f"{n}: score {s:.4g}, tau {choice.tau[n]:.4g} {'in' if s <= choice.tau[n] else 'out'}"
                     for n, s in sorted(choice.scores.items(), key=lambda kv: kv[1]))


def describe_card(card: Mapping) -> str:
    """A task card in a few lines: what it segments, how it was learned and how well."""
    v = card.get("validation", {})
    return (f"{card.get('name')}: {card.get('modality') or 'modality unknown'}; labels "
            f"{', '.join((card.get('labels') or {}).values())}\n"
            f"backbone {card.get('backbone_fingerprint')}; {card.get('alignment', {}).get('form')} layer, "
            f"{card.get('training_data', {}).get('annotated')} annotated images\n"
            f"validation Dice frozen {v.get('dice_zero_shot')} vs aligned {v.get('dice_aligned')}"
            f"{'' if card.get('use_alignment', True) else ' (uses the frozen model)'}; created {card.get('created')}\n"
            f"clicks: {CLICK_TEXT.get(card.get('point_prompts'), CLICK_TEXT['default'])}\n"
            f"{_describe_finder(card.get('finder'))}"
            + (f"\n{describe_propagation(card['propagation'])}"
               if isinstance(card.get("propagation"), Mapping) else ""))


def describe_propagation(chosen: Mapping) -> str:
    """How a task propagates a box through a volume, and why (its card's ``propagation``)."""
    how = ("re-anchored by the finder" if chosen.get("reanchor", True)
           else "the box carried slice to slice (re-anchoring did worse)")
    if not chosen.get("held_out_volumes"):
        return f"propagation from a box: {how} (no held-out volume to compare on)"
    return (f"propagation from a box: {how} (held-out 3D Dice carried {chosen.get('dice_blind')}, re-anchored "
            f"{chosen.get('dice_reanchored')})")


def _describe_finder(finder) -> str:
    if not isinstance(finder, Mapping):
        return "no prompts: not available (learned before tasks had a structure finder; learn it again)"
    v = finder.get("validation", {})
    return (f"no prompts (Segment with task): held-out Dice {v.get('dice_auto')} vs {v.get('dice_box')} with the "
            f"true box")
