"""Hostile inputs for encoders: cards, weight files, devices and folders a user brings along.

Each case writes its own tiny card (the registered tiny prompted ViT at 64 px), weight files in
the official layouts and a small patch store, and asserts on the outcome: a bad encoder is one
line naming the file (exit 2) before any store is read, and nothing is written where it should
not be.
"""

from __future__ import annotations

import hashlib
import re
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from wsitools.device import resolve_device
from wsitools.encoders import find_card, list_cards, load_encoder
from wsitools.encoders.checkpoint import read_state_dict
from wsitools.encoders.fetch import fetch_card
from wsitools.errors import ConfigError, ModelError, StoreError
from wsitools.features import extract_features
from wsitools.store import write_patch_store
from wsitools.training import MAX_SHOWN_DIFFERENCES, check_same_settings
from cli_calls import one_line, run

TINY = dict(img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0)


def write_card(folder: Path, name: str = "tiny", **sections) -> Path:
    card = {
        "name": name,
        "architecture": {"model": "prompted_vit_test_patch16_224", "kwargs": {"img_size": 64},
                         "prompts": {"tokens": 4, "mode": "deep"}},
        "weights": [{"role": "backbone", "file": "backbone.pth"}, {"role": "prompts", "file": "promptstate.pth"}],
        "input": {"size": 64, "normalize": None},
        "output": {"kind": "cls", "dim": 64},
        "precision": {"compute": "fp32"},
    }
    card.update(sections)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


@pytest.fixture()
def models(tmp_path) -> Path:
    """A models folder with a tiny backbone (official timm layout, with its head) and promptstate."""
    folder = tmp_path / "models"
    folder.mkdir()
    with torch.random.fork_rng(devices=[]):  # leave the global generator as other tests expect it
        torch.manual_seed(0)
        torch.save(VisionTransformer(**TINY, num_classes=1000).state_dict(), folder / "backbone.pth")
        torch.save({"head": {}, "Prompt_Tokens": torch.nn.Parameter(0.1 * torch.randn(3, 4, 64))},
                   folder / "promptstate.pth")
    write_card(folder)
    return folder


@pytest.fixture()
def store(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    n = 6
    return write_patch_store(
        tmp_path / "tiles" / "S1.zarr", coords=np.stack([np.arange(n) * 128, np.zeros(n)], 1),
        tiles=rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8), tissue_fraction=np.ones(n),
        attrs={"slide_id": "S1", "slide_path": "/slides/S1.svs", "params_hash": "p", "tile_size": 64,
               "tile_size_level0": 128.0, "mpp_target": 0.5},
    )


def extract(card: Path, store: Path | list[Path], out: Path, capsys, *extra) -> tuple[int, str]:
    stores = store if isinstance(store, list) else [store]
    return run(["extract", *stores, "--encoder", card, "--out", out, "--device", "cpu", "--workers", "0", "--quiet",
                *extra], capsys)


# --- devices -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0"])
def test_a_device_torch_cannot_read_is_one_line(device, models, store, tmp_path, capsys):
    with pytest.raises(ModelError, match=rf"^--device {device}: not a device \(auto, cpu, cuda or cuda:N\)$"):
        resolve_device(device)
    rc, err = extract(models / "tiny.yaml", store, tmp_path / "f", capsys, "--device", device)
    one_line(rc, err, f"wsitools extract: error: --device {device}: not a device")
    assert not (tmp_path / "f").exists()


def test_a_gpu_index_the_machine_lacks_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ModelError, match=r"^--device cuda:2: this machine has 2 CUDA GPU\(s\), numbered from 0$"):
        resolve_device("cuda:2")


