"""Which arrays become which napari layers: run outputs and input images, lazily (Qt-free).

Used by the Segment widget and the reader alike. Every function returns napari ``LayerDataTuple``s
``(data, meta, layer_type)``; nothing here reads a whole image:

- maps of an output store (:class:`~napari_medseg.core.store.OutputStore`) become image layers of
  decoded float32 views (:class:`DecodedChannel`) over the store's zarr arrays, one layer per
  displayed channel, with explicit contrast limits from the map's ``value_range`` (napari would
  otherwise scan the data) and a pyramid (multiscale list of levels) above
  :data:`MULTISCALE_MIN_PIXELS`;
- labels become a Labels layer backed by the store's level-0 zarr array, so every brush stroke is
  written to disk; napari cannot paint on multiscale labels and reads a whole plane of single-scale
  ones, so above :data:`EDITABLE_LABELS_MAX_PIXELS` the labels are shown as a read-only pyramid;
- zarr / OME-Zarr / TIFF inputs become image layers (multiscale when the file has a pyramid) with
  their pixel size as scale and contrast limits from a small sample.

Layer names: ``<image> labels``, ``<image> probability <class>``, ``<image> uncertainty <map>``,
``<image> DSRA <map>`` (PraNet-V2 background heads and disagreement), ``<image> attention <gate>``.
Each layer's ``metadata["medseg"]`` says which output, map and channel it shows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .core.store import LABELS, PROBS, MapInfo, OutputStore, is_engine_store
from .core.targets import CLASS_NAMES
from .display_cache import MirroredLevel, invalidate_layer, should_mirror

MULTISCALE_MIN_PIXELS = 1024 * 1024        # smaller outputs are shown from level 0 only
EDITABLE_LABELS_MAX_PIXELS = 4096 * 4096   # napari reads a whole plane of single-scale labels
SAMPLE_PIXELS = 1 << 21                    # contrast limits of inputs from at most this many pixels
METADATA_KEY = "medseg"

# Display of each map kind (MapSpec.kind): name prefix, colormap, blending, opacity.
KIND_STYLE = {
    "probability": ("probability", "green", "additive", 0.8),
    "uncertainty": ("uncertainty", "inferno", "additive", 0.6),
    "background": ("DSRA", "cyan", "additive", 0.8),
    "attention": ("attention", "turbo", "translucent", 0.6),
}
CLASS_COLORMAPS = ("green", "magenta", "yellow", "cyan", "red", "blue")


class DecodedChannel:
    """Lazy ``(H, W) float32`` view of one channel of a stored map level, decoded on read.

    Implements napari's array protocol (``shape``, ``dtype``, ``ndim``, ``size``, ``__getitem__``);
    reading a slice reads only the zarr chunks it touches, so napari can show any part of a map
    of any size. uint8 probabilities are divided by 255, float16 maps widened to float32.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, array, channel: int, scale: float, mirror: MirroredLevel | None = None):
        self.array = array
        self.channel = channel
        self.scale = float(scale)
        self.mirror = mirror   # in-memory copy of the channel (small-chunk levels), or None
        self.shape = tuple(int(n) for n in array.shape[1:])
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape))

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        raw = self.mirror[key] if self.mirror is not None else self.array[(self.channel, *key)]
        data = np.asarray(raw, dtype=np.float32)
        return data * self.scale if self.scale != 1.0 else data

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        data = self[...]
        return data.astype(dtype) if dtype is not None else data

    def __repr__(self) -> str:
        return f"DecodedChannel({self.array.path!r}, channel={self.channel}, shape={self.shape})"


