"""Decoding thresholds chosen on validation images, stored in the card, used by default."""
from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.core import decode_tuning
from napari_medseg.core.datasets import Sample
from napari_medseg.core.instances import DecodeSettings
from napari_medseg.core.samples import load_sample, load_sample_labels


def _samples():
    out = []
    for name in ("fluorescence_small", "histology_he"):
        image = load_sample(name)
        chw = np.moveaxis(image, -1, 0) if image.ndim == 3 else image[None]
        out.append(Sample(name, chw[:3], load_sample_labels(name).astype(np.int32), "instances"))
    return out


def test_decode_settings_for_reads_the_card_and_ignores_unknown_fields():
    assert decode_tuning.decode_settings_for(None) == DecodeSettings()
    card = {"decode": {"seed_threshold": 0.7, "min_area": 32, "from_the_future": 1}}
    assert decode_tuning.decode_settings_for(card) == DecodeSettings(seed_threshold=0.7, min_area=32)


def test_tune_write_and_use_by_default(tmp_path, monkeypatch):
    from src_models import create_model, read_card, save_weights

    from napari_medseg.core.inference import InferenceSettings
    from napari_medseg.core.pipeline import load_model, run_segmentation
    from napari_medseg.core.progress import drain
    from napari_medseg.core.store import OutputStore

    model = create_model("pranet_v2", "lite")
    save_weights(model, tmp_path / "w", {"version": "t", "tile_size": 128,
                                         "classes": ["background", "interior", "boundary"]})
    _, card = load_model("pranet_v2", tmp_path / "w", "cpu")
    scored = []
    real_score = decode_tuning._score
    monkeypatch.setattr(decode_tuning, "_score", lambda p, t, s: scored.append(s) or real_score(p, t, s))
    result = decode_tuning.tune_decode(model, card, _samples(), passes=1)
    assert set(result["settings"]) == {"seed_threshold", "foreground_threshold", "min_area",
                                       "seed_split_dip", "seed_smoothing"}
    # the thresholds are searched first (every value tried once, the dip split off) ...
    first = 1 + sum(len(decode_tuning.GRID[k]) - 1 for k in decode_tuning.THRESHOLD_KNOBS)
    assert all(s.seed_split_dip == 0 for s in scored[:first])
    # ... then every knob from there: every value of every knob was tried
    for knob, values in decode_tuning.GRID.items():
        assert {getattr(s, knob) for s in scored[first:]} >= set(values), knob
    objective = decode_tuning._objective
    assert objective(result["after"]) >= objective(result["before"])

    chosen = {"seed_threshold": 0.8, "foreground_threshold": 0.3, "min_area": 16}
    decode_tuning.write_decode_to_card(tmp_path / "w", dict(result, settings=chosen), validation={"mean": {}})
    stored = read_card(tmp_path / "w")
    assert stored["decode"] == chosen and stored["metrics"]["validation"] == {"mean": {}}
    assert stored["metrics"]["decode_tuning"]["on"] == "validation split"
    assert not list(tmp_path.glob(".*"))                       # no temporary file left
    load_model("pranet_v2", tmp_path / "w", "cpu")              # tensors still match their sha256

    model, card = load_model("pranet_v2", tmp_path / "w", "cpu")
    out = drain(run_segmentation(load_sample("fluorescence_small"), model, card, tmp_path / "run.zarr",
                                 InferenceSettings(device="cpu", mc_samples=0))).output
    assert OutputStore.open(out, mode="r").attrs["decode"] == {**DecodeSettings().__dict__, **chosen}


def test_tune_refuses_two_class_models():
    from src_models import create_model

    with pytest.raises(ValueError, match="three-class"):
        decode_tuning.tune_decode(create_model("vunet", "lite", num_classes=2), {}, _samples())


def test_cli_tune_decode_needs_the_validation_split(tmp_path, capsys):
    from napari_medseg.cli import main

    assert main(["evaluate", "--model", "vunet", "--data", str(tmp_path), "--tune-decode"]) == 2
    assert "--tune-decode needs --weights FILE --data DIR --split val" in capsys.readouterr().err


def test_cli_evaluate_tune_decode_predicts_each_image_once(tmp_path, monkeypatch, capsys):
    import json
    import shutil

    from src_models import create_model, save_weights

    from napari_medseg.cli import main
    from napari_medseg.core import validation
    from napari_medseg.core.resources import resource_path

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in ("fluorescence_small", "histology_he"):
        shutil.copy(resource_path("samples", f"{name}.png"), root / "images" / f"{name}.png")
        shutil.copy(resource_path("samples", f"{name}_labels.tif"), root / "labels" / f"{name}.tif")
    save_weights(create_model("pranet_v2", "lite"), tmp_path / "w",
                 {"version": "t", "tile_size": 128, "classes": ["background", "interior", "boundary"],
                  "training": {"val_ids": ["fluorescence_small", "histology_he"]}})
    calls = []
    real = validation.predict_probabilities
    monkeypatch.setattr(validation, "predict_probabilities", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = ["evaluate", "--weights", str(tmp_path / "w"), "--data", str(root), "--split", "val", "--json"]
    assert main(args + ["--tune-decode"]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert len(calls) == 2                 # tuned and scored on the same two predictions
    assert main(args) == 0                 # the card now holds the tuned decoding
    again = json.loads(capsys.readouterr().out)
    assert len(calls) == 4 and again["mean"] == tuned["mean"]
