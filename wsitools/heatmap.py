"""Attention heatmaps over slide thumbnails, montages of the most attended tiles, and the
attention as QuPath detections.

Inputs are an attention file (:mod:`wsitools.attention`: attention per tile, level-0 coords,
``tile_size_level0``, the prediction), the patch store (how the slide was read, and the tiles of
the montage) and the slide (for a thumbnail read at a low pyramid level, never at full
resolution).

Display scales map each tile's attention ``a`` (N tiles, summing to one) to [0, 1]:

- ``rank`` (default): the tile's percentile within the slide, tied tiles sharing their mean
  rank (identical tiles get identical attention; store order must not colour them). Readable
  whatever the bag size, but every slide spans the whole colour map, a negative slide as much
  as a positive one.
- ``minmax``: linear between the slide's smallest and largest attention (also per slide).
  On both per-slide scales attention that is the same everywhere is the middle colour, and
  neither changes when every tile's attention is scaled and shifted alike: the heads of an
  ensemble that pooled by the mean (:func:`pooling_note`) add the same to every tile, so there the
  ensemble's map is that of its heads that pooled by attention.
- ``absolute``: ``a * N``, the attention relative to a uniform spread (1 = every tile alike),
  on a log scale from 1 to :data:`ABSOLUTE_MAX`. Raw attention would not do: it shrinks as
  1/N, so a large slide would look cold whatever the head saw. ``a * N`` is comparable
  across slides, so a slide whose attention is spread out stays dark while one whose head
  concentrated on a few tiles lights up there; values at or below uniform get the bottom
  colour, values at or above :data:`ABSOLUTE_MAX` times uniform the top one.

Where tiles overlap, their values are averaged. The default colour map, ``inferno``, is
perceptually uniform (equal steps in value look like equal steps in colour, also in grey and to
colour-blind readers) and dark-to-bright, so "brighter" reads as "more attention".
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from wsitools.attention import AttentionMap, read_attention
from wsitools.errors import SlideError, StoreError
from wsitools.feature_store import TileGeometry
from wsitools.io import atomic_path, replaced_together
from wsitools.store import PatchStore
from wsitools.types import MicronsPerPixel, check_slide_id

if TYPE_CHECKING:
    from wsitools.slide import Bounds, Slide

log = logging.getLogger(__name__)

Scale = Literal["rank", "minmax", "absolute"]
SCALES: tuple[str, ...] = ("rank", "minmax", "absolute")
COLOUR_MAPS: tuple[str, ...] = ("inferno", "viridis", "magma", "plasma", "cividis", "turbo", "jet")
"""Colour maps offered: the first five are perceptually uniform; ``turbo`` and ``jet`` are not
(bands of false contrast) and are there for readers used to them."""
DEFAULT_CMAP = "inferno"
ABSOLUTE_MAX = 100.0
"""Top of the ``absolute`` scale: attention 100 times the uniform share (a * N = 100)."""
DEFAULT_THUMBNAIL_MPP = MicronsPerPixel(8.0)
"""Thumbnail resolution: 8 um/px shows a 20 x 15 mm slide in 2500 x 1900 px."""
DEFAULT_MIN_SIDE = 1024
"""A slide smaller than this many px on its long side at ``--mpp`` is drawn finer, up to it."""
DEFAULT_MAX_SIDE = 4096
"""A slide larger than this many px on its long side at ``--mpp`` is drawn coarser, down to it."""

MPP_MATCH_TOLERANCE = 0.05
"""Largest relative difference between a slide's level-0 mpp and the one an attention file's
tiles imply for the two to be taken as one slide (scanners of one model differ by about 1 %,
objectives by 2x)."""

_TITLE_PX = 32  # band above the image for the title
_BAR_PANEL_PX = 150  # band right of the image for the colour bar and its label
_MIN_IMAGE_PX = 300  # figure height below the title at least this, so the bar label (two lines) fits
_BLEND_PIXELS = 1 << 16  # pixels :func:`overlay` blends at a time


def relative_attention(attention: np.ndarray) -> np.ndarray:
    """``a * N / sum(a)``: each tile's attention relative to a uniform spread (1 = uniform)."""
    a = np.asarray(attention, dtype=np.float64)
    total = a.sum()
    return a * len(a) / total if total > 0 else np.ones_like(a)


