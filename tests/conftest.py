"""Shared fixtures. GUI tests are marked ``gui`` and need a display (the README's test command runs
them under xvfb-run)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SCREENSHOTS = REPO / "tests" / "screenshots"


def pytest_collection_modifyitems(config, items):
    """Skip GUI tests cleanly when no display is available (they run under xvfb-run in CI)."""
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    skip = pytest.mark.skip(reason="needs a display: run the suite under xvfb-run (see README)")
    for item in items:
        if "gui" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _private_user_folders(tmp_path_factory):
    """Keep the tester's own fine-tuned versions and widget settings out of every test (and the
    tests' versions out of the tester's folders)."""
    saved = {k: os.environ.get(k) for k in ("NAPARI_MEDSEG_MODELS", "NAPARI_MEDSEG_CONFIG_DIR")}
    os.environ["NAPARI_MEDSEG_MODELS"] = str(tmp_path_factory.mktemp("user-models"))
    os.environ["NAPARI_MEDSEG_CONFIG_DIR"] = str(tmp_path_factory.mktemp("user-config"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the checkout (CI has it); tests needing it skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED_DATA


def save_screenshot(viewer, name: str) -> Path:
    """Save a screenshot of the whole napari window (with docks) into tests/screenshots/."""
    from qtpy.QtWidgets import QApplication

    for _ in range(5):
        QApplication.processEvents()
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    viewer.screenshot(path=str(path), canvas_only=False, flash=False)
    return path
