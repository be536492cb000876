"""The segment command end to end (random lite weights, small real image), and its bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from napari_medseg.cli import main
from napari_medseg.core.resources import sample_image_path
from napari_medseg.core.samples import load_sample
from napari_medseg.core.store import OutputStore


@pytest.fixture
def sample_zarr(tmp_path):
    path = tmp_path / "nuclei.zarr"
    image = load_sample("fluorescence_large")
    z = zarr.open_array(str(path), mode="w", shape=image.shape, chunks=(256, 256), dtype=image.dtype)
    z[:] = image
    return path


def test_segment_zarr_writes_maps_and_labels(sample_zarr, tmp_path, capsys):
    out = tmp_path / "run.zarr"
    assert main(["segment", str(sample_zarr), "-m", "reseg_unet", "--weights", "random",
                 "-o", str(out), "--tile", "256"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["maps"] == "complete" and summary["labels"] == "complete"
    store = OutputStore.open(out, mode="r")
    probs = store.read_map("probs")
    assert probs.shape == (3, 520, 696)
    assert np.allclose(probs.sum(0), 1.0, atol=3 / 255)
    assert store.labels().dtype == np.uint32
    assert store.attrs["run"]["model"] == "reseg_unet"
    assert store.status("labels")["status"] == "complete"


def test_existing_output_refused_without_resume(sample_zarr, tmp_path, capsys):
    out = tmp_path / "run.zarr"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    assert main(["segment", str(sample_zarr), "-m", "reseg_unet", "--weights", "random", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "user data"


def test_overwrite_never_deletes_foreign_folder(sample_zarr, tmp_path, capsys):
    out = tmp_path / "run.zarr"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    assert main(["segment", str(sample_zarr), "-m", "reseg_unet", "--weights", "random", "-o", str(out),
                 "--overwrite"]) == 2
    assert (out / "mine.txt").read_text() == "user data"
    assert capsys.readouterr().err.count("\n") == 1


def test_png_input_and_region(tmp_path, capsys):
    out = tmp_path / "png.zarr"
    assert main(["segment", str(sample_image_path("histology_he")), "-m", "iau_net", "--weights", "random",
                 "-o", str(out), "--region", "0:128,0:128"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["output"] == str(out)


@pytest.mark.parametrize("region", ["5:1", "a:b,c:d", "0:10"])
def test_bad_region(sample_zarr, tmp_path, capsys, region):
    assert main(["segment", str(sample_zarr), "--weights", "random", "-o", str(tmp_path / "o.zarr"),
                 "--region", region]) == 2
    assert "--region" in capsys.readouterr().err


def test_weights_for_another_model(sample_zarr, tmp_path, capsys):
    from src_models import create_model, save_weights

    save_weights(create_model("reseg_unet", "lite"), tmp_path / "reseg")
    assert main(["segment", str(sample_zarr), "-m", "vunet", "--weights", str(tmp_path / "reseg"),
                 "-o", str(tmp_path / "o.zarr")]) == 2
    assert "not 'vunet'" in capsys.readouterr().err


def test_dask_two_workers_identical_to_single_process(tmp_path, capsys):
    """Scale-out: 2 Dask worker processes give byte-identical maps and labels to one process."""
    import dask.array as da

    from napari_medseg.core.samples import mosaic

    path = tmp_path / "mosaic.zarr"
    da.to_zarr(mosaic(1024, chunk=512), str(path))
    common = ["-m", "reseg_unet", "--weights", "random", "--tile", "256", "--superblock", "512"]
    single, multi = tmp_path / "single.zarr", tmp_path / "multi.zarr"
    extra = ["--mc-samples", "0"]
    import torch

    # Dask's workers run torch on one thread each; convolutions summed over another thread count may
    # round differently in the last bit (seen on AMD EPYC with 2 threads), so compare like with like.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["segment", str(path), *common, *extra, "-o", str(single)]) == 0
    finally:
        torch.set_num_threads(threads)
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    assert main(["segment", str(path), *common, *extra, "-o", str(multi), "--workers", "2"]) == 0
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE
            and "resource_tracker" not in " ".join(p.cmdline())]  # multiprocessing's, one per parent
    assert not left, f"the local Dask cluster left processes running: {[p.cmdline() for p in left]}"
    a, b = OutputStore.open(single, mode="r"), OutputStore.open(multi, mode="r")
    assert a.status("labels")["status"] == b.status("labels")["status"] == "complete"
    assert np.array_equal(np.asarray(a.labels()[:]), np.asarray(b.labels()[:]))
    assert np.array_equal(np.asarray(a.array("probs")[:]), np.asarray(b.array("probs")[:]))
    assert np.asarray(a.labels()[:]).max() > 0


def test_whole_slide_svs_segmented_and_measured_in_micrometres(tmp_path, capsys):
    """An Aperio SVS goes through segment and export like any TIFF; its MPP reaches the output
    store and the object table's areas in µm²."""
    import pandas as pd

    from slide_fixtures import write_aperio_svs

    write_aperio_svs(tmp_path / "slide.svs", np.stack([load_sample("fluorescence_large")] * 3, -1))
    out = tmp_path / "slide.medseg.zarr"
    assert main(["segment", str(tmp_path / "slide.svs"), "-m", "reseg_unet", "--weights", "random",
                 "-o", str(out), "--tile", "256", "--tta", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == "complete"
    store = OutputStore.open(out, mode="r")
    assert store.layout.pixel_size == pytest.approx((0.252, 0.252)) and store.layout.unit == "micrometer"
    assert main(["export", str(out), "-o", str(tmp_path / "objects.csv")]) == 0
    table = pd.read_csv(tmp_path / "objects.csv")
    ids = np.unique(store.labels())
    assert "area_um2" in table.columns and len(table) == (ids > 0).sum() > 0
    assert table["area_um2"].to_numpy() == pytest.approx(table["area"].to_numpy() * 0.252 ** 2)
