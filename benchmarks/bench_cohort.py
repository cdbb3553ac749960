"""Cohort benchmark: N synthetic slides of scanner size through the Snakemake workflow.

Writes N slides with the package's streaming synthetic writer (Aperio-like SVS at 0.25 um/px,
40x, pyramid 1/4/16, JPEG q90 256 px tiles, one or two tissue sections each: ``make_cohort``),
then runs this checkout's workflow on them from one command, as a user would: tissue and tiles,
the QC table, features with one encoder (CPU), and, with ``--train``, one ABMIL head with 3-fold
cross-validation and its heatmaps. Every job's wall time, CPU time and peak memory are measured
by a stand-in for the ``wsitools`` command put first on the workflow's PATH (the workflow itself
is unchanged: its jobs all run ``wsitools ...``); disk per slide comes from the outputs. Prints per-stage figures, per slide
and per 1 000 tiles, and writes them to ``OUT/cohort_benchmark.json`` (docs/benchmarks.md
projects a 10 000-slide cohort from them).

    python benchmarks/bench_cohort.py [--slides 2] [--size 40000x30000] [--out DIR] [--cores N]
        [--encoder efficientnet-lite0-imagenet] [--train]

The slides are kept in ``OUT/cohort`` and reused by a later run with the same ``--out`` (delete
it for new ones); the workflow's outputs are made afresh every run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from wsitools.report import read_qc
from wsitools.samples import read_samples, snakemake_command, workflow_dir
from wsitools.io import available_cpus
from wsitools.synthetic import make_cohort

TASK = """name: planted
description: synthetic slide of IHC-stained tissue; does it carry a region of another texture
classes:
  negative: only DAB and haematoxylin stained tissue
  positive: a region of eosin-dominant, differently textured tissue
"""


def disk_bytes(path: Path) -> int:
    """Bytes a file or folder takes on disk (allocated blocks, as ``du`` counts them)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def write_config(work: Path, samples: Path, *, encoder: str, train: bool) -> None:
    """The workflow config: the package defaults, CPU, one encoder; no task unless ``train``."""
    config: dict[str, Any] = {
        "samples": str(samples),
        "device": "cpu",
        "features": {"encoders": [encoder]},
    }
    if train:
        config["tasks"] = {"planted": {"task_file": "config/task.yaml", "label_column": "label"}}
        config["heads"] = {"abmil": {"type": "abmil", "folds": 3, "threads": 1, "device": "cpu"}}
    (work / "config").mkdir(parents=True, exist_ok=True)
    (work / "config" / "config.yaml").write_text(json.dumps(config, indent=1) + "\n")  # JSON is YAML
    (work / "config" / "task.yaml").write_text(TASK)


MEASURE = """#!{python}
# Stands in for the wsitools command on the benchmark's PATH: runs the real one and appends its
# wall time, CPU time (its whole process tree) and peak resident memory (its largest process).
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call([{real!r}, *sys.argv[1:]])
wall = time.perf_counter() - t
u = resource.getrusage(resource.RUSAGE_CHILDREN)
with open({log!r}, "a") as f:
    f.write(json.dumps({{"command": sys.argv[1:], "wall_s": wall, "cpu_s": u.ru_utime + u.ru_stime,
                        "max_rss_mb": u.ru_maxrss / 1024, "rc": rc}}) + "\\n")
sys.exit(rc)
"""


def measuring_path(work: Path) -> tuple[str, Path]:
    """A PATH whose ``wsitools`` is a measuring stand-in for the real command, and its log.

    Every job of the workflow runs ``wsitools ...``; the stand-in times each call exactly (its
    CPU time and peak memory from the kernel's accounting of the finished process tree), where
    Snakemake's own ``benchmark:`` records sample a running job every 30 s and miss short jobs.
    """
    real = shutil.which("wsitools")
    if real is None:
        sys.exit("the wsitools command is not on PATH (pip install -e . in the checkout)")
    bin_dir, log = work / "measure_bin", work / "jobs.jsonl"
    bin_dir.mkdir(parents=True, exist_ok=True)
    stand_in = bin_dir / "wsitools"
    stand_in.write_text(MEASURE.format(python=sys.executable, real=real, log=str(log)))
    stand_in.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", log