# ----------------------------------------------------------------------------- run outputs
def run_layers(store: OutputStore | str | Path, image_name: str, *, scale=None, translate=None,
               editable_labels: bool | None = None) -> list[tuple]:
    """Layer data tuples of every map and the labels of an output store, labels last (on top).

    Args:
        store: an output store or its path.
        image_name: name of the input image layer; prefixes every layer name.
        scale, translate: ``(y, x)`` of the input image layer so the outputs overlay it (default:
            the store's pixel size, no translation).
        editable_labels: force a single-scale, editable labels layer (True) or a read-only pyramid
            (False); default: editable up to :data:`EDITABLE_LABELS_MAX_PIXELS`.

    Returns:
        ``[(data, meta, "image"|"labels"), ...]``.
    """
    store = store if isinstance(store, OutputStore) else OutputStore.open(store, mode="r+")
    layout = store.layout
    scale = tuple(scale) if scale is not None else tuple(layout.pixel_size or (1.0, 1.0))
    translate = tuple(translate) if translate is not None else (0.0, 0.0)
    height, width = layout.image_shape
    multiscale = height * width > MULTISCALE_MIN_PIXELS and layout.levels > 1
    uncertainty_shown = False
    written = store.done_chunks("maps") if multiscale else None   # read once for every map layer
    layers = []
    for info in layout.maps:
        for channel, suffix, description in displayed_channels(info):
            prefix, colormap, blending, opacity = KIND_STYLE.get(
                info.kind, (info.kind, "viridis", "translucent", 0.7))
            if info.name == PROBS:
                colormap = CLASS_COLORMAPS[(channel - 1) % len(CLASS_COLORMAPS)] if channel else "gray"
            visible = info.kind == "uncertainty" and not uncertainty_shown
            uncertainty_shown = uncertainty_shown or visible
            meta = {
                "name": f"{image_name} {prefix}{(' ' + suffix) if suffix else ''}",
                "contrast_limits": tuple(float(v) for v in info.value_range),
                "colormap": colormap, "blending": blending, "opacity": opacity,
                "visible": visible, "scale": scale, "translate": translate,
                "multiscale": multiscale,
                "metadata": _metadata(store, image_name, info.name, channel, info.kind, description),
            }
            layers.append((_map_levels(store, info, channel, written), meta, "image"))
    layers.append(labels_layer_data(store, image_name, scale=scale, translate=translate,
                                    editable=editable_labels))
    return layers


def labels_layer_data(store: OutputStore, image_name: str, *, scale=(1.0, 1.0),
                      translate=(0.0, 0.0), editable: bool | None = None) -> tuple:
    """The ``<image> labels`` layer: level-0 zarr (editable, strokes go to disk) or a pyramid."""
    height, width = store.layout.image_shape
    if editable is None:
        editable = height * width <= EDITABLE_LABELS_MAX_PIXELS
    if editable:
        data, multiscale = store.labels(0), False
    else:
        written = store.done_chunks(LABELS)
        data = [_mirrored(store.labels(level), level, None, written)
                for level in range(store.layout.levels)]
        multiscale = len(data) > 1
        data = data if multiscale else data[0]
    description = ("instance labels (edits are written to the output store)" if editable else
                   "instance labels, read-only: napari cannot paint on labels this large")
    metadata = _metadata(store, image_name, LABELS, None, "labels", description)
    metadata[METADATA_KEY]["editable"] = bool(editable)
    meta = {"name": f"{image_name} labels", "scale": tuple(scale), "translate": tuple(translate),
            "multiscale": multiscale, "opacity": 0.6, "metadata": metadata}
    return data, meta, "labels"


def displayed_channels(info: MapInfo) -> list[tuple[int, str, str]]:
    """``(channel, name suffix, description)`` of each channel of a map shown as its own layer.

    Probabilities: every class but background (the one class of a binary head). Per-class
    background heads: the first foreground class ("probability the pixel is NOT <class>").
    Single-channel maps: their one channel. Other multi-channel maps: every channel.
    """
    pretty = info.name.replace("_", " ")
    classes = list(CLASS_NAMES) if info.channels == len(CLASS_NAMES) else [
        f"class {c}" for c in range(info.channels)]
    if info.name == PROBS:
        if info.channels == 1:
            return [(0, "", "probability of the foreground class")]
        return [(c, classes[c], f"probability of class {classes[c]!r}") for c in range(1, info.channels)]
    prefix = KIND_STYLE.get(info.kind, (info.kind,))[0]
    suffix = pretty[len(prefix):].strip() if pretty.startswith(prefix) else pretty
    if info.channels == 1:
        return [(0, suffix, info.description)]
    if info.kind == "background":
        c = 1
        return [(c, suffix, f"{info.description}; shown: channel {c} (NOT {classes[c]!r})")]
    return [(c, f"{suffix} {classes[c]}", info.description) for c in range(info.channels)]


