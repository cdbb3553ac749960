"""The Snakemake workflow without running jobs: cohort tables, config validation, dry runs, lint.

The end-to-end run is in test_workflow_e2e.py. Here every Snakemake call is a dry run or a lint
(a few seconds each), on slides that only need to exist.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from wsitools.labels import check_outcome_labels, task_columns, write_labels
from wsitools.report import QC_COLUMNS, plot_outcomes, plot_roc, qc_report, usable_slides, write_metrics_table, write_qc_html, write_qc_summary
from wsitools.samples import (
    Sample, config_error, read_samples, run_failure_line, samples_from_glob, snakemake_command,
)
from wsitools.tables import read_table, write_table
from wsitools.cli import Stopped
from wsitools.errors import ConfigError, DataError, WsiToolsError
from wsitools.metrics import METRICS, binary_auroc, roc_points

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "data" / "openslide-fixtures"
SLURM_PROFILE = REPO / "config" / "profiles" / "slurm"
TASK = {
    "name": "planted",
    "description": "synthetic slides; is there a region of another texture",
    "classes": {"neg": "one texture only", "pos": "a region of another texture"},
}


def write_sheet(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    return path


def make_project(root: Path, n: int = 6, config: dict | None = None) -> Path:
    """A working directory with ``n`` slide files (one patient each; every third positive, so
    six make the smallest cohort that 2-fold cross-validation takes), a samples sheet, a task
    and a config."""
    (root / "slides").mkdir(parents=True)
    (root / "config").mkdir()
    rows = []
    for i in range(n):
        shutil.copyfile(FIXTURES / "small.svs", root / "slides" / f"s{i}.svs")
        rows.append([f"s{i}", f"slides/s{i}.svs", f"p{i}", "pos" if i % 3 == 1 else "neg"])
    write_sheet(root / "config" / "samples.tsv", ["slide_id", "path", "patient_id", "label"], rows)
    (root / "config" / "task.yaml").write_text(yaml.safe_dump(TASK))
    base = {
        "samples": "config/samples.tsv",
        "device": "cpu",
        "tasks": {"planted": {"task_file": "config/task.yaml"}},
        "heads": {"abmil": {"type": "abmil", "folds": 2}},
    }
    base.update(config or {})
    if any((base.get(step) or {}).get("enabled") for step in ("pretrain", "tune")) and "models_dir" not in base:
        base["models_dir"] = stand_in_models(root / "models")
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(base))
    return root


def stand_in_models(folder: Path) -> str:
    """A models folder with the checkout's encoder cards and an empty stand-in for each weight
    file a card downloads: a run checks that the weight files of every encoder the config names
    are there before any job, and a dry run loads none."""
    folder.mkdir()
    for card in (REPO / "models").glob("*.yaml"):
        shutil.copyfile(card, folder / card.name)
        for weight in yaml.safe_load(card.read_text())["weights"]:
            if "package" not in weight:
                (folder / weight["file"]).touch()
    return str(folder)


def snakemake(workdir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run this checkout's workflow in ``workdir`` with Snakemake's CLI, output captured."""
    return subprocess.run(
        snakemake_command(workdir, *args), capture_output=True, text=True, timeout=timeout
    )


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    block = output.split("Job stats:", 1)[1]
    counts = {}
    for line in block.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


# --- samples sheets ------------------------------------------------------------------------------


def test_samples_sheet_is_read_with_defaults_and_overrides(tmp_path):
    for name in ("a.svs", "b.tiff"):
        (tmp_path / name).write_bytes(b"x")
    sheet = write_sheet(
        tmp_path / "s.tsv",
        ["slide_id", "path", "patient_id", "label", "mpp", "grade"],
        [["A-1", str(tmp_path / "a.svs"), "P1", "pos", "0.25", "G2"],
         ["B_2", str(tmp_path / "b.tiff"), "", "neg", "", ""]],
    )
    a, b = read_samples(sheet)
    assert (a.slide_id, a.patient_id, a.mpp, a.value("label"), a.value("grade")) == (
        "A-1", "P1", 0.25, "pos", "G2")
    assert (b.slide_id, b.patient_id, b.mpp, b.value("grade")) == ("B_2", "B_2", None, "")


@pytest.mark.parametrize(
    "rows, message",
    [
        ([["s1", "a.svs"], ["s1", "b.svs"]], "duplicate slide id 's1'"),
        ([["../up", "a.svs"]], "unsafe slide id '../up'"),
        ([["s 1", "a.svs"]], "unsafe slide id 's 1'"),
        ([["s1", ""]], "has no path"),
        ([["s1", "missing.svs"]], "file missing.svs does not exist"),
        ([["s1", "a.svs"], ["s2", "b.svs"], ["s3", "./a.svs"]],
         "slides 's1' (a.svs) and 's3' (./a.svs) are one file; list each slide once"),
        ([["s1", "a.svs"], ["s2", "link.svs"]], "slides 's1' (a.svs) and 's2' (link.svs) are one file"),
        ([["s1", "a.svs"], ["s2", "hard.svs"]], "slides 's1' (a.svs) and 's2' (hard.svs) are one file"),
        ([["s1", "a.svs"], ["s2", "folder"]], "slide 's2': folder is a directory, expected a slide file"),
        ([["S1", "a.svs"], ["s1", "b.svs"]], "slide ids 'S1' (a.svs) and 's1' (b.svs) differ only in case"),
    ],
)
def test_bad_samples_sheet_names_the_problem(tmp_path, monkeypatch, rows, message):
    monkeypatch.chdir(tmp_path)
    for name in ("a.svs", "b.svs"):
        Path(name).write_bytes(b"x")
    Path("link.svs").symlink_to("a.svs")
    os.link("a.svs", "hard.svs")
    Path("folder").mkdir()
    sheet = write_sheet(tmp_path / "s.tsv", ["slide_id", "path"], rows)
    with pytest.raises(DataError, match=re.escape(message)) as err:
        read_samples(sheet)
    assert str(sheet) in str(err.value)


def test_samples_sheet_mpp_and_columns_are_checked(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"x")
    bad_mpp = write_sheet(tmp_path / "m.tsv", ["slide_id", "path", "mpp"], [["s1", str(tmp_path / "a.svs"), "40"]])
    with pytest.raises(DataError, match=r"row 2 \(slide 's1'\): mpp 40 is outside"):
        read_samples(bad_mpp)
    commas = tmp_path / "c.tsv"
    commas.write_text("slide_id,path\ns1,a.svs\n")
    with pytest.raises(DataError, match="missing column.*tab-separated"):
        read_samples(commas)


def test_slide_glob_gives_ids_from_file_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("slides").mkdir()
    for name in ("b.svs", "a.ome.tiff"):
        Path("slides", name).write_bytes(b"x")
    samples = samples_from_glob("slides/*")
    assert [(s.slide_id, s.path) for s in samples] == [("a", "slides/a.ome.tiff"), ("b", "slides/b.svs")]
    Path("slides", "b.tiff").write_bytes(b"x")
    with pytest.raises(DataError, match="duplicate slide id 'b'"):
        samples_from_glob("slides/*")
    with pytest.raises(DataError, match="matches no file"):
        samples_from_glob("nothing/*.svs")


# --- QC summary and labels -------------------------------------------------------------------


def write_qc(folder: Path, slide_id: str, **record) -> Path:
    path = folder / f"{slide_id}.qc.json"
    path.write_text(json.dumps({"slide_id": slide_id, **record}))
    return path


def test_qc_summary_table_thumbnails_and_report(tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    files = [
        write_qc(tiles, "s2", status="ok", reason="", mpp=0.2527, level=1, tissue_area_mm2=1.5,
                 n_tiles=120, mpp_target=0.5, level_downsample=2.0, slide_path="/x/s2.svs"),
        write_qc(tiles, "s1", status="failed", reason="cannot open\tthe file", slide_path="/x/s1.svs"),
        write_qc(tiles, "s3", status="no_tissue", reason="no tile has tissue", n_tiles=0),
    ]
    (tiles / "s2.tissue.png").write_bytes(b"png-s2")
    (tiles / "s3.tissue.png").write_bytes(b"png-s3")
    table = tmp_path / "qc" / "summary.tsv"
    write_qc_summary(files, table, thumbnails=tmp_path / "qc" / "thumbs")

    rows = read_table(table)
    assert list(rows[0]) == list(QC_COLUMNS)
    assert [r["slide_id"] for r in rows] == ["s1", "s2", "s3"]
    assert rows[0]["status"] == "failed" and rows[0]["reason"] == "cannot open the file"
    assert rows[0]["mpp"] == "" and rows[0]["n_tiles"] == ""
    assert (rows[1]["mpp"], rows[1]["level"], rows[1]["tissue_area_mm2"], rows[1]["n_tiles"]) == (
        "0.2527", "1", "1.5", "120")
    assert usable_slides(table) == ["s2"]
    assert sorted(p.name for p in (tmp_path / "qc" / "thumbs").iterdir()) == ["s2.png", "s3.png"]
    assert (tmp_path / "qc" / "thumbs" / "s2.png").read_bytes() == b"png-s2"
    text = qc_report(table)
    assert "3 slides: 1 failed, 1 no_tissue, 1 ok" in text
    assert "left out: s1 (failed): cannot open the file" in text
    assert "try it again" not in qc_report(table, tiles_dir="results/tiles")


def test_the_run_summary_says_how_to_retry_a_slide_whose_tiling_was_killed(tmp_path):
    from wsitools.tiling import death_reason

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    files = [write_qc(tiles, "big", status="failed", reason=f"/x/big.svs: tiling was {death_reason(-9)}")]
    table = tmp_path / "qc" / "summary.tsv"
    write_qc_summary(files, table, thumbnails=tmp_path / "qc" / "thumbs")
    lines = qc_report(table, tiles_dir="results/tiles").splitlines()
    assert lines[1] == ("  left out: big (failed): /x/big.svs: tiling was killed by signal 9 (SIGKILL: out of memory, "
                        "a time limit, or killed by hand)")
    assert lines[2] == "    to try it again: snakemake ... -R results/tiles/big.qc.json"


def test_qc_and_metrics_tables_as_html_pages(tmp_path):
    import html.parser

    table = tmp_path / "summary.tsv"
    write_table(table, [
        {"slide_id": "a<b", "status": "ok", "reason": "", "mpp": "0.25", "n_tiles": "120"},
        {"slide_id": "c", "status": "failed", "reason": "cannot open & read", "mpp": "", "n_tiles": ""},
    ], QC_COLUMNS)
    page = tmp_path / "qc.html"
    write_qc_html(table, page)

    class Cells(html.parser.HTMLParser):
        """Rows of the page's table as (tr class, [cell texts]), header first."""

        def __init__(self):
            super().__init__()
            self.rows, self.cell = [], None

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append((dict(attrs).get("class"), []))
            elif tag in ("td", "th"):
                self.cell = ""

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                self.rows[-1][1].append(self.cell)
                self.cell = None

    parser = Cells()
    text = page.read_text()
    parser.feed(text)
    header, *rows = parser.rows
    assert header[1] == list(QC_COLUMNS)
    assert rows[0] == (None, ["a<b", "ok", "", "0.25", "", "", "", "", "120", ""])
    assert rows[1][0] == "left-out" and rows[1][1][:3] == ["c", "failed", "cannot open & read"]
    assert "<td>a&lt;b</td>" in text and "1 failed, 1 ok. Rows tinted red are slides left out" in text

    a = write_head_run(tmp_path, "t", "enc", "abmil", ["neg"], [[0.4, 0.6]], ["neg", "pos"])
    write_metrics_table([a / "metrics.json"], tmp_path / "m.tsv", html_out=tmp_path / "m.html")
    parser = Cells()
    parser.feed((tmp_path / "m.html").read_text())
    header, row = parser.rows
    cells = dict(zip(header[1], row[1]))
    assert (cells["head"], cells["auroc"], cells["auroc over folds"], cells["f1"], cells["f1 over folds"]) == (
        "abmil", "0.8750 [0.7000, 1.0000]", "0.8000 ± 0.1000 (3 folds)", "0.7333", "0.5000 (1 of 3 folds)")


# --- the HTML report -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded_workflow(tmp_path_factory):
    """The workflow parsed by Snakemake's API on a small project (rules, config with defaults)."""
    from snakemake.api import ConfigSettings, OutputSettings, ResourceSettings, SnakemakeApi, StorageSettings

    root = make_project(tmp_path_factory.mktemp("report") / "w")
    with SnakemakeApi(OutputSettings()) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(), storage_settings=StorageSettings(),
            config_settings=ConfigSettings(configfiles=[root / "config" / "config.yaml"]),
            workdir=root, snakefile=REPO / "workflow" / "Snakefile",
        )._workflow
        yield workflow


