"""Compute one superblock: read its input window, run its tiles in batches, stitch or blend.

Everything here works on one block at a time and holds at most one block's input window and one
set of float32 accumulators, so memory does not grow with the image. :mod:`.inference` drives it
(single process, with reading and writing overlapped) and so can a Dask worker
(:func:`napari_medseg.core.inference.process_block`).

Empty tiles: a tile whose normalised window varies by less than ``skip_threshold`` over all its
pixels and channels (max − min) is not run. Its class probabilities are set to background with
probability 1 (channel 0 = 1, or foreground 0 for a single sigmoid channel), which keeps empty
slide areas free of spurious objects whatever the network does on flat input. Its auxiliary maps
(uncertainty, background heads, attention) are what the network predicts for a constant window
of the same size and mean level (mean quantised to 1/64, one cached forward pass per distinct
size and level), so these maps stay continuous across skipped and computed tiles.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Generator

import numpy as np
import torch

from .normalize import apply_range, to_model_channels
from .resolution import model_size, resample
from .test_time import predict_views
from .tiling import Block, Tile, block_tiles, input_window

SKIP_LEVELS = 64   # quantisation of a skipped tile's mean level for the cached blank prediction


class TileTooLarge(RuntimeError):
    """The device ran out of memory with a batch of one tile: the caller should shrink the tile."""


@dataclass(frozen=True)
class BlockInput:
    """A block's normalised input window.

    Attributes:
        block: the block.
        window: ``(y0, y1, x0, x1)`` of the image read (the tiles' bounding box).
        data: ``(C_in, h, w) float32`` normalised network input (NaN/inf → 0).
        nonfinite: NaN/inf pixels of the input inside the block's own region (all channels).
    """

    block: Block
    window: tuple[int, int, int, int]
    data: np.ndarray
    nonfinite: int


@dataclass(frozen=True)
class BlockReport:
    """What computing one block cost.

    Attributes:
        block: the block.
        tiles_run: tiles through the network.
        tiles_skipped: empty tiles filled without a forward pass.
        nonfinite: NaN/inf input pixels inside the block.
        forward_seconds: time inside ``model.predict`` (device synchronised).
    """

    block: Block
    tiles_run: int
    tiles_skipped: int
    nonfinite: int
    forward_seconds: float


def read_block(source, plan, block: Block) -> BlockInput:
    """Read and normalise the input window of a block (one region read).

    Args:
        source: :class:`~napari_medseg.core.io.ImageSource`.
        plan: the run plan (image shape, tiles, channels, normalisation).
        block: the block to read for.
    """
    tiles = block_tiles(block.region, plan.image_shape, plan.tiles)
    window = input_window(tiles)
    raw = source.read_region(*window)
    nonfinite = 0
    if raw.dtype.kind == "f":
        y0, y1, x0, x1 = block.region
        inner = raw[:, y0 - window[0]:y1 - window[0], x0 - window[2]:x1 - window[2]]
        nonfinite = int(inner.size - np.count_nonzero(np.isfinite(inner)))
    data = apply_range(to_model_channels(raw, plan.in_channels), plan.normalization)
    return BlockInput(block, window, data, nonfinite)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA/MPS/CPU allocation failures (PyTorch raises them as RuntimeError subclasses)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class TileRunner:
    """Runs the tiles of blocks through one model on one device.

    Attributes:
        batch_size: current batch size (halved after an out-of-memory error).
        forward_seconds: total time in forward passes.
        warnings: messages about automatic adjustments (smaller batches).
    """

    def __init__(self, model, plan, device: torch.device):
        self.model = model
        self.plan = plan
        self.device = torch.device(device)
        self.batch_size = plan.batch_size
        self.forward_seconds = 0.0
        self.warnings: list[str] = []
        self._blank: dict = {}

    def run_block(self, block_input: BlockInput) -> Generator[int, None, tuple[dict, BlockReport]]:
        """Compute every map of a block, yielding the number of tiles finished after each batch.

        Returns:
            ``({name: (k, h, w) float32}, report)`` for the block's region.
        """
        plan, block = self.plan, block_input.block
        y0, y1, x0, x1 = block.region
        maps = {m.name: np.zeros((m.channels, y1 - y0, x1 - x0), np.float32) for m in plan.maps}
        tiles = block_tiles(block.region, plan.image_shape, plan.tiles)
        runs, skipped = [], []
        for tile in tiles:
            window = self._window(block_input, tile)
            flat = plan.skip_threshold > 0 and float(window.max() - window.min()) < plan.skip_threshold
            (skipped if flat else runs).append((tile, window))
        for tile, window in skipped:
            self._accumulate(maps, block, tile, self._blank_maps(window))
        if skipped:
            yield len(skipped)
        start = self.forward_seconds
        for batch in self._batches(runs):
            outputs = self._forward_with_backoff([self._padded(t, w) for t, w in batch], batch[0][0])
            for i, (tile, _) in enumerate(batch):
                self._accumulate(maps, block, tile, {k: v[i] for k, v in outputs.items()})
            yield len(batch)
        report = BlockReport(block, len(runs), len(skipped), block_input.nonfinite,
                             self.forward_seconds - start)
        return maps, report

    # ------------------------------------------------------------------ tiles
    @staticmethod
    def _window(block_input: BlockInput, tile: Tile) -> np.ndarray:
        oy, ox = block_input.window[0], block_input.window[2]
        y0, y1, x0, x1 = tile.window
        return block_input.data[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox]

    @staticmethod
    def _padded(tile: Tile, window: np.ndarray) -> np.ndarray:
        """Reflect-pad a window smaller than the blend tile (bottom/right); others unchanged."""
        if tile.pad_to is None:
            return window
        ph, pw = tile.pad_to[0] - window.shape[1], tile.pad_to[1] - window.shape[2]
        mode = "reflect" if min(window.shape[1:]) > 1 else "edge"
        return np.pad(window, ((0, 0), (0, ph), (0, pw)), mode=mode)

    def _batches(self, runs: list) -> list[list]:
        """Tiles grouped by input shape (edge tiles differ), in batches of ``batch_size``."""
        groups: dict = {}
        for tile, window in runs:
            shape = tile.pad_to or window.shape[1:]
            groups.setdefault(tuple(shape), []).append((tile, window))
        size = max(1, self.batch_size)
        return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]

    def _accumulate(self, maps: dict, block: Block, tile: Tile, outputs: dict) -> None:
        """Crop mode: copy the kept core. Blend mode: add the prediction times its weights."""
        by0, bx0 = block.region[0], block.region[2]
        ky0, ky1, kx0, kx1 = tile.keep
        wy0, wx0 = tile.window[0], tile.window[2]
        for name, out in outputs.items():
            if name not in maps:
                continue
            part = out[:, ky0 - wy0:ky1 - wy0, kx0 - wx0:kx1 - wx0]
            target = maps[name][:, ky0 - by0:ky1 - by0, kx0 - bx0:kx1 - bx0]
            if tile.weights is None:
                target[...] = part
            else:
                wy, wx = tile.weights
                target += part * wy[:, None] * wx[None, :]

    # ------------------------------------------------------------------ forward passes
    def _forward_with_backoff(self, arrays: list[np.ndarray], first: Tile) -> dict:
        """Forward a batch; on out-of-memory halve the batch, and below one tile raise TileTooLarge."""
        try:
            return self._forward(arrays, first)
        except Exception as exc:  # noqa: BLE001 - only OOM is handled, everything else re-raised
            if not is_out_of_memory(exc):
                raise
        self._free_device_cache()
        if len(arrays) == 1:
            raise TileTooLarge(f"out of memory on {self.device} with one tile of "
                               f"{arrays[0].shape[1]}x{arrays[0].shape[2]}")
        half = len(arrays) // 2
        if half < self.batch_size:
            self.batch_size = half
            self.warnings.append(f"out of memory on {self.device}: batch size reduced to {half}")
        first_half = self._forward_with_backoff(arrays[:half], first)
        second_half = self._forward_with_backoff(arrays[half:], first)
        return {k: np.concatenate([first_half[k], second_half[k]]) for k in first_half}

    def _forward(self, arrays: list[np.ndarray], first: Tile) -> dict:
        """``{name: (B, k, h, w) float32 numpy}`` for a batch of same-shaped windows.

        Monte-Carlo sampling is seeded from the run's seed and the first tile's position, so a
        resumed or repeated run draws the same samples.
        """
        seed = (self.plan.seed * 1_000_003 + first.window[0] * 65_537 + first.window[2]) % (2 ** 63)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.inference_mode(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            x = torch.from_numpy(np.stack(arrays)).to(self.device)
            start = time.perf_counter()
            scale, size = getattr(self.plan, "scale", 1.0), tuple(x.shape[-2:])
            if scale != 1:   # the weights' pixel size: resample in, maps back (see .resolution)
                x = resample(x, model_size(size, scale))
            outputs = predict_views(self.model, x, self.plan.mc_samples, self.plan.tta)
            if scale != 1:
                outputs = {k: resample(v.float(), size) for k, v in outputs.items()}
            self._synchronize()
            self.forward_seconds += time.perf_counter() - start
            return {k: v.float().cpu().numpy() for k, v in outputs.items()}

    def _blank_maps(self, window: np.ndarray) -> dict:
        """Maps of a skipped tile: background probabilities + the prediction for a flat window."""
        k = next(m.channels for m in self.plan.maps if m.name == "probs")
        probs = np.zeros((k,) + window.shape[1:], np.float32)
        if k > 1:
            probs[0] = 1.0
        maps = {"probs": probs}
        if len(self.plan.maps) > 1:
            level = round(float(window.mean()) * SKIP_LEVELS) / SKIP_LEVELS
            key = (window.shape, level)
            if key not in self._blank:
                if len(self._blank) > 32:
                    self._blank.clear()
                flat = np.full(window.shape, level, np.float32)
                origin = Tile((0, 0, 0, 0), (0, 0, 0, 0))
                self._blank[key] = {n: v[0] for n, v in self._forward([flat], origin).items() if n != "probs"}
            maps.update(self._blank[key])
        return maps

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def _free_device_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            torch.mps.empty_cache()
