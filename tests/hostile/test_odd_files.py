"""Hostile cases a new user meets with files nobody wrote for the tests: TIFF pages of 16-bit or
floating-point samples, sparse TIFFs, slides cut short, slides smaller than one tile, patch
stores damaged at the same size or edited and re-sealed.

Every input is made here (tifffile, wsitools.synthetic) and every test asserts on outcomes:
pixels, messages naming the file, QC records, what is on disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsitools.cli import main
from wsitools.errors import DamagedStoreError, SlideError, StoreError
from wsitools.slide import open_slide
from wsitools.store import MANIFEST, PatchStore, seal_patch_store
from wsitools.synthetic import Region, render, write_slide
from wsitools.tiling import TilingParams, tile_slide, tile_slides
from wsitools.tissue import TissueParams

MODELS = Path(__file__).resolve().parents[2] / "models"
TISSUE = TissueParams(mpp=4.0, min_region_area=5_000)
PARAMS = TilingParams(mpp=0.5, tile_size=64, tissue=TISSUE)
RES = {"resolution": (1e4 / 0.5, 1e4 / 0.5), "resolutionunit": "CENTIMETER"}
PIXELS = render((Region(40, 40, 440, 440, "tissue"),), 0, 0, 512, 512)


def tiled_tiff(path: Path, data: np.ndarray, **kwargs) -> Path:
    tifffile.imwrite(path, data, tile=(256, 256), photometric="rgb", **RES, **kwargs)
    return path


# --- pages that are not 8-bit ----------------------------------------------------------------


def test_16_bit_pages_are_read_as_8_bit_by_openslide(tmp_path):
    path = tiled_tiff(tmp_path / "rgb16.tiff", PIXELS.astype(np.uint16) * 257)
    with pytest.raises(SlideError, match=r"rgb16\.tiff: cannot be opened by tiffslide: its pixels cannot be "
                       r"decoded \(ValueError: pixels of type uint16, expected 8-bit \(uint8\)\)"):
        open_slide(path, backend="tiffslide")
    with open_slide(path) as slide:  # auto: tiffslide refuses it, OpenSlide scales it to 8 bits
        assert slide.backend == "openslide"
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (512, 512)), PIXELS)


def test_float_pages_fail_their_slide_in_one_line_and_the_cohort_goes_on(tmp_path, synthetic_svs, caplog):
    path = tiled_tiff(tmp_path / "float.tiff", PIXELS.astype(np.float32) / 255)
    records = tile_slides([path, synthetic_svs], tmp_path / "tiles", PARAMS, progress=False)
    assert [r["status"] for r in records] == ["failed", "ok"]
    reason = records[0]["reason"]
    assert reason.startswith(f"{path}: no backend can open it (")
    assert "pixels of type float32, expected 8-bit (uint8)" in reason and "\n" not in reason
    assert not any(r.exc_info for r in caplog.records)  # a user's error, logged without a traceback
    assert not (tmp_path / "tiles" / "float.zarr").exists()


# --- sparse and truncated TIFFs --------------------------------------------------------------


def test_a_sparse_tile_is_white_on_both_backends(tmp_path):
    """A tile of no bytes (offset 0, count 0) is one the scanner left out: white, as OpenSlide and
    libtiff read it, not an error on the tiffslide fast path."""

    def tiles():
        for ty in range(2):
            for tx in range(2):
                yield None if (tx, ty) == (1, 0) else PIXELS[ty * 256 : ty * 256 + 256, tx * 256 : tx * 256 + 256]

    path = tmp_path / "sparse.tiff"
    tifffile.imwrite(path, tiles(), shape=(512, 512, 3), dtype=np.uint8, tile=(256, 256), photometric="rgb", **RES)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].databytecounts[1] == 0
    expected = PIXELS.copy()
    expected[:256, 256:] = 255
    for backend in ("tiffslide", "openslide"):
        with open_slide(path, backend=backend) as slide:
            np.testing.assert_array_equal(slide.read_region((0, 0), 0, (512, 512)), expected)


@pytest.mark.parametrize("compression", ["jpeg", "zlib", None])
def test_a_truncated_slide_is_named_as_such_when_opened(tmp_path, compression):
    path = tiled_tiff(tmp_path / "cut.tiff", PIXELS, compression=compression)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        end = max(o + c for o, c in zip(page.dataoffsets, page.databytecounts))
    size = end - 1000  # the last tile cut short: a copy that stopped, or is still under way
    path.write_bytes(path.read_bytes()[:size])
    truncated = f"the file is truncated: the image data of level 0 reaches byte {end}, the file has {size} bytes"
    with pytest.raises(SlideError) as err:
        open_slide(path, backend="tiffslide")
    assert str(err.value) == f"{path.resolve()}: cannot be opened by tiffslide: {truncated}"
    with pytest.raises(SlideError) as err:
        open_slide(path)
    assert str(err.value).startswith(f"{path}: no backend can open it (cannot be opened by tiffslide: {truncated}; ")


def test_tiling_a_truncated_svs_fails_it_naming_the_cause(tmp_path, synthetic_svs):
    cut = tmp_path / "cut.svs"
    data = synthetic_svs.read_bytes()
    cut.write_bytes(data[: len(data) * 6 // 10])
    records = tile_slides([cut, synthetic_svs], tmp_path / "tiles", PARAMS, progress=False)
    assert [r["status"] for r in records] == ["failed", "ok"]
    assert records[0]["reason"].startswith(f"{cut}: no backend can open it (cannot be opened by tiffslide: "
                                           "the file is truncated: the image data of level 0 reaches byte ")
    assert sorted(p.name for p in (tmp_path / "tiles").iterdir() if p.name.startswith("cut")) == ["cut.qc.json"]


def test_the_tile_command_names_a_truncated_slide_in_its_own_line_only(tmp_path, synthetic_svs, capfd):
    cut = tmp_path / "cut.svs"
    data = synthetic_svs.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert main(["tile", str(cut), "--out", str(tmp_path / "tiles"), "--workers", "1", "--quiet"]) == 1
    err = capfd.readouterr().err  # the tiling worker's too: it is another process
    assert "the file is truncated" in err and "tifffile" not in err, err


# --- patch stores: damaged at the same size, or edited and re-sealed ---------------------------


@pytest.fixture(scope="module")
def stores(synthetic_svs, tmp_path_factory) -> dict[str, Path]:
    """Finished stores of the synthetic slide, one per codec, to copy and damage."""
    out = {}
    for codec in ("jpeg", "lossless"):
        folder = tmp_path_factory.mktemp(codec)
        params = TilingParams(mpp=0.5, tile_size=64, tissue=TISSUE, codec=codec)
        assert tile_slide(synthetic_svs, folder, params, workers=1, progress=False)["status"] == "ok"
        out[codec] = folder / "synth_svs.zarr"
    return out


def damaged_copy(store: Path, dest: Path) -> Path:
    return Path(shutil.copytree(store, dest / store.name))


def garble(path: Path) -> None:
    """Other bytes of the same size: what a disk error or a bad copy leaves, unseen by the manifest."""
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, np.uint8).tobytes())


@pytest.mark.parametrize("codec, chunk, array", [
    ("lossless", "tiles/c/0/0/0/0", "tiles"),
    ("jpeg", "coords/c/0/0", "coords"),
    ("jpeg", "tissue_fraction/c/0", "tissue_fraction"),
])
def test_a_chunk_garbled_at_its_size_is_a_one_line_error_naming_the_array(stores, tmp_path, codec, chunk, array):
    store = damaged_copy(stores[codec], tmp_path)
    garble(store / chunk)
    opened = PatchStore.open(store)  # the manifest's sizes hold
    with pytest.raises(DamagedStoreError) as err:
        getattr(opened, array) if array != "tiles" else opened.read_tiles(np.array([0, 1]))
    assert str(err.value) == (
        f"{store}: damaged patch store: {chunk} was changed after writing (its checksum differs); re-tile the slide"
    )
    edit_manifest(store, lambda m: m.pop("crc32"))  # sealed without checksums: the decoder is the check
    with pytest.raises(DamagedStoreError) as err:
        opened = PatchStore.open(store)
        getattr(opened, array) if array != "tiles" else opened.read_tiles(np.array([0, 1]))
    assert str(err.value).startswith(f"{store}: damaged patch store: a chunk of {array} cannot be decoded (")
    assert str(err.value).endswith("; re-tile the slide") and "\n" not in str(err.value)


def test_extract_from_a_garbled_lossless_store_is_one_line_and_writes_nothing(stores, tmp_path, capsys):
    store = damaged_copy(stores["lossless"], tmp_path / "tiles")
    garble(store / "tiles/c/0/0/0/0")
    rc = main(["extract", str(store), "--encoder", "vit-test-tiny", "--models-dir", str(MODELS),
               "--out", str(tmp_path / "features"), "--device", "cpu", "--workers", "0", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and f"{store}: damaged patch store: tiles/c/0/0/0/0 was changed after writing" in err
    assert "Traceback" not in err and not list((tmp_path / "features").rglob("*.h5"))


def edit_manifest(store: Path, edit) -> None:
    manifest = json.loads((store / MANIFEST).read_text())
    edit(manifest)
    (store / MANIFEST).write_text(json.dumps(manifest))


def forget(store: Path, rel: str) -> None:
    """Delete a file and its lines in the manifest: the manifest no longer vouches for it."""
    (store / rel).unlink()
    edit_manifest(store, lambda m: (m["files"].pop(rel), m["crc32"].pop(rel)))


@pytest.mark.parametrize("codec, damage, message", [
    ("jpeg", lambda s: edit_manifest(s, lambda m: m.update(files={}, sha256={}, crc32={})),
     "manifest.json does not record zarr.json"),
    ("lossless", lambda s: forget(s, "tiles/c/0/0/0/0"), "manifest.json does not record tiles/c/0/0/0/0"),
    ("jpeg", lambda s: forget(s, "coords/c/0/0"), "manifest.json does not record coords/c/0/0"),
    ("jpeg", lambda s: edit_manifest(s, lambda m: m["sha256"].pop("coords/zarr.json")),
     "manifest.json does not record coords/zarr.json"),
    ("jpeg", lambda s: edit_manifest(s, lambda m: m["files"].update({"/proc/self/status": 0})),
     "manifest.json lists '/proc/self/status', which is no file of a patch store"),
    ("jpeg", lambda s: edit_manifest(s, lambda m: (m["files"].update({"../outside/zarr.json": 2}),
                                                   m["sha256"].update({"../outside/zarr.json": "0" * 64}))),
     "manifest.json lists '../outside/zarr.json', which is no file of a patch store"),
    ("jpeg", lambda s: edit_manifest(s, lambda m: m["sha256"].update({"tiles/c/0": "0" * 64})),
     "manifest.json lists 'tiles/c/0', which is no file of a patch store"),
    ("jpeg", lambda s: edit_manifest(s, lambda m: m["crc32"].update({"zarr.json": 0})),
     "manifest.json records a checksum 'zarr.json': 0, not the CRC-32 of a chunk it lists"),
    ("jpeg", lambda s: edit_manifest(s, lambda m: m["crc32"].update({"tiles/c/0": -1})),
     "manifest.json records a checksum 'tiles/c/0': -1, not the CRC-32 of a chunk it lists"),
    ("jpeg", lambda s: edit_manifest(s, lambda m: m["crc32"].update({"/etc/passwd": 1})),
     "manifest.json records a checksum '/etc/passwd': 1, not the CRC-32 of a chunk it lists"),
])
def test_a_manifest_must_list_the_store_and_nothing_else(stores, tmp_path, codec, damage, message):
    """A manifest that leaves a file out cannot vouch for it (zarr would read a chunk that is gone
    as its fill value: black tiles, coords (0, 0)); one that lists files outside the store would
    have readers stat and hash them (a digest of /dev/zero never ends)."""
    store = damaged_copy(stores[codec], tmp_path)
    damage(store)
    with pytest.raises(DamagedStoreError, match=re.escape(f"{store}: damaged patch store: {message}; re-tile")):
        PatchStore.open(store)


def reseal(store: Path, doc: str = "zarr.json", **changes) -> None:
    """Edit a metadata document (the group's attributes, or an array's) and seal the store again,
    as a hand edit followed by a fresh manifest would: the digests hold, the values do not."""
    meta = json.loads((store / doc).read_text())
    target = meta["attributes"]["wsitools"] if doc == "zarr.json" else meta
    for key, value in changes.items():
        if value is None:
            target.pop(key)
        else:
            target[key] = value
    (store / doc).write_text(json.dumps(meta))
    seal_patch_store(store)


@pytest.mark.parametrize("codec, doc, changes, message", [
    ("jpeg", "zarr.json", {"codec": "webp"}, "attribute codec = 'webp', not one of jpeg, lossless"),
    ("jpeg", "zarr.json", {"jpeg_quality": 0}, "attribute jpeg_quality = 0, not an integer from 1 to 100"),
    ("jpeg", "zarr.json", {"jpeg_quality": None}, "attribute jpeg_quality = None, not an integer from 1 to 100"),
    ("jpeg", "zarr.json", {"n_tiles": "many"}, "attribute n_tiles = 'many', not an integer >= 0"),
    ("jpeg", "zarr.json", {"tile_size": None}, "attribute tile_size is missing"),
    ("jpeg", "zarr.json", {"has_pixels": False}, "attribute codec = 'jpeg' in a store without pixels"),
    ("jpeg", "zarr.json", {"slide_id": "../../elsewhere"}, "attribute slide_id: unsafe slide id '../../elsewhere'"),
    ("lossless", "zarr.json", {"codec": "jpeg", "jpeg_quality": 97}, "tiles is uint8 [{n}, 64, 64, 3], not variable_length_bytes [{n}]"),
    ("lossless", "zarr.json", {"tile_size": 32}, "tiles is uint8 [{n}, 64, 64, 3], not uint8 [{n}, 32, 32, 3]"),
    ("jpeg", "coords/zarr.json", {"data_type": "float64", "fill_value": 0.0}, "coords is float64 [{n}, 2], not int64 [{n}, 2]"),
    ("jpeg", "coords/zarr.json", {"data_type": "int32"}, "coords is int32 [{n}, 2], not int64 [{n}, 2]"),
    ("jpeg", "coords/zarr.json", {"shape": "N3"}, "coords is int64 [{n}, 3], not int64 [{n}, 2]"),
])
def test_edited_and_resealed_metadata_is_refused_naming_what_is_wrong(stores, tmp_path, codec, doc, changes, message):
    """Before this check: a KeyError or ValueError deep in a reader, or coords read as float64
    bytes (all (0, 0)) without a word."""
    store = damaged_copy(stores[codec], tmp_path)
    n = json.loads((store / "zarr.json").read_text())["attributes"]["wsitools"]["n_tiles"]
    reseal(store, doc, **{k: [n, 3] if v == "N3" else v for k, v in changes.items()})
    with pytest.raises(DamagedStoreError) as err:
        PatchStore.open(store)
    text = str(err.value)
    assert text.startswith(f"{store}: damaged patch store: {message.format(n=n)}") and "\n" not in text
    assert text.endswith("; re-tile the slide")


def test_a_resealed_store_is_rebuilt_by_tile_and_a_future_format_is_left_alone(stores, synthetic_svs, tmp_path):
    store = damaged_copy(stores["jpeg"], tmp_path)
    reseal(store, codec="webp")
    params = TilingParams(mpp=0.5, tile_size=64, tissue=TISSUE)
    assert tile_slides([synthetic_svs], tmp_path, params, progress=False)[0]["status"] == "ok"
    np.testing.assert_array_equal(PatchStore.open(store).read_tiles(slice(None)),
                                  PatchStore.open(stores["jpeg"]).read_tiles(slice(None)))
    reseal(store, format_version=4)  # a newer wsitools wrote it: not damaged, not ours to replace
    with pytest.raises(StoreError, match=r"patch store format 4 is not supported \(this wsitools writes format 3"):
        PatchStore.open(store)
    record = tile_slides([synthetic_svs], tmp_path, params, progress=False)[0]
    assert record["status"] == "failed" and record["reason"].endswith("; use --overwrite to replace it")
    assert json.loads((store / "zarr.json").read_text())["attributes"]["wsitools"]["format_version"] == 4


# --- slides with nothing to tile ---------------------------------------------------------------


def test_a_slide_smaller_than_one_tile_says_so_now_and_when_kept(tmp_path):
    path = write_slide(tmp_path / "tiny.svs", size=(100, 80), mpp=0.5, regions=(Region(0, 0, 100, 80, "tissue"),),
                       fmt="svs", downsamples=(1,))
    params = TilingParams(mpp=0.5, tile_size=224, tissue=TissueParams(mpp=4.0, min_region_area=0))
    expected = "the slide is smaller than one tile (224 px at 0.5 um/px, 224 level-0 px a side)"
    for _ in range(2):  # tiled, then the finished store kept
        record = tile_slides([path], tmp_path / "tiles", params, progress=False)[0]
        assert (record["status"], record["reason"], record["n_tiles"]) == ("no_tissue", expected, 0)
    assert PatchStore.open(tmp_path / "tiles" / "tiny.zarr").attrs["grid_shape"] == [0, 0]
    assert json.loads((tmp_path / "tiles" / "tiny.qc.json").read_text())["reason"] == expected


def test_a_greyscale_scan_is_told_why_no_tissue_is_found(tmp_path, caplog):
    grey = tmp_path / "grey.tiff"
    tifffile.imwrite(grey, PIXELS[..., 1], tile=(256, 256), photometric="minisblack", **RES)
    record = tile_slides([grey], tmp_path / "tiles", PARAMS, progress=False)[0]
    why = "no tissue found: every pixel of the slide is grey (no colour at all: a greyscale scan, a blank image"
    assert record["status"] == "no_tissue"
    assert record["reason"].startswith(f"no tile has tissue fraction >= 0.5; {why}")
    assert f"{grey.resolve()}: {why}" in caplog.text
    any_tissue = dataclasses.replace(PARAMS, min_tissue=0.0)
    record = tile_slides([grey], tmp_path / "any", any_tissue, progress=False)[0]
    assert record["status"] == "no_tissue" and record["reason"].startswith(f"no tile touches tissue; {why}")


@pytest.mark.parametrize("target, warned", [(0.125, True), (0.24, False), (0.25, False)])
def test_a_target_finer_than_the_scan_is_warned_about(synthetic_svs, tmp_path, caplog, target, warned):
    """The synthetic slide is scanned at 0.25 um/px: 0.125 enlarges its tiles 2x; 0.24 (4 %) is
    the usual spread between scanners and is not warned about."""
    params = TilingParams(mpp=target, tile_size=64, tissue=TISSUE, store_pixels=False)
    assert tile_slides([synthetic_svs], tmp_path, params, progress=False)[0]["status"] == "ok"
    assert ("is finer than the slide's level 0" in caplog.text) == warned
    if warned:
        assert (f"{synthetic_svs}: the target 0.125 um/px is finer than the slide's level 0 (0.25 um/px): "
                "tiles are enlarged 2.00x by interpolation") in caplog.text


def test_corrupt_tiles_read_by_worker_processes_give_the_same_one_line_reason(synthetic_svs, tmp_path):
    """dask puts a worker process's traceback into the message of the error it re-raises; the
    slide's QC record keeps the error alone, as with threads."""
    from tests.hostile.test_stores import corrupt_jpeg_tiles

    bad = tmp_path / "bad.svs"
    shutil.copy(synthetic_svs, bad)
    corrupt_jpeg_tiles(bad, [9, 10, 17, 18])  # inside the tissue
    reasons = []
    for scheduler in ("threads", "processes"):
        params = TilingParams(mpp=0.25, tile_size=64, tissue=TISSUE)  # level 0, where the tiles are corrupt
        record = tile_slides([bad], tmp_path / scheduler, params, workers=2, scheduler=scheduler, progress=False)[0]
        assert record["status"] == "failed"
        reasons.append(record["reason"])
    assert reasons[0] == reasons[1] and "\n" not in reasons[1]
    assert reasons[1].startswith(f"{bad.resolve()}: reading ") and "corrupt JPEG data in TIFF tile " in reasons[1]


