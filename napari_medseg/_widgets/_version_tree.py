"""The version tree of the "Fine-tune on edits" widget: a ``QTreeWidget`` of weights versions."""
from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QTreeWidget, QTreeWidgetItem

from ..core import versions


class VersionTree(QTreeWidget):
    """Versions of one architecture as a tree (parents above children, ``*`` = active); each
    item holds its weights stem (empty for a parent whose file is gone)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setHeaderLabels(["version", "details"])

    def fill(self, architecture: str, extra=(), select=None) -> None:
        """Rebuild from the model folder; keeps the selection unless ``select`` names a stem."""
        if select is None and self.currentItem() is not None:
            select = self.currentItem().data(0, Qt.UserRole) or None
        self.clear()
        active = versions.active_path(architecture)
        for root in versions.version_tree(architecture, extra=extra):
            self._add(root, None, active, select)
        self.expandAll()
        self.resizeColumnToContents(0)

    def _add(self, node, parent_item, active, select) -> None:
        is_active = active is not None and node.path is not None and \
            Path(node.path).resolve() == Path(active).resolve()
        label = node.id if node.path is None or node.id != str(node.path) else Path(node.id).name
        item = QTreeWidgetItem([("* " if is_active else "") + label, node.details()])
        item.setData(0, Qt.UserRole, str(node.path) if node.path is not None else "")
        item.setToolTip(0, str(node.path or "weights file missing"))
        if parent_item is None:
            self.addTopLevelItem(item)
        else:
            parent_item.addChild(item)
        if select is not None and node.path is not None and str(node.path) == str(select):
            self.setCurrentItem(item)
        for child in node.children:
            self._add(child, item, active, select)

    def paths(self) -> list[str]:
        """Weights stems listed, parents before children."""
        found = []

        def visit(item):
            found.append(item.data(0, Qt.UserRole))
            for i in range(item.childCount()):
                visit(item.child(i))

        for i in range(self.topLevelItemCount()):
            visit(self.topLevelItem(i))
        return found

    def selected(self) -> str | None:
        """The selected version's weights stem (None when nothing usable is selected)."""
        item = self.currentItem()
        return (item.data(0, Qt.UserRole) or None) if item is not None else None
