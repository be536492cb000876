"""``napari-medseg bench finetune``: do a few corrected objects teach a model a new domain?

A simulated user. Starter weights trained on one domain (DSB2018, mostly fluorescence) segment one
image of another domain (a MoNuSeg H&E tile) through the real engine. The user replaces the K worst
objects with ground truth (:func:`correct_worst`), and the model is fine-tuned with the default
settings (:class:`~.finetune.FinetuneSettings`) through :func:`~.finetune.finetune_job`, exactly
what the "Fine-tune on edits" button runs. AJI and F1 at IoU 0.5 are then measured on the *other*
images of the new domain (never seen) and on validation images of the original domain (forgetting),
before and after, with the wall time of the fine-tune (edit detection and data building included).

Targets (issue 7): a default fine-tune of a lite model on CPU in under 3 minutes; AJI on unseen
new-domain images up by at least 0.10 with K = 30; original-domain AJI and F1 down by at most 0.02.
"""
from __future__ import annotations

import dataclasses
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from src_models import load_weights

from .datasets import Sample, load_folder
from .finetune import FinetuneSettings, finetune_job
from .pipeline import load_model
from .progress import drain
from .validation import evaluate_samples, predict_instances

TARGETS = {"seconds": 180.0, "aji_gain_k30": 0.10, "original_drop": 0.02}
FALSE_POSITIVE_OVERLAP = 0.2   # a predicted object with less of its area on true nuclei is spurious
MOSTLY_INSIDE = 0.5            # a predicted object mostly inside a redrawn nucleus is deleted


@dataclass(frozen=True)
class FinetuneBenchConfig:
    """What the fine-tune benchmark runs.

    Attributes:
        model: architecture; its bundled starter weights are used unless ``weights`` is given.
        new_domain, original_domain: labelled data folders (see :mod:`.datasets`).
        ks: numbers of corrected objects.
        correct_image: id of the new-domain image the user corrects (default: the one with the
            most objects); every other new-domain image is scored.
        new_images, original_images: how many images are scored per domain (0: all). The original
            domain uses the weights' own validation images when the card lists them.
        settings: the fine-tune schedule (default: the product's defaults).
    """

    model: str = "pranet_v2"
    weights: str | None = None
    new_domain: str = "../shared/data/monuseg2018_train"
    original_domain: str = "../shared/data/dsb2018_train"
    ks: tuple[int, ...] = (10, 30, 100)
    correct_image: str | None = None
    new_images: int = 0
    original_images: int = 30
    settings: FinetuneSettings = field(default_factory=FinetuneSettings)

    def command(self) -> str:
        parts = ["napari-medseg", "bench", "finetune", "--model", self.model,
                 "--ks", ",".join(map(str, self.ks))]
        if self.weights:
            parts += ["--weights", self.weights]
        return shlex.join(parts)


