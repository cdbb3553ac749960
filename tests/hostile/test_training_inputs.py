"""Hostile inputs to PuzzleTuning, PathoTune, prediction and heatmaps, as a user who did not write
the code brings them: runs stopped early or re-run into a finished folder, stores of other tile
sizes, magnifications or too few tiles, heads applied to features they were not trained on, and
heatmaps of a slide whose stores do not agree.

Each case makes its own tiny inputs (a random-weight prompted ViT card, small patch stores and
feature stores) and asserts on the outcome: one line naming the file or option and what is wrong
(exit 2), or a correct run; never a traceback or an unfinished output that looks finished.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsitools.cli import main
from wsitools.store import write_patch_store
from cli_calls import one_line, run_cli as run
from tiny_inputs import tiny_vit_card, write_class_tiles


def patch_store(path: Path, *, n: int, size: int = 64, mpp: float = 0.5, seed: int = 0) -> Path:
    """``n`` random tiles of ``size`` px at ``mpp`` um/px in a row (level 0 at 0.25 um/px)."""
    rng = np.random.default_rng(seed)
    step = size * mpp / 0.25
    return write_patch_store(
        path, coords=np.stack([np.arange(n) * step, np.zeros(n)], 1),
        tiles=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), tissue_fraction=np.ones(n),
        attrs={"slide_id": path.stem, "slide_path": f"/synthetic/{path.stem}.svs", "params_hash": "h",
               "tile_size": size, "tile_size_level0": step, "mpp_target": mpp})


# --- PuzzleTuning ------------------------------------------------------------------------------------


def puzzle_argv(card: Path, stores: Path, out: Path) -> list:
    return ["pretrain", "puzzle", "--stores", stores, "--encoder", card, "--epochs", "2", "--batch-size", "4",
            "--steps-per-epoch", "1", "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
            "--workers", "0", "--device", "cpu", "--quiet", "--out", out]


def test_a_puzzle_run_stopped_early_exports_no_card_until_it_is_resumed_to_the_end(tmp_path, capsys):
    card = tiny_vit_card(tmp_path)
    patch_store(tmp_path / "tiles" / "s.zarr", n=8)
    argv = puzzle_argv(card, tmp_path / "tiles", tmp_path / "run")
    rc, out, err = run([*argv, "--stop-after-epochs", "1"], capsys)
    assert rc == 0, err
    assert "epochs done\t1/2" in out and "encoder card\tnot yet: continue with --resume" in out
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "config.json", "log.csv",
                                                                      "previews"]
    rc, out, err = run([*argv, "--resume"], capsys)
    assert rc == 0, err
    assert "epochs done\t2/2" in out
    assert (tmp_path / "run" / "vit-test-64-puzzletuned.yaml").is_file()
    assert (tmp_path / "run" / "vit-test-64-puzzletuned_promptstate.pth").is_file()


def test_too_few_tiles_for_one_puzzle_step_names_the_stores_and_the_options(tmp_path, capsys):
    card = tiny_vit_card(tmp_path)
    patch_store(tmp_path / "tiles" / "s.zarr", n=6)
    argv = puzzle_argv(card, tmp_path / "tiles", tmp_path / "run")
    at = argv.index("--steps-per-epoch")
    del argv[at : at + 2]  # one epoch is one pass over the tiles
    rc, _, err = run(argv, capsys)
    one_line(rc, err, f"wsitools pretrain: error: {tmp_path / 'tiles'}: 6 tiles, too few for one optimiser step "
             "of 4 x 2 tiles (--batch-size x --accum-steps)")
    assert not (tmp_path / "run").exists()
    # with --steps-per-epoch the tiles are drawn again as often as needed, but one batch needs its tiles
    (tmp_path / "tiles" / "s.zarr").rename(tmp_path / "s.zarr")
    patch_store(tmp_path / "tiles" / "s.zarr", n=3)
    rc, _, err = run(puzzle_argv(card, tmp_path / "tiles", tmp_path / "run"), capsys)
    one_line(rc, err, f"wsitools pretrain: error: {tmp_path / 'tiles'}: 3 tiles, too few for one batch of 4 tiles "
             "(--batch-size)")
    assert not (tmp_path / "run").exists()


# --- heatmaps ----------------------------------------------------------------------------------------


TILE_ARGS = ["--mpp", "0.5", "--tile-size", "64", "--tissue-mpp", "4", "--min-region-area", "5000", "--quiet"]


@pytest.fixture(scope="module")
def two_tiled_slides(tmp_path_factory):
    """Two slides with tissue in the same place, tiled alike (so their stores have equal coords),
    and an attention file of the first that records its store."""
    from wsitools.attention import write_attention
    from wsitools.store import PatchStore
    from wsitools.synthetic import Region, write_slide

    root = tmp_path_factory.mktemp("heat")
    for name in ("A", "B"):
        write_slide(root / f"{name}.tiff", size=(1024, 768), mpp=0.25, regions=(Region(100, 100, 800, 560),),
                    downsamples=(1, 4))
    assert main(["tile", str(root / "A.tiff"), str(root / "B.tiff"), "--out", str(root / "tiles"), *TILE_ARGS]) == 0
    a, b = (PatchStore.open(root / "tiles" / f"{s}.zarr") for s in ("A", "B"))
    assert np.array_equal(a.coords, b.coords) and len(a) > 4
    n = len(a)
    write_attention(root / "attention" / "A.h5", slide_id="A", attention=np.full(n, 1 / n), coords=a.coords,
                    classes=["neg", "pos"], probs=np.array([0.3, 0.7]), feature_path=root / "A.h5",
                    provenance={"slide_path": str(root / "A.tiff"), "store_path": str(a.path),
                                "tile_size_level0": a.tile_size_level0}, meta={"head": "abmil"})
    return root


def test_a_heatmap_given_the_store_of_another_slide_is_refused_naming_both(two_tiled_slides, tmp_path, capsys):
    root = two_tiled_slides
    rc, _, err = run(["heatmap", "--attention", root / "attention" / "A.h5", "--store", root / "tiles" / "B.zarr",
                      "--out", tmp_path / "h", "--mpp", "8", "--quiet"], capsys)
    assert rc == 1 and "Traceback" not in err, err
    assert f"A\tfailed\tpatch store {root / 'tiles' / 'B.zarr'} is of slide B, not A; give the store of slide A" in err
    assert not (tmp_path / "h" / "A.heatmap.png").exists()
    rc, _, err = run(["heatmap", "--attention", root / "attention" / "A.h5", "--store", root / "tiles",
                      "--out", tmp_path / "h", "--mpp", "8", "--quiet"], capsys)
    assert rc == 0 and (tmp_path / "h" / "A.top_tiles.png").is_file(), err


def test_a_store_of_another_tile_size_at_the_same_coords_fails_the_slide(two_tiled_slides, tmp_path, capsys):
    from wsitools.attention import read_attention, write_attention

    root = two_tiled_slides
    amap = read_attention(root / "attention" / "A.h5")
    att = tmp_path / "attention" / "A.h5"  # as if the features came from 256 px tiles on the same grid
    write_attention(att, slide_id="A", attention=amap.attention, coords=amap.coords, classes=["neg", "pos"],
                    probs=np.array([0.3, 0.7]), feature_path=root / "A.h5",
                    provenance={"slide_path": str(root / "A.tiff"), "store_path": str(root / "tiles" / "A.zarr"),
                                "tile_size_level0": 2 * amap.tile_size_level0}, meta={"head": "abmil"})
    rc, _, err = run(["heatmap", "--attention", root / "attention" / "A.h5", "--out", tmp_path / "h", "--mpp", "8",
                      "--quiet"], capsys)
    assert rc == 0 and (tmp_path / "h" / "A.top_tiles.png").is_file(), err
    before = {p.name: p.read_bytes() for p in (tmp_path / "h").iterdir()}
    rc, _, err = run(["heatmap", "--attention", att, "--out", tmp_path / "h", "--mpp", "8", "--quiet"], capsys)
    assert rc == 1 and "Traceback" not in err, err  # the first run's files are kept, whole
    assert err.splitlines()[0] == (
        f"A\tfailed\t{att}: its tiles are not those of patch store {root / 'tiles' / 'A.zarr'} (tiles of 256 level-0 "
        "px, the store's 128): another tiling of the slide; give the store its features were extracted from "
        "(--store), or extract the features again from this one and train or predict again")
    assert {p.name: p.read_bytes() for p in (tmp_path / "h").iterdir()} == before


# --- MIL heads: features of tiles cut at another size or resolution ----------------------------------


FAST_TRAIN = ["--head", "meanpool", "--folds", "2", "--epochs", "2", "--patience", "1", "--bootstrap", "0",
              "--device", "cpu", "--quiet"]


def retiled(path: Path, *, mpp: float) -> None:
    """Mark a feature store as computed from 224 px tiles at ``mpp`` (as a second tiling run would)."""
    import h5py

    with h5py.File(path, "a") as f:
        f.attrs["mpp_target"] = mpp
        f.attrs["tile_size_level0"] = 224 * mpp / 0.25


@pytest.fixture()
def trained(tmp_path, capsys):
    """Twelve 8-d bags of 224 px tiles at 0.5 um/px and meanpool heads trained on them."""
    from wsitools.mil.synthetic import make_bag_cohort

    bags = make_bag_cohort(tmp_path / "features", n_slides=12, n_tiles=(10, 20), dim=8, seed=2,
                           labels_path=tmp_path / "labels.csv")
    rc, _, err = run(["train", "--features", tmp_path / "features", "--labels", tmp_path / "labels.csv",
                      "--out", tmp_path / "heads", *FAST_TRAIN], capsys)
    assert rc == 0, err
    return tmp_path, bags


def test_heads_record_the_tiles_and_skip_features_of_another_resolution(trained, capsys):
    import json
    import shutil

    root, bags = trained
    config = json.loads((root / "heads" / "fold_0" / "config.json").read_text())
    assert (config["tile_size"], config["mpp_target"]) == (224, 0.5)
    other = root / "other"
    shutil.copytree(root / "features", other)
    retiled(other / f"{bags[0].slide_id}.h5", mpp=1.0)
    rc, _, err = run(["predict", "--model", root / "heads", "--features", other, "--out", root / "p",
                      "--device", "cpu", "--quiet"], capsys)
    assert rc == 0, err
    reason = (f"slide {bags[0].slide_id}: features of 224 px tiles at 1 um/px, but the head {root / 'heads'} was "
              "trained on features of 224 px tiles at 0.5 um/px; extract features from tiles cut alike")
    assert json.loads((root / "p" / "predict.json").read_text())["skipped"] == {bags[0].slide_id: reason}
    assert bags[0].slide_id not in (root / "p" / "predictions.csv").read_text()
    for bag in bags[1:]:
        retiled(other / f"{bag.slide_id}.h5", mpp=1.0)
    rc, _, err = run(["predict", "--model", root / "heads", "--features", other, "--out", root / "p2",
                      "--device", "cpu", "--quiet"], capsys)
    assert rc == 2 and not (root / "p2").exists()
    assert f"wsitools predict: error: no slide could be predicted from {other}: 12 slides skipped: " in err


def test_training_on_a_cohort_tiled_at_two_resolutions_is_refused_naming_both(trained, capsys):
    root, bags = trained
    retiled(root / "features" / f"{bags[0].slide_id}.h5", mpp=1.0)
    rc, _, err = run(["train", "--features", root / "features", "--labels", root / "labels.csv",
                      "--out", root / "heads2", *FAST_TRAIN], capsys)
    one_line(rc, err, f"wsitools train: error: feature stores in {root / 'features'} come from tiles of several "
             f"sizes or resolutions: 224 px tiles at 1 um/px (e.g. slide {bags[0].slide_id}); 224 px tiles at "
             f"0.5 um/px (e.g. slide {bags[1].slide_id}); extract every slide's features from tiles cut alike")
    assert not (root / "heads2").exists()


def test_fold_heads_trained_on_other_tiles_are_not_averaged(trained, capsys):
    import json

    root, _ = trained
    config_path = root / "heads" / "fold_1" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "mpp_target": 1.0}))
    rc, _, err = run(["predict", "--model", root / "heads", "--features", root / "features", "--out", root / "p",
                      "--device", "cpu", "--quiet"], capsys)
    one_line(rc, err, f"wsitools predict: error: {root / 'heads'}: the fold heads were trained on features of "
             "different tiles (224 px tiles at 0.5 um/px, 224 px tiles at 1 um/px)")
    assert not (root / "p").exists()


# --- a run folder that holds another run --------------------------------------------------------------


def test_tuners_refuse_the_folder_of_a_finished_mil_run_and_leave_it_whole(trained, tmp_path, capsys):
    """PathoTune writes metrics.json and predictions.csv too: into a MIL run's folder they would
    replace the run's own while it still looked finished."""
    root, _ = trained
    heads = root / "heads"
    before = {p: p.read_bytes() for p in heads.rglob("*") if p.is_file()}
    card = tiny_vit_card(tmp_path, size=32)
    write_class_tiles(tmp_path / "data", per_class=4)
    rc, _, err = run(["tune", "pathotune", "--data", tmp_path / "data", "--encoder", card, "--prompts", "tvp",
                      "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--quiet",
                      "--out", heads, "--resume"], capsys)
    one_line(rc, err, f"wsitools tune: error: {heads}: holds attention and ", "which a PathoTune run does not write "
             "(another run's folder?); choose a new or empty --out")
    patch_store(tmp_path / "tiles" / "s.zarr", n=8, size=32)
    rc, _, err = run(puzzle_argv(card, tmp_path / "tiles", heads), capsys)
    one_line(rc, err, f"wsitools pretrain: error: {heads}: holds attention and ", "which a PuzzleTuning run does not")
    assert {p: p.read_bytes() for p in heads.rglob("*") if p.is_file()} == before


