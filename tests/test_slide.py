"""Slide reading: both backends, the level-0 contract, mpp as a hard contract, real fixtures."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import REGIONS, SLIDE_MPP, SLIDE_SIZE
from wsitools.errors import SlideError
from wsitools.slide import open_slide
from wsitools.synthetic import Region, render, write_slide


@pytest.mark.parametrize("fixture", ["synthetic_svs", "synthetic_tiff"])
def test_both_backends_read_the_same_pixels(fixture, request):
    path = request.getfixturevalue(fixture)
    expected = render(REGIONS, 300, 400, 256, 200)
    reads = {}
    for backend in ("openslide", "tiffslide"):
        with open_slide(path, backend=backend) as s:
            assert s.backend == backend
            assert s.dimensions == SLIDE_SIZE
            assert s.level_downsamples == (1.0, 2.0, 4.0, 8.0)
            assert s.mpp == pytest.approx(SLIDE_MPP)
            region = s.read_region((300, 400), 0, (256, 200))
            assert region.shape == (200, 256, 3) and region.dtype == np.uint8
            # JPEG at quality 90 on a textured image: close to the rendered truth
            assert np.abs(region.astype(int) - expected).mean() < 4
            reads[backend] = (region, s.read_region((300, 400), 2, (64, 50)))
    for a, b in zip(reads["openslide"], reads["tiffslide"]):
        np.testing.assert_array_equal(a, b)


def test_bounds_are_the_scanned_area_openslide_reports(synthetic_svs, openslide_bounds, monkeypatch):
    """The rectangle QuPath's OpenSlide reader shows (its top-left at QuPath's 0, 0): OpenSlide's
    bounds properties where it reports all four, else the whole of level 0 (tiffslide never)."""
    from wsitools.slide import Bounds

    with open_slide(synthetic_svs, backend="openslide") as s:
        assert s.bounds == Bounds(*openslide_bounds) == (300, 200, 1600, 1200)
    with open_slide(synthetic_svs, backend="tiffslide") as s:
        assert s.bounds == Bounds(0, 0, *SLIDE_SIZE)
    monkeypatch.undo()
    with open_slide(synthetic_svs, backend="openslide") as s:
        assert s.bounds == Bounds(0, 0, *SLIDE_SIZE)  # an SVS: OpenSlide reports none
        s.properties = {**s.properties, "openslide.bounds-x": "300", "openslide.bounds-y": "200"}
        assert s.bounds == Bounds(0, 0, *SLIDE_SIZE)  # not all four: QuPath ignores them too
        s.properties = {**s.properties, "openslide.bounds-width": "1600", "openslide.bounds-height": "x"}
        assert s.bounds == Bounds(0, 0, *SLIDE_SIZE)


def test_svs_properties(synthetic_svs):
    with open_slide(synthetic_svs) as s:
        assert s.backend == "tiffslide"  # auto: tiffslide first for SVS and TIFF (faster)
        assert s.vendor == "aperio"
        assert s.objective_power == pytest.approx(40.0)
        info = s.info()
        assert info["level_mpp"] == pytest.approx([0.25, 0.5, 1.0, 2.0])
        assert info["mpp_source"] == "metadata"


@pytest.mark.parametrize(
    "target, level",
    [(0.1, 0), (0.25, 0), (0.3, 0), (0.5, 1), (0.502, 1), (0.7, 1), (1.0, 2), (1.9, 2), (2.0, 3), (8.0, 3)],
)
def test_best_level_is_the_coarsest_not_coarser_than_target(synthetic_svs, target, level):
    with open_slide(synthetic_svs) as s:
        assert s.best_level_for_mpp(target) == level


def test_outside_the_slide_is_white(synthetic_tiff, tmp_path):
    with open_slide(synthetic_tiff, backend="openslide") as s:
        region = s.read_region((SLIDE_SIZE[0] - 10, 0), 0, (20, 4))
    assert (region[:, 10:] == 255).all()
    import tifffile  # a TIFF in strips: tiffslide reads it through its own path, which pads black

    pixels = np.full((60, 80, 3), 90, np.uint8)
    tifffile.imwrite(tmp_path / "strips.tif", pixels, photometric="rgb", rowsperstrip=16,
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with open_slide(tmp_path / "strips.tif", backend="tiffslide") as s:
        region = s.read_region((-5, 50), 0, (90, 20))
    assert (region[:10, 5:85] == 90).all()  # inside
    assert (region[:, :5] == 255).all() and (region[:, 85:] == 255).all() and (region[10:] == 255).all()


def test_thumbnail_has_the_requested_resolution(synthetic_svs):
    with open_slide(synthetic_svs) as s:
        thumb, ds = s.thumbnail(mpp=4.0)
    assert thumb.shape == (96, 128, 3)
    assert ds == pytest.approx((16.0, 16.0))
    # tissue centre is dark-ish, glass corner is light
    assert thumb[:4, :4].mean() > 235
    assert thumb[40, 40].mean() < 230


def test_pickles_by_path(synthetic_svs):
    with open_slide(synthetic_svs, backend="tiffslide") as s:
        clone = pickle.loads(pickle.dumps(s))
        assert clone.backend == "tiffslide" and clone.path == s.path
        np.testing.assert_array_equal(clone.read_region((0, 0), 1, (32, 32)), s.read_region((0, 0), 1, (32, 32)))


def test_missing_mpp_needs_an_override(tmp_path):
    path = write_slide(tmp_path / "nompp.tiff", size=(512, 512), mpp=0.5, regions=(), write_mpp=False,
                       downsamples=(1,))
    with pytest.raises(SlideError, match=r"nompp\.tiff.*no resolution"):
        open_slide(path)
    with open_slide(path, mpp_override=0.5) as s:
        assert s.mpp == 0.5 and s.info()["mpp_source"] == "override"
    with pytest.raises(SlideError, match="outside"):
        open_slide(path, mpp_override=50)


def test_an_mpp_override_far_from_the_metadata_is_named(synthetic_svs, tmp_path, fixtures_dir):
    """The override wins; one that differs from the slide's own mpp by more than 5 % (a column
    of nominal values filled in for every slide) is named, with both values."""
    with open_slide(synthetic_svs, mpp_override=0.5) as s:  # the metadata says 0.25
        assert s.mpp == 0.5
        assert s.mpp_override_conflict() == (
            f"{synthetic_svs}: the mpp override 0.5 um/px differs from the slide's metadata mpp 0.25 um/px by "
            "100%; the override is used (check the samples sheet's mpp column or --mpp-override)"
        )
    for override in (0.26, None):  # within 5 %, or none
        with open_slide(synthetic_svs, mpp_override=override) as s:
            assert s.mpp_override_conflict() is None
    nompp = write_slide(tmp_path / "nompp.tiff", size=(512, 512), mpp=0.5, regions=(), write_mpp=False, downsamples=(1,))
    with open_slide(nompp, mpp_override=0.25) as s:  # nothing to compare with
        assert s.mpp_override_conflict() is None
    with open_slide(fixtures_dir / "boxes.tiff", mpp_override=0.5) as s:  # implausible metadata (352 um/px)
        assert s.mpp_override_conflict() is None


def test_mpp_x_and_y_must_agree(tmp_path):
    import tifffile

    path = tmp_path / "aniso.tiff"
    data = np.full((256, 256, 3), 200, np.uint8)
    tifffile.imwrite(path, data, tile=(256, 256), photometric="rgb",
                     resolution=(1e4 / 0.25, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with pytest.raises(SlideError, match=r"aniso\.tiff.*mpp-x = 0\.25 and mpp-y = 0\.5"):
        open_slide(path)


# --- the real OpenSlide fixtures -------------------------------------------------------------


def test_boxes_tiff_odd_downsamples_and_nonsense_mpp(fixtures_dir):
    path = fixtures_dir / "boxes.tiff"
    for backend in ("openslide", "tiffslide"):
        with pytest.raises(SlideError, match=r"boxes\.tiff.*352\.77.*implausible"):
            open_slide(path, backend=backend)
    with open_slide(path, mpp_override=0.5) as s:
        assert s.dimensions == (300, 250)
        assert s.level_count == 4
        assert s.backend_downsamples[2] == pytest.approx(4.016, abs=1e-3)
        assert s.backend_downsamples[3] == pytest.approx(8.086, abs=1e-3)
        assert s.level_downsamples == (1.0, 2.0, 4.0, 8.0)  # the sides of level 0 halved, floored
        expected = np.asarray(Image.open(fixtures_dir / "boxes.png").convert("RGB"))
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (300, 250)), expected)
        assert s.best_level_for_mpp(2.0) == 2
        assert s.best_level_for_mpp(1.95) == 1


def test_small_svs(fixtures_dir):
    for backend in ("openslide", "tiffslide"):
        with open_slide(fixtures_dir / "small.svs", backend=backend) as s:
            assert s.dimensions == (16, 16)
            assert s.mpp == pytest.approx(0.499)
            assert s.vendor == "aperio"
            assert s.read_region((0, 0), 0, (16, 16)).shape == (16, 16, 3)


def test_dicom_opens_with_openslide_only(fixtures_dir, tmp_path):
    # OpenSlide reads a DICOM WSI from one file of its series directory
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(fixtures_dir / name, tmp_path / name)
    with open_slide(tmp_path / "boxes_0.dcm") as s:
        assert s.backend == "openslide"
        assert s.vendor == "dicom"
        assert s.read_region((0, 0), 0, (8, 8)).shape == (8, 8, 3)
    with pytest.raises(SlideError, match=r"boxes_0\.dcm.*cannot be opened by tiffslide"):
        open_slide(tmp_path / "boxes_0.dcm", backend="tiffslide")


def test_unreadable_svs_names_the_file(fixtures_dir):
    # it opens in both backends, but no tile decodes: it is refused at open, naming the decoder's error
    with pytest.raises(SlideError, match=r"unreadable\.svs: no backend can open it .*cannot be decoded.*Bogus marker length"):
        open_slide(fixtures_dir / "unreadable.svs")


def test_unopenable_tiff_names_the_real_cause_not_its_mpp(fixtures_dir):
    with pytest.raises(SlideError, match=r"unopenable\.tiff.*cannot be opened by openslide"):
        open_slide(fixtures_dir / "unopenable.tiff", backend="openslide")
    # tiffslide parses it but cannot decode it: the compression is named, with or without an
    # override, and its (implausible) mpp is never judged
    for override in (None, 0.5):
        with pytest.raises(SlideError, match=r"unopenable\.tiff: no backend can open it") as err:
            open_slide(fixtures_dir / "unopenable.tiff", mpp_override=override)
        assert "52479" in str(err.value) and "mpp" not in str(err.value)


def test_slide_without_usable_mpp_opens_for_inspection(fixtures_dir):
    with open_slide(fixtures_dir / "boxes.tiff", require_mpp=False) as s:
        info = s.info()
        assert info["dimensions"] == [300, 250] and info["level_count"] == 4
        assert info["mpp"] is None and info["level_mpp"] == [None] * 4
        assert "352.7" in info["mpp_problem"] and "implausible" in info["mpp_problem"]
        with pytest.raises(SlideError, match=r"boxes\.tiff: metadata mpp-x = 352\.7"):
            s.mpp


def test_auto_backend_rule(fixtures_dir, tmp_path):
    from wsitools.slide import choose_backend

    assert choose_backend("a.svs") == choose_backend("b.TIFF") == "tiffslide"
    assert choose_backend("a.ndpi") == choose_backend("a.mrxs") == choose_backend("a.dcm") == "openslide"
    # a file the first choice cannot open goes to the other backend
    shutil.copy(fixtures_dir / "boxes_0.dcm", tmp_path / "boxes.tif")
    with open_slide(tmp_path / "boxes.tif") as s:
        assert s.backend == "openslide"


def test_missing_file(tmp_path):
    with pytest.raises(SlideError, match="no such slide file"):
        open_slide(tmp_path / "nope.svs")


def test_region_in_synthetic_truth_is_textured():
    # guards the synthetic generator the other tests rely on
    tissue = render([Region(0, 0, 100, 100)], 40, 40, 20, 20)
    other = render([Region(0, 0, 100, 100, "other")], 40, 40, 20, 20)
    assert tissue.std() > 5 and other.std() > 5
    assert abs(tissue.mean(axis=(0, 1)) - other.mean(axis=(0, 1))).max() > 20


def test_tiffslide_decodes_a_shared_tile_once_and_the_cache_is_bounded(synthetic_svs, monkeypatch):
    import wsitools.slide
    from wsitools.slide import TileCache

    with open_slide(synthetic_svs, backend="tiffslide") as s, open_slide(synthetic_svs, backend="openslide") as ref:
        page = s._tiled_page(0)
        tw = page.tilewidth
        decoded: list[str] = []
        decode = wsitools.slide.decode_jpeg_strict
        monkeypatch.setattr(wsitools.slide, "decode_jpeg_strict",
                            lambda data, tables, **kw: decoded.append(kw["where"]) or decode(data, tables, **kw))
        left = s.read_region((tw // 2, 0), 0, (tw, 16))  # tiles 0 and 1 of the first row
        right = s.read_region((tw, 0), 0, (tw, 16))  # tile 1 again: from the cache
        assert decoded == ["TIFF tile 0 of level 0", "TIFF tile 1 of level 0"]
        np.testing.assert_array_equal(left, ref.read_region((tw // 2, 0), 0, (tw, 16)))
        np.testing.assert_array_equal(right, ref.read_region((tw, 0), 0, (tw, 16)))

    cache = TileCache(max_bytes=3 * 100)
    for key in range(5):
        cache.put((0, key), np.zeros(100, np.uint8))
    assert [cache.get((0, k)) is not None for k in range(5)] == [False, False, True, True, True]
    cache.get((0, 2))  # now the most recent: tile 3 goes first
    cache.put((0, 5), np.zeros(100, np.uint8))
    assert cache.get((0, 3)) is None and cache.get((0, 2)) is not None
    cache.put((0, 9), np.zeros(301, np.uint8))  # larger than the whole cache: not kept
    assert cache.get((0, 9)) is None
    cache.put((0, 6), np.zeros(100, np.uint8), spent=True)  # spent tiles go out before any other
    cache.put((0, 7), np.zeros(100, np.uint8))
    assert cache.get((0, 6)) is None and all(cache.get((0, k)) is not None for k in (2, 5, 7))


def test_regions_in_raster_order_decode_each_tile_once_with_a_cache_of_one_row(synthetic_svs, monkeypatch):
    import wsitools.slide
    from wsitools.slide import TileCache

    decoded: list[str] = []
    decode = wsitools.slide.decode_jpeg_strict
    monkeypatch.setattr(wsitools.slide, "decode_jpeg_strict",
                        lambda data, tables, **kw: decoded.append(kw["where"]) or decode(data, tables, **kw))
    with open_slide(synthetic_svs, backend="tiffslide") as s, open_slide(synthetic_svs, backend="openslide") as ref:
        page = s._tiled_page(0)
        across = -(-page.imagewidth // page.tilewidth)
        # room for one row of tiles across the level and two more: a plain LRU cache would lose
        # the bottom row of each row of regions before the next row of regions needs it
        s._tiles = TileCache((across + 2) * page.tilewidth * page.tilelength * 3)
        decoded.clear()
        side = page.tilewidth * 3 // 2  # regions straddle the tiles
        w, h = s.dimensions
        for y in range(0, h, side):
            for x in range(0, w, side):
                size = (min(side, w - x), min(side, h - y))
                np.testing.assert_array_equal(s.read_region((x, y), 0, size), ref.read_region((x, y), 0, size))
    assert len(decoded) == len(set(decoded)) == across * -(-page.imagelength // page.tilelength)


def _tiff_tiles(path, page_index):
    """(page, [(index, bytes)]) of every tile of a TIFF page."""
    import tifffile

    tif = tifffile.TiffFile(path)
    page = tif.pages[page_index]
    fh = tif.filehandle
    blobs = []
    for i, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
        fh.seek(offset)
        blobs.append((i, fh.read(count)))
    return tif, page, blobs


def test_one_strict_decode_gives_the_tiff_decoders_pixels(synthetic_svs, monkeypatch):
    """On YCbCr JPEG pages the strict decode is the only decode, pixel-identical to imagecodecs'."""
    from wsitools.slide import decode_jpeg_strict

    tif, page, blobs = _tiff_tiles(synthetic_svs, 0)
    with tif:
        assert int(page.photometric) == 6 and len(blobs) == 48
        for i, data in blobs:
            ours = decode_jpeg_strict(data, page.jpegtables, photometric=6,
                                      shape=(page.tilelength, page.tilewidth), where=f"tile {i}")
            assert ours is not None and ours.shape == (256, 256, 3)
            np.testing.assert_array_equal(ours, page.decode(data, i, jpegtables=page.jpegtables)[0][0])
        # a tile of another size than the page's, or a page said to be RGB: left to the TIFF decoder
        assert decode_jpeg_strict(blobs[0][1], page.jpegtables, photometric=6, shape=(128, 256), where="t") is None
        assert decode_jpeg_strict(blobs[0][1], page.jpegtables, photometric=2, shape=(256, 256), where="t") is None
    with open_slide(synthetic_svs, backend="tiffslide") as s, open_slide(synthetic_svs, backend="openslide") as ref:
        page = s._tiled_page(0)
        monkeypatch.setattr(page, "decode", lambda *a, **k: pytest.fail("the TIFF decoder was called"))
        region = s.read_region((100, 50), 0, (600, 400))
        np.testing.assert_array_equal(region, ref.read_region((100, 50), 0, (600, 400)))