def report_outputs(workflow) -> list[tuple[str, str, object]]:
    from snakemake.io import is_flagged

    return [(rule.name, str(f), f.flags["report"]) for rule in workflow.rules for f in rule.output
            if is_flagged(f, "report")]


def test_every_report_output_is_in_a_listed_section_and_tables_render(loaded_workflow):
    outputs = report_outputs(loaded_workflow)
    front = (REPO / "workflow" / "report" / "workflow.rst").read_text()
    listed = re.findall(r"^(\d\. [A-Z][a-z A-Z]+):", front, flags=re.M)
    assert listed == ["1. Quality control", "2. Metrics", "3. Curves", "4. Heatmaps", "5. Predictions"]
    categories = {r.category for _, _, r in outputs}
    assert categories == {c.replace(":", "") for c in listed}  # every section listed, none missing
    assert {name for name, _, _ in outputs} == {"qc_summary", "qc_table", "metrics_table", "roc", "outcome_figure",
                                                 "heatmap", "heatmap_predicted"}
    for name, path, r in outputs:
        assert r.subcategory, f"{name}: {path} would land under 'Other'"
        assert Path(r.caption.get_path_or_uri(secret_free=True)).is_file()
    # Snakemake's report shows text/html inline and offers any other text file as a download:
    # every table (TSV) has an HTML page beside it in the same subcategory.
    tables = [(r.subcategory, r.labels["table"]) for _, path, r in outputs if path.endswith(".tsv")]
    pages = [(r.subcategory, r.labels["table"]) for _, path, r in outputs if path.endswith(".html")]
    assert sorted(tables) == sorted(pages) == [("Metrics of every head", "metrics of every head"),
                                               ("QC summary", "QC summary")]
    # The report turns the "format" label into a toggle whose values it sorts by UTF-16 code unit
    # (JavaScript's default sort) and selects the first: the HTML page must sort first.
    formats = {r.labels["format"] for _, path, r in outputs if path.endswith((".tsv", ".html"))}
    assert sorted(formats, key=lambda f: f.encode("utf-16-be")) == ["HTML table", "TSV (download)"]
    import mimetypes

    assert all(mimetypes.guess_type(path)[0] == "text/html" for _, path, _ in outputs if path.endswith(".html"))


def render_caption(name: str, config: dict, **wildcards: str) -> str:
    """A caption as Snakemake's report renders it (Jinja with ``snakemake``, then docutils), its
    whitespace runs made single spaces."""
    from types import SimpleNamespace

    import jinja2
    from docutils.core import publish_parts

    text = (REPO / "workflow" / "report" / name).read_text()
    rst = jinja2.Environment().from_string(text).render(
        snakemake=SimpleNamespace(config=config, wildcards=SimpleNamespace(**wildcards)))
    parts = publish_parts(rst, writer="html", settings_overrides={"halt_level": 2, "report_level": 2})
    return " ".join(parts["body"].split())


@pytest.mark.parametrize("scale, says, not_says", [
    ("rank", "percentile within this slide", "fixed log scale"),
    ("minmax", "scaled linearly between this slide", "percentile within"),
    ("absolute", "fixed log scale from 1", "percentile within"),
])
def test_heatmap_caption_says_what_the_colours_mean(loaded_workflow, scale, says, not_says):
    import copy

    config = copy.deepcopy(loaded_workflow.config)
    config["heatmaps"]["scale"] = scale
    flat = render_caption("heatmap.rst", config, head="abmil", task="t", encoder="e", slide="s1")
    assert says in flat and not_says not in flat and "attention weight" not in flat
    assert "Colour map inferno" in re.sub(r"<[^>]+>", "", flat)
    assert "s1.attention.geojson" in flat and "level-0" in flat


def test_every_rule_runs_locally_or_is_sized_in_the_slurm_profile(loaded_workflow):
    """On a cluster a rule is either a small cohort table or figure run where snakemake runs
    (local), or a job whose resources the SLURM profile sets; never a job of default size."""
    profile = yaml.safe_load((SLURM_PROFILE / "config.v8+.yaml").read_text())
    rules = {rule.name: rule for rule in loaded_workflow.rules}
    local = loaded_workflow._localrules | {name for name, rule in rules.items() if rule.norun}  # `localrules:`, `all`
    sized = set(profile["set-resources"])
    assert sized <= set(rules)
    assert local == {"all", "qc_summary", "qc_table", "labels", "metrics_table", "roc", "outcome_figure", "export"}
    assert sorted(set(rules) - local - sized) == []


def test_memory_and_time_limits_live_in_the_slurm_profile_not_in_the_rules(loaded_workflow):
    """Resources and partitions are the site's: no rule declares memory or a time limit, every rule
    submitted to SLURM has both under set-resources, and the defaults cover the local rules. A
    rule keeps only its GPU, which it computes from the config."""
    profile = yaml.safe_load((SLURM_PROFILE / "config.v8+.yaml").read_text())
    declared = {rule.name: sorted(set(rule.resources) - {"_cores", "_nodes", "tmpdir"}) for rule in loaded_workflow.rules}
    assert {name: keys for name, keys in declared.items() if keys} == {
        name: ["gpu"] for name in ("extract", "train", "predict", "pretrain_puzzle", "tune_pathotune")}
    assert profile["default-resources"]["mem_mb"] >= 2000 and profile["default-resources"]["runtime"] >= 10
    for name, resources in profile["set-resources"].items():
        assert resources["mem_mb"] >= 4000 and resources["runtime"] >= 60, name
    assert profile["set-resources"]["pretrain_puzzle"]["runtime"] == 2880
    local = yaml.safe_load((REPO / "config" / "profiles" / "local" / "config.v8+.yaml").read_text())
    assert local["resources"] == {"gpu": 1}  # no memory limit: the rules declare none

def test_every_caption_renders(loaded_workflow):
    wildcards = {"head": "abmil", "task": "t", "encoder": "e", "slide": "s1"}
    for caption in sorted((REPO / "workflow" / "report").glob("*.rst")):
        body = render_caption(caption.name, loaded_workflow.config, **wildcards)
        assert len(body) > 200 and "System Message" not in body, caption.name
    assert "tinted red" in render_caption("qc_summary.rst", loaded_workflow.config)
    assert "dashed grey diagonal" in render_caption("roc.rst", loaded_workflow.config, task="t")


def test_labels_keep_usable_labelled_slides_only(tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    qc = [write_qc(tiles, f"s{i}", status="failed" if i == 1 else "ok", reason="") for i in range(5)]
    table = tmp_path / "summary.tsv"
    write_qc_summary(qc, table)
    samples = [
        Sample(f"s{i}", f"s{i}.svs", f"p{i // 2}", fields={"label": lab, "grade": "g"})
        for i, lab in enumerate(["neg", "pos", "pos", "", "neg"])
    ]
    out = tmp_path / "labels.tsv"
    write_labels(samples, usable=usable_slides(table), columns={"label": "label"}, out=out)
    assert read_table(out) == [
        {"slide_id": "s0", "patient_id": "p0", "label": "neg"},
        {"slide_id": "s2", "patient_id": "p1", "label": "pos"},
        {"slide_id": "s4", "patient_id": "p2", "label": "neg"},
    ]
    with_folds = [Sample(s.slide_id, s.path, s.patient_id, fields={**s.fields, "fold": str(i % 2)})
                  for i, s in enumerate(samples)]
    write_labels(with_folds, usable=["s0", "s2"], columns={"label": "label"}, out=out)
    assert read_table(out) == [
        {"slide_id": "s0", "patient_id": "p0", "label": "neg", "fold": "0"},
        {"slide_id": "s2", "patient_id": "p1", "label": "pos", "fold": "0"},
    ]
    with pytest.raises(DataError, match=r"class\(es\) \['g'\]: training needs at least two"):
        write_labels(samples, usable=["s0", "s2"], columns={"label": "grade"}, out=out)
    with pytest.raises(DataError, match="no column 'stage'"):
        write_labels(samples, usable=["s0"], columns={"label": "stage"}, out=out)


def test_labels_refuse_one_slide_under_two_ids_as_copies(tmp_path):
    """A byte copy of a slide under another id (not a link, which the sheet's check catches) is
    found by the slide fingerprint the patch stores record, before a labels table puts the two
    in the training and the test part of one fold."""
    from wsitools.tiling import tile_slide

    (tmp_path / "slides").mkdir()
    files = {"a": "small.svs", "b": "boxes.tiff", "c": "small.svs"}
    samples = []
    for i, (slide_id, fixture) in enumerate(files.items()):
        path = tmp_path / "slides" / f"{slide_id}{Path(fixture).suffix}"
        shutil.copyfile(FIXTURES / fixture, path)
        tile_slide(path, tmp_path / "tiles", slide_id=slide_id, mpp_override=0.5, progress=False)
        samples.append(Sample(slide_id, str(path), f"p{i}", fields={"label": ("neg", "pos", "pos")[i]}))
    out = tmp_path / "labels.tsv"
    with pytest.raises(DataError) as caught:
        write_labels(samples, usable=["a", "b", "c"], columns={"label": "label"}, out=out, tiles_dir=tmp_path / "tiles")
    assert str(caught.value) == (
        f"slides 'a' ({tmp_path}/slides/a.svs) and 'c' ({tmp_path}/slides/c.svs) are copies of one slide file "
        "(the same size and the same first and last MiB); list each slide once in the samples sheet"
    )
    assert not out.exists()
    rows = write_labels(samples, usable=["a", "b"], columns={"label": "label"}, out=out, tiles_dir=tmp_path / "tiles")
    assert [r["slide_id"] for r in rows] == ["a", "b"]  # distinct files pass
    rows = write_labels(samples, usable=["a", "b", "c"], columns={"label": "label"}, out=out)
    assert [r["slide_id"] for r in rows] == ["a", "b", "c"]  # no stores to compare: not checked


def test_labels_that_are_no_class_say_how_many_slides_are_not_listed():
    from wsitools.labels import check_labels_are_classes

    labelled = [(f"s{i}", "Tumour") for i in range(7)] + [("s9", "tumor")]
    with pytest.raises(DataError) as caught:
        check_labels_are_classes(labelled, ["normal", "tumor"], what="labels in column 'label'", task="task.yaml")
    assert str(caught.value) == (
        "labels in column 'label' that are not classes of task.yaml (normal, tumor): 'Tumour' (slides s0, s1, s2, "
        "s3, s4 and 2 more); fix the labels or add the classes to the task file"
    )


# --- the workflow: config, dry runs, lint --------------------------------------------------------


def test_example_config_documents_every_key_with_the_schema_defaults():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    example = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    text = (REPO / "config" / "config.yaml").read_text()
    assert set(example) == set(schema["properties"])
    for key, sub in schema["properties"].items():
        assert sub.get("description"), key
        if key in ("tasks", "heads"):  # examples, not defaults
            continue
        if sub.get("type") == "object":
            assert set(example[key]) == set(sub["properties"]), key
            for inner, inner_schema in sub["properties"].items():
                assert example[key][inner] == inner_schema["default"], (key, inner)
                assert re.search(rf"^\s+{inner}:", text, re.M)
        else:
            assert example[key] == sub["default"], key


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tilling": {"mpp": 0.5}}, "Additional properties are not allowed ('tilling' was unexpected)"),
        ({"tiling": {"mpp": "half"}}, "'half' is not of type 'number'"),
        ({"heads": {"h": {"type": "transmil"}}}, "'transmil' is not one of ['abmil', 'pathotune', 'meanpool']"),
        ({"heads": {"h": {"type": "abmil", "folds": 1}}}, "1 is less than the minimum of 2"),
        ({"heads": {"h": {"type": "pathotune", "prompts": ["tvp", "vpt"]}}}, "'vpt' is not one of"),
        ({"heads": {"h": {"type": "pathotune", "prompts": []}}}, "[] should be non-empty"),
        ({"tasks": {"t/1": {"task_file": "t.yaml"}}}, "'t/1' does not match"),
        ({"tune": {"enabled": True}}, "'' should be non-empty"),
    ],
)
def test_schema_rejects_bad_settings(change, message):
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    with pytest.raises(WorkflowError, match=re.escape(message)):
        validate(dict(change), str(REPO / "workflow" / "schemas" / "config.schema.yaml"))


