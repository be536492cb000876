"""Package foundation: Qt-free engine, manifest consistency, resources, CLI behaviour."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import napari_medseg
from napari_medseg.core.resources import SAMPLE_NAMES, resources_dir, sample_image_path

REPO = Path(__file__).resolve().parents[1]

BLOCK_QT = """
import importlib.abc, sys
BLOCKED = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "napari", "vispy")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked import of {name}")
sys.meta_path.insert(0, Block())
import pkgutil, importlib
import src_models, napari_medseg.core, napari_medseg.cli, napari_medseg.cli_commands, napari_medseg.cli_train
for mod in pkgutil.iter_modules(napari_medseg.core.__path__):
    importlib.import_module("napari_medseg.core." + mod.name)
for mod in pkgutil.iter_modules(src_models.__path__):
    importlib.import_module("src_models." + mod.name)
print("ok", len(list(pkgutil.iter_modules(napari_medseg.core.__path__))))
"""


def test_engine_and_models_import_with_qt_blocked():
    result = subprocess.run([sys.executable, "-c", BLOCK_QT], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_no_qt_imports_outside_widgets():
    offenders = []
    for path in list((REPO / "napari_medseg").rglob("*.py")) + list((REPO / "src_models").rglob("*.py")):
        if "_widgets" in path.parts:
            continue
        text = path.read_text()
        if any(f"import {m}" in text or f"from {m}" in text for m in ("qtpy", "PyQt5", "magicgui", "napari.qt")):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_npe2_validate_with_imports():
    npe2 = Path(sys.executable).with_name("npe2")
    result = subprocess.run([str(npe2), "validate", "napari-medseg", "--imports"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def _manifest() -> dict:
    return yaml.safe_load((REPO / "napari.yaml").read_text())


def test_manifest_references_resolve():
    contributions = _manifest()["contributions"]
    commands = {c["id"] for c in contributions["commands"]}
    submenus = {s["id"] for s in contributions.get("submenus", [])}
    referenced = [w["command"] for w in contributions["widgets"]]
    referenced += [r["command"] for r in contributions["readers"]]
    referenced += [w["command"] for w in contributions["writers"]]
    referenced += [s["command"] for s in contributions["sample_data"]]
    for menu_id, entries in contributions["menus"].items():
        if not menu_id.startswith("napari/"):
            assert menu_id in submenus, f"menu {menu_id} is not a declared submenu"
        for entry in entries:
            if "command" in entry:
                referenced.append(entry["command"])
            else:
                assert entry["submenu"] in submenus
    assert set(referenced) <= commands, set(referenced) - commands
    assert all(c.startswith("napari-medseg.") for c in commands)
    names = {w["display_name"] for w in contributions["widgets"]}
    assert names == {"Segment", "Fine-tune on edits", "Export labels"}
    assert _manifest()["display_name"] == "MedSeg"


def test_packaged_manifest_is_the_root_manifest():
    packaged = Path(napari_medseg.__file__).with_name("napari.yaml")
    assert packaged.read_text() == (REPO / "napari.yaml").read_text()


def test_resources_found_through_helper():
    assert resources_dir().is_dir()
    for name in SAMPLE_NAMES:
        assert sample_image_path(name).exists()


def _cli(*args):
    exe = Path(sys.executable).with_name("napari-medseg")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", ["segment", "finetune", "train", "evaluate", "export", "bench", "demo"])
def test_cli_help(command):
    result = _cli(command, "--help")
    assert result.returncode == 0
    assert "usage: napari-medseg " + command in result.stdout
    assert len(result.stdout.splitlines()) > 3


@pytest.mark.parametrize("args, expected", [
    (["segment", "/no/such/image.zarr", "-o", "/tmp/x.zarr"], "does not exist"),
    (["segment", "__NOT_ZARR__", "-o", "/tmp/x.zarr"], "zarr"),
    (["segment", "__SAMPLE__", "-m", "unet9000", "-o", "/tmp/x.zarr"], "unknown model"),
])
def test_cli_bad_input_is_one_clear_line(args, expected, tmp_path):
    not_zarr = tmp_path / "folder.zarr"
    not_zarr.mkdir()
    (not_zarr / "readme.txt").write_text("not a zarr store")
    args = [str(not_zarr) if a == "__NOT_ZARR__" else a for a in args]
    args = [str(sample_image_path("fluorescence_small")) if a == "__SAMPLE__" else a for a in args]
    args = [str(tmp_path / "out.zarr") if a == "/tmp/x.zarr" else a for a in args]
    result = _cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("napari-medseg: error:")
    assert expected in lines[0].lower()
    assert "Traceback" not in result.stderr


@pytest.mark.gui
def test_demo_opens_napari_with_the_sample_and_the_segment_widget(tmp_path):
    """The README's first command, GUI branch: napari opens with the sample and the docked widget
    (a screenshot is taken from the real window, then it closes)."""
    from PIL import Image

    shot = tmp_path / "demo.png"
    done = subprocess.run([sys.executable, "-c", "import sys; from napari_medseg.cli import main; "
                           f"sys.exit(main(['demo', '--screenshot', {str(shot)!r}]))"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"screenshot: {shot}" in done.stdout
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape[0] > 400 and pixels.shape[1] > 800 and pixels.std() > 10   # a real window
