"""ReSeg-UNet: shapes, parameter counts, the two training stages and the masked loss."""
from __future__ import annotations

import warnings

import pytest
import torch

from src_models import create_model
from src_models.reseg_unet import (
    ReSegUNet,
    alignment_loss,
    make_recon_input,
    segmentation_terms,
)

TINY = {"base_width": 4}  # same topology, fast enough for many small tests


def _targets(batch=2, channels=3, size=32, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, max(classes, 2), (batch, size, size), generator=gen)
    image = torch.randn(batch, channels, size, size, generator=gen)
    return {"labels": labels, "image": image}


def _tiny(**overrides) -> ReSegUNet:
    torch.manual_seed(0)
    return create_model("reseg_unet", "lite", **{**TINY, **overrides})


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("num_classes", [1, 3])
def test_shapes_train_and_eval(in_channels, num_classes):
    net = _tiny(in_channels=in_channels, num_classes=num_classes)
    x = torch.randn(2, in_channels, 64, 48)
    out = net.train()(x)
    assert out["logits"].shape == (2, num_classes, 64, 48)
    b = net.config.base_width
    assert [t.shape[1:] for t in out["enc"]] == [(8 * b, 8, 6), (4 * b, 16, 12), (2 * b, 32, 24)]
    assert [t.shape for t in out["dec"]] == [t.shape for t in out["enc"]]
    assert out["bottleneck"].shape[1:] == (16 * b, 4, 3)
    assert out["mid_code"] is out["dec"][0]
    assert set(net.eval()(x)) == {"logits"}
    probs = net.predict(x)["probs"]
    assert probs.shape == (2, num_classes, 64, 48)
    assert torch.all((probs >= 0) & (probs <= 1))


def test_size_not_multiple_raises_but_predict_pads():
    net = _tiny().eval()
    x = torch.randn(1, 3, 40, 50)
    with pytest.raises(ValueError, match="pad to 48x64"):
        net(x)
    assert net.predict(x)["probs"].shape == (1, 3, 40, 50)


def test_inference_is_plain_unet():
    assert ReSegUNet.aux_kinds == ()
    assert ReSegUNet.translation_equivariant
    assert ReSegUNet.size_multiple == 16
    assert [s.name for s in _tiny().map_specs()] == ["probs"]


def test_parameter_counts():
    assert create_model("reseg_unet", "paper", num_classes=9).num_parameters() == 31_038_153
    assert create_model("reseg_unet", "paper", num_classes=4).num_parameters() == 31_037_828
    lite = create_model("reseg_unet", "lite").num_parameters()
    assert 1_000_000 <= lite <= 4_000_000


def test_paper_preset_trains_at_tiny_input():
    torch.manual_seed(0)
    net = create_model("reseg_unet", "paper").train()
    t = _targets(batch=2, size=16)
    losses = net.make_loss()(net(t["image"]), t)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert net.inc[0].weight.grad is not None


