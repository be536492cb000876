"""Scoring a model on labelled images through the same tiled engine users run.

Each image goes through :func:`napari_medseg.core.inference.segment` into a temporary zarr group
(so validation sees exactly the tiling, normalisation and probability encoding of deployment), then
through instance decoding (:mod:`.instances`) and the metrics (:mod:`.metrics`).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .datasets import Sample
from .inference import InferenceSettings, segment
from .inference_plan import resolve_tta
from .decode_tuning import decode_settings_for
from .instances import decode_instances
from .metrics import evaluate_pairs
from .progress import drain
from .resolution import check_scale, decode_at_scale
from .store import OutputStore


def predict_probabilities(model, image: np.ndarray, card: dict, settings: InferenceSettings | None = None,
                          tta: int | None = None, scale: float = 1.0) -> np.ndarray:
    """Class probabilities of one in-memory image through the tiled engine.

    Args:
        model: a ``SegmentationModel``.
        image: ``(C, H, W)`` raw image.
        card: its weights card (for the tile size and normalisation).
        settings: engine settings (default: deterministic, float32 probabilities, no prefetch).
        tta: test-time views when ``settings`` is not given (None: the card's default).
        scale: model pixels per image pixel when ``settings`` is not given (1: no resampling).

    Returns:
        ``(K, H, W) float32`` probabilities.
    """
    settings = settings or InferenceSettings(probs_dtype="float32", prefetch=False, mc_samples=0, tta=tta,
                                             scale=scale)
    with tempfile.TemporaryDirectory(prefix="medseg-val-") as folder:
        out = Path(folder) / "run.zarr"
        drain(segment(np.ascontiguousarray(image), model, card, out, settings))
        store = OutputStore.open(out, mode="r")
        h, w = image.shape[1:]
        return store.read_map("probs", (0, h, 0, w))


def predict_instances(model, image: np.ndarray, card: dict, task: str = "instances",
                      tta: int | None = None, probs: np.ndarray | None = None, scale: float = 1.0) -> np.ndarray:
    """Instance labels ``(H, W) int32`` (or a semantic class map for ``task="semantic"``);
    ``probs``: this image's probabilities when already predicted with ``tta`` views; ``scale``:
    model pixels per image pixel (tiles resampled by the engine, decoding sizes converted)."""
    probs = predict_probabilities(model, image, card, tta=tta, scale=scale) if probs is None else probs
    if task == "semantic":
        return probs.argmax(axis=0).astype(np.int32)
    return decode_instances(probs, decode_at_scale(decode_settings_for(card), scale))


def evaluate_samples(model, samples: list[Sample], recipe=None, card: dict | None = None,
                     tta: int | None = None, probabilities: list[np.ndarray] | None = None,
                     scale: float = 1.0) -> dict:
    """Mean and per-image metrics of ``model`` on labelled samples, overall and per modality.

    Instance samples are scored with Dice, IoU, AJI, PQ, F1 and AP at IoU 0.5; semantic ones with
    pixel Dice/IoU of class 1. ``tta``: test-time views (None: the card's default); the views
    used are reported under ``"tta"``. ``probabilities``: per sample, the ``(K, H, W)`` maps
    already predicted with these views (e.g. by :func:`.decode_tuning.tune_decode`), so nothing
    is predicted twice. ``scale``: model pixels per image pixel, e.g. 2 for images scanned at half
    the weights' magnification (:mod:`.resolution`); labels and scores stay on the images' grid.
    """
    check_scale(scale)
    if probabilities and scale != 1:
        raise ValueError("probabilities predicted beforehand are at scale 1; give scale=1 with them")
    card = dict(card or {})
    card.setdefault("architecture", model.name)
    card.setdefault("sha256", "unsaved")
    card.setdefault("config", model.config.to_dict())
    if recipe is not None:
        card.setdefault("tile_size", recipe.crop)
    kind = "semantic" if samples and samples[0].kind == "semantic" else "instance"
    task = "semantic" if kind == "semantic" else "instances"
    tta = resolve_tta(card, tta)
    probabilities = probabilities or [None] * len(samples)
    predictions = {s.id: predict_instances(model, s.image, card, task, tta, p, scale)
                   for s, p in zip(samples, probabilities)}
    gt = {s.id: (s.labels > 0).astype(np.int32) if kind == "semantic" else s.labels for s in samples}
    result = evaluate_pairs(((s.id, gt[s.id], predictions[s.id]) for s in samples), kind=kind)
    by_modality = {}
    for modality in sorted({s.modality for s in samples}):
        names = {s.id for s in samples if s.modality == modality}
        rows = [r for r in result["per_image"] if r["name"] in names]
        by_modality[modality] = {k: float(np.mean([r[k] for r in rows])) for k in result["mean"]}
        by_modality[modality]["n_images"] = len(rows)
    return {"kind": kind, "tta": tta, "scale": scale, "n_images": result["n_images"], "mean": result["mean"],
            "by_modality": by_modality, "per_image": result["per_image"]}
