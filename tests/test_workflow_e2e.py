"""The workflow end to end on a tiny synthetic cohort with one unreadable slide, then reuse.

One real run (module fixture): 8 small synthetic slides (half with a planted region) plus a copy
of the unreadable.svs fixture, tiled, embedded with the tiny test ViT, a PathoTune head with
2-fold cross-validation, heatmaps, the report. The other tests work on copies of that run
(mtimes and Snakemake's metadata kept) and only dry-run or run cheap steps.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from test_workflow import REPO, SLURM_PROFILE, dry_run_resources, job_counts, snakemake
from wsitools.tables import read_table
from wsitools.store import PatchStore
from wsitools.synthetic import make_cohort

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).parent / "data" / "openslide-fixtures"
ENCODER = "vit-test-tiny"
HEAD_DIR = Path("results/heads/planted") / ENCODER / "pathotune"
TASK = {
    "name": "planted",
    "description": "synthetic slides; is there a region of another tissue texture",
    "classes": {"negative": "one tissue texture only", "positive": "a region of another texture"},
}
CONFIG = {
    "samples": "config/samples.tsv",
    "device": "cpu",
    "features": {"encoders": [ENCODER], "batch_size": 32, "threads": 1},
    "tasks": {"planted": {"task_file": "config/task.yaml"}},
    "heads": {
        "pathotune": {"type": "pathotune", "prompts": ["tvp", "ivp"], "folds": 2, "threads": 1,
                      "extra_args": ["--epochs", "12", "--bootstrap", "100"]},
    },
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("e2e")
    slides = make_cohort(work, n_slides=8, size=(2048, 1536), seed=1)
    # Slide ids come from the sheet, not the file names: one slide's file is named otherwise.
    shutil.copyfile(FIXTURES / "unreadable.svs", work / "slides" / "scan-unreadable.svs")
    (work / "slides" / "slide_007.svs").rename(work / "slides" / "scan 7.svs")
    (work / "config").mkdir()
    rows = [f"{s.slide_id}\tslides/{Path(s.path).name}\t{s.slide_id}\t{s.label}" for s in slides[:-1]]
    rows.append(f"slide_007\tslides/scan 7.svs\tslide_007\t{slides[-1].label}")
    rows.append("broken\tslides/scan-unreadable.svs\tbroken\tnegative")
    (work / "config" / "samples.tsv").write_text(
        "slide_id\tpath\tpatient_id\tlabel\n" + "\n".join(rows) + "\n"
    )
    (work / "config" / "task.yaml").write_text(yaml.safe_dump(TASK))
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    result = snakemake(work, "--cores", "2", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work, result


def copy_run(work: Path, dest: Path) -> Path:
    """A copy of a finished run, with mtimes and Snakemake's metadata."""
    shutil.copytree(work, dest, symlinks=True)
    return dest


OK = [f"slide_{i:03d}" for i in range(8)]


def test_qc_table_names_the_unreadable_slide_and_the_run_ends_with_a_summary(run):
    work, result = run
    rows = {r["slide_id"]: r for r in read_table(work / "results/qc/summary.tsv")}
    assert sorted(rows) == sorted(OK + ["broken"])
    assert rows["broken"]["status"] == "failed"
    assert "scan-unreadable.svs" in rows["broken"]["reason"] and rows["broken"]["n_tiles"] == ""
    for sid in OK:
        r = rows[sid]
        store = PatchStore.open(work / "results/tiles" / f"{sid}.zarr")
        assert r["status"] == "ok" and int(r["n_tiles"]) == len(store) > 0
        assert (float(r["mpp"]), float(r["mpp_target"]), r["level"]) == (0.5, 0.5, "0")
        assert float(r["tissue_area_mm2"]) > 0.05
    assert not (work / "results/tiles/broken.zarr").exists()
    out = result.stdout + result.stderr
    assert "QC: 9 slides: 1 failed, 8 ok" in out and "left out: broken (failed)" in out
    assert sorted(p.name for p in (work / "results/qc/thumbnails").glob("*.png")) == [f"{s}.png" for s in OK]


def test_features_match_the_stores(run):
    work, _ = run
    for sid in OK:
        store = PatchStore.open(work / "results/tiles" / f"{sid}.zarr")
        with h5py.File(work / "results/features" / ENCODER / f"{sid}.h5", "r") as f:
            assert f["features"].shape == (len(store), 64)
            np.testing.assert_array_equal(f["coords"][()], store.coords)
            assert np.isfinite(f["features"][()]).all()
    assert not (work / "results/features" / ENCODER / "broken.h5").exists()


