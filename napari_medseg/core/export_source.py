"""What every export starts from: the labels to export, their provenance, and a safe destination.

A :class:`LabelSource` wraps a 2D integer label image of any size (a napari-medseg output store,
a label image on disk, or an in-memory/zarr/dask array) together with what the exporters need
besides the pixels: physical pixel size, the run's provenance (model, weights, date) and the
run's uncertainty maps. Nothing is read when a source is opened.

Every writer writes under a hidden temporary name next to the final file and renames it at the
end (:func:`atomic_output`), so a cancelled, failed or interrupted export never leaves a
half-written file under the final name; an existing file is replaced only when asked to.
"""
from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from src_models.weights_io import temporary_sibling

from .blockwise import block_regions
from .progress import JobGenerator, Progress

SCAN_BLOCK = 1024            # edge of the blocks labels are scanned and measured in
# Unit spellings (OME-Zarr names, symbols, napari/pint names) → (OME-XML symbol, length in cm).
UNITS = {
    "micrometer": ("µm", 1e-4), "micron": ("µm", 1e-4), "um": ("µm", 1e-4), "µm": ("µm", 1e-4),
    "nanometer": ("nm", 1e-7), "nm": ("nm", 1e-7),
    "millimeter": ("mm", 1e-1), "mm": ("mm", 1e-1),
    "centimeter": ("cm", 1.0), "cm": ("cm", 1.0),
    "meter": ("m", 1e2), "m": ("m", 1e2),
}
UNCERTAINTY_KIND = "uncertainty"


class ExportError(ValueError):
    """Bad labels or destination for an export; the message says what to do."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote.

    Attributes:
        path: the file written.
        format: ``"tiff"``, ``"ome-tiff"``, ``"geojson"`` or ``"csv"``.
        objects: objects written (tables and GeoJSON), else None.
        max_label: largest label ID (0 when the labels are empty).
        dtype: pixel type of a label image (``"uint16"``...), else None.
        warnings: things the user should know (e.g. empty labels).
    """

    path: Path
    format: str
    objects: int | None = None
    max_label: int | None = None
    dtype: str | None = None
    warnings: tuple[str, ...] = ()


