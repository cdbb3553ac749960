"""Cards of the pathology foundation models (UNI, UNI2-h, Virchow, Virchow2, H-optimus-0,
Prov-GigaPath).

Each card is checked against its model card's published recipe, written out in this file:

- the architecture: the exact network, built on the meta device (no memory), has the parameter
  names and shapes of the network built from the published ``timm.create_model`` arguments
  verbatim (classes, not names) and the parameter count the publishers state;
- the preprocessing: ``Encoder.preprocess`` against the published torchvision transform;
- the feature: a scaled-down copy of the card (same timm constructor and structure, one block,
  width 48) with random weights, against the published feature code applied to the model's
  own output.

No weights are downloaded; the full-size networks never hold memory.
"""

from __future__ import annotations

import dataclasses
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torchvision.transforms.v2 as T
from torchvision.transforms import InterpolationMode

from wsitools.encoders import fetch_card, find_card, load_encoder
from wsitools.encoders.cards import EncoderCard, read_card
from wsitools.encoders.fetch import download_request, hub_repo
from wsitools.encoders.loading import Encoder, _create, build_encoder
from wsitools.errors import ModelError

MODELS = Path(__file__).resolve().parents[1] / "models"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BILINEAR, BICUBIC = InterpolationMode.BILINEAR, InterpolationMode.BICUBIC

# The published recipes, from each model card on Hugging Face (URLs in the card files' comments).
# arch: the timm.create_model call; params: the stated size (millions); transform: the published
# eval transform; feature: the published embedding code on the model's output.
PUBLISHED: dict[str, dict[str, Any]] = {
    "uni": dict(
        arch=("vit_large_patch16_224", dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                                            dynamic_img_size=True)),
        params=303,  # ViT-L/16
        transform=T.Compose([T.Resize(224, interpolation=BILINEAR), T.CenterCrop(224),
                             T.ToDtype(torch.float32, scale=True), T.Normalize(*IMAGENET)]),
        feature=lambda model, x: model(x),  # num_classes=0, global pool "token": the class token
        dim=1024,
    ),
    "uni2-h": dict(
        arch=("vit_giant_patch14_224", dict(
            img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
            mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer=timm.layers.SwiGLUPacked,
            act_layer=torch.nn.SiLU, reg_tokens=8, dynamic_img_size=True)),
        params=681,
        transform=T.Compose([T.Resize(224, interpolation=BILINEAR), T.CenterCrop(224),
                             T.ToDtype(torch.float32, scale=True), T.Normalize(*IMAGENET)]),
        feature=lambda model, x: model(x),
        dim=1536,
    ),
    "virchow2": dict(
        arch=("vit_huge_patch14_224", dict(
            img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375, global_pool="",
            dynamic_img_size=True, mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU)),
        params=632,
        transform=T.Compose([T.Resize(224, interpolation=BICUBIC), T.CenterCrop(224),
                             T.ToDtype(torch.float32, scale=True), T.Normalize(*IMAGENET)]),
        # "class_token = output[:, 0]; patch_tokens = output[:, 5:]  # tokens 1-4 are register tokens"
        feature=lambda model, x: torch.cat([model(x)[:, 0], model(x)[:, 5:].mean(1)], dim=-1),
        dim=2560,
    ),
    "virchow": dict(
        arch=("vit_huge_patch14_224", dict(
            img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True,
            mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU)),
        params=632,
        transform=T.Compose([T.Resize(224, interpolation=BICUBIC), T.CenterCrop(224),
                             T.ToDtype(torch.float32, scale=True), T.Normalize(*IMAGENET)]),
        # "class_token = output[:, 0]; patch_tokens = output[:, 1:]"
        feature=lambda model, x: torch.cat([model(x)[:, 0], model(x)[:, 1:].mean(1)], dim=-1),
        dim=2560,
    ),
    "h-optimus-0": dict(
        arch=("vit_giant_patch14_reg4_dinov2", dict(num_classes=0, img_size=224, global_pool="token",
                                                    init_values=1e-5, dynamic_img_size=False)),
        params=1100,  # "1.1B parameters"
        transform=T.Compose([T.Resize(224, interpolation=BILINEAR), T.ToDtype(torch.float32, scale=True),
                             T.Normalize(mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517))]),
        feature=lambda model, x: model(x),
        dim=1536,
    ),
    "prov-gigapath": dict(
        arch=("vit_giant_patch14_dinov2", dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40,
                                               num_heads=24, init_values=1e-5, mlp_ratio=5.33334, num_classes=0)),
        params=1135,  # "1.13B" (ViT-g with 16 px patches)
        transform=T.Compose([T.Resize(256, interpolation=BICUBIC), T.CenterCrop(224),
                             T.ToDtype(torch.float32, scale=True), T.Normalize(*IMAGENET)]),
        feature=lambda model, x: model(x),
        dim=1536,
    ),
}
NAMES = sorted(PUBLISHED)
TINY_WIDTH = 48  # 3 heads of 16; SwiGLU hidden int(48 * 5.33) = 256 is even, as the packed MLP needs


