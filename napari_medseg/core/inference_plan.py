"""Settings and planning of a tiled inference run (no heavy work: statistics sample + store setup).

:func:`prepare_run` resolves every default (device, tiles, batch, normalisation, output path),
creates or reopens the output store and returns a picklable :class:`RunPlan`: the only thing a
worker needs, besides the image source and the model, to process any of its blocks.
"""
from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .devices import pick_device as choose_device
from .image_sample import statistics_sample
from .io import ImageInputError, ImageSource, open_image
from .normalize import Normalization, percentile_range, to_model_channels
from .resolution import check_scale, image_grid_tiles, resolve_scale
from .store import MapInfo, OutputStore, StoreLayout, default_output_path
from .test_time import check_views
from .tiling import Block, TileSettings, default_tile_settings, superblocks

PIXEL_BUDGET = {"cuda": 8_000_000, "mps": 4_000_000, "cpu": 1_000_000}  # pixels per forward batch
MAX_BATCH = {"cuda": 32, "mps": 16, "cpu": 4}   # more tiles per call gain nothing on CPU
SMALLEST_TILE = 16   # never below 2 × size_multiple either


class DeviceMemoryError(RuntimeError):
    """Out of memory even with one tile of the smallest size."""


@dataclass(frozen=True)
class InferenceSettings:
    """Knobs of a run; None means "the default for this model and device".

    Attributes:
        mode: ``"crop"`` or ``"blend"``; default from ``model.translation_equivariant``.
        tile: crop core edge (default 1024) or blend tile edge (default: training size, or 256).
        overlap: crop halo (default: measured receptive-field radius) or blend overlap (tile/4).
        batch_size: tiles per forward pass; default from a pixel budget per device (CPU: 1 tile of
            1024² + halo, or 4 of 256²; CUDA up to 32).
        device: ``"auto"`` (cuda > mps > cpu), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
        mc_samples: Monte-Carlo samples for models offering uncertainty (0 = deterministic).
        chunk: output chunk edge (512: a few hundred kB per chunk, quick to show in napari).
        superblock: block edge, a multiple of ``chunk``; None: :func:`auto_superblock` (2048,
            ~17 MB of float32 per map channel and few duplicated blend tiles at block borders, or
            1024 for models writing many map channels, e.g. PraNet-V2's 16).
        probs_dtype: ``"uint8"`` (default, p·255), ``"float16"`` or ``"float32"``.
        maps_dtype: auxiliary maps, ``"float16"`` (default) or ``"float32"``.
        skip_threshold: tiles whose normalised max − min is below this are skipped (0 = never).
        region: ``(y0, y1, x0, x1)`` to segment only part of the image (grown to whole chunks).
        overwrite: replace an existing output made by this engine (never other data).
        resume: continue an existing output made with the same settings.
        prefetch: overlap reading and writing with compute on a thread pool.
        seed: seeds Monte-Carlo sampling (per tile batch, from the tile position).
        normalization: fixed intensity mapping overriding the card's and the statistics.
        tta: test-time augmentation views averaged per tile, 1 (off), 2, 4 or 8 (flips and
            transposes, :mod:`.test_time`); None: the card's ``"inference": {"tta": N}``, else 1.
            Each view costs one more forward pass.
        scale: model pixels per image pixel: tiles are resampled by it before the network and the
            maps back (:mod:`.resolution`); None: from the image's and the weights' pixel sizes
            (:func:`.resolution.resolve_scale`), 1 = never resample.
    """

    mode: str | None = None
    tile: int | None = None
    overlap: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    mc_samples: int = 0
    chunk: int = 512
    superblock: int | None = None
    probs_dtype: str = "uint8"
    maps_dtype: str = "float16"
    skip_threshold: float = 0.02
    region: tuple[int, int, int, int] | None = None
    overwrite: bool = False
    resume: bool = True
    prefetch: bool = True
    seed: int = 0
    normalization: Normalization | None = None
    tta: int | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.tta is not None:
            check_views(self.tta)
        check_scale(self.scale)
        for name in ("tile", "overlap", "batch_size"):
            value = getattr(self, name)
            if value is not None and (value < (0 if name == "overlap" else 1)):
                raise ValueError(f"{name} must be a positive number, not {value}")
        if self.mc_samples < 0:
            raise ValueError(f"mc_samples must be ≥ 0, not {self.mc_samples}")
        if self.chunk < 16 or (self.superblock is not None and
                               (self.superblock < 1 or self.superblock % self.chunk)):
            raise ValueError(f"superblock ({self.superblock}) must be a multiple of chunk ({self.chunk}), "
                             "and chunk at least 16")


