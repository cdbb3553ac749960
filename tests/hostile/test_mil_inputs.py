"""Hostile inputs to MIL training and prediction: feature stores, labels tables, task files and
samples sheets as a new user writes them (spreadsheet exports, other tools' h5 files, YAML's
surprises), and `predict`/`heatmap` on folders that hold less than they should.

Each case makes its own small input and asserts on the outcome: a one-line error naming the file
(and line, key or slide) and what is wrong (exit 2 from the CLI), a skipped slide with its reason,
or the right result where the input is still meaningful.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from wsitools.errors import DataError
from wsitools.labels import read_labels, read_patients
from wsitools.mil.synthetic import make_bag_cohort
from wsitools.samples import read_samples
from wsitools.text import load_task
from cli_calls import one_line, run
from test_features import flip_bit

TASK = {"name": "planted", "description": "is there a planted region",
        "classes": {"neg": "one texture only", "pos": "a region of another texture"}}
FAST_TRAIN = ["--head", "meanpool", "--folds", "2", "--epochs", "2", "--patience", "1", "--bootstrap", "0",
              "--device", "cpu", "--quiet"]


@pytest.fixture()
def cohort(tmp_path):
    """Twelve 8-d feature stores (six per class), a task file and a labels table."""
    bags = make_bag_cohort(tmp_path / "features", n_slides=12, n_tiles=(10, 20), dim=8, seed=2)
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(TASK))
    table = "slide_id,label,patient_id\n" + "".join(f"{b.slide_id},{b.label},{b.patient_id}\n" for b in bags)
    (tmp_path / "labels.csv").write_text(table)
    return tmp_path, bags


def train_argv(root: Path, labels: Path, out: str = "heads", *, task: bool = True) -> list:
    return ["train", "--features", root / "features", "--labels", labels,
            *(["--task", root / "task.yaml"] if task else []), "--out", root / out, *FAST_TRAIN]


# --- feature stores ----------------------------------------------------------------------------------


def test_a_features_group_instead_of_a_dataset_skips_that_slide(cohort, capsys):
    root, bags = cohort
    with h5py.File(bags[0].path, "w") as f:  # another tool's layout: features/<name> datasets
        f.create_group("features").create_dataset("resnet", data=np.zeros((4, 8), np.float32))
    rc, err = run(train_argv(root, root / "labels.csv"), capsys)
    assert rc == 0, err
    skipped = json.loads((root / "heads" / "run.json").read_text())["skipped"]
    assert skipped == {bags[0].slide_id: f"feature store {bags[0].path}: 'features' is a group, not a dataset"}


def assert_skipped_in_train_and_predict(root, slide_id: str, reason: str, capsys) -> None:
    """Training again and predicting with the head trained before both skip the slide for ``reason``."""
    rc, err = run(train_argv(root, root / "labels.csv"), capsys)
    assert rc == 0, err
    assert json.loads((root / "heads" / "run.json").read_text())["skipped"] == {slide_id: reason}
    rc, err = run(["predict", "--model", root / "before", "--features", root / "features", "--out", root / "p",
                   "--device", "cpu", "--quiet"], capsys)
    assert rc == 0, err
    skipped = json.loads((root / "p" / "predict.json").read_text())["skipped"]
    assert skipped == {slide_id: f"slide {slide_id}: {reason}"}

@pytest.mark.parametrize("dataset, index, bit", [("features", (3, 2), 23), ("coords", (2, 0), 12)])
def test_a_flipped_bit_in_a_feature_store_skips_that_slide_and_fails_its_export(cohort, capsys, dataset, index, bit):
    """A bit flipped on disk leaves the values finite and the shapes right (a feature doubled or
    halved, a tile moved): only the store's checksum finds it."""
    root, bags = cohort
    rc, err = run(train_argv(root, root / "labels.csv", "before"), capsys)
    assert rc == 0, err
    bad = bags[0].path
    flip_bit(bad, dataset, index, bit)
    with h5py.File(bad, "r") as f:
        read = zlib.crc32(f[dataset][()].astype(f[dataset].dtype.newbyteorder("<")))
        recorded = f.attrs.get(f"{dataset}_crc32", -1)
    reason = (f"{bad}: checksum mismatch in '{dataset}' (CRC-32 {read:08x}, recorded {recorded:08x}): damaged since "
              "it was written; extract it again (wsitools extract --overwrite)")
    assert_skipped_in_train_and_predict(root, bags[0].slide_id, reason, capsys)
    rc, err = run(["export", "--to", "clam", "--features", root / "features", "--out", root / "x", "--quiet"], capsys)
    assert rc == 1 and reason in err and "Traceback" not in err, err
    exported = sorted(p.stem for p in (root / "x" / "pt_files").iterdir())
    assert exported == sorted(b.slide_id for b in bags[1:])


def test_a_bag_without_coords_is_skipped_before_training_and_in_predict(cohort, capsys):
    root, bags = cohort
    rc, err = run(train_argv(root, root / "labels.csv", "before"), capsys)
    assert rc == 0, err
    with h5py.File(bags[0].path, "a") as f:  # features only, as some tools write them
        del f["coords"]
    reason = (f"feature store {bags[0].path} has no 'coords' dataset (each tile's level-0 position, which its "
              "attention map needs)")
    assert_skipped_in_train_and_predict(root, bags[0].slide_id, reason, capsys)
    assert len((root / "p" / "predictions.csv").read_text().splitlines()) == len(bags)  # header + the other 11


