"""Qt-free tests of layer building, the reader, review helpers, the Segment job and widget state
(napari's ViewerModel, no window)."""
from __future__ import annotations

import dataclasses
import json
import threading

import numpy as np
import pytest
import tifffile
import zarr
from napari.components import ViewerModel

from napari_medseg import layer_data, review, segment_job, widget_state
from napari_medseg.core.inference_plan import InferenceSettings
from napari_medseg.core.progress import Progress, drain
from napari_medseg.core.samples import load_sample
from napari_medseg.core.store import MapInfo, OutputStore, StoreLayout

SETTINGS = InferenceSettings(device="cpu")


@pytest.fixture(scope="module", autouse=True)
def _plugins():
    """Make npe2 find this plugin's manifest (napari.Viewer does this at start; ViewerModel not)."""
    from npe2 import PluginManager

    PluginManager.instance().discover(include_npe1=False)


def _run(tmp_path, model="vunet", image=None, settings=SETTINGS, name="nuclei"):
    image = load_sample("fluorescence_small") if image is None else image
    request = segment_job.SegmentRequest(image, model, "random", tmp_path / f"{name}.{model}.medseg.zarr",
                                         settings)
    return request, drain(segment_job.segment_job(request))


@pytest.fixture(scope="module")
def vunet_output(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vunet")
    return _run(tmp, settings=InferenceSettings(device="cpu", mc_samples=2))[1]


# ----------------------------------------------------------------------------- layers of a run
def test_run_layers_of_vunet(vunet_output):
    layers = layer_data.run_layers(vunet_output.output, "nuclei")
    names = [meta["name"] for _, meta, _ in layers]
    assert names == ["nuclei probability interior", "nuclei probability boundary",
                     "nuclei uncertainty entropy", "nuclei uncertainty variance",
                     "nuclei uncertainty mutual information", "nuclei labels"]
    kinds = [kind for _, _, kind in layers]
    assert kinds == ["image"] * 5 + ["labels"]
    visible = [meta["name"] for _, meta, _ in layers if meta.get("visible", True)]
    assert visible == ["nuclei uncertainty entropy", "nuclei labels"]
    for data, meta, kind in layers[:-1]:
        assert data.shape == (256, 256) and data.dtype == np.float32
        low, high = meta["contrast_limits"]
        values = np.asarray(data[:, :])
        assert low <= values.min() and values.max() <= high + 1e-3
    labels, meta, _ = layers[-1]
    assert labels.dtype == np.uint32 and labels.shape == (256, 256)
    assert meta["metadata"]["medseg"]["editable"] is True


def test_decoded_channel_divides_uint8_by_255(tmp_path):
    array = zarr.open_array(tmp_path / "a.zarr", mode="w", shape=(2, 4, 4), dtype="uint8")
    array[1] = 255
    view = layer_data.DecodedChannel(array, 1, 1 / 255)
    assert view.shape == (4, 4) and view.ndim == 2 and view.size == 16
    assert np.allclose(view[1:3, ::2], 1.0) and np.asarray(view).dtype == np.float32


def test_large_outputs_are_multiscale_and_huge_labels_read_only(tmp_path):
    layout = StoreLayout((2048, 2048), 512, 2048, (MapInfo("probs", 3, "probability", (0, 1)),))
    store = OutputStore.create(tmp_path / "big.medseg.zarr", layout, {}, {})
    layers = layer_data.run_layers(store, "big")
    assert layers[0][1]["multiscale"] and len(layers[0][0]) == layout.levels
    assert layers[0][0][1].shape == (1024, 1024)
    assert not layers[-1][1]["multiscale"]                          # labels stay editable
    data, meta, _ = layer_data.run_layers(store, "big", editable_labels=False)[-1]
    assert meta["multiscale"] and meta["metadata"]["medseg"]["editable"] is False


def test_job_hands_over_layer_data_read_off_the_gui_thread(tmp_path):
    """With ``display_name`` the job yields the output's layer data once, before any block, and
    ``show_run_steps`` shows it at the image's scale without opening the store itself."""
    image = load_sample("fluorescence_small")
    class Shown(threading.Event):
        """The GUI's 'layers added' signal, recording whether the job waited for it after which record."""
        waited_after = None

        def wait(self, timeout=None):
            Shown.waited_after = records[-1].stage
            return super().wait(timeout)

    shown_event = Shown()
    request = segment_job.SegmentRequest(image, "iau_net", "random", tmp_path / "n.medseg.zarr",
                                         SETTINGS, display_name="nuclei", display_ready=shown_event)
    records = []
    outcome = drain(segment_job.segment_job(request),
                    lambda r: (records.append(r), r.stage == "output" and shown_event.set()))
    assert Shown.waited_after == "output"   # the engine paused while the GUI added the layers
    stages = [r.stage for r in records]
    assert stages.count("output") == 1 and stages.index("output") < stages.index("tiles")
    prepared = records[stages.index("output")].payload
    names = [meta["name"] for _, meta, _ in prepared]
    assert names == [meta["name"] for _, meta, _ in layer_data.run_layers(outcome.output, "nuclei")]
    assert all(r.payload is None for r in records if r.stage != "output")
    viewer = ViewerModel()
    shown = viewer.add_image(image, name="nuclei", scale=(0.5, 0.5))
    layers = list(dict.fromkeys(layer_data.show_run_steps(viewer, shown, None, prepared)))
    assert [layer.name for layer in layers] == names
    assert all(tuple(layer.scale) == (0.5, 0.5) for layer in layers)
    assert np.array_equal(viewer.layers["nuclei labels"].data[...],
                          zarr.open_array(outcome.output / "labels" / "0", mode="r")[...])
    plain = []
    drain(segment_job.segment_job(dataclasses.replace(request, display_name=None, display_ready=None)),
          plain.append)
    assert "output" not in [r.stage for r in plain]


def test_show_run_replaces_instead_of_duplicating(tmp_path):
    viewer = ViewerModel()
    image = viewer.add_image(load_sample("fluorescence_small"), name="nuclei", scale=(0.5, 0.5))
    _, first = _run(tmp_path, "iau_net")
    layer_data.show_run(viewer, image, first.output)
    assert sum("attention" in layer.name for layer in viewer.layers) == 4
    viewer.layers["nuclei labels"].visible = False
    _, second = _run(tmp_path, "pranet_v2")
    layers = layer_data.show_run(viewer, image, second.output)
    names = [layer.name for layer in viewer.layers]
    assert len(names) == len(set(names))
    assert not any("attention" in n for n in names)                 # the earlier run's maps left
    assert sum("DSRA" in n for n in names) == 5
    assert names[-1] == "nuclei labels" and not viewer.layers["nuclei labels"].visible
    assert all(tuple(layer.scale) == (0.5, 0.5) for layer in layers)


# ----------------------------------------------------------------------------- reader
def test_reader_opens_plain_zarr_ome_zarr_and_tiff(tmp_path):
    plain = zarr.open_array(tmp_path / "plain.zarr", mode="w", shape=(300, 200), dtype="uint16")
    plain[:] = np.arange(300 * 200, dtype=np.uint16).reshape(300, 200) % 1000
    viewer = ViewerModel()
    layer = viewer.open(tmp_path / "plain.zarr", plugin="napari-medseg")[0]
    assert layer.data.shape == (300, 200) and tuple(layer.contrast_limits) == (0, 999)

    group = zarr.open_group(tmp_path / "ome.zarr", mode="w", zarr_format=2)
    for level, size in enumerate((256, 128, 64)):
        group.create_array(str(level), shape=(2, size, size), dtype="uint8")[:] = 7 * (level + 1)
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"}], "datasets": [
        {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [1, 0.5 * 2 ** k,
                                                                                     0.5 * 2 ** k]}]}
        for k in range(3)]}]
    layers = ViewerModel().open(tmp_path / "ome.zarr", plugin="napari-medseg")
    assert len(layers) == 2 and all(layer.multiscale for layer in layers)
    assert tuple(layers[0].scale) == (0.5, 0.5)

    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((64, 80, 3), np.uint8))
    layer = ViewerModel().open(tmp_path / "rgb.tif", plugin="napari-medseg")[0]
    assert layer.rgb and layer.data.shape == (64, 80, 3)


