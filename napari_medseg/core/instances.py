"""Instance labels from class probabilities (in memory; block by block on huge arrays: :mod:`.blockwise`).

Decoding (DESIGN.md §5). Three classes {0 background, 1 interior, 2 boundary}: a seeded
watershed. Markers are the 8-connected components of confident interior (``p_interior >
seed_threshold``, components smaller than ``min_seed_area`` dropped); the mask is the foreground
``p_interior + p_boundary > foreground_threshold`` (i.e. ``1 - p_background``); the markers flood
``-p_interior`` inside the mask. Foreground that no marker reaches becomes objects of its own
(small nuclei whose boundary band leaves no interior), holes are filled and objects smaller than
``min_area`` dropped. Optionally (``seed_split_dip`` > 0) a seed is first cut where its interior
probability, smoothed over the foreground, dips between two peaks by that much: touching nuclei
whose confident interiors meet at a neck still get one marker each (see :func:`_split_seeds`).
Two classes {background, foreground}: connected components, optionally split by a
distance-transform watershed. EM membranes (ISBI 2012): components of the non-membrane area.

Locality, which block-wise decoding relies on: inside one 8-connected component of the foreground
(a "unit": a nucleus, or a cluster of touching nuclei) the result depends only on the
probabilities of that unit. Every step works per unit, and the watershed's ties are broken in a
crop-invariant way (see :func:`_flood`), so decoding any crop that holds a whole unit reproduces
the whole-image result for that unit exactly. The dip split's smoothing also reads the
foreground within ``DecodeSettings.context_radius`` pixels of a unit, so block-wise decoding then
treats units closer than that as one. That is what lets
:func:`.blockwise.instances_blockwise` decode huge arrays block by block with IDs that neighbouring
blocks agree on (see :func:`.blockwise.decode_block`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import h_maxima, local_maxima, reconstruction
from skimage.segmentation import relabel_sequential, watershed

_EIGHT = np.ones((3, 3), bool)
_FOUR = ndi.generate_binary_structure(2, 1)
METHODS = ("auto", "membranes")
_TRUNCATE = 4.0  # Gaussian window of the dip split: this many sigmas each side


@dataclass(frozen=True)
class DecodeSettings:
    """How probabilities become instances (one record, stored with each run's provenance)."""

    method: str = "auto"  # "auto": K=3 → seeded watershed, K=2 → foreground components;
    #                       "membranes": K=2 {membrane, cell}, instances = non-membrane components
    foreground_threshold: float = 0.5  # foreground where 1 - p_background exceeds this
    seed_threshold: float = 0.5  # interior probability above which a foreground pixel can seed
    min_seed_area: int = 3  # seeds smaller than this (pixels) are noise, not nuclei
    min_area: int = 8  # objects smaller than this (pixels, after hole filling) are dropped
    fill_holes: bool = True  # fill background fully enclosed by a single object
    split_touching: bool = False  # K=2 only: split touching blobs by a distance watershed
    split_depth: float = 2.0  # K=2 split: a distance peak must rise this many pixels to seed
    seed_split_dip: float = 0.0  # K=3: split a seed where its smoothed interior probability dips
    #                              this much between two peaks (0 = off; see _split_seeds)
    seed_smoothing: float = 2.0  # K=3 dip split: Gaussian sigma (pixels) of that smoothing

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"DecodeSettings.method must be one of {METHODS}, "
                             f"got {self.method!r}.")
        if not 0 < self.seed_threshold < 1:
            raise ValueError(f"DecodeSettings.seed_threshold must be in (0, 1), got "
                             f"{self.seed_threshold}.")
        if not 0 < self.foreground_threshold < 1:
            raise ValueError("DecodeSettings.foreground_threshold must be in (0, 1), got "
                             f"{self.foreground_threshold}.")
        if self.min_area < 0 or self.min_seed_area < 0 or self.split_depth <= 0:
            raise ValueError("DecodeSettings: min_area and min_seed_area must be >= 0 and "
                             "split_depth > 0.")
        if not 0 <= self.seed_split_dip < 1 or self.seed_smoothing < 0:
            raise ValueError("DecodeSettings: seed_split_dip must be in [0, 1) (0 = off) and "
                             f"seed_smoothing >= 0, got {self.seed_split_dip}, {self.seed_smoothing}.")

    @property
    def context_radius(self) -> int:
        """Pixels beyond a unit that its decode reads (the dip split's smoothing window), so
        block-wise decoding can treat units closer than this as one (see :func:`_support`)."""
        if self.seed_split_dip <= 0 or self.seed_smoothing <= 0:
            return 0
        return int(_TRUNCATE * self.seed_smoothing + 0.5)