@dataclass
class LabelSource:
    """Labels to export and what is known about them.

    Attributes:
        labels: ``(H, W)`` integer array-like (numpy, zarr, dask...) sliceable with
            ``labels[y0:y1, x0:x1]`` (steps allowed); read block by block, never whole.
        name: short name for messages and default file names.
        pyramid: exact nearest-neighbour (top-left pixel) downsamples of ``labels`` by ``2**l``
            for ``l = 1, 2...`` when already stored (an output store's labels pyramid); coarser
            levels are read from the coarsest stored level (or ``labels``) with a step.
        pixel_size: ``(y, x)`` physical size of one pixel, or None.
        unit: unit of ``pixel_size`` (any key of :data:`UNITS`).
        provenance: the run's attributes (``model``, ``weights_sha256``, ``date``...), or ``{}``.
        uncertainty: ``{map name: reader}``, each reader taking ``(y0, y1, x0, x1)`` and returning
            ``(k, h, w) float32`` values of one uncertainty map of the run.
        origin: where the labels come from (a path, or ``"napari layer"``).
        warnings: things about the labels every export should report (e.g. an unfinished run).
    """

    labels: object
    name: str = "labels"
    pyramid: list = field(default_factory=list)
    pixel_size: tuple[float, float] | None = None
    unit: str | None = None
    provenance: dict = field(default_factory=dict)
    uncertainty: dict[str, Callable] = field(default_factory=dict)
    origin: str = ""
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_label_array(self.labels)
        if self.pixel_size is not None and self.unit is not None and unit_info(self.unit) is None:
            self.pixel_size, self.unit = None, None   # unknown unit: better none than a wrong one

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of the labels."""
        return tuple(int(n) for n in self.labels.shape)

    def level(self, level: int):
        """``(ceil(H / 2**level), ceil(W / 2**level))`` array-like of a pyramid level (top-left pixel
        of every ``2**level`` square, so labels stay labels)."""
        if level == 0:
            return self.labels
        if level <= len(self.pyramid):
            return self.pyramid[level - 1]
        stored = len(self.pyramid)    # coarser levels: every n-th pixel of the coarsest stored one
        return StridedView(self.level(stored), 2 ** (level - stored))

    @property
    def physical(self) -> tuple[float, float, str] | None:
        """``(size y, size x, OME unit symbol)`` of a pixel, or None when unknown."""
        if self.pixel_size is None:
            return None
        symbol, _ = unit_info(self.unit or "micrometer")
        return float(self.pixel_size[0]), float(self.pixel_size[1]), symbol

    def run_columns(self) -> dict[str, str]:
        """Model and weights provenance as short text fields (empty strings when unknown)."""
        run = self.provenance
        sha = str(run.get("weights_sha256") or "")
        return {"model": str(run.get("model") or ""),
                "weights_version": str(run.get("weights_version") or sha[:12]),
                "weights_sha256": sha}


class StridedView:
    """``array[::step, ::step]`` as a lazy 2D array-like (only the requested pixels are kept)."""

    def __init__(self, array, step: int):
        self.array, self.step = array, step
        height, width = array.shape
        self.shape = (-(-height // step), -(-width // step))
        self.dtype = np.dtype(array.dtype)

    def __getitem__(self, key) -> np.ndarray:
        (y0, y1, _), (x0, x1, _) = (k.indices(n) for k, n in zip(key, self.shape))
        s, (height, width) = self.step, self.array.shape
        return np.asarray(self.array[y0 * s:min(y1 * s, height):s, x0 * s:min(x1 * s, width):s])


class SourceArray:
    """A single-channel :class:`~napari_medseg.core.io.ImageSource` as a 2D array-like."""

    def __init__(self, source):
        self.source = source
        self.shape = source.shape
        self.dtype = source.dtype

    def __getitem__(self, key) -> np.ndarray:
        (y0, y1, ystep), (x0, x1, xstep) = (k.indices(n) for k, n in zip(key, self.shape))
        return self.source.read_region(y0, y1, x0, x1)[0][::ystep, ::xstep]


def unit_info(unit: str | None) -> tuple[str, float] | None:
    """``(OME symbol, length in cm)`` of a unit name, or None when unknown."""
    return UNITS.get(str(unit).strip().lower()) if unit else None


def check_label_array(labels) -> None:
    """Refuse what cannot be labels: non-integer (float, bool) data and non-2D shapes."""
    dtype = np.dtype(labels.dtype)
    if dtype.kind not in "ui":
        raise ExportError(f"labels must be integers, got {dtype} values; export a labels layer "
                          "(napari: right-click the layer → Convert to Labels) or a label image")
    if len(labels.shape) != 2:
        raise ExportError(f"expected 2D labels (H, W), got shape {tuple(labels.shape)}; export one "
                          "plane (e.g. slice the stack first)")


def open_label_source(labels, *, pixel_size: float | tuple[float, float] | None = None,
                      unit: str | None = None, name: str | None = None) -> LabelSource:
    """Open labels for export without reading them.

    Args:
        labels: a napari-medseg output store (``.zarr`` path or :class:`OutputStore`), a label
            image on disk (TIFF, zarr, OME-Zarr), or a 2D integer array-like.
        pixel_size: physical pixel size overriding metadata (one number or ``(y, x)``).
        unit: unit of ``pixel_size`` (default micrometer).
        name: short name (default: from the path).
    """
    from .store import OutputStore, is_engine_store

    if isinstance(labels, OutputStore) or (isinstance(labels, (str, os.PathLike))
                                           and is_engine_store(labels)):
        source = store_source(labels if isinstance(labels, OutputStore) else OutputStore.open(labels, "r"))
    elif isinstance(labels, (str, os.PathLike)):
        source = _file_source(Path(labels).expanduser())
    else:
        source = LabelSource(labels, name or "labels", origin="array")
    if name:
        source.name = name
    if pixel_size is not None:
        size = (float(pixel_size),) * 2 if np.isscalar(pixel_size) else tuple(map(float, pixel_size))
        if min(size) <= 0:
            raise ExportError(f"pixel size must be positive, got {pixel_size}")
        source.pixel_size, source.unit = size, unit or "micrometer"
    return source


def store_source(store) -> LabelSource:
    """The labels of an output store, with its pyramid, pixel size, provenance and uncertainty maps."""
    layout = store.layout
    uncertainty = {info.name: _map_reader(store, info.name)
                   for info in layout.maps if info.kind == UNCERTAINTY_KIND}
    run = dict(store.attrs.get("run") or {})
    status = store.status("labels")
    warnings = () if status["status"] == "complete" else (
        f"the run's labels are unfinished ({status['chunks_done']} of {status['chunks_total']} "
        "chunks): the rest exports as background; run Segment again on the same output to finish",)
    return LabelSource(store.labels(0), _stem(store.path),
                       [store.labels(level) for level in range(1, layout.levels)],
                       tuple(layout.pixel_size) if layout.pixel_size else None, layout.unit,
                       run, uncertainty, str(store.path), warnings)


def _map_reader(store, name: str) -> Callable:
    return lambda region: store.read_map(name, region)


def _file_source(path: Path) -> LabelSource:
    from .io import ImageInputError, open_image

    try:
        image = open_image(path)
    except ImageInputError as exc:
        raise ExportError(f"cannot read labels from {path}: {exc}") from None
    if image.channels != 1:
        raise ExportError(f"{path} has {image.channels} channels; labels must be a single-channel "
                          "integer image (or a napari-medseg output .zarr)")
    return LabelSource(SourceArray(image), _stem(path), pixel_size=image.pixel_size,
                       unit=image.unit, origin=str(path))


def _stem(path) -> str:
    name = Path(path).name
    for suffix in (".medseg.zarr", ".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


# ----------------------------------------------------------------------------- scanning
@dataclass(frozen=True)
class LabelRange:
    """Smallest and largest label of an image (``high == 0``: no object at all).

    Attributes:
        ids: sorted ``(n + 1,)`` array of every ID present, 0 first, when collected (else None).
    """

    low: int
    high: int
    ids: np.ndarray | None = None


def scan_labels(source: LabelSource, block: int = SCAN_BLOCK,
                collect_ids: bool = False) -> JobGenerator[LabelRange]:
    """Read the labels block by block to find their range (and, if asked, every ID present);
    refuse negative labels.

    Yields one :class:`Progress` (stage ``"checking"``) per block; returns a :class:`LabelRange`.
    """
    regions = block_regions(source.shape, (block, block))
    low = high = 0
    found = [np.zeros(1, np.uint64)]
    for done, (y0, y1, x0, x1) in enumerate(regions, start=1):
        part = np.asarray(source.labels[y0:y1, x0:x1])
        if part.size:
            low, high = min(low, int(part.min())), max(high, int(part.max()))
        check_not_negative(low)
        if collect_ids and high:
            found.append(np.unique(part).astype(np.uint64))
        yield Progress("checking", done, len(regions), "checking the labels")
    return LabelRange(low, high, np.unique(np.concatenate(found)) if collect_ids else None)


class RelabeledView:
    """A 2D label array-like whose IDs are replaced by their rank: 0 stays 0, the smallest
    object ID becomes 1, the next 2... (``ids`` sorted, 0 first, holding every ID present)."""

    def __init__(self, array, ids: np.ndarray):
        self.array, self.ids = array, ids
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(np.uint32 if ids.size <= 2**32 else np.uint64)

    def __getitem__(self, key) -> np.ndarray:
        part = np.asarray(self.array[key])
        return np.searchsorted(self.ids, part.astype(np.uint64)).astype(self.dtype)


def check_not_negative(low: int) -> None:
    if low < 0:
        raise ExportError(f"the labels contain negative values (down to {low}); label IDs must be "
                          "0 (background) or positive: relabel them first")


EMPTY_WARNING = "the labels are empty (no object): the export holds background only"


def export_warnings(source: LabelSource, max_label: int) -> tuple[str, ...]:
    """The source's own warnings, plus one when there is no object at all."""
    return source.warnings + ((EMPTY_WARNING,) if max_label == 0 else ())


