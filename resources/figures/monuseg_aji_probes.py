"""Where the MoNuSeg AJI is lost, and what does not recover it (session 17, README "Session 17").

Every probe scores the 2 MoNuSeg validation images (the cards' ``val_ids``) from cached 8-view
probability maps, so only ``cache`` runs a network:

  python resources/figures/monuseg_aji_probes.py cache W [W ...]        # (3, H, W) maps per image → CACHE
  python resources/figures/monuseg_aji_probes.py soup OUT W [W ...]     # average same-architecture tensors
  python resources/figures/monuseg_aji_probes.py ensemble W [W ...]     # mean of the maps, decoding re-tuned
  python resources/figures/monuseg_aji_probes.py oracle W               # ground-truth seeds or mask swapped in
  python resources/figures/monuseg_aji_probes.py errors W               # merges, splits, misses per image
  python resources/figures/monuseg_aji_probes.py decoders W             # other seedings, concave splits
  python resources/figures/monuseg_aji_probes.py samples W              # segment's Monte-Carlo default

W is a weights stem (``resources/weights/vunet_paper_monuseg2018``); maps are cached under
``$MEDSEG_PROBE_CACHE`` (default ``/tmp/medseg-aji-probes``) by the stem's name.
"""
import dataclasses
import itertools
import os
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import gaussian
from skimage.measure import regionprops
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from napari_medseg.core.datasets import load_folder, split
from napari_medseg.core.decode_tuning import GRID, THRESHOLD_KNOBS, decode_settings_for, search_thresholds
from napari_medseg.core.inference import InferenceSettings
from napari_medseg.core.instances import decode_instances
from napari_medseg.core.metrics import instance_metrics
from napari_medseg.core.validation import predict_probabilities
from src_models.weights_io import load_weights, read_card, save_weights

CACHE = Path(os.environ.get("MEDSEG_PROBE_CACHE", "/tmp/medseg-aji-probes"))
SAMPLES = sorted(split(load_folder("../shared/data/monuseg2018_train"), 0.15)[1], key=lambda s: s.id)  # val_ids


def maps_of(weights: str) -> list[np.ndarray]:
    """Per validation image ``(3, H, W) float32`` probabilities with 8 test-time views (cached)."""
    path = CACHE / f"{Path(weights).name}.npz"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        model, card = load_weights(weights)
        np.savez(path, *[predict_probabilities(model, s.image, card, tta=8) for s in SAMPLES])
    stored = np.load(path)
    return [stored[f"arr_{i}"] for i in range(len(SAMPLES))]


def scores(predictions: list[np.ndarray]) -> dict:
    """Mean AJI, F1 at IoU 0.5 and foreground Dice over the validation images."""
    each = [instance_metrics(s.labels, p) for p, s in zip(predictions, SAMPLES)]
    return {k: round(float(np.mean([m[k] for m in each])), 4) for k in ("aji", "f1", "dice")}


def soup(out: str, stems: list[str]) -> None:
    """One weights file whose floating tensors are the mean of ``stems``' (same architecture)."""
    models = [load_weights(s) for s in stems]
    model, card = models[0]
    state = model.state_dict()
    for key, value in state.items():
        if value.is_floating_point():
            state[key] = sum(m.state_dict()[key] for m, _ in models) / len(models)
    model.load_state_dict(state)
    keep = {k: v for k, v in card.items()
            if k not in ("format", "architecture", "config", "parameters", "dtype", "sha256")}
    keep["training"] = dict(card["training"], soup_of=list(stems))
    save_weights(model, out, keep, half=True)
    print("wrote", out, "- score it with: napari-medseg evaluate --weights", out,
          "--data ../shared/data/monuseg2018_train --split val --tune-decode --tta 8 --json")


