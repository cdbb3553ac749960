"""Feature extraction: patch store -> encoder -> h5 feature store, reuse, recompute, bad input, CLI."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from test_encoders import official_backbone, official_promptstate, run_cli, write_card
from wsitools.encoders import load_encoder
from wsitools.errors import DataError, ModelError, StoreError
from wsitools.feature_store import (
    FeatureStore, feature_store_path, read_coords, read_features, row_layout, write_feature_store,
)
from wsitools.features import extract_features
from wsitools.store import PatchStore, TileCodec, write_patch_store
from wsitools.tiling import TilingParams, tile_slide
from wsitools.tissue import TissueParams

MODELS = Path(__file__).resolve().parents[1] / "models"
PARAMS = TilingParams(mpp=0.5, tile_size=112, tissue=TissueParams(mpp=4.0, min_region_area=5_000))


@pytest.fixture(scope="module")
def tiles_dir(synthetic_svs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiles")
    tile_slide(synthetic_svs, out, PARAMS, progress=False)
    return out


@pytest.fixture(scope="module")
def store(tiles_dir) -> PatchStore:
    return PatchStore.open(tiles_dir / "synth_svs.zarr")


@pytest.fixture(scope="module")
def tiny():
    return load_encoder("vit-test-tiny", device="cpu", models_dir=MODELS)


def small_store(path: Path, *, n: int = 10, slide_id: str = "S1", params_hash: str = "p1", seed: int = 0) -> Path:
    from skimage import data

    img = data.immunohistochemistry()
    rng = np.random.default_rng(seed)
    xy = rng.integers(0, 400, size=(n, 2))
    tiles = np.stack([img[y : y + 64, x : x + 64] for x, y in xy])
    attrs = dict(slide_id=slide_id, slide_path=f"/slides/{slide_id}.svs", params_hash=params_hash,
                 tile_size=64, tile_size_level0=128.0, mpp_target=0.5)
    return write_patch_store(path, coords=xy * 2, tiles=tiles, tissue_fraction=np.ones(n), attrs=attrs, overwrite=True)


def test_round_trip_tiny_vit(store, tiny, tmp_path):
    assert len(store) > 8
    result = extract_features(store.path, tiny, tmp_path, batch_size=8, workers=0)
    assert result.status == "computed" and result.path == tmp_path / "vit-test-tiny" / "synth_svs.h5"
    fs = FeatureStore.open(result.path)
    features, coords = fs.load()
    assert features.shape == (len(store), 64) and features.dtype == np.float32
    np.testing.assert_array_equal(coords, store.coords)
    expected = tiny.encode(torch.from_numpy(store.read_tiles(slice(None)))).numpy()
    np.testing.assert_allclose(features, expected, atol=1e-5, rtol=0)
    assert features.std(axis=0).mean() > 1e-3  # different tiles, different features
    a = fs.attrs
    assert (a["format_version"], a["kind"], a["encoder"], a["encoder_hash"]) == (1, "feature_store", "vit-test-tiny", tiny.encoder_hash)
    assert (a["store_hash"], a["store_path"], a["slide_id"]) == (store.params_hash, str(store.path), "synth_svs")
    assert a["mpp_target"] == pytest.approx(0.5) and a["tile_size"] == 112
    assert a["tile_size_level0"] == pytest.approx(224.0) and a["slide_path"] == str(store.slide_path)
    # second run: reused, file untouched
    mtime = result.path.stat().st_mtime_ns
    again = extract_features(store.path, tiny, tmp_path)
    assert again.status == "reused" and result.path.stat().st_mtime_ns == mtime
    assert not list(result.path.parent.glob(".tmp-*"))


def test_round_trip_efficientnet_lite0_with_workers(store, tmp_path):
    enc = load_encoder("efficientnet-lite0-imagenet", device="cpu", models_dir=MODELS)
    n = 12
    sub = write_patch_store(
        tmp_path / "tiles" / "sub.zarr",
        coords=store.coords[:n], tiles=store.read_tiles(slice(0, n)),
        tissue_fraction=store.tissue_fraction[:n], attrs={**store.attrs, "slide_id": "sub"},
        codec=TileCodec("lossless"),  # the very pixels read from the store
    )
    result = extract_features(sub, enc, tmp_path / "features", batch_size=5, workers=1, dtype="float16")
    features, coords = FeatureStore.open(result.path).load()
    assert features.shape == (n, 1280) and features.dtype == np.float16
    np.testing.assert_array_equal(coords, store.coords[:n])
    expected = enc.encode(torch.from_numpy(store.read_tiles(slice(0, n)))).numpy()
    np.testing.assert_array_equal(features, expected.astype(np.float16))  # float16 is the float32 result, rounded
    assert (features >= 0).all() and features.astype(np.float32).mean() > 0.05  # post-ReLU6 pooled activations
    assert extract_features(sub, enc, tmp_path / "features", dtype="float16").status == "reused"
    # float32 asked for: the float16 store is not taken for it
    again = extract_features(sub, enc, tmp_path / "features")
    assert again.status == "computed" and FeatureStore.open(again.path).dtype == "float32"
    np.testing.assert_allclose(FeatureStore.open(again.path).load()[0], expected, atol=1e-5, rtol=0)


def test_coords_only_store_reads_the_slide(synthetic_svs, store, tiny, tmp_path):
    params = TilingParams(mpp=0.5, tile_size=112, tissue=PARAMS.tissue, store_pixels=False)
    tile_slide(synthetic_svs, tmp_path / "tiles", params, progress=False)
    bare = PatchStore.open(tmp_path / "tiles" / "synth_svs.zarr")
    assert not bare.has_pixels
    np.testing.assert_array_equal(bare.coords, store.coords)
    result = extract_features(bare, tiny, tmp_path / "features", batch_size=16, workers=1)
    features, _ = FeatureStore.open(result.path).load()
    expected = tiny.encode(torch.from_numpy(bare.read_tiles(slice(None)))).numpy()
    np.testing.assert_allclose(features, expected, atol=1e-5, rtol=0)
    from_pixels = tiny.encode(torch.from_numpy(store.read_tiles(slice(None)))).numpy()
    np.testing.assert_allclose(features, from_pixels, atol=0.05)  # same tiles up to resampling


def test_weight_and_store_changes_force_recompute(tmp_path):
    torch.save(official_backbone(seed=0), tmp_path / "backbone.pth")
    torch.save(official_promptstate(seed=1), tmp_path / "promptstate.pth")
    card = write_card(tmp_path)
    path = small_store(tmp_path / "tiles" / "S1.zarr")
    first = extract_features(path, load_encoder(card, device="cpu"), tmp_path / "features")
    f1, _ = FeatureStore.open(first.path).load()
    torch.save(official_promptstate(seed=2), tmp_path / "promptstate.pth")  # new prompts
    enc2 = load_encoder(card, device="cpu")
    second = extract_features(path, enc2, tmp_path / "features")
    f2, _ = FeatureStore.open(second.path).load()
    assert second.status == "computed" and np.abs(f1 - f2).max() > 1e-3
    assert FeatureStore.open(second.path).encoder_hash == enc2.encoder_hash
    assert extract_features(path, enc2, tmp_path / "features").status == "reused"
    small_store(path, params_hash="p2", seed=1)  # the store was re-tiled: other params, other tiles
    third = extract_features(path, enc2, tmp_path / "features")
    fs = FeatureStore.open(third.path)
    assert third.status == "computed" and fs.store_hash == "p2"
    np.testing.assert_array_equal(fs.coords(), PatchStore.open(path).coords)


def test_the_workflow_check_finds_features_of_an_earlier_version_of_a_card(tmp_path):
    """The workflow extracts a slide once; after a card's recipe or weights change its old
    features must not go on feeding the heads unnoticed."""
    from wsitools.errors import DataError
    from wsitools.samples import check_features_current

    torch.save(official_backbone(seed=0), tmp_path / "backbone.pth")
    torch.save(official_promptstate(seed=1), tmp_path / "promptstate.pth")
    card = write_card(tmp_path)
    extract_features(small_store(tmp_path / "tiles" / "S1.zarr"), load_encoder(card, device="cpu"), tmp_path / "features")

    def check():
        check_features_current(tmp_path / "features", ["tiny-official"], models_dir=str(tmp_path))

    check()
    for change in ("weights", "recipe"):
        if change == "weights":
            torch.save(official_promptstate(seed=2), tmp_path / "promptstate.pth")
        else:
            torch.save(official_promptstate(seed=1), tmp_path / "promptstate.pth")
            card.write_text(card.read_text().replace("normalize: null", "normalize: {mean: [0.5, 0.5, 0.5], std: [0.2, 0.2, 0.2]}"))
        with pytest.raises(DataError, match=rf"^{tmp_path / 'features' / 'tiny-official'}: its feature stores were made by "
                                            "another version of encoder card 'tiny-official'"):
            check()
    # once extracted again with the card as it is, the check passes
    extract_features(tmp_path / "tiles" / "S1.zarr", load_encoder(card, device="cpu"), tmp_path / "features")
    check()


def test_the_workflow_check_finds_features_of_another_projects_slide(tiny, tmp_path):
    from wsitools.errors import DataError
    from wsitools.samples import check_features_own

    ours = small_store(tmp_path / "a" / "tiles" / "S1.zarr")
    theirs = small_store(tmp_path / "b" / "tiles" / "S1.zarr", seed=3)  # another project's slide S1
    shared = tmp_path / "shared_features"
    extract_features(ours, tiny, shared)
    check_features_own(shared, [tiny.name], {"S1": str(ours), "S2": str(tmp_path / "a" / "tiles" / "S2.zarr")})
    with pytest.raises(DataError, match=rf"^{shared / tiny.name / 'S1.h5'}: holds features of another project's patch "
                                        rf"store {ours} under slide id S1 \(this project's is {theirs}\)"):
        check_features_own(shared, [tiny.name], {"S1": str(theirs)})
    (tmp_path / "link").symlink_to(tmp_path / "a")  # the project's results behind a link (results -> scratch)
    check_features_own(shared, [tiny.name], {"S1": str(tmp_path / "link" / "tiles" / "S1.zarr")})


def test_unfinished_and_foreign_stores_are_errors(tiny, tmp_path):
    good = small_store(tmp_path / "S1.zarr")
    unfinished = tmp_path / ".tmp-S2.zarr-4242"
    shutil.copytree(good, unfinished)
    with pytest.raises(StoreError, match=r"\.tmp-S2\.zarr-4242: is an unfinished"):
        extract_features(unfinished, tiny, tmp_path / "features")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(StoreError, match=r"empty\.zarr: not a wsitools patch store"):
        extract_features(tmp_path / "empty.zarr", tiny, tmp_path / "features")
    with pytest.raises(StoreError, match=r"missing\.zarr: no such patch store"):
        extract_features(tmp_path / "missing.zarr", tiny, tmp_path / "features")
    assert not (tmp_path / "features").exists()
    # a damaged feature store is recomputed, a foreign h5 is not a feature store
    out = feature_store_path(tmp_path / "features", "vit-test-tiny", "S1")
    out.parent.mkdir(parents=True)
    out.write_bytes(b"not hdf5")
    assert extract_features(good, tiny, tmp_path / "features").status == "computed"
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["features"] = np.zeros((2, 3))
    with pytest.raises(StoreError, match=r"other\.h5: not a feature store \(needs datasets"):
        FeatureStore.open(tmp_path / "other.h5")


def test_empty_store_gives_empty_feature_store(tiny, tmp_path):
    attrs = dict(slide_id="E", slide_path="/slides/E.svs", params_hash="e", tile_size=64,
                 tile_size_level0=128.0, mpp_target=0.5)
    path = write_patch_store(tmp_path / "E.zarr", coords=np.zeros((0, 2)), tiles=np.zeros((0, 64, 64, 3), np.uint8),
                             tissue_fraction=np.zeros(0), attrs=attrs)
    fs = FeatureStore.open(extract_features(path, tiny, tmp_path / "features").path)
    assert (fs.n, fs.dim) == (0, 64)


def test_float16_overflow_is_an_error(tmp_path):
    backbone = official_backbone()
    backbone["norm.weight"] = torch.full_like(backbone["norm.weight"], 1e6)
    torch.save(backbone, tmp_path / "backbone.pth")
    torch.save(official_promptstate(), tmp_path / "promptstate.pth")
    card = write_card(tmp_path)
    path = small_store(tmp_path / "S1.zarr", n=3)
    with pytest.raises(ModelError, match=r"S1\.zarr: encoder 'tiny-official' produced non-finite float16 features "
                       r"for 3 tiles \(beyond float16's range: store float32\)"):
        extract_features(path, load_encoder(card, device="cpu"), tmp_path / "features", dtype="float16")
    assert not list((tmp_path / "features").rglob("*.h5"))


def test_cli_extract_reports_a_bad_store_and_continues(tmp_path, capsys):
    a = small_store(tmp_path / "tiles" / "A.zarr", slide_id="A")
    b = small_store(tmp_path / "tiles" / "B.zarr", slide_id="B", seed=3)
    bad = tmp_path / "tiles" / "broken.zarr"
    bad.mkdir()
    argv = ["extract", str(a), str(bad), str(b), "--encoder", "vit-test-tiny", "--models-dir", str(MODELS),
            "--out", str(tmp_path / "features"), "--device", "cpu", "--workers", "0", "--quiet"]
    assert run_cli(argv) == 1
    err = capsys.readouterr().err
    assert "broken.zarr: not a wsitools patch store" in err and "1 of 3 stores failed" in err
    for sid in ("A", "B"):
        fs = FeatureStore.open(tmp_path / "features" / "vit-test-tiny" / f"{sid}.h5")
        assert fs.slide_id == sid and fs.n == 10
    argv.remove(str(bad))
    assert run_cli(argv) == 0
    store = tmp_path / "features" / "vit-test-tiny" / "A.h5"
    before = FeatureStore.open(store).encoder_hash
    assert run_cli([*argv, "--precision", "fp32"]) == 0  # another encoder_hash: recomputed, not reused
    after = FeatureStore.open(store)
    assert after.encoder_hash != before and after.n == 10


def test_cli_lists_cards(capsys):
    assert run_cli(["encoders", "--models-dir", str(MODELS), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet-lite0-imagenet  tf_efficientnet_lite0" in out and "backbone: ok" in out
    assert "vit-test-tiny" in out and "random (test model)" in out


def test_extraction_logs_its_result_once(tmp_path, capsys, caplog):
    """The command prints each store's result line; extraction itself logs it only at debug
    level, so a workflow log holds it once."""
    store = small_store(tmp_path / "tiles" / "A.zarr", slide_id="A")
    argv = ["extract", str(store), "--encoder", "vit-test-tiny", "--models-dir", str(MODELS),
            "--out", str(tmp_path / "features"), "--device", "cpu", "--workers", "0"]
    with caplog.at_level(logging.DEBUG, logger="wsitools.features"):
        assert run_cli(argv) == 0
    done = [r for r in caplog.records if r.name == "wsitools.features" and "10 tiles in" in r.getMessage()]
    assert [r.levelno for r in done] == [logging.DEBUG]
    out = capsys.readouterr().out
    assert out.count("A: 10 tiles -> ") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "card"])
def test_extraction_on_the_gpu_matches_the_cpu(tmp_path, capsys, precision):
    """``extract --device cuda`` (pinned loader workers, compiled forward with a padded last
    batch) gives the CPU's features: to float32 rounding in fp32, to bf16's in the card's."""
    store = small_store(tmp_path / "tiles" / "A.zarr", slide_id="A", n=21)
    common = ["extract", str(store), "--encoder", "vit-test-tiny", "--models-dir", str(MODELS),
              "--batch-size", "8", "--quiet"]
    assert run_cli([*common, "--out", str(tmp_path / "cpu"), "--device", "cpu", "--workers", "0"]) == 0
    assert run_cli([*common, "--out", str(tmp_path / "gpu"), "--device", "cuda", "--workers", "2",
                    "--precision", precision, "--compile"]) == 0
    cpu = FeatureStore.open(tmp_path / "cpu" / "vit-test-tiny" / "A.h5").load()[0]
    gpu = FeatureStore.open(tmp_path / "gpu" / "vit-test-tiny" / "A.h5").load()[0]
    assert gpu.shape == cpu.shape == (21, cpu.shape[1])
    cos = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
    assert cos.min() > (0.9999 if precision == "fp32" else 0.99), cos.min()


