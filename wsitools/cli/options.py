"""Argument types shared by every sub-command: numbers that must be finite and in range, an
mpp within the plausible range of a slide, input files that must be files and patch stores that
must be folders.

Each is an ``argparse`` ``type=``: a bad value ends the command before any work with one line,
``wsitools CMD: error: argument --lr: must be a finite number > 0, got 'nan'`` (exit status 2),
whichever sub-command it belongs to.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wsitools.types import MPP_MAX, MPP_MIN


def _number(text: str, requirement: str, ok: Callable[[float], bool]) -> float:
    """``text`` as a finite float for which ``ok`` holds, else an error stating ``requirement``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
    return value


def _integer(text: str, requirement: str, ok: Callable[[int], bool]) -> int:
    """``text`` as an int for which ``ok`` holds, else an error stating ``requirement``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, timeouts, magnifications)."""
    return _number(text, "a finite number > 0", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (weight decay, areas)."""
    return _number(text, "a finite number >= 0", lambda v: v >= 0)


def fraction(text: str) -> float:
    """A number in [0, 1] (tissue fractions, dropout, opacity, split fractions)."""
    return _number(text, "a number from 0 to 1", lambda v: 0.0 <= v <= 1.0)


def positive_int(text: str) -> int:
    """A whole number >= 1 (sizes, epochs, threads)."""
    return _integer(text, "a whole number >= 1", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (workers, seeds, counts where 0 means none)."""
    return _integer(text, "a whole number >= 0", lambda v: v >= 0)


def jpeg_quality(text: str) -> int:
    """A JPEG quality, a whole number from 1 to 100."""
    return _integer(text, "a whole number from 1 to 100", lambda v: 1 <= v <= 100)


def mpp(text: str) -> float:
    """A resolution in um/px within the range accepted for a slide (types.MPP_MIN-MPP_MAX):
    a target finer than any scanner's would only blow memory up."""
    return _number(text, f"from {MPP_MIN:g} to {MPP_MAX:g} um/px", lambda v: MPP_MIN <= v <= MPP_MAX)


class PatchStoreDirs(argparse.Action):
    """Patch stores (``nargs="+"``), each opened and checked when its turn comes, so that one
    missing or bad store among many fails alone. Only when none of them is a folder is it a
    command-line mistake, refused at once, saying what the first one is (a slide: tile it first)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from wsitools.store import not_a_store

        if not any(Path(v).is_dir() for v in values):
            raise argparse.ArgumentError(self, not_a_store(Path(values[0])))
        setattr(namespace, self.dest, list(values))


def feature_store_dir(text: str) -> str:
    """A directory of feature stores (``features/ENCODER``); one store's file, or a missing path,
    is refused at once, saying so."""
    from wsitools.errors import StoreError
    from wsitools.feature_store import check_feature_dir

    try:
        check_feature_dir(text)
    except StoreError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def input_file(text: str) -> str:
    """A path that exists and is a file (not a directory)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory, expected a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text


def show_progress(*, quiet: bool) -> bool:
    """Whether a command draws progress bars: on a terminal, unless ``--quiet``. Written into a
    log file (a batch job, ``> run.log 2>&1``) a bar is every redraw of it, not a record; the
    command's result lines and log messages are written either way."""
    return not quiet and sys.stderr.isatty()
