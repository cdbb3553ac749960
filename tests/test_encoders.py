"""Prompted ViT, official checkpoint layout, model cards, weight verification and fetching."""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from wsitools.cli import encoders as encoders_cli
from wsitools.device import resolve_device
from wsitools.encoders import (
    PromptedVisionTransformer,
    fetch_card,
    find_card,
    list_cards,
    load_encoder,
    load_weights,
    prompts_from_checkpoint,
    read_card,
    read_checkpoint,
)
from wsitools.errors import ModelError

# The tiny registered model's architecture, as a plain timm ViT (the "official" backbone).
TINY = dict(patch_size=16, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0)
TOKENS = 4
MODELS = Path(__file__).resolve().parents[1] / "models"


def randomised(module: nn.Module, seed: int) -> nn.Module:
    """Give every tensor non-trivial values (timm inits LayerNorms to 1/0 and biases to 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name in ("cls_token", "pos_embed"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.05 * noise)
    return module


def official_backbone(seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    """A timm ViT state dict in the layout of ViT_b16_224_Imagenet.pth (with its 1000-class head)."""
    vit = VisionTransformer(**{**TINY, "num_classes": 1000, **overrides})
    return randomised(vit, seed).state_dict()


def official_promptstate(shape=(3, TOKENS, 64), seed: int = 1) -> dict:
    """A promptstate as PuzzleTuning saves it: an nn.Parameter and the (unused) head state dict."""
    g = torch.Generator().manual_seed(seed)
    return {
        "head": nn.Linear(64, 1000).state_dict(),
        "Prompt_Tokens": nn.Parameter(0.5 * torch.randn(shape, generator=g)),
    }


# ---- a reference forward written out plainly from the official tensors ----------------------


def _ln(x: torch.Tensor, sd: dict, key: str) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[f"{key}.weight"], sd[f"{key}.bias"], eps=1e-6)


def _block(x: torch.Tensor, sd: dict, i: int, heads: int) -> torch.Tensor:
    p = f"blocks.{i}."
    b, n, d = x.shape
    h = _ln(x, sd, p + "norm1")
    qkv = h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
    q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1)
    a = (attn @ v).transpose(1, 2).reshape(b, n, d)
    x = x + a @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
    h = _ln(x, sd, p + "norm2")
    h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
    return x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]


def reference_forward(images: torch.Tensor, sd: dict, prompts: torch.Tensor | None, mode: str = "deep"):
    """[B,3,H,W] -> normed tokens [B, 1+N, D], in float64, as the official PuzzleTuning forward computes them."""
    sd = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(images.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x], dim=1) + sd["pos_embed"]
    n = x.shape[1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    if prompts is not None and mode == "shallow":
        x = torch.cat([x, prompts[0].double().expand(len(x), -1, -1)], dim=1)
    for i in range(depth):
        if prompts is not None and mode == "deep":
            x = torch.cat([x, prompts[i].double().expand(len(x), -1, -1)], dim=1)  # prompts after patches
            x = _block(x, sd, i, TINY["num_heads"])[:, :n]  # run the block, drop the prompt outputs
        else:
            x = _block(x, sd, i, TINY["num_heads"])
    return _ln(x[:, :n], sd, "norm")


def tissue_images(n: int = 2, size: int = 224) -> torch.Tensor:
    from skimage import data

    img = data.immunohistochemistry()
    tiles = np.stack([img[40 * i : 40 * i + size, 60 * i : 60 * i + size] for i in range(n)])
    return torch.from_numpy(tiles)


def write_card(directory: Path, name: str = "tiny-official", **sections) -> Path:
    card = {
        "name": name,
        "architecture": {"model": "prompted_vit_test_patch16_224", "prompts": {"tokens": TOKENS, "mode": "deep"}},
        "weights": [
            {"role": "backbone", "file": "backbone.pth"},
            {"role": "prompts", "file": "promptstate.pth"},
        ],
        "input": {"size": 224, "normalize": None},
        "output": {"kind": "cls", "dim": 64},
        "precision": {"compute": "fp32"},
    }
    card.update(sections)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


def run_cli(argv: list[str]) -> int:
    """Run our sub-commands through argparse as ``wsitools`` does (without the other modules)."""
    parser = argparse.ArgumentParser()
    encoders_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture()
def official_files(tmp_path):
    backbone, promptstate = official_backbone(), official_promptstate()
    torch.save(backbone, tmp_path / "backbone.pth")
    torch.save(promptstate, tmp_path / "promptstate.pth")
    return tmp_path, backbone, promptstate


# ---- the prompted ViT -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["deep", "shallow"])
def test_prompted_vit_matches_plain_reference(mode):
    layers = 3 if mode == "deep" else 1
    backbone, promptstate = official_backbone(), official_promptstate((layers, TOKENS, 64))
    model = PromptedVisionTransformer(**TINY, num_classes=0, prompt_tokens=TOKENS, prompt_mode=mode).eval()
    assert model.prompt_tokens.shape == (layers, TOKENS, 64) and not model.prompt_tokens.any()  # zero-init
    sd = {k: v for k, v in backbone.items() if not k.startswith("head.")}
    model.load_state_dict({**sd, "prompt_tokens": promptstate["Prompt_Tokens"].detach()})
    x = tissue_images().permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        ours = model.forward_features(x)
        cls = model.forward_head(ours, pre_logits=True)
    ref = reference_forward(x, backbone, promptstate["Prompt_Tokens"].detach(), mode)
    assert ours.shape == (2, 1 + 196, 64)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(cls.double(), ref[:, 0], atol=1e-5, rtol=0)
    # the prompts change the output (the comparison above is not vacuous)
    assert (reference_forward(x, backbone, None)[:, 0] - ref[:, 0]).abs().max() > 1e-2


def test_zero_prompt_tokens_is_timm_vit():
    timm_vit = randomised(VisionTransformer(**TINY, num_classes=0), seed=3).eval()
    ours = PromptedVisionTransformer(**TINY, num_classes=0, prompt_tokens=0).eval()
    assert ours.prompt_tokens is None
    ours.load_state_dict(timm_vit.state_dict(), strict=True)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), timm_vit(x), atol=0, rtol=0)


def test_freeze_backbone_trains_only_prompts_and_checkpointing_agrees():
    model = timm.create_model("prompted_vit_test_patch16_224", prompt_tokens=TOKENS, prompt_mode="deep")
    assert isinstance(model, PromptedVisionTransformer) and model.num_features == 64
    randomised(model, seed=5)
    model.freeze_backbone()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_tokens"]
    x = torch.rand(2, 3, 224, 224)
    model.forward_features(x)[:, 0].pow(2).sum().backward()
    grad = model.prompt_tokens.grad.clone()
    assert (grad.abs().sum(dim=(1, 2)) > 0).all()  # every layer's prompts reach the output
    model.prompt_tokens.grad = None
    model.set_grad_checkpointing(True)
    model.forward_features(x)[:, 0].pow(2).sum().backward()
    torch.testing.assert_close(model.prompt_tokens.grad, grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(NotImplementedError):
        model.forward_intermediates(x)


# ---- the official files -----------------------------------------------------------------------


def test_official_files_load_and_match_reference(official_files):
    directory, backbone, promptstate = official_files
    enc = load_encoder(write_card(directory), device="cpu")
    tiles = tissue_images()
    feats = enc.encode(tiles)
    ref = reference_forward(tiles.permute(0, 3, 1, 2).float() / 255, backbone, promptstate["Prompt_Tokens"].detach())
    assert feats.shape == (2, 64) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.double(), ref[:, 0], atol=1e-5, rtol=0)
    assert enc.weight_sha256["backbone"] == hashlib.sha256((directory / "backbone.pth").read_bytes()).hexdigest()


def test_prompts_from_a_training_checkpoint(official_files, tmp_path):
    directory, backbone, promptstate = official_files
    prompts = promptstate["Prompt_Tokens"].detach()
    checkpoint = {
        "model": {"Prompt_Tokens": prompts, "decoder_embed.weight": torch.zeros(8, 64)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
        "epoch": 199,
    }
    torch.save(checkpoint, directory / "checkpoint-199.pth")
    torch.testing.assert_close(prompts_from_checkpoint(read_checkpoint(directory / "checkpoint-199.pth"), source="x"), prompts)
    model = timm.create_model("prompted_vit_test_patch16_224", prompt_tokens=TOKENS)
    load_weights(model, backbone=directory / "backbone.pth", prompts=directory / "checkpoint-199.pth")
    torch.testing.assert_close(model.prompt_tokens.detach(), prompts)
    torch.testing.assert_close(model.pos_embed.detach(), backbone["pos_embed"])


def test_wrong_prompt_shape_names_the_file(official_files):
    directory, _, _ = official_files
    torch.save(official_promptstate((3, 7, 64)), directory / "promptstate.pth")
    with pytest.raises(ModelError, match=r"promptstate\.pth: prompt tokens have shape \[3, 7, 64\].*\[3, 4, 64\]"):
        load_encoder(write_card(directory), device="cpu")


def test_wrong_backbone_shape_and_missing_key_name_the_file(official_files):
    directory, backbone, _ = official_files
    torch.save(official_backbone(img_size=112), directory / "backbone.pth")
    with pytest.raises(ModelError, match=r"backbone\.pth: does not fit the model; wrong shapes: pos_embed \[1, 50, 64\]"):
        load_encoder(write_card(directory), device="cpu")
    del backbone["blocks.1.norm1.weight"]
    torch.save(backbone, directory / "backbone.pth")
    with pytest.raises(ModelError, match=r"backbone\.pth: .*missing keys: blocks\.1\.norm1\.weight"):
        load_encoder(write_card(directory), device="cpu")


class Payload:
    """Any class: unpickling it would run code, so weights_only loading must refuse it."""


def test_pickled_code_is_refused(tmp_path):
    torch.save({"evil": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ModelError, match=r"evil\.pth: not a readable weight file"):
        read_checkpoint(tmp_path / "evil.pth")


# ---- cards ------------------------------------------------------------------------------------


def test_builtin_cards_validate():
    cards = {c.name: c for c in list_cards(MODELS)}
    assert {"puzzletuning-vitb16", "vitb16-imagenet", "efficientnet-lite0-imagenet", "vit-test-tiny"} <= set(cards)
    pt = cards["puzzletuning-vitb16"]
    assert (pt.prompt_tokens, pt.prompt_mode, pt.dim, pt.mean, pt.output) == (20, "deep", 768, None, "cls")
    assert pt.weight("backbone").file == pt.weight("prompts").file.split("_timm_")[0] + "_Imagenet.pth"
    assert cards["vitb16-imagenet"].weight("backbone").file == pt.weight("backbone").file
    # the real ViT-B architecture accepts the official promptstate shape
    model = timm.create_model(pt.model, prompt_tokens=20, prompt_mode="deep", device="meta")
    assert tuple(model.prompt_tokens.shape) == (12, 20, 768) and model.num_features == 768


def test_models_dir_from_environment(tmp_path, monkeypatch, official_files):
    directory, _, _ = official_files
    write_card(directory)
    monkeypatch.setenv("WSITOOLS_MODELS", str(directory))
    assert [c.name for c in list_cards()] == ["tiny-official"]
    assert find_card("tiny-official").source == (directory / "tiny-official.yaml").resolve()
    with pytest.raises(ModelError, match="no model card named 'vit-test-tiny'"):
        find_card("vit-test-tiny")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"output": {"kind": "attention", "dim": 64}}, r"invalid model card at output/kind"),
        ({"precision": {"compute": "fp8"}}, r"invalid model card at precision/compute"),
        ({"weigths": []}, r"invalid model card at weigths: unknown key \(did you mean 'weights'\?\)"),
        ({"precision": {"compute": "bf16", "compte": "x"}}, r"at precision/compte: unknown key \(did you mean 'compute'\?\)"),
        ({"precision": {"compute": "bf16", "features": "float16"}},
         r"precision\.features is not a card setting: features are stored float32, or float16 with "
         r"`wsitools extract --dtype float16`; delete that line from the card"),
        ({"weights": []}, r"lists no weight files"),
        ({"input": {"size": 224, "normalize": {"mean": [0.5], "std": [1, 1, 1]}}}, r"input/normalize"),
        ({"architecture": {"model": "no_such_model_xyz"}, "weights": [{"role": "backbone", "file": "backbone.pth"}]},
         r"unknown timm model 'no_such_model_xyz'"),
        ({"output": {"kind": "cls", "dim": 65}}, r"output.dim is 65 but prompted_vit_test_patch16_224 gives 64"),
        ({"architecture": {"model": "prompted_vit_test_patch16_224", "kwarg": {"config": "x.json"}}},
         r"unknown key architecture\.kwarg \(neither a network setting nor a registered card kind: pathotune\)"),
        ({"weights": [{"role": "backbone", "file": "backbone.pth"}, {"role": "extra", "file": "promptstate.pth"}]},
         r"unknown weight role extra \(backbone, prompts\)"),
    ],
)
def test_bad_cards_are_clear_errors(official_files, change, message):
    directory, _, _ = official_files
    path = write_card(directory, **change)
    with pytest.raises(ModelError, match=message) as info:
        load_encoder(path, device="cpu")
    assert "tiny-official.yaml" in str(info.value)


def test_wrong_checksum_and_missing_file(official_files):
    directory, _, _ = official_files
    sha = hashlib.sha256((directory / "backbone.pth").read_bytes()).hexdigest()
    good = [{"role": "backbone", "file": "backbone.pth", "sha256": sha}, {"role": "prompts", "file": "promptstate.pth"}]
    assert load_encoder(write_card(directory, weights=good), device="cpu").weight_sha256["backbone"] == sha
    bad = [{**good[0], "sha256": "0" * 64}, good[1]]
    with pytest.raises(ModelError, match=rf"backbone\.pth: wrong checksum .*sha256 {sha}.*expects 0000"):
        load_encoder(write_card(directory, weights=bad), device="cpu")
    gone = [good[0], {"role": "prompts", "file": "absent.pth", "url": "https://example.org/absent.pth"}]
    with pytest.raises(ModelError, match=r"absent\.pth: prompts weight file of encoder 'tiny-official' not found.*encoders fetch"):
        load_encoder(write_card(directory, weights=gone), device="cpu")


def test_encoder_hash_follows_weights_and_settings(official_files):
    directory, _, _ = official_files
    card = write_card(directory)
    h1 = load_encoder(card, device="cpu").encoder_hash
    assert load_encoder(card, device="cpu").encoder_hash == h1
    torch.save(official_promptstate(seed=9), directory / "promptstate.pth")
    h2 = load_encoder(card, device="cpu").encoder_hash
    card = write_card(directory, input={"size": 224, "normalize": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    h3 = load_encoder(card, device="cpu").encoder_hash
    assert len({h1, h2, h3}) == 3


def test_fp32_precision_overrides_a_half_precision_card(official_files):
    directory, _, _ = official_files
    card = write_card(directory, precision={"compute": "bf16"})
    half = load_encoder(card, device="cpu")
    exact = load_encoder(card, device="cpu", precision="fp32")
    assert (half.card.compute_precision, exact.card.compute_precision) == ("bf16", "fp32")
    assert exact.encoder_hash != half.encoder_hash  # stores of one never pass for the other
    tiles = tissue_images(2, 224)
    fh, fe = half.encode(tiles), exact.encode(tiles)
    assert fh.dtype == fe.dtype == torch.float32
    assert torch.equal(fe, fh)  # a CPU computes in float32 either way
    # a card that already computes in float32 is unchanged
    plain = load_encoder(write_card(directory), device="cpu")
    assert load_encoder(write_card(directory), device="cpu", precision="fp32").encoder_hash == plain.encoder_hash


def test_random_test_card_is_deterministic():
    a = load_encoder("vit-test-tiny", device="cpu", models_dir=MODELS)
    b = load_encoder("vit-test-tiny", device="cpu", models_dir=MODELS)
    tiles = tissue_images(2, 112)  # resized to 224 by the card recipe
    fa, fb = a.encode(tiles), b.encode(tiles)
    assert fa.shape == (2, 64) and torch.equal(fa, fb) and a.encoder_hash == b.encoder_hash
    assert a.model.prompt_tokens.abs().sum() > 0 and not a.model.prompt_tokens.requires_grad


# ---- EfficientNet-Lite0 with the real ImageNet weights (offline) ------------------------------


def test_efficientnet_lite0_real_weights():
    from skimage import data

    from wsitools.encoders.checkpoint import convert_ordered_state_dict, unwrap_state_dict

    enc = load_encoder("efficientnet-lite0-imagenet", device="cpu", models_dir=MODELS)
    assert enc.dim == 1280 and enc.card.compute_precision == "bf16"
    path = enc.card.weight("backbone").path
    assert path.is_file() and enc.weight_sha256["backbone"] == enc.card.weight("backbone").sha256
    # the same file, loaded by hand into timm's classifier, recognises a cat and a coffee cup
    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    sd = unwrap_state_dict(read_checkpoint(path), source=str(path))
    classifier.load_state_dict(convert_ordered_state_dict(sd, classifier.state_dict(), source=str(path)))
    images = [torch.from_numpy(np.ascontiguousarray(a)[None]) for a in (data.chelsea()[:300, 50:350], data.coffee())]
    x = torch.cat([enc.preprocess(i) for i in images])
    with torch.no_grad():
        top = classifier(x).argmax(dim=1).tolist()
        pooled = classifier.forward_head(classifier.forward_features(x), pre_logits=True)
    assert 281 <= top[0] <= 285  # ImageNet domestic cats
    assert top[1] == 967  # espresso
    feats = torch.cat([enc.encode(i) for i in images])
    torch.testing.assert_close(feats.float(), pooled, atol=2e-2, rtol=2e-3)


def test_timm_model_with_local_checkpoint(tmp_path):
    net = timm.create_model("test_resnet", pretrained=False)
    torch.save(randomised(net, seed=2).state_dict(), tmp_path / "resnet.pth")
    enc = load_encoder("timm:test_resnet", weights=tmp_path / "resnet.pth", device="cpu")
    assert enc.name == "timm-test_resnet" and enc.card.output == "pooled"
    tiles = tissue_images(2, 160)
    x = enc.preprocess(tiles)
    with torch.no_grad():
        net.eval()
        expected = net.forward_head(net.forward_features(x), pre_logits=True)
    torch.testing.assert_close(enc.encode(tiles), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelError, match="needs a local checkpoint"):
        load_encoder("timm:test_resnet", device="cpu")


# ---- fetching ---------------------------------------------------------------------------------


def test_fetch_from_file_url_verifies_sha256(tmp_path, caplog):
    source = tmp_path / "server" / "weights.pth"
    source.parent.mkdir()
    torch.save(official_backbone(), source)
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    models = tmp_path / "models"
    models.mkdir()
    entry = {"role": "backbone", "file": "fetched.pth", "url": source.as_uri(), "sha256": sha}
    card = read_card(write_card(models, "fetchme", architecture={"model": "prompted_vit_test_patch16_224"}, weights=[entry]))
    [result] = fetch_card(card)
    assert result.status == "downloaded" and result.sha256 == sha
    assert (models / "fetched.pth").read_bytes() == source.read_bytes()
    assert not list(models.glob(".tmp-*"))
    assert fetch_card(card)[0].status == "present"
    assert load_encoder(card, device="cpu").weight_sha256["backbone"] == sha

    wrong = read_card(write_card(models, "wrong", architecture={"model": "prompted_vit_test_patch16_224"},
                                 weights=[{**entry, "file": "wrong.pth", "sha256": "f" * 64}]))
    with pytest.raises(ModelError, match=r"downloaded file has sha256 .* expects ffff.*nothing was written"):
        fetch_card(wrong)
    assert not (models / "wrong.pth").exists() and not list(models.glob(".tmp-*"))

    unpinned = read_card(write_card(models, "unpinned", architecture={"model": "prompted_vit_test_patch16_224"},
                                    weights=[{**entry, "file": "unpinned.pth", "sha256": None}]))
    with caplog.at_level(logging.WARNING):
        assert fetch_card(unpinned)[0].status == "downloaded"
    assert sha in caplog.text and "pins no sha256" in caplog.text

    (models / "a-folder.pth").mkdir()
    folder = read_card(write_card(models, "folder", architecture={"model": "prompted_vit_test_patch16_224"},
                                  weights=[{**entry, "file": "a-folder.pth"}]))
    with pytest.raises(ModelError, match=rf"^{re.escape(str(models / 'a-folder.pth'))}: is a folder, where the card "):
        fetch_card(folder)
    assert not list(models.glob(".tmp-*")) and not any((models / "a-folder.pth").iterdir())

    broken = read_card(write_card(models, "broken", architecture={"model": "prompted_vit_test_patch16_224"},
                                  weights=[{**entry, "file": "broken.pth", "url": (tmp_path / "nope.pth").as_uri()}]))
    with pytest.raises(ModelError, match=r"nope\.pth: download failed"):
        fetch_card(broken)


def test_cli_fetch(tmp_path, capsys):
    source = tmp_path / "weights.pth"
    torch.save(official_backbone(), source)
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    models = tmp_path / "models"
    models.mkdir()
    write_card(models, "fetchme", architecture={"model": "prompted_vit_test_patch16_224"},
               weights=[{"role": "backbone", "file": "w.pth", "url": source.as_uri(), "sha256": sha}])
    assert run_cli(["encoders", "fetch", "fetchme", "--models-dir", str(models)]) == 0
    assert f"fetchme: backbone {models / 'w.pth'}: downloaded sha256 {sha}" in capsys.readouterr().out
    assert run_cli(["encoders", "--models-dir", str(models), "--verify"]) == 0
    assert "backbone: ok" in capsys.readouterr().out
    (models / "w.pth").write_bytes(b"PK\x03\x04 damaged")  # a script checking the weights reads the exit status
    assert run_cli(["encoders", "--models-dir", str(models), "--verify"]) == 1
    printed = capsys.readouterr()
    assert "backbone: WRONG CHECKSUM" in printed.out and printed.err == "1 weight file(s) with a wrong checksum\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_an_error():
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ModelError, match="no CUDA GPU is available"):
        resolve_device("cuda")


def test_mean_patch_output(official_files):
    directory, backbone, promptstate = official_files
    enc = load_encoder(write_card(directory, output={"kind": "mean_patch", "dim": 64}), device="cpu")
    tiles = tissue_images()
    ref = reference_forward(tiles.permute(0, 3, 1, 2).float() / 255, backbone, promptstate["Prompt_Tokens"].detach())
    torch.testing.assert_close(enc.encode(tiles).double(), ref[:, 1:].mean(dim=1), atol=1e-5, rtol=0)


def test_run_blocks_appends_shallow_and_deep_prompts_and_checkpoints_alike():
    """The one prompted forward: shallow tokens travel through every block, deep tokens live for
    one block, the outputs drop both; gradient checkpointing changes nothing."""
    from wsitools.encoders.vit import embed_tokens, run_blocks

    torch.manual_seed(0)
    vit = timm.create_model("prompted_vit_test_patch16_224").eval()
    x = embed_tokens(vit, torch.rand(2, 3, 224, 224))
    shallow = torch.randn(2, 3, 64)
    deep = torch.randn(len(vit.blocks), 2, 5, 64)
    seq = torch.cat([x, shallow], 1)
    for i, block in enumerate(vit.blocks):  # written out by hand
        seq = block(torch.cat([seq, deep[i]], 1))[:, : seq.shape[1]]
    expected = vit.norm(seq[:, : x.shape[1]])
    got = run_blocks(vit, x, shallow=[shallow], deep=lambda i: deep[i])
    assert got.shape == x.shape and torch.allclose(got, expected, atol=1e-6)
    vit.set_grad_checkpointing(True)
    with torch.enable_grad():
        ckpt = run_blocks(vit, x, shallow=[shallow], deep=lambda i: deep[i])
    assert torch.allclose(ckpt, expected, atol=1e-6)
    assert torch.allclose(run_blocks(vit, x), vit.norm(vit.blocks(x)), atol=1e-6)


# ---- networks checked against the card when the encoder loads ---------------------------------

SMALL_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2}


def random_card(directory: Path, model: str, *, size: int, kind: str, dim: int, name: str = "net", **kwargs) -> Path:
    """A random-weight card (init_seed, no weight files) of a timm model with ``kwargs``."""
    return write_card(
        directory, name,
        architecture={"model": model, "kwargs": kwargs, "init_seed": 0}, weights=[],
        input={"size": size, "normalize": None}, output={"kind": kind, "dim": dim},
    )


@pytest.mark.parametrize("model, kwargs, dim", [
    ("vit_tiny_patch16_224", {**SMALL_VIT, "in_chans": 1}, 32),
    ("test_resnet", {"in_chans": 1}, 256),
])
def test_a_network_for_other_than_rgb_is_refused_at_load(tmp_path, model, kwargs, dim):
    path = random_card(tmp_path, model, size=224, kind="pooled", dim=dim, **kwargs)
    with pytest.raises(ModelError, match=r"net\.yaml: architecture\.kwargs\.in_chans is 1, but tiles are RGB"):
        load_encoder(path, device="cpu")


def test_a_dynamic_size_vit_needs_a_multiple_of_its_patch_size(tmp_path):
    vit = {**SMALL_VIT, "patch_size": 14, "dynamic_img_size": True}
    path = random_card(tmp_path, "vit_tiny_patch16_224", size=256, kind="cls", dim=32, **vit)
    with pytest.raises(ModelError, match=r"net\.yaml: input\.size 256 is not a multiple of vit_tiny_patch16_224's "
                       r"patch size 14 \(dynamic_img_size takes only multiples\); set input\.size to 252 or 266"):
        load_encoder(path, device="cpu")
    for size, extra in ((252, {}), (256, {"dynamic_img_pad": True})):
        path = random_card(tmp_path, "vit_tiny_patch16_224", size=size, kind="cls", dim=32, **vit, **extra)
        assert load_encoder(path, device="cpu").encode(tissue_images(1, size)).shape == (1, 32)


def test_any_network_that_cannot_take_the_input_size_is_refused_at_load(tmp_path):
    """LeViT's attention biases are built for one grid: no explicit check knows it, the probe forward does."""
    with pytest.raises(ModelError, match=r"net\.yaml: levit_128s cannot run on RGB tiles of 256 x 256 px, the "
                       r"card's input\.size \(RuntimeError: The size of tensor a \(256\) must match"):
        load_encoder(random_card(tmp_path, "levit_128s", size=256, kind="pooled", dim=384), device="cpu")
    assert load_encoder(random_card(tmp_path, "levit_128s", size=224, kind="pooled", dim=384), device="cpu").dim == 384