def test_reader_opens_an_output_store_with_its_input(tmp_path):
    image = tmp_path / "cells.tif"
    tifffile.imwrite(image, load_sample("fluorescence_small"))
    request = segment_job.SegmentRequest(str(image), "gca_resunet", "random",
                                         tmp_path / "cells.gca_resunet.medseg.zarr", SETTINGS)
    drain(segment_job.segment_job(request))
    viewer = ViewerModel()
    viewer.open(request.output, plugin="napari-medseg")
    names = [layer.name for layer in viewer.layers]
    assert names == ["cells", "cells probability interior", "cells probability boundary",
                     "cells labels"]
    assert viewer.layers["cells labels"].editable


# ----------------------------------------------------------------------------- review helpers
def test_object_table_matches_a_direct_computation(tmp_path):
    layout = StoreLayout((96, 80), 16, 32, (MapInfo("probs", 3, "probability", (0, 1)),
                                            MapInfo("entropy", 1, "uncertainty", (0, 1.1))),
                         maps_dtype="float32")
    store = OutputStore.create(tmp_path / "t.medseg.zarr", layout, {}, {})
    rng = np.random.default_rng(0)
    labels = np.zeros((96, 80), np.uint32)
    labels[10:50, 20:70] = 5              # crosses block borders (blocks of 32)
    labels[60:90, 5:30] = 9
    entropy = rng.random((1, 96, 80)).astype(np.float32)
    region = (0, 96, 0, 80)
    store.write_maps(region, {"probs": np.zeros((3, 96, 80), np.float32), "entropy": entropy})
    store.write_labels(region, labels)
    store.mark_done(region, "labels")
    table = drain(review.object_table(store))
    assert list(table["index"]) == [5, 9]
    for row in table.itertuples():
        mask = labels == row.index
        assert row.area == mask.sum()
        assert row.uncertainty == pytest.approx(entropy[0][mask].mean(), rel=1e-5)
        assert row.centroid_y == pytest.approx(np.nonzero(mask)[0].mean())
    order = review.ranked_objects(table)
    assert table["uncertainty"].iloc[order[0]] >= table["uncertainty"].iloc[order[1]]
    assert review.uncertainty_source(store)[0] == "entropy"


