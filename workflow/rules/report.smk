# Tables for the HTML report (`snakemake --report`): the QC table and the metrics of every
# trained head side by side, each as a TSV (for download and for programs) and as an HTML page
# (Snakemake's report shows HTML results inline, other text files only as downloads); per task,
# ROC curves (classification), Kaplan-Meier curves of the predicted risk groups with a log-rank
# test (survival) or predicted against true values (regression). QC thumbnails and heatmaps are
# report() outputs of their own rules. Every report() output names its category (a section
# listed on the report's front page, report/workflow.rst) and a subcategory, so nothing lands
# under "Other".


rule qc_table:
    input:
        table="results/qc/summary.tsv",
    output:
        page=report(
            "results/report/qc_summary.html",
            caption="../report/qc_summary.rst",
            category="1. Quality control",
            subcategory="QC summary",
            labels={"table": "QC summary", "format": "HTML table"},
        ),
    log:
        "logs/qc_table.log",
    threads: 1
    conda:
        "../envs/wsitools.yaml"
    script:
        "../scripts/qc_table.py"


rule metrics_table:
    input:
        metrics=after_labels("results/heads/{task}/{encoder}/{head}/metrics.json", every_head=True),
    output:
        table=report(
            "results/report/metrics.tsv",
            caption="../report/metrics.rst",
            category="2. Metrics",
            subcategory="Metrics of every head",
            labels={"table": "metrics of every head", "format": "TSV (download)"},
        ),
        page=report(
            "results/report/metrics.html",
            caption="../report/metrics.rst",
            category="2. Metrics",
            subcategory="Metrics of every head",
            labels={"table": "metrics of every head", "format": "HTML table"},
        ),
    log:
        "logs/metrics_table.log",
    threads: 1
    conda:
        "../envs/wsitools.yaml"
    script:
        "../scripts/metrics_table.py"


rule roc:
    input:
        predictions=after_labels("results/heads/{task}/{encoder}/{head}/predictions.csv", every_head=True),
    output:
        png=report(
            "results/report/roc/{task}.png",
            caption="../report/roc.rst",
            category="3. Curves",
            subcategory="ROC curves (classification tasks)",
            labels={"task": "{task}"},
        ),
    log:
        "logs/roc/{task}.log",
    threads: 1
    conda:
        "../envs/wsitools.yaml"
    script:
        "../scripts/roc.py"


rule outcome_figure:
    input:
        predictions=after_labels("results/heads/{task}/{encoder}/{head}/predictions.csv", every_head=True),
    output:
        png=report(
            "results/report/{figure}/{task}.png",
            caption="../report/outcomes.rst",
            category="3. Curves",
            subcategory="Survival and regression curves",
            labels={"task": "{task}", "figure": "{figure}"},
        ),
    params:
        task_type=lambda wildcards: TASK_TYPES[wildcards.task],
    wildcard_constraints:
        figure="km|regression",
    log:
        "logs/{figure}/{task}.log",
    threads: 1
    conda:
        "../envs/wsitools.yaml"
    script:
        "../scripts/outcomes.py"
