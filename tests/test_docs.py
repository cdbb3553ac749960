"""The docs say only what the code does: every command line README.md and docs/*.md show parses,
every command and option of the CLI is documented, every workflow config key they name is in the
schema (with the schema's default where they quote one), and every benchmark option they show
exists.

Command lines are read from what a user copies: inline code spans (which may run over a line
break) and the lines of fenced code blocks (a line ending in a backslash joined to the next, shell
comments dropped). Parsers come from the package's own CLI builder; benchmark scripts are read
with ``ast``, never run.
"""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from wsitools.cli import build_parser
from wsitools.samples import config_error

REPO = Path(__file__).resolve().parent.parent
DOCS = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())


# --- reading the code a markdown file shows --------------------------------------------------


@dataclass(frozen=True)
class Snippet:
    """One piece of code a doc shows: an inline code span or a (joined) fenced line."""

    where: str  # "docs/x.md:LINE"
    text: str
    fenced: bool
    section: str  # "docs/x.md: HEADING", the heading the snippet is under
    language: str = ""


FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
SHELL_COMMENT = re.compile(r"(?:^|\s)#.*$")


def _fenced(lines: list[tuple[int, str]], section: str, language: str) -> Iterator[Snippet]:
    """A fenced block's lines, continuation lines joined and shell comments dropped."""
    pending: tuple[int, str] | None = None
    for number, line in lines:
        start, text = pending if pending else (number, "")
        text = f"{text} {SHELL_COMMENT.sub('', line).strip()}".strip()
        if line.rstrip().endswith("\\"):
            pending = (start, text.rstrip("\\").rstrip())
            continue
        pending = None
        if text:
            yield Snippet(f"{_file(section)}:{start}", text, True, section, language)
    if pending:
        yield Snippet(f"{_file(section)}:{pending[0]}", pending[1], True, section, language)


def _file(section: str) -> str:
    return section.split(": ", 1)[0]


def _spans(paragraph: list[tuple[int, str]], section: str) -> Iterator[Snippet]:
    """The inline code spans of one paragraph (a table's escaped ``\\|`` read as ``|``)."""
    text = "\n".join(line for _, line in paragraph)
    for match in SPAN.finditer(text):
        line = paragraph[0][0] + text.count("\n", 0, match.start(2))
        code = " ".join(match.group(2).replace("\\|", "|").split())
        yield Snippet(f"{_file(section)}:{line}", code, False, section)


def snippets(text: str, name: str) -> list[Snippet]:
    """Every piece of code a markdown text shows, in order, each with its file, line and section."""
    out: list[Snippet] = []
    paragraph: list[tuple[int, str]] = []
    block: list[tuple[int, str]] | None = None
    fence, language, section = "", "", f"{name}: "
    for number, line in enumerate(text.splitlines(), start=1):
        opened = FENCE.match(line)
        if block is not None:
            if opened and opened.group(1).startswith(fence) and not opened.group(2):
                out.extend(_fenced(block, section, language))
                block = None
            else:
                block.append((number, line))
        elif opened:
            out.extend(_spans(paragraph, section))
            paragraph, block, fence, language = [], [], opened.group(1), opened.group(2)
        elif line.strip() and not line.startswith("#"):
            paragraph.append((number, line))
        else:
            out.extend(_spans(paragraph, section))
            paragraph = []
            if line.startswith("#"):
                section = f"{name}: {line.lstrip('#').strip()}"
    out.extend(_spans(paragraph, section))
    return out


@cache
def doc_snippets() -> tuple[Snippet, ...]:
    return tuple(s for doc in DOCS for s in snippets(doc.read_text(), doc.relative_to(REPO).as_posix()))


# --- wsitools command lines ---------------------------------------------------------------------


COMMAND = re.compile(r"(?<![\w./<>{-])wsitools(?=\s|$)")
COMMAND_END = re.compile(r"\s(?:\||\|\||&&|;|>|2>)\s|\s#|$")
OPTION = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w-]*")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--")}


