"""A combo box helper shared by the MedSeg widgets."""
from __future__ import annotations

from qtpy.QtWidgets import QComboBox


def refill(combo: QComboBox, items: list[tuple[str, object]]) -> None:
    """Replace a combo's ``(text, data)`` items without emitting signals, keeping the current
    choice when it is still offered (else the first item)."""
    current = combo.currentData()
    combo.blockSignals(True)
    combo.clear()
    for text, data in items:
        combo.addItem(text, data)
    index = combo.findData(current)
    combo.setCurrentIndex(index if index >= 0 else 0)
    combo.blockSignals(False)


def refill_names(combo: QComboBox, names: list[str]) -> None:
    """:func:`refill` with layer names as both text and data."""
    refill(combo, [(name, name) for name in names])


def compact(combo: QComboBox, chars: int = 22) -> QComboBox:
    """Let ``combo`` shrink to about ``chars`` characters instead of its longest item (weights
    names and layer names can be long and would widen the whole dock, narrowing the canvas);
    its popup list still shows every item in full."""
    combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(chars)
    model = combo.model()
    for signal in (model.rowsInserted, model.rowsRemoved, model.modelReset):
        signal.connect(lambda *_: _fit_popup(combo))
    return combo


def _fit_popup(combo: QComboBox) -> None:
    view = combo.view()
    view.setMinimumWidth(view.sizeHintForColumn(0) + view.verticalScrollBar().sizeHint().width())
