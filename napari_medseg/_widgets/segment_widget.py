"""MedSeg "Segment" dock widget: run a model on an image layer, watch the outputs arrive, review.

The widget holds no segmentation logic: Run builds a :class:`~napari_medseg.segment_job.SegmentRequest`
from the form and runs :func:`~napari_medseg.segment_job.segment_job` in a napari worker; layers
are made by :mod:`napari_medseg.layer_data` and touched only in the worker's callbacks, which Qt
runs on the GUI thread. Cancel is ``worker.quit()``, honoured at the job's next yield (one tile).
"""
from __future__ import annotations

import dataclasses
import threading

from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer, Signal
from qtpy.QtGui import QKeySequence
from qtpy.QtWidgets import (QHBoxLayout, QLabel, QProgressBar, QPushButton, QShortcut, QVBoxLayout,
                            QWidget)

from ..core.inference_plan import InferenceSettings
from ..core.store import OutputStore
from ..layer_data import invalidate_layers, layers_to_refresh, medseg_info, run_layers_of, show_run_steps
from ..review import edited_region, record_label_edit, uncertainty_source, view_region
from ..segment_job import (EditedOutputError, TimeLeft, format_seconds, free_output_path,
                           image_source_from_layer, outcome_summary, output_path, segment_job,
                           SegmentRequest)
from ..widget_state import load_state, save_state
from ._combo import refill_names
from ._dialogs import ask_about_edited_output
from ._review_panel import ReviewPanel
from ._segment_form import MODEL_TITLES, SegmentForm
from ._worker import start_job, update_progress_bar

RUN_KEYS, CANCEL_KEYS, NEXT_KEYS = "Ctrl+Shift+R", "Ctrl+Shift+X", "Ctrl+Shift+U"
REFRESH_MS = 400          # at most one re-read of the shown layers per this interval during a run
REFRESH_STEP_MS = 15      # the layers are re-read one per event-loop turn, this far apart
BAR_MS = 250              # at most one update of napari's progress bar per this interval
STAGES = {"loading": "Loading weights", "preparing": "Preparing", "output": "Output ready",
          "tiles": "Segmenting tiles", "instances": "Finding objects", "objects": "Measuring objects"}
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, MemoryError, RuntimeError)


