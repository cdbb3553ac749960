"""Hostile inputs to PuzzleTuning, PathoTune, prediction and heatmaps, as a user who did not write
the code brings them: runs stopped early or re-run into a finished folder, stores of other tile
sizes, magnifications or too few tiles, heads applied to features they were not trained on, and
heatmaps of a slide whose stores do not agree.

Each case makes its own tiny inputs (a random-weight prompted ViT card, small patch stores and
feature stores) and asserts on the outcome: one line naming the file or option and what is wrong
(exit 2), or a correct run; never a traceback or an unfinished output that looks finished.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from wsitools.cli import main
from wsitools.store import write_patch_store


def run(argv: list, capsys) -> tuple[int, str, str]:
    """``wsitools ARGV`` in this process: (exit status, stdout, stderr)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse ends the process on a bad option
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_line(rc: int, err: str, *needles: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith(("INFO", "WARNING"))]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tiny_card(root: Path, *, size: int = 64) -> Path:
    """A random-weight prompted ViT of width 64 at ``size`` px (seeded, no weight file)."""
    card = root / f"vit-test-{size}.yaml"
    card.write_text(yaml.safe_dump({
        "name": f"vit-test-{size}", "architecture": {
            "model": "prompted_vit_test_patch16_224", "kwargs": {"img_size": size},
            "prompts": {"tokens": 4, "mode": "deep"}, "init_seed": 0},
        "weights": [], "input": {"size": size, "normalize": None}, "output": {"kind": "cls", "dim": 64},
        "precision": {"compute": "bf16"}}))
    return card


def patch_store(path: Path, *, n: int, size: int = 64, mpp: float = 0.5, seed: int = 0) -> Path:
    """``n`` random tiles of ``size`` px at ``mpp`` um/px in a row (level 0 at 0.25 um/px)."""
    rng = np.random.default_rng(seed)
    step = size * mpp / 0.25
    return write_patch_store(
        path, coords=np.stack([np.arange(n) * step, np.zeros(n)], 1),
        tiles=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), tissue_fraction=np.ones(n),
        attrs={"slide_id": path.stem, "slide_path": f"/synthetic/{path.stem}.svs", "params_hash": "h",
               "tile_size": size, "tile_size_level0": step, "mpp_target": mpp})


# --- PuzzleTuning ------------------------------------------------------------------------------------


def puzzle_argv(card: Path, stores: Path, out: Path) -> list:
    return ["pretrain", "puzzle", "--stores", stores, "--encoder", card, "--epochs", "2", "--batch-size", "4",
            "--steps-per-epoch", "1", "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
            "--workers", "0", "--device", "cpu", "--quiet", "--out", out]


def test_a_puzzle_run_stopped_early_exports_no_card_until_it_is_resumed_to_the_end(tmp_path, capsys):
    card = tiny_card(tmp_path)
    patch_store(tmp_path / "tiles" / "s.zarr", n=8)
    argv = puzzle_argv(card, tmp_path / "tiles", tmp_path / "run")
    rc, out, err = run([*argv, "--stop-after-epochs", "1"], capsys)
    assert rc == 0, err
    assert "epochs done\t1/2" in out and "encoder card\tnot yet: continue with --resume" in out
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "config.json", "log.csv",
                                                                      "previews"]
    rc, out, err = run([*argv, "--resume"], capsys)
    assert rc == 0, err
    assert "epochs done\t2/2" in out
    assert (tmp_path / "run" / "vit-test-64-puzzletuned.yaml").is_file()
    assert (tmp_path / "run" / "vit-test-64-puzzletuned_promptstate.pth").is_file()


def test_too_few_tiles_for_one_puzzle_step_names_the_stores_and_the_options(tmp_path, capsys):
    card = tiny_card(tmp_path)
    patch_store(tmp_path / "tiles" / "s.zarr", n=6)
    argv = puzzle_argv(card, tmp_path / "tiles", tmp_path / "run")
    at = argv.index("--steps-per-epoch")
    del argv[at : at + 2]  # one epoch is one pass over the tiles
    rc, _, err = run(argv, capsys)
    one_line(rc, err, f"wsitools pretrain: error: {tmp_path / 'tiles'}: 6 tiles, too few for one optimiser step "
             "of 4 x 2 tiles (--batch-size x --accum-steps)")
    assert not (tmp_path / "run").exists()
