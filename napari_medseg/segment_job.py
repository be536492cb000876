"""The Segment widget's job, Qt-free: load weights, segment, summarise objects, as one generator.

The widget builds a :class:`SegmentRequest` from its controls and runs :func:`segment_job` in a
napari worker; tests and scripts can drain it synchronously. Re-running onto an existing output:

- same settings: the engine resumes (nothing is recomputed; the user's edits stay);
- different settings, labels never edited: the output is replaced (it holds only model output);
- different settings, labels edited by hand: :class:`EditedOutputError` is raised before anything
  is written, and the widget asks whether to write a new output (:func:`free_output_path`) or to
  replace the edits (``replace_edited=True``).
"""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .core.inference_plan import InferenceSettings
from .core.io import ImageSource
from .core.pipeline import SegmentationResult, load_model, run_segmentation
from .core.progress import JobGenerator, Progress
from .core.store import OutputStore, OutputStoreError, default_output_path, is_engine_store
from .layer_data import run_layers
from .review import labels_edited, object_table

DEFAULT_OUTPUT_FOLDER = Path.home() / "napari-medseg"
DISPLAY_WAIT_S = 10.0   # longest pause for the GUI to add the output's layers (see SegmentRequest)


class EditedOutputError(OutputStoreError):
    """The output exists with hand-edited labels and was made with other settings."""

    def __init__(self, path: Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path} holds labels you edited by hand and was made with other settings "
                         f"({reason}); write to a new output, or confirm replacing the edits")


@dataclass(frozen=True)
class SegmentRequest:
    """Everything a run needs, resolved on the GUI thread from the widget's controls.

    Attributes:
        source: the image to segment (an :class:`ImageSource` or anything ``open_image`` takes).
        model_name: one of ``src_models.list_models()``.
        weights: weights path/stem, ``"random"``, or None for the bundled starter weights.
        output: output ``.zarr`` path.
        settings: engine settings (``overwrite`` stays False: see the module docstring).
        replace_edited: the user confirmed replacing hand-edited labels.
        summarize_objects: compute per-object uncertainty after the labels.
        display_name: name of the image layer the outputs will be shown over; when set, the job
            reads the output's layer data itself (:func:`~napari_medseg.layer_data.run_layers`)
            and yields it once the output exists (stage ``"output"``, in ``payload``), so the GUI
            thread never waits for the store while the engine is busy with it.
        display_ready: a ``threading.Event`` the GUI sets once it has added those layers; the job
            waits for it (at most :data:`DISPLAY_WAIT_S`) before going on, so the engine does not
            compete for the CPU with napari building them (a few hundred ms per layer).
    """

    source: Any
    model_name: str
    weights: str | None
    output: Path
    settings: InferenceSettings
    replace_edited: bool = False
    summarize_objects: bool = True
    display_name: str | None = None
    display_ready: Any = None


@dataclass(frozen=True)
class JobOutcome:
    """:func:`segment_job`'s result: the engine's result, the object table (or None), the output."""

    result: SegmentationResult
    objects: Any
    output: Path
    replaced: bool
    seconds: float


def segment_job(request: SegmentRequest) -> JobGenerator[JobOutcome]:
    """Load the model, run :func:`~napari_medseg.core.pipeline.run_segmentation`, then the
    per-object uncertainty table; yields :class:`Progress` throughout (first ``"loading"``)."""
    started = time.perf_counter()
    name = request.model_name
    yield Progress("loading", 0, 0, f"loading {name} weights")
    # napari's Labels layer imports pandas (about 1 s) when the GUI adds it: do it here instead.
    import pandas  # noqa: F401
    model, card = load_model(name, request.weights, request.settings.device)
    yield Progress("preparing", 0, 0, "sampling image statistics, preparing the output")
    job, first, replaced = _start(request, model, card)
    if request.display_name is not None:
        layers = run_layers(OutputStore.open(request.output), request.display_name)
        yield Progress("output", 0, 0, "output ready", payload=layers)
        if request.display_ready is not None:
            request.display_ready.wait(DISPLAY_WAIT_S)
    if first is not None:
        yield first
    result = yield from job
    table = None
    store = OutputStore.open(result.output)
    if request.summarize_objects and store.status("labels")["chunks_done"]:
        table = yield from object_table(store)
    return JobOutcome(result, table, Path(result.output), replaced, time.perf_counter() - started)


def outcome_summary(outcome: JobOutcome) -> str:
    """One line for the status bar: time, device, objects, labels status, output."""
    result = outcome.result
    objects = len(outcome.objects) if outcome.objects is not None else result.objects
    if result.maps.blocks_run == 0 and result.maps.blocks_resumed:
        return f"Already segmented (your edits are kept): {objects} objects. Output: {outcome.output}"
    replaced = " (replacing an earlier output made with other settings)" if outcome.replaced else ""
    return (f"Done in {outcome.seconds:.0f} s on {result.maps.device}: {objects} objects, "
            f"labels {result.labels_status}. Output: {outcome.output}{replaced}")