# ----------------------------------------------------------------------------- destination
def check_destination(final: Path, overwrite: bool) -> None:
    """Refuse an existing file (unless ``overwrite``), a folder, or a missing parent folder."""
    if final.is_dir():
        raise ExportError(f"{final} is a folder; give a file name to export to")
    if final.exists() and not overwrite:
        raise ExportError(f"{final} already exists; choose another name or allow replacing it "
                          "(CLI: --overwrite)")
    if not final.parent.is_dir():
        raise ExportError(f"folder {final.parent} does not exist; create it or choose another")


@contextlib.contextmanager
def atomic_output(path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary path next to ``path``; renamed to ``path`` when the block ends normally and
    removed when it ends with an exception (including a cancelled generator's ``GeneratorExit``).

    Raises:
        ExportError: ``path`` exists (without ``overwrite``), its folder is missing or not
            writable, or the disk is full.
    """
    final = Path(path).expanduser()
    check_destination(final, overwrite)
    try:
        tmp = temporary_sibling(final)
    except OSError as exc:
        raise write_error(final, exc) from None
    try:
        yield tmp
        check_destination(final, overwrite)   # another program may have made it meanwhile
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(final, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_error(final: Path, exc: OSError) -> ExportError:
    """A user-facing error for an ``OSError`` met while writing ``final``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ExportError(f"the disk holding {final.parent} is full; free some space or export "
                           f"elsewhere (nothing was written to {final.name})")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ExportError(f"cannot write to {final.parent} ({exc.strerror}); choose a folder you "
                           "can write to")
    return ExportError(f"export to {final} failed ({exc.strerror or exc}); nothing was written")
