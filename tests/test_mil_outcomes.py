"""Survival and regression tasks: task files, labels tables, metrics against references, the Cox
loss, and heads that recover a planted outcome signal out of fold (train, predict, CLI)."""

from __future__ import annotations

import csv
import json
import math
import os
import re

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from wsitools import survival as S  # noqa: E402
from wsitools.cli import main  # noqa: E402
from wsitools.errors import DataError  # noqa: E402
from wsitools.metrics import regression_metrics, regression_report  # noqa: E402
from wsitools.mil.config import TrainConfig  # noqa: E402
from wsitools.labels import read_labels  # noqa: E402
from wsitools.mil.folds import patient_kfold  # noqa: E402
from wsitools.mil.head_folder import load_head  # noqa: E402
from wsitools.mil.predict import predict  # noqa: E402
from wsitools.mil.synthetic import make_outcome_cohort  # noqa: E402
from wsitools.mil.train import cox_loss, step_groups, train  # noqa: E402
from wsitools.text import TaskDescription, load_task  # noqa: E402

SURVIVAL = TaskDescription(name="os", description="predict overall survival", type="survival",
                           anchors=(("high", "many key patches"), ("low", "no key patches")))
REGRESSION = TaskDescription(name="level", description="predict the biomarker level", type="regression")
FAST = dict(folds=3, epochs=40, min_epochs=0, patience=15, n_boot=200)


# ---------------------------------------------------------------- task files and labels tables


def test_task_types_from_yaml(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("name: os\ntype: survival\ndescription: predict survival\nrisk:\n  high: necrosis\n  low: lepidic\n")
    task = load_task(path)
    assert task.type == "survival" and task.classes == ()
    assert task.prompts() == ["Task: predict survival.", "high risk: necrosis", "low risk: lepidic"]
    assert task.to_dict()["risk"] == {"high": "necrosis", "low": "lepidic"}
    path.write_text("name: os\ntype: survival\ndescription: d\nauc_times: [36, 12, 12.5]\n")
    assert load_task(path).auc_times == (12.0, 12.5, 36.0)
    path.write_text("name: lvl\ntype: regression\ndescription: predict the level\n")
    assert load_task(path).prompts() == ["Task: predict the level."]
    path.write_text("name: sub\ndescription: subtype\nclasses: {a: x, b: y}\n")
    assert load_task(path).type == "classification"


@pytest.mark.parametrize(
    "text,message",
    [
        ("name: x\ntype: cox\ndescription: d\n", "task type 'cox'; use one of classification, survival, regression"),
        ("name: x\ntype: survival\ndescription: d\nclasses: {a: x, b: y}\n", "a survival task has no classes"),
        ("name: x\ntype: survival\ndescription: d\nrisk: {medium: m}\n", "'risk' must map 'high' and/or 'low'"),
        ("name: x\ntype: survival\ndescription: d\nrisk: {high: ''}\n", "'risk: high' has no description"),
        ("name: x\ntype: regression\ndescription: d\nrisk: {high: h}\n", "'risk' belongs to another task type"),
        ("name: x\ndescription: d\nclasses: {a: x, b: y}\nrisk: {high: h}\n", "'risk' belongs to a survival"),
        ("name: x\ntype: survival\ndescription: d\nauc_times: [12, -1]\n", "'auc_times' holds -1; give positive"),
        ("name: x\ntype: survival\ndescription: d\nauc_times: 12\n", "'auc_times' must be a list of times"),
        ("name: x\ntype: regression\ndescription: d\nauc_times: [1]\n", "'auc_times' belongs to a survival task"),
    ],
)
def test_bad_task_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(DataError, match=r".*") as info:
        load_task(path)
    assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kind,text,message",
    [
        ("survival", "slide_id,time\na,1\n", "no 'event' column for a survival task"),
        ("survival", "slide_id,time,event\na,soon,1\n", "line 2: slide a: time 'soon' is not a number"),
        ("survival", "slide_id,time,event\na,3,2\n", "line 2: slide a: event '2' must be 0 (censored) or 1 (event)"),
        ("survival", "slide_id,time,event\na,3,yes\n", "event 'yes' is not a number"),
        ("survival", "slide_id,time,event\na,1,1\nb,-2,0\n", "line 3: slide b: time '-2' is negative"),
        ("survival", "slide_id,time,event\na,nan,1\n", "time 'nan' is not a finite number"),
        ("survival", "slide_id,time,event\na,,1\n", "line 2: slide a: empty time"),
        ("regression", "slide_id,label\na,high\n", "label 'high' is not a number"),
        ("regression", "slide_id,label\na,inf\n", "label 'inf' is not a finite number"),
        ("classification", "slide_id,time,event\na,1,1\n", "give a task file with 'type: survival'"),
    ],
)
def test_bad_outcome_tables_are_named(tmp_path, kind, text, message):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        read_labels(path, task_type=kind)
    assert message in str(info.value) and str(path) in str(info.value)