def test_split_fractions_that_leave_nothing_to_train_on_name_both_options(tmp_path, capsys):
    card = tiny_vit_card(tmp_path, size=32)
    write_class_tiles(tmp_path / "data", per_class=4)
    rc, _, err = run(["tune", "pathotune", "--data", tmp_path / "data", "--encoder", card, "--prompts", "tvp",
                      "--epochs", "1", "--workers", "0", "--device", "cpu", "--quiet", "--out", tmp_path / "run",
                      "--val-fraction", "0.6", "--test-fraction", "0.4"], capsys)
    one_line(rc, err, "wsitools tune: error: --val-fraction 0.6 and --test-fraction 0.4 leave no tiles to train on: "
             "each must be >= 0 and their sum below 1")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("last_row, message", [
    ("s,0,0,b", "line 11: tile (0, 0) of slide s is listed again (first on line 2); list each tile once"),
    ("s,128,0,", "line 11: tile (128, 0) of slide s has an empty label"),
    ("s,128", "line 11: 2 fields, but the header has 4"),
    ("s,128,0,a,x", "line 11: 5 fields, but the header has 4"),
    ("s,128,0,#N/A", "label '#N/A' (slide s) looks like a missing value, which would make it a class; leave its "
                     "row out"),
])
def test_a_tile_table_row_that_cannot_be_one_tile_and_label_is_named(tmp_path, capsys, last_row, message):
    card = tiny_vit_card(tmp_path, size=32)
    patch_store(tmp_path / "tiles" / "s.zarr", n=8, size=32)
    table = tmp_path / "tiles.csv"  # tiles 64 level-0 px apart; a blank line must not shift the numbers
    table.write_text("slide_id,x,y,label\n" + "".join(f"s,{i * 64},0,{'ab'[i % 2]}\n" for i in range(4)) + "\n"
                     + "".join(f"s,{i * 64},0,{'ab'[i % 2]}\n" for i in range(4, 8)) + last_row + "\n")
    rc, _, err = run(["tune", "pathotune", "--data", table, "--stores", tmp_path / "tiles", "--encoder", card,
                      "--prompts", "tvp", "--epochs", "1", "--workers", "0", "--device", "cpu", "--quiet",
                      "--out", tmp_path / "run"], capsys)
    one_line(rc, err, f"wsitools tune: error: {table}{':' if message.startswith('label') else ','} {message}")
    assert not (tmp_path / "run").exists()


def test_a_missing_value_marker_is_a_tile_class_only_when_the_task_lists_it(tmp_path):
    from wsitools.errors import DataError
    from wsitools.pathotune import store_tiles

    patch_store(tmp_path / "tiles" / "s.zarr", n=6, size=32)
    table = tmp_path / "tiles.csv"
    table.write_text("slide_id,x,y,label\n" + "".join(f"s,{i * 64},0,{['a', 'b', 'NA'][i % 3]}\n" for i in range(6)))
    with pytest.raises(DataError, match=r"label 'NA' \(slide s\) looks like a missing value"):
        store_tiles(table, [tmp_path / "tiles"])
    tiles = store_tiles(table, [tmp_path / "tiles"], task_classes=["b", "a", "NA"])
    assert tiles.classes == ("NA", "a", "b") and tiles.labels.tolist() == [1, 2, 0, 1, 2, 0]
