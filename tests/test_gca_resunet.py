"""Tests of GCA-ResUNet (src_models/gca_resunet.py, src_models/resnet_gca.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from src_models import create_model
from src_models.gca_resunet import GCAResUNetConfig
from src_models.resnet_gca import GroupedCoordinateAttention


def _lite(**overrides):
    torch.manual_seed(0)
    return create_model("gca_resunet", preset="lite", **overrides)


def _gca_count(model: nn.Module) -> int:
    return sum(isinstance(m, GroupedCoordinateAttention) for m in model.modules())


# ----------------------------------------------------------------------------- shapes / contract
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("num_classes", [1, 3])
def test_forward_shapes_train_and_eval(in_channels, num_classes):
    model = _lite(in_channels=in_channels, num_classes=num_classes)
    x = torch.randn(2, in_channels, 64, 96)
    model.train()
    assert model(x)["logits"].shape == (2, num_classes, 64, 96)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert set(out) == {"logits"} and out["logits"].shape == (2, num_classes, 64, 96)


def test_size_not_multiple_of_32_raises_but_predict_pads():
    model = _lite()
    x = torch.randn(1, 3, 70, 50)
    with pytest.raises(ValueError, match="pad to 96x64"):
        model(x)
    maps = model.predict(x)
    assert set(maps) == {"probs"}
    assert maps["probs"].shape == (1, 3, 70, 50)
    assert torch.allclose(maps["probs"].sum(1), torch.ones(1, 70, 50), atol=1e-5)


def test_class_attributes():
    cls = type(_lite())
    assert cls.aux_kinds == () and cls.translation_equivariant is False and cls.size_multiple == 32
    with pytest.raises(ValueError, match="gca_blocks"):
        GCAResUNetConfig(gca_blocks="some")
    with pytest.raises(ValueError, match="init"):
        GCAResUNetConfig(init="xavier")


# ----------------------------------------------------------------------------- parameter counts
def test_paper_parameter_counts():
    # MODELS.md §8 with in_channels=3, num_classes=9. The baseline equals the paper's 43.93 M
    # (bubbliiiing Unet-ResNet50). With GCA in all 16 bottlenecks we get 48,982,089, NOT the paper's
    # 44.98 M: the paper is inconsistent with itself (§5.8) — its +1.05 M is exactly ONE GCA module
    # at C = 2048 (1,051,136, tested below) while its +0.23 GMACs is GCA in all 16 blocks. We
    # implement all 16 as the text says.
    torch.manual_seed(0)
    baseline = create_model("gca_resunet", "paper", num_classes=9, gca_blocks="none")
    assert baseline.num_parameters() == 43_933_321
    assert _gca_count(baseline) == 0
    full = create_model("gca_resunet", "paper", num_classes=9)
    assert full.num_parameters() == 48_982_089
    assert _gca_count(full) == 16


def test_single_gca_module_parameter_count():
    assert sum(p.numel() for p in GroupedCoordinateAttention(2048).parameters()) == 1_051_136
    unshared = GroupedCoordinateAttention(2048, share_groups=False)
    assert sum(p.numel() for p in unshared.parameters()) == 2 * 1_051_136


def test_lite_parameter_count():
    assert 1_000_000 <= _lite().num_parameters() <= 4_000_000


# ----------------------------------------------------------------------------- GCA mechanism
def _make_attention_one(gca: GroupedCoordinateAttention) -> None:
    """Zero the second conv's weights and give it a large bias: sigmoid(30) = 1 − 1e-13."""
    with torch.no_grad():
        gca.expand.weight.zero_()
        gca.expand.bias.fill_(30.0)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("share_groups", [True, False])
def test_gca_with_unit_attention_is_identity(groups, share_groups):
    torch.manual_seed(0)
    gca = GroupedCoordinateAttention(16, groups=groups, share_groups=share_groups)
    _make_attention_one(gca)
    x = torch.randn(2, 16, 12, 20)
    assert torch.allclose(gca(x), x, atol=1e-6)


@pytest.mark.parametrize("pooling", ["avg+max", "avg", "max"])
@pytest.mark.parametrize("shape", [(2, 16, 8, 8), (1, 32, 5, 11)])
def test_gca_output_shape_equals_input(pooling, shape):
    gca = GroupedCoordinateAttention(shape[1], pooling=pooling)
    x = torch.randn(*shape)
    a_h, a_w = gca.attention(x)
    assert a_h.shape == (shape[0], shape[1], shape[2], 1)
    assert a_w.shape == (shape[0], shape[1], 1, shape[3])
    assert gca(x).shape == x.shape


def test_gca_groups_share_weights():
    torch.manual_seed(0)
    gca = GroupedCoordinateAttention(16, groups=2).eval()  # eval: BN statistics fixed
    with torch.no_grad():
        gca.bn.running_mean.normal_()
        gca.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 16, 6, 9)
    y = gca(x)
    # Changing group 1 leaves group 0's output untouched (groups attend independently)...
    x2 = x.clone()
    x2[:, 8:] = torch.randn(2, 8, 6, 9)
    assert torch.equal(gca(x2)[:, :8], y[:, :8])
    assert not torch.allclose(gca(x2)[:, 8:], y[:, 8:])
    # ...and one set of weights serves both: swapping the groups swaps the outputs.
    swapped = torch.cat([x[:, 8:], x[:, :8]], dim=1)
    assert torch.allclose(gca(swapped), torch.cat([y[:, 8:], y[:, :8]], dim=1), atol=1e-6)


