"""Test-time augmentation: views are mapped back exactly, the engine averages them, cards choose them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from standin_models import TinyEquivariantNet, make

from napari_medseg.core.decode_tuning import write_decode_to_card
from napari_medseg.core.inference import InferenceSettings, prepare_run, segment
from napari_medseg.core.inference_plan import resolve_tta
from napari_medseg.core.normalize import Normalization, apply_range, to_model_channels
from napari_medseg.core.progress import drain
from napari_medseg.core.store import OutputStore, OutputStoreError
from napari_medseg.core.test_time import dihedral_views, predict_views

RNG = np.random.default_rng(3)
IMAGE = RNG.integers(0, 255, (96, 128, 3)).astype(np.uint8)
EXACT = dict(probs_dtype="float32", maps_dtype="float32", skip_threshold=0.0, chunk=32,
             superblock=64, device="cpu")


class Pointwise:
    """A per-pixel model: every view, mapped back, gives exactly the original prediction."""

    def predict(self, x, mc_samples=0):
        return {"probs": torch.sigmoid(x * 3.0 - 1.0), "other": x[:, :1] ** 2}


class Positional:
    """A model that sees where it is (adds a ramp along x): views disagree, so the mean is checkable."""

    def predict(self, x, mc_samples=0):
        ramp = torch.arange(x.shape[-1], dtype=x.dtype) / 10.0
        return {"probs": x + ramp}


def _numpy_views(x: np.ndarray, views: int) -> np.ndarray:
    """The same average written independently with numpy (flip after swapping axes; undo in reverse)."""
    total = np.zeros_like(x)
    for flips, transpose in dihedral_views(views):
        view = np.swapaxes(x, -1, -2) if transpose else x
        view = np.flip(view, flips) if flips else view
        out = view + np.arange(view.shape[-1], dtype=x.dtype) / 10.0
        out = np.flip(out, flips) if flips else out
        total += np.swapaxes(out, -1, -2) if transpose else out
    return total / views


def test_views_are_the_dihedral_group_and_bad_counts_are_refused():
    views = dihedral_views(8)
    assert len(set(views)) == 8 and views[0] == ((), False)
    assert dihedral_views(2) == [((), False), ((-1,), False)]
    with pytest.raises(ValueError, match="1 \\(off\\), 2, 4 or 8"):
        dihedral_views(3)
    with pytest.raises(ValueError, match="1 \\(off\\), 2, 4 or 8"):
        InferenceSettings(tta=6)


@pytest.mark.parametrize("views", [2, 4, 8])
def test_each_view_is_mapped_back_to_the_input_orientation(views):
    x = torch.from_numpy(RNG.normal(size=(2, 3, 5, 7)).astype(np.float32))   # not square: transposes too
    expected = Pointwise().predict(x)
    got = predict_views(Pointwise(), x, views=views)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].shape == expected[name].shape
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("views", [1, 2, 4, 8])
def test_predictions_of_the_views_are_averaged(views):
    x = RNG.normal(size=(1, 2, 6, 9)).astype(np.float32)
    got = predict_views(Positional(), torch.from_numpy(x), views=views)["probs"].numpy()
    np.testing.assert_allclose(got, _numpy_views(x, views), atol=1e-6)
    if views > 1:   # the positional model's views really differ, so averaging changed something
        assert np.abs(got - Positional().predict(torch.from_numpy(x))["probs"].numpy()).max() > 0.1


class Sampling:
    """Counts its passes; with samples it also returns a map only sampling gives."""

    def __init__(self):
        self.calls = []

    def predict(self, x, mc_samples=0):
        self.calls.append(mc_samples)
        maps = {"probs": torch.sigmoid(x)}
        if mc_samples:
            maps["variance"] = x.abs() + 0.5
        return maps


def test_monte_carlo_sampling_runs_on_the_original_view_only():
    x = torch.from_numpy(RNG.normal(size=(1, 1, 4, 6)).astype(np.float32))
    model = Sampling()
    got = predict_views(model, x, mc_samples=8, views=8)
    assert model.calls == [8, 0, 0, 0, 0, 0, 0, 0]       # 8 + 7 passes, not 8 × 8
    torch.testing.assert_close(got["variance"], x.abs() + 0.5)   # the original view's own map
    torch.testing.assert_close(got["probs"], torch.sigmoid(x), rtol=0, atol=1e-6)


def test_engine_averages_views_per_tile_and_records_them(tmp_path):
    model = make(TinyEquivariantNet)
    card = {"architecture": model.name, "normalization": {"method": "fixed", "low": 0, "high": 255}}
    result = drain(segment(IMAGE, model, card, tmp_path / "tta.zarr", InferenceSettings(tile=32, tta=8, **EXACT)))
    assert result.status == "complete"
    store = OutputStore.open(tmp_path / "tta.zarr", mode="r")
    assert store.attrs["run"]["tta"] == 8
    x = apply_range(to_model_channels(np.transpose(IMAGE, (2, 0, 1)), 3), Normalization(0.0, 255.0))
    with torch.no_grad():
        whole = predict_views(model, torch.from_numpy(x)[None], views=8)
    for name in ("probs", "edge_entropy"):
        np.testing.assert_allclose(store.read_map(name), whole[name][0].numpy(), atol=1e-4)
    plain = drain(segment(IMAGE, model, card, tmp_path / "plain.zarr", InferenceSettings(tile=32, **EXACT)))
    assert plain.status == "complete"
    plain_store = OutputStore.open(tmp_path / "plain.zarr", mode="r")
    assert "tta" not in plain_store.attrs["run"]     # stores made before test-time views still resume
    assert np.abs(plain_store.read_map("probs") - store.read_map("probs")).max() > 1e-3


def test_card_sets_the_default_and_a_run_resumes_only_with_the_same_views(tmp_path):
    model = make(TinyEquivariantNet)
    card = {"architecture": model.name, "inference": {"tta": 4}}
    assert resolve_tta(card, None) == 4 and resolve_tta(card, 1) == 1 and resolve_tta({}, None) == 1
    with pytest.raises(ValueError, match="inference.tta"):
        resolve_tta({"inference": {"tta": 3}}, None)
    plan = prepare_run(IMAGE, model, card, tmp_path / "o.zarr", InferenceSettings(tile=32, **EXACT)).plan
    assert plan.tta == 4
    job = segment(IMAGE, model, card, tmp_path / "o.zarr", InferenceSettings(tile=32, **EXACT))
    next(record for record in job if record.region is not None)   # one block written
    job.close()   # an interrupted run with 4 views...
    with pytest.raises(OutputStoreError):   # ...is not continued with one view
        drain(segment(IMAGE, model, card, tmp_path / "o.zarr", InferenceSettings(tile=32, tta=1, **EXACT)))
    done = drain(segment(IMAGE, model, card, tmp_path / "o.zarr", InferenceSettings(tile=32, **EXACT)))
    assert done.status == "complete" and done.blocks_resumed >= 1


def test_tuned_thresholds_make_their_views_the_card_default(tmp_path):
    from src_models import read_card
    from src_models.weights_io import save_weights

    model = make(TinyEquivariantNet)
    stem = tmp_path / "w"
    save_weights(model, stem, {"architecture": model.name, "task": "instances"})
    result = {"settings": {"seed_threshold": 0.95, "foreground_threshold": 0.6, "min_area": 16},
              "before": {"f1": 0.5}, "after": {"f1": 0.6}, "n_images": 3, "grid": {}, "tta": 8}
    write_decode_to_card(stem, result)
    card = read_card(stem)
    assert card["decode"]["seed_threshold"] == 0.95 and card["inference"] == {"tta": 8}
    assert card["metrics"]["decode_tuning"]["tta"] == 8 and resolve_tta(card, None) == 8
