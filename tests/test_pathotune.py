"""Patch-level PathoTune: prompt subsets, data sources, tuning on two textures, the tuned encoder."""

from __future__ import annotations

import csv
import re
import dataclasses
import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from wsitools.encoders import load_encoder
from wsitools.errors import ConfigError, DataError, ModelError, StoreError, WsiToolsError
from wsitools.pathotune import data as pathotune_data
from wsitools.pathotune import (
    PROMPT_KINDS,
    PathoTuneConfig,
    PathoTunePrompts,
    PathoTuneTrainConfig,
    PathoTuneViT,
    folder_tiles,
    load_pathotune,
    load_pathotune_encoder,
    parse_prompts,
    store_tiles,
    stratified_split,
    tune_pathotune,
)
from wsitools.store import PatchStore, write_patch_store
from wsitools.text import task_from_dict

CARD = """name: {name}
description: tiny prompted ViT at {size} px for PathoTune tests
architecture:
  model: prompted_vit_test_patch16_224
  kwargs: {{img_size: {size}}}
  prompts: {{tokens: 4, mode: deep}}
  init_seed: {seed}
weights: []
input: {{size: {size}, normalize: {norm}}}
output: {{kind: cls, dim: 64}}
precision: {{compute: bf16}}
"""

TASK = task_from_dict({
    "name": "textures",
    "description": "two synthetic textures",
    "classes": {"stripes": "dark pink parallel stripes", "spots": "bright blue round spots"},
})


def _texture(kind: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "stripes":
        s = 0.5 + 0.5 * np.sin(rng.uniform(0.3, 0.6) * xx + rng.uniform(0, 6))
        img = np.stack([90 + 80 * s, 30 + 40 * s, 70 + 60 * s], -1)
    else:
        s = 0.5 + 0.5 * np.sin(0.4 * xx + rng.uniform(0, 6)) * np.sin(0.4 * yy + rng.uniform(0, 6))
        img = np.stack([170 + 50 * s, 160 + 40 * s, 230 - 20 * s], -1)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pathotune")
    cards = {}
    for name, size, seed, norm in (("vit-a", 64, 0, "null"), ("vit-b", 32, 1, "{mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}")):
        cards[name] = root / f"{name}.yaml"
        cards[name].write_text(CARD.format(name=name, size=size, seed=seed, norm=norm))
    rng = np.random.default_rng(0)
    for kind in ("stripes", "spots"):
        (root / "data" / kind).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(_texture(kind, rng)).save(root / "data" / kind / f"{i:02d}.png")
    # the same kind of tiles in two patch stores, labelled by a table
    rows = []
    for s, sid in enumerate(("S1", "S2")):
        kinds = ["stripes", "spots"] * 8
        tiles = np.stack([_texture(k, rng) for k in kinds])
        coords = np.stack([np.arange(16) * 128 + s, np.full(16, 7)], 1)
        write_patch_store(root / "tiles" / f"{sid}.zarr", coords=coords, tiles=tiles,
                          tissue_fraction=np.ones(16),
                          attrs={"slide_id": sid, "slide_path": f"/synthetic/{sid}.svs", "params_hash": f"h-{sid}",
                                 "tile_size": 64, "tile_size_level0": 128.0, "mpp_target": 0.5})
        rows += [(sid, int(x), int(y), k) for (x, y), k in zip(coords, kinds)]
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "x", "y", "label"])
        w.writerows(rows)
    return root, cards


def _text(n_classes: int = 2, dim: int = 16) -> np.ndarray:
    return np.random.default_rng(5).normal(size=(1 + n_classes, dim)).astype(np.float32)


SUBSETS = [c for r in (1, 2, 3) for c in itertools.combinations(PROMPT_KINDS, r)]


@pytest.mark.parametrize("subset", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_each_prompt_subset_runs_and_trains_only_its_parts(setup, subset):
    _, cards = setup
    backbone = load_encoder(str(cards["vit-a"]), device="cpu")
    ivp = load_encoder(str(cards["vit-b"]), device="cpu") if "ivp" in subset else None
    config = PathoTuneConfig(prompts=subset, classes=("a", "b"), embed_dim=64, depth=3,
                             text_dim=16 if "ttp" in subset else None, ivp_dim=64 if ivp else None)
    prompts = PathoTunePrompts(config)
    if "ttp" in subset:
        prompts.set_text_embeddings(torch.from_numpy(_text()))
    model = PathoTuneViT(backbone, prompts, ivp=ivp).train()
    frozen = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    x = torch.rand(4, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (4, 2)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1])).backward()
    groups = {"tvp": "tvp", "ttp": "ttp_", "ivp": "ivp_refine."}
    names = {n for n, _ in prompts.named_parameters()}
    for kind, prefix in groups.items():
        assert any(n.startswith(prefix) for n in names) == (kind in subset)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in prompts.named_parameters())
    assert all(p.grad is None for p in backbone.model.parameters())
    assert all(torch.equal(backbone.model.state_dict()[k], v) for k, v in frozen.items())
    # the prompted CLS differs from the frozen model's own feature
    with torch.no_grad():
        assert (model.eval().forward_features(x)[:, 0] - backbone.forward_batch(x)).abs().max() > 1e-4