def job_records(log: Path) -> dict[str, list[dict[str, Any]]]:
    """The measured jobs by wsitools subcommand (tile, extract, train, ...)."""
    jobs: dict[str, list[dict[str, Any]]] = {}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        jobs.setdefault(record["command"][0], []).append(record)
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=2,
                    help="slides in the cohort (default 2: about 10 minutes of workflow on a shared 2-core machine)")
    ap.add_argument("--size", default="40000x30000", help="level-0 WIDTHxHEIGHT of each slide (0.25 um/px)")
    ap.add_argument("--out", type=Path, default=None, help="working folder (default: a new temporary one)")
    ap.add_argument("--cores", type=int, default=None,
                    help="cores Snakemake may use (default: all this process may use)")
    ap.add_argument("--encoder", default="efficientnet-lite0-imagenet", help="encoder card of the features")
    ap.add_argument("--train", action="store_true",
                    help="also train an ABMIL head (3-fold CV) and draw its heatmaps (needs at least 12 slides)")
    args = ap.parse_args()
    if args.train and args.slides < 12:
        ap.error("--train needs at least 12 slides (3 folds, each with training, validation and test "
                 "patients of both classes)")
    width, height = (int(v) for v in args.size.lower().split("x"))
    out = (args.out or Path(tempfile.mkdtemp(prefix="bench_cohort_"))).resolve()
    cores = args.cores or available_cpus()

    slides_dir = out / "cohort"
    samples = slides_dir / "samples.tsv"
    if samples.is_file() and len(read_samples(samples)) == args.slides:
        print(f"reusing the {args.slides} slides in {slides_dir}")
        write_s = float("nan")
    else:
        shutil.rmtree(slides_dir, ignore_errors=True)
        t = time.perf_counter()
        make_cohort(slides_dir, n_slides=args.slides, size=(width, height), mpp=0.25, seed=0)
        write_s = time.perf_counter() - t
        print(f"wrote {args.slides} slides of {width} x {height} px in {write_s:.0f} s")

    work = out / "run"
    shutil.rmtree(work, ignore_errors=True)
    write_config(work, samples, encoder=args.encoder, train=args.train)
    profile = workflow_dir().parent / "config" / "profiles" / "local"
    cmd = snakemake_command(work, "--profile", str(profile), "--cores", str(cores), "--quiet", "all")
    path, log = measuring_path(work)
    env = {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print("running:", " ".join(cmd))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    result = subprocess.run(cmd, env=env, check=False)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode:
        sys.exit(f"the workflow failed (exit {result.returncode}); job logs are in {work / 'logs'}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    tiles_dir, features_dir = work / "results" / "tiles", work / "results" / "features" / args.encoder
    slides = []
    for s in read_samples(samples):
        qc = read_qc(tiles_dir / f"{s.slide_id}.qc.json")
        slides.append({
            "slide_id": s.slide_id, "status": qc["status"], "n_tiles": int(qc.get("n_tiles") or 0),
            "slide_mb": disk_bytes(Path(s.path)) / 1e6,
            "store_mb": disk_bytes(tiles_dir / f"{s.slide_id}.zarr") / 1e6,
            "qc_files_mb": sum(disk_bytes(p) for p in tiles_dir.glob(f"{s.slide_id}.*") if p.suffix != ".zarr") / 1e6,
            "features_mb": disk_bytes(features_dir / f"{s.slide_id}.h5") / 1e6,
        })
    n_tiles = sum(s["n_tiles"] for s in slides)
    jobs = job_records(log)
    stages = {}
    for rule, records in jobs.items():
        wall_s = sum(r["wall_s"] for r in records)
        cpu_s = sum(r["cpu_s"] for r in records)
        stages[rule] = {
            "jobs": len(records), "wall_s": wall_s, "cpu_s": cpu_s,
            "max_rss_mb": max(r["max_rss_mb"] for r in records),
            "wall_s_per_1000_tiles": wall_s / n_tiles * 1000 if n_tiles else None,
            "cpu_s_per_1000_tiles": cpu_s / n_tiles * 1000 if n_tiles else None,
        }
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {available_cpus()} CPUs, load average "
                   f"{os.getloadavg()[0]:.1f} at the end",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": " ".join(["python", "benchmarks/bench_cohort.py", *sys.argv[1:]]),
        "slides": args.slides, "size": [width, height], "cores": cores, "encoder": args.encoder,
        "write_slides_s": write_s, "workflow_wall_s": wall, "workflow_cpu_s": cpu,
        "n_tiles": n_tiles, "stages": stages, "per_slide": slides, "jobs": jobs,
    }
    (out / "cohort_benchmark.json").write_text(json.dumps(summary, indent=1) + "\n")

    print(f"\n{args.slides} slides of {width} x {height} px, {n_tiles} tiles; workflow {wall:.0f} s wall, "
          f"{cpu:.0f} s CPU on {cores} cores (Snakemake itself included)")
    print(f"  {'wsitools step':16s} {'jobs':>4s} {'wall s':>8s} {'CPU s':>8s} {'peak RSS MB':>11s} "
          f"{'wall s/1k tiles':>15s} {'CPU s/1k tiles':>14s}")
    for rule, st in stages.items():
        per = (f"{st['wall_s_per_1000_tiles']:15.1f} {st['cpu_s_per_1000_tiles']:14.1f}"
               if n_tiles else "")
        print(f"  {rule:16s} {st['jobs']:4d} {st['wall_s']:8.1f} {st['cpu_s']:8.1f} {st['max_rss_mb']:11.0f} {per}")
    print(f"  {'slide':12s} {'status':9s} {'tiles':>6s} {'slide MB':>9s} {'store MB':>9s} {'QC files MB':>11s} "
          f"{'features MB':>11s}")
    for s in slides:
        print(f"  {s['slide_id']:12s} {s['status']:9s} {s['n_tiles']:6d} {s['slide_mb']:9.1f} {s['store_mb']:9.1f} "
              f"{s['qc_files_mb']:11.2f} {s['features_mb']:11.2f}")
    print(f"written: {out / 'cohort_benchmark.json'}")


if __name__ == "__main__":
    main()
