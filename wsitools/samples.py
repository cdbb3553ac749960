"""The samples sheet and the workflow it feeds: the slides of a cohort, and how Snakemake is run.

The Snakemake workflow (``workflow/``) and ``wsitools demo`` call these functions; the Snakefile
holds no logic of its own beyond wiring. Everything a user can get wrong here (an unsafe or
duplicate slide id, a missing slide file or one file under two ids, an implausible mpp override,
an unknown config key, an encoder without a card) is a :class:`DataError` naming the sheet or
key, the row and the problem, raised before any job runs.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from wsitools.encoders.cards import (
    card_encoder_hash, check_new_card_name, check_weight_file, find_card, precision_hash,
)
from wsitools.errors import (
    STOPPED_LINE, DataError, ModelError, StoreError, WsiToolsError, error_line, one_line, schema_problem,
)
from wsitools.io import read_user_text
from wsitools.types import (
    MPP_MAX, MPP_MIN, MicronsPerPixel, case_twins, check_distinct_ids, check_slide_id, slide_id_from_path,
)

SPLIT_COLUMNS = ("split", "fold")
"""Samples-sheet columns with the user's own splits, passed on to the labels tables."""


@dataclass(frozen=True)
class Sample:
    """One slide of the cohort, as the samples sheet (or a slide glob) describes it."""

    slide_id: str
    path: str
    patient_id: str
    mpp: MicronsPerPixel | None = None
    fields: Mapping[str, str] = field(default_factory=dict)
    """Every column of the sheet for this row (labels of any task live here)."""

    def value(self, column: str) -> str:
        """The (stripped) value of ``column`` for this slide; empty when absent."""
        return self.fields.get(column, "").strip()


def workflow_dir() -> Path:
    """The ``workflow/`` folder of the wsitools checkout this package was imported from.

    The workflow is not part of the installed package: it lives beside it in the repository
    (repo root = parent of the package folder), so the package must be installed editable
    (``pip install -e .``) or run from a checkout.
    """
    root = Path(__file__).resolve().parent.parent
    snakefile = root / "workflow" / "Snakefile"
    if not snakefile.is_file():
        raise DataError(
            f"no workflow at {snakefile}: the Snakemake workflow ships with the repository, "
            "install wsitools from a checkout with `pip install -e .`"
        )
    return root / "workflow"


def snakemake_command(workdir: str | os.PathLike[str], *args: str) -> list[str]:
    """The command that runs this checkout's workflow in ``workdir`` with Snakemake's CLI.

    Snakemake runs as ``python -m snakemake`` with the current interpreter, so it sees the same
    environment (and wsitools) as the caller.
    """
    snakefile = workflow_dir() / "Snakefile"
    return [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile),
            "--directory", str(workdir), *args]


def run_script(
    log: str | os.PathLike[str],
    step: Callable[[], str],
    *,
    context: Callable[[str], str] = lambda message: message,
) -> None:
    """Run a workflow script's ``step`` and write the line it returns to the rule's ``log``.

    Bad input (a :class:`WsiToolsError`, or an ``OSError`` about a named file) ends the job as
    the ``wsitools`` command would: one line, put through ``context``, in the log and on
    stderr, and exit status 2; never a traceback with an empty log."""
    try:
        summary = step()
    except (WsiToolsError, OSError) as exc:
        line = error_line(exc)
        if line is None:
            raise
        message = context(line)
        Path(log).write_text(message + "\n")
        print(message, file=sys.stderr)
        sys.exit(2)
    Path(log).write_text(summary + "\n")