def test_parse_prompts_and_config_errors():
    assert parse_prompts("ivp, TVP") == ("tvp", "ivp")
    with pytest.raises(ModelError, match="subset of tvp,ttp,ivp"):
        parse_prompts("tvp,xyz")
    with pytest.raises(ConfigError, match="TTP prompts need text_dim"):
        PathoTuneConfig(prompts=("ttp",), classes=("a", "b"), embed_dim=64, depth=3)


def test_data_sources_and_split(setup, tmp_path):
    root, _ = setup
    tiles = folder_tiles(root / "data")
    assert tiles.classes == ("spots", "stripes") and len(tiles) == 40 and tiles.split is None
    assert tiles.read(0).shape == (64, 64, 3)
    relabelled = tiles.relabel(("stripes", "spots"))
    assert (relabelled.labels == 1 - tiles.labels).all()
    split = stratified_split(tiles.labels, val_fraction=0.2, test_fraction=0.1, seed=0)
    for c in (0, 1):
        counts = {s: int(((split == s) & (tiles.labels == c)).sum()) for s in ("train", "val", "test")}
        assert counts == {"train": 14, "val": 4, "test": 2}
    rare = np.array([0] * 30 + [1, 1])  # a class of two tiles cannot be in train, val and test
    with pytest.raises(DataError, match=r"^class 'rare' has only 2 tiles: too few to split into train/val/test \(3 at"):
        stratified_split(rare, val_fraction=0.2, test_fraction=0.1, seed=0, classes=("common", "rare"))
    assert (stratified_split(rare, val_fraction=0.2, test_fraction=0.0, seed=0) == "val").sum() == 7
    empty = tmp_path / "classes"
    for name in ("a", "b"):
        (empty / name).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(empty / "a" / "0.png")
    with pytest.raises(DataError, match=rf"^{empty / 'b'}: class folder without images"):
        folder_tiles(empty)
    table = store_tiles(root / "labels.csv", [root / "tiles"])
    assert len(table) == 32 and table.classes == ("spots", "stripes")
    # the table's tile is the store's tile at those coordinates
    assert table.names[3] == "S1:384:7"
    from wsitools.store import PatchStore

    assert np.array_equal(table.read(3), PatchStore.open(root / "tiles" / "S1.zarr").read_tiles(np.array([3]))[0])
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,x,y,label\nS1,5,7,spots\nS1,0,7,stripes\n")
    with pytest.raises(DataError, match=r"line 2: no tile at \(5, 7\)"):
        store_tiles(bad, [root / "tiles"])
    bad.write_text("slide_id,x,y,label\nS9,0,7,spots\nS1,0,7,stripes\n")
    with pytest.raises(DataError, match="slide 'S9' has no patch store"):
        store_tiles(bad, [root / "tiles"])
    # a second store of slide S1 (another tiling folder): the table's ids would name either
    shutil.copytree(root / "tiles" / "S1.zarr", tmp_path / "other" / "S1.zarr")
    with pytest.raises(DataError, match=r"S1.zarr and .*other/S1.zarr both hold slide 'S1'; give one of them"):
        store_tiles(root / "labels.csv", [root / "tiles", tmp_path / "other"])
    with pytest.raises(StoreError, match=r"missing: not a patch store \(\*.zarr\) nor a folder of patch stores"):
        store_tiles(root / "labels.csv", [tmp_path / "missing"])
    # a predefined split from train/ val/ folders
    for part in ("train", "val"):
        for kind in ("a", "b"):
            (tmp_path / "pre" / part / kind).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "pre" / part / kind / "x.png")
    pre = folder_tiles(tmp_path / "pre")
    assert sorted(pre.split.tolist()) == ["train"] * 2 + ["val"] * 2


