"""GUI: every widget opens through the manifest in a real napari window; screenshots are saved."""
from __future__ import annotations

import pytest

from napari_medseg.core.samples import load_sample

from conftest import save_screenshot

pytestmark = pytest.mark.gui

WIDGETS = ["Segment", "Fine-tune on edits", "Export labels"]


@pytest.mark.parametrize("name", WIDGETS)
def test_widget_opens_through_manifest(make_napari_viewer, qtbot, name):
    viewer = make_napari_viewer(show=True)
    viewer.add_image(load_sample("fluorescence_small"), name="nuclei")
    dock, widget = viewer.window.add_plugin_dock_widget("napari-medseg", name)
    qtbot.wait(50)
    assert widget is not None
    assert dock.isVisible()
    path = save_screenshot(viewer, f"widget_{name.split()[0].lower()}")
    assert path.stat().st_size > 10_000


def test_sample_data_opens(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-medseg", "nuclei")
    assert {layer.name for layer in viewer.layers} >= {"fluorescence_small", "histology_he"}
