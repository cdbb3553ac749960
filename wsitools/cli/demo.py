"""``wsitools demo``: the whole workflow end to end on a synthetic cohort, on CPU.

Makes a dozen small synthetic slides (half carry a planted region of another tissue texture),
writes the demo configuration, runs the Snakemake workflow of this checkout (tissue, tiles,
efficientnet-lite0 features, a PathoTune head with 3-fold cross-validation, heatmaps), renders
the HTML report and prints where it is. A second run reuses everything already made.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from wsitools.report import qc_report
from wsitools.samples import snakemake_command, workflow_dir
from wsitools.tables import read_table
from wsitools.cli.options import non_negative_int, positive_int
from wsitools.errors import ConfigError, WsiToolsError
from wsitools.io import available_cpus, write_json_atomic


DEFAULT_SLIDES = 12
DEFAULT_SEED = 0
COHORT_RECORD = "demo_cohort.json"
"""Beside the demo's samples.tsv: the slide count and seed the cohort was made with."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole workflow on a synthetic cohort (CPU, a few minutes)",
        description=__doc__,
    )
    p.add_argument("--out", default="demo_run", metavar="DIR",
                   help="working directory of the demo run (default: demo_run)")
    p.add_argument("--slides", type=positive_int, default=None, metavar="N",
                   help=f"slides of a new synthetic cohort (default {DEFAULT_SLIDES}; even, at least 12); a cohort "
                   "already in --out is reused, and one of another size is refused")
    p.add_argument("--seed", type=non_negative_int, default=None,
                   help=f"seed of a new synthetic cohort (default {DEFAULT_SEED}); a cohort already in --out made "
                   "with another seed is refused")
    p.add_argument("--cores", type=positive_int, default=None, metavar="N",
                   help="cores Snakemake may use (default: the CPUs this process may use)")
    p.add_argument("--quiet", action="store_true", help="only Snakemake's errors and the summary")
    p.set_defaults(func=run)


def _copy_if_changed(src: Path, dst: Path) -> None:
    """Copy a template, leaving an identical file untouched (its age decides what reruns)."""
    if dst.is_file() and dst.read_bytes() == src.read_bytes():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def prepare(out: Path, *, n_slides: int | None = None, seed: int | None = None) -> None:
    """Write the synthetic cohort (unless ``out`` has one) and the demo's config into ``out``.

    ``n_slides`` and ``seed`` (None: 12 and 0) make a new cohort. An existing cohort is reused
    as it is, so a second run redoes nothing; a slide count or seed given that differs from
    the existing cohort's is refused with one line, since the run would otherwise report on
    another cohort than the one asked for."""
    from wsitools.synthetic import make_cohort

    if n_slides is not None and (n_slides < 12 or n_slides % 2):
        raise ConfigError(
            f"--slides {n_slides}: give an even number, at least 12 (two slides per patient; 3 folds "
            "need 3 patients of each class)"
        )
    sheet = out / "samples.tsv"
    if sheet.is_file():
        made = _existing_cohort(out)
        _check_reuse(out, made, n_slides=n_slides, seed=seed)
        seed_note = f", seed {made['seed']}" if made["seed"] is not None else ""
        print(f"reusing the synthetic cohort of {made['slides']} slides{seed_note} in {out} "
              f"(delete {sheet} for a new one)")
    else:
        n_slides = DEFAULT_SLIDES if n_slides is None else n_slides
        seed = DEFAULT_SEED if seed is None else seed
        print(f"making a synthetic cohort of {n_slides} slides (seed {seed}) in {out / 'slides'}")
        # the record first: a run cut off before samples.tsv is written makes the cohort again
        write_json_atomic(out / COHORT_RECORD, {"slides": n_slides, "seed": seed})
        make_cohort(out, n_slides=n_slides, seed=seed)
    templates = workflow_dir().parent / "config" / "demo"
    _copy_if_changed(templates / "config.yaml", out / "config" / "config.yaml")
    _copy_if_changed(templates / "task.yaml", out / "config" / "task.yaml")


def _existing_cohort(out: Path) -> dict[str, int | None]:
    """The slide count (rows of samples.tsv) and seed (from the cohort's record; None for a
    cohort made before the record was kept, or a record that cannot be read) of the cohort in
    ``out``."""
    slides = len(read_table(out / "samples.tsv"))
    try:
        seed = json.loads((out / COHORT_RECORD).read_text()).get("seed")
    except (OSError, ValueError, AttributeError):
        seed = None
    return {"slides": slides, "seed": seed if isinstance(seed, int) else None}


def _check_reuse(out: Path, made: dict[str, int | None], *, n_slides: int | None, seed: int | None) -> None:
    """Refuse a ``--slides`` or ``--seed`` that differs from the cohort already in ``out``, and a
    ``--seed`` where the cohort's was not recorded (a cohort of an earlier version)."""
    if seed is not None and made["seed"] is None:
        raise ConfigError(
            f"{out} holds a synthetic cohort whose seed was not recorded (made by an earlier version): leave "
            f"--seed out to reuse it, or delete {out / 'samples.tsv'} for a new cohort there"
        )
    asked = {"slides": n_slides, "seed": seed}
    differs = [k for k, v in asked.items() if v is not None and made[k] is not None and v != made[k]]
    if differs:
        has = f"{made['slides']} slides" + (f" (seed {made['seed']})" if made["seed"] is not None else "")
        given = " ".join(f"--{k} {asked[k]}" for k in differs)
        raise ConfigError(
            f"{out} holds a synthetic cohort of {has}, not the one {given} asks for: give another --out, "
            f"or delete {out / 'samples.tsv'} for a new cohort there"
        )


def _snakemake(out: Path, *args: str, quiet: bool) -> None:
    cmd = snakemake_command(out, *args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        cmd, env=env, stdout=subprocess.DEVNULL if quiet else None, stderr=None, check=False
    )
    if result.returncode:
        raise WsiToolsError(
            f"the workflow failed (exit {result.returncode}); job logs are in {out / 'logs'}"
        )


def _metrics_lines(table: Path) -> list[str]:
    """One line per trained head: pooled cross-validated AUROC with its interval, and more."""
    lines = []
    for r in read_table(table):
        lines.append(
            f"  {r['task']} / {r['encoder']} / {r['head']}: AUROC {r['auroc']} "
            f"(95% CI {r['auroc_lo']}-{r['auroc_hi']}), balanced accuracy {r['balanced_accuracy']}, "
            f"F1 {r['f1']} ({r['n_slides']} slides, out-of-fold)"
        )
    return lines


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    prepare(out, n_slides=args.slides, seed=args.seed)
    profile = workflow_dir().parent / "config" / "profiles" / "local"
    cores = str(args.cores or available_cpus())
    quiet = "all" if args.quiet else "rules"  # progress lines only, unless --quiet
    _snakemake(out, "--profile", str(profile), "--cores", cores, "--quiet", quiet, quiet=args.quiet)
    report = out / "report.html"
    _snakemake(out, "--report", str(report), "--quiet", "all", quiet=args.quiet)
    results = out / "results"
    print()
    print(qc_report(results / "qc" / "summary.tsv"))
    print(f"metrics ({results / 'report' / 'metrics.tsv'}):")
    print("\n".join(_metrics_lines(results / "report" / "metrics.tsv")))
    print(f"heatmaps: {results / 'heatmaps'}")
    print(f"report: {report}")
    sys.stdout.flush()
    return 0