def _start(request: SegmentRequest, model, card):
    """The engine job and its first record, replacing an existing output only when allowed."""
    settings = request.settings
    job = run_segmentation(request.source, model, card, request.output, settings)
    try:
        return job, next(job), False
    except StopIteration as stop:
        return _finished(stop.value), None, False
    except OutputStoreError as exc:
        output = Path(request.output)
        if not is_engine_store(output):
            raise
        if labels_edited(OutputStore.open(output, mode="r")) and not request.replace_edited:
            raise EditedOutputError(output, _reason(str(exc))) from None
    settings = dataclasses.replace(settings, overwrite=True)
    job = run_segmentation(request.source, model, card, request.output, settings)
    try:
        return job, next(job), True
    except StopIteration as stop:
        return _finished(stop.value), None, True


def _finished(value):
    """A generator that yields nothing and returns ``value``."""
    return value
    yield  # noqa: unreachable (makes this a generator)


def _reason(message: str) -> str:
    found = re.search(r"\((made with different settings[^)]*)\)", message)
    return found.group(1) if found else message


def output_path(image_path: str | None, image_name: str, model_name: str,
                folder: str | Path | None) -> Path:
    """Where a run writes: ``<folder>/<image>.<model>.medseg.zarr`` when a folder is chosen, else
    next to the image file, else in :data:`DEFAULT_OUTPUT_FOLDER`."""
    if folder:
        return Path(folder).expanduser() / f"{_safe(image_name)}.{model_name}.medseg.zarr"
    if image_path:
        return default_output_path(image_path, model_name)
    return DEFAULT_OUTPUT_FOLDER / f"{_safe(image_name)}.{model_name}.medseg.zarr"


def free_output_path(path: Path) -> Path:
    """``name-2.medseg.zarr``, ``name-3...``: the first that does not exist yet."""
    path = Path(path)
    base = path.name[: -len(".medseg.zarr")] if path.name.endswith(".medseg.zarr") else path.stem
    base = re.sub(r"-\d+$", "", base)
    for n in range(2, 10_000):
        candidate = path.with_name(f"{base}-{n}.medseg.zarr")
        if not candidate.exists():
            return candidate
    raise OutputStoreError(f"no free output name next to {path}; choose another output folder")


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "image"


def image_source_from_layer(layer, dims_point=None) -> tuple[ImageSource, str | None]:
    """The image of a napari image layer as an :class:`ImageSource`, and its file path.

    A layer opened from a file is read from the file (its pyramid then serves the normalisation
    statistics) when the file holds exactly what the layer shows; otherwise the layer's level-0
    data is read: RGB channel-last, and axes before ``y, x`` fixed at the viewer's current
    position (``dims_point``, in the layer's data coordinates).
    """
    from .core.io import ImageInputError, open_image

    data = layer.data[0] if layer.multiscale else layer.data
    shape = tuple(data.shape)
    path = getattr(layer.source, "path", None)
    if path and Path(path).exists():
        try:
            source = open_image(path)
        except ImageInputError:
            source = None
        yx = shape[-3:-1] if layer.rgb else shape[-2:]
        plain = len(shape) == (3 if layer.rgb else 2)
        if source is not None and plain and source.shape == yx \
                and source.channels == (3 if layer.rgb else 1):
            return source, path
    spatial = 3 if layer.rgb else 2
    extra = "ztqabdefghijklmnoprsuvw"[: len(shape) - spatial][::-1]
    index = {}
    if extra:
        point = list(dims_point) if dims_point is not None else [0] * len(shape)
        for i, letter in enumerate(extra):
            index[letter] = int(min(max(round(point[i]), 0), shape[i] - 1))
    axes = extra + ("yxc" if layer.rgb else "yx")
    return open_image(data, axes=axes, index=index or None), path


class TimeLeft:
    """Estimate of the time left in the current stage from the pace so far (seconds or None)."""

    def __init__(self):
        self.stage = None
        self.start = None

    def update(self, record: Progress, now: float | None = None) -> float | None:
        now = time.perf_counter() if now is None else now
        if record.stage != self.stage or self.start is None or record.done < self.start[1]:
            self.stage, self.start = record.stage, (now, record.done)
            return None
        began, done_then = self.start
        done = record.done - done_then
        if done <= 0 or not record.total:
            return None
        return (now - began) / done * max(0, record.total - record.done)


def format_seconds(seconds: float | None) -> str:
    """``"about 3 min left"``, ``"about 20 s left"``, ``"a few seconds left"``; ``""`` if unknown."""
    if seconds is None:
        return ""
    if seconds < 10:
        return "a few seconds left"
    if seconds < 60:
        return f"about {int(round(seconds / 5) * 5)} s left"
    if seconds < 3600:
        return f"about {int(round(seconds / 60))} min left"
    return f"about {seconds / 3600:.1f} h left"
