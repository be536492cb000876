"""Learnt edge distance: the target, its path through augmentation, the loss term, the GCA-ResUNet
head and a warm start that adds the head to weights trained without it."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from napari_medseg.core.augment import TrainItem, sample_batch
from napari_medseg.core.datasets import Sample
from napari_medseg.core.progress import drain
from napari_medseg.core.recipe import Recipe
from napari_medseg.core.resources import resource_path
from napari_medseg.core.targets import instances_to_classes, normalised_distance
from napari_medseg.core.training import make_items, train
from src_models import create_model
from src_models.losses import WithDistanceTerm


def _touching() -> np.ndarray:
    """A 7×5 and a 7×3 rectangle sharing an edge, and a lone 3×3 square."""
    labels = np.zeros((12, 20), np.int32)
    labels[2:9, 1:6] = 1
    labels[2:9, 6:9] = 2
    labels[2:5, 14:17] = 3
    return labels


def test_normalised_distance_by_hand():
    d = normalised_distance(_touching())
    # Rectangle 1: centre column 3 is 3 px from its left/right edges (EDT to the nearest
    # non-member pixel), 4 from top/bottom → peak 3 on rows 4..6; a pixel at the shared edge is 1.
    assert d[5, 3] == pytest.approx(1.0) and d[5, 5] == pytest.approx(1 / 3)
    # Rectangle 2 (3 px wide) peaks at 2 in its middle column, so its edge pixels read 1/2.
    assert d[5, 7] == pytest.approx(1.0) and d[5, 6] == pytest.approx(0.5)
    assert d[3, 15] == pytest.approx(1.0) and d[2, 14] == pytest.approx(0.5)
    assert np.all(d[_touching() == 0] == 0) and d.dtype == np.float32 and d.max() == 1.0
    # The image border is an edge too: a 3×3 nucleus in the corner peaks at 2 px in its middle,
    # and its corner pixel is 1 px from the border.
    cut = np.zeros((6, 6), np.int32)
    cut[:3, :3] = 4
    assert normalised_distance(cut)[1, 1] == 1.0 and normalised_distance(cut)[0, 0] == 0.5


def test_batches_carry_the_distance_through_the_same_crop_flip_and_rotation():
    labels = np.kron(np.arange(1, 17, dtype=np.int32).reshape(4, 4), np.ones((24, 24), np.int32))
    classes = torch.from_numpy(instances_to_classes(labels))
    image = torch.rand(3, 96, 96).half()
    # A distance that encodes the class lets the test check alignment after augmentation.
    item = TrainItem(image, classes, None, 1.0, labels, None, (classes.float() / 4).half())
    batch = sample_batch([item], 6, 64, np.random.default_rng(1))
    assert batch["distance"].shape == (6, 64, 64)
    assert torch.equal(batch["distance"], batch["labels"].float() / 4)
    plain = sample_batch([TrainItem(image, classes, None, 1.0, labels)], 2, 64, np.random.default_rng(1))
    assert "distance" not in plain
    # The distance does not change the random sequence: the same crops as without it.
    assert torch.equal(sample_batch([item], 6, 64, np.random.default_rng(1))["labels"], batch["labels"])


def test_make_items_adds_the_distance_only_for_instance_labels_when_asked():
    labels = _touching()
    image = np.random.default_rng(0).integers(0, 255, (3, 12, 20), dtype=np.uint8)
    samples = [Sample("a", image, labels, "instances", "histology_color"),
               Sample("b", image, (labels > 0).astype(np.uint8), "semantic", "histology_color")]
    on = make_items(samples, Recipe(distance_weight=1.0))
    assert np.allclose(on[0].distance.float().numpy(), normalised_distance(labels), atol=1e-3)
    assert on[1].distance is None
    assert all(it.distance is None for it in make_items(samples, Recipe()))


def test_distance_term_is_the_weighted_masked_mean_squared_error():
    base = lambda outputs, targets: {"loss": torch.tensor(1.0), "ce": torch.tensor(1.0)}  # noqa: E731
    logits = torch.zeros(1, 1, 1, 3)                      # sigmoid → 0.5 everywhere
    targets = {"distance": torch.tensor([[[0.5, 1.0, 0.0]]]), "valid": torch.tensor([[[1.0, 1.0, 0.0]]])}
    terms = WithDistanceTerm(base, weight=4.0)({"distance": logits}, targets)
    # Errors 0 and 0.25 on the two valid pixels (the third is masked out): mean 0.125, × 4.
    assert float(terms["distance"]) == pytest.approx(0.5)
    assert float(terms["loss"]) == pytest.approx(1.5) and float(terms["ce"]) == 1.0


def test_gca_distance_head_shapes_and_maps():
    torch.manual_seed(0)
    plain = create_model("gca_resunet", "lite")
    model = create_model("gca_resunet", "lite", distance_head=True).eval()
    x = torch.rand(1, 3, 64, 64)
    outputs = model(x)
    assert outputs["logits"].shape == (1, 3, 64, 64) and outputs["distance"].shape == (1, 1, 64, 64)
    maps = model.predict(torch.rand(1, 3, 50, 70))
    assert maps["distance"].shape == (1, 1, 50, 70)
    assert float(maps["distance"].min()) >= 0 and float(maps["distance"].max()) <= 1
    assert [s.name for s in model.map_specs()] == ["probs", "distance"]
    assert "distance" not in plain(x) and [s.name for s in plain.map_specs()] == ["probs"]
    assert model.num_parameters() == plain.num_parameters() + model.config.decoder_channels[0] + 1


def test_training_adds_a_head_to_weights_without_one(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in ("fluorescence_small", "histology_he"):
        shutil.copy(resource_path("samples", f"{name}.png"), root / "images" / f"{name}.png")
        shutil.copy(resource_path("samples", f"{name}_labels.tif"), root / "labels" / f"{name}.tif")
    recipe = dict(model="gca_resunet", steps=2, batch=2, crop=64, val_split=0.0, checkpoint_every=2,
                  warmup_steps=1)
    first = drain(train(Recipe.from_dict(recipe), root, tmp_path / "a", device="cpu"))
    assert "distance_head" not in first["config"] or not first["config"]["distance_head"]
    jobs = train(Recipe.from_dict({**recipe, "distance_weight": 2.0}), root, tmp_path / "b",
                 device="cpu", init=tmp_path / "a")
    losses = [p.metrics for p in _steps(jobs)]
    assert all(m["distance"] > 0 for m in losses)
    from src_models import load_weights

    model, card = load_weights(tmp_path / "b", "cpu")
    start, _ = load_weights(tmp_path / "a", "cpu")
    assert card["config"]["distance_head"] and card["training"]["init"]["sha256"] == first["sha256"]
    # The encoder was warm-started: its first layer moved only by two small steps.
    key = next(k for k in start.state_dict() if k.startswith("encoder"))
    assert torch.allclose(model.state_dict()[key], start.state_dict()[key], atol=0.05)
    with pytest.raises(ValueError, match="distance head"):
        drain(train(Recipe.from_dict({**recipe, "model": "iau_net", "distance_weight": 1.0}), root,
                    tmp_path / "c", device="cpu"))


def _steps(job):
    """The Progress items of the ``train`` stage of a job, run to completion."""
    items = []
    try:
        while True:
            item = next(job)
            if item.stage == "train":
                items.append(item)
    except StopIteration:
        return items
