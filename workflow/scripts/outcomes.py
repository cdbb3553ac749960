"""Rule outcome_figure: Kaplan-Meier curves of the risk groups (survival) or predicted against
true values (regression) of every head of one task (out-of-fold predictions), one figure."""

from wsitools.report import plot_outcomes
from wsitools.samples import run_script


def step() -> str:
    plot_outcomes(snakemake.input.predictions, snakemake.output.png, task_type=snakemake.params.task_type)
    return f"{len(snakemake.input.predictions)} heads"


run_script(snakemake.log[0], step)  # `snakemake` is injected by the script directive
