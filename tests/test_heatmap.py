"""Attention heatmaps over a synthetic slide whose planted region gets the attention."""

from __future__ import annotations

import re
import shutil
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import REGIONS, SLIDE_SIZE
from wsitools.cli import main
from wsitools.errors import SlideError, StoreError
from wsitools.attention import read_attention, write_attention
from wsitools import heatmap
from wsitools.attention import AttentionMap
from wsitools.heatmap import (
    attention_raster, display_values, draw_heatmap, overlay, save_heatmap_figure, scale_label,
)
from wsitools.slide import Bounds, open_slide
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
    provenance = {"slide_path": str(synthetic_svs), "store_path": str(store_path),
                  "tile_size_level0": float(TILE0), "tile_size": 64, "mpp_target": 0.5}
    att_path = root / "attention" / "synth_svs.h5"
    write_attention(att_path, slide_id="synth_svs", attention=attention, coords=coords, classes=["neg", "pos"],
                    probs=np.array([0.1, 0.9]), feature_path=root / "synth_svs.h5",
                    provenance=provenance, meta={"head": "abmil", "label": "pos"})
    return {"root": root, "attention": att_path, "store": store_path, "inside": inside, "coords": coords,
            "slide": synthetic_svs, "values": attention}


def test_display_scales():
    a = np.array([0.1, 0.4, 0.2, 0.3])
    np.testing.assert_allclose(display_values(a, scale="rank"), [0, 1, 1 / 3, 2 / 3])
    np.testing.assert_allclose(display_values(a, scale="minmax"), [0, 1, 1 / 3, 2 / 3])
    np.testing.assert_allclose(display_values(np.array([0.1, 0.8, 0.1]), scale="minmax"), [0, 1, 0])
    # tied tiles share their rank: uniform attention is one colour, not store order
    np.testing.assert_allclose(display_values(np.array([0.5, 0.5, 0.0, 0.0]), scale="rank"), [5 / 6, 5 / 6, 1 / 6, 1 / 6])
    for scale in ("rank", "minmax"):
        for n in (1, 32):
            np.testing.assert_allclose(display_values(np.full(n, 1 / n), scale=scale), 0.5)


def test_raster_lights_up_the_planted_region(attention_case):
    amap = read_attention(attention_case["attention"])
    assert amap.tile_size_level0 == TILE0 and amap.attrs["pred"] == "pos"
    with open_slide(attention_case["slide"]) as slide:
        thumb, ds = slide.thumbnail(mpp=2.0)
    assert ds == pytest.approx((8.0, 8.0))
    raster = attention_raster(amap, shape=thumb.shape[:2], downsample=ds)
    ds = ds[0]
    assert not np.isnan(raster).any()  # the store covers the whole slide
    ys, xs = np.mgrid[0 : raster.shape[0], 0 : raster.shape[1]]
    truth = PLANTED.contains((xs + 0.5) * ds - 0.5, (ys + 0.5) * ds - 0.5)
    assert raster[truth].mean() > 0.85 and raster[~truth].mean() < 0.5
    # Each tile paints exactly its footprint: tile (x=0, y=0) covers thumbnail px [0, 16) x [0, 16).
    first = amap.attention.argmin()
    x, y = (attention_case["coords"][first] / ds).astype(int)
    value = display_values(amap.attention)[first]
    np.testing.assert_allclose(raster[y : y + 16, x : x + 16], value, atol=1e-6)
    blended = overlay(thumb, raster, alpha=1.0).astype(float)
    # inferno (the default): high attention is bright yellow, low attention dark
    assert blended[truth].mean() > blended[~truth].mean() + 80
    assert blended[truth][:, 0].mean() > blended[truth][:, 2].mean() + 60


def test_partial_coverage_leaves_thumbnail_untouched():
    from wsitools.attention import AttentionMap

    amap = AttentionMap("s", np.array([0.7, 0.3], np.float32), np.array([[0, 0], [100, 0]]), 50.0)
    raster = attention_raster(amap, shape=(10, 20), downsample=(10.0, 10.0))
    assert np.isnan(raster[:, 15:]).all() and np.isnan(raster[5:]).all()
    np.testing.assert_allclose(raster[:5, :5], 1.0)
    np.testing.assert_allclose(raster[:5, 10:15], 0.0)
    thumb = np.full((10, 20, 3), 200, np.uint8)
    assert (overlay(thumb, raster)[:, 15:] == 200).all()
    # each axis by its own downsample (a thumbnail's sides are rounded apart)
    tall = attention_raster(amap, shape=(20, 20), downsample=(10.0, 5.0))
    assert np.isfinite(tall[:10, :5]).all() and np.isnan(tall[10:]).all()


def _overlapping_map(rng: np.random.Generator) -> AttentionMap:
    """Tiles at a stride of half their side (each thumbnail px under up to four tiles), a
    third of the grid left out (uncovered px), ties among the weights."""
    xs, ys = np.meshgrid(np.arange(0, 1600, 40), np.arange(0, 1200, 40))
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    coords = coords[rng.random(len(coords)) > 0.33]
    attention = rng.gamma(0.5, size=len(coords))
    attention[::7] = attention[0]
    return AttentionMap("s", (attention / attention.sum()).astype(np.float32), coords, 80.0)


def _old_raster(amap: AttentionMap, shape: tuple[int, int], downsample: tuple[float, float],
                scale: str) -> np.ndarray:
    """The raster as it was computed with a float64 count over the whole grid (the reference)."""
    h, w = shape
    dx, dy = downsample
    values = display_values(amap.attention, scale=scale)
    total, count = np.zeros((h, w), np.float64), np.zeros((h, w), np.float64)
    x0 = np.floor(amap.coords[:, 0] / dx).astype(np.int64)
    y0 = np.floor(amap.coords[:, 1] / dy).astype(np.int64)
    x1 = np.ceil((amap.coords[:, 0] + amap.tile_size_level0) / dx).astype(np.int64)
    y1 = np.ceil((amap.coords[:, 1] + amap.tile_size_level0) / dy).astype(np.int64)
    x0, y0 = np.clip(x0, 0, w), np.clip(y0, 0, h)
    x1, y1 = np.clip(np.maximum(x1, x0 + 1), 0, w), np.clip(np.maximum(y1, y0 + 1), 0, h)
    for v, a, b, c, d in zip(values, y0, y1, x0, x1):
        total[a:b, c:d] += v
        count[a:b, c:d] += 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan).astype(np.float32)


