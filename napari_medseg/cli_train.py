"""``napari-medseg train`` and ``evaluate``: training from a recipe and scoring weights on labelled images."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .cli import CLIError
from .cli_commands import TerminalProgress, model_of_weights


def train_recipe(args):
    """The recipe file (or the defaults) with only the options given on the command line applied.

    ``--recipe`` may also be a weights card: its replay recipe (:meth:`Recipe.replaying`) re-runs that
    training step for step."""
    from .core.recipe import Recipe, is_weights_card

    if args.recipe:
        try:
            recorded = json.loads(Path(args.recipe).read_text())
        except (OSError, ValueError) as e:
            raise CLIError(f"cannot read recipe {args.recipe}: {e}") from None
        if is_weights_card(recorded):
            if recorded["architecture"] != args.model:
                raise CLIError(f"{args.recipe} is the card of {recorded['architecture']} weights; "
                               f"replay it with --model {recorded['architecture']}")
            _check_replay_start(recorded, args.init)
    overrides = {"model": args.model, "preset": args.preset, "val_split": args.val_split,
                 "steps": args.steps, "time_budget_s": args.time_budget, "batch": args.batch,
                 "crop": args.crop, "seed": args.seed}
    return (Recipe.from_file(args.recipe, **overrides) if args.recipe
            else Recipe.from_dict({k: v for k, v in overrides.items() if v is not None}))


def _check_replay_start(card: dict, init: str | None) -> None:
    """A recorded run replays only from the weights it started from (its ``training.init``)."""
    from src_models.weights_io import read_card

    started = (card.get("training") or {}).get("init")
    if started and not init:
        raise CLIError(f"that run started from the weights {started.get('version')} (sha256 "
                       f"{started['sha256'][:12]}…); replay it with --init those weights")
    if not started and init:
        raise CLIError("that run started from random initialisation; replay it without --init")
    if started and read_card(init)["sha256"] != started["sha256"]:
        raise CLIError(f"--init {init} are not the weights that run started from (sha256 "
                       f"{started['sha256'][:12]}…)")


def run_train(args) -> None:
    """Train a model on a data folder and write weights + card."""
    from src_models import list_models

    from .core.progress import drain
    from .core.training import train

    if args.model not in list_models():
        raise CLIError(f"unknown model {args.model!r}; choose one of: {', '.join(list_models())}")
    if not Path(args.data).is_dir():
        raise CLIError(f"data folder {args.data} does not exist")
    recipe = train_recipe(args)
    out = Path(args.out)
    for taken in (out.with_name(out.name + ".safetensors"), out.with_name(out.name + ".json")):
        if not args.resume and taken.exists():   # the card too: it may be the recipe file itself
            raise CLIError(f"{taken} already exists; choose another --out (or --resume a stopped run)")
    bar = TerminalProgress()
    card = drain(train(recipe, args.data, out, device=args.device, resume=args.resume, init=args.init), bar)
    bar.close()
    print(json.dumps({"weights": str(out) + ".safetensors", "time_s": card["training"]["time_s"],
                      "validation": card["metrics"]["validation"].get("mean", {})}, indent=2))


def _evaluation_samples(args, card: dict):
    from .core.datasets import Sample, load_folder, read_image_chw

    if args.data:
        samples = [s for s in load_folder(args.data) if not s.pseudo]   # never score a model's own labels
        if args.split == "val":
            val_ids = set(card.get("training", {}).get("val_ids", []))
            if not val_ids:
                raise CLIError("--split val needs weights whose card lists val_ids (trained by napari-medseg)")
            samples = [s for s in samples if s.id in val_ids]
        return samples
    if not (args.images and args.labels):
        raise CLIError("give --images and --labels folders, or --data")
    images, labels = Path(args.images), Path(args.labels)
    for folder in (images, labels):
        if not folder.is_dir():
            raise CLIError(f"folder {folder} does not exist")
    import tifffile
    from skimage import io as skio

    samples = []
    for label_path in sorted(labels.iterdir()):
        matches = [p for p in images.iterdir() if p.stem == label_path.stem]
        if not matches:
            continue
        raw = (tifffile.imread(label_path) if label_path.suffix.lower() in (".tif", ".tiff")
               else skio.imread(label_path))
        kind = "semantic" if card.get("task") == "semantic" else "instances"
        gt = (raw > 0).astype("int32") if kind == "semantic" else raw.astype("int32")
        samples.append(Sample(label_path.stem, read_image_chw(matches[0]), gt, kind))
    if not samples:
        raise CLIError(f"no image in {images} has a label file with the same name in {labels}")
    return samples


def _tune_decode(args, model, card: dict, samples) -> dict:
    """Choose decoding thresholds on the validation split (see :mod:`.core.decode_tuning`)."""
    from .core.decode_tuning import tune_decode

    result = tune_decode(model, card, samples, log=lambda line: print(line, file=sys.stderr), tta=args.tta)
    print(f"decode thresholds {result['settings']}: F1 {result['before']['f1']:.3f} → "
          f"{result['after']['f1']:.3f}, AJI {result['before']['aji']:.3f} → {result['after']['aji']:.3f}",
          file=sys.stderr)
    return result


def _evaluation_scale(args, card: dict) -> float:
    """Model pixels per image pixel from ``--scale`` or ``--pixel-size`` (1 when neither is given)."""
    from .core.resolution import check_scale, scale_for_pixel_size, weights_pixel_um

    if args.pixel_size is not None:
        if not args.pixel_size > 0:
            raise CLIError(f"--pixel-size must be positive micrometres per pixel, not {args.pixel_size}")
        if weights_pixel_um(card) is None:
            raise CLIError(f"the card of {card.get('weights_path') or args.weights} records no training pixel "
                           "size (inference.pixel_size_um): give --scale instead of --pixel-size")
        scale = scale_for_pixel_size(args.pixel_size, card)
    else:
        scale = 1.0 if args.scale is None else args.scale
    try:
        check_scale(scale)
    except ValueError as error:
        raise CLIError(str(error)) from None
    return scale


def run_evaluate(args) -> None:
    """Score weights on labelled images: Dice, IoU, AJI, PQ, F1 and AP at IoU 0.5."""
    from .core.pipeline import load_model
    from .core.validation import evaluate_samples

    if not (args.model or args.weights):
        raise CLIError("give --weights (or --model to use its bundled starter weights)")
    if args.tune_decode and not (args.data and args.split == "val" and args.weights):
        raise CLIError("--tune-decode needs --weights FILE --data DIR --split val (thresholds are chosen "
                       "on the weights' validation images, never on a test set, and written into that card)")
    if args.scale is not None and args.pixel_size is not None:
        raise CLIError("give --scale or --pixel-size, not both")
    model_name = args.model or model_of_weights(args.weights)
    model, card = load_model(model_name, args.weights, args.device)
    scale = _evaluation_scale(args, card)
    if args.tune_decode and scale != 1:
        raise CLIError("--tune-decode chooses thresholds at the weights' own pixel size: drop --scale / "
                       "--pixel-size (decoding sizes are converted when other scans are segmented)")
    samples = _evaluation_samples(args, card)
    tuning = _tune_decode(args, model, card, samples) if args.tune_decode else None
    result = evaluate_samples(model, samples, card=dict(card, decode=tuning["settings"]) if tuning else card,
                              tta=tuning["tta"] if tuning else args.tta,
                              probabilities=tuning and tuning["probabilities"], scale=scale)
    if tuning:
        from .core.decode_tuning import write_decode_to_card

        path = write_decode_to_card(card["weights_path"], tuning, validation=result)
        print(f"decode thresholds {tuning['settings']} and these validation scores written to {path}",
              file=sys.stderr)
    result["weights"] = card.get("weights_path") or args.weights
    if args.json:
        print(json.dumps(result, indent=2))
        return
    metrics = list(result["mean"])
    print("| image | " + " | ".join(metrics) + " |")
    print("|---|" + "---|" * len(metrics))
    for row in result["per_image"]:
        print(f"| {row['name'][:24]} | " + " | ".join(f"{row[m]:.3f}" for m in metrics) + " |")
    print(f"| **mean of {result['n_images']}** | " + " | ".join(f"{result['mean'][m]:.3f}" for m in metrics) + " |")
    for modality, scores in result["by_modality"].items():
        print(f"| {modality} ({scores['n_images']}) | " + " | ".join(f"{scores[m]:.3f}" for m in metrics) + " |")
    print(f"test-time views averaged per tile: {result['tta']}"
          + (f"; tiles resampled ×{result['scale']:.3g} before the model" if result["scale"] != 1 else ""))