def _map_levels(store: OutputStore, info: MapInfo, channel: int, written: np.ndarray | None):
    """A map channel's levels (``written``: the store's maps progress grid, or None for level 0 only)."""
    attrs = dict(store.group[info.name].attrs).get("medseg_map", {})
    scale = float(attrs.get("scale", 1 / 255 if store.array(info.name).dtype == np.uint8 else 1.0))
    levels = range(store.layout.levels) if written is not None else range(1)
    multiscale = written is not None
    views = []
    for level in levels:
        array = store.array(info.name, level)
        mirror = _mirrored(array, level, channel, written)
        views.append(DecodedChannel(array, channel, scale, mirror if mirror is not array else None))
    return views if multiscale else views[0]


def _mirrored(array, level: int, channel: int | None, written):
    """A :class:`MirroredLevel` of a small-chunk level (see :mod:`napari_medseg.display_cache`),
    else ``array`` itself."""
    return MirroredLevel(array, channel, written) if should_mirror(array, level) else array


def _metadata(store: OutputStore, image_name: str, name: str, channel, kind: str,
              description: str) -> dict:
    return {METADATA_KEY: {"output": str(store.path), "image": image_name, "map": name,
                           "channel": channel, "kind": kind, "description": description,
                           "chunk": store.layout.chunk,
                           "model": store.attrs.get("run", {}).get("model")}}


def medseg_info(layer) -> dict | None:
    """The ``metadata["medseg"]`` of a layer made here, or None for other layers."""
    info = getattr(layer, "metadata", {}).get(METADATA_KEY)
    return info if isinstance(info, dict) else None


# ----------------------------------------------------------------------------- inputs
def image_layer_data(path: str | Path, name: str | None = None) -> tuple:
    """A zarr / OME-Zarr / TIFF image as one lazy image layer (multiscale when it has a pyramid).

    RGB(A) channel-last uint8 data is shown as RGB; other channel axes become one layer per
    channel (napari's ``channel_axis``); other axes (z, t...) get sliders.
    """
    from .core import io

    path = Path(path)
    # TODO(core.io): a public way to get an input's level arrays and axes (ImageSource keeps them
    # private); this is the function open_image itself uses.
    arrays, meta_axes, pixel_size, unit = io.open_path_levels(path, 0)
    shape = tuple(arrays[0].shape)
    axes = meta_axes or io.guess_axes(shape)
    if len(axes) != len(shape):
        axes = io.guess_axes(shape)
    rgb = axes.endswith("c") and shape[-1] in (3, 4) and np.dtype(arrays[0].dtype) == np.uint8
    channel_axis = axes.index("c") if "c" in axes and not rgb else None
    spatial = [i for i, a in enumerate(axes) if a != "c"]   # napari's scale skips channel axes
    scale = [1.0] * len(spatial)
    if pixel_size:
        yx = [spatial.index(axes.index("y")), spatial.index(axes.index("x"))]
        scale[yx[0]], scale[yx[1]] = float(pixel_size[0]), float(pixel_size[1])
    meta = {"name": name or _stem(path), "rgb": rgb, "scale": tuple(scale),
            "multiscale": len(arrays) > 1,
            "metadata": {METADATA_KEY: {"input": str(path), "axes": axes, "unit": unit}}}
    sample = _sample(arrays, axes)
    if rgb:
        meta["contrast_limits"] = (0, 255)
    elif channel_axis is not None:
        meta["channel_axis"] = channel_axis
        meta["contrast_limits"] = [_limits(np.take(sample, c, axis=axes.index("c")))
                                   for c in range(shape[channel_axis])]
        meta["name"] = [f"{meta['name']} [{c}]" for c in range(shape[channel_axis])]
    else:
        meta["contrast_limits"] = _limits(sample)
    data = arrays if len(arrays) > 1 else arrays[0]
    return data, meta, "image"


