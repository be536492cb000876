"""Write a copy of a labelled training folder resized by a factor (session 19: MoNuSeg at 2x, to
train weights whose pixel size is 0.125 µm; the engine resamples 40x slides to it).

Images are resized bilinearly (anti-aliased when shrinking), instance labels by nearest neighbour;
``index.json`` and ``pseudo_labels.json`` are copied unchanged, so the validation split and the
train-only pseudo-labelled images stay the same. Refuses an existing ``--out``.

    python resources/experiments/upsample_folder.py --data monuseg2018_pseudo_dsbhe --factor 2 \
        --out monuseg2018_pseudo_dsbhe_x2
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import tifffile
from skimage import io as skio
from skimage.transform import resize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with images/ and labels/")
    parser.add_argument("--out", required=True)
    parser.add_argument("--factor", type=float, default=2.0)
    args = parser.parse_args()
    source, out = Path(args.data), Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; choose another --out")
    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    for extra in ("index.json", "pseudo_labels.json"):
        if (source / extra).exists():
            shutil.copy2(source / extra, out / extra)
    for path in sorted((source / "images").iterdir()):
        image = skio.imread(path)
        size = tuple(round(n * args.factor) for n in image.shape[:2])
        resized = resize(image, size + image.shape[2:], order=1, anti_aliasing=args.factor < 1,
                         preserve_range=True).round().astype(image.dtype)
        skio.imsave(out / "images" / path.name, resized, check_contrast=False)
        label_path = source / "labels" / f"{path.stem}.tif"
        if label_path.exists():
            labels = tifffile.imread(label_path)
            tifffile.imwrite(out / "labels" / label_path.name,
                             resize(labels, size, order=0, anti_aliasing=False, preserve_range=True).astype(labels.dtype))
    print(f"wrote {len(list((out / 'images').iterdir()))} images to {out}")


if __name__ == "__main__":
    main()
