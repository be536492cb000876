"""Tiled inference end to end on small images with stand-in networks."""
from __future__ import annotations

import errno
import os
import pickle

import numpy as np
import pytest
import torch
import zarr
from standin_models import TinyEquivariantNet, TinyPooledNet, make

from napari_medseg.core import store as store_module
from napari_medseg.core.inference import (InferenceSettings, prepare_run, process_block,
                                          segment)
from napari_medseg.core.io import ImageInputError, open_image
from napari_medseg.core.normalize import Normalization, apply_range, to_model_channels
from napari_medseg.core.progress import drain
from napari_medseg.core.store import OutputStore, OutputStoreError

RNG = np.random.default_rng(1)
IMAGE = RNG.integers(0, 255, (150, 230, 3)).astype(np.uint8)
SMALL = dict(chunk=32, superblock=64, device="cpu")
EXACT = dict(probs_dtype="float32", maps_dtype="float32", skip_threshold=0.0)


def _whole_image(model, image_hwc, normalization: dict) -> dict:
    norm = Normalization(normalization["low"], normalization["high"])
    x = apply_range(to_model_channels(np.transpose(image_hwc, (2, 0, 1)), 3), norm)
    with torch.no_grad():
        return {k: v[0].numpy() for k, v in model.predict(torch.from_numpy(x)[None]).items()}


def _arrays(path) -> dict:
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(array[...]) for name, array in group.arrays()} | {
        f"{g}/{name}": np.asarray(a[...]) for g, sub in group.groups() for name, a in sub.arrays()}


def test_crop_mode_tiled_equals_whole_image(tmp_path):
    model = make(TinyEquivariantNet)
    settings = InferenceSettings(tile=32, **SMALL, **EXACT)
    result = drain(segment(IMAGE, model, {"architecture": model.name}, tmp_path / "o.zarr", settings))
    assert result.status == "complete" and result.tiles.mode == "crop"
    assert result.tiles.covers_receptive_field and result.blocks_run == 12
    store = OutputStore.open(tmp_path / "o.zarr", mode="r")
    whole = _whole_image(model, IMAGE, result.normalization)
    for name in ("probs", "edge_entropy"):
        assert np.abs(store.read_map(name) - whole[name]).max() <= 1e-4
    level1 = store.read_map("probs", level=1)
    np.testing.assert_allclose(level1[:, 10, 20], whole["probs"][:, 20:22, 40:42].mean(axis=(1, 2)), atol=1e-5)


def test_blend_mode_for_a_pooling_model(tmp_path):
    model = make(TinyPooledNet)
    settings = InferenceSettings(tile=48, overlap=12, mc_samples=2, **SMALL, **EXACT)
    result = drain(segment(IMAGE, model, {}, tmp_path / "o.zarr", settings))
    assert result.tiles.mode == "blend"
    store = OutputStore.open(tmp_path / "o.zarr", mode="r")
    assert store.map_names == ("probs", "variance")
    np.testing.assert_allclose(store.read_map("probs").sum(axis=0), 1.0, atol=1e-5)  # weights sum to 1
    assert np.all(store.read_map("variance") >= 0)


def test_progress_per_batch_and_provenance(tmp_path):
    model = make(TinyEquivariantNet)
    card = {"architecture": model.name, "sha256": "ab" * 32, "normalization": {"method": "fixed", "low": 0, "high": 255},
            "weights_path": "/models/tiny/v2", "version": "tiny-v2"}
    job = segment(IMAGE, model, card, tmp_path / "o.zarr", InferenceSettings(tile=32, batch_size=2, **SMALL))
    records = []
    result = drain(job, records.append)
    assert all(r.stage == "tiles" for r in records) and records[-1].done == records[-1].total
    regions = [r.region for r in records if r.region is not None]
    assert sorted(regions) == sorted(b.region for b in prepare_run(
        IMAGE, model, card, tmp_path / "o.zarr", InferenceSettings(tile=32, **SMALL)).plan.blocks)
    run = OutputStore.open(tmp_path / "o.zarr").attrs["run"]
    assert run["model"] == model.name and run["weights_sha256"] == "ab" * 32
    assert run["weights_path"] == "/models/tiny/v2" and run["weights_version"] == "tiny-v2"
    assert run["tile"] == 32 and run["overlap"] == 8 and run["mc_samples"] == 0
    assert run["normalization"] == {"method": "fixed", "low": 0.0, "high": 255.0}
    assert run["input"] == "in-memory array" and "package_version" in run and "date" in run
    assert result.forward_seconds > 0
    multiscales = zarr.open_group(str(tmp_path / "o.zarr/probs"), mode="r").attrs["multiscales"]
    assert [d["path"] for d in multiscales[0]["datasets"]] == ["0", "1"]


