# Shared set-up of the workflow: config validation, the cohort, paths, input functions.
#
# Everything that is logic (reading and checking the samples sheet, QC tables, labels) lives in
# the package (wsitools.samples, wsitools.labels, wsitools.report); this file only wires it to
# Snakemake. Errors in the config or the samples sheet stop the run here, before any job is
# scheduled.

import os
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from wsitools.errors import WsiToolsError
from wsitools.labels import check_patient_labels, task_columns
from wsitools.report import qc_report
from wsitools.report import usable_slides as qc_usable_slides
from wsitools.samples import (
    check_encoders, check_extra_args, check_features_current, check_features_own, check_names_differ_in_case,
    check_pretrain_name, check_task_cohort, check_unique_keys, check_whole_numbers, config_error, heads_label_checks,
    load_samples, run_failure_line, slide_file_state,
)
from wsitools.tables import is_tile_table
from wsitools.text import load_task


# Snakemake's YAML reader keeps the last of a repeated key: refuse a config file with one (each
# file Snakemake read, from `configfile:` and --configfile) before any of its values is used.
for _configfile in workflow.configfiles:
    try:
        check_unique_keys(_configfile)
    except WsiToolsError as exc:
        raise WorkflowError(str(exc)) from None

try:
    validate(config, schema="../schemas/config.schema.yaml")
except WorkflowError as exc:
    # Snakemake's message holds the whole schema; say which key is wrong, in one line.
    if not hasattr(exc.__context__, "absolute_path"):  # not a jsonschema.ValidationError
        raise
    raise WorkflowError(config_error(exc.__context__)) from None
try:
    check_whole_numbers(config, Path(workflow.basedir) / "schemas" / "config.schema.yaml")
    check_names_differ_in_case(
        {"tasks": list(config["tasks"]), "heads": list(config["heads"]),
         "features: encoders": config["features"]["encoders"]}
    )
except WsiToolsError as exc:
    raise WorkflowError(str(exc)) from None

try:
    SAMPLES = {
        s.slide_id: s
        for s in load_samples(
            samples=config["samples"] if not config["slides_glob"] else None,
            slides_glob=config["slides_glob"] or None,
        )
    }
except WsiToolsError as exc:
    raise WorkflowError(str(exc)) from None

# The checkout this workflow belongs to: envs/wsitools.yaml installs the package from it.
os.environ.setdefault("WSITOOLS_SOURCE", str(Path(workflow.basedir).resolve().parent))
# Jobs run the `wsitools` command of the environment that runs Snakemake (and imported wsitools
# above), not whichever comes first on PATH: an environment used without activating it
# (`.venv/bin/python -m snakemake`, `make demo PYTHON=.venv/bin/python`) works as an activated one.
os.environ.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))

SLIDES = sorted(SAMPLES)
# Normalised ("./results/tiles/" -> "results/tiles"): Snakemake warns about every path starting with "./".
TILES = os.path.normpath(config["tiles_dir"])
FEATURES = os.path.normpath(config["features_dir"])
ENCODERS = config["features"]["encoders"]
TASKS = config["tasks"]
HEADS = config["heads"]
# Resources: a job's GPU is its need, computed from the config (none with `device: cpu`), so the
# rules declare it; memory, time limits and partitions belong to the site and live in the
# profiles (config/profiles/): the local profile's `resources: gpu` runs GPU jobs one at a time
# per GPU and CPU jobs beside them, and the SLURM profile, which cannot read the config, gives each
# rule its memory, runtime, partition and GPU.
GPU_JOB = 0 if config["device"] == "cpu" else 1  # GPUs asked for by a GPU-capable job

# Name of the encoder card PuzzleTuning exports (its file is the pretraining's declared output).
PUZZLE_CARD = config["pretrain"]["name"] or (
    f"{Path(config['pretrain']['encoder']).name.removesuffix('.yaml')}-puzzletuned"
)
PUZZLE_CARD_FILE = f"results/pretrain/puzzle/{PUZZLE_CARD}.yaml"