def as_probabilities(probs) -> np.ndarray:
    """``(K, H, W)`` probabilities of any dtype → ``float32`` in [0, 1], NaN read as 0.

    Integer arrays are read as fixed point (``uint8`` 255 = 1.0, ``uint16`` 65535 = 1.0), the
    compact dtypes a probability store may use.
    """
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[0] not in (2, 3):
        raise ValueError(f"probabilities must be (K, H, W) with K = 2 or 3 classes, got shape "
                         f"{probs.shape}; move the class axis first.")
    if np.issubdtype(probs.dtype, np.integer):
        return probs.astype(np.float32) / np.float32(np.iinfo(probs.dtype).max)
    return np.nan_to_num(probs.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=0.0)


def _flood(elevation: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Seeded watershed whose result per mask component does not depend on the crop.

    scikit-image orders its flooding queue by (value, insertion age) and gives every marker pixel
    age 0, so ties between marker pixels would be broken by the heap's layout, which depends on
    everything else in the image. Giving marker pixels distinct values below any elevation, rising
    in raster order, makes the queue order a total order that cropping preserves: every later
    entry has a unique age, so the order among one unit's pixels is fixed by that unit alone.
    """
    elevation = elevation.astype(np.float64)
    seeds = np.flatnonzero(markers)
    low = float(elevation.min(initial=0.0)) - 2.0
    elevation.flat[seeds] = low + np.arange(len(seeds)) / max(len(seeds), 1)
    return watershed(elevation, markers, mask=mask, connectivity=1)


def _three_class(p: np.ndarray, s: DecodeSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded watershed on ``(3, H, W)`` float probabilities → (labels, anchors, mask)."""
    mask = (p[1] + p[2]) > s.foreground_threshold
    # Seeds stay inside the mask, so each one lies in (and floods) exactly one unit.
    seeds = (p[1] > s.seed_threshold) & mask
    if s.seed_split_dip > 0:
        markers, n = _split_seeds(seeds, _masked_smooth(p[1], mask, s.seed_smoothing),
                                  s.seed_split_dip)
    else:
        markers, n = ndi.label(seeds, _EIGHT)
    if s.min_seed_area > 1 and n:
        small = np.bincount(markers.ravel(), minlength=n + 1) < s.min_seed_area
        small[0] = False
        markers[small[markers]] = 0
    labels = _flood(-p[1], markers, mask)
    _add_unreached(labels, markers, mask)  # markers now anchor every object
    return labels, markers, mask


def _masked_smooth(values: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian average of ``values`` over ``mask`` pixels only (normalised convolution), 0
    outside the mask: ``(H, W) float32``. Background never pulls an object's values down, and
    the result at a pixel reads only the mask within ``context_radius`` of it."""
    if sigma <= 0:
        return np.where(mask, values, 0).astype(np.float32)
    weight = mask.astype(np.float32)
    total = ndi.gaussian_filter(values * weight, sigma, mode="constant", truncate=_TRUNCATE)
    norm = ndi.gaussian_filter(weight, sigma, mode="constant", truncate=_TRUNCATE)
    return np.where(mask, total / np.maximum(norm, 1e-6), 0).astype(np.float32)


def _split_seeds(seeds: np.ndarray, smooth: np.ndarray, dip: float) -> tuple[np.ndarray, int]:
    """Seed components cut where the smoothed interior probability dips by at least ``dip``.

    Peaks are the regional maxima of the h-maxima transform of ``smooth`` (its reconstruction
    by dilation from ``smooth - dip``): two summits become separate peaks only when the lower one
    rises at least ``dip`` above the pass between them. It is computed per seed, on the seed's
    bounding box with every other pixel at -1, so each seed's peaks depend on that seed alone, and
    only for seeds with several summits (a seed with one summit is one marker, as without the
    split). A seed with several peaks is divided among them by a watershed of ``-smooth``
    within the seed. Returns ``(markers (H, W) int32, count)``.
    """
    height = np.where(seeds, smooth, -1.0).astype(np.float64)
    components, n_seeds = ndi.label(seeds, _EIGHT)
    summits = local_maxima(height, connectivity=2, allow_borders=True).astype(bool) & seeds
    summit_ids, _ = ndi.label(summits, _EIGHT)
    first_summit = np.zeros(n_seeds + 1, np.int64)
    owner, ids = components[summits], summit_ids[summits]
    first_summit[owner] = ids  # any one summit per seed; a seed with another one has several
    several = np.zeros(n_seeds + 1, bool)
    several[owner[ids != first_summit[owner]]] = True
    markers = np.where(several[components], 0, components)  # one summit: the seed is the marker
    peaks = np.zeros_like(seeds)
    for index, box in enumerate(ndi.find_objects(components), 1):
        if several[index]:
            own = components[box] == index
            crop = np.pad(np.where(own, height[box], -1.0), 1, constant_values=-1.0)
            domes = reconstruction(crop - dip, crop, method="dilation")
            top = local_maxima(domes, connectivity=2, allow_borders=True)[1:-1, 1:-1]
            peaks[box] |= top.astype(bool) & own
    peak_ids, _ = ndi.label(peaks, _EIGHT)
    markers[peaks] = peak_ids[peaks] + n_seeds  # unique: past every seed's id
    split = several[components]
    markers = np.where(split, _flood(-height, markers, split), markers)
    markers, _, _ = relabel_sequential(markers)
    return markers.astype(np.int32, copy=False), int(markers.max(initial=0))


def _two_class(p: np.ndarray, s: DecodeSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(2, H, W)`` {background, foreground} → components (optionally split) and membranes."""
    mask = p[1] > s.foreground_threshold
    if s.method == "membranes":  # 4-connected: a diagonal gap in a membrane must not merge cells
        labels, _ = ndi.label(mask, _FOUR)
        return labels, labels, mask
    if not s.split_touching:
        labels, _ = ndi.label(mask, _EIGHT)
        return labels, labels, mask
    distance = ndi.distance_transform_edt(mask)
    markers, _ = ndi.label(h_maxima(distance, s.split_depth) & mask, _EIGHT)
    labels = _flood(-distance, markers, mask)
    _add_unreached(labels, markers, mask)
    return labels, markers, mask


def _fill_holes(labels: np.ndarray) -> np.ndarray:
    """Fill every background region enclosed by exactly one object with that object's label.

    Vectorised: background regions are labelled once and their (region, neighbouring object)
    pairs collected from eight shifted views; regions touching the array's edge are never holes.
    """
    background, n = ndi.label(labels == 0, _FOUR)
    if n == 0:
        return labels
    height, width = labels.shape
    padded = np.pad(labels, 1)
    stride = np.int64(padded.max()) + 1
    codes = []
    for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)):
        neighbour = padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
        touching = (background > 0) & (neighbour > 0)
        codes.append(background[touching] * stride + neighbour[touching])
    pairs = np.unique(np.concatenate(codes))
    region, owner = pairs // stride, pairs % stride
    single = np.bincount(region, minlength=n + 1)[region] == 1
    fill = np.zeros(n + 1, labels.dtype)
    fill[region[single]] = owner[single]
    fill[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])] = 0
    return np.where(background > 0, fill[background], labels)


