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
"""

from wsitools.encoders.cards import (
    EncoderCard,
    WeightFile,
    default_models_dir,
    find_card,
    list_cards,
    read_card,
)
from wsitools.encoders.checkpoint import (
    check_state_dict,
    convert_ordered_state_dict,
    convert_timm_state_dict,
    load_weights,
    prompts_from_checkpoint,
    read_checkpoint,
    unwrap_state_dict,
)
from wsitools.encoders.fetch import FetchResult, fetch_card
from wsitools.encoders.loading import Encoder, build_encoder, load_encoder
from wsitools.encoders.vit import PromptedVisionTransformer

__all__ = [
    "Encoder",
    "EncoderCard",
    "FetchResult",
    "PromptedVisionTransformer",
    "WeightFile",
    "build_encoder",
    "check_state_dict",
    "convert_ordered_state_dict",
    "convert_timm_state_dict",
    "default_models_dir",
    "fetch_card",
    "find_card",
    "list_cards",
    "load_encoder",
    "load_weights",
    "prompts_from_checkpoint",
    "read_card",
    "read_checkpoint",
    "unwrap_state_dict",
]
