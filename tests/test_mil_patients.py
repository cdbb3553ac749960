"""Patient-level bags (--bag patient): a patient's slides pooled into one bag, for every task
type and head; attention mapped back to each slide; label agreement; prediction per patient."""

from __future__ import annotations

import csv
import json
import os

import h5py
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from wsitools.attention import read_attention  # noqa: E402
from wsitools.cli import main  # noqa: E402
from wsitools.heatmap import _title  # noqa: E402
from wsitools.mil.config import TrainConfig  # noqa: E402
from wsitools.feature_store import read_coords, read_features  # noqa: E402
from wsitools.labels import read_patients  # noqa: E402
from wsitools.mil.patients import SlideGroup, split_attention  # noqa: E402
from wsitools.mil.predict import predict  # noqa: E402
from wsitools.mil.synthetic import make_outcome_cohort, write_synthetic_store  # noqa: E402
from wsitools.mil.train import PatientBagDataset, train  # noqa: E402

FAST = TrainConfig(epochs=12, patience=8, min_epochs=0, n_boot=50, folds=3)
DIM = 16


def _key_in_one_slide(root, *, n_patients: int = 24, seed: int = 0) -> dict:
    """Patients of two slides each, labelled by patient; a positive patient's key instances
    (4-8 rows shifted by 6 along one direction) sit in only one of its two slides, so its other
    slide looks exactly like a negative one."""
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(DIM).standard_normal(DIM)
    mu = 6.0 * direction / np.linalg.norm(direction)
    rows, key_slide, planted = [], {}, {}
    for p in range(n_patients):
        patient, positive = f"p{p:02d}", p % 2 == 1
        key = int(rng.integers(2))
        for k in range(2):
            n = int(rng.integers(30, 61))
            feats = rng.standard_normal((n, DIM))
            slide_id = f"{patient}_s{k}"
            if positive and k == key:
                planted[slide_id] = np.sort(rng.choice(n, size=int(rng.integers(4, 9)), replace=False))
                feats[planted[slide_id]] += mu
                key_slide[patient] = slide_id
            write_synthetic_store(root / "features" / f"{slide_id}.h5", feats.astype(np.float32))
            rows.append([slide_id, "pos" if positive else "neg", patient])
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["slide_id", "label", "patient_id"], *rows])
    return {"root": root, "labels": labels, "key_slide": key_slide, "planted": planted,
            "patients": {p: [r[0] for r in rows if r[2] == p] for p in dict.fromkeys(r[2] for r in rows)}}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return _key_in_one_slide(tmp_path_factory.mktemp("patients"))


@pytest.fixture(scope="module")
def runs(cohort):
    """abmil trained once on slide bags and once on patient bags of the same cohort."""
    out = {}
    for bag in ("slide", "patient"):
        out[bag] = cohort["root"] / bag
        out[f"{bag}_summary"] = train(features_dir=cohort["root"] / "features", labels=cohort["labels"],
                                      out_dir=out[bag], bag=bag, config=FAST, progress=False)
    return out


def test_patient_bags_separate_better_when_the_evidence_sits_in_one_slide(runs):
    slide, patient = runs["slide_summary"], runs["patient_summary"]
    assert (slide["bag"], slide["n_slides"], slide["n_patients"]) == ("slide", 48, 24)
    assert (patient["bag"], patient["n_slides"], patient["n_patients"]) == ("patient", 48, 24)
    # Slide bags inherit the patient's label: half the positive slides carry no evidence, so the
    # slide head cannot rank them above negatives (expected AUROC about 0.75); the patient head can.
    assert patient["pooled"]["auroc"] >= 0.95
    assert slide["pooled"]["auroc"] <= 0.85
    assert patient["pooled"]["auroc"] - slide["pooled"]["auroc"] >= 0.1


def test_patient_attention_goes_back_to_each_slide_and_its_tiles(cohort, runs):
    folder = runs["patient"] / "attention"
    assert sorted(p.stem for p in folder.glob("*.h5")) == sorted(s for v in cohort["patients"].values() for s in v)
    hits = []
    for patient, slides in cohort["patients"].items():
        shares = {}
        for slide_id in slides:
            store = cohort["root"] / "features" / f"{slide_id}.h5"
            with h5py.File(folder / f"{slide_id}.h5") as f:
                np.testing.assert_array_equal(f["coords"][()], read_coords(store))
                assert f.attrs["patient_id"] == patient and f.attrs["bag"] == "patient"
                assert json.loads(f.attrs["patient_slides"]) == slides
                attention = f["attention"][()]
                assert attention.sum() == pytest.approx(f.attrs["attention_share"], abs=1e-5)
                shares[slide_id] = float(f.attrs["attention_share"])
                top = int(np.argmax(attention))
            if slide_id in cohort["planted"]:
                hits.append(top in cohort["planted"][slide_id])
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-5)  # one attention over the patient
        if patient in cohort["key_slide"]:
            assert shares[cohort["key_slide"][patient]] > 0.5, (patient, shares)
    assert np.mean(hits) >= 0.9  # the most attended tile of a key slide is a planted one
    amap = read_attention(folder / "p01_s0.h5")  # the heatmap's title gives the slide's share
    share = 100 * float(amap.attrs["attention_share"])
    assert f"p01_s0   patient p01: {share:.0f}% of its attention   neg: " in _title(amap)


