"""Rule outcome_figure: Kaplan-Meier curves of the risk groups (survival) or predicted against
true values (regression) of every head of one task (out-of-fold predictions), one figure."""

from pathlib import Path

from wsitools.report import plot_outcomes

plot_outcomes(  # `snakemake`: script directive
    snakemake.input.predictions, snakemake.output.png, task_type=snakemake.params.task_type
)
Path(snakemake.log[0]).write_text(f"{len(snakemake.input.predictions)} heads\n")
