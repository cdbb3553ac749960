"""Rule metrics_table: the metrics of every trained head side by side (TSV and HTML), for the report."""

from pathlib import Path

from wsitools.report import write_metrics_table

# `snakemake` is injected by the script directive
rows = write_metrics_table(
    snakemake.input.metrics, snakemake.output.table, html_out=snakemake.output.page
)
Path(snakemake.log[0]).write_text(f"{len(rows)} heads\n")
