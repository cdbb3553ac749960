"""PuzzleTuning on a tiny prompted ViT and tiny patch stores: the model, training, resume, export."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from wsitools.encoders import load_encoder, read_card
from wsitools.encoders.checkpoint import load_weights
from wsitools.errors import ModelError, WsiToolsError
from wsitools.puzzle import PuzzleTuningModel, fix_position_shuffle
from wsitools.puzzle.shuffle import PuzzleError
from wsitools.puzzle.backbone import load_puzzle_backbone
from wsitools.encoders.transforms import to_unit_float
from wsitools.puzzle.data import TileStream, augmented, open_stores
from wsitools.puzzle.train import PuzzleTrainConfig, train_puzzle
from wsitools.store import write_patch_store
from wsitools.io import stable_hash
from wsitools.training import adamw

TINY_CARD = """name: vit-test-64
description: tiny prompted ViT at 64 px for PuzzleTuning tests
architecture:
  model: prompted_vit_test_patch16_224
  kwargs: {img_size: 64}
  prompts: {tokens: 4, mode: deep}
  init_seed: 0
weights: []
input: {size: 64, normalize: null}
output: {kind: cls, dim: 64}
precision: {compute: bf16}
"""


def _textures(n: int, seed: int, size: int = 64) -> np.ndarray:
    """Smooth, varied colour textures (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = []
    for _ in range(n):
        f = rng.uniform(0.1, 0.5, 3)
        ph = rng.uniform(0, 6, 3)
        img = np.stack([
            128 + 100 * np.sin(f[0] * xx + ph[0]),
            128 + 100 * np.cos(f[1] * yy + ph[1]),
            128 + 80 * np.sin(f[2] * (xx + yy) + ph[2]),
        ], -1)
        out.append(img)
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("puzzle")
    card = root / "vit-test-64.yaml"
    card.write_text(TINY_CARD)
    stores = root / "tiles"
    for s, n in (("slideA", 70), ("slideB", 30)):
        tiles = _textures(n, seed=len(s) + n)
        write_patch_store(
            stores / f"{s}.zarr",
            coords=np.stack([np.arange(n) * 64, np.zeros(n)], 1),
            tiles=tiles,
            tissue_fraction=np.ones(n),
            attrs={"slide_id": s, "slide_path": f"/synthetic/{s}.svs", "params_hash": f"h-{s}",
                   "tile_size": 64, "tile_size_level0": 128.0, "mpp_target": 0.5},
        )
    return root, card, stores


def _config(**kw):
    base = dict(
        epochs=3, batch_size=8, steps_per_epoch=4, warmup_epochs=1, decoder_dim=32, decoder_depth=1,
        decoder_heads=2, num_workers=0, base_lr=0.05, seed=3, accum_steps=1,
    )
    base.update(kw)
    return PuzzleTrainConfig(**base)


def test_tile_stream_covers_stores_once_and_repeats(tiny):
    _, _, stores = tiny
    opened = open_stores([stores, stores, stores / "slideA.zarr"])  # each store once, however often given
    assert [s.slide_id for s in opened] == ["slideA", "slideB"]
    stream = TileStream(opened, batch_size=10, image_size=64, seed=1, batches_per_window=3)
    assert len(stream) == 10  # 100 tiles / 10
    windows = stream.windows()
    pairs = np.concatenate([w.tiles for w in windows])
    assert len(pairs) == 100 and len({tuple(p) for p in pairs}) == 100  # every tile exactly once
    assert {len(w.tiles) for w in windows[:-1]} == {30}
    # tiles of one batch come from both slides (shuffled across blocks and stores)
    assert len(set(windows[0].tiles[:, 0].tolist())) == 2
    batches = [augmented(b, torch.device("cpu")) for b in stream]
    assert len(batches) == 10 and batches[0].shape == (10, 3, 64, 64)
    assert 0.0 <= float(batches[0].min()) and float(batches[0].max()) <= 1.0
    again = [augmented(b, torch.device("cpu")) for b in stream]
    assert all(torch.equal(a, b) for a, b in zip(batches, again))  # a pure function of (seed, epoch)
    stream.set_epoch(1)
    assert not torch.equal(augmented(next(iter(stream)), torch.device("cpu")), batches[0])
    # without augmentation the pixels are the stored tile, exactly
    plain = TileStream(opened, batch_size=10, image_size=64, seed=1, augment=False)
    w = plain.windows()[0]
    s, i = w.tiles[0]
    expected = torch.from_numpy(opened[s].read_tiles(np.array([i]))[0]).permute(2, 0, 1).float() / 255
    tiles, crops = next(iter(plain))
    assert crops is None and tiles.dtype == torch.uint8
    np.testing.assert_array_equal(tiles[0].numpy(), opened[s].read_tiles(np.array([i]))[0])
    assert torch.equal(augmented((tiles, crops), torch.device("cpu"))[0], expected)


def test_tile_stream_resizes_tiles_of_another_size(tiny, tmp_path):
    """A store of 32 px tiles in a 64 px stream: its tiles come resized (antialiased), as uint8
    within half a level of the float resize, beside the 64 px store's tiles as they are."""
    _, _, stores = tiny
    small = np.ascontiguousarray(_textures(12, seed=3)[:, ::2, ::2])
    write_patch_store(tmp_path / "small.zarr", coords=np.stack([np.arange(12) * 32, np.zeros(12)], 1), tiles=small,
                      tissue_fraction=np.ones(12),
                      attrs={"slide_id": "small", "slide_path": "/synthetic/small.svs", "params_hash": "h-small",
                             "tile_size": 32, "tile_size_level0": 64.0, "mpp_target": 1.0})
    opened = open_stores([stores / "slideB.zarr", tmp_path / "small.zarr"])
    stream = TileStream(opened, batch_size=6, image_size=64, seed=0, augment=False)
    window = stream.windows()[0]
    tiles = stream.read_window(window)
    assert tiles.shape == (len(window.tiles), 64, 64, 3) and tiles.dtype == np.uint8
    for k, (s, i) in enumerate(window.tiles):
        if s == 1:
            expected = to_unit_float(opened[1].read_tiles(np.array([i])), size=64)[0].permute(1, 2, 0).numpy() * 255
            assert np.abs(tiles[k] - expected).max() <= 0.5 + 1e-4
        else:
            np.testing.assert_array_equal(tiles[k], opened[0].read_tiles(np.array([i]))[0])
    assert {int(s) for s in window.tiles[:, 0]} == {0, 1}


def test_only_prompts_and_decoder_train(tiny):
    _, card, _ = tiny
    bb = load_puzzle_backbone(str(card), device="cpu")
    assert float(bb.model.prompt_tokens.detach().abs().sum()) == 0.0  # zero-initialised (METHODS 1.2)
    model = PuzzleTuningModel(bb.model, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    frozen = {k: v.clone() for k, v in bb.model.state_dict().items() if k != "prompt_tokens"}
    decoder0 = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "backbone.prompt_tokens" in trainable
    assert all(n == "backbone.prompt_tokens" or n.startswith("decoder.") for n in trainable)
    opt = adamw(model, lr=1e-2, weight_decay=0.05, betas=(0.9, 0.95), decay="matrices")
    images = torch.from_numpy(_textures(8, 9)).permute(0, 3, 1, 2).float() / 255
    gen = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    for _ in range(6):
        puzzled, mask = fix_position_shuffle(images, ratio=0.25, patch_size=16, group_size=8, generator=gen)
        out = model(images, puzzled, mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
        # the loss only counts relation tokens
        assert out.relation.sum(1).tolist() == [12.0] * 8
    assert losses[-1] < losses[0]
    after = bb.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # backbone untouched
    assert float(bb.model.prompt_tokens.detach().abs().sum()) > 0  # prompts moved
    assert any(not torch.equal(model.decoder.state_dict()[k], v) for k, v in decoder0.items())


def test_loss_is_mse_on_relation_patches_only(tiny):
    _, card, _ = tiny
    bb = load_puzzle_backbone(str(card), device="cpu")
    model = PuzzleTuningModel(bb.model, decoder_dim=32, decoder_depth=1, decoder_heads=2).eval()
    images = torch.from_numpy(_textures(4, 5)).permute(0, 3, 1, 2).float() / 255
    puzzled, mask = fix_position_shuffle(images, ratio=0.5, patch_size=32, group_size=4,
                                         generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(images, puzzled, mask)
        target = images.unfold(2, 16, 16).unfold(3, 16, 16)  # [B, 3, 4, 4, 16, 16]
        target = target.permute(0, 2, 3, 4, 5, 1).reshape(4, 16, 16 * 16 * 3)
        err = (out.pred - target).pow(2).mean(-1)
        rel = mask[:, 0, ::16, ::16].reshape(4, 16)
        assert out.loss.item() == pytest.approx(float((err * rel).sum() / rel.sum()), rel=1e-5)
        # a puzzle patch of 32 px spans 2x2 tokens; half of the 4 puzzle patches are relation
        assert rel.sum(1).tolist() == [8.0] * 4
    with pytest.raises(WsiToolsError, match="multiple of the ViT token size"):
        model.check_patch_size(8)


def test_training_lowers_loss_and_writes_outputs(tiny):
    root, card, stores = tiny
    out = root / "run-loss"
    result = train_puzzle([stores], out, backbone=str(card), config=_config(epochs=3), progress=False)
    losses = [r["loss"] for r in result.log_rows]
    assert len(losses) == 12 and result.steps_done == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "step", "loss", "lr", "patch_size", "ratio"]
    # the loop curriculum at 64 px with 16 px tokens: warm-up at 32, then 16, 32 ...; ratio 0.25
    assert [int(r["patch_size"]) for r in rows[::4]] == [32, 16, 16]
    assert [float(r["ratio"]) for r in rows[::4]] == pytest.approx([0.25, 0.25, 0.25])
    assert float(rows[0]["lr"]) == 0.0 and float(rows[4]["lr"]) == pytest.approx(0.05 * 8 / 256)
    png = out / "previews" / "epoch-0003.png"
    from PIL import Image

    assert Image.open(png).size == (3 * 64, 4 * 64)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["epoch-0002", "epoch-0003"]  # the last two are kept
    from safetensors.torch import load_file

    saved = load_file(str(out / "checkpoints" / "epoch-0003" / "trainable.safetensors"))
    assert "backbone.prompt_tokens" in saved
    assert all(k == "backbone.prompt_tokens" or k.startswith("decoder.") for k in saved)
    with pytest.raises(WsiToolsError, match="--resume"):
        train_puzzle([stores], out, backbone=str(card), config=_config(epochs=3), progress=False)


def test_gradient_accumulation_counts_optimiser_steps(tiny):
    root, card, stores = tiny
    cfg = _config(epochs=2, batch_size=4, accum_steps=2, steps_per_epoch=2, warmup_epochs=0)
    result = train_puzzle([stores], root / "accum", backbone=str(card), config=cfg, progress=False)
    assert result.steps_done == 4 and [r["step"] for r in result.log_rows] == [0, 1, 2, 3]
    assert cfg.lr == pytest.approx(0.05 * 4 * 2 / 256)  # lr scales with the effective batch
    assert result.log_rows[0]["lr"] == pytest.approx(cfg.lr)  # no warm-up: cosine from the top
    assert result.log_rows[2]["lr"] == pytest.approx(cfg.lr * 0.5 * (1 + np.cos(np.pi * 0.5)))


def test_resume_continues_with_the_same_schedule(tiny):
    root, card, stores = tiny
    full = train_puzzle([stores], root / "full", backbone=str(card), config=_config(), progress=False)
    part = train_puzzle([stores], root / "part", backbone=str(card), config=_config(),
                        progress=False, stop_after_epochs=1)
    assert part.epochs_done == 1 and part.steps_done == 4
    (root / "part" / "log.csv").unlink()  # the log is a copy for people: the checkpoint holds its rows
    rest = train_puzzle([stores], root / "part", backbone=str(card), config=_config(),
                        progress=False, resume=True)
    assert rest.steps_done == full.steps_done == 12
    assert len((root / "part" / "log.csv").read_text().splitlines()) == 1 + 12
    for a, b in zip(full.log_rows, rest.log_rows, strict=True):
        assert (a["step"], a["patch_size"], a["ratio"]) == (b["step"], b["patch_size"], b["ratio"])
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    pa = torch.load(full.promptstate, weights_only=True)["Prompt_Tokens"]
    pb = torch.load(rest.promptstate, weights_only=True)["Prompt_Tokens"]
    assert torch.allclose(pa, pb, atol=1e-5)
    with pytest.raises(WsiToolsError, match="other settings"):
        train_puzzle([stores], root / "part", backbone=str(card), config=_config(epochs=4),
                     progress=False, resume=True)


def test_a_resumed_run_keeps_its_loader_workers(tiny, tmp_path):
    """Several loader workers each read whole windows of batches and the DataLoader interleaves
    them, so the batch order depends on their number: a resume on a machine of another CPU count
    (the default is the CPUs less one) trained on other batches without a word."""
    import json

    root, card, stores = tiny
    cfg = dict(epochs=2, batch_size=2, steps_per_epoch=20, decoder_dim=16)  # two windows of 16 batches
    full = train_puzzle([stores], tmp_path / "full", backbone=str(card), config=_config(**cfg, num_workers=2),
                        progress=False)
    train_puzzle([stores], tmp_path / "part", backbone=str(card), config=_config(**cfg, num_workers=2),
                 progress=False, stop_after_epochs=1)
    rest = train_puzzle([stores], tmp_path / "part", backbone=str(card), config=_config(**cfg, num_workers=None),
                        progress=False, resume=True)
    assert json.loads((tmp_path / "part" / "config.json").read_text())["num_workers"] == 2
    assert [r["loss"] for r in rest.log_rows] == pytest.approx([r["loss"] for r in full.log_rows], rel=1e-5)
    with pytest.raises(WsiToolsError, match=r"other settings \(loader_workers"):
        train_puzzle([stores], tmp_path / "part", backbone=str(card), config=_config(**cfg, num_workers=0),
                     progress=False, resume=True)
    # a run read in the main process resumes with the default on a machine of many CPUs
    train_puzzle([stores], tmp_path / "zero", backbone=str(card), config=_config(**cfg, num_workers=0),
                 progress=False, stop_after_epochs=1)
    train_puzzle([stores], tmp_path / "zero", backbone=str(card), config=_config(**cfg, num_workers=None),
                 progress=False, resume=True)
    assert json.loads((tmp_path / "zero" / "config.json").read_text())["num_workers"] == 1
    # a checkpoint of an earlier version, which did not record the count, resumes with any
    train_puzzle([stores], tmp_path / "old", backbone=str(card), config=_config(**cfg, num_workers=0),
                 progress=False, stop_after_epochs=1)
    (last,) = sorted((tmp_path / "old" / "checkpoints").iterdir())
    state = json.loads((last / "state.json").read_text())
    del state["settings"]["loader_workers"]
    state["schedule_hash"] = stable_hash(state["settings"])
    (last / "state.json").write_text(json.dumps(state))
    old = train_puzzle([stores], tmp_path / "old", backbone=str(card), config=_config(**cfg, num_workers=2),
                       progress=False, resume=True)
    assert old.epochs_done == 2
    with pytest.raises(WsiToolsError, match=r"ratio \(1.0\) < 1 \(at 1 every patch stays in place"):
        _config(ratio=1.0).curriculum(image_size=64, token_size=16)  # it trained on nothing, then exported


def test_exported_promptstate_loads_and_changes_features(tiny):
    root, card, stores = tiny
    result = train_puzzle([stores], root / "export", backbone=str(card), config=_config(epochs=2),
                          progress=False, name="tiny-puzzled")
    state = torch.load(result.promptstate, weights_only=True)
    assert set(state) == {"Prompt_Tokens", "head"} and tuple(state["Prompt_Tokens"].shape) == (3, 4, 64)
    new_card = read_card(result.card)
    assert new_card.name == "tiny-puzzled" and new_card.prompt_tokens == 4
    assert new_card.weight("prompts").path == result.promptstate.resolve()
    tuned = load_encoder(str(result.card), device="cpu")
    assert torch.equal(tuned.model.prompt_tokens.detach(), state["Prompt_Tokens"])
    with pytest.raises(PuzzleError, match=r"its prompts file holds 4 deep tokens; cannot train 7 deep tokens from it$"):
        load_puzzle_backbone(result.card, prompt_tokens=7, device="cpu")
    # the same backbone with the zero prompts training started from
    start = load_puzzle_backbone(str(card), device="cpu").model.eval()
    tiles = torch.from_numpy(_textures(6, 11))
    x = tuned.preprocess(tiles)
    with torch.no_grad():
        f_tuned = tuned.forward_batch(x)
        f_start = start.forward_features(x)[:, 0]
        backbone_sd = {k: v for k, v in tuned.model.state_dict().items() if k != "prompt_tokens"}
        start_sd = {k: v for k, v in start.state_dict().items() if k != "prompt_tokens"}
    assert all(torch.equal(backbone_sd[k], start_sd[k]) for k in start_sd)  # same backbone weights
    assert f_tuned.shape == (6, 64)
    assert (f_tuned - f_start).abs().max() > 1e-3  # the prompts change the features
    # the official loader path (promptstate into a prompted ViT) gives the same prompts
    load_weights(start, backbone=None, prompts=result.promptstate)
    with torch.no_grad():
        assert torch.allclose(start.forward_features(x)[:, 0], f_tuned, atol=1e-5)
    # feature extraction takes the new card as it is
    from wsitools.feature_store import FeatureStore
    from wsitools.features import extract_features

    store = stores / "slideB.zarr"
    fs = FeatureStore.open(extract_features(store, tuned, root / "features", workers=0).path)
    feats, coords = fs.load()
    assert fs.attrs["encoder"] == "tiny-puzzled" and feats.shape == (30, 64)
    from wsitools.store import PatchStore

    expected = tuned.encode(torch.from_numpy(PatchStore.open(store).read_tiles(slice(0, 30))))
    assert np.allclose(np.asarray(feats, np.float32), expected.numpy(), atol=1e-4)


GPU_PRECISIONS = [("cpu", "auto"),
                  *(pytest.param("cuda", p, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))
                    for p in ("bf16", "fp16"))]


@pytest.mark.parametrize("device,precision", GPU_PRECISIONS)
def test_cli_pretrain_puzzle(tiny, capsys, device, precision):
    import argparse

    from wsitools.cli import pretrain

    root, card, stores = tiny
    root = root / f"{device}-{precision}"
    parser = argparse.ArgumentParser()
    pretrain.register(parser.add_subparsers(dest="command"))
    common = ["pretrain", "puzzle", "--stores", str(stores / "slideA.zarr"), str(stores / "slideB.zarr"),
              "--encoder", str(card), "--epochs", "2", "--batch-size", "4", "--steps-per-epoch", "2",
              "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--workers", "0",
              "--device", device, "--precision", precision, "--quiet"]
    args = parser.parse_args(common + ["--out", str(root / "cli"), "--stop-after-epochs", "1", "--name", "cli-tuned"])
    assert args.func(args) == 0
    assert "epochs done\t1/2" in capsys.readouterr().out
    args = parser.parse_args(common + ["--out", str(root / "cli"), "--resume"])  # the card would be renamed
    with pytest.raises(WsiToolsError, match=r'other settings \(name: "cli-tuned" -> "vit-test-64-puzzletuned"\)'):
        args.func(args)
    args = parser.parse_args(common + ["--out", str(root / "cli"), "--resume", "--name", "cli-tuned"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "epochs done\t2/2" in out and "steps done\t4" in out
    assert (root / "cli" / "cli-tuned.yaml").is_file()
    # through the real command: a user error is one line on stderr and exit status 2
    from wsitools.cli import main

    assert main(common + ["--out", str(root / "cli-bad"), "--group-size", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["wsitools pretrain: error: puzzle group size 3 must divide the batch size 4"]


def test_decoder_position_embedding_is_maes_layout():
    """The official decoder's table (MAE's get_2d_sincos_pos_embed): for the token at row r,
    column c, channels [0, D/4) are sin(c w), [D/4, D/2) cos(c w), then the same of r, with
    w_k = 10000^(-k / (D/4)) in float32, and a zero row for CLS."""
    from wsitools.puzzle import sincos_pos_embed_2d

    dim, rows, cols = 32, 3, 5
    q = dim // 4
    w = (1.0 / np.float32(10000) ** (np.arange(q, dtype=np.float32) / np.float32(q))).astype(np.float32)
    ref = np.zeros((1 + rows * cols, dim), np.float32)
    for r in range(rows):
        for c in range(cols):
            cw, rw = np.float32(c) * w, np.float32(r) * w
            ref[1 + r * cols + c] = np.concatenate([np.sin(cw), np.cos(cw), np.sin(rw), np.cos(rw)])
    got = sincos_pos_embed_2d(dim, rows, cols, prefix_tokens=1)
    assert got.dtype == torch.float32 and got.shape == (1 + rows * cols, dim)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-6)
    # the first half moves along a row (the column index), the second half down a column
    assert torch.equal(got[1, : dim // 2], got[1 + cols, : dim // 2])
    assert not torch.equal(got[1, : dim // 2], got[2, : dim // 2])
    assert torch.equal(got[1, dim // 2 :], got[2, dim // 2 :])


def test_a_run_whose_last_step_diverged_exports_nothing(tiny):
    # The loss is read before each step; the last step's own blow-up shows only in the weights.
    root, card, stores = tiny
    cfg = _config(epochs=1, steps_per_epoch=1, warmup_epochs=0, base_lr=1e30)
    with pytest.raises(PuzzleError, match=r"the trained prompts give NaN or inf features after 1 steps; training diverged"):
        train_puzzle([stores], root / "diverged", backbone=str(card), config=cfg, progress=False)
    assert not list((root / "diverged").glob("*.yaml")) and not list((root / "diverged").glob("*promptstate*"))


def test_resume_refuses_other_tiles_at_the_same_store_paths(tiny, tmp_path):
    import shutil

    root, card, stores = tiny
    copy = Path(shutil.copytree(stores, tmp_path / "tiles"))
    cfg = _config(epochs=2, steps_per_epoch=2)
    train_puzzle([copy], tmp_path / "run", backbone=str(card), config=cfg, progress=False, stop_after_epochs=1)
    tiles = _textures(20, seed=9)
    write_patch_store(copy / "slideB.zarr", coords=np.stack([np.arange(20) * 64, np.zeros(20)], 1), tiles=tiles,
                      tissue_fraction=np.ones(20), overwrite=True,
                      attrs={"slide_id": "slideB", "slide_path": "/synthetic/other.svs", "params_hash": "h-other",
                             "tile_size": 64, "tile_size_level0": 128.0, "mpp_target": 0.5})
    with pytest.raises(WsiToolsError, match=r"run.*: was written by a run with other settings \(stores: 1 changed "
                                            rf"\({copy / 'slideB.zarr'}\)\); resume with the same settings or start "
                                            rf"the run over: remove {tmp_path / 'run' / 'checkpoints'} or choose"):
        train_puzzle([copy], tmp_path / "run", backbone=str(card), config=cfg, progress=False, resume=True)


def test_a_trained_card_may_not_take_a_name_in_use(tiny):
    root, card, stores = tiny
    (root / "taken.yaml").write_text(TINY_CARD.replace("vit-test-64", "taken"))
    for name, where in (("vit-test-64", "the backbone's name"), ("taken", f"the name of the card {root / 'taken.yaml'}")):
        with pytest.raises(ModelError, match=f"^'{name}' is {re.escape(where)}: a trained card must have a name of its own"):
            train_puzzle([stores], root / "taken-run", backbone=str(card), models_dir=root, config=_config(),
                         progress=False, name=name)
        assert not (root / "taken-run" / "checkpoints").exists()  # refused before any training


def test_a_fresh_start_removes_what_an_earlier_run_left(tiny, tmp_path):
    """A folder whose checkpoints were removed still holds the old card, promptstate and previews:
    a new run stopped after one epoch of two must not sit beside them as if finished."""
    root, card, stores = tiny
    out = tmp_path / "run"
    (out / "previews").mkdir(parents=True)
    (out / "previews" / "mine.png").write_bytes(b"")  # not a name the run writes: kept
    train_puzzle([stores], out, backbone=str(card), config=_config(epochs=2), progress=False, name="p")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "log.csv", "p.yaml",
                                                     "p_promptstate.pth", "previews"]
    import shutil

    shutil.rmtree(out / "checkpoints")
    part = train_puzzle([stores], out, backbone=str(card), config=_config(epochs=2), progress=False, name="p",
                        resume=True, stop_after_epochs=1)
    assert part.card is None
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "log.csv", "previews"]
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["epoch-0001.png", "mine.png"]
    assert len((out / "log.csv").read_text().splitlines()) == 1 + 4  # one epoch of four steps


def test_stores_of_other_magnifications_are_trained_on_together_and_recorded(tiny, tmp_path, caplog):
    """PuzzleTuning pretrains across magnifications: stores of another resolution or tile size are
    not refused, but warned of once, with each group's store count, and recorded in config.json
    and in the card's description."""
    import json
    import logging

    root, card, stores = tiny
    write_patch_store(tmp_path / "wide.zarr", coords=np.stack([np.arange(20) * 128, np.zeros(20)], 1),
                      tiles=_textures(20, seed=4, size=32), tissue_fraction=np.ones(20),
                      attrs={"slide_id": "wide", "slide_path": "/synthetic/wide.svs", "params_hash": "h-wide",
                             "tile_size": 32, "tile_size_level0": 128.0, "mpp_target": 1.0})
    with caplog.at_level(logging.WARNING, logger="wsitools.training"):
        result = train_puzzle([stores, tmp_path / "wide.zarr"], tmp_path / "run", backbone=str(card),
                              config=_config(epochs=1, warmup_epochs=0), progress=False)
    groups = {"64 px tiles at 0.5 um/px": 2, "32 px tiles at 1 um/px": 1}
    assert [r.getMessage() for r in caplog.records if "sizes or resolutions" in r.getMessage()] == [
        "the patch stores hold tiles of 2 sizes or resolutions, trained on together: 64 px tiles at 0.5 um/px "
        "(2 stores); 32 px tiles at 1 um/px (1 store)"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["tile_geometries"] == groups
    assert read_card(result.card).description.endswith(
        "on 3 patch stores (64 px tiles at 0.5 um/px: 2; 32 px tiles at 1 um/px: 1).")


def test_a_coordinates_only_store_whose_slide_is_gone_fails_before_training(tiny, tmp_path):
    root, card, stores = tiny
    write_patch_store(tmp_path / "np" / "gone.zarr", coords=np.stack([np.arange(8) * 128, np.zeros(8)], 1), tiles=None,
                      tissue_fraction=np.ones(8),
                      attrs={"slide_id": "gone", "slide_path": str(tmp_path / "gone.svs"), "params_hash": "h-gone",
                             "tile_size": 64, "tile_size_level0": 128.0, "mpp_target": 0.5})
    with pytest.raises(WsiToolsError, match=rf"^{tmp_path / 'np' / 'gone.zarr'}: its slide {tmp_path / 'gone.svs'} "
                                            "is gone; restore it or re-tile$"):
        open_stores([stores, tmp_path / "np"])


def test_a_resume_takes_the_precision_as_run_and_refuses_another_kinds_folder_first(tiny, tmp_path):
    root, card, stores = tiny
    cfg = _config(epochs=2, steps_per_epoch=2)
    train_puzzle([stores], tmp_path / "run", backbone=str(card), config=cfg, progress=False, stop_after_epochs=1)
    # fp32 on a CPU is what auto ran: the same arithmetic
    rest = train_puzzle([stores], tmp_path / "run", backbone=str(card), config=_config(epochs=2, steps_per_epoch=2,
                        precision="fp32"), progress=False, resume=True)
    assert rest.epochs_done == 2
    # a PathoTune run's folder: "pass --resume" would be refused next, so that is not the advice
    (tmp_path / "tuned" / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (tmp_path / "tuned" / "checkpoints" / "epoch-0001" / "state.json").write_text("{}")
    (tmp_path / "tuned" / "metrics.json").write_text("{}")
    with pytest.raises(WsiToolsError, match=r"tuned: holds metrics.json, which a PuzzleTuning run does not write"):
        train_puzzle([stores], tmp_path / "tuned", backbone=str(card), config=cfg, progress=False)


def test_a_fresh_start_under_another_name_removes_the_earlier_runs_card(tiny, tmp_path):
    """An earlier run's card and promptstate of another name stayed beside the new run's result
    as a second, stale card: a fresh start removes them, but not a card it reads as its backbone."""
    import shutil

    root, card, stores = tiny
    out = tmp_path / "run"

    def train(name: str, backbone: Path) -> None:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        train_puzzle([stores], out, backbone=str(backbone), config=_config(epochs=1, warmup_epochs=0),
                     progress=False, name=name)

    def cards() -> list[str]:
        return sorted(p.name for p in out.iterdir() if p.suffix in (".yaml", ".pth"))

    train("old", card)
    train("more", out / "old.yaml")  # goes on from the prompts of the run before, read from the folder
    assert cards() == ["more.yaml", "more_promptstate.pth", "old.yaml", "old_promptstate.pth"]
    train("new", card)
    assert cards() == ["new.yaml", "new_promptstate.pth"]
    assert load_encoder(str(out / "new.yaml"), device="cpu").name == "new"
