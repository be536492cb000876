"""The output zarr group of a segmentation run: maps, labels, pyramid, provenance, progress.

Layout (zarr format 2, OME-NGFF 0.4 ``multiscales`` on each image group, ``/`` chunk keys)::

    OUTPUT.zarr/                 attrs["napari_medseg"]: marker, layout, provenance, stage status
      probs/0, probs/1, ...      (K, H_l, W_l) class probabilities; uint8 (p · 255, rounded) by
                                 default, or float16/float32 (layout.probs_dtype)
      <map>/0, <map>/1, ...      (k, H_l, W_l) every auxiliary map of the model (float16 default)
      labels/0, labels/1, ...    (H_l, W_l) uint32 instance labels (uint64 beyond 65,535² pixels),
                                 0 = background, written by the instance step
                                 (:mod:`napari_medseg.core.instances`)
      _progress/<stage>          (ceil(H/chunk), ceil(W/chunk)) uint8: 1 = chunk written, per stage
                                 ("maps", "labels"); chunked per superblock so that parallel
                                 workers never share a progress chunk
      _progress/nonfinite        int64: NaN/inf input pixels counted per block

Level ``l`` is downsampled by ``2**l`` (mean for maps, nearest = top-left pixel for labels) and
chunked by ``chunk >> l``, so a chunk-aligned block of level 0 maps onto whole chunks of every
level: each block writes its own pyramid right after its level-0 data, with no second pass.
uint8 probabilities cost a quarter of float32, and 1/255 steps are below what a viewer or a
0.5 threshold can tell apart; float32 is there for exact comparisons.

Safety: an existing path is used only when it carries this engine's marker attribute. Another
folder, even with overwrite, is never touched; an engine store is replaced only with overwrite.
"""
from __future__ import annotations

import datetime
import errno
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .pyramid import CHUNK_KEYS, create_pyramid, decode, encode, pyramid_blocks
from .store_layout import MapInfo, OutputStoreError, StoreLayout, labels_dtype  # noqa: F401 (re-exported)

MARKER = "napari_medseg"
STORE_FORMAT = 1
PROBS = "probs"
LABELS = "labels"
STAGES = ("maps", "labels")
CREATING = "creating"   # maps status while the arrays are being created


def default_output_path(input_path: str | os.PathLike, model_name: str) -> Path:
    """``<folder>/<input stem>.<model>.medseg.zarr`` next to the input."""
    path = Path(input_path)
    stem = path.name
    for suffix in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return path.with_name(f"{stem}.{model_name}.medseg.zarr")


