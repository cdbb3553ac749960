# Optional: PathoTune patch-level prompt tuning on labelled tiles (config: tune.enabled): a
# folder of class folders, or a tile table (.csv or .tsv: slide_id, x, y, label) naming tiles of the
# cohort's patch stores. The tuned model is written with an encoder card. The run folder keeps
# a checkpoint after each epoch, and the job always passes --resume, so a job cut off by a time
# limit continues where it stopped when rerun (a rerun with other settings stops with an error
# naming the setting; remove results/tune/pathotune/checkpoints to start over).


rule tune_pathotune:
    input:
        unpack(get_tune_inputs),
        qc=get_tune_qc,
    output:
        metrics="results/tune/pathotune/metrics.json",
    params:
        out=lambda wildcards, output: Path(output.metrics).parent,
        task=lambda wildcards, input: shell_args(["--task", input.task]) if "task" in input.keys() else "",
        stores=lambda wildcards: f"--stores {usable_stores(wildcards)}" if tunes_on_tile_table() else "",
        options=shell_args(
            [
                "--encoder", config["tune"]["encoder"],
                "--prompts", ",".join(config["tune"]["prompts"]),
                "--device", config["device"],
                *models_dir_args(),
            ]
            + (["--ivp-encoder", config["tune"]["ivp_encoder"]] if config["tune"]["ivp_encoder"] else [])
            + config["tune"]["extra_args"]
        ),
    log:
        "logs/tune_pathotune.log",
    benchmark:
        "benchmarks/tune_pathotune.tsv",
    threads: config["tune"]["threads"]
    resources:
        gpu=GPU_JOB,
    conda:
        "../envs/wsitools.yaml"
    shell:
        "wsitools tune pathotune --data {input.data:q} {params.task} {params.stores} {params.options}"
        " --workers {threads} --out {params.out:q} --resume --quiet > {log:q} 2>&1"
