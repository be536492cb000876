"""``napari-medseg bench models``: the model table and the starter-weights table of the README."""
from __future__ import annotations

from src_models import list_models, read_card

from napari_medseg.cli import main
from napari_medseg.core.bench_models import _earlier_runs, model_table, starter_table
from napari_medseg.core.resources import starter_weights


def test_starter_table_reads_every_bundled_card():
    text = starter_table([{"model": m, "lite_cpu_mpx_s": 0.5, "speed_vs_fastest": 1.0} for m in list_models()])
    rows = text.splitlines()[2:]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == list(list_models())
    for name, row in zip(list_models(), rows):
        path = starter_weights(name)
        if path is None:
            assert "no starter weights yet" in row
            continue
        f1 = read_card(path)["metrics"]["validation"]["mean"]["f1"]
        assert f"| {f1:.3f} |" in row and "0.500 (1.00)" in row


def test_cli_bench_models_quick_prints_both_tables(capsys):
    assert main(["bench", "models", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "| model | paper params (ours) |" in out and "| model | val F1@0.5 |" in out


def test_model_table_counts_parameters():
    rows = {r["model"]: r for r in model_table(speed=False, macs=False)}
    assert rows["vunet"]["paper_params"] == 6_908_057 and rows["gca_resunet"]["paper_params"] == 48_982_089


def test_earlier_runs_sum_the_whole_warm_start_lineage():
    lineage = {"steps_done": 1262, "init": {"steps_done": 231, "init": {"steps_done": 379, "init": None}}}
    assert _earlier_runs(lineage) == ", after 1872 in 3 earlier runs"
    assert _earlier_runs({"steps_done": 610}) == ", after 610 in an earlier run"   # an older card
    assert _earlier_runs(None) == ""