# Settings that the schema cannot check, checked before any job runs.
if config["tiling"]["overlap"] >= config["tiling"]["tile_size"]:
    raise WorkflowError(
        f"config: tiling: overlap: {config['tiling']['overlap']} must be smaller than tile_size "
        f"({config['tiling']['tile_size']})"
    )
if TASKS and config["slides_glob"]:
    raise WorkflowError(
        "config: tasks need labels, which come from a samples sheet ('samples'), not 'slides_glob'"
    )
if TASKS and not HEADS:
    raise WorkflowError("config: tasks are given but no heads to train for them ('heads')")
# Each head's folds, and whether every head trains with --allow-empty-classes (a class of the task
# file may then have no labelled slide).
HEAD_FOLDS, ALLOW_EMPTY_CLASSES = heads_label_checks(HEADS)
TASK_TYPES = {}  # task name -> classification, survival or regression (the task file's type)
TASK_COLUMNS = {}  # task name -> labels-table column -> samples-sheet column
for _name, _task in TASKS.items():
    _task_file = _task.get("task_file") or None
    try:
        TASK_TYPES[_name] = load_task(_task_file).type if _task_file else "classification"
    except WsiToolsError as exc:
        raise WorkflowError(f"config: task {_name!r}: {exc}") from None
    TASK_COLUMNS[_name] = task_columns(
        TASK_TYPES[_name], label_column=_task["label_column"], time_column=_task["time_column"],
        event_column=_task["event_column"],
    )
    for _table_column, _sheet_column in TASK_COLUMNS[_name].items():
        if not any(_sheet_column in s.fields for s in SAMPLES.values()):
            raise WorkflowError(
                f"config: task {_name!r}: the samples sheet {config['samples']} has no column "
                f"{_sheet_column!r} ({_table_column}_column)"
            )
    if any(h["bag"] == "patient" for h in HEADS.values()):
        try:
            check_patient_labels(
                list(SAMPLES.values()), task=_name, columns=TASK_COLUMNS[_name], sheet=config["samples"],
                heads=[head for head, h in HEADS.items() if h["bag"] == "patient"],
            )
        except WsiToolsError as exc:
            raise WorkflowError(str(exc)) from None
    try:
        check_task_cohort(
            list(SAMPLES.values()), task=_name, task_type=TASK_TYPES[_name], columns=TASK_COLUMNS[_name],
            task_file=_task_file, folds=HEAD_FOLDS, sheet=config["samples"], allow_empty_classes=ALLOW_EMPTY_CLASSES,
        )
    except WsiToolsError as exc:
        raise WorkflowError(str(exc)) from None
if config["tune"]["enabled"] and "ttp" in config["tune"]["prompts"] and not config["tune"]["task"]:
    raise WorkflowError("config: tune: the ttp prompt needs a task file ('tune: task:')")

# Every encoder card the config names must exist before any slide is tiled, with its weight files
# (else every slide's extraction job, or the pretraining or tuning job after tiling, would fail
# on them).
_ENCODER_KEYS = {f"features: encoders: {name}": name for name in ENCODERS}
if config["pretrain"]["enabled"]:
    _ENCODER_KEYS["pretrain: encoder"] = config["pretrain"]["encoder"]
if config["tune"]["enabled"]:
    _ENCODER_KEYS["tune: encoder"] = config["tune"]["encoder"]
    if config["tune"]["ivp_encoder"]:
        _ENCODER_KEYS["tune: ivp_encoder"] = config["tune"]["ivp_encoder"]
