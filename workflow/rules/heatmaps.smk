# Attention heatmaps: one job per trained head draws every slide it was evaluated on, from the
# out-of-fold attention that training wrote (each slide seen by the fold model that did not
# train on it): {slide}.heatmap.png over the slide's thumbnail (colour scale and map from
# config heatmaps.scale and .cmap, which the report's caption describes), {slide}.top_tiles.png
# montage, and {slide}.attention.geojson (the attention as QuPath detections; not in the report,
# whose pattern takes the PNGs only).


rule heatmap:
    input:
        attention=after_labels("results/heads/{task}/{encoder}/{head}/attention"),
    output:
        pictures=report(
            directory("results/heatmaps/{task}/{encoder}/{head}"),
            patterns=["{slide}.{figure}.png"],
            caption="../report/heatmap.rst",
            category="4. Heatmaps",
            subcategory="{task} / {encoder} / {head}",
            labels={"slide": "{slide}", "figure": "{figure}"},
        ),
    params:
        # from the wildcards: a dry run before the labels checkpoint has the checkpoint's file as input
        attention=lambda wildcards: f"results/heads/{wildcards.task}/{wildcards.encoder}/{wildcards.head}/attention",
        stores=TILES,
        scale=config["heatmaps"]["scale"],
        cmap=config["heatmaps"]["cmap"],
        options=shell_args(config["heatmaps"]["extra_args"]),
    log:
        "logs/heatmap/{task}/{encoder}/{head}.log",
    benchmark:
        "benchmarks/heatmap/{task}/{encoder}/{head}.tsv",
    threads: 1
    conda:
        "../envs/wsitools.yaml"
    shell:
        "wsitools heatmap --attention {params.attention:q} --store {params.stores:q}"
        " --scale {params.scale} --cmap {params.cmap} {params.options} --out {output.pictures:q} --quiet > {log:q} 2>&1"
