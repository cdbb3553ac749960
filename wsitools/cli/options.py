"""Argument types shared by every sub-command: numbers that must be finite and in range, an
mpp within the plausible range of a slide, and input files that must be files.

Each is an ``argparse`` ``type=``: a bad value ends the command before any work with one line,
``wsitools CMD: error: argument --lr: must be a finite number > 0, got 'nan'`` (exit status 2),
whichever sub-command it belongs to.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from wsitools.types import MPP_MAX, MPP_MIN


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, timeouts, magnifications)."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (weight decay, areas)."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1] (tissue fractions, dropout, opacity, split fractions)."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1 (sizes, epochs, threads)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (workers, seeds, counts where 0 means none)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


def mpp(text: str) -> float:
    """A resolution in um/px within the range accepted for a slide (types.MPP_MIN-MPP_MAX):
    a target finer than any scanner's would only blow memory up."""
    value = _number(text)
    if not MPP_MIN <= value <= MPP_MAX:
        raise argparse.ArgumentTypeError(f"must be from {MPP_MIN:g} to {MPP_MAX:g} um/px, got {text!r}")
    return value


def input_file(text: str) -> str:
    """A path that exists and is a file (not a directory)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory, expected a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text