def test_tuning_beats_the_untrained_head_and_serves_as_encoder(setup):
    root, cards = setup
    out = root / "tuned"
    # 10 epochs of 3 steps: every backbone init_seed 0-11 reaches balanced accuracy 1.0 (at 4 epochs
    # of 2 steps some rank the tiles right but have not yet moved the threshold)
    config = PathoTuneTrainConfig(epochs=10, batch_size=8, lr=1e-2, warmup_epochs=0, num_workers=0,
                                  val_fraction=0.2, test_fraction=0.2)
    result = tune_pathotune(folder_tiles(root / "data"), out, backbone=str(cards["vit-a"]), task=TASK,
                            text_embeddings=_text(), config=config, device="cpu", progress=False)
    assert result.best["balanced_accuracy"] >= 0.9
    assert result.best["balanced_accuracy"] > result.untrained["balanced_accuracy"]
    assert result.best["loss"] < result.untrained["loss"]
    assert result.test is not None and result.test["n"] == 8 and result.test["auroc"] >= 0.9
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == ["stripes", "spots"]  # the task's order
    assert metrics["n_tiles"] == {"train": 24, "val": 8, "test": 8}
    with open(out / "predictions.csv") as f:
        reader = csv.DictReader(f)
        preds = list(reader)
    assert len(preds) == 8 and {p["split"] for p in preds} == {"test"}
    # one probability column per class, named as the MIL heads name them, in the task's order
    assert reader.fieldnames == ["name", "split", "label", "prob_stripes", "prob_spots"]
    assert all(abs(float(p["prob_stripes"]) + float(p["prob_spots"]) - 1.0) < 1e-5 for p in preds)
    with open(out / "log.csv") as f:
        assert len(list(csv.DictReader(f))) == 11  # untrained + 10 epochs
    # the tuned model reloads to the same predictions, and as an encoder gives prompted features
    tuned = load_pathotune(result.card, device="cpu")
    assert tuned.meta["task"]["name"] == "textures"
    enc = load_pathotune_encoder(result.card, device="cpu")
    plain = load_encoder(str(cards["vit-a"]), device="cpu")
    tiles = torch.from_numpy(np.stack([np.array(Image.open(p)) for p in sorted((root / "data" / "spots").glob("*.png"))[:4]]))
    f_tuned, f_plain = enc.encode(tiles), plain.encode(tiles)
    assert f_tuned.shape == (4, 64) and (f_tuned - f_plain).abs().max() > 1e-3
    assert enc.name == result.card.stem and enc.encoder_hash != plain.encoder_hash
    with torch.no_grad():
        x = enc.preprocess(tiles)
        assert torch.allclose(tuned.model.forward_features(x)[:, 0], f_tuned, atol=1e-5)
    # the generic encoder loader (what `wsitools extract --encoder CARD` uses) takes the card too
    via_loader = load_encoder(str(result.card), device="cpu")
    assert via_loader.encoder_hash == enc.encoder_hash
    assert torch.allclose(via_loader.encode(tiles), f_tuned, atol=1e-6)
    # PuzzleTuning starts from a backbone card: a tuned one is refused before any training
    from wsitools.puzzle.backbone import load_puzzle_backbone
    from wsitools.puzzle.shuffle import PuzzleError

    with pytest.raises(PuzzleError, match=r"PuzzleTuning starts from a backbone card .*, not a pathotune card$"):
        load_puzzle_backbone(result.card, device="cpu")
    # a card edited to hold a key twice is refused, not read with the last one
    lines = result.card.read_text().splitlines()
    twice = result.card.with_name("twice.yaml")
    twice.write_text("\n".join([lines[0], *lines]) + "\n")
    with pytest.raises(ModelError, match=rf"twice\.yaml: not a readable card \(key '{lines[0].split(':')[0]}' appears twice"):
        load_pathotune(twice, device="cpu")


