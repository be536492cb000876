"""Segmentation metrics, implemented once for evaluation, training reports and benchmarks.

Instance metrics all derive from one sparse contingency table of (ground-truth id, predicted id)
pixel overlaps, built with a single ``np.unique`` over the image (no per-object loops over pixels):

- ``dice`` / ``iou``: pixel scores of the foreground (any id > 0) against the foreground.
- ``aji``: Aggregated Jaccard Index as defined by Kumar et al. 2017 (IEEE TMI 36(7)): every
  ground-truth object is paired with the prediction of highest IoU (a prediction may be reused);
  intersections and unions are summed, and the area of every prediction never used is added to
  the union. (This is the original AJI, not HoVer-Net's one-to-one "AJI+".)
- ``pq``: Panoptic Quality (Kirillov et al. 2019): sum of matched IoUs / (TP + FP/2 + FN/2).
- ``f1``: 2 TP / (2 TP + FP + FN) with a match meaning IoU > 0.5 (unique at this threshold).
- ``ap``: the DSB2018 / StarDist "average precision" at one IoU threshold,
  TP / (TP + FP + FN) (also called "accuracy" in StarDist's ``matching``), *not* the area under a
  precision-recall curve.

Convention for empty maps: when both maps are empty every score is 1.0 (nothing to find, nothing
found); when exactly one is empty every score is 0.0.

All results are plain ``dict[str, float | int]``, ready for ``json.dumps``.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

INSTANCE_KEYS = ("dice", "iou", "aji", "pq", "f1", "ap")


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator`` with 0/0 read as perfect agreement (1.0)."""
    return 1.0 if denominator == 0 else float(numerator) / float(denominator)


def _check_pair(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} must have the same "
                         "shape; crop or resample one of them first.")
    for name, a in (("ground truth", gt), ("prediction", pred)):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise TypeError(f"{name} must be an integer label map, got dtype {a.dtype}.")
    return gt, pred