def test_head_metrics_predictions_and_heatmaps(run):
    work, _ = run
    labels = read_table(work / "results/heads/planted/labels.tsv")
    assert [r["slide_id"] for r in labels] == OK  # the failed slide is left out of training
    metrics = json.loads((work / HEAD_DIR / "metrics.json").read_text())
    assert (metrics["n_slides"], metrics["classes"], metrics["prompts"]) == (
        8, ["negative", "positive"], ["tvp", "ivp"])
    assert len(metrics["folds"]) == 2
    with open(work / HEAD_DIR / "predictions.csv") as f:
        predicted = sorted(line.split(",")[0] for line in f.read().splitlines()[1:])
    assert predicted == OK
    heatmaps = work / "results/heatmaps/planted" / ENCODER / "pathotune"
    names = sorted(p.name for p in heatmaps.glob("*.png"))
    assert names == sorted([f"{s}.heatmap.png" for s in OK] + [f"{s}.top_tiles.png" for s in OK])
    assert sorted(p.name for p in heatmaps.glob("*.geojson")) == [f"{s}.attention.geojson" for s in OK]
    detections = json.loads((heatmaps / "slide_003.attention.geojson").read_text())["features"]
    with h5py.File(work / "results/features" / ENCODER / "slide_003.h5") as f:
        assert len(detections) == f["coords"].shape[0]
    assert {d["properties"]["objectType"] for d in detections} == {"detection"}
    table = read_table(work / "results/report/metrics.tsv")
    assert [(r["task"], r["encoder"], r["head"], r["n_slides"]) for r in table] == [
        ("planted", ENCODER, "pathotune", "8")]
    assert float(table[0]["auroc"]) == pytest.approx(metrics["pooled"]["auroc"], abs=1e-4)
    assert (work / "results/report/roc/planted.png").stat().st_size > 10_000


def test_report_has_qc_metrics_roc_and_heatmaps(run, tmp_path):
    work = copy_run(run[0], tmp_path / "w")
    result = snakemake(work, "--report", "report.html")
    assert result.returncode == 0, result.stderr
    html = (work / "report.html").read_text()
    for needle in ("1. Quality control", "2. Metrics", "3. Curves", "4. Heatmaps",
                   "Predictions: heatmaps of the slides without a label",  # front page: every section
                   "summary.tsv", "qc_summary.html", "metrics.html", "slide_003.png", "planted.png",
                   "slide_003.heatmap.png"):
        assert needle in html, needle
    results = json.loads(re.search(r"var results = (\{.*?\});\n", html, flags=re.S).group(1))
    pages = sorted(Path(path).name for path, entry in results.items() if entry["mime_type"] == "text/html")
    assert pages == ["metrics.html", "qc_summary.html"]  # the tables, shown inline


def test_adding_a_head_reruns_only_head_rules(run, tmp_path):
    work = copy_run(run[0], tmp_path / "w")
    config = yaml.safe_load((work / "config/config.yaml").read_text())
    config["heads"]["abmil"] = {"type": "abmil", "folds": 2}
    (work / "config/config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(work, "-n")
    assert result.returncode == 0, result.stderr
    assert job_counts(result.stdout) == {"train": 1, "heatmap": 1, "metrics_table": 1, "roc": 1, "all": 1}
    assert "wildcards: task=planted, encoder=vit-test-tiny, head=abmil" in result.stdout


def test_adding_a_slide_tiles_and_extracts_only_it(run, tmp_path):
    work = copy_run(run[0], tmp_path / "w")
    shutil.copyfile(work / "slides/slide_003.svs", work / "slides/extra.svs")  # a new slide
    with open(work / "config/samples.tsv", "a") as f:
        f.write("extra\tslides/extra.svs\textra\tpositive\n")
    counts = job_counts(snakemake(work, "-n").stdout)
    assert counts["tile"] == 1 and counts["qc_summary"] == 1
    qc = snakemake(work, "--cores", "1", "results/qc/summary.tsv")  # tile the new slide, re-QC
    assert qc.returncode == 0, qc.stderr
    assert [p.name for p in (work / "logs/tile").iterdir()].count("extra.log") == 1
    result = snakemake(work, "-n", "--profile", str(SLURM_PROFILE))
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    assert counts["extract"] == 1 and "tile" not in counts
    assert "output: results/features/vit-test-tiny/extra.h5" in result.stdout
    jobs = dry_run_resources(result.stdout)
    assert "gpu=1" in jobs["extract"] and "slurm_partition=<gpu-partition>" in jobs["extract"]
    assert counts["train"] == 1  # the new slide is labelled: the head retrains, on a GPU node
    assert "gpu=1" in jobs["train"] and "slurm_partition=<gpu-partition>" in jobs["train"]


def test_a_sheet_edit_that_keeps_the_labels_retrains_no_head(run, tmp_path):
    """An edit of the samples sheet that leaves the task's labels as they were (a new column)
    reruns the labels step, which writes the same table: its checksum decides, no head retrains,
    and nothing planned behind the heads (predictions, heatmaps, report figures) runs again."""
    work = copy_run(run[0], tmp_path / "w")
    sheet = work / "config/samples.tsv"
    lines = sheet.read_text().splitlines()
    sheet.write_text("\n".join([lines[0] + "\tnote", *(line + "\tscanned 2024" for line in lines[1:])]) + "\n")
    labels = work / "results/heads/planted/labels.tsv"
    before = {p: p.read_bytes() for p in (labels, work / HEAD_DIR / "metrics.json", work / HEAD_DIR / "predictions.csv")}
    mtimes = {p: p.stat().st_mtime_ns for p in before}
    result = snakemake(work, "--cores", "1", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ran = re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):", result.stdout + result.stderr, re.M)
    assert "labels" in ran and not {"train", "predict", "heatmap", "metrics_table", "roc"} & set(ran), ran
    assert {p: p.read_bytes() for p in before} == before
    assert labels.stat().st_mtime_ns > mtimes[labels]  # rewritten, with the same content
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in before if p != labels)