def display_values(attention: np.ndarray, *, scale: Scale = "rank") -> np.ndarray:
    """Attention mapped to [0, 1] for display (see the module docstring)."""
    a = np.asarray(attention, dtype=np.float64)
    if scale == "absolute":
        rel = np.maximum(relative_attention(a), 1.0)
        return np.clip(np.log10(rel) / math.log10(ABSOLUTE_MAX), 0.0, 1.0)
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    if len(a) < 2:
        return np.full_like(a, 0.5)  # one tile: attention the same everywhere
    if scale == "rank":
        from scipy.stats import rankdata

        return (rankdata(a, method="average") - 1.0) / (len(a) - 1)
    lo, hi = a.min(), a.max()
    return (a - lo) / (hi - lo) if hi > lo else np.full_like(a, 0.5)


def scale_label(scale: Scale) -> str:
    """The colour bar's label: what the colours mean, with the range of the scale."""
    if scale == "rank":
        return "attention percentile within the slide\n(0 = least, 1 = most attended tile)"
    if scale == "minmax":
        return "attention, min-max within the slide\n(0 = least, 1 = most attended tile)"
    return f"attention x N (1 = uniform over the N tiles;\nlog scale 1-{ABSOLUTE_MAX:g})"


def thumbnail_mpp(
    dimensions: tuple[int, int], slide_mpp: float, *, mpp: float = DEFAULT_THUMBNAIL_MPP,
    min_side: int = DEFAULT_MIN_SIDE, max_side: int = DEFAULT_MAX_SIDE,
) -> float:
    """The heatmap's resolution (um/px): ``mpp``, made finer where the slide's long side would
    be under ``min_side`` px and coarser where it would be over ``max_side`` px, never finer
    than level 0. So a 2 mm biopsy is as readable as a 20 mm resection, and a 60 mm slide
    stays a file a browser opens."""
    if not 0 < min_side <= max_side:
        raise ValueError(f"need 0 < min_side <= max_side, got {min_side} and {max_side}")
    long_um = max(dimensions) * slide_mpp
    chosen = min(mpp, long_um / min_side)
    chosen = max(chosen, long_um / max_side)
    return max(chosen, slide_mpp)


def attention_raster(
    amap: AttentionMap, *, shape: tuple[int, int], downsample: tuple[float, float], scale: Scale = "rank"
) -> np.ndarray:
    """Display values painted on a ``shape`` (h, w) grid whose pixels span ``downsample`` level-0
    px along (x, y) (the thumbnail's grid); NaN where no tile lies. Overlapping tiles are averaged."""
    h, w = shape
    dx, dy = downsample
    values = display_values(amap.attention, scale=scale)
    total = np.zeros((h, w), np.float64)
    count = np.zeros((h, w), np.int32)
    x0 = np.floor(amap.coords[:, 0] / dx).astype(np.int64)
    y0 = np.floor(amap.coords[:, 1] / dy).astype(np.int64)
    x1 = np.ceil((amap.coords[:, 0] + amap.tile_size_level0) / dx).astype(np.int64)
    y1 = np.ceil((amap.coords[:, 1] + amap.tile_size_level0) / dy).astype(np.int64)
    x0, y0 = np.clip(x0, 0, w), np.clip(y0, 0, h)
    x1, y1 = np.clip(np.maximum(x1, x0 + 1), 0, w), np.clip(np.maximum(y1, y0 + 1), 0, h)
    for v, a, b, c, d in zip(values, y0, y1, x0, x1):
        total[a:b, c:d] += v
        count[a:b, c:d] += 1
    empty = count == 0
    np.divide(total, count, out=total, where=~empty)  # in place: the grid is the thumbnail's size
    total[empty] = np.nan
    return total.astype(np.float32)


