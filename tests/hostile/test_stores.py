"""Hostile cases against the stores: concurrent and killed runs, damaged stores, changed slides,
corrupt JPEG data, slides that need an mpp override, stale temporaries.

Every input is made here (slides written by wsitools.synthetic, then damaged on purpose); every
test asserts on outcomes: exit codes, one-line messages naming the file, what is on disk.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from wsitools.cli import main
from wsitools.errors import DamagedStoreError, SlideError, StoreError
from wsitools.io import LostRace, atomic_path, temp_sibling
from wsitools.synthetic import Region, write_slide
from wsitools.store import CHUNK_TILES, MANIFEST, PatchStore, TileCodec, read_store_attrs, write_patch_store
from wsitools.tiling import TilingParams, tile_slide, tile_slides
from wsitools.tissue import TissueParams

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
TISSUE = TissueParams(mpp=4.0, min_region_area=5_000)
PARAMS = TilingParams(mpp=0.5, tile_size=64, tissue=TISSUE)
TILE_ARGS = ["--mpp", "0.5", "--tile-size", "64", "--tissue-mpp", "4", "--min-region-area", "5000", "--quiet"]


def host() -> str:
    return temp_sibling(Path("x")).name.split("-")[2]


def dead_pid() -> int:
    """The id of a process that has just exited (so is provably gone)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def temps(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".tmp-*"))


@pytest.fixture(scope="module")
def tiled(synthetic_svs, tmp_path_factory) -> Path:
    """A finished patch store (with pixels) of the synthetic slide, to copy and damage."""
    out = tmp_path_factory.mktemp("tiled")
    assert tile_slide(synthetic_svs, out, PARAMS, progress=False)["status"] == "ok"
    return out / "synth_svs.zarr"


def copy_store(store: Path, dest: Path) -> Path:
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(store, dest / store.name))


def link_to(store: Path, rel: str, target: Path | None = None) -> None:
    """The store file ``rel`` replaced by a symbolic link to ``target``, or (None) to a copy of it
    outside the store, as a symlinked data cache (git-annex, DVC) holds it."""
    import shutil

    if target is None:
        target = store.parent / f"outside-{rel.replace('/', '-')}"
        shutil.copyfile(store / rel, target)
    (store / rel).unlink()
    (store / rel).symlink_to(target)


# --- 1. temporaries unique per run; one atomic rename; the loser leaves the winner alone ----------


def test_two_writers_of_one_directory_never_merge(tmp_path):
    final = tmp_path / "S.zarr"
    a, b = atomic_path(final), atomic_path(final)
    tmp_a, tmp_b = a.__enter__(), b.__enter__()  # same host, same pid: still two temporaries
    assert tmp_a != tmp_b and tmp_a.name.startswith(".tmp-S.zarr-")
    for tmp, chunks in ((tmp_a, ("0", "1")), (tmp_b, ("2", "3"))):
        tmp.mkdir()
        for c in chunks:
            (tmp / c).write_text(tmp.name)
    a.__exit__(None, None, None)
    with pytest.raises(LostRace, match="another run finished it first"):
        b.__exit__(None, None, None)
    assert sorted(p.name for p in final.iterdir()) == ["0", "1"]  # the winner's, whole, not merged
    assert not temps(tmp_path)


