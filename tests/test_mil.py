"""MIL heads on a synthetic cohort with planted key instances: accuracy, attention, files, CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import multiprocessing
import os
import shutil
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from wsitools.attention import read_attention  # noqa: E402
from wsitools.cli import main  # noqa: E402
from wsitools.errors import ConfigError, DataError, ModelError  # noqa: E402
from wsitools.feature_store import read_features  # noqa: E402
from wsitools.mil import train as train_module  # noqa: E402
from wsitools.mil.config import TrainConfig  # noqa: E402
from wsitools.mil.head_folder import load_head, save_head  # noqa: E402
from wsitools.mil import run_folder  # noqa: E402
from wsitools.mil.run_folder import fold_dir, head_folders  # noqa: E402
from wsitools.mil.predict import predict  # noqa: E402
from wsitools.mil.synthetic import make_bag_cohort  # noqa: E402
from wsitools.mil.train import BagDataset, BagLoader, train  # noqa: E402

TASK = """name: synthetic
description: synthetic feature bags; positives hold a few planted instances
classes:
  neg: background instances only
  pos: a few instances from another distribution
"""
FAST = TrainConfig(epochs=20, patience=8, min_epochs=0, lr=5e-4, n_boot=200)


def _write_labels(path, bags, parts=None):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "label", "patient_id"] + (["split"] if parts else []))
        for i, b in enumerate(bags):
            w.writerow([b.slide_id, b.label, b.patient_id] + ([parts[i]] if parts else []))
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """90 bags of 60-120 16-d instances; positives hold 3-6 planted ones. Split 45/15/30."""
    root = tmp_path_factory.mktemp("mil")
    bags = make_bag_cohort(root / "features", n_slides=90, n_tiles=(60, 120), n_planted=(3, 6), dim=16,
                           shift=6.0, seed=0)
    parts = ["train"] * 45 + ["val"] * 15 + ["test"] * 30
    (root / "task.yaml").write_text(TASK)
    return {"root": root, "bags": bags, "labels": _write_labels(root / "labels.csv", bags, parts),
            "task": root / "task.yaml", "test": bags[60:]}


@pytest.fixture(scope="module")
def trained(cohort):
    """Both heads trained once on the cohort (shared by the tests below)."""
    out = {}
    for head, prompts in (("abmil", ()), ("pathotune", ("tvp", "ttp", "ivp"))):
        out[head] = cohort["root"] / f"heads_{head}"
        train(features_dir=cohort["root"] / "features", labels=cohort["labels"], task=cohort["task"],
              out_dir=out[head], head=head, prompts=prompts, config=FAST, progress=False,
              text_cache_dir=cohort["root"] / "text_cache")
    return out


@pytest.mark.parametrize("head", ["abmil", "pathotune"])
def test_heads_separate_held_out_bags_and_attend_to_planted_instances(cohort, trained, head):
    metrics = json.loads((trained[head] / "metrics.json").read_text())
    assert metrics["pooled"]["n"] == 30
    assert metrics["pooled"]["auroc"] >= 0.95
    lo, hi = metrics["pooled"]["auroc_ci95"]
    assert lo <= metrics["pooled"]["auroc"] <= hi
    shares, top_hits = [], []
    for bag in cohort["test"]:
        if bag.label != "pos":
            continue
        with h5py.File(trained[head] / "attention" / f"{bag.slide_id}.h5") as f:
            a = f["attention"][()]
            np.testing.assert_array_equal(f["coords"][()], h5py.File(bag.path)["coords"][()])
        assert a.sum() == pytest.approx(1.0, abs=1e-4)
        shares.append(a[bag.planted].sum())
        top_hits.append(int(np.argmax(a)) in bag.planted)
    # A few planted instances among 60-120 hold most of the attention.
    assert np.mean(shares) > 0.6
    assert np.mean(top_hits) >= 0.8


def test_output_layout(cohort, trained):
    out = trained["pathotune"]
    for name in ("run.json", "splits.csv", "metrics.json", "predictions.csv", "curves.csv", "curves.png"):
        assert (out / name).is_file(), name
    fold = out / "fold_0"
    for name in ("model.safetensors", "config.json", "metrics.json", "predictions.csv", "curves.csv", "curves.png"):
        assert (fold / name).is_file(), name
    assert sorted(p.stem for p in (out / "attention").glob("*.h5")) == sorted(b.slide_id for b in cohort["test"])
    config = json.loads((fold / "config.json").read_text())
    assert config["config"]["prompts"] == ["tvp", "ttp", "ivp"] and config["classes"] == ["neg", "pos"]
    assert config["text"]["prompts"][1] == "neg: background instances only"
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30 and {r["pred"] for r in rows} <= {"neg", "pos"}
    for r in rows:
        assert float(r["prob_neg"]) + float(r["prob_pos"]) == pytest.approx(1.0, abs=1e-5)
    curves = list(csv.DictReader(open(fold / "curves.csv")))
    assert int(curves[-1]["epoch"]) + 1 == len(curves) and len(curves) <= FAST.epochs
    best = json.loads((fold / "metrics.json").read_text())["best_epoch"]
    assert float(curves[best]["val_loss"]) == min(float(c["val_loss"]) for c in curves)
    with open(out / "splits.csv") as f:
        parts = [r["part"] for r in csv.DictReader(f)]
    assert (parts.count("train"), parts.count("val"), parts.count("test")) == (45, 15, 30)


@pytest.mark.parametrize("head", ["abmil", "pathotune"])
def test_predict_reproduces_the_held_out_predictions(cohort, trained, head, tmp_path):
    test_ids = [b.slide_id for b in cohort["test"]]
    results = predict(trained[head], cohort["root"] / "features", tmp_path / "pred", slides=test_ids, progress=False)
    train_rows = {r["slide_id"]: r for r in csv.DictReader(open(trained[head] / "predictions.csv"))}
    pred_rows = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "pred" / "predictions.csv"))}
    assert set(pred_rows) == set(test_ids) and len(results) == 30
    for sid in test_ids:
        assert float(pred_rows[sid]["prob_pos"]) == pytest.approx(float(train_rows[sid]["prob_pos"]), abs=2e-6)
        with h5py.File(trained[head] / "attention" / f"{sid}.h5") as a, \
                h5py.File(tmp_path / "pred" / "attention" / f"{sid}.h5") as b:
            np.testing.assert_allclose(b["attention"][()], a["attention"][()], atol=1e-6)
            assert b.attrs["pred"] == pred_rows[sid]["pred"]


def test_predict_cli_on_unlabelled_slides_skips_bad_ones(cohort, trained, tmp_path, capsys):
    feats = tmp_path / "new"
    new = make_bag_cohort(feats, n_slides=4, n_tiles=(50, 60), n_planted=(5, 5), dim=16, shift=6.0, seed=7)
    (feats / "broken.h5").write_bytes(b"not hdf5")
    rc = main(["predict", "--model", str(trained["abmil"]), "--features", str(feats), "--out", str(tmp_path / "p"),
               "--quiet", "--threads", "1"])
    assert rc == 0
    info = json.loads((tmp_path / "p" / "predict.json").read_text())
    assert info["n_models"] == 1 and list(info["skipped"]) == ["broken"]
    rows = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "p" / "predictions.csv"))}
    assert set(rows) == {b.slide_id for b in new}
    for b in new:
        assert rows[b.slide_id]["pred"] == b.label
    rc = main(["predict", "--model", str(trained["abmil"]), "--features", str(feats), "--out", str(tmp_path / "q"),
               "--quiet", "--strict", "--threads", "1"])
    assert rc == 2 and "broken" in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_predict_reads_each_bag_once_and_still_refuses_non_finite_features(cohort, trained, tmp_path, monkeypatch):
    """The features of every bag are read once (their finiteness checked on the rows read, not
    in a read of their own), a bag with a NaN is skipped with the one line naming its file, and
    the results carry no attention (each slide's is in its file)."""
    feats = tmp_path / "f"
    feats.mkdir()
    bags = cohort["test"][:4]
    for b in bags:
        shutil.copy(b.path, feats / f"{b.slide_id}.h5")
    bad = feats / f"{bags[2].slide_id}.h5"
    with h5py.File(bad, "r+") as f:
        f["features"][3, 5] = np.nan
        del f.attrs["features_crc32"]  # as another tool writes it: its checksum would refuse it first
    rows_read: dict[str, int] = {}
    getitem = h5py.Dataset.__getitem__

    def counting(self, key, *args, **kwargs):
        out = getitem(self, key, *args, **kwargs)
        if self.name == "/features":
            stem = os.path.splitext(os.path.basename(self.file.filename))[0]
            rows_read[stem] = rows_read.get(stem, 0) + len(out)
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    results = predict(trained["abmil"], feats, tmp_path / "p", progress=False)
    assert rows_read == {b.slide_id: len(h5py.File(b.path)["coords"]) for b in bags}
    assert [r.slide_id for r in results] == [b.slide_id for b in bags if b is not bags[2]]
    assert [f.name for f in dataclasses.fields(results[0])] == ["slide_id", "probs"]
    skipped = json.loads((tmp_path / "p" / "predict.json").read_text())["skipped"]
    assert skipped == {bags[2].slide_id: f"slide {bags[2].slide_id}: feature store {bad} has non-finite (NaN/inf) "
                                         "features in 1+ rows, first row 3; extract it again (wsitools extract --overwrite)"}
    with pytest.raises(DataError, match=r"non-finite \(NaN/inf\) features in 1\+ rows, first row 3"):
        predict(trained["abmil"], feats, tmp_path / "q", strict=True, progress=False)


def test_meanpool_probe_on_a_mean_shifted_cohort(tmp_path):
    bags = make_bag_cohort(tmp_path / "f", n_slides=40, n_tiles=(40, 60), n_planted=(15, 25), dim=8, shift=2.0, seed=2)
    labels = _write_labels(tmp_path / "l.csv", bags, ["train"] * 20 + ["val"] * 8 + ["test"] * 12)
    (tmp_path / "task.yaml").write_text(TASK)
    summary = train(features_dir=tmp_path / "f", labels=labels, task=tmp_path / "task.yaml", out_dir=tmp_path / "o",
                    head="meanpool", config=TrainConfig(epochs=30, patience=10, lr=1e-2, n_boot=50), progress=False)
    assert summary["pooled"]["auroc"] >= 0.95
    with h5py.File(tmp_path / "o" / "attention" / f"{bags[-1].slide_id}.h5") as f:
        a = f["attention"][()]
    np.testing.assert_allclose(a, 1.0 / len(a), rtol=1e-6)


def test_kfold_training_is_reproducible_and_seeded(tmp_path):
    bags = make_bag_cohort(tmp_path / "f", n_slides=24, n_tiles=(20, 30), dim=8, shift=6.0, seed=4,
                           slides_per_patient=2)
    labels = _write_labels(tmp_path / "l.csv", bags)
    (tmp_path / "task.yaml").write_text(TASK)
    cfg = TrainConfig(epochs=3, folds=3, n_boot=20, seed=5)
    kw = dict(features_dir=tmp_path / "f", labels=labels, task=tmp_path / "task.yaml", head="abmil", progress=False)
    s1 = train(out_dir=tmp_path / "a", config=cfg, **kw)
    train(out_dir=tmp_path / "b", config=cfg, **kw)
    train(out_dir=tmp_path / "c", config=TrainConfig(epochs=3, folds=3, n_boot=20, seed=6), **kw)
    assert len(s1["folds"]) == 3 and s1["pooled"]["n"] == 24
    assert (tmp_path / "a/predictions.csv").read_bytes() == (tmp_path / "b/predictions.csv").read_bytes()
    for k in range(3):
        a, b = (load_file(tmp_path / f"{run}/fold_{k}/model.safetensors") for run in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert (tmp_path / "a/predictions.csv").read_bytes() != (tmp_path / "c/predictions.csv").read_bytes()
    splits = list(csv.DictReader(open(tmp_path / "a/splits.csv")))
    for k in range(3):
        parts = {}
        for r in splits:
            if int(r["fold"]) == k:
                parts.setdefault(r["part"], set()).add(r["patient_id"])
        assert not (parts["train"] & parts["test"] or parts["val"] & parts["test"] or parts["train"] & parts["val"])


def test_train_cli_skips_missing_features_or_fails_strictly(tmp_path, capsys, caplog):
    bags = make_bag_cohort(tmp_path / "f", n_slides=12, n_tiles=(10, 20), dim=4, seed=1)
    labels = _write_labels(tmp_path / "l.csv", bags, ["train"] * 6 + ["val"] * 3 + ["test"] * 3)
    with open(labels, "a") as f:
        f.write("qc_failed_slide,pos,px,train\n")
    (tmp_path / "task.yaml").write_text(TASK)
    args = ["train", "--features", str(tmp_path / "f"), "--labels", str(labels), "--task", str(tmp_path / "task.yaml"),
            "--head", "abmil", "--epochs", "2", "--bootstrap", "10", "--quiet", "--threads", "1"]
    assert main(args + ["--out", str(tmp_path / "o")]) == 0
    assert "qc_failed_slide" in caplog.text
    assert "qc_failed_slide" in json.loads((tmp_path / "o" / "run.json").read_text())["skipped"]
    pooled = json.loads((tmp_path / "o" / "metrics.json").read_text())["pooled"]
    lo, hi = pooled["auroc_ci95"]  # the printed metrics say they are the pooled out-of-fold ones
    assert capsys.readouterr().out.splitlines()[0] == f"auroc\t{pooled['auroc']}\tpooled out-of-fold, 95% CI [{lo}, {hi}]"
    assert main(args + ["--out", str(tmp_path / "strict"), "--strict"]) == 2
    assert "qc_failed_slide: no feature store" in capsys.readouterr().err
    assert not (tmp_path / "strict").exists()
    assert main(args + ["--out", str(tmp_path / "o")]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "x"), "--prompts", "tvp"]) == 2  # prompts are pathotune's


