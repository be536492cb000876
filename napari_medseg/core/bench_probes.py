"""Measurements of the tiling benchmark that need a fresh process: time and peak resident memory.

Peak resident memory is a per-process high-water mark, so each measured run gets a process of its
own: :func:`run_probe` starts ``python -m napari_medseg.core.bench_probes SPEC.json``, the child
runs one probe and writes its result as JSON next to the spec. Two probes:

* ``"engine"``: :func:`~napari_medseg.core.inference.segment` on a zarr image, default settings
  on the CPU (lite model, random weights), reading and writing the zarr stores out of core.
* ``"monai"``: MONAI ``sliding_window_inference`` with the same network, window and stride on the
  same image held in memory (what MONAI needs: the whole input, output and count map in RAM).

Each child reports its wall time, the peak RSS of the whole process (:func:`peak_rss_bytes`) and
the peak right after imports and model construction (``baseline``), so the engine's own share is
visible.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


class ProbeError(RuntimeError):
    """A benchmark child process failed; the message carries the end of its stderr."""


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this program's own address
    space. Not ``ru_maxrss``: Linux carries the parent's RSS at fork over ``exec`` into the child's
    ``ru_maxrss``, so a child started by a big parent would report the parent's size.
    Elsewhere: ``ru_maxrss`` (bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def run_probe(spec: dict, folder: Path, timeout: float | None = None) -> dict:
    """Run one probe in a fresh Python process and return its JSON result.

    Args:
        spec: ``{"kind": "engine" | "monai", ...}`` (see :func:`engine_probe`, :func:`monai_probe`).
        folder: where the spec and result files are written.
        timeout: seconds before the child is killed (None: no limit).

    Raises:
        ProbeError: the child exited with an error (its last stderr lines are in the message).
    """
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"probe_{spec['kind']}_{time.monotonic_ns()}"
    spec_path, result_path = folder / f"{stem}.json", folder / f"{stem}.result.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    done = subprocess.run([sys.executable, "-m", "napari_medseg.core.bench_probes", str(spec_path)],
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    if done.returncode != 0 or not result_path.exists():
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        raise ProbeError(f"benchmark probe {spec['kind']!r} failed (exit {done.returncode}): {tail}")
    return json.loads(result_path.read_text())


def engine_probe(spec: dict) -> dict:
    """Segment ``spec["image"]`` into ``spec["output"]`` with default settings on the CPU.

    Spec keys: ``image`` (zarr path), ``output`` (new zarr path), ``model`` (registry name).
    The model's receptive field (which sets the crop halo) is measured before the timed call and
    reported as ``receptive_seconds``: MONAI is handed the resulting window for free.
    """
    from .inference import InferenceSettings, segment
    from .pipeline import load_model
    from .progress import drain
    from .tiling import default_tile_settings

    model, card = load_model(spec["model"], "random", "cpu")
    started = time.perf_counter()
    default_tile_settings(model, card)   # measures the receptive field once (cached per process)
    receptive_seconds = time.perf_counter() - started
    baseline = peak_rss_bytes()
    settings = InferenceSettings(device="cpu")
    result = drain(segment(spec["image"], model, card, spec["output"], settings))
    return {"seconds": result.seconds, "forward_seconds": result.forward_seconds,
            "read_wait_seconds": result.read_wait_seconds,
            "write_wait_seconds": result.write_wait_seconds, "tiles_run": result.tiles_run,
            "tiles_skipped": result.tiles_skipped, "blocks": result.blocks_run,
            "status": result.status, "normalization": result.normalization,
            "tile_mode": result.tiles.mode, "tile": result.tiles.tile, "overlap": result.tiles.overlap,
            "receptive_seconds": receptive_seconds, "peak_rss": peak_rss_bytes(),
            "baseline_rss": baseline}


def monai_window(tile_mode: str, tile: int, overlap: int) -> tuple[int, float]:
    """MONAI ``(roi_size, overlap fraction)`` giving the engine's windows and stride.

    Crop mode: window ``tile + 2·halo`` with a stride of ``tile`` (the core); blend mode: window
    ``tile`` with a stride of ``tile - overlap``. MONAI's stride is ``int(roi · (1 - overlap))``,
    so the shared part is taken half a pixel short to land on the same integer after rounding down.
    """
    window = tile + 2 * overlap if tile_mode == "crop" else tile
    shared = window - tile if tile_mode == "crop" else overlap
    return window, (shared - 0.5) / window if shared else 0.0


def monai_probe(spec: dict) -> dict:
    """MONAI ``sliding_window_inference`` on the whole image held in memory.

    Spec keys: ``image`` (zarr path), ``model``, ``roi`` (window edge), ``overlap`` (fraction),
    ``batch`` (windows per forward pass), ``low``/``high`` (the engine's normalisation), ``mode``
    (MONAI blending: ``"gaussian"`` or ``"constant"``). The timed part is the
    ``sliding_window_inference`` call alone; loading the image is reported separately.
    """
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        return {"missing": "MONAI not installed (pip install 'napari-medseg[bench]' or monai)"}
    import numpy as np
    import torch
    import zarr

    from .normalize import Normalization, apply_range, to_model_channels
    from .pipeline import load_model

    model, _ = load_model(spec["model"], "random", "cpu")
    baseline = peak_rss_bytes()
    started = time.perf_counter()
    raw = np.asarray(zarr.open_array(spec["image"], mode="r")[...])
    raw = raw[None] if raw.ndim == 2 else raw
    x = apply_range(to_model_channels(raw, model.config.in_channels),
                    Normalization(spec["low"], spec["high"]))
    x = torch.from_numpy(x)[None]
    del raw
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    with torch.inference_mode():
        out = sliding_window_inference(x, (spec["roi"], spec["roi"]), spec["batch"],
                                       lambda t: model.predict(t)["probs"],
                                       overlap=spec["overlap"], mode=spec.get("mode", "gaussian"))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "load_seconds": load_seconds, "output_shape": list(out.shape),
            "peak_rss": peak_rss_bytes(), "baseline_rss": baseline}


PROBES = {"engine": engine_probe, "monai": monai_probe}


def main(argv: list[str]) -> int:
    """Child entry point: run the probe described by the JSON file ``argv[0]``."""
    spec = json.loads(Path(argv[0]).read_text())
    result = PROBES[spec["kind"]](spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
