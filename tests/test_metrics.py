"""Metrics against hand-computed cases (and a naive reference for AJI on random maps)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from napari_medseg.core.metrics import (
    INSTANCE_KEYS, contingency, evaluate_pairs, instance_metrics, semantic_metrics)


def row(*values) -> np.ndarray:
    """A one-row ``(1, N)`` label map, easy to count by hand."""
    return np.array([values], np.int32)


def check(scores: dict, expected: dict) -> None:
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value), key


def test_identical_maps_score_one_everywhere():
    gt = row(1, 1, 0, 2, 2, 2, 0, 3)
    scores = instance_metrics(gt, gt * 10)  # ids need not match, only the partition
    check(scores, {k: 1.0 for k in INSTANCE_KEYS})
    check(scores, {"tp": 3, "fp": 0, "fn": 0})


def test_one_missed_object():
    # gt: A = 4 px, B = 2 px; pred finds A exactly and misses B.
    gt, pred = row(1, 1, 1, 1, 0, 2, 2), row(5, 5, 5, 5, 0, 0, 0)
    # dice = 2*4 / (6 + 4) = 0.8; iou = 4 / 6
    # AJI: A~A adds 4 / 4; B has no overlap, adds 0 / 2  ->  4 / 6
    # TP 1, FP 0, FN 1: F1 = 2 / 3, AP = 1 / 2, PQ = 1.0 / (1 + 0.5) = 2 / 3
    check(instance_metrics(gt, pred), {"dice": 0.8, "iou": 4 / 6, "aji": 4 / 6, "f1": 2 / 3,
                                       "ap": 0.5, "pq": 2 / 3, "tp": 1, "fp": 0, "fn": 1})


def test_one_split_object():
    # gt: one object of 8 px; pred splits it 5 + 3.
    gt, pred = row(1, 1, 1, 1, 1, 1, 1, 1), row(1, 1, 1, 1, 1, 2, 2, 2)
    # foreground identical: dice = iou = 1
    # IoU(gt, p1) = 5 / 8 > 0.5 -> TP; p2 (3 / 8) -> FP.  F1 = 2 / 3, AP = 1 / 2
    # PQ = 0.625 / (1 + 0.5 * 1) = 0.41667
    # AJI: gt -> p1: 5 / 8; unused p2 adds 3 to the union -> 5 / 11
    check(instance_metrics(gt, pred), {"dice": 1.0, "iou": 1.0, "aji": 5 / 11, "f1": 2 / 3,
                                       "ap": 0.5, "pq": 0.625 / 1.5, "tp": 1, "fp": 1, "fn": 0})


def test_one_merge():
    # gt: A = 4 px, B = 2 px, touching; pred merges them into one 6-px object.
    gt, pred = row(1, 1, 1, 1, 2, 2), row(7, 7, 7, 7, 7, 7)
    # IoU(A, P) = 4 / 6 -> TP; IoU(B, P) = 2 / 6 -> B is FN.  F1 = 2 / 3, AP = 1 / 2
    # PQ = (4 / 6) / (1 + 0.5) = 4 / 9
    # AJI (P reused by both): (4 + 2) / (6 + 6) = 0.5
    check(instance_metrics(gt, pred), {"dice": 1.0, "iou": 1.0, "aji": 0.5, "f1": 2 / 3,
                                       "ap": 0.5, "pq": 4 / 9, "tp": 1, "fp": 0, "fn": 1})


def test_partial_overlap_and_strict_threshold():
    # gt A = 4 px; pred covers 2 of them plus 1 background pixel: IoU = 2 / 5 -> no match.
    # dice = 2*2 / (4 + 3) = 4 / 7; iou = 2 / 5; AJI = 2 / 5
    gt, pred = row(1, 1, 1, 1, 0), row(0, 0, 3, 3, 3)
    check(instance_metrics(gt, pred), {"dice": 4 / 7, "iou": 0.4, "aji": 0.4, "f1": 0.0,
                                       "ap": 0.0, "pq": 0.0, "tp": 0, "fp": 1, "fn": 1})
    # IoU exactly 0.5 is not a match (matches need IoU > 0.5).
    assert instance_metrics(row(1, 1, 1, 1), row(0, 0, 2, 2))["tp"] == 0


def test_empty_prediction_scores_zero():
    scores = instance_metrics(row(0, 1, 1, 0), row(0, 0, 0, 0))
    check(scores, {k: 0.0 for k in INSTANCE_KEYS})
    check(scores, {"tp": 0, "fp": 0, "fn": 1, "n_pred": 0})


def test_empty_ground_truth_scores_zero():
    scores = instance_metrics(row(0, 0, 0), row(4, 4, 0))
    check(scores, {k: 0.0 for k in INSTANCE_KEYS})
    check(scores, {"tp": 0, "fp": 1, "fn": 0, "n_gt": 0})


def test_both_empty_is_perfect_agreement():
    check(instance_metrics(row(0, 0), row(0, 0)), {k: 1.0 for k in INSTANCE_KEYS})


def test_aji_matches_naive_reference_on_random_maps():
    rng = np.random.default_rng(3)
    for _ in range(5):
        gt = rng.integers(0, 6, (12, 12)) * (rng.random((12, 12)) > 0.2)
        pred = rng.integers(0, 5, (12, 12)) * (rng.random((12, 12)) > 0.2)
        inter = union = 0
        used = set()
        for g in np.unique(gt[gt > 0]):  # Kumar et al. 2017, Algorithm 1, written plainly
            ious = {p: ((gt == g) & (pred == p)).sum() / ((gt == g) | (pred == p)).sum()
                    for p in np.unique(pred[pred > 0])}
            best = max(sorted(ious), key=lambda p: ious[p]) if ious else None
            if best is None or ious[best] == 0:
                union += (gt == g).sum()
                continue
            inter += ((gt == g) & (pred == best)).sum()
            union += ((gt == g) | (pred == best)).sum()
            used.add(best)
        union += sum((pred == p).sum() for p in np.unique(pred[pred > 0]) if p not in used)
        assert instance_metrics(gt, pred)["aji"] == pytest.approx(inter / union)


def test_contingency_counts_overlaps():
    table = contingency(row(1, 1, 2, 0), row(9, 0, 9, 9))
    assert table["gt_area"].tolist() == [2, 1] and table["pred_area"].tolist() == [3]
    pairs = list(zip(table["pair_gt"], table["pair_pred"], table["pair_n"]))
    assert pairs == [(0, 0, 1), (1, 0, 1)]


def test_semantic_dice_and_iou():
    gt, pred = row(1, 1, 0, 0), row(1, 0, 1, 0)
    # class 1: intersection 1, |G| = |P| = 2: dice = 2 / 4, iou = 1 / 3
    check(semantic_metrics(gt, pred), {"dice": 0.5, "iou": 1 / 3})
    # class 0: intersection 1 (last pixel), |G| = |P| = 2: the same numbers
    check(semantic_metrics(gt, pred, classes=(0, 1)),
          {"dice_0": 0.5, "dice_1": 0.5, "iou_0": 1 / 3, "dice": 0.5, "iou": 1 / 3})
    check(semantic_metrics(gt.astype(bool), gt.astype(bool)), {"dice": 1.0, "iou": 1.0})


def test_evaluate_pairs_per_image_mean_and_json():
    pairs = [("same", row(1, 1, 0, 2), row(1, 1, 0, 2)),
             ("missed", row(1, 1, 1, 1, 0, 2, 2), row(5, 5, 5, 5, 0, 0, 0))]
    result = evaluate_pairs(pairs)
    assert [r["name"] for r in result["per_image"]] == ["same", "missed"]
    assert result["mean"]["f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert result["total"] == {"tp": 3, "fp": 0, "fn": 1, "n_gt": 4, "n_pred": 3}
    assert json.loads(json.dumps(result))["n_images"] == 2
    semantic = evaluate_pairs([("a", row(1, 0), row(1, 0))], kind="semantic")
    assert semantic["mean"] == {"dice": 1.0, "iou": 1.0}


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same shape"):
        instance_metrics(row(1, 1), row(1, 1, 1))
    with pytest.raises(TypeError, match="integer label map"):
        instance_metrics(row(1, 1), row(1, 1).astype(float))
    with pytest.raises(ValueError, match="kind"):
        evaluate_pairs([], kind="panoptic")
