"""Tissue detection on a low-resolution thumbnail.

Tissue is stained, glass is not: pixels whose HSV saturation is above an Otsu threshold (kept
between a floor, so a blank slide finds nothing, and a cap, so pale tissue is kept) and that are
not near-white are tissue. Morphological
closing and opening at physical radii clean the mask, regions smaller than a physical area are
dropped, and holes inside tissue are filled (all of them, or those under a size) so lumina and
fat inside tissue count as tissue. Every size is in microns, so results do not depend on the
scanner's resolution.

Detection assumes a brightfield slide: stained tissue on light glass. A slide whose border is
dark (a fluorescence or dark-field scan) gets a warning, as one without any colour does.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsitools.io import atomic_path
from wsitools.slide import Slide
from wsitools.types import Microns, MicronsPerPixel

log = logging.getLogger(__name__)

DARK_BORDER = 0.25
"""Median brightness (HSV value, 0-1) of a thumbnail's border under which the slide is taken for
one on a dark background. Glass is above 0.9, and H&E or IHC tissue filling the border above 0.5;
a fluorescence background is near 0, and its noise is saturated enough to pass for tissue."""

BORDER_WIDTH = 0.05
"""The border whose brightness is judged, as a fraction of the thumbnail's shorter side."""


@dataclass(frozen=True)
class TissueParams:
    """Tissue detection settings; every length in microns, every area in square microns."""

    mpp: MicronsPerPixel = MicronsPerPixel(8.0)
    """Resolution of the thumbnail the mask is computed on (about 8-16 um/px is plenty)."""
    min_saturation: float = 0.05
    """Floor under the Otsu saturation threshold (0-1): glass never passes it."""
    max_saturation: float = 0.10
    """Cap on the Otsu threshold: on tissue-dense thumbnails Otsu can split pale tissue from
    dark tissue instead of tissue from glass; pale stained tissue is still above 0.1."""
    max_brightness: float = 0.92
    """Pixels brighter than this (HSV value, 0-1) are background whatever their saturation."""
    closing_radius: Microns = Microns(40.0)
    """Closing joins tissue fragments across gaps up to about twice this."""
    opening_radius: Microns = Microns(16.0)
    """Opening removes specks and thin debris narrower than about twice this."""
    min_region_area: float = 50_000.0
    """Tissue regions smaller than this (um^2) are dropped as debris."""
    fill_holes: bool = True
    """Fill holes inside tissue (lumina, fat) so they count as tissue."""
    max_hole_area: float | None = None
    """Fill only holes smaller than this (um^2); None fills every hole."""


Ring = list[tuple[float, float]]
"""A closed polygon ring in level-0 px, first point repeated last."""


@dataclass
class TissueResult:
    """The mask on the thumbnail grid, with everything needed to map it to level 0."""

    mask: np.ndarray
    """Boolean [h, w] on the thumbnail grid."""
    thumbnail: np.ndarray
    """RGB [h, w, 3] the mask was computed on."""
    downsample: tuple[float, float]
    """Level-0 px per mask px along (x, y)."""
    mpp_level0: MicronsPerPixel
    threshold: float
    polygons: list[list[Ring]]
    """One polygon per tissue region: the outer ring, then its holes (level-0 px)."""
    viewer_origin: tuple[int, int] = (0, 0)
    """The top-left of the slide's :attr:`~wsitools.slide.Slide.bounds`: QuPath's (0, 0), which
    :func:`to_geojson` subtracts."""
    warning: str | None = None
    """Why the mask may not be what it seems (a slide without colour, or on a dark background),
    in one line without the slide's path; None for an ordinary brightfield slide."""

    @property
    def area_um2(self) -> float:
        px_area = self.downsample[0] * self.downsample[1] * self.mpp_level0**2
        return float(self.mask.sum() * px_area)

    @property
    def empty(self) -> bool:
        return not bool(self.mask.any())


def _disk_rows(radius_px: float) -> list[tuple[int, int]]:
    """The disk footprint of ``radius_px`` (skimage's ``disk``, radius rounded) as rows: for each
    row offset dy, the half-width w of its run of offsets -w..w."""
    from skimage.morphology import disk

    footprint = disk(max(0, int(round(radius_px))))
    r = footprint.shape[0] // 2
    return [(dy - r, int(np.flatnonzero(row)[-1]) - r) for dy, row in enumerate(footprint)]