def test_a_corrupt_tile_is_an_error_on_both_decode_paths(synthetic_svs):
    from wsitools.slide import check_jpeg, decode_jpeg_strict

    tif, page, blobs = _tiff_tiles(synthetic_svs, 0)
    with tif:
        data = bytearray(blobs[9][1])
        start = data.find(b"\xff\xda") + 2 + int.from_bytes(data[data.find(b"\xff\xda") + 2:][:2], "big")
        at = start + (len(data) - start) // 3
        data[at : at + 64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
        bad, tables = bytes(data), page.jpegtables
        # the TIFF decoder alone takes it without a word: the reason for the strict decode
        assert page.decode(bad, 9, jpegtables=tables)[0][0].shape == (256, 256, 3)
        with pytest.raises(SlideError, match=r"^corrupt JPEG data in TIFF tile 9 of level 0: .+"):
            decode_jpeg_strict(bad, tables, photometric=6, shape=(256, 256), where="TIFF tile 9 of level 0")
        # where the strict decode cannot stand in for the TIFF decoder, the 1/8-scale check catches it
        assert decode_jpeg_strict(bad, tables, photometric=2, shape=(256, 256), where="t") is None
        with pytest.raises(SlideError, match=r"^corrupt JPEG data in TIFF tile 9 of level 0: .+"):
            check_jpeg(bad, tables, where="TIFF tile 9 of level 0")
        check_jpeg(blobs[9][1], tables, where="TIFF tile 9 of level 0")  # the intact tile passes


def test_rgb_pages_whose_jpegs_look_like_ycbcr_are_read_the_tiff_way(fixtures_dir):
    """A real Aperio file: photometric RGB, JPEGs without JFIF or Adobe markers (TurboJPEG would
    take them for YCbCr); the TIFF decoder reads them as RGB, as OpenSlide does."""
    from wsitools.slide import decode_jpeg_strict

    tif, page, blobs = _tiff_tiles(fixtures_dir / "small.svs", 0)
    with tif:
        assert int(page.photometric) == 2
        shape = (page.tilelength, page.tilewidth)
        assert decode_jpeg_strict(blobs[0][1], page.jpegtables, photometric=2, shape=shape, where="t") is None
    with open_slide(fixtures_dir / "small.svs", backend="tiffslide") as s, \
            open_slide(fixtures_dir / "small.svs", backend="openslide") as ref:
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (16, 16)), ref.read_region((0, 0), 0, (16, 16)))


