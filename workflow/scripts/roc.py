"""Rule roc: ROC curves of every head of one task (out-of-fold predictions), one figure."""

from pathlib import Path

from wsitools.report import plot_roc

plot_roc(snakemake.input.predictions, snakemake.output.png)  # `snakemake`: script directive
Path(snakemake.log[0]).write_text(f"{len(snakemake.input.predictions)} heads\n")
