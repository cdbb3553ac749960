# Feature extraction: one feature store per (encoder, slide), the unit of reuse.
#
# A feature file depends only on its slide's patch store and the encoder, never on tasks or
# heads, so adding a head, a task or a fold setting reuses every feature file, and adding
# slides extracts only the new ones. Only slides that passed QC are asked for (see
# usable_slides in common.smk).


rule extract:
    input:
        qc=f"{TILES}/{{slide}}.qc.json",
    output:
        h5=f"{FEATURES}/{{encoder}}/{{slide}}.h5",
    params:
        store=lambda wildcards, input: stores_of([input.qc]),
        out=lambda wildcards, output: Path(output.h5).parent.parent,
        options=shell_args(
            [
                "--device", config["device"],
                "--precision", config["features"]["precision"],
                "--dtype", config["features"]["dtype"],
            ]
            + config["features"]["extra_args"]
        ),
        # How fast, not what: a batch size does not change the features. As a function of the
        # job's threads Snakemake counts it as derived, not as a setting of the output, so a new
        # batch size does not re-extract finished feature stores.
        batch_size=lambda wildcards, threads: config["features"]["batch_size"],
        # Where the cards are, not what they are: every run checks that an encoder's feature
        # stores were made by its card as it is now (check_features_current in common.smk), so
        # moving the cards to another folder re-extracts nothing.
        models=lambda wildcards, threads: shell_args(models_dir_args()),
    log:
        "logs/extract/{encoder}/{slide}.log",
    benchmark:
        "benchmarks/extract/{encoder}/{slide}.tsv",
    threads: config["features"]["threads"]
    resources:
        gpu=GPU_JOB,
    conda:
        "../envs/wsitools.yaml"
    shell:
        "wsitools extract {params.store} --encoder {wildcards.encoder:q} --out {params.out:q}"
        " {params.options} {params.models} --batch-size {params.batch_size} --workers {threads} --quiet > {log:q} 2>&1"


# Export of an encoder's feature stores of the usable slides in CLAM's or TRIDENT's layout
# (config `export`); the folder is remade whenever a feature store changes.
rule export:
    input:
        h5=lambda wildcards: expand(
            f"{FEATURES}/{wildcards.encoder}/{{slide}}.h5", slide=usable_slides()
        ),
    output:
        directory("results/export/{to}/{encoder}"),
    params:
        features=lambda wildcards: f"{FEATURES}/{wildcards.encoder}",
        slides=lambda wildcards: shell_args(usable_slides()),
    log:
        "logs/export/{to}/{encoder}.log",
    wildcard_constraints:
        to="clam|trident",
    conda:
        "../envs/wsitools.yaml"
    shell:
        "wsitools export --to {wildcards.to} --features {params.features:q} --out {output:q}"
        " --slides {params.slides} --quiet > {log:q} 2>&1"
