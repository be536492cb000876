"""U-Net separation weights: the map itself, its path through augmentation, and every model's loss."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_medseg.core.augment import TrainItem, sample_batch
from napari_medseg.core.datasets import Sample
from napari_medseg.core.recipe import Recipe
from napari_medseg.core.targets import instances_to_classes, separation_weights
from napari_medseg.core.training import make_items
from src_models import create_model, list_models
from src_models.losses import masked_cross_entropy, targets_pixel_mask


def _two_touching() -> np.ndarray:
    """Two 6×6 squares with a 2-pixel gap (columns 8, 9) and one far-away square."""
    labels = np.zeros((20, 40), np.int32)
    labels[5:11, 2:8] = 1
    labels[5:11, 10:16] = 2
    labels[5:11, 33:39] = 3
    return labels


def test_separation_weights_match_the_formula_by_hand():
    w = separation_weights(_two_touching(), weight=10.0, sigma=5.0)
    # Gap pixel (7, 8): 1 px from square 1, 2 px from square 2 → 1 + 10·exp(−9/50).
    assert w[7, 8] == pytest.approx(1 + 10 * math.exp(-9 / 50), rel=1e-5)
    # Edge pixel of square 1 facing square 2: d1 = 0, d2 = 3.
    assert w[7, 7] == pytest.approx(1 + 10 * math.exp(-9 / 50), rel=1e-5)
    # Far corner of square 1's interior: d2 = 8 (to column 10) → 1 + 10·exp(−64/50).
    assert w[7, 2] == pytest.approx(1 + 10 * math.exp(-64 / 50), rel=1e-5)
    # Square 3 is 18 px from square 2, more than 3σ: weight exactly 1 on it and beyond.
    assert np.all(w[:, 33:] == 1.0)
    assert w.dtype == np.float32 and w.min() == 1.0


def test_separation_weights_off_or_alone_are_ones():
    labels = _two_touching()
    assert np.all(separation_weights(labels, weight=0.0) == 1.0)
    assert np.all(separation_weights(np.where(labels == 1, 1, 0), weight=10.0) == 1.0)
    assert np.all(separation_weights(np.zeros((8, 8), np.int32)) == 1.0)


def test_batches_carry_the_weights_through_the_same_crop_flip_and_rotation():
    labels = np.kron(np.arange(1, 17, dtype=np.int32).reshape(4, 4), np.ones((24, 24), np.int32))
    classes = torch.from_numpy(instances_to_classes(labels))
    image = torch.rand(3, 96, 96).half()
    # A weight that encodes the class lets the test check alignment after augmentation.
    item = TrainItem(image, classes, None, 1.0, labels, (classes.float() * 3 + 1).half())
    batch = sample_batch([item], 6, 64, np.random.default_rng(1))
    assert batch["pixel_weight"].shape == (6, 64, 64)
    assert torch.equal(batch["pixel_weight"], batch["labels"].float() * 3 + 1)
    plain = TrainItem(image, classes, None, 1.0, labels)
    assert "pixel_weight" not in sample_batch([plain], 2, 64, np.random.default_rng(1))


def test_make_items_adds_weights_only_for_instance_labels_when_asked():
    labels = _two_touching()
    image = np.random.default_rng(0).integers(0, 255, (3, 20, 40), dtype=np.uint8)
    samples = [Sample("a", image, labels, "instances", "histology_color"),
               Sample("b", image, (labels > 0).astype(np.uint8), "semantic", "histology_color")]
    on = make_items(samples, Recipe(separation_weight=10.0))
    assert np.allclose(on[0].pixel_weight.float().numpy(), separation_weights(labels, 10.0, 5.0), rtol=1e-3)
    assert on[1].pixel_weight is None
    assert all(it.pixel_weight is None for it in make_items(samples, Recipe()))


def test_pixel_mask_is_valid_times_weight():
    valid, weight = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[3.0, 5.0]]])
    assert targets_pixel_mask({"valid": valid}) is valid
    assert torch.equal(targets_pixel_mask({"valid": valid, "pixel_weight": weight}), torch.tensor([[[3.0, 0.0]]]))
    assert targets_pixel_mask({"pixel_weight": weight}) is weight
    # A weighted mean: per-pixel CE weighted 3 : 1.
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])   # (1, 2, 1, 2)
    labels = torch.tensor([[[0, 1]]])
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")[0, 0]
    got = masked_cross_entropy(logits, labels, torch.tensor([[[3.0, 1.0]]]))
    assert got == pytest.approx(float((3 * ce[0] + ce[1]) / 4), rel=1e-6)


@pytest.mark.parametrize("name, num_classes", [(n, 3) for n in list_models()] + [("pranet_v2", 1)])
def test_every_models_loss_uses_the_pixel_weights(name, num_classes):
    torch.manual_seed(0)
    model = create_model(name, "lite", num_classes=num_classes).train()
    with torch.no_grad():   # away from the near-uniform logits of a fresh model
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    loss_fn = model.make_loss()
    x = torch.rand(2, 3, 64, 64)
    labels = torch.zeros(2, 64, 64, dtype=torch.int64)
    labels[:, :16] = num_classes // 2 + 1   # the weighted rows hold another class than the rest
    outputs = model(x)
    base = {"image": x, "labels": labels, "valid": torch.ones(2, 64, 64)}
    weight = torch.ones(2, 64, 64)
    weight[:, :16] = 20.0
    with torch.no_grad():
        plain = loss_fn(outputs, base)
        ones = loss_fn(outputs, {**base, "pixel_weight": torch.ones(2, 64, 64)})
        weighted = loss_fn(outputs, {**base, "pixel_weight": weight})
    assert all(float(ones[k]) == pytest.approx(float(plain[k]), rel=1e-5) for k in plain)
    changed = [k for k in plain if abs(float(weighted[k] - plain[k])) > 1e-3 * abs(float(plain[k]))]
    assert changed, {k: (float(plain[k]), float(weighted[k])) for k in plain}