def test_object_view_and_view_region():
    viewer = ViewerModel()
    layer = viewer.add_labels(np.zeros((400, 600), np.uint32), scale=(2, 2))
    row = {"centroid_y": 100.0, "centroid_x": 300.0, "area": 314.0}
    (y, x), zoom = review.object_view(row, layer, (500, 700))
    assert (y, x) == (200.0, 600.0) and zoom == pytest.approx(500 / (20 * review.CONTEXT * 2), rel=0.01)
    camera = review.camera(viewer)
    camera.center = (0, 200, 600)
    camera.zoom = 1.0
    viewer.canvas.size = (100, 200)
    assert review.view_region(viewer, layer) == (75, 126, 250, 351)
    camera.center = (0, 5000, 5000)
    assert review.view_region(viewer, layer) is None


def test_edits_are_recorded_and_refresh_the_pyramid(tmp_path):
    layout = StoreLayout((256, 256), 64, 128, (MapInfo("probs", 3, "probability", (0, 1)),))
    store = OutputStore.create(tmp_path / "e.medseg.zarr", layout, {}, {})
    viewer = ViewerModel()
    layer = viewer.add_labels(store.labels())
    seen = []
    layer.events.paint.connect(lambda event: seen.append(event.value))
    layer.brush_size = 5
    layer.paint((100, 100), 7)
    region = review.edited_region(seen[-1], (256, 256))
    assert region == (98, 103, 98, 103)
    assert not review.labels_edited(store)
    review.record_label_edit(store, region)
    assert review.labels_edited(store)
    assert store.attrs[review.EDITS_KEY]["chunks"] == [[1, 1]]
    assert (np.asarray(store.labels(1)[:]) == 7).sum() > 0           # pyramid follows the edit
    assert review.edited_region([((np.array([3, 9]), np.array([4, 5])), 0, 1)], (256, 256)) == (3, 10, 4, 6)


