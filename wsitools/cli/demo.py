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
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from wsitools.report import qc_report
from wsitools.samples import snakemake_command, workflow_dir
from wsitools.tables import read_table
from wsitools.cli import Stopped
from wsitools.cli.options import non_negative_int, positive_int
from wsitools.errors import ConfigError, WsiToolsError
from wsitools.io import available_cpus, check_own_folder, write_json_atomic


DEFAULT_SLIDES = 12
DEFAULT_SEED = 0
COHORT_RECORD = "demo_cohort.json"
"""Beside the demo's samples.tsv: the slide count and seed the cohort was made with. Written
first into a new --out, it also marks the folder as the demo's own (:func:`prepare`)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole workflow on a synthetic cohort (CPU, a few minutes)",
        description=__doc__,
    )
    p.add_argument("--out", default="demo_run", metavar="DIR",
                   help="working directory of the demo run: missing, empty or one an earlier demo made "
                   "(default: demo_run)")
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

    ``out`` must be missing, empty or the demo's own folder (it holds :data:`COHORT_RECORD`):
    the demo replaces ``config/config.yaml`` and ``config/task.yaml`` and runs the workflow
    there, so another folder (a project of one's own, a checkout) is refused with one line
    before anything is written. ``n_slides`` and ``seed`` (None: 12 and 0) make a new cohort.
    An existing cohort is reused as it is, so a second run redoes nothing; a slide count or
    seed given that differs from the existing cohort's is refused with one line, since the run
    would otherwise report on another cohort than the one asked for. Without the workflow (an
    install that is not editable) nothing is written either: the cohort could not be used."""
    from wsitools.synthetic import make_cohort

    templates = workflow_dir().parent / "config" / "demo"
    check_own_folder(out, foreign=_not_the_demos,
                     writes="the demo writes a synthetic cohort and its own config/ into --out")
    if n_slides is not None and (n_slides < 12 or n_slides % 2):
        raise ConfigError(
            f"--slides {n_slides}: give an even number, at least 12 (two slides per patient; 3 folds "
            "need 3 patients of each class)"
        )
    sheet = out / "samples.tsv"
    if sheet.is_file():
        made = _existing_cohort(out)
        _check_reuse(out, made, n_slides=n_slides, seed=seed)
        print(f"reusing the synthetic cohort of {made['slides']} slides, seed {made['seed']} in {out} "
              f"(delete {sheet} for a new one)")
    else:
        n_slides = DEFAULT_SLIDES if n_slides is None else n_slides
        seed = DEFAULT_SEED if seed is None else seed
        print(f"making a synthetic cohort of {n_slides} slides (seed {seed}) in {out / 'slides'}")
        # the record first: a run cut off before samples.tsv is written makes the cohort again
        write_json_atomic(out / COHORT_RECORD, {"slides": n_slides, "seed": seed})
        make_cohort(out, n_slides=n_slides, seed=seed)
    _copy_if_changed(templates / "config.yaml", out / "config" / "config.yaml")
    _copy_if_changed(templates / "task.yaml", out / "config" / "task.yaml")


def _not_the_demos(out: Path) -> str | None:
    """Why the non-empty folder ``out`` is not the demo's own (None when it is): it lacks the
    cohort record the demo writes into a new folder first."""
    if (out / COHORT_RECORD).is_file():
        return None
    return f"is not a folder the demo made (it has no {COHORT_RECORD}, which the demo writes first)"


def _existing_cohort(out: Path) -> dict[str, int]:
    """The slide count (rows of samples.tsv) and seed (from the cohort's record) of the cohort
    in ``out``; a :class:`ConfigError` naming the record when it holds no seed."""
    slides = len(read_table(out / "samples.tsv"))
    record = out / COHORT_RECORD
    try:
        seed = json.loads(record.read_text()).get("seed")
    except (OSError, ValueError, AttributeError):
        seed = None
    if not isinstance(seed, int):
        raise ConfigError(f"{record}: holds no seed of the cohort beside it; delete {out} for a new demo there")
    return {"slides": slides, "seed": seed}


def _check_reuse(out: Path, made: dict[str, int], *, n_slides: int | None, seed: int | None) -> None:
    """Refuse a ``--slides`` or ``--seed`` that differs from the cohort already in ``out``."""
    asked = {"slides": n_slides, "seed": seed}
    differs = [k for k, v in asked.items() if v is not None and v != made[k]]
    if differs:
        given = " ".join(f"--{k} {asked[k]}" for k in differs)
        raise ConfigError(
            f"{out} holds a synthetic cohort of {made['slides']} slides (seed {made['seed']}), not the one {given} "
            f"asks for: give another --out, or delete {out / 'samples.tsv'} for a new cohort there"
        )


def _snakemake(out: Path, *args: str, quiet: bool) -> None:
    cmd = snakemake_command(out, *args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    returncode = _run_until_stopped(cmd, env=env, quiet=quiet)
    if returncode:
        locks = out / ".snakemake" / "locks"
        hint = (
            f"; if it says {out} cannot be locked and no other run uses it, `{shlex.join(snakemake_command(out, '--unlock'))}` "
            "removes the lock a killed run left" if locks.is_dir() and any(locks.iterdir()) else ""
        )
        raise WsiToolsError(f"the workflow failed (exit {returncode}); job logs are in {out / 'logs'}{hint}")


def _run_until_stopped(cmd: list[str], *, env: dict[str, str], quiet: bool) -> int:
    """Run Snakemake's ``cmd`` in a session of its own and return its exit status. Ctrl-C or a
    SIGTERM to this command is passed on to it once (SIGINT or SIGTERM) and it is waited for, so
    it stops its jobs and releases its lock on the folder, and the demo run again finishes the
    work; killed at once, it would leave the lock behind and the next run would stop on it."""
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL if quiet else None, start_new_session=True)
    try:
        return process.wait()
    except BaseException as exc:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM if isinstance(exc, Stopped) else signal.SIGINT)
            process.wait()
        raise


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
