"""The uniform model contract, checked for every registered network (lite presets, tiny inputs)."""
from __future__ import annotations

import json

import pytest
import torch

from src_models import (WeightsError, create_model, list_models, load_weights, model_class,
                        save_weights)

MODELS = list_models()


def test_all_five_registered():
    assert set(MODELS) == {"vunet", "reseg_unet", "pranet_v2", "iau_net", "gca_resunet"}


def test_unknown_model_lists_choices():
    with pytest.raises(KeyError, match="vunet"):
        create_model("unet9000")


@pytest.mark.parametrize("name", MODELS)
def test_class_metadata(name):
    cls = model_class(name)
    assert cls.paper and cls.description and set(cls.presets) == {"paper", "lite"}
    assert set(cls.aux_kinds) <= {"uncertainty", "background", "attention"}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_eval_forward_and_predict_maps(name, in_channels):
    torch.manual_seed(0)
    model = create_model(name, "lite", in_channels=in_channels, num_classes=3).eval()
    x = torch.rand(1, in_channels, 64, 64)
    out = model(x)
    assert out["logits"].shape == (1, 3, 64, 64)
    maps = model.predict(torch.rand(1, in_channels, 50, 70), mc_samples=2)
    specs = model.map_specs(2)
    assert [s.name for s in specs] == list(maps)
    for spec in specs:
        assert maps[spec.name].shape == (1, spec.channels, 50, 70), spec.name
        assert torch.isfinite(maps[spec.name]).all()
        low, high = spec.value_range
        assert maps[spec.name].min() >= low - 1e-5 and maps[spec.name].max() <= high + 1e-4, spec.name
    assert torch.allclose(maps["probs"].sum(1), torch.ones(1, 50, 70), atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_channels_last_inference_gives_the_same_maps(name, monkeypatch):
    """On CPU ``predict`` hands the network an NHWC copy of its input (faster oneDNN kernels) where
    the model allows it; every map equals the NCHW result to float precision, in standard layout."""
    cls = model_class(name)
    torch.manual_seed(0)
    model = create_model(name, "lite", in_channels=3, num_classes=3).eval()
    seen = []
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    hook = first_conv.register_forward_pre_hook(lambda _, args: seen.append(
        args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()))
    x = torch.rand(2, 3, 64, 96)
    maps = {}
    for flag in (True, False):
        monkeypatch.setattr(cls, "channels_last_on_cpu", flag)
        torch.manual_seed(1)                                   # the same latent samples (V-UNet)
        maps[flag] = model.predict(x, mc_samples=2)
    hook.remove()
    assert seen[0] is True and seen[-1] is False
    for key, value in maps[True].items():
        assert value.is_contiguous(), key
        assert torch.allclose(value, maps[False][key], atol=1e-4), key


@pytest.mark.parametrize("name", MODELS)
def test_train_step_finite(name):
    torch.manual_seed(0)
    model = create_model(name, "lite").train()
    loss_fn = model.make_loss()
    x = torch.rand(2, 3, 64, 64)
    targets = {"image": x, "labels": torch.randint(0, 3, (2, 64, 64))}
    terms = loss_fn(model(x), targets)
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", MODELS)
def test_weights_round_trip_bit_exact(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, "lite").eval()
    card = save_weights(model, tmp_path / name, {"classes": ["background", "interior", "boundary"]})
    loaded, loaded_card = load_weights(tmp_path / name)
    assert loaded_card["sha256"] == card["sha256"]
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(model(x)["logits"], loaded(x)["logits"])


def test_truncated_weights_refused(tmp_path):
    model = create_model("reseg_unet", "lite")
    save_weights(model, tmp_path / "w")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="sha256"):
        load_weights(tmp_path / "w")


def test_mismatched_card_refused(tmp_path):
    save_weights(create_model("reseg_unet", "lite"), tmp_path / "w")
    card = json.loads((tmp_path / "w.json").read_text())
    card["config"]["num_classes"] = 5
    (tmp_path / "w.json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="does not fit"):
        load_weights(tmp_path / "w")


def test_weights_for_another_model_refused(tmp_path):
    save_weights(create_model("reseg_unet", "lite"), tmp_path / "w")
    with pytest.raises(WeightsError, match="not 'vunet'"):
        load_weights(tmp_path / "w", expect_architecture="vunet")


def test_half_precision_weights_load_as_float32(tmp_path):
    model = create_model("iau_net", "lite").eval()
    save_weights(model, tmp_path / "w", half=True)
    loaded, card = load_weights(tmp_path / "w")
    assert card["dtype"] == "float16"
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
