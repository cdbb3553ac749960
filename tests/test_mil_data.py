"""Labels tables, cohort checks (bad inputs named) and patient-level folds."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from wsitools.errors import DataError
from wsitools.feature_store import read_features, row_layout
from wsitools.labels import read_labels
from wsitools.mil.data import build_cohort, class_weights, sample_index
from wsitools.mil.folds import patient_kfold, user_folds
from wsitools.mil.synthetic import make_bag_cohort, write_synthetic_store

CLASSES = ("neg", "pos")


def _labels(path, rows, header=("slide_id", "label", "patient_id")):
    path.write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")
    return path


@pytest.fixture()
def cohort_dir(tmp_path):
    bags = make_bag_cohort(tmp_path / "feats", n_slides=8, n_tiles=(5, 9), dim=6, seed=3)
    return tmp_path, bags


def test_read_labels_csv_tsv_and_defaults(tmp_path):
    rows = read_labels(_labels(tmp_path / "l.csv", [("a", "neg", "p1"), ("b", "pos", "")]))
    assert [(r.slide_id, r.label, r.patient_id) for r in rows] == [("a", "neg", "p1"), ("b", "pos", "b")]
    tsv = tmp_path / "l.tsv"
    tsv.write_text("slide_id\tlabel\tsplit\na\tneg\ttrain\nb\tpos\ttest\n")
    assert [r.split for r in read_labels(tsv)] == ["train", "test"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("slide\tlabel\na\tneg\n", "no 'slide_id' column"),
        ("slide_id,label\na,neg\na,pos\n", "line 3: slide a appears twice"),
        ("slide_id,label\n../x,neg\n", "line 2: unsafe slide id"),
        ("slide_id,label\na,\n", "slide a has an empty label"),
        ("slide_id,label,split\na,neg,training\n", "split 'training'"),
        ("slide_id,label,fold\na,neg,one\n", "fold 'one', not an integer"),
        ("slide_id,label,split,fold\na,neg,train,1\n", "either a 'split' or a 'fold'"),
        ("slide_id,label,split\na,neg,train\nb,pos,\n", "split is empty for slides b"),
        # a cut slide id would drop its row unseen
        ("slide_id,label,patient_id\na,neg,p1\n,pos,p2\n",
         "line 3: no slide_id, but label 'pos', patient_id 'p2'; fill in the slide id or remove the row"),
        # only the last 'label' would be read
        ("slide_id,label,patient_id,label\na,neg,p1,pos\n", ": the header names column 'label' twice"),
        # two patients to the folds, one in truth: leakage between training and test
        ("slide_id,label,patient_id\na,neg,P001\nb,neg,p002\nc,pos,p001\n",
         "patient ids 'P001' and 'p001' differ only in case \\(slides a and c\\), which would make them two patients"),
    ],
)
def test_bad_labels_tables_are_named(tmp_path, content, message):
    path = tmp_path / "labels.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        read_labels(path)
    assert str(path) in str(err.value)


def test_empty_rows_and_slides_without_a_patient_id_still_read(tmp_path):
    """A row with no cell filled is skipped; slides without a patient id are their own patients,
    whatever the case of their ids; columns a header leaves unnamed are not a repeated name."""
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label,patient_id,,\na,neg,,,\n,,,,\nA,pos,,,\nb,neg,P1,,\nc,pos,P1,,\n")
    rows = read_labels(path)
    assert [(r.slide_id, r.label, r.patient_id) for r in rows] == [
        ("a", "neg", "a"), ("A", "pos", "A"), ("b", "neg", "P1"), ("c", "pos", "P1")]


def test_missing_feature_store_is_skipped_with_warning_or_strict_error(cohort_dir, caplog):
    root, bags = cohort_dir
    rows = [(b.slide_id, b.label, b.patient_id) for b in bags] + [("failed_qc_slide", "pos", "p9")]
    labels = read_labels(_labels(root / "l.csv", rows))
    with caplog.at_level(logging.WARNING):
        cohort = build_cohort(labels, root / "feats", CLASSES)
    assert "failed_qc_slide" not in cohort.slide_ids and len(cohort) == 8
    assert "failed_qc_slide" in cohort.skipped and "no feature store" in cohort.skipped["failed_qc_slide"]
    assert "failed_qc_slide" in caplog.text
    with pytest.raises(DataError, match="failed_qc_slide: no feature store"):
        build_cohort(labels, root / "feats", CLASSES, strict=True)


def test_feature_store_without_label_is_warned_and_ignored(cohort_dir, caplog):
    root, bags = cohort_dir
    labels = read_labels(_labels(root / "l.csv", [(b.slide_id, b.label, b.patient_id) for b in bags[:-1]]))
    with caplog.at_level(logging.WARNING):
        cohort = build_cohort(labels, root / "feats", CLASSES)
    assert bags[-1].slide_id not in cohort.slide_ids
    assert f"have no label and are ignored: {bags[-1].slide_id}" in caplog.text


def test_nan_feature_is_named(cohort_dir, caplog):
    root, bags = cohort_dir
    feats = read_features(bags[2].path).numpy()
    feats[3, 1] = np.nan
    write_synthetic_store(bags[2].path, feats)
    labels = read_labels(_labels(root / "l.csv", [(b.slide_id, b.label, b.patient_id) for b in bags]))
    with caplog.at_level(logging.WARNING):
        cohort = build_cohort(labels, root / "feats", CLASSES)
    assert bags[2].slide_id not in cohort.slide_ids
    assert "non-finite" in cohort.skipped[bags[2].slide_id] and "first row 3" in cohort.skipped[bags[2].slide_id]
    with pytest.raises(DataError, match=f"{bags[2].slide_id}: .*non-finite"):
        build_cohort(labels, root / "feats", CLASSES, strict=True)


def test_mismatched_feature_dims_name_the_odd_slide(cohort_dir):
    root, bags = cohort_dir
    write_synthetic_store(bags[5].path, np.zeros((4, 7), np.float32))
    labels = read_labels(_labels(root / "l.csv", [(b.slide_id, b.label, b.patient_id) for b in bags]))
    with pytest.raises(DataError, match=f"most slides have D=6, but D=7: {bags[5].slide_id}"):
        build_cohort(labels, root / "feats", CLASSES)
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert "`train` stops instead, naming the odd slides and the feature widths" in readme  # not skipped


def test_one_class_only_and_unknown_label(cohort_dir):
    root, bags = cohort_dir
    only_neg = [(b.slide_id, "neg", b.patient_id) for b in bags]
    with pytest.raises(DataError, match="only one class \\('neg'\\)"):
        build_cohort(read_labels(_labels(root / "a.csv", only_neg)), root / "feats", CLASSES)
    odd = [(b.slide_id, b.label, b.patient_id) for b in bags[1:]] + [(bags[0].slide_id, "tumour", "p")]
    with pytest.raises(DataError, match=f"^labels that are not classes of the task \\(neg, pos\\): 'tumour' "
                                        f"\\(slides {bags[0].slide_id}\\); fix the labels"):
        build_cohort(read_labels(_labels(root / "b.csv", odd)), root / "feats", CLASSES)


def test_patient_kfold_keeps_patients_together_and_stratifies():
    rng = np.random.default_rng(0)
    patients = [f"p{i // 3}" for i in range(90)]  # 30 patients, 3 slides each
    plabel = rng.integers(0, 2, 30)
    labels = np.array([plabel[i // 3] for i in range(90)])
    folds = patient_kfold(labels, patients, n_folds=5, val_fraction=0.25, seed=1)
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested.tolist()) == list(range(90))  # every slide tested exactly once
    for f in folds:
        parts = [set(np.array(patients)[idx]) for idx in (f.train, f.val, f.test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert len(f.train) + len(f.val) + len(f.test) == 90
        assert set(labels[f.val]) == {0, 1}
        # stratified: each test fold's positive share is close to the cohort's
        assert abs(labels[f.test].mean() - labels.mean()) < 0.2
    again = patient_kfold(labels, patients, n_folds=5, val_fraction=0.25, seed=1)
    assert all(np.array_equal(a.test, b.test) and np.array_equal(a.val, b.val) for a, b in zip(folds, again))
    with pytest.raises(DataError, match="at least 5 patients per class"):
        patient_kfold(np.array([0, 0, 0, 0, 0, 1, 1, 1]), [str(i) for i in range(8)], n_folds=5)


@pytest.mark.parametrize("labels, n_folds, fits", [
    ([0, 0, 1, 1], 2, False),  # each training part: one patient a class, none to hold out
    ([0, 0, 0, 1, 1], 2, False),
    ([0, 0, 0, 0, 1, 1], 2, True),
    ([0, 0, 0, 1, 1, 1], 3, True),
    ([0, 0, 0, 0, 1, 1, 1, 1], 5, False),
])
def test_folds_are_refused_exactly_when_a_fold_could_not_hold_out_validation(labels, n_folds, fits):
    from wsitools.labels import folds_fit

    labels = np.array(labels)
    assert folds_fit(np.bincount(labels).tolist(), n_folds) == fits
    for seed in range(20):  # every deal of the patients into folds
        if fits:
            folds = patient_kfold(labels, [str(i) for i in range(len(labels))], n_folds=n_folds, seed=seed)
            assert all(len(f.val) and len(np.unique(labels[f.train])) == 2 for f in folds)
        else:
            with pytest.raises(DataError, match=r"(training part without two patients|at least \d patients)"):
                patient_kfold(labels, [str(i) for i in range(len(labels))], n_folds=n_folds, seed=seed)


def test_user_split_and_fold_columns(cohort_dir):
    root, bags = cohort_dir
    parts = ["train", "train", "train", "train", "val", "val", "test", "test"]
    rows = [(b.slide_id, b.label, b.patient_id, s) for b, s in zip(bags, parts)]
    cohort = build_cohort(read_labels(_labels(root / "s.csv", rows, ("slide_id", "label", "patient_id", "split"))),
                          root / "feats", CLASSES)
    (fold,) = user_folds(cohort)
    assert fold.train.tolist() == [0, 1, 2, 3] and fold.val.tolist() == [4, 5] and fold.test.tolist() == [6, 7]
    leaky = [(b.slide_id, b.label, "same_patient" if i in (0, 7) else b.patient_id, s)
             for i, (b, s) in enumerate(zip(bags, parts))]
    cohort = build_cohort(read_labels(_labels(root / "t.csv", leaky, ("slide_id", "label", "patient_id", "split"))),
                          root / "feats", CLASSES)
    with pytest.raises(DataError, match="same_patient in \\['test', 'train'\\]"):
        user_folds(cohort)
    fold_rows = [(b.slide_id, b.label, b.patient_id, i % 2) for i, b in enumerate(bags)]
    cohort = build_cohort(read_labels(_labels(root / "f.csv", fold_rows, ("slide_id", "label", "patient_id", "fold"))),
                          root / "feats", CLASSES)
    folds = user_folds(cohort)
    assert [f.test.tolist() for f in folds] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    numbered = [(b.slide_id, b.label, b.patient_id, (10, 2)[i % 2]) for i, b in enumerate(bags)]
    cohort = build_cohort(read_labels(_labels(root / "n.csv", numbered, ("slide_id", "label", "patient_id", "fold"))),
                          root / "feats", CLASSES)
    assert [f.test.tolist() for f in user_folds(cohort)] == [[1, 3, 5, 7], [0, 2, 4, 6]]  # fold 2, then fold 10


def test_class_weights_and_bag_sampling():
    np.testing.assert_allclose(class_weights(np.array([0, 0, 0, 1]), 2), [4 / 6, 4 / 2])
    rng = np.random.default_rng(0)
    assert sample_index(100, 512, rng) is None and sample_index(100, None, rng) is None
    idx = sample_index(1000, 64, rng)
    assert len(idx) == 64 and len(set(idx.tolist())) == 64 and np.all(np.diff(idx) > 0)
    # Instance dropout keeps round((1 - p) n) rows (at least one), then at most bag_size.
    idx = sample_index(100, 512, rng, instance_dropout=0.7)
    assert len(idx) == 30 and len(set(idx.tolist())) == 30 and np.all(np.diff(idx) > 0) and idx.max() < 100
    assert len(sample_index(1000, 64, rng, instance_dropout=0.7)) == 64
    assert len(sample_index(2, None, rng, instance_dropout=0.9)) == 1
    assert sample_index(100, None, rng, instance_dropout=0.0) is None
    a, b = (sample_index(100, None, np.random.default_rng(7), instance_dropout=0.5) for _ in range(2))
    np.testing.assert_array_equal(a, b)  # the step's seed fixes the subset


def test_read_features_rows_from_contiguous_and_chunked(tmp_path):
    x = np.arange(200 * 4, dtype=np.float32).reshape(200, 4)
    idx = np.array([150, 3, 77])
    for chunks in (None, (16, 4)):
        path = write_synthetic_store(tmp_path / f"s{chunks is None}.h5", x.astype(np.float16), chunks=chunks)
        layout = row_layout(path)
        assert (layout is None) == (chunks is not None)
        for given in (None, layout):
            got = read_features(path, idx, layout=given)
            assert got.dtype == torch.float32 and got.shape == (3, 4)
            np.testing.assert_array_equal(got.numpy(), x[np.sort(idx)])  # small integers are exact in float16
        np.testing.assert_array_equal(read_features(path).numpy(), x)
    layout = row_layout(tmp_path / "sTrue.h5")
    assert layout.dtype == "<f2" and layout.shape == (200, 4) and layout.offset > 0


def test_a_synthetic_bag_is_a_feature_store_read_the_same_by_every_reader(tmp_path):
    import h5py

    from wsitools.feature_store import FeatureStore, read_coords

    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    path = write_synthetic_store(tmp_path / "s1.h5", x)
    store = FeatureStore.open(path)  # the strict opener of extraction and export accepts it
    assert (store.slide_id, store.encoder, store.n, store.dim, store.dtype) == ("s1", "synthetic", 6, 2, "float32")
    bag = FeatureStore.open_bag(path)  # the lenient bag opener of MIL training and prediction: the same store
    assert bag == store
    np.testing.assert_array_equal(read_features(path).numpy(), x)
    np.testing.assert_array_equal(read_features(path, np.array([4, 1]), layout=row_layout(path)).numpy(), x[[1, 4]])
    np.testing.assert_array_equal(read_coords(path), store.coords())
    assert read_coords(path)[:4].tolist() == [[0, 0], [448, 0], [896, 0], [0, 448]]
    with h5py.File(path) as f:  # the CLAM/TRIDENT attributes, as on an extracted store
        assert (f["coords"].attrs["patch_size"], f["coords"].attrs["patch_size_level0"]) == (224, 448)
        assert f["coords"].attrs["custom_downsample"] == 2.0


def _record_fingerprint(path, fingerprint: str, slide_path: str) -> None:
    """Give a bag the slide provenance extraction copies from its patch store."""
    import h5py

    with h5py.File(path, "r+") as f:
        f.attrs.update({"slide_fingerprint": fingerprint, "slide_path": slide_path})


def test_two_slide_ids_of_one_scan_are_refused_naming_both(cohort_dir, capsys):
    """Two byte-copies of one slide file tiled and extracted under two ids record one slide
    fingerprint: their tissue would be trained on and tested on in one fold."""
    from cli_calls import one_line, run

    root, bags = cohort_dir
    for i, bag in enumerate(bags):
        _record_fingerprint(bag.path, f"fp{i}", f"/slides/{bag.slide_id}.svs")
    _record_fingerprint(bags[5].path, "fp2", "/slides/copy.svs")  # bags[2]'s scan under another id
    labels_path = _labels(root / "l.csv", [(b.slide_id, b.label, b.patient_id) for b in bags])
    expected = (f"slides '{bags[2].slide_id}' ({bags[2].path}) and '{bags[5].slide_id}' ({bags[5].path}) have "
                "features of one slide file (their stores record the same slide fingerprint: the same size and the "
                f"same first and last MiB, as in /slides/{bags[2].slide_id}.svs and /slides/copy.svs); list each "
                "slide once in the labels table")
    for strict in (False, True):
        with pytest.raises(DataError) as err:
            build_cohort(read_labels(labels_path), root / "feats", CLASSES, strict=strict)
        assert str(err.value) == expected
    rc, err = run(["train", "--features", root / "feats", "--labels", labels_path, "--head", "meanpool",
                   "--folds", "2", "--epochs", "1", "--device", "cpu", "--quiet", "--out", root / "run"], capsys)
    assert one_line(rc, err, expected) == f"wsitools train: error: {expected}"
    assert not (root / "run").exists()
    # left out of the labels table, the copy no longer meets its original
    kept = read_labels(_labels(root / "k.csv", [(b.slide_id, b.label, b.patient_id) for b in bags if b is not bags[5]]))
    assert len(build_cohort(kept, root / "feats", CLASSES)) == 7


def test_slides_of_distinct_scans_are_never_refused_however_alike_their_features(cohort_dir):
    """The identity compared is the source file's: equal bags of two scans, several slides of one
    patient, and stores that record no fingerprint (other writers, older extractions) all train."""
    root, bags = cohort_dir
    twin = write_synthetic_store(root / "feats" / "twin.h5", read_features(bags[0].path).numpy())
    _record_fingerprint(bags[0].path, "fp-a", "/slides/a.svs")
    _record_fingerprint(twin, "fp-b", "/slides/b.svs")  # the same features, another scan
    rows = [(b.slide_id, b.label, b.patient_id) for b in bags] + [("twin", bags[0].label, bags[0].patient_id)]
    cohort = build_cohort(read_labels(_labels(root / "l.csv", rows)), root / "feats", CLASSES)
    assert len(cohort) == 9 and cohort.patients.count(bags[0].patient_id) == 2
    # two stores that record no fingerprint, with equal features too, are not compared
    write_synthetic_store(twin, read_features(bags[1].path).numpy())
    assert len(build_cohort(read_labels(_labels(root / "l.csv", rows)), root / "feats", CLASSES)) == 9
