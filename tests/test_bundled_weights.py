"""Bundled weights beyond the DSB2018 starters: found by name, listed in the widget, licence carried."""
from __future__ import annotations

import json
import shutil

import pytest
import zarr
from src_models import list_models, read_card
from src_models.weights_io import file_sha256, weights_paths

from napari_medseg import widget_state
from napari_medseg.cli import main
from napari_medseg.core import resources
from napari_medseg.core.resources import bundled_weights, resolve_weights_name, starter_weights

MONUSEG = "gca_resunet_lite_monuseg2018"


def _copy_weights(src, dst_stem):
    for a, b in zip(weights_paths(src), weights_paths(dst_stem)):
        shutil.copyfile(a, b)


def test_starter_is_the_dsb2018_weights_even_when_another_name_sorts_first(tmp_path, monkeypatch):
    starter = starter_weights("gca_resunet")
    assert starter.name == "gca_resunet_lite_dsb2018"
    _copy_weights(starter, tmp_path / "gca_resunet_lite_aaa")        # sorts before "..._dsb2018"
    _copy_weights(starter, tmp_path / "gca_resunet_lite_dsb2018")
    (tmp_path / "gca_resunet_lite_orphan.json").write_text("{}")    # a card without tensors: ignored
    monkeypatch.setattr(resources, "weights_dir", lambda: tmp_path)
    assert [s.name for s in bundled_weights("gca_resunet")] == ["gca_resunet_lite_aaa", "gca_resunet_lite_dsb2018"]
    assert starter_weights("gca_resunet") == tmp_path / "gca_resunet_lite_dsb2018"
    assert bundled_weights("vunet") == [] and starter_weights("vunet") is None


MONUSEG_STEMS = sorted(p.stem for p in resources.weights_dir().glob("*_monuseg2018.safetensors"))


def test_the_he_tissue_weights_are_bundled():
    assert MONUSEG in MONUSEG_STEMS


@pytest.mark.parametrize("name", MONUSEG_STEMS)
def test_bundled_monuseg_weights_carry_their_data_licence_and_hash(name):
    stem = resources.weights_dir() / name
    card = read_card(stem)
    assert name.startswith(card["architecture"] + "_")
    others = [m for m in list_models() if m != card["architecture"]]
    assert stem in bundled_weights(card["architecture"]) and all(stem not in bundled_weights(m) for m in others)
    assert card["training"]["licence"].startswith("CC BY-NC-SA 4.0")
    assert "non-commercial" in card["use"]["licence"] and "H&E" in card["use"]["for"]
    assert card["use"]["licence_short"] == "H&E, CC BY-NC-SA: non-commercial"
    assert card["sha256"] == file_sha256(weights_paths(stem)[0])
    # scored on MoNuSeg images it never trained on, with the thresholds tuned there (the V-UNet
    # weights also hold out the 16 DSB2018 H&E validation images of their wider training folder)
    held_out_tissue = sorted(i for i in card["training"]["val_ids"] if i.startswith("TCGA-"))
    assert held_out_tissue == ["TCGA-21-5784-01Z-00-DX1", "TCGA-E2-A1B5-01Z-00-DX1"]
    assert card["metrics"]["validation"]["n_images"] == 2 and card["decode"]["min_area"] >= 16
    assert card["metrics"]["validation"]["mean"]["dice"] >= 0.80


def test_resolve_weights_name(tmp_path, monkeypatch):
    bundled = str(resources.weights_dir() / MONUSEG)
    assert resolve_weights_name(MONUSEG) == bundled
    assert resolve_weights_name(MONUSEG + ".safetensors") == bundled
    _copy_weights(bundled, tmp_path / MONUSEG)                      # a user's file of the same name wins
    monkeypatch.chdir(tmp_path)
    assert resolve_weights_name(MONUSEG) == MONUSEG
    assert resolve_weights_name(str(tmp_path / MONUSEG)) == str(tmp_path / MONUSEG)
    with pytest.raises(FileNotFoundError, match="bundled weights: .*gca_resunet_lite_dsb2018"):
        resolve_weights_name("no_such_weights")
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_weights_name(str(tmp_path / "elsewhere" / "gca_resunet_lite_dsb2018"))   # a path is not a name