def test_resume_after_cancel_is_byte_identical(tmp_path):
    model = make(TinyPooledNet)
    settings = InferenceSettings(tile=48, overlap=12, mc_samples=2, **SMALL)
    drain(segment(IMAGE, model, {}, tmp_path / "full.zarr", settings))

    job = segment(IMAGE, model, {}, tmp_path / "resumed.zarr", settings)
    written = 0
    for record in job:
        written += record.region is not None
        if written == 3:
            job.close()     # what napari's Cancel does
            break
    store = OutputStore.open(tmp_path / "resumed.zarr", mode="r")
    assert store.attrs["stages"]["maps"] == "incomplete"
    state = store.status()
    assert state["status"] == "incomplete" and 0 < state["chunks_done"] < state["chunks_total"]

    result = drain(segment(IMAGE, model, {}, tmp_path / "resumed.zarr", settings))
    assert result.blocks_resumed >= 3 and result.status == "complete"
    full, resumed = _arrays(tmp_path / "full.zarr"), _arrays(tmp_path / "resumed.zarr")
    assert full.keys() == resumed.keys()
    for name in full:
        assert full[name].tobytes() == resumed[name].tobytes(), name


def test_default_output_goes_next_to_the_input(tmp_path):
    zarr.create_array(str(tmp_path / "slide.zarr"), data=IMAGE, chunks=(64, 64, 3))
    model = make(TinyEquivariantNet)
    result = drain(segment(str(tmp_path / "slide.zarr"), model, {}, None, InferenceSettings(tile=32, **SMALL)))
    assert result.output == str(tmp_path / "slide.tiny_equivariant.medseg.zarr")
    assert OutputStore.open(result.output).attrs["run"]["input"] == str(tmp_path / "slide.zarr")
    with pytest.raises(ValueError, match="overlap the input"):
        drain(segment(str(tmp_path / "slide.zarr"), model, {}, tmp_path / "slide.zarr/out.zarr",
                      InferenceSettings(tile=32, **SMALL)))


def test_region_segments_only_that_part(tmp_path):
    model = make(TinyEquivariantNet)
    settings = InferenceSettings(tile=32, region=(40, 70, 100, 140), **SMALL, **EXACT)
    result = drain(segment(IMAGE, model, {}, tmp_path / "o.zarr", settings))
    assert result.status == "incomplete" and result.blocks_total == 4
    store = OutputStore.open(tmp_path / "o.zarr", mode="r")
    done = store.done_chunks()
    assert done[1:3, 3:5].all() and done.sum() == 4
    whole = _whole_image(model, IMAGE, result.normalization)
    assert np.abs(store.read_map("probs", (32, 96, 96, 160)) - whole["probs"][:, 32:96, 96:160]).max() <= 1e-4


@pytest.mark.parametrize("model_class", [TinyEquivariantNet, TinyPooledNet])
def test_image_smaller_than_one_tile_is_padded(tmp_path, model_class):
    tiny = IMAGE[:21, :13]
    result = drain(segment(tiny, make(model_class), {}, tmp_path / "o.zarr",
                           InferenceSettings(tile=64, overlap=16, **SMALL, **EXACT)))
    probs = OutputStore.open(tmp_path / "o.zarr", mode="r").read_map("probs")
    assert result.status == "complete" and probs.shape == (3, 21, 13)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)


def test_nan_and_inf_pixels_are_handled_and_reported(tmp_path):
    image = RNG.random((100, 120)).astype(np.float32)
    image[10:12, 5] = np.nan
    image[50, 60] = np.inf
    model = make(TinyEquivariantNet, in_channels=1, num_classes=3)
    result = drain(segment(image, model, {}, tmp_path / "o.zarr", InferenceSettings(tile=32, **SMALL, **EXACT)))
    assert result.nonfinite_pixels == 3
    assert any("NaN/inf" in w for w in result.warnings)
    assert np.isfinite(OutputStore.open(tmp_path / "o.zarr", mode="r").read_map("probs")).all()


