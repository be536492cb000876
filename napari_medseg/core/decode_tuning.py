"""Choosing a model's instance-decoding thresholds on its validation images.

The seeded watershed (:mod:`.instances`) has knobs whose best values depend on how confident a
network is: the interior probability that seeds an object, the foreground probability that bounds
it, the smallest object kept, and how deep a dip in the (smoothed) interior probability must be
to split one seed between touching nuclei (0: never). :func:`tune_decode` predicts the validation
images once through the real engine, then searches these knobs coordinate by coordinate over a
small grid (the three thresholds first, two passes; then all knobs, three passes), maximising mean
F1 at IoU 0.5 plus mean AJI. The winner is stored in the weights card (``"decode"``) and used by
default wherever those weights run (:func:`decode_settings_for`).

Validation images only: thresholds chosen here are never chosen on a test set.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from .datasets import Sample
from .instances import DecodeSettings, decode_instances
from .metrics import instance_metrics

GRID = {
    "seed_threshold": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97),  # flip-averaged maps seed best at 0.95
    "foreground_threshold": (0.3, 0.4, 0.5, 0.6, 0.7),
    "min_area": (4, 8, 16, 32, 48, 64),   # the DSB2018 starters chose the old top (32) and 0.8 / 0.6
    "seed_split_dip": (0.0, 0.03, 0.05, 0.1, 0.15, 0.2),  # MoNuSeg: 0.05 split merged nuclei
    "seed_smoothing": (1.0, 2.0, 3.0),  # sigma (px); only read when the dip split is on
}

THRESHOLD_KNOBS = ("seed_threshold", "foreground_threshold", "min_area")  # tuned first, then all


def decode_settings_for(card: dict | None) -> DecodeSettings:
    """The decoding settings stored in a weights card (defaults for fields it does not set)."""
    stored = (card or {}).get("decode") or {}
    known = {f.name for f in dataclasses.fields(DecodeSettings)}
    return DecodeSettings(**{k: v for k, v in stored.items() if k in known})


def _score(probabilities: list[np.ndarray], truths: list[np.ndarray], settings: DecodeSettings) -> dict:
    rows = [instance_metrics(gt, decode_instances(p, settings)) for p, gt in zip(probabilities, truths)]
    return {k: float(np.mean([r[k] for r in rows])) for k in ("f1", "aji", "dice")}


def _objective(scores: dict) -> float:
    return scores["f1"] + scores["aji"]


def tune_decode(model, card: dict, samples: list[Sample], start: DecodeSettings | None = None,
                passes: int = 2, log=None, tta: int | None = None) -> dict:
    """Search the decoding thresholds of a three-class model on labelled (validation) samples.

    Args:
        model: the network (eval mode is set here).
        card: its weights card (tile size, normalisation).
        samples: instance-labelled samples (``Sample.labels`` ``(H, W)`` int).
        start: settings to start from (default: the card's, else the defaults).
        passes: rounds of coordinate search over the thresholds (:data:`THRESHOLD_KNOBS`); the
            search over all of :data:`GRID` that follows gets one more.
        log: optional ``callable(str)`` for progress lines.
        tta: test-time views of the predictions tuned on (None: the card's, see
            :func:`.inference_plan.resolve_tta`); the thresholds belong with this choice.

    Returns:
        ``{"settings": dict, "before": scores, "after": scores, "n_images": n, "grid": GRID, "tta": views,
        "probabilities": [per sample (3, H, W) float32]}`` where scores are mean ``f1``, ``aji`` and
        ``dice``; the probabilities let the caller score the result without predicting again.
    """
    from .inference_plan import resolve_tta
    from .validation import predict_probabilities

    if model.config.num_classes != 3:
        raise ValueError("decoding thresholds apply to three-class instance models only")
    if not samples:
        raise ValueError("no labelled samples to tune on")
    tta = resolve_tta(card, tta)
    probabilities = [predict_probabilities(model.eval(), s.image, card, tta=tta) for s in samples]
    truths = [s.labels for s in samples]
    start = start or decode_settings_for(card)
    # Thresholds first, then every knob: searched all at once, the split's strong effect on F1
    # can lead coordinate ascent away from thresholds that suit it (MoNuSeg: AJI 0.553 vs 0.566).
    first = search_thresholds(probabilities, truths, start, passes=passes, log=log,
                              grid={k: GRID[k] for k in THRESHOLD_KNOBS})
    result = search_thresholds(probabilities, truths, dataclasses.replace(start, **first["settings"]),
                               passes=passes + 1, log=log)
    return {**result, "before": first["before"], "tta": tta, "probabilities": probabilities}


def search_thresholds(probabilities: list[np.ndarray], truths: list[np.ndarray], start: DecodeSettings,
                      passes: int = 2, log=None, grid: dict | None = None) -> dict:
    """Coordinate search of the decoding knobs on predicted maps.

    Args:
        probabilities: per image ``(3, H, W)`` float probabilities.
        truths: per image ``(H, W)`` int instance labels.
        start: settings to start from (already scored, so never worse than the result).
        passes: rounds over the grid.
        log: optional ``callable(str)``.
        grid: ``{field: values}`` (default :data:`GRID`).

    Returns:
        ``{"settings": {field: value}, "before": scores, "after": scores, "n_images": n, "grid": grid}``.
    """
    grid = GRID if grid is None else grid
    best = start
    before = best_scores = _score(probabilities, truths, best)
    for _ in range(passes):
        changed = False
        for name, values in grid.items():
            current = getattr(best, name)      # already scored: try every other value once
            for value in values:
                if value == current:
                    continue
                trial = dataclasses.replace(best, **{name: value})
                scores = _score(probabilities, truths, trial)
                if _objective(scores) > _objective(best_scores) + 1e-6:
                    best, best_scores, changed = trial, scores, True
            if log:
                log(f"{name} = {getattr(best, name)}: F1 {best_scores['f1']:.3f}, AJI {best_scores['aji']:.3f}")
        if not changed:
            break
    return {"settings": {k: getattr(best, k) for k in grid}, "before": before, "after": best_scores,
            "n_images": len(truths), "grid": {k: list(v) for k, v in grid.items()}}


def write_decode_to_card(weights, result: dict, validation: dict | None = None) -> Path:
    """Store tuned settings (and the validation scores obtained with them, when given) in the
    weights' JSON card, replaced atomically; the tensors are untouched.

    The test-time views the thresholds were tuned with become the card's default
    (``"inference": {"tta": N}``), since thresholds suit the maps they were chosen on.
    """
    from src_models.weights_io import weights_paths, write_json_atomic

    _, card_path = weights_paths(weights)
    card = json.loads(card_path.read_text())
    card["decode"] = dict(result["settings"])
    card["inference"] = {**(card.get("inference") or {}), "tta": int(result.get("tta") or 1)}
    metrics = card.setdefault("metrics", {})
    metrics["decode_tuning"] = {
        "on": "validation split", "n_images": result["n_images"], "before": result["before"],
        "after": result["after"], "objective": "mean F1@0.5 + mean AJI", "grid": result["grid"],
        "tta": int(result.get("tta") or 1)}
    if validation is not None:
        metrics["validation"] = validation
    write_json_atomic(card_path, card)
    return card_path
