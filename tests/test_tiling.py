"""Tiling into patch stores: pixels, coordinates, levels, tissue, atomicity, re-runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import planted_mask
from wsitools.errors import ConfigError, StoreError
from wsitools.slide import open_slide
from wsitools.store import PatchStore, read_store_attrs
from wsitools.tiling import TilingParams, tile_slide
from wsitools.tissue import TissueParams

TISSUE = TissueParams(mpp=4.0, min_region_area=5_000)


def params(**kw) -> TilingParams:
    return TilingParams(**{"mpp": 0.5, "tile_size": 64, "tissue": TISSUE, **kw})


def exact_reference(slide, store: PatchStore) -> np.ndarray:
    """Each tile read directly (one read per tile) from its exact grid position."""
    a = store.attrs
    step = a["stride"] * a["mpp_target"] / a["mpp_level0"]
    size = a["tile_size_level0"] / a["level_downsample"]
    out = []
    for x, y in store.coords:
        gx, gy = round(x / step) * step, round(y / step) * step
        out.append(slide.read_region_resized((gx, gy), a["level"], (size, size), (store.tile_size,) * 2))
    return np.stack(out)


@pytest.mark.parametrize(
    "mpp, level, resize",
    [(0.25, 0, 1.0), (0.5, 1, 1.0), (0.7, 1, 1.4), (1.0, 2, 1.0), (0.3, 0, 1.2)],
)
def test_tiles_equal_direct_reads(synthetic_svs, tmp_path, mpp, level, resize):
    record = tile_slide(synthetic_svs, tmp_path, params(mpp=mpp, codec="lossless"), progress=False)
    store = PatchStore.open(tmp_path / "synth_svs.zarr")
    assert record["status"] == "ok" and record["n_tiles"] == len(store) > 0
    assert store.attrs["level"] == level == record["level"]
    assert store.attrs["resize_factor"] == pytest.approx(resize)
    assert store.tile_size_level0 == pytest.approx(64 * mpp / 0.25)
    tiles = store.read_tiles(slice(None))
    assert tiles.shape == (len(store), 64, 64, 3) and tiles.dtype == np.uint8
    with open_slide(synthetic_svs) as s:
        reference = exact_reference(s, store)
        # block reads sample exactly the geometry of single-tile reads
        assert np.abs(reference.astype(int) - tiles).max() <= 1
        # and a plain read at the rounded level-0 coords agrees within resampling tolerance
        x, y = store.coords[0]
        size = store.tile_size_level0 / store.attrs["level_downsample"]
        plain = s.read_region_resized((float(x), float(y)), level, (size, size), (64, 64))
        assert np.abs(plain.astype(int) - tiles[0]).mean() < 12


@pytest.mark.parametrize("backend", ["tiffslide", "openslide"])
def test_a_level_of_an_odd_sized_slide_is_copied_not_resampled(tmp_path, backend):
    """Levels of a slide whose sides are not multiples of the downsample report 1.999 or 2.0009;
    they are level 0 halved all the same, so tiles at their resolution are their pixels."""
    import tifffile

    from conftest import REGIONS
    from wsitools.synthetic import write_slide

    slide = write_slide(tmp_path / "odd.tiff", size=(2689, 1793), mpp=0.25, regions=REGIONS, fmt="tiff",
                        downsamples=(1, 2, 4))
    with open_slide(slide, backend=backend) as s:
        assert s.level_dimensions[1] == (1345, 897) and s.backend_downsamples[1] != 2.0
        assert s.level_downsamples == (1.0, 2.0, 4.0)
    tile_slide(slide, tmp_path / "t", params(codec="lossless", min_tissue=0.01), backend=backend, progress=False)
    store = PatchStore.open(tmp_path / "t" / "odd.zarr")
    assert (store.attrs["level"], store.attrs["resize_factor"], store.attrs["level_downsample"]) == (1, 1.0, 2.0)
    with tifffile.TiffFile(slide) as tif:
        level1 = tif.series[0].levels[1].asarray()
    tiles = store.read_tiles(slice(None))
    crops = np.stack([level1[y // 2 : y // 2 + 64, x // 2 : x // 2 + 64] for x, y in store.coords])
    assert len(store) > 50 and store.coords.max() > 1500  # far enough for the old mapping to drift by half a px
    if backend == "tiffslide":
        np.testing.assert_array_equal(tiles, crops)
    else:  # OpenSlide resamples by the part of its own downsample a level-0 px leaves over
        assert np.abs(tiles.astype(int) - crops).mean() < 1.5


def test_whole_downsamples():
    from wsitools.slide import whole_downsamples

    dims = (2689, 1793)
    assert whole_downsamples(dims, [dims, (1344, 896), (673, 449)], [1.0, 2.0009, 3.99]) == (1.0, 2.0, 4.0)
    # a level not made by a whole factor keeps its own
    assert whole_downsamples((3000, 2200), [(3000, 2200), (811, 595)], [1.0, 3.6985]) == (1.0, 3.6985)
    assert whole_downsamples((3000, 2200), [(3000, 2200), (1490, 1100)], [1.0, 2.0067]) == (1.0, 2.0067)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR in dB of each tile of ``a`` against ``b`` ([n, S, S, 3] uint8)."""
    mse = ((a.astype(np.float64) - b) ** 2).mean(axis=(1, 2, 3))
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))