def contingency(gt: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """Sparse overlap table between two instance maps.

    Args:
        gt: ``(H, W)`` integer instance labels, 0 = background (any ids, need not be consecutive).
        pred: ``(H, W)`` integer instance labels of the same shape.

    Returns:
        ``gt_area`` ``(G,) int64`` and ``pred_area`` ``(P,) int64`` object areas (ids renumbered
        0..G-1 / 0..P-1 in increasing original-id order) and the non-zero overlaps as parallel
        arrays ``pair_gt``, ``pair_pred`` (indices into those) and ``pair_n`` (pixel counts).
    """
    gt, pred = _check_pair(gt, pred)
    g_ids, g_inv = np.unique(gt.ravel(), return_inverse=True)
    p_ids, p_inv = np.unique(pred.ravel(), return_inverse=True)
    # Shift so that background becomes -1 and objects 0..n-1, whether or not 0 occurs.
    g_idx = g_inv - int(g_ids[0] == 0)
    p_idx = p_inv - int(p_ids[0] == 0)
    n_g, n_p = len(g_ids) - int(g_ids[0] == 0), len(p_ids) - int(p_ids[0] == 0)
    gt_area = np.bincount(g_idx[g_idx >= 0], minlength=n_g).astype(np.int64)
    pred_area = np.bincount(p_idx[p_idx >= 0], minlength=n_p).astype(np.int64)
    both = (g_idx >= 0) & (p_idx >= 0)
    codes, counts = np.unique(g_idx[both].astype(np.int64) * max(n_p, 1) + p_idx[both],
                              return_counts=True)
    return {"gt_area": gt_area, "pred_area": pred_area, "pair_gt": codes // max(n_p, 1),
            "pair_pred": codes % max(n_p, 1), "pair_n": counts.astype(np.int64)}


def _aji(table: dict[str, np.ndarray], pair_iou: np.ndarray) -> float:
    """Kumar's AJI from the contingency table (best-IoU prediction per ground-truth object)."""
    gt_area, pred_area = table["gt_area"], table["pred_area"]
    pair_gt, pair_pred, pair_n = table["pair_gt"], table["pair_pred"], table["pair_n"]
    # Best pair per ground-truth object: sort by (gt, -iou, pred) and keep the first of each gt.
    order = np.lexsort((pair_pred, -pair_iou, pair_gt))
    first = order[np.unique(pair_gt[order], return_index=True)[1]]
    best_inter = pair_n[first]
    best_union = gt_area[pair_gt[first]] + pred_area[pair_pred[first]] - best_inter
    unmatched_gt = np.ones(len(gt_area), bool)
    unmatched_gt[pair_gt[first]] = False
    used_pred = np.zeros(len(pred_area), bool)
    used_pred[pair_pred[first]] = True
    inter = best_inter.sum()
    union = best_union.sum() + gt_area[unmatched_gt].sum() + pred_area[~used_pred].sum()
    return _ratio(inter, union)


def instance_metrics(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> dict:
    """Every instance score of one image (see the module docstring for definitions).

    Args:
        gt: ``(H, W)`` integer ground-truth instance labels, 0 = background.
        pred: ``(H, W)`` integer predicted instance labels, 0 = background.
        iou_threshold: IoU above which a (gt, pred) pair is a match for PQ, F1 and AP; must be
            >= 0.5 so that matches are unique.

    Returns:
        ``{"dice", "iou", "aji", "pq", "f1", "ap": float,
        "tp", "fp", "fn", "n_gt", "n_pred": int}``.
    """
    if not 0.5 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0.5, 1) for unique matching, "
                         f"got {iou_threshold}.")
    table = contingency(gt, pred)
    gt_area, pred_area = table["gt_area"], table["pred_area"]
    pair_n = table["pair_n"]
    pair_iou = pair_n / (gt_area[table["pair_gt"]] + pred_area[table["pair_pred"]] - pair_n)
    matched = pair_iou > iou_threshold
    tp = int(matched.sum())
    fp, fn = len(pred_area) - tp, len(gt_area) - tp
    fg_inter, fg_gt, fg_pred = int(pair_n.sum()), int(gt_area.sum()), int(pred_area.sum())
    return {
        "dice": _ratio(2 * fg_inter, fg_gt + fg_pred),
        "iou": _ratio(fg_inter, fg_gt + fg_pred - fg_inter),
        "aji": _aji(table, pair_iou),
        "pq": _ratio(pair_iou[matched].sum(), tp + 0.5 * fp + 0.5 * fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "ap": _ratio(tp, tp + fp + fn),
        "tp": tp, "fp": fp, "fn": fn, "n_gt": len(gt_area), "n_pred": len(pred_area),
    }


def semantic_metrics(gt: np.ndarray, pred: np.ndarray, classes: Sequence[int] = (1,)) -> dict:
    """Pixel Dice and IoU of chosen classes in two semantic maps (e.g. ISBI 2012's cell class).

    Args:
        gt: ``(H, W)`` integer or bool class map.
        pred: ``(H, W)`` integer or bool class map of the same shape.
        classes: class values to score; with one class the keys are ``"dice"`` and ``"iou"``,
            with several they are ``"dice_<c>"`` / ``"iou_<c>"`` plus their means ``"dice"`` and
            ``"iou"``.

    Returns:
        ``dict[str, float]``.
    """
    gt, pred = _check_pair(gt, pred)
    scores: dict[str, float] = {}
    for c in classes:
        g, p = gt == c, pred == c
        inter = int(np.count_nonzero(g & p))
        total = int(np.count_nonzero(g)) + int(np.count_nonzero(p))
        scores[f"dice_{c}"] = _ratio(2 * inter, total)
        scores[f"iou_{c}"] = _ratio(inter, total - inter)
    if len(classes) == 1:
        return {"dice": scores[f"dice_{classes[0]}"], "iou": scores[f"iou_{classes[0]}"]}
    scores["dice"] = float(np.mean([scores[f"dice_{c}"] for c in classes]))
    scores["iou"] = float(np.mean([scores[f"iou_{c}"] for c in classes]))
    return scores


def evaluate_pairs(pairs: Iterable[tuple[str, np.ndarray, np.ndarray]], kind: str = "instance",
                   **kwargs) -> dict:
    """Score many (name, ground truth, prediction) triples, per image and on average.

    Args:
        pairs: iterable of ``(name, gt, pred)`` with ``(H, W)`` integer maps (may be lazy).
        kind: ``"instance"`` (:func:`instance_metrics`) or ``"semantic"``
            (:func:`semantic_metrics`).
        **kwargs: passed to the metric function (``iou_threshold`` or ``classes``).

    Returns:
        ``{"kind": str, "n_images": int, "per_image": [{"name": str, <metric>: number}, ...],
        "mean": {<metric>: float}}``; counts (tp, fp, ...) are summed in ``"total"``.
    """
    scorers = {"instance": instance_metrics, "semantic": semantic_metrics}
    if kind not in scorers:
        raise ValueError(f"kind must be one of {sorted(scorers)}, got {kind!r}.")
    per_image = [{"name": str(name), **scorers[kind](gt, pred, **kwargs)}
                 for name, gt, pred in pairs]
    keys = [k for k in (per_image[0] if per_image else {}) if k != "name"]
    scores = [k for k in keys if isinstance(per_image[0][k], float)]
    counts = [k for k in keys if k not in scores]
    return {
        "kind": kind,
        "n_images": len(per_image),
        "per_image": per_image,
        "mean": {k: float(np.mean([r[k] for r in per_image])) for k in scores},
        "total": {k: int(sum(r[k] for r in per_image)) for k in counts},
    }
