"""Hostile cases a new user meets with files nobody wrote for the tests: TIFF pages of 16-bit or
floating-point samples, sparse TIFFs, slides cut short, slides smaller than one tile, patch
stores damaged at the same size or edited and re-sealed.

Every input is made here (tifffile, wsitools.synthetic) and every test asserts on outcomes:
pixels, messages naming the file, QC records, what is on disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsitools.errors import SlideError
from wsitools.slide import open_slide
from wsitools.synthetic import Region, render, write_slide
from wsitools.tiling import TilingParams, tile_slides
from wsitools.tissue import TissueParams

TISSUE = TissueParams(mpp=4.0, min_region_area=5_000)
PARAMS = TilingParams(mpp=0.5, tile_size=64, tissue=TISSUE)
RES = {"resolution": (1e4 / 0.5, 1e4 / 0.5), "resolutionunit": "CENTIMETER"}
PIXELS = render((Region(40, 40, 440, 440, "tissue"),), 0, 0, 512, 512)


def tiled_tiff(path: Path, data: np.ndarray, **kwargs) -> Path:
    tifffile.imwrite(path, data, tile=(256, 256), photometric="rgb", **RES, **kwargs)
    return path


# --- pages that are not 8-bit ----------------------------------------------------------------


def test_16_bit_pages_are_read_as_8_bit_by_openslide(tmp_path):
    path = tiled_tiff(tmp_path / "rgb16.tiff", PIXELS.astype(np.uint16) * 257)
    with pytest.raises(SlideError, match=r"rgb16\.tiff: cannot be opened by tiffslide: its pixels cannot be "
                       r"decoded \(ValueError: pixels of type uint16, expected 8-bit \(uint8\)\)"):
        open_slide(path, backend="tiffslide")
    with open_slide(path) as slide:  # auto: tiffslide refuses it, OpenSlide scales it to 8 bits
        assert slide.backend == "openslide"
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (512, 512)), PIXELS)


def test_float_pages_fail_their_slide_in_one_line_and_the_cohort_goes_on(tmp_path, synthetic_svs, caplog):
    path = tiled_tiff(tmp_path / "float.tiff", PIXELS.astype(np.float32) / 255)
    records = tile_slides([path, synthetic_svs], tmp_path / "tiles", PARAMS, progress=False)
    assert [r["status"] for r in records] == ["failed", "ok"]
    reason = records[0]["reason"]
    assert reason.startswith(f"{path}: no backend can open it (")
    assert "pixels of type float32, expected 8-bit (uint8)" in reason and "\n" not in reason
    assert not any(r.exc_info for r in caplog.records)  # a user's error, logged without a traceback
    assert not (tmp_path / "tiles" / "float.zarr").exists()


# --- sparse and truncated TIFFs --------------------------------------------------------------


def test_a_sparse_tile_is_white_on_both_backends(tmp_path):
    """A tile of no bytes (offset 0, count 0) is one the scanner left out: white, as OpenSlide and
    libtiff read it, not an error on the tiffslide fast path."""

    def tiles():
        for ty in range(2):
            for tx in range(2):
                yield None if (tx, ty) == (1, 0) else PIXELS[ty * 256 : ty * 256 + 256, tx * 256 : tx * 256 + 256]

    path = tmp_path / "sparse.tiff"
    tifffile.imwrite(path, tiles(), shape=(512, 512, 3), dtype=np.uint8, tile=(256, 256), photometric="rgb", **RES)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].databytecounts[1] == 0
    expected = PIXELS.copy()
    expected[:256, 256:] = 255
    for backend in ("tiffslide", "openslide"):
        with open_slide(path, backend=backend) as slide:
            np.testing.assert_array_equal(slide.read_region((0, 0), 0, (512, 512)), expected)


@pytest.mark.parametrize("compression", ["jpeg", "zlib", None])
def test_a_truncated_slide_says_so_naming_the_tile(tmp_path, compression):
    path = tiled_tiff(tmp_path / "cut.tiff", PIXELS, compression=compression)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts)]
        top = page.asarray()[:256]  # what the tiles before the cut hold (JPEG: not PIXELS)
    size = ends[2] - 10  # tiles 0 and 1 whole, tile 2 cut short, tile 3 gone
    path.write_bytes(path.read_bytes()[:size])
    with open_slide(path, backend="tiffslide") as slide:
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (512, 256)), top)
        with pytest.raises(SlideError) as err:
            slide.read_region((0, 0), 0, (512, 512))
    assert str(err.value) == (
        f"{path.resolve()}: reading 512x512 px at (0, 0) (level 0) failed: TIFF tile 2 of level 0 ends at "
        f"byte {ends[2]}, past the end of the file ({size} bytes): the file is truncated"
    )


def test_tiling_a_truncated_svs_fails_it_naming_the_cause(tmp_path, synthetic_svs):
    cut = tmp_path / "cut.svs"
    data = synthetic_svs.read_bytes()
    cut.write_bytes(data[: len(data) * 6 // 10])
    records = tile_slides([cut, synthetic_svs], tmp_path / "tiles", PARAMS, progress=False)
    assert [r["status"] for r in records] == ["failed", "ok"]
    assert records[0]["reason"].startswith(f"{cut.resolve()}: reading ")
    assert records[0]["reason"].endswith("the file is truncated")
    assert sorted(p.name for p in (tmp_path / "tiles").iterdir() if p.name.startswith("cut")) == ["cut.qc.json"]
