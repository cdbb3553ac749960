"""Rule labels: the labels table of one task (usable slides with a label only).

Which slides are usable is known only after QC, so a task can be left with too few labelled
slides here (say every slide of a class failed QC), and two labelled slides whose patch stores
record one slide fingerprint (one scan under two ids, as two copies of the file) are found
here: either ends the job with one line naming the task, in its log and on stderr, never a
traceback.
"""

from wsitools.labels import write_labels
from wsitools.report import usable_slides
from wsitools.samples import read_samples, run_script


def step() -> str:
    rows = write_labels(
        read_samples(snakemake.input.sheet, check_files=False),
        usable=usable_slides(snakemake.input.summary),
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