def correct_worst(predicted: np.ndarray, truth: np.ndarray, k: int) -> tuple[np.ndarray, dict]:
    """The labels a careful user leaves after fixing the ``k`` worst objects.

    Candidates are every true object, scored by its best IoU with any predicted object (0 when
    missed), and every spurious predicted object (under 20 % of it on true nuclei), scored 0. The
    ``k`` lowest scores are fixed, larger objects first among equals: a spurious object is erased;
    a true object is redrawn: predicted objects lying mostly inside it are erased, the others lose
    its pixels, and it is painted with a new ID.

    Args:
        predicted: ``(H, W)`` integer labels from the model.
        truth: ``(H, W)`` integer ground-truth labels.
        k: objects to fix.

    Returns:
        ``(H, W) int32`` corrected labels and counts ``{"redrawn", "added", "erased"}``.
    """
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted {predicted.shape} and truth {truth.shape} differ in shape")
    pred = predicted.astype(np.int64)
    gt = truth.astype(np.int64)
    n_pred = int(pred.max()) + 1
    g_area = np.bincount(gt.ravel(), minlength=int(gt.max()) + 1)
    p_area = np.bincount(pred.ravel(), minlength=n_pred)
    both = (gt > 0) & (pred > 0)
    pairs, inter = np.unique(gt[both] * n_pred + pred[both], return_counts=True)
    g_of, p_of = pairs // n_pred, pairs % n_pred
    iou = inter / (g_area[g_of] + p_area[p_of] - inter)
    best = np.zeros(g_area.size)
    np.maximum.at(best, g_of, iou)
    on_truth = np.bincount(pred[gt > 0], minlength=n_pred)

    candidates = [(float(best[g]), -int(g_area[g]), "truth", int(g)) for g in np.flatnonzero(g_area[1:]) + 1]
    candidates += [(0.0, -int(p_area[p]), "spurious", int(p)) for p in np.flatnonzero(p_area[1:]) + 1
                   if on_truth[p] < FALSE_POSITIVE_OVERLAP * p_area[p]]
    candidates.sort()
    corrected = pred.copy()
    next_id = n_pred
    counts = {"redrawn": 0, "added": 0, "erased": 0}
    boxes_gt, boxes_pred = ndimage.find_objects(gt), ndimage.find_objects(pred)
    for _, _, kind, ident in candidates[:k]:
        if kind == "spurious":
            box = boxes_pred[ident - 1]
            corrected[box][pred[box] == ident] = 0
            counts["erased"] += 1
            continue
        box = boxes_gt[ident - 1]
        mask = gt[box] == ident
        overlapping = p_of[(g_of == ident)]
        for p in overlapping:
            shared = int(inter[(g_of == ident) & (p_of == p)][0])
            if shared > MOSTLY_INSIDE * p_area[p]:
                pbox = boxes_pred[p - 1]
                corrected[pbox][corrected[pbox] == p] = 0
        corrected[box][mask] = next_id
        next_id += 1
        counts["redrawn" if len(overlapping) else "added"] += 1
    return corrected.astype(np.int32), counts


def _pick(samples: list[Sample], ids, limit: int) -> list[Sample]:
    chosen = [s for s in samples if ids is None or s.id in ids]
    return chosen[:limit] if limit else chosen


def _scores(model, samples: list[Sample], card: dict) -> dict:
    # Test-time views and thresholds as the card says, like a user's run (8 views: ~5x the scoring time).
    result = evaluate_samples(model.eval(), samples, card=card)
    return {k: float(result["mean"][k]) for k in ("aji", "f1", "dice")}