# --- TIFFs tiffslide would read wrong, given to OpenSlide -------------------------------------


def test_cmyk_and_premultiplied_alpha_go_to_openslide(tmp_path):
    """tiffslide took C, M, Y, K for R, G, B, A (K = 0 made every pixel white: "no tissue") and
    composited premultiplied alpha as if it were plain; auto now opens both with OpenSlide."""
    cmyk = np.concatenate([255 - PIXELS, np.zeros((512, 512, 1), np.uint8)], axis=-1)
    tifffile.imwrite(tmp_path / "cmyk.tif", cmyk, tile=(256, 256), photometric="separated", **RES)
    alpha = np.full((512, 512, 1), 128, np.uint8)
    premultiplied = np.concatenate([(PIXELS.astype(np.uint16) * 128 // 255).astype(np.uint8), alpha], axis=-1)
    tifffile.imwrite(tmp_path / "assoc.tif", premultiplied, tile=(256, 256), photometric="rgb",
                     extrasamples=["assocalpha"], **RES)
    on_white = premultiplied[..., :3].astype(int) + 255 - 128  # premultiplied colour over white
    for name, what, expected in (("cmyk.tif", "CMYK pixels", PIXELS.astype(int)),
                                 ("assoc.tif", "premultiplied alpha", on_white)):
        with pytest.raises(SlideError, match=f"{name}: cannot be opened by tiffslide: level 0 holds {what}"):
            open_slide(tmp_path / name, backend="tiffslide")
        with open_slide(tmp_path / name) as slide:
            assert slide.backend == "openslide"
            pixels = slide.read_region((0, 0), 0, (512, 512)).astype(int)
        assert np.abs(pixels - expected).max() <= 1


def test_a_pyramid_stored_smallest_first_is_read_at_its_level_0(tmp_path):
    """tiffslide took the first (smallest) page for the slide; OpenSlide found level 0 but took
    the first page's resolution for it: tiles 4x too fine, 'ok'."""
    path = tmp_path / "reversed.tif"
    with tifffile.TiffWriter(path) as tif:
        for k in (4, 2, 1):
            level = np.ascontiguousarray(PIXELS[::k, ::k])
            tif.write(level, tile=(64, 64), photometric="rgb", resolution=(1e4 / (0.5 * k), 1e4 / (0.5 * k)),
                      resolutionunit="CENTIMETER", subfiletype=0 if k == 4 else 1)
    with pytest.raises(SlideError, match=r"page 2 holds a 512 x 512 px image, larger than the 128 x 128 px level 0"):
        open_slide(path, backend="tiffslide")
    with open_slide(path) as slide:
        assert (slide.backend, slide.dimensions, slide.mpp) == ("openslide", (512, 512), 0.5)
    # a small scan whose macro image (in strips, as scanners store it) has more pixels is no such pyramid
    small = tmp_path / "small.tif"
    with tifffile.TiffWriter(small) as tif:
        tif.write(PIXELS, tile=(64, 64), photometric="rgb", **RES)
        tif.write(np.full((400, 900, 3), 180, np.uint8), photometric="rgb", rowsperstrip=16, subfiletype=9)
    with open_slide(small, backend="tiffslide") as slide:
        assert slide.dimensions == (512, 512)


@pytest.mark.parametrize("flags, openslide_level0", [((1, 1, 0), 256), ((0, 0, 0), 128)])
def test_a_full_resolution_page_after_reduced_ones_is_an_error_with_either_backend(tmp_path, flags, openslide_level0):
    """OpenSlide keeps the first page and those flagged as reduced: it dropped the full-resolution
    page stored last and tiled a reduced page, enlarged, with status 'ok'."""
    path = tmp_path / "last.tif"
    with tifffile.TiffWriter(path) as tif:
        for k, flag in zip((4, 2, 1), flags):
            tif.write(np.ascontiguousarray(PIXELS[::k, ::k]), tile=(64, 64), photometric="rgb", subfiletype=flag,
                      resolution=(1e4 / (0.5 * k), 1e4 / (0.5 * k)), resolutionunit="CENTIMETER")
    larger = "page 2 holds a 512 x 512 px image, larger than the {0} x {0} px level 0 found"
    with pytest.raises(SlideError) as caught:
        open_slide(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: no backend can open it (cannot be opened by tiffslide: {larger.format(128)}")
    assert f"; cannot be opened by openslide: {larger.format(openslide_level0)} (a pyramid stored" in message
    record = tile_slides([path], tmp_path / "tiles", PARAMS, progress=False)[0]
    assert record["status"] == "failed" and larger.format(openslide_level0) in record["reason"]


def test_aperio_label_and_macro_pages_larger_than_a_small_scan_are_no_level_0(tmp_path):
    """Associated images of level 0's shape are named by their description (Aperio's), or are
    transparency masks; only an unnamed page of that shape is taken for the slide's image."""
    description = "Aperio Image Library v12.0.0\r\n512x512 (256x256) JPEG/RGB Q=90|AppMag = 20|MPP = 0.5"
    big = np.full((1024, 1024, 3), 180, np.uint8)
    for name, extra in (("macro", "Aperio Image Library v12.0.0\r\nmacro 1024x1024"), ("label", "x\nlabel 1024x1024")):
        path = tmp_path / f"{name}.svs"
        with tifffile.TiffWriter(path) as tif:
            tif.write(PIXELS, tile=(256, 256), photometric="rgb", compression="jpeg", description=description,
                      metadata=None)
            tif.write(np.ascontiguousarray(PIXELS[::4, ::4]), photometric="rgb", description="thumb", metadata=None)
            tif.write(big, photometric="rgb", rowsperstrip=16, description=extra, metadata=None, subfiletype=9)
        for backend in ("tiffslide", "openslide"):
            with open_slide(path, backend=backend) as slide:
                assert (slide.dimensions, slide.mpp) == ((512, 512), 0.5)
    mask = tmp_path / "mask.tif"
    with tifffile.TiffWriter(mask) as tif:
        tif.write(PIXELS, tile=(64, 64), photometric="rgb", **RES)
        tif.write(np.ones((1024, 1024), bool), photometric="minisblack", subfiletype=4)
    with open_slide(mask, backend="tiffslide") as slide:
        assert slide.dimensions == (512, 512)
    unnamed = tmp_path / "unnamed.svs"
    with tifffile.TiffWriter(unnamed) as tif:
        tif.write(PIXELS, tile=(256, 256), photometric="rgb", compression="jpeg", description=description, metadata=None)
        tif.write(big, photometric="rgb", rowsperstrip=16, description="an image", metadata=None)
    with pytest.raises(SlideError, match=r"cannot be opened by tiffslide: page 1 holds a 1024 x 1024 px image"):
        open_slide(unnamed, backend="tiffslide")


def test_a_reduced_page_of_another_shape_is_never_read_as_a_level(tmp_path):
    """A label strip flagged as reduced is a level to OpenSlide (downsample 7.7 here): a coarse
    target read the label for tiles and tissue."""
    path = tmp_path / "label.tif"
    label = np.zeros((40, 200, 3), np.uint8)
    label[..., 1] = 200
    with tifffile.TiffWriter(path) as tif:
        tif.write(PIXELS, tile=(64, 64), photometric="rgb", **RES)
        tif.write(np.ascontiguousarray(PIXELS[::2, ::2]), tile=(64, 64), photometric="rgb", subfiletype=1, **RES)
        tif.write(label, tile=(64, 64), photometric="rgb", subfiletype=1, **RES)
    with open_slide(path, backend="openslide") as slide:
        assert slide.level_count == 3 and [slide.level_in_pyramid(k) for k in range(3)] == [True, True, False]
        assert slide.best_level_for_mpp(8.0) == 1
        thumb, _ = slide.thumbnail(mpp=8.0)
    assert thumb[..., 1].mean() < 200 and np.abs(thumb.astype(int) - PIXELS[::16, ::16]).mean() < 20


@pytest.mark.parametrize("bigtiff", [False, True])
def test_a_tiff_of_implausibly_many_pages_is_refused_at_once(tmp_path, synthetic_svs, capsys, bigtiff):
    """tifffile's sorting of pages into series takes time growing with their square (100 000
    pages: most of an hour), so the pages are counted from the chain of IFDs before tiffslide
    sees the file; a real pyramid is counted as tifffile counts it."""
    from wsitools.slide import MAX_TIFF_PAGES, tiff_page_count

    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for _ in range(MAX_TIFF_PAGES + 1):
            tif.write(np.zeros((1, 1, 3), np.uint8), photometric="rgb", subfiletype=1, **RES)
    assert tiff_page_count(path, limit=MAX_TIFF_PAGES) == MAX_TIFF_PAGES + 1
    refusal = (f"cannot be opened by tiffslide: it has more than {MAX_TIFF_PAGES} pages (image file directories), "
               "more than any slide; tifffile's time to sort pages into series grows with their square")
    with pytest.raises(SlideError) as err:
        open_slide(path, backend="tiffslide")
    assert str(err.value) == f"{path}: {refusal}"
    assert main(["info", str(path)]) == 2
    assert f"{path}: no backend can open it ({refusal}; cannot be opened by openslide:" in capsys.readouterr().err
    with tifffile.TiffFile(synthetic_svs) as tif:
        assert tiff_page_count(synthetic_svs, limit=MAX_TIFF_PAGES) == len(tif.pages)
    assert tiff_page_count(tmp_path / "pages.tif", limit=10) == 11


# --- a cohort with one file that is no slide in the middle ---------------------------------------


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "is a directory, expected a slide file (for a folder's slides give the files, e.g. "),
    (lambda p: (p.mkdir(), (p / "zarr.json").write_text("{}")), "is a patch store (wsitools tile's output), expected a slide file"),
    (lambda p: p.write_bytes(b""), "is empty (0 bytes; a copy that failed?)"),
    (lambda p: os.mkfifo(p), "is not a regular file (a pipe, socket or device), expected a slide file"),  # never waited on
    (lambda p: p.symlink_to(p), "cannot be read: Too many levels of symbolic links"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64)), "no backend can open it (cannot be opened by tiffslide: not a TIFF file"),
])
def test_tile_keep_going_over_a_file_that_is_no_slide(synthetic_svs, tmp_path, capsys, make, message):
    first, second = tmp_path / "a.svs", tmp_path / "c.svs"
    for copy in (first, second):
        shutil.copy(synthetic_svs, copy)
    bad = tmp_path / "b.svs"
    make(bad)
    out = tmp_path / "tiles"
    rc = main(["tile", str(first), str(bad), str(second), "--out", str(out), "--mpp", "1.0", "--tile-size", "64",
               "--tissue-mpp", "4", "--min-region-area", "5000", "--keep-going", "--quiet"])
    printed = capsys.readouterr()
    assert rc == 0 and "1 of 3 slides failed" in printed.err
    lines = printed.out.splitlines()
    assert [line.split("\t")[:2] for line in lines] == [["a", "ok"], ["b", "failed"], ["c", "ok"]]
    assert lines[1].startswith(f"b\tfailed\t{bad}: {message}") and "Traceback" not in printed.out + printed.err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("b")) == ["b.qc.json"]
    assert json.loads((out / "b.qc.json").read_text())["status"] == "failed"
    assert len(PatchStore.open(out / "a.zarr")) == len(PatchStore.open(out / "c.zarr")) > 0
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"wsitools info: error: {bad}: {message}") and len(err.splitlines()) == 1


