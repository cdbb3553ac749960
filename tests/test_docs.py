"""The docs say only what the code does: every command line README.md and docs/*.md show parses
(sub-commands, options, the choices and defaults they show), every command and option of the CLI
is documented, every workflow config key they name is in the schema (with a valid value, and the
schema's default where they quote one), and every benchmark option they show exists.

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


FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
SHELL_COMMENT = re.compile(r"(?:^|\s)#.*$")


def _fenced(lines: list[tuple[int, str]], section: str) -> Iterator[Snippet]:
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
            yield Snippet(f"{_file(section)}:{start}", text, True, section)
    if pending:
        yield Snippet(f"{_file(section)}:{pending[0]}", pending[1], True, section)


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
    fence, section = "", f"{name}: "
    for number, line in enumerate(text.splitlines(), start=1):
        opened = FENCE.match(line)
        if block is not None:
            if opened and opened.group(1).startswith(fence) and not opened.group(2):
                out.extend(_fenced(block, section))
                block = None
            else:
                block.append((number, line))
        elif opened:
            out.extend(_spans(paragraph, section))
            paragraph, block, fence = [], [], opened.group(1)
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


def is_group(parser: argparse.ArgumentParser) -> bool:
    """A command that is only a name for its sub-commands (``wsitools pretrain``)."""
    return any(isinstance(a, argparse._SubParsersAction) and a.required for a in parser._actions)


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
    and what is wrong with it (an unknown sub-command or option, a value that is not among the
    option's choices, an optional number that is not the option's default)."""
    for match in COMMAND.finditer(snippet.text):
        rest = snippet.text[match.end():]
        rest = rest[: COMMAND_END.search(rest).start()]
        tokens = rest.split()
        name, current, problems = "wsitools", parser, []
        while tokens and subcommands(current) and re.fullmatch(r"[a-z][a-z0-9-]*", tokens[0]):  # not a placeholder
            word = tokens.pop(0)
            if word not in subcommands(current):
                problems.append(f"{name}: no sub-command {word!r} (it has {', '.join(subcommands(current))})")
                break
            name, current = f"{name} {word}", subcommands(current)[word]
        shown = tuple(OPTION.findall(" ".join(tokens)))
        problems += [f"{name}: no option {o}" for o in shown if o not in options(current)]
        problems += choice_problems(" ".join(tokens), current, name)
        problems += default_problems(" ".join(tokens), current, name)
        yield CommandLine(snippet.where, name, shown, tuple(problems))


VALUES = re.compile(r"(?<![\w-])(--[\w-]+)[ =]([a-z0-9][\w.:-]*(?:\|[a-z0-9][\w.:-]*)*)(?=[\s\])`,;]|$)")


def choice_problems(text: str, parser: argparse.ArgumentParser, name: str) -> list[str]:
    """Literal values shown for an option with choices (``--codec jpeg|lossless``, ``--cmap
    inferno``) that are not among them; placeholders (``--scale S``) are not literal values."""
    actions = {o: a for a in parser._actions for o in a.option_strings}
    return [f"{name}: {option} has no choice {value!r} (it has {'|'.join(map(str, actions[option].choices))})"
            for option, values in VALUES.findall(text) if option in actions and actions[option].choices
            for value in values.split("|") if value not in map(str, actions[option].choices)]


OPTIONAL_NUMBER = re.compile(r"\[(--[\w-]+) (-?[\d.]+(?:e-?\d+)?)\]")


