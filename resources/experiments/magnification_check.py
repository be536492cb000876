"""How bundled H&E weights fare on tissue scanned at another magnification, with and without the
engine resampling tiles to the weights' pixel size (:mod:`napari_medseg.core.resolution`).

Each held-out MoNuSeg image (40×, ~0.25 µm/px) is resized by ``--factor`` (0.5: a 20× scan at 0.5 µm/px;
labels by nearest neighbour), written as a TIFF whose resolution tags give its pixel size, and
segmented through the CLI's engine (``run_segmentation``) three ways: at 40× (reference), the resized
image with automatic resampling (the default), and the resized image with ``scale=1`` (no resampling).
Prints one row per image and setting, and the means, as a Markdown table.

    python resources/experiments/magnification_check.py --data ../shared/data/monuseg2018_train \
        --weights vunet_paper_monuseg2018 --factor 0.5 --tta 1
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import tifffile
from skimage import io as skio
from skimage.transform import resize

from napari_medseg.core.inference import InferenceSettings
from napari_medseg.core.metrics import instance_metrics
from napari_medseg.core.pipeline import load_model, run_segmentation
from napari_medseg.core.progress import drain
from napari_medseg.core.resources import resolve_weights_name
from napari_medseg.core.store import OutputStore

NATIVE_UM = 0.25   # MoNuSeg: 40× TCGA scans


def write_scan(folder: Path, name: str, image: np.ndarray, pixel_um: float) -> Path:
    """An RGB TIFF whose resolution tags (pixels per centimetre) say ``pixel_um``."""
    path = folder / f"{name}.tif"
    tifffile.imwrite(path, image, photometric="rgb", resolution=(1e4 / pixel_um, 1e4 / pixel_um),
                     resolutionunit="CENTIMETER")
    return path


def segment(path: Path, model, card, out: Path, scale: float | None, tta: int) -> tuple[np.ndarray, float]:
    settings = InferenceSettings(mc_samples=0, tta=tta, scale=scale, overwrite=True, probs_dtype="float32")
    result = drain(run_segmentation(str(path), model, card, out, settings))
    return np.asarray(OutputStore.open(result.output, mode="r").labels()), result.maps.scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="MoNuSeg folder (images/, instance_labels/)")
    parser.add_argument("--weights", default="vunet_paper_monuseg2018")
    parser.add_argument("--model", default="vunet")
    parser.add_argument("--ids", nargs="*", help="image ids (default: the weights card's MoNuSeg val_ids)")
    parser.add_argument("--factor", type=float, default=0.5, help="resize factor (0.5: 40x → 20x)")
    parser.add_argument("--tta", type=int, default=1)
    args = parser.parse_args()

    model, card = load_model(args.model, resolve_weights_name(args.weights), "cpu")
    ids = args.ids or [i for i in card["training"]["val_ids"] if i.startswith("TCGA")]
    data = Path(args.data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in ids:
            image = skio.imread(data / "images" / f"{name}.png")[..., :3]
            truth = tifffile.imread(data / "instance_labels" / f"{name}.tif")
            size = tuple(round(n * args.factor) for n in truth.shape)
            small = resize(image, size, order=1, anti_aliasing=args.factor < 1, preserve_range=True)
            small = small.round().astype(np.uint8)
            small_truth = resize(truth, size, order=0, anti_aliasing=False, preserve_range=True).astype(truth.dtype)
            native = write_scan(folder, f"{name}-native", image, NATIVE_UM)
            scan = write_scan(folder, f"{name}-scan", small, NATIVE_UM / args.factor)
            for setting, path, gt, scale in (("40x as trained", native, truth, None),
                                             ("resized, resampled (default)", scan, small_truth, None),
                                             ("resized, scale=1", scan, small_truth, 1.0)):
                labels, used = segment(path, model, card, folder / f"{name}-{len(rows)}.zarr", scale, args.tta)
                rows.append((name, setting, used, instance_metrics(gt, labels)))
    print("| image | setting | scale | Dice | AJI | F1 | PQ |\n|---|---|---|---|---|---|---|")
    for name, setting, used, m in rows:
        print(f"| {name} | {setting} | {used:.2f} | {m['dice']:.3f} | {m['aji']:.3f} | {m['f1']:.3f} | {m['pq']:.3f} |")
    for setting in dict.fromkeys(r[1] for r in rows):
        chosen = [r[3] for r in rows if r[1] == setting]
        mean = {k: np.mean([m[k] for m in chosen]) for k in ("dice", "aji", "f1", "pq")}
        print(f"| mean | {setting} | | {mean['dice']:.3f} | {mean['aji']:.3f} | {mean['f1']:.3f} | {mean['pq']:.3f} |")


if __name__ == "__main__":
    main()