def test_an_unlabelled_slide_is_predicted_by_the_trained_head(run, tmp_path):
    work = copy_run(run[0], tmp_path / "w")
    shutil.copyfile(work / "slides/slide_003.svs", work / "slides/new.svs")
    with open(work / "config/samples.tsv", "a") as f:
        f.write("new\tslides/new.svs\tnew\t\n")  # no label: predicted, not trained on
    result = snakemake(work, "--cores", "2", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [r["slide_id"] for r in read_table(work / "results/heads/planted/labels.tsv")] == OK
    out = work / "results/predictions/planted" / ENCODER / "pathotune"
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["slide_id"] for r in rows] == ["new"]
    probs = [float(rows[0]["prob_negative"]), float(rows[0]["prob_positive"])]
    assert sum(probs) == pytest.approx(1.0, abs=1e-5) and rows[0]["pred"] in TASK["classes"]
    with h5py.File(out / "attention" / "new.h5") as f, h5py.File(work / "results/features" / ENCODER / "new.h5") as g:
        assert f["attention"].shape == (g["features"].shape[0],)
        assert float(f["attention"][()].sum()) == pytest.approx(1.0, abs=1e-4)
    assert sorted(p.name for p in (out / "heatmaps").iterdir() if not p.name.startswith(".")) == [
        "new.attention.geojson", "new.heatmap.png", "new.top_tiles.png"]


def test_a_new_batch_size_reuses_the_feature_stores(run, tmp_path):
    """`features: batch_size` says how fast, not what: a new one re-extracts nothing (and is used
    by the next extraction), while a setting that changes the features re-extracts every store."""
    work = copy_run(run[0], tmp_path / "w")
    config = yaml.safe_load((work / "config/config.yaml").read_text())
    config["features"]["batch_size"] = 8
    (work / "config/config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(work, "-n")
    assert result.returncode == 0, result.stderr
    assert "Nothing to be done" in result.stdout + result.stderr
    forced = snakemake(work, "-n", "--printshellcmds", "--forcerun", "extract")
    assert f"--encoder {ENCODER} " in forced.stdout and "--batch-size 8 " in forced.stdout
    # the cards moved to another folder: where they are is not what they are
    cards = work / "cards"
    cards.mkdir()
    shutil.copy(REPO / "models" / f"{ENCODER}.yaml", cards)
    config["models_dir"] = str(cards)
    (work / "config/config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(work, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr, result.stdout + result.stderr
    assert f"--models-dir {cards} " in snakemake(work, "-n", "--printshellcmds", "--forcerun", "extract").stdout
    # an edited card is another encoder: its old features are named before any job runs
    card = cards / f"{ENCODER}.yaml"
    card.write_text(card.read_text().replace("init_seed: 0", "init_seed: 1"))
    result = snakemake(work, "-n")
    assert result.returncode != 0
    assert (f"results/features/{ENCODER}: its feature stores were made by another version of encoder card "
            f"'{ENCODER}'") in result.stdout + result.stderr
    card.write_text(card.read_text().replace("init_seed: 1", "init_seed: 0"))
    config["features"]["precision"] = "fp32"
    (work / "config/config.yaml").write_text(yaml.safe_dump(config))
    counts = job_counts(snakemake(work, "-n").stdout)
    assert counts["extract"] == len(OK)


def test_features_extracted_in_one_process_are_reused(run, tmp_path):
    """The large-cohort recipe of docs/cluster.md: after QC, one `wsitools extract` over many patch
    stores (one process's start-up for all of them) writes the feature stores where the workflow
    keeps them, and the workflow then plans no extraction job, even with no record of its own."""
    work = copy_run(run[0], tmp_path / "w")
    shutil.rmtree(work / "results/features")
    shutil.rmtree(work / ".snakemake/metadata")
    usable = [r["slide_id"] for r in read_table(work / "results/qc/summary.tsv") if r["status"] == "ok"]
    assert sorted(usable) == OK
    stores = [str(work / "results/tiles" / f"{s}.zarr") for s in usable]
    extract = subprocess.run(
        ["wsitools", "extract", *stores, "--encoder", ENCODER, "--out", "results/features",
         "--device", "cpu", "--workers", "0", "--quiet"],
        cwd=work, capture_output=True, text=True, timeout=300,
    )
    assert extract.returncode == 0, extract.stderr
    counts = job_counts(snakemake(work, "-n").stdout)
    assert "extract" not in counts and counts["train"] == 1, counts
