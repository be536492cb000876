"""The model's own labels, and re-running a region without losing the user's work (Qt-free).

* :func:`snapshot_model_labels` copies a run's ``labels`` into ``model_labels`` (block-wise,
  chunk-aligned) when the instance step writes them: the napari layer paints on ``labels``
  itself, so this pristine copy is what :mod:`.edits` compares against.
* :func:`merge_labels` keeps what the user edited or reviewed and takes everything else from a new
  segmentation; :func:`merge_rerun` does it block by block on a store, and :func:`rerun_job`
  segments a region with new weights and merges it.
* :func:`compare_job` runs two weights on the same region for a side-by-side comparison.

Merge rule: protected pixels (changed by the user, any object containing a changed pixel, reviewed
regions) keep the old labels, background included. A new object sharing at least
``drop_fraction`` of its area with a kept object is the model's guess at an object the user already
settled and is dropped; any other new object keeps its pixels outside the protected area (if at
least ``min_area`` remain). New IDs that collide with a kept ID are replaced by an ID derived from
the object's last pixel, so blocks agree without a global pass.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .progress import JobGenerator, Progress
from .pyramid import CHUNK_KEYS
from .store import LABELS, OutputStore, labels_dtype

MODEL_LABELS = "model_labels"
MERGE_HALO = 128          # context read around each block so objects are judged whole
DROP_FRACTION = 0.2
MIN_AREA = 8


# ----------------------------------------------------------------------------- model labels
def model_labels(store: OutputStore):
    """The store's ``model_labels`` array, or None when the run recorded none."""
    return store.group[MODEL_LABELS] if MODEL_LABELS in store.group else None


