"""Decoding with a learnt edge distance (``split_surface="distance"``): in memory, in the
threshold search, block by block, and through the engine with a distance-head model."""
from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.core import decode_tuning
from napari_medseg.core.instances import DecodeSettings, decode_instances
from napari_medseg.core.metrics import instance_metrics
from test_instances import SIZE, disks, rank, run_blockwise


def flat_blobs(groups, radius: float, shape) -> tuple[np.ndarray, np.ndarray]:
    """Maps of a network that merged each group of touching disks into one flat blob (interior
    0.9 everywhere inside, so its interior probability has no dip to split at), while its learnt
    distance is a cone per disk (1 at each centre, 0 at the rim). Returns ``(3, H, W)``
    probabilities and the ``(H, W)`` distance, float32."""
    yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
    distance = np.zeros(shape, np.float32)
    for group in groups:
        for cy, cx in group:
            distance = np.maximum(distance, 1 - np.hypot(yy - cy, xx - cx) / radius)
    inside = distance > 0
    interior = np.where(inside, 0.9, 0.0)
    background = np.where(inside, 0.0, 1.0)
    probs = np.stack([background, interior, 1 - background - interior]).astype(np.float32)
    return probs, np.clip(distance, 0, 1).astype(np.float32)


SETTINGS = dict(seed_threshold=0.5, foreground_threshold=0.5, seed_split_dip=0.1, seed_smoothing=1.0)


def test_distance_splits_a_flat_blob_the_interior_cannot():
    centres, r = [(32, 30), (32, 52)], 13
    probs, distance = flat_blobs([centres], r, (64, 84))
    interior = decode_instances(probs, DecodeSettings(**SETTINGS), distance)
    assert interior.max() == 1              # flat interior: one summit, one object
    split = decode_instances(probs, DecodeSettings(**SETTINGS, split_surface="distance"), distance)
    assert split.max() == 2
    gt = disks(centres, [r, r], shape=(64, 84))
    assert instance_metrics(gt, split)["f1"] == 1.0
    # uint8 fixed point, (1, H, W) as the store holds it, decodes the same
    as_stored = np.round(distance * 255).astype(np.uint8)[None]
    np.testing.assert_array_equal(
        decode_instances(probs, DecodeSettings(**SETTINGS, split_surface="distance"), as_stored), split)


def test_missing_or_misshapen_distance_is_a_clear_error():
    probs, distance = flat_blobs([[(32, 30)]], 13, (64, 84))
    settings = DecodeSettings(**SETTINGS, split_surface="distance")
    with pytest.raises(ValueError, match="no distance map"):
        decode_instances(probs, settings)
    with pytest.raises(ValueError, match="must be"):
        decode_instances(probs, settings, distance[:10])
    with pytest.raises(ValueError, match="split_surface"):
        DecodeSettings(split_surface="gradient")
    # the distance is only read when the split is on and set to it
    assert not DecodeSettings(split_surface="distance").needs_distance
    decode_instances(probs, DecodeSettings(seed_split_dip=0.1))


def test_threshold_search_chooses_the_distance_when_it_scores_better():
    groups, r = [[(32, 30), (32, 52)], [(90, 40), (90, 62), (110, 50)]], 13
    probs, distance = flat_blobs(groups, r, (128, 96))
    gt = disks([c for g in groups for c in g], [r] * 5, shape=(128, 96))
    result = decode_tuning.search_thresholds([{"probs": probs, "distance": distance}], [gt],
                                             DecodeSettings(**SETTINGS), passes=1,
                                             grid=decode_tuning.DISTANCE_GRID)
    assert result["settings"] == {"split_surface": "distance"}
    assert result["before"]["f1"] < 0.5 and result["after"]["f1"] == 1.0
    # plain arrays (no distance) still work for everything but the distance surface
    plain = decode_tuning.search_thresholds([probs], [gt], DecodeSettings(**SETTINGS), passes=1,
                                            grid={"seed_threshold": (0.5, 0.95)})
    assert plain["after"]["f1"] == plain["before"]["f1"]


@pytest.mark.parametrize("block,halo", [((64, 64), 8), ((96, 32), 4)])
def test_blockwise_equals_whole_image_with_the_distance_split(block, halo):
    groups = [[(64, 52), (64, 74)], [(120, 128), (138, 128)], [(60, 124), (70, 140), (52, 140)],
              [(25, 25)], [(170, 100), (170, 120)], [(30, 170), (48, 176)]]
    probs, distance = flat_blobs(groups, 10, (SIZE, SIZE))
    settings = DecodeSettings(**SETTINGS, split_surface="distance")
    whole = decode_instances(probs, settings, distance)
    assert whole.max() == 12                # every centre its own object
    np.testing.assert_array_equal(
        rank(run_blockwise(probs, block, halo, settings=settings, distance_array=distance[None])), whole)


def test_engine_decodes_with_the_distance_map_of_a_distance_head_model(tmp_path):
    import torch
    from src_models import create_model

    from napari_medseg.core.inference import InferenceSettings
    from napari_medseg.core.pipeline import run_segmentation
    from napari_medseg.core.progress import drain
    from napari_medseg.core.store import OutputStore

    torch.manual_seed(0)
    image = np.random.default_rng(0).integers(0, 255, (3, 96, 96), dtype=np.uint8)
    card = {"normalization": {"method": "fixed", "low": 0, "high": 255}, "tile_size": 64}
    settings = DecodeSettings(seed_threshold=0.3, foreground_threshold=0.3, seed_split_dip=0.03,
                              seed_smoothing=1.0, split_surface="distance")
    engine = InferenceSettings(device="cpu", mc_samples=0, probs_dtype="float32")
    model = create_model("gca_resunet", "lite", distance_head=True).eval()
    out = drain(run_segmentation(image, model, card, tmp_path / "a.zarr", engine, settings, halo=16)).output
    store = OutputStore.open(out, mode="r")
    assert store.map_names == ("probs", "distance")
    expected = decode_instances(store.read_map("probs"), settings, store.read_map("distance"))
    assert expected.max() > 0
    np.testing.assert_array_equal(rank(np.asarray(store.labels()[:])), expected)
    plain = create_model("gca_resunet", "lite").eval()
    with pytest.raises(ValueError, match="no 'distance' map"):
        drain(run_segmentation(image, plain, card, tmp_path / "b.zarr", engine, settings))
