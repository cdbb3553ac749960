"""The patch store's codecs: JPEG and lossless tiles through one reader, format 2 stores still read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsitools.cli import main
from wsitools.store import CHUNK_TILES, PatchStore, TileCodec, read_store_attrs, write_patch_store

FORMAT2 = Path(__file__).parent / "data" / "format2.zarr"
"""A lossless store written by wsitools' format 2 writer (before the codec was recorded): five
16 px tiles, tile i = (x * 15 + i, y * 15, 40 * i) at pixel (x, y), coords (32 i, 64)."""


def smooth_tiles(n: int, size: int = 32) -> np.ndarray:
    """Smooth, distinct tiles (gradients with a per-tile offset)."""
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([
        np.stack([x * 4 + (i % 64), y * 4 + 20, np.full((size, size), (3 * i) % 200)], -1) for i in range(n)
    ]).astype(np.uint8)


def write(path: Path, tiles: np.ndarray, codec: TileCodec) -> PatchStore:
    attrs = {"slide_id": path.stem, "slide_path": "/nowhere/s.svs", "params_hash": "0", "tile_size": tiles.shape[1],
             "tile_size_level0": 2.0 * tiles.shape[1], "mpp_target": 0.5}
    coords = np.stack([np.arange(len(tiles)) * 64, np.zeros(len(tiles))], 1)
    write_patch_store(path, coords=coords, tiles=tiles, tissue_fraction=np.ones(len(tiles)), attrs=attrs, codec=codec)
    return PatchStore.open(path)


def test_format_2_store_is_still_read():
    store = PatchStore.open(FORMAT2)
    assert store.attrs["format_version"] == 2 and "codec" not in store.attrs
    assert store.codec == TileCodec("lossless")
    y, x = np.mgrid[0:16, 0:16]
    expected = np.stack([np.stack([x * 15 + i, y * 15, np.full((16, 16), 40 * i)], -1) for i in range(5)])
    np.testing.assert_array_equal(store.read_tiles(slice(None)), expected.astype(np.uint8))
    np.testing.assert_array_equal(store.read_tiles(np.array([4, 1])), expected[[4, 1]].astype(np.uint8))
    np.testing.assert_array_equal(store.coords, [[32 * i, 64] for i in range(5)])


def test_jpeg_and_lossless_stores_read_alike_across_chunks(tmp_path):
    tiles = smooth_tiles(CHUNK_TILES + 9)
    jpeg = write(tmp_path / "j.zarr", tiles, TileCodec("jpeg", 90))
    lossless = write(tmp_path / "l.zarr", tiles, TileCodec("lossless"))
    np.testing.assert_array_equal(lossless.read_tiles(slice(None)), tiles)
    got = jpeg.read_tiles(slice(None))
    assert got.shape == tiles.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - tiles).mean() < 1.0 and np.abs(got.astype(int) - tiles).max() <= 12
    index = np.array([CHUNK_TILES + 8, 2, CHUNK_TILES, 2])  # any order, repeats, across chunks
    np.testing.assert_array_equal(jpeg.read_tiles(index), got[index])
    np.testing.assert_array_equal(jpeg.read_tiles(slice(CHUNK_TILES - 1, CHUNK_TILES + 1)), got[CHUNK_TILES - 1:][:2])
    assert jpeg.read_tiles(np.array([], int)).shape == (0, 32, 32, 3)
    assert (jpeg.attrs["codec"], jpeg.attrs["jpeg_quality"], jpeg.attrs["format_version"]) == ("jpeg", 90, 3)


def test_jpeg_chunks_are_what_zarr_reads(tmp_path):
    import simplejpeg
    import zarr

    tiles = smooth_tiles(CHUNK_TILES + 3)
    store = write(tmp_path / "j.zarr", tiles, TileCodec("jpeg", 75))
    array = zarr.open_group(str(store.path), mode="r")["tiles"]
    assert array.shape == (len(tiles),)
    items = array[:]
    decoded = np.stack([simplejpeg.decode_jpeg(bytes(b)) for b in items])
    np.testing.assert_array_equal(decoded, store.read_tiles(slice(None)))


def test_lower_quality_is_smaller_and_further_from_the_pixels(tmp_path):
    rng = np.random.default_rng(0)
    tiles = np.clip(smooth_tiles(8, 64).astype(int) + rng.integers(-20, 21, (8, 64, 64, 3)), 0, 255).astype(np.uint8)
    errors, sizes = [], []
    for q in (40, 90):
        store = write(tmp_path / f"q{q}.zarr", tiles, TileCodec("jpeg", q))
        errors.append(np.abs(store.read_tiles(slice(None)).astype(int) - tiles).mean())
        sizes.append((store.path / "tiles" / "c" / "0").stat().st_size)
    assert errors[0] > errors[1] + 1 and sizes[0] < sizes[1] * 0.7


@pytest.mark.parametrize("codec, quality, message", [
    ("png", 90, "tile codec must be one of jpeg, lossless, got 'png'"),
    ("jpeg", 0, "JPEG quality must be from 1 to 100, got 0"),
    ("jpeg", 101, "JPEG quality must be from 1 to 100, got 101"),
])
def test_bad_codec_settings_are_refused(codec, quality, message):
    with pytest.raises(ValueError, match=message):
        TileCodec(codec, quality)  # type: ignore[arg-type]


@pytest.mark.parametrize("args, message", [
    (["--codec", "png"], "argument --codec: invalid choice: 'png'"),
    (["--jpeg-quality", "0"], "argument --jpeg-quality: must be a whole number from 1 to 100, got '0'"),
])
def test_tile_command_refuses_bad_codec_options(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(["tile", str(tmp_path / "s.svs"), "--out", str(tmp_path / "t"), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_tile_command_records_the_codec_it_was_given(synthetic_svs, tmp_path):
    common = ["--mpp", "0.5", "--tile-size", "64", "--tissue-mpp", "4", "--min-region-area", "5000", "--quiet"]
    assert main(["tile", str(synthetic_svs), "--out", str(tmp_path / "q"), "--jpeg-quality", "70", *common]) == 0
    assert main(["tile", str(synthetic_svs), "--out", str(tmp_path / "l"), "--codec", "lossless", *common]) == 0
    q = read_store_attrs(tmp_path / "q" / "synth_svs.zarr")
    lossless = read_store_attrs(tmp_path / "l" / "synth_svs.zarr")
    assert (q["codec"], q["jpeg_quality"]) == ("jpeg", 70)
    assert (lossless["codec"], lossless["jpeg_quality"]) == ("lossless", None)
    assert q["params_hash"] != lossless["params_hash"]


def test_a_changed_codec_is_another_store(synthetic_svs, tmp_path, capsys):
    common = ["--mpp", "0.5", "--tile-size", "64", "--tissue-mpp", "4", "--min-region-area", "5000", "--quiet"]
    assert main(["tile", str(synthetic_svs), "--out", str(tmp_path), *common]) == 0
    assert main(["tile", str(synthetic_svs), "--out", str(tmp_path), "--jpeg-quality", "80", *common]) == 1
    out = capsys.readouterr().out
    assert f"synth_svs\tfailed\t{tmp_path / 'synth_svs.zarr'}: exists with other parameters (jpeg_quality)" in out


def test_jpeg_tiles_use_the_accurate_dct_at_every_quality():
    # TurboJPEG's API (simplejpeg) codes below quality 96 with the fast DCT; the store's encoder
    # does not: closer to the pixels at the same quality, and the same bytes from 96 up.
    import simplejpeg
    from skimage.data import immunohistochemistry

    from wsitools.store import encode_jpeg

    image = immunohistochemistry()
    crops = [image[i : i + 96, j : j + 96] for i in (0, 200, 400) for j in (0, 200, 400)]  # views, not copies

    def error(coded, crop):
        return np.abs(simplejpeg.decode_jpeg(coded).astype(int) - crop).mean()

    for crop in crops:
        fast = simplejpeg.encode_jpeg(np.ascontiguousarray(crop), 90, colorspace="RGB", colorsubsampling="444")
        assert error(encode_jpeg(crop, 90), crop) < error(fast, crop)
        assert encode_jpeg(crop, 97) == simplejpeg.encode_jpeg(
            np.ascontiguousarray(crop), 97, colorspace="RGB", colorsubsampling="444"
        )
    assert simplejpeg.decode_jpeg_header(encode_jpeg(crops[0], 90))[2:] == ("YCbCr", "444")
