"""``wsitools info`` and ``wsitools tile`` from the command line: outputs, exit codes, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from wsitools.cli import main
from wsitools.store import PatchStore


def test_info_json(synthetic_svs, capsys):
    assert main(["info", str(synthetic_svs), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dimensions"] == [2048, 1536]
    assert info["mpp"] == 0.25 and info["vendor"] == "aperio"
    assert info["level_downsamples"] == [1.0, 2.0, 4.0, 8.0]


def test_info_text(fixtures_dir, capsys):
    assert main(["info", str(fixtures_dir / "boxes.tiff"), "--mpp-override", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "300 x 250" in out and "75 x 62  downsample 4  " in out and "override" in out


@pytest.mark.parametrize("name, message", [
    ("unopenable.tiff", "unopenable.tiff: cannot be opened by openslide: Unsupported TIFF compression: 52479"),
    ("unreadable.svs", "unreadable.svs: cannot be opened by openslide: its pixels cannot be decoded"),
])
def test_errors_are_one_line_without_traceback(fixtures_dir, name, message):
    cmd = [sys.executable, "-m", "wsitools", "info", str(fixtures_dir / name), "--backend", "openslide"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_info_shows_a_slide_without_usable_mpp_with_the_problem(fixtures_dir, capsys):
    assert main(["info", str(fixtures_dir / "boxes.tiff")]) == 0
    out = capsys.readouterr().out
    assert "300 x 250" in out and "75 x 62  downsample 4\n" in out
    assert "mpp              unknown: metadata mpp-x = 352.778 um/px is implausible" in out


def test_tile_cohort_with_a_bad_slide(synthetic_svs, fixtures_dir, tmp_path, capsys):
    out = tmp_path / "tiles"
    args = ["tile", str(synthetic_svs), str(fixtures_dir / "unreadable.svs"), "--out", str(out),
            "--mpp", "1.0", "--tile-size", "64", "--min-region-area", "5000", "--tissue-mpp", "4", "--quiet"]
    assert main(args) == 1  # one slide failed...
    store = PatchStore.open(out / "synth_svs.zarr")  # ...but the good one was tiled
    assert len(store) > 0 and store.mpp_target == 1.0 and store.tile_size == 64
    bad = json.loads((out / "unreadable.qc.json").read_text())
    assert bad["status"] == "failed" and "unreadable.svs" in bad["reason"]
    assert not (out / "unreadable.zarr").exists()
    printed = capsys.readouterr()
    assert "1 of 2 slides failed" in printed.err
    assert main(args + ["--keep-going"]) == 0  # re-run: good store kept, bad one recorded again


def test_tile_derives_a_safe_id_from_any_file_name(tmp_path, synthetic_svs, capsys):
    weird = tmp_path / "bad name! Müller.svs"
    weird.write_bytes(synthetic_svs.read_bytes())
    fast = ["--mpp", "1.0", "--tile-size", "64", "--min-region-area", "5000", "--tissue-mpp", "4", "--quiet"]
    assert main(["tile", str(weird), "--out", str(tmp_path / "t"), *fast]) == 0
    store = PatchStore.open(tmp_path / "t" / "bad_name_Muller.zarr")
    assert store.slide_path == weird.resolve() and len(store) > 0  # the original path is kept
    assert sorted(p.name for p in (tmp_path / "t").iterdir() if " " in p.name) == []
    # an id given explicitly is still checked, never changed
    capsys.readouterr()
    assert main(["tile", str(weird), "--slide-id", "bad name", "--out", str(tmp_path / "u"), *fast]) == 1
    printed = capsys.readouterr()
    assert "unsafe slide id 'bad name'" in printed.out + printed.err
    assert not list((tmp_path / "u").glob("*bad name*"))


def test_tile_bad_parameters(synthetic_svs, tmp_path, capsys):
    assert main(["tile", str(synthetic_svs), "--out", str(tmp_path), "--overlap", "300"]) == 2
    assert "overlap" in capsys.readouterr().err


def test_info_on_a_file_name_that_is_no_safe_id(synthetic_svs, tmp_path, capsys):
    spaced = tmp_path / "scan 7.svs"
    spaced.write_bytes(synthetic_svs.read_bytes())
    assert main(["info", str(spaced), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "scan 7.svs"