# --- cards ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [100, 224])
def test_an_input_size_the_vit_cannot_take_stops_before_any_store(size, models, store, tmp_path, capsys):
    card = write_card(models, input={"size": size, "normalize": None})
    needle = (f"{card}: input.size is {size} but prompted_vit_test_patch16_224 takes 64 x 64 px images; "
              f"set input.size to 64 or architecture.kwargs.img_size to {size}")
    with pytest.raises(ModelError, match="input.size is"):
        load_encoder(card, device="cpu")
    rc, err = extract(card, store, tmp_path / "f", capsys)
    one_line(rc, err, needle)
    assert not (tmp_path / "f").exists()
    # a network that resizes its own input (timm's dynamic_img_size) takes any side
    dynamic = write_card(models, name="dyn", architecture={
        "model": "prompted_vit_test_patch16_224", "kwargs": {"img_size": 64, "dynamic_img_size": True},
        "prompts": {"tokens": 4, "mode": "deep"}}, input={"size": 96, "normalize": None})
    assert load_encoder(dynamic, device="cpu").encode(torch.zeros(1, 96, 96, 3, dtype=torch.uint8)).shape == (1, 64)


def test_a_card_section_written_twice_is_refused_not_half_read(models, store, tmp_path, capsys):
    card = models / "tiny.yaml"
    card.write_text(card.read_text() + "input:\n  size: 32\n  normalize: null\n")  # plain YAML keeps the last
    rc, err = extract(card, store, tmp_path / "f", capsys)
    one_line(rc, err, f"{card}: not valid YAML (key 'input' appears twice")
    assert not (tmp_path / "f").exists()


def test_a_copy_of_a_card_that_kept_its_name_is_refused_when_listed(models):
    (models / "tiny-copy.yaml").write_text((models / "tiny.yaml").read_text())
    with pytest.raises(ModelError, match=r"tiny-copy\.yaml: card file is named 'tiny-copy' but its name is 'tiny'"):
        list_cards(models)
    (models / "tiny-copy.yaml").unlink()
    assert [c.name for c in list_cards(models)] == ["tiny"]


def test_a_second_card_of_the_same_name_replaces_the_features_with_a_warning(models, store, tmp_path, caplog):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = write_card(elsewhere, weights=[], architecture={
        "model": "prompted_vit_test_patch16_224", "kwargs": {"img_size": 64}, "init_seed": 3})
    first = load_encoder(models / "tiny.yaml", device="cpu")
    second = load_encoder(other, device="cpu")
    assert first.name == second.name and first.encoder_hash != second.encoder_hash
    out = tmp_path / "features"
    assert extract_features(store, first, out, workers=0, progress=False).status == "computed"
    with caplog.at_level(logging.WARNING, logger="wsitools.feature_store"):
        result = extract_features(store, second, out, workers=0, progress=False)
    assert result.status == "computed"
    assert (f"replacing features of encoder hash {first.encoder_hash} with tiny's ({second.encoder_hash}): "
            "the card or its weights changed, or another card has the name 'tiny'") in caplog.text


def test_a_seed_beside_a_backbone_file_is_refused_naming_both_keys(models, store, tmp_path, capsys):
    card = write_card(models, architecture={"model": "prompted_vit_test_patch16_224", "kwargs": {"img_size": 64},
                                            "prompts": {"tokens": 4, "mode": "deep"}, "init_seed": 5})
    rc, err = extract(card, store, tmp_path / "f", capsys)
    one_line(rc, err, f"wsitools extract: error: {card}: architecture.init_seed is set but weights lists a backbone "
             "file, which sets every weight, so the seed would be ignored; delete init_seed")
    assert not (tmp_path / "f").exists()


def test_a_prompts_file_on_a_random_backbone_needs_the_seed_that_makes_it_repeatable(models, store, tmp_path, capsys):
    arch = {"model": "prompted_vit_test_patch16_224", "kwargs": {"img_size": 64}, "prompts": {"tokens": 4, "mode": "deep"}}
    prompts_only = [{"role": "prompts", "file": "promptstate.pth"}]
    card = write_card(models, architecture=arch, weights=prompts_only)
    rc, err = extract(card, store, tmp_path / "f", capsys)
    one_line(rc, err, f"{card}: the card lists no backbone weight file; give architecture.init_seed")
    card = write_card(models, architecture={**arch, "init_seed": 1}, weights=prompts_only)  # what puzzle exports
    first, second = (load_encoder(card, device="cpu") for _ in range(2))
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    promptstate = torch.load(models / "promptstate.pth", weights_only=True)["Prompt_Tokens"]
    assert torch.equal(first.model.prompt_tokens.detach(), promptstate.detach())


