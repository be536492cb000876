"""PraNet-V2 (DSRA): shapes, parameter counts, reverse-gain mechanism, background maps, loss masks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from src_models import create_model
from src_models.losses import one_hot
from src_models.pranet_v2 import DSRA, fg_bg_disagreement
from src_models.pranet_v2_loss import PraNetV2Loss, background_target
from src_models.res2net import Res2NetEncoder


def _lite(**overrides):
    torch.manual_seed(0)
    return create_model("pranet_v2", "lite", **overrides)


def _fake_outputs(b=2, k=3, h=32, w=32, seed=0):
    """Leaf fg/bg logits standing in for a forward dict, so gradients can be inspected."""
    g = torch.Generator().manual_seed(seed)
    fg = [torch.randn(b, k, h, w, generator=g, requires_grad=True) for _ in range(4)]
    bg = [torch.randn(b, k, h, w, generator=g, requires_grad=True) for _ in range(4)]
    return {"fg": fg, "bg": bg, "logits": sum(fg)}


# ----------------------------------------------------------------------------- shapes and contract
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("num_classes", [1, 3])
def test_forward_shapes_train_and_eval(in_channels, num_classes):
    model = _lite(in_channels=in_channels, num_classes=num_classes)
    x = torch.randn(2, in_channels, 64, 64)
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            out = model(x)
        assert out["logits"].shape == (2, num_classes, 64, 64)
        assert len(out["fg"]) == len(out["bg"]) == 4
        for r in out["fg"] + out["bg"]:
            assert r.shape == (2, num_classes, 64, 64)  # all stages at input resolution
        torch.testing.assert_close(out["logits"], sum(out["fg"]))


def test_size_not_multiple_raises_but_predict_pads():
    model = _lite()
    x = torch.randn(1, 3, 50, 70)
    with pytest.raises(ValueError, match="pad to 64x96"):
        model(x)
    maps = model.predict(x)
    specs = model.map_specs()
    assert set(maps) == {s.name for s in specs}
    for spec in specs:
        assert maps[spec.name].shape == (1, spec.channels, 50, 70)
        low, high = spec.value_range
        assert maps[spec.name].min() >= low and maps[spec.name].max() <= high
    torch.testing.assert_close(maps["probs"].sum(1), torch.ones(1, 50, 70))


def test_predict_maps_match_definitions():
    model = _lite(num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    maps = model.predict(x)
    with torch.no_grad():
        out = model(x)
    for i in range(4):
        bg = maps[f"background_stage{i + 1}"]
        torch.testing.assert_close(bg, torch.sigmoid(out["bg"][i]))
        assert bg.min() >= 0 and bg.max() <= 1
    torch.testing.assert_close(maps["probs"], torch.softmax(out["logits"], 1))
    expected = fg_bg_disagreement(maps["probs"], maps["background_stage1"])
    torch.testing.assert_close(maps["disagreement"], expected)


@pytest.mark.parametrize("preset,size", [("lite", 64), ("paper", 64)])
def test_training_step_finite(preset, size):
    torch.manual_seed(0)
    model = create_model("pranet_v2", preset).train()
    x = torch.randn(2, 3, size, size)
    targets = {"labels": torch.randint(0, 3, (2, size, size)), "image": x}
    out = model(x)
    result = model.make_loss()(out, targets)
    assert torch.isfinite(result["loss"])
    torch.testing.assert_close(result["loss"], result["ce"] + result["dice"] + result["background_bce"])
    result["loss"].backward()
    assert model.encoder.stem[0].weight.grad.abs().sum() > 0
    assert model.dsra1.head_bg[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("binary_loss", ["structure", "generic"])
@pytest.mark.parametrize("supervision", ["deep", "mutation"])
def test_binary_training_step_finite(binary_loss, supervision):
    model = _lite(in_channels=1, num_classes=1, binary_loss=binary_loss, supervision=supervision)
    x = torch.randn(2, 1, 64, 64)
    result = model.make_loss()(model(x), {"labels": torch.randint(0, 2, (2, 64, 64)), "image": x})
    assert torch.isfinite(result["loss"])
    result["loss"].backward()


# ----------------------------------------------------------------------------- parameter counts
def test_paper_parameter_count_exact():
    model = create_model("pranet_v2", "paper", in_channels=3, num_classes=1)
    assert model.num_parameters() == 30_499_830  # MODELS.md §7.3 (no ImageNet fc)
    assert sum(p.numel() for p in Res2NetEncoder().parameters()) == 23_669_352


def test_lite_parameter_count():
    assert 1_000_000 <= _lite().num_parameters() <= 4_000_000


# ----------------------------------------------------------------------------- DSRA mechanism
def test_softmax_gain_degenerates_for_one_class():
    torch.manual_seed(0)
    dsra = DSRA(16, 8, 2, 3, 3, num_classes=1, gain="softmax").eval()
    feature = torch.randn(2, 16, 8, 8)
    prev_fg, prev_bg = torch.randn(2, 1, 4, 4) * 5, torch.randn(2, 1, 4, 4) * 5
    gamma = dsra.reverse_gain(prev_fg, prev_bg, (8, 8))
    torch.testing.assert_close(gamma, torch.ones_like(gamma))  # softmax over one channel ≡ 1
    with torch.no_grad():
        r_fg, r_bg = dsra(feature, prev_fg, prev_bg)
        p_fg, p_bg = dsra.heads(feature)
    torch.testing.assert_close(r_fg, 2 * p_fg)  # R^F = 2 P^F: the deeper stage has no effect
    torch.testing.assert_close(r_bg, p_bg)


def test_sigmoid_gain_restores_cascade_for_one_class():
    torch.manual_seed(0)
    dsra = DSRA(16, 8, 2, 3, 3, num_classes=1, gain="sigmoid").eval()
    prev_fg, prev_bg = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    gamma = dsra.reverse_gain(prev_fg, prev_bg, (8, 8))
    expected = torch.sigmoid(F.interpolate(prev_fg - prev_bg, size=(8, 8), mode="bilinear"))
    torch.testing.assert_close(gamma, expected)
    assert gamma.std() > 0


def test_softmax_gain_sums_to_one_over_classes():
    torch.manual_seed(0)
    dsra = DSRA(16, 8, 3, 5, 1, num_classes=4, gain="softmax").eval()
    feature = torch.randn(2, 16, 4, 4)
    prev_fg, prev_bg = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    gamma = dsra.reverse_gain(prev_fg, prev_bg, (4, 4))  # down-sampling, as R4 → DSRA3
    assert gamma.shape == (2, 4, 4, 4)
    torch.testing.assert_close(gamma.sum(1), torch.ones(2, 4, 4))
    with torch.no_grad():
        r_fg, _ = dsra(feature, prev_fg, prev_bg)
        p_fg, _ = dsra.heads(feature)
    torch.testing.assert_close(r_fg, p_fg * (1 + gamma))  # Eq. 1


def test_background_target_includes_class_zero():
    labels = torch.tensor([[[0, 1], [2, 0]]])
    target = background_target(labels, 3)
    torch.testing.assert_close(target, 1 - one_hot(labels, 3))
    assert target[0, 0, 0, 0] == 0 and target[0, 0, 0, 1] == 1  # class 0 has a background too
    torch.testing.assert_close(target.sum(1), torch.full((1, 2, 2), 2.0))
    torch.testing.assert_close(background_target(labels.clamp(max=1), 1)[:, 0],
                               1 - labels.clamp(max=1).float())


def test_disagreement_zero_when_heads_agree():
    probs = torch.softmax(torch.randn(2, 3, 8, 8), 1)
    agree = fg_bg_disagreement(probs, 1 - probs)  # background heads say "not c" = 1 − p_c
    torch.testing.assert_close(agree, torch.zeros(2, 1, 8, 8))
    one_hot_p = torch.zeros(1, 3, 1, 1)
    one_hot_p[0, 1] = 1
    opposite = fg_bg_disagreement(one_hot_p, one_hot_p)  # bg head claims the predicted class absent
    torch.testing.assert_close(opposite, torch.ones(1, 1, 1, 1))
    p1 = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(fg_bg_disagreement(p1, 1 - p1), torch.zeros(2, 1, 8, 8))


# ----------------------------------------------------------------------------- losses
def _reference_structure_loss(pred, pred_bg, mask):
    """The authors' binary structure_loss (MyTrain_med.py), re-derived for comparison."""
    weit = 1 + 5 * torch.abs(F.avg_pool2d(mask, 31, 1, 15) - mask)
    wbce = (weit * F.binary_cross_entropy_with_logits(pred, mask, reduction="none")).sum((2, 3))
    wbce2 = (weit * F.binary_cross_entropy_with_logits(pred_bg, 1 - mask, reduction="none")).sum((2, 3))
    wbce, wbce2 = wbce / weit.sum((2, 3)), wbce2 / weit.sum((2, 3))
    p = torch.sigmoid(pred)
    inter, union = (p * mask * weit).sum((2, 3)), ((p + mask) * weit).sum((2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wbce + wiou + 0.8 * wbce2).mean()


def test_structure_loss_matches_reference():
    out = _fake_outputs(k=1)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, 8:20, 10:24] = 1
    result = PraNetV2Loss(1)(out, {"labels": labels})
    mask = labels.float()[:, None]
    expected = sum(_reference_structure_loss(f, b, mask) for f, b in zip(out["fg"], out["bg"]))
    torch.testing.assert_close(result["loss"], expected)
    ones = PraNetV2Loss(1)(out, {"labels": labels, "valid": torch.ones(2, 32, 32)})
    torch.testing.assert_close(ones["loss"], expected)