def _disk_sweep(mask: np.ndarray, radius_px: float, *, op: Literal["dilate", "erode"]) -> np.ndarray:
    """Binary dilation or erosion of ``mask`` by a disk, pixels outside the image counted as
    background: exactly ``scipy.ndimage.binary_dilation``/``binary_erosion`` with that footprint
    and ``border_value=0``, without their per-pixel walk over the whole footprint. The disk is
    a stack of centred horizontal runs, so each run width is one 1-D max (min) filter along rows,
    and each row of the disk an OR (AND) of that filter's result shifted by the row's offset.
    """
    from scipy import ndimage as ndi

    pixels = mask.view(np.uint8)
    height = mask.shape[0]
    dilate = op == "dilate"
    filter1d = ndi.maximum_filter1d if dilate else ndi.minimum_filter1d
    out = np.zeros(mask.shape, bool) if dilate else np.ones(mask.shape, bool)
    runs: dict[int, np.ndarray] = {}
    for dy, w in _disk_rows(radius_px):
        if w not in runs:
            runs[w] = filter1d(pixels, 2 * w + 1, axis=1, mode="constant", cval=0).view(bool)
        lo, hi = max(0, -dy), max(0, min(height, height - dy))  # rows y with y + dy inside
        if lo < hi:
            if dilate:
                out[lo:hi] |= runs[w][lo + dy : hi + dy]
            else:
                out[lo:hi] &= runs[w][lo + dy : hi + dy]
        if not dilate:  # the rest reach outside the image, which is background
            out[: min(lo, height)] = False
            out[max(hi, lo) :] = False
    return out