def test_patient_run_files_say_how_the_bags_were_made(cohort, runs):
    out = runs["patient"]
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert list(rows[0]) == ["patient_id", "slides", "label", "fold", "pred", "prob_neg", "prob_pos"]
    assert sorted(r["patient_id"] for r in rows) == sorted(cohort["patients"])
    for r in rows:
        assert r["slides"].split(";") == cohort["patients"][r["patient_id"]]
        assert r["label"] == ("pos" if r["patient_id"] in cohort["key_slide"] else "neg")
    splits = list(csv.DictReader(open(out / "splits.csv")))
    test = [r for r in splits if r["part"] == "test"]
    assert sorted(r["slide_id"] for r in test) == sorted(s for v in cohort["patients"].values() for s in v)
    assert {r["fold"] for r in test if r["patient_id"] == "p03"} == {next(x["fold"] for x in rows if x["patient_id"] == "p03")}
    assert json.loads((out / "run.json").read_text())["bag"] == "patient"
    assert json.loads((out / "fold_0" / "config.json").read_text())["bag"] == "patient"


def test_predict_pools_each_patient_as_the_head_was_trained(cohort, runs, tmp_path, capsys):
    fold0 = runs["patient"] / "fold_0"
    held_out = {r["patient_id"]: r for r in csv.DictReader(open(fold0 / "predictions.csv"))}
    features = str(cohort["root"] / "features")
    rc = main(["predict", "--model", str(fold0), "--features", features, "--patients", str(cohort["labels"]),
               "--out", str(tmp_path / "p"), "--quiet"])
    assert rc == 0 and "predicted 24 patients" in capsys.readouterr().out
    rows = {r["patient_id"]: r for r in csv.DictReader(open(tmp_path / "p" / "predictions.csv"))}
    assert len(rows) == 24
    for patient, r in held_out.items():
        assert float(rows[patient]["prob_pos"]) == pytest.approx(float(r["prob_pos"]), abs=2e-6)
        assert rows[patient]["slides"] == r["slides"]
        n = sum(len(read_coords(cohort["root"] / "features" / f"{s}.h5")) for s in cohort["patients"][patient])
        assert int(rows[patient]["n_tiles"]) == n
        for slide_id in cohort["patients"][patient]:
            with h5py.File(runs["patient"] / "attention" / f"{slide_id}.h5") as a, \
                    h5py.File(tmp_path / "p" / "attention" / f"{slide_id}.h5") as b:
                np.testing.assert_allclose(b["attention"][()], a["attention"][()], atol=1e-6)
    info = json.loads((tmp_path / "p" / "predict.json").read_text())
    assert info["bag"] == "patient" and info["patients"]["p05"] == ["p05_s0", "p05_s1"]

    rc = main(["predict", "--model", str(fold0), "--features", features, "--out", str(tmp_path / "q"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "trained with --bag patient" in err and "--patients" in err and len(err.strip().splitlines()) == 1
    rc = main(["predict", "--model", str(runs["slide"]), "--features", features, "--patients", str(cohort["labels"]),
               "--out", str(tmp_path / "r"), "--quiet"])
    assert rc == 2 and "--patients applies to heads trained with --bag patient" in capsys.readouterr().err


def test_predict_skips_a_bad_slide_and_pools_the_rest(cohort, runs, tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    for slide_id in ("p01_s0", "p01_s1", "p02_s0"):
        (features / f"{slide_id}.h5").write_bytes((cohort["root"] / "features" / f"{slide_id}.h5").read_bytes())
    (features / "p02_s1.h5").write_bytes(b"not hdf5")
    (features / "stray.h5").write_bytes((cohort["root"] / "features" / "p00_s0.h5").read_bytes())
    results = predict(runs["patient"], features, tmp_path / "p", patients=cohort["labels"], progress=False)
    assert [(r.patient_id, r.slide_ids) for r in results] == [("p01", ("p01_s0", "p01_s1")), ("p02", ("p02_s0",))]
    assert read_attention(tmp_path / "p" / "attention" / "p02_s0.h5").attention.sum() == pytest.approx(1.0, abs=1e-5)
    skipped = json.loads((tmp_path / "p" / "predict.json").read_text())["skipped"]
    assert sorted(skipped) == ["p02_s1", "stray"] and "not in the patients table" in skipped["stray"]
    # a slide named twice is pooled once
    twice = predict(runs["patient"], cohort["root"] / "features", tmp_path / "twice", patients=cohort["labels"],
                    slides=["p01_s0", "p01_s0", "p01_s1"], progress=False)
    predict(runs["patient"], cohort["root"] / "features", tmp_path / "once", patients=cohort["labels"],
            slides=["p01_s0", "p01_s1"], progress=False)
    assert [r.slide_ids for r in twice] == [("p01_s0", "p01_s1")]
    for slide_id in ("p01_s0", "p01_s1"):
        np.testing.assert_array_equal(read_attention(tmp_path / "twice" / "attention" / f"{slide_id}.h5").attention,
                                      read_attention(tmp_path / "once" / "attention" / f"{slide_id}.h5").attention)


@pytest.mark.parametrize(
    "task_type, table, message",
    [
        ("classification", "slide_id,label,patient_id\na,x,P1\nb,y,P1\n",
         "patient P1: slides a (x) and b (y) disagree on the label"),
        ("regression", "slide_id,label,patient_id\na,1.5,P1\nb,1.5,P2\nc,2,P2\n",
         "patient P2: slides b (1.5) and c (2) disagree on the label"),
        ("survival", "slide_id,time,event,patient_id\na,10,1,P1\nb,10,0,P1\n",
         "patient P1: slides a (10/1) and b (10/0) disagree on the time and event"),
    ],
)
def test_slides_of_a_patient_must_agree_on_the_label(cohort, tmp_path, capsys, task_type, table, message):
    labels = tmp_path / "labels.csv"
    labels.write_text(table)
    args = ["train", "--features", str(cohort["root"] / "features"), "--labels", str(labels), "--bag", "patient",
            "--out", str(tmp_path / "out"), "--quiet"]
    if task_type != "classification":
        (tmp_path / "task.yaml").write_text(f"name: t\ntype: {task_type}\ndescription: d\n")
        args += ["--task", str(tmp_path / "task.yaml")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(labels) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_patient_bag_dataset_samples_over_the_whole_patient(tmp_path):
    rng = np.random.default_rng(1)
    paths, ivp = [], []
    for k, n in enumerate((30, 45)):
        paths.append(write_synthetic_store(tmp_path / f"s{k}.h5", rng.standard_normal((n, 4)).astype(np.float32)))
        ivp.append(write_synthetic_store(tmp_path / "ivp" / f"s{k}.h5", rng.standard_normal((n // 3, 3)).astype(np.float32)))
    group = SlideGroup(slide_ids=("s0", "s1"), paths=tuple(paths), sizes=(30, 45), ivp_paths=tuple(ivp))
    whole = torch.cat([read_features(p) for p in paths])
    data = PatientBagDataset([group], np.array([0]), bag_size=50)
    x, ivp_x, i = data[(0, None)]
    assert i == 0 and torch.equal(x, whole) and ivp_x.shape == (25, 3)
    x, ivp_x, _ = data[(0, 7)]
    assert x.shape == (50, 4) and ivp_x.shape == (25, 3)
    rows = [int(torch.nonzero((whole == r).all(dim=1))[0]) for r in x]  # every sampled row is a bag row
    assert rows == sorted(set(rows)) and min(rows) < 30 <= max(rows)  # in bag order, from both slides
    assert torch.equal(data[(0, 7)][0], x)  # a draw is reproducible
    np.testing.assert_allclose([a.sum() for a in split_attention(np.full(75, 1 / 75), group.sizes)], [0.4, 0.6])


def test_read_patients_accepts_a_samples_sheet_and_names_bad_rows(tmp_path):
    sheet = tmp_path / "samples.tsv"
    sheet.write_text("slide_id\tpath\tpatient_id\n# a comment\ns1\ta.svs\tP1\ns2\tb.svs\t\n")
    assert read_patients(sheet) == {"s1": "P1", "s2": "s2"}
    (tmp_path / "bad.csv").write_text("slide_id,label\ns1,x\n")
    with pytest.raises(Exception, match=r"bad.csv: no 'patient_id' column"):
        read_patients(tmp_path / "bad.csv")
    (tmp_path / "twice.csv").write_text("slide_id,patient_id\ns1,P\ns1,Q\n")
    with pytest.raises(Exception, match=r"twice.csv, line 3: slide s1 appears twice"):
        read_patients(tmp_path / "twice.csv")


OUTCOME_TASKS = {
    "survival": "name: os\ntype: survival\ndescription: overall survival\nrisk:\n  high: many key cells\n  low: few\n",
    "regression": "name: level\ntype: regression\ndescription: the share of key cells\n",
}


@pytest.mark.parametrize(
    "task_type, head, prompts",
    [
        ("survival", "abmil", ()),
        ("survival", "pathotune", ("tvp", "ttp", "ivp")),
        ("regression", "meanpool", ()),
        ("regression", "pathotune", ("ttp",)),
    ],
)
def test_outcome_heads_on_patient_bags(tmp_path, task_type, head, prompts):
    labels = tmp_path / "labels.csv"
    bags = make_outcome_cohort(tmp_path / "features", n_slides=24, n_tiles=(20, 30), dim=8, slides_per_patient=2,
                               seed=3, task_type=task_type, labels_path=labels)
    ivp_dir = None
    if "ivp" in prompts:  # a second encoder: another view of the same tiles
        ivp_dir = tmp_path / "ivp"
        for b in bags:
            write_synthetic_store(ivp_dir / f"{b.slide_id}.h5", read_features(b.path).numpy()[:, :4])
    (tmp_path / "task.yaml").write_text(OUTCOME_TASKS[task_type])
    config = TrainConfig(epochs=2, min_epochs=0, folds=2, n_boot=20, survival_batch=4)
    summary = train(features_dir=tmp_path / "features", labels=labels, task=tmp_path / "task.yaml",
                    out_dir=tmp_path / "out", head=head, prompts=prompts, bag="patient", config=config,
                    ivp_features_dir=ivp_dir, text_cache_dir=tmp_path / "text", progress=False)
    assert (summary["n_slides"], summary["n_patients"], summary["bag"]) == (24, 12, "patient")
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    output = "risk" if task_type == "survival" else "prediction"
    assert len(rows) == 12 and list(rows[0])[:2] == ["patient_id", "slides"] and output in rows[0]
    share = {}
    for b in bags:
        with h5py.File(tmp_path / "out" / "attention" / f"{b.slide_id}.h5") as f:
            assert len(f["attention"]) == len(b.planted) + (len(read_coords(b.path)) - len(b.planted))
            share[b.patient_id] = share.get(b.patient_id, 0.0) + float(f.attrs["attention_share"])
            assert json.loads(f.attrs["classes"]) == [output]
    assert all(s == pytest.approx(1.0, abs=1e-5) for s in share.values())
    preds = predict(tmp_path / "out" / "fold_0", tmp_path / "features", tmp_path / "p", patients=labels,
                    ivp_features_dir=ivp_dir, progress=False)
    held_out = {r["patient_id"]: float(r[output]) for r in csv.DictReader(open(tmp_path / "out" / "fold_0" / "predictions.csv"))}
    got = {p.patient_id: float(p.probs[0]) for p in preds}
    assert len(got) == 12
    for patient, value in held_out.items():
        assert got[patient] == pytest.approx(value, abs=1e-5)


def test_train_cli_with_patient_bags(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["train", "--features", str(cohort["root"] / "features"), "--labels", str(cohort["labels"]),
               "--bag", "patient", "--epochs", "1", "--min-epochs", "0", "--folds", "2", "--bootstrap", "10",
               "--quiet", "--out", str(out)])
    assert rc == 0 and capsys.readouterr().out.startswith("auroc\t")
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["bag"], metrics["n_slides"], metrics["n_patients"]) == ("patient", 48, 24)
    assert sum(1 for _ in open(out / "predictions.csv")) == 1 + 24


def test_workflow_check_of_patient_labels_compares_numbers_as_numbers():
    from wsitools.labels import check_patient_labels
    from wsitools.samples import Sample
    from wsitools.errors import DataError

    def sample(slide, patient, level):
        return Sample(slide, f"{slide}.svs", patient, fields={"level": level})

    same = [sample("a", "P", "1"), sample("b", "P", "1.0"), sample("c", "P", ""), sample("d", "Q", "2")]
    check_patient_labels(same, task="t", columns={"label": "level"}, sheet="s.tsv", heads=["h"])
    with pytest.raises(DataError, match=r"patient P in s.tsv: slides a \(1\) and b \(1.5\) disagree on 'level'"):
        check_patient_labels([sample("a", "P", "1"), sample("b", "P", "1.5")], task="t",
                                             columns={"label": "level"}, sheet="s.tsv", heads=["h"])