def test_outcome_tables_parse(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,time,event,patient_id\na,3.5,1,p1\nb,0,0,p1\nc,12,1.0,p2\n")
    rows = read_labels(path, task_type="survival")
    assert [(r.time, r.event, r.label, r.patient_id) for r in rows] == [
        (3.5, 1, "event", "p1"), (0.0, 0, "censored", "p1"), (12.0, 1, "event", "p2")]
    path.write_text("slide_id,label\na,-1.5\nb,2e3\n")
    assert [r.value for r in read_labels(path, task_type="regression")] == [-1.5, 2000.0]


def test_survival_folds_are_stratified_on_the_event():
    rng = np.random.default_rng(0)
    events = (rng.random(100) < 0.3).astype(np.int64)  # 70 % censored
    folds = patient_kfold(events, [f"p{i}" for i in range(100)], n_folds=5, classes=("censored", "event"))
    per_fold = [int(events[f.test].sum()) for f in folds]
    assert sum(per_fold) == events.sum() and max(per_fold) - min(per_fold) <= 1


# ---------------------------------------------------------------- metrics against references


def _brute_harrell(t, e, r):
    num = den = 0.0
    for i in range(len(t)):
        for j in range(len(t)):
            if e[i] and (t[i] < t[j] or (t[i] == t[j] and not e[j])):
                den += 1
                num += 1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0
    return num / den


def _cohort(seed=1, n=80):
    rng = np.random.default_rng(seed)
    t = np.round(rng.exponential(10, n))  # rounded: tied times
    e = rng.random(n) < 0.6
    r = np.round(rng.normal(size=n) - 0.05 * t, 1)  # rounded: tied risks
    return t, e, r


def test_harrell_c_matches_a_brute_force_count():
    t, e, r = _cohort()
    assert S.harrell_c(t, e, r) == pytest.approx(_brute_harrell(t, e, r), abs=1e-12)
    assert S.harrell_c(np.array([1.0, 2.0, 3.0]), np.ones(3), np.array([3.0, 2.0, 1.0])) == 1.0
    assert S.harrell_c(np.array([1.0, 2.0, 3.0]), np.ones(3), np.array([1.0, 2.0, 3.0])) == 0.0


def test_survival_metrics_match_scikit_survival():
    sksurv = pytest.importorskip("sksurv")
    from sksurv.compare import compare_survival
    from sksurv.metrics import concordance_index_censored, concordance_index_ipcw, cumulative_dynamic_auc
    from sksurv.nonparametric import kaplan_meier_estimator
    from sksurv.util import Surv

    assert sksurv
    t, e, r = _cohort()
    y = Surv.from_arrays(e, t)
    assert S.harrell_c(t, e, r) == pytest.approx(concordance_index_censored(e, t, r)[0], abs=1e-12)
    assert S.uno_c(t, e, r) == pytest.approx(concordance_index_ipcw(y, y, r)[0], abs=1e-12)
    assert S.uno_c(t, e, r, tau=12.0) == pytest.approx(concordance_index_ipcw(y, y, r, tau=12.0)[0], abs=1e-12)
    times = S.auc_times(t, e)
    assert len(times) == 3
    np.testing.assert_allclose([S.time_auc(t, e, r, a) for a in times], cumulative_dynamic_auc(y, y, r, times)[0],
                               atol=1e-12)
    km_t, km_s = S.kaplan_meier(t, e)
    ref_t, ref_s = kaplan_meier_estimator(e, t)
    np.testing.assert_allclose(km_t, ref_t)
    np.testing.assert_allclose(km_s, ref_s, atol=1e-12)
    group = r > np.median(r)
    stat, p = S.logrank_test(t, e, group)
    ref_stat, ref_p = compare_survival(y, group)
    assert stat == pytest.approx(ref_stat, rel=1e-10) and p == pytest.approx(ref_p, rel=1e-8)


def test_an_event_tied_with_the_last_censorings_truncates_the_weighted_statistics():
    """Whole months with censoring at the study's end: one death in the last month makes the
    censoring distribution 0 there; Uno's C and the time-dependent AUCs stay defined, truncated
    just before that time as scikit-survival's ``tau`` does."""
    pytest.importorskip("sksurv")
    from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc
    from sksurv.util import Surv

    t, e, r = _cohort(seed=4, n=60)
    end = t.max()
    last = np.flatnonzero(t == end)
    t[np.argsort(t)[-3:]] = end  # censored at the end of the study, but for one death
    e[np.argsort(t)[-3:]] = False
    e[np.argsort(t)[-1]] = True
    assert S.censoring_survival(t, e)[1][-1] == 0.0 and e[t == end].any() and (~e[t == end]).any()
    assert last.size
    y = Surv.from_arrays(e, t)
    assert S.uno_c(t, e, r) == pytest.approx(concordance_index_ipcw(y, y, r, tau=end - 0.5)[0], abs=1e-12)
    times = S.auc_times(t, e)
    assert len(times) == 3
    at_end_censored = Surv.from_arrays(e & (t < end), t)  # a control either way: only G's fit sees it
    np.testing.assert_allclose([S.time_auc(t, e, r, a) for a in times],
                               cumulative_dynamic_auc(y, at_end_censored, r, times)[0], atol=1e-12)
    rep = S.survival_report(t, e, r, n_boot=50)
    assert rep["uno_c"] == pytest.approx(S.uno_c(t, e, r), abs=1e-6) and None not in rep["uno_c_ci95"]
    assert [row["auc"] for row in rep["time_auc"]] == pytest.approx([S.time_auc(t, e, r, a) for a in times], abs=1e-6)


def test_survival_report_intervals_and_groups():
    t, e, r = _cohort(seed=2, n=60)
    rep = S.survival_report(t, e, r, high_risk=r > np.median(r), n_boot=300, seed=0)
    for name in ("c_index", "uno_c"):
        lo, hi = rep[f"{name}_ci95"]
        assert lo < rep[name] < hi and hi - lo < 0.4
    assert rep == S.survival_report(t, e, r, high_risk=r > np.median(r), n_boot=300, seed=0)  # seeded
    assert [row["time"] for row in rep["time_auc"]] == S.auc_times(t, e)
    groups = rep["risk_groups"]
    assert groups["n_high"] + groups["n_low"] == 60 and 0.0 <= groups["logrank_p"] <= 1.0
    assert rep["n_events"] == int(e.sum()) and rep["censored_fraction"] == pytest.approx(1 - e.mean(), abs=1e-6)


def _pair_matrices(t, e, r, weight):
    """The concordance pair matrices N and D built whole (the formulation the fast sums replace):
    ``D_ij`` the weight of the comparable pair, ``N_ij`` its credit times ``D_ij``."""
    earlier = (t[:, None] < t[None, :]) | ((t[:, None] == t[None, :]) & ~e[None, :])
    d = np.where(earlier & e[:, None] & (weight[:, None] > 0), weight[:, None], 0.0)
    return d * ((r[:, None] > r[None, :]) + 0.5 * (r[:, None] == r[None, :])), d


def _tied_cohort(seed, n):
    """Few distinct times and risks (ties of every kind), events and censorings at shared times."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 8, n).astype(float)
    e = rng.random(n) < rng.uniform(0.2, 0.8)
    r = rng.integers(0, 6, n) * 0.5
    return t, e, r


def test_bootstrap_by_counts_equals_resampling():
    """The interval's shortcut (pair sums weighted by resample counts) gives each resample's C exactly."""
    t, e, r = _cohort(seed=3, n=30)
    e = e.astype(bool)
    runs = S._concordance_runs(t, e, r, np.flatnonzero(e))
    rng = np.random.default_rng(5)
    for _ in range(5):
        idx = rng.integers(0, 30, size=30)
        num, den = S._pair_sums(runs, np.ones(30), np.bincount(idx, minlength=30).astype(float)[None])
        assert num[0] / den[0] == pytest.approx(_brute_harrell(t[idx], e[idx], r[idx]), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_pair_sums_equal_the_whole_pair_matrices_on_ties(seed):
    """Each resample's sums equal ``c^T N c`` and ``c^T D c`` of the whole pair matrices: exactly
    for Harrell's C (sums of counts), to rounding for the weighted statistics."""
    t, e, r = _tied_cohort(seed, n=[1, 2, 7, 40, 90, 150][seed])
    n = len(t)
    counts = np.stack([np.bincount(np.random.default_rng(seed + b).integers(0, n, n), minlength=n)
                       for b in range(20)] + [np.ones(n, np.int64)]).astype(float)
    ipcw = S._ipcw(t, e)
    for weight in (np.ones(n), ipcw**2, np.where(t < 4, ipcw**2, 0.0)):
        num, den = S._pair_sums(S._concordance_runs(t, e, r, np.flatnonzero(e & (weight > 0))), weight, counts)
        n_mat, d_mat = _pair_matrices(t, e, r, weight)
        ref_num, ref_den = np.einsum("bi,ij,bj->b", counts, n_mat, counts), np.einsum("bi,ij,bj->b", counts, d_mat, counts)
        if (weight == 1).all():
            assert num.tolist() == ref_num.tolist() and den.tolist() == ref_den.tolist()
        else:
            np.testing.assert_allclose(num, ref_num, rtol=1e-13, atol=0)
            np.testing.assert_allclose(den, ref_den, rtol=1e-13, atol=0)
    for at in (2.0, 5.0):
        case, control = e & (t <= at), t > at
        d = np.where(case[:, None] & control[None, :], ipcw[:, None], 0.0)
        n_mat = d * ((r[:, None] > r[None, :]) + 0.5 * (r[:, None] == r[None, :]))
        runs = S._runs(np.flatnonzero(case), np.zeros(case.sum(), np.int64), np.flatnonzero(control),
                       np.zeros(control.sum(), np.int64), np.unique(r, return_inverse=True)[1])
        num, den = S._pair_sums([runs], ipcw, counts)
        np.testing.assert_allclose(num, np.einsum("bi,ij,bj->b", counts, n_mat, counts), rtol=1e-13, atol=0)
        np.testing.assert_allclose(den, np.einsum("bi,ij,bj->b", counts, d, counts), rtol=1e-13, atol=0)


def test_harrell_c_and_its_interval_are_exactly_the_pair_matrices_and_scikit_survivals():
    """Harrell's C of the report and its interval are bit for bit those of the pair-matrix
    bootstrap (each resample's ``c^T N c / c^T D c``) on data with tied times, tied risks and
    censorings tied with events, patients resampled whole too; and each resample's C is
    scikit-survival's on the resampled slides."""
    from wsitools.metrics import bootstrap_samples

    sksurv_metrics = pytest.importorskip("sksurv.metrics")
    t, e, r = _tied_cohort(7, n=120)
    n_mat, d_mat = _pair_matrices(t, e, r, np.ones(120))
    for groups in (None, [f"p{i // 3}" for i in range(120)]):
        draws = list(bootstrap_samples(120, n_boot=200, seed=4, groups=groups))
        counts = np.stack([np.bincount(idx, minlength=120) for idx in draws]).astype(float)
        values = np.einsum("bi,ij,bj->b", counts, n_mat, counts) / np.einsum("bi,ij,bj->b", counts, d_mat, counts)
        expected = [float(n_mat.sum() / d_mat.sum()), *map(float, np.percentile(values, [2.5, 97.5]))]
        assert list(S._concordance(t, e, r, np.ones(120), n_boot=200, seed=4, groups=groups)) == expected
        for idx, value in zip(draws[:30], values[:30]):
            assert value == pytest.approx(sksurv_metrics.concordance_index_censored(e[idx], t[idx], r[idx])[0],
                                          abs=1e-12)


def test_survival_pair_statistics_never_build_a_matrix_of_pairs():
    """The concordance and AUC intervals summed blocks of the pair matrices per resample: N x
    events work and 170 MB traced for 5 000 slides. Their sums are prefix sums of the counts
    along runs of slides sorted by risk: memory grows with the slides, a few MB here."""
    import tracemalloc

    rng = np.random.default_rng(0)
    t, e, r = np.round(rng.exponential(24.0, 5000)), rng.random(5000) < 0.5, np.round(rng.normal(size=5000), 1)
    tracemalloc.start()
    try:
        S.survival_report(t, e, r, n_boot=20, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


def test_survival_resamples_are_summed_a_block_at_a_time(monkeypatch):
    """The resamples' counts (n_boot x N float64) are summed a block of resamples at a time, with
    the same values and intervals as all at once."""
    t, e, r = _cohort(seed=4, n=90)
    whole = S.survival_report(t, e, r, n_boot=200, seed=1)
    rows = []
    real = S._pair_sums

    def spy(families, weight, counts):
        rows.append(len(counts))
        return real(families, weight, counts)

    monkeypatch.setattr(S, "_pair_sums", spy)
    monkeypatch.setattr(S, "BOOT_BLOCK_BYTES", 8 * 90 * 7)  # 7 resamples of 90 slides a block
    assert S.survival_report(t, e, r, n_boot=200, seed=1) == whole
    assert max(rows) == 7 and sum(rows) == (200 + 1) * (2 + len(whole["time_auc"]))  # each resample, and the estimate


def test_regression_metrics_match_scipy():
    from scipy.stats import pearsonr, spearmanr

    rng = np.random.default_rng(0)
    y = rng.normal(size=50)
    p = np.round(y + rng.normal(scale=0.7, size=50), 1)
    m = regression_metrics(y, p)
    assert m["pearson"] == pytest.approx(pearsonr(y, p)[0], abs=1e-12)
    assert m["spearman"] == pytest.approx(spearmanr(y, p)[0], abs=1e-12)
    assert m["mae"] == pytest.approx(np.mean(np.abs(y - p))) and m["rmse"] == pytest.approx(np.sqrt(np.mean((y - p) ** 2)))
    rep = regression_report(y, p, n_boot=300)
    assert rep["pearson_ci95"][0] < rep["pearson"] < rep["pearson_ci95"][1]
    assert math.isnan(regression_metrics(y, np.ones(50))["pearson"])



def test_reports_keep_six_significant_digits_of_small_errors():
    rng = np.random.default_rng(1)
    y = 1e-7 * rng.normal(size=40)
    p = y + 3e-8 * rng.normal(size=40)
    rep = regression_report(y, p, n_boot=50)
    assert rep["mae"] == pytest.approx(np.mean(np.abs(y - p)), rel=1e-5) and rep["mae"] > 0
    assert 0 < rep["rmse_ci95"][0] < rep["rmse"] < rep["rmse_ci95"][1]


def test_metrics_refuse_predictions_that_are_not_finite():
    y = np.arange(6.0)
    with pytest.raises(ValueError, match="must be finite"):
        regression_metrics(y, np.array([0.0, 1, 2, np.nan, 4, 5]))
    with pytest.raises(ValueError, match="risk holds 1 values that are not finite"):
        S.harrell_c(y + 1, np.ones(6), np.array([0.0, 1, 2, np.nan, 4, 5]))


def test_prediction_tables_keep_every_digit(tmp_path):
    from wsitools.mil.run_folder import read_predictions, write_predictions

    rows = [{"slide_id": "a", "label": 1234567.891, "fold": 1, "prediction": 1234561.2345678},
            {"slide_id": "b", "label": 2.5e-9, "fold": 2, "prediction": -1.0000001e-9}]
    write_predictions(tmp_path / "p.csv", rows, ())
    back = read_predictions(tmp_path / "p.csv")
    assert [(float(r["label"]), float(r["prediction"])) for r in back] == [
        (1234567.891, 1234561.2345678), (2.5e-9, -1.0000001e-9)]

# ---------------------------------------------------------------- the Cox loss


def test_cox_loss_is_the_breslow_partial_likelihood():
    rng = np.random.default_rng(0)
    t = np.array([5.0, 2.0, 2.0, 7.0, 1.0, 2.0, 9.0])
    e = np.array([1, 1, 0, 1, 0, 1, 0], dtype=float)
    r = rng.normal(size=7)
    expected = -sum(r[i] - np.log(np.exp(r[t >= t[i]]).sum()) for i in range(7) if e[i]) / e.sum()
    got = cox_loss(torch.tensor(r), torch.tensor(t), torch.tensor(e))
    assert float(got) == pytest.approx(expected, abs=1e-12)
    risk = torch.tensor(r, requires_grad=True)
    cox_loss(risk, torch.tensor(t), torch.zeros(7)).backward()
    assert torch.count_nonzero(risk.grad) == 0  # no event: no gradient



def test_survival_targets_keep_the_order_of_times_beyond_float32():
    """Times in seconds (1e8 and more) stay distinct in the Cox loss: it trains on their ranks."""
    from types import SimpleNamespace

    from wsitools.mil.train import _fold_targets

    t = np.array([1e8 + 2, 1e8, 1e8 + 1, 1e8 + 1, 1e8 + 3])
    e = np.array([1.0, 1, 0, 1, 1])
    targets, scale = _fold_targets(SimpleNamespace(task_type="survival", targets=np.stack([t, e], axis=1)), None)
    assert scale == {} and targets[:, 0].tolist() == [2, 0, 1, 1, 3] and targets[:, 1].tolist() == e.tolist()
    r = torch.tensor([0.3, -1.0, 0.5, 0.2, -0.4])
    exact = cox_loss(r.double(), torch.tensor(t), torch.tensor(e))
    assert float(cox_loss(r, targets[:, 0], targets[:, 1])) == pytest.approx(float(exact), abs=1e-6)

def test_step_groups_cover_the_epoch_without_tiny_steps():
    assert step_groups(5, 1) == [1] * 5
    assert step_groups(40, 16) == [14, 13, 13]
    assert step_groups(10, 16) == [10]


# ---------------------------------------------------------------- heads recover the planted signal


@pytest.fixture(scope="module")
def survival_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("surv")
    bags = make_outcome_cohort(root / "f", n_slides=60, n_tiles=(30, 60), log_hazard_ratio=8.0, seed=0,
                               labels_path=root / "labels.csv")
    summary = train(features_dir=root / "f", labels=root / "labels.csv", out_dir=root / "o", task=SURVIVAL,
                    head="abmil", config=TrainConfig(**FAST), progress=False)
    return root, bags, summary


def test_survival_head_recovers_the_planted_hazard(survival_run):
    root, bags, summary = survival_run
    censored = 1 - np.mean([b.event for b in bags])
    assert 0.2 <= censored <= 0.4
    pooled = summary["pooled"]
    assert summary["task_type"] == "survival" and pooled["n"] == 60
    assert pooled["c_index"] >= 0.75, pooled
    assert pooled["c_index_ci95"][0] < pooled["c_index"] < pooled["c_index_ci95"][1]
    assert pooled["uno_c"] >= 0.7
    assert len(pooled["time_auc"]) == 3 and all(row["auc"] >= 0.65 for row in pooled["time_auc"])
    assert pooled["risk_groups"]["logrank_p"] < 0.05
    assert pooled["risk_groups"]["median_time_high"] < pooled["risk_groups"]["median_time_low"]
    assert set(summary["mean_over_folds"]) == {"c_index", "uno_c"}


def test_survival_outputs_and_prediction(survival_run):
    root, bags, summary = survival_run
    out = root / "o"
    png = (out / "km.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["slide_id", "patient_id", "time", "event", "fold", "risk"]
    by_slide = {b.slide_id: b for b in bags}
    assert all(int(r["event"]) == by_slide[r["slide_id"]].event for r in rows)
    head = load_head(out / "fold_0")
    assert head.meta["task_type"] == "survival" and head.config.n_classes == 1 and head.meta["classes"] == []
    assert head.meta["risk_scale"] > 0
    # The fold-0 head alone reproduces its out-of-fold risks (standardised by its own training risks).
    fold0 = [r for r in rows if r["fold"] == "0"]
    results = predict(out / "fold_0", root / "f", root / "p", slides=[r["slide_id"] for r in fold0], progress=False)
    np.testing.assert_allclose([res.probs[0] for res in results], [float(r["risk"]) for r in fold0], atol=1e-4)
    with open(root / "p" / "predictions.csv", newline="") as f:
        assert next(csv.reader(f)) == ["slide_id", "n_tiles", "risk"]
    import h5py

    with h5py.File(out / "attention" / f"{fold0[0]['slide_id']}.h5") as f:
        assert f.attrs["task_type"] == "survival" and json.loads(f.attrs["classes"]) == ["risk"]
        assert f["attention"][()].sum() == pytest.approx(1.0, abs=1e-5)


def test_regression_head_recovers_the_planted_level(tmp_path):
    bags = make_outcome_cohort(tmp_path / "f", n_slides=60, n_tiles=(30, 60), task_type="regression", seed=0,
                               labels_path=tmp_path / "labels.csv")
    summary = train(features_dir=tmp_path / "f", labels=tmp_path / "labels.csv", out_dir=tmp_path / "o",
                    task=REGRESSION, head="abmil", config=TrainConfig(**FAST), progress=False)
    pooled = summary["pooled"]
    assert pooled["pearson"] >= 0.8 and pooled["spearman"] >= 0.8, pooled
    values = np.array([b.value for b in bags])
    assert pooled["mae"] < 0.5 * np.mean(np.abs(values - values.mean()))  # far better than predicting the mean
    head = load_head(tmp_path / "o" / "fold_1")
    with open(tmp_path / "o" / "splits.csv", newline="") as f:
        train_ids = {r["slide_id"] for r in csv.DictReader(f) if r["fold"] == "1" and r["part"] == "train"}
    train_values = np.array([b.value for b in bags if b.slide_id in train_ids])
    assert head.meta["target_mean"] == pytest.approx(train_values.mean())
    assert head.meta["target_sd"] == pytest.approx(train_values.std())
    with open(tmp_path / "o" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["slide_id", "patient_id", "label", "fold", "prediction"]


@pytest.mark.parametrize("prompts", [("tvp",), ("ttp",), ("ivp",), ("tvp", "ttp", "ivp")])
def test_pathotune_survival_heads_with_every_prompt_kind(tmp_path, prompts):
    make_outcome_cohort(tmp_path / "f", n_slides=24, n_tiles=(8, 12), seed=1, labels_path=tmp_path / "labels.csv")
    summary = train(features_dir=tmp_path / "f", labels=tmp_path / "labels.csv", out_dir=tmp_path / "o",
                    task=SURVIVAL, head="pathotune", prompts=prompts,
                    config=TrainConfig(folds=2, epochs=2, min_epochs=0, n_boot=20), progress=False)
    assert summary["pooled"]["n"] == 24 and summary["pooled"]["c_index"] is not None
    head = load_head(tmp_path / "o" / "fold_0")
    assert head.config.n_classes == 1
    if "ttp" in prompts:
        assert head.config.n_ttp == 3 and tuple(head.model.ttp_text.shape) == (3, 384)  # task, high, low
    results = predict(tmp_path / "o", tmp_path / "f", tmp_path / "p", progress=False)
    assert len(results) == 24 and all(np.isfinite(r.probs).all() and r.probs.shape == (1,) for r in results)


def test_cli_survival_and_its_errors(tmp_path, capsys):
    make_outcome_cohort(tmp_path / "f", n_slides=24, n_tiles=(8, 12), seed=2, labels_path=tmp_path / "labels.csv")
    task = tmp_path / "task.yaml"
    task.write_text("name: os\ntype: survival\ndescription: predict survival\nauc_times: [0.1, 0.5]\n")
    args = ["train", "--features", str(tmp_path / "f"), "--labels", str(tmp_path / "labels.csv"), "--folds", "2",
            "--epochs", "2", "--min-epochs", "0", "--bootstrap", "20", "--quiet"]
    assert main([*args, "--task", str(task), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("c_index\t") and "uno_c\t" in printed and "logrank_p\t" in printed
    assert "auc@0.1\t" in printed and "auc@0.5\t" in printed
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert [row["time"] for row in metrics["pooled"]["time_auc"]] == [0.1, 0.5]
    # Without the task file the table is read as classification, which has no label column.
    assert main([*args, "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "no 'label' column" in err and "type: survival" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,time,event\nslide_000,3,1\nslide_001,4,maybe\n")
    assert main([*args, "--task", str(task), "--labels", str(bad), "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 3: slide slide_001: event 'maybe' is not a number" in err
    assert main([*args, "--task", str(task), "--balance", "sampling", "--out", str(tmp_path / "o4")]) == 2
    assert "--balance sampling balances classes" in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_outcome_bags(tmp_path_factory):
    """12 small regression bags: features for labels tables written per test."""
    root = tmp_path_factory.mktemp("outcome_labels")
    bags = make_outcome_cohort(root / "f", n_slides=12, n_tiles=(5, 8), task_type="regression", seed=0)
    return root / "f", [b.slide_id for b in bags]


@pytest.mark.parametrize(
    ("task", "columns", "values", "says"),
    [
        (SURVIVAL, "time,event", ["5,0"] * 12, r"0 event\(s\) among the 12 usable slides; a survival head needs at least two$"),
        (SURVIVAL, "time,event", ["5,1"] + ["5,0"] * 11, r"1 event\(s\) among the 12 usable slides"),
        (REGRESSION, "label", ["3"] * 12, "the label is 3 on all 12 usable slides; nothing to regress$"),
        (REGRESSION, "label", ["5"] + ["3"] * 11,
         r"the training slides of fold \d all have the label 3; nothing to regress: the other values are on too few "
         r"slides to be in every fold's training part; label more slides with other values or use fewer folds "
         r"\(--folds\)"),
    ],
)
def test_unlearnable_outcomes_are_one_line_naming_the_labels_table(small_outcome_bags, tmp_path, task, columns,
                                                                  values, says):
    features, slides = small_outcome_bags
    labels = tmp_path / "labels.csv"
    labels.write_text(f"slide_id,{columns}\n" + "".join(f"{s},{v}\n" for s, v in zip(slides, values)))
    with pytest.raises(DataError, match=f"^labels table {re.escape(str(labels))}: {says}"):
        train(features_dir=features, labels=labels, out_dir=tmp_path / "o", task=task, head="abmil",
              config=TrainConfig(folds=3, epochs=1, n_boot=0), progress=False)


def test_survival_times_all_equal_are_warned_of_naming_the_labels_table(small_outcome_bags, tmp_path, caplog):
    from wsitools.mil.data import build_cohort

    features, slides = small_outcome_bags
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,time,event\n" + "".join(f"{s},0,{i % 2}\n" for i, s in enumerate(slides)))
    build_cohort(read_labels(labels, task_type="survival"), features, (), task_type="survival", labels_file=labels)
    assert (f"labels table {labels}: all 12 usable slides have the time 0: the head learns events against censored "
            "slides alone") in caplog.text
    caplog.clear()
    labels.write_text("slide_id,time,event\n" + "".join(f"{s},{i},{i % 2}\n" for i, s in enumerate(slides)))
    build_cohort(read_labels(labels, task_type="survival"), features, (), task_type="survival", labels_file=labels)
    assert "have the time" not in caplog.text