def default_problems(text: str, parser: argparse.ArgumentParser, name: str) -> list[str]:
    """An optional part with a number (``[--jpeg-quality 97]``) shows the option's default, where
    the option has a number for one (an option without a default shows an example there)."""
    defaults = {o: a.default for a in parser._actions for o in a.option_strings}
    return [f"{name}: [{option} {shown}] is not its default, {defaults[option]}"
            for option, shown in OPTIONAL_NUMBER.findall(text)
            if isinstance(defaults.get(option), (int, float)) and not isinstance(defaults[option], bool)
            and float(shown) != defaults[option]]


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
    text = ("`wsitools tile SLIDE... --out DIR [--workers N] [--codec jpeg|lossles] --tiles 3 [--jpeg-quality 95]`\n\n"
            "`wsitools encoders fetch NAME --force`, `wsitools tilee X`, `wsitools pretrain puzzel`\n\n"
            "`<wsitools>/workflow/Snakefile`, `wsitools.tile_slides`, `pip install wsitools`, `wsitools COMMAND`\n")
    found = [(c.where, c.command, c.options, c.problems) for s in snippets(text, "d.md")
             for c in command_lines(s, parser)]
    assert found == [
        ("d.md:1", "wsitools tile", ("--out", "--workers", "--codec", "--tiles", "--jpeg-quality"),
         ("wsitools tile: no option --tiles", "wsitools tile: --codec has no choice 'lossles' (it has jpeg|lossless)",
          "wsitools tile: [--jpeg-quality 95] is not its default, 97")),
        ("d.md:3", "wsitools encoders fetch", ("--force",), ()),
        ("d.md:3", "wsitools", (), ("wsitools: no sub-command 'tilee' (it has info, tile, encoders, extract, export, "
                                    "train, predict, heatmap, pretrain, tune, demo, clean)",)),
        ("d.md:3", "wsitools pretrain", (), ("wsitools pretrain: no sub-command 'puzzel' (it has puzzle)",)),
        ("d.md:5", "wsitools", (), ()),
        ("d.md:5", "wsitools", (), ()),
    ]


def test_every_command_line_in_the_docs_parses():
    lines = doc_command_lines()
    assert len(lines) > 100  # the extraction finds the docs' commands
    problems = [f"{c.where}: {p}" for c in lines for p in c.problems]
    assert not problems, "\n".join(problems)


def test_readme_table_lists_every_command():
    text = (REPO / "README.md").read_text()
    assert "| step | command |" in text, "README.md: the command table (| step | command |) is gone"
    table = text[text.index("| step | command |"):]
    table = table[: table.index("\n\n")]
    parser = build_parser()
    shown = {c.command for s in snippets(table, "README.md") for c in command_lines(s, parser)}
    missing = sorted(name for name, sub in all_commands(parser) if not is_group(sub) and name not in shown)
    assert not missing, "\n".join(missing)


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
    assert not missing, "\n".join(missing)


# --- workflow configuration keys ----------------------------------------------------------------


def _with_defs(node: dict[str, Any]) -> dict[str, Any]:
    return {**node, "$defs": SCHEMA["$defs"]}


def _named(node: dict[str, Any]) -> dict[str, Any] | None:
    """The schema of each entry of a mapping keyed by the user's names (``tasks``, ``heads``)."""
    entry = node.get("additionalProperties")
    return entry if "propertyNames" in node and isinstance(entry, dict) else None


def key_problem(segments: list[str]) -> str | None:
    """What is wrong with a config key path as a doc writes it (``heads: NAME: device``,
    ``tiling: codec, jpeg_quality``, ``device: cpu``: a leaf followed by a value, which must be a
    valid one), or None."""
    node = SCHEMA
    for i, segment in enumerate(segments):
        where = ": ".join(segments[:i]) or "the config"
        if "properties" in node:
            keys = segment.split(", ")
            unknown = [k for k in keys if k not in node["properties"]]
            if unknown:
                return f"{where}: no key {unknown[0]!r} in the schema"
            if len(keys) > 1:
                return None if i == len(segments) - 1 else f"{where}: {segment}: a list of keys, not a path"
            node = node["properties"][segment]
        elif _named(node) is not None:
            node = _named(node)  # the segment is a name of the user's: a task, a head
        else:
            value = ": ".join(segments[i:])
            error = jsonschema.exceptions.best_match(
                jsonschema.Draft202012Validator(_with_defs(node)).iter_errors(yaml.safe_load(value)))
            return None if error is None else f"{where}: {value!r} is not a valid value ({error.message})"
    return None