# ----------------------------------------------------------------------------- the job
def test_rerun_keeps_edits_and_never_replaces_them_unasked(tmp_path):
    request, outcome = _run(tmp_path, "gca_resunet")
    assert outcome.objects is not None and "uncertainty" in outcome.objects
    store = OutputStore.open(outcome.output)
    labels = store.labels()
    labels[0:8, 0:8] = 4242
    review.record_label_edit(store, (0, 8, 0, 8))
    again = drain(segment_job.segment_job(request))                # same settings: resumes
    assert again.result.maps.blocks_run == 0 and not again.replaced
    assert (np.asarray(store.labels()[0:8, 0:8]) == 4242).all()
    other = segment_job.SegmentRequest(request.source, "gca_resunet", "random", request.output,
                                       InferenceSettings(device="cpu", tile=128))
    with pytest.raises(segment_job.EditedOutputError, match="edited"):
        drain(segment_job.segment_job(other))
    assert (np.asarray(store.labels()[0:8, 0:8]) == 4242).all()
    confirmed = drain(segment_job.segment_job(
        segment_job.SegmentRequest(other.source, "gca_resunet", "random", request.output,
                                   other.settings, replace_edited=True)))
    assert confirmed.replaced and not review.labels_edited(OutputStore.open(confirmed.output))


def test_unedited_output_with_other_settings_is_replaced(tmp_path):
    request, _ = _run(tmp_path, "gca_resunet")
    other = segment_job.SegmentRequest(request.source, "gca_resunet", "random", request.output,
                                       InferenceSettings(device="cpu", tile=128))
    outcome = drain(segment_job.segment_job(other))
    assert outcome.replaced and outcome.result.maps.tiles.tile == 128


def test_output_paths(tmp_path):
    assert segment_job.output_path("/data/a b.tif", "x y", "vunet", None).name == "a b.vunet.medseg.zarr"
    assert segment_job.output_path(None, "x/y", "vunet", tmp_path) == tmp_path / "x_y.vunet.medseg.zarr"
    assert segment_job.output_path(None, "img", "vunet", "").parent == segment_job.DEFAULT_OUTPUT_FOLDER
    first = tmp_path / "img.vunet.medseg.zarr"
    first.mkdir()
    second = segment_job.free_output_path(first)
    assert second.name == "img.vunet-2.medseg.zarr"
    second.mkdir()
    assert segment_job.free_output_path(second).name == "img.vunet-3.medseg.zarr"


def test_image_source_from_layers():
    viewer = ViewerModel()
    rgb = viewer.add_image(np.zeros((40, 50, 3), np.uint8), rgb=True)
    source, path = segment_job.image_source_from_layer(rgb)
    assert source.shape == (40, 50) and source.channels == 3 and path is None
    stack = viewer.add_image(np.arange(3 * 8 * 9).reshape(3, 8, 9))
    source, _ = segment_job.image_source_from_layer(stack, (2, 0, 0))
    assert source.read_region(0, 8, 0, 9)[0, 0, 0] == 2 * 72


def test_time_left():
    estimate = segment_job.TimeLeft()
    assert estimate.update(Progress("tiles", 1, 11), now=0.0) is None
    assert estimate.update(Progress("tiles", 3, 11), now=4.0) == pytest.approx(16.0)
    assert estimate.update(Progress("instances", 1, 4), now=5.0) is None   # a new stage restarts
    assert segment_job.format_seconds(16) == "about 15 s left"
    assert segment_job.format_seconds(300) == "about 5 min left"
    assert segment_job.format_seconds(None) == ""


