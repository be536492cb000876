"""MedSeg "Fine-tune on edits" dock widget (placeholder until issue 7 lands: it only says so)."""
from __future__ import annotations

from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget


class FinetuneWidget(QWidget):
    """Placeholder dock widget; the real controls arrive with issue 7."""

    def __init__(self, napari_viewer=None, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        layout = QVBoxLayout(self)
        label = QLabel("Fine-tune on edits: not available in this version yet (issue 7 of napari-medseg).")
        label.setWordWrap(True)
        layout.addWidget(label)
