"""Rule metrics_table: the metrics of every trained head side by side (TSV and HTML), for the report."""

from wsitools.report import write_metrics_table
from wsitools.samples import run_script

run_script(  # `snakemake` is injected by the script directive
    snakemake.log[0],
    lambda: f"{len(write_metrics_table(snakemake.input.metrics, snakemake.output.table, html_out=snakemake.output.page))} heads",
)
