"""The public Python API: ``import wsitools`` is light, and its names are the steps' own functions."""

from __future__ import annotations

import inspect
import subprocess
import sys
from importlib import import_module

import numpy as np
import pytest

import wsitools


def test_import_is_light_and_names_resolve_lazily():
    code = "import sys, wsitools; print('torch' in sys.modules, 'wsitools.mil.train' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    for name, module in wsitools._API.items():
        assert getattr(wsitools, name) is getattr(import_module(module), name), name
    assert set(dir(wsitools)) >= set(wsitools._API)
    with pytest.raises(AttributeError, match="no attribute 'tile'"):
        wsitools.tile  # noqa: B018


@pytest.mark.parametrize("name", ["open_slide", "tile_slides", "load_encoder", "extract_features", "train", "predict",
                                  "draw_heatmap"])
def test_options_are_keyword_only(name):
    params = list(inspect.signature(getattr(wsitools, name)).parameters.values())
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert len(positional) <= 3, positional  # the inputs and the output; every option is keyword-only
    assert all(p.default is p.empty for p in params if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "params")


def test_open_and_tile_through_the_api(synthetic_svs, tmp_path):
    slide = wsitools.open_slide(synthetic_svs)
    region = slide.read_region((0, 0), 0, (64, 48))
    assert region.shape == (48, 64, 3) and region.dtype == np.uint8
    from wsitools.tissue import TissueParams

    params = wsitools.TilingParams(mpp=0.5, tile_size=64, tissue=TissueParams(mpp=4.0, min_region_area=5_000))
    [record] = wsitools.tile_slides([synthetic_svs], tmp_path, params, progress=False)
    assert record["status"] == "ok" and record["n_tiles"] > 0