def _stopped_by(logs: Sequence[str]) -> str | None:
    """The signal a job's logs end by saying stopped it (:data:`~wsitools.errors.STOPPED_LINE`),
    or ``None``: a job cancelled with its run exits non-zero without any fault of its input."""
    for log in logs:
        try:
            with open(log, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
                lines = f.read().decode("utf-8", "replace").strip().splitlines()
        except OSError:
            continue
        if lines and (match := STOPPED_LINE.match(lines[-1])):
            return match.group(1)
    return None


def run_failure_line(failed_logs: Sequence[Sequence[str]]) -> str:
    """The workflow's last line for a run that did not succeed (``failed_logs``: the log files of
    each job that failed): the failed jobs' logs, or, when no job failed, that the run was
    stopped (Ctrl-C, a kill of snakemake, or Snakemake's own error printed above), which the
    next run finishes. Jobs whose logs end saying a signal stopped them (SIGTERM to the whole
    run: a closed session, ``timeout``, a cancelled allocation) are counted as stopped, not
    failed."""
    signals = [_stopped_by(job) for job in failed_logs]
    stopped = sorted({sig for sig in signals if sig is not None})
    n_stopped = len(signals) - signals.count(None)
    said = f"{_jobs(n_stopped)} {'was' if n_stopped == 1 else 'were'} stopped by {', '.join(stopped)}"
    failed = [job for job, sig in zip(failed_logs, signals) if sig is None]
    if not failed:
        how = f": {said} and no job failed" if stopped else " and no job failed (interrupted, or see the error above)"
        return f"wsitools workflow: the run stopped before it finished{how}; run snakemake again to finish"
    logs = [log for job in failed for log in job]
    where = f"; logs: {', '.join(logs)}" if logs else ""
    also = f"; {said}" if stopped else ""
    return f"wsitools workflow: {_jobs(len(failed))} failed (see the error above){where}{also}"


def _jobs(n: int) -> str:
    return "a job" if n == 1 else f"{n} jobs"


def _parse_mpp(text: str, where: str) -> MicronsPerPixel | None:
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: mpp {text!r} is not a number") from None
    if not (math.isfinite(value) and MPP_MIN <= value <= MPP_MAX):
        raise DataError(f"{where}: mpp {value:g} is outside {MPP_MIN:g}-{MPP_MAX:g} um/px")
    return MicronsPerPixel(value)


def _check_files(samples: Sequence[Sample], source: str) -> None:
    """Every slide file exists, and no file is listed twice: two ids for one slide would put it
    in two cross-validation folds (trained on and tested on) and count it twice."""
    seen: dict[tuple[int, int], Sample] = {}
    for s in samples:
        if os.path.isdir(s.path):
            raise DataError(f"{source}: slide {s.slide_id!r}: {s.path} is a directory, expected a slide file")
        if not os.path.isfile(s.path):
            raise DataError(f"{source}: slide {s.slide_id!r}: file {s.path} does not exist")
        st = os.stat(s.path)
        real = (st.st_dev, st.st_ino)  # one file under any name: a symbolic or a hard link, "a/../b"
        if real in seen:
            first = seen[real]
            raise DataError(
                f"{source}: slides {first.slide_id!r} ({first.path}) and {s.slide_id!r} ({s.path}) "
                "are one file; list each slide once"
            )
        seen[real] = s


def slide_file_state(path: str | os.PathLike[str]) -> str:
    """A slide file's size and modification time, as the workflow's tile rule records them (a
    ``params`` value, which Snakemake's params trigger compares with the one of the finished job).

    Snakemake's own trigger tiles a slide again only when its file is newer than the slide's QC
    record; a file replaced by another with an older modification time (``cp -p``, ``rsync -a``,
    a restore from a backup) would otherwise keep the old slide's store, features and heads.
    A stat, no read: planning a cohort of thousands of slides stays fast. A file touched or
    copied with its bytes unchanged is tiled again and keeps its store (the tiler compares the
    slide's fingerprint), so nothing after tiling reruns."""
    st = os.stat(path)
    return f"{st.st_size} bytes, modified {st.st_mtime_ns} ns"


def read_samples(path: str | os.PathLike[str], *, check_files: bool = True) -> list[Sample]:
    """Read and validate a samples sheet (TSV with a header row).

    Required columns: ``slide_id`` and ``path``; optional: ``patient_id`` (defaults to the slide
    id, so splits are per slide), ``label`` and ``mpp`` (an override of the slide's metadata
    mpp, for slides whose metadata lacks one); other columns are kept in :attr:`Sample.fields`. Relative slide paths
    are relative to the working directory (the workflow's convention). Blank lines and lines
    starting with ``#`` are skipped.
    """
    path = Path(path)
    text = read_user_text(path, what="samples sheet", expected="a TSV file", encoding="utf-8-sig")
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise DataError(f"samples sheet {path} is empty")
    reader = csv.DictReader(lines, delimiter="\t")
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in ("slide_id", "path") if c not in columns]
    if missing:
        raise DataError(
            f"samples sheet {path}: missing column(s) {', '.join(missing)} "
            f"(found {', '.join(columns) or 'none'}; is it tab-separated?)"
        )
    samples = []
    for row_no, row in enumerate(reader, start=2):
        if None in row:
            raise DataError(f"samples sheet {path}, row {row_no}: more fields than columns")
        fields = {k.strip(): (v or "").strip() for k, v in row.items()}
        where = f"samples sheet {path}, row {row_no}"
        try:
            slide_id = check_slide_id(fields["slide_id"])
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None
        if not fields["path"]:
            raise DataError(f"{where}: slide {slide_id!r} has no path")
        samples.append(
            Sample(
                slide_id=slide_id,
                path=fields["path"],
                patient_id=fields.get("patient_id") or slide_id,
                mpp=_parse_mpp(fields.get("mpp", ""), f"{where} (slide {slide_id!r})"),
                fields=fields,
            )
        )
    if not samples:
        raise DataError(f"samples sheet {path} lists no slides")
    check_distinct_ids([s.slide_id for s in samples], [s.path for s in samples], source=f"samples sheet {path}")
    if check_files:
        _check_files(samples, f"samples sheet {path}")
    return samples


