"""Rule roc: ROC curves of every head of one task (out-of-fold predictions), one figure."""

from wsitools.report import plot_roc
from wsitools.samples import run_script


def step() -> str:
    plot_roc(snakemake.input.predictions, snakemake.output.png)
    return f"{len(snakemake.input.predictions)} heads"


run_script(snakemake.log[0], step)  # `snakemake` is injected by the script directive
