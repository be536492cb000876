"""What the user changed: the live labels compared with the model's own labels, chunk by chunk.

A run's labels layer is backed by the same zarr array the model wrote, so every brush stroke
overwrites the model's output; a pristine copy (``model_labels``, see
:func:`napari_medseg.core.rerun.snapshot_model_labels`) is what edits are measured against.

Detection (:func:`detect_edits`) never reads a whole image: chunks are compared one at a time,
changed chunks are grouped into clusters on the chunk grid, and each cluster is read once, in a
window grown until the objects it touches are whole. In that window every current object and
every model object touched by a changed pixel is matched by overlap: an edge joins a model object
``m`` and a current object ``c`` when they share at least half of the smaller one. Each connected
group of that graph is one :class:`Edit`:

====================  =================  =====================================================
model objects          current objects    kind
====================  =================  =====================================================
0                      1                  ``added``
1                      0                  ``deleted``
1                      1                  ``redrawn`` (``relabelled`` when only the ID changed)
1                      ≥ 2                ``split``
≥ 2                    1                  ``merged``
≥ 2                    ≥ 2                ``redrawn`` (several objects redrawn together)
====================  =================  =====================================================

Support (:func:`support_mask`): the pixels whose truth is known, i.e. every pixel of the objects
involved in an edit (before and after), every changed pixel, a thin ring of background around
them that the user left as background (both labels 0), and everything inside reviewed
rectangles. Everything else is *unknown*, never background: fine-tuning masks it out of the loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import polygon2mask

from .boxes import Box, intersect_boxes, mask_box, offset_box

EDIT_KINDS = ("added", "deleted", "split", "merged", "redrawn", "relabelled")
DEFAULT_CHUNK = 512
MATCH_FRACTION = 0.5     # overlap ≥ this share of the smaller object joins two objects
GROW_STEP = 64           # pixels added on a side where an involved object touches the window
MAX_WINDOW = 4096        # a cluster's window never grows beyond this edge (objects are smaller)
SUPPORT_RING = 4         # pixels of agreed background around edited objects counted as truth


class EditError(ValueError):
    """Edits cannot be used as given (no edits, shape mismatch, no model labels...)."""


@dataclass(frozen=True)
class Edit:
    """One group of objects the user changed.

    Attributes:
        kind: one of :data:`EDIT_KINDS`.
        box: ``(y0, y1, x0, x1)`` bounding box of every pixel of the objects involved.
        model_ids: IDs of the model's objects involved.
        current_ids: IDs of the user's (current) objects involved.
        changed_pixels: pixels whose label differs inside this group.
    """

    kind: str
    box: Box
    model_ids: tuple[int, ...]
    current_ids: tuple[int, ...]
    changed_pixels: int = 0


@dataclass(frozen=True)
class Reviewed:
    """A region the user reviewed completely (a rectangle or polygon of a Shapes layer).

    Attributes:
        vertices: ``(N, 2)`` float ``(y, x)`` polygon in the labels' pixel coordinates.
        box: its bounding box, clipped to the image.
    """

    vertices: np.ndarray = field(compare=False)
    box: Box = (0, 0, 0, 0)

    def mask(self, window: Box) -> np.ndarray:
        """``(h, w) bool``: pixels of ``window`` inside the polygon (pixel centres)."""
        y0, y1, x0, x1 = window
        local = self.vertices - np.array([y0, x0], dtype=float)
        if _is_axis_rectangle(self.vertices):
            out = np.zeros((y1 - y0, x1 - x0), bool)
            by0, by1, bx0, bx1 = intersect_boxes(self.box, window) or (0, 0, 0, 0)
            out[by0 - y0:by1 - y0, bx0 - x0:bx1 - x0] = True
            return out
        return polygon2mask((y1 - y0, x1 - x0), local)


@dataclass(frozen=True)
class EditSet:
    """Everything known about the user's corrections of one labels layer.

    Attributes:
        shape: ``(H, W)`` of the labels.
        edits: the edited object groups.
        reviewed: reviewed regions (complete ground truth, background included).
        changed_pixels: pixels whose label differs from the model's.
        chunks_scanned: chunks compared.
    """

    shape: tuple[int, int]
    edits: tuple[Edit, ...] = ()
    reviewed: tuple[Reviewed, ...] = ()
    changed_pixels: int = 0
    chunks_scanned: int = 0

    def counts(self) -> dict[str, int]:
        """Number of edits of each kind (every kind listed), plus ``reviewed`` regions."""
        counts = {kind: 0 for kind in EDIT_KINDS}
        for edit in self.edits:
            counts[edit.kind] += 1
        counts["reviewed"] = len(self.reviewed)
        return counts

    @property
    def empty(self) -> bool:
        """No edit that changes a target, and no reviewed region."""
        return not self.reviewed and all(e.kind == "relabelled" for e in self.edits)

    def describe(self) -> str:
        """One line for users, e.g. ``"3 edits (2 redrawn, 1 added), 1 reviewed region"``."""
        counts = {k: v for k, v in self.counts().items() if v and k != "reviewed"}
        parts = []
        if counts:
            total = sum(counts.values())
            detail = ", ".join(f"{v} {k}" for k, v in counts.items())
            parts.append(f"{total} edit{'s' if total != 1 else ''} ({detail})")
        if self.reviewed:
            parts.append(f"{len(self.reviewed)} reviewed region{'s' if len(self.reviewed) != 1 else ''}")
        return ", ".join(parts) or "no edits"

    def to_dict(self) -> dict:
        """JSON summary for a weights card (counts and boxes; no pixels)."""
        return {"counts": self.counts(), "changed_pixels": self.changed_pixels,
                "edits": [{"kind": e.kind, "box": list(e.box), "changed_pixels": e.changed_pixels}
                          for e in self.edits],
                "reviewed": [list(r.box) for r in self.reviewed]}


# ----------------------------------------------------------------------------- detection
def detect_edits(current, model, reviewed=(), chunk: int | None = None, cells=None) -> EditSet:
    """Find the user's edits of a labels array, chunk by chunk.

    Args:
        current: ``(H, W)`` integer labels as the user left them (numpy, zarr, any array that
            slices to numpy).
        model: ``(H, W)`` the model's own labels of the same run (``model_labels`` of the store).
        reviewed: reviewed regions: :class:`Reviewed` objects or ``(N, 2)`` ``(y, x)`` vertex
            arrays (a Shapes layer's ``data`` in the labels' pixel coordinates).
        chunk: chunk edge for comparing; default the zarr chunks of ``current`` (or 512).
        cells: optional ``(cy, cx)`` chunk indices known to hold every edit (e.g. the chunks a
            widget recorded brush strokes in); default: compare every chunk.

    Returns:
        The :class:`EditSet` (it may be empty: check :attr:`EditSet.empty`).

    Raises:
        EditError: shapes differ, labels are not 2D integers, or no model labels were given.
    """
    if model is None:
        raise EditError("this run has no recorded model labels to compare the edits with; re-run "
                        "the segmentation (newer runs keep a copy of the model's labels) or give "
                        "a reviewed region, which counts as complete ground truth")
    shape = check_labels_pair(current, model)
    chunk = chunk or _chunk_of(current)
    changed, scanned = changed_cells(current, model, chunk, cells)
    edits: list[Edit] = []
    total = 0
    for cluster in _clusters(changed):
        found, count = _edits_in_cluster(current, model, cluster, chunk, shape)
        edits += found
        total += count
    regions = tuple(as_reviewed(r, shape) for r in reviewed)
    edits.sort(key=lambda e: (e.box[0], e.box[2]))
    return EditSet(shape, tuple(edits), tuple(r for r in regions if r is not None), total, scanned)


def check_labels_pair(current, model) -> tuple[int, int]:
    """The common ``(H, W)`` of two label arrays, or an :class:`EditError` saying what is wrong."""
    for name, array in (("labels", current), ("model labels", model)):
        if len(array.shape) != 2:
            raise EditError(f"{name} must be 2D (H, W); got shape {tuple(array.shape)}")
        if np.dtype(array.dtype).kind not in "ui":
            raise EditError(f"{name} must hold integer instance IDs, not {np.dtype(array.dtype)}")
    if tuple(current.shape) != tuple(model.shape):
        raise EditError(f"the labels ({current.shape[0]}x{current.shape[1]}) do not have the shape of "
                        f"the model's labels ({model.shape[0]}x{model.shape[1]}): they belong to "
                        "another image or run; pick the labels layer of this run")
    return int(current.shape[0]), int(current.shape[1])


def changed_cells(current, model, chunk: int, cells=None) -> tuple[dict, int]:
    """``({(cy, cx): changed-pixel count}, chunks compared)``; one chunk in memory at a time."""
    height, width = current.shape
    if cells is None:
        cells = [(cy, cx) for cy in range(-(-height // chunk)) for cx in range(-(-width // chunk))]
    changed, scanned = {}, 0
    for cy, cx in sorted({(int(a), int(b)) for a, b in cells}):
        ys = slice(cy * chunk, min(height, (cy + 1) * chunk))
        xs = slice(cx * chunk, min(width, (cx + 1) * chunk))
        if ys.start >= height or xs.start >= width:
            continue
        scanned += 1
        count = int(np.count_nonzero(np.asarray(current[ys, xs]) != np.asarray(model[ys, xs])))
        if count:
            changed[(cy, cx)] = count
    return changed, scanned


def _chunk_of(array) -> int:
    chunks = getattr(array, "chunks", None)
    if isinstance(chunks, tuple) and len(chunks) == 2 and all(isinstance(c, int) for c in chunks):
        return int(max(chunks))
    return DEFAULT_CHUNK


def _clusters(changed: dict) -> list[list[tuple[int, int]]]:
    """8-connected groups of changed chunk cells."""
    if not changed:
        return []
    cells = np.array(sorted(changed))
    grid = np.zeros(tuple(cells.max(axis=0) + 1), bool)
    grid[cells[:, 0], cells[:, 1]] = True
    labelled, n = ndi.label(grid, structure=np.ones((3, 3), bool))
    return [[tuple(c) for c in np.argwhere(labelled == k)] for k in range(1, n + 1)]


def _edits_in_cluster(current, model, cluster, chunk: int, shape) -> tuple[list[Edit], int]:
    """Classify the changed objects of one cluster of chunks (see the module docstring)."""
    cells = np.array(cluster)
    window = (int(cells[:, 0].min()) * chunk, min(shape[0], int(cells[:, 0].max() + 1) * chunk),
              int(cells[:, 1].min()) * chunk, min(shape[1], int(cells[:, 1].max() + 1) * chunk))
    cur, mod = _read_pair(current, model, window)
    changed = cur != mod
    box = mask_box(changed)
    window = offset_box(box, window)      # start from the changed pixels' box, grow from there
    for _ in range(MAX_WINDOW // GROW_STEP):
        cur, mod = _read_pair(current, model, window)
        changed = cur != mod
        involved = _involved(cur, mod, changed)
        grown = _grow(window, offset_box(mask_box(involved), window), shape)
        if grown == window:
            break
        window = grown
    graph = _match(cur, mod, changed)
    edits = [_classify(group, cur, mod, changed, window) for group in graph]
    return edits, int(np.count_nonzero(changed))


def _read_pair(current, model, window: Box) -> tuple[np.ndarray, np.ndarray]:
    y0, y1, x0, x1 = window
    return (np.asarray(current[y0:y1, x0:x1]).astype(np.int64, copy=False),
            np.asarray(model[y0:y1, x0:x1]).astype(np.int64, copy=False))


def _involved(cur: np.ndarray, mod: np.ndarray, changed: np.ndarray) -> np.ndarray:
    """Pixels of every object touched by a change, and of every object overlapping those."""
    cur_ids = np.unique(cur[changed])
    mod_ids = np.unique(mod[changed])
    cur_ids, mod_ids = cur_ids[cur_ids > 0], mod_ids[mod_ids > 0]
    first = np.isin(cur, cur_ids) | np.isin(mod, mod_ids)
    # partners: objects of the other labelling sharing pixels with those (e.g. the unchanged half
    # of a merge), so that matching sees whole objects on both sides
    more_mod = np.unique(mod[np.isin(cur, cur_ids)])
    more_cur = np.unique(cur[np.isin(mod, mod_ids)])
    return first | np.isin(mod, more_mod[more_mod > 0]) | np.isin(cur, more_cur[more_cur > 0])


def _grow(window: Box, box: Box | None, shape) -> Box:
    """Widen ``window`` on every side where ``box`` touches it (and the image goes on)."""
    if box is None:
        return window
    y0, y1, x0, x1 = window
    by0, by1, bx0, bx1 = box
    if by0 <= y0 and y0 > 0:
        y0 = max(0, y0 - GROW_STEP)
    if by1 >= y1 and y1 < shape[0]:
        y1 = min(shape[0], y1 + GROW_STEP)
    if bx0 <= x0 and x0 > 0:
        x0 = max(0, x0 - GROW_STEP)
    if bx1 >= x1 and x1 < shape[1]:
        x1 = min(shape[1], x1 + GROW_STEP)
    if y1 - y0 > MAX_WINDOW or x1 - x0 > MAX_WINDOW:
        return window
    return (y0, y1, x0, x1)


def _match(cur: np.ndarray, mod: np.ndarray, changed: np.ndarray) -> list[tuple[set, set]]:
    """Connected groups ``(model ids, current ids)`` of the overlap graph of changed objects."""
    cur_ids = {int(i) for i in np.unique(cur[changed]) if i}
    mod_ids = {int(i) for i in np.unique(mod[changed]) if i}
    area_cur = dict(zip(*np.unique(cur[cur > 0], return_counts=True)))
    area_mod = dict(zip(*np.unique(mod[mod > 0], return_counts=True)))
    both = (cur > 0) & (mod > 0)
    pairs, counts = np.unique(np.stack([mod[both], cur[both]]), axis=1, return_counts=True) \
        if both.any() else (np.zeros((2, 0), np.int64), np.zeros(0, np.int64))
    edges = {}
    for (m, c), n in zip(pairs.T.tolist(), counts.tolist()):
        if (m in mod_ids or c in cur_ids) and n >= MATCH_FRACTION * min(area_mod[m], area_cur[c]):
            edges.setdefault(("m", m), set()).add(("c", c))
            edges.setdefault(("c", c), set()).add(("m", m))
    nodes = [("m", m) for m in sorted(mod_ids)] + [("c", c) for c in sorted(cur_ids)]
    seen, groups = set(), []
    for node in nodes:
        if node in seen:
            continue
        stack, members = [node], set()
        while stack:
            n = stack.pop()
            if n in members:
                continue
            members.add(n)
            stack.extend(edges.get(n, ()))
        seen |= members
        groups.append(({i for k, i in members if k == "m"}, {i for k, i in members if k == "c"}))
    return groups


def _classify(group: tuple[set, set], cur, mod, changed, window: Box) -> Edit:
    model_ids, current_ids = group
    pixels = np.isin(mod, list(model_ids)) | np.isin(cur, list(current_ids))
    n_mod, n_cur = len(model_ids), len(current_ids)
    if n_mod == 0:
        kind = "added"
    elif n_cur == 0:
        kind = "deleted"
    elif n_mod == 1 and n_cur == 1:
        same = np.array_equal(mod == next(iter(model_ids)), cur == next(iter(current_ids)))
        kind = "relabelled" if same else "redrawn"
    elif n_mod == 1:
        kind = "split"
    elif n_cur == 1:
        kind = "merged"
    else:
        kind = "redrawn"
    return Edit(kind, offset_box(mask_box(pixels), window), tuple(sorted(model_ids)),
                tuple(sorted(current_ids)), int(np.count_nonzero(changed & pixels)))


# ----------------------------------------------------------------------------- support
def support_mask(current: np.ndarray, model: np.ndarray, edit_set: EditSet, window: Box,
                 ring: int = SUPPORT_RING) -> np.ndarray:
    """``(h, w) bool``: pixels of ``window`` whose truth the user's edits establish.

    Args:
        current, model: the two labellings read over ``window`` (``(h, w)`` integers).
        edit_set: from :func:`detect_edits`.
        window: ``(y0, y1, x0, x1)`` of the arrays in level-0 pixels.
        ring: width of the agreed-background ring counted around edited objects.
    """
    current, model = np.asarray(current), np.asarray(model)
    support = current != model
    for edit in edit_set.edits:
        if intersect_boxes(edit.box, window) is None:
            continue
        support |= np.isin(current, edit.current_ids) | np.isin(model, edit.model_ids)
    if ring and support.any():
        near = ndi.binary_dilation(support, np.ones((3, 3), bool), iterations=ring)
        support |= near & (current == 0) & (model == 0)
    for region in edit_set.reviewed:
        if intersect_boxes(region.box, window) is not None:
            support |= region.mask(window)
    return support


def as_reviewed(region, shape: tuple[int, int]) -> Reviewed | None:
    """A :class:`Reviewed` region from a Shapes layer entry (``(N, 2+)`` vertices, last two axes
    ``(y, x)``), clipped to the image; None when it lies outside the image or has no area."""
    if isinstance(region, Reviewed):
        return region if intersect_boxes(region.box, (0, shape[0], 0, shape[1])) else None
    vertices = np.asarray(region, dtype=float)
    if vertices.ndim != 2 or vertices.shape[1] < 2 or len(vertices) < 3:
        raise EditError(f"a reviewed region needs at least 3 (y, x) vertices; got shape {vertices.shape}")
    vertices = vertices[:, -2:]
    box = (int(np.floor(vertices[:, 0].min() + 0.5)), int(np.floor(vertices[:, 0].max() + 0.5)),
           int(np.floor(vertices[:, 1].min() + 0.5)), int(np.floor(vertices[:, 1].max() + 0.5)))
    clipped = intersect_boxes(box, (0, shape[0], 0, shape[1]))
    return Reviewed(vertices, clipped) if clipped else None


def _is_axis_rectangle(vertices: np.ndarray) -> bool:
    if len(vertices) != 4:
        return False
    ys, xs = np.unique(np.round(vertices[:, 0], 6)), np.unique(np.round(vertices[:, 1], 6))
    return len(ys) == 2 and len(xs) == 2
