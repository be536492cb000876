"""Shapes and encodings of an output store (:class:`StoreLayout`) and its one error type.

Kept apart from :mod:`.store` (which creates, reopens, reads and writes the zarr group) so that the
description of a store can be built, compared and pickled without the store's I/O.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .pyramid import level_count


class OutputStoreError(ValueError):
    """The output cannot be created, reused or written; the message says what to do."""


@dataclass(frozen=True)
class MapInfo:
    """One stored map (a plain copy of ``src_models.MapSpec``, kept picklable and JSON-able)."""

    name: str
    channels: int
    kind: str
    value_range: tuple[float, float]
    description: str = ""


@dataclass(frozen=True)
class StoreLayout:
    """Shapes and encodings of an output store.

    Attributes:
        image_shape: ``(H, W)`` of level 0.
        chunk: chunk edge of level 0 (pixels).
        superblock: edge of the blocks work is done in (a multiple of ``chunk``).
        maps: every map written by inference, ``probs`` first.
        probs_dtype: ``"uint8"``, ``"float16"`` or ``"float32"``.
        maps_dtype: dtype of the auxiliary maps, ``"float16"`` or ``"float32"``.
        pixel_size: ``(y, x)`` physical size of a level-0 pixel, or None.
        unit: unit of ``pixel_size``.
    """

    image_shape: tuple[int, int]
    chunk: int
    superblock: int
    maps: tuple[MapInfo, ...]
    probs_dtype: str = "uint8"
    maps_dtype: str = "float16"
    pixel_size: tuple[float, float] | None = None
    unit: str | None = None

    def __post_init__(self) -> None:
        if self.superblock % self.chunk:
            raise OutputStoreError(f"superblock {self.superblock} must be a multiple of chunk {self.chunk}")
        if self.probs_dtype not in ("uint8", "float16", "float32"):
            raise OutputStoreError(f"probs_dtype must be uint8, float16 or float32, not {self.probs_dtype!r}")
        if self.maps_dtype not in ("float16", "float32"):
            raise OutputStoreError(f"maps_dtype must be float16 or float32, not {self.maps_dtype!r}")

    @property
    def levels(self) -> int:
        """Number of pyramid levels (level 0 included; chunks down to 16 px, levels ≥ 64 px)."""
        return level_count(self.image_shape, self.chunk)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "StoreLayout":
        maps = tuple(MapInfo(**{**m, "value_range": tuple(m["value_range"])}) for m in values["maps"])
        pixel = values.get("pixel_size")
        return cls(**{**values, "maps": maps, "image_shape": tuple(values["image_shape"]),
                      "pixel_size": tuple(pixel) if pixel else None})


def labels_dtype(shape: tuple[int, int]) -> str:
    """uint32, or uint64 when position-derived IDs (up to H·W) do not fit (images > 65,535²)."""
    return "uint32" if shape[0] * shape[1] < 2 ** 32 - 1 else "uint64"
