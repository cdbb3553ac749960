"""Progress bars are drawn on a terminal only: written into a log (a batch job, `> log 2>&1`) a
bar is every redraw of it. The result lines and log messages are written either way."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from wsitools.cli import main
from wsitools.cli.options import show_progress
from wsitools.mil.synthetic import make_bag_cohort


@pytest.mark.parametrize("tty, quiet, shown", [(True, False, True), (True, True, False), (False, False, False)])
def test_bars_need_a_terminal_and_no_quiet(monkeypatch, tty, quiet, shown):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    assert show_progress(quiet=quiet) is shown


@pytest.mark.parametrize("tty", [True, False])
def test_train_draws_its_epoch_bars_on_a_terminal_only(tmp_path: Path, capsys, monkeypatch, tty):
    make_bag_cohort(tmp_path / "f", n_slides=8, n_tiles=(6, 10), dim=8, labels_path=tmp_path / "labels.csv")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    rc = main(["train", "--features", str(tmp_path / "f"), "--labels", str(tmp_path / "labels.csv"),
               "--head", "meanpool", "--folds", "2", "--epochs", "3", "--min-epochs", "1", "--device", "cpu",
               "--out", str(tmp_path / "heads")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.splitlines()[0].startswith("auroc\t")  # the result, either way
    assert ("fold 0:" in err and "epoch/s" in err) is tty
    assert ("\r" in err) is tty


@pytest.mark.parametrize("tty", [True, False])
def test_predict_draws_its_bar_on_a_terminal_only(tmp_path: Path, capsys, monkeypatch, tty):
    make_bag_cohort(tmp_path / "f", n_slides=8, n_tiles=(6, 10), dim=8, labels_path=tmp_path / "labels.csv")
    assert main(["train", "--features", str(tmp_path / "f"), "--labels", str(tmp_path / "labels.csv"),
                 "--head", "abmil", "--folds", "2", "--epochs", "2", "--min-epochs", "1", "--device", "cpu",
                 "--out", str(tmp_path / "heads"), "--quiet"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    assert main(["predict", "--model", str(tmp_path / "heads"), "--features", str(tmp_path / "f"),
                 "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("predicted 8 slides")  # the result, either way
    assert ("predict:" in err and "\r" in err) is tty


def test_a_log_file_holds_no_text_model_loading_noise(tmp_path: Path):
    # A separate process: the text model is loaded once per process, so only a fresh one shows
    # what loading it prints into a job's log (a progress bar, INFO lines of the libraries).
    import subprocess

    make_bag_cohort(tmp_path / "f", n_slides=8, n_tiles=(6, 10), dim=8, labels_path=tmp_path / "labels.csv")
    (tmp_path / "task.yaml").write_text("name: t\ndescription: bags\nclasses:\n  neg: plain\n  pos: planted\n")
    result = subprocess.run(
        [sys.executable, "-m", "wsitools", "train", "--features", str(tmp_path / "f"), "--labels",
         str(tmp_path / "labels.csv"), "--task", str(tmp_path / "task.yaml"), "--head", "pathotune",
         "--prompts", "tvp,ttp", "--folds", "2", "--epochs", "1", "--min-epochs", "1", "--device", "cpu",
         "--threads", "1", "--text-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "heads")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("auroc\t")
    assert "Loading" not in result.stderr and "\r" not in result.stderr, result.stderr
