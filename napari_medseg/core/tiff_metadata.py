"""Physical pixel size of a TIFF's level 0 from its metadata (OME, Aperio SVS, ImageJ, TIFF tags).

Whole-slide scanners and microscopes record how many micrometres one pixel spans; with it the
napari layers get their physical scale and exported object tables their areas in µm². Sources, in
order of trust:

1. OME-TIFF: ``Pixels/@PhysicalSizeY``, ``@PhysicalSizeX`` and their units;
2. Aperio SVS: ``MPP`` in the first page's description;
3. ImageJ hyperstacks: ``XResolution``/``YResolution`` in pixels per ``unit`` (micron, µm, nm...);
4. the TIFF resolution tags in centimetres or inches (Hamamatsu NDPI, Leica SCN, most scanners).

Resolution tags also hold document defaults (72, 96, 300 dpi) written by programs that know
nothing of the optics; a pixel larger than :data:`MAX_TAG_PIXEL_UM` from them is ignored rather
than reported as a physical size that would be wrong by orders of magnitude.
"""
from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ElementTree

MAX_TAG_PIXEL_UM = 20.0   # micrometres; 20 µm per pixel is 1270 dpi, far below any microscope
PixelSize = tuple[tuple[float, float] | None, str | None]

_UNIT_NAMES = {"µm": "micrometer", "um": "micrometer", "micron": "micrometer", "microns": "micrometer",
               "\u03bcm": "micrometer", "micrometer": "micrometer", "nm": "nanometer",
               "nanometer": "nanometer", "mm": "millimeter", "millimeter": "millimeter",
               "cm": "centimeter", "centimeter": "centimeter", "m": "meter", "meter": "meter"}


def tiff_pixel_size(tif, series_index: int = 0) -> PixelSize:
    """``((y, x), unit)`` of one level-0 pixel of series ``series_index``, or ``(None, None)``.

    Args:
        tif: an open ``tifffile.TiffFile``.
        series_index: the series being read (OME files hold one ``Pixels`` element per image).

    Returns:
        The pixel size as two positive floats and a unit name (``"micrometer"``, ``"nanometer"``...),
        or ``(None, None)`` when the file does not say (or says something implausible).
    """
    readers = (lambda: _ome(tif, series_index), lambda: _aperio(tif),
               lambda: _imagej(tif, series_index), lambda: _resolution_tags(tif, series_index))
    for read in readers:
        try:
            found = read()
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, ZeroDivisionError,
                ElementTree.ParseError):
            found = None   # unreadable metadata is the same as none: the image still opens
        if found is not None:
            return found
    return None, None


def _positive(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def _ome(tif, series_index: int) -> PixelSize | None:
    if not getattr(tif, "is_ome", False) or not tif.ome_metadata:
        return None
    root = ElementTree.fromstring(tif.ome_metadata)
    pixels = [element for element in root.iter() if element.tag.rsplit("}", 1)[-1] == "Pixels"]
    if not pixels:
        return None
    element = pixels[min(series_index, len(pixels) - 1)]
    if element.get("PhysicalSizeX") is None or element.get("PhysicalSizeY") is None:
        return None
    x, y = float(element.get("PhysicalSizeX")), float(element.get("PhysicalSizeY"))
    unit = _UNIT_NAMES.get(element.get("PhysicalSizeXUnit", "µm").strip().lower())
    return ((y, x), unit) if _positive(x, y) and unit else None


def _aperio(tif) -> PixelSize | None:
    if not getattr(tif, "is_svs", False):
        return None
    # The description is "Aperio Image Library ...|AppMag = 40|MPP = 0.2520|..."
    found = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", tif.pages[0].description or "")
    mpp = float(found.group(1)) if found else None
    return ((mpp, mpp), "micrometer") if mpp is not None and _positive(mpp) else None


def _first_page(tif, series_index: int):
    return tif.series[series_index].pages[0]


def _imagej(tif, series_index: int) -> PixelSize | None:
    if not getattr(tif, "is_imagej", False):
        return None
    unit = _UNIT_NAMES.get(str((tif.imagej_metadata or {}).get("unit", "")).strip().lower())
    if unit is None:
        return None
    tags = _first_page(tif, series_index).tags
    x, y = (_ratio(tags[name].value) for name in ("XResolution", "YResolution"))
    return ((1.0 / y, 1.0 / x), unit) if _positive(x, y) else None


def _resolution_tags(tif, series_index: int) -> PixelSize | None:
    tags = _first_page(tif, series_index).tags
    if "XResolution" not in tags or "YResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    micrometres_per_unit = {2: 25_400.0, 3: 10_000.0}.get(int(tags["ResolutionUnit"].value))
    x, y = (_ratio(tags[name].value) for name in ("XResolution", "YResolution"))
    if micrometres_per_unit is None or not _positive(x, y):
        return None
    size = (micrometres_per_unit / y, micrometres_per_unit / x)
    return (size, "micrometer") if max(size) <= MAX_TAG_PIXEL_UM else None


def _ratio(value) -> float:
    """A TIFF RATIONAL (``(numerator, denominator)``) or a number, as a float."""
    if isinstance(value, tuple):
        return value[0] / value[1]
    return float(value)
