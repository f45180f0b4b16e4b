"""The napari layers the dock manages, and pure converters from layers to prompts.

* ``CA-SAM points``  positive (green) / negative (red) clicks; ``T`` toggles the kind
* ``CA-SAM boxes``   rectangles drawn with the Shapes tools
* ``CA-SAM preview`` the current mask (not saved)
* ``CA-SAM labels``  committed masks, one label id per commit, in the layer's own undo history

``prompts_from_layers``, ``slice_index`` and ``to_image`` are pure functions of layers (in
the spirit of micro-sam's ``sam_annotator/util.py``); ``PromptLayers`` adds, reuses and
clears the layers for the image being segmented.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

POINTS, BOXES, PREVIEW, LABELS = "CA-SAM points", "CA-SAM boxes", "CA-SAM preview", "CA-SAM labels"
POSITIVE, NEGATIVE = "positive", "negative"
COLOURS = {POSITIVE: "lime", NEGATIVE: "red"}
PREVIEW_COLOUR = "cyan"  # unlike any colour of napari's label cycle, and visible on endoscopy and greyscale
PREVIEW_OBJECT_COLOURS = (PREVIEW_COLOUR, "magenta", "yellow", "white")
MAX_PREVIEW_OBJECTS = 64
POINT_PIXELS = (10, 40)  # clicks are drawn 10-40 screen pixels wide


def slice_index(layer, world_point, axis: int = 0) -> int:
    """The index along a 3D layer's data ``axis`` of the slice napari shows at ``world_point``."""
    point = np.asarray(world_point, float)[-layer.ndim:]
    index = float(np.asarray(layer.world_to_data(point))[axis])
    return int(np.clip(np.round(index), 0, layer.data.shape[axis] - 1))


def slicing_axis(layer, dims) -> int:
    """The data axis of a 3D ``layer`` that the viewer slices (the one not displayed): 0 unless the
    user has rolled or transposed the view."""
    hidden = [d - (dims.ndim - layer.ndim) for d in dims.not_displayed]
    hidden = [d for d in hidden if 0 <= d < layer.ndim]
    return hidden[-1] if len(hidden) == 1 else 0


def plane(volume: np.ndarray, axis: int, k: int) -> np.ndarray:
    """Slice ``k`` along ``axis`` of a 3D array, as a view (rows and columns: the other two axes in order)."""
    return np.moveaxis(volume, axis, 0)[k]


def to_image(image_layer, layer, coords) -> np.ndarray:
    """(N, D) data coordinates of a prompt ``layer`` as (N, D) data coordinates of ``image_layer``."""
    coords = np.atleast_2d(np.asarray(coords, float))
    if len(coords) == 0 or image_layer is None:
        return coords
    same = (np.allclose(layer.scale, image_layer.scale[-layer.ndim:])
            and np.allclose(layer.translate, image_layer.translate[-layer.ndim:]))
    if same and layer.ndim == image_layer.ndim:
        return coords
    return np.array([image_layer.world_to_data(layer.data_to_world(c)) for c in coords])


def prompts_from_layers(points, boxes, image_layer, k: int = 0, axis: int = 0) -> Tuple:
    """The prompts on slice ``k`` along ``axis`` of a volume (2D: the image): (coords (N, 2) as x, y,
    labels (N,) 1/0, boxes (B, 4) as x0, y0, x1, y1), each None when absent; x and y are the
    slice's column and row (its other two axes, in order). ``points``: a Points layer whose
    ``kind`` feature is POSITIVE/NEGATIVE; ``boxes``: a Shapes layer (its rectangles are the boxes);
    either may be None. Coordinates are the image's pixels; clicks are clipped to the image."""
    coords = labels = out = None
    in_plane = None  # the (row, column) axes of a 3D prompt
    if points is not None:
        data = to_image(image_layer, points, points.data)
        if len(data):
            kinds = np.asarray(points.features["kind"]) if "kind" in points.features else np.full(len(data), POSITIVE)
            if data.shape[1] == 2:
                keep, rc = np.ones(len(data), bool), data
            else:
                in_plane = [d for d in range(3) if d != axis]
                keep, rc = np.round(data[:, axis]) == k, data[:, in_plane]
            if keep.any():
                coords = rc[keep][:, ::-1]
                labels = (kinds[keep] != NEGATIVE).astype(int)
    if boxes is not None:
        rows = []
        for shape, verts in zip(boxes.shape_type, boxes.data):
            verts = to_image(image_layer, boxes, verts)
            if verts.shape[1] == 3:
                if np.ptp(np.round(verts[:, axis])) > 0 or np.round(verts[0, axis]) != k:
                    continue  # drawn on another slice, or in another view
                verts = verts[:, [d for d in range(3) if d != axis]]
            if shape != "rectangle":
                continue
            ys, xs = verts[:, -2], verts[:, -1]
            rows.append([xs.min(), ys.min(), xs.max(), ys.max()])
        out = np.array(rows) if rows else None
    if coords is not None and image_layer is not None:
        shape = image_layer.data.shape
        h, w = shape[:2] if image_layer.rgb else (
            [shape[d] for d in range(3) if d != axis] if len(shape) == 3 else shape[-2:])
        coords = np.clip(coords, 0, [w - 1, h - 1])
    return coords, labels, out


