"""Shared by the tests of the cards converted from ``transformers`` files (Phikon-v2, Midnight):
the scaled-down size, a random model with every parameter non-trivial, the scaled-down card, and
``wsitools extract`` run on five random tiles with a card from a models directory."""

from __future__ import annotations

from pathlib import Path

import dataclasses

import numpy as np
import torch

from wsitools.cli import main
from wsitools.encoders.cards import EncoderCard
from wsitools.feature_store import FeatureStore
from wsitools.store import PatchStore, write_patch_store

WIDTH, DEPTH, HEADS = 48, 2, 3
"""The scaled-down network: width 48, 2 blocks, 3 heads."""


def randomized(model: torch.nn.Module, *, seed: int) -> torch.nn.Module:
    """``model`` in eval mode with every parameter drawn from N(0, 0.3^2) (layer scale included,
    so no parameter keeps a trivial initial value)."""
    torch.manual_seed(seed)
    model = model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape))
    return model


def small(card: EncoderCard, *, dim: int) -> EncoderCard:
    """The card's network at the scaled-down size (same constructor and settings), output ``dim``."""
    kwargs = {**card.model_kwargs, "embed_dim": WIDTH, "depth": DEPTH, "num_heads": HEADS}
    return dataclasses.replace(card, model_kwargs=kwargs, weights=(), init_seed=0, dim=dim)


def extract_five_tiles(tmp_path: Path, models: Path, encoder: str) -> tuple[np.ndarray, torch.Tensor]:
    """Run ``wsitools extract --encoder ENCODER --models-dir MODELS`` on a patch store of five
    seeded random 224-px tiles; return the stored features and the tiles as read back from the
    store (uint8 [5, 224, 224, 3]: what extraction saw after the store's codec)."""
    rng = torch.Generator().manual_seed(8)
    tiles = torch.randint(0, 256, (5, 224, 224, 3), dtype=torch.uint8, generator=rng).numpy()
    attrs = dict(slide_id="S1", slide_path="/slides/S1.svs", params_hash="p1", tile_size=224,
                 tile_size_level0=448.0, mpp_target=0.5)
    xy = np.arange(10).reshape(5, 2) * 448
    store = write_patch_store(tmp_path / "S1.zarr", coords=xy, tiles=tiles, tissue_fraction=np.ones(5), attrs=attrs)
    code = main(["extract", str(store), "--encoder", encoder, "--models-dir", str(models),
                 "--out", str(tmp_path / "features"), "--device", "cpu", "--workers", "0", "--quiet"])
    assert code == 0
    features, _ = FeatureStore.open(tmp_path / "features" / encoder / "S1.h5").load()
    return features, torch.from_numpy(PatchStore.open(store).read_tiles(slice(0, 5)))
