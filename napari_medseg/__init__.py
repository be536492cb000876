"""napari-medseg: interactive segmentation of large microscopy and histology images.

The Qt-free engine lives in :mod:`napari_medseg.core`; napari widgets in :mod:`napari_medseg._widgets`
(imported only by napari through the manifest, never from here, so importing this package never
pulls in Qt).
"""
__version__ = "0.1.0"
