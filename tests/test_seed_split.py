"""Dip split of seeds (DecodeSettings.seed_split_dip): touching nuclei whose confident interiors
meet at a neck get one object each, single nuclei stay whole, and block-wise decoding still
equals the whole-image decode."""
from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.core.instances import DecodeSettings, decode_instances
from napari_medseg.core.metrics import instance_metrics
from napari_medseg.core.blockwise import decode_block, label_dtype
from test_instances import SIZE, disks, rank, run_blockwise


def merged_probs(centres, radius: float, shape, floor: float = 0.55, noise: float = 0.0,
                 seed: int = 0) -> np.ndarray:
    """``(3, H, W) float32`` maps of a network that merged touching disks: inside their union the
    interior probability falls from ~0.99 at each centre to ``floor`` at the rim, so at a neck
    between two centres it dips but stays above a 0.5 seed threshold (one connected seed)."""
    yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
    bump = np.zeros(shape, np.float32)
    for cy, cx in centres:
        bump = np.maximum(bump, 1 - ((yy - cy) ** 2 + (xx - cx) ** 2) / radius ** 2)
    inside = bump > 0
    interior = np.where(inside, floor + (0.99 - floor) * bump, 0.0)
    if noise:
        interior += noise * np.random.default_rng(seed).standard_normal(shape) * inside
    interior = np.clip(interior, 0.0, 0.99).astype(np.float32)
    background = np.where(inside, 0.0, 1.0).astype(np.float32)
    return np.stack([background, interior, 1 - background - interior])


def test_dip_split_separates_touching_disks_that_share_a_seed():
    centres, r = [(32, 30), (32, 52)], 13
    probs = merged_probs(centres, r, (64, 84))
    gt = disks(centres, [r, r], shape=(64, 84))
    plain = decode_instances(probs, seed_threshold=0.5, foreground_threshold=0.5)
    assert plain.max() == 1  # the neck (interior ≈ 0.67) keeps one connected seed
    split = decode_instances(probs, seed_threshold=0.5, foreground_threshold=0.5,
                             seed_split_dip=0.1, seed_smoothing=1.0)
    assert split.max() == 2
    assert instance_metrics(gt, split)["f1"] == 1.0
    # The cut lies on the neck: the two halves are mirror images of each other.
    areas = np.bincount(split.ravel())[1:]
    assert abs(int(areas[0]) - int(areas[1])) <= 2 * r


def test_dip_deeper_than_the_neck_keeps_one_object():
    probs = merged_probs([(32, 30), (32, 52)], 13, (64, 84))
    # The smoothed neck dips about 0.25 below the peaks: a 0.35 threshold does not cut it.
    kept = decode_instances(probs, seed_threshold=0.5, foreground_threshold=0.5,
                            seed_split_dip=0.35, seed_smoothing=1.0)
    assert kept.max() == 1


def test_noisy_single_nucleus_is_not_over_split():
    probs = merged_probs([(40, 40)], 16, (80, 80), noise=0.03, seed=3)
    raw = decode_instances(probs, seed_threshold=0.5, foreground_threshold=0.5,
                           seed_split_dip=0.05, seed_smoothing=0.0)
    smooth = decode_instances(probs, seed_threshold=0.5, foreground_threshold=0.5,
                              seed_split_dip=0.05, seed_smoothing=2.0)
    assert raw.max() > 1  # unsmoothed pixel noise makes spurious peaks ...
    assert smooth.max() == 1  # ... that the smoothing removes


def test_default_settings_do_not_split():
    probs = merged_probs([(32, 30), (32, 52)], 13, (64, 84))
    assert DecodeSettings().seed_split_dip == 0.0
    np.testing.assert_array_equal(
        decode_instances(probs, seed_threshold=0.5, foreground_threshold=0.5),
        decode_instances(probs, seed_threshold=0.5, foreground_threshold=0.5, seed_smoothing=3.0))


@pytest.fixture(scope="module")
def dumbbell_scene() -> np.ndarray:
    """Merged pairs and triples straddling the 64-px block borders and corners, plus lone
    nuclei; some units lie a few pixels apart (within the smoothing window of each other)."""
    groups = [[(64, 52), (64, 74)], [(120, 128), (138, 128)], [(60, 124), (70, 140), (52, 140)],
              [(128, 60), (128, 80)], [(170, 100), (170, 120)], [(25, 25)], [(100, 30)],
              [(100, 48)], [(30, 170), (48, 176)], [(180, 20)]]
    maps = [merged_probs(g, 10, (SIZE, SIZE)) for g in groups]
    interior = np.max([m[1] for m in maps], axis=0)
    background = np.min([m[0] for m in maps], axis=0)
    return np.stack([background, interior, 1 - background - interior]).astype(np.float32)


@pytest.mark.parametrize("block,halo", [((64, 64), 8), ((64, 64), 24), ((96, 32), 4)])
def test_blockwise_equals_whole_image_with_dip_split(dumbbell_scene, block, halo):
    settings = DecodeSettings(seed_threshold=0.5, foreground_threshold=0.5,
                              seed_split_dip=0.1, seed_smoothing=2.0)
    whole = decode_instances(dumbbell_scene, settings)
    assert whole.max() == 17  # every centre its own object
    np.testing.assert_array_equal(rank(run_blockwise(dumbbell_scene, block, halo, settings=settings)),
                                  whole)


def test_block_widens_its_halo_for_a_cut_unit_within_the_smoothing_window():
    """A nucleus in the block lies wholly inside the crop, but a neighbour 4 px away is cut by
    the crop's edge; the dip split's smoothing reads that neighbour, so the block is decoded again
    with a wider halo. Without the dip split the two are independent and the halo stays."""
    a = merged_probs([(56, 40)], 8, (128, 80))       # rows 48..64, in block 0 (rows 0..63)
    b = merged_probs([(77, 40)], 8, (128, 80))       # rows 69..85: cut by the crop edge (row 72)
    probs = np.stack([np.minimum(a[0], b[0]), np.maximum(a[1], b[1]), np.zeros_like(a[0])])
    probs[2] = 1 - probs[0] - probs[1]
    plain = DecodeSettings(seed_threshold=0.5, foreground_threshold=0.5)
    split = DecodeSettings(seed_threshold=0.5, foreground_threshold=0.5, seed_split_dip=0.1,
                           seed_smoothing=2.0)
    halos = []
    for settings in (plain, split):
        out = np.zeros((128, 80), label_dtype((128, 80)))
        halos.append(decode_block(probs, out, 0, (64, 80), 8, settings).halo)
    assert halos == [8, 32]  # 16 still cuts the neighbour (rows 69..85 + 8 px window)


def test_context_radius_follows_the_smoothing_window():
    assert DecodeSettings().context_radius == 0  # off: units are independent
    assert DecodeSettings(seed_split_dip=0.1, seed_smoothing=2.0).context_radius == 8
    assert DecodeSettings(seed_split_dip=0.1, seed_smoothing=0.0).context_radius == 0


@pytest.mark.parametrize("bad", [dict(seed_split_dip=-0.1), dict(seed_split_dip=1.0),
                                 dict(seed_smoothing=-1.0)])
def test_bad_dip_settings_raise(bad):
    with pytest.raises(ValueError, match="seed_split_dip"):
        DecodeSettings(**bad)
