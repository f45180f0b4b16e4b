"""Clicks on a box-only backbone (LiteMedSAM): the click policy.

LiteMedSAM was trained with boxes only; its point embeddings give logits of about 0. So the
predictor turns clicks into boxes here: ``point_box_search`` (a first click: boxes of several
sizes around it; corrective clicks: variants of the prior box and local edits of the earlier
mask, the candidate that honours most clicks wins), ``task_sized_box`` (a learned task's clicks
as one box of its typical object size) and ``keep_in_boxes`` (a corrective click never takes a
mask out of the user's box). The constants were chosen on training images with
``benchmarks/corrective_clicks.py --choose``; its table holds the measurements.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import PromptError

# Box sizes tried around point-only clicks on box-only backbones, as fractions of the
# longest side of the image (plus the spread of the positive clicks).
POINT_SEARCH_FRACTIONS = (0.06, 0.1, 0.16, 0.25, 0.4, 0.6)
# Corrective clicks on an earlier mask: box sizes of the local edits (same units), and the
# score bonus that makes a local edit win over a restart honouring as many clicks. Chosen on
# training images: benchmarks/corrective_clicks.py --choose.
LOCAL_EDIT_FRACTIONS = (0.06, 0.1, 0.16)
LOCAL_EDIT_BONUS = 2.0
# Weight of closeness to the earlier mask (IoU, 0-1) among candidates that honour as many
# clicks; the predicted IoU counts once.
CLOSENESS_WEIGHT = 1.0


def decoding_for(card: dict) -> dict:
    """How a task decodes point-only prompts (``CASamPredictor.predict_features`` keywords), from
    its card's ``point_prompts``: ``"click_box"`` (one box of the task's typical object size,
    ``card["click_box"]``), ``"direct"`` (the points decoded once) or anything else (the
    backbone's default: the box search on a box-only backbone)."""
    mode = card.get("point_prompts")
    if mode == "click_box" and card.get("click_box"):
        return {"click_box": tuple(float(v) for v in card["click_box"])}
    if mode == "direct":
        return {"point_search": False}
    return {}


def point_box_search(backbone, z: torch.Tensor, input_size: Tuple[int, int], points, masks, multimask_output: bool,
                     boxes=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Clicks on a box-only backbone (LiteMedSAM), alone or with a box or earlier logits.

    The backbone ignores points, so clicks choose among boxes. For each point set, the
    candidates are boxes of several sizes centred on the positive clicks and, when there
    is a prior box (the prompt's box, or the box of the earlier logits in ``masks``),
    variants of that box: as is, grown to take in each positive click, cut back on the
    side that excludes each negative click, and both, each also 10 % larger and smaller.
    All are decoded in one batch (without the earlier logits: this backbone was not
    trained with mask prompts). With earlier logits, the newest click also edits the
    earlier mask locally: boxes of ``LOCAL_EDIT_FRACTIONS`` centred on it are decoded, and
    the part of each that touches the click, inside its box, is added to the earlier mask
    (positive click) or cut out of it (negative; where the click is background in the
    local decode, the box keeps only what both call foreground). The winner satisfies
    the most clicks (positives inside, negatives outside); among those a local edit comes
    first (``LOCAL_EDIT_BONUS``: a correction fixes, it does not restart), then the
    highest predicted IoU plus closeness to the earlier mask. So a corrective click can
    only move the result towards a mask that agrees with it; earlier clicks stay
    honoured where any candidate honours them.
    """
    coords, labels = points
    h_in, w_in = input_size
    long_side = max(h_in, w_in)
    low_size = 4 * backbone.embedding_shape[1]
    scale = low_size / backbone.img_size
    out_low, out_iou = [], []
    for b in range(coords.shape[0]):
        pos, neg = coords[b][labels[b] == 1], coords[b][labels[b] == 0]
        prior = boxes[b] if boxes is not None else (
            logits_box(masks[b, 0], backbone.img_size / low_size) if masks is not None else None)
        if pos.shape[0] == 0 and prior is None:
            raise PromptError("this backbone needs a box or at least one foreground point (label 1)")
        cand = []
        if pos.shape[0]:
            lo, hi = pos.min(0).values, pos.max(0).values
            centre, spread = (lo + hi) / 2, (hi - lo) / 2
            half = torch.stack([spread + f * long_side / 2 for f in POINT_SEARCH_FRACTIONS])  # (K, 2)
            cand.append(torch.cat([centre - half, centre + half], dim=1))
        if prior is not None:
            cand.append(box_variants(prior, pos, neg))
        last = coords[b][-1]
        n_local = len(LOCAL_EDIT_FRACTIONS) if masks is not None else 0
        if n_local:  # boxes centred on the newest click, for local edits of the earlier mask
            half = torch.tensor(LOCAL_EDIT_FRACTIONS, device=coords.device)[:, None] * long_side / 2
            cand.append(torch.cat([last - half, last + half], dim=1))
        cand = torch.cat(cand)
        cand[:, 0::2] = cand[:, 0::2].clamp(0, w_in - 1)
        cand[:, 1::2] = cand[:, 1::2].clamp(0, h_in - 1)
        # a first click needs each candidate's logits only at the clicks; a correction compares
        # whole masks with the earlier one
        found = backbone.decode_candidates(z, cand, whole=masks is not None)
        iou = found.iou[:, :1]
        if masks is not None:
            low = found.whole[:, :1]
            if n_local:
                edits = local_edits(masks[b, 0], low[-n_local:, 0], cand[-n_local:] * scale,
                                     (last * scale).long().clamp(0, low_size - 1), bool(labels[b][-1] == 1))
                low = torch.cat([low, edits[:, None]])
                iou = torch.cat([iou, iou[-n_local:]])
                cand = torch.cat([cand, cand[-n_local:]])
            logits = low[:, 0]

        def inside(pts):
            ij = (pts * scale).long().clamp(0, low_size - 1)
            at = logits[:, ij[:, 1], ij[:, 0]] if masks is not None else found.logits_at(ij)[:, 0]
            return at > 0  # (K, n_points)

        satisfied = inside(pos).sum(1) + (~inside(neg)).sum(1)
        score = satisfied.float() * 10.0 + iou[:, 0]  # most clicks honoured, then predicted IoU ...
        keep = None
        if masks is not None:  # ... plus closeness to the earlier mask: a correction fixes, it does not restart
            before = masks[b, 0] > 0
            now = logits > 0
            closeness = (now & before).flatten(1).sum(1) / (now | before).flatten(1).sum(1).clamp(min=1)
            score = score + CLOSENESS_WEIGHT * closeness
            ij_pos, ij_neg = ((pts * scale).long().clamp(0, low_size - 1) for pts in (pos, neg))
            honoured_before = int(before[ij_pos[:, 1], ij_pos[:, 0]].sum() + (~before[ij_neg[:, 1], ij_neg[:, 0]]).sum())
            if int(satisfied.max()) <= honoured_before:  # no candidate honours more clicks: keep the mask
                keep = int(closeness.argmax())
        if n_local:
            score[-n_local:] += LOCAL_EDIT_BONUS  # a local edit beats a restart that honours no more clicks
        best = int(score.argmax())
        if int(satisfied.max()) == 0 and pos.shape[0]:
            best = len(POINT_SEARCH_FRACTIONS) - 1  # nothing honours a click: the largest centred box
        if keep is not None:
            low_b, iou_b = masks[b: b + 1].expand(-1, 3 if multimask_output else 1, -1, -1), iou[keep: keep + 1]
            if multimask_output:
                iou_b = iou_b.expand(-1, 3)
        elif best >= len(cand) - n_local:  # a local edit: the one mask (three times for multimask)
            low_b, iou_b = low[best: best + 1], iou[best: best + 1]
            if multimask_output:
                low_b, iou_b = low_b.expand(-1, 3, -1, -1), iou_b.expand(-1, 3)
        else:  # a candidate as decoded: its outputs need no second decode
            chosen = slice(1, None) if multimask_output else slice(0, 1)
            low_b, iou_b = found.masks(best)[:, chosen], found.iou[best: best + 1, chosen]
        out_low.append(low_b)
        out_iou.append(iou_b)
    return torch.cat(out_low), torch.cat(out_iou)


def task_sized_box(coords: torch.Tensor, original_size: Tuple[int, int], input_size: Tuple[int, int],
                   click_box: Sequence[float]) -> torch.Tensor:
    """Positive clicks ``coords`` (B, N, 2; model frame) as one box each, of ``click_box`` = (w, h)
    fractions of the image's long side (a learned task's typical object size), centred on the
    clicks and grown to span them, inside the image -> boxes (B, 4) in the model frame."""
    (h, w), (h_in, w_in) = original_size, input_size
    to_input = torch.tensor([w_in / w, h_in / h], dtype=torch.float32, device=coords.device)
    half = torch.as_tensor(click_box, dtype=torch.float32, device=coords.device) * max(h, w) / 2 * to_input
    lo, hi = coords.min(1).values, coords.max(1).values
    centre, spread = (lo + hi) / 2, (hi - lo) / 2
    half = torch.maximum(half[None], spread)
    boxes = torch.cat([centre - half, centre + half], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, (w - 1) * float(to_input[0]))  # inside the image, as box prompts
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, (h - 1) * float(to_input[1]))
    return boxes


def keep_in_boxes(img_size: int, original_size: Tuple[int, int], input_size: Tuple[int, int], low_res: torch.Tensor,
                  full: torch.Tensor, box, point_coords, point_labels) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits outside each object's box (grown to take in its positive clicks) made negative, at
    full resolution and in the low-res logits a next corrective click starts from (there with one
    low-res pixel to spare, so that upsampling keeps the edge). The user's box says where the
    object is: a click inside it must not make the mask spill out (on kvasir_polyp one did, by
    thousands of pixels, before this rule)."""
    boxes = np.asarray(box, np.float64).reshape(-1, 4)
    coords = np.asarray(point_coords, np.float64)
    labels = np.ones(coords.shape[:-1]) if point_labels is None else np.asarray(point_labels)
    coords = np.broadcast_to(coords if coords.ndim == 3 else coords[None], (len(boxes),) + coords.shape[-2:])
    labels = np.broadcast_to(labels if labels.ndim == 2 else labels[None], coords.shape[:2])
    lo, hi = boxes[:, :2].copy(), boxes[:, 2:].copy()
    for b in range(len(boxes)):
        positive = coords[b][labels[b] == 1]
        if len(positive):
            lo[b], hi[b] = np.minimum(lo[b], positive.min(0)), np.maximum(hi[b], positive.max(0))
    lo, hi = np.floor(lo), np.ceil(hi)
    (h, w), (h_in, w_in) = original_size, input_size
    device = full.device

    def inside(ys: torch.Tensor, xs: torch.Tensor, spare: Tuple[float, float]) -> torch.Tensor:
        lo_t = torch.as_tensor(lo - spare, dtype=torch.float32, device=device)
        hi_t = torch.as_tensor(hi + spare, dtype=torch.float32, device=device)
        in_x = (xs[None] >= lo_t[:, :1]) & (xs[None] <= hi_t[:, :1])
        in_y = (ys[None] >= lo_t[:, 1:]) & (ys[None] <= hi_t[:, 1:])
        return (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (B, 1, rows, columns)

    out = torch.tensor(-20.0, device=device)
    full = torch.where(inside(torch.arange(h, device=device, dtype=torch.float32),
                              torch.arange(w, device=device, dtype=torch.float32), (0.0, 0.0)),
                       full, torch.minimum(full, out.to(full.dtype)))
    n = low_res.shape[-1]
    step = img_size / n  # one low-res pixel in the model's input frame
    centres = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) * step
    sx, sy = w / w_in, h / h_in  # input frame -> original pixels
    keep = inside(centres * sy, centres * sx, (step * sx, step * sy))
    low_res = torch.where(keep, low_res, torch.minimum(low_res, out.to(low_res.dtype)))
    return low_res, full


def logits_box(logits: torch.Tensor, to_input: float) -> Optional[torch.Tensor]:
    """The (4,) box, in model input pixels, of the positive part of low-res logits (None if empty)."""
    ys, xs = torch.nonzero(logits > 0, as_tuple=True)
    if len(xs) == 0:
        return None
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float() * to_input


def local_edits(before: torch.Tensor, local: torch.Tensor, boxes: torch.Tensor, click, positive: bool) -> torch.Tensor:
    """Earlier logits ``before`` (S, S) edited at one corrective click (``click`` = (x, y) in
    low-res pixels) by each of the ``local`` (K, S, S) decodes of the ``boxes`` (K, 4; low-res
    pixels) centred on it: the part of each local mask inside its box and connected to the
    click is added (positive click) or cut out (negative). The edit stays inside the box."""
    from scipy import ndimage

    out = []
    x, y = int(click[0]), int(click[1])
    size = before.shape[-1]
    for lk, box in zip(local, boxes):
        x0, y0 = (int(v) for v in box[:2].floor().clamp(0, size - 1))
        x1, y1 = (int(v) for v in box[2:].ceil().clamp(0, size - 1))
        inside = np.zeros((size, size), bool)
        inside[y0: y1 + 1, x0: x1 + 1] = True
        comp, _ = ndimage.label((lk > 0).cpu().numpy() & inside)
        region = torch.as_tensor(comp == comp[y, x], device=lk.device) if comp[y, x] else None
        if positive:
            out.append(before if region is None else torch.where(region, torch.maximum(before, lk), before))
        elif region is not None:  # the click is on something else: cut that out
            out.append(torch.where(region, torch.minimum(before, -lk), before))
        else:  # the click is background here: inside the box, keep what both call foreground
            out.append(torch.where(torch.as_tensor(inside, device=lk.device), torch.minimum(before, lk), before))
    return torch.stack(out)


def box_variants(box: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """(K, 4) boxes around a prior box: itself; grown to take in each positive click; cut back to
    exclude each negative click on the side that loses least; all clicks at once; each x0.9 and x1.1."""
    margin = 0.05 * (box[2:] - box[:2]).clamp(min=8.0)
    variants = [box]

    def grow(b, p):
        return torch.cat([torch.minimum(b[:2], p - margin), torch.maximum(b[2:], p + margin)])

    def cut(b, q):
        options = [b.clone() for _ in range(4)]
        options[0][0] = torch.maximum(b[0], q[0] + margin[0])  # move the left side right of the click
        options[1][2] = torch.minimum(b[2], q[0] - margin[0])
        options[2][1] = torch.maximum(b[1], q[1] + margin[1])
        options[3][3] = torch.minimum(b[3], q[1] - margin[1])
        valid = [o for o in options if (o[2] > o[0]) and (o[3] > o[1])]
        if not valid:
            return b
        return max(valid, key=lambda o: float((o[2] - o[0]) * (o[3] - o[1])))

    all_clicks = box
    for p in pos:
        variants.append(grow(box, p))
        all_clicks = grow(all_clicks, p)
    for q in neg:
        inside = bool((q >= box[:2]).all() and (q <= box[2:]).all())
        if inside:
            variants.append(cut(box, q))
            all_clicks = cut(all_clicks, q)
    variants.append(all_clicks)
    out = torch.stack(variants)
    centre, half = (out[:, :2] + out[:, 2:]) / 2, (out[:, 2:] - out[:, :2]) / 2
    scaled = [torch.cat([centre - f * half, centre + f * half], dim=1) for f in (0.9, 1.1)]
    return torch.cat([out] + scaled)
