"""Rule labels: the labels table of one task (usable slides with a label only)."""

from pathlib import Path

from wsitools import cohort

rows = cohort.write_labels(  # `snakemake` is injected by the script directive
    cohort.read_samples(snakemake.input.sheet, check_files=False),
    usable=cohort.usable_slides(snakemake.input.summary),
    label_column=snakemake.params.column,
    out=snakemake.output.labels,
)
Path(snakemake.log[0]).write_text(f"{len(rows)} usable labelled slides\n")
