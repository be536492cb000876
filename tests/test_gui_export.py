"""GUI: the Export labels widget and napari's File → Save Layers (run under xvfb-run, see README)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_medseg.core.export import FORMATS

from conftest import SCREENSHOTS
from test_export import blobs, make_store

pytestmark = pytest.mark.gui

TIMEOUT_MS = 60_000


def open_widget(viewer):
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Export labels")
    return widget


def choose(combo, data) -> None:
    index = combo.findData(data)
    assert index >= 0, data
    combo.setCurrentIndex(index)


def export_and_wait(widget, qtbot, cancel: bool = False):
    with qtbot.waitSignal(widget.export_finished, timeout=TIMEOUT_MS) as finished:
        widget.run_button.click()
        assert widget.worker is not None, widget.status.text()
        if cancel:
            widget.cancel()
    return finished.args[0]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_widget_exports_a_labels_layer(make_napari_viewer, qtbot, tmp_path, fmt):
    viewer = make_napari_viewer()
    labels = blobs()
    viewer.add_image(np.random.default_rng(0).random(labels.shape, np.float32), name="raw")
    viewer.add_labels(labels, name="cells", scale=(0.5, 0.5))
    widget = open_widget(viewer)
    choose(widget.labels, "cells")
    widget.output.setText(str(tmp_path / "cells.csv"))
    choose(widget.format, fmt)                            # the suffix follows the format
    choose(widget.image, "raw")
    result = export_and_wait(widget, qtbot)
    assert result is not None, widget.status.text()
    assert result.path == tmp_path / f"cells{FORMATS[fmt]}" and result.path.exists()
    assert widget.image.isEnabled() == (fmt in ("csv", "geojson"))
    if fmt in ("tiff", "ome-tiff"):
        np.testing.assert_array_equal(tifffile.imread(result.path), labels)
    elif fmt == "csv":
        table = pd.read_csv(result.path)
        assert len(table) == len(np.unique(labels)) - 1 and "mean_intensity" in table
    else:
        data = json.loads(result.path.read_text())
        assert len(data["features"]) == len(np.unique(labels)) - 1
    assert "Exported" in widget.status.text()


def test_widget_exports_a_store_from_disk(make_napari_viewer, qtbot, tmp_path):
    labels = blobs()
    make_store(tmp_path / "run.medseg.zarr", labels)
    viewer = make_napari_viewer()
    widget = open_widget(viewer)
    choose(widget.labels, "__store__")
    assert widget.store.isEnabled()
    widget.store.setText(str(tmp_path / "run.medseg.zarr"))
    choose(widget.format, "ome-tiff")
    result = export_and_wait(widget, qtbot)                # empty output: next to the store
    assert result.path == tmp_path / "run.ome.tif"
    with tifffile.TiffFile(result.path) as tif:
        assert tif.is_ome and "vunet" in tif.ome_metadata
        np.testing.assert_array_equal(tif.series[0].levels[0].asarray(), labels)
    SCREENSHOTS.mkdir(exist_ok=True)
    viewer.screenshot(str(SCREENSHOTS / "export_widget.png"), canvas_only=False)
    choose(widget.format, "tiff")
    widget.relabel.setChecked(True)
    result = export_and_wait(widget, qtbot)
    assert tifffile.imread(result.path).max() == result.max_label == len(np.unique(labels)) - 1


def test_widget_cancel_and_existing_file(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_labels(blobs((2048, 2048), count=400), name="big")
    widget = open_widget(viewer)
    choose(widget.format, "geojson")
    target = tmp_path / "big.geojson"
    widget.output.setText(str(target))
    assert export_and_wait(widget, qtbot, cancel=True) is None
    assert "Cancelled" in widget.status.text()
    assert list(tmp_path.iterdir()) == []                 # no file, no temporary left behind
    target.write_text("keep")
    widget.confirm_overwrite = lambda path: False
    widget.run()
    assert widget.worker is None and "kept" in widget.status.text() and target.read_text() == "keep"


def test_widget_warns_about_empty_labels(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_labels(np.zeros((64, 64), np.uint16), name="nothing")
    widget = open_widget(viewer)
    widget.output.setText(str(tmp_path / "nothing.tif"))
    result = export_and_wait(widget, qtbot)
    assert result.path.exists() and any("empty" in w for w in result.warnings)


@pytest.mark.parametrize("name", ["saved.tif", "saved.ome.tif"])
def test_napari_save_layers_uses_the_writer(make_napari_viewer, tmp_path, name):
    viewer = make_napari_viewer()
    labels = blobs()
    viewer.add_labels(labels, name="cells", scale=(0.5, 0.5))
    written = viewer.layers.save(str(tmp_path / name), selected=True, plugin="napari-medseg")
    assert written == [str(tmp_path / name)]
    with tifffile.TiffFile(tmp_path / name) as tif:
        assert tif.is_ome == name.endswith(".ome.tif")
        np.testing.assert_array_equal(tif.series[0].levels[0].asarray(), labels)
        assert tif.pages[0].tags["XResolution"].value == (20000, 1)