@pytest.mark.parametrize("mpp", [0.5, 0.7])
def test_jpeg_store_is_close_to_direct_reads_and_a_fraction_of_lossless(synthetic_svs, tmp_path, mpp):
    tile_slide(synthetic_svs, tmp_path / "j", params(mpp=mpp), progress=False)
    tile_slide(synthetic_svs, tmp_path / "j50", params(mpp=mpp, jpeg_quality=50), progress=False)
    tile_slide(synthetic_svs, tmp_path / "l", params(mpp=mpp, codec="lossless"), progress=False)
    jpeg, jpeg50, lossless = (PatchStore.open(tmp_path / d / "synth_svs.zarr") for d in ("j", "j50", "l"))
    assert (jpeg.attrs["codec"], jpeg.attrs["jpeg_quality"], jpeg.attrs["jpeg_subsampling"]) == ("jpeg", 97, "444")
    assert (lossless.attrs["codec"], lossless.attrs["jpeg_quality"]) == ("lossless", None)
    assert jpeg.attrs["format_version"] == lossless.attrs["format_version"] == 3
    tiles, exact = jpeg.read_tiles(slice(None)), lossless.read_tiles(slice(None))
    assert tiles.shape == exact.shape == (len(lossless), 64, 64, 3) and tiles.dtype == np.uint8
    np.testing.assert_array_equal(jpeg.coords, lossless.coords)
    assert psnr(tiles, exact).min() > 35
    assert psnr(jpeg50.read_tiles(slice(None)), exact).mean() < psnr(tiles, exact).mean() - 2

    def size(store: PatchStore) -> int:
        return sum(f.stat().st_size for f in (store.path / "tiles").rglob("c/**/*") if f.is_file())

    assert size(jpeg50) < size(jpeg) < 0.4 * size(lossless)  # 0.34 on these 64 px tiles


def test_coords_lie_on_the_level0_grid_inside_tissue(synthetic_svs, tmp_path):
    tile_slide(synthetic_svs, tmp_path, params(overlap=16, min_tissue=0.9), progress=False)
    store = PatchStore.open(tmp_path / "synth_svs.zarr")
    step = 48 * 2  # stride 48 target px at 2 level-0 px each
    assert store.attrs["stride"] == 48 and store.attrs["overlap"] == 16
    assert (store.coords % step == 0).all()
    assert len(np.unique(store.coords, axis=0)) == len(store)
    assert (store.tissue_fraction >= 0.9).all()
    # every tile centre is in planted tissue
    truth = planted_mask((1536, 2048), (1.0, 1.0))
    centres = store.coords + 64
    assert truth[centres[:, 1], centres[:, 0]].all()


def test_more_tissue_required_means_fewer_tiles(synthetic_svs, tmp_path):
    counts = []
    for i, min_tissue in enumerate((0.1, 0.5, 0.99)):
        counts.append(tile_slide(synthetic_svs, tmp_path / str(i), params(min_tissue=min_tissue),
                                 progress=False)["n_tiles"])
    assert counts[0] > counts[1] > counts[2] > 0