def test_schema_fills_in_the_defaults():
    from snakemake.utils import validate

    config = {"heads": {"h": {"type": "abmil"}}, "tiling": {"mpp": 1.0}}
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    assert config["tiling"] == {"mpp": 1.0, "tile_size": 224, "overlap": 0, "min_tissue": 0.5,
                                "backend": "auto", "store_pixels": True, "codec": "jpeg", "jpeg_quality": 97,
                                "threads": 2, "extra_args": []}
    assert config["heads"]["h"] == {"type": "abmil", "prompts": ["tvp", "ttp"], "bag": "slide", "folds": 5,
                                    "threads": 1, "device": "auto", "extra_args": []}
    assert config["features"]["encoders"] == ["efficientnet-lite0-imagenet"]
    assert (config["samples"], config["device"], config["pretrain"]["enabled"]) == ("config/samples.tsv", "auto", False)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tilling": {"mpp": 0.5}}, "config: tilling: unknown key (did you mean 'tiling'?)"),
        ({"tiling": {"mpp": 0.5, "tile_sise": 224}}, "config: tiling: tile_sise: unknown key (did you mean 'tile_size'?)"),
        ({"features": {"dtype": "float64"}}, "config: features: dtype: 'float64' is not one of ['float32', 'float16']"),
        ({"tasks": {"planted": {"task_file": "config/task.yaml", "label_column": "grade"}}},
         "has no column 'grade' (label_column)"),
        # integral floats pass JSON Schema's integer type, then every job's command refused them
        ({"heads": {"abmil": {"type": "abmil", "folds": 2.0}}}, "config: heads: abmil: folds: 2.0 is not a whole number"),
        ({"tiling": {"tile_size": 224.0}}, "config: tiling: tile_size: 224.0 is not a whole number"),
        ({"tiling": {"overlap": 224}}, "config: tiling: overlap: 224 must be smaller than tile_size (224)"),
        # names of output folders, one folder where case is ignored (macOS, Windows)
        ({"tasks": {"planted": {"task_file": "config/task.yaml"}, "Planted": {"task_file": "config/task.yaml"}}},
         "config: tasks: 'Planted' and 'planted' differ only in case; their output folders would be one where case "
         "is ignored (macOS, Windows): rename one"),
        ({"heads": {"abmil": {"type": "abmil", "folds": 2}, "ABmil": {"type": "abmil", "folds": 2}}},
         "config: heads: 'ABmil' and 'abmil' differ only in case"),
        ({"features": {"encoders": ["efficientnet-lite0-imagenet", "EfficientNet-lite0-imagenet"]}},
         "config: features: encoders: 'efficientnet-lite0-imagenet' and 'EfficientNet-lite0-imagenet' differ only in case"),
    ],
)
def test_bad_config_fails_before_any_job(tmp_path, change, message):
    work = make_project(tmp_path / "w", config=change)
    result = snakemake(work, "--cores", "1")  # a real run, not a dry run: nothing may start
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output
    assert "Job stats" not in output
    assert "$defs" not in output and len(output.strip().splitlines()) <= 4  # the line, not the schema
    assert not (work / "results").exists() and not (work / "logs").exists()


@pytest.mark.parametrize("extra_file", [False, True])
def test_a_config_file_with_a_repeated_key_fails_before_any_job(tmp_path, extra_file):
    """A YAML reader keeps the last of a repeated key: the first `folds` would be dropped without
    a word. The project's config file and one given with --configfile are both checked."""
    work = make_project(tmp_path / "w")
    config = work / "config" / "config.yaml"
    text = config.read_text().replace("    folds: 2\n", "    folds: 2\n    folds: 3\n")
    assert text.count("folds:") == 2
    line = text.splitlines().index("    folds: 3") + 1
    if extra_file:
        (work / "more.yaml").write_text(text)
        name, args = str(work / "more.yaml"), ("--configfile", str(work / "more.yaml"))
    else:
        config.write_text(text)
        name, args = "config/config.yaml", ()
    result = snakemake(work, "--cores", "1", *args)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"config file {name}: line {line}: key 'folds' appears twice" in output
    assert "Job stats" not in output and not (work / "results").exists()


def test_a_task_file_with_a_repeated_key_fails_before_any_job(tmp_path):
    work = make_project(tmp_path / "w")
    task = work / "config" / "task.yaml"
    task.write_text(task.read_text() + "name: other\n")
    result = snakemake(work, "--cores", "1")
    assert result.returncode != 0
    assert "config: task 'planted': task description config/task.yaml: not valid YAML: key 'name' appears twice" in result.stderr
    assert "line 6" in result.stderr and not (work / "results").exists()


@pytest.mark.parametrize("change, message", [
    ({"heads": {"abmil": {"type": "abmil", "folds": 2, "extra_args": ["--lerning-rate", "1e-4"]}}},
     "config: heads: abmil: extra_args: '--lerning-rate' is not an option of `wsitools train`"),
    ({"heads": {"abmil": {"type": "abmil", "folds": 2, "extra_args": ["--epochs", "ten"]}}},
     "config: heads: abmil: extra_args: argument --epochs: must be a whole number >= 1, got 'ten' (`wsitools train`)"),
    ({"heads": {"abmil": {"type": "abmil", "folds": 2, "extra_args": ["--folds", "3"]}}},
     "config: heads: abmil: extra_args: --folds is set by the workflow (heads: abmil: folds), not in extra_args"),
    ({"features": {"extra_args": ["--out", "elsewhere"]}},
     "config: features: extra_args: --out is set by the workflow (features_dir), not in extra_args"),
    ({"features": {"extra_args": ["--compiel"]}},
     "config: features: extra_args: '--compiel' is not an option of `wsitools extract` (did you mean --compile?)"),
    ({"heatmaps": {"extra_args": ["--max-side", "6000", "--top", "8", "--colour", "red"]}},
     "config: heatmaps: extra_args: '--colour' is not an option of `wsitools heatmap`"),
    ({"tiling": {"extra_args": ["--magnification", "20"]}},
     "config: tiling: extra_args: --magnification is set by the workflow (tiling: mpp), not in extra_args"),
    ({"pretrain": {"enabled": True, "extra_args": ["--warmup", "1", "--ratios", "0.5"]}},
     "config: pretrain: extra_args: '--ratios' is not an option of `wsitools pretrain puzzle` (did you mean --ratio?)"),
    ({"tune": {"enabled": True, "data": "tiles_by_class", "prompts": ["tvp"], "extra_args": ["--n-tvp", "2", "models"]}},
     "config: tune: extra_args: 'models' is not an option of `wsitools tune pathotune`"),
])
def test_bad_extra_args_fail_before_any_job(tmp_path, change, message):
    """Parsed by the command's own parser: a misspelt option would fail every job of its step
    after tiling, and an option the workflow sets would replace the config's setting or the job's
    output."""
    work = make_project(tmp_path / "w", config=change)
    result = snakemake(work, "--cores", "1")
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "Job stats" not in result.stdout and not (work / "results").exists()


def test_the_options_the_workflow_sets_are_listed_for_extra_args(tmp_path):
    """Every option a job's command gets from the workflow is one `extra_args` may not repeat
    (workflow_options in common.smk), so a new option of a rule cannot be overridden unnoticed."""
    from snakemake.api import ConfigSettings, OutputSettings, ResourceSettings, SnakemakeApi, StorageSettings

    tune = {"enabled": True, "data": "tiles.csv", "task": "config/task.yaml", "prompts": ["tvp", "ivp"],
            "ivp_encoder": "vitb16-imagenet", "extra_args": ["--n-tvp", "2"]}
    heads = {"abmil": {"type": "abmil", "folds": 2, "extra_args": ["--allow-empty-classes", "--lr", "1e-4"]}}
    work = make_project(tmp_path / "w", config={"pretrain": {"enabled": True}, "tune": tune, "heads": heads,
                                                "features": {"extra_args": ["--compile"]}})
    (work / "tiles.csv").write_text("slide_id,x,y,label\ns0,0,0,neg\n")
    before_qc = snakemake(work, "-n", "--printshellcmds")  # the tile jobs
    _qc_done(work, {f"s{i}": "ok" for i in range(6)})
    after_qc = snakemake(work, "-n", "--printshellcmds")  # the jobs of the usable slides
    assert before_qc.returncode == after_qc.returncode == 0, before_qc.stderr + after_qc.stderr
    with SnakemakeApi(OutputSettings()) as api:
        options = api.workflow(
            resource_settings=ResourceSettings(), storage_settings=StorageSettings(),
            config_settings=ConfigSettings(configfiles=[work / "config" / "config.yaml"]),
            workdir=work, snakefile=REPO / "workflow" / "Snakefile",
        )._workflow.globals["workflow_options"]("abmil")
    flags = {"--keep-going", "--overwrite", "--quiet", "--resume", "--strict", "--compile", "--allow-empty-classes"}
    seen = set()
    for line in (before_qc.stdout + after_qc.stdout).splitlines():
        if "wsitools " not in line:
            continue
        words = line.split("wsitools ", 1)[1].split(" > ")[0].split()
        words.insert(0, "wsitools")
        command = " ".join(words[1:3]) if words[1] in ("pretrain", "tune") else words[1]
        if command not in options:
            continue
        seen.add(command)
        given = {w for w in words if w.startswith("--")} - flags - {"--lr", "--n-tvp"}  # the extra_args
        assert given <= set(options[command]), (command, sorted(given - set(options[command])))
    assert seen == set(options)


