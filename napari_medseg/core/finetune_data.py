"""Training data from the live layers: windows around edits and inside reviewed regions.

Each edit (:mod:`.edits`) becomes a window: its objects' bounding box, ``context`` pixels of image
around it, grown to at least ``crop · 1.25`` (the largest region the scale augmentation cuts) and
kept inside the image. Reviewed regions are tiled into crop-sized windows. For every window the
image is read and normalised exactly as tiled inference does (``(x - low) / (high - low)`` with the
run's intensity range), the user's instance labels become three-class targets
(:func:`.targets.instances_to_classes`), and the support mask (:func:`.edits.support_mask`) says
which pixels are supervised: pixels outside it are masked out of the loss, not called background.
A few whole windows (an edit, or a tile of a reviewed region) are held back to stop early;
fewer than five windows (e.g. all edits inside one crop) leave none, and the budget alone stops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .augment import TrainItem
from .edits import Box, EditError, EditSet, as_reviewed, detect_edits, support_mask
from .io import open_image
from .normalize import Normalization, apply_range, to_model_channels
from .resolution import model_size, resample
from .targets import instances_to_classes

SCALE_MARGIN = 1.25      # the augmentation cuts regions up to crop / 0.8 before resizing
MIN_HOLDOUT_WINDOWS = 5  # fewer windows: train on all, stop on the budget only


@dataclass
class EditData:
    """In-memory training data made from a user's corrections.

    Attributes:
        items: training windows (normalised image, class targets, support mask).
        holdout: windows held back for early stopping (may be empty).
        windows: ``(y0, y1, x0, x1)`` of ``items`` then ``holdout``.
        edits: what was detected.
        supervised_pixels: support pixels over all windows.
        normalization: the intensity mapping used, as a dict.
    """

    items: list[TrainItem]
    holdout: list[TrainItem]
    windows: list[Box]
    edits: EditSet
    supervised_pixels: int
    normalization: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-friendly description for the weights card."""
        return {"edits": self.edits.to_dict(), "windows": len(self.items),
                "holdout_windows": len(self.holdout), "supervised_pixels": self.supervised_pixels,
                "boxes": [list(w) for w in self.windows], "normalization": self.normalization}


def build_edit_data(image, labels, model_labels=None, *, in_channels: int, crop: int = 256,
                    reviewed=(), support=None, normalization: Normalization | None = None,
                    card: dict | None = None, context: int = 32, ring: int = 4,
                    boundary_width: int = 1, holdout_fraction: float = 0.2, seed: int = 0,
                    cells=None, scale: float = 1.0) -> EditData:
    """Detect the edits and cut training windows around them.

    Args:
        image: the image the labels belong to (path, array ``(H, W)``/``(H, W, C)``/``(C, H, W)``,
            zarr, or :class:`~napari_medseg.core.io.ImageSource`).
        labels: ``(H, W)`` the user's corrected labels (zarr or numpy).
        model_labels: ``(H, W)`` the model's own labels of the same run, or None when ``support``
            or ``reviewed`` alone say what is ground truth.
        in_channels: channels the network takes.
        crop: training crop edge.
        reviewed: reviewed regions (vertex arrays or :class:`~.edits.Reviewed`).
        support: optional ``(H, W)`` mask of pixels known to be correct (e.g. the CLI's
            ``--support``), added to the support of the edits.
        normalization: intensity mapping (default: the run's, else as inference resolves it).
        card: weights card (for the normalisation percentiles when none is given).
        context, ring, boundary_width: see the module docstring and :func:`.edits.support_mask`.
        holdout_fraction: share of windows held back (when there are enough).
        cells: chunk indices holding every edit (optional speed-up, see :func:`.edits.detect_edits`).
        scale: model pixels per image pixel of the run (:func:`run_scale`): windows are resampled
            to the weights' own pixel size, as inference resampled its tiles (``crop`` and
            ``context`` are on the model's grid).

    Raises:
        EditError: nothing to learn from, or arrays that do not belong together.
    """
    source = open_image(image)
    shape = tuple(int(n) for n in labels.shape)
    if tuple(source.shape) != shape:
        raise EditError(f"the labels ({shape[0]}x{shape[1]}) do not belong to this image "
                        f"({source.shape[0]}x{source.shape[1]}): pick the labels layer of this image")
    if support is not None and tuple(support.shape) != shape:
        raise EditError(f"the support mask {tuple(support.shape)} does not match the labels {shape}")
    if model_labels is not None:
        edit_set = detect_edits(labels, model_labels, reviewed, cells=cells)
    else:
        if support is None and not len(reviewed):
            detect_edits(labels, None)    # raises the "no model labels" error
        regions = tuple(r for r in (as_reviewed(v, shape) for v in reviewed) if r is not None)
        edit_set = EditSet(shape, (), regions)
    if edit_set.empty and support is None:
        raise EditError("no edits yet: correct some objects in the labels layer (paint, erase, "
                        "split, merge) or draw a rectangle around a region you reviewed, then "
                        "fine-tune again")
    norm, norm_info = _normalization(source, in_channels, card, normalization)
    windows = plan_windows(edit_set, shape, max(8, round(crop / scale)), round(context / scale), support)
    items, kept, supervised = [], [], 0
    for window in windows:
        item = _window_item(source, labels, model_labels, edit_set, support, window, in_channels,
                            norm, ring, boundary_width, scale)
        if item is not None:
            items.append(item)
            kept.append(window)
            supervised += int(item.valid.sum())
    if not items:
        raise EditError("the edits leave no supervised pixel to learn from; correct an object or "
                        "review a region inside the image")
    train, holdout = _split(list(zip(items, kept)), holdout_fraction, seed)
    return EditData([i for i, _ in train], [i for i, _ in holdout],
                    [w for _, w in train] + [w for _, w in holdout], edit_set, supervised, norm_info)


