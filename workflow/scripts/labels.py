"""Rule labels: the labels table of one task (usable slides with a label only).

Which slides are usable is known only after QC, so a task can be left with too few labelled
slides here (say every slide of a class failed QC), or too few patients for a head's folds: the
checks the workflow ran on every slide before any job run again on the usable ones, naming the
config key (`heads: NAME: folds`), before any head trains. Two labelled slides whose patch
stores record one slide fingerprint (one scan under two ids, as two copies of the file) are
found here too. Each ends the job with one line naming the task, in its log and on stderr,
never a traceback.
"""

from wsitools.labels import write_labels
from wsitools.report import usable_slides
from wsitools.samples import check_task_cohort, heads_label_checks, read_samples, run_script


def step() -> str:
    samples = read_samples(snakemake.input.sheet, check_files=False)
    usable = usable_slides(snakemake.input.summary)
    # The checks' settings come from the config, not the rule's params: a params value that
    # changes when a head is added would make Snakemake redo this table and retrain every head.
    folds, allow_empty_classes = heads_label_checks(snakemake.config["heads"])
    task_file = snakemake.config["tasks"][snakemake.wildcards.task]["task_file"] or None
    check_task_cohort(
        [s for s in samples if s.slide_id in set(usable)], task=snakemake.wildcards.task,
        task_type=snakemake.params.task_type, columns=snakemake.params.columns, task_file=task_file,
        folds=folds, sheet=snakemake.input.sheet, allow_empty_classes=allow_empty_classes,
    )
    rows = write_labels(
        samples,
        usable=usable,
        columns=snakemake.params.columns,
        out=snakemake.output.labels,
        task_type=snakemake.params.task_type,
        tiles_dir=snakemake.params.tiles,
    )
    return f"{len(rows)} usable labelled slides"


run_script(  # `snakemake` is injected by the script directive
    snakemake.log[0], step,
    context=lambda message: (f"task {snakemake.wildcards.task!r}: {message} (after QC; "
                             f"{snakemake.input.summary} says why slides were left out)"),
)
