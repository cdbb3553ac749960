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