def test_both_backends_and_schedulers_give_the_same_store(synthetic_tiff, tmp_path):
    stores = []
    for name, backend, scheduler, workers in (("a", "openslide", "threads", 2), ("b", "tiffslide", "processes", 2),
                                              ("c", "tiffslide", "threads", 1)):
        tile_slide(synthetic_tiff, tmp_path / name, params(mpp=0.7, tile_size=32), backend=backend, scheduler=scheduler,
                   workers=workers, progress=False)
        stores.append(PatchStore.open(tmp_path / name / "synth_tiff.zarr"))
    assert len(stores[0]) > 64  # more than one chunk
    for other in stores[1:]:
        np.testing.assert_array_equal(stores[0].coords, other.coords)
        np.testing.assert_array_equal(stores[0].read_tiles(slice(None)), other.read_tiles(slice(None)))
    # one worker (the chunks in turn, in the calling thread) writes the very bytes parallel tasks do
    chunks = [sorted((s.path / "tiles" / "c").iterdir()) for s in stores[1:]]
    assert [c.name for c in chunks[0]] == [c.name for c in chunks[1]] and len(chunks[0]) >= 2
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*chunks))


def test_magnification_is_converted_with_objective_power(synthetic_svs, tmp_path):
    params = TilingParams(magnification=10, tile_size=64, tissue=TISSUE)  # the mpp's default gives way
    assert (params.mpp, TilingParams().mpp) == (None, 0.5)
    with pytest.raises(ConfigError, match="give exactly one of a target mpp and a target magnification"):
        TilingParams(mpp=0.5, magnification=10)
    tile_slide(synthetic_svs, tmp_path, params, progress=False)
    attrs = read_store_attrs(tmp_path / "synth_svs.zarr")
    assert attrs["mpp_target"] == pytest.approx(1.0)  # 0.25 um/px at 40x -> 1.0 at 10x
    assert attrs["level"] == 2


def test_coords_only_store_reads_the_same_pixels(synthetic_svs, tmp_path):
    tile_slide(synthetic_svs, tmp_path / "px", params(mpp=0.7, codec="lossless"), progress=False)
    tile_slide(synthetic_svs, tmp_path / "co", params(mpp=0.7, store_pixels=False), progress=False)
    with_px = PatchStore.open(tmp_path / "px" / "synth_svs.zarr")
    coords_only = PatchStore.open(tmp_path / "co" / "synth_svs.zarr")
    assert not coords_only.has_pixels
    assert not (tmp_path / "co" / "synth_svs.zarr" / "tiles").exists()
    idx = np.array([0, 3, len(with_px) - 1])
    got = coords_only.read_tiles(idx)
    assert np.abs(got.astype(int) - with_px.read_tiles(idx)).max() <= 1


def test_rerun_is_a_no_op_and_other_params_refuse(synthetic_svs, tmp_path):
    tile_slide(synthetic_svs, tmp_path, params(), progress=False)
    store = tmp_path / "synth_svs.zarr"
    created = read_store_attrs(store)["created"]
    mtime = (store / "zarr.json").stat().st_mtime_ns
    tile_slide(synthetic_svs, tmp_path, params(), progress=False)
    assert (store / "zarr.json").stat().st_mtime_ns == mtime
    with pytest.raises(StoreError, match=r"synth_svs\.zarr: exists with other parameters \(tile_size\)"):
        tile_slide(synthetic_svs, tmp_path, params(tile_size=32), progress=False)
    tile_slide(synthetic_svs, tmp_path, params(tile_size=32), overwrite=True, progress=False)
    assert PatchStore.open(store).tile_size == 32
    assert read_store_attrs(store)["created"] >= created


