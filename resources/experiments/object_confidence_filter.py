"""Does dropping low-confidence objects raise the MoNuSeg AJI? (session 20)

AJI counts every predicted object matched to no nucleus in its union, so removing doubtful objects
could help. The bundled H&E weights' maps of the 2 validation images (the card's test-time views) are
decoded with the card's thresholds, then objects are dropped whose mean foreground probability
(1 − p(background)), mean interior probability or peak interior probability is below a threshold.
Prints the mean AJI and F1@0.5 per filter and threshold (tuned on the validation images themselves,
so optimistic).

    python resources/experiments/object_confidence_filter.py --data ../shared/data/monuseg2018_train
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi
from skimage import io as skio

from napari_medseg.core.decode_tuning import decode_settings_for
from napari_medseg.core.instances import decode_instances
from napari_medseg.core.metrics import instance_metrics
from napari_medseg.core.pipeline import load_model
from napari_medseg.core.resources import resolve_weights_name
from napari_medseg.core.validation import predict_probabilities

SCORES = {"mean foreground": lambda p, lab, idx: ndi.mean(1 - p[0], lab, idx),
          "mean interior": lambda p, lab, idx: ndi.mean(p[1], lab, idx),
          "peak interior": lambda p, lab, idx: ndi.maximum(p[1], lab, idx)}


def keep_confident(labels: np.ndarray, probs: np.ndarray, score, threshold: float) -> np.ndarray:
    """``labels`` without the objects whose ``score`` is below ``threshold``."""
    idx = np.arange(1, int(labels.max()) + 1)
    keep = np.zeros(len(idx) + 1, bool)
    keep[1:] = np.asarray(score(probs, labels, idx)) >= threshold
    return np.where(keep[labels], labels, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="MoNuSeg folder (images/, instance_labels/)")
    parser.add_argument("--weights", default="vunet_paper_monuseg2018")
    parser.add_argument("--model", default="vunet")
    args = parser.parse_args()
    model, card = load_model(args.model, resolve_weights_name(args.weights), "cpu")
    data = Path(args.data)
    cases = []
    for name in (i for i in card["training"]["val_ids"] if i.startswith("TCGA")):
        image = skio.imread(data / "images" / f"{name}.png")[..., :3].transpose(2, 0, 1)
        probs = predict_probabilities(model.eval(), image, card)
        truth = tifffile.imread(data / "instance_labels" / f"{name}.tif")
        cases.append((truth, decode_instances(probs, decode_settings_for(card)), probs))
    base = [instance_metrics(t, lab) for t, lab, _ in cases]
    print("| filter | threshold | AJI | F1@0.5 |\n|---|---|---|---|")
    print(f"| none | — | {np.mean([m['aji'] for m in base]):.4f} | {np.mean([m['f1'] for m in base]):.4f} |")
    for title, score in SCORES.items():
        for threshold in (0.6, 0.7, 0.75, 0.8, 0.85, 0.9):
            scored = [instance_metrics(t, keep_confident(lab, p, score, threshold)) for t, lab, p in cases]
            print(f"| {title} | {threshold} | {np.mean([m['aji'] for m in scored]):.4f} | "
                  f"{np.mean([m['f1'] for m in scored]):.4f} |")


if __name__ == "__main__":
    main()
