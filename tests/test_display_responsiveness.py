"""Keeping the GUI responsive during runs: in-memory copies of small-chunk pyramid levels
(correct values, few reads, invalidation) and job threads below the GUI's CPU priority."""
from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest
from napari.components import ViewerModel
from napari.layers import Layer

from napari_medseg import layer_data
from napari_medseg.core.progress import BACKGROUND_NICENESS, lower_thread_priority
from napari_medseg.core.store import MapInfo, OutputStore, StoreLayout
from napari_medseg.display_cache import MirroredLevel, should_mirror

MAPS = (MapInfo("probs", 3, "probability", (0, 1)),)


class CountingArray:
    """A zarr array that counts and records the reads made through it."""

    def __init__(self, array):
        self.array, self.reads = array, []
        self.shape, self.chunks, self.dtype, self.path = array.shape, array.chunks, array.dtype, array.path

    def __getitem__(self, key):
        self.reads.append(key)
        return self.array[key]


def _store(tmp_path, size=2048, chunk=512):
    layout = StoreLayout((size, size), chunk, chunk, MAPS)
    return OutputStore.create(tmp_path / "run.medseg.zarr", layout, {}, {})


def _write_block(store, region, value: float, label: int) -> None:
    y0, y1, x0, x1 = region
    maps = np.zeros((3, y1 - y0, x1 - x0), np.float32)
    maps[1] = value
    store.write_maps(region, {"probs": maps})
    store.mark_done(region, "maps")
    store.write_labels(region, np.full((y1 - y0, x1 - x0), label, np.uint32))
    store.mark_done(region, "labels")


def test_only_small_chunk_levels_above_level_0_are_mirrored(tmp_path):
    store = _store(tmp_path)                                   # chunks 512, 256, 128, 64, 32, 16
    mirrored = [should_mirror(store.array("probs", level), level) for level in range(store.layout.levels)]
    assert mirrored == [False, False, False, True, True, True]


def test_mirror_matches_the_store_and_reads_only_written_chunks(tmp_path):
    store = _store(tmp_path)
    _write_block(store, (512, 1024, 0, 512), 0.6, 7)
    level = 3                                                  # (3, 256, 256), chunks of 64
    counting = CountingArray(store.array("probs", level))
    mirror = MirroredLevel(counting, channel=1, written=store.done_chunks("maps"))
    expected = np.asarray(store.array("probs", level)[1])
    assert np.array_equal(mirror[:, :], expected) and mirror.dtype == np.uint8
    assert len(counting.reads) == 1                            # just the one written chunk
    assert counting.reads[0][1:] == (slice(64, 128), slice(0, 64))
    assert expected[64:128, :64].min() == round(0.6 * 255) and expected[:64].max() == 0
    assert np.array_equal(mirror[10:100, 5:70], expected[10:100, 5:70])
    assert np.array_equal(mirror[...], expected) and np.array_equal(np.asarray(mirror), expected)
    assert len(counting.reads) == 1                            # served from memory since


def test_invalidated_region_is_read_again(tmp_path):
    store = _store(tmp_path)
    counting = CountingArray(store.array("labels", 4))        # (128, 128) uint32, chunks of 32
    mirror = MirroredLevel(counting, None, store.done_chunks("labels"))
    assert mirror[:, :].max() == 0 and counting.reads == []   # nothing written: nothing read
    _write_block(store, (1536, 2048, 1024, 1536), 0.2, 9)
    assert mirror[:, :].max() == 0                            # not told yet: the copy is kept
    mirror.invalidate((3, 4, 2, 3))                            # level-0 cells of that block
    shown = mirror[:, :]
    assert shown[96:128, 64:96].min() == 9 and (shown > 0).sum() == 32 * 32
    assert len(counting.reads) == 1 and counting.reads[0] == (slice(96, 128), slice(64, 96))
    mirror.invalidate()
    assert np.array_equal(mirror[:, :], shown) and counting.reads[-1] == (slice(0, 128), slice(0, 128))


def test_layers_show_new_blocks_after_invalidate_layers(tmp_path):
    store = _store(tmp_path)
    _write_block(store, (0, 512, 0, 512), 1.0, 3)
    layers = layer_data.run_layers(store, "big", editable_labels=False)
    probs, labels = layers[0][0], layers[-1][0]
    assert isinstance(probs[4].mirror, MirroredLevel) and probs[0].mirror is None
    assert isinstance(labels[4], MirroredLevel) and not isinstance(labels[0], MirroredLevel)
    assert probs[4][:32, :32].min() == 1.0 and probs[4][32:, :].max() == 0.0
    viewer = ViewerModel()
    shown = [viewer.add_layer(Layer.create(*layer)) for layer in layers]
    _write_block(store, (1536, 2048, 1536, 2048), 0.5, 4)
    assert probs[4][96:, 96:].max() == 0.0                   # stale until told
    layer_data.invalidate_layers(shown, (1536, 2048, 1536, 2048))
    assert np.allclose(probs[4][96:, 96:], 128 / 255) and labels[4][96:, 96:].min() == 4
    assert probs[4][:32, :32].min() == 1.0
    _write_block(store, (0, 512, 0, 512), 0.0, 0)             # e.g. a re-run rewrote a block
    layer_data.refresh_layers(shown)                           # forgets everything, re-reads
    assert probs[4][:32, :32].max() == 0.0 and labels[4][:32, :32].max() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux only")
def test_job_threads_run_below_the_gui_priority():
    """A job thread (and the threads it starts) runs at a lower priority; the main thread keeps its own."""
    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def child():
        seen["child"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def job():
        seen["lowered"] = lower_thread_priority() and lower_thread_priority()   # twice: idempotent
        seen["job"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        started = threading.Thread(target=child)
        started.start()
        started.join()

    thread = threading.Thread(target=job)
    thread.start()
    thread.join()
    expected = min(19, main + BACKGROUND_NICENESS)
    assert seen == {"lowered": True, "job": expected, "child": expected}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main
