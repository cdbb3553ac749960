"""Encoders: model cards, the prompted ViT of PuzzleTuning, weight loading and verification.

- :mod:`wsitools.encoders.vit`: :class:`PromptedVisionTransformer` (timm ViT + deep/shallow
  prompts), its registered timm models (``prompted_vit_{test,small,base,large}_patch16_224``) and
  ``run_blocks``, the one prompted forward that PuzzleTuning and PathoTune also use.
- :mod:`wsitools.encoders.transforms`: tiles to model input (a card's recipe), and augmentation.
- :mod:`wsitools.encoders.checkpoint`: reading weight files safely and converting official
  checkpoints (pure functions), strict key/shape checks.
- :mod:`wsitools.encoders.cards`: YAML model cards and the models directory.
- :mod:`wsitools.encoders.loading`: :func:`load_encoder` -> :class:`Encoder`.
- :mod:`wsitools.encoders.fetch`: downloading a card's weights with sha256 verification.

The names below are imported on first use, so reading cards (e.g. when the workflow checks
its config) does not import torch and timm.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "EncoderCard": "cards",
    "WeightFile": "cards",
    "default_models_dir": "cards",
    "find_card": "cards",
    "list_cards": "cards",
    "read_card": "cards",
    "scan_cards": "cards",
    "check_state_dict": "checkpoint",
    "convert_hf_dinov2_state_dict": "checkpoint",
    "convert_ordered_state_dict": "checkpoint",
    "convert_timm_state_dict": "checkpoint",
    "load_weights": "checkpoint",
    "prompts_from_checkpoint": "checkpoint",
    "read_checkpoint": "checkpoint",
    "unwrap_state_dict": "checkpoint",
    "FetchResult": "fetch",
    "fetch_card": "fetch",
    "Encoder": "loading",
    "build_encoder": "loading",
    "load_encoder": "loading",
    "PromptedVisionTransformer": "vit",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
