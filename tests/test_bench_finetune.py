"""The simulated user of ``bench finetune``: which objects it corrects, and a smoke run of the CLI."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from napari_medseg.cli import main
from napari_medseg.core.bench_finetune import correct_worst
from napari_medseg.core.resources import resource_path


def _disk(labels, centre, radius, value):
    yy, xx = np.ogrid[: labels.shape[0], : labels.shape[1]]
    labels[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2] = value


def test_correct_worst_fixes_the_worst_objects_first_and_leaves_good_ones():
    truth = np.zeros((120, 160), np.int32)
    predicted = np.zeros_like(truth)
    _disk(truth, (30, 30), 10, 1)          # predicted well
    _disk(predicted, (30, 30), 10, 7)
    _disk(truth, (30, 90), 12, 2)          # missed entirely
    _disk(truth, (90, 40), 10, 3)          # predicted too small
    _disk(predicted, (90, 40), 4, 8)
    _disk(predicted, (90, 120), 8, 9)      # spurious: no nucleus there

    fixed, counts = correct_worst(predicted, truth, 2)
    # two score-0 candidates (the missed nucleus and the spurious object), the larger first
    assert counts == {"redrawn": 0, "added": 1, "erased": 1}
    assert np.all(fixed[truth == 2] > 0) and len(np.unique(fixed[truth == 2])) == 1
    assert not np.any(fixed == 9)
    assert np.array_equal(fixed[truth == 1], predicted[truth == 1])      # the good one untouched
    assert np.array_equal(fixed[truth == 3] > 0, predicted[truth == 3] > 0)  # not fixed yet

    fixed, counts = correct_worst(predicted, truth, 3)
    assert counts == {"redrawn": 1, "added": 1, "erased": 1}
    redrawn = np.unique(fixed[truth == 3])
    assert len(redrawn) == 1 and redrawn[0] not in (0, 8)                 # new ID, whole nucleus
    assert not np.any(fixed == 8)                                         # old fragment erased
    assert np.array_equal(fixed[truth == 1], predicted[truth == 1])
    # more corrections than candidates: everything fixed, nothing invented
    fixed, _ = correct_worst(predicted, truth, 50)
    assert np.array_equal(fixed > 0, (truth > 0) | (predicted == 7))


def test_correct_worst_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        correct_worst(np.zeros((4, 4), np.int32), np.zeros((4, 5), np.int32), 1)


def _folder(root, names):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    samples = resource_path("samples")
    for name in names:
        shutil.copy(samples / f"{name}.png", root / "images" / f"{name}.png")
        shutil.copy(samples / f"{name}_labels.tif", root / "labels" / f"{name}.tif")
    return root


def test_cli_bench_finetune_quick_prints_the_table_and_json(tmp_path, capsys):
    from src_models import create_model, save_weights

    new = _folder(tmp_path / "new", ["histology_he", "brightfield"])
    original = _folder(tmp_path / "original", ["fluorescence_small"])
    save_weights(create_model("pranet_v2", "lite"), tmp_path / "parent",
                 {"version": "test-parent", "tile_size": 128, "classes": ["background", "interior", "boundary"]})
    out = tmp_path / "bench.json"
    status = main(["bench", "finetune", "--quick", "--model", "pranet_v2", "--weights", str(tmp_path / "parent"),
                   "--new-domain", str(new), "--original-domain", str(original), "--ks", "5",
                   "--json", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "| K | corrections |" in printed and "\n| 5 | " in printed
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["k"] == 5 and sum(row["corrections"].values()) == 5 and row["steps"] >= 1
    assert report["new_domain"]["images"] and report["correct_image"] not in report["new_domain"]["images"]
    for domain in ("new", "original"):
        assert 0.0 <= row["after"][domain]["aji"] <= 1.0


def test_cli_bench_finetune_missing_data_is_one_clear_error(tmp_path, capsys):
    assert main(["bench", "finetune", "--new-domain", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