def _sample(arrays: list, axes: str) -> np.ndarray:
    """Pixels of the coarsest level (a central crop of it when larger than the budget) at the
    middle of every non-image axis, keeping the channel axis."""
    level = arrays[-1]
    shape = level.shape
    edge = int(np.sqrt(SAMPLE_PIXELS))
    key = []
    for letter, size in zip(axes, shape):
        if letter in "yx":
            start = max(0, (size - edge) // 2)
            key.append(slice(start, start + edge))
        elif letter == "c":
            key.append(slice(None))
        else:
            key.append(slice(size // 2, size // 2 + 1))
    return np.asarray(level[tuple(key)])


def _limits(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    return (low, high) if high > low else (low, low + 1.0)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_layers(path: str | Path) -> list[tuple]:
    """What the reader returns: an output store's input image (when still on disk) and its
    maps and labels, or a plain input image."""
    path = Path(path)
    if not is_engine_store(path):
        return [image_layer_data(path)]
    store = OutputStore.open(path)
    run = store.attrs.get("run", {})
    source = run.get("input")
    layers = []
    image_name = _stem(path)
    if source and source != "in-memory array" and Path(source).exists():
        image = image_layer_data(source)
        image_name = image[1]["name"] if isinstance(image[1]["name"], str) else image_name
        layers.append(image)
    return layers + run_layers(store, image_name)


# ----------------------------------------------------------------------------- viewer updates
def run_layers_of(viewer, image_name: str) -> list:
    """Layers of the viewer made by a run on ``image_name`` (any output, any model)."""
    return [layer for layer in viewer.layers
            if (medseg_info(layer) or {}).get("image") == image_name and "map" in medseg_info(layer)]


def show_run(viewer, image_layer, store: OutputStore | str | Path) -> list:
    """Show a run's outputs over ``image_layer``, replacing the layers of any earlier run on it.

    A layer of the same name keeps its place in the layer list, its visibility and opacity;
    layers of the earlier run that this run does not produce are removed; new layers go right
    above the image, labels last. Returns the run's layers.
    """
    return list(dict.fromkeys(show_run_steps(viewer, image_layer, store)))


def show_run_steps(viewer, image_layer, store: OutputStore | str | Path | None,
                   prepared: list[tuple] | None = None):
    """:func:`show_run` in small steps, so a GUI can return to its event loop between them.

    Yields each layer right after adding it hidden (napari then sets up its drawing, a few
    hundred ms, without reading data), and once more after showing it (reading what is in view).
    ``prepared``: the :func:`run_layers` of the store for ``image_layer.name``, read on another
    thread (``store`` is then not opened here); they are placed with the image's scale and offset.
    """
    from napari.layers import Layer

    scale = tuple(image_layer.scale[-2:])
    translate = tuple(image_layer.translate[-2:])
    if prepared is None:
        tuples = run_layers(store, image_layer.name, scale=scale, translate=translate)
    else:
        tuples = [(data, {**meta, "scale": scale, "translate": translate}, kind)
                  for data, meta, kind in prepared]
    old = {layer.name: layer for layer in run_layers_of(viewer, image_layer.name)}
    position = viewer.layers.index(image_layer) + 1
    for data, meta, kind in tuples:
        previous = old.pop(meta["name"], None)
        if previous is not None and previous in viewer.layers:
            meta = {**meta, "visible": previous.visible, "opacity": previous.opacity}
            position = viewer.layers.index(previous)
            viewer.layers.remove(previous)
        layer = Layer.create(data, {**meta, "visible": False}, kind)
        viewer.layers.insert(min(position, len(viewer.layers)), layer)
        position = viewer.layers.index(layer) + 1
        yield layer
        if meta.get("visible", True):
            layer.visible = True
            yield layer
    for stale in old.values():
        if stale in viewer.layers:
            viewer.layers.remove(stale)


def layers_to_refresh(layers, labels: bool = True) -> list:
    """The run's layers whose shown data should be re-read after the worker wrote a block: the
    visible ones (hidden layers re-read when shown), labels only when ``labels``."""
    from napari.layers import Labels

    return [layer for layer in layers
            if layer.visible and (labels or not isinstance(layer, Labels))]


def invalidate_layers(layers, region: tuple[int, int, int, int] | None = None) -> None:
    """The store changed in a level-0 ``region`` (None: anywhere): forget what the layers' in-memory
    level copies hold of it, so their next refresh re-reads it."""
    for layer in layers:
        invalidate_layer(layer, region)


def refresh_layers(layers, labels: bool = True) -> None:
    """Re-read what napari shows of a run's layers now, after the store changed anywhere (see
    :func:`layers_to_refresh`; hidden layers forget their copies and re-read when shown)."""
    layers = list(layers)
    invalidate_layers(layers if labels else [layer for layer in layers if not _is_labels(layer)])
    for layer in layers_to_refresh(layers, labels):
        layer.refresh()


def _is_labels(layer) -> bool:
    from napari.layers import Labels

    return isinstance(layer, Labels)
