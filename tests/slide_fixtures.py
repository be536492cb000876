"""Whole-slide test files: an Aperio SVS laid out as scanners write it."""
from __future__ import annotations

import numpy as np
import tifffile

APERIO = "Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] (128x128) JPEG/RGB Q=90|AppMag = 40|MPP = {mpp}"


def write_aperio_svs(path, image: np.ndarray, mpp: float = 0.252) -> None:
    """An SVS laid out as Aperio scanners write it: tiled JPEG baseline, a stripped thumbnail,
    a 4× reduced level, then label and macro images (tifffile reads it as series and levels)."""
    h, w = image.shape[:2]
    with tifffile.TiffWriter(path) as writer:
        writer.write(image, tile=(128, 128), compression="jpeg", photometric="rgb", metadata=None,
                     description=APERIO.format(w=w, h=h, mpp=mpp))
        writer.write(image[::8, ::8], compression="jpeg", photometric="rgb", metadata=None,
                     description="Aperio Image Library v12.0.15 \r\nthumbnail")
        writer.write(image[::4, ::4], tile=(128, 128), compression="jpeg", photometric="rgb",
                     metadata=None, description="Aperio Image Library v12.0.15 \r\nlevel 1")
        writer.write(image[:32, :48], photometric="rgb", subfiletype=1, metadata=None,
                     description="Aperio Image Library v12.0.15\r\nlabel 48x32")
        writer.write(image[:32, :64], photometric="rgb", subfiletype=9, metadata=None,
                     description="Aperio Image Library v12.0.15\r\nmacro 64x32")


def blocky_rgb(size: int = 512) -> np.ndarray:
    """(size, size, 3) uint8 of flat 32² blocks: JPEG keeps them within a few grey levels."""
    return np.random.default_rng(1).integers(0, 255, (size // 32, size // 32, 3), dtype=np.uint8).repeat(
        32, 0).repeat(32, 1)