def test_a_failed_run_leaves_no_output(tmp_path, monkeypatch):
    bags = make_bag_cohort(tmp_path / "f", n_slides=16, n_tiles=(10, 20), dim=4, seed=1)
    labels = _write_labels(tmp_path / "l.csv", bags)
    (tmp_path / "task.yaml").write_text(TASK)
    calls = []
    real = train_module.train_fold

    def fail_on_second_fold(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_fold", fail_on_second_fold)
    with pytest.raises(RuntimeError, match="killed"):
        train(features_dir=tmp_path / "f", labels=labels, task=tmp_path / "task.yaml", out_dir=tmp_path / "o",
              config=TrainConfig(epochs=1, folds=2, n_boot=5), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "l.csv", "task.yaml"]


def test_saved_head_round_trip_and_mismatch_is_named(trained, tmp_path):
    saved = load_head(trained["pathotune"] / "fold_0")
    assert saved.classes == ["neg", "pos"] and saved.config.text_dim == 384
    x = torch.randn(50, 16)
    again = load_head(save_head(saved.model, tmp_path / "copy", meta=saved.meta))
    torch.testing.assert_close(again.model(x).logits, saved.model(x).logits)
    abmil_weights = (trained["abmil"] / "fold_0" / "model.safetensors").read_bytes()
    (tmp_path / "copy" / "model.safetensors").write_bytes(abmil_weights)
    with pytest.raises(ModelError, match=r"copy/model\.safetensors: does not fit the model; missing keys: tvp"):
        load_head(tmp_path / "copy")
    with pytest.raises(ModelError, match="no trained head"):
        predict(tmp_path, tmp_path, tmp_path / "out")


def test_a_head_folder_is_written_whole_or_not_at_all(trained, tmp_path):
    saved = load_head(trained["abmil"] / "fold_0")
    circular: dict = {}
    circular["self"] = circular
    with pytest.raises(ValueError, match="Circular"):  # no config can be written: no weights stay behind
        save_head(saved.model, tmp_path / "head", meta={**saved.meta, "bad": circular})
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "head").mkdir()
    (tmp_path / "head" / "stale.txt").write_text("old")
    folder = save_head(saved.model, tmp_path / "head", meta=saved.meta)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert head_folders(tmp_path / "head") == [tmp_path / "head"]
    run = tmp_path / "run"
    for k in (10, 2):
        save_head(saved.model, fold_dir(run, k), meta=saved.meta)
    (run / "fold_x").mkdir()
    for name in ("metrics.json", "predictions.csv"):
        (run / name).write_text("{}")
    (run / "run.json").write_text(json.dumps({"n_folds": 2}))
    assert head_folders(run) == [run / "fold_2", run / "fold_10"]  # fold order, not name order
    assert load_head(folder).meta["fold"] == saved.meta["fold"] == 0