def test_config_error_names_the_key():
    import jsonschema

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())

    def first_error(config):
        return config_error(next(jsonschema.Draft202012Validator(schema).iter_errors(config)))

    assert first_error({"heads": {"h": {"type": "abmil", "fold": 3}}}) == (
        "config: heads: h: fold: unknown key (did you mean 'folds'?)")
    assert first_error({"zzz": 1}).startswith("config: zzz: unknown key (known keys: device, export, features")
    assert first_error({"tiling": {"mpp": "x"}}) == "config: tiling: mpp: 'x' is not of type 'number'"


def test_bad_samples_sheet_fails_before_any_job(tmp_path):
    work = make_project(tmp_path / "w")
    with open(work / "config" / "samples.tsv", "a") as f:
        f.write("s1\tslides/s1.svs\tp9\tneg\n")
    result = snakemake(work, "--cores", "1")
    assert result.returncode != 0
    assert "duplicate slide id 's1'" in result.stderr
    assert not (work / "results").exists()


def test_a_feature_encoder_without_its_weight_file_fails_before_any_job(tmp_path):
    """A card whose weight file is not fetched stops the run once, with the message each
    slide's extraction job would give, not one failed job per slide."""
    models = tmp_path / "models"  # cards of their own: the checkout's models/ may hold fetched weights
    models.mkdir()
    for card in ("efficientnet-lite0-imagenet", "uni"):
        shutil.copyfile(REPO / "models" / f"{card}.yaml", models / f"{card}.yaml")
    work = make_project(tmp_path / "w", config={"models_dir": str(models),
                                                "features": {"encoders": ["efficientnet-lite0-imagenet", "uni"]}})
    result = snakemake(work, "-n")
    assert result.returncode != 0
    weight = models / "uni-pytorch_model.bin"
    assert (f"config: features: encoders: uni: {weight}: backbone weight file of encoder 'uni' not found; "
            "run `wsitools encoders fetch uni` or download https://") in result.stdout + result.stderr
    assert "Job stats" not in result.stdout


@pytest.mark.parametrize("settings, message", [
    ({"encoder": "MODELS/vit test.yaml"},
     "config: pretrain: encoder: 'vit test-puzzletuned' is not a valid encoder name (letters, digits, '.', '_' and '-', "
     "starting with a letter or digit, at most 100 characters); the exported card's name is made from this card's "
     "file name; set `pretrain: name`"),
    ({"name": "vitb16-imagenet"},
     "config: pretrain: name: 'vitb16-imagenet' is the backbone's name: a trained card must have a name of its own "
     "(its features are kept under it); choose another `pretrain: name`"),
    ({"name": "uni"}, "config: pretrain: name: 'uni' is the name of the card MODELS/uni.yaml"),
    ({"encoder": "MODELS/vit test.yaml", "name": "vit-test-puzzletuned"}, None),
])
def test_the_pretrained_cards_name_is_checked_before_any_job(tmp_path, settings, message):
    """The pretraining job, which checks the name of the card it exports, runs after the whole
    cohort is tiled; a name made from the encoder card's file name is checked too."""
    models = Path(stand_in_models(tmp_path / "models"))
    shutil.copyfile(models / "vitb16-imagenet.yaml", models / "vit test.yaml")
    settings = {key: value.replace("MODELS", str(models)) for key, value in settings.items()}
    work = make_project(tmp_path / "w", config={"models_dir": str(models), "pretrain": {"enabled": True, **settings}})
    result = snakemake(work, "-n")
    if message is None:
        assert result.returncode == 0, result.stderr
        assert "results/pretrain/puzzle/vit-test-puzzletuned.yaml" in result.stdout
        return
    assert result.returncode != 0
    assert message.replace("MODELS", str(models)) in result.stdout + result.stderr
    assert "Job stats" not in result.stdout
    if "name" in settings:  # exported already (its card then copied into the models folder): not checked
        exported = work / "results" / "pretrain" / "puzzle" / f"{settings['name']}.yaml"
        exported.parent.mkdir(parents=True)
        exported.write_text("name: x\n")
        assert snakemake(work, "-n").returncode == 0


@pytest.mark.parametrize("step, key", [("pretrain", "pretrain: encoder"), ("tune", "tune: encoder"),
                                       ("tune", "tune: ivp_encoder")])
def test_a_pretraining_or_tuning_encoder_without_its_weight_file_fails_before_any_job(tmp_path, step, key):
    """Its one job would fail only after the whole cohort was tiled."""
    models = Path(stand_in_models(tmp_path / "models"))
    shutil.copyfile(models / "vitb16-imagenet.yaml", models / "vit-other.yaml")
    card = models / "vit-other.yaml"
    card.write_text(card.read_text().replace("name: vitb16-imagenet", "name: vit-other")
                    .replace("ViT_b16_224_Imagenet.pth", "vit-other.pth"))
    settings = {"enabled": True, key.split(": ")[1]: "vit-other"}
    if step == "tune":
        settings.update(data="tiles_by_class", prompts=["tvp", "ivp"])
    work = make_project(tmp_path / "w", config={"models_dir": str(models), step: settings})
    (work / "tiles_by_class").mkdir()
    result = snakemake(work, "-n")
    assert result.returncode != 0
    assert (f"config: {key}: {models}/vit-other.pth: backbone weight file of encoder 'vit-other' not found; "
            "run `wsitools encoders fetch vit-other` or download https://") in result.stdout + result.stderr
    assert "Job stats" not in result.stdout
    (models / "vit-other.pth").touch()
    result = snakemake(work, "-n")
    assert result.returncode == 0, result.stderr


def test_slide_glob_cohort_makes_tiles_and_features_only(tmp_path):
    work = make_project(tmp_path / "w", config={"slides_glob": "slides/*.svs", "tasks": {}, "heads": {}})
    result = snakemake(work, "-n", "--printshellcmds")
    assert result.returncode == 0, result.stderr
    assert job_counts(result.stdout) == {"tile": 6, "qc_summary": 1, "qc_table": 1, "all": 1}
    assert "wsitools tile slides/s3.svs --slide-id s3 --out results/tiles --mpp 0.5" in result.stdout
    labelled = make_project(tmp_path / "x", config={"slides_glob": "slides/*.svs"})
    result = snakemake(labelled, "-n")
    assert result.returncode != 0 and "tasks need labels" in result.stdout + result.stderr


def test_a_slide_replaced_by_an_older_file_is_tiled_again(tmp_path):
    """Snakemake's mtime trigger reruns a job only for a newer input: a slide file replaced by
    another one with an older mtime (`cp -p`, a restore) is tiled again through the tile rule's
    record of the file's size and mtime, and its QC record then describes the new file."""
    work = make_project(tmp_path / "w", n=1, config={"slides_glob": "slides/*.svs", "tasks": {}, "heads": {}})
    result = snakemake(work, "--cores", "1")
    assert result.returncode == 0, result.stderr
    qc = work / "results" / "tiles" / "s0.qc.json"
    assert json.loads(qc.read_text())["status"] == "no_tissue"
    slide = work / "slides" / "s0.svs"
    old = slide.stat().st_mtime_ns - 3_600 * 10**9
    shutil.copyfile(FIXTURES / "unreadable.svs", slide)  # another file of the same size
    os.utime(slide, ns=(old, old))
    result = snakemake(work, "-n")
    assert result.returncode == 0, result.stderr
    assert job_counts(result.stdout)["tile"] == 1
    assert "Params have changed since last execution" in result.stdout
    result = snakemake(work, "--cores", "1")
    assert result.returncode == 0, result.stderr
    assert json.loads(qc.read_text())["status"] == "failed"
    assert "Nothing to be done" in snakemake(work, "-n").stdout


