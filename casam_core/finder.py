"""A task's structure finder: where each of its labels is, from the frozen embedding, no prompts.

A learned task knows what it segments; the finder lets it find those structures on a new
image or volume by itself (zero-click), and the user then corrects instead of prompting.

    heat = sigmoid(Finder(Z))        Z: the frozen embedding (256, 64, 64)
                                     heat: one map per output (L, 64, 64) on the embedding grid

``Finder``: 1x1 conv 256 -> 32, GELU, 3x3 conv 32 -> 32, GELU, 3x3 conv 32 -> L (about 19k
parameters for one label). Outputs: one per label value for a "class" task; one foreground
map for an "instance" task (its objects are the map's connected components).

From heat to objects (``find_objects``, 2D; ``find_volume_objects``, 3D): the map is taken
over the image's own region of the grid, brought to the image's size, thresholded at the
task's threshold (chosen on the held-out images), and split into connected components
(3D: 26-connected through the slices, so that a structure is ONE object over its slices);
components smaller than ``MIN_SHARE`` of the label's largest one are dropped as specks.
Each kept component gives a box per slice, and the task's decoder segments it from that
box: the finder says where, the decoder draws the outline.

It trains on the embeddings learning already computed (``train_finder``): BCE + Dice
against each label's share of every grid cell; slices annotated as empty teach it where
the structures are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .progress import CancelFn, check_cancel

HIDDEN = 32
STEPS = 500  # the layer's default 200 x 2.5 (training.learn_task)
LR = 2e-3
BATCH = 4
THRESHOLDS = (0.3, 0.4, 0.5, 0.6)  # the held-out images choose among these
MIN_SHARE = 0.1  # a component under this share of the label's largest is a speck
MIN_PIXELS = 4  # on the image's own grid
MAX_GAP = 2  # slices: a structure's parts this close through a volume are bridged (a slice the finder missed)


class Finder(nn.Module):
    def __init__(self, outputs: int, channels: int = 256, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.outputs = int(outputs)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.mix = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, outputs, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, -4.0)  # starts by finding nothing (structures are rare)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, h, w) of embeddings (B, 256, h, w)."""
        return self.out(F.gelu(self.mix(F.gelu(self.reduce(z.float())))))


def outputs_for(objects: str, label_values: Sequence[int]) -> List[int]:
    """The label value of each output: every label value of a class task, [1] for instances."""
    return [1] if objects == "instance" else sorted(int(v) for v in label_values)


def grid_targets(labels: np.ndarray, values: Sequence[int], objects: str, input_size: Tuple[int, int],
                 img_size: int, grid: int) -> torch.Tensor:
    """Each output's share of every embedding-grid cell (L, grid, grid), from a label map at
    the image's size (the encoder's resize and padding, then area pooling)."""
    lab = np.asarray(labels)
    maps = [(lab != 0) if objects == "instance" else (lab == v) for v in values]
    m = torch.from_numpy(np.stack(maps).astype(np.float32))[None]
    h_in, w_in = input_size
    m = F.interpolate(m, size=(h_in, w_in), mode="bilinear", align_corners=False)
    m = F.pad(m, (0, img_size - w_in, 0, img_size - h_in))
    return F.adaptive_avg_pool2d(m, grid)[0].clamp(0, 1)


def train_finder(z: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], outputs: int, steps: int = STEPS,
                 lr: float = LR, batch: int = BATCH, seed: int = 0, cancel: Optional[CancelFn] = None) -> Finder:
    """A Finder trained on frozen embeddings ``z`` (each (256, h, w)) and ``targets`` (each
    (L, h, w), shares in [0, 1]): Adam, BCE + soft Dice per output."""
    if not z or len(z) != len(targets):
        raise ValueError("train_finder needs as many targets as embeddings (at least one)")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    finder = Finder(outputs)
    opt = torch.optim.Adam(finder.parameters(), lr=lr)
    zs = torch.stack([t.float().cpu() for t in z])
    ts = torch.stack([t.float().cpu() for t in targets])
    finder.train()
    for step in range(steps):
        if step % 20 == 0:
            check_cancel(cancel)
        pick = torch.randint(len(zs), (min(batch, len(zs)),), generator=gen)
        logits = finder(zs[pick])
        t = ts[pick]
        p = torch.sigmoid(logits)
        dice = 1 - (2 * (p * t).sum((0, 2, 3)) + 1) / (p.sum((0, 2, 3)) + t.sum((0, 2, 3)) + 1)
        loss = F.binary_cross_entropy_with_logits(logits, t) + dice.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return finder.eval()


def heat_on_image(finder: Finder, z: torch.Tensor, input_size: Tuple[int, int], original_size: Tuple[int, int],
                  img_size: int) -> np.ndarray:
    """Heat (L, H, W) in [0, 1] at the image's size from its embedding (256, h, w) or (1, 256, h, w)."""
    return heat_on_slices(finder, z if z.ndim == 4 else z[None], input_size, original_size, img_size)[0]


