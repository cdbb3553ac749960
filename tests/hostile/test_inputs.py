"""Hostile inputs: what an unkind user hands the CLI and the workflow.

Every case makes its own input (pickles, garbage files, odd file names, wrong dtypes, nan options,
directories for files) and asserts on the outcome: exit status 2 and exactly one line on stderr
naming the file or option and the problem, no traceback; or, where one slide of a cohort is bad,
that slide skipped with a warning and the rest done.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from wsitools.labels import check_task_labels
from wsitools.samples import Sample, samples_from_glob, snakemake_command
from wsitools.cli import main
from wsitools.errors import DataError, ModelError, SlideError, WsiToolsError, one_line
from wsitools.mil.head_folder import save_head
from wsitools.mil.heads import HeadConfig, create_head
from wsitools.mil.synthetic import make_bag_cohort
from wsitools.store import write_patch_store
from wsitools.types import check_slide_id, slide_id_from_path
from cli_calls import run_cli as run
from tiny_inputs import tiny_vit_card, write_class_tiles

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "data" / "openslide-fixtures"
TASK = {"name": "planted", "description": "is there a planted region",
        "classes": {"neg": "one texture only", "pos": "a region of another texture"}}


def assert_one_line(rc: int, err: str, *needles: str, status: int = 2) -> str:
    """Exit status ``status``, one line on stderr holding every needle, no traceback."""
    lines = err.strip().splitlines()
    assert rc == status, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def write_pickle(path: Path) -> Path:
    """A pickle that would run code if unpickled freely (a class instance)."""
    path.write_bytes(pickle.dumps({"weights": Path("/etc/passwd")}))
    return path


def set_attrs(path: Path, **attrs) -> None:
    with h5py.File(path, "a") as f:
        for k, v in attrs.items():
            f.attrs[k] = v


# --- numeric options: one argument type for every sub-command -------------------------------------


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "labels.csv").write_text("slide_id,label\na,neg\n")
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(TASK))
    (tmp_path / "slide.svs").write_bytes(b"x")
    (tmp_path / "dir").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--lr", "nan"], "argument --lr: must be a finite number > 0, got 'nan'"),
        (["train", "--lr=-1e-3"], "argument --lr: must be a finite number > 0, got '-1e-3'"),
        (["train", "--workers", "-1"], "argument --workers: must be a whole number >= 0, got '-1'"),
        (["train", "--epochs", "0"], "argument --epochs: must be a whole number >= 1, got '0'"),
        (["train", "--weight-decay", "inf"], "argument --weight-decay: must be a finite number >= 0, got 'inf'"),
        (["train", "--instance-dropout", "1.5"], "argument --instance-dropout: must be a number from 0 to 1"),
        (["train", "--folds", "five"], "argument --folds: must be a whole number >= 1, got 'five'"),
        (["tile", "{d}/slide.svs", "--workers", "-1"], "argument --workers: must be a whole number >= 1"),
        (["tile", "{d}/slide.svs", "--mpp", "0.0005"], "argument --mpp: must be from 0.05 to 20 um/px"),
        (["tile", "{d}/slide.svs", "--mpp", "nan"], "argument --mpp: must be from 0.05 to 20 um/px, got 'nan'"),
        (["tile", "{d}/slide.svs", "--tile-size", "-224"], "argument --tile-size: must be a whole number >= 1"),
        (["tile", "{d}/slide.svs", "--min-tissue", "2"], "argument --min-tissue: must be a number from 0 to 1"),
        (["info", "{d}/slide.svs", "--mpp-override", "inf"], "argument --mpp-override: must be from 0.05 to 20"),
        (["extract", "{d}", "--encoder", "x", "--workers", "-1"], "argument --workers: must be a whole"),
        (["extract", "{d}", "--encoder", "x", "--batch-size", "0"], "argument --batch-size"),
        (["predict", "--model", "{d}", "--features", "{d}", "--threads", "0"], "argument --threads"),
        (["heatmap", "--attention", "{d}", "--alpha", "nan"], "argument --alpha: must be a number from 0 to 1"),
        (["pretrain", "puzzle", "--stores", "{d}", "--base-lr", "nan"], "argument --base-lr: must be a finite number > 0"),
        (["tune", "pathotune", "--data", "{d}", "--encoder", "x", "--lr", "0"], "argument --lr: must be a finite number > 0"),
        (["demo", "--slides", "-4"], "argument --slides: must be a whole number >= 1"),
    ],
)
def test_bad_numbers_are_one_line_for_every_command(files, capsys, argv, needle):
    required = {"train": ["--features", files, "--labels", files / "labels.csv", "--task", files / "task.yaml"],
                "tile": ["--out", files / "o"], "extract": ["--out", files / "o"],
                "predict": ["--out", files / "o"], "heatmap": ["--out", files / "o"],
                "pretrain": ["--out", files / "o"], "tune": ["--out", files / "o"]}
    argv = [a.replace("{d}", str(files)) for a in argv]
    rc, _, err = run(argv[: 2 if argv[0] in ("pretrain", "tune") else 1] + required.get(argv[0], [])
                     + argv[2 if argv[0] in ("pretrain", "tune") else 1:], capsys)
    line = assert_one_line(rc, err, needle)
    assert line.startswith(f"wsitools {argv[0]}")


@pytest.mark.parametrize("option", ["--labels", "--task"])
def test_a_directory_given_for_a_file_is_named(files, capsys, option):
    argv = ["train", "--features", files, "--labels", files / "labels.csv", "--task", files / "task.yaml",
            "--out", files / "o"]
    argv[argv.index(option) + 1] = files / "dir"
    rc, _, err = run(argv, capsys)
    assert_one_line(rc, err, f"argument {option}: {files / 'dir'}: is a directory, expected a file")


def test_an_output_path_under_a_file_is_one_line(files, capsys):
    rc, _, err = run(["tile", FIXTURES / "small.svs", "--out", files / "labels.csv" / "tiles", "--quiet"], capsys)
    assert_one_line(rc, err, f"wsitools tile: error: {files / 'labels.csv' / 'tiles'}: Not a directory")


def test_readers_refuse_a_directory_with_a_data_error(files):
    from wsitools.labels import read_labels
    from wsitools.text import load_task

    with pytest.raises(DataError, match=r"labels table .*dir: is a directory"):
        read_labels(files / "dir")
    with pytest.raises(DataError, match=r"task description .*dir: is a directory"):
        load_task(files / "dir")


def test_a_worker_traceback_becomes_its_last_line():
    wrapped = RuntimeError(
        "Caught StoreError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    g()\nwsitools.errors.StoreError: /t/s.zarr: chunk tiles/c/3 is corrupt\n'
    )
    assert one_line(wrapped) == "/t/s.zarr: chunk tiles/c/3 is corrupt"
    foreign = RuntimeError("Caught X in worker.\nOriginal Traceback (most recent call last):\nnumcodecs.Err: bad header\n")
    assert one_line(foreign) == "Err: bad header"
    assert one_line(ValueError("two\nlines")) == "two lines"


# --- weight files: garbage, pickles, wrong dtypes ---------------------------------------------------


@pytest.fixture()
def head_dir(tmp_path):
    """A saved abmil head on 8-d features, recording encoder 'enc-a' with hash 'a' * 64."""
    torch.manual_seed(0)
    model = create_head(HeadConfig(head="abmil", in_dim=8, n_classes=2, dim=8, attn_dim=8, n_heads=1))
    return save_head(model, tmp_path / "head", meta={
        "classes": ["neg", "pos"], "encoder": "enc-a", "encoder_hash": "a" * 64, "encoder_weights": "backbone:1"})


@pytest.fixture()
def bags(tmp_path):
    """Six 8-d feature stores written by encoder 'enc-a' (hash 'a' * 64)."""
    bags = make_bag_cohort(tmp_path / "features", n_slides=6, n_tiles=(10, 20), dim=8, seed=1)
    for b in bags:
        set_attrs(b.path, encoder="enc-a", encoder_hash="a" * 64)
    return bags


@pytest.mark.parametrize("content", ["garbage", "pickle", "empty"])
def test_garbage_or_pickle_as_a_heads_weights_is_one_line(head_dir, bags, tmp_path, capsys, content):
    weights = head_dir / "model.safetensors"
    if content == "garbage":
        weights.write_bytes(b"\x00garbage" * 100)
    elif content == "pickle":
        torch.save({"classifier.weight": torch.zeros(2, 8)}, weights)
    else:
        weights.write_bytes(b"")
    rc, _, err = run(["predict", "--model", head_dir, "--features", tmp_path / "features",
                      "--out", tmp_path / "pred", "--quiet"], capsys)
    # a file is read by what its bytes are: a torch pickle of tensors is read (weights only) and
    # found not to fit; anything else is no weight file at all
    needle = "does not fit the model; missing keys" if content == "pickle" else (
        "not a weight file (neither safetensors nor a PyTorch checkpoint)")
    assert_one_line(rc, err, f"{weights}: {needle}")
    assert not (tmp_path / "pred").exists()


@pytest.mark.parametrize("config, needle", [
    ("{not json", "not valid JSON"),
    ('{"kind": "mil_head", "format_version": 1, "classes": ["a", "b"]}', "not a usable head config (KeyError: 'config')"),
    ('{"kind": "mil_head", "format_version": 1, "classes": ["a", "b"], "config": {"head": "abmil", "in_dim": "x"}}',
     "head config: in_dim = 'x', not an integer >= 1"),
    ('{"kind": "mil_head", "format_version": 1, "classes": ["a", "b"], "config": {"head": "abmil", "in_dim": 8, '
     '"n_classes": 2, "dim": "128"}}', "head config: dim = '128', not an integer >= 1"),
    ('{"kind": "mil_head", "format_version": 1, "classes": ["a", "b"], "config": {"head": "abmil", "in_dim": 8, '
     '"n_classes": 2, "dropout": 1.5}}', "head config: dropout = 1.5, not a number in [0, 1)"),
    ('{"kind": "mil_head", "format_version": 1, "classes": ["a", "b"], "config": {"head": "abmil", "in_dim": 8, '
     '"n_classes": 2, "standardize": "yes"}}', "head config: standardize = 'yes', not true or false"),
])
def test_a_broken_head_config_is_one_line(head_dir, bags, tmp_path, capsys, config, needle):
    (head_dir / "config.json").write_text(config)
    rc, _, err = run(["predict", "--model", head_dir, "--features", tmp_path / "features",
                      "--out", tmp_path / "pred", "--quiet"], capsys)
    assert_one_line(rc, err, str(head_dir / "config.json"), needle)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64])
def test_head_weights_of_another_dtype_kind_are_refused_naming_the_tensor(head_dir, bags, tmp_path, capsys, dtype):
    weights = head_dir / "model.safetensors"
    model = create_head(HeadConfig(head="abmil", in_dim=8, n_classes=2, dim=8, attn_dim=8, n_heads=1))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["classifier.weight"] = state["classifier.weight"].to(dtype)
    save_file(state, str(weights))
    rc, _, err = run(["predict", "--model", head_dir, "--features", tmp_path / "features",
                      "--out", tmp_path / "pred", "--quiet"], capsys)
    name = str(dtype).removeprefix("torch.")
    assert_one_line(rc, err, f"{weights}: tensor 'classifier.weight' is {name}, the model needs float")


def test_half_precision_head_weights_still_load(head_dir, bags, tmp_path, capsys):
    from wsitools.mil.head_folder import load_head

    weights = head_dir / "model.safetensors"
    saved = load_head(head_dir)
    save_file({k: v.half().contiguous() for k, v in saved.model.state_dict().items()}, str(weights))
    config = json.loads((head_dir / "config.json").read_text())
    del config["weights_sha256"]  # converted by hand: the checksum of the float32 file no longer holds
    (head_dir / "config.json").write_text(json.dumps(config))
    again = load_head(head_dir)
    assert next(again.model.parameters()).dtype == torch.float32


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    """A timm resnet10t state dict (the smallest ResNet) and a folder for variants of it."""
    import timm

    model = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    return {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path_factory.mktemp("weights")


@pytest.mark.parametrize("kind", ["garbage", "code-pickle", "int8", "bool"])
def test_bad_weights_for_a_timm_encoder_are_one_line(resnet_weights, tmp_path, capsys, kind):
    state, folder = resnet_weights
    if kind == "garbage":
        path = folder / "garbage.safetensors"
        path.write_bytes(np.random.default_rng(0).bytes(4096))
        needle = "not a weight file (neither safetensors nor a PyTorch checkpoint)"
    elif kind == "code-pickle":
        path = write_pickle(folder / "code.pth")
        needle = "not a readable weight file (torch.load, weights only: it holds pickled Python objects"
    else:
        path = folder / f"{kind}.safetensors"
        dtype = {"int8": torch.int8, "bool": torch.bool}[kind]
        save_file({**state, "conv1.0.weight": state["conv1.0.weight"].to(dtype)}, str(path))
        needle = f"tensor 'conv1.0.weight' is {kind}, the model needs float"
    (tmp_path / "s.zarr").mkdir(exist_ok=True)  # the encoder is loaded before any store is opened
    rc, _, err = run(["extract", tmp_path / "s.zarr", "--encoder", "timm:resnet10t", "--weights", path,
                      "--out", tmp_path / "f", "--device", "cpu", "--quiet"], capsys)
    assert_one_line(rc, err, str(path), needle)


# --- PuzzleTuning resume ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def puzzle_run(tmp_path_factory):
    """One epoch of PuzzleTuning on a tiny prompted ViT, stopped and checkpointed."""
    root = tmp_path_factory.mktemp("puzzle")
    card = tiny_vit_card(root, size=64, tokens=4)
    rng = np.random.default_rng(0)
    store = write_patch_store(
        root / "tiles" / "s.zarr", coords=np.stack([np.arange(16) * 64, np.zeros(16)], 1),
        tiles=rng.integers(0, 256, (16, 64, 64, 3), dtype=np.uint8), tissue_fraction=np.ones(16),
        attrs={"slide_id": "s", "slide_path": "/synthetic/s.svs", "params_hash": "h",
               "tile_size": 64, "tile_size_level0": 128.0, "mpp_target": 0.5})
    argv = ["pretrain", "puzzle", "--stores", str(store), "--encoder", str(card), "--epochs", "2",
            "--batch-size", "4", "--steps-per-epoch", "1", "--decoder-dim", "32", "--decoder-depth", "1",
            "--decoder-heads", "2", "--workers", "0", "--device", "cpu", "--quiet", "--out"]
    assert main(argv + [str(root / "run"), "--stop-after-epochs", "1"]) == 0
    return root / "run", argv


@pytest.mark.parametrize("damage", ["pickle-optimizer", "garbage-optimizer", "int64-optimizer-moment",
                                    "bool-trainable", "garbage-trainable"])
def test_damaged_puzzle_checkpoints_are_refused_on_resume(puzzle_run, tmp_path, capsys, damage):
    from safetensors.torch import load_file

    run_dir, argv = puzzle_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (checkpoint,) = sorted((copy / "checkpoints").iterdir())
    optimizer, trainable = checkpoint / "optimizer.pt", checkpoint / "trainable.safetensors"
    if damage == "pickle-optimizer":
        write_pickle(optimizer)
        target, needle = optimizer, "not a readable weight file (torch.load, weights only: it holds pickled Python objects"
    elif damage == "garbage-optimizer":
        optimizer.write_bytes(b"PK\x03\x04 not a zip")
        target, needle = optimizer, "not a readable weight file (torch.load, weights only: "
    elif damage == "int64-optimizer-moment":
        state = torch.load(optimizer, weights_only=True)
        first = next(iter(state["optimizer"]["state"]))
        state["optimizer"]["state"][first]["exp_avg"] = state["optimizer"]["state"][first]["exp_avg"].long()
        torch.save(state, optimizer)
        record = json.loads((checkpoint / "state.json").read_text())  # as a checkpoint recording no sha256
        del record["sha256"]  # (an older one) has it: the recorded digest would refuse the file first
        (checkpoint / "state.json").write_text(json.dumps(record))
        target, needle = optimizer, f"optimizer state {first}.exp_avg is int64, expected floating point"
    elif damage == "bool-trainable":
        tensors = load_file(str(trainable))
        key = sorted(tensors)[0]
        tensors[key] = tensors[key].bool()
        save_file(tensors, str(trainable))
        target, needle = trainable, f"tensor '{key}' is bool, the model needs float"
    else:
        trainable.write_bytes(b"{}" * 10)
        target, needle = trainable, "not a weight file (neither safetensors nor a PyTorch checkpoint)"
    rc, _, err = run(argv + [str(copy), "--resume"], capsys)
    assert_one_line(rc, err, str(target), needle)


def test_an_unsafe_card_name_is_refused_before_training(puzzle_run, tmp_path, capsys):
    _, argv = puzzle_run
    rc, _, err = run(argv + [str(tmp_path / "r"), "--name", "nl\n"], capsys)
    assert_one_line(rc, err, "'nl\\n' is not a valid encoder name")
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("nl*"))


# --- PathoTune resume -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tune_run(tmp_path_factory):
    """One of two epochs of PathoTune (TVP) on a tiny ViT and 16 image tiles, stopped and checkpointed."""
    root = tmp_path_factory.mktemp("tune")
    card = tiny_vit_card(root, size=32, tokens=2)
    write_class_tiles(root / "data", per_class=8)
    argv = ["tune", "pathotune", "--data", root / "data", "--encoder", card, "--prompts", "tvp", "--epochs", "2",
            "--batch-size", "4", "--workers", "0", "--device", "cpu", "--quiet", "--out"]
    assert main([str(a) for a in argv] + [str(root / "run"), "--stop-after-epochs", "1"]) == 0
    return root / "run", argv


@pytest.mark.parametrize("damage", ["other-lr", "no-rows", "rows-short", "no-resume"])
def test_a_tune_resume_that_does_not_fit_is_one_line(tune_run, tmp_path, capsys, damage):
    run_dir, argv = tune_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    checkpoint = copy / "checkpoints" / "epoch-0001"
    state_path = checkpoint / "state.json"
    state = json.loads(state_path.read_text())
    extra_args = ["--resume"]
    if damage == "other-lr":
        extra_args += ["--lr", "0.01"]
        needles = [f"{checkpoint}: was written by a run with other settings (config.lr: 0.001 -> 0.01)"]
    elif damage == "no-resume":
        extra_args = []
        needles = [f"{copy}: holds checkpoints of an earlier run; pass --resume"]
    else:
        if damage == "no-rows":
            del state["extra"]["rows"]
            needles = [f"{state_path}: not a PathoTune checkpoint record (KeyError('rows'))"]
        else:
            state["extra"]["rows"] = state["extra"]["rows"][:1]
            needles = [f"{state_path}: its 1 log rows and best epoch", "do not fit 1 epochs done"]
        state_path.write_text(json.dumps(state))
    rc, _, err = run(argv + [copy, *extra_args], capsys)
    assert_one_line(rc, err, *needles)
    assert not (copy / "metrics.json").exists()


# --- patch stores read by extraction: errors in loader workers ----------------------------------------


@pytest.fixture()
def tiny_stores(tmp_path):
    """Two patch stores of 100 smooth 32 px tiles; one has random bytes in a tiles chunk."""
    tiles = np.tile(np.arange(0, 256, 8, dtype=np.uint8)[None, :, None, None], (100, 1, 32, 3))
    stores = []
    for name in ("good", "corrupt"):
        stores.append(write_patch_store(
            tmp_path / "tiles" / f"{name}.zarr", coords=np.stack([np.arange(100) * 64, np.zeros(100)], 1),
            tiles=tiles, tissue_fraction=np.ones(100),
            attrs={"tile_size": 32, "tile_size_level0": 64.0, "mpp_target": 0.5, "slide_id": name,
                   "slide_path": f"/synthetic/{name}.svs", "params_hash": name}))
    chunk = sorted(p for p in (stores[1] / "tiles").rglob("*") if p.is_file() and p.name != "zarr.json")[0]
    data = bytearray(chunk.read_bytes())
    data[16:] = np.random.default_rng(1).bytes(len(data) - 16)  # the chunk header stays, the rest is ruined
    chunk.write_bytes(bytes(data))
    return stores[0], stores[1]


def test_a_corrupt_chunk_read_in_a_worker_is_one_line_naming_the_store(tiny_stores, tmp_path, capsys):
    good, corrupt = tiny_stores
    rc, out, err = run(["extract", corrupt, good, "--encoder", "vit-test-tiny", "--out", tmp_path / "f",
                        "--device", "cpu", "--workers", "1", "--batch-size", "64"], capsys)
    assert rc == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("wsitools extract: error:")]
    assert len(errors) == 1 and str(corrupt) in errors[0], err
    assert "1 of 2 stores failed" in err
    assert (tmp_path / "f" / "vit-test-tiny" / "good.h5").is_file()  # the rest of the cohort is done
    assert not (tmp_path / "f" / "vit-test-tiny" / "corrupt.h5").exists()


def test_a_coords_only_store_whose_slide_is_gone_is_one_line(synthetic_svs, tmp_path, capsys):
    slide = tmp_path / "gone.svs"
    shutil.copyfile(synthetic_svs, slide)
    rc, _, err = run(["tile", slide, "--no-pixels", "--out", tmp_path / "tiles", "--mpp", "2", "--tile-size", "32",
                      "--min-region-area", "5000", "--tissue-mpp", "4", "--quiet"], capsys)
    assert rc == 0, err
    slide.unlink()
    store = tmp_path / "tiles" / "gone.zarr"
    rc, _, err = run(["extract", store, "--encoder", "vit-test-tiny", "--out", tmp_path / "f",
                      "--device", "cpu", "--workers", "1", "--quiet"], capsys)
    assert rc == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("wsitools extract: error:")]
    assert len(errors) == 1 and str(store) in errors[0] and "gone.svs" in errors[0], err


# --- feature stores in train and predict ----------------------------------------------------------------


def _write_task(path: Path, classes: dict[str, str]) -> Path:
    path.write_text(yaml.safe_dump({**TASK, "classes": classes}))
    return path


def _labels(path: Path, bags, *, extra: list[tuple[str, str]] = ()) -> Path:
    rows = [f"{b.slide_id},{b.label},{b.patient_id}" for b in bags] + [f"{s},{label},{s}" for s, label in extra]
    path.write_text("slide_id,label,patient_id\n" + "\n".join(rows) + "\n")
    return path


FAST_TRAIN = ["--head", "meanpool", "--folds", "2", "--epochs", "2", "--patience", "1", "--bootstrap", "0",
              "--device", "cpu", "--quiet"]


@pytest.fixture()
def cohort_dir(tmp_path):
    bags = make_bag_cohort(tmp_path / "features", n_slides=12, n_tiles=(10, 20), dim=8, seed=2)
    for b in bags:
        set_attrs(b.path, encoder="enc-a", encoder_hash="a" * 64, weight_sha256="backbone:1")
    return tmp_path, bags


def test_string_features_skip_that_slide_in_train_and_predict(cohort_dir, capsys, caplog):
    root, bags = cohort_dir
    bad = bags[0].path
    with h5py.File(bad, "a") as f:
        n = f["features"].shape[0]
        del f["features"]
        f.create_dataset("features", data=np.array([[b"x"] * 8] * n))
    labels = _labels(root / "labels.csv", bags)
    task = _write_task(root / "task.yaml", TASK["classes"])
    rc, out, err = run(["train", "--features", root / "features", "--labels", labels, "--task", task,
                        "--out", root / "heads", *FAST_TRAIN], capsys)
    assert rc == 0, err
    run_json = json.loads((root / "heads" / "run.json").read_text())
    assert list(run_json["skipped"]) == [bags[0].slide_id]
    assert "expected floating point" in run_json["skipped"][bags[0].slide_id]
    assert "skipped 1 slides" in err
    # the heads record the encoder of their training features
    config = json.loads((root / "heads" / "fold_0" / "config.json").read_text())
    assert (config["encoder"], config["encoder_hash"], config["encoder_weights"]) == ("enc-a", "a" * 64, "backbone:1")
    rc, out, err = run(["predict", "--model", root / "heads", "--features", root / "features",
                        "--out", root / "pred", "--device", "cpu", "--quiet"], capsys)
    assert rc == 0, err
    predicted = (root / "pred" / "predictions.csv").read_text()
    assert bags[0].slide_id not in predicted and bags[1].slide_id in predicted
    assert "expected floating point" in json.loads((root / "pred" / "predict.json").read_text())["skipped"][bags[0].slide_id]


def test_predict_refuses_features_of_another_encoder_naming_both(head_dir, bags, tmp_path, capsys):
    for b in bags:
        set_attrs(b.path, encoder="enc-b", encoder_hash="b" * 64)
    rc, _, err = run(["predict", "--model", head_dir, "--features", tmp_path / "features",
                      "--out", tmp_path / "pred", "--device", "cpu", "--quiet"], capsys)
    assert_one_line(rc, err, "features of encoder enc-b (hash bbbbbbbbbbbb)",
                    f"the head {head_dir} was trained on features of encoder enc-a (hash aaaaaaaaaaaa)")
    assert not (tmp_path / "pred").exists()


def test_same_name_other_weights_is_another_encoder(head_dir, bags, tmp_path, capsys):
    set_attrs(bags[3].path, encoder_hash="c" * 64)  # one store re-extracted with other weights
    rc, _, err = run(["predict", "--model", head_dir, "--features", tmp_path / "features",
                      "--out", tmp_path / "pred", "--device", "cpu", "--quiet"], capsys)
    assert rc == 0, err  # a stray store is skipped, naming it; the others are predicted
    predicted = (tmp_path / "pred" / "predictions.csv").read_text()
    assert bags[3].slide_id not in predicted and all(b.slide_id in predicted for b in bags[:3])
    reason = json.loads((tmp_path / "pred" / "predict.json").read_text())["skipped"][bags[3].slide_id]
    assert str(bags[3].path) in reason and "enc-a (hash cccccccccccc)" in reason
    rc, _, err = run(["predict", "--model", head_dir, "--features", tmp_path / "features", "--strict",
                      "--out", tmp_path / "strict", "--device", "cpu", "--quiet"], capsys)
    assert_one_line(rc, err, str(bags[3].path), "enc-a (hash cccccccccccc)")


def test_heads_without_an_encoder_record_still_predict(head_dir, bags, tmp_path, capsys, caplog):
    config = json.loads((head_dir / "config.json").read_text())
    for key in ("encoder_hash", "encoder_weights"):
        del config[key]
    (head_dir / "config.json").write_text(json.dumps(config))
    rc, _, err = run(["predict", "--model", head_dir, "--features", tmp_path / "features",
                      "--out", tmp_path / "pred", "--device", "cpu", "--quiet"], capsys)
    assert rc == 0, err
    assert "records no encoder checksum" in caplog.text
    assert len((tmp_path / "pred" / "predictions.csv").read_text().splitlines()) == 1 + len(bags)
    for b in bags:  # by name, a recorded name still has to match
        set_attrs(b.path, encoder="enc-b")
    rc, _, err = run(["predict", "--model", head_dir, "--features", tmp_path / "features",
                      "--out", tmp_path / "pred2", "--device", "cpu", "--quiet"], capsys)
    assert_one_line(rc, err, "features of encoder enc-b", "trained on features of encoder enc-a")


def test_a_task_class_without_labelled_slides_is_an_error_unless_allowed(cohort_dir, capsys, caplog):
    root, bags = cohort_dir
    labels = _labels(root / "labels.csv", bags)
    task = _write_task(root / "task.yaml", {**TASK["classes"], "rare": "a class nobody labelled"})
    argv = ["train", "--features", root / "features", "--labels", labels, "--task", task, *FAST_TRAIN]
    rc, _, err = run(argv + ["--out", root / "heads"], capsys)
    assert_one_line(rc, err, "task classes without a usable labelled slide: 'rare' (no labelled slide)",
                    "--allow-empty-classes")
    assert not (root / "heads").exists()
    rc, _, err = run(argv + ["--out", root / "heads", "--allow-empty-classes"], capsys)
    assert rc == 0, err
    assert "'rare' (no labelled slide)" in caplog.text
    # a class whose only labelled slide is unusable is named as such
    (root / "features" / "extra.h5").write_bytes(b"not h5")
    rc, _, err = run(argv + ["--out", root / "heads2"], capsys)
    assert rc == 2
    labels = _labels(root / "labels2.csv", bags, extra=[("extra", "rare")])
    argv[argv.index("--labels") + 1] = labels
    rc, _, err = run(argv + ["--out", root / "heads3"], capsys)
    assert_one_line(rc, err, "'rare' (1 labelled, none usable)")


# --- slide ids from any file name ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, slide_id",
    [
        ("Biopsie Müller 3.svs", "Biopsie_Muller_3"),
        ("case#1 (HE).mrxs", "case_1_HE"),
        ("Łódź straße.ndpi", "Lodz_strasse"),
        (".hidden..scan.tiff", "hidden.scan"),
        ("scan.ome.tiff", "scan"),
        ("nl\n.svs", "nl"),
        ("切片.svs", "slide-" + __import__("hashlib").sha256("切片".encode()).hexdigest()[:8]),
    ],
)
def test_any_file_name_gives_a_safe_slide_id(name, slide_id):
    assert slide_id_from_path(name) == slide_id == check_slide_id(slide_id)


def test_a_very_long_name_keeps_distinct_ids():
    a, b = slide_id_from_path("x" * 250 + "a.svs"), slide_id_from_path("x" * 250 + "b.svs")
    assert a != b and len(a) <= 200 and len(b) <= 200


def test_names_become_paths_only_as_full_matches():
    for bad in ("nl\n", "ok\n", "a/b", "..", "-x"):
        with pytest.raises(ValueError, match="unsafe slide id"):
            check_slide_id(bad)
        with pytest.raises(ModelError, match="is not a valid encoder name"):
            from wsitools.encoders.cards import find_card

            find_card(bad if "/" not in bad else "a:b")


def test_workflow_schema_names_are_full_matches():
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    schema = str(REPO / "workflow" / "schemas" / "config.schema.yaml")
    for change in ({"tasks": {"nl\n": {"task_file": "t.yaml"}}}, {"heads": {"h\n": {"type": "abmil"}}},
                   {"features": {"encoders": ["enc\n"]}}, {"pretrain": {"name": "p\n"}}):
        with pytest.raises(WorkflowError, match="does not match"):
            validate(dict(change), schema)
    with pytest.raises(WorkflowError, match="less than the minimum of 0.05"):
        validate({"tiling": {"mpp": 0.0005}}, schema)


def test_predict_refuses_an_unsafe_slide_id(head_dir, bags, tmp_path, capsys):
    rc, _, err = run(["predict", "--model", head_dir, "--features", tmp_path / "features",
                      "--out", tmp_path / "pred", "--slides", "nl\n", "--quiet"], capsys)
    assert_one_line(rc, err, "unsafe slide id 'nl\\n'")


def test_slide_glob_with_spaces_and_accents_and_a_collision(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("slides").mkdir()
    for name in ("scan 1.svs", "Müller.svs", "plain.svs"):
        (Path("slides") / name).write_bytes(b"x")
    samples = samples_from_glob("slides/*.svs")
    assert {s.slide_id: s.path for s in samples} == {
        "Muller": "slides/Müller.svs", "plain": "slides/plain.svs", "scan_1": "slides/scan 1.svs"}
    (Path("slides") / "scan_1.svs").write_bytes(b"x")
    with pytest.raises(DataError, match=r"duplicate slide id 'scan_1' \(slides/scan 1\.svs and slides/scan_1\.svs\)"):
        samples_from_glob("slides/*.svs")


def test_heatmap_finds_a_slide_by_its_derived_id(tmp_path):
    from wsitools.cli.mil import _slide_for, _slides_by_id

    for name in ("scan 1 (HE).svs", "scan_1_HE.qc.json", "other.svs"):
        (tmp_path / name).write_bytes(b"x")
    slides = _slides_by_id(str(tmp_path))
    assert _slide_for(str(tmp_path), "scan_1_HE", 2, slides) == tmp_path / "scan 1 (HE).svs"
    with pytest.raises(DataError, match="no slide file named missing"):
        _slide_for(str(tmp_path), "missing", 2, slides)


@pytest.mark.parametrize("names, message", [
    (("scan 1.svs", "scan_1.svs"), "duplicate slide id 'scan_1' ({a} and {b}); rename one of them"),
    # one store folder where case is ignored (macOS, Windows)
    (("Slide_1.svs", "slide_1.svs"), "slide ids 'Slide_1' ({a}) and 'slide_1' ({b}) differ only in case; their "
     "outputs would be one file where case is ignored (macOS, Windows): rename one"),
])
def test_tile_refuses_two_files_with_one_id_naming_both(tmp_path, capsys, names, message):
    a, b = (tmp_path / name for name in names)
    for p in (a, b):
        shutil.copyfile(FIXTURES / "small.svs", p)
    rc, _, err = run(["tile", a, b, "--out", tmp_path / "t", "--quiet"], capsys)
    assert_one_line(rc, err, message.format(a=a, b=b))
    assert list((tmp_path / "t").iterdir()) == []  # refused before any slide was tiled


# --- resolutions ----------------------------------------------------------------------------------------


def test_target_mpp_is_bounded_like_a_slides(synthetic_svs, tmp_path, capsys):
    from wsitools.tiling import TilingParams

    with pytest.raises(ValueError, match="target mpp must be from 0.05 to 20"):
        TilingParams(mpp=0.0005)
    # a magnification is bounded the same way once the slide says what it means
    rc, out, err = run(["tile", synthetic_svs, "--magnification", "4000", "--out", tmp_path / "t", "--quiet"], capsys)
    assert rc == 1
    qc = json.loads((tmp_path / "t" / "synth_svs.qc.json").read_text())
    assert qc["status"] == "failed" and "outside 0.05-20 um/px" in qc["reason"]


def test_an_undecodable_slide_reports_its_compression_not_its_mpp(tmp_path, capsys):
    rc, out, err = run(["tile", FIXTURES / "unopenable.tiff", "--mpp-override", "0.5", "--out", tmp_path / "t",
                        "--quiet"], capsys)
    assert rc == 1
    qc = json.loads((tmp_path / "t" / "unopenable.qc.json").read_text())
    assert qc["status"] == "failed" and "52479" in qc["reason"] and "mpp" not in qc["reason"]
    rc, _, err = run(["info", FIXTURES / "unopenable.tiff"], capsys)
    assert_one_line(rc, err, "unopenable.tiff: no backend can open it", "52479")
    with pytest.raises(SlideError, match="implausible"):
        from wsitools.slide import open_slide

        open_slide(FIXTURES / "boxes.tiff")


# --- the workflow: checked when the job graph is built ----------------------------------------------------


def _project(root: Path, *, patients: int = 4, labels=("neg", "pos"), config: dict | None = None,
             names: list[str] | None = None) -> Path:
    (root / "slides").mkdir(parents=True)
    (root / "config").mkdir()
    rows = ["slide_id\tpath\tpatient_id\tlabel"]
    for i in range(2 * patients):
        name = names[i] if names else f"s{i}.svs"
        shutil.copyfile(FIXTURES / "small.svs", root / "slides" / name)
        rows.append(f"s{i}\tslides/{name}\tp{i}\t{labels[i % len(labels)]}")
    (root / "config" / "samples.tsv").write_text("\n".join(rows) + "\n")
    (root / "config" / "task.yaml").write_text(yaml.safe_dump(TASK))
    base = {"samples": "config/samples.tsv", "device": "cpu",
            "tasks": {"planted": {"task_file": "config/task.yaml"}},
            "heads": {"abmil": {"type": "abmil", "folds": 2}}}
    base.update(config or {})
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(base))
    return root


def _dry_run(work: Path) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_command(work, "-n"), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"config": {"features": {"encoders": ["no-such-encoder"]}}},
         "config: features: encoders: no-such-encoder: "),
        ({"config": {"heads": {"abmil": {"type": "abmil", "folds": 5}}}},
         "config: heads: abmil: folds: 5-fold cross-validation of task 'planted' needs at least 5 patients of "
         "each class and, in every fold's training part, two of one class to hold one out for validation, but in "
         "column 'label' of config/samples.tsv 'neg' has 4 patients, 'pos' has 4 patients; "
         "set `heads: abmil: folds` to 4"),
        ({"labels": ("neg", "pos", "Pos")},
         "config: tasks: planted: labels in column 'label' of config/samples.tsv that are not classes of "
         "config/task.yaml (neg, pos): 'Pos'"),
        ({"labels": ("neg",)}, "config: tasks: planted: class 'pos' of config/task.yaml has no labelled slide"),
        ({"labels": ("neg", "pos", "NA"), "config": {"tasks": {"planted": {}}}},
         "config: tasks: planted: column 'label' of config/samples.tsv: label 'NA' (slide s2) looks like a missing "
         "value, which would make it a class; leave the cell empty for a slide without a label, or list the "
         "classes in a task file"),
        ({"config": {"tasks": {"planted": {"task_file": "config/nope.yaml"}}}},
         "config: task 'planted': task description config/nope.yaml: no such file"),
        ({"config": {"tasks": {"planted": {"task_file": "config"}}}},
         "config: task 'planted': task description config: is a directory, expected a YAML file"),
        ({"config": {"samples": "config"}}, "samples sheet config: is a directory, expected a TSV file"),
    ],
)
def test_workflow_config_and_labels_fail_before_any_job(tmp_path, kwargs, message):
    result = _dry_run(_project(tmp_path / "w", **kwargs))
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "Job stats" not in result.stdout


def test_workflow_slide_glob_with_odd_file_names_runs(tmp_path):
    work = _project(tmp_path / "w", names=["scan 1.svs", "Müller.svs", "a.svs", "b.svs", "c.svs", "d.svs",
                                           "e.svs", "f.svs"],
                    config={"samples": "", "slides_glob": "slides/*.svs", "tasks": {}, "heads": {}})
    result = _dry_run(work)
    assert result.returncode == 0, result.stderr
    assert "results/tiles/scan_1.qc.json" in result.stdout and "results/tiles/Muller.qc.json" in result.stdout


def test_a_task_left_without_classes_by_qc_ends_with_one_line(tmp_path):
    """Every slide of the task fails QC: the labels job ends with one line naming the task, in its
    log and in the run's output (no traceback), and the QC summary still says why."""
    work = _project(tmp_path / "w", patients=1)
    for name in ("s0.svs", "s1.svs"):
        shutil.copyfile(FIXTURES / "unreadable.svs", work / "slides" / name)
    sheet = (work / "config" / "samples.tsv").read_text().splitlines()  # own splits: no fold check
    sheet = [sheet[0] + "\tsplit"] + [row + "\ttrain" for row in sheet[1:]]
    (work / "config" / "samples.tsv").write_text("\n".join(sheet) + "\n")
    result = subprocess.run(snakemake_command(work, "--cores", "2"), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    message = ("task 'planted': config: tasks: planted: classes 'neg', 'pos' of config/task.yaml have no labelled "
               "slide in column 'label' of config/samples.tsv; label slides of them, remove them from the task "
               "file, or add --allow-empty-classes to the heads' extra_args (after QC; results/qc/summary.tsv says why slides "
               "were left out)")
    assert result.returncode != 0
    assert message in output and "Traceback" not in output
    assert (work / "logs" / "labels" / "planted.log").read_text() == message + "\n"
    assert not (work / "results" / "heads" / "planted" / "labels.tsv").exists()
    assert "QC: 2 slides: 2 failed" in output

def test_a_missing_value_marker_is_a_label_only_when_a_task_file_lists_it():
    samples = [Sample(slide_id=f"s{i}", path="x", patient_id=f"p{i}", fields={"label": lab})
               for i, lab in enumerate(["a", "a", "a", "a", "b", "b", "n/a", "N/A"])]
    with pytest.raises(DataError, match=r"label 'n/a' \(slide s6\) looks like a missing value"):
        check_task_labels(samples, task="t", label_column="label", classes=None, folds={"h": 2}, sheet="s.tsv")
    with pytest.raises(DataError, match=r"not classes of the task \(a, b\): 'n/a' \(slides s6\); 'N/A' \(slides s7\)"):
        check_task_labels(samples, task="t", label_column="label", classes=["a", "b"], folds={"h": 2}, sheet="s.tsv")
    check_task_labels(samples[:6] + [Sample("s6", "x", "p6", fields={"label": "N/A"}),
                                     Sample("s7", "x", "p7", fields={"label": "N/A"})],
                      task="t", label_column="label", classes=["a", "b", "N/A"], folds={"h": 2}, sheet="s.tsv")

def test_the_workflow_check_takes_plus_and_minus_as_classes_and_an_empty_cell_as_no_label():
    samples = [Sample(slide_id=f"s{i}", path="x", patient_id=f"p{i}", fields={"er": lab})
               for i, lab in enumerate(["+", "+", "+", "+", "-", "-", ""])]
    check_task_labels(samples, task="er", label_column="er", classes=None, folds={"h": 2}, sheet="s.tsv")
    samples[6] = Sample(slide_id="s6", path="x", patient_id="p6", fields={"er": "<NA>"})
    with pytest.raises(DataError, match=r"^config: tasks: er: column 'er' of s.tsv: label '<NA>' \(slide s6\) looks "
                       r"like a missing value, which would make it a class; leave the cell empty for a slide"):
        check_task_labels(samples, task="er", label_column="er", classes=None, folds={"h": 2}, sheet="s.tsv")


def test_check_task_labels_counts_patients_not_slides():
    # two slides a patient: 4 patients of 'a' and 2 of 'b' (8 and 4 slides)
    samples = [Sample(slide_id=f"s{i}", path="x", patient_id=f"p{i // 2}", fields={"label": "a" if i < 8 else "b"})
               for i in range(12)]
    check_task_labels(samples, task="t", label_column="label", classes=None, folds={"h": 2}, sheet="s.tsv")
    with pytest.raises(DataError, match=r"heads: h: folds: 3-fold .* 'a' has 4 patients, 'b' has 2 patients; "
                                        r"set `heads: h: folds` to 2"):
        check_task_labels(samples, task="t", label_column="label", classes=None, folds={"h": 3},
                                 sheet="s.tsv")
    split = [Sample(s.slide_id, s.path, s.patient_id, fields={**s.fields, "split": "train"}) for s in samples]
    check_task_labels(split, task="t", label_column="label", classes=None, folds={"h": 3}, sheet="s.tsv")
    with pytest.raises(WsiToolsError, match=re.escape("class 'c' of the task has no labelled slide")):
        check_task_labels(samples, task="t", label_column="label", classes=["a", "b", "c"],
                                 folds={"h": 2}, sheet="s.tsv")
