"""napari sample-data contributions (File → Open Sample → MedSeg)."""
from __future__ import annotations

from .core.samples import all_samples, mosaic


def load_sample_nuclei():
    """The bundled CC0 DSB2018 nuclei images as image layers."""
    layers = []
    for name, image in all_samples().items():
        layers.append((image, {"name": name, "rgb": image.ndim == 3}, "image"))
    return layers


def load_sample_mosaic():
    """An 8192 × 8192 lazy mosaic of nuclei for trying tiled inference."""
    return [(mosaic(8192), {"name": "nuclei mosaic 8192", "contrast_limits": (0, 255),
                            "multiscale": False}, "image")]