def _old_overlay(thumbnail: np.ndarray, raster: np.ndarray, alpha: float, cmap: str) -> np.ndarray:
    """The blend computed over the whole image at once (the reference)."""
    from matplotlib import colormaps

    colours = colormaps[cmap](np.nan_to_num(raster, nan=0.0))[..., :3] * 255.0
    covered = ~np.isnan(raster)[..., None]
    blended = np.where(covered, (1.0 - alpha) * thumbnail + alpha * colours, thumbnail)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _old_figure(path: Path, image: np.ndarray, title: str) -> None:
    """The figure with the image drawn by matplotlib (``figimage``), the rest as
    :func:`save_heatmap_figure` draws it (the reference)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    h, w = image.shape[:2]
    width, height = w + 150, max(h, 300) + 32
    fig = Figure(figsize=(heatmap._figure_inches(width, 100), heatmap._figure_inches(height, 100)), dpi=100)
    FigureCanvasAgg(fig)
    fig.figimage(image, xo=0, yo=height - 32 - h, origin="upper")
    fig.text(4 / width, 1 - 6 / height, title, ha="left", va="top", fontsize=9)
    cax = fig.add_axes(((w + 20) / width, 16 / height, 16 / width, (height - 40 - 16) / height))
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), colormaps["turbo"]), cax=cax)
    bar.ax.tick_params(labelsize=8)
    bar.set_label(scale_label("minmax"), fontsize=8)
    fig.savefig(path, format="png", dpi=100)


@pytest.mark.parametrize("scale", ["rank", "minmax", "absolute"])
def test_heatmap_pixels_equal_those_drawn_in_float64_over_the_whole_image(tmp_path, monkeypatch, scale):
    rng = np.random.default_rng(5)
    amap = _overlapping_map(rng)
    shape, downsample = (310, 420), (4.1, 3.9)  # tiles end short of the right edge, past the bottom
    raster = attention_raster(amap, shape=shape, downsample=downsample, scale=scale)
    reference = _old_raster(amap, shape, downsample, scale)
    np.testing.assert_array_equal(raster, reference)  # NaN where no tile, in the same places
    assert np.isnan(raster).any() and (raster > 0).any()
    thumb = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    monkeypatch.setattr(heatmap, "_BLEND_PIXELS", 4096)  # blended in many strips, one of them partial
    blended = overlay(thumb, raster, alpha=0.3, cmap="turbo")
    np.testing.assert_array_equal(blended, _old_overlay(thumb, reference, 0.3, "turbo"))
    save_heatmap_figure(tmp_path / "new.png", blended, title="s  neg: 0.10  pos: 0.90", scale="minmax", cmap="turbo")
    _old_figure(tmp_path / "old.png", blended, "s  neg: 0.10  pos: 0.90")
    new, old = np.asarray(Image.open(tmp_path / "new.png")), np.asarray(Image.open(tmp_path / "old.png"))
    assert new.shape == (342, 570, 4)
    np.testing.assert_array_equal(new, old)


def test_heatmap_memory_per_thumbnail_pixel_is_bounded(tmp_path):
    """Bytes per thumbnail pixel that the raster, the blend and the figure allocate beyond their
    results (numpy's allocations, as tracemalloc counts them): float64 copies of the whole
    image, some 100 bytes per pixel in each of the blend and matplotlib's drawing of it and 29 in
    the raster, would take gigabytes on a large thumbnail."""
    import tracemalloc

    rng = np.random.default_rng(0)
    amap = _overlapping_map(rng)
    shape = (1200, 1600)  # 1.92 M px
    pixels = shape[0] * shape[1]
    thumb = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    overlay(thumb[:2, :2], attention_raster(amap, shape=(2, 2), downsample=(800.0, 600.0)))  # imports outside
    peaks = {}
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        raster = attention_raster(amap, shape=shape, downsample=(1.0, 1.0))
        peaks["raster"] = (tracemalloc.get_traced_memory()[1] - tracemalloc.get_traced_memory()[0]) / pixels
        tracemalloc.reset_peak()
        blended = overlay(thumb, raster)
        peaks["overlay"] = (tracemalloc.get_traced_memory()[1] - tracemalloc.get_traced_memory()[0]) / pixels
        del raster
        tracemalloc.reset_peak()
        save_heatmap_figure(tmp_path / "h.png", blended, title="s", scale="rank")
        peaks["figure"] = (tracemalloc.get_traced_memory()[1] - tracemalloc.get_traced_memory()[0]) / pixels
    finally:
        tracemalloc.stop()
    assert peaks["raster"] < 20 and peaks["overlay"] < 12 and peaks["figure"] < 10, peaks


def test_draw_heatmap_files_and_top_tile_montage(attention_case, tmp_path):
    out = draw_heatmap(attention_case["attention"], tmp_path, mpp=2.0, min_side=200, top_k=4)
    assert out.heatmap == tmp_path / "synth_svs.heatmap.png" and out.seconds < 20
    # The 256 x 192 thumbnail 1:1 under a 32 px title band, a 150 px colour-bar band right of it
    # (the figure at least 300 px high below the title, for the bar's label).
    figure = np.asarray(Image.open(out.heatmap).convert("RGB"))
    assert figure.shape == (32 + 300, 256 + 150, 3)
    amap = read_attention(attention_case["attention"])
    with open_slide(attention_case["slide"]) as slide:
        thumb, ds = slide.thumbnail(mpp=2.0)
    expected = overlay(thumb, attention_raster(amap, shape=thumb.shape[:2], downsample=ds))
    np.testing.assert_array_equal(figure[32 : 32 + 192, :256], expected)
    assert (figure[32 + 192 :, :256] == 255).all()  # below the image: white
    montage = np.asarray(Image.open(out.montage).convert("RGB"))
    store = PatchStore.open(attention_case["store"])
    top = np.argsort(-attention_case["values"])[:4]
    gap, caption, s = 4, 26, 64  # two caption lines: rank and attention, then level-0 x, y
    from PIL import ImageDraw

    from wsitools.heatmap import top_tile_labels

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max(measure.textlength(part) for t in top_tile_labels(read_attention(attention_case["attention"]), top)
                 for part in t.split("\n"))
    cell = int(np.ceil(widest)) + 4  # captions wider than the 64 px tiles widen the cells
    assert cell > s and montage.shape[1] == 2 * (cell + gap) + gap
    for rank, idx in enumerate(top):
        r, c = divmod(rank, 2)
        x, y = gap + c * (cell + gap), gap + r * (s + caption + gap) + caption
        np.testing.assert_array_equal(montage[y : y + s, x : x + s], store.read_tiles(np.array([idx]))[0])
        strip = montage[y - caption : y, x : x + cell]
        assert (strip[:13] < 128).any() and (strip[13:] < 128).any()  # text on both lines
    assert attention_case["inside"][top].all()


def test_top_tile_labels_give_level0_coordinates():
    from wsitools.attention import AttentionMap
    from wsitools.heatmap import top_tile_labels

    amap = AttentionMap("s", np.array([0.1, 0.6, 0.3], np.float32), np.array([[0, 0], [4480, 1792], [224, 0]]), 224.0)
    assert top_tile_labels(amap, np.array([1, 2])) == ["#1  1.8x uniform\nx 4480  y 1792",
                                                       "#2  0.9x uniform\nx 224  y 0"]


def test_heatmap_size_follows_the_slide_within_bounds():
    from wsitools.heatmap import thumbnail_mpp

    # a 20 x 15 mm resection at 0.25 um/px: drawn at --mpp, 2500 px long
    assert thumbnail_mpp((80_000, 60_000), 0.25, mpp=8.0) == 8.0
    # a 2 mm biopsy: finer, so its long side has 1024 px
    assert thumbnail_mpp((8_000, 3_000), 0.25, mpp=8.0) == pytest.approx(2000 / 1024)
    # a 75 mm slide: coarser, 4096 px long
    assert thumbnail_mpp((300_000, 100_000), 0.25, mpp=8.0) == pytest.approx(75_000 / 4096)
    # never finer than level 0
    assert thumbnail_mpp((1000, 500), 0.5, mpp=8.0) == 0.5
    with pytest.raises(ValueError, match="min_side <= max_side"):
        thumbnail_mpp((1000, 500), 0.5, min_side=900, max_side=800)


def test_absolute_scale_keeps_a_spread_out_slide_dark():
    from wsitools.heatmap import ABSOLUTE_MAX, relative_attention, scale_label

    n = 400
    spread = np.full(n, 1 / n) * (1 + 0.05 * np.sin(np.arange(n)))  # within 5 % of uniform
    spread /= spread.sum()
    peaked = np.full(n, 0.5 / (n - 5))
    peaked[:5] = 0.1  # 5 tiles hold half the attention: 40 times uniform each
    for a in (spread, peaked):  # the per-slide scales span the whole map either way
        assert display_values(a, scale="rank").max() >= 0.99 and display_values(a, scale="minmax").max() == 1.0
    assert display_values(spread, scale="absolute").max() < 0.02
    np.testing.assert_allclose(relative_attention(peaked)[:5], 40.0)
    np.testing.assert_allclose(display_values(peaked, scale="absolute")[:5], np.log10(40) / np.log10(ABSOLUTE_MAX))
    np.testing.assert_allclose(display_values(peaked, scale="absolute")[5:], 0.0)  # below uniform: bottom
    assert display_values(np.array([0.999, 0.001] + [0.0] * 998), scale="absolute")[0] == 1.0  # clipped at the top
    assert scale_label("absolute") == "attention x N (1 = uniform over the N tiles;\nlog scale 1-100)"
    assert "percentile" in scale_label("rank") and "min-max" in scale_label("minmax")


def test_absolute_heatmap_of_uniform_attention_is_the_bottom_colour(attention_case, tmp_path):
    from matplotlib import colormaps

    from wsitools.heatmap import save_heatmap_figure

    amap = read_attention(attention_case["attention"])
    uniform = type(amap)(amap.slide_id, np.full(len(amap.attention), 1 / len(amap.attention), np.float32),
                         amap.coords, amap.tile_size_level0)
    raster = attention_raster(uniform, shape=(192, 256), downsample=(8.0, 8.0), scale="absolute")
    np.testing.assert_array_equal(raster, 0.0)
    thumb = np.full((192, 256, 3), 200, np.uint8)
    path = save_heatmap_figure(tmp_path / "u.png", overlay(thumb, raster, cmap="viridis"), title="u",
                               scale="absolute", cmap="viridis")
    figure = np.asarray(Image.open(path).convert("RGB")).astype(int)
    bottom = np.asarray(colormaps["viridis"](0.0)[:3]) * 255
    np.testing.assert_allclose(figure[32 : 32 + 192, :256], np.rint(0.5 * 200 + 0.5 * bottom)[None, None].repeat(192, 0).repeat(256, 1), atol=1)


def test_heatmap_cli_uses_recorded_paths_and_names_failures(attention_case, tmp_path, capsys):
    att_dir = attention_case["attention"].parent
    rc = main(["heatmap", "--attention", str(att_dir), "--out", str(tmp_path / "a"), "--mpp", "4", "--quiet"])
    assert rc == 0
    assert (tmp_path / "a" / "synth_svs.heatmap.png").is_file() and (tmp_path / "a" / "synth_svs.top_tiles.png").is_file()
    # a missing --slide is refused, named
    rc = main(["heatmap", "--attention", str(attention_case["attention"]), "--slide", str(tmp_path / "gone.svs"),
               "--out", str(tmp_path / "c"), "--quiet"])
    assert rc == 2 and f"--slide {tmp_path / 'gone.svs'}: no such file or folder" in capsys.readouterr().err


def test_a_heatmap_run_cut_off_leaves_no_folder_that_looks_finished(attention_case, tmp_path, monkeypatch, capsys):
    import wsitools.heatmap

    args = ["heatmap", "--attention", str(attention_case["attention"]), "--mpp", "4", "--quiet", "--out"]
    real = wsitools.heatmap.draw_heatmap

    def drawn_then_killed(*a, **kw):
        real(*a, **kw)
        raise KeyboardInterrupt  # as a job killed after its first slide

    monkeypatch.setattr(wsitools.heatmap, "draw_heatmap", drawn_then_killed)
    assert main([*args, str(tmp_path / "new")]) == 130
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary
    monkeypatch.undo()
    assert main([*args, str(tmp_path / "new")]) == 0
    assert capsys.readouterr().out.split("\t")[1] == str(tmp_path / "new" / "synth_svs.heatmap.png")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [
        "synth_svs.attention.geojson", "synth_svs.heatmap.png", "synth_svs.top_tiles.png"]
    (tmp_path / "file").write_text("x")
    assert main([*args, str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip() == f"wsitools heatmap: error: {tmp_path / 'file'}: is a file, where a folder is needed"


def _files(folder: Path) -> dict[str, bytes]:
    """Every file and folder name in ``folder``, with the bytes of its files."""
    return {p.name: p.read_bytes() if p.is_file() else b"<folder>" for p in sorted(folder.iterdir())}


def test_a_heatmap_killed_over_another_scale_leaves_the_earlier_set_whole(attention_case, tmp_path, capsys):
    """A heatmap run killed while drawing a slide into an --out holding that slide's files of
    another --scale leaves those files as they were, never one scale's heatmap beside the
    other's detections; its temporary is what `wsitools clean` removes, as does the next run,
    which replaces the set whole (the montage it does not draw too)."""
    import subprocess
    import sys

    out = tmp_path / "h"
    args = ["heatmap", "--attention", str(attention_case["attention"]), "--mpp", "4", "--quiet", "--out", str(out)]
    assert main(args) == 0
    before = _files(out)
    assert sorted(before) == ["synth_svs.attention.geojson", "synth_svs.heatmap.png", "synth_svs.top_tiles.png"]
    killed = ("import os, sys\n"
              "import wsitools.heatmap\n"
              "wsitools.heatmap.write_attention_geojson = lambda *a, **k: os._exit(9)  # killed after the heatmap\n"
              "from wsitools.cli import main\n"
              f"main({[*args, '--scale', 'absolute']!r})\n")
    assert subprocess.run([sys.executable, "-c", killed], capture_output=True).returncode == 9
    after = _files(out)
    staging = [name for name in after if name.startswith(".tmp-")]
    assert {k: v for k, v in after.items() if k not in staging} == before
    assert len(staging) == 1 and staging[0].startswith(".tmp-synth_svs.heatmap.png-")
    capsys.readouterr()
    assert main(["clean", str(out), "--dry-run"]) == 0
    assert f"would remove\t{out / staging[0]}\t" in capsys.readouterr().out
    assert main([*args, "--scale", "absolute", "--top-k", "0"]) == 0
    redrawn = _files(out)
    assert sorted(redrawn) == ["synth_svs.attention.geojson", "synth_svs.heatmap.png"]
    assert all(redrawn[name] != before[name] for name in redrawn)


def test_files_replaced_together_never_sit_beside_the_old_set(tmp_path, monkeypatch):
    """Cut off while renaming a set in, the folder holds files of the new set only, without the
    last name that seals it; never an old file beside a new one."""
    import os

    from wsitools import io

    names = ["s.top_tiles.png", "s.attention.geojson", "s.heatmap.png"]
    for name in names:
        (tmp_path / name).write_text("old")
    real, renamed = os.replace, []

    def cut_off(src, dst):
        if len(renamed) == 1:
            raise KeyboardInterrupt
        renamed.append(dst)
        real(src, dst)

    monkeypatch.setattr(os, "replace", cut_off)
    with pytest.raises(KeyboardInterrupt), io.replaced_together(tmp_path, names) as staged:
        for name in names:
            (staged / name).write_text("new")
    monkeypatch.undo()
    assert _files(tmp_path) == {"s.top_tiles.png": b"new"}  # and no temporary
    with io.replaced_together(tmp_path, names) as staged:  # a set of two: the third name's old file goes
        for name in names[1:]:
            (staged / name).write_text("newer")
    assert _files(tmp_path) == {"s.attention.geojson": b"newer", "s.heatmap.png": b"newer"}


def test_not_an_attention_file(tmp_path):
    from wsitools.errors import StoreError

    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.zeros((2, 2)))
    with pytest.raises(StoreError, match=f"{Path(path)}: not an attention file"):
        read_attention(path)


@pytest.mark.parametrize("value, says", [(np.nan, "not finite"), (-5.0, "negative values (-5)")])
def test_attention_that_no_head_gives_is_refused(attention_case, tmp_path, value, says):
    from wsitools.errors import StoreError

    path = Path(shutil.copy(attention_case["attention"], tmp_path / "a.h5"))
    with h5py.File(path, "r+") as f:  # written so, without checksums (another writer): no damage to find
        f["attention"][3] = value
        del f.attrs["attention_crc32"]
    with pytest.raises(StoreError, match=rf"^{path}: attention has .*{re.escape(says)}"):
        read_attention(path)


def _crc32(values: np.ndarray) -> int:
    """The CRC-32 of ``values``' little-endian bytes, as the file records it."""
    return zlib.crc32(np.ascontiguousarray(values, values.dtype.newbyteorder("<")).tobytes())


def test_a_damaged_attention_file_is_found_and_fails_its_slide_alone(attention_case, tmp_path, capsys):
    """A flipped bit that leaves the attention finite and positive (a tile coloured hotter), or
    moves a tile, keeps shapes and attributes right: the checksums the file records find it, and
    the heatmap run fails that file alone, naming it and the dataset. A file that records no
    checksums (written before they were) is read unchecked."""
    with h5py.File(attention_case["attention"], "r") as f:
        assert f.attrs["attention_crc32"] == _crc32(f["attention"][()])
        assert f.attrs["coords_crc32"] == _crc32(f["coords"][()])
    for name, damage in (("attention", lambda d: d.__setitem__(3, 2 * d[3])),
                         ("coords", lambda d: d.__setitem__((5, 0), d[5, 0] + TILE0))):
        path = Path(shutil.copy(attention_case["attention"], tmp_path / f"{name}.h5"))
        with h5py.File(path, "r+") as f:
            damage(f[name])
            crc, recorded = _crc32(f[name][()]), int(f.attrs[f"{name}_crc32"])
        assert crc != recorded
        with pytest.raises(StoreError) as caught:
            read_attention(path)
        assert str(caught.value) == (f"{path}: checksum mismatch in {name!r} (CRC-32 {crc:08x}, recorded "
                                     f"{recorded:08x}): damaged since it was written; write it again (wsitools "
                                     "train or predict)")
    damaged = tmp_path / "coords.h5"
    other = tmp_path / "other" / "synth_b.h5"  # another slide's attention, drawn from the slide file alone
    amap = read_attention(attention_case["attention"])
    write_attention(other, slide_id="synth_b", attention=amap.attention, coords=amap.coords, classes=["neg", "pos"],
                    probs=np.array([0.1, 0.9]), feature_path=tmp_path / "synth_b.h5", meta={},
                    provenance={"slide_path": str(attention_case["slide"]), "tile_size_level0": float(TILE0)})
    rc = main(["heatmap", "--attention", str(damaged), str(other), "--out", str(tmp_path / "h"), "--mpp", "4",
               "--top-k", "0", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 1 and "Traceback" not in captured.err
    moved = amap.coords.copy()
    moved[5, 0] += TILE0
    assert captured.err.splitlines() == [
        f"synth_svs\tfailed\t{damaged}: checksum mismatch in 'coords' (CRC-32 {_crc32(moved):08x}, recorded "
        f"{_crc32(amap.coords):08x}): damaged since it was written; write it again (wsitools train or predict)",
        "1 of 2 heatmaps failed"]
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["synth_b.attention.geojson", "synth_b.heatmap.png"]
    with h5py.File(damaged, "r+") as f:  # as written before checksums were recorded
        for key in ("attention_crc32", "coords_crc32"):
            del f.attrs[key]
    assert read_attention(damaged).coords[5, 0] == amap.coords[5, 0] + TILE0


# --- QuPath GeoJSON ----------------------------------------------------------------------------


def _signed_area(ring) -> float:
    """Shoelace area as written: positive for a counterclockwise ring (RFC 7946's exterior)."""
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))


def validate_qupath_detections(doc: dict, *, width: int, height: int) -> list[dict]:
    """A GeoJSON FeatureCollection as RFC 7946 and QuPath's reader (qupath-core,
    PathObjectTypeAdapters: properties.objectType, properties.measurements as a name -> number
    map, properties.classification {name, color [r, g, b]}) take it; returns the features."""
    assert doc["type"] == "FeatureCollection" and isinstance(doc["features"], list)
    for feature in doc["features"]:
        assert feature["type"] == "Feature"
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon" and len(geometry["coordinates"]) == 1  # no holes
        ring = geometry["coordinates"][0]
        assert len(ring) >= 4 and ring[0] == ring[-1], "ring not closed"
        assert all(len(p) == 2 and all(isinstance(v, (int, float)) for v in p) for p in ring)
        assert _signed_area(ring) > 0, "exterior ring not counterclockwise"
        assert all(0 <= x <= width and 0 <= y <= height for x, y in ring), "outside the slide"
        props = feature["properties"]
        assert props["objectType"] == "detection"
        measurements = props["measurements"]
        assert isinstance(measurements, dict) and measurements
        for name, value in measurements.items():
            assert isinstance(name, str) and type(value) in (int, float) and np.isfinite(value)
        if "classification" in props:
            cls = props["classification"]
            assert isinstance(cls["name"], str) and cls["name"]
            assert len(cls["color"]) == 3 and all(type(c) is int and 0 <= c <= 255 for c in cls["color"])
    return doc["features"]


def test_attention_geojson_is_qupath_detections(attention_case, tmp_path):
    import json

    out = draw_heatmap(attention_case["attention"], tmp_path, mpp=4.0, top_k=0, scale="absolute")
    assert out.geojson == tmp_path / "synth_svs.attention.geojson" and out.montage is None
    features = validate_qupath_detections(json.loads(out.geojson.read_text()), width=SLIDE_SIZE[0],
                                          height=SLIDE_SIZE[1])
    amap = read_attention(attention_case["attention"])
    assert len(features) == len(amap.coords)
    for feature, (x, y), a in zip(features, amap.coords, amap.attention):
        assert feature["geometry"]["coordinates"][0] == [[x, y], [x + TILE0, y], [x + TILE0, y + TILE0],
                                                         [x, y + TILE0], [x, y]]
        m = feature["properties"]["measurements"]
        assert m["attention"] == pytest.approx(a, rel=1e-5)
        assert m["attention x N"] == pytest.approx(a * len(amap.attention), rel=1e-4)
        assert m["heatmap value"] == pytest.approx(min(1.0, max(0.0, np.log10(max(a * len(amap.attention), 1)) / 2)),
                                                   abs=1e-5)
        assert (m["prob neg"], m["prob pos"]) == (0.1, 0.9)
        assert feature["properties"]["classification"]["name"] == "pos"
    percentiles = np.array([f["properties"]["measurements"]["attention percentile"] for f in features])
    np.testing.assert_allclose(percentiles, display_values(amap.attention), atol=1e-5)
    assert percentiles[attention_case["inside"]].mean() > 0.85


def test_geojson_clips_edge_tiles_and_omits_a_missing_prediction():
    from wsitools.attention import AttentionMap
    from wsitools.heatmap import attention_geojson

    amap = AttentionMap("s", np.array([0.5, 0.25, 0.25], np.float32),
                        np.array([[0, 0], [900, 500], [2000, 0]]), 224.0)
    doc = attention_geojson(amap, bounds=Bounds(0, 0, 1000, 600))
    features = validate_qupath_detections(doc, width=1000, height=600)
    assert len(features) == 2  # the third tile lies off the slide
    assert features[1]["geometry"]["coordinates"][0] == [[900, 500], [1000, 500], [1000, 600], [900, 600], [900, 500]]
    assert "classification" not in features[0]["properties"]
    assert set(features[0]["properties"]["measurements"]) == {"attention", "attention x N", "attention percentile",
                                                              "heatmap value", "mean-pooled heads"}


@pytest.mark.parametrize("output", ["risk", "prediction"])
def test_geojson_names_a_survival_or_regression_output_as_it_is(output):
    from wsitools.attention import AttentionMap
    from wsitools.heatmap import attention_geojson

    amap = AttentionMap("s", np.array([0.75, 0.25], np.float32), np.array([[0, 0], [224, 0]]), 224.0,
                        classes=(output,), probs=np.array([-1.25]))
    features = validate_qupath_detections(attention_geojson(amap), width=448, height=224)
    assert [f["properties"]["measurements"][output] for f in features] == [-1.25, -1.25]
    assert not any(k.startswith("prob") for k in features[0]["properties"]["measurements"])
    assert "classification" not in features[0]["properties"]


def test_heatmap_cli_options_and_bad_input(attention_case, tmp_path, capsys):
    args = ["heatmap", "--attention", str(attention_case["attention"]), "--out", str(tmp_path / "o"), "--quiet"]
    assert main([*args, "--min-side", "900", "--max-side", "800"]) == 2
    assert capsys.readouterr().err.strip() == "wsitools heatmap: error: --min-side 900 is larger than --max-side 800"
    with pytest.raises(SystemExit) as exc:
        main([*args, "--cmap", "rainbow"])
    assert exc.value.code == 2 and "invalid choice: 'rainbow'" in capsys.readouterr().err
    assert main([*args, "--mpp", "8", "--min-side", "100", "--max-side", "200", "--cmap", "viridis", "--top-k", "0"]) == 0
    line = capsys.readouterr().out.strip().split("\t")
    assert line[:4] == ["synth_svs", str(tmp_path / "o" / "synth_svs.heatmap.png"),
                        str(tmp_path / "o" / "synth_svs.attention.geojson"), "-"]
    # 2048 x 1536 px at 0.25 um/px = 512 um: at 8 um/px 64 px long, raised to --min-side 100
    assert Image.open(tmp_path / "o" / "synth_svs.heatmap.png").size == (100 + 150, 300 + 32)


@pytest.mark.parametrize("scale", ["rank", "minmax", "absolute"])
def test_the_colour_bar_label_fits_a_short_thumbnail(tmp_path, monkeypatch, scale):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from wsitools.heatmap import save_heatmap_figure

    saved: list[Figure] = []
    original = FigureCanvasAgg.draw
    monkeypatch.setattr(FigureCanvasAgg, "draw", lambda self: (saved.append(self.figure), original(self))[1])
    save_heatmap_figure(tmp_path / "h.png", np.zeros((120, 300, 3), np.uint8), title="s1", scale=scale)
    fig = saved[0]
    renderer = fig.canvas.get_renderer()
    label = fig.axes[-1].yaxis.label.get_window_extent(renderer)
    assert label.y0 >= 0 and label.y1 <= fig.bbox.height and label.x1 <= fig.bbox.width


@pytest.mark.parametrize("shape", [(120, 256, 3), (374, 256, 3), (370, 51, 3)])
def test_the_figure_is_its_pixel_size_where_matplotlib_truncates_the_inches(tmp_path, monkeypatch, shape):
    """A canvas of int(inches * dpi) pixels with no tolerance for the float step, as some
    matplotlib versions size it: 406 / 100 * 100 is 405.99999999999994, a figure 1 px short of
    the image, title band and colour-bar band."""
    from matplotlib.backend_bases import FigureCanvasBase

    from wsitools.heatmap import save_heatmap_figure

    monkeypatch.setattr(FigureCanvasBase, "get_width_height",
                        lambda self, *, physical=False: tuple(int(v) for v in self.figure.bbox.max))
    image = np.full(shape, 77, np.uint8)
    figure = np.asarray(Image.open(save_heatmap_figure(tmp_path / "h.png", image, title="s", scale="rank")).convert("RGB"))
    h, w = shape[:2]
    assert figure.shape == (max(h, 300) + 32, w + 150, 3)  # 406 x 332, 406 x 406, 201 x 402
    assert (figure[32 : 32 + h, :w] == 77).all()


def test_a_slide_folder_is_listed_once_for_all_slides(attention_case, tmp_path, monkeypatch, capsys):
    """--slide DIR found each slide by listing the folder (and stat-ing every file) once per
    attention file: 27 minutes of listing for a 10 000-slide run. Now listed once."""
    import shutil

    slides, atts = tmp_path / "slides", tmp_path / "att"
    slides.mkdir()
    atts.mkdir()
    for sid in ("synth_svs", "second"):
        shutil.copy(attention_case["slide"], slides / f"{sid}.svs")
        with h5py.File(shutil.copy(attention_case["attention"], atts / f"{sid}.h5"), "r+") as f:
            f.attrs["slide_id"] = sid  # each of its own slide, drawn without a store
            del f.attrs["store_path"]
    (slides / ".hidden.svs").write_bytes(b"")
    listed = []
    real = Path.iterdir

    def iterdir(self):
        if self == slides:
            listed.append(self)
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    rc = main(["heatmap", "--attention", str(atts), "--slide", str(slides), "--out", str(tmp_path / "o"), "--mpp", "4",
               "--top-k", "0", "--quiet"])
    assert rc == 0 and len(listed) == 1 and (tmp_path / "o" / "synth_svs.heatmap.png").is_file()
    (slides / "second.svs").unlink()
    rc = main(["heatmap", "--attention", str(atts), "--slide", str(slides), "--out", str(tmp_path / "p"), "--mpp", "4",
               "--top-k", "0", "--quiet"])
    assert rc == 1 and f"slide second: no slide file named second.* (or with that id) in {slides}" in capsys.readouterr().err


def test_geojson_tiles_start_at_the_top_left_of_the_slides_bounds():
    from wsitools.attention import AttentionMap
    from wsitools.heatmap import attention_geojson

    amap = AttentionMap("s", np.array([0.5, 0.25, 0.25], np.float32),
                        np.array([[1000, 2000], [1100, 2000], [0, 0]]), 100.0)
    features = attention_geojson(amap, bounds=Bounds(1000, 2000, 150, 500))["features"]
    assert [f["geometry"]["coordinates"][0] for f in features] == [
        [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]],
        [[100, 0], [150, 0], [150, 100], [100, 100], [100, 0]],  # clipped to the bounds' width
    ]  # the tile at (0, 0) lies outside the scanned area QuPath shows