def samples_from_glob(pattern: str) -> list[Sample]:
    """The slides matching a glob (relative to the working directory), ids derived from the
    file names (:func:`~wsitools.types.slide_id_from_path`: any name gives a safe id; two files
    with one id are an error naming both).

    No labels: a glob cohort can be tiled and embedded, and heads need a sheet.
    """
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise DataError(f"slide glob {pattern!r} matches no file")
    samples = [Sample(slide_id=(sid := slide_id_from_path(p)), path=p, patient_id=sid, fields={}) for p in paths]
    check_distinct_ids([s.slide_id for s in samples], [s.path for s in samples], source=f"slide glob {pattern!r}")
    return samples


def load_samples(*, samples: str | None, slides_glob: str | None) -> list[Sample]:
    """The slides of the cohort from exactly one of a samples sheet or a slide glob (the workflow's config)."""
    if bool(samples) == bool(slides_glob):
        raise DataError("config: give exactly one of 'samples' (a samples sheet) and 'slides_glob'")
    return read_samples(samples) if samples else samples_from_glob(slides_glob or "")


def config_error(error: Any) -> str:
    """One line for a config that fails the workflow's schema (a ``jsonschema.ValidationError``):
    the key it is about and what is wrong (:func:`wsitools.errors.schema_problem`)."""
    path, problem = schema_problem(error)
    return f"config: {''.join(p + ': ' for p in path)}{problem}"


def check_unique_keys(path: str | os.PathLike[str]) -> None:
    """Refuse a YAML (or JSON) config file in which a mapping repeats a key: a :class:`DataError`
    naming the file, the line and the key. The reader that loaded it keeps the last of a repeated
    key, so the first setting would be dropped without a word. Other problems of the file are the
    loader's to report (it read the file first)."""
    import yaml

    from wsitools.io import yaml_loader

    text = read_user_text(Path(path), what="config file", expected="a YAML file")
    try:
        yaml.load(text, Loader=yaml_loader())  # a SafeLoader that refuses a repeated key
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        raise DataError(f"config file {path}: line {mark.line + 1}: {exc.problem}") from None
    except yaml.YAMLError:
        return


def check_whole_numbers(config: Mapping[str, Any], schema: str | os.PathLike[str]) -> None:
    """Refuse a config whose ``integer`` keys hold a float (``folds: 2.0``, ``tile_size: 224.0``),
    which JSON Schema lets pass but every command refuses, in every job: a :class:`DataError`
    naming the key (:func:`config_error`), before any job runs."""
    import jsonschema
    import yaml

    with open(schema) as f:
        spec = yaml.safe_load(f)
    base = jsonschema.validators.validator_for(spec)
    whole = base.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    )
    strict = jsonschema.validators.extend(base, type_checker=whole)(spec)
    error = jsonschema.exceptions.best_match(strict.iter_errors(dict(config)))
    if error is None:
        return
    if error.validator == "type" and isinstance(error.instance, float):
        path = "".join(f"{p}: " for p in error.absolute_path)
        raise DataError(f"config: {path}{error.instance!r} is not a whole number")
    raise DataError(config_error(error))