# --- weight files --------------------------------------------------------------------------------


@pytest.mark.parametrize("role, key", [("backbone", "blocks.1.attn.qkv.weight"), ("prompts", "prompt_tokens")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_stop_before_any_store(role, key, value, models, store, tmp_path, capsys):
    if role == "backbone":
        sd = torch.load(models / "backbone.pth", weights_only=True)
        sd[key][0, 0] = value
        torch.save(sd, models / "backbone.pth")
        path = models / "backbone.pth"
    else:
        tokens = torch.zeros(3, 4, 64)
        tokens[2, 3, 1] = value
        torch.save({"Prompt_Tokens": tokens}, models / "promptstate.pth")
        path = models / "promptstate.pth"
    rc, err = extract(models / "tiny.yaml", store, tmp_path / "f", capsys)
    one_line(rc, err, f"{path}: tensor '{key}' holds NaN or infinite values; the file is damaged or was saved "
             "from a run that diverged")
    assert not (tmp_path / "f" / "tiny").exists()


def test_non_finite_tensors_are_refused_in_every_checked_weight_file(tmp_path):
    expected = {"w": torch.zeros(2, 2), "steps": torch.zeros(1, dtype=torch.int64)}
    save_file({"w": torch.tensor([[0.0, float("-inf")], [1, 2]]), "steps": torch.zeros(1, dtype=torch.int64)},
              str(tmp_path / "head.safetensors"))
    with pytest.raises(ModelError, match=r"head\.safetensors: tensor 'w' holds NaN or infinite values"):
        read_state_dict(tmp_path / "head.safetensors", expected)


def test_a_directory_named_as_a_weight_file_is_said_to_be_one(models, store, tmp_path, capsys):
    (models / "weights").mkdir()
    card = write_card(models, weights=[{"role": "backbone", "file": "weights"},
                                       {"role": "prompts", "file": "promptstate.pth"}])
    rc, err = extract(card, store, tmp_path / "f", capsys)
    one_line(rc, err, f"{models / 'weights'}: backbone weight file of encoder 'tiny' is a directory; the card "
             f"{card} must name the weight file itself")


# --- folders -------------------------------------------------------------------------------------


def test_an_out_that_is_a_file_fails_once_before_any_store(models, store, tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    second = second_store(tmp_path)
    rc, err = run(["extract", store, second, "--encoder", models / "tiny.yaml", "--out", tmp_path / "out",
                   "--device", "cpu", "--workers", "0", "--quiet"], capsys)
    one_line(rc, err, f"wsitools extract: error: {tmp_path / 'out'}: is a file, where a folder is needed")
    assert (tmp_path / "out").read_text() == "not a folder"


def second_store(tmp_path: Path) -> Path:
    return write_patch_store(
        tmp_path / "tiles" / "S2.zarr", coords=np.zeros((1, 2)), tiles=np.zeros((1, 64, 64, 3), np.uint8),
        tissue_fraction=np.ones(1), attrs={"slide_id": "S2", "slide_path": "/slides/S2.svs", "params_hash": "p",
                                           "tile_size": 64, "tile_size_level0": 128.0, "mpp_target": 0.5})


def test_a_directory_where_a_feature_store_goes_fails_that_slide_before_any_work(models, store, tmp_path, capsys,
                                                                                monkeypatch):
    import wsitools.features

    computed = []
    compute = wsitools.features.compute_features
    monkeypatch.setattr(wsitools.features, "compute_features",
                        lambda s, *a, **k: computed.append(s.slide_id) or compute(s, *a, **k))
    blocked = tmp_path / "f" / "tiny" / "S1.h5"
    blocked.mkdir(parents=True)
    rc, err = run(["extract", store, second_store(tmp_path), "--encoder", models / "tiny.yaml", "--out",
                   tmp_path / "f", "--device", "cpu", "--workers", "0", "--quiet"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("wsitools extract: error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].endswith(f"{blocked}: is a directory, where the feature store file goes; remove it or write "
                              "the features elsewhere")
    assert computed == ["S2"] and (tmp_path / "f" / "tiny" / "S2.h5").is_file() and blocked.is_dir()
    with pytest.raises(StoreError, match=f"^{blocked}: is a directory"):  # the API refuses it too
        extract_features(store, load_encoder(str(models / "tiny.yaml"), device="cpu"), tmp_path / "f", workers=0)
    assert computed == ["S2"]


def test_a_feature_store_folder_that_cannot_be_made_is_one_line_before_any_work(models, store, tmp_path, capsys):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "tiny").write_text("a file where the encoder's folder goes")
    rc, err = extract(models / "tiny.yaml", store, tmp_path / "f", capsys)
    one_line(rc, err, f"{tmp_path / 'f' / 'tiny' / 'S1.h5'}: its folder {tmp_path / 'f' / 'tiny'} cannot be "
             f"created ({tmp_path / 'f' / 'tiny'} is a file)")
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["tiny"]


@pytest.mark.parametrize("file", ["../victim.pth", "ABSOLUTE", "sub/../../victim.pth"])
def test_fetch_never_writes_outside_the_cards_folder(file, models, tmp_path):
    source = models / "backbone.pth"
    victim = tmp_path / "victim.pth"
    victim.write_bytes(b"precious")
    name = str(victim) if file == "ABSOLUTE" else file
    # a pinned checksum the present file does not have: fetch would download it again
    card = write_card(models, name="hostile", architecture={"model": "prompted_vit_test_patch16_224",
                      "kwargs": {"img_size": 64}}, weights=[
        {"role": "backbone", "file": name, "url": source.as_uri(),
         "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}])
    with pytest.raises(ModelError, match=rf"hostile\.yaml: weight file '{name}' is outside the card's folder "
                       rf"{models}; fetch writes only beside the card"):
        fetch_card(find_card(str(card)))
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "victim.pth"]  # no temporary left either


def test_fetch_writes_into_a_subfolder_of_the_cards_folder(models):
    source = models / "backbone.pth"
    card = write_card(models, name="nested", architecture={"model": "prompted_vit_test_patch16_224",
                      "kwargs": {"img_size": 64}}, weights=[
        {"role": "backbone", "file": "vit/backbone.pth", "url": source.as_uri()}])
    [result] = fetch_card(find_card(str(card)))
    assert result.status == "downloaded" and (models / "vit" / "backbone.pth").read_bytes() == source.read_bytes()


# --- resuming from another run's folder ----------------------------------------------------------


def test_a_refused_resume_names_the_first_differences_and_counts_the_rest(tmp_path):
    written = {"backbone_card": "a.yaml", "config": {f"k{i}": i for i in range(10)}}
    now = {"backbone": {"name": "b"}, "config": {f"k{i}": i + 1 for i in range(10)}}
    with pytest.raises(ConfigError) as info:
        check_same_settings(tmp_path, written=written, written_hash="x", settings=now, remedy="or start anew")
    text = str(info.value)
    assert text.count(" -> ") == MAX_SHOWN_DIFFERENCES == 6
    assert text.startswith(f'{tmp_path}: was written by a run with other settings (backbone.name: "(not set)" -> "b"; ')
    assert text.endswith("; and 6 more); resume with the same settings or start anew")


# --- prompt tuning -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "my card", "a/b"])
def test_an_unsafe_pathotune_name_is_refused_before_training_not_rewritten(name, models, store, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,x,y,label\n" + "".join(f"S1,{i * 128},0,{'ab'[i % 2]}\n" for i in range(6)))
    rc, err = run(["tune", "pathotune", "--data", labels, "--stores", store, "--encoder", models / "tiny.yaml",
                   "--prompts", "tvp", "--out", tmp_path / "run", "--epochs", "1", "--name", name, "--device", "cpu",
                   "--workers", "0", "--quiet"], capsys)
    one_line(rc, err, f"wsitools tune: error: {name!r} is not a valid encoder name")
    assert not (tmp_path / "run").exists() and not (tmp_path / "x.yaml").exists()


def test_the_default_pathotune_name_made_from_class_names_is_a_valid_card_name(models, store, tmp_path, capsys):
    """Class names may hold what a card name may not (``..``, a leading ``-``): the default name
    is made valid; where it is still refused (another card has it), the line says to pass --name."""
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,x,y,label\n" + "".join(
        f"S1,{i * 128},0,{('grade..1', '-light')[i % 2]}\n" for i in range(6)))
    args = ["tune", "pathotune", "--data", labels, "--stores", store, "--encoder", models / "tiny.yaml",
            "--prompts", "tvp", "--epochs", "1", "--device", "cpu", "--workers", "0", "--quiet"]
    rc, err = run([*args, "--out", tmp_path / "run"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "run").glob("*.yaml")) == ["tiny-pathotune--light-grade.1.yaml"]
    write_card(models, "tiny-pathotune--light-grade.1")
    rc, err = run([*args, "--out", tmp_path / "run2", "--models-dir", models], capsys)
    one_line(rc, err, f"wsitools tune: error: 'tiny-pathotune--light-grade.1' is the name of the card "
             f"{models / 'tiny-pathotune--light-grade.1.yaml'}: a trained card must have a name of its own (its "
             "features are kept under it); pass --name")


def test_a_reader_that_stops_early_ends_the_listing_quietly(tmp_path):
    """`wsitools encoders | head -1`: the pipe closes before the listing is written."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # every write to the pipe now fails with EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "wsitools", "encoders"], stdout=write, stderr=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parents[2], timeout=120)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (1, "")


# --- many stores in one extraction -------------------------------------------------------------


def _second_store(tmp_path, folder: str, slide_id: str = "S1") -> Path:
    rng = np.random.default_rng(1)
    return write_patch_store(
        tmp_path / folder / f"{slide_id}.zarr", coords=np.stack([np.arange(3) * 256, np.zeros(3)], 1),
        tiles=rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8), tissue_fraction=np.ones(3),
        attrs={"slide_id": slide_id, "slide_path": f"/slides/{slide_id}.svs", "params_hash": "q",
               "tile_size": 64, "tile_size_level0": 256.0, "mpp_target": 1.0},
    )


def test_a_missing_store_among_others_fails_alone(models, store, tmp_path, capsys):
    other = _second_store(tmp_path, "more", "S2")
    rc, err = extract(models / "tiny.yaml", [store, tmp_path / "gone.zarr", other], tmp_path / "f", capsys)
    assert rc == 1 and f"wsitools extract: error: {tmp_path / 'gone.zarr'}: no such patch store" in err
    assert sorted(p.name for p in (tmp_path / "f" / "tiny").iterdir()) == ["S1.h5", "S2.h5"]


def test_two_stores_of_one_slide_are_refused_naming_each_other(models, store, tmp_path, capsys):
    other = _second_store(tmp_path, "coarse")
    third = _second_store(tmp_path, "more", "S2")
    rc, err = extract(models / "tiny.yaml", [store, other, store, third], tmp_path / "f", capsys)
    assert rc == 2, err
    assert f"{store}: slide S1 is also the slide of {other}; both would write its feature store" in err
    assert f"{other}: slide S1 is also the slide of {store}; both would write its feature store" in err
    assert err.count("is also the slide of") == 2
    assert sorted(p.name for p in (tmp_path / "f" / "tiny").iterdir()) == ["S2.h5"]  # the others go on
    rc, err = extract(models / "tiny.yaml", [store, store], tmp_path / "g", capsys)  # one store given twice
    assert rc == 0 and sorted(p.name for p in (tmp_path / "g" / "tiny").iterdir()) == ["S1.h5"]


def test_features_damaged_to_nan_are_extracted_again_not_reused(models, store, tmp_path, capsys, caplog):
    import h5py

    assert extract(models / "tiny.yaml", store, tmp_path / "f", capsys)[0] == 0
    path = tmp_path / "f" / "tiny" / "S1.h5"
    with h5py.File(path, "r") as f:
        good = f["features"][:]
    with h5py.File(path, "r+") as f:
        f["features"][2, 5] = np.nan
    rc, err = run(["export", "--to", "clam", "--features", tmp_path / "f" / "tiny", "--out", tmp_path / "x"], capsys)
    assert rc == 1 and "slide S1: feature store" in err and "non-finite (NaN/inf) features in 1+ rows, first row 2" in err
    assert not (tmp_path / "x" / "pt_files" / "S1.pt").exists()
    with caplog.at_level(logging.WARNING):
        assert extract(models / "tiny.yaml", store, tmp_path / "f", capsys)[0] == 0
    assert "recomputing (slide S1: feature store" in caplog.text
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["features"][:], good)


def test_features_that_claim_more_than_the_file_holds_are_extracted_again_naming_it(models, store, tmp_path, capsys,
                                                                                   caplog):
    """Datasets of a million rows in chunks never written (a few KB claiming 256 MB of fill
    values; the checksums kept, so only the shape lies): the reuse check refuses the file before
    reading or allocating, says so naming it, and extracts again."""
    import h5py

    assert extract(models / "tiny.yaml", store, tmp_path / "f", capsys)[0] == 0
    path = tmp_path / "f" / "tiny" / "S1.h5"
    with h5py.File(path, "r+") as f:
        good, dtype = f["features"][()], f["features"].dtype
        for name, width, kind in (("features", 64, dtype), ("coords", 2, "i8")):
            del f[name]
            f.create_dataset(name, shape=(1_000_000, width), dtype=kind, chunks=(4096, width))
    with caplog.at_level(logging.WARNING):
        assert extract(models / "tiny.yaml", store, tmp_path / "f", capsys)[0] == 0
    claimed = 1_000_000 * 64 * dtype.itemsize
    assert (f"{path}: recomputing ('features' claims (1000000, 64) values of {claimed:,} bytes, but the file holds 0 "
            "bytes of them (never written, or cut short); damaged, extract it again)") in caplog.text
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["features"][()], good)


def test_features_of_another_projects_slide_of_the_same_id_are_not_replaced(models, store, tmp_path, capsys):
    # Two projects share a features folder; the second tiled another slide under the same id.
    assert extract(models / "tiny.yaml", store, tmp_path / "f", capsys)[0] == 0
    path = tmp_path / "f" / "tiny" / "S1.h5"
    before = path.read_bytes()
    other = _second_store(tmp_path / "project2", "tiles")
    rc, err = extract(models / "tiny.yaml", other, tmp_path / "f", capsys)
    assert rc == 1 and f"{path}: holds features of another patch store ({store}, slide /slides/S1.svs)" in err
    assert path.read_bytes() == before
    assert extract(models / "tiny.yaml", other, tmp_path / "f", capsys, "--overwrite")[0] == 0
    assert path.read_bytes() != before


def test_another_file_given_as_a_card_is_named_not_printed(store, tmp_path, capsys):
    other = tmp_path / "notes.txt"
    other.write_text("\n".join(f"line {i} of some private text" for i in range(500)))
    rc, err = extract(other, store, tmp_path / "f", capsys)
    one_line(rc, err, f"wsitools extract: error: {other}: not a model card (a YAML mapping of name, model")
    assert "private" not in err
    long_value = tmp_path / "long.yaml"  # a mapping whose wrong value is long: shortened
    long_value.write_text("name: x\nmodel: " + "y" * 5000 + "\ninput: 7\nweights: []\n")
    rc, err = extract(long_value, store, tmp_path / "f", capsys)
    assert rc == 2 and len(err) < 600, err


# --- settings that would go around the card, and timm names of other sources ----------------------


ARCH = {"model": "prompted_vit_test_patch16_224", "prompts": {"tokens": 4, "mode": "deep"}}


@pytest.mark.parametrize("change, needle", [
    ({"architecture": {**ARCH, "kwargs": {"img_size": 64, "checkpoint_path": "w.pth"}}},
     "architecture.kwargs.checkpoint_path would have timm load weights itself, unchecked and outside the encoder hash"),
    ({"architecture": {**ARCH, "kwargs": {"img_size": 64, "features_only": True}}},
     "architecture.kwargs.features_only is not a setting of an encoder"),
    ({"architecture": {**ARCH, "kwargs": {"img_size": 64, "num_classes": 7}}},
     "architecture.kwargs.num_classes is not a setting of an encoder"),
    ({"architecture": {**ARCH, "kwargs": {"img_size": 64, "act_layer": "nonexistent"}}},
     "timm model 'prompted_vit_test_patch16_224' does not accept the card's settings (KeyError"),
    ({"architecture": {**ARCH, "kwargs": {"img_size": 64, "global_pool": ""}}, "output": {"kind": "pooled", "dim": 64}},
     "architecture.kwargs.global_pool '' leaves every token unpooled, but output is 'pooled'"),
    ({"input": {"size": 64, "normalize": {"mean": [float("nan"), 0, 0], "std": [1, 1, 1]}}},
     "input.normalize needs finite means and finite positive stds"),
    ({"input": {"size": 64, "normalize": {"mean": [0, 0, 0], "std": [float("inf"), 1, 1]}}},
     "input.normalize needs finite means and finite positive stds"),
    ({"name": "a..b"}, "'a..b' is not a valid encoder name"),
])
def test_a_card_that_would_fail_every_store_stops_before_any(change, needle, models, store, tmp_path, capsys):
    """Each of these loaded, then failed (or silently changed) every store: features from weights
    outside the hash, a raw KeyError or RuntimeError per store, a red channel zeroed by an
    infinite std, an encoder name refused as an "unsafe slide id"."""
    name = change.get("name", "odd")
    card = write_card(models, **{"name": name, **{k: v for k, v in change.items() if k != "name"}})
    rc, err = extract(card, store, tmp_path / "f", capsys)
    one_line(rc, err, needle)
    assert not (tmp_path / "f").exists()


def test_a_weight_package_with_a_relative_name_is_one_line(models, store, tmp_path, capsys):
    card = write_card(models, weights=[{"role": "backbone", "file": "b.pth", "package": "../evil"},
                                       {"role": "prompts", "file": "promptstate.pth"}])
    rc, err = extract(card, store, tmp_path / "f", capsys)
    one_line(rc, err, f"{card}: weight package '../evil' is not installed")


def test_weight_files_are_told_apart_by_their_bytes_not_their_names(models, tmp_path):
    """A hub's safetensors named .bin or .pth loads; a file that is neither format is named so;
    an official PuzzleTuning training checkpoint (its command line kept as an argparse.Namespace
    under 'args') gives its prompts, without unpickling anything else."""
    import argparse

    sd = torch.load(models / "backbone.pth", weights_only=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.bin")
    loaded = read_state_dict(tmp_path / "model.bin", sd)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    torch.save(sd, tmp_path / "torch.safetensors")  # torch.load itself would hand this name to safetensors
    loaded = read_state_dict(tmp_path / "torch.safetensors", sd)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    (tmp_path / "junk.pth").write_bytes(b"\x1f\x8b" + bytes(100))
    with pytest.raises(ModelError, match=r"junk\.pth: not a weight file \(neither safetensors nor a PyTorch checkpoint\)$"):
        read_state_dict(tmp_path / "junk.pth", sd)
    prompts = 0.1 * torch.randn(3, 4, 64)
    torch.save({"model": {"Prompt_Tokens": prompts}, "epoch": 199, "args": argparse.Namespace(lr=1e-3, model="vit")},
               models / "checkpoint-199.pth")
    card = write_card(models, name="from-training", weights=[
        {"role": "backbone", "file": "backbone.pth"}, {"role": "prompts", "file": "checkpoint-199.pth"}])
    encoder = load_encoder(card, device="cpu")
    assert torch.equal(encoder.model.prompt_tokens.detach(), prompts)


def test_a_hub_model_takes_the_preprocessing_of_its_own_config(tmp_path, monkeypatch, capsys):
    """timm:hf-hub:/local-dir: models were built from their config.json but preprocessed with
    ImageNet's mean/std at 224 px (timm's registry knows nothing of them): silently wrong features."""
    import json

    import timm

    folder = tmp_path / "hub-model"
    folder.mkdir()
    cfg = {"input_size": [3, 96, 96], "interpolation": "bilinear", "mean": [0.7, 0.6, 0.7], "std": [0.2, 0.25, 0.18]}
    (folder / "config.json").write_text(json.dumps({"architecture": "test_convnext", "num_classes": 0, "pretrained_cfg": cfg}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        net = timm.create_model("test_convnext", num_classes=0).eval()
    torch.save(net.state_dict(), tmp_path / "w.pth")
    encoder = load_encoder(f"timm:local-dir:{folder}", device="cpu", weights=tmp_path / "w.pth")
    card = encoder.card
    assert (card.input_size, card.interpolation, card.mean, card.std) == (96, "bilinear", (0.7, 0.6, 0.7), (0.2, 0.25, 0.18))
    tiles = torch.from_numpy(np.random.default_rng(1).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8))
    x = torch.nn.functional.interpolate(tiles.permute(0, 3, 1, 2).float() / 255, size=(96, 96), mode="bilinear",
                                        antialias=True, align_corners=False).clamp(0, 1)
    with torch.no_grad():
        expected = net((x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1))
    torch.testing.assert_close(encoder.encode(tiles).float(), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ModelError, match=r"^timm:\.\./x: not a timm model"):
        load_encoder("timm:../x", device="cpu", weights=tmp_path / "w.pth")
    # a config.json that states no preprocessing: timm would fill in ImageNet's at 224 px
    (folder / "config.json").write_text(json.dumps({"architecture": "test_convnext", "num_classes": 0,
                                                    "pretrained_cfg": {"interpolation": "bilinear"}}))
    with pytest.raises(ModelError, match=r"its config.json's pretrained_cfg gives no input_size, mean, std; write an "
                       r"encoder card"):
        load_encoder(f"timm:local-dir:{folder}", device="cpu", weights=tmp_path / "w.pth")


def test_hub_models_come_from_the_local_cache_at_their_revision(tmp_path, monkeypatch):
    """hf-hub: models are read from the local Hugging Face cache at the revision asked for, with
    the hub never asked (even where HF_HUB_OFFLINE is not set); one missing there names the
    command that fetches that revision."""
    import json

    import timm
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--org--tiny"
    commit = "c" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text(commit)
    cfg = {"input_size": [3, 96, 96], "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    (repo / "snapshots" / commit / "config.json").write_text(
        json.dumps({"architecture": "test_convnext", "num_classes": 0, "pretrained_cfg": cfg}))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    asked = []

    def lookup(host, *args, **kwargs):
        asked.append(host)
        raise OSError(-2, "no network in this test")

    monkeypatch.setattr("socket.getaddrinfo", lookup)
    torch.save(timm.create_model("test_convnext", num_classes=0).state_dict(), tmp_path / "w.pth")
    card = load_encoder("timm:hf-hub:org/tiny@v1", device="cpu", weights=tmp_path / "w.pth").card
    assert (card.input_size, card.mean) == (96, (0.5, 0.5, 0.5))
    for name, fetch in (("org/tiny", "org/tiny config.json)"), ("org/tiny@v2", "org/tiny config.json --revision v2)")):
        with pytest.raises(ModelError, match=rf"^timm:hf-hub:{name}: not in the local Hugging Face cache .*, and wsitools "
                           rf"never downloads; fetch it first \(huggingface-cli download {re.escape(fetch)}$"):
            load_encoder(f"timm:hf-hub:{name}", device="cpu", weights=tmp_path / "w.pth")
    assert constants.HF_HUB_OFFLINE is False and asked == []  # as it was, and never used
