"""MedSeg "Export labels" dock widget (placeholder until issue 8 lands: it only says so)."""
from __future__ import annotations

from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget


class ExportWidget(QWidget):
    """Placeholder dock widget; the real controls arrive with issue 8."""

    def __init__(self, napari_viewer=None, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        layout = QVBoxLayout(self)
        label = QLabel("Export labels: not available in this version yet (issue 8 of napari-medseg).")
        label.setWordWrap(True)
        layout.addWidget(label)
