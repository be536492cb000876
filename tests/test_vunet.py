"""V-UNet: shapes, parameter counts, variational attention mechanism, MC uncertainty and loss."""
from __future__ import annotations

import math

import pytest
import torch

from src_models import create_model
from src_models.vunet import VariationalAttention, VUNet, VUNetConfig, VUNetLoss


def _model(preset="lite", **overrides) -> VUNet:
    torch.manual_seed(0)
    return create_model("vunet", preset, **overrides)


def _targets(x: torch.Tensor, num_classes: int, valid=None) -> dict:
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, max(num_classes, 2), (x.shape[0], *x.shape[-2:]), generator=gen)
    targets = {"labels": labels, "image": x}
    if valid is not None:
        targets["valid"] = valid
    return targets


# ----------------------------------------------------------------------------- shapes and contract
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("num_classes", [1, 3])
def test_shapes_eval_and_predict(in_channels, num_classes):
    model = _model(in_channels=in_channels, num_classes=num_classes).eval()
    x = torch.randn(2, in_channels, 64, 48)
    with torch.no_grad():
        out = model(x)
    assert out["logits"].shape == (2, num_classes, 64, 48)
    assert out["mu"].shape == out["logvar"].shape == (2, 4, model.config.latent_side ** 2)
    assert out["attn"].shape == (2, 4, 64, 48)
    for mc in (0, 3):
        maps = model.predict(x, mc_samples=mc)
        specs = model.map_specs(mc)
        assert [s.name for s in specs] == list(maps)
        for spec in specs:
            assert maps[spec.name].shape == (2, spec.channels, 64, 48)
            assert maps[spec.name].dtype == torch.float32


def test_training_dict_contents():
    model = _model("paper", in_channels=1, num_classes=1).train()
    x = torch.randn(2, 1, 64, 64)
    out = model(x)
    assert out["logits"].shape == (2, 1, 64, 64)
    assert len(out["mu"]) == len(out["logvar"]) == len(out["attn"]) == 4
    for k in range(4):
        side = 64 // 2 ** k
        assert out["mu"][k].shape == out["logvar"][k].shape == (2, 81)
        assert out["attn"][k].shape == (2, 1, side, side)
        pred, target = out["recon_pairs"][k]
        assert pred.shape == target.shape == (2, 16 * 2 ** k, side, side)
        assert out["dec_feats"][k].shape == (2, 16 * 2 ** k, side, side)
        assert out["logvar"][k].abs().max() <= 10.0


def test_size_not_multiple_raises_but_predict_pads():
    model = _model(in_channels=1, num_classes=3).eval()
    x = torch.randn(1, 1, 50, 70)
    with pytest.raises(ValueError, match="pad to 64x80"):
        model(x)
    maps = model.predict(x, mc_samples=2)
    assert maps["probs"].shape == (1, 3, 50, 70)
    assert maps["mutual_information"].shape == (1, 1, 50, 70)


@pytest.mark.parametrize("preset,size", [("lite", 64), ("paper", 32)])
def test_train_step_finite(preset, size):
    model = _model(preset).train()
    x = torch.randn(2, 3, size, size)
    losses = model.make_loss()(model(x), _targets(x, 3))
    assert set(losses) == {"loss", "segmentation", "reconstruction", "kl"}
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_parameter_counts():
    assert _model("paper", in_channels=1, num_classes=1).num_parameters() == 6_908_057
    assert _model("paper", in_channels=1, num_classes=1, use_vaem=False).num_parameters() == 1_942_289
    # the paper's textual encoder block (3×3 then 1×1) saves 8·C² per encoder block: −698,368
    textual = _model("paper", in_channels=1, num_classes=1, enc_block="3x3+1x1")
    assert textual.num_parameters() == 6_209_689
    assert 1_000_000 <= _model("lite").num_parameters() <= 4_000_000


def test_config_validation():
    with pytest.raises(ValueError, match="enc_block"):
        VUNetConfig(enc_block="5x5")
    with pytest.raises(ValueError, match="attn_mode"):
        VUNetConfig(attn_mode="additive")


# ----------------------------------------------------------------------------- mechanism
def test_eval_forward_deterministic_and_sample_at_eval():
    x = torch.randn(1, 3, 32, 32)
    model = _model().eval()
    with torch.no_grad():
        assert torch.equal(model(x)["logits"], model(x)["logits"])
    sampling = _model(sample_at_eval=True).eval()
    with torch.no_grad():
        assert not torch.equal(sampling(x)["logits"], sampling(x)["logits"])


def test_sampled_passes_differ_and_mc_mean_differs_from_mu():
    model = _model().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = model.encode(x)
        a, b = (model.decode(feats, sample=True)["logits"] for _ in range(2))
        assert not torch.allclose(a, b)
    assert not torch.allclose(model.predict(x, 4)["probs"], model.predict(x, 0)["probs"])


def test_kl_non_negative_and_zero_at_prior():
    torch.manual_seed(0)
    mu = [torch.randn(4, 81) * 3 for _ in range(4)]
    logvar = [torch.randn(4, 81) * 3 for _ in range(4)]
    assert VUNetLoss.kl_divergence(mu, logvar) >= 0
    zeros = [torch.zeros(4, 81)] * 4
    assert VUNetLoss.kl_divergence(zeros, zeros) == 0
    out = _model().train()(torch.randn(2, 3, 32, 32))
    assert VUNetLoss.kl_divergence(out["mu"], out["logvar"]) >= 0