def test_write_failures_name_the_output_in_one_line(tmp_path, capsys, monkeypatch):
    import errno

    from wsitools.cli import main as cli_main

    final = tmp_path / "run" / "model.safetensors"
    with pytest.raises(OSError) as err:
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")  # as Python's own writes report a full disk
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(final)) and not temps(tmp_path)
    # two runs of one output: the loser's error is the user's one line, not a traceback
    import wsitools.cli.mil as cli_mil

    def lost(args):
        raise LostRace(f"{tmp_path / 'run'}: another run finished it first")

    monkeypatch.setattr(cli_mil, "run_train", lost)
    (tmp_path / "l.csv").write_text("slide_id,label\n")
    assert cli_main(["train", "--features", str(tmp_path), "--labels", str(tmp_path / "l.csv"),
                     "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"wsitools train: error: {tmp_path / 'run'}: another run finished it first\n"


def test_two_concurrent_tile_runs_of_one_slide_give_one_whole_store(synthetic_svs, tmp_path, monkeypatch):
    import wsitools.tiling as tiling

    reference = tile_slide(synthetic_svs, tmp_path / "ref", PARAMS, progress=False)
    both_done = threading.Barrier(2, timeout=60)
    real_seal = tiling.seal_patch_store

    def seal_together(root):  # both temporaries complete before either is renamed
        both_done.wait()
        real_seal(root)

    monkeypatch.setattr(tiling, "seal_patch_store", seal_together)
    records: list[dict] = []
    runs = [threading.Thread(target=lambda: records.append(
        tile_slide(synthetic_svs, tmp_path / "out", PARAMS, workers=1, progress=False))) for _ in range(2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join(120)
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert {r["n_tiles"] for r in records} == {reference["n_tiles"]}
    store = PatchStore.open(tmp_path / "out" / "synth_svs.zarr")  # verified by its manifest
    ref = PatchStore.open(tmp_path / "ref" / "synth_svs.zarr")
    np.testing.assert_array_equal(store.coords, ref.coords)
    np.testing.assert_array_equal(store.read_tiles(slice(None)), ref.read_tiles(slice(None)))
    assert not temps(tmp_path / "out")


# --- 2. damaged stores: every reader refuses them in one line; tile rebuilds them ---------------


@pytest.mark.parametrize("damage, message", [
    (lambda s: (s / "tiles" / "c" / "0").unlink(), r"tiles/c/0 is missing"),
    (lambda s: (s / "coords" / "c" / "0" / "0").unlink(), r"coords/c/0/0 is missing"),
    (lambda s: os.truncate(s / "tiles" / "c" / "0", 100), r"tiles/c/0 holds 100 bytes"),
    (lambda s: (s / "zarr.json").write_text("{not json"), r"zarr\.json holds 9 bytes"),
    (lambda s: (s / "zarr.json").write_bytes(b"{" * (s / "zarr.json").stat().st_size),
     r"zarr\.json was changed after writing"),
    (lambda s: (s / MANIFEST).unlink(), r"manifest\.json is missing"),
    (lambda s: link_to(s, "tiles/c/0", Path("/dev/zero")), r"tiles/c/0 is a character device, not a regular file \(never read\)"),
    (lambda s: link_to(s, "tissue_fraction/zarr.json", Path("/dev/zero")), r"tissue_fraction/zarr\.json is a character device"),
    (lambda s: link_to(s, MANIFEST, Path("/dev/zero")), r"unreadable manifest\.json \(.*manifest\.json: is a character device, not a"),
])
def test_damaged_store_is_a_one_line_error_and_tile_rebuilds_it(tiled, synthetic_svs, tmp_path, damage, message):
    store = copy_store(tiled, tmp_path)
    damage(store)
    with pytest.raises(DamagedStoreError, match=message) as err:
        PatchStore.open(store)
    assert str(store) in str(err.value) and "\n" not in str(err.value)
    record = tile_slides([synthetic_svs], tmp_path, PARAMS, progress=False)[0]  # no --overwrite needed
    assert record["status"] == "ok"
    rebuilt, original = PatchStore.open(store), PatchStore.open(tiled)
    np.testing.assert_array_equal(rebuilt.read_tiles(slice(None)), original.read_tiles(slice(None)))


def test_a_store_whose_files_link_to_regular_files_reads_as_the_store(tiled, tmp_path):
    """A store kept in a symlinked data cache (every file a link to its copy elsewhere) is the same
    store: its manifest holds, and it reads the same coords and tiles."""
    store = copy_store(tiled, tmp_path / "cache")
    for rel in ("tiles/c/0", "tissue_fraction/zarr.json", "zarr.json", MANIFEST):
        link_to(store, rel)
    linked, original = PatchStore.open(store), PatchStore.open(tiled)
    np.testing.assert_array_equal(linked.coords, original.coords)
    np.testing.assert_array_equal(linked.read_tiles(slice(None)), original.read_tiles(slice(None)))


def test_every_reader_refuses_a_damaged_store(tiled, tmp_path, capsys):
    from wsitools.pathotune.data import store_tiles
    from wsitools.puzzle.data import open_stores

    store = copy_store(tiled, tmp_path / "tiles")
    (store / "tiles" / "c" / "0").unlink()
    with pytest.raises(StoreError, match="damaged patch store"):
        open_stores([tmp_path / "tiles"])
    x, y = PatchStore.open(tiled).coords[0]
    table = tmp_path / "tiles.csv"
    table.write_text(f"slide_id,x,y,label\nsynth_svs,{x},{y},a\n")
    with pytest.raises(StoreError, match="damaged patch store"):
        store_tiles(table, [tmp_path / "tiles"])
    rc = main(["extract", str(store), "--encoder", "vit-test-tiny", "--models-dir", str(MODELS),
               "--out", str(tmp_path / "features"), "--device", "cpu", "--workers", "0", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and f"{store}: damaged patch store: tiles/c/0 is missing" in err
    assert not list((tmp_path / "features").rglob("*.h5"))


def test_a_store_file_that_is_a_fifo_is_refused_never_opened(tiled, tmp_path, capsys, fifo):
    """A FIFO never starts (opening one waits for a writer), so one listed in a manifest edited
    to match (size 0, no checksum) is refused in one line naming the store and the file, before
    anything is read; so is a FIFO for the manifest itself."""
    store = copy_store(tiled, tmp_path / "tiles")
    chunk = store / "tiles" / "c" / "0"
    chunk.unlink()
    fifo(chunk)
    manifest = json.loads((store / MANIFEST).read_text())
    manifest["files"]["tiles/c/0"] = 0
    del manifest["crc32"]["tiles/c/0"]
    (store / MANIFEST).write_text(json.dumps(manifest))
    rc = main(["extract", str(store), "--encoder", "vit-test-tiny", "--models-dir", str(MODELS),
               "--out", str(tmp_path / "features"), "--device", "cpu", "--workers", "0", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert (f"{store}: damaged patch store: tiles/c/0 is a FIFO (named pipe), not a regular file (never read); "
            "re-tile the slide") in err
    assert not list((tmp_path / "features").rglob("*.h5"))
    (store / MANIFEST).unlink()
    fifo(store / MANIFEST)
    with pytest.raises(DamagedStoreError) as exc:
        PatchStore.open(store)
    assert str(exc.value) == (f"{store}: damaged patch store: unreadable manifest.json ({store / MANIFEST}: is a FIFO "
                              "(named pipe), not a regular file); re-tile the slide")


def test_format_1_store_is_refused_and_rebuilt(tiled, synthetic_svs, tmp_path):
    store = copy_store(tiled, tmp_path)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["wsitools"]["format_version"] = 1
    (store / "zarr.json").write_text(json.dumps(meta))
    (store / MANIFEST).unlink()
    with pytest.raises(DamagedStoreError, match="format 1 has no integrity manifest"):
        read_store_attrs(store)
    assert tile_slides([synthetic_svs], tmp_path, PARAMS, progress=False)[0]["status"] == "ok"
    assert read_store_attrs(store)["format_version"] == 3


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _unchecked(store: Path) -> Path:
    """``store`` as sealed before chunk checksums were recorded (its manifest without them)."""
    manifest = json.loads((store / MANIFEST).read_text())
    del manifest["crc32"]
    (store / MANIFEST).write_text(json.dumps(manifest))
    return store


def test_a_jpeg_chunk_damaged_in_place_is_a_one_line_error_naming_store_and_file(tiled, synthetic_svs, tmp_path, capsys):
    store = copy_store(tiled, tmp_path / "tiles")
    chunk = store / "tiles" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    start = data.index(b"\xff\xda", data.index(b"\xff\xd8", 8))  # the first tile's scan data...
    _flip(chunk, start + 200)  # ...one bit of it, at the same size: the manifest's sizes hold
    opened = PatchStore.open(store)
    with pytest.raises(DamagedStoreError) as err:
        opened.read_tiles(np.array([1]))  # a tile the damage did not touch: its chunk is refused whole
    assert str(err.value) == (
        f"{store}: damaged patch store: tiles/c/0 was changed after writing (its checksum differs); re-tile the slide"
    )
    rc = main(["extract", str(store), "--encoder", "vit-test-tiny", "--models-dir", str(MODELS),
               "--out", str(tmp_path / "features"), "--device", "cpu", "--workers", "0", "--quiet"])
    err_text = capsys.readouterr().err
    assert rc == 1 and f"{store}: damaged patch store: tiles/c/0 was changed" in err_text and "Traceback" not in err_text
    assert not list((tmp_path / "features").rglob("*.h5"))
    # tiling again, as the error says, rebuilds it (the kept check reads every chunk)
    assert tile_slide(synthetic_svs, tmp_path / "tiles", PARAMS, progress=False)["status"] == "ok"
    np.testing.assert_array_equal(PatchStore.open(store).read_tiles(slice(None)),
                                  PatchStore.open(tiled).read_tiles(slice(None)))
    # A store sealed without checksums: the decoder is the check, tile by tile.
    chunk.write_bytes(bytes(data[: start + 40]) + bytes(360) + bytes(data[start + 400 :]))
    opened = PatchStore.open(_unchecked(store))
    assert opened.read_tiles(np.array([1])).shape == (1, 64, 64, 3)  # the other tiles still read
    with pytest.raises(DamagedStoreError) as err:
        opened.read_tiles(slice(0, 4))
    assert str(err.value).startswith(f"{store}: damaged patch store: tile 0 in tiles/c/0 is not a readable JPEG")
    assert "\n" not in str(err.value)
    chunk.write_bytes(b"\x07" * len(data))  # no chunk of JPEGs at all
    with pytest.raises(DamagedStoreError, match=r"tiles/c/0 (is not a chunk of JPEGs|holds \d+ items)"):
        opened.read_tiles(np.array([1]))


def test_a_tile_table_damaged_in_place_is_refused_and_tile_rebuilds_it(tiled, synthetic_svs, tmp_path, caplog):
    # Coordinates decode whatever their bytes: only the checksum tells wrong ones from right ones.
    store = copy_store(tiled, tmp_path)
    _flip(store / "coords" / "c" / "0" / "0", 13)
    with pytest.raises(DamagedStoreError, match=r"coords/c/0/0 was changed after writing \(its checksum differs\)"):
        PatchStore.open(store).coords
    with caplog.at_level("WARNING"):
        assert tile_slides([synthetic_svs], tmp_path, PARAMS, progress=False)[0]["status"] == "ok"
    assert "coords/c/0/0 was changed after writing" in caplog.text and "rebuilding it" in caplog.text
    np.testing.assert_array_equal(PatchStore.open(store).coords, PatchStore.open(tiled).coords)
    _flip(store / "tissue_fraction" / "c" / "0", 20)
    with pytest.raises(DamagedStoreError, match=r"tissue_fraction/c/0 was changed after writing"):
        PatchStore.open(store).tissue_fraction


def test_a_lossless_chunk_damaged_in_place_is_refused(tmp_path):
    tiles = np.random.default_rng(0).integers(0, 256, (CHUNK_TILES + 2, 16, 16, 3), dtype=np.uint8)
    store = write_patch_store(
        tmp_path / "s.zarr", coords=np.zeros((len(tiles), 2)), tiles=tiles, tissue_fraction=np.ones(len(tiles)),
        attrs={"slide_id": "s", "tile_size": 16, "mpp_target": 0.5, "tile_size_level0": 32}, codec=TileCodec("lossless"),
    )
    chunk = store / "tiles" / "c" / "1" / "0" / "0" / "0"
    _flip(chunk, chunk.stat().st_size - 5)
    opened = PatchStore.open(store)
    np.testing.assert_array_equal(opened.read_tiles(slice(0, 3)), tiles[:3])  # chunk 0 is whole
    with pytest.raises(DamagedStoreError, match=r"tiles/c/1/0/0/0 was changed after writing"):
        opened.read_tiles(np.array([CHUNK_TILES + 1]))


def test_overwrite_replaces_what_is_not_a_store_even_with_corrupt_attributes(synthetic_svs, tmp_path, capsys):
    store = tmp_path / "synth_svs.zarr"
    store.mkdir()
    (store / "zarr.json").write_text("\x00garbage")
    args = ["tile", str(synthetic_svs), "--out", str(tmp_path), *TILE_ARGS]
    assert main(args) == 1
    qc = json.loads((tmp_path / "synth_svs.qc.json").read_text())
    assert qc["status"] == "failed" and "use --overwrite to replace it" in qc["reason"] and str(store) in qc["reason"]
    assert (store / "zarr.json").read_text() == "\x00garbage"  # left alone without --overwrite
    assert main(args + ["--overwrite"]) == 0
    assert len(PatchStore.open(store)) > 0


# --- 3. a coords-only store checks its slide before reading pixels --------------------------------


def test_coords_only_store_refuses_a_changed_or_missing_slide(synthetic_svs, tmp_path):
    slide = tmp_path / "s.svs"
    slide.write_bytes(synthetic_svs.read_bytes())
    tile_slide(slide, tmp_path / "t", TilingParams(mpp=0.5, tile_size=64, tissue=TISSUE, store_pixels=False),
               progress=False)
    store = PatchStore.open(tmp_path / "t" / "s.zarr")
    assert store.read_tiles(np.array([0])).shape == (1, 64, 64, 3)
    data = bytearray(slide.read_bytes())
    st = slide.stat()
    data[-10:] = bytes(10)  # same size, same mtime, other bytes at the end
    slide.write_bytes(bytes(data))
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(StoreError, match=r"its slide .*s\.svs is not the file it was tiled from \(fingerprint differ"):
        PatchStore.open(store.path).read_tiles(np.array([0]))
    slide.unlink()
    with pytest.raises(StoreError) as err:
        PatchStore.open(store.path).read_tiles(np.array([0]))
    assert str(store.path) in str(err.value) and f"its slide {slide} is gone" in str(err.value)


def test_extract_from_a_coords_only_store_names_the_changed_slide(synthetic_svs, tmp_path, capsys):
    slide = tmp_path / "s.svs"
    slide.write_bytes(synthetic_svs.read_bytes())
    tile_slide(slide, tmp_path / "t", TilingParams(mpp=0.5, tile_size=64, tissue=TISSUE, store_pixels=False),
               progress=False)
    with open(slide, "ab") as f:
        f.write(b"appended")
    rc = main(["extract", str(tmp_path / "t" / "s.zarr"), "--encoder", "vit-test-tiny", "--models-dir",
               str(MODELS), "--out", str(tmp_path / "features"), "--device", "cpu", "--workers", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert f"its slide {slide} is not the file it was tiled from (size, fingerprint differ)" in err


# --- 5. corrupt JPEG data in a slide fails that slide, never gives garbage tiles ------------------


def corrupt_jpeg_tiles(path: Path, tiles: list[int], *, seed: int = 0) -> None:
    """Overwrite 64 bytes in the middle of the entropy-coded data of level-0 JPEG tiles."""
    import tifffile

    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
    rng = np.random.default_rng(seed)
    for i in tiles:
        tile = bytes(data[offsets[i] : offsets[i] + counts[i]])
        sos = tile.find(b"\xff\xda")
        start = sos + 2 + int.from_bytes(tile[sos + 2 : sos + 4], "big")  # after the scan header
        at = offsets[i] + start + (counts[i] - start) // 3
        data[at : at + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def test_corrupt_jpeg_tiles_fail_the_slide_and_the_cohort_goes_on(synthetic_svs, tmp_path):
    bad = tmp_path / "bad.svs"
    bad.write_bytes(synthetic_svs.read_bytes())
    corrupt_jpeg_tiles(bad, [9, 10, 17, 18])  # inside the tissue ellipse, 8 tiles of 256 px a row
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "bad.tissue.png").write_bytes(b"left by a killed run")
    params = TilingParams(mpp=0.25, tile_size=64, tissue=TISSUE)  # level 0 is read
    records = tile_slides([bad, synthetic_svs], tmp_path / "t", params, backend="tiffslide", progress=False)
    assert [r["status"] for r in records] == ["failed", "ok"]
    reason = json.loads((tmp_path / "t" / "bad.qc.json").read_text())["reason"]
    assert str(bad) in reason and "corrupt JPEG data in TIFF tile" in reason and "of level 0" in reason
    assert "\n" not in reason
    assert not (tmp_path / "t" / "bad.zarr").exists() and not temps(tmp_path / "t")
    assert not (tmp_path / "t" / "bad.tissue.png").exists() and not (tmp_path / "t" / "bad.geojson").exists()


def test_a_failing_chunk_never_leaves_a_temporary_written_by_the_others(synthetic_svs, tmp_path, monkeypatch):
    import wsitools.tiling as tiling

    real, calls, lock = tiling.read_tiles, [], threading.Lock()

    def first_fails_others_are_slow(*args, **kwargs):
        with lock:
            calls.append(1)
            first = len(calls) == 1
        if first:
            raise SlideError("corrupt JPEG data in TIFF tile 3 of level 0")
        time.sleep(0.3)  # still writing its chunk when the failure is raised
        return real(*args, **kwargs)

    monkeypatch.setattr(tiling, "read_tiles", first_fails_others_are_slow)
    record = tile_slides([synthetic_svs], tmp_path, TilingParams(mpp=0.25, tile_size=64, tissue=TISSUE),
                         workers=2, progress=False)[0]
    assert record["status"] == "failed" and "TIFF tile 3" in record["reason"]
    time.sleep(0.5)
    assert not temps(tmp_path) and not (tmp_path / "synth_svs.zarr").exists()


def test_intact_jpeg_with_shared_tables_passes_the_check(fixtures_dir):
    from wsitools.slide import open_slide

    with open_slide(fixtures_dir / "small.svs", backend="tiffslide") as s:  # Aperio: JPEGTables, RGB
        region = s.read_region((0, 0), 0, s.dimensions)
    assert region.shape[:2] == s.dimensions[::-1] and region.std() > 0


# --- 6. a slide that needs an mpp override gets its heatmap ---------------------------------------


def test_slide_needing_an_mpp_override_gets_its_heatmap(tmp_path, capsys):
    from wsitools.attention import write_attention

    slide = write_slide(tmp_path / "nompp.tiff", size=(1024, 768), mpp=0.25, regions=(Region(100, 100, 800, 560),),
                        downsamples=(1, 4), write_mpp=False)
    out = tmp_path / "tiles"
    assert main(["tile", str(slide), "--out", str(out), "--mpp-override", "0.25", *TILE_ARGS]) == 0
    store = PatchStore.open(out / "nompp.zarr")
    assert store.attrs["mpp_override"] == 0.25
    n = len(store)
    provenance = {"slide_path": str(slide), "store_path": str(store.path), "tile_size_level0": store.tile_size_level0}
    att = tmp_path / "attention" / "nompp.h5"
    write_attention(att, slide_id="nompp", attention=np.full(n, 1 / n), coords=store.coords, classes=["a", "b"],
                    probs=np.array([0.4, 0.6]), feature_path=tmp_path / "nompp.h5",
                    provenance=provenance, meta={"head": "abmil"})
    capsys.readouterr()
    # the workflow's call: stores by folder, slide found through the store
    assert main(["heatmap", "--attention", str(att.parent), "--store", str(out), "--out", str(tmp_path / "h"),
                 "--mpp", "4", "--quiet"]) == 0, capsys.readouterr().err
    assert (tmp_path / "h" / "nompp.heatmap.png").stat().st_size > 0
    assert (tmp_path / "h" / "nompp.top_tiles.png").stat().st_size > 0
    with h5py.File(att, "a") as f:  # without its store, the slide's own metadata has no mpp: named
        del f.attrs["store_path"]
    assert main(["heatmap", "--attention", str(att), "--out", str(tmp_path / "h2"), "--quiet"]) == 1
    err = capsys.readouterr().err  # nor does the attention record the geometry the mpp follows from
    assert "nompp.tiff: the slide's metadata gives no usable resolution (mpp), and attention file" in err
    assert "pass the slide's patch store with --store" in err


def test_heatmap_refuses_a_damaged_store_in_one_line(tmp_path, capsys, tiled):
    from wsitools.attention import write_attention

    store = copy_store(tiled, tmp_path)
    (store / "coords" / "c" / "0" / "0").unlink()
    n = int(read_store_attrs(tiled)["n_tiles"])
    provenance = {"store_path": str(store), "tile_size_level0": 128.0}
    att = tmp_path / "attention" / "synth_svs.h5"
    write_attention(att, slide_id="synth_svs", attention=np.full(n, 1 / n), coords=PatchStore.open(tiled).coords,
                    classes=["a", "b"], probs=np.array([0.5, 0.5]), feature_path=tmp_path / "x.h5",
                    provenance=provenance, meta={"head": "abmil"})
    assert main(["heatmap", "--attention", str(att), "--out", str(tmp_path / "h"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"synth_svs\tfailed\t{store}: damaged patch store: coords/c/0/0 is missing" in err


# --- 7. a tile worker that dies is its slide's QC record; the cohort goes on ----------------------


def tile_worker(pid: int) -> int | None:
    """The tiling worker among the children of process ``pid`` (not multiprocessing's tracker)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        for kid in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{kid}/cmdline").read_bytes()
            if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                return int(kid)
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the worker process")
def test_killed_tile_worker_is_recorded_and_the_next_slide_is_tiled(synthetic_svs, tmp_path):
    big = write_slide(tmp_path / "big.svs", size=(4096, 3072), mpp=0.25, regions=(Region(0, 0, 4096, 3072),),
                      fmt="svs", downsamples=(1, 4, 16))
    out = tmp_path / "tiles"
    cmd = [sys.executable, "-m", "wsitools", "tile", str(big), str(synthetic_svs), "--out", str(out),
           "--mpp", "0.25", "--tile-size", "32", "--tissue-mpp", "4", "--min-region-area", "5000", "--workers", "1", "--quiet", "--keep-going"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 120
    killed = None
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        if list(out.glob(".tmp-big.zarr-*")):  # the worker is writing the store: kill it mid-run
            killed = tile_worker(proc.pid)
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    stdout, stderr = proc.communicate(timeout=300)
    assert killed is not None, stderr
    assert proc.returncode == 0, stderr
    big_qc = json.loads((out / "big.qc.json").read_text())
    assert big_qc["status"] == "failed"
    assert big_qc["reason"] == f"{big}: tiling was killed by signal 9 (SIGKILL: out of memory, a time limit, or killed by hand)"
    assert json.loads((out / "synth_svs.qc.json").read_text())["status"] == "ok"
    assert len(PatchStore.open(out / "synth_svs.zarr")) > 0
    assert not (out / "big.zarr").exists() and not temps(out)  # the dead worker's temporary is gone
    assert not (out / "big.tissue.png").exists() and not (out / "big.geojson").exists()
    assert "big\tfailed\t" in stdout and "synth_svs\tok\t" in stdout


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the worker process")
def test_sigterm_to_the_whole_job_records_the_slide_and_stops(synthetic_svs, tmp_path):
    big = write_slide(tmp_path / "big.svs", size=(4096, 3072), mpp=0.25, regions=(Region(0, 0, 4096, 3072),),
                      fmt="svs", downsamples=(1, 4, 16))
    out = tmp_path / "tiles"
    cmd = [sys.executable, "-m", "wsitools", "tile", str(big), str(synthetic_svs), "--out", str(out),
           "--mpp", "0.25", "--tile-size", "32", "--tissue-mpp", "4", "--workers", "1", "--quiet", "--keep-going"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 120
    while not list(out.glob(".tmp-big.zarr-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler cancelling the job: every process of it
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr  # not done, though --keep-going: no scheduler takes it for done
    reason = json.loads((out / "big.qc.json").read_text())["reason"]
    assert reason == f"{big}: tiling was killed by signal 15 (SIGTERM)"
    assert (f"wsitools tile: stopped by SIGTERM before it finished: 0 of 2 slides tiled (see {out}/*.qc.json); "
            "run it again to finish") in stderr
    assert "big\tfailed\t" in stdout
    assert not (out / "synth_svs.qc.json").exists() and not temps(out)


# --- 16. temporaries of dead runs are removed; `wsitools clean` for shared file systems -----------


def test_tiling_removes_only_provably_dead_temporaries(synthetic_svs, tmp_path):
    dead = tmp_path / f".tmp-synth_svs.zarr-{host()}-{dead_pid()}-0badc0de"
    live = tmp_path / f".tmp-synth_svs.zarr-{host()}-{os.getppid()}-0000beef"
    remote = tmp_path / ".tmp-synth_svs.zarr-othernode-123-00c0ffee"
    for t in (dead, live, remote):
        (t / "tiles").mkdir(parents=True)
    tile_slide(synthetic_svs, tmp_path, PARAMS, progress=False)
    assert not dead.exists() and live.exists() and remote.exists()


def test_every_atomic_write_removes_the_dead_temporaries_of_its_folder(tmp_path):
    """A killed train, predict, heatmap or export leaves its run folder's or files' temporaries;
    the next write into that folder removes them (not a live run's)."""
    from wsitools.io import atomic_path, write_json_atomic

    dead_run = tmp_path / f".tmp-run-{host()}-{dead_pid()}-0badc0de"
    dead_file = tmp_path / "run" / f".tmp-metrics.json-{host()}-{dead_pid()}-0badc0de"
    other = tmp_path / f".tmp-other-{host()}-{dead_pid()}-0badc0de"
    live = tmp_path / f".tmp-run-{host()}-{os.getppid()}-0000beef"
    for t in (dead_run, other, live):
        (t / "fold_0").mkdir(parents=True)
    with atomic_path(tmp_path / "run") as tmp:
        tmp.mkdir()
    assert not dead_run.exists() and not other.exists() and live.exists()
    dead_file.write_text("{")
    write_json_atomic(tmp_path / "run" / "metrics.json", {"auroc": 1.0})
    assert not dead_file.exists() and json.loads((tmp_path / "run" / "metrics.json").read_text()) == {"auroc": 1.0}


def test_clean_lists_and_removes_stale_temporaries(tmp_path, capsys):
    dead = tmp_path / "a" / f".tmp-S1.zarr-{host()}-{dead_pid()}-0badc0de"
    (dead / "tiles").mkdir(parents=True)
    (dead / "tiles" / "0").write_bytes(b"x" * 2048)
    remote = tmp_path / "b" / ".tmp-S2.h5-othernode-77-00c0ffee"
    remote.parent.mkdir()
    remote.write_bytes(b"y" * 10)
    hours_ago = time.time() - 3 * 3600
    os.utime(remote, (hours_ago, hours_ago))
    finished = tmp_path / "a" / "S3.zarr"
    finished.mkdir()
    assert main(["clean", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove\t{dead}\t" in out and f"kept\t{remote}\t" in out and "from othernode" in out
    assert dead.exists()
    assert main(["clean", str(tmp_path)]) == 0
    assert not dead.exists() and remote.exists() and finished.exists()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a run still writing
    try:
        running = tmp_path / "a" / f".tmp-S4.h5-{host()}-{live.pid}-0ddba11a"
        running.write_bytes(b"z")
        os.utime(running, (hours_ago, hours_ago))
        assert main(["clean", str(tmp_path), "--older-than", "2"]) == 0
        out = capsys.readouterr().out
        assert not remote.exists() and f"removed\t{remote}\t10 B\tuntouched for 3.0 h" in out
        assert running.exists() and f"kept\t{running}\t1 B\tits process {live.pid} on this host is running" in out
    finally:
        live.kill()
        live.wait()
    assert main(["clean", str(tmp_path / "nope")]) == 2
    assert "nope: no such folder" in capsys.readouterr().err


def test_clean_takes_an_old_style_temporary_name_only_where_it_stands_for_a_wsitools_output(tmp_path, capsys):
    """``.tmp-NAME-PID`` (the names of older wsitools) is a name other tools and people use too:
    clean takes it only for a store or HDF5 file, or beside the run folder it stands for."""
    days_ago = time.time() - 3 * 24 * 3600
    theirs = [tmp_path / "project" / ".tmp-thesis-2023", tmp_path / "project" / ".tmp-notes-12"]
    ours = [tmp_path / "tiles" / ".tmp-S1.zarr-4242", tmp_path / "features" / ".tmp-S1.h5-4242",
            tmp_path / "heads" / ".tmp-abmil-4242"]
    (tmp_path / "project" / "notes").mkdir(parents=True)  # a folder of that name, but no run
    (tmp_path / "heads" / "abmil").mkdir(parents=True)
    (tmp_path / "heads" / "abmil" / "run.json").write_text("{}")
    for path in theirs + ours:
        path.mkdir(parents=True)
        (path / "f").write_bytes(b"x" * 10)
        for p in (path / "f", path):
            os.utime(p, (days_ago, days_ago))
    assert main(["clean", str(tmp_path), "--older-than", "24", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert sorted(line.split("\t")[1] for line in out.splitlines()[:-1]) == sorted(map(str, ours))
    assert f"would remove\t{ours[0]}\t" in out and "untouched for 72.0 h" in out
    assert main(["clean", str(tmp_path)]) == 0  # without --older-than, kept and listed
    assert f"kept\t{ours[0]}\t" in capsys.readouterr().out
    assert main(["clean", str(tmp_path), "--older-than", "24"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("3 stale temporaries or obsolete partial runs, freed ")
    assert all(p.is_dir() for p in theirs) and not any(p.exists() for p in ours)


def test_temporary_names_carry_host_pid_and_a_random_part(tmp_path):
    a, b = temp_sibling(tmp_path / "S.h5"), temp_sibling(tmp_path / "S.h5")
    assert a != b
    _, name, h, pid, rand = a.name.split("-")
    assert (name, h, pid, len(rand)) == ("S.h5", host(), str(os.getpid()), 8)
    assert h == "".join(c if c.isalnum() or c == "." else "_" for c in socket.gethostname())


@pytest.mark.slow
def test_workflow_draws_the_heatmap_of_a_slide_that_needs_an_mpp_override(tmp_path):
    import yaml

    from wsitools.samples import snakemake_command
    from wsitools.synthetic import make_cohort

    work = tmp_path / "w"
    slides = make_cohort(work, n_slides=8, size=(2048, 1536), seed=1)
    nompp = slides[3]  # rewritten without any resolution in its metadata: the sheet gives it
    write_slide(nompp.path, size=(2048, 1536), mpp=0.5, regions=nompp.regions, fmt="svs", write_mpp=False)
    (work / "config").mkdir()
    rows = [f"{s.slide_id}\t{s.path}\t{s.slide_id}\t{s.label}\t{'0.5' if s is nompp else ''}" for s in slides]
    (work / "config" / "samples.tsv").write_text("slide_id\tpath\tpatient_id\tlabel\tmpp\n" + "\n".join(rows) + "\n")
    (work / "config" / "task.yaml").write_text(yaml.safe_dump({
        "name": "planted", "description": "is there a region of another texture",
        "classes": {"negative": "one texture", "positive": "a region of another texture"}}))
    (work / "config" / "config.yaml").write_text(yaml.safe_dump({
        "samples": "config/samples.tsv", "device": "cpu",
        "features": {"encoders": ["vit-test-tiny"], "batch_size": 32, "threads": 1},
        "tasks": {"planted": {"task_file": "config/task.yaml"}},
        "heads": {"meanpool": {"type": "meanpool", "folds": 2, "threads": 1,
                               "extra_args": ["--epochs", "3", "--bootstrap", "20"]}},
    }))
    result = subprocess.run(snakemake_command(work, "--cores", "2"), capture_output=True, text=True,
                            timeout=1200, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    heatmaps = work / "results/heatmaps/planted/vit-test-tiny/meanpool"
    assert (heatmaps / f"{nompp.slide_id}.heatmap.png").stat().st_size > 0
    assert sorted(p.name for p in heatmaps.glob("*.heatmap.png")) == sorted(f"{s.slide_id}.heatmap.png" for s in slides)


def test_checkpoint_and_export_writes_on_a_full_disk_name_the_output(tmp_path):
    """torch's and safetensors' own file writers raise their own types on a full disk; every
    weight file is written by Python, so the error is an OSError naming the output, and nothing
    is left behind. A file-size limit stands in for the full disk (it fails write() the same way)."""
    script = f"""
import json, resource, signal, torch
from pathlib import Path
from wsitools.io import atomic_path, write_safetensors, write_torch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
out = {{}}
for name, write in [("optimizer.pt", lambda p: write_torch(p, {{"state": torch.zeros(10_000)}})),
                    ("model.safetensors", lambda p: write_safetensors(p, {{"w": torch.zeros(10_000)}}))]:
    final = Path({str(tmp_path)!r}) / name
    try:
        with atomic_path(final) as tmp:
            write(tmp)
        out[name] = "written"
    except OSError as exc:
        out[name] = [type(exc).__name__, exc.filename]
print(json.dumps(out))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    out = json.loads(result.stdout)
    assert out == {name: [err, str(tmp_path / name)] for name, err in
                   [("optimizer.pt", "OSError"), ("model.safetensors", "OSError")]}
    assert sorted(p.name for p in tmp_path.iterdir()) == []