def plan_windows(edit_set: EditSet, shape, crop: int, context: int, support=None) -> list[Box]:
    """Training windows (see the module docstring); windows inside another are dropped."""
    minimum = int(math.ceil(crop * SCALE_MARGIN))
    boxes = [e.box for e in edit_set.edits if e.kind != "relabelled"]
    for region in edit_set.reviewed:
        boxes += _tiles(region.box, crop)
    if support is not None:
        boxes += _support_tiles(support, crop)
    windows = [_window_around(b, minimum, context, shape) for b in boxes]
    unique = []
    for w in sorted(set(windows), key=lambda b: -(b[1] - b[0]) * (b[3] - b[2])):
        if not any(_contains(u, w) for u in unique):
            unique.append(w)
    return sorted(unique)


def _window_around(box: Box, minimum: int, context: int, shape) -> Box:
    out = []
    for (lo, hi), size in zip(((box[0], box[1]), (box[2], box[3])), shape):
        lo, hi = lo - context, hi + context
        short = minimum - (hi - lo)
        if short > 0:
            lo, hi = lo - short // 2, hi + short - short // 2
        if lo < 0:
            lo, hi = 0, hi - lo
        if hi > size:
            lo, hi = max(0, lo - (hi - size)), size
        out += [lo, hi]
    return tuple(int(v) for v in out)


def _tiles(box: Box, crop: int) -> list[Box]:
    y0, y1, x0, x1 = box
    return [(y, min(y + crop, y1), x, min(x + crop, x1))
            for y in range(y0, y1, crop) for x in range(x0, x1, crop)]


def _support_tiles(support, crop: int) -> list[Box]:
    """Crop-sized tiles of a full-size support mask holding any supported pixel."""
    height, width = support.shape
    found = []
    for y in range(0, height, crop):
        for x in range(0, width, crop):
            if np.asarray(support[y:y + crop, x:x + crop]).any():
                found.append((y, min(y + crop, height), x, min(x + crop, width)))
    return found


def _contains(outer: Box, inner: Box) -> bool:
    return outer[0] <= inner[0] and outer[1] >= inner[1] and outer[2] <= inner[2] and outer[3] >= inner[3]


def _window_item(source, labels, model_labels, edit_set, support, window, in_channels, norm,
                 ring, boundary_width, scale: float = 1.0) -> TrainItem | None:
    y0, y1, x0, x1 = window
    current = np.asarray(labels[y0:y1, x0:x1]).astype(np.int64)
    valid = np.zeros(current.shape, bool)
    if model_labels is not None:
        model = np.asarray(model_labels[y0:y1, x0:x1]).astype(np.int64)
        valid |= support_mask(current, model, edit_set, window, ring)
    else:
        for region in edit_set.reviewed:
            valid |= region.mask(window)
    if support is not None:
        valid |= np.asarray(support[y0:y1, x0:x1]) > 0
    if not valid.any():
        return None
    raw = source.read_region(y0, y1, x0, x1)
    x = torch.from_numpy(apply_range(to_model_channels(raw, in_channels), norm))
    if scale != 1:   # to the model's grid: the image bilinear, labels and support nearest
        size = model_size(current.shape, scale)
        x = resample(x[None], size)[0]
        current, valid = (_nearest(a, size) for a in (current, valid))
    classes = instances_to_classes(current, boundary_width)
    return TrainItem(x.half(), torch.from_numpy(classes),
                     torch.from_numpy(valid.astype(np.uint8)), 1.0, current.astype(np.int32))


def _nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``array`` resampled to ``size`` by taking the pixel under each new pixel's centre."""
    rows = np.minimum(((np.arange(size[0]) + 0.5) * array.shape[0] / size[0]).astype(int), array.shape[0] - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * array.shape[1] / size[1]).astype(int), array.shape[1] - 1)
    return array[rows][:, cols]


def run_scale(run: dict) -> float:
    """Model pixels per image pixel a stored run resampled its tiles by (1 when it did not)."""
    return float((run or {}).get("scale") or 1.0)


def _normalization(source, in_channels, card, given) -> tuple[Normalization, dict]:
    if given is not None:
        return given, given.to_dict()
    from .inference_plan import resolve_normalization

    norm, info, _ = resolve_normalization(source, in_channels, card or {}, None)
    return norm, info


def run_normalization(run: dict) -> Normalization | None:
    """The intensity mapping a stored run used (its ``normalization`` provenance), if recorded."""
    info = (run or {}).get("normalization") or {}
    if "low" in info and "high" in info:
        return Normalization(float(info["low"]), float(info["high"]))
    return None


def _split(pairs: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold back ``fraction`` of the windows (at least one) when there are enough of them."""
    if len(pairs) < MIN_HOLDOUT_WINDOWS or fraction <= 0:
        return pairs, []
    order = np.random.default_rng(seed).permutation(len(pairs))
    n = max(1, int(round(fraction * len(pairs))))
    held = set(order[:n].tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def weight_edits(edit_valid: torch.Tensor, replay_valid: torch.Tensor, share: float) -> torch.Tensor:
    """The edit crops' ``(b, H, W)`` float support mask scaled so that they carry ``share`` of the
    batch's loss weight next to the replay crops' ``(r, H, W)`` mask (the losses divide by the
    mask's sum, so the mask is a per-pixel weight); unchanged when ``share`` is 0 or a mask is empty.
    """
    edit, replay = float(edit_valid.sum()), float(replay_valid.sum())
    if not share or edit <= 0 or replay <= 0:
        return edit_valid
    return edit_valid * (share / (1 - share) * replay / edit)