def test_two_copies_of_one_slide_extracted_under_two_ids_are_refused_by_training(synthetic_svs, tiny, tmp_path):
    """Extraction copies the slide fingerprint of the patch store, so that training run alone
    (without the workflow's labels step) knows two copies of one scan under two ids; a patch store
    that records none gives a feature store without one."""
    from wsitools.errors import DataError
    from wsitools.io import file_fingerprint
    from wsitools.labels import read_labels
    from wsitools.mil.data import build_cohort

    for name in ("A.svs", "B.svs"):
        shutil.copyfile(synthetic_svs, tmp_path / name)
        tile_slide(tmp_path / name, tmp_path / "tiles", PARAMS, progress=False)
    paths = [extract_features(tmp_path / "tiles" / f"{s}.zarr", tiny, tmp_path / "f", workers=0).path for s in "AB"]
    assert [FeatureStore.open(p).attrs["slide_fingerprint"] for p in paths] == [file_fingerprint(synthetic_svs)] * 2
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\nA,neg\nB,pos\n")
    with pytest.raises(DataError, match=f"^slides 'A' \\({paths[0]}\\) and 'B' \\({paths[1]}\\) have features of one slide file"):
        build_cohort(read_labels(labels), tmp_path / "f" / tiny.name, ("neg", "pos"))
    plain = small_store(tmp_path / "plain.zarr", slide_id="P")  # a store without the slide's fingerprint
    assert "slide_fingerprint" not in FeatureStore.open(extract_features(plain, tiny, tmp_path / "f", workers=0).path).attrs


