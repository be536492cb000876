"""Build the training folders of session 18: MoNuSeg 2018 plus the 107 H&E images of DSB2018.

The folders are in the generic layout ``images/<id>.png`` + ``labels/<id>.tif`` that
``napari-medseg train --data`` reads, with an ``index.json`` naming the DSB2018 images'
modality (``histology_color``), so the stratified validation split holds out the same 2 MoNuSeg
images as before (their modality stays ``unknown``) plus the 16 H&E images of the DSB2018
validation split. The recipes ``vunet_paper_monuseg2018_{pseudo_dsbhe_continue,realonly_dsbhe_sep60}.json``
weight the DSB2018 images 0.5 per image (about a third of the crops).

Usage, from the repository root (``../shared/data`` beside the checkout)::

    python resources/experiments/monuseg_with_dsb_he.py --monuseg PSEUDO_DIR --out monuseg2018_pseudo_dsbhe
    python resources/experiments/monuseg_with_dsb_he.py --out monuseg2018_real_dsbhe

``--monuseg`` is a folder written by ``napari-medseg pseudolabel`` (its ``pseudo_labels.json`` is
copied, so the completed images stay train-only); without it the 13 MoNuSeg images with instance
labels are used. Keep ``monuseg2018`` in the output name: the weights card takes the data licence
(CC BY-NC-SA) from it. Nothing is written into the source folders; an existing ``--out`` is refused.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

DATA = Path("../shared/data")


def build(out: Path, monuseg: Path | None, data: Path = DATA) -> int:
    """Write the combined folder; returns the number of images."""
    if out.exists():
        sys.exit(f"{out} exists; choose a new --out")
    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    if monuseg is not None:
        for sub in ("images", "labels"):
            for path in (monuseg / sub).iterdir():
                shutil.copy(path, out / sub / path.name)
        shutil.copy(monuseg / "pseudo_labels.json", out / "pseudo_labels.json")
    else:
        source = data / "monuseg2018_train"
        for image_id in (source / "ids_with_instance_labels.txt").read_text().split():
            shutil.copy(source / "images" / f"{image_id}.png", out / "images" / f"{image_id}.png")
            shutil.copy(source / "instance_labels" / f"{image_id}.tif", out / "labels" / f"{image_id}.tif")
    dsb = data / "dsb2018_train"
    he = [row for row in json.loads((dsb / "index.json").read_text())
          if row["modality_guess"] == "histology_color"]
    for row in he:
        shutil.copy(dsb / "images" / f"{row['id']}.png", out / "images" / f"{row['id']}.png")
        shutil.copy(dsb / "labels" / f"{row['id']}.tif", out / "labels" / f"{row['id']}.tif")
    (out / "index.json").write_text(json.dumps(
        [{"id": row["id"], "modality_guess": "histology_color"} for row in he], indent=0))
    return len(list((out / "images").iterdir()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--monuseg", type=Path, help="a pseudolabel folder (default: the 13 labelled images)")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    args = parser.parse_args()
    print(f"{build(args.out, args.monuseg, args.data)} images in {args.out}")


if __name__ == "__main__":
    main()
