"""Attention heatmaps over a synthetic slide whose planted region gets the attention."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import REGIONS, SLIDE_SIZE
from wsitools.cli import main
from wsitools.heatmap import attention_raster, display_values, draw_heatmap, overlay, read_attention
from wsitools.mil.data import BagInfo
from wsitools.mil.predict import write_attention
from wsitools.slide import open_slide
from wsitools.store import PatchStore, write_patch_store

TILE0 = 128  # level-0 px per tile (64 target px at 0.5 um/px on a 0.25 um/px slide)
PLANTED = REGIONS[1]


@pytest.fixture(scope="module")
def attention_case(synthetic_svs, tmp_path_factory):
    """A patch store tiling the whole synthetic slide, and attention high on the planted region."""
    root = tmp_path_factory.mktemp("heatmap")
    xs, ys = np.meshgrid(np.arange(0, SLIDE_SIZE[0], TILE0), np.arange(0, SLIDE_SIZE[1], TILE0))
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    with open_slide(synthetic_svs) as slide:
        level = 1
        assert slide.level_downsamples[level] == 2
        tiles = np.stack([slide.read_region((int(x), int(y)), level, (64, 64)) for x, y in coords])
    store_path = root / "tiles" / "synth_svs.zarr"
    write_patch_store(store_path, coords=coords, tiles=tiles, tissue_fraction=np.ones(len(coords)),
                      attrs={"slide_id": "synth_svs", "slide_path": str(synthetic_svs), "tile_size": 64,
                             "tile_size_level0": float(TILE0), "mpp_target": 0.5})
    centres = coords + TILE0 / 2
    inside = PLANTED.contains(centres[:, 0] - 0.5, centres[:, 1] - 0.5)
    rng = np.random.default_rng(0)
    logits = np.where(inside, 4.0, 0.0) + rng.normal(0, 0.3, len(coords))
    attention = np.exp(logits) / np.exp(logits).sum()
    bag = BagInfo(slide_id="synth_svs", path=root / "synth_svs.h5", n=len(coords), dim=4,
                  attrs={"slide_path": str(synthetic_svs), "store_path": str(store_path),
                         "tile_size_level0": float(TILE0), "tile_size": 64, "mpp_target": 0.5})
    att_path = root / "attention" / "synth_svs.h5"
    write_attention(att_path, slide_id="synth_svs", attention=attention, coords=coords, classes=["neg", "pos"],
                    probs=np.array([0.1, 0.9]), bag=bag, meta={"head": "abmil", "label": "pos"})
    return {"root": root, "attention": att_path, "store": store_path, "inside": inside, "coords": coords,
            "slide": synthetic_svs, "values": attention}


def test_display_scales():
    a = np.array([0.1, 0.4, 0.2, 0.3])
    np.testing.assert_allclose(display_values(a, scale="rank"), [0, 1, 1 / 3, 2 / 3])
    np.testing.assert_allclose(display_values(a, scale="minmax"), [0, 1, 1 / 3, 2 / 3])
    np.testing.assert_allclose(display_values(np.array([0.1, 0.8, 0.1]), scale="minmax"), [0, 1, 0])


def test_raster_lights_up_the_planted_region(attention_case):
    amap = read_attention(attention_case["attention"])
    assert amap.tile_size_level0 == TILE0 and amap.attrs["pred"] == "pos"
    with open_slide(attention_case["slide"]) as slide:
        thumb, ds = slide.thumbnail(mpp=2.0)
    assert ds == pytest.approx(8.0)
    raster = attention_raster(amap, shape=thumb.shape[:2], downsample=ds)
    assert not np.isnan(raster).any()  # the store covers the whole slide
    ys, xs = np.mgrid[0 : raster.shape[0], 0 : raster.shape[1]]
    truth = PLANTED.contains((xs + 0.5) * ds - 0.5, (ys + 0.5) * ds - 0.5)
    assert raster[truth].mean() > 0.85 and raster[~truth].mean() < 0.5
    # Each tile paints exactly its footprint: tile (x=0, y=0) covers thumbnail px [0, 16) x [0, 16).
    first = amap.attention.argmin()
    x, y = (attention_case["coords"][first] / ds).astype(int)
    value = display_values(amap.attention)[first]
    np.testing.assert_allclose(raster[y : y + 16, x : x + 16], value, atol=1e-6)
    blended = overlay(thumb, raster, alpha=1.0)
    # jet: high attention is red, low is blue
    assert blended[truth][:, 0].mean() > blended[truth][:, 2].mean() + 60
    assert blended[~truth][:, 2].mean() > blended[~truth][:, 0].mean()


def test_partial_coverage_leaves_thumbnail_untouched():
    from wsitools.heatmap import AttentionMap

    amap = AttentionMap("s", np.array([0.7, 0.3], np.float32), np.array([[0, 0], [100, 0]]), 50.0)
    raster = attention_raster(amap, shape=(10, 20), downsample=10.0)
    assert np.isnan(raster[:, 15:]).all() and np.isnan(raster[5:]).all()
    np.testing.assert_allclose(raster[:5, :5], 1.0)
    np.testing.assert_allclose(raster[:5, 10:15], 0.0)
    thumb = np.full((10, 20, 3), 200, np.uint8)
    assert (overlay(thumb, raster)[:, 15:] == 200).all()


def test_draw_heatmap_files_and_top_tile_montage(attention_case, tmp_path):
    out = draw_heatmap(attention_case["attention"], tmp_path, mpp=2.0, top_k=4)
    assert out.heatmap == tmp_path / "synth_svs.heatmap.png" and out.seconds < 20
    w, h = Image.open(out.heatmap).size
    assert w > 256 and h > 192  # the 256 x 192 thumbnail at about 1:1, plus title and colour bar
    montage = np.asarray(Image.open(out.montage).convert("RGB"))
    store = PatchStore.open(attention_case["store"])
    top = np.argsort(-attention_case["values"])[:4]
    gap, caption, s = 4, 14, 64
    for rank, idx in enumerate(top):
        r, c = divmod(rank, 2)
        x, y = gap + c * (s + gap), gap + r * (s + caption + gap) + caption
        np.testing.assert_array_equal(montage[y : y + s, x : x + s], store.read_tiles(np.array([idx]))[0])
    assert attention_case["inside"][top].all()


def test_heatmap_cli_uses_recorded_paths_and_names_failures(attention_case, tmp_path, capsys):
    att_dir = attention_case["attention"].parent
    rc = main(["heatmap", "--attention", str(att_dir), "--out", str(tmp_path / "a"), "--mpp", "4", "--quiet"])
    assert rc == 0
    assert (tmp_path / "a" / "synth_svs.heatmap.png").is_file() and (tmp_path / "a" / "synth_svs.top_tiles.png").is_file()
    # A store with other coords only loses the montage; a missing slide fails that slide, named.
    wrong = tmp_path / "other.zarr"
    write_patch_store(wrong, coords=np.zeros((1, 2)), tiles=np.zeros((1, 64, 64, 3), np.uint8), tissue_fraction=[1.0],
                      attrs={"slide_id": "synth_svs", "tile_size": 64, "tile_size_level0": 128.0, "mpp_target": 0.5})
    out = draw_heatmap(attention_case["attention"], tmp_path / "b", store_path=wrong, mpp=4.0)
    assert out.montage is None and out.heatmap.is_file()
    rc = main(["heatmap", "--attention", str(attention_case["attention"]), "--slide", str(tmp_path / "gone.svs"),
               "--out", str(tmp_path / "c"), "--quiet"])
    assert rc == 1 and "synth_svs" in capsys.readouterr().err


def test_not_an_attention_file(tmp_path):
    from wsitools.errors import StoreError

    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.zeros((2, 2)))
    with pytest.raises(StoreError, match=f"{Path(path)}: not an attention file"):
        read_attention(path)
