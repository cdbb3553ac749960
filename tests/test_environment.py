"""environment.yml and pyproject.toml must name the same dependencies (conda cannot be solved here)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# PyPI name -> conda-forge name, where they differ.
CONDA_NAMES = {"torch": "pytorch", "openslide-bin": "openslide"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda, pip = set(), set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip |= {_name(r) for r in dep["pip"]}
        else:
            conda.add(_name(dep))
    conda -= {"python", "pip"}
    assert not conda & pip, "a package is listed twice"
    have = {next((k for k, v in CONDA_NAMES.items() if v == n), n) for n in conda} | pip
    assert have == wanted, f"only in pyproject: {wanted - have}; only in environment.yml: {have - wanted}"


def test_versions_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {_name(r): r.strip()[len(_name(r)):] for r in project["dependencies"]}
    env_text = (ROOT / "environment.yml").read_text()
    for name, pin in pins.items():
        conda_name = CONDA_NAMES.get(name, name)
        if pin and name != "openslide-bin":
            assert re.search(rf"- {re.escape(conda_name)}{re.escape(pin)}\b", env_text), (name, pin)
