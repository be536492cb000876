"""Tiled TIFFs written tile by tile from any 2D array-like, as a cancellable job generator.

tifffile writes a tiled page from an iterator of tiles, but consumes that iterator inside one
call, so the job could not yield progress (nor be cancelled) while it runs. Here tifffile runs in
a helper thread that pulls tiles from a small queue; the job reads the labels, pushes tiles and
yields one :class:`Progress` per row of tiles. Closing the job (cancel) or an error on either side
stops the other at its next tile. Memory: the queue (:data:`QUEUE_TILES` tiles) plus one band of
``tile`` rows × :data:`BAND_WIDTH` columns, whatever the image size.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import tifffile

from .progress import JobGenerator, Progress

TILE = 256
BAND_WIDTH = 4096    # columns read at once (a multiple of every tile size used here)
QUEUE_TILES = 16
POLL_S = 0.05


@dataclass(frozen=True)
class TiffPage:
    """One page (image file directory) to write.

    Attributes:
        array: ``(h, w)`` array-like sliceable with ``array[y0:y1, x0:x1]``.
        options: extra ``tifffile.TiffWriter.write`` arguments (``subifds``, ``subfiletype``,
            ``metadata``, ``resolution``...).
        label: what the page is, for progress messages (e.g. ``"level 2"``).
    """

    array: object
    options: dict = field(default_factory=dict)
    label: str = "labels"


class _Stopped(Exception):
    """Raised inside the writer thread when the job stops feeding it."""


class _TileFeed:
    """A bounded queue of tiles between the job (producer) and the writer thread (consumer)."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue(QUEUE_TILES)
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def tiles(self, count: int) -> Iterator[np.ndarray]:
        """The next ``count`` tiles (writer thread)."""
        for _ in range(count):
            while True:
                if self.stop.is_set():
                    raise _Stopped
                try:
                    tile = self.queue.get(timeout=POLL_S)
                    break
                except queue.Empty:
                    continue
            yield tile

    def put(self, tile: np.ndarray, writer: threading.Thread) -> None:
        """Hand one tile to the writer (job thread); re-raise the writer's error if it died."""
        while True:
            if not writer.is_alive():
                raise self.error or RuntimeError("the TIFF writer stopped unexpectedly")
            try:
                self.queue.put(tile, timeout=POLL_S)
                return
            except queue.Full:
                continue


def tile_count(shape: tuple[int, int], tile: int) -> tuple[int, int]:
    """``(rows, columns)`` of tiles covering an ``(h, w)`` image."""
    return -(-shape[0] // tile), -(-shape[1] // tile)


def tile_rows(array, dtype: np.dtype, tile: int) -> Iterator[Iterator[np.ndarray]]:
    """Rows of ``tile``×``tile`` tiles of ``array`` (zero-padded at the edges, cast to ``dtype``),
    in tifffile's order; each row is itself lazy, read in bands of ``tile`` rows ×
    :data:`BAND_WIDTH` columns, so memory does not grow with the image's width."""
    for y in range(0, array.shape[0], tile):
        yield _row_tiles(array, y, dtype, tile)


def _row_tiles(array, y: int, dtype: np.dtype, tile: int) -> Iterator[np.ndarray]:
    height, width = array.shape
    for bx in range(0, width, BAND_WIDTH):
        band = np.asarray(array[y:min(y + tile, height), bx:min(bx + BAND_WIDTH, width)])
        for x in range(0, band.shape[1], tile):
            out = np.zeros((tile, tile), dtype)
            part = band[:, x:x + tile]
            out[:part.shape[0], :part.shape[1]] = part
            yield out


def write_tiled_tiff(path, pages: list[TiffPage], dtype, *, tile: int = TILE, bigtiff: bool = False,
                     ome: bool = False, compression: str = "zlib",
                     stage: str = "writing") -> JobGenerator[None]:
    """Write ``pages`` (in order) to a tiled, compressed TIFF at ``path``.

    Args:
        path: file to write (the caller makes it a temporary name and renames it).
        pages: level 0 first; pyramid levels follow as ``subfiletype=1`` pages.
        dtype: pixel type of every page.
        tile: tile edge (a multiple of 16 dividing :data:`BAND_WIDTH`).
        bigtiff: 64-bit offsets (needed past 4 GB).
        ome: write OME-XML from the first page's ``metadata``.

    Yields:
        One :class:`Progress` per row of tiles of every page.

    Raises:
        OSError: writing failed (e.g. disk full); the partial file is the caller's to remove.
    """
    dtype = np.dtype(dtype)
    feed = _TileFeed()
    writer = threading.Thread(target=_write_pages, name="medseg-tiff-writer", daemon=True,
                              args=(path, pages, dtype, tile, bigtiff, ome, compression, feed))
    total = sum(tile_count(page.array.shape, tile)[0] for page in pages)
    done = 0
    writer.start()
    try:
        for page in pages:
            rows = tile_count(page.array.shape, tile)[0]
            for index, row in enumerate(tile_rows(page.array, dtype, tile), start=1):
                for tile_data in row:
                    feed.put(tile_data, writer)
                done += 1
                yield Progress(stage, done, total, f"{page.label}: row {index} of {rows}")
        writer.join()
        if feed.error is not None:
            raise feed.error
    finally:
        if writer.is_alive():
            feed.stop.set()
            writer.join()


def _write_pages(path, pages, dtype, tile, bigtiff, ome, compression, feed: _TileFeed) -> None:
    """Writer thread: one ``tifffile`` write per page, tiles pulled from ``feed``."""
    try:
        with tifffile.TiffWriter(path, bigtiff=bigtiff, ome=ome) as tif:
            for page in pages:
                options = {"photometric": "minisblack", "metadata": None, **page.options}
                tif.write(feed.tiles(int(np.prod(tile_count(page.array.shape, tile)))),
                          shape=tuple(page.array.shape), dtype=dtype, tile=(tile, tile),
                          compression=compression, maxworkers=1, **options)
    except _Stopped:
        pass
    except BaseException as exc:  # handed to the job thread, which re-raises it
        feed.error = exc
