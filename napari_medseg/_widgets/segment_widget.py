"""MedSeg "Segment" dock widget (placeholder until issue 5 lands: it only says so)."""
from __future__ import annotations

from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget


class SegmentWidget(QWidget):
    """Placeholder dock widget; the real controls arrive with issue 5."""

    def __init__(self, napari_viewer=None, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        layout = QVBoxLayout(self)
        label = QLabel("Segment: not available in this version yet (issue 5 of napari-medseg).")
        label.setWordWrap(True)
        layout.addWidget(label)
