"""Benchmark: peak memory and time of every export format on a large synthetic label zarr.

    python -m napari_medseg.core.bench_export --sizes 4096,20000 [--workdir DIR] [--formats ...]

For each size, a ``(size, size) uint32`` label zarr of random disks (~40 objects per 1024² block,
chunks of 512) is written block by block, then each format is exported in a fresh subprocess
that reports the peak of ``tracemalloc`` (NumPy and Python allocations of the export itself,
imports excluded) and the process's peak RSS (imports and libraries included) with its growth
during the export. Seconds are measured with tracemalloc on, which slows NumPy-heavy code
several-fold (an 8192² OME-TIFF: ~7 s traced, 1.4 s plain on 2 busy cores). Memory that does
not grow with the size is the point; the test suite checks the 4096² case against a fixed bound.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FORMATS = ("tiff", "ome-tiff", "csv", "geojson")
SUFFIX = {"tiff": ".tif", "ome-tiff": ".ome.tif", "csv": ".csv", "geojson": ".geojson"}
BLOCK = 1024
MODULE = "napari_medseg.core.bench_export"
DISKS_PER_BLOCK = 40

log = logging.getLogger(__name__)


def write_label_zarr(path, size: int, seed: int = 0) -> None:
    """A ``(size, size) uint32`` zarr of random disks, written one 1024² block at a time."""
    import zarr
    from skimage.draw import disk

    array = zarr.create_array(str(path), shape=(size, size), chunks=(512, 512), dtype="uint32",
                              overwrite=True)
    rng = np.random.default_rng(seed)
    columns = -(-size // BLOCK)
    for y in range(0, size, BLOCK):
        for x in range(0, size, BLOCK):
            block = np.zeros((min(BLOCK, size - y), min(BLOCK, size - x)), np.uint32)
            first = ((y // BLOCK) * columns + x // BLOCK) * DISKS_PER_BLOCK
            for i in range(DISKS_PER_BLOCK):
                centre = (rng.integers(0, block.shape[0]), rng.integers(0, block.shape[1]))
                rr, cc = disk(centre, int(rng.integers(4, 14)), shape=block.shape)
                block[rr, cc] = first + i + 1
            array[y:y + block.shape[0], x:x + block.shape[1]] = block


def measure_one(labels_path: str, output: str, fmt: str) -> dict:
    """Export once in this process; peak traced memory, peak RSS and seconds."""
    import resource
    import tracemalloc

    import pandas  # noqa: F401  (imported before measuring: imports are not the export's memory)
    import scipy.ndimage  # noqa: F401
    import skimage.measure  # noqa: F401
    import zarr

    from .export import export_labels
    from .progress import drain

    labels = zarr.open_array(labels_path, mode="r")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    tracemalloc.start()
    started = time.perf_counter()
    result = drain(export_labels(labels, output, fmt, overwrite=True))
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"format": fmt, "traced_peak_mb": round(peak / 2**20, 1), "peak_rss_mb": round(rss, 1),
            "rss_growth_mb": round(rss - before, 1),
            "seconds": round(seconds, 1), "objects": result.objects,
            "file_mb": round(Path(output).stat().st_size / 2**20, 1)}


def run(sizes, formats, workdir: Path) -> list[dict]:
    """Every format at every size, each export in its own subprocess."""
    rows = []
    for size in sizes:
        labels = workdir / f"labels_{size}.zarr"
        started = time.perf_counter()
        write_label_zarr(labels, size)
        log.info("%d²: label zarr written in %.0f s", size, time.perf_counter() - started)
        for fmt in formats:
            output = workdir / f"out_{size}{SUFFIX[fmt]}"
            done = subprocess.run([sys.executable, "-m", MODULE, "--one", str(labels), str(output), fmt],
                                  capture_output=True, text=True, check=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            row = {"size": size, **json.loads(done.stdout.strip().splitlines()[-1])}
            log.info("%s", json.dumps(row))
            rows.append(row)
            output.unlink()
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of the results."""
    lines = ["| labels | format | traced peak MB | peak RSS MB (growth) | seconds (traced) | objects "
             "| file MB |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['size']}² uint32 | {r['format']} | {r['traced_peak_mb']} | "
                     f"{r['peak_rss_mb']} (+{r['rss_growth_mb']}) | {r['seconds']} | "
                     f"{r['objects'] or ''} | {r['file_mb']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,20000")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--workdir", help="scratch folder (kept); default: a temporary folder")
    parser.add_argument("--one", nargs=3, metavar=("LABELS", "OUTPUT", "FORMAT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        sys.stdout.write(json.dumps(measure_one(*args.one)) + "\n")   # the parent reads this line
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sizes = [int(s) for s in args.sizes.split(",")]
    formats = [f.strip() for f in args.formats.split(",")]
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        table = format_table(run(sizes, formats, Path(args.workdir)))
    else:
        with tempfile.TemporaryDirectory() as folder:
            table = format_table(run(sizes, formats, Path(folder)))
    sys.stdout.write(table + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