def test_a_store_of_fill_values_is_written_whole_and_opens(tmp_path):
    """Zero tissue fractions and a lone tile at (0, 0) are zarr's fill values: their chunks are
    written all the same, so the manifest lists them and the store opens."""
    from wsitools.store import write_patch_store

    attrs = {"slide_id": "s", "tile_size": 16, "mpp_target": 0.5, "tile_size_level0": 32}
    for name, coords in (("two", [[0, 0], [32, 0]]), ("one", [[0, 0]])):
        path = write_patch_store(tmp_path / f"{name}.zarr", coords=np.array(coords), tiles=None,
                                 tissue_fraction=np.zeros(len(coords)), attrs=attrs)
        assert (path / "coords" / "c" / "0" / "0").is_file() and (path / "tissue_fraction" / "c" / "0").is_file()
        store = PatchStore.open(path)
        np.testing.assert_array_equal(store.coords, coords)
        np.testing.assert_array_equal(store.tissue_fraction, np.zeros(len(coords), np.float32))


# --- metadata and pixels written unusually ----------------------------------------------------


def aperio_svs(path: Path, levels: list[np.ndarray], *, mpp: str = "0.5", **kwargs) -> Path:
    """An Aperio-like SVS: level 0 with its description, the thumbnail page, the other levels."""
    h, w = levels[0].shape[:2]
    with tifffile.TiffWriter(path) as tif:
        for index, level in enumerate(levels):
            description = f"Aperio Image Library v12.0.0\r\n{w}x{h} (128x128) JPEG/RGB Q=90|AppMag = 20|MPP = {mpp}"
            tif.write(level, tile=(128, 128), photometric="rgb", metadata=None,
                      description=description if index == 0 else None, **{"compression": "zlib", **kwargs})
            if index == 0:
                tif.write(np.ascontiguousarray(PIXELS[::8, ::8]), photometric="rgb", metadata=None, description="thumb")
    return path


