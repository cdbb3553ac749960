"""Rule qc_summary: gather the per-slide QC files into results/qc/summary.tsv (+ thumbnails)."""

from pathlib import Path

from wsitools.report import qc_report, write_qc_summary

write_qc_summary(  # `snakemake` is injected by the script directive
    snakemake.input.qc, snakemake.output.table, thumbnails=snakemake.output.thumbnails
)
Path(snakemake.log[0]).write_text(qc_report(snakemake.output.table) + "\n")
