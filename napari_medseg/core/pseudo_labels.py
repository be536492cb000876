"""Instance labels for images that only have a foreground mask, so they can join training.

MoNuSeg 2018 ships instance outlines for 13 of its 30 training images and a foreground mask for
all 30. A mask says exactly where nuclei are but not where one ends and the next begins. A
trained model can say that: :func:`complete_to_mask` keeps the model's instances but makes their
union exactly the annotated foreground (predicted pixels outside the mask are dropped; mask pixels
the model missed go to the nearest instance in the same mask component, or become an instance of
their own when the component has none). So the foreground/background supervision stays the
annotators', only the splits between touching nuclei come from the model.

:func:`pseudolabel_job` writes a new data folder (``images/`` + ``labels/``) that :mod:`.datasets`
reads like any other: the real instance labels copied, the completed ones added and listed in
``pseudo_labels.json`` with the teacher's sha256. :func:`.datasets.split` keeps pseudo-labelled
images out of validation, so the validation split is the same as the source folder's.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi
from skimage.measure import label as connected_components
from skimage.segmentation import relabel_sequential, watershed

from .datasets import IMAGE_SUFFIXES, PSEUDO_MANIFEST, read_image_chw
from .progress import JobGenerator, Progress

INSTANCE_DIRS = ("instance_labels", "labels")
MASK_DIR = "semantic_masks"


def complete_to_mask(foreground: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Predicted instances reshaped so that their union is exactly ``foreground``.

    Args:
        foreground: ``(H, W)`` annotated mask (bool or {0, 1}; any non-zero is foreground).
        predicted: ``(H, W)`` integer instance IDs from a model (0 = background).

    Returns:
        ``(H, W) int32`` instance IDs 1..N, non-zero exactly where ``foreground`` is: predicted
        instances clipped to the mask, uncovered mask pixels given to the nearest clipped instance
        reachable inside the mask (watershed on the distance to the instances), mask components
        without any instance labelled as one instance each.
    """
    fg = np.asarray(foreground) != 0
    if fg.shape != predicted.shape:
        raise ValueError(f"mask {fg.shape} and prediction {predicted.shape} differ in shape")
    markers = np.where(fg, predicted, 0).astype(np.int32)
    if markers.any():
        distance = ndi.distance_transform_edt(markers == 0)
        filled = watershed(distance, markers, mask=fg).astype(np.int32)
    else:
        filled = np.zeros(fg.shape, np.int32)
    orphans = connected_components(fg & (filled == 0), connectivity=1)
    filled = np.where(orphans > 0, orphans + filled.max(), filled)
    return relabel_sequential(filled)[0].astype(np.int32)


def _label_files(folder: Path) -> dict[str, Path]:
    """Image or label files of a folder by stem ({} when there is no such folder)."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def _read_labels(path: Path) -> np.ndarray:
    return np.asarray(tifffile.imread(path) if path.suffix.lower() in (".tif", ".tiff")
                      else read_image_chw(path)[0])


def plan_pseudolabels(data_dir: str | Path) -> tuple[dict[str, Path], dict[str, Path], dict[str, Path]]:
    """``(images, instance labels, masks to complete)`` by id, or a clear error.

    ``data_dir`` holds ``images/``, ``semantic_masks/`` and optionally ``instance_labels/`` (or
    ``labels/``); ids with an instance map are copied, ids with only a mask are completed.
    """
    root = Path(data_dir)
    images = _label_files(root / "images")
    masks = _label_files(root / MASK_DIR)
    if not images or not masks:
        raise FileNotFoundError(f"{root} needs images/ and {MASK_DIR}/ (foreground masks) to pseudo-label; "
                                "for example ../shared/data/monuseg2018_train")
    instances = next((found for found in (_label_files(root / name) for name in INSTANCE_DIRS) if found), {})
    to_complete = {i: p for i, p in masks.items() if i in images and i not in instances}
    if not to_complete:
        raise ValueError(f"every image of {root} already has instance labels: nothing to pseudo-label")
    return images, {i: p for i, p in instances.items() if i in images}, to_complete


def pseudolabel_job(model, card: dict, data_dir: str | Path, out: str | Path,
                    tta: int | None = None) -> JobGenerator[dict]:
    """Write a training folder with completed instance labels for mask-only images.

    Args:
        model: the teacher, a ``SegmentationModel`` with an instance (three-class) head.
        card: its weights card (tiling, normalisation, decoding thresholds, sha256).
        data_dir: source folder (see :func:`plan_pseudolabels`); only read.
        out: new folder, must not exist; written under a hidden temporary name beside it and renamed
            when complete (removed if the job fails or is cancelled).
        tta: test-time views for the teacher (None: the card's default).

    Yields:
        Progress per image (stage ``"pseudo-label"``).
    Returns:
        The manifest written to ``out/pseudo_labels.json``.
    """
    if card.get("task", "instances") != "instances":
        raise ValueError("the teacher must be an instance (three-class) model, "
                         f"not a {card.get('task')} one")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new output folder (nothing is overwritten)")
    images, instances, to_complete = plan_pseudolabels(data_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        manifest = yield from _write_folder(model, card, data_dir, partial, images, instances,
                                            to_complete, tta)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(out)
    return manifest


def _write_folder(model, card, data_dir, partial: Path, images, instances, to_complete, tta):
    from .validation import predict_instances

    (partial / "images").mkdir()
    (partial / "labels").mkdir()
    for stem, path in instances.items():
        shutil.copy2(images[stem], partial / "images" / images[stem].name)
        tifffile.imwrite(partial / "labels" / f"{stem}.tif", _read_labels(path).astype(np.int32),
                         compression="zlib")
    counts = {}
    for done, (stem, mask_path) in enumerate(sorted(to_complete.items())):
        yield Progress("pseudo-label", done, len(to_complete), f"{stem}: predicting with the teacher")
        image = read_image_chw(images[stem])
        mask = _read_labels(mask_path)
        completed = complete_to_mask(mask, predict_instances(model, image, card, tta=tta))
        shutil.copy2(images[stem], partial / "images" / images[stem].name)
        tifffile.imwrite(partial / "labels" / f"{stem}.tif", completed, compression="zlib")
        counts[stem] = int(completed.max())
    manifest = {
        "ids": sorted(to_complete), "instances_per_image": counts,
        "real_instance_ids": sorted(instances),
        "source": str(Path(data_dir)),
        "teacher": {"architecture": card.get("architecture"), "sha256": card.get("sha256"),
                    "weights": str(card.get("weights_path", "")), "decode": card.get("decode"),
                    "tta": tta},
        "method": "teacher instances clipped to the annotated foreground mask; uncovered mask pixels "
                  "to the nearest instance (watershed), instance-free mask components as one instance",
    }
    (partial / PSEUDO_MANIFEST).write_text(json.dumps(manifest, indent=2))
    yield Progress("pseudo-label", len(to_complete), len(to_complete), f"{len(to_complete)} images completed")
    return manifest


def read_manifest(root: str | Path) -> dict | None:
    """The ``pseudo_labels.json`` of a data folder, or None."""
    path = Path(root) / PSEUDO_MANIFEST
    return json.loads(path.read_text()) if path.exists() else None
