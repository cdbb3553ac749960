# Optional: PuzzleTuning prompt pretraining on the patch stores of the usable slides
# (config: pretrain.enabled). The run folder keeps checkpoints, and the job always passes
# --resume, so a job cut off by a time limit continues where it stopped when rerun (with the
# same threads: the loader workers set the batch order, and another count is refused; the SLURM
# profile's set-threads replaces pretrain.threads, so a run resumes under the profile it started
# with). The
# patch stores are settings too: a cohort that gained or lost usable slides stops the rerun with
# one line naming the stores added and removed; delete results/pretrain/puzzle/checkpoints to
# pretrain on the new cohort (move the folder away first to keep its prompts), or leave the new
# slides out. The exported prompts come with an encoder card (the declared output), so a later
# run can name the result as an encoder.


rule pretrain_puzzle:
    input:
        qc=get_usable_qc,
    output:
        card=PUZZLE_CARD_FILE,
    params:
        stores=usable_stores,
        out=lambda wildcards, output: Path(output.card).parent,
        options=shell_args(
            [
                "--encoder", config["pretrain"]["encoder"],
                "--name", PUZZLE_CARD,
                "--epochs", config["pretrain"]["epochs"],
                "--batch-size", config["pretrain"]["batch_size"],
                "--device", config["device"],
                *models_dir_args(),
            ]
            + config["pretrain"]["extra_args"]
        ),
    log:
        "logs/pretrain_puzzle.log",
    benchmark:
        "benchmarks/pretrain_puzzle.tsv",
    threads: config["pretrain"]["threads"]
    resources:
        gpu=GPU_JOB,
    conda:
        "../envs/wsitools.yaml"
    shell:
        "wsitools pretrain puzzle --stores {params.stores} --out {params.out:q} {params.options}"
        " --workers {threads} --resume --quiet > {log:q} 2>&1"