def _add_unreached(labels: np.ndarray, anchors: np.ndarray, mask: np.ndarray) -> None:
    """Foreground that no seed reached (e.g. a nucleus too small to have interior) becomes
    objects of its own, each anchored at itself. Modifies ``labels`` and ``anchors`` in place."""
    unreached = mask & (labels == 0)
    extra, _ = ndi.label(unreached, _EIGHT)
    labels[unreached] = extra[unreached] + labels.max(initial=0)
    anchors[unreached] = labels[unreached]


def _decode_parts(probs, settings: DecodeSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode and locate objects.

    Returns:
        ``labels`` ``(H, W) int32`` numbered 1..n in raster order of their anchor pixels,
        ``anchors`` ``(n,) int64`` flat index of each object's anchor (the first pixel, in raster
        order, of its seed, or of the object itself when it has no seed), and the foreground
        ``mask`` ``(H, W) bool``.
    """
    p = as_probabilities(probs)
    if settings.method == "membranes" and p.shape[0] != 2:
        raise ValueError("method='membranes' needs (2, H, W) probabilities {membrane, cell}.")
    decode = _three_class if p.shape[0] == 3 else _two_class
    labels, anchor_map, mask = decode(p, settings)
    if settings.fill_holes:
        labels = _fill_holes(labels)
    areas = np.bincount(labels.ravel())
    keep = areas >= max(settings.min_area, 1)
    keep[0] = False
    flat = np.flatnonzero(anchor_map)
    ids, first = np.unique(anchor_map.ravel()[flat], return_index=True)
    alive = keep[ids]
    ids, anchors = ids[alive], flat[first[alive]]  # ids sorted → anchors of each object
    order = np.argsort(anchors, kind="stable")
    lut = np.zeros(len(areas), np.int32)
    lut[ids[order]] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[labels], anchors[order].astype(np.int64), mask


def decode_instances(probs, settings: DecodeSettings | None = None, **overrides) -> np.ndarray:
    """Instance labels from one in-memory probability map.

    Args:
        probs: ``(K, H, W)`` class probabilities (float, or uint8/uint16 fixed point): K = 3
            {background, interior, boundary} or K = 2 {background, foreground}.
        settings: decoding parameters (defaults: :class:`DecodeSettings`).
        **overrides: single fields to change, e.g. ``min_area=20``.

    Returns:
        ``(H, W) int32`` labels, 0 = background, objects 1..n numbered in raster order of their
        anchor pixel (so a crop and the whole image number shared objects in the same order).
    """
    settings = _settings(settings, overrides)
    return _decode_parts(probs, settings)[0]


def decode_semantic_membranes(probs, threshold: float = 0.5, min_area: int = 8) -> np.ndarray:
    """EM membranes (ISBI 2012 style) → instances = 4-connected components of non-membrane.

    Args:
        probs: ``(2, H, W)`` probabilities {membrane, cell interior}, or the ``(H, W)`` cell
            probability alone.
        threshold: cell probability above which a pixel is not membrane.
        min_area: components smaller than this (pixels) are dropped.

    Returns:
        ``(H, W) int32`` labels, 0 = membrane.
    """
    probs = np.asarray(probs)
    if probs.ndim == 2:  # only the cell channel (index 1) is read
        probs = np.stack([np.zeros_like(probs), probs])
    settings = DecodeSettings(method="membranes", foreground_threshold=threshold, min_area=min_area)
    return _decode_parts(probs, settings)[0]


def _settings(settings: DecodeSettings | None, overrides: dict) -> DecodeSettings:
    settings = settings or DecodeSettings()
    if overrides:
        settings = DecodeSettings(**{**asdict(settings), **overrides})
    return settings