class ItemNet(nn.Module):
    """A network whose forward reads a value (``.item()``), which a meta tensor has not: the
    load-time probe must not refuse it for that."""

    num_features = 4

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * float(y.abs().max().item() >= 0)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@timm.models.register_model
def wsitools_test_item_net(pretrained: bool = False, **kwargs) -> ItemNet:
    return ItemNet()


def test_a_network_the_meta_device_cannot_run_still_loads(tmp_path):
    enc = load_encoder(random_card(tmp_path, "wsitools_test_item_net", size=32, kind="pooled", dim=4), device="cpu")
    assert enc.encode(tissue_images(2, 32)).shape == (2, 4)


@pytest.mark.parametrize("model, kwargs", [
    ("vit_tiny_patch16_224", {**SMALL_VIT, "class_token": False, "global_pool": "avg", "reg_tokens": 4}),
    ("eva02_tiny_patch14_224", SMALL_VIT),
    ("beit_base_patch16_224", SMALL_VIT),
])
@pytest.mark.parametrize("kind", ["mean_patch", "cls", "cls_mean_patch"])
def test_token_outputs_are_refused_where_the_final_norm_follows_pooling(tmp_path, model, kwargs, kind):
    """fc_norm networks have no normed tokens: a token feature would silently skip the final norm."""
    size = 224
    dim = 64 if kind == "cls_mean_patch" else 32
    with pytest.raises(ModelError, match=rf"net\.yaml: output '{kind}' would take {model}'s tokens before their final "
                       r"norm \(its fc_norm follows the pooling\); use output kind 'pooled'"):
        load_encoder(random_card(tmp_path, model, size=size, kind=kind, dim=dim, **kwargs), device="cpu")
    enc = load_encoder(random_card(tmp_path, model, size=size, kind="pooled", dim=32, **kwargs), device="cpu")
    x = enc.preprocess(tissue_images(2, size))
    with torch.no_grad():
        tokens = enc.model.forward_features(x)
        expected = enc.model.fc_norm(tokens[:, enc.model.num_prefix_tokens:].mean(dim=1))  # timm's avg pool
    torch.testing.assert_close(enc.encode(tissue_images(2, size)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", ["eva02_tiny_patch14_224", "beit_base_patch16_224"])
def test_class_token_of_eva02_and_beit(tmp_path, model):
    """Only timm's VisionTransformer says has_class_token; EVA-02 and BEiT have a cls_token too."""
    kwargs = {**SMALL_VIT, "global_pool": "token"}  # timm then puts the final norm on every token
    enc = load_encoder(random_card(tmp_path, model, size=224, kind="cls", dim=32, **kwargs), device="cpu")
    x = enc.preprocess(tissue_images(2))
    with torch.no_grad():
        expected = enc.model.forward_head(enc.model.forward_features(x), pre_logits=True)  # timm's token pooling
    torch.testing.assert_close(enc.encode(tissue_images(2)), expected, atol=1e-6, rtol=0)
    assert not torch.allclose(expected, enc.model.forward_features(x)[:, 1])


def test_torchscript_and_raw_pickles_are_one_line_without_warnings(tmp_path):
    import pickle
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's own deprecation notices
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "jit.pt")
    (tmp_path / "raw.pth").write_bytes(pickle.dumps({"evil": Payload()}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ModelError) as jit:
            read_checkpoint(tmp_path / "jit.pt")
        with pytest.raises(ModelError, match=r"raw\.pth: not a readable weight file \(torch\.load, weights only: it "
                           r"holds pickled Python objects other than tensors, which are never unpickled\)"):
            read_checkpoint(tmp_path / "raw.pth")
    assert [str(w.message) for w in caught] == []
    assert str(jit.value) == (f"{tmp_path / 'jit.pt'}: not a readable weight file (torch.load, weights only: a "
                              "TorchScript archive, not a state dict (save the model's state_dict() instead))")


def test_compiled_and_parallel_prefixes_are_stripped_and_odd_entries_named():
    from wsitools.encoders import unwrap_state_dict

    t = torch.zeros(1)
    for prefix in ("module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        assert unwrap_state_dict({"model": {prefix + "a.weight": t}}, source="x.pth") == {"a.weight": t}
    with pytest.raises(ModelError, match=r"^x\.pth: entry 'state_dict_ema' holds OrderedDict, not a tensor \(a state "
                       r"dict of tensors is read at the top level or under 'model' or 'state_dict'\)$"):
        unwrap_state_dict({"state_dict_ema": nn.Linear(1, 1).state_dict()}, source="x.pth")


def test_listing_shows_every_card_and_a_row_per_broken_one(official_files, capsys):
    directory, _, _ = official_files
    write_card(directory)
    write_card(directory, "broken", weights=[])
    assert run_cli(["encoders", "--models-dir", str(directory)]) == 2
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert set(rows) == {"broken", "tiny-official"}
    assert rows["tiny-official"].split()[1:3] == ["prompted_vit_test_patch16_224", "64"]
    assert rows["broken"].endswith(
        "BROKEN: the card lists no weight files; give architecture.init_seed for a random-weight test model")
    assert err == "1 card(s) could not be read (BROKEN above)\n"