def _edge_aware(
    mask: np.ndarray, radius_px: float, ops: tuple[Literal["dilate", "erode"], Literal["dilate", "erode"]]
) -> np.ndarray:
    """A closing (``("dilate", "erode")``) or opening by a disk, on ``mask`` extended past its
    edges by repeating its edge pixels, cropped back.

    A slide scanned or cropped up to its tissue has tissue at its edge; taking the outside for
    glass would cut a band of the disk's radius from it (and a strip thinner than the disk
    away), while taking it for tissue would join tissue near the edge to the edge. Repeating the
    edge continues each the way it leaves the image.
    """
    pad = 2 * max(0, int(round(radius_px)))  # the second step reads what the first made up to a radius out
    height, width = mask.shape
    out = np.pad(mask, pad, mode="edge")
    for op in ops:
        out = _disk_sweep(out, radius_px, op=op)
    return out[pad : pad + height, pad : pad + width]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region not connected to the image's border filled.

    The same result as ``scipy.ndimage.binary_fill_holes`` (4-connected background), found by
    labelling the background once instead of dilating from the border until nothing changes.
    """
    from scipy import ndimage as ndi

    labels, _ = ndi.label(np.pad(~mask, 1, constant_values=True))
    return labels[1:-1, 1:-1] != labels[0, 0]


def saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value in [0, 1] of an RGB uint8 image, as float32.

    The same S and V as ``skimage.color.rgb2hsv`` (V = max, S = (max - min) / max, 0 on black)
    without computing hue in float64, which was half the time of tissue detection.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hi = np.maximum(np.maximum(r, g), b)
    spread = (hi - np.minimum(np.minimum(r, g), b)).astype(np.float32)
    hi_f = hi.astype(np.float32)
    sat = np.divide(spread, hi_f, out=np.zeros_like(spread), where=hi > 0)
    return sat, hi_f * np.float32(1.0 / 255.0)


def tissue_mask(thumbnail: np.ndarray, mpp: float, params: TissueParams) -> tuple[np.ndarray, float]:
    """The cleaned tissue mask of an RGB thumbnail at ``mpp`` um/px, and the threshold used."""
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    sat, val = saturation_value(thumbnail)
    otsu = threshold_otsu(sat) if np.ptp(sat) > 0 else 1.0
    threshold = float(np.clip(otsu, params.min_saturation, params.max_saturation))
    mask = (sat > threshold) & (val < params.max_brightness)
    if params.closing_radius > 0:
        mask = _edge_aware(mask, params.closing_radius / mpp, ("dilate", "erode"))
    if params.opening_radius > 0:
        mask = _edge_aware(mask, params.opening_radius / mpp, ("erode", "dilate"))
    px_area = mpp * mpp
    if params.fill_holes:
        if params.max_hole_area is None:
            mask = fill_holes(mask)
        else:
            mask = remove_small_holes(mask, max_size=int(params.max_hole_area / px_area))
    mask = remove_small_objects(mask, max_size=max(0, int(params.min_region_area / px_area) - 1))
    return mask.astype(bool), threshold


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """Keep only the corners of a closed ring (find_contours puts a vertex every half pixel)."""
    if len(ring) < 4:
        return ring
    body = ring[:-1]
    before = body - np.roll(body, 1, axis=0)
    after = np.roll(body, -1, axis=0) - body
    corner = np.abs(before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) > 1e-9
    kept = body[corner]
    return np.vstack([kept, kept[:1]]) if len(kept) >= 3 else ring


def _signed_area(ring: Ring) -> float:
    """Shoelace area of a closed ring, positive when it winds counterclockwise (x right, y up)."""
    xy = np.asarray(ring, dtype=np.float64)
    return 0.5 * float(np.sum(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1]))


def _wound(ring: Ring, *, counterclockwise: bool) -> Ring:
    """``ring`` wound the requested way (GeoJSON's right-hand rule, RFC 7946 section 3.1.6:
    outer rings counterclockwise, holes clockwise, in the coordinates as written)."""
    return ring if (_signed_area(ring) > 0) == counterclockwise else ring[::-1]


def mask_polygons(mask: np.ndarray, downsample: tuple[float, float]) -> list[list[Ring]]:
    """Polygons (outer ring + holes) of each region of pixels joined edge to edge, in level-0 px;
    outer rings wind counterclockwise and holes clockwise, as GeoJSON requires."""
    from scipy import ndimage as ndi
    from skimage.measure import find_contours, label

    def rings_of(binary: np.ndarray) -> list[np.ndarray]:
        padded = np.pad(binary, 1).astype(np.float32)
        return [_drop_collinear(c) for c in find_contours(padded, 0.5)]

    def to_level0(contour: np.ndarray) -> Ring:
        # contour is (row, col) in padded index space; pixel i spans [i, i+1) -> edge at index+0.5
        xs = (contour[:, 1] - 1 + 0.5) * downsample[0]
        ys = (contour[:, 0] - 1 + 0.5) * downsample[1]
        ring = [(round(float(x), 1), round(float(y), 1)) for x, y in zip(xs, ys)]
        if ring[0] != ring[-1]:
            ring.append(ring[0])
        return ring

    # Regions joined edge to edge, as find_contours traces them: a part joined to the rest only
    # at a pixel's corner would trace as a second outer ring of one region, and be lost.
    labels = label(mask, connectivity=1)
    polygons: list[list[Ring]] = []
    for index, region in enumerate(ndi.find_objects(labels), start=1):
        if region is None:
            continue
        sub = labels[region] == index
        offset = np.array([region[0].start, region[1].start])
        filled = fill_holes(sub)
        outer = max(rings_of(filled), key=len) + offset
        holes_mask = filled & ~sub
        holes = [r + offset for r in rings_of(holes_mask) if len(r) >= 4] if holes_mask.any() else []
        polygons.append(
            [_wound(to_level0(outer), counterclockwise=True)]
            + [_wound(to_level0(h), counterclockwise=False) for h in holes]
        )
    return polygons


def border_brightness(thumbnail: np.ndarray) -> float:
    """Median HSV value (0-1) of the outer :data:`BORDER_WIDTH` of an RGB thumbnail (1 px at least)."""
    h, w = thumbnail.shape[:2]
    b = max(1, round(BORDER_WIDTH * min(h, w)))
    border = np.ones((h, w), bool)
    border[b:-b, b:-b] = False
    return float(np.median(thumbnail[border].max(axis=-1))) / 255.0


def tissue_warning(thumbnail: np.ndarray, mask: np.ndarray) -> str | None:
    """A line saying why ``mask`` may be wrong for this ``thumbnail``, else None: no tissue and
    no colour anywhere, or a dark border (:data:`DARK_BORDER`)."""
    if not mask.any() and bool((thumbnail.max(axis=-1) == thumbnail.min(axis=-1)).all()):
        return ("no tissue found: every pixel of the slide is grey (no colour at all: a greyscale scan, a blank "
                "image or a fully transparent one), and tissue is found by its colour saturation")
    brightness = border_brightness(thumbnail)
    if brightness < DARK_BORDER:
        return (f"tissue detection assumes a brightfield slide on light glass, and this slide's border is dark "
                f"(median brightness {brightness:.0%}; a fluorescence scan?): its tissue mask is not to be trusted")
    return None


def detect_tissue(slide: Slide, params: TissueParams = TissueParams()) -> TissueResult:
    """Find tissue on a thumbnail of ``slide``; an empty result (with a warning) if there is none,
    and a warning (kept in :attr:`TissueResult.warning`) when the slide is not what detection assumes."""
    thumbnail, _ = slide.thumbnail(mpp=params.mpp)
    w0, h0 = slide.dimensions
    downsample = (w0 / thumbnail.shape[1], h0 / thumbnail.shape[0])
    thumb_mpp = slide.mpp * downsample[0]
    mask, threshold = tissue_mask(thumbnail, thumb_mpp, params)
    result = TissueResult(
        mask=mask,
        thumbnail=thumbnail,
        downsample=downsample,
        mpp_level0=slide.mpp,
        threshold=threshold,
        polygons=mask_polygons(mask, downsample),
        viewer_origin=slide.bounds[:2],
        warning=tissue_warning(thumbnail, mask),
    )
    if result.warning is not None:
        log.warning("%s: %s", slide.path, result.warning)
    elif result.empty:
        log.warning("%s: no tissue found (saturation threshold %.3f)", slide.path, threshold)
    return result


def tissue_fraction(
    mask: np.ndarray,
    downsample: tuple[float, float],
    coords: np.ndarray,
    size_level0: float,
) -> np.ndarray:
    """Fraction of each square tile (top-left ``coords``, side ``size_level0``) covered by ``mask``.

    Exact for the piecewise-constant mask: the integral image is bilinear inside each mask
    pixel, so interpolating it at the tile's fractional corners gives the covered area.
    """
    if len(coords) == 0:
        return np.zeros(0, np.float32)
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.float64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0), axis=1)

    def at(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x = np.clip(x, 0, w)
        y = np.clip(y, 0, h)
        x0 = np.minimum(np.floor(x).astype(int), w - 1)
        y0 = np.minimum(np.floor(y).astype(int), h - 1)
        fx, fy = x - x0, y - y0
        return (
            integral[y0, x0] * (1 - fx) * (1 - fy)
            + integral[y0, x0 + 1] * fx * (1 - fy)
            + integral[y0 + 1, x0] * (1 - fx) * fy
            + integral[y0 + 1, x0 + 1] * fx * fy
        )

    x0 = coords[:, 0] / downsample[0]
    y0 = coords[:, 1] / downsample[1]
    x1 = (coords[:, 0] + size_level0) / downsample[0]
    y1 = (coords[:, 1] + size_level0) / downsample[1]
    covered = at(x1, y1) - at(x0, y1) - at(x1, y0) + at(x0, y0)
    area = (size_level0 / downsample[0]) * (size_level0 / downsample[1])
    return np.clip(covered / area, 0.0, 1.0).astype(np.float32)


def to_geojson(result: TissueResult, *, name: str = "Tissue") -> dict[str, Any]:
    """A GeoJSON FeatureCollection of the tissue polygons that QuPath imports: level-0 px less
    the slide's ``viewer_origin`` (QuPath's frame, :attr:`~wsitools.slide.Slide.bounds`)."""
    ox, oy = result.viewer_origin
    features = [
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[round(x - ox, 1), round(y - oy, 1)] for x, y in ring] for ring in poly],
            },
            "properties": {
                "objectType": "annotation",
                "classification": {"name": name, "color": [0, 160, 60]},
            },
        }
        for poly in result.polygons
    ]
    return {"type": "FeatureCollection", "features": features}


def contour_pixels(mask: np.ndarray) -> np.ndarray:
    """The contour of ``mask`` drawn 2 px wide: its pixels with a 4-neighbour outside it (the
    image's border is not an edge), each with its neighbours above-left, above and left.

    The same pixels as skimage's ``find_boundaries(mask, mode="inner")`` dilated by a 2 x 2
    square, with shifted logical operations instead of grey-level filters.
    """
    inside = mask.copy()
    inside[1:] &= mask[:-1]
    inside[:-1] &= mask[1:]
    inside[:, 1:] &= mask[:, :-1]
    inside[:, :-1] &= mask[:, 1:]
    edges = mask & ~inside
    edges[:-1] |= edges[1:].copy()
    edges[:, :-1] |= edges[:, 1:].copy()
    return edges


def qc_image(result: TissueResult) -> np.ndarray:
    """The thumbnail with tissue contours drawn in green (2 px) and glass dimmed slightly."""
    dim = (np.arange(256) * 0.85 + 255 * 0.15).astype(np.uint8)  # a lookup table, not a float blend
    image = np.where(result.mask[..., None], result.thumbnail, dim[result.thumbnail])
    image[contour_pixels(result.mask)] = (0, 200, 60)
    return image


def write_qc(result: TissueResult, out_dir: str | os.PathLike[str], slide_id: str) -> dict[str, Path]:
    """Write ``{slide_id}.tissue.png`` and ``{slide_id}.geojson`` atomically; return their paths."""
    from PIL import Image

    out = Path(out_dir)
    paths = {"png": out / f"{slide_id}.tissue.png", "geojson": out / f"{slide_id}.geojson"}
    with atomic_path(paths["png"], overwrite=True) as tmp:
        Image.fromarray(qc_image(result)).save(tmp, format="PNG", compress_level=1)  # 2x faster, 12 % larger
    with atomic_path(paths["geojson"], overwrite=True) as tmp:
        tmp.write_text(json.dumps(to_geojson(result)))
    return paths


def params_dict(params: TissueParams) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, float) else v) for k, v in asdict(params).items()}
