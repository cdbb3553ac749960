"""PathoTune at patch level: multi-modal prompt tuning of a frozen ViT on labelled tiles
(docs/pathotune.md). TVP, TTP and IVP prompts in any combination (:mod:`.model`), labelled tiles
from image folders or patch stores (:mod:`.data`), tuning with metrics (:mod:`.train`), and
the tuned model as an encoder card (:mod:`.encoder`)."""

from wsitools.pathotune.data import LabelledTiles, folder_tiles, store_tiles, stratified_split
from wsitools.pathotune.encoder import (
    TunedModel,
    load_pathotune,
    load_pathotune_encoder,
    save_pathotune,
)
from wsitools.pathotune.model import (
    PROMPT_KINDS,
    PathoTuneConfig,
    PathoTunePrompts,
    PathoTuneViT,
    VisualRefine,
    parse_prompts,
)
from wsitools.pathotune.train import PathoTuneResult, PathoTuneTrainConfig, tune_pathotune

__all__ = [
    "PROMPT_KINDS",
    "LabelledTiles",
    "PathoTuneConfig",
    "PathoTunePrompts",
    "PathoTuneResult",
    "PathoTuneTrainConfig",
    "PathoTuneViT",
    "TunedModel",
    "VisualRefine",
    "folder_tiles",
    "load_pathotune",
    "load_pathotune_encoder",
    "parse_prompts",
    "save_pathotune",
    "store_tiles",
    "stratified_split",
    "tune_pathotune",
]
