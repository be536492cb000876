"""Training is reproducible: a fixed-seed recipe gives the same weights twice, and a weights card replays
its own run (steps taken, not the clock) through ``train --recipe CARD``."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from napari_medseg.cli import main
from napari_medseg.core.progress import drain
from napari_medseg.core.recipe import Recipe
from napari_medseg.core.resources import resource_path
from napari_medseg.core.training import train


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in ("fluorescence_small", "histology_he", "brightfield"):
        shutil.copy(resource_path("samples", f"{name}.png"), root / "images" / f"{name}.png")
        shutil.copy(resource_path("samples", f"{name}_labels.tif"), root / "labels" / f"{name}.tif")
    return root


def _recipe(**kw):
    return Recipe.from_dict({"model": "iau_net", "steps": 3, "batch": 2, "crop": 64, "val_split": 0.0,
                             "warmup_steps": 1, **kw})


def _tensors(stem):
    return load_file(f"{stem}.safetensors")


def test_the_same_recipe_and_seed_give_identical_weights(data, tmp_path):
    first = drain(train(_recipe(), data, tmp_path / "a", device="cpu"))
    second = drain(train(_recipe(), data, tmp_path / "b", device="cpu"))
    other_seed = drain(train(_recipe(seed=1), data, tmp_path / "c", device="cpu"))
    assert first["sha256"] == second["sha256"]
    a, b, c = _tensors(tmp_path / "a"), _tensors(tmp_path / "b"), _tensors(tmp_path / "c")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert other_seed["sha256"] != first["sha256"]          # the seed matters, so the check can fail
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_replay_recipe_takes_the_steps_the_run_took_without_the_clock():
    card = {"architecture": "reseg_unet", "training": {
        "recipe": _recipe(model="reseg_unet", steps=6000, pretrain_steps=600, time_budget_s=1800).to_dict(),
        "steps_done": 615, "pretrain_steps_done": 142}}
    replay = Recipe.replaying(card)
    assert (replay.steps, replay.pretrain_steps, replay.time_budget_s) == (615, 142, None)
    assert replay.lr == _recipe().lr and replay.model == "reseg_unet"
    with pytest.raises(ValueError, match="records no training recipe"):
        Recipe.replaying({"architecture": "vunet", "training": {"data": "x"}})


def test_a_budget_stopped_run_replays_from_its_card(data, tmp_path):
    """The first run stops on its clock far before its 10,000 steps; replaying its card takes exactly the
    steps it took, two replays are identical, and a replay is the plain run of that many steps."""
    stopped = drain(train(_recipe(steps=10_000, time_budget_s=1.0), data, tmp_path / "a", device="cpu"))
    done = stopped["training"]["steps_done"]
    assert 1 <= done < 10_000
    args = ["train", "--model", "iau_net", "--data", str(data), "--recipe", str(tmp_path / "a.json")]
    assert main(args + ["--out", str(tmp_path / "r1")]) == 0
    assert main(args + ["--out", str(tmp_path / "r2")]) == 0
    replayed = json.loads((tmp_path / "r1.json").read_text())
    assert replayed["training"]["steps_done"] == done
    assert replayed["training"]["recipe"]["steps"] == done and replayed["training"]["recipe"]["time_budget_s"] is None
    assert replayed["sha256"] == json.loads((tmp_path / "r2.json").read_text())["sha256"]
    direct = drain(train(_recipe(steps=done), data, tmp_path / "d", device="cpu"))
    assert replayed["sha256"] == direct["sha256"]


def test_cli_replay_refuses_a_card_of_another_model(data, tmp_path, capsys):
    drain(train(_recipe(steps=1), data, tmp_path / "a", device="cpu"))
    assert main(["train", "--model", "vunet", "--data", str(data), "--recipe", str(tmp_path / "a.json"),
                 "--out", str(tmp_path / "b")]) == 2
    assert "replay it with --model iau_net" in capsys.readouterr().err
    assert not (tmp_path / "b.safetensors").exists()


def test_cli_replay_starts_from_the_weights_the_run_started_from(data, tmp_path, capsys):
    drain(train(_recipe(steps=1), data, tmp_path / "a", device="cpu"))
    drain(train(_recipe(steps=1, seed=1), data, tmp_path / "other", device="cpu"))
    drain(train(_recipe(steps=1), data, tmp_path / "b", device="cpu", init=tmp_path / "a"))
    base = ["train", "--model", "iau_net", "--data", str(data), "--recipe", str(tmp_path / "b.json")]
    assert main(base + ["--out", str(tmp_path / "r")]) == 2
    assert "replay it with --init those weights" in capsys.readouterr().err
    assert main(base + ["--init", str(tmp_path / "other"), "--out", str(tmp_path / "r")]) == 2
    assert "not the weights that run started from" in capsys.readouterr().err
    scratch = ["train", "--model", "iau_net", "--data", str(data), "--recipe", str(tmp_path / "a.json")]
    assert main(scratch + ["--init", str(tmp_path / "other"), "--out", str(tmp_path / "r")]) == 2
    assert "without --init" in capsys.readouterr().err
    assert main(base + ["--init", str(tmp_path / "a"), "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["sha256"] == json.loads(
        (tmp_path / "b.json").read_text())["sha256"]       # one step from the same start: the same weights


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(data, tmp_path):
    """The checkpoint keeps the sampler's and torch's random states, so stopping and resuming changes
    nothing (V-UNet: its training draws latent samples from torch's generator too)."""
    recipe = _recipe(model="vunet", steps=4, checkpoint_every=2)
    whole = drain(train(recipe, data, tmp_path / "whole", device="cpu"))
    job = train(recipe, data, tmp_path / "split", device="cpu")
    for record in job:                     # stop during step 3: the checkpoint of step 2 is on disk
        if record.stage == "train" and record.done == 3:
            break
    job.close()
    torch.manual_seed(123)                 # whatever the process did in between
    resumed = drain(train(recipe, data, tmp_path / "split", device="cpu", resume=True))
    assert resumed["training"]["steps_done"] == 4 and resumed["sha256"] == whole["sha256"]