def snapshot_model_labels(store: OutputStore, region: tuple[int, int, int, int] | None = None) -> None:
    """Copy ``labels/0`` into ``model_labels`` over ``region`` (default: everything), block by block.

    Call it right after the instance step wrote a block (``region`` = that block), before any
    edit can reach it. The region is grown to whole chunks; one superblock is in memory at a time.
    """
    array = _model_labels_array(store)
    height, width = store.layout.image_shape
    c = store.layout.chunk
    y0, y1, x0, x1 = region or (0, height, 0, width)
    aligned = (y0 // c * c, min(height, -(-y1 // c) * c), x0 // c * c, min(width, -(-x1 // c) * c))
    labels = store.labels()
    for by0, by1, bx0, bx1 in _aligned_blocks(aligned, store.layout.superblock):
        array[by0:by1, bx0:bx1] = np.asarray(labels[by0:by1, bx0:bx1])


def _model_labels_array(store: OutputStore):
    existing = model_labels(store)
    if existing is not None:
        return existing
    layout = store.layout
    array = store.group.create_array(
        MODEL_LABELS, shape=tuple(layout.image_shape), chunks=(layout.chunk, layout.chunk),
        dtype=labels_dtype(layout.image_shape), fill_value=0, chunk_key_encoding=CHUNK_KEYS)
    array.attrs["description"] = ("the model's own instance labels (a copy taken when the instance "
                                  "step wrote them; user edits go to labels/0)")
    return array


def _aligned_blocks(region, block: int):
    y0, y1, x0, x1 = region
    for by in range(y0, y1, block):
        for bx in range(x0, x1, block):
            yield by, min(by + block, y1), bx, min(bx + block, x1)


# ----------------------------------------------------------------------------- merge
def protected_mask(current: np.ndarray, model: np.ndarray, reviewed: np.ndarray | None = None) -> np.ndarray:
    """``(h, w) bool``: pixels a re-run must keep: changed pixels, every current object holding a
    changed pixel (whole), and ``reviewed`` pixels."""
    current, model = np.asarray(current), np.asarray(model)
    changed = current != model
    ids = np.unique(current[changed])
    protect = changed | np.isin(current, ids[ids > 0])
    if reviewed is not None:
        protect |= np.asarray(reviewed, bool)
    return protect


def merge_labels(old: np.ndarray, new: np.ndarray, protect: np.ndarray, origin=(0, 0),
                 width: int | None = None, drop_fraction: float = DROP_FRACTION,
                 min_area: int = MIN_AREA) -> np.ndarray:
    """Old labels where protected, new labels elsewhere (see the module docstring).

    Args:
        old: ``(h, w)`` the user's labels; new: ``(h, w)`` a fresh segmentation of the same pixels.
        protect: ``(h, w) bool`` from :func:`protected_mask`.
        origin: ``(y, x)`` of the arrays in the image (for position-derived replacement IDs).
        width: image width (default the arrays' width).

    Returns:
        ``(h, w)`` merged labels, dtype of ``old``.
    """
    old, new, protect = np.asarray(old), np.asarray(new), np.asarray(protect, bool)
    merged = np.where(protect, old, 0).astype(old.dtype)
    if not new.any():
        return merged
    kept = protect & (old > 0)
    ids, inverse = np.unique(new, return_inverse=True)
    inverse = inverse.reshape(new.shape)
    area = np.bincount(inverse.ravel(), minlength=len(ids))
    on_kept = np.bincount(inverse[kept], minlength=len(ids))
    free = np.bincount(inverse[~protect], minlength=len(ids))
    keep = (ids > 0) & (on_kept < drop_fraction * area) & (free >= min_area)
    kept_ids = set(np.unique(old[kept]).tolist())
    width = width or new.shape[1]
    out_ids = ids.astype(np.int64)
    for k in np.flatnonzero(keep):
        if int(ids[k]) in kept_ids:
            last = np.flatnonzero(((inverse == k) & ~protect).ravel())[-1]
            y, x = divmod(int(last), new.shape[1])
            out_ids[k] = (origin[0] + y) * width + origin[1] + x + 1
    lut = np.where(keep, out_ids, 0)
    place = ~protect & keep[inverse]
    merged[place] = lut[inverse[place]].astype(old.dtype)
    return merged


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_rerun` did."""

    region: tuple[int, int, int, int]
    blocks: int
    protected_pixels: int


def merge_rerun(store: OutputStore, new_labels, region=None, reviewed=None,
                halo: int = MERGE_HALO, new_maps: OutputStore | None = None) -> JobGenerator[MergeResult]:
    """Merge fresh labels into a store's edited labels, block by block; update ``model_labels``.

    Args:
        store: the run the user edited (its ``labels/0`` is written in place).
        new_labels: ``(H, W)`` labels of the new segmentation (e.g. another store's ``labels()``).
        region: ``(y0, y1, x0, x1)`` to replace (grown to whole chunks); default everything.
        reviewed: optional callable ``window -> (h, w) bool`` of reviewed pixels.
        halo: context around each block so objects are judged whole.
        new_maps: the new segmentation's store: its probabilities and maps replace the old ones
            over the region (maps it does not have are left as they were).
    """
    current, model = store.labels(), model_labels(store)
    if model is None:
        raise ValueError(f"{store.path} has no model_labels: edits cannot be told from model output, "
                         "so a re-run would overwrite them; re-run the segmentation into a new output")
    height, width = store.layout.image_shape
    c = store.layout.chunk
    y0, y1, x0, x1 = region or (0, height, 0, width)
    aligned = (y0 // c * c, min(height, -(-y1 // c) * c), x0 // c * c, min(width, -(-x1 // c) * c))
    blocks = list(_aligned_blocks(aligned, store.layout.superblock))
    protected = 0
    for i, (by0, by1, bx0, bx1) in enumerate(blocks):
        wy0, wy1 = max(0, by0 - halo), min(height, by1 + halo)
        wx0, wx1 = max(0, bx0 - halo), min(width, bx1 + halo)
        old = np.asarray(current[wy0:wy1, wx0:wx1])
        mod = np.asarray(model[wy0:wy1, wx0:wx1])
        new = np.asarray(new_labels[wy0:wy1, wx0:wx1]).astype(old.dtype)
        shown = reviewed((wy0, wy1, wx0, wx1)) if reviewed is not None else None
        protect = protected_mask(old, mod, shown)
        merged = merge_labels(old, new, protect, (wy0, wx0), width) if protect.any() else new
        core = (slice(by0 - wy0, by1 - wy0), slice(bx0 - wx0, bx1 - wx0))
        protected += int(protect[core].sum())
        current[by0:by1, bx0:bx1] = merged[core]
        model[by0:by1, bx0:bx1] = new[core]
        store.refresh_pyramid(LABELS, (by0, by1, bx0, bx1))
        if new_maps is not None:
            block = (by0, by1, bx0, bx1)
            store.write_maps(block, {name: new_maps.read_map(name, block) for name in _shared_maps(store, new_maps)})
        yield Progress("merge", i + 1, len(blocks), f"merged block {i + 1}/{len(blocks)}",
                       region=(by0, by1, bx0, bx1))
    return MergeResult(aligned, len(blocks), protected)


def _shared_maps(store: OutputStore, other: OutputStore) -> list[str]:
    """Maps both stores hold with the same channels (e.g. not V-UNet's uncertainty of a run
    without Monte-Carlo samples)."""
    theirs = {m.name: m.channels for m in other.layout.maps}
    return [m.name for m in store.layout.maps if theirs.get(m.name) == m.channels]


# ----------------------------------------------------------------------------- jobs
def _segment_region(source, weights, model_name: str, region, device: str, folder: Path,
                    name: str, mc_samples: int = 0, tta: int = 1, scale: float = 1.0) -> JobGenerator[OutputStore]:
    from .inference import InferenceSettings
    from .pipeline import load_model, run_segmentation

    model, card = load_model(model_name, weights, device)
    settings = InferenceSettings(device=device, region=region, mc_samples=mc_samples, overwrite=True,
                                 prefetch=False, tta=tta, scale=scale)
    result = yield from run_segmentation(source, model, card, folder / f"{name}.zarr", settings)
    del model
    _release_memory()
    return OutputStore.open(result.output, mode="r")


def rerun_job(source, store_path, weights, model_name: str, region=None, reviewed=None,
              device: str = "auto") -> JobGenerator[MergeResult]:
    """Segment ``region`` with ``weights`` and merge it into the edited run at ``store_path``.

    Edited and reviewed objects are kept; unreviewed areas take the new labels. Yields the
    segmentation's progress, then ``"merge"`` per block; the temporary output is removed.
    """
    store = OutputStore.open(store_path)
    if model_labels(store) is None:
        raise ValueError(f"{store_path} has no model_labels, so edits cannot be protected; "
                         "re-segment into a new output instead")
    folder = Path(tempfile.mkdtemp(prefix="medseg-rerun-"))
    run = store.attrs.get("run") or {}
    try:
        fresh = yield from _segment_region(source, weights, model_name, region, device, folder, "rerun",
                                           mc_samples=int(run.get("mc_samples") or 0),
                                           tta=int(run.get("tta") or 1),  # as the edited run
                                           scale=float(run.get("scale") or 1.0))
        result = yield from merge_rerun(store, fresh.labels(), region, reviewed, new_maps=fresh)
        new_run = fresh.attrs.get("run") or {}
        reruns = list(store.attrs.get("reruns") or []) + [{
            key: new_run.get(key) for key in ("weights_path", "weights_version", "weights_sha256", "date")}
            | {"region": list(result.region), "protected_pixels": result.protected_pixels}]
        store.update_attrs(reruns=reruns)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return result


@dataclass
class Comparison:
    """Two weights' labels over one region, with their differences.

    Attributes:
        region: ``(y0, y1, x0, x1)`` compared.
        parent, child: ``(h, w)`` labels of the region.
        differences: see :func:`label_differences`.
    """

    region: tuple[int, int, int, int]
    parent: np.ndarray
    child: np.ndarray
    differences: dict


def compare_job(source, parent, child, model_name: str, region, device: str = "auto"
                ) -> JobGenerator[Comparison]:
    """Run ``parent`` and ``child`` weights on ``region`` (stage names ``parent``/``child``)."""
    folder = Path(tempfile.mkdtemp(prefix="medseg-compare-"))
    labels = {}
    try:
        for name, weights in (("parent", parent), ("child", child)):
            job = _segment_region(source, weights, model_name, region, device, folder, name)
            store = yield from _renamed(job, name)
            y0, y1, x0, x1 = region
            labels[name] = np.asarray(store.labels()[y0:y1, x0:x1])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return Comparison(tuple(region), labels["parent"], labels["child"],
                      label_differences(labels["parent"], labels["child"]))


def _renamed(job, stage: str):
    while True:
        try:
            record = next(job)
        except StopIteration as stop:
            return stop.value
        yield Progress(stage, record.done, record.total, f"{stage}: {record.message}", record.metrics)


def label_differences(a: np.ndarray, b: np.ndarray, iou: float = 0.5) -> dict:
    """Objects of ``a`` and ``b`` without a partner at IoU > ``iou``, and differing pixels.

    Returns:
        ``{"objects_a", "objects_b", "only_a", "only_b", "different_objects", "changed_pixels"}``.
    """
    a, b = np.asarray(a), np.asarray(b)
    ids_a, area_a = np.unique(a[a > 0], return_counts=True)
    ids_b, area_b = np.unique(b[b > 0], return_counts=True)
    both = (a > 0) & (b > 0)
    matched_a, matched_b = set(), set()
    if both.any():
        pairs, inter = np.unique(np.stack([a[both], b[both]]), axis=1, return_counts=True)
        sizes_a = dict(zip(ids_a.tolist(), area_a.tolist()))
        sizes_b = dict(zip(ids_b.tolist(), area_b.tolist()))
        for (i, j), n in zip(pairs.T.tolist(), inter.tolist()):
            if n / (sizes_a[i] + sizes_b[j] - n) > iou:
                matched_a.add(i)
                matched_b.add(j)
    only_a, only_b = len(ids_a) - len(matched_a), len(ids_b) - len(matched_b)
    return {"objects_a": int(len(ids_a)), "objects_b": int(len(ids_b)), "only_a": only_a,
            "only_b": only_b, "different_objects": only_a + only_b,
            "changed_pixels": int(np.count_nonzero((a > 0) != (b > 0)))}


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
