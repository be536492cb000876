"""Labelled data folders → in-memory training sets (shared by train, fine-tune and evaluate).

Accepted layouts (those of ../shared/data, plus a generic one):

* ``images/<id>.png`` + ``labels/<id>.tif`` instance maps (DSB2018; also the generic layout);
* ``images/<id>.png`` + ``instance_labels/<id>.tif`` (MoNuSeg; images without instance labels are
  skipped unless only semantic masks are wanted);
* ``image/NN.png`` + ``label/NN.png`` semantic masks, 255 = cell interior, 0 = membrane (ISBI 2012).
* ``images/`` + ``labels/`` + ``pseudo_labels.json``: a folder written by :mod:`.pseudo_labels`, whose
  listed ids have model-completed labels (trained on, never validated on).

The validation split is a stable hash of each image id, stratified by modality where an
``index.json`` gives one, so the same images are held out on every machine and run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from skimage import io as skio

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg")
PSEUDO_MANIFEST = "pseudo_labels.json"   # lists the ids whose labels a model completed (.pseudo_labels)


@dataclass
class Sample:
    """One labelled image.

    Attributes:
        id: file stem.
        image: ``(C, H, W)`` raw pixels (uint8 or other), channel-first; alpha dropped.
        labels: ``(H, W)`` int32 instance IDs (``kind == "instances"``) or {0, 1} foreground.
        kind: ``"instances"`` or ``"semantic"``.
        modality: e.g. ``"fluorescence"``, ``"histology_color"``, ``"em"``, or ``"unknown"``.
        pseudo: labels completed by a model (listed in the folder's ``pseudo_labels.json``,
            :mod:`.pseudo_labels`): trained on, never validated on.
    """

    id: str
    image: np.ndarray
    labels: np.ndarray
    kind: str
    modality: str = "unknown"
    pseudo: bool = False


def read_image_chw(path: Path) -> np.ndarray:
    """Any 2D image file → ``(C, H, W)`` with alpha dropped."""
    image = tifffile.imread(path) if path.suffix.lower() in (".tif", ".tiff") else skio.imread(path)
    image = np.asarray(image)
    if image.ndim == 2:
        return image[None]
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        return np.moveaxis(image[..., :3], -1, 0)
    raise ValueError(f"{path}: expected a 2D grey or RGB(A) image, got shape {image.shape}")


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    return None


def _modalities(root: Path) -> dict[str, str]:
    index = root / "index.json"
    if not index.exists():
        return {}
    return {row["id"]: row.get("modality_guess", "unknown") for row in json.loads(index.read_text())}


def detect_layout(root: Path) -> tuple[Path, Path, str]:
    """``(image folder, label folder, kind)`` of a data folder, or a clear error."""
    for images, labels, kind in (("images", "labels", "instances"),
                                 ("images", "instance_labels", "instances"),
                                 ("image", "label", "semantic")):
        if (root / images).is_dir() and (root / labels).is_dir():
            return root / images, root / labels, kind
    raise FileNotFoundError(
        f"{root} is not a labelled data folder: expected images/ + labels/ (instance maps), "
        "images/ + instance_labels/ (MoNuSeg) or image/ + label/ (ISBI-style semantic masks)")


def load_folder(root: str | Path, limit: int | None = None) -> list[Sample]:
    """Load every labelled image of a data folder (see module docstring for layouts)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    image_dir, label_dir, kind = detect_layout(root)
    modality = _modalities(root)
    manifest = root / PSEUDO_MANIFEST
    pseudo_ids = set(json.loads(manifest.read_text())["ids"]) if manifest.exists() else set()
    default_modality = "em" if kind == "semantic" else "unknown"
    samples = []
    for label_path in sorted(p for p in label_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        image_path = _find_image(image_dir, label_path.stem)
        if image_path is None:
            continue
        image = read_image_chw(image_path)
        raw = tifffile.imread(label_path) if label_path.suffix.lower() in (".tif", ".tiff") \
            else skio.imread(label_path)
        labels = (raw > 0).astype(np.int32) if kind == "semantic" else raw.astype(np.int32)
        if labels.shape != image.shape[1:]:
            raise ValueError(f"{label_path.name}: labels {labels.shape} do not match image {image.shape[1:]}")
        samples.append(Sample(label_path.stem, image, labels, kind,
                              modality.get(label_path.stem, default_modality), label_path.stem in pseudo_ids))
        if limit and len(samples) >= limit:
            break
    if not samples:
        raise FileNotFoundError(f"no image/label pairs found in {root}")
    return samples


def is_validation(sample_id: str, fraction: float) -> bool:
    """Stable split: an id is held out when its sha1 maps below ``fraction``."""
    digest = hashlib.sha1(sample_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split(samples: list[Sample], val_fraction: float) -> tuple[list[Sample], list[Sample]]:
    """(train, validation) by :func:`is_validation`, stratified per modality.

    Within each modality the ids are ranked by hash and the lowest ``val_fraction`` share (at least
    one image when the modality has three or more) goes to validation. Pseudo-labelled samples are
    always trained on and do not count, so adding them leaves the validation split unchanged.
    """
    train, val = [s for s in samples if s.pseudo], []
    for mod in sorted({s.modality for s in samples}):
        group = sorted((s for s in samples if s.modality == mod and not s.pseudo),
                       key=lambda s: hashlib.sha1(s.id.encode()).hexdigest())
        n_val = int(round(val_fraction * len(group)))
        if val_fraction > 0 and n_val == 0 and len(group) >= 3:
            n_val = 1
        val += group[:n_val]
        train += group[n_val:]
    return train, val