def test_cli_segment_by_bundled_name_takes_the_model_from_the_card(tmp_path, capsys):
    image = resources.sample_image_path("histology_he")
    out = tmp_path / "he.zarr"
    assert main(["segment", str(image), "--weights", MONUSEG, "-o", str(out), "--tta", "1",
                 "--mc-samples", "0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["objects"] > 10
    attrs = dict(zarr.open_group(str(out), mode="r").attrs)
    assert MONUSEG in json.dumps(attrs) and "gca_resunet" in json.dumps(attrs)

    assert main(["segment", str(image), "--weights", "no_such_weights", "-o", str(tmp_path / "x.zarr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bundled weights" in err[0]
    assert not (tmp_path / "x.zarr").exists()


def test_cli_segment_runs_the_bundled_vunet_paper_preset_from_its_card(tmp_path, capsys):
    """The card's config (paper preset: base width 16, VAEM) rebuilds the network, not the lite default."""
    image = resources.sample_image_path("histology_he")
    out = tmp_path / "he_vunet.zarr"
    assert main(["segment", str(image), "--weights", "vunet_paper_monuseg2018", "-o", str(out), "--tta", "1",
                 "--mc-samples", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["objects"] > 10
    attrs = json.dumps(dict(zarr.open_group(str(out), mode="r").attrs))
    assert "vunet_paper_monuseg2018" in attrs and read_card(resources.weights_dir() / "vunet_paper_monuseg2018")[
        "sha256"] in attrs


def test_cli_segment_refuses_weights_of_another_model_than_asked(tmp_path, capsys):
    image = resources.sample_image_path("histology_he")
    assert main(["segment", str(image), "-m", "vunet", "--weights", MONUSEG, "-o", str(tmp_path / "y.zarr")]) == 2
    assert "gca_resunet" in capsys.readouterr().err


def test_widget_lists_bundled_domain_weights_with_their_licence():
    choices = widget_state.weights_choices("gca_resunet")
    labels = [c.label for c in choices]
    assert labels[0] == "starter: gca_resunet_lite_dsb2018 (bundled)"
    entry = choices[labels.index(f"bundled: {MONUSEG}, H&E, CC BY-NC-SA: non-commercial")]
    assert entry.value == str(resources.weights_dir() / MONUSEG)
    assert "for nuclei in H&E" in entry.description and "CC BY-NC-SA" in entry.description
    vunet = [c.label for c in widget_state.weights_choices("vunet")]
    assert vunet[:2] == ["starter: vunet_lite_dsb2018 (bundled)",
                         "bundled: vunet_paper_monuseg2018, H&E, CC BY-NC-SA: non-commercial"]
    # every model lists exactly its own bundled weights besides the starter
    for model in list_models():
        listed = [c.value for c in widget_state.weights_choices(model) if c.label.startswith("bundled:")]
        expected = [str(s) for s in bundled_weights(model) if s != starter_weights(model)]
        assert listed == expected


def test_finetune_finds_bundled_domain_weights_of_a_run_by_sha256():
    from napari_medseg.finetune_layers import parent_weights

    stem = resources.weights_dir() / MONUSEG
    run = {"model": "gca_resunet", "weights_sha256": read_card(stem)["sha256"]}   # no weights_path recorded
    assert parent_weights(run, "gca_resunet") == stem
    assert parent_weights(dict(run, weights_sha256="0" * 64), "gca_resunet") is None


def test_cli_versions_tree_lists_every_bundled_root(tmp_path, monkeypatch, capsys):
    from napari_medseg.core import versions

    monkeypatch.setenv(versions.ENV_VAR, str(tmp_path / "models"))
    assert main(["finetune", "--versions", "gca_resunet"]) == 0
    tree = capsys.readouterr().out
    assert "gca_resunet_lite_dsb2018" in tree and MONUSEG in tree
