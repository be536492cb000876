"""The Segment widget's "Review" box: jump to the next most uncertain object."""
from __future__ import annotations

from qtpy.QtWidgets import QGroupBox, QLabel, QPushButton, QVBoxLayout

from ..layer_data import medseg_info
from ..review import camera, object_view, ranked_objects


class ReviewPanel(QGroupBox):
    """A button that centres the view on the object with the next highest mean uncertainty
    (from the labels layer's ``features``) and selects its label; a line describing it."""

    def __init__(self, viewer, labels_layer, shortcut: str, parent=None):
        """``labels_layer``: a callable returning the labels layer under review (or None)."""
        super().__init__("Review", parent)
        self.viewer = viewer
        self.labels_layer = labels_layer
        self.rank = -1
        self.next_button = QPushButton(
            "Next most uncertain object",
            toolTip=f"Jump to the object with the next highest mean uncertainty ({shortcut}); "
                    "per-object values are in the labels layer's features (Layers → Metadata → "
                    "Features table widget) for sorting and filtering")
        self.next_button.clicked.connect(self.next_object)
        self.label = QLabel("", wordWrap=True)
        layout = QVBoxLayout(self)
        layout.addWidget(self.next_button)
        layout.addWidget(self.label)

    def reset(self) -> None:
        """Start again from the most uncertain object (after a run)."""
        self.rank = -1
        self.label.setText("")

    def next_object(self) -> None:
        labels = self.labels_layer()
        order = ranked_objects(labels.features if labels is not None else None)
        if not len(order):
            self.label.setText("No per-object uncertainty yet: run a segmentation first.")
            return
        self.rank = (self.rank + 1) % len(order)
        row = labels.features.iloc[int(order[self.rank])]
        (y, x), zoom = object_view(row, labels, self.viewer.canvas.size)
        view = camera(self.viewer)
        view.center = (*view.center[:-2], y, x)
        view.zoom = zoom
        labels.selected_label = int(row["index"])
        self.viewer.layers.selection.active = labels
        source = medseg_info(labels).get("uncertainty", "mean uncertainty")
        self.label.setText(f"Object {self.rank + 1} of {len(order)}: label {int(row['index'])}, "
                           f"{source} {row['uncertainty']:.3f}, {int(row['area'])} px")