@pytest.mark.parametrize("num_classes", [1, 3])
def test_lite_two_stage_flow(num_classes):
    """The trainer's protocol: stage 1 on the recon net, then the stage-2 loss with it."""
    torch.manual_seed(0)
    net = create_model("reseg_unet", "lite", num_classes=num_classes).train()
    t = _targets(size=32, classes=num_classes)
    stage = net.pretrain_stage()
    assert stage.loss_kwarg == "recon_net" and isinstance(stage.network, ReSegUNet)
    recon_losses = stage.loss(stage.network.train()(stage.make_input(t)), t)
    recon_losses["loss"].backward()
    assert torch.isfinite(recon_losses["loss"])
    loss = net.make_loss(**{stage.loss_kwarg: stage.network})
    losses = loss(net(t["image"]), t)
    losses["loss"].backward()
    assert set(losses) == {"loss", "ce", "dice", "align"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert not any(k.startswith("recon") for k in net.state_dict())


def test_recon_net_frozen_and_unchanged_by_optimizer_step():
    net = _tiny(recon_bn="eval").train()
    recon = net.build_recon_net()
    loss = net.make_loss(recon_net=recon)
    assert all(not p.requires_grad for p in recon.parameters())
    before = {k: v.clone() for k, v in recon.state_dict().items()}
    # A careless trainer optimising everything it can see, with momentum and weight decay.
    opt = torch.optim.SGD(list(net.parameters()) + list(loss.parameters()), lr=0.1,
                          momentum=0.9, weight_decay=1e-2)
    t = _targets()
    seg_before = net.inc[0].weight.clone()
    for _ in range(2):
        opt.zero_grad()
        loss(net(t["image"]), t)["loss"].backward()
        opt.step()
    assert all(p.grad is None for p in recon.parameters())
    for k, v in recon.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(net.inc[0].weight, seg_before)


def test_recon_bn_train_moves_running_stats_only():
    net = _tiny(recon_bn="train").train()
    recon = net.build_recon_net()
    loss = net.make_loss(recon_net=recon)
    params = {k: v.clone() for k, v in recon.named_parameters()}
    mean_before = recon.inc[1].running_mean.clone()
    t = _targets()
    loss(net(t["image"]), t)["loss"].backward()
    assert all(torch.equal(v, params[k]) for k, v in recon.named_parameters())
    assert not torch.equal(recon.inc[1].running_mean, mean_before)  # official behaviour
    loss.eval()
    loss(net(t["image"]), t)
    assert not recon.training  # .eval() on the loss gives a clean validation pass


def test_align_weight_visible_and_mid_options():
    t = _targets()
    for mid, key in (("bottleneck", "bottleneck"), ("first_decoder", "mid_code")):
        net = _tiny(mid=mid, recon_bn="eval").train()
        recon = net.build_recon_net()
        losses = net.make_loss(recon_net=recon)(out := net(t["image"]), t)
        rec = recon.eval().features(make_recon_input(t, net.config))
        pairs = [(out[key], rec[key])]
        for l in range(3):
            pairs += [(out["dec"][l], rec["enc"][l]), (out["enc"][l], rec["dec"][l])]
        assert all(a.shape == b.shape for a, b in pairs)
        expected = sum(torch.mean((a - b) ** 2) for a, b in pairs) / 3
        torch.testing.assert_close(losses["align"], 0.035 * expected)
        torch.testing.assert_close(losses["align"], 0.035 * alignment_loss(out, rec, mid))
        torch.testing.assert_close(losses["loss"],
                                   losses["ce"] + losses["dice"] + losses["align"])


def test_without_recon_net_loss_is_segmentation_only():
    net = _tiny().train()
    t = _targets()
    losses = net.make_loss()(net(t["image"]), t)
    assert set(losses) == {"loss", "ce", "dice"}
    torch.testing.assert_close(losses["loss"], losses["ce"] + losses["dice"])


def test_dice_is_transunet_dice():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    labels = torch.randint(0, 3, (2, 8, 8))
    terms = segmentation_terms(logits, labels, None, ce_weight=0.5, dice_weight=0.5)
    p = torch.softmax(logits, 1)
    dices = []
    for c in range(3):
        y = (labels == c).float()
        inter = (p[:, c] * y).sum()
        dices.append(1 - (2 * inter + 1e-5) / ((p[:, c] ** 2).sum() + (y * y).sum() + 1e-5))
    torch.testing.assert_close(terms["dice"], 0.5 * sum(dices) / 3)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(terms["ce"], 0.5 * ce)


@pytest.mark.parametrize("in_channels,num_classes,recon_output", [
    (1, 3, "classes"),   # official case: 1-channel image broadcast over K outputs
    (3, 1, "classes"),   # RGB image, 1 output: regress the channel mean
    (3, 2, "classes"),
    (3, 3, "image"),
])
def test_stage1_loss_broadcasts_without_warnings(in_channels, num_classes, recon_output):
    net = _tiny(in_channels=in_channels, num_classes=num_classes, recon_output=recon_output)
    stage = net.pretrain_stage()
    t = _targets(channels=in_channels, classes=num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = stage.loss(stage.network.train()(stage.make_input(t)), t)
        losses["loss"].backward()
    recon = stage.network.features(stage.make_input(t))["logits"].detach()
    target = t["image"].mean(1, keepdim=True) if in_channels > num_classes else t["image"]
    if recon_output == "image":
        target = t["image"]
    mse = torch.mean((recon - target.expand_as(recon)) ** 2)
    l1 = torch.mean((recon - target.expand_as(recon)).abs())
    torch.testing.assert_close(losses["mse"], 0.6 * mse, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["l1"], 0.4 * l1, rtol=1e-4, atol=1e-5)


def test_recon_input_modes():
    t = _targets(classes=3)
    idx = make_recon_input(t, _tiny().config)
    assert idx.shape == (2, 3, 32, 32)
    assert torch.equal(idx[:, 2], t["labels"].float())  # raw indices, not normalised
    onehot_net = _tiny(recon_input="onehot", num_classes=1)
    x = make_recon_input(t | {"labels": t["labels"].clamp(max=1)}, onehot_net.config)
    assert x.shape == (2, 2, 32, 32)
    assert onehot_net.build_recon_net().config.in_channels == 2


def test_stage1_training_lowers_reconstruction_loss():
    torch.manual_seed(0)
    net = create_model("reseg_unet", "lite", base_width=8, in_channels=1)
    stage = net.pretrain_stage()
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, 8:20, 6:18], labels[:, 20:28, 16:30] = 1, 2
    t = {"labels": labels, "image": (0.5 * labels.float() - 0.3)[:, None]}
    recon = stage.network.train()
    opt = torch.optim.Adam(recon.parameters(), lr=1e-2)
    history = []
    for _ in range(20):
        opt.zero_grad()
        loss = stage.loss(recon(stage.make_input(t)), t)["loss"]
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0]


