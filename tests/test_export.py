"""Export labels (issue 8), Qt-free: round trips of every format, block-wise correctness, bad
input, cancel, and a memory bound measured in a subprocess.

Images stay small (a few hundred pixels; the memory test 4096² from zarr) and blocks small
(64 px) so objects cross block borders without large images.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_medseg import cli
from napari_medseg.core import bench_export
from napari_medseg.core.export import export_labels, export_label_tiff, label_dtype, pyramid_shapes
from napari_medseg.core.export_source import ExportError, open_label_source
from napari_medseg.core.progress import drain
from napari_medseg.export_job import (format_for_path, output_for, source_from_layer,
                                      source_from_layer_data)
from napari_medseg._writer import write_labels
from src_models import weights_io

from export_fixtures import RUN, blobs, leftovers, make_store, rasterise

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def labels():
    return blobs()


@pytest.fixture
def store(tmp_path, labels):
    return make_store(tmp_path / "run.medseg.zarr", labels)


# ----------------------------------------------------------------------------- label images
def test_label_dtype_and_pyramid_shapes():
    assert label_dtype(0) == np.uint16 and label_dtype(65535) == np.uint16
    assert label_dtype(65536) == np.uint32 and label_dtype(2**32) == np.uint64
    assert pyramid_shapes((1000, 700), 100) == [(1000, 700), (500, 350), (250, 175), (125, 88)]
    assert pyramid_shapes((200, 100), 256) == [(200, 100)]


@pytest.mark.parametrize("step, dtype", [(3, np.uint16), (1200, np.uint32)])
def test_tiff_round_trip_is_exact(tmp_path, step, dtype):
    labels = blobs(step=step)
    result = drain(export_labels(labels, tmp_path / "l.tif", "tiff", pixel_size=0.25))
    assert result.dtype == np.dtype(dtype).name and result.warnings == ()
    with tifffile.TiffFile(tmp_path / "l.tif") as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == 256 and page.compression == 8   # zlib
        assert page.dtype == dtype and not tif.is_bigtiff
        assert page.tags["XResolution"].value == (40000, 1) and page.tags["ResolutionUnit"].value == 3
        np.testing.assert_array_equal(page.asarray(), labels)
    assert leftovers(tmp_path) == []


def test_tiff_from_store_streams_tile_by_tile(tmp_path, store, labels):
    records = []
    result = drain(export_labels(tmp_path / "run.medseg.zarr", tmp_path / "s.tif", "tiff", tile=64),
                   records.append)
    np.testing.assert_array_equal(tifffile.imread(result.path), labels)
    writing = [r for r in records if r.stage == "writing"]
    assert len(writing) == -(-labels.shape[0] // 64) and writing[-1].fraction == 1.0
    with tifffile.TiffFile(result.path) as tif:   # the store's 0.5 µm pixels
        assert tif.pages[0].tags["XResolution"].value == (20000, 1)


def test_an_unfinished_run_exports_with_a_warning(tmp_path, labels):
    store, _ = make_store(tmp_path / "u.medseg.zarr", labels)
    store.group["_progress/labels"][0, 0] = 0             # one chunk not written by the run
    result = drain(export_labels(tmp_path / "u.medseg.zarr", tmp_path / "u.csv", "csv"))
    assert any("unfinished (24 of 25 chunks)" in w for w in result.warnings)


def test_ome_tiff_pyramid_and_provenance(tmp_path, store, labels):
    result = drain(export_labels(store[0], tmp_path / "p.ome.tif", "ome-tiff", smallest=64, tile=64))
    with tifffile.TiffFile(result.path) as tif:
        assert tif.is_ome
        levels = tif.series[0].levels
        assert [level.shape for level in levels] == pyramid_shapes(labels.shape, 64) == \
            [(300, 260), (150, 130), (75, 65)]
        for index, level in enumerate(levels):
            factor = 2 ** index
            np.testing.assert_array_equal(level.asarray(), labels[::factor, ::factor])
            assert set(np.unique(level.asarray())) <= set(np.unique(labels))   # labels stay labels
        assert len(tif.pages[0].tags["SubIFDs"].value) == 2
        ome = ET.fromstring(tif.ome_metadata)
    ns = {"ome": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}
    pixels = ome.find(".//ome:Pixels", ns)
    assert pixels.get("Type") == "uint16" and float(pixels.get("PhysicalSizeX")) == 0.5
    assert pixels.get("PhysicalSizeXUnit") == "µm"
    values = {m.get("K"): m.text for m in ome.findall(".//ome:MapAnnotation//ome:M", ns)}
    assert values["model"] == "vunet" and values["weights_sha256"] == RUN["weights_sha256"]
    assert values["weights_version"] == RUN["weights_sha256"][:12]
    assert values["run_date"] == RUN["date"] and "export_date" in values


def test_ome_tiff_levels_from_level_zero_match_the_store_pyramid(tmp_path, labels):
    drain(export_labels(labels, tmp_path / "a.ome.tif", "ome-tiff", smallest=64))
    with tifffile.TiffFile(tmp_path / "a.ome.tif") as tif:
        assert len(tif.series[0].levels) == 3
        np.testing.assert_array_equal(tif.series[0].levels[2].asarray(), labels[::4, ::4])


@pytest.mark.parametrize("fmt", ["tiff", "ome-tiff", "csv", "geojson"])
def test_relabel_numbers_objects_the_same_way_in_every_format(tmp_path, fmt):
    labels = blobs(step=70_001)                           # IDs up to ~4 million: uint32
    ids = np.unique(labels)[1:]
    expected = np.searchsorted(np.unique(labels), labels)  # rank: 0 stays 0, objects 1..N
    options = {"smallest": 64} if fmt == "ome-tiff" else {}
    result = drain(export_labels(labels, tmp_path / "r.out", fmt, relabel=True, **options))
    assert result.max_label == ids.size
    if "tiff" in fmt:
        assert result.dtype == "uint16"
        with tifffile.TiffFile(result.path) as tif:
            for index, level in enumerate(tif.series[0].levels):
                np.testing.assert_array_equal(level.asarray(), expected[::2**index, ::2**index])
    elif fmt == "csv":
        table = pd.read_csv(result.path)
        assert list(table["label"]) == list(range(1, ids.size + 1))
        assert list(table["original_label"]) == list(ids)
    else:
        for feature in json.loads(result.path.read_text())["features"]:
            new, old = feature["properties"]["label"], feature["properties"]["measurements"]["original_label"]
            assert ids[new - 1] == old
            drawn = rasterise(feature["geometry"], labels.shape)
            assert (drawn & (labels == old)).sum() / (drawn | (labels == old)).sum() >= 0.95


def test_bigtiff_is_chosen_past_4gb(tmp_path, monkeypatch):
    from napari_medseg.core import export

    monkeypatch.setattr(export, "BIGTIFF_THRESHOLD", 100)
    drain(export_label_tiff(blobs((64, 64), count=3), tmp_path / "b.tif"))
    with tifffile.TiffFile(tmp_path / "b.tif") as tif:
        assert tif.is_bigtiff


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("fmt", ["tiff", "ome-tiff", "csv", "geojson"])
def test_empty_labels_export_and_warn(tmp_path, fmt):
    result = drain(export_labels(np.zeros((50, 40), np.uint8), tmp_path / f"e{fmt}", fmt))
    assert result.path.exists() and any("empty" in w for w in result.warnings)


@pytest.mark.parametrize("data, message", [
    (np.ones((10, 10), np.float32), "must be integers"),
    (np.ones((10, 10), bool), "must be integers"),
    (np.ones((2, 10, 10), np.uint16), "2D labels"),
])
def test_float_bool_and_3d_labels_are_refused(tmp_path, data, message):
    with pytest.raises(ExportError, match=message):
        drain(export_labels(data, tmp_path / "x.tif"))


@pytest.mark.parametrize("fmt", ["tiff", "ome-tiff", "csv", "geojson"])
def test_negative_labels_are_refused_and_nothing_is_written(tmp_path, fmt):
    labels = blobs().astype(np.int32)
    labels[250, 250] = -4
    with pytest.raises(ExportError, match="negative"):
        drain(export_labels(labels, tmp_path / "n.out", fmt, block=64))
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_without_overwrite(tmp_path, labels):
    target = tmp_path / "l.tif"
    target.write_bytes(b"keep me")
    with pytest.raises(ExportError, match="already exists"):
        drain(export_labels(labels, target))
    assert target.read_bytes() == b"keep me"
    drain(export_labels(labels, target, overwrite=True))
    np.testing.assert_array_equal(tifffile.imread(target), labels)


def test_other_bad_requests(tmp_path, labels):
    with pytest.raises(ExportError, match="unknown export format"):
        drain(export_labels(labels, tmp_path / "x", "png"))
    with pytest.raises(ExportError, match="does not exist"):
        drain(export_labels(labels, tmp_path / "missing" / "x.tif"))
    with pytest.raises(ExportError, match="positive"):
        drain(export_labels(labels, tmp_path / "x.tif", pixel_size=-1))
    with pytest.raises(ExportError, match="intensity image is 10×10"):
        drain(export_labels(labels, tmp_path / "x.csv", "csv", image=np.zeros((10, 10))))
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(ExportError, match="3 channels"):
        open_label_source(rgb)
    assert leftovers(tmp_path) == []


def test_a_non_labels_layer_is_refused():
    from napari.layers import Image

    with pytest.raises(ExportError, match="not labels"):
        source_from_layer(Image(np.zeros((8, 8), np.uint8), name="raw"))


def test_read_only_folder_and_full_disk_give_clear_errors(tmp_path, labels, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    with monkeypatch.context() as patch:
        patch.setattr(weights_io.tempfile, "mkstemp", refuse)
        with pytest.raises(ExportError, match="cannot write to .*choose a folder"):
            drain(export_labels(labels, tmp_path / "r.tif"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tifffile.TiffWriter, "write", full)
    with pytest.raises(ExportError, match="disk .* is full"):
        drain(export_labels(labels, tmp_path / "f.tif"))
    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    with pytest.raises(ExportError, match="is full"):
        drain(export_labels(labels, tmp_path / "f.csv", "csv"))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- cancel
@pytest.mark.parametrize("fmt, steps", [("tiff", 4), ("ome-tiff", 6), ("csv", 3), ("geojson", 8)])
def test_cancel_leaves_nothing(tmp_path, store, fmt, steps):
    job = export_labels(store[0], tmp_path / "c.out", fmt, tile=16, block=64) if "tiff" in fmt \
        else export_labels(store[0], tmp_path / "c.out", fmt, block=64)
    for _ in range(steps):
        record = next(job)
    assert record.fraction < 1.0 or record.stage == "checking"
    assert leftovers(tmp_path)                  # the temporary file exists while it runs
    job.close()                                 # what Cancel does (worker.quit → generator.close)
    assert leftovers(tmp_path) == [] and not (tmp_path / "c.out").exists()


# ----------------------------------------------------------------------------- entry points
def test_writer_contribution_writes_tiff_and_ome_tiff(tmp_path, labels, store):
    meta = {"name": "cells", "scale": (0.5, 0.5), "units": ("micrometer", "micrometer"),
            "metadata": {}}
    [path] = write_labels(str(tmp_path / "w.tif"), labels, meta)
    np.testing.assert_array_equal(tifffile.imread(path), labels)
    meta["metadata"] = {"medseg": {"output": str(tmp_path / "run.medseg.zarr")}}
    [path] = write_labels(str(tmp_path / "w.ome.tif"), store[0].labels(), meta)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and "vunet" in tif.ome_metadata
    with pytest.warns(UserWarning, match="empty"):
        write_labels(str(tmp_path / "e"), np.zeros((9, 9), np.uint16), {"name": "e"})
    assert (tmp_path / "e.tif").exists()


def test_layer_data_sources():
    source = source_from_layer_data([np.zeros((8, 6), np.uint16), np.zeros((4, 3), np.uint16)],
                                    {"name": "x", "scale": (2.0, 2.0), "multiscale": True})
    assert source.shape == (8, 6) and source.physical == (2.0, 2.0, "µm")
    plain = source_from_layer_data(np.zeros((8, 6), np.uint16), {"scale": (1, 1), "units": ("pixel",) * 2})
    assert plain.physical is None
    nm = source_from_layer_data(np.zeros((8, 6), np.uint16), {"scale": (5, 5), "units": ("nanometer",) * 2})
    assert nm.physical == (5.0, 5.0, "nm")
    assert output_for("/a/b.tif", "ome-tiff") == Path("/a/b.ome.tif")
    assert output_for("/a/b.ome.tif", "csv") == Path("/a/b.csv")
    assert [format_for_path(p) for p in ("a.ome.tiff", "a.tif", "a.geojson", "a.csv")] == \
        ["ome-tiff", "tiff", "geojson", "csv"]


@pytest.mark.parametrize("fmt", ["tiff", "ome-tiff", "geojson", "csv"])
def test_cli_export_each_format(tmp_path, store, fmt, capsys):
    out = tmp_path / f"cli{'.ome.tif' if fmt == 'ome-tiff' else '.' + fmt.replace('tiff', 'tif')}"
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, np.ones(store[0].layout.image_shape, np.uint8))
    assert cli.main(["export", str(tmp_path / "run.medseg.zarr"), "-o", str(out), "--image", str(image)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == fmt and out.exists()
    assert cli.main(["export", str(tmp_path / "run.medseg.zarr"), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_export_relabel_and_pixel_size(tmp_path, labels, capsys):
    tifffile.imwrite(tmp_path / "in.tif", labels * 1000)
    out = tmp_path / "out.ome.tif"
    assert cli.main(["export", str(tmp_path / "in.tif"), "-o", str(out), "--relabel",
                     "--pixel-size", "0.25"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "ome-tiff"
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].dtype == np.uint16 and 'PhysicalSizeX="0.25"' in tif.ome_metadata
        assert tif.pages[0].asarray().max() == len(np.unique(labels)) - 1


def test_cli_export_refuses_float_labels_in_one_line(tmp_path, capsys):
    tifffile.imwrite(tmp_path / "f.tif", np.ones((20, 20), np.float32))
    assert cli.main(["export", str(tmp_path / "f.tif"), "-o", str(tmp_path / "o.tif")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must be integers" in err[0]
    assert cli.main(["export", str(tmp_path / "nope.zarr"), "-o", str(tmp_path / "o.tif")]) == 2


# ----------------------------------------------------------------------------- memory
MEMORY_SIZE = 4096
MEMORY_BOUND_MB = 32     # half of the 4096² uint32 labels (64 MB)


@pytest.fixture(scope="module")
def labels_4096(tmp_path_factory):
    folder = tmp_path_factory.mktemp("memory")
    bench_export.write_label_zarr(folder / "labels.zarr", MEMORY_SIZE)
    return folder


@pytest.mark.parametrize("fmt", ["tiff", "ome-tiff", "csv", "geojson"])
def test_export_of_4096_squared_zarr_stays_under_memory_bound(labels_4096, fmt):
    """Each export runs in a fresh process (napari_medseg.core.bench_export --one) that reports
    the peak of tracemalloc over the export, imports excluded."""
    output = labels_4096 / f"out{bench_export.SUFFIX[fmt]}"
    done = subprocess.run([sys.executable, "-m", "napari_medseg.core.bench_export", "--one",
                           str(labels_4096 / "labels.zarr"), str(output), fmt],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{fmt}: peak traced {measured['traced_peak_mb']} MB, peak RSS {measured['peak_rss_mb']} MB, "
          f"{measured['seconds']} s for {MEMORY_SIZE}² uint32 labels")
    assert measured["traced_peak_mb"] < MEMORY_BOUND_MB
    assert output.exists()


@pytest.mark.parametrize("suffix", [".tif", ".ome.tif", ".geojson", ".csv"])
def test_napari_save_layers_writes_every_format_through_the_plugin(tmp_path, labels, suffix):
    """File → Save Layers: napari picks the plugin's writer by the file name and the file is the
    same export the widget and the CLI write."""
    import napari
    from napari.layers import Labels
    from npe2 import PluginManager

    PluginManager.instance().discover()     # what napari does at start-up
    target = tmp_path / f"cells{suffix}"
    written = napari.save_layers(str(target), [Labels(labels, name="cells")], plugin="napari-medseg")
    assert written == [str(target)] and target.exists()
    if suffix.endswith(".tif"):
        np.testing.assert_array_equal(tifffile.imread(target), labels)
    elif suffix == ".csv":
        rows = target.read_text().strip().splitlines()
        assert len(rows) - 1 == len(np.unique(labels)) - 1
    else:
        features = json.loads(target.read_text())["features"]
        assert len(features) == len(np.unique(labels)) - 1


def test_written_files_get_ordinary_permissions(tmp_path, labels):
    """Atomic writes go through mkstemp (owner-only 0600); the finished files must be readable by
    colleagues like any file the user makes (0666 minus the umask), and version folders likewise."""
    import os
    import stat

    from src_models import create_model, save_weights
    from src_models.weights_io import temporary_folder

    old = os.umask(0o022)
    try:
        exported = drain(export_labels(labels, tmp_path / "perm.tif", "tiff")).path
        save_weights(create_model("gca_resunet", "lite", in_channels=1, num_classes=3), tmp_path / "w")
        folder = temporary_folder(tmp_path, ".v-")
    finally:
        os.umask(old)
    for path in (exported, tmp_path / "w.safetensors", tmp_path / "w.json"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755