def run_finetune_bench(config: FinetuneBenchConfig, workdir: str | Path | None = None, log=None) -> dict:
    """Run the simulated-user benchmark; returns a JSON-ready report (see :func:`format_table`).

    Raises:
        FileNotFoundError: a data folder is missing (the message names it).
    """
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    started = time.perf_counter()
    model, card = load_model(config.model, config.weights, device="cpu")
    parent = card["weights_path"]
    new = load_folder(config.new_domain)
    if len(new) < 2:
        raise FileNotFoundError(f"{config.new_domain} needs at least two labelled images (one to "
                                "correct, one to score)")
    target = (next((s for s in new if s.id == config.correct_image), None) if config.correct_image
              else max(new, key=lambda s: len(np.unique(s.labels))))
    if target is None:
        raise FileNotFoundError(f"no image {config.correct_image!r} in {config.new_domain}")
    scored_new = _pick([s for s in new if s.id != target.id], None, config.new_images)
    original_ids = set((card.get("training") or {}).get("val_ids") or []) or None
    original = _pick(load_folder(config.original_domain), original_ids, config.original_images)
    log(f"scoring the parent {Path(parent).name} on {len(scored_new)} new-domain and "
        f"{len(original)} original-domain images")
    before = {"new": _scores(model, scored_new, card), "original": _scores(model, original, card)}
    predicted = predict_instances(model.eval(), target.image, card)
    image_hwc = np.moveaxis(target.image, 0, -1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="medseg-bench-ft-") as scratch:
        folder = Path(workdir or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for k in config.ks:
            corrected, counts = correct_worst(predicted, target.labels, k)
            log(f"K={k}: {counts}; fine-tuning with default settings")
            out = folder / f"{config.model}-k{k}"
            t0 = time.perf_counter()
            result = drain(finetune_job(parent, image_hwc, corrected, predicted,
                                        settings=config.settings, out=out))
            seconds = time.perf_counter() - t0
            child, child_card = load_weights(out, "cpu")
            after = {"new": _scores(child, scored_new, child_card),
                     "original": _scores(child, original, child_card)}
            rows.append({"k": k, "corrections": counts, "edits": result.card["finetune"]["edits"]["counts"],
                         "steps": result.steps, "stopped": result.stopped, "seconds": round(seconds, 1),
                         "train_seconds": round(result.seconds, 1), "after": after})
            log(f"K={k}: {seconds:.0f} s, new-domain AJI {before['new']['aji']:.3f} → "
                f"{after['new']['aji']:.3f}, original AJI {before['original']['aji']:.3f} → "
                f"{after['original']['aji']:.3f}")
    return {"command": config.command(), "model": config.model, "parent": str(parent),
            "parent_version": card.get("version"), "correct_image": target.id,
            "correct_image_objects": int(len(np.unique(target.labels)) - 1),
            "new_domain": {"folder": str(config.new_domain), "images": [s.id for s in scored_new]},
            "original_domain": {"folder": str(config.original_domain), "images": len(original)},
            "settings": dataclasses.asdict(config.settings), "before": before, "rows": rows,
            "seconds": round(time.perf_counter() - started, 1)}


def format_table(report: dict) -> str:
    """The report as markdown, with pass/fail against the issue's targets."""
    b = report["before"]
    lines = ["## Fine-tune benchmark", "", f"Command: `{report['command']}`", "",
             f"Parent: {report['parent_version']} ({report['model']} lite). The user corrects "
             f"`{report['correct_image']}` ({report['correct_image_objects']} nuclei); scored on "
             f"{len(report['new_domain']['images'])} other new-domain images and "
             f"{report['original_domain']['images']} original-domain images. Total "
             f"{report['seconds']:.0f} s.", "",
             "| K | corrections | steps (stop) | fine-tune s | new AJI | new F1 | original AJI | original F1 | result |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        a = row["after"]
        gain = a["new"]["aji"] - b["new"]["aji"]
        drop = max(b["original"][m] - a["original"][m] for m in ("aji", "f1"))
        ok = row["seconds"] < TARGETS["seconds"] and drop <= TARGETS["original_drop"]
        if row["k"] == 30:
            ok = ok and gain >= TARGETS["aji_gain_k30"]
        c = row["corrections"]
        cells = [str(row["k"]), f"{c['redrawn']} redrawn, {c['added']} added, {c['erased']} erased",
                 f"{row['steps']} ({row['stopped']})", f"{row['seconds']:.0f}"]
        for domain in ("new", "original"):
            for metric in ("aji", "f1"):
                x0, x1 = b[domain][metric], a[domain][metric]
                cells.append(f"{x0:.3f} → {x1:.3f} ({x1 - x0:+.3f})")
        cells.append("pass" if ok else "fail")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Targets: fine-tune < {TARGETS['seconds']:.0f} s; new-domain AJI +"
              f"{TARGETS['aji_gain_k30']:.2f} at K = 30; original AJI and F1 down ≤ "
              f"{TARGETS['original_drop']:.2f}."]
    return "\n".join(lines)


def save_plot(report: dict, path: str | Path) -> Path | None:
    """Accuracy gain vs K and vs fine-tune time as a PNG (None when matplotlib is missing:
    ``pip install "napari-medseg[bench]"``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    b = report["before"]
    ks = [r["k"] for r in report["rows"]]
    secs = [r["seconds"] for r in report["rows"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    for domain, style in (("new", "-o"), ("original", "--s")):
        for metric in ("aji", "f1"):
            gains = [r["after"][domain][metric] - b[domain][metric] for r in report["rows"]]
            label = f"{domain} domain {metric.upper()}"
            axes[0].plot(ks, gains, style, label=label)
            by_time = sorted(zip(secs, gains))
            axes[1].plot([t for t, _ in by_time], [g for _, g in by_time], style, label=label)
    for ax, xlabel in zip(axes, ("corrected objects K", "fine-tune wall time (s)")):
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("change after fine-tuning")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[0].set_xticks(ks, [str(k) for k in ks])
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{report['model']} lite: {report['parent_version']} fine-tuned on K corrected objects")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