def ensemble(stems: list[str]) -> None:
    """Mean of the members' maps, decoding tuned on it as ``evaluate --tune-decode`` does."""
    maps = [maps_of(s) for s in stems]
    mean = [sum(m[i] for m in maps) / len(maps) for i in range(len(SAMPLES))]
    start = decode_settings_for(read_card(stems[0]))
    truths = [s.labels for s in SAMPLES]
    first = search_thresholds(mean, truths, start, grid={k: GRID[k] for k in THRESHOLD_KNOBS})
    best = search_thresholds(mean, truths, dataclasses.replace(start, **first["settings"]), passes=3)
    print(" + ".join(Path(s).name for s in stems), "→", {k: round(v, 4) for k, v in best["after"].items()},
          best["settings"])


def oracle(stem: str) -> None:
    """The model's decoding, then ground-truth seeds in the predicted mask, then predicted seeds
    in the ground-truth mask: how much AJI each half of the decoding loses."""
    settings = decode_settings_for(read_card(stem))
    maps = maps_of(stem)
    model = [decode_instances(p, settings) for p in maps]
    true_seeds, true_mask = [], []
    for p, s, labels in zip(maps, SAMPLES, model):
        mask = (p[1] + p[2]) > settings.foreground_threshold
        seeds = np.where(ndi.binary_erosion(s.labels > 0, iterations=2), s.labels, 0) * mask
        true_seeds.append(watershed(-p[1], seeds, mask=mask))
        gt_mask = s.labels > 0
        true_mask.append(watershed(-p[1], np.where(gt_mask & (p[1] > settings.seed_threshold), labels, 0),
                                   mask=gt_mask))
    print("model", scores(model))
    print("predicted mask + ground-truth seeds", scores(true_seeds))
    print("ground-truth mask + predicted seeds", scores(true_mask))


def errors(stem: str) -> None:
    """Per image: objects, matches at IoU 0.5, merges (a prediction covering > 30 % of two or more
    true nuclei), splits (a true nucleus > 30 % covered by two or more), misses and false objects
    (best IoU < 0.1)."""
    settings = decode_settings_for(read_card(stem))
    for p, s in zip(maps_of(stem), SAMPLES):
        pred, gt = decode_instances(p, settings), s.labels.astype(np.int64)
        n, m = int(gt.max()) + 1, int(pred.max()) + 1
        table = np.bincount(gt.ravel() * m + pred.ravel(), minlength=n * m).reshape(n, m)
        g_ids, p_ids = np.unique(gt)[1:], np.unique(pred)[1:]
        inter = table[np.ix_(g_ids, p_ids)]
        g_area, p_area = table.sum(1)[g_ids], table.sum(0)[p_ids]
        iou = inter / (g_area[:, None] + p_area[None, :] - inter)
        covered = inter / g_area[:, None] > 0.3
        print(s.id, {"true": len(g_ids), "predicted": len(p_ids), "matched": int((iou.max(1) > 0.5).sum()),
                     "merges": int((covered.sum(0) >= 2).sum()), "splits": int((covered.sum(1) >= 2).sum()),
                     "missed": int((iou.max(1) < 0.1).sum()), "false": int((iou.max(0) < 0.1).sum())})


def _drop_small(labels: np.ndarray, min_area: int) -> np.ndarray:
    areas = np.bincount(labels.ravel())
    return np.where(areas[labels] >= min_area, labels, 0)


def _contrast_seeds(p: np.ndarray, fg: float, t: float, sigma: float) -> np.ndarray:
    """Seeds where p(interior) − p(boundary), smoothed by ``sigma`` px, exceeds ``t``."""
    mask = (p[1] + p[2]) > fg
    contrast = gaussian(p[1] - p[2], sigma) if sigma else p[1] - p[2]
    markers = _drop_small(ndi.label((contrast > t) & mask)[0], 10)
    return _drop_small(watershed(-contrast, markers, mask=mask), 48)