def test_valid_mask_all_zero_gives_no_segmentation_gradient():
    net = _tiny().train()
    t = _targets()
    t["valid"] = torch.zeros(2, 32, 32)
    out = net(t["image"])
    out["logits"].retain_grad()
    losses = net.make_loss()(out, t)
    losses["loss"].backward()
    assert losses["loss"].item() == 0.0
    assert torch.count_nonzero(out["logits"].grad) == 0
    stage = net.pretrain_stage()
    assert stage.loss(stage.network(stage.make_input(t)), t)["loss"].item() == 0.0


@pytest.mark.parametrize("num_classes", [1, 3])
def test_labels_outside_valid_do_not_change_loss(num_classes):
    net = _tiny(num_classes=num_classes, recon_bn="eval").train()
    t = _targets(classes=num_classes)
    valid = torch.zeros(2, 32, 32)
    valid[:, :16] = 1
    changed = t["labels"].clone()
    changed[:, 16:] = (changed[:, 16:] + 1) % max(num_classes, 2)
    out = net(t["image"])
    loss = net.make_loss()
    a = loss(out, t | {"valid": valid})
    b = loss(out, t | {"valid": valid, "labels": changed})
    torch.testing.assert_close(a["loss"], b["loss"])
    stage = net.pretrain_stage()
    rec = stage.network.eval()
    r_a = stage.loss(rec(stage.make_input(t)), t | {"valid": valid})
    # Changing the image where valid = 0 leaves the masked reconstruction loss unchanged.
    img = t["image"].clone()
    img[..., 16:, :] += 5
    r_b = stage.loss(rec(stage.make_input(t)), t | {"valid": valid, "image": img})
    torch.testing.assert_close(r_a["loss"], r_b["loss"])


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="mid"):
        create_model("reseg_unet", "lite", mid="middle")
    with pytest.raises(ValueError, match="recon_bn"):
        create_model("reseg_unet", "lite", recon_bn="frozen")
    with pytest.raises(TypeError, match="recon_net"):
        _tiny().make_loss(recon_net=torch.nn.Conv2d(1, 1, 1))
