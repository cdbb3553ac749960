"""Tissue detection: finds the planted tissue, not the glass; polygons, GeoJSON, QC image."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from conftest import REGIONS, planted_mask
from wsitools.slide import open_slide
from wsitools.tissue import TissueParams, detect_tissue, saturation_value, tissue_fraction, to_geojson, write_qc

PARAMS = TissueParams(mpp=4.0, min_region_area=5_000)


def test_mask_covers_planted_tissue_and_not_glass(synthetic_svs):
    with open_slide(synthetic_svs) as s:
        result = detect_tissue(s, PARAMS)
    truth = planted_mask(result.mask.shape, result.downsample)
    recall = (result.mask & truth).sum() / truth.sum()
    false_pos = (result.mask & ~truth).sum() / (~truth).sum()
    assert recall > 0.93, recall
    assert false_pos < 0.01, false_pos
    assert len(result.polygons) == 2  # the two planted regions
    expected_area = sum(np.pi * r.w * r.h / 4 for r in REGIONS) * 0.25**2
    assert result.area_um2 == pytest.approx(expected_area, rel=0.1)


def test_polygons_are_level0_and_inside_the_regions(synthetic_svs):
    with open_slide(synthetic_svs) as s:
        result = detect_tissue(s, PARAMS)
    boxes = sorted(REGIONS, key=lambda r: r.x)
    polys = sorted(result.polygons, key=lambda p: min(x for x, _ in p[0]))
    for poly, r in zip(polys, boxes):
        xs = np.array([x for x, _ in poly[0]])
        ys = np.array([y for _, y in poly[0]])
        margin = 2 * result.downsample[0]
        assert xs.min() > r.x - margin and xs.max() < r.x + r.w + margin
        assert ys.min() > r.y - margin and ys.max() < r.y + r.h + margin
        assert poly[0][0] == poly[0][-1]  # closed ring


def test_geojson_is_in_qupaths_frame_of_a_slide_with_openslide_bounds(synthetic_svs, openslide_bounds, tmp_path):
    """QuPath shows an MRXS, SCN or BIF slide from the top-left of its OpenSlide bounds: the
    tissue polygons are written less that corner; the result itself stays in level-0 px."""
    with open_slide(synthetic_svs, backend="openslide") as s:
        shifted = detect_tissue(s, PARAMS)
    with open_slide(synthetic_svs, backend="tiffslide") as s:
        plain = detect_tissue(s, PARAMS)
    assert shifted.polygons == plain.polygons and plain.viewer_origin == (0, 0)
    assert shifted.viewer_origin == (300, 200)
    written = json.loads(write_qc(shifted, tmp_path, "synth")["geojson"].read_text())
    rings = [f["geometry"]["coordinates"] for f in written["features"]]
    expected = [[[[round(x - 300, 1), round(y - 200, 1)] for x, y in ring] for ring in poly] for poly in plain.polygons]
    assert rings == expected and len(rings) == 2
    assert rings[0][0][0] != list(plain.polygons[0][0][0])


def test_geojson_and_qc_files(synthetic_svs, tmp_path):
    with open_slide(synthetic_svs) as s:
        result = detect_tissue(s, PARAMS)
    paths = write_qc(result, tmp_path, "synth")
    gj = json.loads(paths["geojson"].read_text())
    assert gj == to_geojson(result)
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 2
    feature = gj["features"][0]
    assert feature["geometry"]["type"] == "Polygon"
    assert feature["properties"]["objectType"] == "annotation"
    png = np.asarray(Image.open(paths["png"]))
    assert png.shape == result.thumbnail.shape
    green = (png[..., 0] == 0) & (png[..., 1] == 200) & (png[..., 2] == 60)
    assert green.sum() > 50  # contours are drawn
    thumb = result.thumbnail
    glass, tissue = ~result.mask & ~green, result.mask & ~green
    np.testing.assert_array_equal(png[glass], (thumb[glass] * 0.85 + 255 * 0.15).astype(np.uint8))  # dimmed
    np.testing.assert_array_equal(png[tissue], thumb[tissue])  # untouched


def test_blank_slide_is_empty_with_a_warning(blank_svs, caplog):
    with open_slide(blank_svs) as s, caplog.at_level(logging.WARNING):
        result = detect_tissue(s, PARAMS)
    assert result.empty and result.polygons == [] and result.area_um2 == 0
    assert "no tissue found" in caplog.text


def test_tissue_fraction_is_exact_on_a_known_mask():
    mask = np.zeros((10, 10), bool)
    mask[2:6, 2:6] = True  # mask px = 8 level-0 px
    coords = np.array([[16, 16], [0, 0], [12, 16], [40, 40], [20, 20]])
    frac = tissue_fraction(mask, (8.0, 8.0), coords, 16.0)
    # inside; outside; x 12..28 covers 16..28 (12/16); [40,56)^2 overlaps [40,48)^2 (1/4);
    # [20,36) x [20,36) overlaps [16,48) fully
    np.testing.assert_allclose(frac, [1.0, 0.0, 0.75, 0.25, 1.0], atol=1e-6)


def test_saturation_and_value_equal_skimage_hsv():
    from skimage import data
    from skimage.color import rgb2hsv

    rgb = data.immunohistochemistry().copy()
    rgb[:4, :4] = 0  # black: saturation 0, not a division by zero
    rgb[4:8, :4] = 255  # white
    rgb[8:12, :4] = (200, 10, 10)  # pure-ish red: high saturation
    sat, val = saturation_value(rgb)
    hsv = rgb2hsv(rgb)
    assert sat.dtype == np.float32 and sat.shape == rgb.shape[:2]
    np.testing.assert_allclose(sat, hsv[..., 1], atol=1e-6)
    np.testing.assert_allclose(val, hsv[..., 2], atol=1e-6)
    assert sat[0, 0] == 0 and sat[5, 0] == 0 and abs(sat[9, 0] - 190 / 200) < 1e-6


def test_polygon_rings_follow_the_geojson_right_hand_rule():
    """RFC 7946: outer rings counterclockwise, holes clockwise (signed area as written)."""
    from wsitools.tissue import mask_polygons

    def signed_area(ring):
        return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))

    mask = np.zeros((40, 60), bool)
    mask[5:35, 5:55] = True
    mask[12:20, 12:22] = False  # two holes (lumina)
    mask[15:30, 35:48] = False
    polygons = mask_polygons(mask, (4.0, 4.0))
    assert len(polygons) == 1 and len(polygons[0]) == 3
    outer, *holes = polygons[0]
    assert signed_area(outer) == pytest.approx(30 * 50 * 16, rel=0.02)
    assert sorted(-signed_area(h) for h in holes) == pytest.approx([8 * 10 * 16, 15 * 13 * 16], rel=0.1)
    for ring in polygons[0]:
        assert ring[0] == ring[-1]


def test_tissue_cut_by_the_slide_edge_stays_tissue():
    """A slide scanned or cropped up to its tissue: the morphology neither takes the outside for
    glass (which cut a band of the closing radius from every edge, and a thin strip away) nor
    for tissue (which would join tissue near the edge to the edge)."""
    from wsitools.tissue import tissue_mask

    rng = np.random.default_rng(0)
    tissue = np.clip(rng.normal((200, 120, 170), 6, (120, 160, 3)), 0, 255).astype(np.uint8)
    params = TissueParams()  # closing 40 um, opening 16 um: 5 and 2 px at 8 um/px
    mask, _ = tissue_mask(tissue, 8.0, params)
    assert mask.all()
    half = tissue.copy()  # tissue on the left half, glass on the right
    half[:, 80:] = 243
    mask, _ = tissue_mask(half, 8.0, params)
    assert mask[:, :80].all() and not mask[:, 80:].any()
    near = np.full_like(tissue, 243)  # tissue ending 4 px (32 um) before the right edge
    near[:, 40:156] = tissue[:, 40:156]
    mask, _ = tissue_mask(near, 8.0, params)
    assert mask[:, 40:156].all() and not mask[:, 156:].any() and not mask[:, :40].any()
    for rows in (1, 2, 3):  # 8-24 um tall strips, at or under the opening's disk (2 px)
        strip, _ = tissue_mask(tissue[:rows], 8.0, TissueParams(min_region_area=1_000))
        assert strip.all(), rows
    edge = np.full_like(tissue, 243)  # a 2 px band of tissue along the top edge
    edge[:2] = tissue[:2]
    mask, _ = tissue_mask(edge, 8.0, TissueParams(min_region_area=1_000))
    assert mask[:2].all() and not mask[3:].any()


def test_polygons_hold_tissue_joined_only_at_a_corner():
    from matplotlib.path import Path as MplPath

    from wsitools.tissue import mask_polygons

    mask = np.zeros((40, 40), bool)
    mask[5:15, 5:15] = True
    mask[15:28, 15:28] = True  # touches the first block at one corner only
    mask[20:24, 5:9] = True
    mask[23:27, 9:13] = True  # another diagonal join, the other way
    polygons = mask_polygons(mask, (1.0, 1.0))
    ys, xs = np.mgrid[0:40, 0:40]
    centres = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], 1)
    covered = np.zeros(len(centres), bool)
    for outer, *holes in polygons:
        inside = MplPath(outer).contains_points(centres)
        for hole in holes:
            inside &= ~MplPath(hole).contains_points(centres)
        covered |= inside
    np.testing.assert_array_equal(covered.reshape(40, 40), mask)


@pytest.mark.parametrize("radius", [0, 1, 2, 3.4, 5, 9])
def test_disk_sweep_is_scipys_binary_morphology(radius):
    from scipy import ndimage as ndi
    from skimage.morphology import disk

    from wsitools.tissue import _disk_sweep

    rng = np.random.default_rng(int(radius * 10))
    footprint = disk(int(round(radius)))
    for shape in [(1, 7), (5, 3), (40, 57), (120, 90)]:
        for density in (0.05, 0.5, 0.95):
            mask = rng.random(shape) < density
            for op, reference in (("dilate", ndi.binary_dilation), ("erode", ndi.binary_erosion)):
                expected = reference(mask, footprint, border_value=0)
                np.testing.assert_array_equal(_disk_sweep(mask, radius, op=op), expected)


def test_fill_holes_is_scipys():
    from scipy import ndimage as ndi

    from wsitools.tissue import fill_holes

    rng = np.random.default_rng(5)
    for shape in [(1, 1), (1, 9), (3, 3), (40, 57), (120, 90)]:
        for density in (0.1, 0.5, 0.7, 0.9):
            mask = rng.random(shape) < density
            np.testing.assert_array_equal(fill_holes(mask), ndi.binary_fill_holes(mask))
    ring = np.ones((5, 5), bool)
    ring[2, 2] = False
    assert fill_holes(ring).all()
    np.testing.assert_array_equal(fill_holes(~ring), ~ring)


def test_contour_pixels_are_skimages_inner_boundaries_two_pixels_wide():
    from scipy import ndimage as ndi
    from skimage.segmentation import find_boundaries

    from wsitools.tissue import contour_pixels

    rng = np.random.default_rng(3)
    for shape in [(1, 1), (1, 9), (7, 2), (33, 41), (64, 48)]:
        for density in (0.1, 0.5, 0.9):
            mask = rng.random(shape) < density
            expected = ndi.binary_dilation(find_boundaries(mask, mode="inner"), np.ones((2, 2), bool))
            np.testing.assert_array_equal(contour_pixels(mask), expected)


DARK = ("tissue detection assumes a brightfield slide on light glass, and this slide's border is dark (median "
        "brightness {}%; a fluorescence scan?): its tissue mask is not to be trusted")


def test_a_slide_on_a_dark_background_is_warned_about_and_recorded(tmp_path, caplog):
    """Near-black noise is saturated and never bright: a fluorescence-like slide of 40 % tissue
    was 97 % tissue, every tile kept, status 'ok' and not a word."""
    import tifffile

    from wsitools.synthetic import Region, render
    from wsitools.tiling import TilingParams, tile_slide

    region = Region(200, 150, 1100, 800)
    ys, xs = np.mgrid[0:1024, 0:1536]
    noise = np.random.default_rng(0).integers(0, 12, (1024, 1536, 3), dtype=np.uint8)
    pixels = np.where(region.contains(xs, ys)[..., None], 255 - render((region,), 0, 0, 1536, 1024), noise)
    path = tmp_path / "dark.tif"
    tifffile.imwrite(path, pixels, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    params = TilingParams(mpp=0.5, tile_size=64, tissue=PARAMS)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # tiled, then the finished store kept
            record = tile_slide(path, tmp_path / "tiles", params, progress=False)
            assert (record["status"], record["reason"]) == ("ok", DARK.format(2))
    assert f"{path.resolve()}: {DARK.format(2)}" in caplog.messages
    assert json.loads((tmp_path / "tiles" / "dark.qc.json").read_text())["reason"] == DARK.format(2)


def test_brightfield_slides_are_not_taken_for_dark_ones(synthetic_svs):
    """H&E and IHC, on glass or filling the whole slide to its border, stay far above the bar."""
    from skimage import data

    from wsitools.synthetic import Region, render
    from wsitools.tissue import DARK_BORDER, border_brightness, tissue_warning

    ihc = data.immunohistochemistry()
    with open_slide(synthetic_svs) as s:
        thumbnail = detect_tissue(s, PARAMS).thumbnail
    full = Region(-400, -400, 2000, 2000, "tissue"), Region(-400, -400, 2000, 2000, "other")
    for image in (thumbnail, ihc, np.pad(ihc, ((100, 100), (100, 100), (0, 0)), constant_values=255),
                  render(full[:1], 0, 0, 600, 400), render(full[1:], 0, 0, 600, 400)):
        assert border_brightness(image) > 2 * DARK_BORDER
        assert tissue_warning(image, np.ones(image.shape[:2], bool)) is None
    black = np.zeros((40, 60, 3), np.uint8)
    black[10:30, 10:50] = (200, 80, 120)
    assert tissue_warning(black, np.ones((40, 60), bool)) == DARK.format(0)
