# Tables for the HTML report (`snakemake --report`): the metrics of every trained head side by
# side; per task, ROC curves (classification), Kaplan-Meier curves of the predicted risk groups
# with a log-rank test (survival) or predicted against true values (regression). QC thumbnails
# and heatmaps are report() outputs of their own rules.


rule metrics_table:
    input:
        metrics=expand(
            "results/heads/{task}/{encoder}/{head}/metrics.json",
            task=TASKS, encoder=ENCODERS, head=HEADS,
        ),
    output:
        table=report(
            "results/report/metrics.tsv",
            caption="../report/metrics.rst",
            category="2. Metrics",
            labels={"table": "metrics of every head"},
        ),
    log:
        "logs/metrics_table.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/wsitools.yaml"
    script:
        "../scripts/metrics_table.py"


rule roc:
    input:
        predictions=lambda wildcards: expand(
            "results/heads/{task}/{encoder}/{head}/predictions.csv",
            task=wildcards.task, encoder=ENCODERS, head=HEADS,
        ),
    output:
        png=report(
            "results/report/roc/{task}.png",
            caption="../report/roc.rst",
            category="3. ROC curves",
            labels={"task": "{task}"},
        ),
    log:
        "logs/roc/{task}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/wsitools.yaml"
    script:
        "../scripts/roc.py"


rule outcome_figure:
    input:
        predictions=lambda wildcards: expand(
            "results/heads/{task}/{encoder}/{head}/predictions.csv",
            task=wildcards.task, encoder=ENCODERS, head=HEADS,
        ),
    output:
        png=report(
            "results/report/{figure}/{task}.png",
            caption="../report/outcomes.rst",
            category="3. Survival and regression curves",
            labels={"task": "{task}", "figure": "{figure}"},
        ),
    params:
        task_type=lambda wildcards: TASK_TYPES[wildcards.task],
    wildcard_constraints:
        figure="km|regression",
    log:
        "logs/{figure}/{task}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/wsitools.yaml"
    script:
        "../scripts/outcomes.py"