def test_a_half_written_run_is_refused_with_one_line_naming_it(cohort, trained, tmp_path, capsys):
    """What a killed `wsitools train` leaves (its temporary: fold heads and results, but not the
    run.json written last), or a run copied in part, is never taken for a finished run."""
    killed = tmp_path / ".tmp-heads-node1-4242-0badcafe"
    shutil.copytree(trained["abmil"], killed)
    (killed / "run.json").unlink()
    assert head_folders(killed / "fold_0") == [killed / "fold_0"]  # one head folder alone is whole
    with pytest.raises(ModelError, match=r"^\S+\.tmp-heads-node1-4242-0badcafe: an unfinished training run \(fold heads"):
        predict(killed, cohort["root"] / "features", tmp_path / "p", progress=False)
    rc = main(["predict", "--model", str(killed), "--features", str(cohort["root"] / "features"),
               "--out", str(tmp_path / "p"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"{killed}: an unfinished training run" in err
    assert err.endswith("; train into a new or empty folder, or remove this one first\n")
    assert not (tmp_path / "p").exists()
    rc = main(["train", "--features", str(cohort["root"] / "features"), "--labels", str(cohort["labels"]),
               "--resume", "--overwrite", "--out", str(killed), "--quiet"])  # what that line says does not work
    err = capsys.readouterr().err
    assert rc == 2 and err.endswith("give a new or empty folder (or remove this one)\n"), err
    part = tmp_path / "part"
    shutil.copytree(trained["abmil"], part)
    shutil.rmtree(part / "fold_0")
    (part / "metrics.json").unlink()
    with pytest.raises(ModelError, match=r"part: an unfinished training run \(0 of its 1 fold heads, no metrics\.json\); "
                                         "train it again with --overwrite$"):
        run_folder.load_heads(part)
    run_folder.check_replaceable(part)  # which --overwrite does: it has its run.json
    (part / "run.json").write_text("{")
    with pytest.raises(ModelError, match=r"part/run\.json: not a readable run record"):
        head_folders(part)


def test_a_flipped_bit_in_a_heads_weights_is_one_line_naming_the_file(cohort, trained, tmp_path, capsys):
    """A bit flipped in a weight leaves the file readable and every value finite, but would shift
    every prediction: the sha256 that config.json records finds it. A head without one (saved
    before it was recorded) loads as it is."""
    import hashlib

    run = tmp_path / "run"
    shutil.copytree(trained["abmil"], run)
    weights, config = run / "fold_0" / "model.safetensors", run / "fold_0" / "config.json"
    recorded = json.loads(config.read_text())["weights_sha256"]
    assert recorded == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert "weights_sha256" not in load_head(run / "fold_0").meta
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # an exponent bit of the last weight: 4 times larger or smaller, still finite
    weights.write_bytes(bytes(data))
    digest = hashlib.sha256(bytes(data)).hexdigest()
    rc = main(["predict", "--model", str(run), "--features", str(cohort["root"] / "features"),
               "--out", str(tmp_path / "p"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err == (f"wsitools predict: error: {weights}: checksum mismatch: its sha256 is {digest}, "
                               f"{config} records {recorded}: damaged since it was written; train the head again\n")
    assert not (tmp_path / "p").exists()
    meta = json.loads(config.read_text())
    del meta["weights_sha256"]
    config.write_text(json.dumps(meta))
    assert load_head(run / "fold_0").meta["fold"] == 0


def test_a_run_is_published_only_with_its_record(tmp_path):
    with pytest.raises(RuntimeError, match="without its run.json"):
        with run_folder.writing(tmp_path / "run") as tmp:
            run_folder.write_splits(tmp, [{"fold": 0, "part": "test", "slide_id": "s", "patient_id": "p", "label": "x"}])
    assert list(tmp_path.iterdir()) == []
    with run_folder.writing(tmp_path / "run") as tmp:
        run_folder.write_record(tmp, {"n_folds": 0})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["attention", "run.json"]


def test_predict_rejects_features_of_another_width(trained, tmp_path):
    make_bag_cohort(tmp_path / "f", n_slides=2, n_tiles=(5, 6), dim=12, seed=0)
    with pytest.raises(DataError, match="features are 12-d, the head expects 16-d"):
        predict(trained["abmil"], tmp_path / "f", tmp_path / "out", strict=True, progress=False)


def _tiny_cli_cohort(root):
    bags = make_bag_cohort(root / "f", n_slides=12, n_tiles=(10, 20), dim=4, shift=6.0, seed=3)
    labels = _write_labels(root / "l.csv", bags, ["train"] * 6 + ["val"] * 3 + ["test"] * 3)
    (root / "task.yaml").write_text(TASK)
    return ["--features", str(root / "f"), "--labels", str(labels), "--task", str(root / "task.yaml"),
            "--epochs", "3", "--lr", "5e-3", "--bootstrap", "10", "--quiet", "--threads", "1"]


def test_device_cpu_equals_auto_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto -> cpu on any machine
    args = _tiny_cli_cohort(tmp_path)
    assert main(["train", *args, "--out", str(tmp_path / "auto")]) == 0
    assert main(["train", *args, "--device", "cpu", "--out", str(tmp_path / "cpu")]) == 0
    a, c = (load_file(tmp_path / run / "fold_0" / "model.safetensors") for run in ("auto", "cpu"))
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in a.values())
    for name in ("predictions.csv", "curves.csv"):  # curves: every epoch's losses, not just the weights
        rows = [[{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(tmp_path / run / name))]
                for run in ("auto", "cpu")]
        assert rows[0] == rows[1] and len(rows[0]) == 3, name  # 3 epochs; 3 test slides
    assert json.loads((tmp_path / "cpu" / "run.json").read_text())["device"] == "cpu"
    feats = ["--model", str(tmp_path / "cpu"), "--features", str(tmp_path / "f"), "--quiet", "--threads", "1"]
    assert main(["predict", *feats, "--out", str(tmp_path / "p_auto")]) == 0
    assert main(["predict", *feats, "--device", "cpu", "--out", str(tmp_path / "p_cpu")]) == 0
    pa, pc = ((tmp_path / run / "predictions.csv").read_bytes() for run in ("p_auto", "p_cpu"))
    assert pa == pc and pa.count(b"\n") == 13  # header + 12 slides
    assert json.loads((tmp_path / "p_cpu" / "predict.json").read_text())["device"] == "cpu"


def test_loader_workers_read_each_bag_once_per_fold_and_change_no_result(tmp_path, monkeypatch):
    """With ``--workers 2`` the loaders' workers last the fold: the validation bags, evaluated
    every epoch of both pooling trainings, are read from their stores once, like every other bag;
    the run's weights, curves and predictions are those of ``--workers 0``."""
    reads = tmp_path / "reads.txt"
    read_features = train_module.read_features

    def logged(path, *args, **kwargs):
        fd = os.open(reads, os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # workers append too
        os.write(fd, f"{path.stem}\n".encode())
        os.close(fd)
        return read_features(path, *args, **kwargs)

    monkeypatch.setattr(train_module, "read_features", logged)
    args = _tiny_cli_cohort(tmp_path)
    assert main(["train", *args, "--workers", "2", "--out", str(tmp_path / "w2")]) == 0
    counts = {sid: reads.read_text().split().count(sid) for sid in set(reads.read_text().split())}
    assert counts == {f"slide_{i:03d}": 1 for i in range(12)}  # 6 train, 3 val, 3 test bags
    assert multiprocessing.active_children() == []  # the workers ended with their fold
    assert main(["train", *args, "--workers", "0", "--out", str(tmp_path / "w0")]) == 0
    a, b = (load_file(tmp_path / run / "fold_0" / "model.safetensors") for run in ("w0", "w2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("predictions.csv", "curves.csv"):
        rows = [[{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(tmp_path / run / name))]
                for run in ("w0", "w2")]
        assert rows[0] == rows[1] and len(rows[0]) == 3, name


def test_a_bag_loader_pass_takes_one_number_of_the_global_generator(tmp_path):
    """A pass of a :class:`BagLoader`, with or without (persistent) workers, takes from torch's
    global generator what a data loader made for the pass takes, so the dropout draws that
    follow in it, and the run's results, are the same however the bags are loaded."""
    paths = [b.path for b in make_bag_cohort(tmp_path, n_slides=3, n_tiles=(5, 9), dim=4, seed=0)]
    dataset = BagDataset(paths, np.zeros(3), [len(read_features(p)) for p in paths], bag_size=512)
    keys = [(2, None), (0, None), (1, None)]
    torch.manual_seed(7)
    for _ in range(3):
        list(torch.utils.data.DataLoader(dataset, sampler=keys, batch_size=None))
    expected = torch.rand(4)
    for workers in (0, 2):
        bags = BagLoader(dataset, workers=workers, device=torch.device("cpu"))
        torch.manual_seed(7)
        for _ in range(3):
            assert [i for _, _, i in bags(keys)] == [2, 0, 1]
        assert torch.equal(torch.rand(4), expected), workers


def test_device_cuda_without_a_gpu_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = _tiny_cli_cohort(tmp_path)
    assert main(["train", *args, "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--device cuda" in err and "no CUDA GPU" in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ModelError, match="no CUDA GPU"):
        predict(tmp_path, tmp_path / "f", tmp_path / "p", device="cuda")
    assert main(["predict", "--model", str(tmp_path), "--features", str(tmp_path / "f"), "--out", str(tmp_path / "p"),
                 "--device", "cuda", "--quiet"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err and not (tmp_path / "p").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_and_prediction_on_the_gpu_match_the_cpu(cohort, tmp_path):
    on_cpu_dir = tmp_path / "cpu"  # its own abmil head: the `trained` fixture needs the text model
    train(features_dir=cohort["root"] / "features", labels=cohort["labels"], task=cohort["task"],
          out_dir=on_cpu_dir, head="abmil", config=FAST, device="cpu", progress=False)
    out = tmp_path / "gpu"
    summary = train(features_dir=cohort["root"] / "features", labels=cohort["labels"], task=cohort["task"],
                    out_dir=out, head="abmil", config=FAST, device="cuda", progress=False)
    assert summary["pooled"]["auroc"] >= 0.95 and json.loads((out / "run.json").read_text())["device"] == "cuda:0"
    weights = load_file(out / "fold_0" / "model.safetensors")
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in weights.values())
    test_ids = [b.slide_id for b in cohort["test"]]
    on_gpu = predict(on_cpu_dir, cohort["root"] / "features", tmp_path / "pg", slides=test_ids,
                     device="cuda", progress=False)
    on_cpu = predict(on_cpu_dir, cohort["root"] / "features", tmp_path / "pc", slides=test_ids,
                     device="cpu", progress=False)
    for g, c in zip(on_gpu, on_cpu):
        np.testing.assert_allclose(g.probs, c.probs, atol=1e-4)
        on = {run: read_attention(tmp_path / run / "attention" / f"{g.slide_id}.h5").attention for run in ("pg", "pc")}
        np.testing.assert_allclose(on["pg"], on["pc"], atol=1e-4)


def _top_k_precision(run_dir, bags):
    """Mean over positive bags of the share of planted instances among the k most attended
    (k = the number of planted instances), and the mean largest attention weight."""
    precision, peak = [], []
    for bag in bags:
        if bag.label != "pos":
            continue
        with h5py.File(run_dir / "attention" / f"{bag.slide_id}.h5") as f:
            a = f["attention"][()]
        top = np.argsort(-a, kind="stable")[: len(bag.planted)]
        precision.append(np.isin(top, bag.planted).mean())
        peak.append(a.max())
    return float(np.mean(precision)), float(np.mean(peak))


def test_instance_dropout_spreads_attention_over_a_planted_region(tmp_path):
    """Positives hold a region-sized set of weakly shifted instances (12-20 of 60-120): without
    instance dropout (the default) the attention piles onto a few of them; dropout 0.7 spreads it
    over the region, so the top-k tiles are mostly planted ones, at the same AUROC. Attention
    pooling alone, as what is measured is the attention (and it trains once, not twice)."""
    bags = make_bag_cohort(tmp_path / "features", n_slides=90, n_tiles=(60, 120), n_planted=(12, 20), dim=16,
                           shift=3.0, seed=0)
    labels = _write_labels(tmp_path / "labels.csv", bags, ["train"] * 45 + ["val"] * 15 + ["test"] * 30)
    (tmp_path / "task.yaml").write_text(TASK)
    assert TrainConfig().instance_dropout == 0.0
    results = {}
    for dropout in (0.0, 0.7):
        out = tmp_path / f"dropout_{dropout}"
        train(features_dir=tmp_path / "features", labels=labels, task=tmp_path / "task.yaml", out_dir=out,
              head="abmil", config=replace(FAST, instance_dropout=dropout, pooling="attention"), progress=False)
        run = json.loads((out / "run.json").read_text())
        assert run["train"]["instance_dropout"] == dropout
        results[dropout] = (json.loads((out / "metrics.json").read_text())["pooled"]["auroc"],
                            *_top_k_precision(out, bags[60:]))
    (auroc0, precision0, peak0), (auroc, precision, peak) = results[0.0], results[0.7]
    assert auroc0 >= 0.95 and auroc >= 0.95
    assert precision >= 0.7 and precision >= precision0 + 0.08
    assert peak < peak0
    with pytest.raises(ConfigError, match=r"instance_dropout \(--instance-dropout\) must lie in"):
        TrainConfig(instance_dropout=1.0)


@pytest.mark.parametrize("field, value, message", [
    ("lr", float("nan"), "lr (--lr) must be a finite number > 0, got nan"),
    ("lr", float("inf"), "lr (--lr) must be a finite number > 0, got inf"),
    ("lr", 0.0, "lr (--lr) must be a finite number > 0, got 0.0"),
    ("weight_decay", -1e-4, "weight_decay (--weight-decay) must be a finite number >= 0, got -0.0001"),
    ("bag_size", -1, "bag_size (--bag-size) must be at least 1, or None for whole bags (--bag-size 0), got -1"),
    ("bag_size", 0, "bag_size (--bag-size) must be at least 1, or None for whole bags (--bag-size 0), got 0"),
    ("n_boot", -1, "n_boot (--bootstrap) must be at least 0 (0: no bootstrap intervals), got -1"),
    ("workers", -2, "workers (--workers) must be at least 0, got -2"),
    ("seed", -1, "seed (--seed) must be at least 0, got -1"),
    ("epochs", 2.5, "epochs (--epochs) must be a whole number, got 2.5"),
    ("folds", True, "folds (--folds) must be a whole number, got True"),
    ("lr", "0.001", "lr (--lr) must be a number, got '0.001'"),
    ("val_fraction", 1.0, "val_fraction (--val-fraction) must lie in (0, 1), got 1.0"),
    ("survival_batch", 1, "survival_batch must be at least 2 (a Cox risk set compares bags), got 1"),  # no option
])
def test_train_config_refuses_what_the_command_line_refuses(field, value, message):
    """A settings dataclass given from Python is checked as the CLI checks its options, before
    any training (a nan lr used to end in torch's own error, a negative bag_size meant no cap)."""
    with pytest.raises(ConfigError) as error:
        TrainConfig(**{field: value})
    assert str(error.value) == message


def test_refusals_of_train_options_name_the_option_typed(cohort, tmp_path, capsys):
    """Values the option parser lets through but a run cannot use are refused naming the option
    (``--val-fraction``), not only the field of the settings it sets; every field named with an
    option is one of ``wsitools train``'s."""
    import argparse

    from cli_calls import one_line, run
    from wsitools.cli import build_parser
    from wsitools.mil.config import OPTIONS

    common = ["train", "--features", cohort["root"] / "features", "--labels", cohort["labels"], "--folds", "2",
              "--epochs", "1", "--bootstrap", "0", "--device", "cpu", "--quiet", "--out", tmp_path / "o"]
    for extra, message in (
        (["--val-fraction", "0"], "val_fraction (--val-fraction) must lie in (0, 1), got 0.0"),
        (["--instance-dropout", "1"], "instance_dropout (--instance-dropout) must lie in [0, 1), got 1.0"),
        (["--dropout", "1"], "dropout (--dropout) must lie in [0, 1), got 1.0"),
        (["--dim", "130"], "head width dim (--dim) 130 must be divisible by its 4 attention heads (n_heads)"),
    ):
        rc, err = run([*common, *extra], capsys)
        assert one_line(rc, err) == f"wsitools train: error: {message}"
    train_parser = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    typed = {o for a in train_parser._actions for o in a.option_strings}
    assert set(OPTIONS.values()) <= typed and set(OPTIONS) == set(TrainConfig.__dataclass_fields__) - {"survival_batch"}


def test_train_config_keeps_its_documented_edge_values():
    """None is whole bags, 0 bootstrap resamples is no interval, and min_epochs above epochs
    trains every epoch: settings the CLI gives too (--bag-size 0, --bootstrap 0, --epochs 2)."""
    config = TrainConfig(bag_size=None, n_boot=0, epochs=2, min_epochs=50)
    assert (config.bag_size, config.n_boot, config.epochs, config.min_epochs) == (None, 0, 2, 50)


def test_an_output_folder_that_is_or_holds_an_input_is_refused(cohort, trained, tmp_path):
    # --overwrite replaces the whole output folder: given an input folder, or one holding an
    # input, it would delete what the run reads.
    features = tmp_path / "project" / "features"
    shutil.copytree(cohort["root"] / "features", features)
    stores = sorted(p.name for p in features.iterdir())
    with pytest.raises(DataError, match=r"output .*features is --features .*: the run replaces its output"):
        predict(trained["abmil"], features, features, overwrite=True, progress=False)
    with pytest.raises(DataError, match=r"output .*project holds --features "):
        predict(trained["abmil"], features, tmp_path / "project", overwrite=True, progress=False)
    with pytest.raises(DataError, match=r"output .*abmil is --model "):
        predict(trained["abmil"], features, trained["abmil"], overwrite=True, progress=False)
    with pytest.raises(DataError, match=r"output .*project holds --labels "):
        shutil.copy(cohort["labels"], tmp_path / "project" / "labels.csv")
        train(features_dir=cohort["root"] / "features", labels=tmp_path / "project" / "labels.csv",
              out_dir=tmp_path / "project", overwrite=True, config=FAST, progress=False)
    assert sorted(p.name for p in features.iterdir()) == stores and (tmp_path / "project" / "labels.csv").is_file()
    assert (trained["abmil"] / "run.json").is_file()


def test_overwrite_replaces_only_an_earlier_run_of_the_same_command(tmp_path, capsys):
    """--overwrite replaces --out as a whole, so it takes only an empty folder or an earlier run
    of the same command (its run.json or predict.json): any other folder (a user's, the other
    command's), or a file, is refused in one line and left as it was."""
    bags = make_bag_cohort(tmp_path / "f", n_slides=12, n_tiles=(10, 20), dim=4, seed=1)
    labels = _write_labels(tmp_path / "l.csv", bags, ["train"] * 6 + ["val"] * 3 + ["test"] * 3)
    run, pred = tmp_path / "run", tmp_path / "pred"
    train_args = ["train", "--features", str(tmp_path / "f"), "--labels", str(labels), "--head", "abmil", "--epochs",
                  "2", "--bootstrap", "10", "--quiet", "--threads", "1", "--overwrite", "--out"]
    predict_args = ["predict", "--model", str(run), "--features", str(tmp_path / "f"), "--quiet", "--threads", "1",
                    "--overwrite", "--out"]
    run.mkdir()
    for args, out in ((train_args, run), (train_args, run), (predict_args, pred), (predict_args, pred)):
        assert main(args + [str(out)]) == 0  # an empty folder, then the earlier run
    for args, out in ((train_args, run), (predict_args, pred)):  # a desktop's file and a killed write's
        (out / ".DS_Store").write_bytes(b"\0")  # temporary are nobody's files: the earlier run is replaced
        (out / ".tmp-metrics.json-host-1-0123abcd").write_text("{")
        assert main(args + [str(out)]) == 0
        assert not (out / ".DS_Store").exists() and (out / ("run.json" if out == run else "predict.json")).is_file()
    shutil.copytree(run, tmp_path / "run_copy")
    capsys.readouterr()
    mine = tmp_path / "mine"
    (mine / "important").mkdir(parents=True)
    (mine / "important" / "data.txt").write_text("keep")
    afile = tmp_path / "afile.txt"
    afile.write_text("keep")
    for command, args, other, what in (("train", train_args, pred, "training run (it has no run.json)"),
                                        ("predict", predict_args, tmp_path / "run_copy",
                                         "prediction (it has no predict.json)")):
        for out in (mine, other):
            assert main(args + [str(out)]) == 2
            assert capsys.readouterr().err == (
                f"wsitools {command}: error: {out}: is no wsitools {what}; {command} --overwrite replaces its --out "
                "as a whole, so give a new or empty folder (or remove this one)\n")
        assert main(args + [str(afile)]) == 2
        assert capsys.readouterr().err == (
            f"wsitools {command}: error: {afile}: is a file, where a folder is needed; give a folder for --out\n")
    assert (mine / "important" / "data.txt").read_text() == "keep" and afile.read_text() == "keep"
    assert (pred / "predict.json").is_file() and (tmp_path / "run_copy" / "run.json").is_file()
    # A record of that name that another tool wrote, and an earlier output beside a user's files.
    for command, args, done, what in (("train", train_args, tmp_path / "run_copy", "training run"),
                                      ("predict", predict_args, pred, "prediction")):
        record = "run.json" if command == "train" else "predict.json"
        other_tool, grown = tmp_path / f"{command}_other", tmp_path / f"{command}_grown"
        (other_tool / "docs").mkdir(parents=True)
        (other_tool / record).write_text('{"tool": "mlflow"}')
        shutil.copytree(done, grown)
        (grown / "docs").mkdir()
        (grown / "docs" / "thesis.tex").write_text("keep")
        (grown / "notes.txt").write_text("keep")
        for out, problem in ((other_tool, f"is no wsitools {what} (its {record} is not the record of one)"),
                             (grown, f"holds docs and 1 more, which {command} does not write")):
            assert main(args + [str(out)]) == 2
            assert capsys.readouterr().err == (
                f"wsitools {command}: error: {out}: {problem}; {command} --overwrite replaces its --out "
                "as a whole, so give a new or empty folder (or remove this one)\n")
        assert (grown / "docs" / "thesis.tex").read_text() == "keep" and (other_tool / "docs").is_dir()
    # train refuses such an --out before it reads anything (here a features folder without stores).
    (tmp_path / "empty").mkdir()
    no_features = [str(tmp_path / "empty") if a == str(tmp_path / "f") else a for a in train_args]
    assert main(no_features + [str(mine)]) == 2
    assert "is no wsitools training run" in capsys.readouterr().err


@pytest.mark.parametrize("task_type", ["classification", "regression", "survival"])
def test_run_reports_resample_patients(task_type):
    """A fold's and the pooled report's intervals resample the slides' patients: 10 patients of
    4 slides each give the intervals of a patient bootstrap, wider than those of the slides."""
    from pathlib import Path

    from wsitools.metrics import metrics_report, regression_report
    from wsitools.mil.data import Cohort
    from wsitools.survival import survival_report

    rng = np.random.default_rng(0)
    patients = [f"p{i // 4}" for i in range(40)]
    labels = np.array([(i // 4) % 2 for i in range(40)])
    score = np.repeat(rng.uniform(size=10), 4) * 0.6 + 0.4 * labels
    targets = {"classification": None, "regression": score * 3 + labels,
               "survival": np.stack([np.repeat(rng.exponential(10, 10), 4), labels], axis=1)}[task_type]
    cohort = Cohort(slide_ids=[f"s{i}" for i in range(40)], labels=labels, patients=patients,
                    classes=("neg", "pos") if task_type == "classification" else ("censored", "event"),
                    paths=[Path("unused.h5")] * 40, sizes=[1] * 40, dim=1, task_type=task_type, targets=targets)
    index = np.arange(40)[::-1]
    preds = np.stack([1 - score, score], axis=1)[index] if task_type == "classification" else score[index]
    groups = [patients[i] for i in index]

    def report(**by):
        if task_type == "classification":
            return metrics_report(labels[index], preds, class_names=cohort.classes, n_boot=100, seed=3, **by)
        if task_type == "regression":
            return regression_report(targets[index], preds, n_boot=100, seed=3, **by)
        return survival_report(targets[index, 0], targets[index, 1], preds, high_risk=preds > 0, n_boot=100,
                               seed=3, **by)

    written = train_module._fold_report(cohort, index, preds, TrainConfig(n_boot=100, seed=3))
    assert written == report(groups=groups)
    name = {"classification": "auroc", "regression": "pearson", "survival": "c_index"}[task_type]
    by_patient, by_slide = written[f"{name}_ci95"], report()[f"{name}_ci95"]
    assert by_slide[1] - by_slide[0] < by_patient[1] - by_patient[0]