def test_resumed_tuning_ends_bit_for_bit_as_an_uninterrupted_run(setup):
    from safetensors.torch import load_file

    root, cards = setup
    data = folder_tiles(root / "data")
    config = PathoTuneTrainConfig(epochs=4, batch_size=8, lr=1e-2, num_workers=0, val_fraction=0.2, test_fraction=0.2)

    def tune(out, **kw):
        return tune_pathotune(data, root / out, backbone=str(cards["vit-a"]), task=TASK, text_embeddings=_text(),
                              config=kw.pop("config", config), device="cpu", progress=False, name="res", **kw)

    whole = tune("whole")
    part = tune("parts", stop_after_epochs=2)
    assert (part.epochs_done, part.card, part.weights, part.test) == (2, None, None, None)
    assert part.untrained == whole.untrained
    names = sorted(p.name for p in (root / "parts").iterdir())
    assert names == ["checkpoints", "log.csv"]  # nothing that looks finished
    assert [p.name for p in sorted((root / "parts" / "checkpoints").iterdir())] == ["epoch-0001", "epoch-0002"]
    with open(root / "parts" / "log.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2]
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run; pass --resume"):
        tune("parts")
    other = PathoTuneTrainConfig(epochs=4, batch_size=8, lr=2e-2, num_workers=0, val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(ConfigError) as err:
        tune("parts", config=other, resume=True)
    assert str(err.value).startswith(f"{root / 'parts' / 'checkpoints' / 'epoch-0002'}: was written by a run "
                                     "with other settings (config.lr: 0.01 -> 0.02); ")
    third = tune("parts", resume=True, stop_after_epochs=3)  # a second interruption
    assert third.epochs_done == 3 and third.card is None
    state = json.loads((root / "parts" / "checkpoints" / "epoch-0003" / "state.json").read_text())
    assert [r["epoch"] for r in state["extra"]["rows"]] == [0, 1, 2, 3]  # read back, saved again as written
    assert {type(r["epoch"]) for r in state["extra"]["rows"]} == {int}
    rest = tune("parts", resume=True, config=dataclasses.replace(config, num_workers=2))  # workers may change
    assert rest.epochs_done == 4 and rest.best_epoch == whole.best_epoch
    assert (rest.best, rest.test) == (whole.best, whole.test)
    for name in ("log.csv", "metrics.json", "predictions.csv", "split.csv"):
        assert (root / "parts" / name).read_text() == (root / "whole" / name).read_text(), name
    a, b = load_file(root / "whole" / "pathotune.safetensors"), load_file(root / "parts" / "pathotune.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a finished run resumed again writes the same results without training
    again = tune("parts", resume=True)
    assert again.epochs_done == 4 and again.best == whole.best
    assert (root / "parts" / "log.csv").read_text() == (root / "whole" / "log.csv").read_text()
    # a best epoch before the interruption is kept through it (here a rate so high that the
    # untrained head stays the best)
    wild = dataclasses.replace(config, epochs=3, lr=1.0, warmup_epochs=0)
    whole, _ = tune("wild-whole", config=wild), tune("wild-parts", config=wild, stop_after_epochs=1)
    rest = tune("wild-parts", config=wild, resume=True)
    assert whole.best_epoch == rest.best_epoch == 0 and rest.best == whole.best == whole.untrained
    a, b = load_file(root / "wild-whole" / "pathotune.safetensors"), load_file(root / "wild-parts" / "pathotune.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ivp_from_a_second_encoder_on_store_tiles(setup):
    root, cards = setup
    data = store_tiles(root / "labels.csv", [root / "tiles"])
    config = PathoTuneTrainConfig(prompts=("ivp",), epochs=1, batch_size=8, num_workers=0)
    result = tune_pathotune(data, root / "ivp", backbone=str(cards["vit-a"]),
                            ivp_encoder=str(cards["vit-b"]), config=config, device="cpu", progress=False)
    meta = json.loads((root / "ivp" / "pathotune.json").read_text())
    assert meta["ivp"]["source"] == "card" and meta["ivp"]["name"] == "vit-b"
    assert meta["config"]["ivp_dim"] == 64 and meta["config"]["prompts"] == ["ivp"]
    assert meta["tile_geometries"] == {"64 px tiles at 0.5 um/px": 2}  # the tiles' size and resolution
    from wsitools.encoders import read_card

    assert read_card(result.card).description.endswith(
        "Tuned on tiles of 2 patch stores (64 px tiles at 0.5 um/px: 2).")
    enc = load_pathotune_encoder(result.card, device="cpu")
    assert enc.encode(torch.from_numpy(data.read(0))[None]).shape == (1, 64)
    # feature extraction with the tuned encoder writes the prompted features
    from wsitools.feature_store import FeatureStore
    from wsitools.features import extract_features

    fs = FeatureStore.open(extract_features(root / "tiles" / "S1.zarr", enc, root / "features", workers=0).path)
    feats, _ = fs.load()
    assert fs.attrs["encoder"] == result.card.stem and fs.attrs["encoder_hash"] == enc.encoder_hash
    first = enc.encode(torch.from_numpy(data.read(0))[None])
    assert np.allclose(np.asarray(feats[0], np.float32), first[0].numpy(), atol=1e-4)
    # a changed IVP encoder card is caught
    cards["vit-b"].write_text(cards["vit-b"].read_text().replace("init_seed: 1", "init_seed: 2"))
    try:
        with pytest.raises(ModelError, match="IVP encoder .* changed"):
            load_pathotune_encoder(result.card, device="cpu")
    finally:
        cards["vit-b"].write_text(cards["vit-b"].read_text().replace("init_seed: 2", "init_seed: 1"))


def test_clear_errors(setup):
    root, cards = setup
    data = folder_tiles(root / "data")
    with pytest.raises(DataError, match="TTP prompts need a task description"):
        tune_pathotune(data, root / "x", backbone=str(cards["vit-a"]),
                       config=PathoTuneTrainConfig(prompts=("ttp",)), device="cpu")
    other = task_from_dict({"name": "t", "description": "d", "classes": {"a": "x", "b": "y"}})
    with pytest.raises(DataError, match=rf"^{root / 'data' / 'spots'}: label 'spots' is not a class of the task 't' "
                                        r"\(a, b\); fix the label or add the class to the task file$"):
        tune_pathotune(data, root / "x", backbone=str(cards["vit-a"]), task=other,
                       config=PathoTuneTrainConfig(prompts=("tvp",)), device="cpu")
    with pytest.raises(WsiToolsError, match="no model card named 'no-such-card'"):
        tune_pathotune(data, root / "x", backbone="no-such-card", models_dir=root,
                       config=PathoTuneTrainConfig(prompts=("tvp",)), device="cpu")
    diverging = PathoTuneTrainConfig(prompts=("tvp",), epochs=3, batch_size=16, lr=1e30, warmup_epochs=0, num_workers=0)
    with pytest.raises(ModelError, match=r"diverged: the training loss became nan in epoch \d; training diverged"):
        tune_pathotune(data, root / "diverged", backbone=str(cards["vit-a"]), config=diverging, device="cpu",
                       progress=False)
    assert not list((root / "diverged").glob("*.yaml"))  # no card of a diverged run
    for taken, where in (("vit-a", "the backbone's name"), ("vit-b", f"the name of the card {root / 'vit-b.yaml'}")):
        with pytest.raises(ModelError, match=f"^'{taken}' is {re.escape(where)}: a trained card must have a name of its own"):
            tune_pathotune(data, root / "taken", backbone=str(cards["vit-a"]), models_dir=root, name=taken,
                           config=PathoTuneTrainConfig(prompts=("tvp",)), device="cpu", progress=False)
        assert not (root / "taken").exists()  # refused before any training
    # a PuzzleTuning run's folder: "pass --resume" would be refused next, so that is not the advice
    (root / "puzzled" / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (root / "puzzled" / "checkpoints" / "epoch-0001" / "state.json").write_text("{}")
    (root / "puzzled" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"puzzled: holds config.json, which a PathoTune run does not write"):
        tune_pathotune(data, root / "puzzled", backbone=str(cards["vit-a"]),
                       config=PathoTuneTrainConfig(prompts=("tvp",)), device="cpu")
    with pytest.raises(ModelError, match="^efficientnet-lite0-imagenet: PathoTune needs a ViT backbone card, not EfficientNet$"):
        tune_pathotune(data, root / "x", backbone="efficientnet-lite0-imagenet",
                       config=PathoTuneTrainConfig(prompts=("tvp",)), device="cpu")


@pytest.mark.parametrize("size, problem", [
    ((9000, 8000), "9000 x 8000 px"),  # above the bound, below PIL's limit
    ((10000, 10000), "refused by PIL as a possible decompression bomb (Image size (100000000 pixels) exceeds limit"),
    ((14000, 14000), "refused by PIL as a possible decompression bomb (Image size (196000000 pixels) exceeds limit"),
])
def test_a_class_folder_image_too_large_for_a_tile_is_one_line_naming_it(tmp_path, size, problem):
    """Judged from the image's header, before decoding: a PNG of a few KB may decode to GB. PIL
    warns between its limit and twice it and refuses above; both are the same one line."""
    for name in ("dark", "light"):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), "white" if name == "light" else "black").save(tmp_path / "data" / name / "a.png")
    big = tmp_path / "data" / "dark" / "big.png"
    Image.new("1", size).save(big)  # a few KB
    tiles = folder_tiles(tmp_path / "data")
    with pytest.raises(DataError) as err:
        tiles.read(tiles.names.index(str(big)))
    assert str(err.value).startswith(f"{big}: {problem}") and "\n" not in str(err.value)
    assert str(err.value).endswith(f"more than the {pathotune_data.MAX_IMAGE_PIXELS / 1e6:.0f} Mpx a class-folder image "
                                   "may have (tiles are resized to the backbone's input); cut it into tiles or shrink it")
    assert tiles.read(tiles.names.index(str(tmp_path / "data" / "dark" / "a.png"))).shape == (32, 32, 3)


@pytest.mark.parametrize("device,precision", [
    ("cpu", "auto"),
    *(pytest.param("cuda", p, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))
      for p in ("bf16", "fp16"))])
def test_cli_tune_pathotune(setup, capsys, device, precision):
    import argparse

    from wsitools.cli import pretrain

    root, cards = setup
    out_root = root / f"{device}-{precision}"
    parser = argparse.ArgumentParser()
    pretrain.register(parser.add_subparsers(dest="command"))
    argv = [
        "tune", "pathotune", "--data", str(root / "labels.csv"), "--stores", str(root / "tiles"),
        "--encoder", str(cards["vit-a"]), "--prompts", "tvp,ivp", "--epochs", "2", "--batch-size", "8",
        "--lr", "1e-2", "--workers", "0", "--device", device, "--precision", precision, "--out", str(out_root / "cli"), "--name", "tex-cli",
        "--quiet", "--stop-after-epochs", "1",
    ]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "epochs done\t1/2\n" in out and "encoder card\tnot yet: continue with --resume" in out
    assert not (out_root / "cli" / "tex-cli.yaml").exists()
    args = parser.parse_args([*argv[:-2], "--resume"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "epochs done\t2/2\n" in out
    assert "val (untrained)" in out and str(out_root / "cli" / "tex-cli.yaml") in out
    assert json.loads((out_root / "cli" / "pathotune.json").read_text())["config"]["prompts"] == ["tvp", "ivp"]
    args = parser.parse_args(["tune", "pathotune", "--data", str(root / "labels.csv"), "--encoder",
                              str(cards["vit-a"]), "--out", str(out_root / "cli2")])
    with pytest.raises(DataError, match="needs --stores"):
        args.func(args)
    # a TSV is a tile-label table as well; an image folder with --stores is named
    args = parser.parse_args(["tune", "pathotune", "--data", str(root / "labels.tsv"), "--encoder",
                              str(cards["vit-a"]), "--out", str(out_root / "cli2")])
    with pytest.raises(DataError, match=f"^{root / 'labels.tsv'}: a tile-label table needs --stores"):
        args.func(args)
    args = parser.parse_args(["tune", "pathotune", "--data", str(root / "data"), "--stores", str(root / "tiles"),
                              "--encoder", str(cards["vit-a"]), "--out", str(out_root / "cli2")])
    with pytest.raises(DataError) as err:
        args.func(args)
    assert str(err.value) == (f"{root / 'data'}: --stores goes with a tile-label table (.csv or .tsv) as --data, "
                              "not with a folder of class folders")


@pytest.mark.parametrize("args, option, command", [
    (["tune", "pathotune", "--data", "d", "--encoder"], "--encoder", "tune pathotune"),
    (["tune", "pathotune", "--data", "d", "--encoder", "vit-test-tiny", "--ivp-encoder"], "--ivp-encoder",
     "tune pathotune"),
    (["pretrain", "puzzle", "--stores", "s", "--encoder"], "--encoder", "pretrain puzzle"),
])
def test_training_commands_start_from_a_card_not_timm_name(args, option, command, tmp_path, capsys):
    from wsitools.cli import main

    assert main([*args, "timm:resnet50", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"wsitools {command.split()[0]}: error: {option} timm:resnet50: {command} starts from a model card, not "
        'timm:NAME; write a card for the checkpoint (docs/encoders.md, "Model card fields")'
    )
    assert not (tmp_path / "o").exists()


def test_a_tile_table_is_read_as_the_mil_labels_table(setup, tmp_path):
    """Stripped cells (a label with a stray space is no other class), a byte-order mark, TSV, and a
    file in another encoding a one-line error naming it, as wsitools.labels reads its tables."""
    root, _ = setup
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.reader(f))
    reference = store_tiles(root / "labels.csv", [root / "tiles"])
    spaced = tmp_path / "spaced.csv"  # as a spreadsheet saves "CSV UTF-8", with a stray space after a label
    spaced.write_text("\ufeff" + "".join(f"{a}, {b},{c} ,{d}{' ' * (i % 2)}\n" for i, (a, b, c, d) in enumerate(rows)),
                      encoding="utf-8")
    tiles = store_tiles(spaced, [root / "tiles"])
    assert tiles.classes == ("spots", "stripes") and tiles.labels.tolist() == reference.labels.tolist()
    assert tiles.names == reference.names
    tsv = tmp_path / "labels.tsv"
    tsv.write_text("".join("\t".join(r) + "\n" for r in rows))
    assert store_tiles(tsv, [root / "tiles"]).names == reference.names
    latin = tmp_path / "latin1.csv"
    latin.write_bytes("slide_id,x,y,label\nS1,0,7,str\u00f3ma\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"^tile-label table {latin}: not UTF-8 text \(byte 0xf3 at offset 29"):
        store_tiles(latin, [root / "tiles"])


def test_a_tile_table_opens_only_the_stores_it_names(setup, tmp_path):
    """A damaged store of a slide the table does not name sinks nothing; a coordinates-only store
    whose slide is gone fails before any training, naming the store and the slide."""
    root, _ = setup
    tiles = tmp_path / "tiles"
    shutil.copytree(root / "tiles", tiles)
    shutil.copytree(tiles / "S2.zarr", tiles / "S9.zarr")
    (tiles / "S9.zarr" / "manifest.json").unlink()
    data = store_tiles(root / "labels.csv", [tiles])
    assert [s.path for s in data.patch_stores()] == [tiles / "S1.zarr", tiles / "S2.zarr"]
    write_patch_store(tiles / "S3.zarr", coords=np.array([[0, 7], [128, 7]]), tiles=None, tissue_fraction=np.ones(2),
                      attrs={"slide_id": "S3", "slide_path": str(tmp_path / "S3.svs"), "params_hash": "h-S3",
                             "tile_size": 64, "tile_size_level0": 128.0, "mpp_target": 0.5})
    table = tmp_path / "with-s3.csv"
    table.write_text((root / "labels.csv").read_text() + "S3,0,7,spots\n")
    with pytest.raises(StoreError, match=rf"^{tiles / 'S3.zarr'}: its slide {tmp_path / 'S3.svs'} is gone; restore it"):
        store_tiles(table, [tiles])


def test_task_classes_other_than_the_datas_name_the_task_file_the_table_and_line(setup, tmp_path):
    from wsitools.text import load_task

    root, cards = setup
    task_file = tmp_path / "task.yaml"
    task_file.write_text("name: textures\ndescription: two textures\nclasses: {stripes: lines, spots: dots}\n")
    task = load_task(task_file)
    table = tmp_path / "extra.csv"
    lines = (root / "labels.csv").read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",necrosis"  # the table's line 6
    table.write_text("\n".join(lines) + "\n")
    data = store_tiles(table, [root / "tiles"], task_classes=task.classes)
    config = PathoTuneTrainConfig(prompts=("tvp",), epochs=1, num_workers=0)
    with pytest.raises(DataError) as err:
        tune_pathotune(data, tmp_path / "run", backbone=str(cards["vit-a"]), task=task, config=config, device="cpu")
    assert str(err.value) == (f"{table}, line 6: label 'necrosis' is not a class of the task file {task_file} "
                              "(stripes, spots); fix the label or add the class to the task file")
    task_file.write_text("name: textures\ndescription: d\nclasses: {stripes: lines, spots: dots, fat: cells}\n")
    with pytest.raises(DataError) as err:
        store_tiles(root / "labels.csv", [root / "tiles"]).relabel(load_task(task_file).classes, task=str(task_file))
    assert str(err.value) == (f"class 'fat' of {task_file} has no tile in {root / 'labels.csv'}; label tiles of it "
                              "or remove it from the task file")
    assert not (tmp_path / "run").exists()


def test_a_given_split_must_hold_every_class_in_each_part_it_fills(setup, tmp_path):
    """As the stratified split: a class without training tiles would never be learnt, one missing
    from val or test scored as never seen (an AUROC of NaN). A part left empty is no part."""
    root, cards = setup
    data = store_tiles(root / "labels.csv", [root / "tiles"])
    k = data.classes.index("stripes")
    split = np.where(np.arange(len(data)) % 3 == 0, "val", "train").astype(object)
    pathotune_data.check_given_split(data, split)  # no test part at all: fine
    only_val = split.copy()
    only_val[data.labels == k] = "val"
    with pytest.raises(DataError) as err:
        pathotune_data.check_given_split(data, only_val)
    assert str(err.value) == (f"{root / 'labels.csv'}: class 'stripes' has no train tile in the given split, so the "
                              "model would never learn it; give train tiles of every class")
    one_test = split.copy()
    one_test[np.flatnonzero(data.labels == k)[0]] = "test"
    with pytest.raises(DataError, match=r"class 'spots' has no test tile in the given split, so it would be scored "
                                        r"as never seen \(an AUROC of NaN\)"):
        pathotune_data.check_given_split(data, one_test)
    table = tmp_path / "split.csv"
    table.write_text("slide_id,x,y,label,split\n" + "".join(
        f"{n.split(':')[0]},{n.split(':')[1]},{n.split(':')[2]},{data.classes[y]},{s}\n"
        for n, y, s in zip(data.names, data.labels, only_val)))
    with pytest.raises(DataError, match=f"^{table}: class 'stripes' has no train tile in the given split"):
        tune_pathotune(store_tiles(table, [root / "tiles"]), tmp_path / "run", backbone=str(cards["vit-a"]),
                       config=PathoTuneTrainConfig(prompts=("tvp",), epochs=1, num_workers=0), device="cpu")
    assert not (tmp_path / "run").exists()


def test_a_fresh_start_removes_an_earlier_runs_outputs_and_metrics_come_last(setup, tmp_path, monkeypatch):
    """A folder whose checkpoints were removed holds the old card, weights and metrics: a new run
    that has done one epoch of two must not sit beside them as if finished. And metrics.json is
    written after the model, so a run killed between the two leaves no metrics of a missing model."""
    from wsitools.pathotune import train as pathotune_train

    root, cards = setup
    data = store_tiles(root / "labels.csv", [root / "tiles"])
    config = PathoTuneTrainConfig(prompts=("tvp",), epochs=2, batch_size=8, num_workers=0)
    out = tmp_path / "run"

    def tune(**kw):
        return tune_pathotune(data, out, backbone=str(cards["vit-a"]), config=config, device="cpu", progress=False,
                              name="tex", resume=True, **kw)

    tune()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "log.csv", "metrics.json", "pathotune.json",
                                                     "pathotune.safetensors", "predictions.csv", "split.csv",
                                                     "tex.yaml"]
    shutil.rmtree(out / "checkpoints")
    assert tune(stop_after_epochs=1).card is None
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "log.csv"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pathotune_train, "save_pathotune", killed)
    with pytest.raises(KeyboardInterrupt):
        tune()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "log.csv"]


def test_a_resume_checks_the_stores_the_precision_as_run_and_the_card_name(setup, tmp_path):
    """Other tiles at the same store path (another tiling) are other data; fp32 asked for on a
    CPU is the auto run's arithmetic; another card name would leave two cards in one run."""
    root, cards = setup
    tiles = tmp_path / "tiles"
    shutil.copytree(root / "tiles", tiles)
    config = PathoTuneTrainConfig(prompts=("tvp",), epochs=2, batch_size=8, num_workers=0)

    def tune(**kw):
        return tune_pathotune(store_tiles(root / "labels.csv", [tiles]), tmp_path / "run", backbone=str(cards["vit-a"]),
                              device="cpu", progress=False, resume=True, **{"name": "tex", "config": config, **kw})

    assert tune(stop_after_epochs=1).epochs_done == 1
    with pytest.raises(ConfigError, match=r'other settings \(name: "tex" -> "tex2"\)'):
        tune(name="tex2")
    s2 = PatchStore.open(tiles / "S2.zarr")
    pixels, attrs = s2.read_tiles(slice(None)), {k: s2.attrs[k] for k in ("slide_id", "slide_path", "tile_size",
                                                                           "tile_size_level0", "mpp_target")}

    def retile(params_hash: str) -> None:  # the same tiles at the same path, from another tiling run
        write_patch_store(tiles / "S2.zarr", coords=s2.coords, tiles=pixels, tissue_fraction=s2.tissue_fraction,
                          overwrite=True, attrs={**attrs, "params_hash": params_hash})

    retile("h-retiled")
    with pytest.raises(ConfigError, match=rf"other settings \(data.stores: 1 changed \({tiles / 'S2.zarr'}\)\)"):
        tune()
    retile("h-S2")
    assert tune(config=dataclasses.replace(config, precision="fp32")).epochs_done == 2


def test_a_fresh_start_under_another_name_removes_the_earlier_runs_card(setup, tmp_path, caplog):
    """An earlier run's card of another name stayed beside the new run's, pinning the checksum of
    weights the new run replaced (so `wsitools extract` refused it): a fresh start removes it,
    and keeps YAML files that are not such a card (a task file, the backbone's card)."""
    root, cards = setup
    data = store_tiles(root / "labels.csv", [root / "tiles"])
    config = PathoTuneTrainConfig(prompts=("tvp",), epochs=1, batch_size=8, num_workers=0)
    out = tmp_path / "run"
    out.mkdir()
    backbone = shutil.copy(cards["vit-a"], out / "vit-a.yaml")
    (out / "task.yaml").write_text("name: textures\nclasses: {stripes: stripes, spots: spots}\n")

    def tune(name: str):
        return tune_pathotune(data, out, backbone=str(backbone), config=config, device="cpu", progress=False,
                              name=name, resume=True)

    tune("old")
    shutil.rmtree(out / "checkpoints")
    new = tune("new")
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints", "log.csv", "metrics.json", "new.yaml", "pathotune.json", "pathotune.safetensors",
        "predictions.csv", "split.csv", "task.yaml", "vit-a.yaml"]
    assert "the outputs of an earlier run there are removed: log.csv, metrics.json, old.yaml" in caplog.text
    assert load_encoder(str(new.card), device="cpu").name == "new"


def test_a_resume_refuses_an_image_replaced_under_its_name(setup, tmp_path):
    """The image files were compared by name only: another image saved under a trained one's
    name resumed silently on other data. Their bytes count (a copied or touched file is the same)."""
    root, cards = setup
    images = tmp_path / "data"
    shutil.copytree(root / "data", images)
    config = PathoTuneTrainConfig(prompts=("tvp",), epochs=2, batch_size=8, num_workers=0)

    def tune(**kw):
        return tune_pathotune(folder_tiles(images), tmp_path / "run", backbone=str(cards["vit-a"]), config=config,
                              device="cpu", progress=False, name="tex", resume=True, **kw)

    assert tune(stop_after_epochs=1).epochs_done == 1
    replaced = images / "spots" / "03.png"
    shutil.copyfile(images / "spots" / "04.png", replaced)
    with pytest.raises(ConfigError) as err:
        tune()
    assert str(err.value).startswith(f"{tmp_path / 'run' / 'checkpoints' / 'epoch-0001'}: was written by a run with "
                                     f"other settings (data.images: 1 changed ({replaced})); ")
    shutil.copyfile(root / "data" / "spots" / "03.png", replaced)  # the same bytes again, a new mtime
    assert tune().epochs_done == 2
