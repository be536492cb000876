"""Correctness measurements of the tiling benchmark: seam errors and instance stitching.

* :func:`seam_vs_whole`: a translation-equivariant model tiled (crop-and-stitch, small tiles and
  superblocks so there are many seams) against one whole-image forward pass, float32 maps.
* :func:`seam_offset_grids`: a model pooling over its tile (blend mode) run on two tile grids
  offset by half a stride; the difference is split into pixels inside a blend overlap band of
  either grid ("border") and pixels in the single-tile part of both ("interior").
* :func:`stitching_check`: a three-class probability zarr drawn from disks centred on block
  borders and corners, decoded block by block against the whole-image decode, and block-wise on
  one process against two Dask worker processes.
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from .inference import InferenceSettings, segment
from .blockwise import block_regions, decode_block, instances_blockwise
from .instances import decode_instances
from .normalize import Normalization, apply_range, to_model_channels
from .progress import drain
from .store import OutputStore
from .tiling import blend_spans

EXACT = dict(device="cpu", probs_dtype="float32", maps_dtype="float32", skip_threshold=0.0)


def _segment_probs(image: np.ndarray, model, card: dict, output: Path,
                   settings: InferenceSettings) -> tuple[np.ndarray, object]:
    """``(K, H, W) float32`` probabilities of a tiled run and its :class:`RunResult`."""
    result = drain(segment(image, model, card, output, settings))
    return OutputStore.open(output, mode="r").read_map("probs"), result


def seam_vs_whole(image: np.ndarray, model, card: dict, folder: Path, tile: int = 256,
                  superblock: int = 512, chunk: int = 256) -> dict:
    """Max |tiled − whole-image| class probability of a crop-mode (equivariant) model.

    Args:
        image: ``(H, W)`` grey image small enough for one forward pass.
        model, card: the network (eval, CPU) and its card.
        folder: scratch folder for the output store.
        tile: crop core edge; superblock/chunk: small, so blocks have borders inside the image.
    """
    settings = InferenceSettings(tile=tile, superblock=superblock, chunk=chunk, **EXACT)
    tiled, result = _segment_probs(image, model, card, folder / f"seam_{model.name}.zarr", settings)
    norm = Normalization(result.normalization["low"], result.normalization["high"])
    x = apply_range(to_model_channels(image[None], model.config.in_channels), norm)
    with torch.inference_mode():
        whole = model.predict(torch.from_numpy(x)[None])["probs"][0].numpy()
    diff = np.abs(tiled - whole)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "tiles": result.tiles_run,
            "tile": result.tiles.tile, "halo": result.tiles.overlap,
            "halo_covers_receptive_field": result.tiles.covers_receptive_field}


def _overlap_band(length: int, tile: int, overlap: int, shift: int) -> np.ndarray:
    """1-D mask of image pixels covered by two tiles of the grid over ``length + shift`` pixels,
    whose origin lies ``shift`` pixels before the image's."""
    count = np.zeros(length + shift, np.int32)
    for a, b in blend_spans(length + shift, tile, overlap):
        count[a:b] += 1
    return count[shift:] > 1


