"""Phikon-v2: a transformers ``Dinov2Model`` checkpoint converted to timm's ViT (layout hf_dinov2).

A small random ``Dinov2Model`` (width 48, 2 blocks) is the reference: its state dict, converted
and loaded into the network the card builds (same timm constructor and settings, scaled down),
must give the class token of ``last_hidden_state``; the full-size card must have exactly the
parameter shapes the conversion of a full-size ``Dinov2Model`` produces (built on the meta
device: no memory, no download).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from wsitools.encoders import find_card  # noqa: E402
from wsitools.encoders.cards import read_card  # noqa: E402
from wsitools.encoders.checkpoint import convert_hf_dinov2_state_dict  # noqa: E402
from wsitools.encoders.loading import _create, build_encoder  # noqa: E402
from wsitools.errors import ModelError  # noqa: E402
from hf_cards import DEPTH, HEADS, WIDTH, randomized, small  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "models"


def hf_model(*, image_size: int = 224, seed: int = 0) -> torch.nn.Module:
    """A random Dinov2Model with every parameter non-trivial (layer scale included)."""
    config = transformers.Dinov2Config(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, patch_size=16,
        image_size=image_size, layer_norm_eps=1e-6, layerscale_value=1.0,
    )
    return randomized(transformers.Dinov2Model(config), seed=seed)


def published_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 key names -> those of transformers 4, in which the published file is written."""
    out = {}
    for key, value in sd.items():
        for new, old in (("attention.q_proj", "attention.attention.query"),
                         ("attention.k_proj", "attention.attention.key"),
                         ("attention.v_proj", "attention.attention.value"),
                         ("attention.o_proj", "attention.output.dense")):
            key = key.replace(new, old)
        out[key] = value
    return out