def rgba(colour: str) -> np.ndarray:
    from napari.utils.colormaps.standardize_color import transform_color

    return transform_color(colour)[0]


def preview_colours():
    """Object 1 of the preview in cyan, further objects (several boxes) in other colours that napari's
    label cycle does not use for the committed masks."""
    from napari.utils.colormaps import DirectLabelColormap

    cycle = {k: PREVIEW_OBJECT_COLOURS[(k - 1) % len(PREVIEW_OBJECT_COLOURS)] for k in range(1, MAX_PREVIEW_OBJECTS + 1)}
    return DirectLabelColormap(color_dict={None: PREVIEW_COLOUR, 0: "transparent", **cycle})


class PromptLayers:
    """The four CA-SAM layers of one viewer. ``on_change`` runs when the user edits a prompt;
    ``bind_keys(layer)`` gives a new prompt layer the dock's shortcuts; ``say`` shows a status line."""

    def __init__(self, viewer, on_change: Callable, bind_keys: Callable, say: Callable[[str], None]) -> None:
        self.viewer = viewer
        self.on_change = on_change
        self.bind_keys = bind_keys
        self.say = say
        self.source: Optional[str] = None  # the image the layers belong to
        self.axis = 0  # a volume's slicing axis (data axis of the image)

    def get(self, name: str):
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def present(self) -> bool:
        """The preview and labels layers exist (the user may have removed them)."""
        return PREVIEW in self.viewer.layers and LABELS in self.viewer.layers

    def prompts(self, image_layer, k: int):
        return prompts_from_layers(self.get(POINTS), self.get(BOXES), image_layer, k, self.axis)

    def ensure(self, shape, image_layer) -> bool:
        """The prompt, preview and labels layers for this image; True for another image than before.
        Existing layers are reused where they fit: adding a napari layer costs the UI thread several
        times more than giving one new data. Labels committed on another image are never overwritten:
        that layer is kept, hidden, under a new name."""
        layers = self.viewer.layers
        ndim = len(shape)
        kw = {"scale": image_layer.scale[-ndim:], "translate": image_layer.translate[-ndim:]}
        source = image_layer.name
        new_image = source != self.source
        for name in (POINTS, BOXES, PREVIEW):  # a 3D layer given 2D data keeps its 3D scale: napari fails
            if name in layers and layers[name].ndim != ndim:
                layers.remove(name)
        if new_image:
            self.clear_prompts()
        if POINTS not in layers:
            pts = self.viewer.add_points(np.empty((0, ndim)), name=POINTS, size=max(shape) / 80,
                                         canvas_size_limits=POINT_PIXELS,  # visible at any zoom and image size
                                         face_color=COLOURS[POSITIVE], features={"kind": np.array([], dtype=object)},
                                         **kw)
            pts.feature_defaults["kind"] = POSITIVE
            pts.events.data.connect(self.on_change)
            pts.mode = "add"
            self.bind_keys(pts)
        if BOXES not in layers:
            shapes = self.viewer.add_shapes(name=BOXES, ndim=ndim, edge_color="yellow", face_color="transparent",
                                            edge_width=max(shape) / 300, **kw)
            shapes.events.data.connect(self.on_change)
            self.bind_keys(shapes)
        for name in (POINTS, BOXES):
            _place(layers[name], kw)
        metadata = {**image_layer.metadata, "casam_source": source}
        labels = self.get(LABELS)
        if labels is not None:
            mine = labels.metadata.get("casam_source", source) == source and labels.data.shape == tuple(shape)
            if not mine and np.any(labels.data):  # another image's work: keep it, under its image's name
                labels.name = self._free_name(f"{LABELS} [{labels.metadata.get('casam_source', 'previous image')}]")
                labels.visible = False  # it belongs to another image
                self.say(f"the labels committed before are kept in the hidden layer {labels.name}")
            elif labels.ndim != ndim:  # empty, but of another dimensionality: replaced below
                layers.remove(LABELS)
        for name in (PREVIEW, LABELS):
            layer = self.get(name)
            if layer is None:
                extra = {"colormap": preview_colours()} if name == PREVIEW else {}
                self.viewer.add_labels(np.zeros(shape, np.int32), name=name, opacity=0.5 if name == PREVIEW else 0.6,
                                       metadata=metadata, **extra, **kw)
                continue
            if layer.data.shape != tuple(shape) or (name == PREVIEW and np.any(layer.data)):
                layer.data = np.zeros(shape, np.int32)  # (a new data array also starts a new undo history)
            layer.metadata = metadata
            _place(layer, kw)
        order = [layers.index(name) for name in (LABELS, PREVIEW, BOXES, POINTS)]
        if min(order) < layers.index(image_layer) or order != sorted(order):
            for name in (LABELS, PREVIEW, BOXES, POINTS):  # reused layers lay under an image opened since, or a
                layers.move(layers.index(name), len(layers))  # replaced one above the prompts: prompts uppermost
        self.source = source
        if new_image:  # napari keeps the camera while layers remain: frame the new image
            try:
                self.viewer.reset_view(layers=[image_layer])
            except (TypeError, IndexError):  # napari < 0.6 frames every layer; napari 0.9 cannot frame a 2D
                self.viewer.reset_view()  # layer alone while a 3D one is open ("index 2 is out of bounds")
        layers.selection.active = layers[POINTS]
        return new_image

    def _free_name(self, name: str) -> str:
        base, k = name, 2
        while name in self.viewer.layers:
            name, k = f"{base} {k}", k + 1
        return name

    def set_kind(self, positive: bool) -> None:
        """New clicks are positive (or negative)."""
        pts = self.get(POINTS)
        if pts is not None:
            kind = POSITIVE if positive else NEGATIVE
            pts.feature_defaults["kind"] = kind
            pts.selected_data = set()  # napari recolours the selected clicks (and failed on a stale selection)
            pts.current_face_color = COLOURS[kind]

    def colour_points(self) -> None:
        """Each click coloured by its kind."""
        pts = self.get(POINTS)
        if pts is None:
            return
        kinds = list(pts.features["kind"]) if "kind" in pts.features else []
        if len(kinds) == len(pts.data) and len(kinds):
            colours = np.array([rgba(COLOURS.get(k, COLOURS[POSITIVE])) for k in kinds])
            if not np.allclose(np.asarray(pts.face_color), colours):
                pts.face_color = colours

    def clear_prompts(self) -> None:
        """Remove every click and box (without announcing it as a prompt edit)."""
        for name in (POINTS, BOXES):
            layer = self.get(name)
            if layer is not None:
                layer.events.data.disconnect(self.on_change)
                layer.selected_data = set()  # a selection of clicks that are gone broke the next T
                layer.data = np.empty((0, layer.ndim)) if name == POINTS else []
                layer.events.data.connect(self.on_change)

    def clear_preview(self) -> None:
        preview = self.get(PREVIEW)
        if preview is not None:
            preview.data = np.zeros_like(preview.data)

    def show_preview(self, masks: np.ndarray, k: Optional[int]) -> None:
        """The preview shows ``masks`` (B, H, W), object i as value i + 1 (later objects on top), on
        slice ``k`` (along ``self.axis``) of a volume (nothing elsewhere) or on the 2D image (``k`` None)."""
        preview = self.viewer.layers[PREVIEW]
        data = np.zeros_like(preview.data)
        view = data if k is None else plane(data, self.axis, k)
        for i, m in enumerate(np.asarray(masks, bool).reshape((-1,) + view.shape)):
            view[m] = i + 1
        preview.data = data

    def write_label(self, preview: np.ndarray, labels=None, label_id: Optional[int] = None,
                    keep_values: bool = False) -> Tuple[List[int], int]:
        """Write the preview's objects (its values 1, 2, ...) into the labels: each gets ``label_id``
        (a class) or, with None, its own next free id (``keep_values``: its own value, a task's class
        of a zero-click segmentation); one step of the Labels layer's own undo
        history (the dock's Undo and napari's Ctrl+Z are the same history). The preview is cleared.
        Returns (label ids, voxels)."""
        labels = labels if labels is not None else self.viewer.layers[LABELS]
        preview = np.asarray(preview)
        objects = [int(v) for v in np.unique(preview) if v > 0]
        index = np.nonzero(preview)
        table = np.zeros(int(preview.max(initial=0)) + 1, np.int32)  # preview value -> label id
        if keep_values:
            ids = list(objects)
        elif label_id is None:
            first = int(np.asarray(labels.data).max()) + 1
            ids = [first + i for i in range(len(objects))]
        else:
            ids = [int(label_id)] * len(objects)
        table[objects] = ids
        values = table[preview[index]]
        ids = sorted(set(ids))
        labels.data_setitem(index, values)
        self.clear_preview()
        return ids, len(index[0])