@dataclass(frozen=True)
class RunPlan:
    """Everything a worker needs to process any block (picklable).

    Attributes:
        output: output store path.
        image_shape: ``(H, W)``.
        in_channels: channels the model takes.
        tiles: tile mode and sizes.
        blocks: the blocks of the requested region, raster order.
        normalization: intensity mapping ``(x - low) / (high - low)``.
        maps: maps written (``probs`` first).
        mc_samples, batch_size, skip_threshold, seed: as in :class:`InferenceSettings`.
        tta: views averaged per tile (resolved: 1, 2, 4 or 8).
        scale: model pixels per image pixel (resolved; ``tiles`` are on the image's grid).
    """

    output: str
    image_shape: tuple[int, int]
    in_channels: int
    tiles: TileSettings
    blocks: tuple[Block, ...]
    normalization: Normalization
    maps: tuple[MapInfo, ...]
    mc_samples: int
    batch_size: int
    skip_threshold: float
    seed: int
    tta: int = 1
    scale: float = 1.0


@dataclass
class PreparedRun:
    """:func:`prepare_run`'s result: the plan, the open store, the source, early warnings, the
    requested region and the normalisation's provenance (method, low/high, where sampled)."""

    plan: RunPlan
    store: OutputStore
    source: ImageSource
    resumed: bool
    warnings: list[str] = field(default_factory=list)
    region: tuple[int, int, int, int] | None = None
    normalization: dict = field(default_factory=dict)


BLOCK_MAP_BUDGET = 160_000_000   # bytes of float32 block maps; two blocks are in flight at once