def test_mutation_supervises_fifteen_summed_subsets():
    out = _fake_outputs()
    sets = PraNetV2Loss(3, supervision="mutation").output_sets(out)
    assert len(sets) == 15
    torch.testing.assert_close(sets[-1][0], sum(out["fg"]))
    assert len(PraNetV2Loss(3).output_sets(out)) == 4


LOSS_CASES = [(3, "deep", "structure"), (3, "mutation", "structure"),
              (1, "deep", "structure"), (1, "deep", "generic"), (1, "mutation", "structure")]


@pytest.mark.parametrize("k,supervision,binary_loss", LOSS_CASES)
def test_loss_with_no_valid_pixels_is_zero_without_gradient(k, supervision, binary_loss):
    out = _fake_outputs(k=k)
    loss = PraNetV2Loss(k, supervision=supervision, binary_loss=binary_loss)
    labels = torch.randint(0, max(k, 2), (2, 32, 32))
    result = loss(out, {"labels": labels, "valid": torch.zeros(2, 32, 32)})
    assert result["loss"].item() == pytest.approx(0.0, abs=1e-7)
    result["loss"].backward()
    for t in out["fg"] + out["bg"]:
        assert t.grad is None or t.grad.abs().max() == 0


@pytest.mark.parametrize("k,supervision,binary_loss", LOSS_CASES)
def test_loss_ignores_labels_outside_valid(k, supervision, binary_loss):
    torch.manual_seed(0)
    out = _fake_outputs(k=k)
    loss = PraNetV2Loss(k, supervision=supervision, binary_loss=binary_loss)
    valid = torch.zeros(2, 32, 32)
    valid[:, 4:20, 6:26] = 1
    labels = torch.randint(0, max(k, 2), (2, 32, 32))
    changed = torch.where(valid > 0, labels, torch.randint(0, max(k, 2), (2, 32, 32)))
    a = loss(out, {"labels": labels, "valid": valid})["loss"]
    b = loss(out, {"labels": changed, "valid": valid})["loss"]
    assert a > 0
    torch.testing.assert_close(a, b)


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="gain"):
        _lite(gain="relu")
    with pytest.raises(ValueError, match="supervision"):
        _lite(supervision="all")
