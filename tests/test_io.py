"""Input opening: every kind and layout, lazy region reads, statistics sampling, bad input."""
from __future__ import annotations

import pickle

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from napari_medseg.core.image_sample import statistics_sample
from napari_medseg.core.io import ImageInputError, ImageNotFoundError, guess_axes, open_image

from slide_fixtures import blocky_rgb, write_aperio_svs

RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 60000, (70, 90)).astype(np.uint16)
RGB = RNG.integers(0, 255, (70, 90, 3)).astype(np.uint8)
REGION = (5, 41, 17, 80)


def _expected(image_chw: np.ndarray) -> np.ndarray:
    y0, y1, x0, x1 = REGION
    return image_chw[:, y0:y1, x0:x1]


@pytest.mark.parametrize("layout", ["grey", "yxc", "cyx", "rgba"])
@pytest.mark.parametrize("kind", ["numpy", "dask", "zarr2", "zarr3", "tiff"])
def test_round_trip_every_kind_and_layout(tmp_path, kind, layout):
    chw = {"grey": GREY[None], "yxc": RGB.transpose(2, 0, 1), "cyx": RGB.transpose(2, 0, 1),
           "rgba": RNG.integers(0, 255, (4, 70, 90)).astype(np.uint8)}[layout]
    stored = {"grey": GREY, "yxc": RGB, "cyx": chw, "rgba": chw.transpose(1, 2, 0)}[layout]
    if kind == "numpy":
        image = stored
    elif kind == "dask":
        image = da.from_array(stored, chunks=32)
    elif kind.startswith("zarr"):
        image = str(tmp_path / "img.zarr")
        array = zarr.create_array(image, shape=stored.shape, chunks=(32,) * stored.ndim,
                                  dtype=stored.dtype, zarr_format=int(kind[-1]))
        array[...] = stored
    else:
        image = str(tmp_path / "img.tif")
        options = {"grey": {}, "yxc": {"photometric": "rgb"}, "rgba": {"photometric": "rgb"},
                   "cyx": {"photometric": "rgb", "planarconfig": "separate"}}[layout]
        tifffile.imwrite(image, stored, **options)
    source = open_image(image)
    assert source.shape == (70, 90)
    assert source.channels == chw.shape[0]
    assert source.dtype == stored.dtype
    np.testing.assert_array_equal(source.read_region(*REGION), _expected(chw))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int32, np.float32, np.float64, bool])
def test_any_dtype(dtype):
    data = (RNG.random((40, 50)) * 100).astype(dtype)
    source = open_image(data)
    assert source.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(source.read_region(0, 40, 0, 50)[0], data)


def test_layout_overrides():
    odd = RNG.integers(0, 255, (3, 40, 3)).astype(np.uint8)  # ambiguous: 3 rows or 3 channels?
    assert open_image(odd).spec.axes == "cyx"
    as_yxc = open_image(odd, channel_axis=-1)
    assert as_yxc.shape == (3, 40) and as_yxc.channels == 3
    assert open_image(odd, axes="yxc").shape == (3, 40)
    two = open_image(RGB, channels=(0, 2))
    np.testing.assert_array_equal(two.read_region(0, 70, 0, 90), RGB.transpose(2, 0, 1)[[0, 2]])


def test_zarr_group_with_one_array_and_ome_zarr_pyramid(tmp_path):
    group = zarr.open_group(tmp_path / "one.zarr", mode="w")
    group.create_array("image", data=GREY, chunks=(32, 32))
    np.testing.assert_array_equal(open_image(tmp_path / "one.zarr").read_region(0, 70, 0, 90)[0], GREY)

    ome = zarr.open_group(tmp_path / "ome.zarr", mode="w", zarr_format=2)
    levels = [RGB.transpose(2, 0, 1), RGB.transpose(2, 0, 1)[:, ::2, ::2], RGB.transpose(2, 0, 1)[:, ::4, ::4]]
    for k, level in enumerate(levels):
        ome.create_array(str(k), data=np.ascontiguousarray(level), chunks=(3, 32, 32))
    ome.attrs["multiscales"] = [{
        "version": "0.4", "axes": [{"name": "c", "type": "channel"},
                                   {"name": "y", "type": "space", "unit": "micrometer"},
                                   {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [1, 0.25 * 2 ** k, 0.25 * 2 ** k]}]} for k in range(3)]}]
    source = open_image(tmp_path / "ome.zarr")
    assert source.levels == ((70, 90), (35, 45), (18, 23))
    assert source.pixel_size == (0.25, 0.25) and source.unit == "micrometer"
    np.testing.assert_array_equal(source.read_region(*REGION), _expected(levels[0]))
    np.testing.assert_array_equal(source.read_region(0, 18, 0, 23, level=2), levels[2])
    sample = statistics_sample(source, max_pixels=1000)
    assert sample.pixels.shape == (3, 18, 23) and "level 2" in sample.description


def test_tiff_pyramid_levels(tmp_path):
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as writer:
        writer.write(RGB, subifds=1, tile=(32, 32), photometric="rgb")
        writer.write(RGB[::2, ::2], subfiletype=1, tile=(32, 32), photometric="rgb")
    source = open_image(path)
    assert source.levels == ((70, 90), (35, 45))
    np.testing.assert_array_equal(source.read_region(0, 35, 0, 45, level=1), RGB[::2, ::2].transpose(2, 0, 1))


