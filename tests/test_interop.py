"""Interoperability: CLAM's and TRIDENT's read code, replicated from their sources, reads our
feature stores and `wsitools export` layouts with the right values and dtypes.

Each ``clam_*`` / ``trident_*`` function below does what the cited upstream lines do (CLAM at
mahmoodlab/CLAM 53e2409, TRIDENT at mahmoodlab/TRIDENT a91fa84), written here, not copied.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from wsitools.cli import main
from wsitools.encoders import load_encoder
from wsitools.export import export_store, open_store, trident_coords_dir
from wsitools.feature_store import FeatureStore, interop_attrs, magnification
from wsitools.features import extract_features
from wsitools.store import write_patch_store

MODELS = Path(__file__).resolve().parents[1] / "models"
MPP0, MPP_T, SIZE = 0.2527, 0.5, 64  # a 40x scanner's mpp: level-0 px per target px is not whole
SIZE0 = SIZE * MPP_T / MPP0  # 126.64...


# --- the peers' read code ------------------------------------------------------------------------

def clam_bag_fp_attrs(path: Path) -> tuple[int, int]:
    """CLAM dataset_modules/dataset_h5.py:63-66 (Whole_Slide_Bag_FP): patch_level and patch_size
    from the attributes of ``coords``; it then reads patch_size px at patch_level (line 86)."""
    with h5py.File(path, "r") as f:
        return f["coords"].attrs["patch_level"], f["coords"].attrs["patch_size"]


def clam_load_pt(root: Path, slide_id: str) -> torch.Tensor:
    """CLAM dataset_modules/dataset_generic.py:338-339: ``pt_files/{slide_id}.pt`` through
    torch.load (here with weights_only=True, which a plain tensor passes)."""
    return torch.load(root / "pt_files" / f"{slide_id}.pt", weights_only=True)


def clam_load_h5(path: Path) -> tuple[torch.Tensor, np.ndarray]:
    """CLAM dataset_modules/dataset_generic.py:346-351 (use_h5): ``features`` and ``coords``,
    the features through torch.from_numpy, uncast."""
    with h5py.File(path, "r") as f:
        features, coords = f["features"][:], f["coords"][:]
    return torch.from_numpy(features), coords


def clam_head_forward(features: torch.Tensor, n_classes: int = 2) -> torch.Tensor:
    """CLAM's heads start with a float32 Linear on the bag as loaded (models/model_clam.py:83,
    ``fc``; forward at line 138 passes ``h`` to it uncast)."""
    torch.manual_seed(0)
    return torch.nn.Linear(features.shape[1], n_classes)(features)


def trident_read_coords(path: Path) -> tuple[dict, np.ndarray]:
    """TRIDENT trident/IO.py:602-605 (read_coords): every attribute of ``coords``, and coords."""
    with h5py.File(path, "r") as f:
        return dict(f["coords"].attrs), f["coords"][:]


def trident_read_coords_legacy(path: Path) -> tuple[int, int, float, np.ndarray]:
    """TRIDENT trident/IO.py:638-642 (read_coords_legacy, the CLAM-style reading)."""
    with h5py.File(path, "r") as f:
        attrs = f["coords"].attrs
        return attrs["patch_size"], attrs["patch_level"], attrs.get("custom_downsample", 1), f["coords"][:]


def trident_level0_patch_size(attrs: dict) -> int:
    """TRIDENT trident/wsi_objects/WSI.py:776-795 with WSIPatcher.py:132-147: re-reading a coords
    file, the level-0 size read is round(patch_size x pixel size ratio), pixel size = 10 / mag."""
    src_pixel_size = 10 / attrs["level0_magnification"]
    dst_pixel_size = 10 / attrs["target_magnification"]
    return round(attrs["patch_size"] * dst_pixel_size / src_pixel_size)


def trident_slide_batch(path: Path) -> dict:
    """TRIDENT trident/wsi_objects/WSI.py:1102-1149 (extract_slide_features): features widened
    to float, coords int64, the attributes of ``coords`` with patch_size_level0 as an int."""
    with h5py.File(path, "r") as f:
        coords, features, attrs = f["coords"][:], f["features"][:], dict(f["coords"].attrs)
    attrs["patch_size_level0"] = int(attrs["patch_size_level0"])
    return {
        "features": torch.from_numpy(features).float().unsqueeze(0),
        "coords": torch.from_numpy(coords).to(torch.int64).unsqueeze(0),
        "attributes": attrs,
    }


def trident_grid(batch: dict) -> torch.Tensor:
    """TRIDENT trident/slide_encoder_models/load.py:441-444: grid indices as coords // patch_size_level0."""
    return batch["coords"] // int(batch["attributes"]["patch_size_level0"])


# --- our data ------------------------------------------------------------------------------------