def test_a_store_copied_under_another_slides_name_is_skipped_in_training_and_predict(cohort, capsys):
    """slide_002's features saved as slide_000.h5 would be predicted (and trained) as slide_000;
    the store records whose they are, and export already refused them."""
    import shutil

    root, bags = cohort
    rc, err = run(train_argv(root, root / "labels.csv", "before"), capsys)
    assert rc == 0, err
    shutil.copy(bags[2].path, bags[0].path)
    reason = (f"feature store {bags[0].path} holds the features of slide {bags[2].slide_id} (its slide_id attribute); "
              "a feature store is named {slide_id}.h5")
    assert_skipped_in_train_and_predict(root, bags[0].slide_id, reason, capsys)
    predicted = [line.split(",")[0] for line in (root / "p" / "predictions.csv").read_text().splitlines()[1:]]
    assert predicted == [b.slide_id for b in bags[1:]]


def _replace(path: Path, name: str, link=None, **dataset) -> None:
    """Dataset ``name`` of the store at ``path`` replaced by ``link`` or by a dataset made of
    ``dataset`` (h5py's create_dataset arguments), its checksum dropped: what anyone editing the
    file can do."""
    with h5py.File(path, "r+") as f:
        del f[name]
        del f.attrs[f"{name}_crc32"]
        if link is not None:
            f[name] = link
        else:
            f.create_dataset(name, **dataset)


def test_feature_stores_that_claim_more_than_they_hold_or_hold_it_elsewhere_are_skipped(tmp_path, capsys, fifo):
    """A few KB of h5 can claim terabytes in chunks never written, which read as fill values for
    hours before an allocation fails, or keep its values in another file. Each such store is
    refused in one line naming it before anything is read or allocated, and train, predict and
    export go on without it."""
    from wsitools.feature_store import MAX_ROWS

    bags = make_bag_cohort(tmp_path / "features", n_slides=24, n_tiles=(10, 20), dim=8, seed=2)
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(TASK))
    (tmp_path / "labels.csv").write_text(
        "slide_id,label,patient_id\n" + "".join(f"{b.slide_id},{b.label},{b.patient_id}\n" for b in bags))
    rc, err = run(train_argv(tmp_path, tmp_path / "labels.csv", "before"), capsys)
    assert rc == 0, err
    paths = [b.path for b in bags]
    values = []
    for path in paths[:10]:
        with h5py.File(path, "r") as f:
            values.append(f["features"][()])
    other, blob = tmp_path / "other.h5", tmp_path / "blob.bin"
    with h5py.File(other, "w") as f:
        for i in (4, 7):
            f.create_dataset(f"bag{i}", data=values[i])
    values[6].tofile(blob)
    reasons = {}
    huge = MAX_ROWS + 1
    _replace(paths[0], "features", shape=(huge, 8), dtype="f4", chunks=(65536, 8))
    _replace(paths[0], "coords", shape=(huge, 2), dtype="i8", chunks=(65536, 2))
    reasons[0] = f"'features' claims {huge:,} rows, more than the {MAX_ROWS:,} tiles any slide gives"
    _replace(paths[1], "features", shape=(1_000_000, 8), dtype="f4", chunks=(4096, 8))
    _replace(paths[1], "coords", shape=(1_000_000, 2), dtype="i8", chunks=(4096, 2))
    reasons[1] = "'features' claims (1000000, 8) values of 32,000,000 bytes, but the file holds 0 bytes of them"
    _replace(paths[2], "features", shape=(1_000_000, 8), dtype="f4", chunks=(4096, 8), compression="gzip")
    _replace(paths[2], "coords", shape=(1_000_000, 2), dtype="i8", chunks=(4096, 2), compression="gzip")
    with h5py.File(paths[2], "r+") as f:
        f["features"][: len(values[2])] = values[2]
        f["coords"][: len(values[2])] = np.arange(2 * len(values[2])).reshape(-1, 2)
        stored = f["features"].id.get_storage_size()
    reasons[2] = f"'features' claims (1000000, 8) values of 32,000,000 bytes, but the file holds {stored:,} bytes compressed"
    _replace(paths[3], "features", shape=(len(values[3]), 70_000), dtype="f4", chunks=(1, 70_000))
    reasons[3] = "'features' claims 70,000-d features, more than the 65,536 of any encoder"
    _replace(paths[4], "features", link=h5py.ExternalLink(str(other), "/bag4"))
    reasons[4] = f"'features' is a link to /bag4 in {other}, not a dataset of the file; a feature store holds its own data"
    with h5py.File(paths[5], "r+") as f:
        f.move("features", "kept")
        f["features"] = h5py.SoftLink("/kept")
    reasons[5] = "'features' is a link to /kept, not a dataset of the file; a feature store holds its own data"
    _replace(paths[6], "features", shape=values[6].shape, dtype="f4", external=[(str(blob), 0, values[6].nbytes)])
    reasons[6] = f"'features' is stored in another file, {blob}; a feature store holds its own data"
    layout = h5py.VirtualLayout(shape=values[7].shape, dtype="f4")
    layout[:] = h5py.VirtualSource(str(other), "bag7", shape=values[7].shape)
    with h5py.File(paths[7], "r+") as f:
        del f["features"]
        f.create_virtual_dataset("features", layout)
    reasons[7] = "'features' is a virtual dataset; a feature store holds its own data"
    n8 = len(values[8])
    _replace(paths[8], "coords", shape=(n8, 2), dtype="i8", chunks=(4, 2))
    reasons[8] = f"'coords' claims ({n8}, 2) values of {16 * n8:,} bytes, but the file holds 0 bytes of them"
    paths[9].unlink()
    fifo(paths[9])
    reasons[9] = "is a FIFO (named pipe), not a feature store file (an h5 file)"

    rc, err = run(train_argv(tmp_path, tmp_path / "labels.csv"), capsys)
    assert rc == 0, err
    skipped = json.loads((tmp_path / "heads" / "run.json").read_text())["skipped"]
    assert sorted(skipped) == sorted(b.slide_id for b in bags[:10])
    for i, reason in reasons.items():
        assert skipped[bags[i].slide_id].startswith(f"{paths[i]}: {reason}"), (i, skipped[bags[i].slide_id])
    rc, err = run(["predict", "--model", tmp_path / "before", "--features", tmp_path / "features",
                   "--out", tmp_path / "p", "--device", "cpu", "--quiet"], capsys)
    assert rc == 0, err
    skipped = json.loads((tmp_path / "p" / "predict.json").read_text())["skipped"]
    assert sorted(skipped) == sorted(b.slide_id for b in bags[:10])
    for i, reason in reasons.items():
        assert skipped[bags[i].slide_id].startswith(f"slide {bags[i].slide_id}: {paths[i]}: {reason}")
    predicted = [line.split(",")[0] for line in (tmp_path / "p" / "predictions.csv").read_text().splitlines()[1:]]
    assert predicted == [b.slide_id for b in bags[10:]]
    rc, err = run(["export", "--to", "clam", "--features", tmp_path / "features", "--out", tmp_path / "x",
                   "--quiet"], capsys)
    assert rc == 1 and "Traceback" not in err and all(f"{paths[i]}: {r}" in err for i, r in reasons.items()), err
    assert sorted(p.stem for p in (tmp_path / "x" / "pt_files").iterdir()) == sorted(b.slide_id for b in bags[10:])