def test_empty_tiles_are_skipped_as_background(tmp_path):
    image = IMAGE.copy()
    image[:96, :160] = 17     # flat: the 2 x 4 tiles whose windows (core + halo) lie inside
    result = drain(segment(image, make(TinyEquivariantNet), {}, tmp_path / "o.zarr",
                           InferenceSettings(tile=32, probs_dtype="float32", **SMALL)))
    assert result.tiles_skipped == 8
    store = OutputStore.open(tmp_path / "o.zarr", mode="r")
    probs = store.read_map("probs", (0, 32, 0, 96))
    assert np.all(probs[0] == 1.0) and np.all(probs[1:] == 0.0)
    assert np.isfinite(store.read_map("edge_entropy")).all()


def test_existing_output_is_refused_and_user_data_never_deleted(tmp_path):
    model = make(TinyEquivariantNet)
    foreign = tmp_path / "mine.zarr"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(OutputStoreError, match="not made by napari-medseg"):
            drain(segment(IMAGE, model, {}, foreign, InferenceSettings(tile=32, overwrite=overwrite, **SMALL)))
    assert (foreign / "precious.txt").read_text() == "keep me"

    out = tmp_path / "o.zarr"
    drain(segment(IMAGE, model, {}, out, InferenceSettings(tile=32, **SMALL)))
    with pytest.raises(OutputStoreError, match="different settings.*overwrite=True"):
        drain(segment(IMAGE, model, {}, out, InferenceSettings(tile=64, **SMALL)))
    with pytest.raises(OutputStoreError, match="resume=False"):
        drain(segment(IMAGE, model, {}, out, InferenceSettings(tile=32, resume=False, **SMALL)))
    result = drain(segment(IMAGE, model, {}, out, InferenceSettings(tile=64, overwrite=True, **SMALL)))
    assert result.blocks_run == 12 and OutputStore.open(out).attrs["run"]["tile"] == 64
    OutputStore.open(out).set_stage_status("maps", store_module.CREATING)   # creation cut short
    result = drain(segment(IMAGE, model, {}, out, InferenceSettings(tile=32, **SMALL)))
    assert result.blocks_run == 12 and result.blocks_resumed == 0


