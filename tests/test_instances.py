"""Instance decoding: in memory, block-wise on zarr, and the perfect-prediction round trip."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi

from napari_medseg.core.blockwise import block_regions, decode_block, instances_blockwise, label_dtype
from napari_medseg.core.instances import DecodeSettings, decode_instances, decode_semantic_membranes
from napari_medseg.core.metrics import instance_metrics
from napari_medseg.core.progress import Progress, drain
from napari_medseg.core.targets import instances_to_classes

DSB_LABELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018_train" / "labels"
SIZE, CHUNK = 192, 32


def disks(centres, radii, shape=(SIZE, SIZE)) -> np.ndarray:
    """``(H, W) int32`` instance map of disks; later disks cut into earlier ones (touching)."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    out = np.zeros(shape, np.int32)
    for i, ((cy, cx), r) in enumerate(zip(centres, radii), 1):
        out[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return out


def soft_probs(instances: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """A plausible network output: one-hot 3-class target blurred, ``(3, H, W) float32``."""
    onehot = np.eye(3, dtype=np.float32)[instances_to_classes(instances)].transpose(2, 0, 1)
    blurred = np.stack([ndi.gaussian_filter(c, sigma) for c in onehot])
    return blurred / blurred.sum(0, keepdims=True)


def onehot_probs(instances: np.ndarray) -> np.ndarray:
    """A perfect prediction: the training target itself as ``(3, H, W) float32``."""
    return np.eye(3, dtype=np.float32)[instances_to_classes(instances)].transpose(2, 0, 1)


@pytest.fixture(scope="module")
def border_scene() -> tuple[np.ndarray, np.ndarray]:
    """Disks centred on block borders (every 64 and 96 px) and corners, some touching in
    pairs and a triple on a corner, plus one object (r = 40) larger than the smallest halo."""
    rng = np.random.default_rng(7)
    centres = [(64, 64), (128, 128), (64, 128), (128, 64), (96, 96), (64, 30), (30, 96),
               (128, 170), (170, 128), (160, 32)]
    radii = list(rng.integers(6, 12, len(centres)))
    centres += [(64, 75), (75, 64), (128 + 9, 128 + 9)]  # touching the corner disks
    radii += [7, 6, 8]
    centres += [(30, 30)]  # the large one: crosses the 32- and 64-px block borders
    radii += [24]
    gt = disks(centres, radii)
    return gt, soft_probs(gt)


def run_blockwise(probs: np.ndarray, block, halo, order=None, settings=None, **kw) -> np.ndarray:
    """Block-wise decode from and into zarr arrays (in memory); returns the labels."""
    p = zarr.create_array(store=zarr.storage.MemoryStore(), shape=probs.shape,
                          chunks=(probs.shape[0], CHUNK, CHUNK), dtype=probs.dtype)
    p[:] = probs
    out = zarr.create_array(store=zarr.storage.MemoryStore(), shape=probs.shape[1:],
                            chunks=(CHUNK, CHUNK), dtype=label_dtype(probs.shape[1:]), fill_value=0)
    drain(instances_blockwise(p, out, block, halo, settings, blocks=order, **kw))
    return out[:]


def rank(labels: np.ndarray) -> np.ndarray:
    """Position IDs → 1..n in increasing ID order (= anchor raster order), as ``int32``."""
    ids, inverse = np.unique(labels, return_inverse=True)
    return (inverse.reshape(labels.shape) + int(ids[0] != 0)).astype(np.int32)


def test_whole_image_decode_recovers_soft_disks(border_scene):
    gt, probs = border_scene
    scores = instance_metrics(gt, decode_instances(probs))
    assert scores["f1"] == 1.0 and scores["aji"] > 0.9


@pytest.mark.parametrize("block,halo", [((64, 64), 16), ((64, 64), 40), ((32, 96), 24),
                                        ((128, 64), 8)])
def test_blockwise_equals_whole_image(border_scene, block, halo):
    gt, probs = border_scene
    whole = decode_instances(probs)
    tiled = run_blockwise(probs, block, halo)
    # IDs are positions; ranked they must give the whole-image labels byte for byte.
    np.testing.assert_array_equal(rank(tiled), whole)
    # No splits, no duplicates: every ground-truth disk is exactly one predicted object.
    scores = instance_metrics(gt, tiled)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (scores["n_gt"], 0, 0)


def test_block_order_and_independent_calls_give_identical_bytes(border_scene):
    _, probs = border_scene
    block, n = (64, 64), len(block_regions((SIZE, SIZE), (64, 64)))
    forward = run_blockwise(probs, block, 16)
    shuffled = run_blockwise(probs, block, 16, order=np.random.default_rng(1).permutation(n))
    backward = run_blockwise(probs, block, 16, order=range(n - 1, -1, -1))
    assert forward.dtype == np.uint32
    assert forward.tobytes() == shuffled.tobytes() == backward.tobytes()
    # The per-block function alone (as a dask worker would call it) writes the same bytes.
    out = np.zeros((SIZE, SIZE), np.uint32)
    for index in range(n):
        decode_block(probs, out, index, block, 16, DecodeSettings())
    assert out.tobytes() == forward.tobytes()


def test_object_larger_than_halo_escalates(border_scene):
    _, probs = border_scene
    p = probs  # numpy input works as well as zarr
    out = np.zeros((SIZE, SIZE), np.uint32)
    stats = drain(instances_blockwise(p, out, (32, 32), 4, max_halo=64))
    assert stats.escalated > 0 and stats.unresolved == 0 and stats.largest_halo > 4
    np.testing.assert_array_equal(rank(out), decode_instances(probs))
    assert stats.objects == len(np.unique(out)) - 1
    assert stats.to_dict()["blocks"] == 36


def test_halo_cap_reports_unresolved_blocks(border_scene, caplog):
    _, probs = border_scene
    out = np.zeros((SIZE, SIZE), np.uint32)
    with caplog.at_level(logging.WARNING):
        stats = drain(instances_blockwise(probs, out, (32, 32), 2, max_halo=4))
    assert stats.unresolved > 0 and "larger than the maximum halo" in caplog.text


def test_progress_records_one_per_block(border_scene):
    _, probs = border_scene
    out = np.zeros((SIZE, SIZE), np.uint32)
    records = []
    drain(instances_blockwise(probs, out, (96, 96), 16), records.append)
    assert [r.done for r in records] == [1, 2, 3, 4]
    assert all(isinstance(r, Progress) for r in records)
    assert records[-1].fraction == 1.0 and records[0].region == (0, 96, 0, 96)


def test_empty_image_gives_no_objects():
    probs = np.zeros((3, 64, 64), np.float32)
    probs[0] = 1.0
    assert decode_instances(probs).max() == 0
    out = run_blockwise(probs, (32, 32), 8)
    assert out.max() == 0


def test_bad_inputs_raise_clear_errors(border_scene):
    _, probs = border_scene
    with pytest.raises(ValueError, match="multiple of the labels' chunks"):
        run_blockwise(probs, (48, 48), 8)
    with pytest.raises(ValueError, match="cannot hold position-derived IDs"):
        drain(instances_blockwise(probs, np.zeros((SIZE, SIZE), np.uint8), (64, 64), 8))
    with pytest.raises(ValueError, match=r"\(K, H, W\)"):
        decode_instances(probs[0])
    with pytest.raises(ValueError, match="seed_threshold"):
        DecodeSettings(seed_threshold=1.5)
    assert label_dtype((65535, 65535)) == np.uint32 and label_dtype((65536, 65536)) == np.uint64


def test_holes_filled_and_small_objects_dropped():
    gt = disks([(20, 20), (50, 50)], [12, 2], shape=(72, 72))
    probs = onehot_probs(gt)
    probs[:, 18:23, 18:23] = np.array([1.0, 0.0, 0.0])[:, None, None]  # a hole in the first disk
    labels = decode_instances(probs, min_area=20)
    assert labels[20, 20] == 1 and labels.max() == 1  # hole filled, tiny disk (13 px) dropped
    assert decode_instances(probs, min_area=1, fill_holes=False)[20, 20] == 0


def test_fixed_point_probabilities_decode_like_floats(border_scene):
    _, probs = border_scene
    as_uint8 = np.round(probs * 255).astype(np.uint8)
    scores = instance_metrics(decode_instances(probs), decode_instances(as_uint8))
    assert scores["f1"] == 1.0


def test_two_class_components_and_split():
    gt = disks([(30, 30), (30, 52)], [12, 12], shape=(64, 84))  # two touching disks
    fg = (gt > 0).astype(np.float32)
    probs = np.stack([1 - fg, fg])
    assert decode_instances(probs).max() == 1  # plain components merge them
    split = decode_instances(probs, split_touching=True)
    assert instance_metrics(gt, split)["f1"] == 1.0


def test_membranes_are_split_by_thin_lines():
    cell = np.ones((40, 40), np.float32)
    cell[20, :] = 0.0  # one horizontal membrane
    cell[:20, 10] = 0.0  # and a vertical one in the top half
    labels = decode_semantic_membranes(cell)
    assert labels.max() == 3 and labels[20].max() == 0
    np.testing.assert_array_equal(labels, decode_semantic_membranes(np.stack([1 - cell, cell])))


@pytest.mark.skipif(not DSB_LABELS.is_dir(), reason="../shared/data/dsb2018_train not present")
def test_perfect_prediction_round_trip_on_dsb2018():
    """The training target of a real label map decodes back to (almost) the same instances."""
    files = sorted(DSB_LABELS.glob("*.tif"))[:6]
    tifffile = pytest.importorskip("tifffile")
    f1 = []
    for path in files:
        gt = tifffile.imread(path).astype(np.int32)
        f1.append(instance_metrics(gt, decode_instances(onehot_probs(gt)))["f1"])
    assert np.mean(f1) >= 0.95 and min(f1) >= 0.9
    # And block-wise on a real map: the same labels as the whole-image decode.
    gt = tifffile.imread(files[0]).astype(np.int32)
    probs = onehot_probs(gt)
    np.testing.assert_array_equal(rank(run_blockwise(probs, (64, 64), 32)), decode_instances(probs))
