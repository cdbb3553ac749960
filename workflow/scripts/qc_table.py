"""Rule qc_table: the QC table as an HTML page, which the report shows inline."""

from wsitools.report import write_qc_html
from wsitools.samples import run_script

run_script(  # `snakemake` is injected by the script directive
    snakemake.log[0], lambda: f"{len(write_qc_html(snakemake.input.table, snakemake.output.page))} slides"
)
