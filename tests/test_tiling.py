"""Tile grids: superblocks, crop-and-stitch coverage, blend partition of unity, per-model defaults."""
from __future__ import annotations

import numpy as np
import pytest
from standin_models import ConvPair, TinyEquivariantNet, TinyPooledNet, make

from napari_medseg.core.tiling import (TileSettings, blend_profiles, blend_spans, block_tiles,
                                       chunk_aligned, default_tile_settings, input_window,
                                       receptive_radius, superblocks)


@pytest.mark.parametrize("length,tile,overlap", [
    (1000, 256, 64),    # regular grid + a last tile shifted back
    (448, 256, 64),     # exactly a regular grid: pure sin²/cos² ramps
    (300, 256, 128),    # overlap of half the tile
    (257, 256, 64),     # two tiles overlapping almost completely
    (100, 256, 64),     # image smaller than one tile
    (512, 128, 0),      # no overlap
])
def test_blend_profiles_are_a_partition_of_unity(length, tile, overlap):
    spans = blend_spans(length, tile, overlap)
    total = np.zeros(length)
    for (a, b), profile in zip(spans, blend_profiles(length, tile, overlap)):
        assert profile.shape == (b - a,) and np.all(profile > 0)
        total[a:b] += profile
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-12)
    assert spans[0][0] == 0 and spans[-1][1] == length


def test_regular_blend_grid_uses_plain_cos2_ramps():
    first, second = blend_profiles(448, 256, 64)
    ramp = np.sin(0.5 * np.pi * (np.arange(64) + 0.5) / 64) ** 2
    np.testing.assert_allclose(second[:64], ramp, atol=1e-12)
    np.testing.assert_allclose(first[-64:], 1 - ramp, atol=1e-12)
    assert np.all(first[:192] == 1.0)


@pytest.mark.parametrize("shape", [(300, 410), (70, 50)])
def test_blend_weights_sum_to_one_in_2d_across_superblocks(shape):
    settings = TileSettings("blend", tile=64, overlap=16, size_multiple=4)
    total = np.zeros(shape, np.float64)
    for block in superblocks(shape, superblock=128, chunk=32):
        for tile in block_tiles(block.region, shape, settings):
            ky0, ky1, kx0, kx1 = tile.keep
            wy, wx = tile.weights
            assert wy.dtype == np.float32
            total[ky0:ky1, kx0:kx1] += np.outer(wy, wx)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


@pytest.mark.parametrize("shape,core,halo", [((300, 410), 64, 16), ((37, 29), 64, 8), ((256, 256), 128, 0)])
def test_crop_tiles_cover_each_pixel_exactly_once(shape, core, halo):
    m = 4
    settings = TileSettings("crop", tile=core, overlap=halo, size_multiple=m)
    count = np.zeros(shape, np.int32)
    for block in superblocks(shape, superblock=128, chunk=32):
        for tile in block_tiles(block.region, shape, settings):
            wy0, wy1, wx0, wx1 = tile.window
            ky0, ky1, kx0, kx1 = tile.keep
            assert wy0 % m == 0 and wx0 % m == 0           # pooling grid of the network kept
            assert 0 <= wy0 and wy1 <= shape[0] and 0 <= wx0 and wx1 <= shape[1]
            assert wy0 == max(0, ky0 // core * core - halo) and wx1 >= min(shape[1], kx1 + halo)
            count[ky0:ky1, kx0:kx1] += 1
    assert np.all(count == 1)


def test_superblocks_are_chunk_aligned_and_cover_the_region():
    blocks = superblocks((1000, 700), superblock=256, chunk=64)
    assert len(blocks) == 4 * 3
    covered = np.zeros((1000, 700), bool)
    for block in blocks:
        y0, y1, x0, x1 = block.region
        assert y0 % 64 == 0 and x0 % 64 == 0 and (y1 % 64 == 0 or y1 == 1000)
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    part = superblocks((1000, 700), 256, 64, region=(300, 310, 250, 270))
    assert [b.region for b in part] == [(256, 320, 256, 320), (256, 320, 192, 256)][::-1]
    assert chunk_aligned((-5, 2000, 10, 20), 64, (1000, 700)) == (0, 1000, 0, 64)
    with pytest.raises(ValueError, match="does not overlap"):
        chunk_aligned((2000, 2100, 0, 10), 64, (1000, 700))
    with pytest.raises(ValueError, match="multiple of the chunk"):
        superblocks((100, 100), 100, 64)


def test_input_window_is_the_tiles_bounding_box():
    settings = TileSettings("crop", tile=32, overlap=8, size_multiple=4)
    tiles = block_tiles((64, 128, 0, 64), (200, 200), settings)
    assert input_window(tiles) == (56, 136, 0, 72)


def test_tile_settings_validation():
    with pytest.raises(ValueError, match="multiple of 32"):
        TileSettings("crop", tile=100, overlap=32, size_multiple=32)
    with pytest.raises(ValueError, match="halo"):
        TileSettings("crop", tile=128, overlap=20, size_multiple=32)
    with pytest.raises(ValueError, match="half the tile"):
        TileSettings("blend", tile=128, overlap=80, size_multiple=32)
    with pytest.raises(ValueError, match="'crop' or 'blend'"):
        TileSettings("mirror", tile=128, overlap=0)


def test_receptive_radius_is_measured():
    assert receptive_radius(make(ConvPair)) == (2, True)
    radius, covered = receptive_radius(make(TinyEquivariantNet))
    assert covered and 3 <= radius <= 8
    radius, covered = receptive_radius(make(TinyPooledNet))   # global pooling: unbounded
    assert not covered


def test_default_tile_settings_per_model():
    crop = default_tile_settings(make(TinyEquivariantNet))
    assert crop.mode == "crop" and crop.tile == 1024 and crop.covers_receptive_field
    assert crop.overlap % 4 == 0 and crop.overlap >= receptive_radius(make(TinyEquivariantNet))[0]
    blend = default_tile_settings(make(TinyPooledNet), {"training": {"crop_size": 96}})
    assert (blend.mode, blend.tile, blend.overlap) == ("blend", 96, 24)
    assert default_tile_settings(make(TinyPooledNet)).tile == 256
    custom = default_tile_settings(make(TinyEquivariantNet), tile=64, overlap=10)
    assert (custom.tile, custom.overlap, custom.covers_receptive_field) == (64, 12, None)
    from src_models import create_model
    iau = create_model("iau_net", "lite", in_channels=3, num_classes=3)
    assert default_tile_settings(iau).tile == 512                 # declared: deformable conv memory
    assert default_tile_settings(iau, tile=1024).tile == 1024     # the user's choice still wins