def test_a_stopped_run_is_not_said_to_have_a_failed_job(tmp_path):
    """A run stopped by a signal (a SIGTERM here, which lets the running job finish; Ctrl-C
    ends the same way) ends with a line saying so, not one blaming a job; a failed job's line
    names its log."""
    import signal

    work = make_project(tmp_path / "w", n=3, config={"slides_glob": "slides/*.svs", "tasks": {}, "heads": {}})
    run = subprocess.Popen(snakemake_command(work, "--cores", "1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    lines = []
    for line in run.stdout:
        lines.append(line)
        if line.startswith("localrule tile:"):
            run.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + run.communicate(timeout=120)[0]
    assert run.returncode != 0
    assert ("wsitools workflow: the run stopped before it finished and no job failed (interrupted, or see the "
            "error above); run snakemake again to finish") in output
    assert "failed (see the error above)" not in output
    assert run_failure_line([["logs/labels/t.log"]]) == (
        "wsitools workflow: a job failed (see the error above); logs: logs/labels/t.log")
    assert run_failure_line([["a.log"], []]) == "wsitools workflow: 2 jobs failed (see the error above); logs: a.log"


def test_jobs_stopped_by_a_signal_are_not_called_failed(tmp_path):
    """SIGTERM to a whole run (a closed session, ``timeout``) stops its jobs, whose logs end saying
    so: the run stopped, no slide is at fault; a job that failed beside them is still named."""
    stopped = [tmp_path / f"s{i}.log" for i in range(2)]
    for log in stopped:
        log.write_text("slide_001: 3 tiles\nwsitools extract: stopped by SIGTERM before it finished; run it again to finish\n")
    failed = tmp_path / "f.log"
    failed.write_text("wsitools train: error: labels table t.csv: one class\n")
    assert run_failure_line([[str(stopped[0])], [str(stopped[1])]]) == (
        "wsitools workflow: the run stopped before it finished: 2 jobs were stopped by SIGTERM and no job failed; "
        "run snakemake again to finish")
    assert run_failure_line([[str(failed)], [str(stopped[0])]]) == (
        f"wsitools workflow: a job failed (see the error above); logs: {failed}; a job was stopped by SIGTERM")


def test_tile_jobs_get_the_configured_codec(tmp_path):
    glob = {"slides_glob": "slides/*.svs", "tasks": {}, "heads": {}}
    commands = {}
    for name, tiling in (("d", {}), ("l", {"codec": "lossless", "jpeg_quality": 80}), ("n", {"store_pixels": False})):
        work = make_project(tmp_path / name, n=1, config={**glob, "tiling": tiling})
        result = snakemake(work, "-n", "--printshellcmds")
        assert result.returncode == 0, result.stderr
        commands[name] = next(line for line in result.stdout.splitlines() if "wsitools tile " in line)
    assert "--backend auto --codec jpeg --jpeg-quality 97" in commands["d"]
    assert "--backend auto --codec lossless --jpeg-quality 80" in commands["l"]
    assert "--no-pixels" in commands["n"] and "--codec" not in commands["n"]


def test_lint_is_clean(tmp_path):
    work = make_project(tmp_path / "w")
    result = snakemake(work, "--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


def dry_run_resources(output: str) -> dict[str, str]:
    """{rule: its 'resources:' line} from a dry run's job listing (last job of each rule)."""
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?(?:rule|checkpoint) \w+:)", output):
        head = re.match(r"(?:local)?(?:rule|checkpoint) (\w+):", block)
        res = re.search(r"resources: (.*)", block)
        if head and res:
            jobs[head.group(1)] = res.group(1)
    return jobs


def test_slurm_dry_run_gives_gpu_rules_a_gpu(tmp_path):
    tune = {"enabled": True, "data": "tiles_by_class", "task": "config/task.yaml", "prompts": ["tvp", "ttp"]}
    work = make_project(tmp_path / "w", config={"device": "auto", "pretrain": {"enabled": True}, "tune": tune})
    (work / "tiles_by_class").mkdir()
    dry_run = "--profile <wsitools>/config/profiles/slurm -n --cores 64   # check"  # as docs/cluster.md says
    assert dry_run in (REPO / "docs" / "cluster.md").read_text()
    result = snakemake(work, "--profile", str(SLURM_PROFILE), "-n", "--cores", "64")
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    # the profile's set-threads, not the config's threads keys (2, 1, 4) and not capped at one core
    commands = {line.split()[3]: line.split() for line in out.splitlines() if line.startswith("Shell command: wsitools ")}
    assert commands["tile"][commands["tile"].index("--workers") + 1] == "4"
    assert commands["train"][commands["train"].index("--threads") + 1] == "4"
    assert commands["pretrain"][commands["pretrain"].index("--workers") + 1] == "16"
    assert job_counts(out) == {"tile": 6, "qc_summary": 1, "qc_table": 1, "labels": 1, "train": 1, "heatmap": 1,
                               "metrics_table": 1, "roc": 1, "pretrain_puzzle": 1, "tune_pathotune": 1,
                               "all": 1}
    jobs = dry_run_resources(out)
    gpu = jobs["pretrain_puzzle"]
    assert "gpu=1" in gpu and "slurm_partition=<gpu-partition>" in gpu and "runtime=2880" in gpu
    assert "gpu=1" in jobs["tune_pathotune"] and "slurm_partition=<gpu-partition>" in jobs["tune_pathotune"]
    assert "gpu=1" in jobs["train"] and "slurm_partition=<gpu-partition>" in jobs["train"]
    assert "mem_mb=16000" in jobs["train"] and "runtime=240" in jobs["train"]
    assert "output: results/pretrain/puzzle/vitb16-imagenet-puzzletuned.yaml" in out
    for cpu_rule in ("tile", "heatmap"):
        assert "gpu" not in jobs[cpu_rule] and "slurm_partition=<cpu-partition>" in jobs[cpu_rule]
    assert "mem_mb=8000" in jobs["tile"] and "slurm_account=<account>" in jobs["tile"]


def test_training_jobs_resume_their_run_folder(tmp_path):
    """A pretrain, tune or train job cut off by a time limit continues from its checkpoints (a
    train job: its finished folds) when rerun."""
    tune = {"enabled": True, "data": "tiles_by_class", "task": "config/task.yaml", "prompts": ["tvp"]}
    work = make_project(tmp_path / "w", config={"device": "cpu", "pretrain": {"enabled": True}, "tune": tune})
    (work / "tiles_by_class").mkdir()
    result = snakemake(work, "-n", "--printshellcmds", "--cores", "4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    pretrain = next(line for line in lines if "wsitools pretrain puzzle " in line)
    tune_cmd = next(line for line in lines if "wsitools tune pathotune " in line)
    assert "--out results/pretrain/puzzle" in pretrain and "--resume" in pretrain.split()
    assert "--out results/tune/pathotune" in tune_cmd and "--resume" in tune_cmd.split()
    assert "--workers 4" in tune_cmd and "--workers 4" in pretrain
    train_cmd = next(line for line in lines if "wsitools train " in line)
    assert "--out results/heads/" in train_cmd and "--resume" in train_cmd.split()


def test_dry_run_lists_tuning_on_a_tile_table_before_and_after_qc(tmp_path):
    """PathoTune on a tile table needs the usable slides' stores, known only after the QC
    checkpoint: a dry run before QC lists the job with its data and task and the stores (and
    PuzzleTuning's) as <TBD>; after QC the stores are those of the usable slides."""
    tune = {"enabled": True, "data": "tiles.csv", "task": "config/task.yaml", "prompts": ["tvp"]}
    work = make_project(tmp_path / "w", config={"device": "cpu", "pretrain": {"enabled": True}, "tune": tune})
    (work / "tiles.csv").write_text("slide_id,x,y,label\ns0,0,0,neg\n")
    result = snakemake(work, "-n", "--printshellcmds", "--cores", "2")
    assert result.returncode == 0, result.stderr
    assert job_counts(result.stdout)["tune_pathotune"] == 1
    lines = result.stdout.splitlines()
    tune_cmd = next(line for line in lines if "wsitools tune pathotune " in line)
    assert "--data tiles.csv --task config/task.yaml <TBD> --encoder" in tune_cmd
    pretrain = next(line for line in lines if "wsitools pretrain puzzle " in line)
    assert "--stores <TBD> --out" in pretrain
    _qc_done(work, {f"s{i}": "failed" if i == 2 else "ok" for i in range(6)})
    result = snakemake(work, "-n", "--printshellcmds", "--cores", "2")
    assert result.returncode == 0, result.stderr
    stores = " ".join(f"results/tiles/s{i}.zarr" for i in (0, 1, 3, 4, 5))
    lines = result.stdout.splitlines()
    tune_cmd = next(line for line in lines if "wsitools tune pathotune " in line)
    assert f"--data tiles.csv --task config/task.yaml --stores {stores} --encoder" in tune_cmd
    pretrain = next(line for line in lines if "wsitools pretrain puzzle " in line)
    assert f"--stores {stores} --out" in pretrain


@pytest.mark.parametrize("data", ["tiles.tsv", "Tiles.CSV"])
def test_tuning_data_is_a_tile_table_by_the_commands_suffix_rule(tmp_path, data):
    """`tune: data:` is a tile table for every suffix `wsitools tune pathotune` takes as one (.csv,
    .tsv, in any case): the job gets the usable slides' stores, after QC."""
    tune = {"enabled": True, "data": data, "prompts": ["tvp"]}
    work = make_project(tmp_path / "w", n=2, config={"tasks": {}, "heads": {}, "tune": tune})
    (work / data).write_text("slide_id\tx\ty\tlabel\ns0\t0\t0\tneg\n")
    _qc_done(work, {"s0": "ok", "s1": "failed"})
    result = snakemake(work, "-n", "--printshellcmds")
    assert result.returncode == 0, result.stderr
    tune_cmd = next(line for line in result.stdout.splitlines() if "wsitools tune pathotune " in line)
    assert f"--data {data}  --stores results/tiles/s0.zarr --encoder" in tune_cmd


def test_every_slurm_job_asks_for_a_gpu_exactly_on_the_gpu_partition(tmp_path):
    """Whole DAG (tiles done): a job asking for a GPU on a CPU partition never starts, and a GPU
    node held by a job that uses no GPU is wasted."""
    tune = {"enabled": True, "data": "tiles_by_class", "task": "config/task.yaml", "prompts": ["tvp"]}
    work = make_project(tmp_path / "w", n=7, config={"device": "auto", "pretrain": {"enabled": True}, "tune": tune})
    (work / "tiles_by_class").mkdir()
    sheet = work / "config" / "samples.tsv"
    rows = [line.split("\t") for line in sheet.read_text().splitlines()]
    rows[7][3] = ""  # s6 has no label: predicted and drawn
    sheet.write_text("\n".join("\t".join(r) for r in rows) + "\n")
    _qc_done(work, {f"s{i}": "ok" for i in range(7)})
    result = snakemake(work, "--profile", str(SLURM_PROFILE), "-n")
    assert result.returncode == 0, result.stderr
    jobs = dry_run_resources(result.stdout + result.stderr)
    expected_gpu = {"extract", "train", "predict", "pretrain_puzzle", "tune_pathotune"}
    assert expected_gpu | {"heatmap", "heatmap_predicted", "labels"} <= set(jobs), sorted(jobs)
    for rule, line in jobs.items():
        gpu = re.search(r"\bgpu=(\d+)", line)
        partition = re.search(r"slurm_partition=(<[\w-]+>)", line)
        wants_gpu = gpu is not None and int(gpu.group(1)) > 0
        assert wants_gpu == (rule in expected_gpu), f"{rule}: {line}"
        assert partition and partition.group(1) == ("<gpu-partition>" if wants_gpu else "<cpu-partition>"), f"{rule}: {line}"


def test_cpu_device_asks_for_no_gpu(tmp_path):
    work = make_project(tmp_path / "w", config={"device": "cpu", "pretrain": {"enabled": True}})
    result = snakemake(work, "-n")
    assert result.returncode == 0, result.stderr
    assert "gpu=0" in dry_run_resources(result.stdout)["pretrain_puzzle"]


def _train_job(work: Path) -> tuple[str, str]:
    """The train job's resources line and shell command from a dry run."""
    result = snakemake(work, "-n", "--printshellcmds", "--cores", "4")  # threads are capped at --cores
    assert result.returncode == 0, result.stderr
    commands = [line.split("wsitools train ", 1)[1] for line in result.stdout.splitlines() if "wsitools train " in line]
    assert len(commands) == 1, result.stdout
    return dry_run_resources(result.stdout)["train"], commands[0]


def test_train_gets_its_head_device_and_threads(tmp_path):
    heads = {"abmil": {"type": "abmil", "folds": 2, "threads": 3}}  # device: auto by default
    resources, command = _train_job(make_project(tmp_path / "auto", config={"device": "cpu", "heads": heads}))
    assert "gpu=1" in resources
    assert " --device auto --threads 3 --out results/heads/planted/efficientnet-lite0-imagenet/abmil " in command
    assert " --task config/task.yaml --head abmil " in command  # the task file, when configured
    heads["abmil"]["device"] = "cpu"
    resources, command = _train_job(make_project(tmp_path / "cpu", config={"device": "auto", "heads": heads}))
    assert "gpu=0" in resources and " --device cpu --threads 3 " in command


def write_head_run(root: Path, task: str, encoder: str, head: str, labels, probs, classes) -> Path:
    """A minimal training output: metrics.json and predictions.csv as `wsitools train` writes them."""
    folder = root / "heads" / task / encoder / head
    folder.mkdir(parents=True)
    metric = {"auroc": 0.875, "auroc_ci95": [0.7, 1.0], "balanced_accuracy": 0.75,
              "balanced_accuracy_ci95": [0.5, 1.0], "f1": 0.7333333, "f1_ci95": [None, None],
              "accuracy": 0.75, "accuracy_ci95": [0.5, 1.0]}
    folds = {k: {"mean": 0.8, "sd": 0.1, "n_folds": 3} for k in METRICS}
    folds["f1"] = {"mean": 0.5, "sd": None, "n_folds": 1}
    (folder / "metrics.json").write_text(json.dumps(
        {"task": task, "head": head, "prompts": ["tvp", "ttp"], "n_slides": 8, "n_patients": 4,
         "pooled": metric, "folds": [{"fold": k} for k in range(3)], "mean_over_folds": folds}))
    lines = ["slide_id,patient_id,label,fold,pred," + ",".join(f"prob_{c}" for c in classes)]
    for i, (label, p) in enumerate(zip(labels, probs)):
        lines.append(f"s{i},p{i},{label},0,{classes[0]}," + ",".join(f"{x:.3f}" for x in p))
    (folder / "predictions.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_metrics_table_has_one_row_per_head(tmp_path):
    a = write_head_run(tmp_path, "t", "enc", "abmil", ["neg"], [[0.4, 0.6]], ["neg", "pos"])
    b = write_head_run(tmp_path, "t", "enc", "pt", ["neg"], [[0.4, 0.6]], ["neg", "pos"])
    write_metrics_table([a / "metrics.json", b / "metrics.json"], tmp_path / "m.tsv")
    rows = read_table(tmp_path / "m.tsv")
    assert [(r["task"], r["encoder"], r["head"]) for r in rows] == [("t", "enc", "abmil"), ("t", "enc", "pt")]
    r = rows[0]
    assert (r["prompts"], r["n_slides"], r["auroc"], r["auroc_lo"], r["auroc_hi"]) == (
        "tvp,ttp", "8", "0.8750", "0.7000", "1.0000")
    assert (r["f1"], r["f1_lo"], r["f1_fold_mean"], r["f1_fold_sd"], r["f1_fold_n"], r["n_folds"]) == (
        "0.7333", "", "0.5000", "", "1", "3")
    (a / "metrics.json").write_text("{}")
    with pytest.raises(DataError, match="metrics file .*abmil/metrics.json cannot be read"):
        write_metrics_table([a / "metrics.json"], tmp_path / "m.tsv")


def test_metrics_table_counts_the_pooling_each_fold_kept(tmp_path):
    """Pooling selection keeps attention or mean pooling per fold; the table counts them (a fold
    of a run from before pooling selection records none and pooled by attention)."""
    mixed = write_head_run(tmp_path, "t", "enc", "abmil", ["neg"], [[0.4, 0.6]], ["neg", "pos"])
    old = write_head_run(tmp_path, "t", "enc", "pt", ["neg"], [[0.4, 0.6]], ["neg", "pos"])
    metrics = json.loads((mixed / "metrics.json").read_text())
    metrics["folds"] = [{"fold": k, "pooling": p} for k, p in enumerate(["mean", "attention", "mean", "attention",
                                                                         "attention"])]
    (mixed / "metrics.json").write_text(json.dumps(metrics))
    write_metrics_table([mixed / "metrics.json", old / "metrics.json"], tmp_path / "m.tsv", html_out=tmp_path / "m.html")
    assert [r["pooling"] for r in read_table(tmp_path / "m.tsv")] == ["attention 3, mean 2", "attention 3"]
    html = (tmp_path / "m.html").read_text()
    assert "<th>pooling</th>" in html and "<td>attention 3, mean 2</td>" in html


def test_roc_points_step_through_thresholds_with_ties():
    fpr, tpr = roc_points([1, 0, 1, 0, 1], [0.9, 0.8, 0.8, 0.3, 0.1])
    # thresholds 0.9 | 0.8 (one positive and one negative tied) | 0.3 | 0.1
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1])
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)  # trapezoids: ties count half
    assert area == pytest.approx(binary_auroc(np.array([1, 0, 1, 0, 1], bool), np.array([0.9, 0.8, 0.8, 0.3, 0.1])))


def test_roc_figure_has_one_panel_per_positive_class(tmp_path):
    from PIL import Image

    two = write_head_run(tmp_path, "t2", "enc", "abmil", ["neg", "pos", "pos"],
                         [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], ["neg", "pos"])
    plot_roc([two / "predictions.csv"], tmp_path / "roc2.png")
    three = write_head_run(tmp_path, "t3", "enc", "abmil", ["a", "b", "c"],
                           [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], ["a", "b", "c"])
    plot_roc([three / "predictions.csv"], tmp_path / "roc3.png")
    w2, h2 = Image.open(tmp_path / "roc2.png").size
    w3, h3 = Image.open(tmp_path / "roc3.png").size
    assert (w2, h2) == (504, 504)  # 4.2 in at 120 dpi, one panel
    assert (w3, h3) == (3 * 504, 504)  # one panel per class


def test_example_sheet_and_task_files_are_valid():
    from wsitools.text import load_task

    samples = read_samples(REPO / "config" / "samples.tsv", check_files=False)
    task = load_task(REPO / "config" / "task.yaml")
    assert {s.value("label") for s in samples} == set(task.classes)
    assert [s.mpp for s in samples][-1] == pytest.approx(0.2527)
    demo_task = load_task(REPO / "config" / "demo" / "task.yaml")
    assert demo_task.classes == ("negative", "positive")  # the labels make_cohort writes


def test_demo_config_drives_the_workflow(tmp_path, capsys):
    from wsitools.cli import demo

    work = tmp_path / "demo"
    (work / "slides").mkdir(parents=True)
    rows = []
    for i in range(12):  # stands in for make_cohort's output: the demo reuses an existing cohort
        shutil.copyfile(FIXTURES / "small.svs", work / "slides" / f"slide_{i:03d}.svs")
        rows.append([f"slide_{i:03d}", str(work / "slides" / f"slide_{i:03d}.svs"), f"patient_{i // 2:03d}",
                     "positive" if (i // 2) % 2 else "negative"])
    write_sheet(work / "samples.tsv", ["slide_id", "path", "patient_id", "label"], rows)
    (work / demo.COHORT_RECORD).write_text(json.dumps({"slides": 12, "seed": 0}))
    demo.prepare(work, n_slides=12)
    assert "reusing the synthetic cohort" in capsys.readouterr().out
    config = yaml.safe_load((work / "config" / "config.yaml").read_text())
    assert config["device"] == "cpu" and config["heads"]["pathotune"]["folds"] == 3
    assert config["heads"]["pathotune"]["device"] == "cpu"  # the demo trains on CPU, asks for no GPU
    assert config["features"]["encoders"] == ["efficientnet-lite0-imagenet"]
    result = snakemake(work, "-n")
    assert result.returncode == 0, result.stderr
    assert job_counts(result.stdout) == {"tile": 12, "qc_summary": 1, "qc_table": 1, "labels": 1, "train": 1, "heatmap": 1,
                                         "metrics_table": 1, "roc": 1, "all": 1}
    for bad in (7, 10):  # 10 slides are 5 patients: 2 of one class, fewer than the 3 folds
        with pytest.raises(WsiToolsError, match=f"--slides {bad}: give an even number, at least 12"):
            demo.prepare(work, n_slides=bad, seed=0)


def test_demo_reuses_its_cohort_and_refuses_another_size_or_seed(tmp_path, capsys, monkeypatch):
    """A second demo run reuses the cohort in --out; a --slides or --seed that differs from it is
    refused in one line (the run would otherwise report on another cohort than the one asked for)."""
    from wsitools import synthetic
    from wsitools.cli import demo, main

    def fake_cohort(out: Path, *, n_slides: int, seed: int) -> None:  # the sheet is all prepare reads
        rows = [[f"slide_{i:03d}", f"slides/slide_{i:03d}.svs", f"patient_{i // 2:03d}", "negative"] for i in range(n_slides)]
        write_sheet(Path(out) / "samples.tsv", ["slide_id", "path", "patient_id", "label"], rows)

    monkeypatch.setattr(synthetic, "make_cohort", fake_cohort)
    work = tmp_path / "demo"
    work.mkdir()
    demo.prepare(work, n_slides=14, seed=3)
    assert json.loads((work / "demo_cohort.json").read_text()) == {"slides": 14, "seed": 3}
    assert "making a synthetic cohort of 14 slides (seed 3)" in capsys.readouterr().out
    for same in ({}, {"n_slides": 14}, {"seed": 3}, {"n_slides": 14, "seed": 3}):
        demo.prepare(work, **same)
        assert f"reusing the synthetic cohort of 14 slides, seed 3 in {work} (delete" in capsys.readouterr().out
    with pytest.raises(ConfigError) as error:
        demo.prepare(work, n_slides=12, seed=4)
    assert str(error.value) == (f"{work} holds a synthetic cohort of 14 slides (seed 3), not the one --slides 12 "
                                f"--seed 4 asks for: give another --out, or delete {work / 'samples.tsv'} for a new "
                                "cohort there")
    assert main(["demo", "--out", str(work), "--seed", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not the one --seed 5 asks for" in err
    with pytest.raises(ConfigError, match=r"holds a synthetic cohort of 14 slides \(seed 3\), not the one --slides 16 "):
        demo.prepare(work, n_slides=16)
    (work / "demo_cohort.json").write_text('{"slides": 14}')
    with pytest.raises(ConfigError) as error:
        demo.prepare(work)
    assert str(error.value) == (f"{work / 'demo_cohort.json'}: holds no seed of the cohort beside it; delete {work} "
                                "for a new demo there")


def test_demo_refuses_an_out_it_did_not_make(tmp_path, capsys, monkeypatch):
    """The demo writes its cohort and replaces config/config.yaml and config/task.yaml in --out:
    a folder it did not make (a project laid out as the README says, with no demo_cohort.json)
    is refused in one line before anything is written, and so is a file; a missing or empty
    folder gets a new cohort."""
    from wsitools import synthetic
    from wsitools.cli import demo, main

    made = []
    monkeypatch.setattr(synthetic, "make_cohort", lambda out, **kw: made.append(Path(out)))
    project = tmp_path / "project"
    (project / "config").mkdir(parents=True)
    for name in ("config.yaml", "task.yaml", "samples.tsv"):
        (project / "config" / name).write_text(f"mine: {name}\n")
    assert main(["demo", "--out", str(project)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"wsitools demo: error: {project}: is not a folder the demo made (it has no demo_cohort.json, which the "
        "demo writes first); the demo writes a synthetic cohort and its own config/ into --out, so give a new or "
        "empty folder (or remove this one)")
    assert sorted(p.relative_to(project).as_posix() for p in project.rglob("*")) == [
        "config", "config/config.yaml", "config/samples.tsv", "config/task.yaml"]
    assert (project / "config" / "config.yaml").read_text() == "mine: config.yaml\n"
    assert (project / "config" / "task.yaml").read_text() == "mine: task.yaml\n"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match=f"^{tmp_path / 'afile'}: is a file, where a folder is needed; give a folder"):
        demo.prepare(tmp_path / "afile")
    assert made == []
    for fresh in (tmp_path / "empty", tmp_path / "missing"):
        if fresh.name == "empty":
            fresh.mkdir()
        demo.prepare(fresh)
        assert json.loads((fresh / "demo_cohort.json").read_text()) == {"slides": 12, "seed": 0}
        assert (fresh / "config" / "config.yaml").read_bytes() == (REPO / "config" / "demo" / "config.yaml").read_bytes()
    assert made == [tmp_path / "empty", tmp_path / "missing"]


def test_demo_without_the_workflow_fails_before_writing_anything(tmp_path, capsys, monkeypatch):
    """Installed from a wheel, the package has no workflow beside it: the demo says so in one line
    before it makes the synthetic cohort (12 slides, about 20 MB) that it could not use."""
    from wsitools import samples, synthetic
    from wsitools.cli import main

    made = []
    monkeypatch.setattr(synthetic, "make_cohort", lambda out, **kw: made.append(Path(out)))
    site = tmp_path / "site-packages"
    monkeypatch.setattr(samples, "__file__", str(site / "wsitools" / "samples.py"))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"wsitools demo: error: no workflow at {site / 'workflow' / 'Snakefile'}: the Snakemake workflow ships "
        "with the repository, install wsitools from a checkout with `pip install -e .`")
    assert made == [] and not out.exists()


_TRAPPING_RUN = """
import pathlib, signal, sys, time
folder = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    time.sleep(0.5)  # a run takes a while to stop its jobs and release its lock
    (folder / "released").write_text(signal.Signals(signum).name)
    sys.exit(1)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
(folder / "started").write_text("")
time.sleep(60)
"""


@pytest.mark.parametrize("signum, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Stopped)])
def test_a_stopped_demo_lets_its_workflow_release_its_lock(tmp_path, monkeypatch, signum, raised):
    """Ctrl-C (or a SIGTERM) to the demo is passed on to its Snakemake run, in a session of its
    own, and the demo waits for it to stop its jobs and release its lock; killed at once, it left
    the lock and the next demo stopped on it."""
    from wsitools.cli import _stop_on_sigterm, demo

    script = tmp_path / "run.py"
    script.write_text(_TRAPPING_RUN)
    monkeypatch.setattr(demo, "snakemake_command", lambda out, *args: [sys.executable, str(script), str(tmp_path)])

    def signal_once_started():
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signum)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a command (in-process Snakemake sets its own)
    _stop_on_sigterm()
    try:
        threading.Thread(target=signal_once_started, daemon=True).start()
        with pytest.raises(raised):
            demo._snakemake(tmp_path / "out", quiet=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert (tmp_path / "released").read_text() == signal.Signals(signum).name  # stopped by it, and waited for


def test_a_demo_stopped_on_a_left_lock_says_how_to_remove_it(tmp_path, monkeypatch):
    from wsitools.cli import demo

    out = tmp_path / "out"
    (out / ".snakemake" / "locks").mkdir(parents=True)
    (out / ".snakemake" / "locks" / "0.input.lock").write_text("")
    monkeypatch.setattr(demo, "snakemake_command", lambda o, *args: [sys.executable, "-c", "raise SystemExit(1)", *args])
    with pytest.raises(WsiToolsError) as err:
        demo._snakemake(out, quiet=True)
    assert str(err.value) == (
        f"the workflow failed (exit 1); job logs are in {out / 'logs'}; if it says {out} cannot be locked and no "
        f"other run uses it, `{sys.executable} -c 'raise SystemExit(1)' --unlock` removes the lock a killed run left")


def _qc_done(work: Path, status: dict[str, str]) -> None:
    """Give ``work`` a finished QC (tile QC files and summary, newer than the slides), so a dry
    run sees which slides are usable."""
    tiles = work / "results" / "tiles"
    tiles.mkdir(parents=True)
    qc = [write_qc(tiles, s, status=st, reason="" if st == "ok" else "cannot open") for s, st in status.items()]
    write_qc_summary(qc, work / "results" / "qc" / "summary.tsv", thumbnails=work / "results" / "qc" / "thumbnails")


def test_unlabelled_usable_slides_are_predicted_by_every_head(tmp_path):
    work = make_project(tmp_path / "w", n=8, config={"heads": {"abmil": {"type": "abmil", "folds": 2},
                                                              "mean": {"type": "meanpool", "folds": 2}}})
    sheet = work / "config" / "samples.tsv"
    rows = [line.split("\t") for line in sheet.read_text().splitlines()]
    rows[7][3] = rows[8][3] = ""  # s6 and s7 have no label; s7 fails QC
    sheet.write_text("\n".join("\t".join(r) for r in rows) + "\n")
    _qc_done(work, {f"s{i}": "failed" if i == 7 else "ok" for i in range(8)})
    result = snakemake(work, "-n", "--printshellcmds", "--cores", "4")  # threads are capped at --cores
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    assert (counts["predict"], counts["heatmap_predicted"], counts["train"]) == (2, 2, 2)
    assert "tile" not in counts and "qc_summary" not in counts
    commands = [line.split("wsitools predict ", 1)[1] for line in result.stdout.splitlines() if "wsitools predict " in line]
    assert sorted(commands) == [
        f"--model results/heads/planted/efficientnet-lite0-imagenet/{h} --features results/features/"
        f"efficientnet-lite0-imagenet --slides s6 --device auto --threads 1"
        f" --out results/predictions/planted/efficientnet-lite0-imagenet/{h} --overwrite --strict --quiet"
        f" > logs/predict/planted/efficientnet-lite0-imagenet/{h}.log 2>&1"
        for h in ("abmil", "mean")
    ]
    labelled = make_project(tmp_path / "l", n=6)
    _qc_done(labelled, {f"s{i}": "ok" for i in range(6)})
    result = snakemake(labelled, "-n")
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    assert counts["train"] == 1 and "predict" not in counts and "heatmap_predicted" not in counts


def test_export_writes_every_encoder_for_each_tool(tmp_path):
    work = make_project(tmp_path / "w", config={"export": ["clam", "trident"], "tasks": {}, "heads": {}})
    _qc_done(work, {"s0": "ok", "s1": "failed", "s2": "ok", "s3": "ok"})
    result = snakemake(work, "-n", "--printshellcmds")
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    assert (counts["export"], counts["extract"]) == (2, 3)
    commands = sorted("wsitools export " + line.split("wsitools export ", 1)[1] for line in result.stdout.splitlines()
                      if "wsitools export " in line)
    assert commands == [
        f"wsitools export --to {to} --features results/features/efficientnet-lite0-imagenet"
        f" --out results/export/{to}/efficientnet-lite0-imagenet --slides s0 s2 s3 --quiet"
        f" > logs/export/{to}/efficientnet-lite0-imagenet.log 2>&1"
        for to in ("clam", "trident")
    ]
    assert "export" not in job_counts(snakemake(make_project(tmp_path / "x"), "-n").stdout)  # off by default


@pytest.mark.slow  # two Snakemake runs: about 25 s on a busy 2-core machine
def test_report_shows_the_qc_table_inline(tmp_path):
    """Snakemake builds the report of the QC step: the QC table is an HTML result (shown in the
    page), the TSV a download, both under "1. Quality control" / "QC summary"."""
    import base64

    work = make_project(tmp_path / "w", n=2, config={"tasks": {}, "heads": {}})
    tiles = work / "results" / "tiles"
    tiles.mkdir(parents=True)
    write_qc(tiles, "s0", status="ok", reason="", n_tiles=12)
    write_qc(tiles, "s1", status="failed", reason="cannot open")
    targets = ("results/qc/summary.tsv", "results/report/qc_summary.html")
    result = snakemake(work, *targets, "--cores", "1", "--allowed-rules", "qc_summary", "qc_table")
    assert result.returncode == 0, result.stderr[-3000:]
    result = snakemake(work, "--report", "report.html", *targets)
    assert result.returncode == 0, result.stderr[-3000:]
    page = (work / "report.html").read_text()
    results = json.loads(re.search(r"var results = (\{.*?\});\n", page, flags=re.S).group(1))
    entries = {Path(path).name: entry for path, entry in results.items()}
    assert entries["qc_summary.html"]["mime_type"] == "text/html"
    assert entries["summary.tsv"]["mime_type"] != "text/html"  # offered as a download
    inline = base64.b64decode(entries["qc_summary.html"]["data_uri"].split("base64,", 1)[1]).decode()
    assert '<tr class="left-out"><td>s1</td><td>failed</td><td>cannot open</td>' in inline
    categories = json.loads(re.search(r"var categories = (\{.*?\});\n", page, flags=re.S).group(1))
    assert set(categories["1. Quality control"]["QC summary"]) == {"results/qc/summary.tsv",
                                                                  "results/report/qc_summary.html"}
    assert "Other" not in categories["1. Quality control"]


def test_survival_and_regression_tasks_in_the_workflow(tmp_path):
    """The task file's type decides: a survival task's labels come from two sheet columns, its
    report figure is a Kaplan-Meier plot, a regression task's a scatter plot; bad values in the
    sheet stop the run before any job, naming the slide."""
    work = make_project(tmp_path / "w", n=6)
    rows = [r.split("\t") for r in (work / "config" / "samples.tsv").read_text().splitlines()]
    header, body = rows[0], rows[1:]
    extra = [["12.5", "1", "0.4"], ["3", "0", "1.5"], ["7", "1", "2.0"], ["20", "0", "0.1"], ["1.5", "1", "3"],
             ["", "", ""]]
    write_sheet(work / "config" / "samples.tsv", header + ["os_months", "os_event", "level"],
                [r + e for r, e in zip(body, extra)])
    (work / "config" / "os.yaml").write_text("name: os\ntype: survival\ndescription: predict survival\n")
    (work / "config" / "level.yaml").write_text("name: level\ntype: regression\ndescription: predict the level\n")
    tasks = {"os": {"task_file": "config/os.yaml", "time_column": "os_months", "event_column": "os_event"},
             "level": {"task_file": "config/level.yaml", "label_column": "level"}}
    config = yaml.safe_load((work / "config" / "config.yaml").read_text())
    # 3 events and 2 censored patients take 3 folds (2 would leave a training part without two
    # patients of one stratum, as training would find)
    heads = {name: {**head, "folds": 3} for name, head in config["heads"].items()}
    (work / "config" / "config.yaml").write_text(yaml.safe_dump({**config, "tasks": tasks, "heads": heads}))
    result = snakemake(work, "-n", "--printshellcmds")
    assert result.returncode == 0, result.stdout + result.stderr
    counts = job_counts(result.stdout)
    assert counts["train"] == 2 and counts["outcome_figure"] == 2 and "roc" not in counts
    assert "results/report/km/os.png" in result.stdout and "results/report/regression/level.png" in result.stdout
    assert "--task config/os.yaml" in result.stdout and "--task config/level.yaml" in result.stdout
    extra[1][1] = "2"
    write_sheet(work / "config" / "samples.tsv", header + ["os_months", "os_event", "level"],
                [r + e for r, e in zip(body, extra)])
    result = snakemake(work, "-n")
    assert result.returncode != 0
    assert "config: tasks: os: config/samples.tsv: slide s1: event '2' must be 0 (censored) or 1 (event)" in (
        result.stdout + result.stderr)


def test_outcome_labels_tables_and_figures(tmp_path):
    samples = [Sample(f"s{i}", f"s{i}.svs", f"p{i}", fields={"t": t, "e": e})
               for i, (t, e) in enumerate([("5", "1"), ("2", "0"), ("", "1"), ("9", "1")])]
    out = tmp_path / "labels.tsv"
    columns = task_columns("survival", label_column="label", time_column="t", event_column="e")
    write_labels(samples, usable=["s0", "s1", "s2"], columns=columns, out=out, task_type="survival")
    assert read_table(out) == [{"slide_id": "s0", "patient_id": "p0", "time": "5", "event": "1"},
                                      {"slide_id": "s1", "patient_id": "p1", "time": "2", "event": "0"}]
    with pytest.raises(DataError, match="needs at least 3 patients with an event, but s.tsv has 2"):
        check_outcome_labels(samples, task="os", task_type="survival", columns=columns, folds={"h": 3},
                                    sheet="s.tsv")
    # as training makes the folds: 2 events, 2 folds leave no fold's training part two of one stratum
    with pytest.raises(DataError, match=r"2-fold cross-validation of task 'os' leaves a fold's training part "
                                        r"without two patients of one stratum .*\(s.tsv: 2 patients with an event, "
                                        r"1 other\); label more patients"):
        check_outcome_labels(samples, task="os", task_type="survival", columns=columns, folds={"h": 2},
                             sheet="s.tsv")
    more = samples + [Sample(f"c{i}", f"c{i}.svs", f"c{i}", fields={"t": "4", "e": "0"}) for i in range(3)]
    check_outcome_labels(more, task="os", task_type="survival", columns=columns, folds={"h": 2}, sheet="s.tsv")
    heads = tmp_path / "heads" / "os" / "enc"
    for head, flip in (("abmil", 1.0), ("meanpool", -1.0)):
        (heads / head).mkdir(parents=True)
        rows = ["slide_id,patient_id,time,event,fold,risk"] + [
            f"s{i},p{i},{t},{e},0,{flip * (5 - t)}" for i, (t, e) in enumerate([(1, 1), (2, 1), (3, 0), (8, 1), (9, 0)])]
        (heads / head / "predictions.csv").write_text("\n".join(rows) + "\n")
    plot_outcomes([heads / h / "predictions.csv" for h in ("abmil", "meanpool")], tmp_path / "km.png",
                         task_type="survival")
    from PIL import Image

    width, height = Image.open(tmp_path / "km.png").size
    assert width > 1.8 * height  # two panels side by side
    with pytest.raises(DataError, match="columns label, prediction"):
        plot_outcomes([heads / "abmil" / "predictions.csv"], tmp_path / "r.png", task_type="regression")
    metrics = {"task_type": "survival", "prompts": [], "n_slides": 5, "n_patients": 5,
               "pooled": {"c_index": 0.8, "c_index_ci95": [0.6, 0.9], "uno_c": 0.75, "uno_c_ci95": [0.5, 0.9]},
               "folds": [{"fold": 0}, {"fold": 1}],
               "mean_over_folds": {"c_index": {"mean": 0.8, "sd": 0.1, "n_folds": 2},
                                   "uno_c": {"mean": 0.7, "sd": None, "n_folds": 1}}}
    (heads / "abmil" / "metrics.json").write_text(json.dumps(metrics))
    rows = write_metrics_table([heads / "abmil" / "metrics.json"], tmp_path / "m.tsv")
    table = read_table(tmp_path / "m.tsv")
    assert table[0]["task_type"] == "survival" and table[0]["c_index"] == "0.8000" and table[0]["uno_c_fold_sd"] == ""
    assert (table[0]["n_folds"], table[0]["c_index_fold_n"], table[0]["uno_c_fold_n"]) == ("2", "2", "1")
    assert "auroc" not in table[0] and len(rows) == 1


def test_patient_bag_heads_in_the_workflow(tmp_path):
    """A head with `bag: patient` trains with --bag patient and predicts a patient's unlabelled
    slides pooled, grouped by the samples sheet; slides of one patient with different labels stop
    the run before any job, naming the patient."""
    heads = {"pat": {"type": "abmil", "folds": 2, "bag": "patient"}, "abmil": {"type": "abmil", "folds": 2}}
    work = make_project(tmp_path / "w", n=9, config={"heads": heads})
    sheet = work / "config" / "samples.tsv"
    rows = [line.split("\t") for line in sheet.read_text().splitlines()]
    # patients neg: A (s0, s2), C, F, G; pos: B (s1, s3), D; s8 (patient E) has no label: predicted
    for row, patient, label in zip(rows[1:], "ABABCDFGE", ["neg", "pos", "neg", "pos", "neg", "pos", "neg", "neg", ""]):
        row[2], row[3] = patient, label
    write_sheet(sheet, rows[0], rows[1:])
    _qc_done(work, {f"s{i}": "ok" for i in range(9)})
    result = snakemake(work, "-n", "--printshellcmds", "--cores", "4")
    assert result.returncode == 0, result.stderr
    train = {line.split("--out ", 1)[1].split()[0].rsplit("/", 1)[1]: line
             for line in result.stdout.splitlines() if "wsitools train " in line}
    assert " --head abmil --bag patient --folds 2 " in train["pat"]
    assert " --head abmil --bag slide --folds 2 " in train["abmil"]
    predict = {line.split("--out ", 1)[1].split()[0].rsplit("/", 1)[1]: line
               for line in result.stdout.splitlines() if "wsitools predict " in line}
    assert " --slides s8 --patients config/samples.tsv --device auto " in predict["pat"]
    assert " --slides s8 --device auto " in predict["abmil"]
    rows[3][2] = "B"  # s2 (neg) joins patient B (pos)
    write_sheet(sheet, rows[0], rows[1:])
    result = snakemake(work, "-n")
    assert result.returncode != 0
    assert ("config: tasks: planted: patient B in config/samples.tsv: slides s1 (pos) and s2 (neg) disagree on "
            "'label', but heads pat pool a patient's slides") in result.stdout + result.stderr


def test_jobs_run_the_wsitools_of_the_interpreter_that_runs_snakemake(tmp_path):
    # An environment used without activating it: `wsitools` is not on PATH, yet the tile job
    # finds the command beside the Python that runs Snakemake.
    root = make_project(tmp_path / "p", n=1, config={"tasks": {}, "heads": {}})
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    assert shutil.which("wsitools", path=env["PATH"]) is None
    run = subprocess.run(snakemake_command(root, "--cores", "1", "results/qc/summary.tsv"),
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    qc = json.loads((root / "results" / "tiles" / "s0.qc.json").read_text())
    assert (qc["slide_id"], qc["status"]) == ("s0", "no_tissue")  # the fixture is smaller than one tile


def test_output_folders_given_with_dot_slash_are_normalised(tmp_path):
    work = make_project(tmp_path / "w", n=1, config={"slides_glob": "slides/*.svs", "tasks": {}, "heads": {},
                                                      "tiles_dir": "./out/tiles/", "features_dir": "./out/features"})
    result = snakemake(work, "-n", "--printshellcmds")
    assert result.returncode == 0, result.stderr
    assert "--out out/tiles " in result.stdout and "starts with './'" not in result.stdout + result.stderr


def test_workflow_scripts_fail_with_one_line_in_their_log(tmp_path, capsys):
    """A script rule given bad input ends as the wsitools command does: one line naming the file,
    in the rule's log and on stderr, exit status 2; every script runs through run_script."""
    import runpy
    from types import SimpleNamespace

    scripts = sorted((REPO / "workflow" / "scripts").glob("*.py"))
    assert scripts and all("run_script(" in p.read_text() for p in scripts)
    bad = tmp_path / "s1.qc.json"
    bad.write_text('{"slide_id": "s1", "status": "ok"')  # cut off
    log = tmp_path / "qc_summary.log"
    job = SimpleNamespace(input=SimpleNamespace(qc=[str(bad)]), log=[str(log)],
                          output=SimpleNamespace(table=str(tmp_path / "summary.tsv"), thumbnails=str(tmp_path / "th")))
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / "workflow" / "scripts" / "qc_summary.py"), init_globals={"snakemake": job})
    line = log.read_text()
    assert stop.value.code == 2 and line.count("\n") == 1 and line.startswith(f"QC file {bad} cannot be read")
    assert capsys.readouterr().err == line and not (tmp_path / "summary.tsv").exists()
    log.unlink()
    job.input.metrics = [str(tmp_path / "missing" / "metrics.json")]
    job.output = SimpleNamespace(table=str(tmp_path / "m.tsv"), page=str(tmp_path / "m.html"))
    with pytest.raises(SystemExit):
        runpy.run_path(str(REPO / "workflow" / "scripts" / "metrics_table.py"), init_globals={"snakemake": job})
    assert log.read_text().startswith(f"metrics file {tmp_path / 'missing' / 'metrics.json'} cannot be read")


def test_report_scripts_refuse_damaged_tables_in_one_line(tmp_path, capsys):
    """A predictions table with a probability that is no number, or of a head with no class
    probabilities, and a QC table without its status column ended the roc and qc_table rules
    in a traceback with no log."""
    import runpy
    from types import SimpleNamespace

    head = write_head_run(tmp_path, "t", "enc", "abmil", ["neg"], [[0.4, 0.6]], ["neg", "pos"])
    preds = head / "predictions.csv"
    preds.write_text(preds.read_text().replace("0.600", "x"))
    log = tmp_path / "roc.log"
    job = SimpleNamespace(input=SimpleNamespace(predictions=[str(preds)]), log=[str(log)],
                          output=SimpleNamespace(png=str(tmp_path / "roc.png")))
    with pytest.raises(SystemExit):
        runpy.run_path(str(REPO / "workflow" / "scripts" / "roc.py"), init_globals={"snakemake": job})
    assert log.read_text() == f"predictions {preds}: a probability is not a number (could not convert string to float: 'x')\n"
    preds.write_text("slide_id,label,risk\ns0,1,0.5\n")
    with pytest.raises(SystemExit):
        runpy.run_path(str(REPO / "workflow" / "scripts" / "roc.py"), init_globals={"snakemake": job})
    assert log.read_text() == f"predictions {preds} have no prob_{{class}} columns of two or more classes\n"
    write_table(tmp_path / "summary.tsv", [{"slide_id": "s0", "state": "ok"}], ["slide_id", "state"])
    job = SimpleNamespace(input=SimpleNamespace(table=str(tmp_path / "summary.tsv")), log=[str(log)],
                          output=SimpleNamespace(page=str(tmp_path / "qc.html")))
    with pytest.raises(SystemExit):
        runpy.run_path(str(REPO / "workflow" / "scripts" / "qc_table.py"), init_globals={"snakemake": job})
    assert log.read_text() == f"QC table {tmp_path / 'summary.tsv'} has no column status (not a wsitools QC summary)\n"
    capsys.readouterr()


def test_too_few_patients_left_by_qc_for_a_heads_folds_name_the_config_key(tmp_path):
    """The folds check before any job counts every labelled slide; QC may drop some. The labels
    job checks the usable ones again, so the run stops there naming `heads: NAME: folds` (not
    the --folds of `wsitools train`, which the config does not show), before any head trains."""
    work = make_project(tmp_path / "w")  # 'pos': s1 and s4, two patients for 2 folds
    _qc_done(work, {f"s{i}": "failed" if i == 4 else "ok" for i in range(6)})
    result = snakemake(work, "--cores", "1", "results/heads/planted/labels.tsv")
    assert result.returncode != 0
    log = (work / "logs" / "labels" / "planted.log").read_text().strip()
    assert log.startswith("task 'planted': config: heads: abmil: folds: 2-fold cross-validation of task 'planted' "
                          "needs at least 2 patients of each class")
    assert "but in column 'label' of config/samples.tsv 'neg' has 4 patients, 'pos' has 1 patient; label more patients" in log
    assert log.endswith("(after QC; results/qc/summary.tsv says why slides were left out)")
    assert not (work / "results" / "heads" / "planted" / "labels.tsv").exists()
