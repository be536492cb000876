"""``napari-medseg bench tiling``: the tiled engine measured side by side in one run, as a table.

A benchmark, not a test: it prints a markdown table (measured value, target, pass/fail per row)
with the exact command, and optionally writes JSON. Timings are ratios of runs made one after the
other in the same invocation, because this machine is shared and noisy. Parts (``--parts``):

* ``overhead``: end-to-end :func:`~napari_medseg.core.inference.segment` time over the time of
  the bare forward passes of the same tiles and batches (same process, input already in memory,
  nothing else running), at default settings; and the compute-overlap factor, the time with
  reading/writing on the calling thread (``prefetch=False``) over the time with them overlapped.
* ``monai``: MONAI ``sliding_window_inference`` with the same network, window and stride on the
  image held in memory: time and peak-RSS ratios (each run in a fresh process).
* ``memory``: peak resident memory of full runs at each of ``--sizes`` (fresh processes).
* ``seams``: tiled vs whole-image probabilities (translation-equivariant models), and two blend
  grids offset by half a stride, border bands vs tile interiors (the others).
* ``stitching``: block-wise instances of disks on block borders and corners against the
  whole-image decode, and one process against two Dask worker processes.

All images are a mosaic of a bundled nuclei sample (:func:`~napari_medseg.core.samples.mosaic`)
written as zarr into a scratch folder; models are lite presets with random weights on the CPU.
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .bench_probes import ProbeError, monai_window, run_probe
from .bench_report import BenchReport, Row, environment, format_table  # noqa: F401 (re-exported)
from .bench_report import check as _check
from .bench_report import megabytes as _mb
from .bench_quality import seam_offset_grids, seam_vs_whole, stitching_check
from .inference import InferenceSettings, prepare_run, segment
from .inference_plan import auto_batch_size
from .io import open_image
from .pipeline import load_model
from .progress import drain
from .samples import mosaic, write_mosaic_zarr
from .tile_runner import read_block
from .tiling import block_tiles

PARTS = ("overhead", "monai", "memory", "seams", "stitching")
TARGETS = {"overhead": 1.25, "flatness": 1.15, "peak_bytes": 2e9, "seam": 1e-4, "monai_time": 1.0}


@dataclass(frozen=True)
class BenchConfig:
    """What the tiling benchmark runs (defaults: the full run; :meth:`quick_preset` for a smoke run).

    Attributes:
        model: lite model timed and measured for memory (random weights).
        sizes: image edges of the peak-memory runs (flatness compares the largest to the smallest).
        timing_size: image edge of the overhead and MONAI comparisons.
        seam_size: image edge of the seam measurements (one whole-image forward pass must fit).
        seam_models: models whose seams are measured (by their translation equivariance).
        stitch_size: image edge of the synthetic disks for instance stitching (blocks of 128).
        parts: which parts to run (see the module docstring).
        repeats: timing repeats, interleaved; the best of each kind is reported (this
            machine is noisy: one run can be ±15 %).
        workers: Dask worker processes compared with one process (0: skip that comparison).
        workdir: scratch folder (kept); None: a temporary folder, removed afterwards.
        quick: whether the quick preset filled in the sizes (shown in the command).
    """

    model: str = "reseg_unet"
    sizes: tuple[int, ...] = (4096, 8192, 16384)
    timing_size: int = 4096
    seam_size: int = 1024
    seam_models: tuple[str, ...] = ("reseg_unet", "vunet", "gca_resunet")
    stitch_size: int = 1024
    parts: tuple[str, ...] = PARTS
    repeats: int = 2
    workers: int = 2
    workdir: str | None = None
    quick: bool = False

    def __post_init__(self) -> None:
        from src_models import list_models

        unknown = [m for m in (self.model,) + tuple(self.seam_models) if m not in list_models()]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; choose from {', '.join(list_models())}")
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown:
            raise ValueError(f"unknown benchmark part(s) {unknown}; choose from {', '.join(PARTS)}")
        if not self.sizes or min(self.sizes + (self.timing_size,)) < 64:
            raise ValueError("benchmark sizes must be at least 64 pixels")
        if self.seam_size < 512 or self.stitch_size < 256 or self.repeats < 1 or self.workers < 0:
            raise ValueError("need --seam-size ≥ 512 (two blend tiles), --stitch-size ≥ 256 (two "
                             "blocks), --repeats ≥ 1 and --workers ≥ 0")

    @classmethod
    def quick_preset(cls, **overrides) -> "BenchConfig":
        """Small sizes: the whole benchmark in a couple of minutes on two CPU cores."""
        values = dict(sizes=(512, 1024), timing_size=1024, seam_size=512, stitch_size=512, repeats=1,
                      quick=True)
        return cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})

    def command(self) -> str:
        """The exact command line reproducing this run (thread settings included)."""
        env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
        parts = ["napari-medseg", "bench", "tiling"] + (["--quick"] if self.quick else []) + [
            "--model", self.model, "--sizes", ",".join(map(str, self.sizes)),
            "--timing-size", str(self.timing_size), "--seam-size", str(self.seam_size),
            "--seam-models", ",".join(self.seam_models), "--stitch-size", str(self.stitch_size),
            "--parts", ",".join(self.parts), "--repeats", str(self.repeats),
            "--workers", str(self.workers)]
        return " ".join(filter(None, [env, shlex.join(parts)]))


# ------------------------------------------------------------------------------ the run
class _Context:
    """Scratch folder, cached mosaics and cached engine probes shared by the parts."""

    def __init__(self, config: BenchConfig, folder: Path, log):
        self.config, self.folder, self.log = config, folder, log
        self.engine_runs: dict[int, dict] = {}
        self.env: dict = {}

    def image(self, size: int) -> Path:
        path = self.folder / f"mosaic_{size}.zarr"
        if not path.exists():
            self.log(f"writing a {size}x{size} mosaic to {path}")
            write_mosaic_zarr(path, size, chunk=min(1024, size))
        return path

    def engine_run(self, size: int, fresh: bool = False) -> dict:
        """Default-settings run of the model on a ``size²`` mosaic in a fresh process (cached;
        ``fresh``: run again and keep the faster run's time, peak RSS of the first)."""
        if size not in self.engine_runs or fresh:
            self.log(f"engine run at {size}x{size} in a fresh process")
            output = self.folder / f"engine_{size}.zarr"
            run = run_probe({"kind": "engine", "image": str(self.image(size)), "output": str(output),
                             "model": self.config.model}, self.folder)
            shutil.rmtree(output, ignore_errors=True)
            first = self.engine_runs.setdefault(size, run)
            first["seconds"] = min(first["seconds"], run["seconds"])
        return self.engine_runs[size]


def _bare_forward_seconds(path: Path, model, plan) -> tuple[float, int]:
    """Time in ``model.predict`` alone for the tiles and batches :class:`TileRunner` would run
    (same windows, same empty-tile test, same grouping by shape and batch size)."""
    source, total, count = open_image(path), 0.0, 0
    for block in plan.blocks:
        block_input = read_block(source, plan, block)
        oy, ox, data = block_input.window[0], block_input.window[2], block_input.data
        groups: dict = {}
        for tile in block_tiles(block.region, plan.image_shape, plan.tiles):
            y0, y1, x0, x1 = tile.window
            window = data[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
            if plan.skip_threshold > 0 and float(window.max() - window.min()) < plan.skip_threshold:
                continue
            if tile.pad_to is not None:
                pad = ((0, 0), (0, tile.pad_to[0] - window.shape[1]), (0, tile.pad_to[1] - window.shape[2]))
                window = np.pad(window, pad, mode="reflect" if min(window.shape[1:]) > 1 else "edge")
            groups.setdefault(window.shape, []).append(window)
        for group in groups.values():
            for i in range(0, len(group), plan.batch_size):
                x = torch.from_numpy(np.stack(group[i:i + plan.batch_size]))
                with torch.inference_mode():
                    start = time.perf_counter()
                    model.predict(x, plan.mc_samples)
                    total += time.perf_counter() - start
                count += len(group[i:i + plan.batch_size])
    return total, count


def _timed_segment(path: Path, model, card, output: Path, prefetch: bool):
    settings = InferenceSettings(device="cpu", prefetch=prefetch)
    result = drain(segment(str(path), model, card, output, settings))
    shutil.rmtree(output, ignore_errors=True)
    return result


def _overhead_rows(ctx: _Context) -> list[Row]:
    size, path = ctx.config.timing_size, ctx.image(ctx.config.timing_size)
    model, card = load_model(ctx.config.model, "random", "cpu")
    plan = prepare_run(str(path), model, card, ctx.folder / "plan.zarr", InferenceSettings(device="cpu")).plan
    shutil.rmtree(ctx.folder / "plan.zarr", ignore_errors=True)
    ctx.env["tiles"] = f"{plan.tiles.mode} {plan.tiles.tile} + {plan.tiles.overlap}, batch {plan.batch_size}"
    shapes = {(t.pad_to or (t.window[1] - t.window[0], t.window[3] - t.window[2]))
              for b in plan.blocks for t in block_tiles(b.region, plan.image_shape, plan.tiles)}
    with torch.inference_mode():  # warm-up per input shape: first calls set up kernels and memory
        for shape in sorted(shapes):
            model.predict(torch.rand((plan.batch_size, plan.in_channels) + tuple(shape)))
    bare, on, off, count = [], [], [], 0
    for repeat in range(ctx.config.repeats):
        ctx.log(f"overhead at {size}x{size}, repeat {repeat + 1}/{ctx.config.repeats}: bare forward "
                "passes, then segment() with and without prefetch")
        seconds, count = _bare_forward_seconds(path, model, plan)
        bare.append(seconds)
        on.append(_timed_segment(path, model, card, ctx.folder / "timed_on.zarr", True))
        off.append(_timed_segment(path, model, card, ctx.folder / "timed_off.zarr", False))
    best_on, best_off = min(on, key=lambda r: r.seconds), min(off, key=lambda r: r.seconds)
    ratio, overlap = best_on.seconds / min(bare), best_off.seconds / best_on.seconds
    details = {"bare_seconds": bare, "prefetch_seconds": [r.seconds for r in on],
               "no_prefetch_seconds": [r.seconds for r in off], "tiles": count,
               "engine_tiles_run": best_on.tiles_run, "engine_forward_seconds": best_on.forward_seconds,
               "read_wait_seconds": best_on.read_wait_seconds,
               "write_wait_seconds": best_on.write_wait_seconds}
    return [
        Row("overhead", f"segment() / bare forward passes, {size}², default settings",
            f"{ratio:.2f} ({best_on.seconds:.1f} s / {min(bare):.1f} s, {count} tiles)",
            f"≤ {TARGETS['overhead']}", _check(ratio, TARGETS["overhead"]), ratio, details),
        Row("overhead", "compute-overlap factor: time without / with prefetch",
            f"{overlap:.2f} ({best_off.seconds:.1f} s / {best_on.seconds:.1f} s, {best_on.blocks_run} "
            f"block(s); waits with prefetch: read {best_on.read_wait_seconds:.1f} s, write "
            f"{best_on.write_wait_seconds:.1f} s)" + (" (one block: nothing to overlap)"
                                                      if best_on.blocks_run < 2 else ""),
            "report (> 1: I/O hidden)", "info", overlap, details)]


def _monai_rows(ctx: _Context) -> list[Row]:
    size = ctx.config.timing_size
    ours = ctx.engine_run(size)
    roi, fraction = monai_window(ours["tile_mode"], ours["tile"], ours["overlap"])
    batch = auto_batch_size(torch.device("cpu"), roi)   # the engine's CPU default for this window
    spec = {"kind": "monai", "image": str(ctx.image(size)), "model": ctx.config.model, "roi": roi,
            "overlap": fraction, "batch": batch, "mode": "gaussian",
            "low": ours["normalization"]["low"], "high": ours["normalization"]["high"]}
    runs = []
    for repeat in range(ctx.config.repeats):   # alternate the two, best time of each
        if repeat:
            ours = ctx.engine_run(size, fresh=True)
        ctx.log(f"MONAI sliding_window_inference at {size}x{size} in a fresh process")
        runs.append(run_probe(spec, ctx.folder))
        if "missing" in runs[-1]:
            return [Row("monai", "vs MONAI sliding_window_inference", runs[-1]["missing"],
                        "no slower", "skipped")]
    theirs = dict(runs[0], seconds=min(r["seconds"] for r in runs))
    time_ratio = ours["seconds"] / theirs["seconds"]
    memory_ratio = ours["peak_rss"] / theirs["peak_rss"]
    details = {"engine": ours, "monai": theirs, "roi": roi, "overlap_fraction": fraction, "batch": batch}
    setup = f"window {roi}, stride {int(roi * (1 - fraction))}, gaussian, {size}²"
    return [
        Row("monai", f"time: segment() end to end / MONAI sliding window ({setup})",
            f"{time_ratio:.2f} ({ours['seconds']:.1f} s / {theirs['seconds']:.1f} s)",
            f"≤ {TARGETS['monai_time']:.2f} (no slower)", _check(time_ratio, TARGETS["monai_time"]),
            time_ratio, details),
        Row("monai", f"peak RSS: engine / MONAI, {size}²",
            f"{memory_ratio:.2f} ({_mb(ours['peak_rss'])} / {_mb(theirs['peak_rss'])})",
            "report", "info", memory_ratio, details)]


def _memory_rows(ctx: _Context) -> list[Row]:
    rows, peaks = [], {}
    for size in sorted(ctx.config.sizes):
        run = ctx.engine_run(size)
        peaks[size] = run["peak_rss"]
        rate = size * size / run["seconds"] / 1e6
        rows.append(Row("memory", f"peak RSS, full run at {size}²",
                        f"{_mb(run['peak_rss'])} (before the run {_mb(run['baseline_rss'])}; "
                        f"{run['seconds']:.0f} s, {rate:.2f} MP/s)",
                        f"< {TARGETS['peak_bytes'] / 1e9:.0f} GB",
                        _check(run["peak_rss"], TARGETS["peak_bytes"]), run["peak_rss"], run))
    small, large = min(peaks), max(peaks)
    if large > small:
        growth = peaks[large] / peaks[small]
        first = ctx.engine_runs[small]
        # Below three crop tiles a side every window is clipped by the image border, so the
        # smallest run holds smaller forward passes: a ratio, but no test of flatness.
        clipped = first["tile_mode"] == "crop" and small < 3 * first["tile"]
        rows.append(Row("memory", f"flat: peak RSS {large}² / {small}²", f"{growth:.3f}" + (
            f" (windows clipped at {small}²: flatness needs sizes ≥ {3 * first['tile']})" if clipped else ""),
            f"≤ {TARGETS['flatness']}", "info" if clipped else _check(growth, TARGETS["flatness"]), growth))
    return rows


def _seam_rows(ctx: _Context) -> list[Row]:
    size = ctx.config.seam_size
    image = np.asarray(mosaic(size).compute())
    rows = []
    for name in ctx.config.seam_models:
        model, card = load_model(name, "random", "cpu")
        ctx.log(f"seams of {name} on a {size}x{size} image")
        if model.translation_equivariant:
            r = seam_vs_whole(image, model, card, ctx.folder)
            rows.append(Row("seams", f"{name}: max abs(tiled − whole image) probability, {size}², "
                            f"crop {r['tile']} + halo {r['halo']}, blocks of 512",
                            f"{r['max_abs']:.1e} (mean {r['mean_abs']:.1e})", f"≤ {TARGETS['seam']:.0e}",
                            _check(r["max_abs"], TARGETS["seam"]), r["max_abs"], r))
        else:
            r = seam_offset_grids(image, model, card, ctx.folder)
            ratio = r["border_mean"] / r["interior_mean"] if r["interior_mean"] > 0 else float("nan")
            rows.append(Row("seams", f"{name}: abs Δp, blend grids offset by {r['shift']} px "
                            f"(tile {r['tile']}, overlap {r['overlap']}), {size}²",
                            f"border mean {r['border_mean']:.1e} / max {r['border_max']:.1e}; interior "
                            f"mean {r['interior_mean']:.1e} / max {r['interior_max']:.1e}",
                            "report (border vs interior)", "info", ratio, r))
    return rows


def _stitching_rows(ctx: _Context) -> list[Row]:
    size, workers = ctx.config.stitch_size, ctx.config.workers
    ctx.log(f"instance stitching on {size}x{size} synthetic disks"
            + (f", 1 vs {workers} Dask workers" if workers else ""))
    folder = ctx.folder / "stitching"
    folder.mkdir(exist_ok=True)
    r = stitching_check(folder, size=size, workers=workers)
    setup = (f"{r['objects_whole']} objects ({r['disks']} disks on block borders/corners, 1 wider "
             f"than the halo), blocks {r['block']}, halo {r['halo']}")
    split_ok = r["splits"] == r["merges"] == r["mismatched_pixels"] == 0
    rows = [Row("stitching", f"splits vs whole-image decode; {setup}",
                f"{r['splits']} splits, {r['merges']} merges, {r['mismatched_pixels']} differing pixels",
                "0", "pass" if split_ok else "fail", r["splits"], r),
            Row("stitching", "duplicates (objects owned twice or written in pieces)", str(r["duplicates"]),
                "0", "pass" if r["duplicates"] == 0 else "fail", r["duplicates"], r)]
    if workers:
        same = r["identical"]
        rows.append(Row("stitching", f"labels: 1 process vs {workers} Dask worker processes",
                        ("byte-identical" if same else "DIFFERENT") + f" (sha256 {r['sha256_dask'][:12]}…)",
                        "byte-identical", "pass" if same else "fail", float(same), r))
    return rows


PART_RUNNERS = {"overhead": _overhead_rows, "monai": _monai_rows, "memory": _memory_rows,
                "seams": _seam_rows, "stitching": _stitching_rows}


def run_tiling_bench(config: BenchConfig, log=None) -> BenchReport:
    """Run the selected parts one after the other and collect their rows.

    A part that raises is reported as an ``error`` row (with the message) and the others still run.

    Args:
        config: what to run.
        log: callable receiving one-line progress messages (default: stderr).
    """
    log = log or (lambda message: print(f"bench: {message}", file=sys.stderr, flush=True))
    started = time.perf_counter()
    temporary = config.workdir is None
    folder = Path(tempfile.mkdtemp(prefix="medseg-bench-")) if temporary else Path(config.workdir)
    folder.mkdir(parents=True, exist_ok=True)
    ctx = _Context(config, folder, log)
    report = BenchReport(config.command(), environment(config.model), [])
    try:
        for part in PARTS:
            if part not in config.parts:
                continue
            try:
                report.rows += PART_RUNNERS[part](ctx)
            except (ProbeError, RuntimeError, ValueError, OSError) as exc:
                log(f"{part} failed: {exc}")
                report.rows.append(Row(part, f"{part} part", f"error: {exc}", "-", "error"))
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
    report.environment.update(ctx.env)
    report.seconds = time.perf_counter() - started
    return report


__all__ = ["BenchConfig", "BenchReport", "Row", "PARTS", "TARGETS", "format_table", "run_tiling_bench"]