def overlay(thumbnail: np.ndarray, raster: np.ndarray, *, alpha: float = 0.5, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """The thumbnail with the raster's colours blended in where tiles are (uint8 RGB).

    Blended :data:`_BLEND_PIXELS` pixels at a time: the colours and the blend are float64
    (about 100 bytes per pixel), which over a whole large thumbnail would take gigabytes."""
    from matplotlib import colormaps

    colour_map = colormaps[cmap]
    out = np.empty(raster.shape + (3,), np.uint8)
    rows = max(1, _BLEND_PIXELS // max(1, raster.shape[1]))
    for top in range(0, raster.shape[0], rows):
        part, under = raster[top : top + rows], thumbnail[top : top + rows]
        colours = colour_map(np.nan_to_num(part, nan=0.0))[..., :3] * 255.0
        covered = ~np.isnan(part)[..., None]
        blended = np.where(covered, (1.0 - alpha) * under + alpha * colours, under)
        out[top : top + rows] = np.clip(np.rint(blended), 0, 255)
    return out


def pooling_note(amap: AttentionMap) -> str:
    """The title's note on the heads that made the map and pooled by the mean: empty when none
    did; when all did, that its weights are uniform (no attention map: every tile alike); else
    how many of them did (they add the same to every tile, so the ``rank`` and ``minmax`` scales
    show the other heads' map)."""
    k, n = amap.n_mean_pooled, amap.n_models
    if k == 0:
        return ""
    if k == n:
        heads = "mean pooling" if n == 1 else f"all {n} heads pooled by the mean"
        return f"{heads}: uniform weights, no attention map"
    return f"{k} of {n} heads pooled by the mean"


def _title(amap: AttentionMap) -> str:
    """The slide, (a patient bag's slide) its patient and share of the patient's attention (of
    its tiles, for heads pooling by the mean), the prediction, the label, and
    :func:`pooling_note`."""
    title = amap.slide_id
    if "patient_id" in amap.attrs and "attention_share" in amap.attrs:
        share = 100 * float(amap.attrs["attention_share"])
        of = "tiles" if amap.mean_pooled else "attention"
        title += f"   patient {amap.attrs['patient_id']}: {share:.0f}% of its {of}"
    if amap.classes:
        title += "   " + "  ".join(f"{c}: {p:.2f}" for c, p in zip(amap.classes, amap.probs))
    if "label" in amap.attrs:
        title += f"   (label {amap.attrs['label']})"
    note = pooling_note(amap)
    return title + (f"   [{note}]" if note else "")


def _figure_inches(pixels: int, dpi: int) -> float:
    """A figure side of ``pixels`` at ``dpi`` in inches, one float step over ``pixels / dpi``:
    matplotlib may truncate inches * dpi to whole pixels, and 406 / 100 * 100 is
    405.99999999999994, a figure one pixel short."""
    return math.nextafter(pixels / dpi, math.inf)


def save_heatmap_figure(
    path: str | os.PathLike[str], image: np.ndarray, *, title: str, scale: Scale, cmap: str = DEFAULT_CMAP
) -> Path:
    """Write the blended thumbnail 1:1 in pixels (a band of :data:`_TITLE_PX` above it for the
    title, one of :data:`_BAR_PANEL_PX` right of it for the colour bar) as PNG.

    The figure (title and colour bar) is drawn around an empty space, and the image is copied
    into the drawn pixels there: drawn as a figure image, matplotlib would take it through float
    RGBA copies of about 100 bytes per pixel (the same pixels)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure
    from matplotlib.image import imsave

    h, w = image.shape[:2]
    width, height = w + _BAR_PANEL_PX, max(h, _MIN_IMAGE_PX) + _TITLE_PX
    dpi = 100
    fig = Figure(figsize=(_figure_inches(width, dpi), _figure_inches(height, dpi)), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    fig.text(4 / width, 1 - 6 / height, title, ha="left", va="top", fontsize=9)
    bar_top = _TITLE_PX + 8
    cax = fig.add_axes((
        (w + 20) / width, 16 / height, 16 / width, (height - bar_top - 16) / height,
    ))
    norm = LogNorm(1.0, ABSOLUTE_MAX) if scale == "absolute" else Normalize(0.0, 1.0)
    bar = fig.colorbar(ScalarMappable(norm, colormaps[cmap]), cax=cax)
    if scale == "absolute":
        ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if t <= ABSOLUTE_MAX]
        bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks[:-1]] + [f">={ticks[-1]:g}"])
    bar.ax.tick_params(labelsize=8)
    bar.set_label(scale_label(scale), fontsize=8)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())  # [height, width, 4], top row first; a view
    pixels[_TITLE_PX : _TITLE_PX + h, :w, :3] = image
    path = Path(path)
    with atomic_path(path, overwrite=True) as tmp:
        imsave(tmp, pixels, format="png", origin="upper", dpi=dpi)
    return path


def top_tile_montage(tiles: np.ndarray, labels: list[str], *, columns: int | None = None, gap: int = 4) -> np.ndarray:
    """Tiles [k, S, S, 3] in a grid, each under a caption strip of one or more lines; cells are
    widened beyond S where a caption is wider than a tile (small tiles), so no caption is cut."""
    from PIL import Image, ImageDraw

    k, s = len(tiles), tiles.shape[1]
    columns = columns or max(1, math.ceil(math.sqrt(k)))
    rows = math.ceil(k / columns)
    line = 12
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((measure.textlength(part) for text in labels for part in text.split("\n")), default=0.0)
    cell_w = max(s, math.ceil(text_w) + 4)
    caption = 2 + line * max((text.count("\n") + 1 for text in labels), default=1)
    cell_h = s + caption
    canvas = Image.new("RGB", (columns * (cell_w + gap) + gap, rows * (cell_h + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (tile, text) in enumerate(zip(tiles, labels)):
        r, c = divmod(i, columns)
        x, y = gap + c * (cell_w + gap), gap + r * (cell_h + gap)
        for j, part in enumerate(text.split("\n")):
            draw.text((x + 2, y + 1 + j * line), part, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(np.ascontiguousarray(tile)), (x, y + caption))
    return np.asarray(canvas)


def top_tile_labels(amap: AttentionMap, top: np.ndarray) -> list[str]:
    """Captions of the montage: rank and attention relative to uniform, then the tile's level-0
    top-left corner (where to find it in a slide viewer)."""
    rel = relative_attention(amap.attention)
    return [
        f"#{r + 1}  {rel[i]:.3g}x uniform\nx {amap.coords[i, 0]}  y {amap.coords[i, 1]}"
        for r, i in enumerate(top)
    ]


def write_top_tiles(
    amap: AttentionMap, store: PatchStore, out_path: str | os.PathLike[str], *, top_k: int = 16
) -> Path:
    """The ``top_k`` most attended tiles of the patch store, most attended first, as a PNG; the
    store holds the attention's tiles (checked by :func:`check_store_fits`)."""
    from PIL import Image

    top = np.argsort(-amap.attention, kind="mergesort")[:top_k]
    order = np.argsort(top)
    tiles = np.empty((len(top), store.tile_size, store.tile_size, 3), np.uint8)
    tiles[order] = store.read_tiles(top[order])  # read in store order, place in rank order
    image = top_tile_montage(tiles, top_tile_labels(amap, top))
    out_path = Path(out_path)
    with atomic_path(out_path, overwrite=True) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return out_path


# --- QuPath ----------------------------------------------------------------------------------

_CLASS_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                  (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def _number(value: float) -> float:
    return float(f"{float(value):.6g}")


def _coordinate(value: float) -> float | int:
    """A level-0 coordinate to 0.01 px, written as an integer when it is one (shorter JSON)."""
    value = round(value, 2)
    return int(value) if value.is_integer() else value


def tile_polygon(x: float, y: float, size: float, bounds: Bounds | None) -> list[list[float | int]] | None:
    """A tile's footprint (level-0 top-left ``x``, ``y``, side ``size``) as a closed GeoJSON ring,
    exterior counterclockwise in the coordinates as written (RFC 7946 section 3.1.6), in QuPath's
    frame: relative to the top-left of the slide's ``bounds`` (:attr:`Slide.bounds`) and clipped
    to them; None when nothing of it lies inside. Without ``bounds``, level 0 as it is."""
    x0, y0, x1, y1 = float(x), float(y), float(x) + size, float(y) + size
    if bounds is not None:
        bx, by, bw, bh = bounds
        x0, y0 = max(x0 - bx, 0.0), max(y0 - by, 0.0)
        x1, y1 = min(x1 - bx, float(bw)), min(y1 - by, float(bh))
    if x1 <= x0 or y1 <= y0:
        return None
    x0, y0, x1, y1 = (_coordinate(v) for v in (x0, y0, x1, y1))
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def attention_geojson(amap: AttentionMap, *, scale: Scale = "rank", bounds: Bounds | None = None) -> dict[str, Any]:
    """The attention as a GeoJSON FeatureCollection of QuPath detections, one per tile.

    Each feature is the tile's footprint in QuPath's full-resolution pixel coordinates (level-0
    px relative to the top-left of the slide's ``bounds``, clipped to them: :func:`tile_polygon`)
    with ``properties.objectType = "detection"`` and
    ``properties.measurements`` (numbers, QuPath's map form): ``attention`` (raw, sums to one),
    ``attention x N`` (relative to uniform), ``attention percentile`` (within the slide) and
    ``heatmap value`` (the 0-1 value the PNG shows under ``scale``), ``mean-pooled heads`` (the
    share of the heads that made the map pooling by the mean: 1 = uniform weights, no attention
    map; :attr:`AttentionMap.n_mean_pooled`); with a prediction also
    ``prob {class}`` per class, and ``classification`` names the slide's predicted class (the
    same on every tile: it is the slide's, not the tile's); a survival or regression head's one
    output is named as it is (``risk``, ``prediction``), with no classification.
    """
    rel = relative_attention(amap.attention)
    percentile = display_values(amap.attention, scale="rank")
    shown = display_values(amap.attention, scale=scale)
    names = [f"prob {c}" for c in amap.classes] if len(amap.classes) > 1 else list(amap.classes)
    shared: dict[str, float] = {"mean-pooled heads": _number(amap.n_mean_pooled / amap.n_models),
                                **{name: _number(p) for name, p in zip(names, amap.probs)}}
    classification = None
    if amap.pred is not None:
        colour = _CLASS_COLOURS[amap.classes.index(amap.pred) % len(_CLASS_COLOURS)]
        classification = {"name": amap.pred, "color": list(colour)}
    features = []
    for i, (x, y) in enumerate(amap.coords):
        ring = tile_polygon(x, y, amap.tile_size_level0, bounds)
        if ring is None:
            continue
        properties: dict[str, Any] = {
            "objectType": "detection",
            "measurements": {
                "attention": _number(amap.attention[i]),
                "attention x N": _number(rel[i]),
                "attention percentile": _number(percentile[i]),
                "heatmap value": _number(shown[i]),
                **shared,
            },
        }
        if classification is not None:
            properties["classification"] = classification
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": properties})
    return {"type": "FeatureCollection", "features": features}


def write_attention_geojson(
    path: str | os.PathLike[str], amap: AttentionMap, *, scale: Scale = "rank", bounds: Bounds | None = None,
) -> Path:
    """Write :func:`attention_geojson` atomically (compact JSON: about 400 bytes per tile)."""
    path = Path(path)
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(attention_geojson(amap, scale=scale, bounds=bounds), separators=(",", ":")))
    return path


# --- one slide -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeatmapFiles:
    """What :func:`draw_heatmap` wrote for one slide."""

    slide_id: str
    heatmap: Path
    geojson: Path
    montage: Path | None
    seconds: float


def open_slide_for(amap: AttentionMap, attention_path: str | os.PathLike[str], slide_file: Path) -> Slide:
    """``slide_file`` opened on its own metadata for the attention ``amap`` (read from
    ``attention_path``), when there is no patch store to open it through. Where the metadata
    gives no usable mpp, the level-0 mpp the attention's tiles imply (:attr:`AttentionMap.level0_mpp`:
    a slide tiled with an mpp override) is taken instead; a :class:`SlideError` naming both files
    when the attention records none either."""
    from wsitools.slide import open_slide

    slide = open_slide(slide_file, require_mpp=False)
    if slide.mpp_problem is None:
        return slide
    slide.close()
    if amap.level0_mpp is None:
        raise SlideError(
            f"{slide_file}: the slide's metadata gives no usable resolution (mpp), and attention file "
            f"{attention_path} does not record its tiles' geometry (mpp_target, tile_size) to take it from; "
            "pass the slide's patch store with --store"
        )
    log.info("%s: no usable mpp in its metadata; taking %.4g um/px, the level-0 mpp its attention's tiles "
             "were cut at", slide_file, amap.level0_mpp)
    return open_slide(slide_file, backend=slide.backend, mpp_override=amap.level0_mpp)  # type: ignore[arg-type]


def check_slide_fits(amap: AttentionMap, attention_path: str | os.PathLike[str], slide: Slide) -> None:
    """A :class:`SlideError` naming both files when ``slide`` cannot be the slide the attention's
    tiles were cut from: a tile starts off the slide (it would be left out of the heatmap and the
    GeoJSON), or the level-0 mpp the tiles imply (:attr:`AttentionMap.level0_mpp`, where
    recorded) differs from the slide's by more than :data:`MPP_MATCH_TOLERANCE`."""
    width, height = slide.dimensions
    x, y = amap.coords[:, 0], amap.coords[:, 1]
    off = np.flatnonzero((x < 0) | (y < 0) | (x >= width) | (y >= height))
    if len(off):
        first = amap.coords[off[0]]
        raise SlideError(
            f"{attention_path}: {len(off)} of its {len(amap.coords)} tiles lie off slide {slide.path} "
            f"({width} x {height} level-0 px; e.g. the tile at x {first[0]}, y {first[1]}): not the slide they "
            "were cut from; give that slide with --slide"
        )
    implied = amap.level0_mpp
    if implied is not None and abs(implied - slide.mpp) > MPP_MATCH_TOLERANCE * slide.mpp:
        raise SlideError(
            f"{attention_path}: its tiles were cut from a slide of {implied:.4g} um/px, slide {slide.path} has "
            f"{slide.mpp:.4g} um/px: not the slide they were cut from; give that slide with --slide (or, for a "
            "slide tiled with --mpp-override, its patch store with --store)"
        )


def check_store_fits(amap: AttentionMap, attention_path: str | os.PathLike[str], store: PatchStore) -> None:
    """A :class:`StoreError` naming the attention file, the patch store and what differs when the
    store does not hold the attention's tiles: other coords, another level-0 tile size, or
    (where the attention file records them) another tile size or resolution. Such a store is
    another tiling of the slide (tiled again since its features were extracted): its tiles would
    make this attention's montage, and the slide would be read as that tiling read it (backend,
    mpp override)."""
    differs = []
    if len(store.coords) != len(amap.coords):
        differs.append(f"{len(amap.coords)} tiles, the store's {len(store.coords)}")
    elif len(other := np.flatnonzero((store.coords != amap.coords).any(axis=1))):
        i = int(other[0])
        differs.append(f"{len(other)} tiles elsewhere, e.g. tile {i} at x {amap.coords[i, 0]}, y {amap.coords[i, 1]}, "
                       f"the store's at x {store.coords[i, 0]}, y {store.coords[i, 1]}")
    if not math.isclose(store.tile_size_level0, amap.tile_size_level0, rel_tol=1e-6):
        differs.append(f"tiles of {amap.tile_size_level0:g} level-0 px, the store's {store.tile_size_level0:g}")
    geometry, stored = TileGeometry.of(amap.attrs), TileGeometry.of(store.attrs)
    if geometry.known and geometry != stored:
        differs.append(f"{geometry.describe()}, the store's {stored.describe()}")
    if differs:
        raise StoreError(
            f"{attention_path}: its tiles are not those of patch store {store.path} ({'; '.join(differs)}): "
            "another tiling of the slide; give the store its features were extracted from (--store), or extract "
            "the features again from this one and train or predict again"
        )


def draw_heatmap(
    attention_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    slide_path: str | os.PathLike[str] | None = None,
    store_path: str | os.PathLike[str] | None = None,
    mpp: float = DEFAULT_THUMBNAIL_MPP,
    min_side: int = DEFAULT_MIN_SIDE,
    max_side: int = DEFAULT_MAX_SIDE,
    top_k: int = 16,
    alpha: float = 0.5,
    scale: Scale = "rank",
    cmap: str = DEFAULT_CMAP,
) -> HeatmapFiles:
    """Write ``{slide_id}.heatmap.png``, ``{slide_id}.attention.geojson`` (QuPath detections)
    and (with a patch store and ``top_k > 0``) ``{slide_id}.top_tiles.png`` into ``out_dir``;
    a map whose heads all pooled by the mean gets no montage (its weights are uniform: there are
    no top tiles), and the title says so (:func:`pooling_note`).

    The thumbnail's resolution is :func:`thumbnail_mpp` of ``mpp``, ``min_side`` and
    ``max_side``. ``store_path`` defaults to the patch store recorded in the attention file; a
    store given must be there (a :class:`StoreError` naming it), the recorded one may be gone.
    The store is the record of how the slide was read: the thumbnail comes from the slide
    opened through it (its backend and mpp override, after checking the slide is the file that
    was tiled), so a slide that needed an mpp override gets its heatmap. ``slide_path``
    (default: the store's record, else the attention file's) only says where the slide is now.
    A damaged store is a :class:`StoreError`; without any store the slide is opened on its own
    metadata (:func:`open_slide_for`) and there is no montage. A store of another slide is a
    :class:`StoreError` (its slide would be drawn), as is a store of another tiling
    (:func:`check_store_fits`); a slide the tiles do not fit is a :class:`SlideError`
    (:func:`check_slide_fits`).

    The slide's files in ``out_dir`` are replaced as one set (:func:`~wsitools.io.replaced_together`,
    ``{slide_id}.heatmap.png`` renamed in last): an earlier run's files of the slide (of another
    ``scale``, or a montage this run does not draw) never stay beside this run's, and a slide
    that fails keeps the files it had.
    """
    start = time.perf_counter()
    amap = read_attention(attention_path)
    slide_id = check_slide_id(amap.slide_id)
    out_dir = Path(out_dir)
    store_file = Path(store_path or amap.attrs.get("store_path") or "")
    given_or_there = store_path is not None or (store_file.name and store_file.exists())
    store = PatchStore.open(store_file) if given_or_there else None
    if store is not None and store.slide_id != slide_id:  # its slide would be drawn under this attention
        raise StoreError(f"patch store {store.path} is of slide {store.slide_id}, not {slide_id}; "
                         f"give the store of slide {slide_id}")
    if store is not None:
        check_store_fits(amap, attention_path, store)
    recorded = slide_path or (store.attrs.get("slide_path") if store else None) or amap.attrs.get("slide_path")
    if not recorded:  # a bag written by another tool, or a store without its slide's path
        where = (f"nor by its patch store {store_file}" if store is not None
                 else f"patch store {store_file} not found" if store_file.name else "no patch store either")
        raise SlideError(f"slide {slide_id}: no slide file is recorded for it ({where}); pass --slide")
    slide_file = Path(recorded)
    if not slide_file.is_file():
        if slide_path is not None:
            raise SlideError(f"slide {slide_id}: no slide file {slide_file}")
        raise SlideError(f"slide {slide_id}: slide file {slide_file} (recorded for it) not found; pass --slide")
    if store is None:
        log.warning("slide %s: no patch store (%s): the slide is read on its own metadata, no montage",
                    slide_id, store_file if store_file.name else "none recorded")
    slide = store.open_slide(slide_file) if store is not None else open_slide_for(amap, attention_path, slide_file)
    with slide:
        check_slide_fits(amap, attention_path, slide)
        dimensions, bounds = slide.dimensions, slide.bounds
        chosen = thumbnail_mpp(dimensions, slide.mpp, mpp=mpp, min_side=min_side, max_side=max_side)
        thumb, downsample = slide.thumbnail(mpp=chosen)
    raster = attention_raster(amap, shape=thumb.shape[:2], downsample=downsample, scale=scale)
    heatmap, geojson, top_tiles = (f"{slide_id}.{k}" for k in ("heatmap.png", "attention.geojson", "top_tiles.png"))
    montage = None
    with replaced_together(out_dir, [top_tiles, geojson, heatmap]) as staged:  # the heatmap seals the set
        save_heatmap_figure(staged / heatmap, overlay(thumb, raster, alpha=alpha, cmap=cmap),
                            title=_title(amap), scale=scale, cmap=cmap)
        write_attention_geojson(staged / geojson, amap, scale=scale, bounds=bounds)
        if top_k > 0 and store is not None and amap.mean_pooled:
            log.info("slide %s: no top-tile montage: its heads pooled by the mean (uniform weights: no tile ranks "
                     "above another)", slide_id)
        elif top_k > 0 and store is not None:
            try:
                write_top_tiles(amap, store, staged / top_tiles, top_k=top_k)
                montage = out_dir / top_tiles
            except StoreError as exc:  # a damaged tile chunk
                log.warning("slide %s: no top-tile montage: %s", slide_id, exc)
    return HeatmapFiles(slide_id=slide_id, heatmap=out_dir / heatmap, geojson=out_dir / geojson, montage=montage,
                        seconds=time.perf_counter() - start)
