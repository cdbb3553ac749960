"""Rule labels: the labels table of one task (usable slides with a label only)."""

from pathlib import Path

from wsitools import cohort

rows = cohort.write_labels(  # `snakemake` is injected by the script directive
    cohort.read_samples(snakemake.input.sheet, check_files=False),
    usable=cohort.usable_slides(snakemake.input.summary),
    columns=snakemake.params.columns,
    out=snakemake.output.labels,
    task_type=snakemake.params.task_type,
)
Path(snakemake.log[0]).write_text(f"{len(rows)} usable labelled slides\n")
