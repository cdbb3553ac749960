"""Shared fixtures: small synthetic slides with tissue at known places, and the real fixtures."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One thread per process: on a busy 2-core machine torch's default pool oversubscribes the cores
# and small models slow down many-fold. Subprocesses (the CLI, Snakemake jobs) inherit these.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from wsitools.synthetic import Region, write_slide  # noqa: E402

FIXTURES = Path(__file__).parent / "data" / "openslide-fixtures"

# A 2048 x 1536 slide at 0.25 um/px: one large tissue ellipse and a planted region of the other
# texture, far enough apart that their masks do not touch.
SLIDE_SIZE = (2048, 1536)
SLIDE_MPP = 0.25
REGIONS = (Region(160, 160, 1000, 1000, "tissue"), Region(1500, 700, 460, 640, "other"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def synthetic_svs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "synth_svs.svs"
    return write_slide(path, size=SLIDE_SIZE, mpp=SLIDE_MPP, regions=REGIONS, fmt="svs",
                       downsamples=(1, 2, 4, 8))


@pytest.fixture(scope="session")
def synthetic_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "synth_tiff.tiff"
    return write_slide(path, size=SLIDE_SIZE, mpp=SLIDE_MPP, regions=REGIONS, fmt="tiff",
                       downsamples=(1, 2, 4, 8))


@pytest.fixture(scope="session")
def blank_svs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "blank.svs"
    return write_slide(path, size=(1024, 768), mpp=SLIDE_MPP, regions=(), fmt="svs", downsamples=(1, 4))


def planted_mask(shape: tuple[int, int], downsample: tuple[float, float], regions=REGIONS) -> np.ndarray:
    """Ground truth on a mask grid: which mask pixel centres lie inside a planted region."""
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    x0 = (xs + 0.5) * downsample[0] - 0.5
    y0 = (ys + 0.5) * downsample[1] - 0.5
    truth = np.zeros(shape, bool)
    for r in regions:
        truth |= r.contains(x0, y0)
    return truth


OPENSLIDE_BOUNDS = (300, 200, 1600, 1200)
"""x, y, width, height of the scanned area that :func:`openslide_bounds` makes OpenSlide report."""


@pytest.fixture()
def openslide_bounds(monkeypatch: pytest.MonkeyPatch) -> tuple[int, int, int, int]:
    """OpenSlide reporting the properties ``openslide.bounds-x/-y/-width/-height`` (as it does for
    MRXS, Leica SCN and Ventana BIF files, of which none can be written here) for every slide it
    opens: :data:`OPENSLIDE_BOUNDS`."""
    from wsitools.slide import OpenSlideSlide

    real = OpenSlideSlide._open

    def with_bounds(self: OpenSlideSlide) -> None:
        real(self)
        keys = ("openslide.bounds-x", "openslide.bounds-y", "openslide.bounds-width", "openslide.bounds-height")
        self.properties = {**self.properties, **{k: str(v) for k, v in zip(keys, OPENSLIDE_BOUNDS)}}

    monkeypatch.setattr(OpenSlideSlide, "_open", with_bounds)
    return OPENSLIDE_BOUNDS


@pytest.fixture()
def fifo() -> Iterator[Callable[[Path], Path]]:
    """Makes a FIFO (named pipe) at a path, with a writer that opens and closes it whenever a
    reader opens it: code that should refuse a FIFO but opens it then reads an empty file, so its
    test fails instead of hanging. The writers are stopped when the test ends."""
    writers: list[subprocess.Popen] = []

    def make(path: Path) -> Path:
        os.mkfifo(path)
        writers.append(subprocess.Popen(["sh", "-c", 'while [ -p "$0" ]; do : > "$0"; done', str(path)]))
        return path

    yield make
    for writer in writers:
        writer.kill()
        writer.wait()