class OutputStore:
    """An engine-made output group. Create with :meth:`create`/:meth:`prepare`, reopen with :meth:`open`.

    For the instance step: ``store.array("probs")`` (raw ``(K, H, W)``, uint8 = p·255; or
    :meth:`read_map` for float32), ``store.labels()`` (``(H, W)``, chunks ``layout.chunk``), blocks
    of ``layout.superblock`` (a multiple of the chunk); per block either :meth:`write_labels`
    (level 0 + pyramid) or a direct write to ``labels()`` followed by :meth:`refresh_pyramid`, then
    ``mark_done(region, stage="labels")``; at the end ``set_stage_status("labels", "complete")``.
    """

    def __init__(self, group, path: Path):
        self.group = group
        self.path = path
        self.layout = StoreLayout.from_dict(dict(group.attrs)[MARKER]["layout"])
        self._arrays: dict = {}   # opening a zarr array reads its metadata: do it once

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r+") -> "OutputStore":
        """Open an engine-made store (``mode="r"`` for reading only)."""
        import zarr

        path = Path(path)
        if not is_engine_store(path):
            raise OutputStoreError(f"{path} is not an output of napari-medseg (no {MARKER!r} marker)")
        return cls(zarr.open_group(str(path), mode=mode), path)

    @classmethod
    def prepare(cls, path: str | os.PathLike, layout: StoreLayout, run: dict, run_key: dict, *,
                overwrite: bool = False, resume: bool = True) -> tuple["OutputStore", bool]:
        """Create a store, or reopen one to resume the same run.

        Args:
            path: output folder (``.zarr``).
            layout: shapes and encodings.
            run: provenance (model, sha256, tile, ...), stored in the attributes.
            run_key: the settings a resumed run must share with the stored one.
            overwrite: replace an existing engine-made store (never anything else).
            resume: reuse an existing store made with the same ``run_key`` and ``layout``.

        Returns:
            ``(store, resumed)``.
        """
        path = Path(path).expanduser()
        if path.exists() and not _is_empty_dir(path):
            if not is_engine_store(path):
                raise OutputStoreError(
                    f"{path} already exists and was not made by napari-medseg; it is left untouched. "
                    "Choose another output path")
            store = cls.open(path)
            if not overwrite and store.attrs["stages"]["maps"] != CREATING:
                changed = store._differences(layout, run_key)
                if resume and not changed:
                    return store, True
                why = f"made with different settings ({'; '.join(changed)})" if changed else "resume=False"
                raise OutputStoreError(
                    f"{path} already exists ({why}); pass overwrite=True (CLI: --overwrite) to replace "
                    "it, or choose another output path")
            _check_writable(path.parent)
            shutil.rmtree(path)
        return cls.create(path, layout, run, run_key), False

    @classmethod
    def create(cls, path: Path, layout: StoreLayout, run: dict, run_key: dict) -> "OutputStore":
        """Create a new store with every array (filled with 0) and the marker attributes."""
        import zarr

        _check_writable(path.parent)
        try:
            group = zarr.open_group(str(path), mode="w", zarr_format=2)
            # Marker first: a creation cut short leaves a store this engine may replace.
            group.attrs[MARKER] = _jsonable({
                "created_by": "napari-medseg", "format": STORE_FORMAT,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "layout": layout.to_dict(), "run": run, "run_key": run_key,
                "stages": {"maps": CREATING, "labels": "not started"},
            })
            _create_arrays(group, layout)
            store = cls(group, path)
            store.set_stage_status("maps", "incomplete")
        except OSError as exc:
            raise _write_error(path, exc) from None
        return store

    def _differences(self, layout: StoreLayout, run_key: dict) -> list[str]:
        stored = dict(self.group.attrs)[MARKER]
        wanted = {"layout." + k: v for k, v in _jsonable(layout.to_dict()).items()}
        wanted.update(_jsonable(run_key))
        have = {"layout." + k: v for k, v in _jsonable(stored["layout"]).items()}
        have.update(_jsonable(stored.get("run_key", {})))
        keys = list(wanted) + [k for k in have if k not in wanted]   # a setting only one side records
        return [f"{k}: stored {have.get(k)!r}, now {wanted.get(k)!r}" for k in keys if have.get(k) != wanted.get(k)]

    # ------------------------------------------------------------------ reading
    @property
    def map_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.layout.maps)

    def array(self, name: str, level: int = 0):
        """The raw zarr array of a map (``(k, H_l, W_l)``) or of ``"labels"`` (``(H_l, W_l)``)."""
        return self._array(f"{name}/{level}")

    def _array(self, key: str):
        if key not in self._arrays:
            self._arrays[key] = self.group[key]
        return self._arrays[key]

    def labels(self, level: int = 0):
        """The ``(H_l, W_l) uint32`` labels array of a level."""
        return self.array(LABELS, level)

    def read_map(self, name: str, region: tuple[int, int, int, int] | None = None,
                 level: int = 0) -> np.ndarray:
        """Decoded ``(k, h, w) float32`` values of a map (uint8 probabilities divided by 255)."""
        array = self.array(name, level)
        y0, y1, x0, x1 = region or (0, array.shape[-2], 0, array.shape[-1])
        return decode(np.asarray(array[:, y0:y1, x0:x1]))

    @property
    def attrs(self) -> dict:
        """The engine's attributes (layout, run provenance, stage status)."""
        return dict(self.group.attrs)[MARKER]

    def done_chunks(self, stage: str = "maps") -> np.ndarray:
        """``(ceil(H/chunk), ceil(W/chunk)) bool``: chunks a stage has written."""
        return np.asarray(self._array(f"_progress/{stage}")[...]).astype(bool)

    def is_done(self, region, stage: str = "maps") -> bool:
        """Whether every chunk of a (chunk-aligned) region is written for a stage."""
        cy0, cy1, cx0, cx1 = self._cells(region)
        return bool(np.all(self._array(f"_progress/{stage}")[cy0:cy1, cx0:cx1]))

    def nonfinite_pixels(self) -> int:
        """NaN/inf input pixels counted in the blocks written so far."""
        return int(np.asarray(self._array("_progress/nonfinite")[...]).sum())

    def status(self, stage: str = "maps") -> dict:
        """``{"status": "complete"|"incomplete", "chunks_done": n, "chunks_total": N}``."""
        done = self.done_chunks(stage)
        total, count = int(done.size), int(done.sum())
        return {"status": "complete" if count == total else "incomplete",
                "chunks_done": count, "chunks_total": total}

    # ------------------------------------------------------------------ writing
    def write_maps(self, region, maps: dict[str, np.ndarray]) -> None:
        """Write maps of a chunk-aligned block and their pyramid levels.

        Args:
            region: ``(y0, y1, x0, x1)`` of level 0, aligned to the chunks.
            maps: ``{name: (k, h, w) float32}`` for maps of the layout.
        """
        self._check_aligned(region)
        for name, data in maps.items():
            self._write_levels(name, region, data, first_level=0)

    def write_labels(self, region, labels: np.ndarray) -> None:
        """Write a chunk-aligned ``(h, w)`` block of labels (cast to the labels dtype) and its pyramid."""
        self._check_aligned(region)
        data = np.asarray(labels, dtype=labels_dtype(self.layout.image_shape))[None]
        self._write_levels(LABELS, region, data, first_level=0)

    def refresh_pyramid(self, name: str, region) -> None:
        """Rebuild levels ≥ 1 of a chunk-aligned block from level 0, e.g. after the instance step
        or a user edit wrote ``labels/0`` directly."""
        self._check_aligned(region)
        y0, y1, x0, x1 = region
        if name == LABELS:
            data = np.asarray(self.labels()[y0:y1, x0:x1])[None]
        else:
            data = self.read_map(name, region)
        self._write_levels(name, region, data, first_level=1)

    def _write_levels(self, name: str, region, data: np.ndarray, first_level: int) -> None:
        """Downsample ``(k, h, w)`` level-0 data and write levels ``first_level`` and up."""
        is_labels = name == LABELS
        encoding = self.layout.probs_dtype if name == PROBS else self.layout.maps_dtype
        method = "nearest" if is_labels else "mean"
        for level, (ys, xs), block in pyramid_blocks(region, data, self.layout.levels, method):
            if level < first_level:
                continue
            if is_labels:
                self._write(self.labels(level), (ys, xs), block[0])
            else:
                self._write(self.array(name, level), (slice(None), ys, xs), encode(block, encoding))

    def mark_done(self, region, stage: str = "maps", nonfinite: int = 0) -> None:
        """Record that a stage has written every chunk of a (chunk-aligned) block."""
        cy0, cy1, cx0, cx1 = self._cells(region)
        self._write(self._array(f"_progress/{stage}"), (slice(cy0, cy1), slice(cx0, cx1)), 1)
        if nonfinite:
            self._write(self._array("_progress/nonfinite"), (cy0, cx0), nonfinite)

    def set_stage_status(self, stage: str, status: str, **extra) -> None:
        """Set a stage's status (e.g. ``"complete"``) and extra fields in the root attributes."""
        self.update_attrs(stages={**self.attrs["stages"], stage: status}, **extra)

    def update_attrs(self, **fields) -> None:
        """Set fields of the engine's root attributes (e.g. ``reruns``)."""
        attrs = self.attrs
        attrs.update(fields)
        try:
            self.group.attrs[MARKER] = _jsonable(attrs)
        except OSError as exc:
            raise _write_error(self.path, exc) from None

    def _write(self, array, key, value) -> None:
        try:
            array[key] = value
        except OSError as exc:
            raise _write_error(self.path, exc) from None

    def _cells(self, region) -> tuple[int, int, int, int]:
        c = self.layout.chunk
        y0, y1, x0, x1 = region
        return y0 // c, -(-y1 // c), x0 // c, -(-x1 // c)

    def _check_aligned(self, region) -> None:
        c, (height, width) = self.layout.chunk, self.layout.image_shape
        y0, y1, x0, x1 = region
        if y0 % c or x0 % c or (y1 % c and y1 != height) or (x1 % c and x1 != width):
            raise ValueError(f"block {region} is not aligned to the {c}-pixel output chunks")


