"""GUI: segment → brush edit → Fine-tune on edits → new version listed → compare → re-run keeps
the edit (run under xvfb-run, see README). Random lite weights and a 256² sample keep it quick."""
from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_medseg.core.inference import InferenceSettings
from napari_medseg.core.pipeline import load_model, run_segmentation
from napari_medseg.core.progress import drain
from napari_medseg.core.resources import starter_weights
from napari_medseg.core.rerun import model_labels, snapshot_model_labels
from napari_medseg.core.samples import load_sample
from napari_medseg.core.store import OutputStore
from napari_medseg.layer_data import show_run
from napari_medseg.widget_state import load_state, remember_weights, save_state
from src_models import save_weights

pytestmark = pytest.mark.gui

JOB_TIMEOUT_MS = 180_000


@pytest.fixture(autouse=True)
def _folders(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_MEDSEG_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("NAPARI_MEDSEG_MODELS", str(tmp_path / "models"))


def segmented_viewer(make_napari_viewer, tmp_path):
    """A viewer showing a run of random reseg_unet weights saved to a file (the parent)."""
    random_model, card = load_model("reseg_unet", "random", "cpu")
    parent = tmp_path / "parent"
    save_weights(random_model, parent, {"classes": card["classes"], "tile_size": 64})
    model, card = load_model("reseg_unet", parent, "cpu")
    image = load_sample("fluorescence_small")
    result = drain(run_segmentation(image, model, card, tmp_path / "run.zarr",
                                    InferenceSettings(device="cpu", mc_samples=0)))
    store = OutputStore.open(result.output)
    snapshot_model_labels(store)   # what the pipeline does when a run finishes
    viewer = make_napari_viewer()
    image_layer = viewer.add_image(image, name="nuclei")
    show_run(viewer, image_layer, store)
    state = load_state()
    remember_weights(state, str(parent))   # as the Segment widget does for a chosen file
    save_state(state)
    return viewer, store, parent


def wait_for_job(widget, qtbot, start):
    with qtbot.waitSignal(widget.job_finished, timeout=JOB_TIMEOUT_MS) as finished:
        start()
    return finished.args[0]


def test_edit_finetune_compare_rerun(make_napari_viewer, qtbot, tmp_path):
    viewer, store, parent = segmented_viewer(make_napari_viewer, tmp_path)
    labels = viewer.layers["nuclei labels"]
    labels.brush_size = 9
    labels.paint((40, 60), 777)                                   # a brush stroke, as from the mouse
    assert (np.asarray(store.labels()[36:45, 56:65]) == 777).any()
    assert not (np.asarray(model_labels(store)[36:45, 56:65]) == 777).any()

    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Fine-tune on edits")
    assert widget.labels_combo.currentText() == "nuclei labels"
    assert widget.weights_edit.text() == str(parent)              # found by the run's sha256
    widget.steps.setValue(3)
    widget.device.setCurrentIndex(widget.device.findData("cpu"))
    result = wait_for_job(widget, qtbot, widget.run_button.click)
    assert result is not None, widget.status.text()
    assert result.steps == 3 and "New version" in widget.status.text()
    # the parent and its child (the bundled starter of the model is listed too, as its own root)
    assert _without_starter(widget.version_paths()) == [str(parent), str(result.path)]

    diff = wait_for_job(widget, qtbot, widget.compare_button.click)
    assert diff is not None, widget.status.text()
    assert {"nuclei parent labels (view)", "nuclei child labels (view)"} <= {l.name for l in viewer.layers}
    assert "objects differ" in widget.status.text()

    widget.rerun_area.setCurrentIndex(widget.rerun_area.findData("whole"))
    rerun = wait_for_job(widget, qtbot, widget.rerun_button.click)
    assert rerun is not None, widget.status.text()
    assert rerun.protected_pixels > 0
    assert (np.asarray(labels.data[36:45, 56:65]) == 777).any()  # the edit survived the re-run

    roots = [widget.tree.topLevelItem(i) for i in range(widget.tree.topLevelItemCount())]
    (parent_item,) = [item for item in roots if item.data(0, Qt.UserRole) == str(parent)]
    widget.tree.setCurrentItem(parent_item.child(0))
    widget.adopt_button.click()
    assert "Active reseg_unet weights" in widget.status.text()
    widget.rollback_button.click()
    assert "Rolled back" in widget.status.text()


def test_no_edits_says_so(make_napari_viewer, qtbot, tmp_path):
    viewer, _, _ = segmented_viewer(make_napari_viewer, tmp_path)
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Fine-tune on edits")
    result = wait_for_job(widget, qtbot, widget.run_button.click)
    assert result is None and "no edits yet" in widget.status.text()
    assert _without_starter(widget.version_paths()) == [widget.weights_edit.text()]


def _without_starter(paths: list[str]) -> list[str]:
    starter = starter_weights("reseg_unet")
    return [p for p in paths if starter is None or p != str(starter)]
