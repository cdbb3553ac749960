"""The Python the docs show is the package's: every ```python block of README.md and docs/*.md
parses, what it imports exists, and each call of an imported function or class binds to that
callable's signature (keyword names that exist, options given by keyword where they are
keyword-only, no missing input). A block that needs no data runs as written in a fresh
interpreter, where nothing else has imported the package's modules first.

Blocks are read with ``ast``; only their imports run here, so blocks that need slides, stores or
weights are checked without them.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOCS = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


@dataclass(frozen=True)
class PythonBlock:
    """One fenced Python block of a doc: where it starts (``docs/x.md:LINE``) and its code."""

    where: str
    code: str


def python_blocks(text: str, name: str) -> list[PythonBlock]:
    """The ```python blocks of a markdown text, each named by its file and first code line."""
    return [
        PythonBlock(f"{name}:{text.count(chr(10), 0, m.start(1)) + 1}", m.group(1))
        for m in PYTHON_BLOCK.finditer(text)
    ]


def doc_python_blocks() -> list[PythonBlock]:
    return [b for doc in DOCS for b in python_blocks(doc.read_text(), doc.relative_to(REPO).as_posix())]


def imported_names(tree: ast.Module) -> dict[str, Any]:
    """What the block's import statements bind, imported for real (an ImportError propagates)."""
    names: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                module = importlib.import_module(alias.name)
                top = alias.name.split(".")[0]
                names[alias.asname or top] = module if alias.asname else importlib.import_module(top)
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    raise ImportError(f"cannot import name {alias.name!r} from {node.module!r}")
                names[alias.asname or alias.name] = getattr(module, alias.name)
    return names


class _Unknown(Exception):
    """The expression is not an imported name (a local variable, a call's result)."""


def resolve(node: ast.expr, names: dict[str, Any]) -> Any:
    """The object an imported dotted name refers to; :class:`_Unknown` for anything else."""
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.Attribute):
        owner = resolve(node.value, names)
        if not hasattr(owner, node.attr):
            kind = "module" if isinstance(owner, ModuleType) else type(owner).__name__
            raise AttributeError(f"{ast.unparse(node.value)} ({kind}) has no attribute {node.attr!r}")
        return getattr(owner, node.attr)
    raise _Unknown


def block_problems(block: PythonBlock) -> list[str]:
    """Why a block does not match the code, one line each naming the block and the call."""
    try:
        tree = ast.parse(block.code)
    except SyntaxError as exc:
        return [f"{block.where}: not valid Python: {exc.msg} (block line {exc.lineno})"]
    try:
        names = imported_names(tree)
    except ImportError as exc:
        return [f"{block.where}: {exc}"]
    problems = []
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        where = f"{block.where} (block line {call.lineno}): {ast.unparse(call.func)}(...)"
        try:
            target = resolve(call.func, names)
        except _Unknown:
            continue
        except AttributeError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
            continue
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):  # a builtin without a signature
            continue
        try:
            signature.bind(*(object() for _ in call.args), **{k.arg: object() for k in call.keywords if k.arg})
        except TypeError as exc:
            problems.append(f"{where}: {exc}; the signature is {signature}")
    return problems


def test_blocks_are_read_with_their_file_and_line():
    text = "# T\n\nprose\n\n```python\nimport os\nos.getcwd()\n```\n\n```bash\nls\n```\n"
    assert python_blocks(text, "docs/t.md") == [PythonBlock("docs/t.md:6", "import os\nos.getcwd()\n")]


def test_a_block_that_does_not_match_the_code_is_named_with_the_mismatch():
    block = PythonBlock(
        "docs/x.md:3",
        "from wsitools.mil.predict import predict\nfrom wsitools.mil.train import train\n"
        "predict('m', 'f', 'o', device='cpu', folds=3)\ntrain('f', 'l', 'o')\n",
    )
    problems = block_problems(block)
    assert len(problems) == 2
    assert problems[0].startswith("docs/x.md:3 (block line 3): predict(...): ")
    assert "'folds'" in problems[0]
    assert problems[1].startswith("docs/x.md:3 (block line 4): train(...): ")
    assert "positional" in problems[1]
    assert block_problems(PythonBlock("d.md:1", "from wsitools.features import extract_featurez\n")) == [
        "d.md:1: cannot import name 'extract_featurez' from 'wsitools.features'"
    ]
    assert block_problems(PythonBlock("d.md:1", "import wsitools.text\nwsitools.text.embed_text([])\n")) == [
        "d.md:1 (block line 2): wsitools.text.embed_text(...): wsitools.text (module) has no attribute 'embed_text'"
    ]
    assert block_problems(PythonBlock("d.md:1", "x = (\n")) == ["d.md:1: not valid Python: '(' was never closed (block line 1)"]


def test_every_python_block_of_the_docs_matches_the_code():
    blocks = doc_python_blocks()
    # the blocks of the encoder, MIL, PathoTune and PuzzleTuning docs are all found
    assert {b.where.split(":")[0] for b in blocks} >= {
        "docs/encoders.md", "docs/mil.md", "docs/pathotune.md", "docs/puzzletuning.md", "docs/architecture.md"
    }
    assert [p for b in blocks for p in block_problems(b)] == []


def test_the_prompted_vit_block_runs_as_written_in_a_fresh_interpreter():
    # The block registers the prompted ViTs by its import alone; it is run with the tiny
    # registered twin of its ViT-B so that it takes seconds.
    (block,) = [b for b in doc_python_blocks() if "timm.create_model" in b.code]
    code = block.code.replace("prompted_vit_base_patch16_224", "prompted_vit_test_patch16_224")
    assert code != block.code
    code += "print(tuple(m.prompt_tokens.shape), float(m.prompt_tokens.abs().sum()))\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert run.returncode == 0, f"{block.where}: {run.stderr.strip().splitlines()[-1:]}"
    # deep prompts [depth, T, D] of the tiny ViT (3 blocks, width 64), zero-initialised
    assert run.stdout.split("\n")[-2] == "(3, 20, 64) 0.0"