def hf_cls(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state[:, 0]


def test_converted_model_gives_the_hf_class_token():
    hf = hf_model()
    card = small(find_card("phikon-v2", models_dir=MODELS), dim=WIDTH)
    ours = _create(card, with_classifier=False).eval()
    sd = convert_hf_dinov2_state_dict(hf.state_dict(), grid=(14, 14), source="hf")
    assert "embeddings.mask_token" in hf.state_dict() and not any("mask" in k for k in sd)
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feature = ours.forward_head(ours.forward_features(x), pre_logits=True)
    reference = hf_cls(hf, x)
    assert feature.shape == (2, WIDTH)
    assert torch.allclose(feature, reference, atol=1e-5), (feature - reference).abs().max()
    # q, k, v concatenated in that order into timm's qkv
    block = hf.state_dict()
    q, k, v = (block[f"encoder.layer.1.attention.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(sd["blocks.1.attn.qkv.weight"], torch.cat([q, k, v]))
    assert torch.equal(sd["blocks.0.ls2.gamma"], block["encoder.layer.0.layer_scale2.lambda1"])


def test_published_key_names_convert_the_same():
    sd = hf_model().state_dict()
    new = convert_hf_dinov2_state_dict(sd, grid=(14, 14), source="hf")
    old = convert_hf_dinov2_state_dict(published_keys(sd), grid=(14, 14), source="hf")
    assert any(k.endswith("attention.attention.query.weight") for k in published_keys(sd))
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)


def test_position_embedding_resampled_like_dinov2_at_run_time():
    """A checkpoint trained at 448 px (28 x 28 patches) run on 224 px tiles: Dinov2Model resamples
    its position embedding in every forward, the conversion once, to the card's 14 x 14 grid."""
    hf = hf_model(image_size=448, seed=2)
    assert hf.state_dict()["embeddings.position_embeddings"].shape == (1, 1 + 28 * 28, WIDTH)
    ours = _create(small(find_card("phikon-v2", models_dir=MODELS), dim=WIDTH), with_classifier=False).eval()
    sd = convert_hf_dinov2_state_dict(hf.state_dict(), grid=(14, 14), source="hf")
    assert sd["pos_embed"].shape == (1, 1 + 14 * 14, WIDTH)
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feature = ours.forward_head(ours.forward_features(x), pre_logits=True)
    assert torch.allclose(feature, hf_cls(hf, x), atol=1e-5), (feature - hf_cls(hf, x)).abs().max()


def test_card_loads_a_published_file_end_to_end(tmp_path):
    """The card's loader path: a safetensors file with the published key names, checked and
    converted by build_encoder; its encoder's features equal the Dinov2Model's class token."""
    hf = hf_model(seed=4)
    save_file({k: v.contiguous() for k, v in published_keys(hf.state_dict()).items()},
              str(tmp_path / "tiny-dinov2.safetensors"))
    data = yaml.safe_load((MODELS / "phikon-v2.yaml").read_text())
    data["name"] = "tiny-dinov2"
    data["architecture"]["kwargs"].update(embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS)
    data["weights"][0].update(file="tiny-dinov2.safetensors", url=None)
    data["output"]["dim"] = WIDTH
    (tmp_path / "tiny-dinov2.yaml").write_text(yaml.safe_dump(data))
    enc = build_encoder(read_card(tmp_path / "tiny-dinov2.yaml"), device="cpu")
    tiles = torch.randint(0, 256, (3, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    x = enc.preprocess(tiles)
    with torch.no_grad():
        ours = enc.forward_batch(x)
    assert torch.allclose(ours, hf_cls(hf, x.contiguous()), atol=1e-5)


def test_full_size_card_fits_the_converted_dinov2_exactly():
    card = find_card("phikon-v2", models_dir=MODELS)
    config = transformers.Dinov2Config(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=16, image_size=224,
        layer_norm_eps=1e-6, layerscale_value=1e-5, mlp_ratio=4,
    )
    with torch.device("meta"):
        hf = transformers.Dinov2Model(config)
        ours = _create(card, with_classifier=False)
    converted = convert_hf_dinov2_state_dict(hf.state_dict(), grid=(14, 14), source="hf")
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) / 1e6 == pytest.approx(303.4, abs=0.5)
    eps = {m.eps for m in ours.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {config.layer_norm_eps} and len(ours.blocks) == 24
    assert card.dim == 1024 and card.mean == (0.485, 0.456, 0.406) and card.access == "open"
    assert card.weights[0].layout == "hf_dinov2"
    assert card.weights[0].url == "https://huggingface.co/owkin/phikon-v2/resolve/main/model.safetensors"


def test_foreign_keys_are_refused_naming_them():
    sd = hf_model().state_dict()
    registers = {**sd, "embeddings.register_tokens": torch.zeros(1, 4, WIDTH)}
    with pytest.raises(ModelError, match=r"^ckpt\.safetensors: not a Dinov2Model state dict; unknown keys: embeddings\.register_tokens$"):
        convert_hf_dinov2_state_dict(registers, grid=(14, 14), source="ckpt.safetensors")
    no_value = {k: v for k, v in sd.items() if not k.startswith("encoder.layer.1.attention.v_proj")}
    with pytest.raises(ModelError, match=r"block 1 has no v projection"):
        convert_hf_dinov2_state_dict(no_value, grid=(14, 14), source="ckpt.safetensors")
    both = {**sd, "encoder.layer.0.attention.attention.query.weight": sd["encoder.layer.0.attention.q_proj.weight"]}
    with pytest.raises(ModelError, match=r"query\.weight' holds a tensor the file already has under another key name"):
        convert_hf_dinov2_state_dict(both, grid=(14, 14), source="ckpt.safetensors")
    flat = {**sd, "embeddings.position_embeddings": torch.zeros(1, 1 + 10, WIDTH)}
    with pytest.raises(ModelError, match=r"position_embeddings has shape \[1, 11, 48\]"):
        convert_hf_dinov2_state_dict(flat, grid=(14, 14), source="ckpt.safetensors")


def test_unknown_layout_is_refused_by_the_card_schema(tmp_path):
    data = yaml.safe_load((MODELS / "phikon-v2.yaml").read_text())
    data["weights"][0]["layout"] = "hf_dinov2 "
    (tmp_path / "phikon-v2.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ModelError, match=r"invalid model card at weights/0/layout"):
        read_card(tmp_path / "phikon-v2.yaml")


def test_preprocessing_is_tridents_transform():
    """Resize(224) (bilinear), CenterCrop(224), ImageNet mean/std: exact on 224 px tiles; the
    resize of smooth 448 px tiles agrees to about 1/255 of the pixel range."""
    import torchvision.transforms.v2 as T

    enc = build_encoder(small(find_card("phikon-v2", models_dir=MODELS), dim=WIDTH), device="cpu")
    reference = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(224),
                           T.ToDtype(torch.float32, scale=True),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    g = torch.Generator().manual_seed(6)
    tiles = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8, generator=g)
    assert torch.allclose(enc.preprocess(tiles), reference(tiles.permute(0, 3, 1, 2)), atol=1e-5)
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, 12, 12, generator=g), size=(448, 448), mode="bilinear")
    tiles = (smooth * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    diff = (enc.preprocess(tiles) - reference(tiles.permute(0, 3, 1, 2))) * torch.tensor(enc.card.std).view(1, 3, 1, 1)
    assert diff.abs().max() <= 1.5 / 255


def test_cli_extract_with_the_card_name_and_a_fetched_file(tmp_path):
    """``wsitools extract STORE --encoder phikon-v2``: a models directory holding the card (scaled
    down) and a Dinov2Model file under the card's name, as ``encoders fetch`` leaves it; the stored
    features are the Dinov2Model's class tokens."""
    from hf_cards import extract_five_tiles

    hf = hf_model(seed=7)
    models = tmp_path / "models"
    models.mkdir()
    data = yaml.safe_load((MODELS / "phikon-v2.yaml").read_text())
    data["architecture"]["kwargs"].update(embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS)
    data["output"]["dim"] = WIDTH
    (models / "phikon-v2.yaml").write_text(yaml.safe_dump(data))
    save_file({k: v.contiguous() for k, v in published_keys(hf.state_dict()).items()},
              str(models / data["weights"][0]["file"]))
    features, stored = extract_five_tiles(tmp_path, models, "phikon-v2")
    enc = build_encoder(read_card(models / "phikon-v2.yaml"), device="cpu")
    reference = hf_cls(hf, enc.preprocess(stored).contiguous())
    assert features.shape == (5, WIDTH)
    assert torch.allclose(torch.from_numpy(features), reference, atol=1e-4)