# ----------------------------------------------------------------------------- widget state
def test_state_round_trip_and_damaged_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_MEDSEG_CONFIG_DIR", str(tmp_path))
    assert widget_state.load_state() == widget_state.SegmentState()
    state = widget_state.SegmentState(model="iau_net", tile=512, device="cpu")
    widget_state.remember_weights(state, "/w/a")
    widget_state.save_state(state)
    assert widget_state.load_state() == state
    (tmp_path / widget_state.STATE_FILE).write_text("{not json")
    assert widget_state.load_state() == widget_state.SegmentState()
    (tmp_path / widget_state.STATE_FILE).write_text(json.dumps({"model": "vunet", "unknown": 1}))
    assert widget_state.load_state().model == "vunet"


def test_weights_choices_list_user_files_for_the_right_model(tmp_path):
    from src_models import create_model, save_weights

    save_weights(create_model("iau_net", "lite"), tmp_path / "mine",
                 {"version": "iau-mine", "training": {"data": "my slides", "licence": "CC0"}})
    choices = widget_state.weights_choices("iau_net", [str(tmp_path / "mine"), "/nope/missing"])
    labels = [c.label for c in choices]
    assert "file: mine" in labels and labels[-1] == "random weights (untrained)"
    assert "my slides" in choices[labels.index("file: mine")].description
    assert "file: mine" not in [c.label for c in widget_state.weights_choices("vunet", [str(tmp_path / "mine")])]


def test_modules_import_without_qt_or_napari():
    import subprocess
    import sys

    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui',"
        " 'napari', 'vispy'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import napari_medseg.layer_data, napari_medseg.review, napari_medseg.segment_job, "
        "napari_medseg.widget_state, napari_medseg._reader\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr


def test_weights_choices_offer_fine_tuned_versions_and_the_active_one_first(tmp_path, monkeypatch):
    from src_models import create_model

    from napari_medseg.core import pipeline, versions

    monkeypatch.setenv(versions.ENV_VAR, str(tmp_path / "models"))
    model = create_model("pranet_v2", "lite")
    first = versions.save_version(model, {"parent": {"sha256": "abc", "version": "starter-x"}})
    second = versions.save_version(model, {"parent": {"sha256": first.sha256, "version": first.id}})
    labels = [c.label for c in widget_state.weights_choices("pranet_v2")]
    # newest fine-tuned version listed before the older one, random weights last
    assert labels.index(f"fine-tuned: {second.id}") < labels.index(f"fine-tuned: {first.id}")
    assert labels[-1] == "random weights (untrained)"
    assert not any(label.startswith("active:") for label in labels)
    assert "fine-tuned from starter-x" in widget_state.weights_choices("pranet_v2")[
        labels.index(f"fine-tuned: {first.id}")].description

    versions.adopt("pranet_v2", first.id)
    choices = widget_state.weights_choices("pranet_v2")
    assert choices[0].label == f"active: {first.id}" and choices[0].value == str(first.path)
    assert f"fine-tuned: {first.id}" not in [c.label for c in choices]   # not listed twice
    # without --weights, the engine runs the adopted version too
    _, card = pipeline.load_model("pranet_v2", device="cpu")
    assert card["sha256"] == first.sha256 and card["weights_path"] == str(first.path)
    # other models are untouched by this model's versions
    assert not any(c.label.startswith(("active:", "fine-tuned:"))
                   for c in widget_state.weights_choices("iau_net"))


def test_reader_opens_a_whole_slide_svs_at_its_physical_scale(tmp_path):
    from slide_fixtures import blocky_rgb, write_aperio_svs

    write_aperio_svs(tmp_path / "slide.svs", blocky_rgb())
    layer = ViewerModel().open(tmp_path / "slide.svs", plugin="napari-medseg")[0]
    assert layer.name == "slide" and layer.rgb and layer.multiscale
    assert [level.shape for level in layer.data] == [(512, 512, 3), (128, 128, 3)]
    assert tuple(layer.scale) == pytest.approx((0.252, 0.252))