def _distance_seeds(p: np.ndarray, fg: float, t: float, h: float, of_mask: bool) -> np.ndarray:
    """Seeds at h-maxima of the distance transform of the core (p(interior) > t) or of the mask."""
    mask = (p[1] + p[2]) > fg
    core = (p[1] > t) & mask
    distance = ndi.distance_transform_edt(mask) * core if of_mask else ndi.distance_transform_edt(core)
    distance = gaussian(distance, 1.0)
    markers = ndi.label(h_maxima(distance, h) & (mask if of_mask else core))[0]
    return _drop_small(watershed(-distance, markers, mask=mask), 48)


def _split_concave(labels: np.ndarray, solidity: float, h: float, min_area: int) -> np.ndarray:
    """Objects less solid than ``solidity`` cut at h-maxima of their own distance transform."""
    out, next_id = labels.copy(), int(labels.max()) + 1
    for region in regionprops(labels):
        if region.solidity >= solidity or region.area < 2 * min_area:
            continue
        distance = ndi.distance_transform_edt(np.pad(region.image, 1))[1:-1, 1:-1]
        peaks, n = ndi.label(h_maxima(distance, h) & region.image)
        parts = watershed(-distance, peaks, mask=region.image) if n > 1 else None
        if parts is None or np.bincount(parts.ravel())[1:].min() < min_area:
            continue
        window = out[region.slice]
        for k in range(2, n + 1):
            window[parts == k] = next_id
            next_id += 1
    return out


def samples(stem: str) -> None:
    """AJI of maps with 8 views and 8 or 2 Monte-Carlo samples (what ``segment`` runs by default)
    against the deterministic maps that ``evaluate`` scores."""
    model, card = load_weights(stem)
    settings = decode_settings_for(card)
    print("deterministic", scores([decode_instances(p, settings) for p in maps_of(stem)]))
    for count in (8, 2):
        engine = InferenceSettings(probs_dtype="float32", prefetch=False, mc_samples=count, tta=8)
        maps = [predict_probabilities(model, s.image, card, settings=engine) for s in SAMPLES]
        print(count, "Monte-Carlo samples", scores([decode_instances(p, settings) for p in maps]))


def decoders(stem: str) -> None:
    """The best AJI of each alternative decoding over its grid, and the product's for comparison."""
    settings = decode_settings_for(read_card(stem))
    maps = maps_of(stem)
    product = [decode_instances(p, settings) for p in maps]
    print("product decoding", scores(product))
    for fg in (0.75, 0.8):
        print("product, foreground", fg,
              scores([decode_instances(p, dataclasses.replace(settings, foreground_threshold=fg)) for p in maps]))
    trials = {
        "interior - boundary seeds": [lambda p, a=a: _contrast_seeds(p, *a) for a in itertools.product(
            (0.5, 0.6, 0.7), (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), (0, 1.0, 2.0))],
        "core distance h-maxima": [lambda p, a=a: _distance_seeds(p, *a, False) for a in itertools.product(
            (0.5, 0.6, 0.7), (0.3, 0.5, 0.7), (0.5, 1.0, 2.0, 3.0))],
        "mask distance h-maxima": [lambda p, a=a: _distance_seeds(p, *a, True) for a in itertools.product(
            (0.5, 0.6, 0.7), (0.3, 0.5, 0.7), (0.5, 1.0, 2.0, 3.0))],
    }
    for name, decodes in trials.items():
        print(name, max((scores([decode(p) for p in maps]) for decode in decodes), key=lambda s: s["aji"]))
    splits = (scores([_split_concave(b, *a) for b in product])
              for a in itertools.product((0.8, 0.85, 0.9), (1.0, 2.0, 3.0), (30, 60)))
    print("product + concave splits", max(splits, key=lambda s: s["aji"]))


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "cache":
        for stem in args:
            maps_of(stem)
            print("cached", stem)
    elif command == "soup":
        soup(args[0], args[1:])
    else:
        {"ensemble": lambda: ensemble(args), "oracle": lambda: oracle(args[0]),
         "errors": lambda: errors(args[0]), "decoders": lambda: decoders(args[0]),
         "samples": lambda: samples(args[0])}[command]()