def test_heatmap_detections_are_in_qupaths_frame_of_a_slide_with_openslide_bounds(attention_case, openslide_bounds,
                                                                                    tmp_path):
    """QuPath's OpenSlide reader shows an MRXS, SCN or BIF slide from the top-left of its
    bounds, which becomes its (0, 0): each detection is its tile less that corner, clipped to the
    bounds; a tile outside them is left out. The montage captions stay in level-0 px."""
    import json

    coords = attention_case["coords"]
    store = write_patch_store(
        tmp_path / "stores" / "synth_svs.zarr", coords=coords, tiles=None, tissue_fraction=np.ones(len(coords)),
        attrs={"slide_id": "synth_svs", "slide_path": str(attention_case["slide"]), "backend": "openslide",
               "tile_size": 64, "tile_size_level0": float(TILE0), "mpp_target": 0.5})
    out = draw_heatmap(attention_case["attention"], tmp_path / "h", store_path=store, mpp=4.0, top_k=0)
    bx, by, bw, bh = openslide_bounds
    features = validate_qupath_detections(json.loads(out.geojson.read_text()), width=bw, height=bh)
    expected = []
    for x, y in coords:
        x0, y0, x1, y1 = max(x - bx, 0), max(y - by, 0), min(x + TILE0 - bx, bw), min(y + TILE0 - by, bh)
        if x1 > x0 and y1 > y0:
            expected.append([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
    assert [f["geometry"]["coordinates"][0] for f in features] == expected
    assert [[84, 56], [212, 56], [212, 184], [84, 184], [84, 56]] in expected  # the tile at level-0 (384, 256)
    assert len(expected) == 13 * 10 < len(coords)


def _storeless(attention: Path, copy: Path) -> Path:
    """A copy of ``attention`` that records no patch store (a bag written by another tool)."""
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(attention, copy)
    with h5py.File(copy, "r+") as f:
        del f.attrs["store_path"]
    return copy


def test_heatmap_without_a_store_refuses_a_slide_the_tiles_do_not_fit(attention_case, blank_svs, tmp_path, capsys):
    """Without a patch store nothing says which slide the attention is of: another slide was
    drawn under it and the detections off that slide were dropped without a word."""
    att = _storeless(attention_case["attention"], tmp_path / "storeless" / "synth_svs.h5")
    args = ["heatmap", "--attention", str(att), "--mpp", "4", "--quiet", "--out"]
    rc = main([*args, str(tmp_path / "small"), "--slide", str(blank_svs)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert (f"synth_svs\tfailed\t{att}: 144 of its 192 tiles lie off slide {blank_svs} (1024 x 768 level-0 px; "
            "e.g. the tile at x 1024, y 0): not the slide they were cut from; give that slide with --slide") in err
    assert not (tmp_path / "small" / "synth_svs.attention.geojson").exists()
    # Tiles cut at 0.5 um/px, 64 px a side, 128 level-0 px: from a slide of 0.5 um/px, not this one's 0.25.
    coarse = tmp_path / "coarse" / "synth_svs.h5"
    amap = read_attention(att)
    write_attention(coarse, slide_id="synth_svs", attention=amap.attention, coords=amap.coords, classes=["neg", "pos"],
                    probs=amap.probs, feature_path=tmp_path / "f.h5", meta={},
                    provenance={"slide_path": str(attention_case["slide"]), "tile_size": 64, "mpp_target": 1.0,
                                "tile_size_level0": float(TILE0)})
    rc = main([*args, str(tmp_path / "coarse_out"), "--attention", str(coarse)])
    assert rc == 1
    assert (f"synth_svs\tfailed\t{coarse}: its tiles were cut from a slide of 0.5 um/px, slide "
            f"{attention_case['slide']} has 0.25 um/px: not the slide they were cut from") in capsys.readouterr().err


def test_heatmap_of_a_slide_without_mpp_takes_the_mpp_its_tiles_were_cut_at(attention_case, tmp_path, capsys):
    """A slide tiled with --mpp-override gets its heatmap without its store: heatmap has no
    --mpp-override, and the attention's tile geometry says what the tiler took (0.25 um/px)."""
    from conftest import REGIONS
    from wsitools.synthetic import write_slide

    slides = tmp_path / "slides"
    slides.mkdir()
    write_slide(slides / "synth_svs.svs", size=SLIDE_SIZE, mpp=0.25, regions=REGIONS, fmt="svs",
                downsamples=(1, 2, 4, 8), write_mpp=False)
    args = ["heatmap", "--slide", str(slides), "--mpp", "2", "--min-side", "100", "--top-k", "0", "--quiet"]
    storeless = _storeless(attention_case["attention"], tmp_path / "storeless" / "synth_svs.h5")
    assert main([*args, "--attention", str(storeless), "--out", str(tmp_path / "h")]) == 0
    # 2048 px at 0.25 um/px drawn at 2 um/px: 256 px wide (under a 32 px title, beside the 150 px bar)
    assert Image.open(tmp_path / "h" / "synth_svs.heatmap.png").size == (256 + 150, 300 + 32)
    bare = tmp_path / "bare" / "synth_svs.h5"
    amap = read_attention(attention_case["attention"])
    write_attention(bare, slide_id="synth_svs", attention=amap.attention, coords=amap.coords, classes=[],
                    probs=np.zeros(0), feature_path=tmp_path / "f.h5", meta={},
                    provenance={"tile_size_level0": float(TILE0)})
    assert main([*args, "--attention", str(bare), "--out", str(tmp_path / "b")]) == 1
    assert (f"synth_svs\tfailed\t{slides / 'synth_svs.svs'}: the slide's metadata gives no usable resolution (mpp), "
            f"and attention file {bare} does not record its tiles' geometry (mpp_target, tile_size) to take it from; "
            "pass the slide's patch store with --store") in capsys.readouterr().err


def test_a_store_or_slide_given_must_be_there(attention_case, tmp_path, capsys):
    """A --store or --slide given but missing (a typo) is an error naming it before anything is
    drawn, not passed over for the slide's own metadata (no montage, no mpp override); a --store
    folder without the slide's store fails that slide, naming both."""
    att = attention_case["attention"]
    base = ["heatmap", "--attention", str(att), "--mpp", "4", "--quiet", "--out", str(tmp_path / "o")]
    for option, path in (("--store", tmp_path / "nope.zarr"), ("--store", tmp_path / "nodir"),
                         ("--slide", tmp_path / "nope.svs")):
        assert main([*base, option, str(path)]) == 2
        assert capsys.readouterr().err == f"wsitools heatmap: error: {option} {path}: no such file or folder\n"
    assert not (tmp_path / "o").exists()
    (tmp_path / "empty").mkdir()
    assert main([*base, "--store", str(tmp_path / "empty")]) == 1
    assert (f"synth_svs\tfailed\tslide synth_svs: no patch store synth_svs.zarr in --store {tmp_path / 'empty'}\n"
            in capsys.readouterr().err)
    assert not (tmp_path / "o").exists()  # every heatmap failed: no empty --out either
    with pytest.raises(StoreError, match=f"^{re.escape(str(tmp_path / 'nope.zarr'))}: no such patch store$"):
        draw_heatmap(att, tmp_path / "api", store_path=tmp_path / "nope.zarr")
    with pytest.raises(SlideError, match=f"^slide synth_svs: no slide file {re.escape(str(tmp_path / 'nope.svs'))}$"):
        draw_heatmap(att, tmp_path / "api", slide_path=tmp_path / "nope.svs")


def test_a_store_of_another_tiling_of_the_slide_fails_it_naming_both_and_what_differs(attention_case, tmp_path,
                                                                                      capsys):
    """A patch store of the slide tiled again with other settings (other coords, tile size or
    resolution) is not the record of how this attention's tiles were read: its slide is refused,
    naming the attention file, the store and what differs, and its earlier files are kept.
    Without a store (none given, the recorded one gone) the slide is drawn from its file."""
    from wsitools.heatmap import check_store_fits

    att, coords = attention_case["attention"], attention_case["coords"]
    amap = read_attention(att)
    moved = coords.copy()
    moved[10:, 0] += 64
    geometry = {"slide_id": "synth_svs", "slide_path": str(attention_case["slide"]), "tile_size": 64,
                "tile_size_level0": float(TILE0), "mpp_target": 0.5}
    cases = {
        "count": (coords[:1], {}, "192 tiles, the store's 1"),
        "moved": (moved, {}, f"182 tiles elsewhere, e.g. tile 10 at x {coords[10, 0]}, y {coords[10, 1]}, the "
                             f"store's at x {coords[10, 0] + 64}, y {coords[10, 1]}"),
        "level0": (coords, {"tile_size_level0": 256.0}, "tiles of 128 level-0 px, the store's 256"),
        "geometry": (coords, {"tile_size": 128, "mpp_target": 0.25},
                     "64 px tiles at 0.5 um/px, the store's 128 px tiles at 0.25 um/px"),
    }
    for name, (store_coords, changed, differs) in cases.items():
        store = write_patch_store(tmp_path / name / "synth_svs.zarr", coords=store_coords, tiles=None,
                                  tissue_fraction=np.ones(len(store_coords)), attrs={**geometry, **changed})
        with pytest.raises(StoreError) as caught:
            check_store_fits(amap, att, PatchStore.open(store))
        assert str(caught.value) == (
            f"{att}: its tiles are not those of patch store {store} ({differs}): another tiling of the slide; give "
            "the store its features were extracted from (--store), or extract the features again from this one "
            "and train or predict again")
    out = tmp_path / "h"
    args = ["heatmap", "--attention", str(att), "--mpp", "4", "--quiet", "--out", str(out)]
    assert main(args) == 0
    before = _files(out)
    capsys.readouterr()
    assert main([*args, "--store", str(tmp_path / "moved"), "--scale", "absolute"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"synth_svs\tfailed\t{att}: its tiles are not those of patch store "
                          f"{tmp_path / 'moved' / 'synth_svs.zarr'} (182 tiles elsewhere, ")
    assert _files(out) == before
    assert main([*args, "--slide", str(attention_case["slide"])]) == 0  # the recorded store fits
    storeless = _storeless(att, tmp_path / "storeless" / "synth_svs.h5")
    assert main(["heatmap", "--attention", str(storeless), "--mpp", "4", "--quiet", "--out", str(tmp_path / "s")]) == 0


def test_two_attention_files_of_one_slide_are_refused_before_drawing(attention_case, tmp_path, capsys):
    """A training run's and a prediction's attention of one slide, given to one --out: the
    second heatmap would overwrite the first."""
    (tmp_path / "run").mkdir()
    (tmp_path / "pred").mkdir()
    first = Path(shutil.copy(attention_case["attention"], tmp_path / "run" / "synth_svs.h5"))
    second = Path(shutil.copy(attention_case["attention"], tmp_path / "pred" / "renamed.h5"))
    rc = main(["heatmap", "--attention", str(tmp_path / "run"), str(second), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == (
        f"wsitools heatmap: error: attention files {first} and {second} are both of slide synth_svs, whose heatmap "
        "files would overwrite each other; draw them into separate --out folders")
    assert not (tmp_path / "o").exists()
    # one file named twice (its folder and itself) is drawn once
    assert main(["heatmap", "--attention", str(tmp_path / "run"), str(first), "--out", str(tmp_path / "p"),
                 "--mpp", "4", "--top-k", "0", "--quiet"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1


def test_slide_and_store_folders_are_searched_for_the_slide_id_the_attention_records(attention_case, tmp_path,
                                                                                      capsys):
    """An attention file renamed (or written by hand) is still of the slide it records: --slide
    DIR and --store DIR find that slide's files, and its heatmap files are named after it."""
    renamed = Path(shutil.copy(attention_case["attention"], tmp_path / "renamed.h5"))
    slides, stores = tmp_path / "slides", tmp_path / "stores"
    slides.mkdir()
    shutil.copy(attention_case["slide"], slides / "synth_svs.svs")
    shutil.copytree(attention_case["store"], stores / "synth_svs.zarr")
    with h5py.File(renamed, "r+") as f:  # nothing recorded to fall back on
        for key in ("slide_path", "store_path"):
            del f.attrs[key]
    rc = main(["heatmap", "--attention", str(renamed), "--slide", str(slides), "--store", str(stores),
               "--out", str(tmp_path / "o"), "--mpp", "4", "--top-k", "2", "--quiet"])
    out = capsys.readouterr().out.strip().split("\t")
    assert rc == 0 and out[0] == "synth_svs"
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "synth_svs.attention.geojson", "synth_svs.heatmap.png", "synth_svs.top_tiles.png"]


@pytest.mark.parametrize("coords_attrs, level0", [
    ({"patch_size": 64, "patch_size_level0": 128, "level0_magnification": 40.0, "target_magnification": 20.0,
      "overlap": 0, "name": "synth_svs"}, 128.0),  # TRIDENT's features_{encoder}/ files
    ({"patch_size": 128, "patch_level": 0, "downsample": [1.0, 1.0], "name": "synth_svs"}, 128.0),  # CLAM's
    ({"patch_size": 64, "patch_level": 1, "downsample": [2.0, 2.0]}, None),  # level 1: needs the slide's downsample
])
def test_heatmap_of_clam_or_trident_features_takes_their_tile_size(attention_case, tmp_path, coords_attrs, level0):
    """Bags of other tools record no tile_size_level0 as a file attribute; TRIDENT (and CLAM at
    patch_level 0) record it on coords, and their attention is drawn with --slide."""
    import json

    from wsitools.errors import StoreError
    from wsitools.feature_store import FeatureStore

    coords = attention_case["coords"]
    bag_path = tmp_path / "features" / "synth_svs.h5"
    bag_path.parent.mkdir()
    with h5py.File(bag_path, "w") as f:
        f["features"] = np.ones((len(coords), 4), np.float32)
        f["coords"] = coords
        f["coords"].attrs.update(coords_attrs)
    bag = FeatureStore.open_bag(bag_path)
    assert bag.attrs.get("tile_size_level0") == level0
    att = tmp_path / "attention" / "synth_svs.h5"
    write_attention(att, slide_id="synth_svs", attention=attention_case["values"], coords=coords, classes=["a", "b"],
                    probs=np.array([0.4, 0.6]), feature_path=bag_path, provenance=bag.attrs, meta={})
    if level0 is None:
        with pytest.raises(StoreError, match="lacks tile_size_level0"):
            read_attention(att)
        return
    out = draw_heatmap(att, tmp_path / "h", slide_path=attention_case["slide"], mpp=4.0)
    features = validate_qupath_detections(json.loads(out.geojson.read_text()), width=SLIDE_SIZE[0],
                                          height=SLIDE_SIZE[1])
    x, y = coords[5]
    assert features[5]["geometry"]["coordinates"][0] == [[x, y], [x + 128, y], [x + 128, y + 128], [x, y + 128], [x, y]]


def _rewrite_attention(attention_case, path, attention, meta) -> Path:
    """The attention case's slide and store, with ``attention`` and the attributes ``meta``."""
    provenance = {"slide_path": str(attention_case["slide"]), "store_path": str(attention_case["store"]),
                  "tile_size_level0": float(TILE0), "tile_size": 64, "mpp_target": 0.5}
    write_attention(path, slide_id="synth_svs", attention=attention, coords=attention_case["coords"],
                    classes=["neg", "pos"], probs=np.array([0.1, 0.9]), feature_path=path.parent / "synth_svs.h5",
                    provenance=provenance, meta={"head": "abmil", "label": "pos", **meta})
    return path


def test_a_map_of_mean_pooled_heads_says_so_and_ranks_no_tiles(attention_case, tmp_path, caplog):
    """A head that pooled by the mean weighs every tile alike: the title says the map is none, the
    montage (which would rank tiles in store order) is skipped with a note, and the QuPath
    detections carry the share of such heads."""
    import json
    import logging

    from wsitools.attention import pooling_attrs
    from wsitools.heatmap import _title

    n = len(attention_case["coords"])
    path = _rewrite_attention(attention_case, tmp_path / "att" / "synth_svs.h5", np.full(n, 1 / n),
                              pooling_attrs(["mean"]))
    amap = read_attention(path)
    assert (amap.n_models, amap.n_mean_pooled, amap.mean_pooled, amap.attrs["pooling"]) == (1, 1, True, "mean")
    assert _title(amap) == ("synth_svs   neg: 0.10  pos: 0.90   (label pos)   "
                            "[mean pooling: uniform weights, no attention map]")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "synth_svs.top_tiles.png").write_bytes(b"an earlier run's montage")
    caplog.set_level(logging.INFO, logger="wsitools.heatmap")
    out = draw_heatmap(path, out_dir, mpp=4.0, top_k=4)
    assert out.montage is None and not (out_dir / "synth_svs.top_tiles.png").exists()
    assert "slide synth_svs: no top-tile montage: its heads pooled by the mean (uniform weights: no tile ranks " \
           "above another)" in caplog.text
    features = json.loads(out.geojson.read_text())["features"]
    assert {f["properties"]["measurements"]["mean-pooled heads"] for f in features} == {1.0}
    ensemble = _rewrite_attention(attention_case, tmp_path / "ens" / "synth_svs.h5", np.full(n, 1 / n),
                                  pooling_attrs(["mean"] * 3))
    assert _title(read_attention(ensemble)).endswith(
        "   [all 3 heads pooled by the mean: uniform weights, no attention map]")


def test_a_map_of_an_ensemble_with_mean_pooled_heads_says_how_many(attention_case, tmp_path):
    """2 of 3 heads pooled by the mean: the title says so, the montage is drawn (the attention
    head ranks the tiles), and on the rank scale the map is the attention head's map."""
    import json

    from wsitools.attention import pooling_attrs
    from wsitools.heatmap import _title

    values = attention_case["values"]
    n = len(values)
    mixed = (values + 2 / n) / 3  # one attention head and two uniform ones, averaged
    path = _rewrite_attention(attention_case, tmp_path / "att" / "synth_svs.h5", mixed,
                              pooling_attrs(["attention", "mean", "mean"]))
    amap = read_attention(path)
    assert (amap.n_models, amap.n_mean_pooled, amap.mean_pooled, amap.attrs["pooling"]) == (3, 2, False, "mixed")
    assert _title(amap) == "synth_svs   neg: 0.10  pos: 0.90   (label pos)   [2 of 3 heads pooled by the mean]"
    np.testing.assert_allclose(display_values(amap.attention), display_values(values), atol=1e-6)
    out = draw_heatmap(path, tmp_path / "out", mpp=4.0, top_k=4)
    assert out.montage is not None and out.montage.exists()
    features = json.loads(out.geojson.read_text())["features"]
    assert {f["properties"]["measurements"]["mean-pooled heads"] for f in features} == {0.666667}


def test_older_attention_files_read_as_one_attention_head_and_bad_counts_are_refused(attention_case, tmp_path):
    from wsitools.heatmap import _title

    amap = read_attention(attention_case["attention"])  # written without the pooling attributes
    assert (amap.n_models, amap.n_mean_pooled, amap.mean_pooled) == (1, 0, False)
    assert _title(amap) == "synth_svs   neg: 0.10  pos: 0.90   (label pos)"
    bad = _rewrite_attention(attention_case, tmp_path / "bad.h5", attention_case["values"],
                             {"n_models": 3, "n_mean_pooled": 4})
    with pytest.raises(StoreError, match=r"bad\.h5: 4 of 3 heads pooled by the mean"):
        read_attention(bad)


@pytest.mark.parametrize(("n_mean_pooled", "share"), [(0, "attention"), (1, "tiles")])
def test_a_patient_bags_share_is_of_its_tiles_for_a_mean_pooled_head(n_mean_pooled, share):
    """A head that pooled by the mean gives each slide of a patient its share of the tiles."""
    from wsitools.attention import AttentionMap
    from wsitools.heatmap import _title

    amap = AttentionMap("s1", np.full(51, 1 / 130, np.float32), np.zeros((51, 2), np.int64), 224.0,
                        attrs={"patient_id": "P7", "attention_share": 51 / 130}, n_mean_pooled=n_mean_pooled)
    assert _title(amap).startswith(f"s1   patient P7: 39% of its {share}")
