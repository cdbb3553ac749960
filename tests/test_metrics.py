"""Metrics against values worked out by hand and against scikit-learn (a test dependency).

The package keeps its own numpy metrics because the bootstrap evaluates them on every resample:
1000 resamples of 80 slides take about 0.3 s here against about 10 s through scikit-learn's
validated functions, per report, and a 5-fold run writes six reports."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsitools import survival
from wsitools.metrics import (
    auroc,
    average_ranks,
    balanced_accuracy,
    binary_auroc,
    bootstrap_ci,
    bootstrap_samples,
    classification_metrics,
    confusion_matrix,
    f1_macro,
    mean_sd,
    metrics_report,
    regression_report,
    roc_points,
)


def test_average_ranks_share_ties():
    np.testing.assert_allclose(average_ranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])


def test_binary_auroc_by_hand():
    # 3 positives x 2 negatives = 6 pairs; positive wins: (0.9 > 0.1, 0.3), (0.4 > 0.1, 0.3), 0.2 > 0.1.
    y = np.array([1, 1, 1, 0, 0], bool)
    s = np.array([0.9, 0.4, 0.2, 0.3, 0.1])
    assert binary_auroc(y, s) == pytest.approx(5 / 6)
    # A tie between a positive and a negative counts one half.
    assert binary_auroc(np.array([1, 0], bool), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert binary_auroc(np.array([1, 1, 0], bool), np.array([0.5, 0.7, 0.5])) == pytest.approx(0.75)
    assert math.isnan(binary_auroc(np.array([1, 1], bool), np.array([0.1, 0.2])))


def test_auroc_binary_and_one_vs_rest_macro():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]])
    assert auroc(y, probs) == pytest.approx(0.75)  # score = P(class 1): 0.35 < 0.4 loses one pair
    y3 = np.array([0, 1, 2, 2])
    p3 = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.5, 0.1, 0.4], [0.1, 0.1, 0.8]])
    # class 0 vs rest: 0.8 beats 0.1, 0.5, 0.1 -> 1; class 1: 0.8 beats all -> 1;
    # class 2 (pos 0.4, 0.8; neg 0.1, 0.1) -> 1. Then break class 2: positive 0.4 below negative 0.5.
    assert auroc(y3, p3) == pytest.approx(1.0)
    p3b = p3.copy()
    p3b[2] = [0.3, 0.2, 0.05]
    # class 0: pos 0.8 vs 0.1, 0.3, 0.1 -> 1; class 1: pos 0.8 -> 1; class 2: pos 0.05, 0.8 vs 0.1, 0.1 -> 2/4.
    assert auroc(y3, p3b) == pytest.approx((1 + 1 + 0.5) / 3)


def test_confusion_balanced_accuracy_f1_by_hand():
    y = np.array([0, 0, 0, 0, 1, 1, 2])
    p = np.array([0, 0, 0, 1, 1, 0, 2])
    cm = confusion_matrix(y, p, 3)
    np.testing.assert_array_equal(cm, [[3, 1, 0], [1, 1, 0], [0, 0, 1]])
    assert balanced_accuracy(y, p, 3) == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    # F1 per class: 2TP/(2TP+FP+FN): c0 6/8, c1 2/4, c2 2/2
    assert f1_macro(y, p, 3) == pytest.approx((6 / 8 + 2 / 4 + 1) / 3)
    # A class absent from truth and predictions does not drag the macro mean down.
    assert f1_macro(y, p, 4) == pytest.approx(f1_macro(y, p, 3))


def test_against_sklearn_on_random_data():
    import sklearn.metrics as sklearn_metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    logits = rng.standard_normal((300, 3)) + np.eye(3)[y] * 1.2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = probs.argmax(1)
    ours = classification_metrics(y, probs)
    assert ours["auroc"] == pytest.approx(sklearn_metrics.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert ours["balanced_accuracy"] == pytest.approx(sklearn_metrics.balanced_accuracy_score(y, pred))
    assert ours["f1"] == pytest.approx(sklearn_metrics.f1_score(y, pred, average="macro"))
    yb = (y == 1).astype(int)
    assert binary_auroc(yb == 1, probs[:, 1]) == pytest.approx(sklearn_metrics.roc_auc_score(yb, probs[:, 1]))
    np.testing.assert_array_equal(confusion_matrix(y, pred, 3), sklearn_metrics.confusion_matrix(y, pred, labels=[0, 1, 2]))
    scores = np.round(probs[:, 1], 1)  # ties: one ROC step per distinct score
    fpr, tpr = roc_points(yb == 1, scores)
    ref_fpr, ref_tpr, _ = sklearn_metrics.roc_curve(yb, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)


def test_bootstrap_interval_brackets_estimate_and_narrows_with_n():
    rng = np.random.default_rng(1)

    def sample(n):
        y = rng.integers(0, 2, n)
        score = np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.3, n), 0, 1)
        return y, np.stack([1 - score, score], 1)

    y_small, p_small = sample(60)
    y_big, p_big = sample(2000)
    small = bootstrap_ci(y_small, p_small, n_boot=300, seed=0)
    big = bootstrap_ci(y_big, p_big, n_boot=300, seed=0)
    point = classification_metrics(y_small, p_small)["auroc"]
    assert small["auroc"][0] <= point <= small["auroc"][1]
    assert big["auroc"][1] - big["auroc"][0] < (small["auroc"][1] - small["auroc"][0]) / 2
    assert bootstrap_ci(y_small, p_small, n_boot=50, seed=3) == bootstrap_ci(y_small, p_small, n_boot=50, seed=3)


def test_report_is_json_ready_and_nulls_undefined():
    y = np.array([0, 0, 0])
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    rep = metrics_report(y, p, class_names=["a", "b"], n_boot=20)
    assert rep["auroc"] is None and rep["auroc_ci95"] == [None, None]
    assert rep["accuracy"] == pytest.approx(2 / 3)
    assert rep["confusion_matrix"]["rows_true_cols_pred"] == [[2, 1], [0, 0]]
    assert rep["support"] == {"a": 3, "b": 0}
    agg = mean_sd([{"auroc": 0.8, "balanced_accuracy": 0.7, "f1": 0.6, "accuracy": 0.7},
                   {"auroc": 1.0, "balanced_accuracy": None, "f1": 0.8, "accuracy": 0.9}])
    assert agg["auroc"]["mean"] == pytest.approx(0.9)
    assert agg["auroc"]["sd"] == pytest.approx(np.std([0.8, 1.0], ddof=1), abs=1e-6)  # rounded to 6 places
    assert agg["balanced_accuracy"] == {"mean": 0.7, "sd": None, "n_folds": 1}


def test_bootstrap_samples_draw_whole_patients():
    groups = ["p1", "p2", "p2", "p3", "p3", "p3", "p1"]
    members = {g: {i for i, h in enumerate(groups) if h == g} for g in set(groups)}
    for idx in bootstrap_samples(len(groups), n_boot=50, seed=0, groups=groups):
        counts = np.bincount(idx, minlength=len(groups))
        # every row of a patient is drawn as often as the patient, and 3 patients are drawn
        per_patient = {g: {int(counts[i]) for i in rows} for g, rows in members.items()}
        assert all(len(c) == 1 for c in per_patient.values())
        assert sum(c.pop() for c in per_patient.values()) == 3
    with pytest.raises(ValueError, match="groups has 2 entries for 3 rows"):
        next(bootstrap_samples(3, n_boot=1, seed=0, groups=["a", "b"]))


def _one_slide_per_patient_cohort():
    rng = np.random.default_rng(42)
    n = 40
    y = rng.integers(0, 2, n)
    p1 = np.clip(0.3 * y + rng.uniform(0, 0.7, n), 0, 1)
    values = rng.normal(size=n)
    predicted = values + rng.normal(scale=0.8, size=n)
    t = rng.exponential(10, n).round(1)
    e = (rng.uniform(size=n) < 0.7).astype(int)
    risk = -t + rng.normal(scale=5, size=n)
    return y, np.stack([1 - p1, p1], 1), values, predicted, t, e, risk


def _reports(groups):
    y, p, values, predicted, t, e, risk = _one_slide_per_patient_cohort()
    return (metrics_report(y, p, class_names=["a", "b"], n_boot=200, seed=1, groups=groups),
            regression_report(values, predicted, n_boot=200, seed=1, groups=groups),
            survival.survival_report(t, e, risk, n_boot=200, seed=1, groups=groups))


def test_one_slide_per_patient_keeps_the_slide_intervals():
    """Patients numbered in any way, one slide each: the very intervals of a slide bootstrap."""
    plain = _reports(None)
    assert _reports([f"patient {i}" for i in range(40)]) == plain
    assert _reports([f"p{(i * 7) % 40:02d}" for i in range(40)]) == plain
    classification, regression, outcome = plain  # the numbers the slide bootstrap has always given
    assert classification["auroc_ci95"] == pytest.approx([0.619812, 0.914074], abs=2e-6)
    assert classification["accuracy_ci95"] == pytest.approx([0.55, 0.825], abs=2e-6)
    assert regression["pearson_ci95"] == pytest.approx([0.55169, 0.827251], abs=2e-6)
    assert regression["mae_ci95"] == pytest.approx([0.461273, 0.67897], abs=2e-6)
    assert outcome["c_index_ci95"] == pytest.approx([0.564017, 0.8091], abs=2e-6)
    assert outcome["uno_c_ci95"] == pytest.approx([0.574018, 0.815602], abs=2e-6)
    assert [v for row in outcome["time_auc"] for v in row["auc_ci95"]] == pytest.approx(
        [0.527354, 0.915034, 0.51655, 0.835916, 0.645327, 0.983827], abs=2e-6)


def test_patient_bootstrap_of_repeated_slides_is_that_of_the_patients():
    """Each patient's slide copied four times: resampling patients gives the intervals of the
    patients alone (slides resampled one by one would give narrower ones)."""
    y, p, values, predicted, t, e, risk = _one_slide_per_patient_cohort()
    copies = np.repeat(np.arange(40), 4)
    patients = [f"p{i}" for i in copies]

    def ci95(report):
        return {k: v for k, v in report.items() if k.endswith("_ci95")}

    alone, _, _ = _reports(None)
    repeated = metrics_report(y[copies], p[copies], class_names=["a", "b"], n_boot=200, seed=1, groups=patients)
    assert ci95(repeated) == pytest.approx(ci95(alone), abs=2e-6)
    by_slide = metrics_report(y[copies], p[copies], class_names=["a", "b"], n_boot=200, seed=1)
    width = {k: r["auroc_ci95"][1] - r["auroc_ci95"][0] for k, r in (("patients", repeated), ("slides", by_slide))}
    assert width["slides"] < 0.6 * width["patients"]

    _, alone_reg, alone_surv = _reports(None)
    repeated_reg = regression_report(values[copies], predicted[copies], n_boot=200, seed=1, groups=patients)
    assert ci95(repeated_reg) == pytest.approx(ci95(alone_reg), abs=2e-6)
    repeated_surv = survival.survival_report(t[copies], e[copies], risk[copies], times=survival.auc_times(t, e),
                                             n_boot=200, seed=1, groups=patients)
    assert ci95(repeated_surv) == pytest.approx(ci95(alone_surv), abs=2e-6)

    def auc_bounds(report):
        return [v for row in report["time_auc"] for v in row["auc_ci95"]]

    assert auc_bounds(repeated_surv) == pytest.approx(auc_bounds(alone_surv), abs=2e-6)