def seam_offset_grids(image: np.ndarray, model, card: dict, folder: Path) -> dict:
    """|Δp| between blend grids offset by half a stride, border bands vs tile interiors.

    The second grid runs on the image reflect-padded by half a stride at the top and left (same
    normalisation), cropped back. Pixels that the second grid's first row or column of tiles
    covers are left out: those tiles see padded content, a difference that is not a seam.
    """
    settings = InferenceSettings(**EXACT)
    first, result = _segment_probs(image, model, card, folder / f"grid_a_{model.name}.zarr", settings)
    tiles = result.tiles
    if tiles.mode != "blend":
        raise ValueError(f"{model.name} runs in {tiles.mode} mode; offset grids measure blend mode")
    shift = (tiles.tile - tiles.overlap) // 2
    padded = np.pad(image, ((shift, 0), (shift, 0)), mode="reflect")
    fixed = Normalization(result.normalization["low"], result.normalization["high"])
    second, _ = _segment_probs(padded, model, card, folder / f"grid_b_{model.name}.zarr",
                               InferenceSettings(normalization=fixed, **EXACT))
    diff = np.abs(first - second[:, shift:, shift:]).max(axis=0)
    height, width = image.shape
    t, o = tiles.tile, tiles.overlap
    rows = _overlap_band(height, t, o, 0) | _overlap_band(height, t, o, shift)
    cols = _overlap_band(width, t, o, 0) | _overlap_band(width, t, o, shift)
    border = rows[:, None] | cols[None, :]
    inside = np.zeros_like(border)
    inside[t - shift:, t - shift:] = True
    if min(height, width) < 2 * t:
        raise ValueError(f"the seam image ({height}x{width}) must be at least two tiles ({t}) a side")
    parts = {"border": diff[border & inside], "interior": diff[~border & inside]}
    out = {f"{k}_{stat}": float(f(v)) if v.size else float("nan")
           for k, v in parts.items() for stat, f in (("mean", np.mean), ("max", np.max))}
    return {**out, "tile": tiles.tile, "overlap": tiles.overlap, "shift": shift,
            "border_pixels": int(parts["border"].size), "interior_pixels": int(parts["interior"].size)}


