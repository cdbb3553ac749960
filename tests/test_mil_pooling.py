"""Pooling selection: attention heads trained in each fold pooling by attention and by the mean,
each fold keeping the pooling of lower validation loss, and saved heads predicting with the one
kept."""

from __future__ import annotations

import csv
import json
import os

import h5py
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from wsitools.errors import ConfigError, ModelError  # noqa: E402
from wsitools.mil.config import TrainConfig  # noqa: E402
from wsitools.mil.head_folder import load_head  # noqa: E402
from wsitools.mil.heads import HeadConfig, create_head, set_pooling  # noqa: E402
from wsitools.mil.predict import predict  # noqa: E402
from wsitools.mil.run_folder import fold_dir  # noqa: E402
from wsitools.mil.synthetic import make_bag_cohort  # noqa: E402
from wsitools.mil.train import train  # noqa: E402


def _bag(n: int = 30, dim: int = 8) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(1).standard_normal((n, dim)).astype(np.float32))


def test_mean_pooling_weighs_every_patch_alike():
    """abmil pooling by the mean: uniform attention, and logits of the mean projected patch."""
    torch.manual_seed(0)
    model = create_head(HeadConfig("abmil", in_dim=8, n_classes=2)).eval()
    x = _bag()
    attended = model(x)
    set_pooling(model, "mean")
    out = model(x)
    np.testing.assert_allclose(out.attention.numpy(), np.full(30, 1 / 30, np.float32), rtol=1e-6)
    expected = model.classifier(model.project(model.scaling(x)).mean(dim=0))
    torch.testing.assert_close(out.logits, expected)
    assert not torch.allclose(attended.logits, out.logits)
    assert attended.attention.std() > 0


def test_pathotune_pools_by_the_mean_too():
    torch.manual_seed(0)
    model = create_head(HeadConfig("pathotune", in_dim=8, n_classes=2, dim=16, prompts=("tvp",))).eval()
    set_pooling(model, "mean")
    np.testing.assert_allclose(model(_bag()).attention.numpy(), np.full(30, 1 / 30, np.float32), rtol=1e-6)


def test_unknown_poolings_are_refused():
    model = create_head(HeadConfig("abmil", in_dim=8, n_classes=2))
    with pytest.raises(ModelError, match="unknown pooling 'max'"):
        set_pooling(model, "max")
    with pytest.raises(ConfigError, match=r"pooling \(--pooling\) must be one of select, attention, got 'mean'"):
        TrainConfig(pooling="mean")


@pytest.fixture(scope="module")
def diffuse(tmp_path_factory):
    """60 slides of 20-40 16-d patches; every patch of the positives shifted by 0.4: the signal is
    in the bag mean, not in any patch. Trained with each pooling setting on the same folds."""
    root = tmp_path_factory.mktemp("pooling")
    make_bag_cohort(root / "features", n_slides=60, n_tiles=(20, 40), dim=16, n_planted=1000, shift=0.4,
                    seed=0, labels_path=root / "labels.csv")
    runs = {}
    for pooling in ("attention", "select"):
        config = TrainConfig(folds=3, epochs=30, min_epochs=10, patience=10, n_boot=0, pooling=pooling)
        runs[pooling] = train(features_dir=root / "features", labels=root / "labels.csv", out_dir=root / pooling,
                              head="abmil", config=config, progress=False)
    return root, runs


def test_selection_keeps_mean_pooling_where_the_signal_is_in_every_patch(diffuse):
    """Attention alone fits the training bags by attending to a few patches of each and keeps an
    early epoch (pooled AUROC 0.68 on this cohort); with selection two of three folds keep mean
    pooling and the AUROC is 0.89."""
    _, runs = diffuse
    assert [f["pooling"] for f in runs["attention"]["folds"]] == ["attention"] * 3
    assert [f["pooling"] for f in runs["select"]["folds"]].count("mean") >= 2
    assert runs["select"]["pooled"]["auroc"] >= runs["attention"]["pooled"]["auroc"] + 0.1


def test_selection_keeps_the_training_of_lower_validation_loss_and_its_attention_one_is_the_plain_recipe(diffuse):
    """Each fold's two trainings start alike: the attention one is exactly `--pooling attention`'s
    (same best epoch, same validation loss), and the pooling kept is the one of lower loss."""
    root, runs = diffuse
    plain = {f["fold"]: f for f in runs["attention"]["folds"]}
    for fold in runs["select"]["folds"]:
        losses = fold["pooling_val_loss"]
        assert set(losses) == {"attention", "mean"}
        assert fold["pooling"] == min(losses, key=losses.get)
        assert "pooling_val_loss" not in plain[fold["fold"]]
        with open(root / "attention" / "curves.csv", newline="") as f:
            curve = [float(r["val_loss"]) for r in csv.DictReader(f) if int(r["fold"]) == fold["fold"]]
        assert losses["attention"] == pytest.approx(min(curve), rel=1e-5)
        if fold["pooling"] == "attention":
            assert fold["best_epoch"] == plain[fold["fold"]]["best_epoch"]


