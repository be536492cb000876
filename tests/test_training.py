"""``train``: a tiny real run on bundled CC0 images — card contents, resume, warm start, overrides."""
from __future__ import annotations

import json
import shutil

import pytest

from napari_medseg.cli import main
from napari_medseg.core.progress import drain
from napari_medseg.core.recipe import Recipe
from napari_medseg.core.resources import resource_path
from napari_medseg.core.training import train

SAMPLES = ("fluorescence_small", "fluorescence_large", "histology_he", "brightfield")


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in SAMPLES:
        shutil.copy(resource_path("samples", f"{name}.png"), root / "images" / f"{name}.png")
        shutil.copy(resource_path("samples", f"{name}_labels.tif"), root / "labels" / f"{name}.tif")
    return root


def _recipe(**kw):
    return Recipe.from_dict({"model": "iau_net", "steps": 4, "batch": 2, "crop": 64, "val_split": 0.25,
                             "checkpoint_every": 2, "warmup_steps": 1, **kw})


def test_train_writes_weights_with_a_complete_card(data, tmp_path):
    from src_models import load_weights

    recipe = _recipe(model_overrides={"ce_weight": 0.5}, pixel_size_um=0.5)
    stages = []
    card = drain(train(recipe, data, tmp_path / "w", device="cpu"), lambda r: stages.append(r.stage))
    assert stages.count("train") == 4 and "tune decode" in stages and stages[-1] == "validate"
    model, stored = load_weights(tmp_path / "w")
    assert stored["sha256"] == card["sha256"] and model.config.ce_weight == 0.5   # the override reached the model
    training = card["training"]
    assert training["recipe"] == {**recipe.to_dict(), "num_classes": 3} and training["steps_done"] == 4
    assert training["val_images"] == 1 and len(training["val_ids"]) == 1
    assert training["train_images"] == 3 and training["init"] is None and card["parent"] is None
    assert 0 < training["time_s"] < 600
    assert set(card["decode"]) == {"seed_threshold", "foreground_threshold", "min_area",
                                   "seed_split_dip", "seed_smoothing"}
    assert set(card["metrics"]["validation"]["mean"]) >= {"f1", "aji", "dice", "pq", "ap"}
    assert card["metrics"]["decode_tuning"]["on"] == "validation split"
    assert card["inference"] == {"pixel_size_um": 0.5}     # segmentation resamples to it
    assert not list(tmp_path.glob("w.ckpt*")) and not list(tmp_path.glob("w*.partial*"))


def test_resume_continues_from_the_checkpoint_without_double_counting_time(data, tmp_path):
    job = train(_recipe(steps=6, val_split=0.0), data, tmp_path / "w", device="cpu")
    for record in job:                 # stop after step 3: the checkpoint of step 2 is on disk
        if record.stage == "train" and record.done == 3:
            break
    job.close()
    steps = []
    card = drain(train(_recipe(steps=6, val_split=0.0), data, tmp_path / "w", device="cpu", resume=True),
                 lambda r: steps.append(r.done) if r.stage == "train" else None)
    assert steps[0] == 3 and steps[-1] == 6 and card["training"]["steps_done"] == 6
    assert card["training"]["time_s"] < 600


def test_init_warm_start_is_recorded_and_checked(data, tmp_path):
    first = drain(train(_recipe(val_split=0.0), data, tmp_path / "a", device="cpu"))
    second = drain(train(_recipe(val_split=0.0), data, tmp_path / "b", device="cpu", init=tmp_path / "a"))
    assert second["training"]["init"] == {"sha256": first["sha256"], "version": first["version"],
                                          "steps_done": 4, "time_s": first["training"]["time_s"],
                                          "data": "data", "recipe": first["training"]["recipe"],
                                          "pretrain_steps_done": 0, "init": None}
    third = drain(train(_recipe(steps=2, val_split=0.0), data, tmp_path / "c", device="cpu",
                        init=tmp_path / "b"))
    lineage = third["training"]["init"]        # every earlier run, newest first
    assert lineage["sha256"] == second["sha256"] and lineage["steps_done"] == 4
    assert lineage["init"]["sha256"] == first["sha256"] and lineage["init"]["init"] is None
    with pytest.raises(ValueError, match="another config"):
        drain(train(_recipe(val_split=0.0, model_overrides={"ce_weight": 0.5}), data, tmp_path / "d",
                    device="cpu", init=tmp_path / "a"))


def test_cli_train_refuses_to_overwrite_and_unknown_models(data, tmp_path, capsys):
    (tmp_path / "w.safetensors").write_bytes(b"mine")
    assert main(["train", "--model", "iau_net", "--data", str(data), "--out", str(tmp_path / "w")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "w.safetensors").read_bytes() == b"mine"
    assert main(["train", "--model", "nope", "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    recipe = tmp_path / "r.json"        # a recipe named like the output stem: its card would replace it
    recipe.write_text('{"steps": 2}')
    assert main(["train", "--model", "iau_net", "--data", str(data), "--recipe", str(recipe),
                 "--out", str(tmp_path / "r")]) == 2
    assert "r.json already exists" in capsys.readouterr().err and recipe.read_text() == '{"steps": 2}'


def test_cli_keeps_the_recipe_file_values_it_is_not_given(tmp_path):
    from napari_medseg.cli import build_parser
    from napari_medseg.cli_train import train_recipe

    path = tmp_path / "r.json"
    path.write_text(json.dumps({"model": "gca_resunet", "preset": "paper", "seed": 1, "val_split": 0.2,
                                "lr": 5e-4}))
    base = ["train", "--model", "gca_resunet", "--data", str(tmp_path), "--out", str(tmp_path / "w"),
            "--recipe", str(path)]
    recipe = train_recipe(build_parser().parse_args(base))
    assert (recipe.preset, recipe.seed, recipe.val_split, recipe.lr) == ("paper", 1, 0.2, 5e-4)
    given = train_recipe(build_parser().parse_args(base + ["--seed", "3", "--preset", "lite"]))
    assert (given.preset, given.seed, given.val_split) == ("lite", 3, 0.2)
    plain = train_recipe(build_parser().parse_args(base[:-2]))
    assert (plain.preset, plain.seed, plain.val_split) == ("lite", 0, 0.15)
