"""MedSeg "Fine-tune on edits" dock widget: learn from the user's corrections, manage versions.

Thin by design: every button calls one Qt-free job (:func:`~napari_medseg.core.finetune.finetune_job`,
:func:`~napari_medseg.core.rerun.compare_job`, :func:`~napari_medseg.core.rerun.rerun_job`) in a
napari worker, or one function of :mod:`napari_medseg.core.versions`. Layers are read when a job
starts and touched only in callbacks, which Qt runs on the GUI thread. Cancel is ``worker.quit()``:
the job stops at its next step and nothing is written.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from napari.layers import Labels, Shapes
from napari.utils.notifications import show_error
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                            QProgressBar, QPushButton, QSpinBox, QVBoxLayout, QWidget)

from src_models import read_card

from ..core import versions
from ..core.devices import available_devices
from ..core.finetune import FinetuneSettings, finetune_job
from ..core.finetune_data import run_normalization, run_scale
from ..core.rerun import compare_job, model_labels, rerun_job
from ..core.resources import starter_weights
from ..finetune_layers import (FinetuneError, RunContext, capped_view, reviewed_mask, reviewed_regions,
                               run_context)
from ..layer_data import invalidate_layers, medseg_info, refresh_layers, run_layers_of
from ..segment_job import image_source_from_layer
from ._combo import compact, refill_names
from ._version_tree import VersionTree
from ._worker import start_job, update_progress_bar

NONE = "(none)"
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, MemoryError, OSError)
BAR_S = 0.5               # napari's activity bar is updated at most this often (it processes events)


def _drive(make_job):
    """Generator function wrapping a zero-argument job factory (napari needs a generator function)."""
    return (yield from make_job())


class FinetuneWidget(QWidget):
    """Plugins → MedSeg → Fine-tune on edits.

    Attributes:
        result: the last fine-tune's :class:`~napari_medseg.core.finetune.FinetuneResult`.
        job_finished: emitted on the GUI thread when any job ends, with its result (None when
            cancelled or failed).
    """

    job_finished = Signal(object)

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None
        self.result = None
        self._job_result = None
        self._on_result = None
        self._bar_time = 0.0
        self._build()
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._fill_layers)
        self._fill_layers()

    # ------------------------------------------------------------------ form
    def _build(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.labels_combo, self.shapes_combo = compact(QComboBox()), compact(QComboBox())
        self.labels_combo.setToolTip("labels layer of a MedSeg run that you corrected")
        self.shapes_combo.setToolTip("optional Shapes layer: rectangles around regions you reviewed "
                                     "completely (they count as ground truth, background included)")
        self.labels_combo.currentIndexChanged.connect(self._labels_changed)
        form.addRow("Corrected labels", self.labels_combo)
        form.addRow("Reviewed regions", self.shapes_combo)
        self.weights_edit = QLineEdit()
        self.weights_edit.setPlaceholderText("weights the labels were made with")
        browse = QPushButton("…")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.weights_edit)
        row.addWidget(browse)
        form.addRow("Parent weights", row)
        defaults = FinetuneSettings()
        self.steps = QSpinBox(minimum=1, maximum=100_000, value=defaults.steps)
        self.budget = QSpinBox(minimum=0, maximum=36_000, value=int(defaults.time_budget_s), suffix=" s")
        self.budget.setToolTip("stop after this much training time (0: steps only)")
        self.device = QComboBox()
        for name in ["auto"] + available_devices():
            self.device.addItem(name, name)
        form.addRow("Steps at most", self.steps)
        form.addRow("Time budget", self.budget)
        form.addRow("Device", self.device)
        layout.addLayout(form)
        buttons = QHBoxLayout()
        self.run_button, self.cancel_button = QPushButton("Fine-tune on edits"), QPushButton("Cancel")
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.cancel_button.setEnabled(False)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.progress = QProgressBar(maximum=1000)
        self.status = QLabel("Correct objects in a MedSeg labels layer, then fine-tune.")
        self.status.setWordWrap(True)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        self._build_versions(layout)

    def _build_versions(self, layout) -> None:
        layout.addWidget(QLabel("Versions (* = active)"))
        self.tree = VersionTree()
        layout.addWidget(self.tree)
        row = QHBoxLayout()
        self.adopt_button, self.rollback_button = QPushButton("Adopt"), QPushButton("Roll back")
        self.compare_button, self.rerun_button = QPushButton("Compare on view"), QPushButton("Re-run")
        self.adopt_button.setToolTip("use the selected version as this model's active weights")
        self.rollback_button.setToolTip("make the active version's parent active again")
        self.compare_button.setToolTip("run the selected version and its parent on the current view "
                                       "into two label layers")
        self.rerun_button.setToolTip("re-segment with the selected version, keeping every object you "
                                     "edited or reviewed")
        for button, slot in ((self.adopt_button, self.adopt), (self.rollback_button, self.rollback),
                             (self.compare_button, self.compare), (self.rerun_button, self.rerun)):
            button.clicked.connect(slot)
            row.addWidget(button)
        layout.addLayout(row)
        self.rerun_area = QComboBox()
        self.rerun_area.addItem("current view", "view")
        self.rerun_area.addItem("whole image", "whole")
        form = QFormLayout()
        form.addRow("Re-run on", self.rerun_area)
        layout.addLayout(form)

    def _fill_layers(self, *_) -> None:
        for combo, kind, extra in ((self.labels_combo, Labels, []), (self.shapes_combo, Shapes, [NONE])):
            refill_names(combo, extra + [layer.name for layer in self.viewer.layers if isinstance(layer, kind)
                                         and (kind is Shapes or (medseg_info(layer) or {}).get("map") == "labels")])
        self._labels_changed()

    def _labels_changed(self, *_) -> None:
        try:
            context = self._context()
        except FinetuneError:
            self.tree.clear()
            return
        if context.parent is not None and not self.weights_edit.text():
            self.weights_edit.setText(str(context.parent))
        self.refresh_versions()

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Parent weights", "", "Weights (*.safetensors)")
        if path:
            self.weights_edit.setText(path)

    # ------------------------------------------------------------------ reading the layers
    def _context(self) -> RunContext:
        return run_context(self.viewer, self.labels_combo.currentText())

    def _reviewed(self, labels) -> list:
        name = self.shapes_combo.currentText()
        shapes = self.viewer.layers[name] if name not in (NONE, "") and name in self.viewer.layers else None
        return reviewed_regions(shapes, labels)

    # ------------------------------------------------------------------ fine-tune
    def run(self) -> None:
        """Start a fine-tune of the parent weights on the chosen layers' edits."""
        try:
            context = self._context()
            parent = self.weights_edit.text().strip() or (str(context.parent) if context.parent else "")
            if not parent:
                raise FinetuneError("choose the weights these labels were made with (Parent weights)")
            model = model_labels(context.store)
            reviewed = self._reviewed(context.layer)
            if model is None and not reviewed:
                raise FinetuneError("this run recorded no model labels to compare your edits with; "
                                    "draw rectangles around reviewed regions in a Shapes layer, or "
                                    "re-run the segmentation")
            source, _ = image_source_from_layer(context.image_layer, self.viewer.dims.point)
        except (FinetuneError, *USER_ERRORS) as exc:
            self._fail(str(exc))
            return
        settings = FinetuneSettings(steps=self.steps.value(), time_budget_s=self.budget.value() or None,
                                    device=self.device.currentData())
        run = context.store.attrs.get("run", {})
        norm, scale = run_normalization(run), run_scale(run)
        labels = context.layer.data
        self._start(lambda: finetune_job(parent, source, labels, model, reviewed=reviewed,
                                         normalization=norm, settings=settings, scale=scale),
                    f"MedSeg: fine-tune {context.architecture}", self._finetuned)

    def _finetuned(self, result) -> None:
        self.result = result
        info = result.card["finetune"]
        held = info["heldout_loss"]
        loss = held if held["before"] is not None else {"before": result.edit_loss["before"],
                                                        "best": result.edit_loss["after"]}
        what = "held-out loss" if held["before"] is not None else "loss on the edits"
        detail = f"{what} {loss['before']:.3f} → {loss['best']:.3f}"
        name = result.card.get("version") or Path(result.path).name
        self.status.setText(f"New version {name}: {result.steps} steps in {result.seconds:.0f} s "
                            f"({result.stopped}); {detail}. Compare it on the view, then adopt it or "
                            "keep the parent." + "".join(f"\n{w}" for w in result.warnings))
        self.refresh_versions(select=result.path)

    # ------------------------------------------------------------------ versions
    def refresh_versions(self, select=None) -> None:
        """Rebuild the version tree of the chosen run's architecture."""
        try:
            context = self._context()
        except FinetuneError:
            self.tree.clear()
            return
        arch = context.architecture
        self.tree.fill(arch, extra=[p for p in (starter_weights(arch), context.parent) if p], select=select)

    def version_paths(self) -> list[str]:
        """Weights stems listed in the tree, parents first (for scripts and tests)."""
        return self.tree.paths()

    def _selected(self) -> str:
        path = self.tree.selected()
        if not path:
            raise FinetuneError("select a version (with its weights file on disk) in the list first")
        return path

    def adopt(self) -> None:
        """Make the selected version the active weights of its model."""
        try:
            context, path = self._context(), self._selected()
            versions.adopt(context.architecture, self._version_key(context, path))
        except (FinetuneError, *USER_ERRORS) as exc:
            self._fail(str(exc))
            return
        self.status.setText(f"Active {context.architecture} weights: {path}")
        self.refresh_versions(select=path)

    def rollback(self) -> None:
        """Make the active version's parent active again."""
        try:
            context = self._context()
            now = versions.rollback(context.architecture)
        except (FinetuneError, *USER_ERRORS) as exc:
            self._fail(str(exc))
            return
        self.status.setText(f"Rolled back: active {context.architecture} weights are now "
                            f"{now or 'the bundled starter'}")
        self.refresh_versions(select=now)

    @staticmethod
    def _version_key(context: RunContext, path: str) -> str:
        folder = versions.arch_dir(context.architecture)
        stem = Path(path)
        return stem.parent.name if stem.parent.parent == folder else path

    # ------------------------------------------------------------------ compare and re-run
    def compare(self) -> None:
        """Run the selected version and its parent on the current view into two label layers."""
        try:
            context, child = self._context(), self._selected()
            card = read_card(child)
            parent = (card.get("parent") or {}).get("path")
            if not parent or not Path(parent + ".json").exists():
                raise FinetuneError("the selected version has no parent weights on disk to compare with")
            region = capped_view(self.viewer, context.layer)
            source, _ = image_source_from_layer(context.image_layer, self.viewer.dims.point)
        except (FinetuneError, *USER_ERRORS) as exc:
            self._fail(str(exc))
            return
        device = self.device.currentData()
        self._start(lambda: compare_job(source, parent, child, context.architecture, region, device),
                    "MedSeg: compare versions", lambda result: self._compared(context, result))

    def _compared(self, context: RunContext, result) -> None:
        layer = context.layer
        translate = np.asarray(layer.translate[-2:]) + np.asarray(result.region[::2]) * layer.scale[-2:]
        for name, data in (("parent", result.parent), ("child", result.child)):
            title = f"{context.image_layer.name} {name} labels (view)"
            if title in self.viewer.layers:
                self.viewer.layers.remove(title)
            self.viewer.add_labels(data, name=title, scale=layer.scale[-2:], translate=translate,
                                   opacity=0.6, visible=name == "child")
        d = result.differences
        self.status.setText(f"Compared on the view: {d['different_objects']} objects differ "
                            f"({d['only_a']} only in the parent, {d['only_b']} only in the new "
                            f"version; {d['objects_a']} vs {d['objects_b']} objects)")

    def rerun(self) -> None:
        """Re-segment the view (or whole image) with the selected version, keeping edits."""
        try:
            context, weights = self._context(), self._selected()
            region = capped_view(self.viewer, context.layer) if self.rerun_area.currentData() == "view" else None
            source, _ = image_source_from_layer(context.image_layer, self.viewer.dims.point)
            reviewed = self._reviewed(context.layer)
        except (FinetuneError, *USER_ERRORS) as exc:
            self._fail(str(exc))
            return
        mask = reviewed_mask(tuple(context.layer.data.shape[-2:]), reviewed)
        output, device = context.store.path, self.device.currentData()
        self._start(lambda: rerun_job(source, output, weights, context.architecture, region, mask, device),
                    "MedSeg: re-run keeping edits", lambda result: self._rerun_done(context, result))

    def _rerun_done(self, context: RunContext, result) -> None:
        # the re-run rewrote probabilities and maps too: re-read every layer of this run
        invalidate_layers([context.layer])
        context.layer.refresh()
        refresh_layers([layer for layer in run_layers_of(self.viewer, context.image_layer.name)
                        if layer is not context.layer])
        self.status.setText(f"Re-run done on {result.blocks} block(s): {result.protected_pixels} pixels "
                            "you edited or reviewed were kept")

    # ------------------------------------------------------------------ worker plumbing
    def _start(self, make_job, description: str, on_result) -> None:
        if self.worker is not None:
            self._fail("a job is already running; cancel it first")
            return
        self._job_result, self._on_result = None, on_result
        self.worker = start_job(_drive, make_job, description, {
            "yielded": self._on_progress, "returned": self._on_returned, "errored": self._on_error,
            "aborted": self._on_aborted, "finished": self._on_finished})
        self._set_running(True)
        self.progress.setValue(0)
        self.status.setText(f"{description.split(': ', 1)[-1]}: starting…")

    def cancel(self) -> None:
        """Stop the running job at its next step; nothing is written."""
        if self.worker is not None:
            self.worker.quit()
            self.status.setText("Cancelling…")

    def _set_running(self, running: bool) -> None:
        for button in (self.run_button, self.adopt_button, self.rollback_button, self.compare_button,
                       self.rerun_button):
            button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def _on_progress(self, record) -> None:
        fraction = record.metrics.get("fraction", record.fraction)
        self.progress.setValue(int(1000 * fraction))
        text = record.message
        if "loss" in record.metrics:
            text = f"Step {record.done}/{record.total} · loss {record.metrics['loss']:.4f}"
            if "heldout" in record.metrics:
                text += f" · held-out {record.metrics['heldout']:.4f}"
        self.status.setText(text)
        now = time.perf_counter()
        if now - self._bar_time > BAR_S:
            self._bar_time = now
            update_progress_bar(self.worker, int(1000 * fraction), 1000, record.stage)

    def _on_returned(self, result) -> None:
        self._job_result = result
        self.progress.setValue(1000)
        if self._on_result is not None:
            self._on_result(result)

    def _on_error(self, exc: Exception) -> None:
        message = str(exc) if isinstance(exc, USER_ERRORS) else f"{type(exc).__name__}: {exc}"
        self._fail(message)      # the worker is still set: job_finished follows from finished

    def _on_aborted(self) -> None:
        self.status.setText("Cancelled: nothing was written; the parent weights are unchanged.")

    def _on_finished(self) -> None:
        self.worker = None
        self._set_running(False)
        self.job_finished.emit(self._job_result)

    def _fail(self, message: str) -> None:
        """Show why an action did not happen; an action refused before its job started also
        ends with ``job_finished(None)``, like a failed job."""
        self.status.setText(f"Not done: {message}")
        show_error(f"MedSeg: {message}")
        if self.worker is None:
            self.job_finished.emit(None)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        if self.worker is not None:
            self.worker.quit()
        super().closeEvent(event)