try:
    check_encoders(_ENCODER_KEYS, models_dir=config["models_dir"])
    # The name of the card pretraining will export; once exported, its card may be copied into
    # the models folder to extract with (docs/cluster.md), where the name is then taken.
    if config["pretrain"]["enabled"] and not Path(PUZZLE_CARD_FILE).is_file():
        check_pretrain_name(
            PUZZLE_CARD, given=bool(config["pretrain"]["name"]), encoder=config["pretrain"]["encoder"],
            models_dir=config["models_dir"],
        )
    # About the run as a whole, so once, not in every cluster job (they hash weight files):
    # features are extracted once per slide, so ones made by an earlier version of a card would
    # stay, and a features folder outside the project may hold another project's.
    if getattr(workflow, "is_main_process", True):
        check_features_current(FEATURES, ENCODERS, models_dir=config["models_dir"])
        if not Path(FEATURES).resolve().is_relative_to(Path.cwd().resolve()):
            check_features_own(FEATURES, ENCODERS, {s: f"{TILES}/{s}.zarr" for s in SAMPLES})
except WsiToolsError as exc:
    raise WorkflowError(str(exc)) from None


def workflow_options(head=""):
    """The options the workflow gives each `wsitools` command that takes `extra_args` (by
    command), with where each value comes from: `extra_args` may not give them again (the last
    would win). ``head``: the head whose train job it is."""
    out = "the job's output"
    return {
        "tile": {
            "--out": "tiles_dir", "--slide-id": "the samples sheet", "--mpp": "tiling: mpp",
            "--magnification": "tiling: mpp", "--tile-size": "tiling: tile_size", "--overlap": "tiling: overlap",
            "--min-tissue": "tiling: min_tissue", "--backend": "tiling: backend", "--codec": "tiling: codec",
            "--jpeg-quality": "tiling: jpeg_quality", "--no-pixels": "tiling: store_pixels",
            "--mpp-override": "the samples sheet's mpp", "--workers": "tiling: threads",
        },
        "extract": {
            "--encoder": "features: encoders", "--out": "features_dir", "--device": "device",
            "--precision": "features: precision", "--dtype": "features: dtype",
            "--batch-size": "features: batch_size", "--workers": "features: threads", "--models-dir": "models_dir",
        },
        "train": {
            "--features": "features_dir", "--labels": "the task's labels table", "--task": "tasks: TASK: task_file",
            "--head": f"heads: {head}: type", "--bag": f"heads: {head}: bag", "--folds": f"heads: {head}: folds",
            "--prompts": f"heads: {head}: prompts", "--device": f"heads: {head}: device",
            "--threads": f"heads: {head}: threads", "--out": out,
        },
        "heatmap": {
            "--attention": "the head's attention", "--store": "tiles_dir", "--scale": "heatmaps: scale",
            "--cmap": "heatmaps: cmap", "--out": out,
        },
        "pretrain puzzle": {
            "--stores": "the usable slides", "--out": out, "--encoder": "pretrain: encoder",
            "--name": "pretrain: name", "--epochs": "pretrain: epochs", "--batch-size": "pretrain: batch_size",
            "--device": "device", "--models-dir": "models_dir", "--workers": "pretrain: threads",
        },
        "tune pathotune": {
            "--data": "tune: data", "--task": "tune: task", "--stores": "the usable slides", "--out": out,
            "--encoder": "tune: encoder", "--ivp-encoder": "tune: ivp_encoder", "--prompts": "tune: prompts",
            "--device": "device", "--models-dir": "models_dir", "--workers": "tune: threads",
        },
    }


# Every step's `extra_args` are parsed by its command's own parser before any job runs: a misspelt
# option would otherwise fail every job of the step, one by one, after tiling.
_EXTRA_ARGS = [  # (config key, command, its options, the head of a train job)
    ("tiling: extra_args", "tile", config["tiling"]["extra_args"], ""),
    ("features: extra_args", "extract", config["features"]["extra_args"], ""),
    ("heatmaps: extra_args", "heatmap", config["heatmaps"]["extra_args"], ""),
    ("pretrain: extra_args", "pretrain puzzle", config["pretrain"]["extra_args"], ""),
    ("tune: extra_args", "tune pathotune", config["tune"]["extra_args"], ""),
    *((f"heads: {name}: extra_args", "train", h["extra_args"], name) for name, h in HEADS.items()),
]
for _key, _command, _extra, _head in _EXTRA_ARGS:
    if not config.get(_key.split(":")[0], {}).get("enabled", True):
        continue  # a step that is off runs no job
    try:
        check_extra_args(_key, _command.split(), _extra, set_by=workflow_options(_head)[_command])
    except WsiToolsError as exc:
        raise WorkflowError(str(exc)) from None


