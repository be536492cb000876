"""Running weights at their training pixel size: the scale chosen, tiles resampled in and maps
back (exactly a whole-image pass at the model's scale), decoding sizes, fine-tuning windows."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from standin_models import TinyEquivariantNet, make

from napari_medseg.cli import main
from napari_medseg.core.finetune_data import build_edit_data
from napari_medseg.core.inference import InferenceSettings, segment
from napari_medseg.core.instances import DecodeSettings
from napari_medseg.core.io import open_image
from napari_medseg.core.normalize import Normalization
from napari_medseg.core.progress import drain
from napari_medseg.core.resolution import decode_at_scale, image_grid_tiles, resample, resolve_scale
from napari_medseg.core.store import OutputStore
from napari_medseg.core.tiling import TileSettings

H_AND_E_CARD = {"inference": {"pixel_size_um": 0.25}}


def scan(tmp_path, pixel_um: float | None, unit: str = "CENTIMETER", shape=(64, 80)):
    """An ImageSource of a grey TIFF whose resolution tags say ``pixel_um``."""
    path = tmp_path / f"scan-{pixel_um}.tif"
    options = {} if pixel_um is None else {
        "resolution": ((1e4 if unit == "CENTIMETER" else 25_400) / pixel_um,) * 2, "resolutionunit": unit}
    tifffile.imwrite(path, np.zeros(shape, np.uint8), **options)
    return open_image(path)


@pytest.mark.parametrize("pixel_um, requested, expected", [
    (0.5, None, 2.0),      # a 20x slide, 40x weights: upsample
    (0.125, None, 0.5),    # an 80x scan: downsample
    (0.26, None, 1.0),     # within the training's scale augmentation: left alone
    (0.5, 1.0, 1.0),       # the user turned it off
    (None, None, 1.0),     # no pixel size in the file: nothing to go by
    (None, 1.5, 1.5),      # the user's own scale
])
def test_scale_from_image_and_weights_pixel_sizes(tmp_path, pixel_um, requested, expected):
    scale, why = resolve_scale(requested, H_AND_E_CARD, scan(tmp_path, pixel_um))
    assert scale == pytest.approx(expected)
    assert (why is None) == (scale == 1)
    if requested is None and scale != 1:
        assert f"{pixel_um:.3g} µm" in why and "0.25 µm" in why


def test_weights_without_a_pixel_size_are_never_resampled(tmp_path):
    assert resolve_scale(None, {}, scan(tmp_path, 0.5)) == (1.0, None)


def test_bad_scale_is_refused_with_the_range():
    for bad in (0, -1, 20, float("nan")):
        with pytest.raises(ValueError, match="between 0.125 and 8"):
            InferenceSettings(scale=bad)


def test_tiles_on_the_image_grid_keep_the_pooling_grid_and_cover_the_halo():
    crop = TileSettings("crop", 1024, 96, size_multiple=32)
    assert image_grid_tiles(crop, 2.0) == TileSettings("crop", 512, 48, size_multiple=16)
    assert image_grid_tiles(crop, 0.5).tile == 2048 and image_grid_tiles(crop, 0.5).overlap == 192
    odd = image_grid_tiles(crop, 1.6)     # 32 / 1.6 = 20 image pixels
    assert odd.size_multiple == 20 and odd.tile % 20 == 0 and odd.overlap * 1.6 >= 96
    blend = image_grid_tiles(TileSettings("blend", 256, 64, size_multiple=32), 3.0)
    assert blend.size_multiple == 1 and blend.tile == 85 and blend.overlap == 22


def test_decoding_sizes_follow_the_scale():
    tuned = DecodeSettings(min_area=64, min_seed_area=8, seed_smoothing=2.0, split_depth=2.0)
    coarse = decode_at_scale(tuned, 2.0)
    assert (coarse.min_area, coarse.min_seed_area, coarse.seed_smoothing, coarse.split_depth) == (16, 2, 1.0, 1.0)
    assert decode_at_scale(tuned, 1.0) is tuned


def test_resampled_tiles_equal_a_whole_image_pass_at_the_model_scale(tmp_path):
    """Crop mode at scale 2: the stitched maps are the whole image upsampled ×2, run once and
    downsampled back, to float precision; without resampling they are not."""
    rng = np.random.default_rng(1)
    image = np.kron(rng.integers(0, 255, (19, 29, 3)), np.ones((8, 8, 1)))[:150, :230].astype(np.uint8)
    model = make(TinyEquivariantNet)
    settings = dict(tile=32, chunk=32, superblock=64, device="cpu", probs_dtype="float32",
                    maps_dtype="float32", skip_threshold=0.0, normalization=Normalization(0.0, 255.0))
    x = torch.from_numpy(np.transpose(image, (2, 0, 1)).astype(np.float32) / 255)[None]
    with torch.no_grad():
        whole = resample(model.predict(resample(x, (300, 460)))["probs"], (150, 230))[0].numpy()
    probs = {}
    for scale in (2.0, 1.0):
        result = drain(segment(image, model, {}, tmp_path / f"s{scale}.zarr",
                               InferenceSettings(scale=scale, **settings)))
        assert result.scale == scale and result.blocks_run == 12
        probs[scale] = OutputStore.open(result.output, mode="r").read_map("probs")
    assert result.tiles.tile == 32
    assert np.abs(probs[2.0] - whole).max() <= 1e-4
    assert np.abs(probs[1.0] - whole).max() > 1e-2


def test_finetuning_windows_are_resampled_to_the_model_grid():
    """Edits on a 20x image fine-tune 40x weights at 40x: windows (crop/scale image pixels) come
    out at the model's size, labels by nearest neighbour (no new object IDs)."""
    yy, xx = np.mgrid[:96, :96]
    truth = np.zeros((96, 96), np.uint32)
    for k, (cy, cx) in enumerate([(20, 20), (30, 60), (70, 40), (75, 75)], 1):
        truth[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = k
    image = np.where(truth > 0, 200, 30).astype(np.uint8)
    model_labels = truth.copy()
    model_labels[truth == 2] = 0                        # the model missed one nucleus
    data = build_edit_data(image, truth, model_labels, in_channels=3, crop=64, context=8, scale=2.0)
    for item, (y0, y1, x0, x1) in zip(data.items + data.holdout, data.windows):
        assert item.image.shape[1:] == (round((y1 - y0) * 2), round((x1 - x0) * 2))
        assert item.classes.shape == item.image.shape[1:] == item.valid.shape
        assert set(np.unique(item.labels)) <= set(np.unique(truth))
        assert y1 - y0 <= 40 and x1 - x0 <= 40        # ≈ crop / scale image pixels


def test_cli_records_the_scale_and_refuses_a_bad_one(tmp_path, capsys):
    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 255, (96, 128), dtype=np.uint8))
    out = tmp_path / "run.zarr"
    assert main(["segment", str(path), "-m", "reseg_unet", "--weights", "random", "-o", str(out),
                 "--scale", "2", "--tta", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == "complete"
    assert OutputStore.open(out, mode="r").attrs["run"]["scale"] == 2.0
    assert main(["segment", str(path), "--weights", "random", "-o", str(tmp_path / "b.zarr"),
                 "--scale", "0"]) == 2
    assert "between 0.125 and 8" in capsys.readouterr().err


def _he_folder(root, factor: float):
    """The bundled H&E sample (and its labels) resized by ``factor``, as a labelled data folder."""
    from skimage import io as skio
    from skimage.transform import resize

    from napari_medseg.core.resources import resource_path

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    image = skio.imread(resource_path("samples", "histology_he.png"))[..., :3]
    truth = tifffile.imread(resource_path("samples", "histology_he_labels.tif"))
    size = tuple(round(n * factor) for n in truth.shape)
    small = resize(image, size, order=1, anti_aliasing=True, preserve_range=True).round().astype(np.uint8)
    skio.imsave(root / "images" / "he.png", small, check_contrast=False)
    tifffile.imwrite(root / "labels" / "he.tif", resize(truth, size, order=0, anti_aliasing=False,
                                                      preserve_range=True).astype(np.int32))
    return root


def test_evaluate_resamples_images_scanned_at_another_magnification(tmp_path, capsys):
    """H&E weights trained at 0.25 µm/px on the H&E sample halved (a 20x scan): scored at the model's
    pixel size (--scale 2, or --pixel-size 0.5 through the card) they find the nuclei they miss
    unresampled (measured: AJI 0.521 vs 0.333, F1 0.634 vs 0.337); scores stay on the images' grid."""
    data = _he_folder(tmp_path / "half", 0.5)
    scores = {}
    for flags in (["--scale", "1"], ["--scale", "2"], ["--pixel-size", "0.5"]):
        assert main(["evaluate", "--weights", "gca_resunet_lite_monuseg2018", "--data", str(data),
                     "--tta", "1", "--json", *flags]) == 0
        result = json.loads(capsys.readouterr().out)
        scores[flags[1]] = (result["scale"], result["mean"])
    assert scores["0.5"] == scores["2"] and scores["2"][0] == 2.0
    assert scores["2"][1]["aji"] > scores["1"][1]["aji"] + 0.1
    assert scores["2"][1]["f1"] > scores["1"][1]["f1"] + 0.1


def test_evaluate_refuses_scales_it_cannot_apply(tmp_path, capsys):
    data = _he_folder(tmp_path / "half", 0.5)
    base = ["evaluate", "--data", str(data)]
    assert main(base + ["--weights", "vunet_lite_dsb2018", "--pixel-size", "0.5"]) == 2
    assert "records no training pixel size" in capsys.readouterr().err
    assert main(base + ["--weights", "gca_resunet_lite_monuseg2018", "--scale", "2", "--pixel-size", "1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(base + ["--weights", "gca_resunet_lite_monuseg2018", "--scale", "20"]) == 2
    assert "between 0.125 and 8" in capsys.readouterr().err
    assert main(base + ["--weights", "gca_resunet_lite_monuseg2018", "--split", "val", "--tune-decode",
                        "--scale", "2"]) == 2
    assert "--tune-decode chooses thresholds at the weights' own pixel size" in capsys.readouterr().err