def test_sources_pickle_and_reopen(tmp_path):
    tiff = tmp_path / "img.tif"
    tifffile.imwrite(tiff, GREY)
    zarr.create_array(str(tmp_path / "img.zarr"), data=RGB, chunks=(32, 32, 3))
    for image in (tiff, tmp_path / "img.zarr", RGB, da.from_array(RGB)):
        source = open_image(image)
        clone = pickle.loads(pickle.dumps(source))
        np.testing.assert_array_equal(clone.read_region(*REGION), source.read_region(*REGION))


def test_statistics_sample_never_reads_everything():
    big = da.zeros((6000, 7000), dtype=np.uint16, chunks=1000)
    sample = statistics_sample(open_image(big), max_pixels=256 * 256 * 9)
    assert sample.pixels.size <= 256 * 256 * 9
    assert "tiles" in sample.description
    with_nan = RNG.random((50, 60)).astype(np.float32)
    with_nan[3, 4], with_nan[5, 6] = np.nan, np.inf
    assert statistics_sample(open_image(with_nan)).nonfinite == 2


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        open_image(tmp_path / "nope.zarr")
    with pytest.raises(ImageNotFoundError):
        open_image(str(tmp_path / "nope.tif"))


def test_zarr_without_array_is_a_clear_error(tmp_path):
    group = zarr.open_group(tmp_path / "empty.zarr", mode="w")
    with pytest.raises(ImageInputError, match="no image array"):
        open_image(tmp_path / "empty.zarr")
    group.create_group("sub")
    with pytest.raises(ImageInputError, match="only groups"):
        open_image(tmp_path / "empty.zarr")
    group.create_array("a", shape=(4, 4), dtype="uint8")
    group.create_array("b", shape=(4, 4), dtype="uint8")
    with pytest.raises(ImageInputError, match="several arrays"):
        open_image(tmp_path / "empty.zarr")


def test_3d_and_4d_data_ask_which_plane():
    volume = RNG.integers(0, 255, (20, 64, 64)).astype(np.uint8)
    with pytest.raises(ImageInputError, match=r"index=\{'z': 10\}"):
        open_image(volume)
    plane = open_image(volume, index={"z": 5})
    np.testing.assert_array_equal(plane.read_region(0, 64, 0, 64)[0], volume[5])
    with pytest.raises(ImageInputError, match="outside"):
        open_image(volume, index={"z": 20})
    hyper = RNG.integers(0, 255, (5, 2, 32, 32)).astype(np.uint8)
    assert guess_axes(hyper.shape) == "zcyx"
    source = open_image(hyper, index={"z": 1})
    assert source.channels == 2
    np.testing.assert_array_equal(source.read_region(0, 32, 0, 32), hyper[1])
    singleton = open_image(np.zeros((1, 1, 16, 16), np.uint8), axes="tzyx")
    assert singleton.shape == (16, 16)


# ----------------------------------------------------------------------------- whole slides, pixel size
def test_aperio_svs_opens_with_its_pyramid_and_micrometres_per_pixel(tmp_path):
    image = blocky_rgb()
    write_aperio_svs(tmp_path / "slide.svs", image)
    source = open_image(tmp_path / "slide.svs")
    assert source.levels == ((512, 512), (128, 128)) and source.channels == 3
    assert source.pixel_size == (0.252, 0.252) and source.unit == "micrometer"
    region = source.read_region(40, 200, 100, 300).astype(int)
    expected = image[40:200, 100:300].transpose(2, 0, 1).astype(int)
    assert np.abs(region - expected).mean() < 3    # JPEG, lossy


@pytest.mark.parametrize("kind, expected", [
    ("ome", ((0.4, 0.5), "micrometer")),
    ("ome-nm", ((400.0, 500.0), "nanometer")),
    ("imagej", ((0.3, 0.3), "micrometer")),
    ("centimetre tags", ((0.46, 0.46), "micrometer")),
    ("inch tags", ((0.5, 0.5), "micrometer")),
    ("72 dpi", (None, None)),         # a document default, not a microscope's pixel
    ("no resolution", (None, None)),
])
def test_tiff_pixel_size_comes_from_its_metadata(tmp_path, kind, expected):
    path = tmp_path / ("img.ome.tif" if kind.startswith("ome") else "img.tif")
    options = {
        "ome": {"metadata": {"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.4}},
        "ome-nm": {"metadata": {"axes": "YX", "PhysicalSizeX": 500, "PhysicalSizeXUnit": "nm",
                                "PhysicalSizeY": 400, "PhysicalSizeYUnit": "nm"}},
        "imagej": {"imagej": True, "resolution": (1 / 0.3, 1 / 0.3), "metadata": {"unit": "um"}},
        "centimetre tags": {"resolution": (1e4 / 0.46, 1e4 / 0.46), "resolutionunit": "CENTIMETER"},
        "inch tags": {"resolution": (25_400 / 0.5, 25_400 / 0.5), "resolutionunit": "INCH"},
        "72 dpi": {"resolution": (72, 72), "resolutionunit": "INCH"},
        "no resolution": {},
    }[kind]
    tifffile.imwrite(path, GREY, **options)
    source = open_image(path)
    if expected[0] is None:
        assert source.pixel_size is None and source.unit is None
    else:
        assert source.pixel_size == pytest.approx(expected[0]) and source.unit == expected[1]
    np.testing.assert_array_equal(source.read_region(*REGION)[0], GREY[5:41, 17:80])
