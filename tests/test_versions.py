"""Version bookkeeping: new versions never touch their parent, a tree, adopt and roll back (Qt-free)."""
from __future__ import annotations

import json

import pytest

from napari_medseg.core import versions
from src_models import create_model, read_card, save_weights
from src_models.weights_io import file_sha256, weights_paths


def tiny():
    return create_model("reseg_unet", "lite", base_width=4)


@pytest.fixture
def root(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    monkeypatch.setenv(versions.ENV_VAR, str(folder))
    return folder


@pytest.fixture
def parent(tmp_path):
    card = save_weights(tiny(), tmp_path / "starter", {"version": "starter"})
    return tmp_path / "starter", card


def child_of(stem, card, note=""):
    return {"parent": {"sha256": card["sha256"], "version": card.get("version"), "path": str(stem)},
            "finetune": {"note": note}}


def test_models_dir_follows_the_environment(root):
    assert versions.models_dir() == root


def test_save_version_never_touches_the_parent(root, parent):
    stem, card = parent
    tensors, card_path = weights_paths(stem)
    before = (file_sha256(tensors), card_path.read_text(), tensors.stat().st_mtime_ns)
    v1 = versions.save_version(tiny(), child_of(stem, card))
    assert (file_sha256(tensors), card_path.read_text(), tensors.stat().st_mtime_ns) == before
    written = read_card(v1.path)
    assert written["version"] == v1.id and written["parent"]["sha256"] == card["sha256"]
    assert v1.path.parent.parent == root / "reseg_unet"
    assert file_sha256(weights_paths(v1.path)[0]) == written["sha256"]
    assert not list((root / "reseg_unet").glob(".partial-*"))


def test_tree_adopt_and_rollback(root, parent):
    stem, card = parent
    v1 = versions.save_version(tiny(), child_of(stem, card, "first"))
    v2 = versions.save_version(tiny(), child_of(v1.path, v1.card, "second"))
    v3 = versions.save_version(tiny(), child_of(stem, card, "sibling"))
    tree = versions.version_tree("reseg_unet", extra=[stem])
    assert len(tree) == 1 and tree[0].sha256 == card["sha256"]
    assert [c.id for c in tree[0].children] == [v1.id, v3.id]
    assert [c.id for c in tree[0].children[0].children] == [v2.id]
    assert [d for d, _ in versions.walk(tree)] == [0, 1, 2, 1]
    assert versions.active_path("reseg_unet") is None
    assert versions.adopt("reseg_unet", v2.id) == v2.path
    assert versions.active_path("reseg_unet") == v2.path
    assert "*" in versions.format_tree("reseg_unet", extra=[stem]).splitlines()[2]
    assert versions.rollback("reseg_unet") == v1.path          # one click back up the tree
    assert versions.rollback("reseg_unet") == stem              # the parent outside the folder
    assert versions.rollback("reseg_unet") is None              # then the bundled starter
    with pytest.raises(versions.VersionError, match="nothing to roll back"):
        versions.rollback("reseg_unet")
    history = json.loads((root / "reseg_unet" / versions.ACTIVE_FILE).read_text())["history"]
    assert history[-1] == str(stem)


def test_tree_without_the_parent_file_shows_a_missing_root(root, parent):
    stem, card = parent
    v1 = versions.save_version(tiny(), child_of(stem, card))
    for path in weights_paths(stem):
        path.unlink()
    tree = versions.version_tree("reseg_unet")
    assert tree[0].path is None and [c.id for c in tree[0].children] == [v1.id]
    assert "(missing)" in tree[0].describe()


def test_find_by_id_prefix_or_sha(root, parent):
    stem, card = parent
    v1 = versions.save_version(tiny(), child_of(stem, card))
    assert versions.find_version("reseg_unet", v1.id[:-2]).id == v1.id
    assert versions.find_by_sha(v1.sha256, "reseg_unet") == v1.path
    assert versions.find_by_sha(card["sha256"], "reseg_unet", candidates=[stem]) == stem
    with pytest.raises(versions.VersionError, match="no reseg_unet version"):
        versions.find_version("reseg_unet", "nope")


def test_partial_versions_are_invisible_and_cleaned(root, parent):
    folder = root / "reseg_unet"
    folder.mkdir(parents=True)
    partial = folder / ".partial-crashed"
    partial.mkdir()
    (partial / "weights.safetensors").write_bytes(b"half")
    assert versions.list_versions("reseg_unet") == []
    assert versions.remove_partial("reseg_unet") == 1 and not partial.exists()


def test_write_weights_refuses_to_overwrite(tmp_path, parent):
    stem, card = parent
    with pytest.raises(versions.VersionError, match="already exists"):
        versions.write_weights(tiny(), stem, {})
    out = tmp_path / "child"
    written = versions.write_weights(tiny(), out, child_of(stem, card))
    assert read_card(out)["sha256"] == written["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("child")) == [
        "child.json", "child.safetensors"]
    assert not list(tmp_path.glob(".partial-*"))


def test_identical_tensors_saved_twice_are_two_versions(root, parent):
    stem, card = parent
    model = tiny()
    a = versions.save_version(model, child_of(stem, card))
    b = versions.save_version(model, child_of(stem, card))
    assert a.sha256 == b.sha256 and a.id != b.id
    assert [v.id for v in versions.list_versions("reseg_unet")] == [a.id, b.id]