def test_float16_and_float32_stores_and_a_one_tile_bag_train_together(cohort, capsys):
    from wsitools.feature_store import read_features
    from wsitools.mil.synthetic import write_synthetic_store

    root, bags = cohort
    half = read_features(bags[1].path).numpy().astype(np.float16)
    write_synthetic_store(bags[1].path, half)
    write_synthetic_store(bags[2].path, half[:1])
    rc, err = run(train_argv(root, root / "labels.csv"), capsys)
    assert rc == 0, err
    assert json.loads((root / "heads" / "run.json").read_text())["skipped"] == {}
    predicted = (root / "heads" / "predictions.csv").read_text()
    assert bags[1].slide_id in predicted and bags[2].slide_id in predicted


# --- labels tables -------------------------------------------------------------------------------------


def test_spreadsheet_exports_read_as_the_plain_table(cohort):
    root, bags = cohort
    plain = (root / "labels.csv").read_text()
    expected = [(b.slide_id, b.label, b.patient_id) for b in bags]
    variants = {
        "bom.csv": "\ufeff" + plain,
        "crlf.csv": plain.replace("\n", "\r\n"),
        "spaces.csv": plain.replace(",", " , "),
        "blank.csv": plain.replace("\n", "\n\n", 4) + ",,\n\n",
        "tab.csv": plain.replace(",", "\t"),  # a TSV saved under a .csv name
        "semicolon.csv": plain.replace(",", ";"),  # a spreadsheet in a decimal-comma locale
        "comma.tsv": plain,  # and a CSV saved under a .tsv name
    }
    for name, text in variants.items():
        (root / name).write_text(text, encoding="utf-8", newline="")
        rows = read_labels(root / name)
        assert [(r.slide_id, r.label, r.patient_id) for r in rows] == expected, name
    # line numbers count the blank lines too
    (root / "twice.csv").write_text(variants["blank.csv"] + f"{bags[3].slide_id},pos,p\n")
    with pytest.raises(DataError, match=rf"twice.csv, line 20: slide {bags[3].slide_id} appears twice"):
        read_labels(root / "twice.csv")


def test_a_row_with_more_fields_than_the_header_is_named(tmp_path, capsys):
    (tmp_path / "f").mkdir()
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label\na,1.5\nb,1,5\nc,2\n")  # a decimal comma, unquoted
    with pytest.raises(DataError) as err:
        read_labels(path, task_type="regression")
    assert str(err.value) == (f"labels table {path}, line 3: 3 fields, but the header has 2 "
                              "(a separator inside a value, such as a decimal comma? quote that value)")
    patients = tmp_path / "patients.csv"
    patients.write_text("slide_id,patient_id\na,p\nb,p,x\n")
    with pytest.raises(DataError, match=r"patients table .*patients.csv, line 3: 3 fields, but the header has 2"):
        read_patients(patients)
    rc, err = run(["train", "--features", tmp_path / "f", "--labels", path, "--out", tmp_path / "o"], capsys)
    one_line(rc, err, f"{path}, line 3: 3 fields")


