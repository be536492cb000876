"""Fine-tuning on edits (Qt-free): targets and masking for every model, a tiny fine-tune that learns,
cancel, bad input, out-of-memory fallback, the CLI and the replay set.

Tiny on purpose (lite models, 64² crops, a handful of steps) so the suite stays fast on a shared CPU.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from skimage.draw import disk

from napari_medseg.core import finetune_loop
from napari_medseg.core import versions
from napari_medseg.core.augment import sample_batch
from napari_medseg.core.edits import EditError
from napari_medseg.core.finetune import FinetuneSettings, finetune, finetune_job
from napari_medseg.core.finetune_data import build_edit_data, weight_edits
from napari_medseg.core.progress import drain
from napari_medseg.core.replay import load_replay, replay_dir
from napari_medseg.core.targets import instances_to_classes
from src_models import create_model, list_models, save_weights
from src_models.weights_io import file_sha256, weights_paths

SMALL = FinetuneSettings(steps=4, time_budget_s=None, crop=64, edit_batch=2, replay_batch=2,
                         eval_every=2, context=8, device="cpu", seed=0)


@pytest.fixture(autouse=True)
def _models_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(versions.ENV_VAR, str(tmp_path / "models"))
    torch.manual_seed(0)


def nuclei(shape=(128, 128), n=14, seed=0):
    """Bright disks on a dark background: ``(image uint8 (H, W), instance labels (H, W))``."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint32)
    for k in range(n):
        y, x = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8)
        labels[disk((y, x), int(rng.integers(4, 7)), shape=shape)] = k + 1
    image = np.where(labels > 0, 200, 30).astype(np.float32) + rng.normal(0, 8, shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels


def edited(labels):
    """Model labels that miss three nuclei and invent one: the corrected labels differ there."""
    model = labels.copy()
    for k in (1, 2, 3):
        model[labels == k] = 0
    model[disk((64, 64), 5)] = 500
    return model


def parent_weights(tmp_path, name="reseg_unet", **config):
    model = create_model(name, "lite", **config)
    stem = tmp_path / f"{name}_parent"
    save_weights(model, stem, {"version": "parent", "tile_size": 64})
    return stem


@pytest.mark.parametrize("name", list_models())
def test_targets_and_masking_for_each_model(name):
    image, truth = nuclei()
    model_labels = edited(truth)
    data = build_edit_data(image, truth, model_labels, in_channels=3, crop=64, context=8)
    assert data.edits.counts()["added"] == 3 and data.edits.counts()["deleted"] == 1
    item = data.items[0]
    y0, y1, x0, x1 = data.windows[0]
    assert np.array_equal(item.classes.numpy(), instances_to_classes(truth[y0:y1, x0:x1]))
    valid = item.valid.numpy().astype(bool)
    assert valid.any() and not valid.all()           # unreviewed pixels are masked out
    batch = sample_batch(data.items, 2, 64, np.random.default_rng(0))
    net = create_model(name, "lite").train()
    outputs = net(batch["image"])
    loss = net.make_loss()
    first = loss(outputs, batch)
    scrambled = dict(batch, labels=torch.where(batch["valid"] > 0, batch["labels"],
                                               torch.randint_like(batch["labels"], 0, 3)))
    second = loss(outputs, scrambled)
    assert torch.isfinite(first["loss"])
    assert torch.allclose(first["loss"], second["loss"])     # unsupported pixels carry no label


def test_tiny_finetune_lowers_the_loss_on_the_edits(tmp_path):
    image, truth = nuclei()
    parent = parent_weights(tmp_path, base_width=8)
    before = file_sha256(weights_paths(parent)[0])
    # A random parent needs a brisk schedule to show learning within 20 steps, and frozen BatchNorm
    # statistics: its running statistics are the initial ones, which 20 steps at momentum 0.1 do
    # not replace, so the eval-mode loss measured here would lag behind what was learnt.
    # No pull towards the (random) parent: at this rate the default anchor would undo 30 % of
    # every step.
    settings = dataclasses.replace(SMALL, steps=20, lr=3e-3, warmup_steps=1, edit_batch=3,
                                   replay_batch=1, freeze_bn=True, anchor=0.0)
    seen = []
    result = drain(finetune_job(parent, image, truth, edited(truth), settings=settings), seen.append)
    assert result.steps == 20 and result.stopped == "steps"
    assert result.edit_loss["after"] < 0.8 * result.edit_loss["before"], result.edit_loss
    assert all("loss" in r.metrics for r in seen if r.stage == "finetune")
    assert file_sha256(weights_paths(parent)[0]) == before
    card = result.card
    assert card["parent"]["sha256"] == versions.read_card(parent)["sha256"]
    assert card["finetune"]["edits"]["counts"]["added"] == 3
    assert len(card["finetune"]["loss_curve"]) == 20
    assert [v.path for v in versions.list_versions("reseg_unet")] == [result.path]


def test_cancel_leaves_the_parent_and_no_version(tmp_path):
    image, truth = nuclei()
    parent = parent_weights(tmp_path, base_width=8)
    before = file_sha256(weights_paths(parent)[0])
    job = finetune_job(parent, image, truth, edited(truth), settings=dataclasses.replace(SMALL, steps=50))
    for record in job:
        if record.stage == "finetune" and record.done == 2:
            break
    job.close()                                  # what the widget's Cancel does
    assert file_sha256(weights_paths(parent)[0]) == before
    folder = versions.arch_dir("reseg_unet")
    assert not folder.exists() or not any(folder.iterdir())


def test_bad_input(tmp_path):
    image, truth = nuclei()
    parent = parent_weights(tmp_path, base_width=8)
    with pytest.raises(EditError, match="no edits yet"):
        drain(finetune_job(parent, image, truth, truth.copy(), settings=SMALL))
    with pytest.raises(EditError, match="do not belong to this image"):
        drain(finetune_job(parent, image, truth[:64], edited(truth)[:64], settings=SMALL))
    with pytest.raises(EditError, match="no recorded model labels"):
        drain(finetune_job(parent, image, truth, None, settings=SMALL))
    binary = tmp_path / "binary"
    save_weights(create_model("reseg_unet", "lite", base_width=4, num_classes=2), binary, {})
    data = build_edit_data(image, truth, edited(truth), in_channels=3, crop=64)
    with pytest.raises(EditError, match="three-class"):
        drain(finetune(binary, data, SMALL))


def test_reviewed_rectangle_alone_is_enough(tmp_path):
    image, truth = nuclei()
    parent = parent_weights(tmp_path, base_width=8)
    rect = [[0, 0], [0, 63.5], [63.5, 63.5], [63.5, 0]]
    result = drain(finetune_job(parent, image, truth, None, reviewed=[rect],
                                settings=dataclasses.replace(SMALL, steps=2)))
    assert result.card["finetune"]["edits"]["counts"]["reviewed"] == 1
    assert result.card["finetune"]["supervised_pixels"] >= 64 * 64


def test_out_of_memory_halves_the_batch(tmp_path, monkeypatch):
    image, truth = nuclei()
    parent = parent_weights(tmp_path, base_width=8)
    real, calls = finetune_loop.train_step, []

    def flaky(network, loss_fn, optimizer, batch, *args, **kwargs):
        calls.append(batch["image"].shape[0])
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(network, loss_fn, optimizer, batch, *args, **kwargs)

    monkeypatch.setattr(finetune_loop, "train_step", flaky)
    result = drain(finetune_job(parent, image, truth, edited(truth), settings=SMALL))
    assert calls[0] == 4 and set(calls[1:]) == {2}
    assert result.steps == SMALL.steps and "out of memory" in result.warnings[0]


def test_cli_finetune(tmp_path, capsys):
    from napari_medseg.cli import main

    image, truth = nuclei()
    parent = parent_weights(tmp_path, base_width=8)
    paths = {}
    for name, array in (("image", image), ("labels", truth), ("model", edited(truth))):
        paths[name] = tmp_path / f"{name}.tif"
        tifffile.imwrite(paths[name], array)
    out = tmp_path / "child"
    args = ["finetune", "--weights", str(parent), "--image", str(paths["image"]), "--labels",
            str(paths["labels"]), "--model-labels", str(paths["model"]), "--out", str(out),
            "--steps", "2", "--crop", "64", "--device", "cpu", "--reviewed", "0:32,0:32"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["edits"]["reviewed"] == 1
    assert Path(summary["weights"]).exists() and weights_paths(out)[1].exists()
    assert main(args) == 2                                       # never overwrites
    assert "already exists" in capsys.readouterr().err
    assert main(["finetune", "--weights", str(parent), "--image", str(paths["image"]), "--labels",
                 str(paths["labels"]), "--model-labels", str(paths["labels"])]) == 2
    assert "no edits yet" in capsys.readouterr().err


def test_replay_set_is_small_cc0_and_from_the_train_split(shared_data):
    from napari_medseg.core.datasets import Sample, split

    folder = replay_dir()
    index = json.loads((folder / "SOURCES.json").read_text())
    assert index["licence"] == "CC0" and 32 <= len(index["crops"]) <= 64
    assert sum(p.stat().st_size for p in folder.iterdir()) < 5 * 2**20
    rows = json.loads((shared_data / "dsb2018_train" / "index.json").read_text())
    stubs = [Sample(r["id"], None, None, "instances", r["modality_guess"]) for r in rows]
    _, val = split(stubs, 0.15)
    assert not {c["dsb2018_id"] for c in index["crops"]} & {s.id for s in val}
    items = load_replay(3)
    assert len(items) == len(index["crops"]) and items[0].image.shape == (3, 256, 256)
    assert all(it.classes.max() <= 2 for it in items)


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_batchnorm_statistics_frozen_or_followed(tmp_path, freeze_bn):
    from src_models import load_weights

    image, truth = nuclei()
    parent = parent_weights(tmp_path, base_width=4)
    settings = dataclasses.replace(SMALL, steps=2, freeze_bn=freeze_bn, freeze_encoder=True)
    result = drain(finetune_job(parent, image, truth, edited(truth), settings=settings))
    before, _ = load_weights(parent)
    after, _ = load_weights(result.path)
    old, new = before.state_dict(), after.state_dict()
    stats = [k for k in old if k.endswith("running_mean")]
    assert all(torch.equal(old[k], new[k]) for k in stats) == freeze_bn
    encoder = [k for k in old if k.startswith("down1.") and k.endswith("weight")]
    assert encoder and all(torch.equal(old[k], new[k]) for k in encoder)   # encoder frozen
    assert not all(torch.equal(old[k], new[k]) for k in old if k.startswith("head."))


def test_final_weights_compete_even_before_the_first_heldout_evaluation(tmp_path):
    """A fine-tune ended (steps or time budget) before ``eval_every`` still scores its final weights
    against the parent, and the child keeps the parent's decoding thresholds."""
    import json

    image, truth = nuclei((256, 256), n=40)
    parent = parent_weights(tmp_path, base_width=8)
    card_path = weights_paths(parent)[1]
    card = json.loads(card_path.read_text())
    card["decode"] = {"seed_threshold": 0.7, "foreground_threshold": 0.4, "min_area": 16}
    card_path.write_text(json.dumps(card))
    model = truth.copy()
    for k in range(1, 13):
        model[truth == k] = 0
    settings = dataclasses.replace(SMALL, steps=3, eval_every=20, lr=3e-3, holdout_fraction=0.3)
    result = drain(finetune_job(parent, image, truth, model, settings=settings))
    assert result.heldout, "needs held-back windows for this test"
    assert [step for step, _ in result.heldout] == [0, 3]
    assert result.card["decode"] == card["decode"]


def test_edit_crops_carry_their_share_of_the_loss():
    """An edit crop supervises a few hundred pixels, a replay crop all of them: weighted, the edits
    carry ``edit_share`` of the loss; the loss value is the weighted mean the masks define."""
    edit = torch.zeros(3, 64, 64)
    edit[:, 20:30, 20:30] = 1.0                      # 300 supervised pixels
    replay = torch.ones(5, 64, 64)                   # 20,480
    weighted = weight_edits(edit, replay, 0.5)
    assert float(weighted.sum()) == pytest.approx(float(replay.sum()))
    assert float(weighted[:, 0, 0].abs().sum()) == 0.0   # unsupervised stays unsupervised
    share = weight_edits(edit, replay, 0.3).sum() / (
        weight_edits(edit, replay, 0.3).sum() + replay.sum())
    assert float(share) == pytest.approx(0.3)
    assert torch.equal(weight_edits(edit, replay, 0.0), edit)
    assert torch.equal(weight_edits(edit, torch.zeros(5, 64, 64), 0.5), edit)
    # masked cross-entropy follows the weights: all-wrong edits now move the loss by half
    from src_models.losses import masked_cross_entropy
    logits = torch.zeros(8, 3, 64, 64)
    logits[:, 0] = 10.0                               # predicts background everywhere
    labels = torch.zeros(8, 64, 64, dtype=torch.long)
    labels[:3, 20:30, 20:30] = 1                      # the edits are interior
    plain = masked_cross_entropy(logits, labels, torch.cat([edit, replay]))
    balanced = masked_cross_entropy(logits, labels, torch.cat([weighted, replay]))
    assert float(plain) < 0.2 < 4.0 < float(balanced)
    with pytest.raises(ValueError, match="edit_share"):
        FinetuneSettings(edit_share=1.0)


def test_weights_that_forget_the_original_domain_are_never_kept(tmp_path, monkeypatch):
    """Scripted evaluations: step 2 wins the held-out edits but its replay loss rose 50 % (over the
    10 % tolerance), step 4 is a little worse on the edits and within tolerance: step 4 is kept,
    and its weights (not the last ones, not step 2's) are the ones written."""
    image, truth = nuclei((256, 256), n=40)
    parent = parent_weights(tmp_path, base_width=8)
    model = truth.copy()
    for k in range(1, 13):
        model[truth == k] = 0
    scripted = {"heldout": iter([1.0, 0.5, 0.7, 0.6]), "replay": iter([1.0, 1.5, 1.05, 2.0])}
    snapshots = {}

    def fake_loss(self, items):
        if items is self.probe:
            snapshots[self.step] = next(iter(self.model.state_dict().values())).clone()
            return next(scripted["replay"])
        if items is self.data.holdout:
            return next(scripted["heldout"])
        return 1.0                                  # edit_loss before/after: not scored here

    monkeypatch.setattr(finetune_loop.FinetuneLoop, "_masked_ce", fake_loss)
    settings = dataclasses.replace(SMALL, steps=6, eval_every=2, patience=10, lr=3e-3,
                                   holdout_fraction=0.3, forgetting_tolerance=0.1)
    result = drain(finetune_job(parent, image, truth, model, settings=settings))
    ft = result.card["finetune"]
    assert [s for s, _ in ft["replay_curve"]] == [0, 2, 4, 6]
    assert ft["heldout_loss"]["best_step"] == 4 and ft["heldout_loss"]["best"] == 0.7
    from src_models import load_weights
    child, _ = load_weights(result.path, "cpu")
    kept = next(iter(child.state_dict().values()))
    assert torch.allclose(kept.float(), snapshots[4].float(), atol=1e-3)
    assert not torch.allclose(snapshots[4].float(), snapshots[6].float(), atol=1e-3)


def test_anchor_pulls_the_weights_back_towards_the_parent(tmp_path):
    """``anchor`` (L2-SP, decoupled): at lr × anchor = 1 every step returns each trained weight to
    the parent's; at 0 the weights move; in between they move less than without it."""
    from src_models import load_weights

    image, truth = nuclei()
    parent = parent_weights(tmp_path, base_width=4)
    start = load_weights(parent)[0].state_dict()

    def drift(anchor):
        settings = dataclasses.replace(SMALL, steps=4, lr=3e-3, warmup_steps=0, min_lr_ratio=1.0,
                                       anchor=anchor, forgetting_tolerance=None,
                                       holdout_fraction=0.0)   # the last weights are written
        result = drain(finetune_job(parent, image, truth, edited(truth), settings=settings))
        after = load_weights(result.path)[0]
        return max(float((p.detach() - start[name]).abs().max())
                   for name, p in after.named_parameters())

    free, pulled, returned = drift(0.0), drift(100.0), drift(1 / 3e-3)
    assert free > 1e-3
    assert returned < 1e-6
    assert pulled < free
    with pytest.raises(ValueError, match="anchor"):
        FinetuneSettings(anchor=-1.0)