def test_a_fold_kept_with_mean_pooling_predicts_and_attends_with_it(diffuse, tmp_path):
    root, runs = diffuse
    run = root / "select"
    folds = {f["fold"]: f["pooling"] for f in runs["select"]["folds"]}
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for k, pooling in folds.items():
        saved = load_head(fold_dir(run, k))
        assert saved.pooling == pooling == json.loads((fold_dir(run, k) / "config.json").read_text())["pooling"]
        for row in (r for r in rows if int(r["fold"]) == k):
            with h5py.File(run / "attention" / f"{row['slide_id']}.h5") as f:
                a = f["attention"][()]
            assert np.allclose(a, 1 / len(a), rtol=1e-5) == (pooling == "mean")
    mean_fold = next(k for k, p in folds.items() if p == "mean")
    test_rows = [r for r in rows if int(r["fold"]) == mean_fold]
    out = tmp_path / "pred"
    predict(fold_dir(run, mean_fold), root / "features", out, slides=[r["slide_id"] for r in test_rows],
            device="cpu", progress=False)
    with open(out / "predictions.csv", newline="") as f:
        predicted = {r["slide_id"]: float(r["prob_pos"]) for r in csv.DictReader(f)}
    for r in test_rows:
        assert predicted[r["slide_id"]] == pytest.approx(float(r["prob_pos"]), abs=1e-6)


def test_a_head_whose_pooling_is_not_known_is_refused(diffuse, tmp_path):
    root, _ = diffuse
    folder = tmp_path / "head"
    folder.mkdir()
    for name in ("model.safetensors", "config.json"):
        (folder / name).write_bytes((fold_dir(root / "select", 0) / name).read_bytes())
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "pooling": "mixed"}))
    with pytest.raises(ModelError, match=r"config\.json: pooling is 'mixed', not 'attention' or 'mean'"):
        load_head(folder)


def test_attention_files_curves_and_predict_record_each_heads_pooling(diffuse, tmp_path):
    """Training's attention files carry the pooling of the fold that made them, curves.csv and the
    curves' legend each fold's, and predict with the whole run how many heads pool by the mean."""
    from wsitools.attention import read_attention
    from wsitools.mil.run_folder import curves_figure, read_curves

    root, runs = diffuse
    run = root / "select"
    folds = {f["fold"]: f["pooling"] for f in runs["select"]["folds"]}
    with open(run / "predictions.csv", newline="") as f:
        fold_of = {r["slide_id"]: int(r["fold"]) for r in csv.DictReader(f)}
    for slide_id, k in fold_of.items():
        amap = read_attention(run / "attention" / f"{slide_id}.h5")
        mean = folds[k] == "mean"
        assert (amap.attrs["pooling"], amap.n_models, amap.n_mean_pooled, amap.mean_pooled) == (
            folds[k], 1, int(mean), mean)
    curves = read_curves(run)
    assert {(r["fold"], r["pooling"]) for r in curves} == set(folds.items())
    histories = {k: [r for r in curves if r["fold"] == k] for k in folds}
    legend = curves_figure(histories, {k: 0 for k in folds}, title="t", loss_name="l").axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        f"fold {k} {part} ({folds[k]} pooling)" for k in sorted(folds) for part in ("train", "val")]

    out = tmp_path / "pred"
    predict(run, root / "features", out, slides=sorted(fold_of)[:2], device="cpu", progress=False)
    n_mean = list(folds.values()).count("mean")
    summary = "mean" if n_mean == 3 else "mixed"
    record = json.loads((out / "predict.json").read_text())
    assert (record["pooling"], record["n_models"], record["n_mean_pooled"]) == (summary, 3, n_mean)
    amap = read_attention(out / "attention" / f"{sorted(fold_of)[0]}.h5")
    assert (amap.attrs["pooling"], amap.n_models, amap.n_mean_pooled) == (summary, 3, n_mean)


def test_a_meanpool_head_is_recorded_as_pooling_by_the_mean(diffuse, tmp_path, caplog):
    """meanpool has no attention: its folds, head configs and attention files say mean pooling,
    and a meanpool head saved as pooling by attention reads as the mean."""
    import logging

    from wsitools.attention import read_attention

    root, _ = diffuse
    run = tmp_path / "mp"
    caplog.set_level(logging.INFO, logger="wsitools.mil.train")
    summary = train(features_dir=root / "features", labels=root / "labels.csv", out_dir=run, head="meanpool",
                    config=TrainConfig(folds=3, epochs=2, min_epochs=1, patience=2, n_boot=0), progress=False)
    assert [f["pooling"] for f in summary["folds"]] == ["mean"] * 3
    assert "best epoch" in caplog.text and "(mean pooling)" in caplog.text and "(attention pooling)" not in caplog.text
    assert json.loads((fold_dir(run, 0) / "config.json").read_text())["pooling"] == "mean"
    amap = read_attention(next((run / "attention").glob("*.h5")))
    assert (amap.attrs["pooling"], amap.n_mean_pooled, amap.mean_pooled) == ("mean", 1, True)
    meta = json.loads((fold_dir(run, 0) / "config.json").read_text())
    (fold_dir(run, 0) / "config.json").write_text(json.dumps({**meta, "pooling": "attention"}))
    assert load_head(fold_dir(run, 0)).pooling == "mean"
