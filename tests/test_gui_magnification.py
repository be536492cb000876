"""GUI: a whole-slide file at another magnification than the weights' (run under xvfb-run)."""
from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.core.samples import load_sample
from napari_medseg.core.store import OutputStore

from conftest import save_screenshot
from test_gui_segment import open_widget, run_and_wait

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_MEDSEG_CONFIG_DIR", str(tmp_path / "config"))


def test_a_20x_slide_is_resampled_to_the_h_and_e_weights(make_napari_viewer, qtbot, tmp_path):
    """An SVS at 0.5 µm/px opened by the reader, segmented with the 40x (0.25 µm) H&E weights:
    tiles are resampled ×2 (auto), the labels stay on the slide's grid and scale."""
    from skimage.transform import resize
    from slide_fixtures import write_aperio_svs

    from napari_medseg.core.resources import weights_dir

    sample = load_sample("histology_he")[..., :3]
    half = resize(sample, (sample.shape[0] // 2, sample.shape[1] // 2), order=1, anti_aliasing=True,
                  preserve_range=True).round().astype(np.uint8)
    write_aperio_svs(tmp_path / "slide20x.svs", half, mpp=0.5)
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 860)
    image = viewer.open(tmp_path / "slide20x.svs", plugin="napari-medseg")[0]
    assert tuple(image.scale) == pytest.approx((0.5, 0.5))
    widget = open_widget(viewer, tmp_path, "gca_resunet", str(weights_dir() / "gca_resunet_lite_monuseg2018"))
    form = widget.form
    assert form.scale_value() is None                                   # auto by default
    form.tta.setCurrentIndex(form.tta.findData(1))
    outcome = run_and_wait(widget, qtbot)
    assert OutputStore.open(outcome.output, mode="r").attrs["run"]["scale"] == pytest.approx(2.0)
    assert any("resampled ×2" in w for w in outcome.result.maps.warnings)
    labels = viewer.layers["slide20x labels"]
    assert labels.data.shape == half.shape[:2] and tuple(labels.scale) == pytest.approx((0.5, 0.5))
    assert int(np.max(np.asarray(labels.data))) > 5
    viewer.reset_view()
    save_screenshot(viewer, "segment_20x_slide_resampled")
    form.scale.setCurrentIndex(form.scale.findData(1.0))              # off: as stored
    off = run_and_wait(widget, qtbot)
    assert "scale" not in OutputStore.open(off.output, mode="r").attrs["run"]
