"""Where bundled files live, for editable installs and built wheels alike.

``resources/`` sits at the repository root; ``napari_medseg/resources`` is a symlink to it, and a built
wheel carries a real copy under the same name. Runtime code finds everything through this module,
never through paths computed from the working directory.
"""
from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

SAMPLE_NAMES = ("fluorescence_small", "fluorescence_large", "histology_he", "brightfield")


def resources_dir() -> Path:
    """The bundled ``resources`` folder."""
    path = Path(str(files("napari_medseg") / "resources"))
    if not path.is_dir():
        raise FileNotFoundError(f"bundled resources not found at {path}; reinstall napari-medseg")
    return path


def resource_path(*parts: str) -> Path:
    """Path of a bundled file, e.g. ``resource_path("samples", "brightfield.png")``."""
    return resources_dir().joinpath(*parts)


def weights_dir() -> Path:
    """Folder of the bundled starter weights."""
    return resource_path("weights")


def starter_weights(model_name: str) -> Path | None:
    """Stem of the bundled starter weights for ``model_name`` (None when none are bundled)."""
    folder = weights_dir()
    if not folder.is_dir():
        return None
    for card in sorted(folder.glob(f"{model_name}_*.json")):
        if json.loads(card.read_text()).get("architecture") == model_name and card.with_suffix(
                ".safetensors").exists():
            return card.with_suffix("")
    return None


def sample_image_path(name: str) -> Path:
    """PNG path of a bundled sample (one of ``SAMPLE_NAMES``)."""
    if name not in SAMPLE_NAMES:
        raise KeyError(f"unknown sample {name!r}; choose one of: {', '.join(SAMPLE_NAMES)}")
    return resource_path("samples", f"{name}.png")


def sample_labels_path(name: str) -> Path:
    """Ground-truth instance labels (uint16 TIFF) of a bundled sample."""
    return resource_path("samples", f"{name}_labels.tif")