def _create_arrays(group, layout: StoreLayout) -> None:
    """Every map and labels pyramid, and the progress arrays, all filled with 0."""
    for info in layout.maps:
        dtype = layout.probs_dtype if info.name == PROBS else layout.maps_dtype
        attrs = _pyramid(group, info.name, layout, dtype, info.channels)
        group[info.name].attrs.update({**attrs, "medseg_map": {
            **_jsonable(asdict(info)), "scale": 1 / 255 if dtype == "uint8" else 1.0}})
    labels_attrs = _pyramid(group, LABELS, layout, labels_dtype(layout.image_shape), None)
    group[LABELS].attrs.update({**labels_attrs, "image-label": {"version": "0.4"}})
    grid = tuple(-(-n // layout.chunk) for n in layout.image_shape)
    cells = layout.superblock // layout.chunk
    for name, dtype in [(s, "uint8") for s in STAGES] + [("nonfinite", "int64")]:
        group.create_array(f"_progress/{name}", shape=grid, chunks=(cells, cells),
                           dtype=dtype, fill_value=0, chunk_key_encoding=CHUNK_KEYS)


def _pyramid(group, name: str, layout: StoreLayout, dtype: str, channels: int | None) -> dict:
    return create_pyramid(group, name, layout.image_shape, layout.chunk, layout.levels, dtype,
                          channels, layout.pixel_size, layout.unit)


def is_engine_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zarr group carrying this engine's marker attribute."""
    import zarr

    path = Path(path)
    if not path.is_dir():
        return False
    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # not a zarr group at all
        return False
    return isinstance(attrs.get(MARKER), dict) and attrs[MARKER].get("created_by") == "napari-medseg"


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be written there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".medseg-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputStoreError(
            f"cannot write to {folder} ({exc.strerror or exc}); choose an output folder you can "
            "write to (CLI: -o PATH)") from None


def _write_error(path: Path, exc: OSError) -> OutputStoreError:
    if exc.errno == errno.ENOSPC:
        return OutputStoreError(f"the disk holding {path} is full; free some space and run again: "
                                "blocks already written are kept and the run resumes after them")
    return OutputStoreError(f"cannot write to {path} ({exc.strerror or exc}); check the folder's "
                            "permissions or choose another output path")


def _jsonable(value):
    """Tuples → lists (recursively), so values compare equal to what JSON attributes return."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