@torch.inference_mode()
def heat_on_slices(finder: Finder, z: torch.Tensor, input_size: Tuple[int, int], original_size: Tuple[int, int],
                   img_size: int) -> np.ndarray:
    """Heat (B, L, H, W) of B same-sized slices' embeddings (B, 256, h, w), in one finder call."""
    logits = finder(z.float())
    up = F.interpolate(logits, (img_size, img_size), mode="bilinear", align_corners=False)
    up = up[..., : input_size[0], : input_size[1]]
    up = F.interpolate(up, tuple(original_size), mode="bilinear", align_corners=False)
    return torch.sigmoid(up).float().cpu().numpy()


def finder_box(predictor, task: Optional[str], record, carried: np.ndarray, previous: np.ndarray):
    """Where the task's finder sees the structure that a carried box is following, on one
    slice (propagation from a user's box re-anchors with it: ``prompts.propagate_masks``).

    The finder output is the one hottest under the previous slice's mask (the structure's
    label); its thresholded heat is split into components, and the one with the most pixels
    inside the carried box is the structure. Returns its box (x0, y0, x1, y1); ``None`` when
    the finder sees nothing inside the carried box; ``NotImplemented`` when ``task`` has no
    finder (the box is then carried as before)."""
    from scipy import ndimage

    finder = predictor.finders.get(task) if task is not None else None
    if finder is None:
        return NotImplemented
    heat = heat_on_image(finder, predictor.embedding(record), record.input_size, record.original_size,
                         predictor.backbone.img_size)
    j = int(np.argmax([h[previous].mean() for h in heat])) if previous.any() and len(heat) > 1 else 0
    comp, n = ndimage.label(heat[j] >= predictor.cards[task]["finder"]["threshold"], structure=np.ones((3, 3), bool))
    x0, y0, x1, y1 = (int(round(v)) for v in carried)
    inside = comp[y0:y1 + 1, x0:x1 + 1]
    counts = np.bincount(inside.ravel(), minlength=n + 1)[1:]
    if n == 0 or counts.max() == 0:
        return None
    ys, xs = np.nonzero(comp == int(counts.argmax()) + 1)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)


@dataclass
class FoundObject:
    """One structure the finder found: its label value and, per slice (0 for an image), its box
    (x0, y0, x1, y1 in the slice's pixels)."""

    label: int
    boxes: Dict[int, np.ndarray]
    heat: float  # the component's mean heat: how sure the finder is


def _components(binary: np.ndarray, heat: np.ndarray, label: int, per_class: bool) -> List[FoundObject]:
    from scipy import ndimage

    structure = np.ones((3,) * binary.ndim, bool)
    comp, n = ndimage.label(binary, structure=structure)
    if n == 0:
        return []
    sizes = ndimage.sum(binary, comp, range(1, n + 1))
    keep = [i + 1 for i, s in enumerate(sizes) if s >= max(MIN_PIXELS, MIN_SHARE * sizes.max())]
    if not keep:  # specks only
        return []
    found = []
    groups = [keep] if per_class else [[i] for i in keep]  # a class is one object, whatever its parts
    for group in groups:
        mask = np.isin(comp, group)
        boxes = {}
        slices = range(mask.shape[0]) if mask.ndim == 3 else [None]
        for k in slices:
            m = mask[k] if k is not None else mask
            if not m.any():
                continue
            ys, xs = np.nonzero(m)
            boxes[0 if k is None else int(k)] = np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)
        if mask.ndim == 3:
            _bridge(boxes)
        found.append(FoundObject(label, boxes, float(heat[mask].mean())))
    return found


def _bridge(boxes: Dict[int, np.ndarray]) -> None:
    """Fill gaps of at most ``MAX_GAP`` slices between a structure's slices with boxes interpolated
    from the slices either side (a slice where the heat dipped under the threshold is not a hole)."""
    keys = sorted(boxes)
    for a, b in zip(keys, keys[1:]):
        if 1 < b - a <= MAX_GAP + 1:
            for k in range(a + 1, b):
                w = (k - a) / (b - a)
                boxes[k] = ((1 - w) * boxes[a] + w * boxes[b]).astype(np.float32)


def find_objects(heat: np.ndarray, values: Sequence[int], threshold: float, objects: str = "class") -> List[FoundObject]:
    """The structures in a heat map (L, H, W) of one image, or (S, L, H, W) of a volume's slices."""
    found = []
    for j, value in enumerate(values):
        h = heat[:, j] if heat.ndim == 4 else heat[j]
        found += _components(h >= threshold, h, int(value), per_class=objects != "instance")
    return found