def test_one_number_written_two_ways_is_not_two_classes(cohort, capsys):
    root, bags = cohort
    labels = root / "numeric.csv"
    rows = [f"{b.slide_id},{'1' if b.label == 'pos' else '0'}" for b in bags]
    rows[0] = rows[0].rsplit(",", 1)[0] + ",1.0"  # one slide written by another export
    rows[1] = rows[1].rsplit(",", 1)[0] + ",0.0"
    labels.write_text("slide_id,label\n" + "\n".join(rows) + "\n")
    rc, err = run(train_argv(root, labels, task=False), capsys)
    one_line(rc, err, f"labels table {labels}: labels '0.0' and '0' are one number written two ways",
             f"(slides {bags[1].slide_id} and {bags[2].slide_id})")
    assert not (root / "heads").exists()
    same = root / "same.csv"
    same.write_text("slide_id,label\n" + "\n".join(r.replace(",1.0", ",1").replace(",0.0", ",0") for r in rows) + "\n")
    rc, err = run(train_argv(root, same, task=False), capsys)
    assert rc == 0, err
    assert json.loads((root / "heads" / "metrics.json").read_text())["classes"] == ["0", "1"]


# --- task files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("keys", [("yes", "no"), ("01", "02"), ("1.50", "2"), ("on", "off"), ("null", "~")])
def test_class_names_stay_as_written(tmp_path, keys):
    path = tmp_path / "task.yaml"
    path.write_text(f"name: t\ndescription: d\nclasses:\n  {keys[0]}: first\n  {keys[1]}: second\n")
    assert load_task(path).classes == keys


