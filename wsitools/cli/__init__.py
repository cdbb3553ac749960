"""The ``wsitools`` command: one sub-command per pipeline step.

Each step's module under ``wsitools.cli`` defines ``register(subparsers)``, which adds its
sub-commands and sets ``func`` on them. User errors (:class:`WsiToolsError`) are printed as one
line naming the file and the problem, with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from wsitools import __version__
from wsitools.errors import WsiToolsError

# Sub-command modules, in the order of the pipeline.
COMMAND_MODULES = (
    "slide",  # info
    "tile",  # tile
    "encoders",  # encoders, extract
    "mil",  # train, predict, heatmap
    "pretrain",  # pretrain puzzle, tune pathotune
    "demo",  # demo
    "clean",  # clean
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    try:
        return int(args.func(args) or 0)
    except WsiToolsError as exc:
        print(f"wsitools {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
