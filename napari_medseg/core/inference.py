"""Tiled, out-of-core inference: any image size, memory that does not grow with the image.

:func:`segment` is a generator: it yields one :class:`~napari_medseg.core.progress.Progress` per
tile batch (``region`` set once a block is on disk, so a viewer can refresh it) and returns a
:class:`RunResult`. Stop iterating (``close()``, napari's ``worker.quit()``) to cancel: the block
being written is finished, the store stays consistent and says which blocks are done, and running
again with the same settings resumes after them with byte-identical results.

Per block (:mod:`.tiling`): read the input window once, normalise it with statistics taken from a
coarse level or a sample of tiles (:mod:`.io`), run the tiles in batches (:mod:`.tile_runner`), write
the maps and their pyramid (:mod:`.store`). The next block is read and the previous one written on
a small thread pool while the current one is computed. Grad mode is thread-local, so
``torch.inference_mode()`` is entered around each forward pass inside the generator.

Scale-out: :func:`prepare_run` (once, on the client) creates the store and returns a picklable
:class:`RunPlan`; :func:`process_block` (on any worker, given the source, the model, the plan and
one block) reads, computes, writes and marks that block.
"""
from __future__ import annotations

import dataclasses
import datetime
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generator

from .inference_plan import (InferenceSettings, PreparedRun, RunPlan, choose_device,  # noqa: F401
                             prepare_run, shrink_tiles)
from .memory import trim_heap
from .progress import Progress
from .store import OutputStore
from .tile_runner import BlockInput, BlockReport, TileRunner, TileTooLarge, read_block
from .tiling import Block, TileSettings, block_tiles

__all__ = ["InferenceSettings", "RunPlan", "RunResult", "PreparedRun", "choose_device",
           "prepare_run", "process_block", "finish_run", "segment"]


@dataclass(frozen=True)
class RunResult:
    """The outcome of :func:`segment`.

    Attributes:
        output: path of the output zarr group.
        status: ``"complete"`` when every chunk of the image is written, else ``"incomplete"``
            (e.g. after a ``region`` run).
        blocks_total: blocks of the requested region.
        blocks_run: blocks computed by this call.
        blocks_resumed: blocks found done in the store and skipped.
        tiles_run, tiles_skipped: forward-passed and empty (skipped) tiles.
        nonfinite_pixels: NaN/inf input pixels in all blocks written so far (treated as 0 after
            normalisation, i.e. the low percentile).
        device: the device used.
        tiles: the final tile settings (smaller than planned after an out-of-memory fallback).
        normalization: the intensity mapping used, as a dict.
        seconds: wall time of the call; forward_seconds: time in forward passes;
        read_wait_seconds / write_wait_seconds: time compute waited on I/O.
        warnings: automatic adjustments and input problems, one line each.
        scale: model pixels per image pixel the tiles were resampled by (1: not resampled).
    """

    output: str
    status: str
    blocks_total: int
    blocks_run: int
    blocks_resumed: int
    tiles_run: int
    tiles_skipped: int
    nonfinite_pixels: int
    device: str
    tiles: TileSettings
    normalization: dict
    seconds: float
    forward_seconds: float
    read_wait_seconds: float
    write_wait_seconds: float
    warnings: tuple[str, ...]
    scale: float = 1.0


def process_block(source, model, plan: RunPlan, block: Block, device=None) -> BlockReport:
    """Read, compute, write and mark one block (for Dask workers; no threads, no yields).

    Args:
        source: :class:`~napari_medseg.core.io.ImageSource` (picklable; reopened per process).
        model: the network (already on ``device``, in eval mode).
        plan: from :func:`prepare_run`.
        block: one of ``plan.blocks``.
        device: torch device; default: the model's.
    """
    device = device or next(model.parameters()).device
    runner = TileRunner(model, plan, device)
    job = runner.run_block(read_block(source, plan, block))
    while True:
        try:
            next(job)
        except StopIteration as stop:
            maps, report = stop.value
            break
    store = OutputStore.open(plan.output)
    _write_block(store, block, maps, report.nonfinite)
    return report


def finish_run(output, entry: dict | None = None) -> str:
    """Record the maps stage's status and one history line; returns ``"complete"``/``"incomplete"``.

    :func:`segment` calls it at the end; a Dask driver calls it once after gathering its blocks.

    Args:
        output: the store or its path.
        entry: a JSON-able summary of the call (date, region, device, ...), appended to the
            ``history`` attribute.
    """
    store = output if isinstance(output, OutputStore) else OutputStore.open(output)
    status = store.status("maps")["status"]
    history = store.attrs.get("history", []) + ([entry] if entry else [])
    store.set_stage_status("maps", status, history=history)
    return status


def _write_block(store: OutputStore, block: Block, maps: dict, nonfinite: int) -> None:
    store.write_maps(block.region, maps)
    store.mark_done(block.region, "maps", nonfinite)


def segment(source, model, card: dict | None = None, output=None,
            settings: InferenceSettings | None = None) -> Generator[Progress, None, RunResult]:
    """Segment an image of any size into an output zarr group, block by block.

    Args:
        source: an :class:`~napari_medseg.core.io.ImageSource` or anything
            :func:`~napari_medseg.core.io.open_image` accepts (path, zarr, numpy, dask).
        model: a ``src_models.SegmentationModel``; it is moved to the chosen device and set to eval.
        card: its weights card (``architecture``, ``sha256``, ``config``, optional
            ``normalization`` and training tile size); None for untracked weights.
        output: output ``.zarr`` path; default: next to the input (``<stem>.<model>.medseg.zarr``).
        settings: tiling, device, batch, region, overwrite...; defaults per model.

    Yields:
        :class:`Progress` with ``stage="tiles"``, ``done``/``total`` in tiles, once per batch.

    Returns:
        :class:`RunResult`.
    """
    started = time.perf_counter()
    settings = settings or InferenceSettings()
    device = choose_device(settings.device)
    model.to(device).eval()
    prepared = prepare_run(source, model, card, output, settings, device)
    run = _Run(prepared, model, device, settings.prefetch)
    yield from run.execute()
    return run.result(time.perf_counter() - started)