def test_an_aperio_mpp_with_a_decimal_comma_is_read(tmp_path):
    """'MPP = 0,5' from a decimal-comma locale: OpenSlide reads 0.5, tiffslide's '0,5' was dropped
    and the slide failed with 'no resolution'."""
    path = aperio_svs(tmp_path / "comma.svs", [PIXELS], mpp="0,5")
    for backend in ("auto", "tiffslide", "openslide"):
        with open_slide(path, backend=backend) as slide:
            assert slide.mpp == 0.5


@pytest.mark.parametrize("backend, value", [("tiffslide", "1,234.5"), ("openslide", "0.5 um"), ("tiffslide", "0")])
def test_an_unreadable_mpp_is_named_not_called_missing(tmp_path, backend, value):
    path = aperio_svs(tmp_path / "odd.svs", [PIXELS], mpp=value)
    key = "tiffslide.mpp-x" if backend == "tiffslide" else "aperio.MPP"
    with pytest.raises(SlideError) as caught:
        open_slide(path, backend=backend)
    assert str(caught.value) == (
        f"{path}: the slide's metadata resolution {key} = {value!r} is not a positive number of um/px; "
        "give one with --mpp-override (or the samples sheet's mpp column)"
    )


@pytest.mark.parametrize("tiled", [True, False])
def test_a_fourth_sample_of_unspecified_meaning_is_dropped_not_taken_for_alpha(tmp_path, tiled):
    """ExtraSamples 0 is no alpha: taken for one (all zeros here) every pixel was white, and the
    slide 'no tissue', blamed on a greyscale scan."""
    four = np.concatenate([PIXELS, np.zeros((512, 512, 1), np.uint8)], axis=-1)
    path = tmp_path / "extra.tif"
    layout = {"tile": (128, 128)} if tiled else {"rowsperstrip": 64}
    tifffile.imwrite(path, four, photometric="rgb", extrasamples=[0], compression="zlib", **layout, **RES)
    with open_slide(path) as slide:
        assert slide.backend == "tiffslide"
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (512, 512)), PIXELS)
    record = tile_slides([path], tmp_path / "tiles", PARAMS, progress=False)[0]
    assert record["status"] == "ok" and record["reason"] == ""


