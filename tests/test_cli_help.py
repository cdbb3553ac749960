"""The command line's own words: help that reads as plain text and names every option, and one-line
errors that say what was given and what to run instead."""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import pytest

import wsitools.cli.slide
from wsitools.cli import build_parser, main
from wsitools.errors import STOPPED_LINE
from wsitools.io import atomic_path

FIXTURES = Path(__file__).parent / "data" / "openslide-fixtures"


def subparsers(parser: argparse.ArgumentParser, name: str = "wsitools"):
    """Every (command name, parser) below ``parser``, nested sub-commands included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield f"{name} {sub_name}", sub
                yield from subparsers(sub, f"{name} {sub_name}")


COMMANDS = dict(subparsers(build_parser()))


def test_every_command_is_covered():
    assert {"wsitools info", "wsitools tile", "wsitools demo", "wsitools export", "wsitools tune pathotune",
            "wsitools pretrain puzzle", "wsitools encoders fetch"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_is_plain_text(name):
    text = COMMANDS[name].format_help()
    assert "``" not in text and ":class:" not in text and ":func:" not in text


def test_docstring_descriptions_lose_their_literal_markers(capsys):
    for command, first in [("info", "wsitools info: what a slide is"), ("tile", "wsitools tile: tissue detection"),
                           ("demo", "wsitools demo: the whole workflow")]:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert exit_.value.code == 0 and first in out and "``" not in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help(name):
    missing = [a.option_strings or a.dest for a in COMMANDS[name]._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help]
    assert missing == []


def test_named_options_say_what_they_do():
    def help_of(command: str, option: str) -> str:
        return next(a.help for a in COMMANDS[command]._actions if option in a.option_strings)

    assert "tiffslide first for .svs/.tif/.tiff" in help_of("wsitools info", "--backend")
    assert "threads of one process" in help_of("wsitools tile", "--scheduler")
    assert "AdamW peak learning rate" in help_of("wsitools tune pathotune", "--lr")
    assert "float16, half the disk" in help_of("wsitools extract", "--dtype")
    assert all(f"{{slide_id}}.{name}" in help_of("wsitools heatmap", "--out")
               for name in ("heatmap.png", "top_tiles.png", "attention.geojson"))


def test_extract_given_a_slide_says_to_tile_it_first(capsys):
    slide = FIXTURES / "small.svs"
    with pytest.raises(SystemExit) as exit_:
        main(["extract", str(slide), "--encoder", "vit-test-tiny", "--out", "unused"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.strip() == (
        f"wsitools extract: error: argument STORE: {slide}: is a slide, not a patch store; tile it first "
        f"(wsitools tile {slide} --out tiles) and give its store, tiles/small.zarr (see wsitools extract --help)"
    )


def test_extract_given_a_missing_path_or_another_file(tmp_path, capsys):
    for path, says in [(tmp_path / "S1.zarr", "no such patch store"),
                       (FIXTURES / "README.md", "not a patch store (a file; patch stores are the {slide_id}.zarr "
                                                "folders of wsitools tile)")]:
        with pytest.raises(SystemExit) as exit_:
            main(["extract", str(path), "--encoder", "vit-test-tiny", "--out", str(tmp_path / "f")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"argument STORE: {path}: {says}" in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("command", ["predict --model m", f"train --labels {__file__}", "export --to clam"])
def test_features_given_one_store_asks_for_its_directory(tmp_path, capsys, command):
    store = tmp_path / "features" / "enc" / "S1.h5"
    store.parent.mkdir(parents=True)
    store.write_bytes(b"")
    with pytest.raises(SystemExit) as exit_:
        main([*command.split(), "--features", str(store), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert (f"argument --features: {store}: is a file; give the directory of feature stores (features/ENCODER, "
            f"holding {{slide_id}}.h5), e.g. {store.parent}") in err


def test_sigterm_stops_a_command_with_one_line_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    """A cancelled job (SIGTERM) removes what it was writing and says it was stopped, as its last
    line, which the workflow tells from a failure by; a process it forked dies of the signal."""
    final = tmp_path / "out.bin"
    child_status = []

    def cancelled(args):
        pid = os.fork()
        if pid == 0:  # a forked worker: dies of SIGTERM, never raises into the parent's code
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(0)
        child_status.append(os.waitpid(pid, 0)[1])
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        return 0

    monkeypatch.setattr(wsitools.cli.slide, "run", cancelled)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["info", "x.svs"]) == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert os.WIFSIGNALED(child_status[0]) and os.WTERMSIG(child_status[0]) == signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == "wsitools info: stopped by SIGTERM before it finished; run it again to finish"
    assert STOPPED_LINE.match(line).group(1) == "SIGTERM"
