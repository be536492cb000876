"""What the "Fine-tune on edits" widget reads from napari layers (Qt-free, like segment_job.py).

A labels layer made by a MedSeg run (:mod:`napari_medseg.layer_data`) leads to its output store,
the image layer it was made from, the architecture, and the weights the run used (recorded in the
run, else found by the run's sha256 among the bundled weights, the user's recent weight files and
the fine-tuned versions). A Shapes layer gives reviewed regions, converted to the labels' pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .core import versions
from .core.edits import as_reviewed
from .core.resources import bundled_weights
from .core.store import OutputStore
from .layer_data import medseg_info
from .review import view_region
from .widget_state import load_state

MAX_VIEW_EDGE = 2048   # "compare" and "re-run on view" use at most this much of the view


class FinetuneError(ValueError):
    """The layers cannot be used as chosen; the message says what to do."""


@dataclass
class RunContext:
    """What one labels layer of a MedSeg run gives access to."""

    layer: object
    store: OutputStore
    architecture: str
    image_layer: object
    parent: Path | None


def run_context(viewer, labels_name: str) -> RunContext:
    """The run behind the labels layer ``labels_name`` (clear errors when something is missing)."""
    if not labels_name or labels_name not in viewer.layers:
        raise FinetuneError("no labels layer of a MedSeg run is open: segment an image first")
    layer = viewer.layers[labels_name]
    info = medseg_info(layer) or {}
    if info.get("map") != "labels" or not info.get("output") or not Path(info["output"]).exists():
        raise FinetuneError(f"{labels_name!r} is not the labels layer of a MedSeg run on disk")
    store = OutputStore.open(info["output"])
    run = store.attrs.get("run", {})
    architecture = run.get("model") or info.get("model")
    image = info.get("image")
    if image not in viewer.layers:
        raise FinetuneError(f"the image {image!r} these labels were made from is not open; "
                            "open it again (with the same name) to fine-tune")
    return RunContext(layer, store, architecture, viewer.layers[image], parent_weights(run, architecture))


def parent_weights(run: dict, architecture: str) -> Path | None:
    """The weights stem a run was made with, or None when it cannot be found."""
    recorded = run.get("weights_path")
    if recorded and Path(f"{recorded}.safetensors").exists():
        return Path(recorded)
    candidates = bundled_weights(architecture) + list(load_state().recent_weights)
    return versions.find_by_sha(run.get("weights_sha256") or "", architecture,
                                candidates=[c for c in candidates if c])


def reviewed_regions(shapes, labels) -> list[np.ndarray]:
    """Each shape of a Shapes layer as ``(N, 2)`` ``(y, x)`` vertices in ``labels``' pixels."""
    if shapes is None:
        return []
    regions = []
    for vertices in shapes.data:
        world = np.asarray(vertices)[:, -2:] * shapes.scale[-2:] + shapes.translate[-2:]
        regions.append((world - labels.translate[-2:]) / labels.scale[-2:])
    return regions


def reviewed_mask(shape: tuple[int, int], regions):
    """``window -> (h, w) bool`` of reviewed pixels (for :func:`.core.rerun.rerun_job`), or None."""
    kept = [r for r in (as_reviewed(v, shape) for v in regions) if r is not None]
    if not kept:
        return None

    def mask(window):
        return np.any([r.mask(window) for r in kept], axis=0)

    return mask


def capped_view(viewer, layer) -> tuple[int, int, int, int]:
    """The part of ``layer`` on screen, at most :data:`MAX_VIEW_EDGE` wide around its centre."""
    region = view_region(viewer, layer)
    if region is None:
        raise FinetuneError("the view does not show the image; pan to it first")
    y0, y1, x0, x1 = region
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    half = MAX_VIEW_EDGE // 2
    return (max(y0, cy - half), min(y1, cy + half), max(x0, cx - half), min(x1, cx + half))