def schema_leaves(node: dict[str, Any] = SCHEMA, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key path of the schema, a user's name as ``NAME``."""
    for key, sub in node.get("properties", {}).items():
        yield (*path, key)
        yield from schema_leaves(sub, (*path, key))
    if _named(node) is not None:
        yield from schema_leaves(_named(node), (*path, "NAME"))


def resolve(text: str, *, bare: bool = False) -> list[str] | None:
    """The key path a code span names, or None when it names no config key: a path from a
    top-level key (``tiling: jpeg_quality``, ``features.threads``, ``samples:``), or a key that
    only one place of the schema has, with its value (``jpeg_quality: 97``) or, with ``bare``,
    alone (``time_column``: a bare word is often another file's key, a task file's ``type``)."""
    if re.fullmatch(r"[a-z_]+(?:\.[a-z_]+)+", text):
        segments = text.split(".")
        return segments if segments[0] in SCHEMA["properties"] and _is_object(segments[0]) else None
    segments = text.removesuffix(":").split(": ")
    if not re.fullmatch(r"[a-z_]+", segments[0]):
        return None
    if segments[0] in SCHEMA["properties"]:
        return segments
    places = [p for p in schema_leaves() if p[-1] == segments[0]]
    if len(places) != 1 or (len(segments) == 1 and not bare):
        return None
    return [*places[0], *segments[1:]]


def _is_object(key: str) -> bool:
    node = SCHEMA["properties"][key]
    return "properties" in node or _named(node) is not None


def test_key_paths_are_checked_against_the_schema():
    assert resolve("tiling: jpeg_quality") == ["tiling", "jpeg_quality"]
    assert resolve("features.threads") == ["features", "threads"]
    assert resolve("jpeg_quality: 97") == ["tiling", "jpeg_quality", "97"]
    assert resolve("time_column", bare=True) == ["tasks", "NAME", "time_column"]
    assert resolve("time_column") is None and resolve("type") is None  # a bare word: maybe a task file's key
    assert resolve("threads") is None  # several places have it
    assert resolve("config: tilling: unknown key (did you mean 'tiling'?)") is None  # an error message
    assert resolve("wsitools.tiling") is None and resolve("gpu: 1") is None
    assert key_problem(["heads", "NAME", "bag", "patient"]) is None
    assert key_problem(["tiling", "codec, jpeg_quality"]) is None
    assert key_problem(["pretrain", "backbone"]) == "pretrain: no key 'backbone' in the schema"
    assert key_problem(["heads", "NAME", "bag", "bags"]) == (
        "heads: NAME: bag: 'bags' is not a valid value ('bags' is not one of ['slide', 'patient'])")
    assert key_problem(["export", "[clam, trident]"]) is None


def test_config_keys_in_the_docs_are_in_the_schema():
    problems = []
    for snippet in doc_snippets():
        if not snippet.fenced and (segments := resolve(snippet.text)) and (problem := key_problem(segments)):
            problems.append(f"{snippet.where}: `{snippet.text}`: {problem}")
    assert not problems, "\n".join(problems)


def test_config_blocks_in_the_docs_pass_the_schema():
    """A fenced YAML block with a top-level key of the workflow config is a config: it validates."""
    problems, checked = [], 0
    for doc in DOCS:
        for number, block in _yaml_blocks(doc.read_text()):
            config = yaml.safe_load(block)
            if isinstance(config, dict) and set(config) & set(SCHEMA["properties"]):
                checked += 1
                problems += [f"{doc.relative_to(REPO)}:{number}: {config_error(e)}"
                             for e in jsonschema.Draft202012Validator(SCHEMA).iter_errors(config)]
    assert checked >= 1
    assert not problems, "\n".join(problems)


def _yaml_blocks(text: str) -> Iterator[tuple[int, str]]:
    """Each fenced YAML block of a markdown text: the line of its fence and its text."""
    for match in re.finditer(r"^```ya?ml\n(.*?)^```", text, re.M | re.S):
        yield text.count("\n", 0, match.start()) + 1, match.group(1)


DEFAULTS = re.compile(r"`([^`]+)`(?:\s+and\s+`([^`]+)`)?,?\s+\(?defaults?:?\s+`([^`]+)`(?:\s+and\s+`([^`]+)`)?")


def schema_default(segments: list[str]) -> Any:
    node = SCHEMA
    for segment in segments:
        node = node["properties"][segment] if "properties" in node else _named(node)
    return node["default"]


def test_defaults_the_docs_quote_are_the_schemas():
    """``(`KEY`, default `VALUE`)`` and ``(`A` and `B`, defaults `a` and `b`)`` about config keys."""
    problems, checked = [], 0
    for doc in DOCS:
        text = doc.read_text()
        for match in DEFAULTS.finditer(text):
            where = f"{doc.relative_to(REPO)}:{text.count(chr(10), 0, match.start()) + 1}"
            for key, value in [(match[1], match[3]), (match[2], match[4])]:
                key = key and " ".join(key.split())
                if key and value and (segments := resolve(key, bare=True)) and not key_problem(segments):
                    checked += 1
                    if yaml.safe_load(value) != schema_default(segments):
                        problems.append(f"{where}: `{key}`: default `{value}`, but the schema's is "
                                        f"{schema_default(segments)!r}")
    assert checked >= 5
    assert not problems, "\n".join(problems)


def config_yaml_entries() -> Iterator[tuple[int, str, str, str, str]]:
    """Each key line of config/config.yaml under ``tasks:`` and ``heads:``, commented-out examples
    included: (line, top-level key, key, value, its comment with the comment lines that continue
    it)."""
    lines = (REPO / "config" / "config.yaml").read_text().splitlines()
    top = ""
    for number, line in enumerate(lines, start=1):
        if match := re.match(r"([a-z_]+):", line):
            top = match[1]
        match = re.match(r"\s+#?\s*([a-z_]+): ([^#]+?)\s*(?:#(.*))?$", line)
        if top in ("tasks", "heads") and match:
            comment, column = match[3] or "", line.find("#", match.end(2))
            for following in lines[number:]:
                if column < 0 or not following.strip().startswith("#") or following.find("#") != column:
                    break
                comment += " " + following.strip().lstrip("#")
            yield number, top, match[1], match[2], comment


CONFIG_DEFAULT = re.compile(r"\(default(?::?\s+([^;)]+?))?\s*[;)]")


def test_example_config_shows_every_task_and_head_key_with_the_schemas_default():
    """config/config.yaml's tasks and heads are examples, not defaults (tests/test_workflow.py
    checks the other keys' values against the schema): each of their keys is there, set or as a
    commented-out example, and a default its comment states is the schema's."""
    entries = list(config_yaml_entries())
    shown = {(top, key) for _, top, key, _, _ in entries}
    missing = [f"{top}: NAME: {key}" for top in ("tasks", "heads")
               for key in _named(SCHEMA["properties"][top])["properties"] if (top, key) not in shown]
    assert not missing, "\n".join(missing)
    problems, checked = [], 0
    for number, top, key, value, comment in entries:
        for match in CONFIG_DEFAULT.finditer(comment):
            checked += 1
            stated, default = yaml.safe_load(match[1] or value), schema_default([top, "NAME", key])
            if stated != default:
                problems.append(f"config/config.yaml:{number}: {top}: {key}: default {stated!r}, the schema's {default!r}")
    assert checked >= 5
    assert not problems, "\n".join(problems)


# --- benchmark command lines --------------------------------------------------------------------


BENCHMARK = re.compile(r"(?<![\w/.-])python3? (benchmarks/\w+\.py)")


def benchmark_options(script: Path) -> set[str]:
    """The options a benchmark script's ``main`` adds to its parser, read with ``ast``."""
    tree = ast.parse(script.read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    return {arg.value for call in ast.walk(main) if isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute) and call.func.attr == "add_argument"
            for arg in call.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("-")} | {"--help"}


def test_benchmark_options_are_read_from_the_scripts():
    assert {"--slide", "--repeats", "--size", "--naive-sample"} <= benchmark_options(REPO / "benchmarks" / "bench_tiling.py")


def test_every_benchmark_command_line_in_the_docs_parses():
    problems, checked = [], 0
    for snippet in doc_snippets():
        for match in BENCHMARK.finditer(snippet.text):
            script = REPO / match[1]
            if not script.is_file():
                problems.append(f"{snippet.where}: {match[1]}: no such script")
                continue
            rest = snippet.text[match.end():]
            shown = OPTION.findall(rest[: COMMAND_END.search(rest).start()])
            checked += 1
            problems += [f"{snippet.where}: {match[1]}: no option {o}" for o in shown if o not in benchmark_options(script)]
    assert checked >= 20
    assert not problems, "\n".join(problems)
