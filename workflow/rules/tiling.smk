# Tissue detection and tiling: one patch store per slide, then the cohort's QC table.
#
# `wsitools tile --keep-going` always writes {slide}.qc.json (status ok, no_tissue or failed,
# with the reason) and exits 0 for a slide it cannot use, so one bad slide never stops the
# cohort. It tiles in a worker process: a worker killed by a signal, the out-of-memory killer or
# a decoder crash still leaves the slide a `failed` qc.json saying how, so the QC checkpoint
# runs. A SIGTERM to the command itself (the scheduler cancelling the job) exits 143: the job
# fails and its output is dropped, so a rerun tiles the slide again. The QC table is a checkpoint: which slides go on to
# features and training is known once it exists. `--overwrite` lets a re-run replace a store
# made with other settings (a damaged store is rebuilt anyway).


rule tile:
    input:
        slide=get_slide,
    output:
        qc=f"{TILES}/{{slide}}.qc.json",
    params:
        out=lambda wildcards, output: Path(output.qc).parent,
        options=get_tile_options,
        # The slide file's size and mtime: a slide replaced by a file with an older mtime is tiled
        # again (Snakemake's params trigger; its mtime trigger sees only newer inputs).
        slide_file=lambda wildcards: slide_file_state(SAMPLES[wildcards.slide].path),
    log:
        "logs/tile/{slide}.log",
    benchmark:
        "benchmarks/tile/{slide}.tsv",
    threads: config["tiling"]["threads"]
    conda:
        "../envs/wsitools.yaml"
    shell:
        "wsitools tile {input.slide:q} --slide-id {wildcards.slide:q} --out {params.out:q} {params.options}"
        " --workers {threads} --keep-going --overwrite --quiet > {log:q} 2>&1"


checkpoint qc_summary:
    input:
        qc=expand(f"{TILES}/{{slide}}.qc.json", slide=SLIDES),
    output:
        table=report(
            "results/qc/summary.tsv",
            caption="../report/qc_summary.rst",
            category="1. Quality control",
            subcategory="QC summary",
            labels={"table": "QC summary", "format": "TSV (download)"},
        ),
        thumbnails=report(
            directory("results/qc/thumbnails"),
            patterns=["{slide}.png"],
            caption="../report/qc_thumbnail.rst",
            category="1. Quality control",
            subcategory="Tissue thumbnails",
            labels={"slide": "{slide}"},
        ),
    log:
        "logs/qc_summary.log",
    threads: 1
    conda:
        "../envs/wsitools.yaml"
    script:
        "../scripts/qc_summary.py"
