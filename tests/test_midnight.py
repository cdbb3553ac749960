"""Midnight-12k: a SwiGLU ``Dinov2Model`` checkpoint (ViT-g/14) converted to timm (layout hf_dinov2).

The reference is a small random ``transformers`` ``Dinov2Model`` with ``use_swiglu_ffn`` (width 48,
2 blocks, 14 px patches, position grid 37 x 37 as in DINOv2-giant's 518 px config): its state dict,
converted and loaded into the network the card builds (same timm constructor and settings, scaled
down), must give Midnight's published embedding on 224 px input, the class token of
``last_hidden_state`` followed by the mean of its patch tokens. The full-size card must have exactly
the parameter shapes the conversion of a full-size ``Dinov2Model`` gives (meta device: no memory,
no download).
"""

from __future__ import annotations

import dataclasses
import io
import json
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from wsitools.encoders import find_card  # noqa: E402
from wsitools.encoders.cards import read_card  # noqa: E402
from wsitools.encoders.checkpoint import convert_hf_dinov2_state_dict, load_weights  # noqa: E402
from wsitools.encoders.loading import Encoder, _create, build_encoder  # noqa: E402
from wsitools.errors import ModelError  # noqa: E402
from hf_cards import DEPTH, HEADS, WIDTH, randomized, small  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "models"
URL = "https://huggingface.co/kaiko-ai/midnight/resolve/main/model.safetensors"


def hf_config(*, image_size: int = 518) -> transformers.Dinov2Config:
    """DINOv2-giant's settings (SwiGLU, MLP ratio 4, 14 px patches, 518 px), scaled down."""
    return transformers.Dinov2Config(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, patch_size=14,
        image_size=image_size, mlp_ratio=4, use_swiglu_ffn=True, layer_norm_eps=1e-6, layerscale_value=1.0,
    )


def hf_model(*, image_size: int = 518, seed: int = 0) -> torch.nn.Module:
    """A random SwiGLU Dinov2Model with every parameter non-trivial (layer scale included)."""
    return randomized(transformers.Dinov2Model(hf_config(image_size=image_size)), seed=seed)


def published_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 names -> those of transformers 4, in which the published file is written:
    the SwiGLU gate and value projections packed into ``mlp.weights_in`` (gate first)."""
    out = {}
    for key, value in sd.items():
        for new, old in (("attention.q_proj", "attention.attention.query"),
                         ("attention.k_proj", "attention.attention.key"),
                         ("attention.v_proj", "attention.attention.value"),
                         ("attention.o_proj", "attention.output.dense"),
                         ("mlp.down_proj", "mlp.weights_out")):
            key = key.replace(new, old)
        if ".mlp.up_proj." in key:
            continue
        if ".mlp.gate_proj." in key:
            value = torch.cat([value, sd[key.replace("gate_proj", "up_proj")]])
            key = key.replace("gate_proj", "weights_in")
        out[key] = value.contiguous()
    return out


def midnight_embedding(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model card's classification embedding on ``last_hidden_state``."""
    with torch.no_grad():
        tokens = model(pixel_values=x).last_hidden_state
    return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)


def small_encoder() -> Encoder:
    return build_encoder(small(find_card("midnight", models_dir=MODELS), dim=2 * WIDTH), device="cpu")


def small_card_file(directory: Path, *, name: str = "midnight") -> Path:
    """The shipped card, scaled down, in ``directory`` under ``name``."""
    data = yaml.safe_load((MODELS / "midnight.yaml").read_text())
    data["name"] = name
    data["architecture"]["kwargs"].update(embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS)
    data["output"]["dim"] = 2 * WIDTH
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("image_size", [518, 224])
def test_converted_model_gives_the_published_embedding(image_size):
    """From a 37 x 37 position grid (resampled to 16 x 16, as Dinov2Model does in its forward at
    224 px) and from a 16 x 16 one (taken as it is)."""
    hf = hf_model(image_size=image_size)
    grid = image_size // 14
    assert hf.state_dict()["embeddings.position_embeddings"].shape == (1, 1 + grid * grid, WIDTH)
    enc = small_encoder()
    sd = convert_hf_dinov2_state_dict(hf.state_dict(), grid=(16, 16), source="hf")
    assert sd["pos_embed"].shape == (1, 1 + 16 * 16, WIDTH)
    enc.model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feature = enc.forward_batch(x)
    reference = midnight_embedding(hf, x)
    assert feature.shape == reference.shape == (2, 2 * WIDTH)
    assert torch.allclose(feature, reference, atol=1e-5), (feature - reference).abs().max()
    # transformers 5's separate gate and value projections, packed gate first into timm's fc1
    block = hf.state_dict()
    gate, up = (block[f"encoder.layer.1.mlp.{n}_proj.weight"] for n in ("gate", "up"))
    assert torch.equal(sd["blocks.1.mlp.fc1.weight"], torch.cat([gate, up]))
    assert torch.equal(sd["blocks.0.mlp.fc2.bias"], block["encoder.layer.0.mlp.down_proj.bias"])
    assert not any("mask" in k for k in sd)


