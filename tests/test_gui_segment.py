"""GUI: the Segment widget in a real napari window (run under xvfb-run, see README).

Random weights keep these tests independent of training; images are small (256² sample, 1024²
and 2048² zarr mosaics) so the suite stays fast on a shared CPU.
"""
from __future__ import annotations

import collections
import os
import sys
import threading
import time
import traceback

import numpy as np
import pytest
from qtpy.QtCore import QTimer

from src_models import read_card

from napari_medseg.core.resources import starter_weights
from napari_medseg.core.samples import load_sample, write_mosaic_zarr
from napari_medseg.core.store import OutputStore
from napari_medseg.review import labels_edited

from conftest import save_screenshot

pytestmark = pytest.mark.gui

RUN_TIMEOUT_MS = 180_000
MAP_PREFIX = {"uncertainty": "nuclei uncertainty", "background": "nuclei DSRA",
              "attention": "nuclei attention"}
OWN_MAPS = {"vunet": "uncertainty", "pranet_v2": "background", "iau_net": "attention"}


@pytest.fixture(autouse=True)
def _config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_MEDSEG_CONFIG_DIR", str(tmp_path / "config"))


def open_widget(viewer, tmp_path, model="vunet", weights="random"):
    """The Segment widget from the manifest, set to write into tmp_path on the CPU."""
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    form = widget.form
    form.model.setCurrentIndex(form.model.findData(model))
    form.fill_weights(select=weights)
    assert form.weights_value() == weights
    form.device.setCurrentIndex(form.device.findData("cpu"))
    form.output.setText(str(tmp_path / "out"))
    return widget


def run_and_wait(widget, qtbot, on_progress=None, timeout_ms=RUN_TIMEOUT_MS):
    """Press Run and wait for the worker's finished signal (relayed by the widget)."""
    with qtbot.waitSignal(widget.run_finished, timeout=timeout_ms) as finished:
        widget.run_button.click()
        assert widget.worker is not None
        if on_progress is not None:
            widget.worker.yielded.connect(on_progress)
    return finished.args[0]


@pytest.mark.parametrize("model", ["vunet", "reseg_unet", "pranet_v2", "iau_net", "gca_resunet"])
def test_each_model_runs_and_shows_its_layers(make_napari_viewer, qtbot, tmp_path, model):
    viewer = make_napari_viewer()
    viewer.add_image(load_sample("fluorescence_small"), name="nuclei")
    widget = open_widget(viewer, tmp_path, model)
    widget.form.mc_samples.setValue(2)
    started = time.perf_counter()
    outcome = run_and_wait(widget, qtbot)
    print(f"{model}: run {time.perf_counter() - started:.1f} s")
    assert outcome is not None and outcome.result.labels_status == "complete"
    names = [layer.name for layer in viewer.layers]
    assert names[0] == "nuclei" and names[-1] == "nuclei labels"
    assert {"nuclei probability interior", "nuclei probability boundary"} <= set(names)
    for kind, prefix in MAP_PREFIX.items():
        present = any(name.startswith(prefix) for name in names)
        assert present == (OWN_MAPS.get(model) == kind), (kind, names)
    if model == "vunet":
        assert {"nuclei uncertainty entropy", "nuclei uncertainty variance",
                "nuclei uncertainty mutual information"} <= set(names)
    if model == "pranet_v2":
        assert sum(name.startswith("nuclei DSRA background stage") for name in names) == 4
        assert "nuclei DSRA disagreement" in names
    for layer in viewer.layers[1:-1]:
        assert layer.data.shape == (256, 256) and layer.data.dtype == np.float32
        values = np.asarray(layer.data[:, :])
        low, high = layer.contrast_limits
        assert low <= values.min() and values.max() <= high + 1e-3, layer.name
    labels = viewer.layers["nuclei labels"]
    assert labels.data.shape == (256, 256) and labels.data.dtype == np.uint32
    assert labels.features.columns[:2].tolist() == ["index", "uncertainty"]
    assert widget.progress.value() == widget.progress.maximum()
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_cancel_mid_run_then_resume(make_napari_viewer, qtbot, tmp_path):
    path = tmp_path / "mosaic.zarr"
    write_mosaic_zarr(path, size=1024, chunk=256)
    viewer = make_napari_viewer()
    viewer.open(path, plugin="napari-medseg")
    widget = open_widget(viewer, tmp_path, "gca_resunet")
    widget.advanced_settings = {"chunk": 256, "superblock": 512}   # 4 blocks
    seen = []

    def cancel_after_first_block(record):
        seen.append(record)
        if record.region is not None and widget.cancel_button.isEnabled():
            widget.cancel()

    def napari_would_ask_before_closing(record):
        # napari's window asks before closing while a registered task runs, then quits it
        busy.append(viewer.window._task_status_manager.is_busy())

    busy = []
    assert run_and_wait(widget, qtbot, lambda r: (napari_would_ask_before_closing(r),
                                                  cancel_after_first_block(r))) is None
    assert busy and busy[0]
    assert "Cancelled" in widget.status.text()
    store = OutputStore.open(tmp_path / "out" / "mosaic.gca_resunet.medseg.zarr", mode="r")
    status = store.status("maps")
    assert status["status"] == "incomplete" and 0 < status["chunks_done"] < status["chunks_total"]
    assert "mosaic labels" in viewer.layers                  # partial outputs are shown
    outcome = run_and_wait(widget, qtbot)
    assert outcome.result.maps.blocks_resumed >= 1
    assert outcome.result.maps.blocks_run == 4 - outcome.result.maps.blocks_resumed
    assert OutputStore.open(outcome.output, mode="r").status("maps")["status"] == "complete"
    assert [layer.name for layer in viewer.layers].count("mosaic labels") == 1


