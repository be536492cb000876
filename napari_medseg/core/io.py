"""Open any input image lazily and read regions of it as ``(C, h, w)`` arrays.

Inputs: zarr v2/v3 arrays, a zarr group holding a single array, OME-Zarr multiscale groups (NGFF
0.4 ``multiscales`` or 0.5 ``ome.multiscales``), TIFF (through ``tifffile``'s zarr interface, pyramids
included), numpy and dask arrays. Nothing is read when opening; :meth:`ImageSource.read_region`
reads only what it is asked for, so a 100k-pixel slide costs no memory until tiles are read.

Axes are named with one letter each: ``y`` and ``x`` (required), ``c`` (channels, optional) and any
other letter (``z``, ``t``...) for axes the 2D models cannot take, which must be fixed with
``index={"z": 5}``. The names come from OME-Zarr or TIFF metadata when present, else from the shape
(a trailing axis of 3/4 is RGB(A) channel-last, a leading axis of at most 4 is channel-first); pass
``axes="cyx"`` to override the guess.

Statistics for normalisation come from :func:`.image_sample.statistics_sample`: the finest pyramid
level that fits a pixel budget, or a chunk-aligned sample of tiles, never a scan of the whole image.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .tiff_metadata import tiff_pixel_size

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".btf", ".tf8", ".tf2")


class ImageInputError(ValueError):
    """The input cannot be segmented as given; the message says what to change."""


class ImageNotFoundError(ImageInputError, FileNotFoundError):
    """The input path does not exist."""


@dataclass(frozen=True)
class SourceSpec:
    """How an :class:`ImageSource` was opened; enough to reopen it in another process.

    Attributes:
        path: file or folder of the image (None for in-memory arrays).
        axes: one letter per axis of the stored level-0 array, e.g. ``"yxc"`` or ``"tczyx"``.
        index: fixed positions of the axes the model cannot take, e.g. ``(("z", 5),)``.
        channels: channel indices kept (None = all).
        tiff_series: TIFF series number.
    """

    path: str | None
    axes: str
    index: tuple[tuple[str, int], ...] = ()
    channels: tuple[int, ...] | None = None
    tiff_series: int = 0


class ImageSource:
    """A lazily read 2D image with optional channels and pyramid levels.

    Attributes:
        shape: ``(H, W)`` of level 0 (inference resolution).
        channels: channels returned by :meth:`read_region` (after ``channels`` selection).
        dtype: stored dtype (any integer or float type).
        levels: ``(H, W)`` of every pyramid level, finest first (one entry without a pyramid).
        pixel_size: ``(y, x)`` physical pixel size of level 0 from metadata, or None.
        unit: unit of ``pixel_size`` (e.g. ``"micrometer"``), or None.
        path: where it was read from, or None for in-memory arrays.
        spec: the :class:`SourceSpec` it was opened with (picklable).
    """

    def __init__(self, arrays: list, spec: SourceSpec, pixel_size=None, unit=None):
        self._arrays = arrays
        self.spec = spec
        self.path = spec.path
        self.pixel_size = pixel_size
        self.unit = unit
        self._keys = _axis_keys(spec, tuple(arrays[0].shape))
        self._lock = _reader_lock(spec)
        first = arrays[0]
        self.dtype = np.dtype(first.dtype)
        self.levels = tuple(_level_yx(a.shape, spec.axes) for a in arrays)
        self.shape = self.levels[0]
        stored_channels = first.shape[spec.axes.index("c")] if "c" in spec.axes else 1
        if spec.channels is not None:
            bad = [c for c in spec.channels if not 0 <= c < stored_channels]
            if bad:
                raise ImageInputError(
                    f"channel(s) {bad} do not exist: the image has {stored_channels} channel(s) "
                    f"(0..{stored_channels - 1})")
        self.channels = len(spec.channels) if spec.channels is not None else stored_channels

    def __repr__(self) -> str:
        where = self.path or "in-memory array"
        return (f"ImageSource({where}, {self.shape[0]}x{self.shape[1]}, {self.channels} channel(s), "
                f"{self.dtype}, {len(self.levels)} level(s))")

    def read_region(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
        """Read ``[y0:y1, x0:x1]`` of a level.

        Args:
            y0, y1, x0, x1: bounds in pixels of that level; clipped to the image.
            level: pyramid level (0 = full resolution).

        Returns:
            ``(C, h, w)`` array of the stored dtype.
        """
        height, width = self.levels[level]
        ys = slice(max(0, y0), min(height, y1))
        xs = slice(max(0, x0), min(width, x1))
        key = tuple({"y": ys, "x": xs, "c": slice(None)}.get(k, k) if isinstance(k, str) else k
                    for k in self._keys)
        with self._lock:
            data = np.asarray(self._arrays[level][key])
        kept = "".join(a for a, k in zip(self.spec.axes, self._keys) if not isinstance(k, int))
        if "c" not in kept:
            data, kept = data[None], "c" + kept
        data = np.transpose(data, [kept.index(a) for a in "cyx"])
        if self.spec.channels is not None:
            data = np.take(data, self.spec.channels, axis=0)
        return data

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"]
        if self.path is not None:
            state["_arrays"] = None  # file handles do not pickle; reopened from the spec
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = _reader_lock(self.spec)
        if self._arrays is None:
            self._arrays = open_path_levels(Path(self.path), self.spec.tiff_series)[0]


def _reader_lock(spec: SourceSpec):
    """TIFF files are read through one file handle: serialise reads (zarr needs no lock)."""
    is_tiff = spec.path is not None and spec.path.lower().endswith(TIFF_SUFFIXES)
    return threading.Lock() if is_tiff else contextlib.nullcontext()


# ----------------------------------------------------------------------------- opening
def open_image(image: Any, *, axes: str | None = None, index: dict[str, int] | None = None,
               channels: tuple[int, ...] | list[int] | None = None,
               channel_axis: int | None = None, tiff_series: int = 0) -> ImageSource:
    """Open an image for tiled reading without loading it.

    Args:
        image: a path (zarr/OME-Zarr folder, TIFF file), a zarr array or group, a numpy or dask
            array, or an :class:`ImageSource` (returned as is).
        axes: one letter per stored axis (``"yx"``, ``"yxc"``, ``"cyx"``, ``"zyx"``...) overriding
            metadata and guessing.
        index: position along each axis the model cannot take, e.g. ``{"z": 5}``; axes of
            length 1 need none.
        channels: channel indices to keep, e.g. ``(0, 2)``.
        channel_axis: which stored axis holds channels (shortcut for ``axes`` on 3D data).
        tiff_series: series of a multi-series TIFF.

    Raises:
        ImageNotFoundError: the path does not exist.
        ImageInputError: a zarr without an array, axes that need an ``index``, unknown channels.
    """
    if isinstance(image, ImageSource):
        return image
    pixel_size = unit = None
    path = None
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if not path.exists():
            raise ImageNotFoundError(f"no such file or folder: {path}; check the path and spelling")
        arrays, meta_axes, pixel_size, unit = open_path_levels(path, tiff_series)
    else:
        arrays, meta_axes = _open_object_levels(image)
    shape = tuple(arrays[0].shape)
    if channel_axis is not None and axes is None:
        axes = _axes_with_channel(shape, channel_axis)
    chosen = _check_axes(axes or meta_axes or guess_axes(shape), shape)
    spec = SourceSpec(
        path=str(path) if path is not None else None, axes=chosen,
        index=tuple(sorted((index or {}).items())),
        channels=tuple(int(c) for c in channels) if channels is not None else None,
        tiff_series=tiff_series)
    return ImageSource(arrays, spec, pixel_size, unit)


def open_path_levels(path: Path, tiff_series: int = 0) -> tuple[list, str | None, Any, Any]:
    """The lazy arrays of every resolution level of a zarr/OME-Zarr/TIFF path, largest first, with
    the axes its metadata names (e.g. ``"cyx"``, or None), its pixel size and unit (or None).

    Raises:
        ImageInputError: the path is neither zarr nor TIFF, or holds no array.
    """
    if path.is_file() and path.name.lower().endswith(TIFF_SUFFIXES):
        return _open_tiff(path, tiff_series)
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for "not a zarr"
        raise ImageInputError(
            f"{path} is neither a zarr array/group nor a TIFF file ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(node, zarr.Group):
        return _open_group(node, path)
    return [node], None, None, None


def _open_object_levels(image: Any) -> tuple[list, str | None]:
    """Level arrays and metadata axes of an in-memory or zarr object."""
    import zarr

    if isinstance(image, zarr.Group):
        arrays, axes, _, _ = _open_group(image, "the zarr group")
        return arrays, axes
    if not hasattr(image, "shape") or not hasattr(image, "dtype"):
        image = np.asarray(image)
    return [image], None


def _open_group(group, where) -> tuple[list, str | None, Any, Any]:
    """An OME-Zarr multiscale group or a group holding exactly one array."""
    attrs = dict(group.attrs)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if multiscales:
        meta = multiscales[0]
        arrays = [group[d["path"]] for d in meta["datasets"]]
        names = [a if isinstance(a, str) else a.get("name", "?") for a in meta.get("axes", [])]
        axes = "".join(n[0].lower() for n in names) if names else None
        pixel_size, unit = _ngff_pixel_size(meta)
        return arrays, axes, pixel_size, unit
    found = [name for name, _ in group.arrays()]
    if len(found) == 1:
        return [group[found[0]]], None, None, None
    if not found:
        subgroups = [name for name, _ in group.groups()]
        hint = f"; it holds only groups {subgroups}: open one of them" if subgroups else ""
        raise ImageInputError(f"{where} is a zarr group with no image array in it{hint}")
    raise ImageInputError(f"{where} holds several arrays {found}; pass the path of the one to "
                          f"segment, e.g. {Path(str(where)) / found[0]}")


def _ngff_pixel_size(meta: dict) -> tuple[tuple[float, float] | None, str | None]:
    """``(y, x)`` scale and unit of level 0 from NGFF coordinate transformations."""
    axes = meta.get("axes", [])
    names = [a if isinstance(a, str) else a.get("name") for a in axes]
    for transform in meta["datasets"][0].get("coordinateTransformations", []):
        if transform.get("type") == "scale" and "y" in names and "x" in names:
            scale = transform["scale"]
            unit = next((a.get("unit") for a in axes if isinstance(a, dict) and a.get("name") == "x"), None)
            return (float(scale[names.index("y")]), float(scale[names.index("x")])), unit
    return None, None


def _open_tiff(path: Path, series_index: int) -> tuple[list, str, Any, Any]:
    """Every pyramid level of one TIFF series as a zarr array, with tifffile's axes and the
    pixel size its metadata gives (:func:`.tiff_metadata.tiff_pixel_size`)."""
    import tifffile
    import zarr

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:
        raise ImageInputError(f"cannot read TIFF {path}: {exc}") from None
    if not 0 <= series_index < len(tif.series):
        raise ImageInputError(f"{path} has {len(tif.series)} series; choose tiff_series in "
                              f"0..{len(tif.series) - 1}")
    series = tif.series[series_index]
    arrays = [zarr.open(series.aszarr(level=k), mode="r") for k in range(len(series.levels))]
    # tifffile letters: S = samples (RGB), C = channels, Y/X, and Z/T/Q/I... for other axes.
    axes = series.axes.lower().replace("s", "c")
    pixel_size, unit = tiff_pixel_size(tif, series_index)
    return arrays, axes, pixel_size, unit


# ----------------------------------------------------------------------------- axes
def guess_axes(shape: tuple[int, ...]) -> str:
    """Axis letters for a shape without metadata.

    The last two axes are ``yx`` unless the last one has 3 or 4 entries and the ones before are
    larger (RGB/RGBA channel-last, ``yxc``). An axis of at most 4 entries just before ``yx`` is
    channels; remaining leading axes are named ``z``, then ``t``, then ``q``.
    """
    ndim = len(shape)
    if ndim < 2:
        raise ImageInputError(f"an image needs at least 2 dimensions, got shape {shape}")
    letters = "yx"
    rest = ndim - 2
    if ndim >= 3 and shape[-1] in (3, 4) and min(shape[-3:-1]) > 4:
        letters, rest = "yxc", ndim - 3
    elif ndim >= 3 and shape[-3] <= 4:
        letters, rest = "cyx", ndim - 3
    others = "ztq" + "abdefghijklmnoprsuvw"
    return others[:rest][::-1] + letters


def _axes_with_channel(shape: tuple[int, ...], channel_axis: int) -> str:
    """Axes when the user says which stored axis holds channels."""
    ndim = len(shape)
    channel_axis %= ndim
    spatial = [i for i in range(ndim) if i != channel_axis][-2:]
    letters = ["?"] * ndim
    letters[channel_axis] = "c"
    letters[spatial[0]], letters[spatial[1]] = "y", "x"
    spare = iter("ztq")
    return "".join(next(spare) if a == "?" else a for a in letters)


def _check_axes(axes: str, shape: tuple[int, ...]) -> str:
    """Validate an axes string against a shape."""
    axes = axes.lower()
    if len(axes) != len(shape):
        raise ImageInputError(f"axes {axes!r} has {len(axes)} letters but the data has "
                              f"{len(shape)} dimensions (shape {shape})")
    if len(set(axes)) != len(axes) or "y" not in axes or "x" not in axes:
        raise ImageInputError(f"axes {axes!r} must name each axis once and include 'y' and 'x'")
    return axes


def _axis_keys(spec: SourceSpec, shape: tuple[int, ...]) -> tuple:
    """Per stored axis: an int (fixed index) or the letter ``y``/``x``/``c`` (kept)."""
    index = dict(spec.index)
    unknown = set(index) - set(spec.axes)
    if unknown:
        raise ImageInputError(f"index names axes {sorted(unknown)} that the image does not have "
                              f"(its axes are {spec.axes!r}, shape {shape})")
    keys, missing = [], []
    for letter, size in zip(spec.axes, shape):
        if letter in "yx" or (letter == "c" and letter not in index):
            keys.append(letter)
        elif letter in index:
            if not -size <= index[letter] < size:
                raise ImageInputError(f"index {letter}={index[letter]} is outside 0..{size - 1}")
            keys.append(int(index[letter]) % size)
        elif size == 1:
            keys.append(0)
        else:
            missing.append((letter, size))
    if missing:
        choices = ", ".join(f"{a!r}: 0..{n - 1}" for a, n in missing)
        example = ", ".join(f"{a!r}: {n // 2}" for a, n in missing)
        raise ImageInputError(
            f"the image has axes {spec.axes!r} (shape {shape}) but the models take 2D images: pick a "
            f"plane along {choices} with index={{{example}}} (CLI: --index "
            f"{','.join(f'{a}={n // 2}' for a, n in missing)}), or name the axes yourself with "
            f"axes=... if the guess is wrong (e.g. a channel axis: axes='cyx')")
    return tuple(keys)


def _level_yx(shape: tuple[int, ...], axes: str) -> tuple[int, int]:
    return int(shape[axes.index("y")]), int(shape[axes.index("x")])
