"""``napari-medseg bench models``: the model table of the README, measured here.

Per model: parameters of the paper preset (against the papers' numbers as reproduced in the
project's design notes) and of the lite preset, multiply-accumulates of a forward pass at 512×512
(torch's FlopCounterMode; MACs = FLOPs / 2), auxiliary maps, loss, and CPU inference speed of the
lite preset in megapixels per second (whole 512×512 tiles, batch 1, side by side in one process,
best of ``repeats``), with the ratio to the fastest model.
"""
from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from src_models import create_model, list_models, model_class

# Paper preset reference: (overrides used for the count, the paper's parameter count, note).
PAPER_PARAMETERS = {
    "vunet": ({"in_channels": 1, "num_classes": 1}, 6_910_000, "6.91 M (CAAI TIT 2025, Table 1)"),
    "reseg_unet": ({"in_channels": 3, "num_classes": 9}, 31_040_000, "≈31.04 M U-Net (MICCAI 2025)"),
    "pranet_v2": ({"in_channels": 3, "num_classes": 1}, 30_500_000,
                  "30.50 M without the unused ImageNet fc (32.55 M with it)"),
    "iau_net": ({"in_channels": 1, "num_classes": 4}, None, "not reported"),
    "gca_resunet": ({"in_channels": 3, "num_classes": 9}, 44_980_000,
                    "44.98 M as printed; +1.05 M equals one GCA module, all 16 give 48.98 M"),
}

LOSSES = {
    "vunet": "0.74·seg (BCE/CE) + 0.15·recon + 0.11·KL",
    "reseg_unet": "0.5·CE + 0.5·Dice + 0.035·align (stage 2); 0.6·MSE + 0.4·L1 (stage 1)",
    "pranet_v2": "Σ stages 0.5·CE + 0.7·Dice + 0.3·BCE(background)",
    "iau_net": "focal Tversky (α 0.7 FN, 0.3 FP, exponent 0.75)",
    "gca_resunet": "CE + Dice",
}


def count_macs(model: torch.nn.Module, size: int = 512) -> float:
    """GMACs of one eval forward pass at ``size``×``size`` (FLOPs / 2 as counted by torch)."""
    model.eval()
    x = torch.rand(1, model.config.in_channels, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def cpu_speed(model: torch.nn.Module, size: int = 512, repeats: int = 3) -> float:
    """Megapixels per second of ``model.predict`` on one ``size``² tile (best of ``repeats``)."""
    model.eval()
    x = torch.rand(1, model.config.in_channels, size, size)
    model.predict(x)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict(x)
        best = min(best, time.perf_counter() - start)
    return size * size / 1e6 / best


def model_table(speed: bool = True, macs: bool = True) -> list[dict]:
    """One row per registered model (see module docstring)."""
    rows = []
    for name in list_models():
        cls = model_class(name)
        overrides, paper_count, note = PAPER_PARAMETERS[name]
        paper = create_model(name, "paper", **overrides)
        lite = create_model(name, "lite")
        row = {"model": name, "paper": cls.paper, "paper_params": paper.num_parameters(),
               "paper_reported": paper_count, "paper_note": note, "lite_params": lite.num_parameters(),
               "aux_maps": ", ".join(s.name for s in lite.map_specs(8)[1:]) or "—",
               "loss": LOSSES[name]}
        if macs:
            row["paper_gmacs_512"] = round(count_macs(paper), 2)
            row["lite_gmacs_512"] = round(count_macs(lite), 2)
        del paper
        if speed:
            row["lite_cpu_mpx_s"] = round(cpu_speed(lite), 3)
        rows.append(row)
    if speed:
        fastest = max(r["lite_cpu_mpx_s"] for r in rows)
        for r in rows:
            r["speed_vs_fastest"] = round(r["lite_cpu_mpx_s"] / fastest, 2)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`model_table` rows."""
    head = ("| model | paper params (ours) | paper reports | GMACs 512² (paper preset) | lite params | "
            "lite GMACs 512² | lite CPU Mpx/s | vs fastest | auxiliary maps | loss |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['paper_params']:,} | {r['paper_note']} | {r.get('paper_gmacs_512', '—')} | "
            f"{r['lite_params']:,} | {r.get('lite_gmacs_512', '—')} | {r.get('lite_cpu_mpx_s', '—')} | "
            f"{r.get('speed_vs_fastest', '—')} | {r['aux_maps']} | {r['loss']} |")
    return "\n".join(lines)


def starter_table(speed_rows: list[dict] | None = None) -> str:
    """Markdown table of the bundled starter weights, from their cards: validation metrics (DSB2018
    validation split, decoding thresholds tuned on it), training steps, time and hardware, and the
    lite model's CPU speed from ``speed_rows`` (:func:`model_table`) when given."""
    from napari_medseg.core.resources import starter_weights
    from src_models import read_card

    speeds = {r["model"]: r for r in speed_rows or []}
    lines = ["| model | val F1@0.5 | val AJI | val PQ | val Dice | images | steps (+ stage 1) | train time | "
             "CPU Mpx/s (vs fastest) | decoding (seed / fg / min area) |", "|" + "---|" * 10]
    for name in list_models():
        path = starter_weights(name)
        if path is None:
            lines.append(f"| {name} | no starter weights yet |" + " |" * 8)
            continue
        card = read_card(path)
        train = card.get("training") or {}
        mean = ((card.get("metrics") or {}).get("validation") or {}).get("mean") or {}
        decode = card.get("decode") or {}
        stage1 = f" (+{train['pretrain_steps_done']})" if train.get("pretrain_steps_done") else ""
        stage1 += _earlier_runs(train.get("init"))
        speed = speeds.get(name, {})
        cpu = (f"{speed['lite_cpu_mpx_s']:.3f} ({speed['speed_vs_fastest']:.2f})" if "lite_cpu_mpx_s" in speed
               else "—")
        lines.append(
            f"| {name} | {mean.get('f1', float('nan')):.3f} | {mean.get('aji', float('nan')):.3f} | "
            f"{mean.get('pq', float('nan')):.3f} | {mean.get('dice', float('nan')):.3f} | "
            f"{train.get('val_images', '?')} | {train.get('steps_done', '?')}{stage1} | "
            f"{train.get('time_s', 0) / 60:.0f} min ({train.get('hardware', '?')}) | {cpu} | "
            f"{decode.get('seed_threshold', 0.5)} / {decode.get('foreground_threshold', 0.5)} / "
            f"{decode.get('min_area', 8)}{_dip_text(decode)} |")
    return "\n".join(lines)


def _dip_text(decode: dict) -> str:
    """``", dip 0.05 (σ 3 px)"`` when the card's decoding splits seeds at dips, else ``""``."""
    dip = decode.get("seed_split_dip") or 0
    return f", dip {dip:g} (σ {decode.get('seed_smoothing', 2.0):g} px)" if dip else ""


def _earlier_runs(init: dict | None) -> str:
    """Table text such as ``", after 841 in 2 earlier runs"`` for a card's ``training.init`` lineage:
    the steps of every earlier run it names (cards written before the lineage was recorded name only
    the last one); ``""`` for a model trained from scratch."""
    steps, runs = 0, 0
    while init:
        steps, runs = steps + (init.get("steps_done") or 0), runs + 1
        init = init.get("init")
    count = "an earlier run" if runs == 1 else f"{runs} earlier runs"
    return f", after {steps} in {count}" if steps else ""