def test_gradients_reach_latent_heads_through_segmentation_alone():
    model = _model().train()
    x = torch.randn(2, 3, 32, 32)
    loss = VUNetLoss(recon_weight=0.0, kl_weight=0.0)(model(x), _targets(x, 3))["loss"]
    loss.backward()
    for vaem in model.vaems:  # the reparameterisation trick passes gradient to both heads
        assert vaem.fc_mu.weight.grad.abs().sum() > 0
        assert vaem.fc_logvar.weight.grad.abs().sum() > 0


def test_mc_prediction_runs_encoder_once():
    model = _model().eval()
    calls = {"encoder": 0, "head": 0}

    def counter(key):
        return lambda *_: calls.__setitem__(key, calls[key] + 1)

    model.encoder[0].register_forward_hook(counter("encoder"))
    model.head.register_forward_hook(counter("head"))
    model.predict(torch.randn(1, 3, 32, 32), mc_samples=5)
    assert calls == {"encoder": 1, "head": 5}


@pytest.mark.parametrize("num_classes", [1, 3])
def test_uncertainty_maps_are_sane(num_classes):
    model = _model(num_classes=num_classes).eval()
    maps = model.predict(torch.randn(2, 3, 32, 32), mc_samples=6)
    for name in ("entropy", "variance", "mutual_information"):
        assert torch.isfinite(maps[name]).all() and (maps[name] >= 0).all()
    max_entropy = math.log(max(num_classes, 2))
    assert (maps["entropy"] <= max_entropy + 1e-5).all()
    assert (maps["mutual_information"] <= maps["entropy"] + 1e-6).all()
    assert maps["variance"].max() > 0  # the latents do change the prediction
    if num_classes > 1:
        assert torch.allclose(maps["probs"].sum(1), torch.ones(2, 32, 32), atol=1e-5)


def test_map_specs_ranges():
    specs = {s.name: s for s in _model(num_classes=1).map_specs(4)}
    assert specs["entropy"].value_range == pytest.approx((0.0, math.log(2)))
    assert specs["variance"].value_range == (0.0, 0.25)
    specs = {s.name: s for s in _model(num_classes=3).map_specs(0)}
    assert set(specs) == {"probs", "entropy"}
    assert specs["entropy"].value_range == pytest.approx((0.0, math.log(3)))


def test_residual_attention_amplifies_skip():
    torch.manual_seed(0)
    vaem = VariationalAttention(8, latent_side=9, attn_mode="residual").eval()
    skip = torch.rand(2, 8, 16, 16)
    gated, mu, logvar, alpha = vaem(skip, torch.randn(2, 16, 8, 8), sample=False)
    assert alpha.shape == (2, 1, 16, 16) and mu.shape == logvar.shape == (2, 81)
    assert torch.all(gated >= skip) and torch.all(gated <= 2 * skip)


def test_baseline_without_vaem():
    model = _model(use_vaem=False).train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out["mu"] == [] and out["attn"] == []
    losses = model.make_loss()(out, _targets(x, 3))
    assert losses["kl"] == 0 and torch.isfinite(losses["loss"])
    assert model.predict(x, mc_samples=3)["variance"].max() == 0


# ----------------------------------------------------------------------------- loss and valid mask
def test_loss_honours_valid_mask():
    model = _model().train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    loss_fn = model.make_loss()
    none_valid = _targets(x, 3, valid=torch.zeros(2, 32, 32))
    losses = loss_fn(out, none_valid)
    assert losses["segmentation"] == 0
    (grad,) = torch.autograd.grad(losses["loss"], out["logits"], retain_graph=True)
    assert grad.abs().sum() == 0

    valid = torch.zeros(2, 32, 32)
    valid[:, :16] = 1
    targets = _targets(x, 3, valid=valid)
    changed = dict(targets, labels=targets["labels"].clone())
    changed["labels"][:, 16:] = (changed["labels"][:, 16:] + 1) % 3
    assert torch.equal(loss_fn(out, targets)["loss"], loss_fn(out, changed)["loss"])


def test_loss_weights_and_kl_warmup():
    model = _model().train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    loss_fn = model.make_loss()
    full = loss_fn(out, _targets(x, 3))
    assert full["kl"] > 0
    loss_fn.kl_weight_scale = 0.0
    warm = loss_fn(out, _targets(x, 3))
    assert warm["kl"] == 0
    assert torch.allclose(warm["loss"], full["loss"] - full["kl"])
    recon = VUNetLoss.reconstruction(out["recon_pairs"])
    assert torch.allclose(full["reconstruction"], 0.15 * recon)


def test_binary_loss_uses_bce():
    model = _model(num_classes=1).train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    targets = _targets(x, 1)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        out["logits"][:, 0], targets["labels"].float())
    assert torch.allclose(model.make_loss()(out, targets)["segmentation"], 0.74 * expected)


def test_multiclass_loss_uses_weighted_cross_entropy():
    model = _model(num_classes=3).train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    targets = _targets(x, 3)
    weight = torch.tensor([0.2, 1.0, 3.0])
    expected = torch.nn.functional.cross_entropy(out["logits"], targets["labels"], weight=weight,
                                                 reduction="none").mean()
    got = model.make_loss(class_weight=weight)(out, targets)["segmentation"]
    assert torch.allclose(got, 0.74 * expected, atol=1e-6)