class _Run:
    """State of one :func:`segment` call: the block loop with overlapped reading and writing."""

    def __init__(self, prepared: PreparedRun, model, device, prefetch: bool):
        self.prepared = prepared
        self.plan = prepared.plan
        self.store = prepared.store
        self.source = prepared.source
        self.runner = TileRunner(model, self.plan, device)
        self.todo = [b for b in self.plan.blocks if not self.store.is_done(b.region)]
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="medseg-io") if prefetch else None
        self.reports: list[BlockReport] = []
        self.waits = {"read": 0.0, "write": 0.0}
        self.tiles_done = 0
        self.tiles_total = sum(len(_tiles(self.plan, b)) for b in self.todo)
        self.written: list[tuple] = []      # regions written, not yet reported in a Progress

    def execute(self) -> Generator[Progress, None, None]:
        pending: Future | None = None
        reading = self._submit(read_block, self.source, self.plan, self.todo[0]) if self.todo else None
        try:
            for index, block in enumerate(self.todo):
                block_input = self._wait(reading, "read")
                if index + 1 < len(self.todo):
                    reading = self._submit(read_block, self.source, self.plan, self.todo[index + 1])
                maps, report = yield from self._compute(block_input)
                self.reports.append(report)
                self._wait(pending, "write")
                pending = self._submit(self._write, block, maps, report.nonfinite)
            self._wait(pending, "write")
            pending = None
            self._finish()
            yield self._progress("all blocks written")
            while self.written:
                yield self._progress("all blocks written")
        finally:
            self._shutdown(reading)

    def _compute(self, block_input: BlockInput):
        """Run a block's tiles, shrinking the tile (and re-reading) after out-of-memory."""
        while True:
            job = self.runner.run_block(block_input)
            try:
                while True:
                    try:
                        count = next(job)
                    except StopIteration as stop:
                        return stop.value
                    self.tiles_done += count
                    yield self._progress(f"block {len(self.reports) + 1}/{len(self.todo)}")
            except TileTooLarge as exc:
                self._shrink(str(exc))
                block_input = read_block(self.source, self.plan, block_input.block)

    def _shrink(self, reason: str) -> None:
        tiles = shrink_tiles(self.plan.tiles, reason)
        self.plan = dataclasses.replace(self.plan, tiles=tiles, batch_size=1)
        self.runner.plan = self.plan
        self.runner.batch_size = 1
        self.runner.warnings.append(f"{reason}: tile reduced to {tiles.tile} (overlap {tiles.overlap})")
        remaining = self.todo[len(self.reports):]
        self.tiles_total = self.tiles_done + sum(len(_tiles(self.plan, b)) for b in remaining)

    def _write(self, block: Block, maps: dict, nonfinite: int) -> None:
        _write_block(self.store, block, maps, nonfinite)
        trim_heap()
        self.written.append(block.region)

    def _progress(self, message: str) -> Progress:
        region = self.written.pop(0) if self.written else None
        metrics = {"blocks_done": len(self.reports), "blocks_total": len(self.todo),
                   "forward_seconds": round(self.runner.forward_seconds, 3),
                   "nonfinite_pixels": sum(r.nonfinite for r in self.reports)}
        return Progress("tiles", self.tiles_done, self.tiles_total, message, metrics, region)

    def _submit(self, fn, *args) -> Future:
        if self.pool is not None:
            return self.pool.submit(fn, *args)
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - surfaced by _wait exactly as a pool would
            future.set_exception(exc)
        return future

    def _wait(self, future: Future | None, kind: str):
        if future is None:
            return None
        start = time.perf_counter()
        value = future.result()
        self.waits[kind] += time.perf_counter() - start
        return value

    def _finish(self) -> None:
        """Stage status, plus one line of history per call (regions, resumes, fallbacks)."""
        entry = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "blocks_run": len(self.reports), "region": self.prepared.region,
                 "device": str(self.runner.device), "tile": self.plan.tiles.tile,
                 "overlap": self.plan.tiles.overlap,
                 "warnings": list(self.prepared.warnings) + self.runner.warnings}
        finish_run(self.store, entry)

    def _shutdown(self, reading: Future | None) -> None:
        """On cancel or error: drop the prefetch, let a running write finish (store consistent)."""
        if reading is not None:
            reading.cancel()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def result(self, seconds: float) -> RunResult:
        plan = self.plan
        return RunResult(
            output=str(plan.output), status=self.store.status("maps")["status"],
            blocks_total=len(plan.blocks), blocks_run=len(self.reports),
            blocks_resumed=len(plan.blocks) - len(self.todo),
            tiles_run=sum(r.tiles_run for r in self.reports),
            tiles_skipped=sum(r.tiles_skipped for r in self.reports),
            nonfinite_pixels=self.store.nonfinite_pixels(), device=str(self.runner.device),
            tiles=plan.tiles, normalization=self.prepared.normalization, seconds=seconds,
            forward_seconds=self.runner.forward_seconds, read_wait_seconds=self.waits["read"],
            write_wait_seconds=self.waits["write"],
            warnings=tuple(self.prepared.warnings) + tuple(self.runner.warnings), scale=plan.scale)


def _tiles(plan: RunPlan, block: Block) -> list:
    return block_tiles(block.region, plan.image_shape, plan.tiles)