wildcard_constraints:
    slide=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    encoder=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    task=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    head=r"[A-Za-z0-9][A-Za-z0-9._-]*",


def shell_args(args):
    """Command-line arguments, each quoted for the shell."""
    return " ".join(shlex.quote(str(a)) for a in args)


# --- the cohort after QC (known once the qc_summary checkpoint has run) -----------------------


def usable_slides():
    """Slides whose QC status is ok: they go on to features, training and heatmaps."""
    return qc_usable_slides(checkpoints.qc_summary.get().output.table)


def _has_targets(slide, task):
    return all(SAMPLES[slide].value(c) for c in TASK_COLUMNS[task].values())


def labelled_slides(task):
    """Usable slides with every target of ``task`` (label; time and event) (its heads train on them)."""
    return [s for s in usable_slides() if _has_targets(s, task)]


def unlabelled_slides(task):
    """Usable slides without the targets of ``task`` (its trained heads predict them)."""
    return [s for s in usable_slides() if not _has_targets(s, task)]


# --- input functions ---------------------------------------------------------------------------


def models_dir_args():
    """``--models-dir`` for the steps that load encoder cards, when the config names one."""
    return ["--models-dir", config["models_dir"]] if config["models_dir"] else []


def get_slide(wildcards):
    return SAMPLES[wildcards.slide].path


def get_tile_options(wildcards):
    t = config["tiling"]
    args = [
        "--mpp", t["mpp"],
        "--tile-size", t["tile_size"],
        "--overlap", t["overlap"],
        "--min-tissue", t["min_tissue"],
        "--backend", t["backend"],
    ]
    if t["store_pixels"]:
        args += ["--codec", t["codec"], "--jpeg-quality", t["jpeg_quality"]]
    else:
        args.append("--no-pixels")
    if SAMPLES[wildcards.slide].mpp is not None:
        args += ["--mpp-override", SAMPLES[wildcards.slide].mpp]
    return shell_args(args + t["extra_args"])


def after_labels(pattern, *, every_head=False):
    """An input function of the heads of a task and the jobs behind them: ``pattern``'s paths,
    once the task's `labels` checkpoint has run (every task's, without a {task} wildcard).
    Planned after it, a job whose inputs kept their content (a labels table rewritten with the
    same content: a new sheet column, a new version of the workflow's scripts) does not run
    again; planned before it, Snakemake took them for updated.
    ``every_head``: the paths of every encoder and head of the task (or of every task)."""

    def inputs(wildcards):
        tasks = [wildcards.task] if "task" in wildcards.keys() else list(TASKS)
        for task in tasks:
            checkpoints.labels.get(task=task)
        if every_head:
            return expand(pattern, task=tasks, encoder=ENCODERS, head=HEADS)
        return pattern.format(**dict(wildcards.items()))

    return inputs


def get_task_features(wildcards):
    return expand(
        f"{FEATURES}/{wildcards.encoder}/{{slide}}.h5", slide=labelled_slides(wildcards.task)
    )


def get_predict_features(wildcards):
    return expand(
        f"{FEATURES}/{wildcards.encoder}/{{slide}}.h5", slide=unlabelled_slides(wildcards.task)
    )


def get_predict_patients(wildcards):
    """``--patients SHEET`` for a head trained on patient bags: the samples sheet says which
    slides to pool (its ``patient_id`` column); nothing for slide bags."""
    return f" {shell_args(['--patients', config['samples']])}" if HEADS[wildcards.head]["bag"] == "patient" else ""


def head_gpu(wildcards):
    """GPUs of a head's train or predict job: none for a head whose `device` is cpu."""
    return 0 if HEADS[wildcards.head]["device"] == "cpu" else 1