class SegmentWidget(QWidget):
    """Plugins → MedSeg → Segment.

    Attributes:
        advanced_settings: ``InferenceSettings`` fields the form does not show (e.g. ``chunk``,
            ``superblock``, ``batch_size``), for scripts and tests.
        outcome: the last run's :class:`~napari_medseg.segment_job.JobOutcome` (None if it was
            cancelled or failed).
        run_finished: emitted on the GUI thread once the worker has finished and the run's layers
            are all shown, with ``outcome``.
    """

    run_finished = Signal(object)

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.advanced_settings: dict = {}
        self.worker = None
        self.outcome = None
        self.request: SegmentRequest | None = None
        self._layers: list = []
        self._image_name = ""
        self._next_request = None
        self._time_left = TimeLeft()
        self._refresh_labels = False
        self._refresh_timer = QTimer(self, singleShot=True, interval=REFRESH_MS)
        self._refresh_timer.timeout.connect(self._refresh_now)
        self._stale: list = []    # layers still to re-read, one per event-loop turn
        self._complete_pending = False   # the run ends once the stale layers are re-read
        self._refresh_step_timer = QTimer(self, interval=REFRESH_STEP_MS)
        self._refresh_step_timer.timeout.connect(self._refresh_one)
        self._shown = False       # this run's layers are (being) added
        self._regions: list = []  # regions the run has written (layers added later forget them)
        self._display_ready = threading.Event()
        self._adding = None       # layers still to add, one per event-loop turn
        self._add_timer = QTimer(self, interval=10)
        self._add_timer.timeout.connect(self._add_next_layer)
        # napari's activity-dock progress bar runs processEvents() on every update: update it
        # at most every BAR_MS and never re-enter the layer steps from inside that call.
        self._last_record = None
        self._in_bar_update = False
        self._bar_timer = QTimer(self, singleShot=True, interval=BAR_MS)
        self._bar_timer.timeout.connect(self._update_napari_bar)
        self.form = SegmentForm(load_state(), self)
        self._build()
        self.viewer.layers.events.inserted.connect(self._fill_images)
        self.viewer.layers.events.removed.connect(self._fill_images)
        self.viewer.layers.events.reordered.connect(self._fill_images)
        self._fill_images()
        self.form.changed.connect(self._save_state)

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        layout = QVBoxLayout(self)
        layout.addWidget(self.form)
        self.run_button = QPushButton("Run", toolTip=f"Segment the image ({RUN_KEYS}); running "
                                      "again on the same output resumes it and keeps your edits")
        self.cancel_button = QPushButton("Cancel", enabled=False,
                                         toolTip=f"Stop after the current tile ({CANCEL_KEYS}); "
                                         "finished blocks stay on disk and Run resumes")
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.progress = QProgressBar(minimum=0, maximum=1000, value=0, textVisible=True,
                                     toolTip="Progress of the current stage")
        layout.addWidget(self.progress)
        self.status = QLabel("Choose an image and a model, then press Run.", wordWrap=True)
        layout.addWidget(self.status)
        self.review = ReviewPanel(self.viewer, self._labels_layer, NEXT_KEYS, self)
        self.next_button, self.review_label = self.review.next_button, self.review.label
        layout.addWidget(self.review)
        layout.addStretch(1)
        for keys, slot in ((RUN_KEYS, self.run), (CANCEL_KEYS, self.cancel),
                           (NEXT_KEYS, self.next_uncertain_object)):
            QShortcut(QKeySequence(keys), self, activated=slot)

    def _fill_images(self, *_) -> None:
        for layer in self.viewer.layers:     # renaming a layer renames it in the picker
            layer.events.name.connect(self._fill_images)
        refill_names(self.form.image, [layer.name for layer in self.viewer.layers
                                       if isinstance(layer, Image) and "map" not in (medseg_info(layer) or {})])

    def _save_state(self) -> None:
        save_state(self.form.store_state())

    # ------------------------------------------------------------------ run / cancel
    def run(self) -> None:
        """Start a run with the form's settings (does nothing while one is running)."""
        if self.worker is not None:
            return
        try:
            request = self._make_request()
        except USER_ERRORS as exc:
            show_error(f"MedSeg: {exc}")
            self.status.setText(str(exc))
            return
        self._save_state()
        self._start(request)

    def cancel(self) -> None:
        """Ask the running job to stop at its next yield (within one tile)."""
        if self.worker is None:
            return
        self._next_request = None
        self._display_ready.set()
        self.worker.quit()
        self.cancel_button.setEnabled(False)
        self.status.setText("Cancelling: stopping after the current tile…")

    def _make_request(self) -> SegmentRequest:
        name = self.form.image.currentText()
        if name not in self.viewer.layers:
            raise ValueError("open an image first (File → Open, or File → Open Sample → MedSeg)")
        layer = self.viewer.layers[name]
        source, path = image_source_from_layer(layer, layer.world_to_data(self.viewer.dims.point))
        model = self.form.model_name()
        region = None
        if self.form.area.currentData() == "view":
            region = view_region(self.viewer, layer)
            if region is None:
                raise ValueError("the image is not in view: pan to it, or choose 'whole image'")
        overlap = self.form.overlap.value()
        settings = InferenceSettings(
            tile=self.form.tile.value() or None, overlap=None if overlap < 0 else overlap,
            device=self.form.device.currentData(), region=region,
            mc_samples=self.form.mc_samples.value() if self.form.offers_uncertainty() else 0,
            tta=self.form.tta_views(), scale=self.form.scale_value(), **self.advanced_settings)
        output = output_path(path, name, model, self.form.output.text().strip())
        return SegmentRequest(source, model, self.form.weights_value(), output, settings,
                              display_name=name)

    def _start(self, request: SegmentRequest) -> None:
        self._display_ready = threading.Event()   # the job waits while the layers are added
        request = self.request = dataclasses.replace(request, display_ready=self._display_ready)
        self.outcome = None
        self._image_name = self.form.image.currentText()
        self._layers = []
        self._shown = False
        self._regions = []
        self._time_left = TimeLeft()
        title = MODEL_TITLES.get(request.model_name, request.model_name)
        self.worker = start_job(segment_job, request, f"MedSeg: {title} on {self._image_name}", {
            "yielded": self._on_progress, "returned": self._on_returned,
            "errored": self._on_error, "aborted": self._on_aborted, "finished": self._on_finished})
        self.form.set_running(True)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setValue(0)
        self.status.setText(f"Starting {title}…")

    # ------------------------------------------------------------------ worker callbacks (GUI thread)
    def _on_progress(self, record) -> None:
        if record.stage == "output":
            self._show_layers(record.payload)   # layer data the worker read from the new output
            if self._adding is None:
                self._display_ready.set()
        elif record.stage in ("tiles", "instances", "objects"):
            self._show_layers()
        if record.total:
            self.progress.setMaximum(1000)
            self.progress.setValue(int(1000 * record.fraction))
        else:
            self.progress.setMaximum(0)   # busy indicator
        stage = STAGES.get(record.stage, record.stage)
        counts = f" {record.done}/{record.total}" if record.total else ""
        left = format_seconds(self._time_left.update(record))
        self.status.setText(f"{stage}{counts}" + (f" · {left}" if left else "")
                            + (f"\n{record.message}" if record.message else ""))
        self._last_record = record
        if not self._bar_timer.isActive():
            self._bar_timer.start()
        if record.region is not None:
            self._regions.append(record.region)
            invalidate_layers(self._layers, record.region)
            self._refresh_labels |= record.stage == "instances"
            if not self._refresh_timer.isActive():
                self._refresh_timer.start()

    def _on_returned(self, outcome) -> None:
        self.outcome = outcome
        self.progress.setMaximum(1000)
        self.progress.setValue(1000)
        self._show_layers()

    def _on_error(self, exc: Exception) -> None:
        self.progress.setMaximum(1000)
        if isinstance(exc, EditedOutputError):
            choice = self.ask_about_edited_output(exc)
            if choice == "new":
                self._next_request = dataclasses.replace(self.request, output=free_output_path(exc.path))
            elif choice == "replace":
                self._next_request = dataclasses.replace(self.request, replace_edited=True)
            self.status.setText("Not run: your edited labels are kept." if choice is None else
                                "Starting again…")
            return
        message = str(exc) if isinstance(exc, USER_ERRORS) else f"{type(exc).__name__}: {exc}"
        self.status.setText(f"Failed: {message}")
        show_error(f"MedSeg segmentation failed: {message}")

    def _on_aborted(self) -> None:
        kept = ""
        if self._shown:
            maps = OutputStore.open(self.request.output, mode="r").status("maps")
            kept = f" {maps['chunks_done']} of {maps['chunks_total']} chunks are kept;"
        self.status.setText(f"Cancelled.{kept} press Run to resume.")
        self._refresh_labels = True

    def _on_finished(self) -> None:
        self.worker = None
        self.cancel_button.setEnabled(False)
        request, self._next_request = self._next_request, None
        if request is not None:
            self._start(request)
        else:
            self._finish_when_shown()

    def _finish_when_shown(self) -> None:
        """After the worker and the layer additions are both done: final refresh, features,
        summary, controls back, ``run_finished``."""
        if self.worker is not None or self._adding is not None:
            return
        self._refresh_labels = True
        self._complete_pending = True
        self._refresh_now()
        if not self._stale and not self._refresh_timer.isActive():
            self._complete_run()

    def _complete_run(self) -> None:
        """Once the last refresh is shown: features, summary, controls back, ``run_finished``."""
        self._complete_pending = False
        if self.outcome is not None:
            self._report(self.outcome)
        self.form.set_running(False)
        self.run_button.setEnabled(True)
        self.run_finished.emit(self.outcome)

    def _report(self, outcome) -> None:
        labels = self._labels_layer()
        if labels is not None and outcome.objects is not None:
            labels.features = outcome.objects
            labels.metadata["medseg"]["uncertainty"] = uncertainty_source(
                OutputStore.open(outcome.output, mode="r"))[1]
            self.review.reset()
        text = outcome_summary(outcome)
        self.status.setText(text)
        show_info(f"MedSeg: {text}")
        for warning in outcome.result.maps.warnings:
            show_warning(f"MedSeg: {warning}")

    def ask_about_edited_output(self, error: EditedOutputError) -> str | None:
        """Ask what to do with an output holding hand-edited labels: ``"new"``, ``"replace"`` or
        None (do nothing). Tests replace this method."""
        return ask_about_edited_output(self, error.path.name, error.reason)

    # ------------------------------------------------------------------ layers
    def _show_layers(self, prepared: list | None = None) -> None:
        """Start adding the run's layers, one per event-loop turn (once per run), from the layer
        data the worker ``prepared`` or else read here."""
        if self._shown or self._image_name not in self.viewer.layers:
            return
        self._shown = True
        image = self.viewer.layers[self._image_name]
        store = None if prepared is not None else OutputStore.open(self.request.output)
        self._adding = show_run_steps(self.viewer, image, store, prepared)
        self._add_timer.start()

    def _update_napari_bar(self) -> None:
        record = self._last_record
        if self.worker is None or record is None:
            return
        self._in_bar_update = True
        try:
            update_progress_bar(self.worker, record.done, record.total,
                                f"MedSeg: {STAGES.get(record.stage, record.stage)}")
        finally:
            self._in_bar_update = False

    def _add_next_layer(self) -> None:
        if self._in_bar_update:
            return
        try:
            layer = next(self._adding)
        except StopIteration:
            self._add_timer.stop()
            self._adding = None
            self._display_ready.set()
            self._refresh_now()
            self._finish_when_shown()
            return
        if layer in self._layers:
            return   # the second step of a layer: it was just made visible
        self._layers.append(layer)
        for region in self._regions:   # written after its data was prepared
            invalidate_layers([layer], region)
        if isinstance(layer, Labels):
            layer.events.paint.connect(self._on_paint)
            if not medseg_info(layer).get("editable", True):
                show_info("MedSeg: the labels of an image this large are shown read-only "
                          "(napari cannot paint on multiscale labels)")

    def _refresh_now(self) -> None:
        if self._in_bar_update:
            self._refresh_timer.start()
            return
        if self._adding is not None:
            return   # the layers still being added read fresh data anyway
        layers = [layer for layer in self._layers if layer in self.viewer.layers]
        fresh = layers_to_refresh(layers, labels=self._refresh_labels)
        self._stale += [layer for layer in fresh if layer not in self._stale]
        self._refresh_labels = False
        if self._stale and not self._refresh_step_timer.isActive():
            self._refresh_step_timer.start()

    def _refresh_one(self) -> None:
        """Re-read one stale layer: napari slices each synchronously on this thread, so doing
        them one per turn keeps every pause short however many map layers a model shows."""
        if self._in_bar_update:
            return
        if not self._stale:
            self._refresh_step_timer.stop()
            if self._complete_pending:
                self._complete_run()
            return
        layer = self._stale.pop(0)
        if layer in self.viewer.layers:
            layer.refresh()

    def _labels_layer(self) -> Labels | None:
        name = self._image_name or self.form.image.currentText()
        found = [layer for layer in run_layers_of(self.viewer, name) if isinstance(layer, Labels)]
        return found[0] if found else None

    def _on_paint(self, event) -> None:
        layer = event.source
        region = edited_region(event.value, layer.data.shape[-2:])
        if region is None:
            return
        try:
            record_label_edit(OutputStore.open(medseg_info(layer)["output"]), region)
        except (OSError, ValueError) as exc:
            show_warning(f"MedSeg: the edit is on screen but could not be recorded: {exc}")

    def next_uncertain_object(self) -> None:
        """Centre the view on the object with the next highest mean uncertainty and select it."""
        if self.worker is None:
            self._image_name = self.form.image.currentText()
        self.review.next_object()

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        if self.worker is not None:
            self._display_ready.set()
            self.worker.quit()
        super().closeEvent(event)
