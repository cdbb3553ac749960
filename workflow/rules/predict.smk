# Predictions for the slides a task has no label for: every usable slide of the samples sheet
# whose label column is empty for a task is predicted by each trained head of that task (all
# fold models, probabilities and attention averaged), on the head's `device` with its
# `threads`; a head trained on patient bags (`bag: patient`) pools each patient's unlabelled slides
# (samples-sheet patient_id) into one bag, as it was trained. There is no such job when every usable slide is labelled. Heatmaps of these
# slides are drawn like those of the trained ones (when heatmaps are enabled).


rule predict:
    input:
        metrics=after_labels("results/heads/{task}/{encoder}/{head}/metrics.json"),
        features=get_predict_features,
        patients=lambda wildcards: config["samples"] if HEADS[wildcards.head]["bag"] == "patient" else [],
    output:
        predictions="results/predictions/{task}/{encoder}/{head}/predictions.csv",
        attention=directory("results/predictions/{task}/{encoder}/{head}/attention"),
    params:
        # from the wildcards: a dry run before the labels checkpoint has the checkpoint's file as input
        model=lambda wildcards: f"results/heads/{wildcards.task}/{wildcards.encoder}/{wildcards.head}",
        features=lambda wildcards: f"{FEATURES}/{wildcards.encoder}",
        slides=lambda wildcards: shell_args(unlabelled_slides(wildcards.task)),
        patients=get_predict_patients,
        out=lambda wildcards, output: Path(output.predictions).parent,
        device=lambda wildcards: HEADS[wildcards.head]["device"],
    log:
        "logs/predict/{task}/{encoder}/{head}.log",
    benchmark:
        "benchmarks/predict/{task}/{encoder}/{head}.tsv",
    threads: lambda wildcards: HEADS[wildcards.head]["threads"]
    resources:
        gpu=head_gpu,
    conda:
        "../envs/wsitools.yaml"
    shell:
        "wsitools predict --model {params.model:q} --features {params.features:q}"
        " --slides {params.slides}{params.patients} --device {params.device} --threads {threads}"
        " --out {params.out:q} --overwrite --strict --quiet > {log:q} 2>&1"


rule heatmap_predicted:
    input:
        attention="results/predictions/{task}/{encoder}/{head}/attention",
    output:
        pictures=report(
            directory("results/predictions/{task}/{encoder}/{head}/heatmaps"),
            patterns=["{slide}.{figure}.png"],
            caption="../report/heatmap.rst",
            category="5. Predictions",
            subcategory="{task} / {encoder} / {head}",
            labels={"slide": "{slide}", "figure": "{figure}"},
        ),
    params:
        stores=TILES,
        scale=config["heatmaps"]["scale"],
        cmap=config["heatmaps"]["cmap"],
        options=shell_args(config["heatmaps"]["extra_args"]),
    log:
        "logs/heatmap_predicted/{task}/{encoder}/{head}.log",
    benchmark:
        "benchmarks/heatmap_predicted/{task}/{encoder}/{head}.tsv",
    threads: 1
    conda:
        "../envs/wsitools.yaml"
    shell:
        "wsitools heatmap --attention {input.attention:q} --store {params.stores:q}"
        " --scale {params.scale} --cmap {params.cmap} {params.options} --out {output.pictures:q} --quiet > {log:q} 2>&1"
