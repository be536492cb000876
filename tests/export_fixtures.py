"""Shared pieces of the export tests: synthetic label images and a finished output store."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from skimage.draw import disk, polygon as draw_polygon

from napari_medseg.core.store import MapInfo, OutputStore, StoreLayout

RUN = {"model": "vunet", "weights_sha256": "ab" * 32, "date": "2026-01-02T03:04:05+00:00",
       "package_version": "0.1.0"}
UNCERTAINTY = ("entropy", "variance", "mutual_information")


def blobs(shape=(300, 260), seed=0, count=60, first_id=3, step=3) -> np.ndarray:
    """Disks of random size and place (some cut by the image border), a square with a hole and
    one label in two pieces: ``(H, W) uint32``."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint32)
    for i in range(count):
        rr, cc = disk((rng.integers(0, shape[0]), rng.integers(0, shape[1])), rng.integers(3, 16),
                      shape=shape)
        labels[rr, cc] = first_id + i * step
    labels[100:140, 100:140] = 999
    labels[110:120, 110:120] = 0
    labels[200:205, 10:15] = 998
    labels[210:215, 30:35] = 998
    return labels


def make_store(path, labels, pixel_size=(0.5, 0.5)) -> tuple[OutputStore, dict]:
    """An output store holding ``labels`` and V-UNet-like uncertainty maps (random values)."""
    maps = (MapInfo("probs", 3, "probability", (0, 1)),) + tuple(
        MapInfo(name, 1, "uncertainty", (0, 1)) for name in UNCERTAINTY)
    layout = StoreLayout(labels.shape, 64, 128, maps, maps_dtype="float32",
                         pixel_size=pixel_size, unit="micrometer")
    store = OutputStore.create(Path(path), layout, RUN, {})
    rng = np.random.default_rng(1)
    values = {name: rng.random((1,) + labels.shape).astype(np.float32) for name in UNCERTAINTY}
    region = (0, labels.shape[0], 0, labels.shape[1])
    store.write_maps(region, {"probs": np.zeros((3,) + labels.shape, np.float32), **values})
    store.write_labels(region, labels)
    store.mark_done(region, "labels")
    return store, values


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


def rasterise(geometry: dict, shape) -> np.ndarray:
    """Pixels whose centres lie inside a feature's polygons (holes removed)."""
    polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    mask = np.zeros(shape, bool)
    for rings in polygons:
        for index, ring in enumerate(rings):
            ring = np.asarray(ring)
            rr, cc = draw_polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape)   # pixel centres
            mask[rr, cc] = index == 0
    return mask