def test_synthetic_levels_are_area_averages_of_level_zero(tmp_path):
    """Each smaller level (and the SVS thumbnail) equals the rounded ds x ds mean of a level-0
    render, up to the JPEG coding of the file."""
    import tifffile

    regions = (Region(100, 80, 900, 600, "tissue"), Region(500, 300, 300, 250, "other"))
    path = write_slide(tmp_path / "s.svs", size=(1100, 900), mpp=0.5, regions=regions, fmt="svs",
                       downsamples=(1, 2, 4), tile=128, quality=95)
    full = render(regions, 0, 0, 1152, 1024)
    with tifffile.TiffFile(path) as tif:
        pages = [p.asarray() for p in tif.pages]
    level0, thumb, level2, level4 = pages
    assert level0.shape == (900, 1100, 3) and level2.shape == (450, 550, 3) and level4.shape == (225, 275, 3)
    for ds, level in ((2, level2), (4, level4)):
        h, w = level.shape[:2]
        ref = full[: h * ds, : w * ds].reshape(h, ds, w, ds, 3).astype(np.uint32).sum((1, 3))
        ref = (ref + ds * ds // 2) // (ds * ds)
        assert np.abs(level.astype(int) - ref.astype(int)).mean() < 2.0
    ds = 2  # thumbnail: ceil(1100 / 768)
    h, w = thumb.shape[:2]
    assert (h, w) == (900 // ds, 1100 // ds)
    with pytest.raises(ValueError, match="divide the tile size"):
        write_slide(tmp_path / "bad.tiff", size=(600, 600), mpp=0.5, regions=regions, downsamples=(1, 3), tile=128)


def test_synthetic_writer_memory_is_bounded(tmp_path):
    """Level 0 is never held whole: writing a 6144 x 4096 slide (72 MiB of level-0 pixels)
    allocates a small fraction of it."""
    import tracemalloc

    regions = (Region(200, 200, 5600, 3600, "tissue"),)
    tracemalloc.start()
    write_slide(tmp_path / "big.svs", size=(6144, 4096), mpp=0.5, regions=regions, fmt="svs", downsamples=(1, 4, 16))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_synthetic_levels_over_the_budget_are_rendered_afresh(tmp_path, monkeypatch):
    """A level whose sums would not fit the budget comes out the same, rendered from level 0."""
    import tifffile

    from wsitools import synthetic

    synthetic_mean = synthetic._area_mean
    regions = (Region(50, 40, 700, 500, "tissue"), Region(300, 200, 200, 150, "other"))
    kw = dict(size=(800, 600), mpp=0.5, regions=regions, fmt="svs", downsamples=(1, 2, 4), tile=128)
    summed = write_slide(tmp_path / "summed.svs", **kw)
    monkeypatch.setattr(synthetic, "PYRAMID_BUDGET", 150 * 200 * 3)  # level 4 (uint8) fits, level 2 not
    rendered = []
    monkeypatch.setattr(synthetic, "_area_mean", lambda px, ds: rendered.append(ds) or synthetic_mean(px, ds))
    fresh = write_slide(tmp_path / "fresh.svs", **kw)
    assert set(rendered) == {2}
    with tifffile.TiffFile(summed) as a, tifffile.TiffFile(fresh) as b:
        for pa, pb in zip(a.pages, b.pages, strict=True):
            np.testing.assert_array_equal(pa.asarray(), pb.asarray())
