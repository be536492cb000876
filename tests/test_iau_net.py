"""IAU-Net: shapes, parameter counts, deformable convolution, attention gate, loss masking."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from src_models import create_model
from src_models.deform_conv import HAS_TORCHVISION, DeformConv2d, deform_conv2d, deform_conv2d_torch
from src_models.iau_net import AttentionGate, IAUNet, IAUNetConfig

LITE_PARAMS = 1_076_265  # widths (8, 16, 32, 96, 192), 3 → 3 classes
PAPER_PARAMS_1_TO_4 = 8_304_122  # base 32, 1 channel in, 4 classes (Sartorius); MODELS.md §4.3 ≈ 8.3 M


def _lite(**overrides) -> IAUNet:
    torch.manual_seed(0)
    return create_model("iau_net", preset="lite", **overrides)


def _targets(b: int, h: int, w: int, k: int, valid=None) -> dict:
    labels = torch.randint(0, max(k, 2), (b, h, w))
    out = {"labels": labels, "image": torch.zeros(b, 3, h, w)}
    if valid is not None:
        out["valid"] = valid
    return out


# ----------------------------------------------------------------------------- model contract
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("num_classes", [1, 3])
def test_forward_shapes(in_channels, num_classes):
    net = _lite(in_channels=in_channels, num_classes=num_classes)
    x = torch.randn(2, in_channels, 64, 48)
    for mode in (net.train, net.eval):
        mode()
        out = net(x)
        assert out["logits"].shape == (2, num_classes, 64, 48)
        assert [tuple(a.shape) for a in out["attn"]] == [(2, 1, 8, 6), (2, 1, 16, 12), (2, 1, 32, 24),
                                                          (2, 1, 64, 48)]
        assert out["offsets"].shape == (2, 18, 64, 48)


def test_bad_size_raises_and_predict_pads():
    net = _lite()
    x = torch.randn(1, 3, 40, 50)
    with pytest.raises(ValueError, match="pad to 48x64"):
        net(x)
    maps = net.predict(x)
    specs = net.map_specs()
    assert set(maps) == {s.name for s in specs}
    for spec in specs:
        assert maps[spec.name].shape == (1, spec.channels, 40, 50)
    assert torch.allclose(maps["probs"].sum(1), torch.ones(1, 40, 50), atol=1e-5)


def test_predict_attention_maps():
    net = _lite()
    x = torch.randn(2, 3, 32, 32)
    maps = net.predict(x)
    for k in range(1, 5):
        alpha = maps[f"attention_gate{k}"]
        assert alpha.shape == (2, 1, 32, 32)
        assert 0.0 < alpha.min() and alpha.max() < 1.0
    net.eval()
    with torch.no_grad():
        raw = net(x)["attn"]
    # gate 1 is the finest (full resolution, unchanged); gate 4 the coarsest (1/8), upsampled.
    assert torch.allclose(maps["attention_gate1"], raw[-1], atol=1e-6)
    assert torch.allclose(maps["attention_gate4"],
                          F.interpolate(raw[0], size=(32, 32), mode="bilinear", align_corners=False))
    kinds = {s.name: s.kind for s in net.map_specs()}
    assert kinds["attention_gate1"] == "attention" and kinds["probs"] == "probability"


@pytest.mark.parametrize("preset,size", [("lite", 64), ("paper", 32)])
def test_training_step_finite(preset, size):
    torch.manual_seed(0)
    net = create_model("iau_net", preset=preset)
    net.train()
    x = torch.randn(2, 3, size, size)
    out = net(x)
    terms = net.make_loss(ce_weight=0.5)(out, _targets(2, size, size, 3))
    assert set(terms) == {"loss", "focal_tversky", "cross_entropy"}
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_parameter_counts():
    paper = create_model("iau_net", preset="paper", in_channels=1, num_classes=4)
    assert paper.num_parameters() == PAPER_PARAMS_1_TO_4
    # MODELS.md §4.3: base 16 ≈ 2.1 M.
    assert IAUNet(IAUNetConfig(in_channels=1, num_classes=4, widths=(16, 32, 64, 128, 256))
                  ).num_parameters() == 2_080_266
    lite = create_model("iau_net", preset="lite")
    assert lite.num_parameters() == LITE_PARAMS
    assert 1_000_000 <= LITE_PARAMS <= 4_000_000


@pytest.mark.parametrize("options", [{"gate": "oktay"}, {"gate_target": "skip"},
                                     {"upsample": "transpose"}, {"downsample": "maxpool"}])
def test_options_run(options):
    net = _lite(**options)
    out = net(torch.randn(1, 3, 32, 32))
    assert out["logits"].shape == (1, 3, 32, 32)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="gate"):
        _lite(gate="softmax")
    with pytest.raises(ValueError, match="widths"):
        _lite(widths=(8, 16, 32))
    with pytest.raises(ValueError, match="unknown loss option"):
        _lite().make_loss(alpha=0.3)


def test_config_round_trip():
    net = _lite()
    rebuilt = IAUNetConfig.from_dict(net.config.to_dict())
    assert rebuilt == net.config


# ----------------------------------------------------------------------------- deformable conv
def _reference_deform_conv(x, offset, weight, bias):
    """Slow per-pixel DCNv1 (torchvision's definition): bilinear, zero outside, 'same' padding."""
    b, c_in, h, w = x.shape
    c_out, _, k, _ = weight.shape
    out = torch.zeros(b, c_out, h, w, dtype=x.dtype)

    def sample(img, y, xx):  # img (C, H, W); zero outside, as torchvision's bilinear_interpolate
        if y <= -1 or y >= h or xx <= -1 or xx >= w:
            return torch.zeros(img.shape[0], dtype=img.dtype)
        y0, x0 = math.floor(y), math.floor(xx)
        value = torch.zeros(img.shape[0], dtype=img.dtype)
        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
            for xq, wx in ((x0, 1 - (xx - x0)), (x0 + 1, xx - x0)):
                if 0 <= yy < h and 0 <= xq < w:
                    value = value + wy * wx * img[:, yy, xq]
        return value

    for n in range(b):
        for i in range(h):
            for j in range(w):
                for ki in range(k):
                    for kj in range(k):
                        p = ki * k + kj
                        dy, dx = offset[n, 2 * p, i, j].item(), offset[n, 2 * p + 1, i, j].item()
                        v = sample(x[n], i - k // 2 + ki + dy, j - k // 2 + kj + dx)
                        out[n, :, i, j] += weight[:, :, ki, kj] @ v
    return out + bias.view(1, -1, 1, 1)


def test_deform_zero_offsets_is_plain_conv():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 4, 9, 7), torch.randn(5, 4, 3, 3), torch.randn(5)
    out = deform_conv2d(x, torch.zeros(2, 18, 9, 7), weight, bias, use_torchvision=False)
    assert torch.allclose(out, F.conv2d(x, weight, bias, padding=1), atol=1e-5)


def test_deform_module_starts_as_plain_conv():
    torch.manual_seed(0)
    layer = DeformConv2d(4, 6, use_torchvision=False)
    assert not layer.offset_conv.weight.any() and not layer.offset_conv.bias.any()
    x = torch.randn(1, 4, 8, 8)
    y, offsets = layer(x)
    assert not offsets.any()
    assert torch.allclose(y, F.conv2d(x, layer.weight, layer.bias, padding=1), atol=1e-5)


def test_deform_random_offsets_match_reference():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(4)
    offset = 1.5 * torch.randn(2, 18, 5, 5)  # many samples fall outside the image
    expected = _reference_deform_conv(x, offset, weight, bias)
    assert torch.allclose(deform_conv2d_torch(x, offset, weight, bias), expected, atol=1e-5)


def test_deform_integer_offsets_shift():
    torch.manual_seed(0)
    x, weight = torch.randn(1, 2, 6, 7), torch.randn(3, 2, 3, 3)
    padded_conv = F.conv2d(F.pad(x, (2, 2, 2, 2)), weight)  # z[a, b] uses x[a + i − 2, b + j − 2]
    for dy, dx in [(1, 0), (0, -1), (-1, 1)]:
        offset = torch.zeros(1, 18, 6, 7)
        offset[:, 0::2], offset[:, 1::2] = float(dy), float(dx)
        out = deform_conv2d_torch(x, offset, weight)
        expected = padded_conv[..., 1 + dy:1 + dy + 6, 1 + dx:1 + dx + 7]
        assert torch.allclose(out, expected, atol=1e-5), (dy, dx)
    far = torch.full((1, 18, 6, 7), 50.0)  # every sample outside the image reads zeros
    assert not deform_conv2d_torch(x, far, weight).any()


def test_deform_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    # Offsets away from integers: bilinear sampling is not differentiable at grid points.
    offset = (torch.rand(1, 18, 3, 3, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    weight = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(deform_conv2d_torch, (x, offset, weight), eps=1e-6, atol=1e-5)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not importable here")
def test_deform_fallback_matches_torchvision():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4)
    offset = 2 * torch.randn(2, 18, 8, 8)
    fast = deform_conv2d(x, offset, weight, bias, use_torchvision=True)
    assert torch.allclose(deform_conv2d_torch(x, offset, weight, bias), fast, atol=1e-4)


def test_gradients_reach_offset_conv_and_lower_lr():
    net = _lite()
    out = net(torch.randn(2, 3, 32, 32))
    assert not out["offsets"].any()  # zero-initialised offset predictor
    net.make_loss()(out, _targets(2, 32, 32, 3))["loss"].backward()
    assert net.deform.offset_conv.weight.grad.abs().sum() > 0
    groups = net.param_groups(1e-3)
    assert groups[1]["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in net.deform.offset_conv.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


# ----------------------------------------------------------------------------- attention gate
def test_gate_is_equation_2():
    torch.manual_seed(0)
    gate = AttentionGate(6, 4, "paper")
    x, g = torch.randn(2, 6, 8, 8), torch.randn(2, 4, 8, 8)
    alpha = gate(x, g)
    expected = torch.sigmoid(F.conv2d(x, gate.w_x.weight) + F.conv2d(g, gate.w_g.weight, gate.w_g.bias))
    assert alpha.shape == (2, 1, 8, 8)
    assert torch.allclose(alpha, expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["paper", "oktay"])
def test_gate_gain_between_one_and_two(kind):
    torch.manual_seed(0)
    gate = AttentionGate(6, 4, kind)
    x, g = 5 * torch.randn(2, 6, 8, 8), 5 * torch.randn(2, 4, 8, 8)
    gain = 1 + gate(x, g)
    assert gain.min() >= 1.0 and gain.max() <= 2.0
    gated = gain * x
    assert (gated.abs() >= x.abs()).all()


def test_decoder_stage_applies_residual_gating():
    net = _lite()
    stage = net.up[-1]  # finest stage: low (B, 16, 16, 16), skip (B, 8, 32, 32)
    captured = {}
    stage.unit.register_forward_hook(lambda mod, inp, out: captured.update(merged=inp[0]))
    low, skip = torch.randn(1, 16, 16, 16), torch.randn(1, 8, 32, 32)
    _, alpha = stage(low, skip)
    x = stage.up(low)
    assert torch.allclose(captured["merged"], torch.cat([(1 + alpha) * x, skip], 1), atol=1e-6)


# ----------------------------------------------------------------------------- loss
@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("ce_weight", [0.0, 1.0])
def test_loss_honours_valid_mask(num_classes, ce_weight):
    torch.manual_seed(0)
    loss = _lite(num_classes=num_classes).make_loss(ce_weight=ce_weight)
    logits = torch.randn(2, num_classes, 16, 16, requires_grad=True)
    targets = _targets(2, 16, 16, num_classes, valid=torch.zeros(2, 16, 16))
    total = loss({"logits": logits}, targets)["loss"]
    total.backward()
    assert total.item() == 0.0
    assert logits.grad is not None and not logits.grad.any()

    valid = torch.zeros(2, 16, 16)
    valid[:, :8] = 1
    targets = _targets(2, 16, 16, num_classes, valid=valid)
    before = loss({"logits": logits}, targets)["loss"]
    changed = dict(targets, labels=targets["labels"].clone())
    changed["labels"][:, 8:] = (changed["labels"][:, 8:] + 1) % max(num_classes, 2)
    assert torch.allclose(before, loss({"logits": logits}, changed)["loss"])


def test_loss_values():
    loss = _lite().make_loss()
    labels = torch.randint(0, 3, (2, 16, 16))
    perfect = 30 * F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    assert loss({"logits": perfect}, {"labels": labels})["loss"].item() < 1e-3
    assert loss({"logits": -perfect}, {"labels": labels})["loss"].item() > 0.9
    # Eq. 1 as printed: w_FN·(1 − TI) with TI over the foreground classes, no exponent.
    logits = torch.randn(2, 3, 16, 16)
    p, y = torch.softmax(logits, 1)[:, 1:], F.one_hot(labels, 3).permute(0, 3, 1, 2)[:, 1:].float()
    tp, fn, fp = (p * y).sum((0, 2, 3)), ((1 - p) * y).sum((0, 2, 3)), (p * (1 - y)).sum((0, 2, 3))
    ti = (tp + 1) / (tp + 0.7 * fn + 0.3 * fp + 1)
    literal = _lite().make_loss(ftl_literal=True)({"logits": logits}, {"labels": labels})["loss"]
    assert torch.allclose(literal, 0.7 * (1 - ti).mean(), atol=1e-6)
    focal = loss({"logits": logits}, {"labels": labels})["loss"]
    assert torch.allclose(focal, ((1 - ti) ** 0.75).mean(), atol=1e-6)
