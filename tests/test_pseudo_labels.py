"""Mask-only images completed into instance labels by a teacher, and trained on but never validated on."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from skimage import io as skio

from napari_medseg.core.datasets import Sample, load_folder, split
from napari_medseg.core.progress import drain
from napari_medseg.core.pseudo_labels import complete_to_mask, pseudolabel_job
from napari_medseg.core.samples import load_sample, load_sample_labels


def test_completion_keeps_the_teachers_splits_and_the_annotated_foreground():
    mask = np.zeros((8, 12), bool)
    mask[1:7, 1:7] = True          # one blob the teacher splits in two
    mask[2:5, 9:11] = True         # a blob the teacher missed entirely
    predicted = np.zeros((8, 12), np.int32)
    predicted[1:4, 1:5] = 7        # top half, short of the mask's right side
    predicted[4:7, 0:7] = 3        # bottom half, spilling one column left of the mask
    predicted[0, 0:3] = 9          # only outside the mask: dropped
    out = complete_to_mask(mask, predicted)

    assert out.dtype == np.int32
    np.testing.assert_array_equal(out > 0, mask)
    assert sorted(np.unique(out[out > 0])) == [1, 2, 3]          # sequential, the outside one gone
    top, bottom, orphan = out[1, 1], out[6, 1], out[3, 9]
    assert len({top, bottom, orphan}) == 3
    assert (out[1:4, 1:5] == top).all() and (out[4:7, 1:7] == bottom).all()
    assert (out[1, 5:7] == top).all()                             # filled from the nearest instance
    assert (out[2:5, 9:11] == orphan).all()


def test_completion_without_any_prediction_labels_each_component():
    mask = np.zeros((6, 6), np.uint8)
    mask[0:2, 0:2] = 1
    mask[4:6, 3:6] = 1
    out = complete_to_mask(mask, np.zeros((6, 6), np.int32))
    assert out.max() == 2 and (out[0:2, 0:2] == out[0, 0]).all()
    with pytest.raises(ValueError, match="shape"):
        complete_to_mask(mask, np.zeros((5, 6), np.int32))


def _sample(name, pseudo=False):
    return Sample(name, np.zeros((1, 4, 4), np.uint8), np.zeros((4, 4), np.int32), "instances", pseudo=pseudo)


def test_pseudo_labelled_samples_are_trained_on_and_leave_the_validation_split_unchanged():
    real = [_sample(f"real-{i}") for i in range(13)]
    pseudo = [_sample(f"pseudo-{i}", pseudo=True) for i in range(17)]
    train_before, val_before = split(real, 0.15)
    train_after, val_after = split(real + pseudo, 0.15)
    assert [s.id for s in val_after] == [s.id for s in val_before] and len(val_before) == 2
    assert {s.id for s in train_after} == {s.id for s in train_before} | {s.id for s in pseudo}


@pytest.fixture
def mask_only_folder(tmp_path):
    """MoNuSeg-like folder: two H&E crops with masks, one of them with instance labels too."""
    image, labels = load_sample("histology_he"), load_sample_labels("histology_he").astype(np.int32)
    root = tmp_path / "monuseg2018_train"
    for sub in ("images", "instance_labels", "semantic_masks"):
        (root / sub).mkdir(parents=True)
    for stem, (ys, xs) in {"real": (slice(0, 128), slice(0, 128)),
                           "maskonly": (slice(128, 256), slice(160, 288))}.items():
        skio.imsave(root / "images" / f"{stem}.png", image[ys, xs], check_contrast=False)
        skio.imsave(root / "semantic_masks" / f"{stem}.png", (labels[ys, xs] > 0).astype(np.uint8),
                    check_contrast=False)
    tifffile.imwrite(root / "instance_labels" / "real.tif", labels[:128, :128])
    return root, labels[128:256, 160:288] > 0


def test_pseudolabel_job_writes_a_training_folder_and_never_overwrites(mask_only_folder, tmp_path):
    from napari_medseg.core.pipeline import load_model

    source, mask = mask_only_folder
    model, card = load_model("gca_resunet", None, "cpu")
    out = tmp_path / "monuseg_pseudo"
    manifest = drain(pseudolabel_job(model, card, source, out, tta=1))

    assert manifest["ids"] == ["maskonly"] and manifest["real_instance_ids"] == ["real"]
    assert manifest["teacher"]["sha256"] == card["sha256"]
    assert json.loads((out / "pseudo_labels.json").read_text())["ids"] == ["maskonly"]
    completed = tifffile.imread(out / "labels" / "maskonly.tif")
    np.testing.assert_array_equal(completed > 0, mask)
    assert completed.max() > 5                                    # nuclei split, not one blob
    np.testing.assert_array_equal(tifffile.imread(out / "labels" / "real.tif"),
                                  tifffile.imread(source / "instance_labels" / "real.tif"))
    samples = {s.id: s for s in load_folder(out)}
    assert samples["maskonly"].pseudo and not samples["real"].pseudo
    assert sorted(p.name for p in tmp_path.iterdir()) == ["monuseg2018_train", "monuseg_pseudo"]   # no leftovers

    with pytest.raises(FileExistsError, match="choose a new output folder"):
        drain(pseudolabel_job(model, card, source, out, tta=1))


def test_a_failed_job_leaves_nothing_under_any_name(mask_only_folder, tmp_path):
    from napari_medseg.core.pipeline import load_model

    source, _ = mask_only_folder
    model, card = load_model("gca_resunet", None, "cpu")
    job = pseudolabel_job(model, card, source, tmp_path / "out", tta=1)
    next(job)
    job.close()                                                   # cancelled mid-way
    assert sorted(p.name for p in tmp_path.iterdir()) == ["monuseg2018_train"]
    with pytest.raises(FileNotFoundError, match="semantic_masks"):
        drain(pseudolabel_job(model, card, tmp_path, tmp_path / "out2"))
    with pytest.raises(ValueError, match="instance"):
        drain(pseudolabel_job(model, dict(card, task="semantic"), source, tmp_path / "out3"))


def test_cli_pseudolabel_then_train_records_the_teacher(mask_only_folder, tmp_path, capsys):
    from napari_medseg.cli import main
    from napari_medseg.core.resources import starter_weights

    source, _ = mask_only_folder
    out = tmp_path / "completed"
    teacher = starter_weights("gca_resunet")
    assert main(["pseudolabel", "--weights", str(teacher), "--data", str(source), "--out", str(out),
                 "--tta", "1", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["completed"] == 1
    assert main(["pseudolabel", "--weights", str(teacher), "--data", str(source), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err

    weights = tmp_path / "student"
    assert main(["train", "--model", "gca_resunet", "--data", str(out), "--out", str(weights), "--steps", "2",
                 "--batch", "1", "--crop", "64", "--val-split", "0", "--device", "cpu"]) == 0
    capsys.readouterr()
    training = json.loads(weights.with_suffix(".json").read_text())["training"]
    assert training["train_images"] == 2 and training["val_ids"] == []
    assert training["pseudo_labels"]["teacher_sha256"] == json.loads(teacher.with_suffix(".json").read_text())["sha256"]
    assert training["licence"].startswith("CC BY-NC-SA")          # from the manifest's source folder

    assert main(["evaluate", "--weights", str(weights), "--data", str(out), "--tta", "1", "--json"]) == 0
    assert [row["name"] for row in json.loads(capsys.readouterr().out)["per_image"]] == ["real"]