def test_killed_run_leaves_nothing_that_looks_finished(synthetic_svs, tmp_path, monkeypatch):
    import wsitools.tiling as tiling

    calls = {"n": 0}
    real = tiling.read_tiles

    def dies_on_second_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as when a job is killed mid-run
        return real(*args, **kwargs)

    monkeypatch.setattr(tiling, "read_tiles", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        tile_slide(synthetic_svs, tmp_path, params(mpp=0.25), workers=1, progress=False)
    assert not (tmp_path / "synth_svs.zarr").exists()
    assert not list(tmp_path.glob(".tmp-*"))
    # a temporary left by a hard kill (no cleanup possible) is never taken as a store
    leftover = tmp_path / f".tmp-synth_svs.zarr-{os.getpid() + 1}"
    leftover.mkdir()
    with pytest.raises(StoreError, match="unfinished"):
        PatchStore.open(leftover)
    with pytest.raises(StoreError, match="no such patch store"):
        PatchStore.open(tmp_path / "synth_svs.zarr")


def test_blank_slide_gives_an_empty_store(blank_svs, tmp_path):
    record = tile_slide(blank_svs, tmp_path, params(), progress=False)
    assert record["status"] == "no_tissue" and record["n_tiles"] == 0
    store = PatchStore.open(tmp_path / "blank.zarr")
    assert len(store) == 0 and store.read_tiles(slice(None)).shape == (0, 64, 64, 3)
    qc = json.loads((tmp_path / "blank.qc.json").read_text())
    assert qc["status"] == "no_tissue"


def test_qc_record_and_files(synthetic_svs, tmp_path):
    record = tile_slide(synthetic_svs, tmp_path, params(), progress=False)
    qc = json.loads((tmp_path / "synth_svs.qc.json").read_text())
    assert qc == json.loads(json.dumps(record))
    assert qc["mpp"] == 0.25 and qc["level"] == 1 and qc["tissue_area_mm2"] > 0.05
    assert (tmp_path / "synth_svs.tissue.png").stat().st_size > 0
    assert json.loads((tmp_path / "synth_svs.geojson").read_text())["type"] == "FeatureCollection"


def test_store_provenance_attributes(synthetic_svs, tmp_path):
    tile_slide(synthetic_svs, tmp_path, params(), progress=False)
    a = read_store_attrs(tmp_path / "synth_svs.zarr")
    assert a["slide_path"] == str(Path(synthetic_svs).resolve())
    assert a["slide_size"] == Path(synthetic_svs).stat().st_size
    for key in ("mpp_level0", "mpp_target", "tile_size", "tile_size_level0", "level", "level_downsample",
                "tissue", "package_version", "format_version", "params_hash", "backend"):
        assert key in a
    import zarr

    assert (a["codec"], a["jpeg_quality"]) == ("jpeg", 97)
    tiles = zarr.open_array(str(tmp_path / "synth_svs.zarr" / "tiles"), mode="r")
    assert tiles.shape == (a["n_tiles"],) and tiles.chunks == (64,)  # one JPEG per tile, 64 per chunk
    assert bytes(tiles[:1][0])[:2] == b"\xff\xd8"  # a JPEG any zarr reader gets as bytes


def test_any_failure_of_one_slide_is_recorded_and_the_rest_go_on(synthetic_svs, blank_svs, tmp_path, monkeypatch):
    import wsitools.tiling as tiling

    real = tiling.detect_tissue

    def broken_decoder(slide, p):
        if slide.path.name == "blank.svs":
            raise ValueError("corrupt JPEG tile")
        return real(slide, p)

    monkeypatch.setattr(tiling, "detect_tissue", broken_decoder)
    records = tiling.tile_slides([blank_svs, synthetic_svs], tmp_path, params(), progress=False)
    assert [r["status"] for r in records] == ["failed", "ok"]
    qc = json.loads((tmp_path / "blank.qc.json").read_text())
    assert qc["status"] == "failed" and "ValueError: corrupt JPEG tile" in qc["reason"]
    assert "blank.svs" in qc["reason"]


def test_cell_rectangles_hold_the_kept_cells_and_nothing_else():
    from wsitools.tiling import cell_rectangles

    full = np.array([(i, j) for j in range(3) for i in range(4)])
    assert [r.tolist() for r in cell_rectangles(full)] == [list(range(12))]
    # an L with a gap: row 0 cells 0-3, row 1 cells 0-1 and 3, row 2 cells 0-1
    cells = np.array([(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1), (3, 1), (0, 2), (1, 2)])
    rects = cell_rectangles(cells)
    assert [r.tolist() for r in rects] == [[0, 1, 2, 3], [4, 5, 7, 8], [6]]
    for r in rects:  # each is a full rectangle of cells
        c = cells[r]
        span = c.max(axis=0) - c.min(axis=0) + 1
        assert len(r) == span[0] * span[1]


def test_tiling_decodes_each_source_tile_the_kept_tiles_touch_once(tmp_path, monkeypatch):
    import re

    import wsitools.slide
    from conftest import REGIONS, SLIDE_MPP, SLIDE_SIZE
    from wsitools.synthetic import write_slide

    # 64 px JPEG tiles, 60 px patches at level 1: blocks of 480 px straddle the JPEG tiles, and
    # the blocks at the tissue's edge keep only some of their cells
    slide = write_slide(tmp_path / "small_tiles.svs", size=SLIDE_SIZE, mpp=SLIDE_MPP, regions=REGIONS,
                        fmt="svs", downsamples=(1, 2, 8), tile=64)
    decoded: list[str] = []
    decode = wsitools.slide.decode_jpeg_strict
    monkeypatch.setattr(wsitools.slide, "decode_jpeg_strict",
                        lambda data, tables, **kw: decoded.append(kw["where"]) or decode(data, tables, **kw))
    tile_slide(slide, tmp_path, params(tile_size=60, codec="lossless"), workers=1, progress=False)
    store = PatchStore.open(tmp_path / "small_tiles.zarr")
    assert store.attrs["level"] == 1 and store.attrs["resize_factor"] == 1.0
    with open_slide(slide, backend="tiffslide") as s:
        page = s._tiled_page(1)
        tw, th, across = page.tilewidth, page.tilelength, -(-page.imagewidth // page.tilewidth)
    touched = {
        ty * across + tx
        for x, y in store.coords // 2
        for ty in range(y // th, (y + 59) // th + 1)
        for tx in range(x // tw, (x + 59) // tw + 1)
    }
    level1 = [int(m[1]) for w in decoded if (m := re.fullmatch(r"TIFF tile (\d+) of level 1", w))]
    assert sorted(level1) == sorted(touched)  # every touched tile once, no other
    with open_slide(slide) as s:
        np.testing.assert_array_equal(store.read_tiles(slice(None)), exact_reference(s, store))


def test_a_copied_or_touched_slide_keeps_its_store_and_qc_record(synthetic_svs, tmp_path):
    # cp without -p, rsync without -t: the bytes are the same, only the modification time moved.
    slide = Path(shutil.copy(synthetic_svs, tmp_path / "s.svs"))
    for store_pixels in (True, False):
        out = tmp_path / f"t{store_pixels}"
        first = tile_slide(slide, out, params(store_pixels=store_pixels), progress=False)
        qc, manifest = (out / "s.qc.json").read_bytes(), (out / "s.zarr" / "manifest.json").read_bytes()
        st = slide.stat()
        os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        again = tile_slide(slide, out, params(store_pixels=store_pixels), progress=False)
        assert again == first and (out / "s.qc.json").read_bytes() == qc
        assert (out / "s.zarr" / "manifest.json").read_bytes() == manifest  # kept, not rebuilt
        assert PatchStore.open(out / "s.zarr").read_tiles(np.array([0])).shape == (1, 64, 64, 3)
    with open(slide, "ab") as f:
        f.write(bytes(16))  # other bytes: another file
    with pytest.raises(StoreError, match=r"s\.zarr: exists with other parameters \(slide_fingerprint, slide_mtime, "
                       r"slide_size\)"):
        tile_slide(slide, tmp_path / "tTrue", params(), progress=False)


def test_tiling_warns_when_the_mpp_override_is_far_from_the_metadata(blank_svs, tmp_path, caplog):
    record = tile_slide(blank_svs, tmp_path / "tiles", mpp_override=0.3, progress=False)
    assert record["mpp"] == 0.3
    warnings = [r.getMessage() for r in caplog.records if "mpp override" in r.getMessage()]
    assert warnings == [
        f"{blank_svs}: the mpp override 0.3 um/px differs from the slide's metadata mpp 0.25 um/px by 20%; "
        "the override is used (check the samples sheet's mpp column or --mpp-override)"
    ]


def test_failed_and_tiled_slides_record_their_paths_in_one_form(blank_svs, fixtures_dir, tmp_path, monkeypatch):
    """The QC table's slide_path is absolute for a slide that failed as for one that was tiled,
    whatever form the samples sheet gave."""
    from wsitools.tiling import tile_slides

    monkeypatch.chdir(tmp_path)
    Path("slides").mkdir()
    shutil.copyfile(fixtures_dir / "unreadable.svs", "slides/bad.svs")
    shutil.copyfile(blank_svs, "slides/blank.svs")
    records = tile_slides(["slides/bad.svs", "slides/blank.svs"], "tiles", progress=False)
    assert [(r["status"], r["slide_path"]) for r in records] == [
        ("failed", str(tmp_path.resolve() / "slides" / "bad.svs")),
        ("no_tissue", str(tmp_path.resolve() / "slides" / "blank.svs")),
    ]
    assert json.loads(Path("tiles/bad.qc.json").read_text())["slide_path"] == str(tmp_path.resolve() / "slides" / "bad.svs")


def test_a_blank_slide_is_not_called_a_greyscale_scan(blank_svs, tmp_path, caplog):
    """What is known of a slide without any colour is that every pixel is grey, not why."""
    record = tile_slide(blank_svs, tmp_path / "tiles", progress=False)
    assert record["status"] == "no_tissue"
    assert [r.getMessage() for r in caplog.records if "no tissue found" in r.getMessage()] == [
        f"{blank_svs}: {GREY}"
    ]
    assert record["reason"] == f"no tile has tissue fraction >= 0.5; {GREY}"


GREY = ("no tissue found: every pixel of the slide is grey (no colour at all: a greyscale scan, a blank image or a "
        "fully transparent one), and tissue is found by its colour saturation")


def test_a_full_or_read_only_out_is_one_line_per_slide_and_stops_where_no_record_can_be_written(
    blank_svs, tmp_path, monkeypatch, caplog
):
    """An OSError naming its file (a full disk, a read-only --out) is a slide's one-line failure,
    without a traceback; when even its failed QC record cannot be written the run stops with that
    error, and a tiling worker sends it to the supervising process instead of dying on it."""
    import errno
    import logging
    import multiprocessing
    import types

    import wsitools.tiling as tiling

    store = tmp_path / "blank.zarr"

    def full_disk(path, out, params, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(store))

    monkeypatch.setattr(tiling, "tile_slide", full_disk)
    with caplog.at_level(logging.INFO):
        records = tiling.tile_slides([blank_svs], tmp_path, params(), progress=False)
    line = f"{blank_svs}: {store}: No space left on device"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [(r.getMessage(), r.exc_info) for r in errors] == [(line, None)]
    assert records[0]["reason"] == json.loads((tmp_path / "blank.qc.json").read_text())["reason"] == line

    qc = tmp_path / "blank.qc.json"

    def read_only(path, record):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(qc))

    monkeypatch.setattr(tiling, "write_json_atomic", read_only)
    with pytest.raises(OSError, match="Read-only file system") as raised:
        tiling.tile_slides([blank_svs], tmp_path, params(), progress=False)
    assert raised.value.filename == str(qc)

    ours, theirs = multiprocessing.Pipe()
    ours.send((str(blank_svs), "blank"))
    ours.send((str(blank_svs), "other"))  # never tiled: the worker ends on the error
    monkeypatch.setattr(tiling.signal, "signal", lambda *args: None)
    tiling._worker_main(theirs, str(tmp_path), params(), {"progress": False}, {"": logging.INFO})
    sent = ours.recv()
    assert isinstance(sent, OSError) and (sent.errno, sent.filename) == (errno.EROFS, str(qc)) and not ours.poll()
    worker = object.__new__(tiling._Worker)  # its end of the pipe, and a process that has ended
    worker.conn, worker.process = ours, types.SimpleNamespace(join=lambda: None)
    theirs.send(sent)
    with pytest.raises(OSError, match="Read-only file system"):
        worker.tile(blank_svs, "blank")


def test_removing_what_is_not_there_is_nothing_on_a_read_only_file_system(tmp_path, monkeypatch):
    """Unlinking a missing name on a read-only file system fails with EROFS, not ENOENT: a
    temporary that was never created is not an error, a file that is there still is."""
    import errno

    from wsitools.io import remove_path

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    there = tmp_path / "there"
    there.write_text("x")
    monkeypatch.setattr(Path, "unlink", read_only)
    remove_path(tmp_path / ".tmp-never-made")
    with pytest.raises(OSError, match="Read-only file system"):
        remove_path(there)
