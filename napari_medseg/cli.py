"""The ``napari-medseg`` command line: one subcommand per job, each a thin wrapper over the engine.

Bad input never produces a traceback: every expected error is printed as one line
``napari-medseg: error: ...`` and the command exits with status 2.
"""
from __future__ import annotations

import argparse
import sys

from . import __version__

MODEL_HELP = "vunet, reseg_unet, pranet_v2, iau_net or gca_resunet"
TTA_HELP = ("test-time augmentation: average 1 (off), 2, 4 or 8 flipped/transposed views per tile "
            "(each view is one more forward pass; default: the weights card's choice)")


class CLIError(Exception):
    """An error the user can fix; printed as one line."""


def _add_segment(sub) -> None:
    p = sub.add_parser("segment", help="segment an image (zarr, OME-Zarr, TIFF, PNG) tile by tile",
                       description="Segment a 2D image of any size tile by tile into a zarr group holding "
                       "class probabilities, instance labels and the model's uncertainty or background maps.")
    p.add_argument("input", help="image: .zarr folder (plain or OME-Zarr), .tif/.tiff, .svs/.ndpi/.scn, .png")
    p.add_argument("-m", "--model", help=f"model name ({MODEL_HELP}); default: the --weights' model, else vunet")
    p.add_argument("--weights", help="weights file (.safetensors with its .json card) or the name of bundled "
                   "weights (e.g. vunet_paper_monuseg2018 for H&E tissue); default: the bundled starter")
    p.add_argument("-o", "--output", help="output .zarr folder; default: next to the input")
    p.add_argument("--tile", type=int, help="tile size in pixels (default: chosen per model)")
    p.add_argument("--overlap", type=int, help="tile overlap / halo in pixels (default: chosen per model)")
    p.add_argument("--batch", type=int, help="tiles per forward pass (default: from the device's memory)")
    p.add_argument("--superblock", type=int,
                   help="edge of the blocks work is split into (multiple of 512; default 2048, "
                        "1024 for models with many maps such as pranet_v2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--mc-samples", type=int, default=8, help="Monte-Carlo samples for V-UNet uncertainty (0 = off)")
    p.add_argument("--tta", type=int, choices=[1, 2, 4, 8], help=TTA_HELP)
    p.add_argument("--scale", type=float,
                   help="resample tiles by this factor before the model and back (model pixels per image "
                        "pixel: 2 runs 40x weights on a 20x slide; 1 = never); default: from the image's "
                        "pixel size and the weights' training pixel size when both are known")
    p.add_argument("--region", help="only this region, as y0:y1,x0:x1")
    p.add_argument("--channel-axis", type=int, help="which axis holds channels (default: detected)")
    p.add_argument("--workers", type=int, help="run on a local Dask cluster with N worker processes")
    p.add_argument("--scheduler", help="address of an existing Dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output made by napari-medseg")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in OUTPUT")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model on a labelled data folder",
                       description="Train one of the five models with its paper loss on a folder of images "
                       "and labels (the layout of DSB2018, ISBI 2012 or MoNuSeg in ../shared/data).")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--preset", choices=["lite", "paper"], help="default: the recipe's, else lite")
    p.add_argument("--data", required=True, help="data folder")
    p.add_argument("--out", required=True, help="output weights stem (writes .safetensors + .json)")
    p.add_argument("--val-split", type=float, help="fraction held out for validation (default: the recipe's, else 0.15)")
    p.add_argument("--steps", type=int, help="optimiser steps (default from the recipe)")
    p.add_argument("--time-budget", type=float, help="stop after this many seconds")
    p.add_argument("--batch", type=int, help="batch size (default from the recipe)")
    p.add_argument("--crop", type=int, help="training crop size (default from the recipe)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, help="random seed (default: the recipe's, else 0)")
    p.add_argument("--recipe", help="JSON recipe file overriding the defaults, or a weights card (.json) to "
                   "replay its training run step for step (give its --init too, if it had one)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint next to --out")
    p.add_argument("--init", help="start from these weights (same model and preset) instead of random")


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune weights on corrected labels",
                       description="Fine-tune a model on a user's corrected instances, writing a new weights "
                       "version (safetensors + card) into the model folder (or --out); the parent weights "
                       "are never modified. Edits are found by comparing --labels with the model's own "
                       "labels (--model-labels, or the copy inside a napari-medseg output given as "
                       "--labels); --support and --reviewed mark regions that are complete ground truth.")
    p.add_argument("--weights", help="parent weights (the weights the labels were made with)")
    p.add_argument("--image", help="image the corrections were made on")
    p.add_argument("--labels", help="corrected instance labels: TIFF/PNG, a zarr array, or a napari-medseg "
                   "output .zarr (its edited labels and recorded model labels are used)")
    p.add_argument("--model-labels", help="the model's own labels from the same run (to find the edits)")
    p.add_argument("--support", help="mask of pixels known to be correct (TIFF/PNG, non-zero = reviewed)")
    p.add_argument("--reviewed", action="append", default=[], metavar="Y0:Y1,X0:X1",
                   help="a reviewed rectangle (complete ground truth, background included); repeatable")
    p.add_argument("--out", help="new weights stem; default: a new version in the model folder "
                   "($NAPARI_MEDSEG_MODELS or ~/.local/share/napari-medseg/models)")
    p.add_argument("--steps", type=int, help="optimiser steps at most (default 200)")
    p.add_argument("--time-budget", type=float, help="stop training after this many seconds (default 150)")
    p.add_argument("--lr", type=float, help="learning rate (default 2e-4)")
    p.add_argument("--crop", type=int, help="training crop edge (default: the weights' training tile)")
    p.add_argument("--no-replay", action="store_true", help="do not mix replay crops of the original domain "
                   "into the batches (risks forgetting it)")
    p.add_argument("--device", default="auto")
    p.add_argument("--adopt", action="store_true", help="make the new version the active weights of its model")
    p.add_argument("--versions", metavar="MODEL", help="only print the version tree of MODEL and exit")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score weights or predictions against ground truth",
                       description="Dice, IoU, AJI, PQ, F1 and AP at IoU 0.5, per image and mean.")
    p.add_argument("--weights", help="weights to run (default: the bundled starter of --model)")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--images", help="folder of images (matched to --labels by file stem)")
    p.add_argument("--labels", help="folder of ground-truth labels")
    p.add_argument("--data", help="a labelled data folder instead of --images/--labels "
                   "(DSB2018, MoNuSeg or ISBI layout)")
    p.add_argument("--tune-decode", action="store_true", help="with --data and --split val: choose the "
                   "instance-decoding thresholds on these images, store them in the weights card, then score")
    p.add_argument("--split", choices=["all", "val"], default="all",
                   help="with --data: 'val' scores only the validation images recorded in the weights card")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--tta", type=int, choices=[1, 2, 4, 8], help=TTA_HELP + "; with --tune-decode "
                   "the card's new default")
    p.add_argument("--scale", type=float, help="model pixels per image pixel: resample the images' tiles "
                   "by this before the model (2: images scanned at half the weights' magnification)")
    p.add_argument("--pixel-size", type=float, help="micrometres per pixel of the images: resample them to "
                   "the weights' pixel size (card inference.pixel_size_um) as segment does")
    p.add_argument("--device", default="auto")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export labels to TIFF, OME-TIFF, GeoJSON or CSV",
                       description="Export instance labels from a zarr run (or a label image) tile by "
                       "tile: a tiled label TIFF, an OME-TIFF with a pyramid and the run's provenance, "
                       "QuPath detections as GeoJSON, or a per-object CSV table.")
    p.add_argument("labels", help="labels: a napari-medseg output .zarr or a label image")
    p.add_argument("-o", "--output", required=True, help="output file")
    p.add_argument("--format", choices=["tiff", "ome-tiff", "geojson", "csv"],
                   help="default: from the output's name (.ome.tif, .geojson, .csv), else tiff")
    p.add_argument("--image", help="intensity image (same size as the labels) for mean_intensity "
                   "in csv and geojson")
    p.add_argument("--pixel-size", type=float, help="micrometres per pixel, overriding the labels' own")
    p.add_argument("--relabel", action="store_true", help="number the objects 1..N in ID order "
                   "(same numbers in every format; smaller files, exact in Fiji)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that print tables (tiling, models, finetune)",
                       description="Run a benchmark and print its table; results belong in the README. "
                       "The tiling benchmark measures overhead over bare forward passes, MONAI's sliding "
                       "window, peak memory per image size, seams and instance stitching side by side.")
    p.add_argument("which", choices=["tiling", "models", "finetune"])
    p.add_argument("--sizes", help="tiling: image edges of the peak-memory runs "
                   "(default 4096,8192,16384; --quick 512,1024)")
    p.add_argument("--model", help=f"model timed and measured ({MODEL_HELP}); default reseg_unet "
                   "(tiling) or pranet_v2 (finetune)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--timing-size", type=int, help="tiling: image edge of the overhead and MONAI "
                   "comparisons (default 4096; --quick 1024)")
    p.add_argument("--seam-size", type=int, help="tiling: image edge of the seam checks (default 1024; "
                   "--quick 512)")
    p.add_argument("--seam-models", help="tiling: models whose seams are measured "
                   "(default reseg_unet,vunet,gca_resunet)")
    p.add_argument("--stitch-size", type=int, help="tiling: image edge of the synthetic disks for "
                   "instance stitching (default 1024; --quick 512)")
    p.add_argument("--parts", help="tiling: parts to run, comma-separated, from "
                   "overhead,monai,memory,seams,stitching (default all)")
    p.add_argument("--repeats", type=int, help="tiling: timing repeats, interleaved, best reported "
                   "(default 2; --quick 1)")
    p.add_argument("--workers", type=int, help="tiling: Dask worker processes compared with one "
                   "process (default 2; 0 skips)")
    p.add_argument("--workdir", help="scratch folder for the images and outputs (kept); default: a "
                   "temporary folder, removed afterwards")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--weights", help="finetune: parent weights (default: the model's starter)")
    p.add_argument("--ks", help="finetune: numbers of corrected objects (default 10,30,100)")
    p.add_argument("--new-domain", help="finetune: labelled folder of the new domain "
                   "(default ../shared/data/monuseg2018_train)")
    p.add_argument("--original-domain", help="finetune: labelled folder the weights were trained on "
                   "(default ../shared/data/dsb2018_train)")
    p.add_argument("--correct-image", help="finetune: id of the image the simulated user corrects "
                   "(default: the one with the most objects)")
    p.add_argument("--plot", help="finetune: also save the gain-vs-K and gain-vs-time plot (PNG)")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="open napari with a sample and the Segment widget (or run headless)",
                       description="Open napari with a bundled sample image and the MedSeg Segment widget "
                       "docked. With --headless (automatic when there is no display) segment the sample "
                       "and write the outputs instead.")
    p.add_argument("--headless", action="store_true")
    p.add_argument("--screenshot", metavar="PNG", help="save a screenshot of the napari window after "
                   "start-up and close it (for documentation and smoke checks)")
    p.add_argument("-o", "--output", default="medseg-demo.zarr", help="headless output folder")
    p.add_argument("--model", default="vunet")
    p.add_argument("--sample", default="fluorescence_large")


