"""`wsitools export` as a whole: one export is one encoder's (and, for CLAM, one tile geometry's),
decided by the stores most of them share; it replaces an earlier export as a whole and refuses a
folder that holds anything else; stores without tiles are skipped; a slide is exported whole or
not at all. Stores are written directly (no encoder), so every test runs in well under a second.
"""

from __future__ import annotations

import errno
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cli_calls import one_line, run
from wsitools.errors import StoreError
from wsitools.export import export_store, open_store
from wsitools.feature_store import FORMAT_VERSION, KIND, write_feature_store

MPP0 = 0.2527


def store(folder: Path, slide_id: str, *, n: int = 6, dim: int = 8, encoder: str = "enc-a", ehash: str = "a" * 16,
          size: int = 224, mpp: float = 0.5, overlap: int = 0, seed: int = 0) -> Path:
    """A feature store of ``n`` tiles in one row, ``dim``-d features drawn from ``seed``."""
    size0 = size * mpp / MPP0
    coords = np.stack([np.rint(np.arange(n) * (size - overlap) * mpp / MPP0), np.zeros(n)], 1).astype(np.int64)
    features = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    attrs = dict(format_version=FORMAT_VERSION, kind=KIND, encoder=encoder, encoder_hash=ehash, weight_sha256="",
                 store_path=f"/p/{slide_id}.zarr", store_hash="h", slide_id=slide_id,
                 slide_path=f"/slides/{slide_id} (HE).svs", mpp_target=mpp, tile_size=size, tile_size_level0=size0,
                 overlap=overlap, package_version="t", created="t")
    return write_feature_store(folder / f"{slide_id}.h5", features, coords, attrs)


def export(to: str, features: Path, out: Path, capsys) -> tuple[int, str]:
    return run(["export", "--to", to, "--features", features, "--out", out, "--quiet"], capsys)