def test_edited_label_survives_rerun(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(load_sample("fluorescence_small"), name="nuclei")
    widget = open_widget(viewer, tmp_path, "gca_resunet")
    first = run_and_wait(widget, qtbot)
    labels = viewer.layers["nuclei labels"]
    labels.brush_size = 9
    labels.paint((40, 60), 777)                               # a brush stroke, as from the mouse
    store = OutputStore.open(first.output, mode="r")
    assert (np.asarray(store.labels()[36:45, 56:65]) == 777).any()   # the stroke is on disk
    assert labels_edited(store)
    again = run_and_wait(widget, qtbot)                      # same settings: resumes, keeps edits
    assert again.output == first.output
    assert (np.asarray(viewer.layers["nuclei labels"].data[36:45, 56:65]) == 777).any()
    widget.form.tile.setValue(128)                           # other settings: ask first
    asked = []
    widget.ask_about_edited_output = lambda error: asked.append(error) or "new"
    third = run_and_wait(widget, qtbot)
    assert asked and third.output.name == "nuclei.gca_resunet-2.medseg.zarr"
    assert (np.asarray(OutputStore.open(first.output, mode="r").labels()[36:45, 56:65]) == 777).any()


class StallSampler(threading.Thread):
    """Samples the GUI thread's Python stack whenever the test's timer has not ticked for
    ``after`` seconds, so a failing responsiveness test says which code held the event loop."""

    def __init__(self, ticks: list, after: float = 0.25, every: float = 0.05):
        super().__init__(daemon=True)
        self.ticks, self.after, self.every = ticks, after, every
        self.gui_thread = threading.get_ident()
        self.samples: collections.Counter = collections.Counter()
        self.timeline: list[tuple[float, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            if self.ticks and time.perf_counter() - self.ticks[-1] > self.after:
                frame = sys._current_frames().get(self.gui_thread)
                if frame is not None:
                    stack = traceback.extract_stack(frame)[-12:]
                    text = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                                       for f in reversed(stack))
                    self.samples[text] += 1
                    self.timeline.append((time.perf_counter(), text))

    def report(self, top: int = 5) -> str:
        return "\n".join(f"{count} × {stack}" for stack, count in self.samples.most_common(top))

    def during(self, start: float, end: float, top: int = 3) -> str:
        """The stacks sampled between two tick times (e.g. the longest gap's)."""
        found = collections.Counter(text for t, text in self.timeline if start <= t <= end)
        return "\n".join(f"{count} × {stack}" for stack, count in found.most_common(top))


BIG_GUI_SIZE = int(os.environ.get("MEDSEG_BIG_GUI", "0"))   # e.g. 16384: the 16k² run (minutes)


@pytest.mark.parametrize("size", [2048] + ([BIG_GUI_SIZE] if BIG_GUI_SIZE else []))
def test_gui_stays_responsive_on_a_large_zarr(make_napari_viewer, qtbot, tmp_path, size):
    """The event loop keeps turning while a large zarr image is segmented, the GUI thread does a
    small share of the work, and memory stays bounded. CI runs 2048²; ``MEDSEG_BIG_GUI=16384`` adds
    the 16k² run (PraNet-V2, the fastest). Wall-clock gaps are printed (the README's benchmark),
    not asserted: on a shared machine they measure the machine's load as much as the code."""
    import psutil

    path = tmp_path / "big.zarr"
    write_mosaic_zarr(path, size=size, chunk=min(size // 4, 1024))
    viewer = make_napari_viewer(show=True)
    viewer.open(path, plugin="napari-medseg")
    big = size > 4096
    widget = open_widget(viewer, tmp_path, "pranet_v2" if big else "gca_resunet")
    if not big:
        widget.advanced_settings = {"superblock": 1024}   # several blocks land during the run
    process = psutil.Process()
    ticks, gui_cpu, rss = [], [], [process.memory_info().rss]
    timer = QTimer()
    timer.timeout.connect(lambda: (ticks.append(time.perf_counter()), gui_cpu.append(time.thread_time()),
                                   rss.append(process.memory_info().rss)))
    timer.start(50)
    started, cpu_before, gui_before = time.perf_counter(), process.cpu_times(), time.thread_time()
    sampler = StallSampler(ticks)
    sampler.start()
    texts, tile_times = [], []

    def on_progress(record):
        texts.append(widget.status.text())
        if "Segmenting tiles" in texts[-1]:
            tile_times.append(time.perf_counter())

    outcome = run_and_wait(widget, qtbot, on_progress, timeout_ms=3_600_000 if big else RUN_TIMEOUT_MS)
    timer.stop()
    sampler.stop.set()
    cpu_after = process.cpu_times()
    process_cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    gui_share = (time.thread_time() - gui_before) / max(process_cpu, 1e-9)
    gaps, busy = np.diff(ticks), np.diff(gui_cpu)   # wall time, and GUI-thread CPU time, per gap
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    growth = (max(rss) - rss[0]) / 1e6
    print(f"{size}²: {time.perf_counter() - started:.1f} s, {len(ticks)} ticks, longest gap "
          f"{gaps.max():.3f} s (GUI thread busy {busy[gaps.argmax()]:.3f} s of it), "
          f"most GUI work between ticks {busy.max():.3f} s, GUI thread {gui_share:.0%} of the "
          f"process's CPU time ({process_cpu:.1f} s), load {load:.1f} per CPU, "
          f"resident memory {rss[0] / 1e6:.0f} MB → peak {max(rss) / 1e6:.0f} MB (+{growth:.0f} MB)")
    print("GUI thread when the timer stalled (samples every 50 ms):\n" + sampler.report())
    for what, at in (("longest gap", gaps.argmax()), ("most GUI work", busy.argmax())):
        print(f"during the {what}:\n" + sampler.during(ticks[at], ticks[at + 1]))
    assert outcome.result.maps.status == "complete"
    assert any("Segmenting tiles" in t and " left" in t for t in texts)   # per-tile time estimate
    # The event loop turned while tiles were computed: a job run on the GUI thread would deliver
    # every progress update after the work, with no timer tick in between.
    assert len(tile_times) >= 3, texts
    during_tiles = [t for t in ticks if tile_times[0] < t < tile_times[-1]]
    print(f"{len(during_tiles)} ticks between the first and last of {len(tile_times)} tile updates")
    assert len(during_tiles) >= 10, len(during_tiles)
    assert gui_share < 0.5              # the model runs on the job's threads, not the GUI thread
    assert growth < 2000                # bounded: the image and its outputs stay on disk
    probability = viewer.layers["big probability interior"]
    assert probability.multiscale and probability.data[0].shape == (size, size)
    if not big:
        assert not viewer.layers["big labels"].multiscale        # editable at this size


def test_screenshot_after_run_and_review(make_napari_viewer, qtbot, tmp_path):
    """labels + uncertainty visible; starter weights when bundled, else random ones."""
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 860)
    viewer.add_image(load_sample("fluorescence_small"), name="nuclei")
    weights = starter_weights("vunet")
    widget = open_widget(viewer, tmp_path, "vunet", str(weights) if weights else "random")
    widget.form.mc_samples.setValue(4)
    run_and_wait(widget, qtbot)
    assert viewer.layers["nuclei labels"].visible
    assert viewer.layers["nuclei uncertainty entropy"].visible
    widget.next_button.click()
    assert "Object 1 of" in widget.review_label.text()
    labels = viewer.layers["nuclei labels"]
    assert labels.selected_label == int(labels.features["index"].iloc[
        int(np.argmax(labels.features["uncertainty"]))])
    viewer.reset_view()
    path = save_screenshot(viewer, "segment_run")
    assert path.stat().st_size > 20_000


@pytest.mark.parametrize(("model", "name", "screenshot"), [
    ("gca_resunet", "gca_resunet_lite_monuseg2018", "segment_he_tissue_weights"),
    ("vunet", "vunet_paper_monuseg2018", "segment_he_tissue_weights_vunet_paper")])
def test_bundled_he_tissue_weights_are_offered_and_run(make_napari_viewer, qtbot, tmp_path, model, name,
                                                       screenshot):
    """Each model with MoNuSeg (H&E tissue) weights offers them beside the starter, licence in the label."""
    from napari_medseg.core.resources import weights_dir

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 860)
    viewer.add_image(load_sample("histology_he"), name="tissue")
    he = str(weights_dir() / name)
    widget = open_widget(viewer, tmp_path, model, he)
    form = widget.form
    items = [form.weights.itemText(i) for i in range(form.weights.count())]
    assert items[:2] == [f"starter: {model}_lite_dsb2018 (bundled)",
                         f"bundled: {name}, H&E, CC BY-NC-SA: non-commercial"]
    assert form.weights.currentText().startswith(f"bundled: {name}")
    assert form.tta.itemText(0) == "weights' default (8 views)"
    form.tta.setCurrentIndex(form.tta.findData(1))                  # one view: quicker on CI
    if model == "vunet":
        form.mc_samples.setValue(2)                                 # uncertainty from 2 samples: quicker on CI
    outcome = run_and_wait(widget, qtbot)
    assert OutputStore.open(outcome.output, mode="r").attrs["run"]["weights_sha256"] == read_card(he)["sha256"]
    assert int(np.max(np.asarray(viewer.layers["tissue labels"].data))) > 10
    viewer.reset_view()
    save_screenshot(viewer, screenshot)


def test_state_is_remembered(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, tmp_path, "iau_net")
    widget.form.tile.setValue(512)
    viewer.window.remove_dock_widget("all")
    _, again = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    assert again.form.model_name() == "iau_net"
    assert again.form.tile.value() == 512
    assert again.form.device.currentData() == "cpu"
    assert again.form.output.text() == str(tmp_path / "out")
    assert not again.form.mc_samples.isEnabled()             # only V-UNet samples its latents


def test_test_time_flips_default_to_the_card_and_reach_the_run(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(load_sample("fluorescence_small"), name="nuclei")
    starter = str(starter_weights("gca_resunet"))
    widget = open_widget(viewer, tmp_path, "gca_resunet", weights=starter)
    form = widget.form
    assert form.tta.itemText(0) == "weights' default (8 views)"      # the starter card's inference.tta
    assert form.tta_views() is None and widget._make_request().settings.tta is None
    form.fill_weights(select="random")
    assert form.tta.itemText(0) == "weights' default (off)"
    form.tta.setCurrentIndex(form.tta.findData(2))
    outcome = run_and_wait(widget, qtbot)
    assert OutputStore.open(outcome.output, mode="r").attrs["run"]["tta"] == 2
    viewer.window.remove_dock_widget("all")
    _, again = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    assert again.form.tta_views() == 2                                  # remembered


def test_current_view_only(make_napari_viewer, qtbot, tmp_path):
    path = tmp_path / "mosaic.zarr"
    write_mosaic_zarr(path, size=1024, chunk=256)
    viewer = make_napari_viewer(show=True)
    viewer.open(path, plugin="napari-medseg")
    widget = open_widget(viewer, tmp_path, "gca_resunet")
    widget.advanced_settings = {"chunk": 256, "superblock": 512}
    widget.form.area.setCurrentIndex(widget.form.area.findData("view"))
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.center = (0, 100, 100)
    camera.zoom = max(viewer.canvas.size) / 150              # about 150 px of the image in view
    outcome = run_and_wait(widget, qtbot)
    status = OutputStore.open(outcome.output, mode="r").status("maps")
    assert 0 < status["chunks_done"] < status["chunks_total"]
    assert outcome.result.maps.blocks_total == 1


def test_errors_are_reported_not_raised(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(load_sample("fluorescence_small"), name="nuclei")
    widget = open_widget(viewer, tmp_path, "gca_resunet")
    foreign = tmp_path / "out" / "nuclei.gca_resunet.medseg.zarr"
    foreign.mkdir(parents=True)
    (foreign / "precious.txt").write_text("not ours")
    assert run_and_wait(widget, qtbot) is None
    assert "Failed" in widget.status.text() and "not made by napari-medseg" in widget.status.text()
    assert (foreign / "precious.txt").exists()
    assert widget.run_button.isEnabled()
    viewer.layers.clear()
    widget.run()                                             # no image: a message, no worker
    assert widget.worker is None and "open an image" in widget.status.text()


def test_keyboard_shortcuts(make_napari_viewer, qtbot, tmp_path):
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer(show=True)
    viewer.add_image(load_sample("fluorescence_small"), name="nuclei")
    widget = open_widget(viewer, tmp_path, "gca_resunet")
    from qtpy.QtWidgets import QApplication

    QApplication.setActiveWindow(viewer.window._qt_window)   # no window manager under Xvfb
    qtbot.waitUntil(lambda: QApplication.activeWindow() is viewer.window._qt_window, timeout=5000)
    qtbot.wait(100)
    with qtbot.waitSignal(widget.run_finished, timeout=30_000):
        qtbot.keyClick(widget, Qt.Key_R, Qt.ControlModifier | Qt.ShiftModifier)
    assert "nuclei labels" in viewer.layers
    qtbot.keyClick(widget, Qt.Key_U, Qt.ControlModifier | Qt.ShiftModifier)
    assert "Object 1 of" in widget.review_label.text()