def odd_store(path: Path, *, slide_id: str = "S1", n_side: int = 4, overlap: int | None = 0) -> Path:
    """A patch store of an n_side x n_side grid at 0.5 um/px cut from a 0.2527 um/px slide."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="xy"), axis=-1).reshape(-1, 2)
    coords = np.rint(grid * SIZE * MPP_T / MPP0).astype(np.int64)
    tiles = rng.integers(0, 256, size=(len(grid), SIZE, SIZE, 3), dtype=np.uint8)
    attrs = dict(slide_id=slide_id, slide_path=f"/slides/{slide_id}.svs", params_hash="p1", tile_size=SIZE,
                 tile_size_level0=SIZE0, mpp_target=MPP_T, mpp_level0=MPP0)
    if overlap is not None:
        attrs["overlap"] = overlap
    return write_patch_store(path, coords=coords, tiles=tiles, tissue_fraction=np.ones(len(grid)), attrs=attrs,
                             overwrite=True)


@pytest.fixture(scope="module")
def tiny():
    return load_encoder("vit-test-tiny", device="cpu", models_dir=MODELS)


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory, tiny) -> Path:
    root = tmp_path_factory.mktemp("features")
    for sid in ("S1", "S2"):
        extract_features(odd_store(root.parent / f"{sid}.zarr", slide_id=sid), tiny, root, workers=0)
    return root / "vit-test-tiny"


# --- the feature store as it is ------------------------------------------------------------------

def test_feature_store_is_float32_and_clam_forward_runs(features_dir):
    features, coords = clam_load_h5(features_dir / "S1.h5")
    assert features.dtype == torch.float32 and features.shape == (16, 64)
    logits = clam_head_forward(features)
    assert logits.shape == (16, 2) and logits.dtype == torch.float32
    # what the float16 option gives CLAM: its head refuses the bag (why float32 is the default)
    with pytest.raises(RuntimeError, match="dtype|Half|same"):
        clam_head_forward(features.half())


def test_feature_store_attrs_read_by_trident(features_dir):
    attrs, coords = trident_read_coords(features_dir / "S1.h5")
    assert attrs["patch_size"] == SIZE and attrs["patch_size_level0"] == int(SIZE0) == 126
    assert attrs["level0_magnification"] == pytest.approx(39.573, abs=0) and attrs["target_magnification"] == 20.0
    assert attrs["overlap"] == 0 and coords.dtype == np.int64
    # TRIDENT re-reading the slide from these coords covers the tile's level-0 footprint
    assert trident_level0_patch_size(attrs) == round(SIZE0)
    # its slide encoders' grid (coords // patch_size_level0) is the tile grid
    grid = trident_grid(trident_slide_batch(features_dir / "S1.h5"))[0].numpy()
    np.testing.assert_array_equal(grid, np.rint(coords / SIZE0).astype(np.int64))


def test_feature_store_attrs_read_by_clam_and_legacy_readers(features_dir):
    level, size = clam_bag_fp_attrs(features_dir / "S1.h5")
    assert (level, size) == (0, SIZE)  # patch_size means target px here: TRIDENT's meaning wins (see export)
    size, level, custom_downsample, _ = trident_read_coords_legacy(features_dir / "S1.h5")
    level_downsamples = [1.0, 4.0]
    assert size * level_downsamples[level] * custom_downsample == pytest.approx(SIZE0, rel=1e-12)


@pytest.mark.parametrize("mpp0, mpp_t, size", [(0.2527, 0.5, 224), (0.25, 0.5, 256), (0.4990, 1.0, 224),
                                                 (0.1211, 0.5, 224), (0.5, 0.5, 512), (0.2201, 2.0, 224)])
def test_magnifications_reproduce_the_level0_footprint(mpp0, mpp_t, size):
    size0 = size * mpp_t / mpp0
    attrs = interop_attrs(tile_size=size, tile_size_level0=size0, mpp_target=mpp_t, overlap=0)
    assert attrs["level0_magnification"] == magnification(mpp0) == round(10 / mpp0, 3)
    assert attrs["target_magnification"] == round(10 / mpp_t, 3)
    assert abs(trident_level0_patch_size(attrs) - size0) <= 0.5 + 1e-9
    assert attrs["patch_size_level0"] == int(size0 + 1e-6)
    # a row of 200 tiles: coords // patch_size_level0 is each tile's column
    cols = np.arange(200)
    x = np.rint(cols * size0).astype(np.int64)
    np.testing.assert_array_equal(x // attrs["patch_size_level0"], cols)


# --- wsitools export -----------------------------------------------------------------------------

def test_export_clam_layout(features_dir, tmp_path):
    assert main(["export", "--to", "clam", "--features", str(features_dir), "--out", str(tmp_path), "--quiet"]) == 0
    ours, coords = FeatureStore.open(features_dir / "S2.h5").load()
    bag = clam_load_pt(tmp_path, "S2")
    assert bag.dtype == torch.float32 and torch.equal(bag, torch.from_numpy(ours))
    assert clam_head_forward(bag).shape == (16, 2)
    h5_features, h5_coords = clam_load_h5(tmp_path / "h5_files" / "S2.h5")
    assert torch.equal(h5_features, bag) and np.array_equal(h5_coords, coords)
    # CLAM's coordinates file: patch_size px at patch_level 0 is the tile's level-0 footprint
    for sub in ("patches", "h5_files"):
        level, size = clam_bag_fp_attrs(tmp_path / sub / "S2.h5")
        assert (level, size) == (0, round(SIZE0))
    with h5py.File(tmp_path / "patches" / "S2.h5", "r") as f:
        assert list(f) == ["coords"] and np.array_equal(f["coords"][:], coords)
    assert sorted(p.name for p in (tmp_path / "pt_files").iterdir()) == ["S1.pt", "S2.pt"]
    assert not list(tmp_path.rglob(".tmp-*"))


def test_export_trident_layout_from_a_float16_store(tiny, tmp_path):
    store = odd_store(tmp_path / "S3.zarr", slide_id="S3")
    result = extract_features(store, tiny, tmp_path / "features", workers=0, dtype="float16")
    ours, coords = FeatureStore.open(result.path).load()
    assert ours.dtype == np.float16
    exported = export_store(open_store(result.path), tmp_path / "job", to="trident")
    folder = tmp_path / "job" / "20x_64px_0px_overlap"
    assert exported.paths == (folder / "patches" / "S3_patches.h5", folder / "features_vit-test-tiny" / "S3.h5")
    attrs, patch_coords = trident_read_coords(exported.paths[0])
    assert np.array_equal(patch_coords, coords) and attrs["name"] == "S3"
    assert (attrs["patch_size"], attrs["patch_size_level0"], attrs["target_magnification"]) == (SIZE, 126, 20.0)
    batch = trident_slide_batch(exported.paths[1])
    assert batch["features"].dtype == torch.float32
    np.testing.assert_array_equal(batch["features"][0].numpy(), ours.astype(np.float32))  # widened exactly
    # TRIDENT's mean-pooling slide encoder (load.py:599)
    torch.testing.assert_close(batch["features"].mean(dim=1)[0], torch.from_numpy(ours.astype(np.float32)).mean(0))
    with h5py.File(exported.paths[1], "r") as f:
        assert f["features"].dtype == np.float32 and f["features"].attrs["encoder"] == "vit-test-tiny"


def test_trident_folder_names_follow_its_magnification_format():
    assert trident_coords_dir({"target_magnification": 20.0, "patch_size": 224, "overlap": 0}) == "20x_224px_0px_overlap"
    assert trident_coords_dir({"target_magnification": 2.5, "patch_size": 256, "overlap": 32}) == "2.5x_256px_32px_overlap"
    assert trident_coords_dir({"target_magnification": 19.786, "patch_size": 224, "overlap": 0}) == "19.786x_224px_0px_overlap"


def test_export_errors_are_one_line(features_dir, tiny, tmp_path, capsys):
    def run(*argv: str) -> tuple[int, str]:
        code = main(["export", *argv, "--quiet"])
        return code, capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_:
        run("--to", "clam", "--features", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip() == (
        f"wsitools export: error: argument --features: feature directory {tmp_path / 'nope'}: no such directory "
        "(see wsitools export --help)")
    with pytest.raises(SystemExit) as exit_:
        run("--to", "clam", "--features", str(features_dir / "S1.h5"), "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"S1.h5: is a file; give the directory of feature stores (features/ENCODER, holding {{slide_id}}.h5), " \
           f"e.g. {features_dir}" in err
    code, err = run("--to", "clam", "--features", str(features_dir), "--out", str(tmp_path / "o"), "--slides", "S9")
    assert code == 2 and f"--slides: no feature store in {features_dir} for S9" in err
    # a store without the overlap attribute: TRIDENT's folder name is unknown, the others go on
    folder = tmp_path / "mixed"
    extract_features(odd_store(tmp_path / "A.zarr", slide_id="A", overlap=None), tiny, folder, workers=0)
    extract_features(odd_store(tmp_path / "B.zarr", slide_id="B"), tiny, folder, workers=0)
    code, err = run("--to", "trident", "--features", str(folder / "vit-test-tiny"), "--out", str(tmp_path / "job"))
    assert code == 1
    assert (f"{folder / 'vit-test-tiny' / 'A.h5'}: the file attribute overlap (target px between neighbouring tiles) "
            "is missing, and TRIDENT's folder name needs it; extract the features again with wsitools extract from "
            "a patch store that records it (wsitools tile writes it)") in err
    assert "1 of 2 stores failed" in err
    assert (tmp_path / "job" / "20x_64px_0px_overlap" / "features_vit-test-tiny" / "B.h5").is_file()
    assert not (tmp_path / "job" / "20x_64px_0px_overlap" / "features_vit-test-tiny" / "A.h5").exists()


def test_an_export_is_one_encoders_features_each_under_its_own_slide_id(features_dir, tiny, tmp_path, capsys):
    import shutil

    import h5py

    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(features_dir / "S1.h5", folder / "S1.h5")
    shutil.copy(features_dir / "S1.h5", folder / "S3.h5")  # slide S1's features under another name
    shutil.copy(features_dir / "S2.h5", folder / "S2.h5")
    with h5py.File(folder / "S2.h5", "r+") as f:
        f.attrs["encoder"], f.attrs["encoder_hash"] = "other", "f" * 16  # another encoder's
    assert main(["export", "--to", "clam", "--features", str(folder), "--out", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"{folder / 'S3.h5'}: holds the features of slide S1; a feature store is named {{slide_id}}.h5" in err
    assert (f"{folder / 'S2.h5'}: 64-d features of encoder other (hash ffffffffffff) from 64 px tiles at 0.5 um/px, "
            "not those of this export (1 of its 2 stores: 64-d features of encoder vit-test-tiny (hash") in err
    assert sorted(p.name for p in (tmp_path / "o" / "pt_files").iterdir()) == ["S1.pt"]
    np.testing.assert_array_equal(torch.load(tmp_path / "o" / "pt_files" / "S1.pt", weights_only=True).numpy(),
                                  h5py.File(features_dir / "S1.h5", "r")["features"][:])


def test_synthetic_stores_record_the_tile_geometry_extract_writes_and_export_to_trident(features_dir, tmp_path,
                                                                                      capsys):
    """The synthetic bag stores record the geometry attributes an extracted store does, overlap
    included (TRIDENT's folder name needs it): ``export --to trident`` refused them before."""
    from wsitools.mil.synthetic import write_synthetic_store

    geometry = ("tile_size", "tile_size_level0", "mpp_target", "overlap")
    assert all(k in FeatureStore.open(features_dir / "S1.h5").attrs for k in geometry)
    path = write_synthetic_store(tmp_path / "bags" / "S7.h5", np.ones((3, 4), dtype=np.float32))
    attrs = FeatureStore.open(path).attrs
    assert {k: attrs[k] for k in geometry} == {"tile_size": 224, "tile_size_level0": 448.0, "mpp_target": 0.5,
                                                "overlap": 0}
    assert main(["export", "--to", "trident", "--features", str(tmp_path / "bags"), "--out", str(tmp_path / "x"),
                 "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    attrs, coords = trident_read_coords(tmp_path / "x" / "20x_224px_0px_overlap" / "patches" / "S7_patches.h5")
    assert attrs["overlap"] == 0 and coords.tolist() == [[0, 0], [448, 0], [0, 448]]


def test_stores_that_record_no_encoder_hash_are_exported(tmp_path, capsys):
    """Stores of other writers (the synthetic bag cohorts here) need not record an encoder hash:
    each was exported whole, then reported failed with a raw KeyError ("2 of 2 stores failed")."""
    from wsitools.mil.synthetic import make_bag_cohort

    make_bag_cohort(tmp_path / "bags", n_slides=2, n_tiles=(5, 8), dim=4, seed=0)
    stores = sorted((tmp_path / "bags").glob("*.h5"))
    assert FeatureStore.open(stores[0]).encoder_hash is None
    assert main(["export", "--to", "clam", "--features", str(tmp_path / "bags"), "--out", str(tmp_path / "x"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    for store in stores:
        features, _ = FeatureStore.open(store).load()
        assert torch.equal(clam_load_pt(tmp_path / "x", store.stem), torch.from_numpy(features.astype(np.float32)))
    # ... and a store of a named encoder among them is not theirs: it fails alone
    make_bag_cohort(tmp_path / "other", n_slides=1, n_tiles=(5, 8), dim=8, seed=1)
    late = tmp_path / "bags" / "zz_late.h5"
    (tmp_path / "other" / "slide_000.h5").rename(late)
    import h5py

    with h5py.File(late, "r+") as f:
        f.attrs["slide_id"], f.attrs["encoder"], f.attrs["encoder_hash"] = "zz_late", "enc-b", "b" * 16
    assert main(["export", "--to", "clam", "--features", str(tmp_path / "bags"), "--out", str(tmp_path / "y"), "--quiet"]) == 1
    assert f"{late}: 8-d features of encoder enc-b (hash bbbbbbbbbbbb) from " in (err := capsys.readouterr().err)
    assert ", not those of this export (2 of its 3 stores: 4-d features of encoder " in err
    assert not (tmp_path / "y" / "pt_files" / "zz_late.pt").exists()
