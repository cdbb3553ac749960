"""Rule qc_table: the QC table as an HTML page, which the report shows inline."""

from pathlib import Path

from wsitools.report import write_qc_html

# `snakemake` is injected by the script directive
rows = write_qc_html(snakemake.input.table, snakemake.output.page)
Path(snakemake.log[0]).write_text(f"{len(rows)} slides\n")