def test_published_file_reads_as_transformers_reads_it(tmp_path):
    """The published layout (transformers 4: ``mlp.weights_in``, ``attention.attention.query``)
    loaded by transformers itself and converted by us give the same embedding, and the same
    timm tensors as the transformers 5 names."""
    hf = hf_model(seed=2)
    published = published_keys(hf.state_dict())
    assert "encoder.layer.0.mlp.weights_in.weight" in published
    assert published["encoder.layer.0.mlp.weights_in.weight"].shape == (2 * 128, WIDTH)
    save_file(published, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**hf_config().to_dict(), "architectures": ["Dinov2Model"]}))
    loaded = transformers.Dinov2Model.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(midnight_embedding(loaded, x), midnight_embedding(hf, x), atol=1e-6)
    new = convert_hf_dinov2_state_dict(hf.state_dict(), grid=(16, 16), source="hf")
    old = convert_hf_dinov2_state_dict(published, grid=(16, 16), source="hf")
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)


def test_card_loads_a_published_file_end_to_end(tmp_path):
    """The card's loader path: a safetensors file with the published key names, checked and
    converted by build_encoder; its features equal the published embedding."""
    hf = hf_model(seed=4)
    card_path = small_card_file(tmp_path, name="tiny-midnight")
    data = yaml.safe_load(card_path.read_text())
    data["weights"][0].update(file="tiny-midnight.safetensors", url=None)
    card_path.write_text(yaml.safe_dump(data))
    save_file(published_keys(hf.state_dict()), str(tmp_path / "tiny-midnight.safetensors"))
    enc = build_encoder(read_card(card_path), device="cpu")
    tiles = torch.randint(0, 256, (3, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    x = enc.preprocess(tiles)
    with torch.no_grad():
        ours = enc.forward_batch(x)
    assert ours.shape == (3, 2 * WIDTH)
    assert torch.allclose(ours, midnight_embedding(hf, x.contiguous()), atol=1e-5)


def test_full_size_card_fits_the_converted_dinov2_exactly():
    import timm

    card = find_card("midnight", models_dir=MODELS)
    config = transformers.Dinov2Config(
        hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, patch_size=14, image_size=518,
        mlp_ratio=4, use_swiglu_ffn=True, layer_norm_eps=1e-6, layerscale_value=1.0,
    )
    with torch.device("meta"):
        hf = transformers.Dinov2Model(config)
        ours = _create(card, with_classifier=False)
        timm_giant = timm.create_model("vit_giant_patch14_dinov2", pretrained=False, img_size=224, num_classes=0)
    converted = convert_hf_dinov2_state_dict(hf.state_dict(), grid=(16, 16), source="hf")
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == shapes
    assert shapes == {k: tuple(v.shape) for k, v in timm_giant.state_dict().items()}
    assert shapes["blocks.0.mlp.fc1.weight"] == (8192, 1536) and shapes["blocks.0.mlp.fc2.weight"] == (1536, 4096)
    assert shapes["pos_embed"] == (1, 1 + 16 * 16, 1536)
    mlp = ours.blocks[0].mlp
    assert type(mlp) is timm.layers.GluMlp and mlp.gate_last is False and type(mlp.act) is torch.nn.SiLU
    assert sum(p.numel() for p in ours.parameters()) / 1e6 == pytest.approx(1134.8, abs=0.5)  # "1.1B"
    eps = {m.eps for m in ours.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {config.layer_norm_eps} and len(ours.blocks) == 40 and ours.num_prefix_tokens == 1
    assert card.dim == 3072 and card.output == "cls_mean_patch"
    assert card.mean == card.std == (0.5, 0.5, 0.5) and card.input_size == 224
    assert card.access == "open" and card.license == "MIT"
    assert card.weights[0].layout == "hf_dinov2" and card.weights[0].url == URL


def test_a_class_token_copy_of_the_card_gives_the_first_half(tmp_path):
    """docs/encoders.md: a copy of the card with ``output: {kind: cls}`` gives the class token alone,
    the first half of the classification embedding, from the same file."""
    hf = hf_model(seed=9)
    for name, kind, dim in (("mid", "cls_mean_patch", 2 * WIDTH), ("mid-cls", "cls", WIDTH)):
        path = small_card_file(tmp_path, name=name)
        data = yaml.safe_load(path.read_text())
        data["weights"][0].update(file="mid.safetensors", url=None)
        data["output"] = {"kind": kind, "dim": dim}
        path.write_text(yaml.safe_dump(data))
    save_file(published_keys(hf.state_dict()), str(tmp_path / "mid.safetensors"))
    full, cls = (build_encoder(read_card(tmp_path / f"{n}.yaml"), device="cpu") for n in ("mid", "mid-cls"))
    tiles = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(10))
    both, first = full.encode(tiles), cls.encode(tiles)
    assert first.shape == (2, WIDTH) and torch.equal(first, both[:, :WIDTH])
    with torch.no_grad():
        reference = hf(pixel_values=full.preprocess(tiles).contiguous()).last_hidden_state[:, 0]
    assert torch.allclose(first, reference, atol=1e-5)
    assert full.encoder_hash != cls.encoder_hash


def test_a_swiglu_file_does_not_load_into_a_plain_vit(tmp_path):
    """Phikon-v2's plain-MLP card given a SwiGLU file: refused naming the file and the MLP shapes."""
    plain = find_card("phikon-v2", models_dir=MODELS)
    kwargs = {**plain.model_kwargs, "embed_dim": WIDTH, "depth": DEPTH, "num_heads": HEADS, "patch_size": 14}
    model = _create(dataclasses.replace(plain, model_kwargs=kwargs, weights=(), init_seed=0, dim=WIDTH), with_classifier=False)
    save_file(published_keys(hf_model().state_dict()), str(tmp_path / "swiglu.safetensors"))
    with pytest.raises(ModelError, match=r"swiglu\.safetensors: does not fit the model; wrong shapes: "
                                         r"blocks\.0\.mlp\.fc1\.weight \[256, 48\] \(needs \[192, 48\]\)"):
        load_weights(model, backbone=tmp_path / "swiglu.safetensors", layout="hf_dinov2")


def test_broken_swiglu_files_are_refused_naming_the_key():
    sd = hf_model().state_dict()
    no_up = {k: v for k, v in sd.items() if not k.startswith("encoder.layer.1.mlp.up_proj")}
    with pytest.raises(ModelError, match=r"^ckpt\.safetensors: block 1 has no up projection bias"):
        convert_hf_dinov2_state_dict(no_up, grid=(16, 16), source="ckpt.safetensors")
    packed = published_keys(sd)["encoder.layer.0.mlp.weights_in.weight"]
    both = {**sd, "encoder.layer.0.mlp.weights_in.weight": packed}
    with pytest.raises(ModelError, match=r"gate_proj\.weight' holds a tensor the file already has under another key"):
        convert_hf_dinov2_state_dict(both, grid=(16, 16), source="ckpt.safetensors")
    plain_too = {**published_keys(sd), "encoder.layer.0.mlp.fc2.weight": torch.zeros(WIDTH, 128)}
    with pytest.raises(ModelError, match=r"(weights_out|fc2)\.weight' holds a tensor the file already has"):
        convert_hf_dinov2_state_dict(plain_too, grid=(16, 16), source="ckpt.safetensors")


def test_preprocessing_is_the_model_cards_transform():
    """Resize(224) (bilinear), CenterCrop(224), ToTensor, Normalize(0.5, 0.5): exact on 224 px
    tiles; the resize of smooth 448 px tiles agrees to about 1/255 of the pixel range."""
    import torchvision.transforms.v2 as T

    enc = small_encoder()
    reference = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(224),
                           T.ToDtype(torch.float32, scale=True), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    g = torch.Generator().manual_seed(6)
    tiles = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8, generator=g)
    x = enc.preprocess(tiles)
    assert torch.allclose(x, reference(tiles.permute(0, 3, 1, 2)), atol=1e-6)
    assert torch.allclose(x, tiles.permute(0, 3, 1, 2).float() / 127.5 - 1, atol=1e-6)  # [0, 255] -> [-1, 1]
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, 12, 12, generator=g), size=(448, 448), mode="bilinear")
    tiles = (smooth * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    diff = (enc.preprocess(tiles) - reference(tiles.permute(0, 3, 1, 2))) * 0.5
    assert diff.abs().max() <= 1.5 / 255


def test_cli_fetch_then_extract(tmp_path, monkeypatch, capsys):
    """``wsitools encoders fetch midnight`` downloads the card's hub file without a token (the model
    is open) to the card's file name; ``wsitools extract STORE --encoder midnight`` then stores the
    published embeddings of a (scaled-down) Midnight."""
    from hf_cards import extract_five_tiles

    from wsitools.cli import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    hf = hf_model(seed=7)
    buffer = tmp_path / "served.safetensors"
    save_file(published_keys(hf.state_dict()), str(buffer))
    models = tmp_path / "models"
    models.mkdir()
    small_card_file(models)
    requests = []

    def serve(request, timeout):
        requests.append(request)
        return io.BytesIO(buffer.read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    assert main(["encoders", "fetch", "midnight", "--models-dir", str(models)]) == 0
    assert [r.get_full_url() for r in requests] == [URL]
    assert not requests[0].has_header("Authorization")
    fetched = models / "midnight-model.safetensors"
    assert fetched.read_bytes() == buffer.read_bytes()
    capsys.readouterr()

    features, stored = extract_five_tiles(tmp_path, models, "midnight")
    enc = build_encoder(read_card(models / "midnight.yaml"), device="cpu")
    reference = midnight_embedding(hf, enc.preprocess(stored).contiguous())
    assert features.shape == (5, 2 * WIDTH)
    assert torch.allclose(torch.from_numpy(features), reference, atol=1e-4)
