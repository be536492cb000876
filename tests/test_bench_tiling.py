"""The tiling benchmark's cheapest parts run, and its table and JSON have the expected structure.

Structure only: rows present, numbers finite, statuses known. No timing is asserted (benchmarks
print tables; this machine is shared and noisy).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from standin_models import TinyEquivariantNet, TinyPooledNet, make

from napari_medseg.cli import main
from napari_medseg.core.bench_probes import monai_window
from napari_medseg.core.bench_quality import (disk_centres, seam_offset_grids, seam_vs_whole,
                                              stitching_check)
from napari_medseg.core.bench_tiling import (BenchConfig, BenchReport, Row, format_table,
                                             run_tiling_bench)

STATUSES = {"pass", "fail", "info", "skipped", "error"}


def _assert_rows(rows, parts):
    assert rows and {r.part for r in rows} == set(parts)
    for row in rows:
        assert row.status in STATUSES and row.check and row.measured and row.target
        assert row.value is None or math.isfinite(row.value)


def test_stitching_part_one_process_vs_two_dask_workers(tmp_path):
    config = BenchConfig.quick_preset(parts=("stitching",), stitch_size=256, workdir=str(tmp_path))
    report = run_tiling_bench(config, log=lambda message: None)
    _assert_rows(report.rows, ["stitching"])
    assert len(report.rows) == 3   # splits, duplicates, 1 vs 2 workers
    assert all(r.status != "error" for r in report.rows), [r.measured for r in report.rows]
    details = report.rows[0].details
    assert details["objects_whole"] > 0 and details["blocks"] == 4
    assert {"splits", "merges", "duplicates", "identical"} <= set(details)


def test_disks_sit_on_block_borders_and_corners():
    disks = disk_centres(512, 128, radius=12, big_radius=40)
    assert any(y % 128 == 0 and x % 128 == 0 for y, x, _ in disks)       # corners
    assert any(y % 128 == 0 and x % 128 == 64 for y, x, _ in disks)      # borders
    assert any(r == 40 for _, _, r in disks)                             # wider than a 32 px halo


def test_stitching_check_without_dask(tmp_path):
    result = stitching_check(tmp_path, size=256, workers=0)
    assert result["objects_blockwise"] == result["objects_whole"] > 0
    assert "identical" not in result
    for key in ("splits", "merges", "mismatched_pixels", "duplicates"):
        assert isinstance(result[key], int) and result[key] >= 0


def test_seam_measurements_return_finite_numbers(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (512, 512)).astype(np.uint8)
    equivariant = make(TinyEquivariantNet)
    tiled = seam_vs_whole(image, equivariant, {}, tmp_path, tile=128)
    assert math.isfinite(tiled["max_abs"]) and tiled["tiles"] > 1
    grids = seam_offset_grids(image, make(TinyPooledNet), {}, tmp_path)
    assert grids["shift"] == (grids["tile"] - grids["overlap"]) // 2
    assert grids["border_pixels"] > 0 and grids["interior_pixels"] > 0
    assert all(math.isfinite(grids[k]) for k in ("border_mean", "border_max", "interior_mean",
                                                  "interior_max"))


def test_monai_window_matches_the_engine_stride():
    for mode, tile, overlap, stride in (("crop", 1024, 96, 1024), ("blend", 256, 64, 192)):
        roi, fraction = monai_window(mode, tile, overlap)
        assert int(roi * (1 - fraction)) == stride   # MONAI's own scan-interval formula


def test_table_and_json_structure():
    rows = [Row("overhead", "segment() / bare", "1.05 (10 s / 9.5 s)", "≤ 1.25", "pass", 1.05),
            Row("seams", "abs|Δp| with a pipe", "border 1e-3 | interior 1e-3", "report", "info", 1.0),
            Row("monai", "monai part", "error: boom", "-", "error")]
    report = BenchReport("napari-medseg bench tiling --quick",
                         {"cpus": 2, "torch": "x", "torch_threads": 1, "model": "reseg_unet",
                          "monai": "not installed"}, rows, 1.0)
    table = format_table(report).splitlines()
    body = [line for line in table if line.startswith("| ") and not line.startswith("| part")]
    assert len(body) == len(rows) and all(line.count("|") == 6 for line in body)
    assert any("napari-medseg bench tiling --quick" in line for line in table)
    assert [r.check for r in report.failed] == ["monai part"]
    data = json.loads(report.to_json())
    assert data["command"] and len(data["rows"]) == 3 and data["rows"][0]["value"] == 1.05


def test_config_checks_and_command():
    config = BenchConfig.quick_preset()
    assert config.quick and max(config.sizes) <= 1024
    assert config.command().split().count("--quick") == 1
    with pytest.raises(ValueError, match="part"):
        BenchConfig(parts=("speed",))
    with pytest.raises(ValueError, match="model"):
        BenchConfig(model="unet3000")


def test_cli_runs_the_tiling_bench_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    status = main(["bench", "tiling", "--quick", "--parts", "stitching", "--stitch-size", "256",
                   "--workers", "0", "--json", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "| part | check | measured | target | result |" in printed
    assert "napari-medseg bench tiling --quick" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["part"] for r in rows] == ["stitching", "stitching"]