def heads_label_checks(heads: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, int], bool]:
    """What the labels checks need of the config's heads (``heads: NAME: ...``): each head's
    k-fold count, and whether every head trains with ``--allow-empty-classes``."""
    folds = {name: int(h["folds"]) for name, h in heads.items()}
    allow = bool(heads) and all("--allow-empty-classes" in h.get("extra_args", []) for h in heads.values())
    return folds, allow


def check_task_cohort(
    samples: Sequence[Sample], *, task: str, task_type: str, columns: Mapping[str, str], task_file: str | None,
    folds: Mapping[str, int], sheet: str, allow_empty_classes: bool,
) -> None:
    """Check a task's targets in the samples sheet against its task file and the heads' folds
    (``folds``: head -> k): :func:`wsitools.labels.check_task_labels` for a classification task,
    :func:`wsitools.labels.check_outcome_labels` for survival and regression. The workflow checks
    every slide before any job, and the usable ones again once QC has run (QC may leave too few
    for a head's folds); a :class:`DataError` names the config key to change."""
    from wsitools.labels import check_outcome_labels, check_task_labels
    from wsitools.text import load_task

    if task_type != "classification":
        check_outcome_labels(samples, task=task, task_type=task_type, columns=columns, folds=folds, sheet=sheet)
        return
    check_task_labels(
        samples, task=task, label_column=columns["label"], classes=load_task(task_file).classes if task_file else None,
        folds=folds, sheet=sheet, task_file=task_file, allow_empty_classes=allow_empty_classes,
    )


def check_encoders(encoders: Mapping[str, str], *, models_dir: str | None) -> None:
    """Check that every encoder the config names (``encoders``: config key -> card name or card
    file) has a valid card and its weight files (a stat each, as the jobs check them first),
    before any slide is tiled: a missing file would otherwise fail every slide's extraction with
    one message, or the pretraining or tuning job after the whole cohort was tiled. A
    :class:`DataError` names the key."""
    for key, name in encoders.items():
        try:
            card = find_card(name, models_dir=models_dir or None)
            for weight in card.weights:
                check_weight_file(card, weight)
        except ModelError as exc:
            raise DataError(f"config: {key}: {exc}") from None


def check_pretrain_name(name: str, *, given: bool, encoder: str, models_dir: str | None) -> None:
    """Check the name of the encoder card the pretraining job exports (``name``: ``pretrain:
    name`` when ``given``, else made from the ``pretrain: encoder`` card's file name) as the job
    checks it first (:func:`~wsitools.encoders.cards.check_new_card_name`), before any slide is
    tiled: the job runs after the whole cohort is tiled. A :class:`DataError` names the key."""
    key = "pretrain: name" if given else "pretrain: encoder"
    try:
        backbone = find_card(encoder, models_dir=models_dir or None).name
        check_new_card_name(
            name, models_dir=models_dir or None, backbone=backbone,
            advice="choose another `pretrain: name`" if given else
            "the exported card's name is made from this card's file name; set `pretrain: name`",
        )
    except ModelError as exc:
        raise DataError(f"config: {key}: {exc}") from None


def check_names_differ_in_case(names: Mapping[str, Sequence[str]]) -> None:
    """Check that no two names under one config key (``names``: key -> its names, e.g. the
    tasks, the heads, the encoders) differ only in case (:func:`~wsitools.types.case_twins`):
    each names an output folder, and where case is ignored (macOS, Windows shares) ``T1`` and
    ``t1`` are one folder, so one head's run would replace the other's. A :class:`DataError`
    names the key and both names."""
    for key, group in names.items():
        twins = case_twins(group)
        if twins is not None:
            a, b = (group[i] for i in twins)
            raise DataError(
                f"config: {key}: {a!r} and {b!r} differ only in case; their output folders would be one where "
                "case is ignored (macOS, Windows): rename one"
            )