def all_commands(parser: argparse.ArgumentParser, name: str = "wsitools") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command (``wsitools``, ``wsitools tile``, ``wsitools encoders fetch``) and its parser."""
    yield name, parser
    for sub_name, sub in subcommands(parser).items():
        yield from all_commands(sub, f"{name} {sub_name}")


@dataclass(frozen=True)
class CommandLine:
    where: str
    command: str  # "wsitools tile"
    options: tuple[str, ...]
    problems: tuple[str, ...]


def command_lines(snippet: Snippet, parser: argparse.ArgumentParser) -> Iterator[CommandLine]:
    """Each ``wsitools ...`` command in a snippet: the command it names and the options it shows,
    and what does not parse (an unknown sub-command or option)."""
    for match in COMMAND.finditer(snippet.text):
        rest = snippet.text[match.end():]
        rest = rest[: COMMAND_END.search(rest).start()]
        tokens = rest.split()
        name, current, problems = "wsitools", parser, []
        while tokens and subcommands(current) and not tokens[0].startswith(("-", "[")):
            word = tokens.pop(0)
            if word not in subcommands(current):
                problems.append(f"{name}: no sub-command {word!r} (it has {', '.join(subcommands(current))})")
                break
            name, current = f"{name} {word}", subcommands(current)[word]
        shown = tuple(OPTION.findall(" ".join(tokens)))
        problems += [f"{name}: no option {o}" for o in shown if o not in options(current)]
        yield CommandLine(snippet.where, name, shown, tuple(problems))


@cache
def doc_command_lines() -> tuple[CommandLine, ...]:
    parser = build_parser()
    return tuple(c for s in doc_snippets() for c in command_lines(s, parser))


def test_snippets_join_continuations_drop_comments_and_keep_lines():
    text = ("Run `wsitools tile A --out B`, then\n`wsitools train --features F\n  --out O`.\n\n"
            "```bash\nwsitools extract S \\\n  --encoder E  # a comment --nope\n```\n| a | `x\\|y` |\n")
    assert [(s.where, s.text, s.fenced) for s in snippets(text, "d.md")] == [
        ("d.md:1", "wsitools tile A --out B", False),
        ("d.md:2", "wsitools train --features F --out O", False),
        ("d.md:6", "wsitools extract S --encoder E", True),
        ("d.md:9", "x|y", False),
    ]


def test_command_lines_name_the_line_and_what_does_not_parse():
    parser = build_parser()
    text = ("`wsitools tile SLIDE... --out DIR [--workers N] [--codec jpeg|lossless] --tiles 3`\n\n"
            "`wsitools encoders fetch NAME --force`, `wsitools tilee X`, `wsitools pretrain puzzel`\n\n"
            "`<wsitools>/workflow/Snakefile`, `wsitools.tile_slides`, `pip install wsitools`\n")
    found = [(c.where, c.command, c.options, c.problems) for s in snippets(text, "d.md")
             for c in command_lines(s, parser)]
    assert found == [
        ("d.md:1", "wsitools tile", ("--out", "--workers", "--codec", "--tiles"), ("wsitools tile: no option --tiles",)),
        ("d.md:3", "wsitools encoders fetch", ("--force",), ()),
        ("d.md:3", "wsitools", (), ("wsitools: no sub-command 'tilee' (it has info, tile, encoders, extract, export, "
                                    "train, predict, heatmap, pretrain, tune, demo, clean)",)),
        ("d.md:3", "wsitools pretrain", (), ("wsitools pretrain: no sub-command 'puzzel' (it has puzzle)",)),
        ("d.md:5", "wsitools", (), ()),
    ]


def test_every_command_line_in_the_docs_parses():
    lines = doc_command_lines()
    assert len(lines) > 100  # the extraction finds the docs' commands
    problems = [f"{c.where}: {p}" for c in lines for p in c.problems]
    assert problems == []


def test_readme_table_lists_every_command():
    text = (REPO / "README.md").read_text()
    table = text[text.index("| step | command |"):]
    table = table[: table.index("\n\n")]
    parser = build_parser()
    shown = {c.command for s in snippets(table, "README.md") for c in command_lines(s, parser)}
    missing = sorted(name for name, sub in all_commands(parser)
                     if name != "wsitools" and not subcommands(sub) and name not in shown)
    assert missing == []


def test_every_option_of_every_command_is_documented():
    """An option is documented for a command where a doc section (heading to heading) that shows
    a command line of that command also names the option in code: on that command line, or in the
    prose around it."""
    commands: dict[str, set[str]] = {}
    named: dict[str, set[str]] = {}
    parser = build_parser()
    for snippet in doc_snippets():
        commands.setdefault(snippet.section, set()).update(c.command for c in command_lines(snippet, parser))
        named.setdefault(snippet.section, set()).update(OPTION.findall(snippet.text))
    missing = [f"{name} {option}" for name, sub in all_commands(parser) for option in sorted(options(sub) - {"--help"})
               if not any(name in commands[section] and option in named[section] for section in commands)]
    assert missing == []
