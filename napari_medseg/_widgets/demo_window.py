"""The napari window of ``napari-medseg demo``: a sample image with the Segment widget docked."""
from __future__ import annotations

import numpy as np


def open_demo(image: np.ndarray, name: str, screenshot: str | None = None) -> None:
    """Open napari with ``image`` (``(H, W)`` or ``(H, W, C)``) and the Segment widget; block until
    the window closes. With ``screenshot``, save the whole window there after start-up and close it
    (for documentation and smoke checks)."""
    import napari
    from qtpy.QtCore import QTimer

    viewer = napari.Viewer(title="napari-medseg demo")
    viewer.add_image(image, name=name)
    viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    if screenshot:
        def shoot():
            viewer.screenshot(path=screenshot, canvas_only=False, flash=False)
            viewer.close()

        QTimer.singleShot(2000, shoot)
    napari.run()
