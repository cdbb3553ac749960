"""Rule labels: the labels table of one task (usable slides with a label only)."""

from pathlib import Path

from wsitools.labels import write_labels
from wsitools.report import usable_slides
from wsitools.samples import read_samples

rows = write_labels(  # `snakemake` is injected by the script directive
    read_samples(snakemake.input.sheet, check_files=False),
    usable=usable_slides(snakemake.input.summary),
    columns=snakemake.params.columns,
    out=snakemake.output.labels,
    task_type=snakemake.params.task_type,
)
Path(snakemake.log[0]).write_text(f"{len(rows)} usable labelled slides\n")
