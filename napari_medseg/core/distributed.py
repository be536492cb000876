"""Scale-out on Dask: the same run as :func:`~napari_medseg.core.pipeline.run_segmentation`,
with superblocks processed by ``dask.distributed`` workers.

The client prepares the output store once (:func:`~napari_medseg.core.inference.prepare_run`);
workers receive only picklable arguments (the image source spec, the run plan, the model's name and
weights path), load the model once per worker process (cached), and read and write the zarr store
themselves. Every block writes only its own chunks (maps, pyramid levels and progress cells), so
blocks may run in any order on any worker and the result is byte-identical to a single-process run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

from .decode_tuning import decode_settings_for
from .resolution import decode_at_scale
from .inference import InferenceSettings, finish_run, prepare_run, process_block
from .blockwise import block_regions, decode_block
from .instances import DecodeSettings
from .pipeline import _BackgroundWhereMissing, load_model
from .progress import JobGenerator, Progress
from .store import OutputStore

_WORKER_MODELS: dict = {}


@dataclass(frozen=True)
class ModelRef:
    """How a worker rebuilds the model: registry name + weights path (or ``"random"``)."""

    name: str
    weights: str | None


def _worker_model(ref: ModelRef):
    """The model for ``ref``, loaded once per worker process (on its best device)."""
    if ref not in _WORKER_MODELS:
        _WORKER_MODELS[ref] = load_model(ref.name, ref.weights, "auto")[0]
    return _WORKER_MODELS[ref]


def _maps_task(source, plan, block, ref: ModelRef) -> int:
    """Worker: compute and write one superblock's maps; returns the tiles run."""
    report = process_block(source, _worker_model(ref), plan, block)
    return int(getattr(report, "tiles_run", 0))


def _labels_task(output: str, index: int, block: int, halo: int, decode: DecodeSettings):
    """Worker: decode one block's instances from the written maps and mark it done."""
    store = OutputStore.open(output)
    result = decode_block(_BackgroundWhereMissing(store), store.labels(), index, (block, block), halo, decode)
    store.refresh_pyramid("labels", result.region)
    store.mark_done(result.region, "labels")
    return result.objects


def run_on_cluster(client, source, ref: ModelRef, output, settings: InferenceSettings,
                   decode: DecodeSettings | None = None, halo: int = 128) -> JobGenerator[dict]:
    """Maps then instances of one image on a Dask cluster; yields progress per finished block.

    Args:
        client: a connected ``dask.distributed.Client``.
        source: an ``ImageSource`` opened from a path every worker can read.
        ref: model name and weights path (workers load it themselves).
        output: output ``.zarr`` path on storage every worker can write.
        settings: engine settings (region, tiles, mc samples...).
    """
    from dask.distributed import as_completed

    started = time.perf_counter()
    model, card = load_model(ref.name, ref.weights, "cpu")
    prepared = prepare_run(source, model, card, output, settings)
    plan, store = prepared.plan, prepared.store
    decode = decode or decode_at_scale(decode_settings_for(card), plan.scale)
    todo = [b for b in plan.blocks if not store.is_done(b.region, "maps")]
    futures = [client.submit(_maps_task, prepared.source, plan, b, ref, pure=False) for b in todo]
    for done, _ in enumerate(as_completed(futures), 1):
        yield Progress("blocks", done, len(futures), f"maps: block {done}/{len(futures)}")
    finish_run(plan.output, {"scheduler": str(client.scheduler.address), "blocks": len(todo)})
    objects = 0
    if model.config.num_classes == 3:
        size = store.layout.superblock
        regions = block_regions(store.labels().shape, (size, size))
        indices = [i for i, r in enumerate(regions) if store.is_done(r, "maps")
                   and not store.is_done(r, "labels")]
        futures = [client.submit(_labels_task, plan.output, i, size, halo, decode, pure=False) for i in indices]
        for done, future in enumerate(as_completed(futures), 1):
            objects += future.result()
            yield Progress("instances", done, len(futures), f"instances: block {done}/{len(futures)}")
        OutputStore.open(plan.output).set_stage_status(
            "labels", OutputStore.open(plan.output).status("labels")["status"], halo=halo,
            decode=dataclasses.asdict(decode))
    return {"output": plan.output, "blocks": len(plan.blocks), "objects": objects,
            "seconds": round(time.perf_counter() - started, 2),
            "maps": OutputStore.open(plan.output).status("maps")["status"],
            "labels": OutputStore.open(plan.output).status("labels")["status"]}


@contextlib.contextmanager
def cluster_client(workers: int | None = None, scheduler: str | None = None):
    """A ``dask.distributed.Client`` on an existing scheduler, or on a new local cluster of
    ``workers`` processes; on exit the client closes, and so does the local cluster (never the
    user's own scheduler)."""
    from dask.distributed import Client, LocalCluster

    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    with LocalCluster(n_workers=workers or 2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def run_distributed(input_path, model_name: str, weights, output, settings: InferenceSettings,
                    workers: int | None = None, scheduler: str | None = None, on_progress=None) -> dict:
    """Segment an image file on a local cluster of ``workers`` processes or at ``scheduler``."""
    from .io import open_image
    from .progress import drain

    source = open_image(input_path)
    with cluster_client(workers, scheduler) as client:
        return drain(run_on_cluster(client, source, ModelRef(model_name, weights and str(weights)),
                                    str(output), settings), on_progress)
