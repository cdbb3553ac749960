"""Tiny training inputs shared by the hostile-input tests: a random-weight prompted ViT card and
a folder of class tiles (PathoTune's ImageFolder layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml


def tiny_vit_card(root: Path, *, size: int = 64, tokens: int = 4) -> Path:
    """A card of the registered tiny prompted ViT (width 64) at ``size`` px with ``tokens`` deep
    prompts and random weights drawn from a fixed seed (no weight file)."""
    card = root / f"vit-test-{size}.yaml"
    card.write_text(yaml.safe_dump({
        "name": f"vit-test-{size}", "description": f"tiny prompted ViT at {size} px",
        "architecture": {"model": "prompted_vit_test_patch16_224", "kwargs": {"img_size": size},
                         "prompts": {"tokens": tokens, "mode": "deep"}, "init_seed": 0},
        "weights": [], "input": {"size": size, "normalize": None}, "output": {"kind": "cls", "dim": 64},
        "precision": {"compute": "bf16"}}))
    return card


def write_class_tiles(folder: Path, *, per_class: int, size: int = 32) -> Path:
    """``folder/dark`` and ``folder/light``: ``per_class`` noisy PNG tiles each (levels 40 and 200)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for kind, level in (("dark", 40), ("light", 200)):
        (folder / kind).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(level + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / kind / f"{i}.png")
    return folder