def flip_bit(path: Path, dataset: str, index: tuple[int, ...], bit: int) -> None:
    """Flip bit ``bit`` (0: the lowest) of the element ``index`` of the contiguous little-endian
    ``dataset`` in the file's bytes, as a disk error would: the file's attributes stay as written."""
    with h5py.File(path, "r") as f:
        dset = f[dataset]
        at = dset.id.get_offset() + int(np.ravel_multi_index(index, dset.shape)) * dset.dtype.itemsize + bit // 8
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ (1 << bit % 8)]))


STORE_ATTRS = {"format_version": 1, "kind": "feature_store", "encoder": "e", "slide_id": "S1", "tile_size": 224,
               "tile_size_level0": 448.0, "mpp_target": 0.5}


def test_every_whole_read_of_a_feature_store_checks_its_checksums(tmp_path):
    rng = np.random.default_rng(0)
    features, coords = rng.normal(size=(40, 16)).astype(np.float32), rng.integers(0, 10_000, size=(40, 2))
    path = write_feature_store(tmp_path / "S1.h5", features, coords, STORE_ATTRS)
    with h5py.File(path, "r") as f:
        assert f.attrs["features_crc32"] == zlib.crc32(features.tobytes())
        assert f.attrs["coords_crc32"] == zlib.crc32(coords.astype("<i8").tobytes())
    flip_bit(path, "features", (7, 3), 23)  # an exponent bit: the value doubles or halves, still finite
    with h5py.File(path, "r") as f:
        assert f["features"][7, 3] in (2 * features[7, 3], features[7, 3] / 2)
    says = f"{path}: checksum mismatch in 'features' (CRC-32 "
    for read in (lambda: FeatureStore.open(path).load(), lambda: read_features(path)):
        with pytest.raises(StoreError) as err:
            read()
        assert str(err.value).startswith(says)
        assert str(err.value).endswith("damaged since it was written; extract it again (wsitools extract --overwrite)")
    with pytest.raises(DataError) as err:  # what training's cohort check and prediction open
        FeatureStore.open_bag(path)
    assert str(err.value).startswith(f"slide S1: {says}")
    # a training step's sampled rows (the memory map) and a look at the shapes are not checked
    np.testing.assert_array_equal(read_features(path, np.arange(5), layout=row_layout(path)).numpy(), features[:5])
    assert FeatureStore.open_bag(path, check_values=False).n == 40
    flip_bit(path, "features", (7, 3), 23)  # flipped back: whole again
    np.testing.assert_array_equal(FeatureStore.open(path).load()[0], features)
    flip_bit(path, "coords", (5, 1), 12)
    for read in (lambda: read_coords(path), lambda: FeatureStore.open(path).load()):
        with pytest.raises(StoreError, match=f"^{path}: checksum mismatch in 'coords'"):
            read()
    with pytest.raises(DataError, match=f"^slide S1: {path}: checksum mismatch in 'coords'"):
        FeatureStore.open_bag(path)
    with h5py.File(path, "r+") as f:  # a store written before checksums were recorded: read unchecked
        del f.attrs["features_crc32"], f.attrs["coords_crc32"]
    assert read_coords(path)[5, 1] == coords[5, 1] ^ (1 << 12) and FeatureStore.open_bag(path).n == 40


