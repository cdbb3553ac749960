"""environment.yml and pyproject.toml must name the same dependencies (conda cannot be solved here),
with floors the code works with, and the package data they ship must exist."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# PyPI name -> conda-forge name, where they differ.
CONDA_NAMES = {"torch": "pytorch", "openslide-bin": "openslide"}
# The lowest version of a dependency that the code (or the test suite) works with, and what older
# ones lack: a floor below it installs, and pip keeps an older version already there.
NEEDED = {
    "tiffslide": ("3.0", "zarr 3 (2.x imports zarr 2's BaseStore: no SVS or TIFF opens)"),
    "tifffile": ("2025.5.21", "what tiffslide 3.0 needs"),
    "openslide-python": ("1.4", "finds the library of the openslide-bin wheel"),
    "zarr": ("3.1.2", "zarr.errors.UnstableSpecificationWarning (wsitools.store, JPEG tiles)"),
    "numpy": ("1.26", "what zarr 3.1 needs"),
    "numcodecs": ("0.14", "what zarr 3.1 needs"),
    "imagecodecs": ("2023.3.16", "the first with wheels for Python 3.11"),
    "scikit-image": ("0.26", "remove_small_objects and remove_small_holes with max_size= (wsitools.tissue)"),
    "snakemake": ("9.20", "the SLURM profile's slurm_partition and its runtime in minutes (older: <TBD>, "
                  "or 2880 read as 48), and the report API the tests use"),
    "timm": ("1.0.21", "ViTs built on the meta device (the cheap load-time check of a card, else a real forward; "
             "the tests build foundation models there)"),
    "jsonschema": ("4.21", "'should be non-empty' for an empty list or text in a config (older: 'is too short')"),
}


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


def test_floors_are_versions_the_code_works_with():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {_name(r): re.search(r">=\s*([\w.]+)", r).group(1) for r in project["dependencies"] if ">=" in r}
    for name, (version, why) in NEEDED.items():
        assert Version(floors[name]) >= Version(version), f"{name}>={floors[name]}: needs {version}: {why}"


def test_every_package_data_pattern_names_a_file():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in data["wsitools"]  # the code is annotated: type checkers read the installed package
    for package, patterns in data.items():
        folder = ROOT / package.replace(".", "/")
        for pattern in patterns:
            assert any(p.is_file() for p in folder.glob(pattern)), f"{package}: {pattern} matches no file"