def auto_superblock(maps: tuple, chunk: int) -> int:
    """The largest of 2048 / 1024 / 512 (rounded up to a multiple of ``chunk``) whose float32 maps
    fit :data:`BLOCK_MAP_BUDGET`: 2048 for 3-6 map channels, 1024 for PraNet-V2's 16.

    Measured (PraNet-V2, 4096² mosaic, CPU): peak resident memory 2,159 MB with 2048² blocks,
    1,365 MB with 1024², same wall time and identical labels.
    """
    channels = sum(m.channels for m in maps)
    for edge in (2048, 1024, 512):
        if channels * 4 * edge * edge <= BLOCK_MAP_BUDGET:
            break
    return max(chunk, -(-edge // chunk) * chunk)


def auto_batch_size(device: torch.device, window: int) -> int:
    """Tiles per forward pass fitting the device's pixel budget (at least 1)."""
    kind = device.type if device.type in PIXEL_BUDGET else "cpu"
    return int(max(1, min(MAX_BATCH[kind], PIXEL_BUDGET[kind] // (window * window))))


def shrink_tiles(tiles: TileSettings, reason: str) -> TileSettings:
    """Half-size tiles after an out-of-memory error with a batch of one."""
    m = tiles.size_multiple
    size = max(m, tiles.tile // 2 // m * m)
    if size < max(2 * m, SMALLEST_TILE) or size == tiles.tile:
        raise DeviceMemoryError(f"{reason}, even at the smallest tile; run on the CPU (device='cpu'), "
                                "close other programs using the GPU, or choose a lighter model")
    overlap = tiles.overlap if tiles.mode == "crop" else min(tiles.overlap, size // 2)
    return dataclasses.replace(tiles, tile=size, overlap=overlap)


def resolve_normalization(source: ImageSource, in_channels: int, card: dict,
                          override: Normalization | None) -> tuple[Normalization, dict, int]:
    """The intensity mapping, its provenance and the NaN/inf count of the statistics sample.

    Order: ``override``; the card's ``{"method": "fixed", "low", "high"}``; else percentiles (the
    card's ``low_percentile``/``high_percentile``, default 1 / 99.8) of :func:`statistics_sample`.
    """
    if override is not None:
        return override, {"method": "given", "low": override.low, "high": override.high}, 0
    spec = card.get("normalization") or {}
    if spec.get("method") in ("fixed", "range"):
        low, high = float(spec["low"]), float(spec["high"])
        return Normalization(low, high), {"method": "fixed", "low": low, "high": high}, 0
    sample = statistics_sample(source)
    pixels = to_model_channels(sample.pixels, in_channels)
    norm = percentile_range(pixels, float(spec.get("low_percentile", 1.0)),
                            float(spec.get("high_percentile", 99.8)))
    return norm, {**norm.to_dict(), "sample": sample.description}, sample.nonfinite


def prepare_run(source, model, card: dict | None, output, settings: InferenceSettings,
                device: torch.device | None = None) -> PreparedRun:
    """Resolve defaults, check the input, create (or reopen to resume) the output store.

    Raises:
        ImageInputError: input problems (channels the model cannot take, 3D data...).
        OutputStoreError: output exists (not resumable), is not writable...
        ValueError: a card for another architecture, bad settings.
    """
    source = open_image(source)
    card = dict(card or {})
    device = device or choose_device(settings.device)
    architecture = _check_card(model, card)
    maps = tuple(MapInfo(s.name, s.channels, s.kind, tuple(s.value_range), s.description)
                 for s in model.map_specs(settings.mc_samples))
    if not maps or maps[0].name != "probs":
        raise ValueError(f"{architecture}: map_specs() must list 'probs' first")
    superblock = settings.superblock or auto_superblock(maps, settings.chunk)
    blocks = superblocks(source.shape, superblock, settings.chunk, settings.region)
    in_channels = model.config.in_channels
    _check_channels(source, in_channels)
    norm, norm_info, nonfinite = resolve_normalization(source, in_channels, card, settings.normalization)
    model_tiles = default_tile_settings(model, card, mode=settings.mode, tile=settings.tile,
                                        overlap=settings.overlap)
    scale, resampled = resolve_scale(settings.scale, card, source)
    tiles = image_grid_tiles(model_tiles, scale)
    warnings = _plan_warnings(model, tiles, superblock, nonfinite) + ([resampled] if resampled else [])
    output = _output_path(source, output, architecture)
    layout = StoreLayout(source.shape, settings.chunk, superblock, maps,
                         settings.probs_dtype, settings.maps_dtype, source.pixel_size, source.unit)
    tta = resolve_tta(card, settings.tta)
    run_key = _run_key(architecture, card, model, tiles, settings, norm_info, source, tta, scale)
    run = {**run_key, **_environment(), "device": str(device),
           "weights_path": card.get("weights_path"), "weights_version": card.get("version"),
           "halo_covers_receptive_field": tiles.covers_receptive_field,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    store, resumed = OutputStore.prepare(output, layout, _plain(run), run_key,
                                         overwrite=settings.overwrite, resume=settings.resume)
    plan = RunPlan(
        output=str(output), image_shape=source.shape, in_channels=in_channels, tiles=tiles,
        blocks=blocks,
        normalization=norm, maps=maps, mc_samples=settings.mc_samples,
        batch_size=settings.batch_size or auto_batch_size(device, model_tiles.window),
        skip_threshold=settings.skip_threshold, seed=settings.seed, tta=tta, scale=scale)
    return PreparedRun(plan, store, source, resumed, warnings, settings.region, norm_info)


def resolve_tta(card: dict | None, requested: int | None) -> int:
    """Views per tile: ``requested``, else the card's ``"inference": {"tta": N}``, else 1."""
    if requested is not None:
        return check_views(requested)
    stored = ((card or {}).get("inference") or {}).get("tta", 1)
    try:
        return check_views(int(stored))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the weights card's inference.tta is {stored!r}; it must be 1, 2, 4 or 8 "
                         "(edit the card, or pass tta explicitly)") from exc


def _check_card(model, card: dict) -> str:
    """The architecture name; refuses a card made for another architecture."""
    name = getattr(model, "name", "")
    if card.get("architecture") and name and card["architecture"] != name:
        raise ValueError(f"the weights card is for {card['architecture']!r} but the model is "
                         f"{name!r}; load these weights with {card['architecture']!r} or pick "
                         f"weights made for {name!r}")
    return name or card.get("architecture", "model")


def _run_key(architecture: str, card: dict, model, tiles: TileSettings, settings: InferenceSettings,
             norm_info: dict, source: ImageSource, tta: int = 1, scale: float = 1.0) -> dict:
    """The settings a run must share with a stored output to resume it (JSON-friendly).

    ``tta`` and ``scale`` are recorded only when not 1, so outputs made before them resume.
    """
    key = {
        "model": architecture, "weights_sha256": card.get("sha256"),
        "config": model.config.to_dict(), "tile_mode": tiles.mode, "tile": tiles.tile,
        "overlap": tiles.overlap, "mc_samples": settings.mc_samples, "normalization": norm_info,
        "input": source.path or "in-memory array", "input_axes": source.spec.axes,
        "input_index": dict(source.spec.index), "input_channels": source.spec.channels,
        "skip_threshold": settings.skip_threshold, "seed": settings.seed,
    }
    if tta != 1:
        key["tta"] = tta
    if scale != 1:
        key["scale"] = scale
    return _plain(key)


def _check_channels(source: ImageSource, in_channels: int) -> None:
    channels = source.channels
    if channels in (1, 2, 3, 4) and (in_channels in (1, 3) or channels == in_channels):
        return
    raise ImageInputError(
        f"the image has {channels} channels and the model takes {in_channels}; choose which to use, "
        f"e.g. channels=({', '.join(str(c) for c in range(min(in_channels, channels)))}) "
        f"(CLI: --channels), or name a non-channel axis with axes=... and pick it with index=...")


def _plan_warnings(model, tiles: TileSettings, superblock: int, nonfinite: int) -> list[str]:
    warnings = []
    if tiles.mode == "crop" and superblock % tiles.tile:
        warnings.append(f"tile {tiles.tile} does not divide the superblock {superblock}: tiles on block "
                        "borders are computed twice; choose a tile that divides it")
    if tiles.mode == "crop" and not getattr(model, "translation_equivariant", True):
        warnings.append("crop mode on a model that is not translation-equivariant: expect seams; "
                        "blend mode is the default for it")
    if tiles.covers_receptive_field is False:
        warnings.append(f"the receptive field is wider than the halo ({tiles.overlap} px): tiled output "
                        "may differ slightly from a whole-image pass near tile borders")
    if nonfinite:
        warnings.append(f"the image has NaN/inf pixels ({nonfinite} in the statistics sample); they are "
                        "treated as the low percentile (background) and counted per block")
    return warnings


def _output_path(source: ImageSource, output, architecture: str) -> Path:
    if output is None:
        if source.path is None:
            raise ValueError("an in-memory image has no folder to write next to; pass an output path")
        output = default_output_path(source.path, architecture)
    output = Path(output).expanduser().resolve()
    if source.path is not None:
        image = Path(source.path).resolve()
        if output == image or output in image.parents or image in output.parents:
            raise ValueError(f"the output {output} would overlap the input {image}; choose an output "
                             "path outside the input")
    return output


def _environment() -> dict:
    from napari_medseg import __version__

    return {"package_version": __version__, "torch_version": torch.__version__}


def _plain(value):
    """JSON-friendly copy (tuples → lists) so stored and new run keys compare equal."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


__all__ = ["InferenceSettings", "RunPlan", "PreparedRun", "DeviceMemoryError", "choose_device",
           "auto_batch_size", "auto_superblock", "shrink_tiles", "resolve_normalization", "resolve_tta",
           "prepare_run"]