@pytest.mark.parametrize("dataset, index, bit", [("features", (4, 2), 23), ("coords", (3, 1), 2)])
def test_a_feature_store_that_fails_its_checksum_is_extracted_again(tiny, tmp_path, caplog, dataset, index, bit):
    store = small_store(tmp_path / "tiles" / "S1.zarr")
    first = extract_features(store, tiny, tmp_path / "f", workers=0)
    features, coords = FeatureStore.open(first.path).load()
    flip_bit(first.path, dataset, index, bit)
    with caplog.at_level(logging.WARNING):
        again = extract_features(store, tiny, tmp_path / "f", workers=0)
    assert again.status == "computed"
    assert f"{first.path}: recomputing ({first.path}: checksum mismatch in '{dataset}'" in caplog.text
    for was, now in zip((features, coords), FeatureStore.open(again.path).load()):
        np.testing.assert_array_equal(now, was)
    assert extract_features(store, tiny, tmp_path / "f", workers=0).status == "reused"


def test_cli_extract_on_a_full_disk_names_the_feature_store_in_one_line(tmp_path, capsys, monkeypatch):
    a = small_store(tmp_path / "tiles" / "A.zarr", slide_id="A")
    b = small_store(tmp_path / "tiles" / "B.zarr", slide_id="B", seed=3)
    out = tmp_path / "features" / "vit-test-tiny"
    real_write, writes = os.write, []

    def write(fd: int, data) -> int:  # B's disk fills once its features are written, as HDF5 closes the file
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(".tmp-B.h5"):
            writes.append(len(data))
            if len(writes) > 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    argv = ["extract", str(a), str(b), "--encoder", "vit-test-tiny", "--models-dir", str(MODELS),
            "--out", str(tmp_path / "features"), "--device", "cpu", "--workers", "0", "--quiet"]
    assert run_cli(argv) == 1
    assert writes == [10 * 64 * 4, 10 * 2 * 8, 40]  # features and coords written, the first metadata write failed
    assert capsys.readouterr().err.splitlines() == [
        f"wsitools extract: error: {b}: OSError: [Errno 28] No space left on device: '{out / 'B.h5'}'",
        f"wsitools extract: 1 of 2 stores failed: {b}",
    ]
    assert sorted(p.name for p in out.iterdir()) == ["A.h5"]
    assert FeatureStore.open(out / "A.h5").load()[0].shape[0] == 10
