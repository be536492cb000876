"""Questions the MedSeg widgets ask the user (modal Qt dialogs)."""
from __future__ import annotations

from qtpy.QtWidgets import QMessageBox


def ask_about_edited_output(parent, path_name: str, reason: str) -> str | None:
    """An output holds hand-edited labels and the run uses other settings: ``"new"`` (write a new
    output), ``"replace"`` (replace the edits) or None (do nothing)."""
    box = QMessageBox(QMessageBox.Question, "MedSeg: edited labels",
                      f"{path_name} holds labels you edited, and this run uses other "
                      f"settings ({reason}).", parent=parent)
    new = box.addButton("Keep edits, write a new output", QMessageBox.AcceptRole)
    replace = box.addButton("Replace my edits", QMessageBox.DestructiveRole)
    box.addButton(QMessageBox.Cancel)
    box.exec_()
    return {new: "new", replace: "replace"}.get(box.clickedButton())