def test_a_level_shrunk_unequally_along_x_and_y_is_read_at_its_true_place(tmp_path):
    """Level 1 is 512 x 380 under 1024 x 768 (x / 2, y / 2.021, a pyramid level within 5 %): read
    with the backends' one mean downsample 2.0105, its pixels drifted 2-3 level-1 px by the far
    corner, and tiles at its resolution matched level 0 best 4 level-0 px off."""
    from wsitools.slide import resize_rgb

    level0 = resize_rgb(np.random.default_rng(0).integers(60, 200, (192, 256, 3), dtype=np.uint8), (1024, 768))
    level1 = resize_rgb(level0, (512, 380))
    path = aperio_svs(tmp_path / "xy.svs", [level0, level1])
    y1 = round(700 * 380 / 768)
    for backend in ("tiffslide", "openslide"):
        with open_slide(path, backend=backend) as slide:
            assert slide.level_in_pyramid(1) and slide.level_downsamples_xy[1] == (2.0, 768 / 380)
            region = slide.read_region((900, 700), 1, (48, 32)).astype(int)
        error = np.abs(region - level1[y1 : y1 + 32, 450:498]).mean()
        assert error == 0 if backend == "tiffslide" else error < 8  # OpenSlide resamples the sub-pixel rest
    params = TilingParams(mpp=1.0, tile_size=64, codec="lossless", min_tissue=0.1, tissue=TISSUE)
    tile_slide(path, tmp_path / "tiles", params, progress=False)
    store = PatchStore.open(tmp_path / "tiles" / "xy.zarr")
    assert store.attrs["level"] == 1 and len(store) == 48
    tiles = store.read_tiles(slice(None)).astype(int)

    def error_at(dx: int, dy: int) -> float:
        errors = [np.abs(resize_rgb(level0[y + dy : y + dy + 128, x + dx : x + dx + 128], (64, 64)) - tile).mean()
                  for (x, y), tile in zip(store.coords, tiles) if 2 <= x <= 1024 - 130 and 2 <= y <= 768 - 130]
        return float(np.mean(errors))

    at_place = error_at(0, 0)
    assert at_place < 4 and all(at_place < error_at(dx, dy) for dx, dy in ((-2, 0), (2, 0), (0, -2), (0, 2)))
    # A coordinates-only store reads each tile from the slide as the tiler does, each axis its own
    # ratio (with the mean downsample: 5.0 off on average). One tile and a block of them resample
    # this noise at other sub-pixel phases, which moves a few pixels by a few levels.
    tile_slide(path, tmp_path / "coords", dataclasses.replace(params, store_pixels=False), progress=False)
    coords_only = PatchStore.open(tmp_path / "coords" / "xy.zarr")
    assert np.abs(coords_only.read_tiles(slice(None)).astype(int) - tiles).mean() < 0.1