def get_head_options(wildcards):
    h = HEADS[wildcards.head]
    args = ["--head", h["type"], "--bag", h["bag"], "--folds", h["folds"]]
    if h["type"] == "pathotune":
        args += ["--prompts", ",".join(h["prompts"])]
    return shell_args(args + h["extra_args"])


def get_usable_qc(wildcards):
    return expand(f"{TILES}/{{slide}}.qc.json", slide=usable_slides())


def fixed_targets():
    """What a plain `snakemake` run makes that is known before QC has run."""
    targets = ["results/qc/summary.tsv", "results/report/qc_summary.html"]
    if TASKS:
        targets += expand(
            "results/heads/{task}/{encoder}/{head}/metrics.json",
            task=TASKS, encoder=ENCODERS, head=HEADS,
        )
        targets.append("results/report/metrics.tsv")
        for _kind, _figure in (("classification", "roc"), ("survival", "km"), ("regression", "regression")):
            targets += expand(
                f"results/report/{_figure}/{{task}}.png",
                task=[t for t in TASKS if TASK_TYPES[t] == _kind],
            )
    if TASKS and config["heatmaps"]["enabled"]:
        targets += expand(
            "results/heatmaps/{task}/{encoder}/{head}", task=TASKS, encoder=ENCODERS, head=HEADS
        )
    if config["pretrain"]["enabled"]:
        targets.append(PUZZLE_CARD_FILE)
    if config["tune"]["enabled"]:
        targets.append("results/tune/pathotune/metrics.json")
    return targets


def get_cohort_targets(wildcards):
    """Features of every encoder for every usable slide (and their exports, config `export`), and
    the predictions (with heatmaps when enabled) of every head for each task that has usable
    unlabelled slides (known once QC has run)."""
    targets = expand(f"{FEATURES}/{{encoder}}/{{slide}}.h5", encoder=ENCODERS, slide=usable_slides())
    if usable_slides():
        targets += expand("results/export/{to}/{encoder}", to=config["export"], encoder=ENCODERS)
    predicted = [task for task in TASKS if unlabelled_slides(task)]
    targets += expand(
        "results/predictions/{task}/{encoder}/{head}/predictions.csv",
        task=predicted, encoder=ENCODERS, head=HEADS,
    )
    if config["heatmaps"]["enabled"]:
        targets += expand(
            "results/predictions/{task}/{encoder}/{head}/heatmaps",
            task=predicted, encoder=ENCODERS, head=HEADS,
        )
    return targets


def get_tune_inputs(wildcards):
    """PathoTune's labelled tiles and task file: known from the config alone, so a dry run
    before the QC checkpoint still gives the job its `data` and `task` inputs."""
    inputs = {"data": config["tune"]["data"]}
    if config["tune"]["task"]:
        inputs["task"] = config["tune"]["task"]
    return inputs


def tunes_on_tile_table():
    """Whether PathoTune's `data` is a tile table (CSV or TSV, the command's rule) naming tiles
    of the cohort's stores."""
    return is_tile_table(config["tune"]["data"])


def get_tune_qc(wildcards):
    """For a tile table, the usable slides' QC records (after the QC checkpoint); none for a
    folder of class folders. Kept apart from `get_tune_inputs`: an input function that reads
    the checkpoint before it has run gives the job only the checkpoint's output, so the other
    inputs would be missing from the dry run."""
    return get_usable_qc(wildcards) if tunes_on_tile_table() else []


def usable_stores(wildcards):
    """The usable slides' patch stores, quoted for the shell; a params function reading the QC
    checkpoint, so a dry run before QC shows them as <TBD>."""
    return stores_of(get_usable_qc(wildcards))


def stores_of(qc_files):
    """The patch stores beside QC files ({slide}.qc.json -> {slide}.zarr), quoted for the shell."""
    return shell_args(f"{str(qc).removesuffix('.qc.json')}.zarr" for qc in qc_files)