def test_read_only_output_location_is_a_clear_error(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:      # root writes anywhere: simulate the refusal of a read-only folder
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(store_module.tempfile, "mkstemp", refuse)
    else:
        locked.chmod(0o555)
    with pytest.raises(OutputStoreError, match="cannot write to .*locked.*choose an output folder"):
        drain(segment(IMAGE, make(TinyEquivariantNet), {}, locked / "o.zarr", InferenceSettings(tile=32, **SMALL)))
    assert not (locked / "o.zarr").exists()


def test_full_disk_is_a_clear_error_and_the_run_resumes_later(tmp_path, monkeypatch):
    model = make(TinyEquivariantNet)
    settings = InferenceSettings(tile=32, **SMALL)
    real_write = OutputStore._write
    calls = []

    class FullDisk:
        def __setitem__(self, key, value):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fill_up(self, array, key, value):
        calls.append(1)
        real_write(self, FullDisk() if len(calls) > 40 else array, key, value)

    monkeypatch.setattr(OutputStore, "_write", fill_up)
    with pytest.raises(OutputStoreError, match="disk .* is full; free some space"):
        drain(segment(IMAGE, model, {}, tmp_path / "o.zarr", settings))
    monkeypatch.setattr(OutputStore, "_write", real_write)
    assert OutputStore.open(tmp_path / "o.zarr").status()["status"] == "incomplete"
    result = drain(segment(IMAGE, model, {}, tmp_path / "o.zarr", settings))
    assert result.status == "complete" and result.blocks_resumed > 0


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    model = make(TinyEquivariantNet)
    volume = RNG.integers(0, 255, (9, 40, 40)).astype(np.uint8)
    with pytest.raises(ImageInputError, match=r"index=\{'z': 4\}"):
        drain(segment(volume, model, {}, tmp_path / "a.zarr", InferenceSettings(**SMALL)))
    with pytest.raises(ValueError, match="weights card is for 'vunet'"):
        drain(segment(IMAGE, model, {"architecture": "vunet"}, tmp_path / "b.zarr", InferenceSettings(**SMALL)))
    five = RNG.integers(0, 255, (5, 40, 40)).astype(np.uint8)
    with pytest.raises(ImageInputError, match="5 channels"):
        drain(segment(open_image(five, axes="cyx"), model, {}, tmp_path / "c.zarr", InferenceSettings(**SMALL)))
    assert not any(tmp_path.iterdir())


class _GreedyNet(TinyEquivariantNet):
    """Raises CUDA's out-of-memory error for batches above 1 or windows above 40 pixels."""

    def predict(self, x, mc_samples=0):
        if x.shape[0] > 1 or x.shape[-1] > 40:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().predict(x, mc_samples)


def test_out_of_memory_halves_the_batch_then_the_tile(tmp_path):
    model = make(_GreedyNet)
    whole = None
    for name, tile, expected in (("batch.zarr", 16, "batch size reduced to 1"), ("tile.zarr", 64, "tile reduced to 32")):
        settings = InferenceSettings(tile=tile, overlap=8, batch_size=4, **SMALL, **EXACT)
        result = drain(segment(IMAGE, model, {}, tmp_path / name, settings))
        assert result.status == "complete" and result.tiles.tile == 16
        assert any(expected in w for w in result.warnings), result.warnings
        whole = whole or _whole_image(make(TinyEquivariantNet), IMAGE, result.normalization)
        assert np.abs(OutputStore.open(tmp_path / name).read_map("probs") - whole["probs"]).max() <= 1e-4


def test_blocks_can_be_processed_elsewhere_from_pickled_arguments(tmp_path):
    model = make(TinyEquivariantNet)
    settings = InferenceSettings(tile=32, **SMALL)
    drain(segment(IMAGE, model, {}, tmp_path / "ref.zarr", settings))
    prepared = prepare_run(IMAGE, model, {}, tmp_path / "o.zarr", settings)
    plan, source = pickle.loads(pickle.dumps((prepared.plan, prepared.source)))
    for block in reversed(plan.blocks):       # any order, any process
        process_block(source, model, plan, block)
    assert OutputStore.open(tmp_path / "o.zarr").status()["status"] == "complete"
    ref, out = _arrays(tmp_path / "ref.zarr"), _arrays(tmp_path / "o.zarr")
    for name in ("probs/0", "probs/1", "edge_entropy/0"):
        assert ref[name].tobytes() == out[name].tobytes(), name


def test_labels_array_and_pyramid_for_the_instance_step(tmp_path):
    drain(segment(IMAGE, make(TinyEquivariantNet), {}, tmp_path / "o.zarr", InferenceSettings(tile=32, **SMALL)))
    store = OutputStore.open(tmp_path / "o.zarr")
    assert store.labels().dtype == np.uint32 and store.labels().shape == (150, 230)
    labels = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64)
    store.write_labels((64, 128, 128, 192), labels)
    store.mark_done((64, 128, 128, 192), stage="labels")
    np.testing.assert_array_equal(store.labels()[64:128, 128:192], labels)
    np.testing.assert_array_equal(store.labels(1)[32:64, 64:96], labels[::2, ::2])
    assert store.status("labels")["chunks_done"] == 4
    store.labels()[0:64, 0:64] = 7                       # written directly, as the instance step does
    store.refresh_pyramid("labels", (0, 64, 0, 64))
    assert np.all(store.labels(1)[0:32, 0:32] == 7)
    with pytest.raises(ValueError, match="aligned"):
        store.write_labels((10, 74, 0, 64), labels)


def test_auto_superblock_keeps_two_blocks_of_maps_small(tmp_path):
    """Many map channels (PraNet-V2: 16) → 1024² blocks; few → 2048²; always a chunk multiple."""
    from src_models import create_model

    from napari_medseg.core.inference_plan import BLOCK_MAP_BUDGET, MapInfo, auto_superblock

    def maps(channels):
        return tuple(MapInfo(f"m{i}", 1, "map", (0.0, 1.0), "") for i in range(channels))

    assert auto_superblock(maps(3), 512) == 2048
    assert auto_superblock(maps(16), 512) == 1024
    assert auto_superblock(maps(16), 768) == 1536          # rounded up to whole chunks
    assert auto_superblock(maps(200), 256) == 512          # never below 512
    for channels in (3, 6, 16):
        edge = auto_superblock(maps(channels), 512)
        assert channels * 4 * edge ** 2 <= BLOCK_MAP_BUDGET
    model = create_model("pranet_v2", "lite", in_channels=3, num_classes=3)
    image = np.random.default_rng(0).random((300, 300, 3), dtype=np.float32)
    prepared = prepare_run(image, model, None, tmp_path / "p.zarr", InferenceSettings(device="cpu"))
    assert prepared.store.layout.superblock == 1024
    with pytest.raises(ValueError, match="multiple of chunk"):
        InferenceSettings(superblock=1000)


def test_trim_heap_returns_memory_on_glibc():
    from napari_medseg.core.memory import trim_heap

    import platform
    import sys

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert trim_heap() is glibc        # glibc: malloc_trim ran; elsewhere a no-op
