"""wsitools: a whole-slide-image pipeline for computational pathology.

Slides -> tissue -> zarr patch stores -> h5 feature stores -> attention-MIL heads, plus
PuzzleTuning prompt pretraining and PathoTune prompt tuning. Every step is a module usable on
its own from Python and from the ``wsitools`` command; the functions a notebook needs are here:

    import wsitools
    slide = wsitools.open_slide("a.svs")                         # level-0 pixel coordinates
    records = wsitools.tile_slides(["a.svs"], "tiles", wsitools.TilingParams(mpp=0.5))
    encoder = wsitools.load_encoder("efficientnet-lite0-imagenet", device="cpu")
    wsitools.extract_features("tiles/a.zarr", encoder, "features")
    wsitools.train(features_dir="features/efficientnet-lite0-imagenet", labels="labels.csv",
                   out_dir="heads/abmil", head="abmil", config=wsitools.TrainConfig(folds=5))
    wsitools.predict("heads/abmil", "features/efficientnet-lite0-imagenet", "predictions")
    wsitools.draw_heatmap("predictions/attention/a.h5", "heatmaps")

They are imported on first use, so ``import wsitools`` stays light (no torch until needed).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "open_slide": "wsitools.slide",
    "TilingParams": "wsitools.tiling",
    "tile_slides": "wsitools.tiling",
    "load_encoder": "wsitools.encoders.loading",
    "extract_features": "wsitools.features",
    "TrainConfig": "wsitools.mil.config",
    "train": "wsitools.mil.train",
    "predict": "wsitools.mil.predict",
    "draw_heatmap": "wsitools.heatmap",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'wsitools' has no attribute {name!r}")
    return getattr(import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
