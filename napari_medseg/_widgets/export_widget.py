"""MedSeg "Export labels" dock widget: a labels layer (or an output store) to TIFF, OME-TIFF,
QuPath GeoJSON or a per-object CSV.

The widget holds no export logic: Run builds an :class:`~napari_medseg.export_job.ExportRequest`
from the form and runs :func:`~napari_medseg.export_job.export_job` in a napari worker. Cancel is
``worker.quit()``: the job stops at its next yield (one row of tiles or one block) and leaves no
file under the chosen name.
"""
from __future__ import annotations

from pathlib import Path

from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel,
                            QLineEdit, QMessageBox, QProgressBar, QPushButton, QToolButton,
                            QVBoxLayout, QWidget)

from ..core.export_source import open_label_source
from ..export_job import (FORMAT_TITLES, ExportRequest, default_output, export_job, output_for,
                          source_from_layer)
from ..segment_job import image_source_from_layer
from ._combo import compact, refill
from ._worker import start_job, update_progress_bar

STORE = "__store__"          # labels combo item: an output store chosen on disk
NO_IMAGE = "__none__"
STAGES = {"checking": "Checking labels", "writing": "Writing", "measuring": "Measuring objects",
          "tracing": "Tracing outlines"}
USER_ERRORS = (ValueError, FileNotFoundError, OSError, KeyError, MemoryError)
FILTERS = {"tiff": "TIFF (*.tif *.tiff)", "ome-tiff": "OME-TIFF (*.ome.tif *.ome.tiff)",
           "geojson": "GeoJSON (*.geojson *.json)", "csv": "CSV (*.csv)"}