def test_gca_unshared_groups_use_different_weights():
    torch.manual_seed(0)
    gca = GroupedCoordinateAttention(16, groups=2, share_groups=False).eval()
    x = torch.randn(2, 16, 6, 9)
    y = gca(x)
    swapped = torch.cat([x[:, 8:], x[:, :8]], dim=1)
    assert not torch.allclose(gca(swapped), torch.cat([y[:, 8:], y[:, :8]], dim=1), atol=1e-4)


def test_gca_sits_before_the_residual_sum():
    torch.manual_seed(0)
    model = _lite().eval()
    block = model.encoder.stages[1][1]  # identity shortcut
    x = torch.randn(1, block.conv1.in_channels, 16, 16)
    with torch.no_grad():
        branch = block.bn3(block.conv3(block.relu(block.bn2(block.conv2(
            block.relu(block.bn1(block.conv1(x))))))))
        expected = torch.relu(block.gca(branch) + x)
        assert torch.allclose(block(x), expected, atol=1e-6)


# ----------------------------------------------------------------------------- training / loss
@pytest.mark.parametrize("preset,size", [("lite", 64), ("paper", 32)])
def test_training_step_finite(preset, size):
    torch.manual_seed(0)
    model = create_model("gca_resunet", preset)
    model.train()
    x = torch.randn(2, 3, size, size)
    targets = {"labels": torch.randint(0, 3, (2, size, size)), "image": x}
    out = model.make_loss()(model(x), targets)
    assert set(out) == {"loss", "ce", "dice"}
    assert torch.isfinite(out["loss"])
    assert torch.allclose(out["loss"], out["ce"] + out["dice"])
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.encoder.stages[3][2].gca.reduce.weight.grad.abs().sum() > 0


def test_dice_is_bubbliiiing_batch_f1():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    labels = torch.randint(0, 3, (2, 8, 8))
    loss = _lite().make_loss()({"logits": logits}, {"labels": labels, "image": None})
    probs = torch.softmax(logits, 1).permute(0, 2, 3, 1).reshape(-1, 3)
    target = torch.nn.functional.one_hot(labels, 3).reshape(-1, 3).float()
    tp = (probs * target).sum(0)
    fp, fn = probs.sum(0) - tp, target.sum(0) - tp
    dice = 1 - ((2 * tp + 1e-5) / (2 * tp + fn + fp + 1e-5)).mean()
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(loss["dice"], dice, atol=1e-6)
    assert torch.allclose(loss["ce"], ce, atol=1e-6)


@pytest.mark.parametrize("num_classes", [1, 3])
def test_loss_honours_valid_mask(num_classes):
    torch.manual_seed(0)
    loss_fn = _lite(num_classes=num_classes).make_loss()
    logits = torch.randn(2, num_classes, 16, 16, requires_grad=True)
    n_labels = max(num_classes, 2)
    labels = torch.randint(0, n_labels, (2, 16, 16))
    none_valid = {"labels": labels, "image": None, "valid": torch.zeros(2, 16, 16)}
    out = loss_fn({"logits": logits}, none_valid)
    out["loss"].backward()
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.count_nonzero(logits.grad) == 0

    valid = (torch.rand(2, 16, 16) > 0.5).float()
    masked = {"labels": labels, "image": None, "valid": valid}
    reference = loss_fn({"logits": logits}, masked)["loss"]
    relabelled = torch.where(valid == 0, torch.randint(0, n_labels, labels.shape), labels)
    ignored = torch.where(valid == 0, torch.full_like(labels, 255), labels)  # an ignore value
    for changed in (relabelled, ignored):
        out = loss_fn({"logits": logits}, {"labels": changed, "image": None, "valid": valid})
        assert torch.allclose(out["loss"], reference)


def test_gca_conv_macs_at_224_match_paper_overhead():
    # MODELS.md §7.2: GCA conv MACs in all 16 blocks at 3×224×224 = 0.217 G (the paper's +0.23 GMACs
    # includes the strip pooling); feature maps are 112, 56, 28, 14, 7 with the ceil-mode max-pool.
    torch.manual_seed(0)
    encoder = create_model("gca_resunet", "paper", num_classes=9).encoder.eval()
    macs = []

    def count(conv, inputs, output):
        macs.append(output.numel() * conv.in_channels // conv.groups)

    for m in encoder.modules():
        if isinstance(m, GroupedCoordinateAttention):
            m.reduce.register_forward_hook(count)
            m.expand.register_forward_hook(count)
    with torch.no_grad():
        feats = encoder(torch.randn(1, 3, 224, 224))
    assert [f.shape[-1] for f in feats] == [112, 56, 28, 14, 7]
    assert sum(macs) == 216_530_944
