"""The whole segmentation job users run: load weights, tiled maps, then instances, all on disk.

``run_segmentation`` is the one entry point of the CLI, the napari widget and the demo. It chains
:func:`napari_medseg.core.inference.segment` (probabilities and auxiliary maps) with block-wise
instance decoding (:func:`napari_medseg.core.blockwise.instances_blockwise`) into the same zarr
group, yielding progress throughout and resuming either stage where a previous run stopped.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from src_models import create_model, list_models, load_weights

from .decode_tuning import decode_settings_for
from .devices import pick_device
from .inference import InferenceSettings, RunResult, segment
from .blockwise import block_regions, instances_blockwise
from .instances import DecodeSettings
from .resolution import decode_at_scale
from .memory import trim_heap
from .progress import JobGenerator
from .rerun import snapshot_model_labels
from .resources import starter_weights
from .store import OutputStore

RANDOM_WEIGHTS = "random"


@dataclass(frozen=True)
class SegmentationResult:
    """Outcome of :func:`run_segmentation`: the maps run, and the instance stage's summary."""

    maps: RunResult
    labels_status: str
    objects: int
    output: str


def load_model(model_name: str, weights: str | Path | None = None, device: str = "auto"):
    """A model and its card: given weights, else the weights the user adopted for ``model_name``
    (a fine-tuned version, see :mod:`.versions`), else its bundled starter weights.

    ``weights="random"`` builds the lite preset with random weights (for benchmarks and tests).
    """
    if model_name not in list_models():
        raise KeyError(f"unknown model {model_name!r}; choose one of: {', '.join(list_models())}")
    dev = pick_device(device)
    if weights == RANDOM_WEIGHTS:
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same "random" model in every process (Dask workers)
            model = create_model(model_name, "lite").eval()
        card = {"architecture": model_name, "sha256": "random-init", "config": model.config.to_dict(),
                "classes": ["background", "interior", "boundary"], "version": "random"}
        return model.to(dev), card
    path = weights or _adopted_weights(model_name) or starter_weights(model_name)
    if path is None:
        raise FileNotFoundError(f"no bundled starter weights for {model_name} in this version; "
                                "pass --weights FILE (or --weights random to try the pipeline)")
    model, card = load_weights(path, dev, expect_architecture=model_name)
    card = dict(card, weights_path=str(path))
    return model, card


def _adopted_weights(model_name: str) -> Path | None:
    """The user's active (adopted) version of ``model_name``; None when unset or unreadable."""
    from . import versions

    try:
        return versions.active_path(model_name)
    except (versions.VersionError, OSError, ValueError):
        return None


class _BackgroundWhereMissing:
    """Read-only view of a store's ``probs`` that reports certain background in chunks the maps
    stage has not written (e.g. around a region run), so instance decoding never invents objects
    from unwritten zeros."""

    def __init__(self, store: OutputStore):
        self.array = store.array("probs")
        self.shape, self.dtype = self.array.shape, self.array.dtype
        self.done = store.done_chunks("maps")
        self.chunk = store.layout.chunk
        self.full = np.iinfo(self.dtype).max if np.dtype(self.dtype).kind == "u" else 1.0

    def __getitem__(self, key):
        _, ys, xs = key
        data = np.asarray(self.array[key])
        c = self.chunk
        cy0, cy1 = ys.start // c, -(-ys.stop // c)
        cx0, cx1 = xs.start // c, -(-xs.stop // c)
        for cy in range(cy0, cy1):
            for cx in range(cx0, cx1):
                if self.done[cy, cx]:
                    continue
                sy = slice(max(cy * c, ys.start) - ys.start, min((cy + 1) * c, ys.stop) - ys.start)
                sx = slice(max(cx * c, xs.start) - xs.start, min((cx + 1) * c, xs.stop) - xs.start)
                data[:, sy, sx] = 0
                data[0, sy, sx] = self.full
        return data


def decode_store(store: OutputStore, decode: DecodeSettings = DecodeSettings(), halo: int = 128,
                 region: tuple[int, int, int, int] | None = None) -> JobGenerator[int]:
    """Instance labels for every block whose maps are written and labels are not; returns objects."""
    shape = store.labels().shape
    block = (store.layout.superblock, store.layout.superblock)
    regions = block_regions(shape, block)
    todo = [i for i, r in enumerate(regions)
            if store.is_done(r, "maps") and not store.is_done(r, "labels")
            and (region is None or _overlaps(r, region))]
    objects = 0
    job = instances_blockwise(_BackgroundWhereMissing(store), store.labels(), block, halo, decode,
                              blocks=todo)
    while True:
        try:
            record = next(job)
        except StopIteration as stop:
            objects = stop.value.objects
            break
        store.refresh_pyramid("labels", record.region)
        store.mark_done(record.region, "labels")
        # A pristine copy of the model's labels, block by block, so "Fine-tune on edits" can tell
        # the user's corrections from the model's output later (the layer edits ``labels``).
        snapshot_model_labels(store, record.region)
        trim_heap()
        yield record
    status = "complete" if store.status("labels")["status"] == "complete" else "incomplete"
    store.set_stage_status("labels", status, decode=dataclasses.asdict(decode), halo=halo)
    return objects


def _overlaps(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]


def run_segmentation(source, model, card: dict, output=None, settings: InferenceSettings | None = None,
                     decode: DecodeSettings | None = None, halo: int = 128,
                     ) -> JobGenerator[SegmentationResult]:
    """Maps then instances for an image of any size; see the module docstring.

    Args:
        source: path, zarr/dask/numpy array or ``ImageSource``.
        model, card: from :func:`load_model`.
        output: output ``.zarr`` (default next to the input).
        settings: engine settings.
        decode: instance decoding settings (used when the model has the three-class head), in
            image pixels; default: the thresholds tuned for these weights (card ``"decode"``, sizes
            converted from the model's grid when tiles were resampled), else the defaults.
        halo: context in pixels for block-wise decoding.
    """
    settings = settings or InferenceSettings()
    maps = yield from segment(source, model, card, output, settings)
    store = OutputStore.open(maps.output)
    objects, labels_status = 0, "not run"
    if model.config.num_classes == 3:
        decode = decode or decode_at_scale(decode_settings_for(card), maps.scale)
        objects = yield from decode_store(store, decode, halo, settings.region)
        labels_status = store.status("labels")["status"]
    return SegmentationResult(maps, labels_status, objects, maps.output)