def test_a_class_name_with_spaces_around_it_is_named(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text("name: t\ndescription: d\nclasses:\n  'pos ': first\n  neg: second\n")
    with pytest.raises(DataError) as err:
        load_task(path)
    assert str(err.value) == f"{path}: class name 'pos ' starts or ends with a space; no label could equal it"


def test_a_class_written_twice_is_named(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text("name: t\ndescription: d\nclasses:\n  a: first\n  b: second\n  a: third\n")
    with pytest.raises(DataError) as err:
        load_task(path)
    assert str(err.value).startswith(f"task description {path}: not valid YAML: key 'a' appears twice")
    assert "line 6" in str(err.value)


# --- samples sheets (the workflow's labels) ------------------------------------------------------------


def test_a_samples_sheet_with_a_byte_order_mark_reads(tmp_path):
    sheet = tmp_path / "samples.tsv"
    sheet.write_text("\ufeffslide_id\tpath\tlabel\r\na\t/x/a.svs\tneg\r\n", encoding="utf-8", newline="")
    [sample] = read_samples(sheet, check_files=False)
    assert (sample.slide_id, sample.path, sample.value("label")) == ("a", "/x/a.svs", "neg")


def test_a_samples_sheet_that_is_not_utf8_is_one_line(tmp_path):
    sheet = tmp_path / "samples.tsv"
    sheet.write_bytes("slide_id\tpath\tlabel\na\t/x/a.svs\tn\xe9g\n".encode("latin-1"))
    with pytest.raises(DataError) as err:
        read_samples(sheet, check_files=False)
    assert str(err.value) == (f"samples sheet {sheet}: not UTF-8 text (byte 0xe9 at offset 32: Latin-1 or another "
                              "legacy encoding?); save it as UTF-8")


@pytest.mark.parametrize("content, message", [
    (b"PK\x03\x04\x14\x00\x06\x00" + bytes(range(128, 256)),
     "a zip file (an Excel or OpenDocument workbook?), not text; save it as CSV (UTF-8)"),
    ("slide_id\tlabel\r\na\tneg\r\n".encode("utf-16"),
     "UTF-16 text (a spreadsheet's 'Unicode text' export?); save it as UTF-8"),
])
def test_a_workbook_or_utf16_export_given_as_the_labels_says_what_it_is(tmp_path, capsys, content, message):
    (tmp_path / "f").mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_bytes(content)
    rc, err = run(["train", "--features", tmp_path / "f", "--labels", labels, "--out", tmp_path / "o"], capsys)
    one_line(rc, err, f"labels table {labels}: {message}")


# --- regression targets ---------------------------------------------------------------------------------


def test_regression_targets_too_large_to_standardise_are_refused(cohort, capsys):
    root, bags = cohort
    (root / "r.yaml").write_text(yaml.safe_dump({"name": "lvl", "type": "regression", "description": "a level"}))
    labels = root / "values.csv"
    values = np.random.default_rng(0).normal(size=len(bags)) * 1e200
    labels.write_text("slide_id,label\n" + "".join(f"{b.slide_id},{v:.6g}\n" for b, v in zip(bags, values)))
    argv = train_argv(root, labels, task=False) + ["--task", root / "r.yaml"]
    rc, err = run(argv, capsys)
    one_line(rc, err, "the labels' spread is too large to standardise", "rescale")
    assert not (root / "heads").exists()


# --- predict and heatmap on folders that hold less than they should ------------------------------------


def test_predict_on_a_folder_without_feature_stores_says_so(cohort, capsys):
    root, _ = cohort
    rc, err = run(train_argv(root, root / "labels.csv"), capsys)
    assert rc == 0, err
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("the stores are elsewhere")
    rc, err = run(["predict", "--model", root / "heads", "--features", root / "empty", "--out", root / "p",
                   "--device", "cpu", "--quiet"], capsys)
    one_line(rc, err, f"no feature stores ({{slide_id}}.h5) in {root / 'empty'}")
    assert not (root / "p").exists()


def test_predict_when_every_slide_fails_counts_them_and_names_the_first(cohort, capsys):
    root, bags = cohort
    rc, err = run(train_argv(root, root / "labels.csv"), capsys)
    assert rc == 0, err
    other = make_bag_cohort(root / "wide", n_slides=30, n_tiles=(5, 6), dim=16, seed=0)
    rc, err = run(["predict", "--model", root / "heads", "--features", root / "wide", "--out", root / "p",
                   "--device", "cpu", "--quiet"], capsys)
    line = one_line(rc, err, f"no slide could be predicted from {root / 'wide'}: 30 slides skipped",
                    f"slide {other[0].slide_id}: features are 16-d, the head expects 8-d")
    assert len(line) < 600


def test_heatmap_of_a_bag_that_records_no_slide_says_so(tmp_path, capsys):
    from wsitools.attention import write_attention

    att = tmp_path / "attention" / "s1.h5"
    write_attention(att, slide_id="s1", attention=np.full(4, 0.25), coords=np.zeros((4, 2), np.int64),
                    classes=["a", "b"], probs=np.array([0.5, 0.5]), feature_path=tmp_path / "s1.h5",
                    provenance={"tile_size_level0": 448.0}, meta={"head": "abmil"})
    rc, err = run(["heatmap", "--attention", att, "--out", tmp_path / "h", "--quiet"], capsys)
    assert rc == 1
    assert "s1\tfailed\tslide s1: no slide file is recorded for it (no patch store either); pass --slide" in err
    rc, err = run(["heatmap", "--attention", att, "--store", tmp_path / "gone.zarr", "--out", tmp_path / "h",
                   "--quiet"], capsys)
    assert rc == 2 and err.strip() == f"wsitools heatmap: error: --store {tmp_path / 'gone.zarr'}: no such file or folder"
    write_attention(att, slide_id="s1", attention=np.full(4, 0.25), coords=np.zeros((4, 2), np.int64),
                    classes=["a", "b"], probs=np.array([0.5, 0.5]), feature_path=tmp_path / "s1.h5",
                    provenance={"tile_size_level0": 448.0, "store_path": str(tmp_path / "gone.zarr")},
                    meta={"head": "abmil"})
    rc, err = run(["heatmap", "--attention", att, "--out", tmp_path / "h", "--quiet"], capsys)
    assert rc == 1  # a store recorded, since removed
    assert f"slide s1: no slide file is recorded for it (patch store {tmp_path / 'gone.zarr'} not found)" in err


@pytest.mark.parametrize("labels, message", [
    (["0", "1", "1.0", "0", "1"], "labels '1' and '1.0' are one number written two ways (slides s1 and s2)"),
    (["neg", "pos", "neg", "POS", "pos"], "labels 'pos' and 'POS' differ only in case (slides s1 and s3), which "
                                          "would make them two classes"),
])
def test_the_workflow_check_names_one_label_written_two_ways(labels, message):
    from wsitools.labels import check_task_labels
    from wsitools.samples import Sample

    samples = [Sample(slide_id=f"s{i}", path=f"/x/s{i}.svs", patient_id=f"s{i}", mpp=None,
                      fields={"label": label}) for i, label in enumerate(labels)]
    with pytest.raises(DataError) as err:
        check_task_labels(samples, task="t", label_column="label", classes=None, folds={"abmil": 2},
                          sheet="samples.tsv")
    assert str(err.value).startswith(f"config: tasks: t: column 'label' of samples.tsv: {message}")


def test_labels_that_differ_only_in_case_are_one_class_when_spelled_alike():
    from wsitools.labels import classes_from_labels

    assert classes_from_labels([("a", "MSI"), ("b", "MSS"), ("c", "MSI")], where="x") == ("MSI", "MSS")


@pytest.mark.parametrize("spelling, hint", [
    ("{}.svs", "; give slide ids without the file extension, as wsitools names the slides"),
    ("{}", "; slide ids are case-sensitive"),
    ("other_{}", ""),
])
def test_labels_that_name_no_store_say_how_ids_and_stores_differ(cohort, capsys, spelling, hint):
    root, bags = cohort
    labels = root / "ids.csv"
    ids = [spelling.format(b.slide_id.upper() if hint.endswith("sensitive") else b.slide_id) for b in bags]
    labels.write_text("slide_id,label\n" + "".join(f"{i},{b.label}\n" for i, b in zip(ids, bags)))
    rc, err = run(train_argv(root, labels), capsys)
    line = one_line(rc, err, f"no labelled slide has a usable feature store in {root / 'features'}: none of the 12 "
                    f"slide ids of the labels table (e.g. {ids[0]!r}) names one of its 12 stores (e.g. "
                    f"'{bags[0].slide_id}.h5')")
    assert line.endswith(f"'{bags[0].slide_id}.h5')" + hint)


def test_a_folder_of_only_unusable_stores_names_the_first_problem(cohort, capsys):
    root, bags = cohort
    for b in bags:
        b.path.write_bytes(b"not h5")
    rc, err = run(train_argv(root, root / "labels.csv"), capsys)
    one_line(rc, err, "all 12 labelled slides with a store were skipped (first: feature store "
             f"{bags[0].path} cannot be read: ")


def test_an_accented_slide_id_names_the_id_wsitools_gives_it(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label\nBiopsie Müller 3,neg\n")
    with pytest.raises(DataError, match=r"line 2: unsafe slide id 'Biopsie Müller 3'.*\(wsitools names a slide "
                       r"file so called 'Biopsie_Muller_3'\)$"):
        read_labels(path)
    path.write_text("slide_id,label\n../up,neg\n")  # a path is not a file name: no suggestion
    with pytest.raises(DataError, match=r"line 2: unsafe slide id '../up'.*without '..'$"):
        read_labels(path)


@pytest.mark.parametrize("dtype", [">f4", ">f2", "<f8"])
def test_stores_of_another_byte_order_or_width_read_the_same_values(tmp_path, dtype):
    from wsitools.feature_store import read_features, row_layout

    feats = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:  # as another tool writes it: no attributes, contiguous
        f.create_dataset("features", data=feats.astype(dtype))
    expected = torch.from_numpy(feats.astype(dtype).astype(np.float32))
    assert torch.equal(read_features(path), expected)
    rows = np.array([31, 2, 17])
    assert torch.equal(read_features(path, rows, layout=row_layout(path)), expected[np.sort(rows)])


def test_a_big_endian_store_trains_and_predicts_like_the_native_one(cohort, capsys):
    root, bags = cohort
    rc, err = run(train_argv(root, root / "labels.csv", "native"), capsys)
    assert rc == 0, err
    with h5py.File(bags[0].path, "r") as f:
        feats, coords, attrs = f["features"][:], f["coords"][:], dict(f.attrs)
    bags[0].path.unlink()
    with h5py.File(bags[0].path, "w") as f:
        f.create_dataset("features", data=feats.astype(">f4"))
        f.create_dataset("coords", data=coords)
        f.attrs.update(attrs)
    rc, err = run(train_argv(root, root / "labels.csv", "swapped"), capsys)
    assert rc == 0, err
    assert (root / "swapped" / "predictions.csv").read_text() == (root / "native" / "predictions.csv").read_text()


def test_too_few_patients_for_the_folds_speaks_of_strata_not_classes():
    from wsitools.labels import SURVIVAL_STRATA
    from wsitools.mil.folds import patient_kfold

    patients = [f"p{i}" for i in range(6)]
    with pytest.raises(DataError) as err:
        patient_kfold(np.array([1, 1, 1, 0, 0, 0]), patients, n_folds=5, classes=SURVIVAL_STRATA)
    assert str(err.value) == ("5-fold cross-validation needs at least 5 patients with an event; "
                              "stratum 'event': 3 patients; use 3 folds (--folds 3)")
    # censored patients are dealt as far as they go: 1 of them, or 3 at 5 folds, is no reason to refuse
    for events, censored, k in ((44, 1, 5), (42, 3, 5), (10, 1, 2)):
        labels = np.array([1] * events + [0] * censored)
        folds = patient_kfold(labels, [f"p{i}" for i in range(len(labels))], n_folds=k, classes=SURVIVAL_STRATA)
        tests = np.concatenate([f.test for f in folds])
        assert sorted(tests.tolist()) == list(range(len(labels)))  # every patient in one test fold
        assert all(labels[f.test].sum() >= events // k for f in folds)  # events spread evenly
        assert all(labels[f.val].sum() >= 1 for f in folds)
    with pytest.raises(DataError) as err:
        patient_kfold(np.zeros(4, np.int64), patients[:4], n_folds=5, classes=("all",))
    assert str(err.value) == ("5-fold cross-validation needs at least 5 labelled patients, but there are 4; "
                              "use 4 folds (--folds 4)")
    with pytest.raises(DataError, match=r"^2-fold cross-validation of 3, 3 patients per class leaves a fold's training "
                                        r"part without two patients of one class .*; use 3 folds \(--folds 3\)$"):
        patient_kfold(np.array([1, 1, 1, 0, 0, 0]), patients, n_folds=2)
    with pytest.raises(DataError, match="needs at least 5 patients per class; class 'pos': 3 patients"):
        patient_kfold(np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0]), [f"p{i}" for i in range(10)], n_folds=5,
                      classes=("neg", "pos"))
    # called from Python (TrainConfig(folds=...)) or the command line alike: both names of the setting
    with pytest.raises(DataError, match=r"^folds \(--folds\) must be at least 2, got 1$"):
        patient_kfold(np.array([1, 1, 1, 0, 0, 0]), patients, n_folds=1)


def test_a_heatmap_whose_patch_store_is_gone_is_drawn_without_its_montage(synthetic_svs, tmp_path, capsys, caplog):
    from wsitools.attention import write_attention
    from wsitools.slide import open_slide

    with open_slide(synthetic_svs) as slide:
        width, height = slide.dimensions
    tile = 256
    xs, ys = np.meshgrid(np.arange(0, width - tile + 1, tile), np.arange(0, height - tile + 1, tile))
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    attention = np.linspace(1, 2, len(coords))
    att = tmp_path / "attention" / "synth_svs.h5"
    write_attention(att, slide_id="synth_svs", attention=attention / attention.sum(), coords=coords,
                    classes=["neg", "pos"], probs=np.array([0.3, 0.7]), feature_path=tmp_path / "synth_svs.h5",
                    provenance={"slide_path": str(synthetic_svs), "store_path": str(tmp_path / "deleted.zarr"),
                                "tile_size_level0": float(tile)}, meta={"head": "abmil"})
    rc, err = run(["heatmap", "--attention", att, "--out", tmp_path / "h", "--mpp", "8", "--quiet"], capsys)
    assert rc == 0, err
    assert (tmp_path / "h" / "synth_svs.heatmap.png").stat().st_size > 0
    assert (tmp_path / "h" / "synth_svs.attention.geojson").stat().st_size > 0
    assert not (tmp_path / "h" / "synth_svs.top_tiles.png").exists()
    assert f"no patch store ({tmp_path / 'deleted.zarr'})" in caplog.text and "no montage" in caplog.text


def test_a_missing_value_marker_is_not_a_class(cohort, capsys):
    root, bags = cohort
    labels = root / "with_na.csv"
    rows = [f"{b.slide_id},{b.label}" for b in bags]
    rows[2] = f"{bags[2].slide_id},#N/A"  # a spreadsheet's empty lookup
    labels.write_text("slide_id,label\n" + "\n".join(rows) + "\n")
    rc, err = run(train_argv(root, labels, task=False), capsys)
    one_line(rc, err, f"labels table {labels}: label '#N/A' (slide {bags[2].slide_id}) looks like a missing value")
    assert not (root / "heads").exists()


def test_plus_and_minus_are_two_classes_without_a_task_file(cohort, capsys):
    """Receptor status as a pathologist's sheet writes it."""
    root, bags = cohort
    status = {"neg": "-", "pos": "+"}
    rows = [f"{b.slide_id},{status[b.label]}" for b in bags]
    labels = root / "status.csv"
    labels.write_text("slide_id,label\n" + "\n".join(rows) + "\n")
    rc, err = run(train_argv(root, labels, task=False), capsys)
    assert rc == 0, err
    header, *lines = (root / "heads" / "predictions.csv").read_text().splitlines()
    assert header.endswith(",prob_+,prob_-")
    written = {line.split(",")[0]: line.split(",")[2] for line in lines}
    assert written == {b.slide_id: status[b.label] for b in bags}


def test_a_column_of_numbers_is_not_read_as_classes(cohort, capsys):
    """Without a task file the labels are the classes: a column of numbers would make one class
    per slide (and a message listing them all); it is refused in one line naming the column."""
    root, bags = cohort
    labels = root / "numbers.csv"
    labels.write_text("slide_id,label\n" + "".join(f"{b.slide_id},{b.label}\n" for b in bags)
                      + "".join(f"x{i},{i * 0.37:.2f}\n" for i in range(30)))
    rc, err = run(train_argv(root, labels, task=False), capsys)
    one_line(rc, err, f"wsitools train: error: labels table {labels}, column 'label': 32 different labels in 42 "
             "labelled rows (30 of them in one row only) are too many to be the classes of a classification (a "
             "column of numbers?); for a numeric target give a task file of type regression (or survival, with "
             "time and event columns)")
    assert not (root / "heads").exists()


def test_many_classes_pass_when_they_are_classes():
    """More than 20 classes, each on several slides; at most 1000 of them."""
    from wsitools.labels import classes_from_labels

    labelled = [(f"s{i}", f"c{i % 25:02d}") for i in range(50)] + [("t", "c00")]
    assert classes_from_labels(labelled, where="x") == tuple(f"c{i:02d}" for i in range(25))
    with pytest.raises(DataError, match=r"^x, column 'label': 1001 different labels in 2002 labelled rows \(0 of"):
        classes_from_labels([(f"s{i}", f"c{i % 1001}") for i in range(2002)], where="x", column="label")


def test_class_listings_in_messages_are_capped(cohort):
    """A task of many classes: each message lists ten and counts the others, so it stays short."""
    from wsitools.labels import check_labels_are_classes, check_task_labels
    from wsitools.mil.data import build_cohort
    from wsitools.samples import Sample

    classes = [f"c{i:02d}" for i in range(30)]
    with pytest.raises(DataError) as caught:
        check_labels_are_classes([(f"s{i}", f"u{i:02d}") for i in range(15)], classes, what="labels", task="t.yaml")
    assert str(caught.value) == (
        "labels that are not classes of t.yaml (c00, c01, c02, c03, c04, c05, c06, c07, c08, c09 and 20 more): "
        + "; ".join(f"'u{i:02d}' (slides s{i})" for i in range(10))
        + "; and 5 more labels; fix the labels or add the classes to the task file")
    root, bags = cohort
    rows = read_labels(root / "labels.csv")
    with pytest.raises(DataError) as caught:
        build_cohort(rows, root / "features", ["neg", "pos", *classes])
    assert str(caught.value) == (
        "task classes without a usable labelled slide: "
        + ", ".join(f"'c{i:02d}' (no labelled slide)" for i in range(10))
        + " and 20 more; label slides of them, remove them from the task, or pass --allow-empty-classes")
    samples = [Sample(slide_id=b.slide_id, path="/x.svs", patient_id=b.patient_id, mpp=None,
                      fields={"label": b.label}) for b in bags]
    with pytest.raises(DataError) as caught:
        check_task_labels(samples, task="t", label_column="label", classes=["neg", "pos", *classes],
                          folds={"abmil": 2}, sheet="samples.tsv", task_file="t.yaml")
    assert str(caught.value).startswith(
        "config: tasks: t: classes " + ", ".join(f"'c{i:02d}'" for i in range(10)) + " and 20 more of t.yaml have "
        "no labelled slide in column 'label' of samples.tsv; ")


@pytest.mark.parametrize("marker", ["<NA>", "#NA", "-nan", "#N/A N/A", ".", "?", "NULL"])
def test_pandas_and_sas_missing_values_are_still_not_classes(cohort, capsys, marker):
    root, bags = cohort
    rows = [f"{b.slide_id},{b.label}" for b in bags]
    rows[3] = f"{bags[3].slide_id},{marker}"
    labels = root / "marked.csv"
    labels.write_text("slide_id,label\n" + "\n".join(rows) + "\n")
    rc, err = run(train_argv(root, labels, task=False), capsys)
    one_line(rc, err, f"label {marker!r} (slide {bags[3].slide_id}) looks like a missing value, which would make "
             "it a class; leave its row out for a slide without a label, or list the classes in a task file")
    assert not (root / "heads").exists()


# --- the labels table's own splits ---------------------------------------------------------------------


def _three_class_table(root: Path, bags, column: str, parts: list) -> Path:
    """The cohort with its first two slides relabelled 'rare' (a third class of the task), and a
    ``split`` or ``fold`` column holding ``parts``."""
    task = {**TASK, "classes": {**TASK["classes"], "rare": "a third texture"}}
    (root / "task.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    labels = root / f"{column}.csv"
    labels.write_text(f"slide_id,label,patient_id,{column}\n" + "".join(
        f"{b.slide_id},{'rare' if i < 2 else b.label},{b.patient_id},{part}\n" for i, (b, part) in
        enumerate(zip(bags, parts))))
    return labels


def test_a_split_column_that_leaves_a_class_without_training_slides_is_refused(cohort, capsys, caplog):
    root, bags = cohort
    rest = [b.label for b in bags[2:]]
    parts = ["test", "test"] + [("train", "train", "val", "test")[rest[:i].count(label) % 4]
                                for i, label in enumerate(rest)]
    labels = _three_class_table(root, bags, "split", parts)
    rc, err = run(train_argv(root, labels), capsys)
    one_line(rc, err, f"labels table {labels}: the split column leaves a fold without training slides of a class: "
             "class 'rare' in fold 0 (0 in val, 2 in test); the head would be tested with a class it never learnt: "
             "put slides of every class into the training part of every fold, or pass --allow-empty-classes")
    assert not (root / "heads").exists()
    rc, err = run(train_argv(root, labels) + ["--allow-empty-classes"], capsys)
    assert rc == 0, err
    assert "the split column leaves a fold without training slides of a class (trained without it" in caplog.text
    assert json.loads((root / "heads" / "metrics.json").read_text())["pooled"]["support"]["rare"] == 2


def test_a_fold_column_with_a_class_in_one_fold_only_is_refused(cohort, capsys):
    root, bags = cohort
    labels = _three_class_table(root, bags, "fold", [7, 7] + [(1, 2, 7)[i % 3] for i in range(len(bags) - 2)])
    rc, err = run(train_argv(root, labels), capsys)
    one_line(rc, err, f"labels table {labels}: the fold column leaves a fold without training slides of a class: "
             "class 'rare' in fold 2 (test fold 7) (0 in val, 2 in test); the head would be tested with a class")


def test_labels_that_are_no_class_of_the_task_file_name_both_files_and_a_spelling(cohort, capsys):
    root, bags = cohort
    labels = root / "spelled.csv"
    rows = [f"{b.slide_id},{b.label}" for b in bags]
    rows[0] = f"{bags[0].slide_id},Pos"
    rows[1] = f"{bags[1].slide_id},C"
    labels.write_text("slide_id,label\n" + "\n".join(rows) + "\n")
    rc, err = run(train_argv(root, labels), capsys)
    one_line(rc, err, f"labels in labels table {labels} that are not classes of task file {root / 'task.yaml'} "
             f"(neg, pos): 'Pos' (slides {bags[0].slide_id}); 'C' (slides {bags[1].slide_id}) ('Pos' is class 'pos' "
             "in another case or spacing: labels must be written as the classes are); fix the labels or add the "
             "classes to the task file")
    rows[0] = f"{bags[0].slide_id},C"
    labels.write_text("slide_id,label\n" + "\n".join(rows) + "\n")
    line = one_line(*run(train_argv(root, labels), capsys), f"(neg, pos): 'C' (slides {bags[0].slide_id}, "
                    f"{bags[1].slide_id}); fix the labels")
    assert "another case" not in line


def test_the_workflow_check_hints_at_a_class_in_another_case_or_spacing():
    from wsitools.labels import check_task_labels
    from wsitools.samples import Sample

    samples = [Sample(slide_id=f"s{i}", path="x", patient_id=f"p{i}", fields={"label": label})
               for i, label in enumerate(["high grade"] * 3 + ["low grade"] * 3 + ["High  Grade"])]
    with pytest.raises(DataError) as error:
        check_task_labels(samples, task="t", label_column="label", classes=["high grade", "low grade"],
                          folds={"h": 2}, sheet="s.tsv", task_file="t.yaml")
    assert str(error.value) == (
        "config: tasks: t: labels in column 'label' of s.tsv that are not classes of t.yaml (high grade, low grade): "
        "'High  Grade' (slides s6) ('High  Grade' is class 'high grade' in another case or spacing: labels must be "
        "written as the classes are); fix the labels or add the classes to the task file")
