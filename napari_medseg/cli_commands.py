"""Implementations of the ``napari-medseg`` subcommands (argument parsing lives in cli.py)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .cli import CLIError


class TerminalProgress:
    """A one-line progress bar on stderr, redrawn at most every ``interval`` seconds."""

    def __init__(self, interval: float = 0.5, stream=None):
        self.interval, self.last, self.started = interval, 0.0, time.perf_counter()
        self.stream = stream or sys.stderr
        self.stage = None

    def __call__(self, record) -> None:
        now = time.perf_counter()
        if record.stage != self.stage:
            if self.stage is not None:
                self.stream.write("\n")
            self.stage, self.started = record.stage, now
        elif now - self.last < self.interval and record.done < record.total:
            return
        self.last = now
        width = 30
        filled = int(width * record.fraction)
        eta = ""
        if record.total and record.done:
            remaining = (now - self.started) / record.done * (record.total - record.done)
            eta = f" ~{remaining:.0f}s left"
        self.stream.write(f"\r{record.stage:>10} [{'#' * filled}{'.' * (width - filled)}] "
                          f"{record.done}/{record.total}{eta} {record.message[-60:]:<60}")
        self.stream.flush()

    def close(self) -> None:
        if self.stage is not None:
            self.stream.write("\n")


def parse_region(text: str | None):
    """``"y0:y1,x0:x1"`` → ``(y0, y1, x0, x1)``."""
    if not text:
        return None
    try:
        ys, xs = text.split(",")
        (y0, y1), (x0, x1) = (tuple(int(v) for v in part.split(":")) for part in (ys, xs))
    except ValueError:
        raise CLIError(f"--region {text!r} is not of the form y0:y1,x0:x1 (e.g. 0:4096,2048:6144)") from None
    if not (0 <= y0 < y1 and 0 <= x0 < x1):
        raise CLIError(f"--region {text!r} must have 0 <= y0 < y1 and 0 <= x0 < x1")
    return (y0, y1, x0, x1)


def _segment(input_path, model_name, weights, output, settings, bar) -> dict:
    from .core.io import open_image
    from .core.pipeline import load_model, run_segmentation
    from .core.progress import drain

    source = input_path
    if isinstance(input_path, (str, Path)):
        path = Path(input_path)
        if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
            from skimage import io as skio

            from .core.store import default_output_path

            output = output or default_output_path(path, model_name)
            source = open_image(skio.imread(path))
        else:
            source = open_image(path)
    model, card = load_model(model_name, weights, settings.device)
    result = drain(run_segmentation(source, model, card, output, settings), bar)
    bar.close()
    maps = result.maps
    return {"output": result.output, "maps": maps.status, "labels": result.labels_status,
            "objects": result.objects, "seconds": round(maps.seconds, 2), "device": maps.device,
            "tiles_run": maps.tiles_run, "tiles_skipped": maps.tiles_skipped,
            "warnings": list(maps.warnings)}


def run_segment(args) -> None:
    """Tiled segmentation of one image into a zarr group (one process, or a Dask cluster)."""
    from .core.inference import InferenceSettings
    from .core.store import default_output_path

    settings = InferenceSettings(
        tile=args.tile, overlap=args.overlap, batch_size=args.batch,
        device="cpu" if (args.workers or args.scheduler) and args.device == "auto" else args.device,
        mc_samples=args.mc_samples, region=parse_region(args.region), overwrite=args.overwrite,
        superblock=args.superblock, tta=args.tta, scale=args.scale)
    if not Path(args.input).exists():
        raise CLIError(f"input {args.input} does not exist")
    args.model = args.model or model_of_weights(args.weights) or "vunet"
    output = Path(args.output) if args.output else default_output_path(args.input, args.model)
    if output.exists() and not (args.resume or args.overwrite):
        raise CLIError(f"output {output} already exists; pass --resume to continue that run, "
                       "--overwrite to replace it (only stores made by napari-medseg), or choose "
                       "another -o")
    if args.workers or args.scheduler:
        from .core.distributed import run_distributed

        summary = run_distributed(args.input, args.model, args.weights, output, settings,
                                  args.workers, args.scheduler, TerminalProgress())
    else:
        summary = _segment(args.input, args.model, args.weights, output, settings, TerminalProgress())
    print(json.dumps(summary, indent=2))


def model_of_weights(weights: str | None) -> str | None:
    """The architecture named in a weights card (None for no weights or random weights)."""
    from src_models import read_card

    from .core.pipeline import RANDOM_WEIGHTS

    return read_card(weights)["architecture"] if weights and weights != RANDOM_WEIGHTS else None


def _read_label_file(path: str, what: str):
    """A label or mask image: TIFF/PNG into memory, a zarr array lazily."""
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{what} {path} does not exist")
    if p.is_dir():
        import zarr

        try:
            array = zarr.open(str(p), mode="r")
        except Exception as exc:  # noqa: BLE001 (any zarr failure is a bad input here)
            raise CLIError(f"{what} {path} is not a zarr array ({exc})") from None
        if not hasattr(array, "shape"):
            raise CLIError(f"{what} {path} is a zarr group, not an array; give the array's path")
        return array
    import numpy as np
    import tifffile
    from skimage import io as skio

    data = tifffile.imread(p) if p.suffix.lower() in (".tif", ".tiff") else skio.imread(p)
    return np.asarray(data)


def _finetune_inputs(args) -> dict:
    """Image, labels, model labels, support, reviewed rectangles and normalisation from the args."""
    from .core.finetune_data import run_normalization, run_scale
    from .core.io import open_image
    from .core.rerun import model_labels as stored_model_labels
    from .core.store import OutputStore, is_engine_store

    if not (args.weights and args.image and args.labels):
        raise CLIError("finetune needs --weights, --image and --labels (or --versions MODEL)")
    inputs = {"normalization": None, "model_labels": None, "support": None, "scale": 1.0}
    if is_engine_store(args.labels):
        store = OutputStore.open(args.labels, mode="r")
        inputs["labels"] = store.labels()
        inputs["model_labels"] = stored_model_labels(store)
        inputs["normalization"] = run_normalization(store.attrs.get("run", {}))
        inputs["scale"] = run_scale(store.attrs.get("run", {}))
    else:
        inputs["labels"] = _read_label_file(args.labels, "--labels")
    if args.model_labels:
        inputs["model_labels"] = _read_label_file(args.model_labels, "--model-labels")
    if args.support:
        inputs["support"] = _read_label_file(args.support, "--support")
    boxes = [parse_region(text) for text in args.reviewed]
    inputs["reviewed"] = [[(y0, x0), (y0, x1), (y1, x1), (y1, x0)] for y0, y1, x0, x1 in boxes]
    image = Path(args.image)
    if not image.exists():
        raise CLIError(f"--image {args.image} does not exist")
    if image.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
        from skimage import io as skio

        inputs["image"] = open_image(skio.imread(image))
    else:
        inputs["image"] = open_image(image)
    return inputs


def run_finetune(args) -> None:
    """Fine-tune weights on corrected labels into a new version (never modifying the parent)."""
    import dataclasses

    from .core import versions

    if args.versions:
        from .core.resources import bundled_weights

        print(versions.format_tree(args.versions, extra=bundled_weights(args.versions)))
        return
    from .core.finetune import FinetuneSettings, finetune_job
    from .core.progress import drain

    inputs = _finetune_inputs(args)
    overrides = {"steps": args.steps, "time_budget_s": args.time_budget, "lr": args.lr,
                 "crop": args.crop, "device": args.device}
    settings = dataclasses.replace(FinetuneSettings(),
                                   **{k: v for k, v in overrides.items() if v is not None})
    if args.no_replay:
        settings = dataclasses.replace(settings, replay=None, replay_batch=0)
    if args.out and Path(args.out).with_name(Path(args.out).name + ".safetensors").exists():
        raise CLIError(f"{args.out}.safetensors already exists; choose another --out")
    bar = TerminalProgress()
    result = drain(finetune_job(args.weights, inputs["image"], inputs["labels"], inputs["model_labels"],
                                reviewed=inputs["reviewed"], support=inputs["support"],
                                normalization=inputs["normalization"], settings=settings,
                                out=args.out, scale=inputs["scale"]), bar)
    bar.close()
    info = result.card["finetune"]
    if args.adopt:
        versions.adopt(result.card["architecture"], result.version.id if result.version else result.path)
    print(json.dumps({
        "weights": str(result.path) + ".safetensors", "version": result.card.get("version"),
        "parent": result.card["parent"], "edits": info["edits"]["counts"],
        "windows": info["windows"], "holdout_windows": info["holdout_windows"],
        "steps": result.steps, "stopped": result.stopped, "time_s": round(result.seconds, 1),
        "heldout_loss": info["heldout_loss"], "edit_loss": result.edit_loss,
        "adopted": bool(args.adopt), "warnings": result.warnings}, indent=2))


def run_train(args) -> None:
    """Train a model on a data folder and write weights + card (:mod:`.cli_train`)."""
    from .cli_train import run_train as run

    run(args)


def run_evaluate(args) -> None:
    """Score weights on labelled images (:mod:`.cli_train`)."""
    from .cli_train import run_evaluate as run

    run(args)


def run_export(args) -> None:
    """Export labels (output store or label image) to TIFF, OME-TIFF, GeoJSON or CSV."""
    from .core.progress import drain
    from .export_job import ExportRequest, export_job, format_for_path

    if not Path(args.labels).exists():
        raise CLIError(f"labels {args.labels} do not exist")
    if args.image and not Path(args.image).exists():
        raise CLIError(f"--image {args.image} does not exist")
    fmt = args.format or format_for_path(args.output)
    request = ExportRequest(args.labels, Path(args.output), fmt, overwrite=args.overwrite,
                            image=args.image, pixel_size=args.pixel_size, relabel=args.relabel)
    bar = TerminalProgress()
    try:
        result = drain(export_job(request), bar)
    finally:
        bar.close()
    for warning in result.warnings:
        print(f"napari-medseg: warning: {warning}", file=sys.stderr)
    print(json.dumps({"output": str(result.path), "format": result.format, "objects": result.objects,
                      "max_label": result.max_label, "dtype": result.dtype,
                      "warnings": list(result.warnings)}, indent=2))


def run_bench(args) -> None:
    """Benchmarks that print a markdown table: ``tiling``, ``models``, ``finetune``."""
    from .cli_bench import run_bench as run

    run(args)


def run_pseudolabel(args) -> None:
    """Complete mask-only images into a training folder (:mod:`.cli_data`)."""
    from .cli_data import run_pseudolabel as run

    run(args)


def _has_display() -> bool:
    import os

    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def run_demo(args) -> None:
    """napari with a sample and the Segment widget, or a headless segmentation of the sample."""
    from .core.inference import InferenceSettings
    from .core.samples import load_sample

    if args.headless or not _has_display():
        print("no display found: running the headless demo" if not args.headless else "headless demo",
              file=sys.stderr)
        image = load_sample(args.sample)
        settings = InferenceSettings(mc_samples=8, overwrite=True)
        summary = _segment(image, args.model, None, args.output, settings, TerminalProgress())
        print(json.dumps(summary, indent=2))
        return
    from ._widgets.demo_window import open_demo

    open_demo(load_sample(args.sample), args.sample, args.screenshot)
    if args.screenshot:
        print(f"screenshot: {args.screenshot}")