def listing(folder: Path) -> list[str]:
    """Every file under ``folder``, relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def features_of(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["features"][:]


# --- one encoder, replaced as a whole ------------------------------------------------------------

def test_exporting_again_replaces_the_earlier_export_as_a_whole(tmp_path, capsys):
    a, b, a2 = tmp_path / "a" / "enc-a", tmp_path / "b" / "enc-b", tmp_path / "a2" / "enc-a"
    for i, sid in enumerate(["S1", "S2", "S3"]):
        store(a, sid, seed=i)
    for i, sid in enumerate(["S1", "S2"]):
        store(b, sid, encoder="enc-b", ehash="b" * 16, seed=10 + i)
        store(a2, sid, ehash="c" * 16, seed=20 + i)  # the same encoder name with other weights
    clam, job = tmp_path / "clam", tmp_path / "job"
    assert export("clam", a, clam, capsys) == (0, "")
    assert export("clam", b, clam, capsys) == (0, "")
    assert listing(clam) == ["h5_files/S1.h5", "h5_files/S2.h5", "patches/S1.h5", "patches/S2.h5",
                             "pt_files/S1.pt", "pt_files/S2.pt"]  # enc-a's S3 is gone with its export
    np.testing.assert_array_equal(torch.load(clam / "pt_files" / "S2.pt", weights_only=True).numpy(),
                                  features_of(b / "S2.h5"))
    with h5py.File(clam / "h5_files" / "S1.h5", "r") as f:
        attrs = dict(f.attrs)
    assert {k: attrs[k] for k in ("slide_id", "slide_path", "encoder", "encoder_hash", "tile_size", "overlap")} == {
        "slide_id": "S1", "slide_path": "/slides/S1 (HE).svs", "encoder": "enc-b", "encoder_hash": "b" * 16,
        "tile_size": 224, "overlap": 0}
    assert attrs["mpp_target"] == 0.5 and attrs["tile_size_level0"] == pytest.approx(224 * 0.5 / MPP0)
    with h5py.File(clam / "patches" / "S2.h5", "r") as f:
        assert (f.attrs["slide_id"], f.attrs["encoder_hash"]) == ("S2", "b" * 16)

    assert export("trident", a, job, capsys) == (0, "")
    assert export("trident", a2, job, capsys) == (0, "")
    folder = "20x_224px_0px_overlap"
    assert listing(job) == [f"{folder}/features_enc-a/S1.h5", f"{folder}/features_enc-a/S2.h5",
                            f"{folder}/patches/S1_patches.h5", f"{folder}/patches/S2_patches.h5"]
    with h5py.File(job / folder / "features_enc-a" / "S2.h5", "r") as f:
        assert (f.attrs["slide_id"], f.attrs["encoder"], f.attrs["encoder_hash"]) == ("S2", "enc-a", "c" * 16)
        np.testing.assert_array_equal(f["features"][:], features_of(a2 / "S2.h5"))
    assert not list(tmp_path.rglob(".tmp-*"))


def test_an_out_holding_anything_but_an_export_is_refused_and_kept(tmp_path, capsys):
    features = tmp_path / "features" / "enc-a"
    store(features, "S1")
    notes = tmp_path / "mine" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("keep me")
    rc, err = export("clam", features, notes.parent, capsys)
    assert one_line(rc, err) == (
        f"wsitools export: error: {notes.parent}: holds notes.txt, which is no file of a wsitools clam export; an "
        "export replaces its --out as a whole, so give a new or empty folder (or remove this one)")
    assert notes.read_text() == "keep me"
    # CLAM's own features: the same layout, but its h5 files record no wsitools slide
    theirs = tmp_path / "clam_own"
    (theirs / "h5_files").mkdir(parents=True)
    with h5py.File(theirs / "h5_files" / "S1.h5", "w") as f:
        f["features"] = np.zeros((2, 8), np.float32)
    rc, err = export("clam", features, theirs, capsys)
    one_line(rc, err, f"{theirs}: holds h5_files/S1.h5, which is no file of a wsitools clam export")
    assert listing(theirs) == ["h5_files/S1.h5"]
    # another layout's export, and a folder holding the features, are refused too
    assert export("trident", features, tmp_path / "job", capsys) == (0, "")
    rc, err = export("clam", features, tmp_path / "job", capsys)
    one_line(rc, err, f"{tmp_path / 'job'}: holds 20x_224px_0px_overlap/", "no file of a wsitools clam export")
    rc, err = export("clam", features, tmp_path / "features", capsys)
    one_line(rc, err, f"output {tmp_path / 'features'} holds --features {features}")
    # an empty folder is fine
    (tmp_path / "empty").mkdir()
    assert export("clam", features, tmp_path / "empty", capsys) == (0, "")
    assert listing(tmp_path / "empty") == ["h5_files/S1.h5", "patches/S1.h5", "pt_files/S1.pt"]


# --- the export's kind: the majority's ----------------------------------------------------------

def test_a_stray_store_fails_alone_whatever_its_name(tmp_path, capsys):
    features = tmp_path / "enc-a"
    for i, sid in enumerate(["S1", "S2", "S3"]):
        store(features, sid, seed=i)
    store(features, "A0", encoder="enc-b", ehash="b" * 16)  # sorts first
    rc, err = export("clam", features, tmp_path / "clam", capsys)
    assert rc == 1
    assert err.splitlines() == [
        f"wsitools export: error: {features / 'A0.h5'}: 8-d features of encoder enc-b (hash bbbbbbbbbbbb) from 224 "
        "px tiles at 0.5 um/px, not those of this export (3 of its 4 stores: 8-d features of encoder enc-a (hash "
        "aaaaaaaaaaaa) from 224 px tiles at 0.5 um/px); export each encoder's folder on its own",
        f"wsitools export: 1 of 4 stores failed: {features / 'A0.h5'}"]
    assert listing(tmp_path / "clam" / "pt_files") == ["S1.pt", "S2.pt", "S3.pt"]


def test_a_clam_export_holds_one_tile_geometry_and_trident_keeps_them_apart(tmp_path, capsys):
    features = tmp_path / "enc-a"
    store(features, "G1")
    store(features, "G2", mpp=1.0)
    store(features, "G3", size=256, overlap=32)
    store(features, "G4")
    rc, err = export("clam", features, tmp_path / "clam", capsys)
    majority = "(2 of its 4 stores: 8-d features of encoder enc-a (hash aaaaaaaaaaaa) from 224 px tiles at 0.5 um/px)"
    remedy = "export each tile size and resolution to its own --out (CLAM reads a folder as one cohort)"
    assert rc == 1 and err.splitlines()[:2] == [
        f"wsitools export: error: {features / 'G2.h5'}: 8-d features of encoder enc-a (hash aaaaaaaaaaaa) from 224 px "
        f"tiles at 1 um/px, not those of this export {majority}; {remedy}",
        f"wsitools export: error: {features / 'G3.h5'}: 8-d features of encoder enc-a (hash aaaaaaaaaaaa) from 256 px "
        f"tiles at 0.5 um/px, not those of this export {majority}; {remedy}"]
    assert listing(tmp_path / "clam" / "pt_files") == ["G1.pt", "G4.pt"]
    assert export("trident", features, tmp_path / "job", capsys) == (0, "")
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == [
        "10x_224px_0px_overlap", "20x_224px_0px_overlap", "20x_256px_32px_overlap"]
    assert listing(tmp_path / "job" / "20x_224px_0px_overlap" / "features_enc-a") == ["G1.h5", "G4.h5"]


# --- empty stores, and a slide exported as a unit ------------------------------------------------

def test_stores_without_tiles_are_skipped_with_a_warning(tmp_path, capsys, caplog):
    features = tmp_path / "enc-a"
    store(features, "E0", n=0)
    store(features, "S1")
    assert export("clam", features, tmp_path / "clam", capsys) == (0, "")
    assert listing(tmp_path / "clam" / "pt_files") == ["S1.pt"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"slide E0: feature store {features / 'E0.h5'} holds no tiles (no tissue found); skipped, as a MIL head "
        "cannot use an empty bag"]
    with pytest.raises(StoreError, match="E0.h5: holds no tiles .no tissue was found on slide E0.; nothing to export"):
        export_store(open_store(features / "E0.h5"), tmp_path / "lib", to="trident")
    (features / "S1.h5").unlink()
    rc, err = export("clam", features, tmp_path / "only_empty", capsys)
    one_line(rc, err, f"feature directory {features}: none of its 1 stores holds tiles; nothing exported")
    assert not (tmp_path / "only_empty").exists()


def test_a_slide_whose_files_cannot_all_be_written_leaves_none(tmp_path, capsys, monkeypatch):
    import wsitools.export as export_module

    features = tmp_path / "enc-a"
    for i, sid in enumerate(["S1", "S2", "S3"]):
        store(features, sid, seed=i)
    write_h5 = export_module._write_h5

    def full_disk_on(names: set[str]):
        def write(path: Path, *args, **kwargs) -> None:
            if path.parent.name == "patches" and path.name in names:  # the slide's last file
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            write_h5(path, *args, **kwargs)
        return write

    monkeypatch.setattr(export_module, "_write_h5", full_disk_on({"S2.h5"}))
    rc, err = export("clam", features, tmp_path / "clam", capsys)
    assert rc == 1 and err.splitlines()[0] == (
        f"wsitools export: error: {features / 'S2.h5'}: OSError: [Errno 28] No space left on device: "
        f"'{tmp_path / 'clam' / 'patches' / 'S2.h5'}'")
    assert listing(tmp_path / "clam") == ["h5_files/S1.h5", "h5_files/S3.h5", "patches/S1.h5", "patches/S3.h5",
                                          "pt_files/S1.pt", "pt_files/S3.pt"]
    # no slide exported: the earlier export stays as it was
    monkeypatch.setattr(export_module, "_write_h5", full_disk_on({"S1.h5", "S2.h5", "S3.h5"}))
    rc, err = export("clam", features, tmp_path / "clam", capsys)
    assert rc == 1 and err.splitlines()[-1].endswith(f"; nothing exported, {tmp_path / 'clam'} left as it was")
    assert listing(tmp_path / "clam") == ["h5_files/S1.h5", "h5_files/S3.h5", "patches/S1.h5", "patches/S3.h5",
                                          "pt_files/S1.pt", "pt_files/S3.pt"]
    assert not list(tmp_path.rglob(".tmp-*"))


def test_an_export_opens_each_store_once_and_reads_its_arrays_once(tmp_path, capsys, monkeypatch):
    """The first pass (each store's kind, for the export's majority) opens and checks every store;
    the export then reads the arrays of the stores it opened, without opening and checking them
    again: two opens of each file, not three."""
    features = tmp_path / "enc-a"
    paths = [store(features, sid, seed=i) for i, sid in enumerate(["S1", "S2", "S3"])]
    opens: list[str] = []
    real = h5py.File

    def counting(name, *args, **kwargs):
        opens.append(str(name))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", counting)
    assert export("trident", features, tmp_path / "job", capsys) == (0, "")
    assert {str(p): opens.count(str(p)) for p in paths} == {str(p): 2 for p in paths}
    monkeypatch.undo()
    folder = tmp_path / "job" / "20x_224px_0px_overlap"
    assert listing(tmp_path / "job") == [f"20x_224px_0px_overlap/{kind}/{sid}" for kind in ("features_enc-a", "patches")
                                         for sid in (("S1.h5", "S2.h5", "S3.h5") if kind != "patches" else
                                                     ("S1_patches.h5", "S2_patches.h5", "S3_patches.h5"))]
    np.testing.assert_array_equal(features_of(folder / "features_enc-a" / "S2.h5"), features_of(paths[1]))