def propagation_edit(data: np.ndarray, label: int, result: np.ndarray, fixed: Dict[int, np.ndarray],
                     axis: int = 0) -> Tuple[Tuple[np.ndarray, ...], np.ndarray]:
    """The change that writes a propagation of ``label`` into a labels volume ``data``, as
    (indices, new values) for one ``data_setitem`` (one undo step).

    Slices in ``fixed`` ({slice: mask}: the slice the user just approved) get exactly that mask
    as ``label`` (over anything there, as a commit does). On every other slice ``label`` becomes
    ``result``: where the result is off, the label's old pixels go (a re-propagation replaces
    the last one); where it is on, it paints only background and the label itself, never
    another structure. The user's own annotations are in ``result`` already (propagation keeps
    annotated slices as they are)."""
    data = np.asarray(data)
    new = data.copy()
    mine = data == label
    new[mine & ~result] = 0
    new[result & ((data == 0) | mine)] = label
    for k, m in fixed.items():  # slices along ``axis``
        row = plane(new, axis, k)
        row[row == label] = 0
        row[m] = label
    indices = np.nonzero(new != data)
    return indices, new[indices]


class Annotations:
    """Which slices of a volume the user annotated, per label: the anchors a propagation starts
    from and is constrained by.

    A commit, a propagation's approved start slice, and every brush, fill or eraser edit of the
    watched Labels layer (napari's ``paint`` event) mark a slice: ``"drawn"`` for the label
    painted, ``"edited"`` for a label painted over or erased. A drawn slice whose label has since
    gone (undone) is no anchor; an edited one still is, empty or not: an erased slice says "not
    here". Writes of propagated slices are made ``quiet()`` and mark nothing."""

    def __init__(self) -> None:
        self.slices: Dict[int, Dict[int, str]] = {}
        self.layer = None
        self.axis = 0  # slices are counted along this data axis
        self._quiet = 0

    def watch(self, layer, axis: int = 0) -> None:
        """Record the edits of ``layer``'s slices along ``axis`` from now on (a new layer, a new image or
        another slicing axis: a fresh record)."""
        self.axis = axis
        if self.layer is not None:
            try:
                self.layer.events.paint.disconnect(self.on_paint)
            except (TypeError, ValueError, RuntimeError):
                pass
        self.layer = layer
        self.slices = {}
        if layer is not None:
            layer.events.paint.connect(self.on_paint)

    @contextmanager
    def quiet(self):
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def mark(self, label: int, slices, kind: str = "drawn") -> None:
        record = self.slices.setdefault(int(label), {})
        for k in slices:
            if record.get(int(k)) != "drawn":  # drawn wins: the label is there on purpose
                record[int(k)] = kind

    def on_paint(self, event) -> None:
        if self._quiet or self.layer is None or self.layer.ndim != 3:
            return
        for atom in getattr(event, "value", None) or []:
            if hasattr(atom, "slice_key"):  # napari's masked paint atom: a bounding box and its old values
                key = atom.slice_key[self.axis]
                z = range(key.start or 0, key.stop if key.stop is not None else self.layer.data.shape[self.axis])
                painted = [(int(atom.new_value), z)]
                replaced = [(int(v), z) for v in np.unique(np.asarray(atom.old_values))]
            else:  # (indices, old values, new value or values)
                indices, old_values, new_values = atom
                z = np.asarray(indices[self.axis])
                old_values = np.broadcast_to(np.asarray(old_values), z.shape)
                new_values = np.broadcast_to(np.asarray(new_values), z.shape)
                painted = [(int(v), np.unique(z[new_values == v])) for v in np.unique(new_values)]
                replaced = [(int(v), np.unique(z[(old_values == v) & (new_values != v)])) for v in np.unique(old_values)]
            for value, where in painted:
                if value:
                    self.mark(value, where, "drawn")
            for value, where in replaced:
                if value:
                    self.mark(value, where, "edited")

    def anchors(self, label: int, data: np.ndarray) -> Dict[int, np.ndarray]:
        """{slice: the label's mask there} for the label's annotated slices."""
        out = {}
        for k, kind in sorted(self.slices.get(int(label), {}).items()):
            if 0 <= k < data.shape[self.axis]:
                m = np.asarray(plane(data, self.axis, k)) == label
                if m.any() or kind == "edited":
                    out[k] = m
        return out


def _place(layer, kw) -> None:
    """Give a reused layer the image's scale and translate (only when they differ: each set redraws)."""
    for attr in ("scale", "translate"):
        if not np.allclose(getattr(layer, attr), kw[attr]):
            setattr(layer, attr, kw[attr])
