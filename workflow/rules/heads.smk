# MIL heads: one labels table per task (usable, labelled slides only: a class or a number in
# `label_column`, or for survival a time and an event in `time_column` and `event_column`), then
# every head is trained with cross-validation for every task and encoder; the task file's `type`
# (classification, survival, regression) decides the loss, the metrics and the report figures. A head trains on its config
# `device` (auto: a GPU when the job has one) with `threads` torch threads; it asks for a GPU
# unless its device is cpu. A task's `task_file` is passed as `--task` when it is given; heads
# without the ttp prompt can do without it (their classes are then the labels, sorted). A head
# with `bag: patient` pools each patient's slides into one bag (one prediction per patient; the
# slides of a patient must share the task's label, checked here before any job runs). A train job
# always passes --resume: it writes into .{head}.partial beside its run folder, so a job cut off by
# a time limit keeps the folds it finished and trains only the others when rerun. Train and predict
# jobs pass --strict: every slide they are given has its feature store from this workflow, so one
# that cannot be read was damaged since, and the job fails naming it instead of leaving it out.

for _task_name, _task_conf in TASKS.items():
    for _head_name, _head_conf in HEADS.items():
        if not _task_conf["task_file"] and _head_conf["type"] == "pathotune" and "ttp" in _head_conf["prompts"]:
            raise WorkflowError(
                f"config: head {_head_name!r} uses the ttp prompt, which needs the task's descriptions: "
                f"set 'tasks: {_task_name}: task_file' or drop ttp from 'heads: {_head_name}: prompts'"
            )


# A checkpoint: train reads the table through after_labels, so the heads are planned again once it
# is written, and a table rewritten with the same content (its checksum) retrains no head.
checkpoint labels:
    input:
        summary="results/qc/summary.tsv",
        sheet=config["samples"],
    output:
        labels="results/heads/{task}/labels.tsv",
    params:
        columns=lambda wildcards: TASK_COLUMNS[wildcards.task],
        task_type=lambda wildcards: TASK_TYPES[wildcards.task],
        tiles=TILES,
    log:
        "logs/labels/{task}.log",
    threads: 1
    conda:
        "../envs/wsitools.yaml"
    script:
        "../scripts/labels.py"


rule train:
    input:
        labels=after_labels("results/heads/{task}/labels.tsv"),
        task=lambda wildcards: TASKS[wildcards.task]["task_file"] or [],
        features=get_task_features,
    output:
        metrics="results/heads/{task}/{encoder}/{head}/metrics.json",
        predictions="results/heads/{task}/{encoder}/{head}/predictions.csv",
        attention=directory("results/heads/{task}/{encoder}/{head}/attention"),
    params:
        features=lambda wildcards: f"{FEATURES}/{wildcards.encoder}",
        out=lambda wildcards, output: Path(output.metrics).parent,
        task=lambda wildcards: (
            shell_args(["--task", TASKS[wildcards.task]["task_file"]])
            if TASKS[wildcards.task]["task_file"]
            else ""
        ),
        options=get_head_options,
        device=lambda wildcards: HEADS[wildcards.head]["device"],
    log:
        "logs/train/{task}/{encoder}/{head}.log",
    benchmark:
        "benchmarks/train/{task}/{encoder}/{head}.tsv",
    threads: lambda wildcards: HEADS[wildcards.head]["threads"]
    resources:
        gpu=head_gpu,
    conda:
        "../envs/wsitools.yaml"
    shell:
        "wsitools train --features {params.features:q} --labels {input.labels:q}"
        " {params.task} {params.options} --device {params.device}"
        " --threads {threads} --out {params.out:q} --overwrite --resume --strict --quiet > {log:q} 2>&1"