def _add_pseudolabel(sub) -> None:
    p = sub.add_parser("pseudolabel", help="complete mask-only images into instance labels for training",
                       description="For a data folder with images/, semantic_masks/ and instance labels for "
                       "some images (MoNuSeg 2018), write a new training folder: the real instance labels "
                       "copied, and for mask-only images the teacher's instances reshaped to the annotated "
                       "foreground. Train on it with `napari-medseg train --data OUT`; those images are never "
                       "used for validation.")
    p.add_argument("--weights", required=True, help="teacher weights (an instance model)")
    p.add_argument("--data", required=True, help="source data folder (only read)")
    p.add_argument("--out", required=True, help="new output folder (must not exist)")
    p.add_argument("--tta", type=int, help=TTA_HELP)
    p.add_argument("--device", default="auto")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(
        prog="napari-medseg", description="Segment large microscopy and histology images with five "
        "published networks; fine-tune on corrections; export labels.")
    parser.add_argument("--version", action="version", version=f"napari-medseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_segment, _add_finetune, _add_train, _add_evaluate, _add_export, _add_pseudolabel,
                _add_bench, _add_demo):
        add(sub)
    return parser


def _resolve_bundled_names(args) -> None:
    """``--weights`` / ``--init`` may name bundled weights instead of giving a path."""
    from .core.resources import resolve_weights_name

    for attr in ("weights", "init"):
        value = getattr(args, attr, None)
        if value and value != "random":   # pipeline.RANDOM_WEIGHTS (not imported: it loads torch)
            setattr(args, attr, resolve_weights_name(value))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    from . import cli_commands
    from src_models import WeightsError

    args = build_parser().parse_args(argv)
    handler = getattr(cli_commands, f"run_{args.command}")
    try:
        _resolve_bundled_names(args)
        handler(args)
    except KeyboardInterrupt:
        print("napari-medseg: interrupted", file=sys.stderr)
        return 130
    except (CLIError, WeightsError, ValueError, KeyError, FileNotFoundError, FileExistsError,
            PermissionError, NotImplementedError, OSError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"napari-medseg: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    # `python -m napari_medseg.cli`: run the imported module's main, so the CLIError raised by the
    # commands (napari_medseg.cli.CLIError) is the one main catches, not a second __main__ copy
    from napari_medseg.cli import main as _main

    sys.exit(_main())
