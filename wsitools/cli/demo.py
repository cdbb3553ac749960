"""``wsitools demo``: the whole workflow end to end on a synthetic cohort, on CPU.

Makes a dozen small synthetic slides (half carry a planted region of another tissue texture),
writes the demo configuration, runs the Snakemake workflow of this checkout (tissue, tiles,
efficientnet-lite0 features, a PathoTune head with 3-fold cross-validation, heatmaps), renders
the HTML report and prints where it is. A second run reuses everything already made.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from wsitools.report import qc_report
from wsitools.samples import snakemake_command, workflow_dir
from wsitools.tables import read_table
from wsitools.cli.options import non_negative_int, positive_int
from wsitools.errors import WsiToolsError
from wsitools.io import available_cpus


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole workflow on a synthetic cohort (CPU, a few minutes)",
        description=__doc__,
    )
    p.add_argument("--out", default="demo_run", metavar="DIR",
                   help="working directory of the demo run (default: demo_run)")
    p.add_argument("--slides", type=positive_int, default=12, metavar="N",
                   help="slides in the synthetic cohort (default 12; even, at least 12)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the synthetic cohort (default 0)")
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


def prepare(out: Path, *, n_slides: int, seed: int) -> None:
    """Write the synthetic cohort (unless ``out`` has one) and the demo's config into ``out``."""
    from wsitools.synthetic import make_cohort

    if n_slides < 12 or n_slides % 2:
        raise WsiToolsError(
            f"--slides {n_slides}: give an even number, at least 12 (two slides per patient; 3 folds "
            "need 3 patients of each class)"
        )
    sheet = out / "samples.tsv"
    if sheet.is_file():
        print(f"reusing the synthetic cohort in {out} (delete {sheet} for a new one)")
    else:
        print(f"making a synthetic cohort of {n_slides} slides in {out / 'slides'}")
        make_cohort(out, n_slides=n_slides, seed=seed)
    templates = workflow_dir().parent / "config" / "demo"
    _copy_if_changed(templates / "config.yaml", out / "config" / "config.yaml")
    _copy_if_changed(templates / "task.yaml", out / "config" / "task.yaml")


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