def tiny(card: EncoderCard) -> EncoderCard:
    """The card at one block and width 48, random weights from seed 0: same timm constructor,
    patch size, register tokens, MLP kind, layer scale and class-token layout."""
    kwargs = {**card.model_kwargs, "depth": 1, "embed_dim": TINY_WIDTH, "num_heads": 3}
    dim = 2 * TINY_WIDTH if card.output == "cls_mean_patch" else TINY_WIDTH
    return dataclasses.replace(card, model_kwargs=kwargs, weights=(), init_seed=0, dim=dim)


def randomise(encoder: Encoder, seed: int = 0) -> Encoder:
    """Non-trivial values everywhere (layer scale 1e-5 would make every block nearly the identity,
    register tokens start near zero): the recipes must then pick the right tokens to agree."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return encoder


def tiny_encoder(name: str) -> Encoder:
    return randomise(build_encoder(tiny(find_card(name, models_dir=MODELS)), device="cpu"))


@pytest.mark.parametrize("name", NAMES)
def test_card_builds_the_published_architecture(name):
    card = find_card(name, models_dir=MODELS)
    model_name, published = PUBLISHED[name]["arch"]
    with torch.device("meta"):
        ours = _create(card, with_classifier=False)
        reference = timm.create_model(model_name, pretrained=False, **published)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert type(ours.blocks[0].mlp) is type(reference.blocks[0].mlp)
    assert type(ours.blocks[0].mlp.act) is type(reference.blocks[0].mlp.act)
    assert ours.num_prefix_tokens == reference.num_prefix_tokens
    assert ours.patch_embed.patch_size == reference.patch_embed.patch_size
    millions = sum(p.numel() for p in ours.parameters()) / 1e6
    assert millions == pytest.approx(PUBLISHED[name]["params"], rel=0.035)
    assert card.dim == PUBLISHED[name]["dim"]
    assert card.weights[0].url.startswith("https://huggingface.co/") and card.access == "gated"


def test_structures_that_differ_between_the_cards():
    """The details a wrong card would get wrong: registers, patch sizes, MLPs, widths."""
    with torch.device("meta"):
        models = {n: _create(find_card(n, models_dir=MODELS), with_classifier=False) for n in NAMES}
    registers = {n: m.num_prefix_tokens - 1 for n, m in models.items()}
    assert registers == {"h-optimus-0": 4, "prov-gigapath": 0, "uni": 0, "uni2-h": 8, "virchow": 0, "virchow2": 4}
    patch = {n: m.patch_embed.patch_size[0] for n, m in models.items()}
    assert patch == {"h-optimus-0": 14, "prov-gigapath": 16, "uni": 16, "uni2-h": 14, "virchow": 14, "virchow2": 14}
    # SwiGLU (packed: fc1 holds gate and value) everywhere but UNI's plain GELU MLP
    fc1 = {n: tuple(m.blocks[0].mlp.fc1.weight.shape) for n, m in models.items()}
    assert fc1 == {"h-optimus-0": (8192, 1536), "prov-gigapath": (8192, 1536), "uni": (4096, 1024),
                   "uni2-h": (8192, 1536), "virchow": (6832, 1280), "virchow2": (6832, 1280)}
    assert tuple(models["virchow2"].blocks[0].mlp.fc2.weight.shape) == (1280, 3416)


@pytest.mark.parametrize("name", NAMES)
def test_preprocessing_matches_the_published_transform(name):
    enc = tiny_encoder(name)
    reference = PUBLISHED[name]["transform"]
    g = torch.Generator().manual_seed(1)
    native = enc.card.resize or enc.card.input_size
    # At the tile size the model was trained on nothing is resampled: exact, even on noise.
    tiles = torch.randint(0, 256, (2, native, native, 3), dtype=torch.uint8, generator=g)
    assert torch.allclose(enc.preprocess(tiles), reference(tiles.permute(0, 3, 1, 2)), atol=1e-5)
    # Other sizes are resampled: the published transforms resize 8-bit PIL images (torchvision's
    # uint8 kernels equal PIL's to 1/255), ours resizes floats with torch's antialiased kernels;
    # on tissue-like (smooth) tiles they agree to about 1/255 of the pixel range.
    for side in (224, 256, 320, 512):
        coarse = torch.rand(2, 3, 12, 12, generator=g)
        smooth = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
        tiles = (smooth * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        ours = enc.preprocess(tiles)
        theirs = reference(tiles.permute(0, 3, 1, 2))
        assert ours.shape == theirs.shape == (2, 3, 224, 224)
        pixels = (ours - theirs) * torch.tensor(enc.card.std).view(1, 3, 1, 1)
        assert pixels.abs().max() <= 1.5 / 255, (side, pixels.abs().max() * 255)


def test_prov_gigapath_crops_the_centre():
    """A 256 px tile loses 16 px on each side (Resize(256) is a no-op there, CenterCrop(224))."""
    enc = tiny_encoder("prov-gigapath")
    tiles = torch.zeros(1, 256, 256, 3, dtype=torch.uint8)
    tiles[:, 16:240, 16:240] = 255
    x = enc.preprocess(tiles) * torch.tensor(enc.card.std).view(1, 3, 1, 1) + torch.tensor(enc.card.mean).view(1, 3, 1, 1)
    assert torch.allclose(x, torch.ones_like(x), atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_feature_follows_the_published_recipe(name):
    enc = tiny_encoder(name)
    tiles = torch.randint(0, 256, (3, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    x = enc.preprocess(tiles)
    with torch.no_grad():
        ours = enc.forward_batch(x)
        theirs = PUBLISHED[name]["feature"](enc.model, x)
    assert ours.shape == (3, enc.card.dim) and enc.dim == ours.shape[1]
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.equal(enc.encode(tiles), ours)


def test_virchow2_mean_leaves_out_the_register_tokens():
    """Taking the registers into the mean (output[:, 1:]) would give another feature."""
    enc = tiny_encoder("virchow2")
    x = enc.preprocess(torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8))
    with torch.no_grad():
        tokens = enc.model.forward_features(x)
        ours = enc.forward_batch(x)
    assert tokens.shape[1] == 1 + 4 + 256
    with_registers = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)
    assert not torch.allclose(ours, with_registers, atol=1e-3)
    assert torch.equal(ours[:, :TINY_WIDTH], tokens[:, 0])


# ---- card settings ------------------------------------------------------------------------------


def test_resize_smaller_than_the_input_is_refused(tmp_path):
    data = (MODELS / "prov-gigapath.yaml").read_text().replace("resize: 256", "resize: 200")
    (tmp_path / "prov-gigapath.yaml").write_text(data)
    with pytest.raises(ModelError, match=r"prov-gigapath\.yaml: input\.resize 200 is smaller than input\.size 224"):
        read_card(tmp_path / "prov-gigapath.yaml")


def test_unknown_mlp_layer_is_one_line(tmp_path):
    data = (MODELS / "uni2-h.yaml").read_text().replace("mlp_layer: SwiGLUPacked", "mlp_layer: Swiglu")
    (tmp_path / "uni2-h.yaml").write_text(data)
    with pytest.raises(ModelError, match=r"uni2-h\.yaml: architecture\.kwargs\.mlp_layer 'Swiglu' is not one of "
                                         r"Mlp, GluMlp, SwiGLU, SwiGLUPacked"):
        read_card(tmp_path / "uni2-h.yaml")


def test_resize_enters_the_hash_only_when_set():
    card = find_card("prov-gigapath", models_dir=MODELS)
    assert card.architecture()["resize"] == 256
    assert "resize" not in find_card("uni", models_dir=MODELS).architecture()
    plain = build_encoder(tiny(card), device="cpu")
    uncropped = build_encoder(dataclasses.replace(tiny(card), resize=None), device="cpu")
    assert plain.encoder_hash != uncropped.encoder_hash


def test_missing_gated_weights_say_how_to_get_them(tmp_path):
    shutil.copy(MODELS / "uni.yaml", tmp_path / "uni.yaml")
    with pytest.raises(ModelError, match=r"uni-pytorch_model\.bin: backbone weight file of encoder 'uni' not found; "
                                         r"run `wsitools encoders fetch uni`.*gated.*HF_TOKEN"):
        load_encoder("uni", models_dir=tmp_path, device="cpu")


# ---- fetching from the Hugging Face hub ------------------------------------------------------------


def test_hub_token_goes_to_hub_urls_only(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    url = "https://huggingface.co/MahmoodLab/UNI/resolve/main/pytorch_model.bin"
    assert hub_repo(url) == "MahmoodLab/UNI"
    request = download_request(url)
    assert request.unredirected_hdrs == {"Authorization": "Bearer hf_secret"}
    assert "Authorization" not in request.headers  # never forwarded to the storage host of a redirect
    for other in ("https://example.org/MahmoodLab/UNI/resolve/main/x.bin",
                  "https://huggingface.co.example.org/MahmoodLab/UNI/resolve/main/x.bin",
                  "http://huggingface.co/MahmoodLab/UNI/resolve/main/x.bin"):
        assert hub_repo(other) is None
        assert not download_request(other).has_header("Authorization")
    monkeypatch.delenv("HF_TOKEN")
    assert not download_request(url).has_header("Authorization")


@pytest.mark.parametrize("token", [None, "hf_not_granted"])
def test_gated_refusal_is_one_line_and_writes_nothing(tmp_path, monkeypatch, token):
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    shutil.copy(MODELS / "virchow2.yaml", tmp_path / "virchow2.yaml")
    card = find_card("virchow2", models_dir=tmp_path)
    seen = []

    def refuse(request, timeout):
        seen.append(request.get_full_url())
        raise urllib.error.HTTPError(request.get_full_url(), 401, "Unauthorized", {}, None)

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    how = ("the token in HF_TOKEN was refused: its account has not been granted access" if token
           else "set HF_TOKEN to a Hugging Face access token")
    with pytest.raises(ModelError) as info:
        fetch_card(card)
    message = str(info.value)
    assert message == (
        "https://huggingface.co/paige-ai/Virchow2/resolve/main/model.safetensors: download refused (HTTP 401): "
        "paige-ai/Virchow2 is gated; accept its terms at https://huggingface.co/paige-ai/Virchow2 with your "
        f"account, then {how}"
    )
    assert seen == [card.weights[0].url]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["virchow2.yaml"]


def test_pathotune_refuses_a_class_and_patch_mean_backbone():
    from wsitools.pathotune.model import PathoTuneConfig, PathoTunePrompts, PathoTuneViT

    enc = build_encoder(tiny(find_card("virchow2", models_dir=MODELS)), device="cpu")
    prompts = PathoTunePrompts(PathoTuneConfig(prompts=("tvp",), classes=("a", "b"), embed_dim=TINY_WIDTH, depth=1))
    with pytest.raises(ModelError, match=r"virchow2\.yaml: PathoTune's classifier reads one 48-d token feature; "
                                         r"this card's feature \(class token and patch mean, 96-d\) is not one"):
        PathoTuneViT(enc, prompts)
    uni2 = build_encoder(tiny(find_card("uni2-h", models_dir=MODELS)), device="cpu")
    assert PathoTuneViT(uni2, prompts).feature(torch.zeros(1, 1 + 8 + 256, TINY_WIDTH)).shape == (1, TINY_WIDTH)


def test_cli_fetch_of_a_gated_model_without_token_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    from wsitools.cli import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    shutil.copy(MODELS / "uni.yaml", tmp_path / "uni.yaml")

    def refuse(request, timeout):
        raise urllib.error.HTTPError(request.get_full_url(), 403, "Forbidden", {}, None)

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    assert main(["encoders", "fetch", "uni", "--models-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        "wsitools encoders: error: https://huggingface.co/MahmoodLab/UNI/resolve/main/pytorch_model.bin: download "
        "refused (HTTP 403): MahmoodLab/UNI is gated; accept its terms at https://huggingface.co/MahmoodLab/UNI with "
        "your account, then set HF_TOKEN to a Hugging Face access token\n"
    )


def test_listing_shows_licence_and_access(tmp_path, capsys):
    from wsitools.cli import main

    for name in ("uni", "h-optimus-0"):
        shutil.copy(MODELS / f"{name}.yaml", tmp_path / f"{name}.yaml")
    assert main(["encoders", "--models-dir", str(tmp_path)]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert lines == [
        ["NAME", "MODEL", "DIM", "LICENCE", "WEIGHTS"],
        ["h-optimus-0", "vit_giant_patch14_reg4_dinov2", "1536", "Apache-2.0", "(gated)", "backbone:", "missing"],
        ["uni", "vit_large_patch16_224", "1024", "CC-BY-NC-ND-4.0", "(gated)", "backbone:", "missing"],
    ]