def check_extra_args(key: str, command: Sequence[str], extra: Sequence[str], *, set_by: Mapping[str, str]) -> None:
    """Check the ``extra_args`` of a config (at ``key``) with the argument parser of ``wsitools
    COMMAND`` itself, before any job runs: a misspelt option or a bad value would otherwise fail
    every job of the step, one by one, after tiling. Options the workflow gives the command
    (``set_by``: option -> where its value comes from, a config key) may not be given again: the
    last would win, replacing a setting of the config or the job's outputs. A :class:`DataError`
    names the key and the option."""
    import argparse
    import contextlib
    import difflib
    import io

    from wsitools.cli import build_parser

    def refuse(message: str) -> NoReturn:
        raise DataError(f"config: {key}: {message}")

    parser = build_parser()
    for name in command:  # argparse has no public way to reach a sub-command's parser
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    program = f"`wsitools {' '.join(command)}`"
    parser.error = lambda message: refuse(f"{one_line(message)} ({program})")  # type: ignore[method-assign]
    parser.exit = lambda status=0, message=None: refuse("--help prints the help and runs nothing")  # type: ignore[method-assign]
    for action in parser._actions:  # only what extra_args gives: the workflow gives the rest
        action.default, action.required = argparse.SUPPRESS, False
    for group in parser._mutually_exclusive_groups:
        group.required = False
    with contextlib.redirect_stdout(io.StringIO()):
        given, unknown = parser.parse_known_args([str(a) for a in extra])
    if unknown:
        option = unknown[0].split("=", 1)[0]
        near = difflib.get_close_matches(option, parser._option_string_actions, n=1)
        refuse(f"{option!r} is not an option of {program}" + (f" (did you mean {near[0]}?)" if near else ""))
    for action in parser._actions:
        if action.dest not in vars(given):
            continue
        if not action.option_strings:
            value = getattr(given, action.dest)
            refuse(f"{' '.join(value) if isinstance(value, list) else value!r} is not an option of {program}")
        for option in action.option_strings:
            if option in set_by:
                refuse(f"{option} is set by the workflow ({set_by[option]}), not in extra_args")


def check_features_current(features_dir: str | os.PathLike[str], encoders: Sequence[str], *, models_dir: str | None) -> None:
    """Check that the feature stores a workflow already has for each encoder card were made by the
    card as it is now: the workflow extracts a slide once, so after a card's recipe or weight file
    changed it would go on training on the old card's features (and later mix both). A
    :class:`DataError` names the folder and what to do. Reads one store's attributes per
    encoder; either compute precision passes (a new ``features: precision`` is a setting that
    Snakemake itself re-extracts for); cards of a kind (PathoTune) are left to extraction, and
    cards with a weight file missing to :func:`check_encoders`."""
    from wsitools.feature_store import FeatureStore

    for name in encoders:
        folder = Path(features_dir) / name
        first = min(folder.glob("[!.]*.h5"), default=None)
        if first is None:
            continue
        card = find_card(name, models_dir=models_dir or None)
        if card.kind is not None or not all(w.path.is_file() for w in card.weights):
            continue
        try:
            recorded = FeatureStore.open(first).encoder_hash
        except StoreError:
            continue  # a damaged store is the extraction's to report
        if recorded is None:
            continue  # not written by extraction: nothing to compare
        expected = card_encoder_hash(card)
        if recorded not in (expected, precision_hash(expected, card, "fp32")):
            raise DataError(
                f"{folder}: its feature stores were made by another version of encoder card {name!r} "
                f"(encoder hash {recorded[:12]}; {card.source} and its weight files give {expected[:12]} now: "
                f"the card or a weight file changed since); move {folder} away (or restore the card) and run again"
            )


def check_features_own(features_dir: str | os.PathLike[str], encoders: Sequence[str], stores: Mapping[str, str]) -> None:
    """Check that the feature stores in ``features_dir`` of this project's slides (``stores``:
    slide id -> this project's patch store) were made from this project's patch stores. A folder
    shared with another project would have that project's features of one slide id replaced
    by this project's runs (Snakemake replaces a job's outputs before it runs), and its heads
    would then train on another slide's features. A :class:`DataError` names the file."""
    from wsitools.feature_store import FeatureStore

    for name in encoders:
        folder = Path(features_dir) / name
        if not folder.is_dir():
            continue
        for slide_id, store in stores.items():
            path = folder / f"{slide_id}.h5"
            if not path.is_file():
                continue
            try:
                made_from = FeatureStore.open(path).attrs.get("store_path")
            except StoreError:
                continue  # a damaged store is the extraction's to report
            if made_from and Path(made_from).resolve() != Path(store).resolve() and Path(made_from).is_dir():
                raise DataError(
                    f"{path}: holds features of another project's patch store {made_from} under slide id "
                    f"{slide_id} (this project's is {store}); this project's runs would replace them: give each "
                    "project its own features_dir"
                )
