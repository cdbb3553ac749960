"""Rule qc_summary: gather the per-slide QC files into results/qc/summary.tsv (+ thumbnails)."""

from wsitools.report import qc_report, write_qc_summary
from wsitools.samples import run_script


def step() -> str:
    write_qc_summary(snakemake.input.qc, snakemake.output.table, thumbnails=snakemake.output.thumbnails)
    return qc_report(snakemake.output.table)


run_script(snakemake.log[0], step)  # `snakemake` is injected by the script directive