# ------------------------------------------------------------------------------ instance stitching
def disk_centres(size: int, block: int, radius: int, big_radius: int) -> list[tuple[int, int, int]]:
    """``(y, x, r)`` of disks on every inner block corner (alternating with touching pairs across
    a border), on block-border midpoints, and one disk larger than the halo on a corner."""
    disks, corners = [], [(y, x) for y in range(block, size, block) for x in range(block, size, block)]
    for k, (y, x) in enumerate(corners):
        if k == len(corners) // 2:
            disks.append((y, x, big_radius))          # wider than the halo: the fallback path
        elif k % 3 == 1:                              # two nuclei touching across the border x
            disks += [(y, x - radius, radius), (y, x + radius, radius)]
        else:
            disks.append((y, x, radius))
        if y + block // 2 < size:
            disks.append((y + block // 2, x, radius))  # on a vertical block border
        if x + block // 2 < size:
            disks.append((y, x + block // 2, radius))  # on a horizontal block border
    return disks


def disk_probabilities(size: int, disks, ring: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``(3, H, W) uint8`` probabilities {background, interior, boundary} and the drawn labels.

    Overlapping disks are split at their mid-line (each pixel goes to the nearest centre); the
    boundary class is a ``ring``-pixel band inside each object's edge; the one-hot maps are
    smoothed (σ = 1) so the decoder sees soft probabilities.
    """
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.int32)
    best = np.full((size, size), np.inf)
    for index, (y, x, r) in enumerate(disks, 1):
        d = np.hypot(yy - y, xx - x)
        take = (d <= r) & (d < best)
        labels[take], best[take] = index, d[take]
    interior = np.zeros((size, size), bool)
    for index in range(1, len(disks) + 1):
        interior |= ndi.binary_erosion(labels == index, iterations=ring)
    onehot = np.stack([labels == 0, interior, (labels > 0) & ~interior]).astype(np.float32)
    soft = np.stack([ndi.gaussian_filter(c, 1.0) for c in onehot])
    soft /= soft.sum(axis=0, keepdims=True)
    return np.round(soft * 255).astype(np.uint8), labels


def _decode_task(probs_path: str, labels_path: str, index: int, block: int, halo: int) -> int:
    """Dask worker: decode one block from zarr into zarr; returns the objects it owns."""
    import zarr

    probs = zarr.open_array(probs_path, mode="r")
    labels = zarr.open_array(labels_path, mode="r+")
    return decode_block(probs, labels, index, (block, block), halo).objects


def _partition_errors(whole: np.ndarray, blockwise: np.ndarray) -> dict:
    """Splits (whole-image objects cut into several labels), merges, and mismatching pixels."""
    fg = (whole > 0) | (blockwise > 0)
    pairs = np.unique(np.stack([whole[fg], blockwise[fg]]), axis=1)
    w, b = pairs
    pieces = np.bincount(w[(w > 0) & (b > 0)], minlength=int(whole.max()) + 1)
    owners = np.unique(b[(w > 0) & (b > 0)], return_counts=True)[1]
    lost = int(np.count_nonzero((whole > 0) != (blockwise > 0)))
    return {"splits": int(np.count_nonzero(pieces > 1)), "merges": int(np.count_nonzero(owners > 1)),
            "mismatched_pixels": lost}


def _fragmented(labels: np.ndarray) -> int:
    """Labels made of more than one 8-connected piece (an object written twice, apart)."""
    count = 0
    for index, where in enumerate(ndi.find_objects(labels), 1):
        if where is not None and ndi.label(labels[where] == index, np.ones((3, 3)))[1] > 1:
            count += 1
    return count


def stitching_check(folder: Path, size: int = 512, block: int = 128, halo: int = 32,
                    radius: int = 12, workers: int = 2) -> dict:
    """Block-wise instance decoding of disks on block borders/corners vs the whole-image decode,
    and one process vs ``workers`` Dask worker processes (0: skip the Dask part)."""
    import zarr

    disks = disk_centres(size, block, radius, big_radius=halo + halo // 4)
    probs, drawn = disk_probabilities(size, disks)
    chunk = block // 2
    probs_path, one_path, many_path = (str(folder / n) for n in ("disks_probs.zarr", "labels_1.zarr",
                                                                   "labels_dask.zarr"))
    zarr.open_array(probs_path, mode="w", shape=probs.shape, chunks=(3, chunk, chunk),
                    dtype=np.uint8)[...] = probs
    probs_z = zarr.open_array(probs_path, mode="r")
    make = dict(shape=(size, size), chunks=(chunk, chunk), dtype=np.uint32, fill_value=0)
    one = zarr.open_array(one_path, mode="w", **make)
    stats = drain(instances_blockwise(probs_z, one, (block, block), halo))
    whole, blockwise = decode_instances(probs), np.asarray(one[...])
    n_whole, n_block = int(whole.max()), len(np.unique(blockwise[blockwise > 0]))
    errors = _partition_errors(whole, blockwise)
    result = {"disks": len(disks), "drawn_objects": int(drawn.max()), "objects_whole": n_whole,
              "objects_blockwise": n_block, "objects_owned": stats.objects, **errors,
              "duplicates": abs(stats.objects - n_block) + _fragmented(blockwise),
              "blocks": stats.blocks, "escalated_blocks": stats.escalated,
              "unresolved_blocks": stats.unresolved, "size": size, "block": block, "halo": halo,
              "sha256_1": hashlib.sha256(blockwise.tobytes()).hexdigest()}
    if workers:
        zarr.open_array(many_path, mode="w", **make)
        order = list(range(len(block_regions((size, size), (block, block)))))
        random.Random(0).shuffle(order)  # any order, any worker: the result must not change
        _run_on_dask(order, probs_path, many_path, block, halo, workers)
        many = np.asarray(zarr.open_array(many_path, mode="r")[...])
        result.update(workers=workers, sha256_dask=hashlib.sha256(many.tobytes()).hexdigest(),
                      identical=bool(many.tobytes() == blockwise.tobytes()))
    return result


def _run_on_dask(order: list[int], probs_path: str, labels_path: str, block: int, halo: int,
                 workers: int) -> None:
    from .distributed import cluster_client

    with cluster_client(workers) as client:
        futures = [client.submit(_decode_task, probs_path, labels_path, i, block, halo, pure=False)
                   for i in order]
        client.gather(futures)
