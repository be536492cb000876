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


STARTER_DATA = "dsb2018"   # the starters' training set (CC0): `<model>_<preset>_dsb2018` in resources/weights


def bundled_weights(model_name: str | None = None) -> list[Path]:
    """Stems of the bundled weights (those of ``model_name`` only, when given), sorted by name.

    Besides one DSB2018 starter per network the folder may hold weights for a narrower domain
    (e.g. ``gca_resunet_lite_monuseg2018``, H&E tissue), each with its own card and data licence.
    """
    folder = weights_dir()
    if not folder.is_dir():
        return []
    stems = []
    for card in sorted(folder.glob("*.json")):
        if not card.with_suffix(".safetensors").exists():
            continue
        if model_name is None or json.loads(card.read_text()).get("architecture") == model_name:
            stems.append(card.with_suffix(""))
    return stems


def starter_weights(model_name: str) -> Path | None:
    """Stem of the bundled starter weights for ``model_name``: the ones trained on DSB2018, which
    ``segment`` and the widgets use by default (None when none are bundled)."""
    for stem in bundled_weights(model_name):
        if stem.name.endswith(f"_{STARTER_DATA}"):
            return stem
    return None


def resolve_weights_name(value: str) -> str:
    """A ``--weights`` value as a path: unchanged when it is a weights file (stem or with suffix),
    the bundled stem when it names bundled weights (``gca_resunet_lite_monuseg2018``).

    Raises:
        FileNotFoundError: neither a weights file nor a bundled name; the message lists the names.
    """
    from src_models.weights_io import weights_paths

    if weights_paths(value)[0].exists():
        return value
    bundled = {stem.name: stem for stem in bundled_weights()}
    name = Path(value).name
    for suffix in (".safetensors", ".json"):
        name = name.removesuffix(suffix)
    if Path(value).parent == Path(".") and name in bundled:
        return str(bundled[name])
    raise FileNotFoundError(f"weights {value} not found: give a .safetensors file (with its .json card) "
                            f"or the name of bundled weights: {', '.join(sorted(bundled)) or 'none'}")


def sample_image_path(name: str) -> Path:
    """PNG path of a bundled sample (one of ``SAMPLE_NAMES``)."""
    if name not in SAMPLE_NAMES:
        raise KeyError(f"unknown sample {name!r}; choose one of: {', '.join(SAMPLE_NAMES)}")
    return resource_path("samples", f"{name}.png")


def sample_labels_path(name: str) -> Path:
    """Ground-truth instance labels (uint16 TIFF) of a bundled sample."""
    return resource_path("samples", f"{name}_labels.tif")