class ExportWidget(QWidget):
    """Plugins → MedSeg → Export labels.

    Attributes:
        result: the last export's :class:`~napari_medseg.core.export_source.ExportResult` (None if
            it was cancelled or failed).
        export_finished: emitted on the GUI thread when a run ends, with ``result``.
    """

    export_finished = Signal(object)

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None
        self.result = None
        self.request: ExportRequest | None = None
        self._build()
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed,
                      napari_viewer.layers.events.reordered):
            event.connect(self._fill_layers)
        self._fill_layers()
        self._on_source()
        self._on_format()

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.labels = compact(QComboBox(toolTip="Labels layer to export, or an output store (.zarr) on "
                                                "disk"))
        self.labels.currentIndexChanged.connect(self._on_source)
        form.addRow("Labels", self.labels)
        self.store = QLineEdit(placeholderText="napari-medseg output .zarr folder",
                               toolTip="An output store written by Segment or the CLI")
        self.store_button = QToolButton(text="…", toolTip="Choose an output store folder")
        self.store_button.clicked.connect(self._choose_store)
        form.addRow("Store", _row(self.store, self.store_button))
        self.format = QComboBox(toolTip="TIFF and OME-TIFF hold the label image; GeoJSON holds one "
                                        "QuPath detection per object; CSV one row per object")
        for key, title in FORMAT_TITLES.items():
            self.format.addItem(title, key)
        self.format.currentIndexChanged.connect(self._on_format)
        form.addRow("Format", self.format)
        self.image = compact(QComboBox(toolTip="Image whose mean intensity per object goes into the "
                                               "CSV or GeoJSON measurements (same size as the labels)"))
        form.addRow("Intensity", self.image)
        self.output = QLineEdit(placeholderText="next to the store, else in your home folder",
                                toolTip="File to write; its suffix follows the format")
        browse = QToolButton(text="…", toolTip="Choose the file to write")
        browse.clicked.connect(self._choose_output)
        form.addRow("Output", _row(self.output, browse))
        self.relabel = QCheckBox("Number objects 1…N", toolTip="Renumber the objects in ID order "
                                 "(the same numbers in every format): smaller files, and IDs stay "
                                 "exact in Fiji, which shows 32-bit labels as floats")
        form.addRow("", self.relabel)
        self.overwrite = QCheckBox("Replace an existing file without asking")
        form.addRow("", self.overwrite)
        layout.addLayout(form)
        self.run_button = QPushButton("Export", toolTip="Write the file in the background")
        self.cancel_button = QPushButton("Cancel", enabled=False,
                                         toolTip="Stop; nothing is left under the chosen name")
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        layout.addLayout(_row(self.run_button, self.cancel_button))
        self.progress = QProgressBar(minimum=0, maximum=1000, value=0, textVisible=True)
        layout.addWidget(self.progress)
        self.status = QLabel("Choose labels, a format and a file, then press Export.", wordWrap=True)
        layout.addWidget(self.status)
        layout.addStretch(1)

    def _fill_layers(self, *_) -> None:
        refill(self.labels, [(layer.name, layer.name) for layer in self.viewer.layers
                              if isinstance(layer, Labels)] + [("Output store on disk…", STORE)])
        refill(self.image, [("(none)", NO_IMAGE)] + [(layer.name, layer.name) for layer in
                                                      self.viewer.layers if isinstance(layer, Image)])
        self._on_source()

    def _on_source(self, *_) -> None:
        on_disk = self.labels.currentData() == STORE
        self.store.setEnabled(on_disk)
        self.store_button.setEnabled(on_disk)

    def _on_format(self, *_) -> None:
        fmt = self.format.currentData()
        self.image.setEnabled(fmt in ("csv", "geojson"))
        if self.output.text().strip():
            self.output.setText(str(output_for(self.output.text().strip(), fmt)))

    def _choose_store(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Output store", self.store.text() or str(Path.home()))
        if folder:
            self.store.setText(folder)

    def _choose_output(self) -> None:
        fmt = self.format.currentData()
        start = self.output.text() or str(Path.home())
        path, _ = QFileDialog.getSaveFileName(self, "Export labels to", start, FILTERS[fmt],
                                              options=QFileDialog.DontConfirmOverwrite)
        if path:
            self.output.setText(str(output_for(path, fmt)))

    # ------------------------------------------------------------------ run / cancel
    def run(self) -> None:
        """Start an export with the form's settings (does nothing while one is running)."""
        if self.worker is not None:
            return
        try:
            request = self._make_request()
        except USER_ERRORS as exc:
            self._fail(str(exc))
            return
        if request is None:
            self.status.setText("Not exported: the existing file is kept.")
            return
        self._start(request)

    def cancel(self) -> None:
        """Stop the running export at its next step; nothing is left under the chosen name."""
        if self.worker is None:
            return
        self.worker.quit()
        self.cancel_button.setEnabled(False)
        self.status.setText("Cancelling…")

    def _make_request(self) -> ExportRequest | None:
        fmt = self.format.currentData()
        if self.labels.currentData() == STORE:
            if not self.store.text().strip():
                raise ValueError("choose an output store (.zarr folder) or a labels layer")
            source = open_label_source(self.store.text().strip())
        else:
            name = self.labels.currentData()
            if name not in self.viewer.layers:
                raise ValueError("add a labels layer first (run Segment, or open a label image)")
            source = source_from_layer(self.viewer.layers[name])
        text = self.output.text().strip()
        output = output_for(text, fmt) if text else default_output(source, fmt)
        image = None
        if self.image.isEnabled() and self.image.currentData() not in (None, NO_IMAGE):
            layer = self.viewer.layers[self.image.currentData()]
            image = image_source_from_layer(layer, layer.world_to_data(self.viewer.dims.point))[0]
        overwrite = self.overwrite.isChecked()
        if output.exists() and not overwrite:
            if not self.confirm_overwrite(output):
                return None
            overwrite = True
        return ExportRequest(source, output, fmt, overwrite=overwrite, image=image,
                             relabel=self.relabel.isChecked())

    def confirm_overwrite(self, path: Path) -> bool:
        """Ask whether to replace an existing file (tests replace this method)."""
        answer = QMessageBox.question(self, "MedSeg: replace file?",
                                      f"{path.name} already exists in {path.parent}. Replace it?",
                                      QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
        return answer == QMessageBox.Yes

    def _start(self, request: ExportRequest) -> None:
        self.request, self.result = request, None
        self.worker = start_job(export_job, request, f"MedSeg: export {request.output.name}", {
            "yielded": self._on_progress, "returned": self._on_returned, "errored": self._on_error,
            "aborted": self._on_aborted, "finished": self._on_finished})
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setValue(0)
        self.status.setText(f"Exporting to {request.output}…")

    # ------------------------------------------------------------------ worker callbacks (GUI thread)
    def _on_progress(self, record) -> None:
        self.progress.setValue(int(1000 * record.fraction))
        stage = STAGES.get(record.stage, record.stage)
        counts = f" {record.done}/{record.total}" if record.total else ""
        self.status.setText(f"{stage}{counts}" + (f"\n{record.message}" if record.message else ""))
        update_progress_bar(self.worker, record.done, record.total, f"MedSeg: {stage}")

    def _on_returned(self, result) -> None:
        self.result = result
        self.progress.setValue(1000)
        what = f"{result.objects} objects" if result.objects is not None else f"{result.dtype} labels"
        text = f"Exported {what} to {result.path}"
        self.status.setText(text)
        show_info(f"MedSeg: {text}")
        for warning in result.warnings:
            show_warning(f"MedSeg: {warning}")

    def _on_error(self, exc: Exception) -> None:
        message = str(exc) if isinstance(exc, USER_ERRORS) else f"{type(exc).__name__}: {exc}"
        self._fail(message)

    def _fail(self, message: str) -> None:
        self.status.setText(f"Not exported: {message}")
        show_error(f"MedSeg export failed: {message}")

    def _on_aborted(self) -> None:
        self.status.setText(f"Cancelled: nothing was written to {self.request.output.name}.")

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.export_finished.emit(self.result)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        if self.worker is not None:
            self.worker.quit()
        super().closeEvent(event)


def _row(*widgets) -> QHBoxLayout:
    row = QHBoxLayout()
    for widget in widgets:
        row.addWidget(widget)
    return row
