"""The ``wsitools`` command: one sub-command per pipeline step.

Each step's module under ``wsitools.cli`` defines ``register(subparsers)``, which adds its
sub-commands and sets ``func`` on them. Every user error ends the command with one line on
stderr, ``wsitools CMD: error: ...``, naming the file or option and the problem, with exit status
2 and no traceback: a bad option value (the argument types of :mod:`wsitools.cli.options`), a
:class:`WsiToolsError`, and an ``OSError`` about a named file (a directory given for a file, a
file that cannot be read or written). A reader that closes the output early (``| head``) ends the
command with status 1 and nothing on stderr. SIGTERM (a scheduler cancelling the job) stops the
command as Ctrl-C does, so what it was writing is removed, and it ends with one line saying so
(:func:`~wsitools.errors.stopped_line`) and status 128 + 15. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

from wsitools import __version__
from wsitools.errors import WsiToolsError, error_line, one_line, stopped_line

# Sub-command modules, in the order of the pipeline.
COMMAND_MODULES = (
    "slide",  # info
    "tile",  # tile
    "encoders",  # encoders, extract
    "export",  # export (to CLAM, TRIDENT)
    "mil",  # train, predict, heatmap
    "pretrain",  # pretrain puzzle, tune pathotune
    "demo",  # demo
    "clean",  # clean
)


_LITERAL = re.compile(r"``([^`]+)``")


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and whose help shows the docstrings it is
    made of without their reStructuredText literal markers (sub-parsers inherit the class)."""

    def format_help(self) -> str:
        return _LITERAL.sub(r"\1", super().format_help())

    def format_usage(self) -> str:
        return _LITERAL.sub(r"\1", super().format_usage())

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


class Stopped(BaseException):
    """Raised in the command's process by SIGTERM; a ``BaseException`` like ``KeyboardInterrupt``,
    so that only cleanup (``finally``, removing temporaries) runs on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_on_sigterm() -> None:
    """SIGTERM raises :class:`Stopped` in this process; a child forked from it (a data-loading
    worker) dies of it as by default."""
    pid = os.getpid()

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Stopped(signum)

    signal.signal(signal.SIGTERM, handler)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="wsitools",
        description="Whole-slide image pipeline: tiles, features, MIL heads, prompt tuning.",
    )
    parser.add_argument("--version", action="version", version=f"wsitools {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"wsitools.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # tifffile logs what it trips over while parsing a damaged file (a page offset past the
        # end) before the error that wsitools turns into its own one line naming the slide; the
        # others log their routine steps (loading a model, counting threads) at INFO.
        logging.getLogger("tifffile").setLevel(logging.CRITICAL)
        for name in ("sentence_transformers", "transformers", "numexpr"):
            logging.getLogger(name).setLevel(logging.WARNING)
    _stop_on_sigterm()
    try:
        return int(args.func(args) or 0)
    except Stopped as stop:
        print(stopped_line(args.command, stop.signum), file=sys.stderr)
        return 128 + stop.signum
    except BrokenPipeError:  # whoever read our output stopped early (`wsitools encoders | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush is silent
        return 1
    except (WsiToolsError, OSError) as exc:
        line = error_line(exc)
        if line is None:
            raise
        print(f"wsitools {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
