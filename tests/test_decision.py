"""Decisions fitted on a selection set: the threshold for each objective, that test labels never move it,
and split-conformal coverage on a task whose true probabilities are known."""

import dataclasses

import numpy as np
import pytest

from pipeline.config import Evaluate
from pipeline.evaluation import decision
from pipeline.evaluation.decision import (
    Decision,
    choose_threshold,
    conformal_quantile,
    decide,
    prediction_sets,
)
from pipeline.evaluation.scoring import split_metrics


def scored(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary probabilities (N, 2) and labels drawn from them: a calibrated model of a noisy task."""
    rng = np.random.default_rng(seed)
    p = rng.beta(2, 2, n)
    return np.stack([1 - p, p], 1), (rng.random(n) < p).astype(int)


def test_each_objective_gets_its_best_cut():
    probs, labels = scored(300, 0)
    scores, positives = probs[:, 1], labels == 1
    cuts = decision.candidate_thresholds(scores)
    sens, spec, f1 = decision.rates(scores, positives, cuts)
    t = choose_threshold(scores, positives, "youden")
    s, c, _ = decision.rates(scores, positives, np.array([t]))
    assert s[0] + c[0] == pytest.approx((sens + spec).max())
    assert choose_threshold(scores, positives, "balanced_accuracy") == t  # (1 + J) / 2: the same cut
    assert decision.rates(scores, positives, np.array([choose_threshold(scores, positives, "f1")]))[2][
        0
    ] == pytest.approx(f1.max())
    high = choose_threshold(scores, positives, "sensitivity:0.95")
    s, c, _ = decision.rates(scores, positives, np.array([high]))
    assert s[0] >= 0.95 and c[0] == pytest.approx(spec[sens >= 0.95].max())
    low = choose_threshold(scores, positives, "specificity:0.9")
    s, c, _ = decision.rates(scores, positives, np.array([low]))
    assert c[0] >= 0.9 and s[0] == pytest.approx(sens[spec >= 0.9].max())
    assert choose_threshold(scores, positives, 0.3) == 0.3
    with pytest.raises(decision.DecisionError, match="both classes"):
        choose_threshold(scores, np.ones(len(scores), bool), "youden")


def test_the_decision_never_sees_test_labels():
    settings = Evaluate(threshold="sensitivity:0.9", conformal_alpha=0.2, bootstrap=50)
    selection, (test_probs, test_labels) = scored(200, 1), scored(150, 2)
    made, metrics = decide(selection, (test_probs, test_labels), ("neg", "pos"), 1, settings, seed=0)
    shuffled = np.random.default_rng(3).permutation(test_labels)
    again, other = decide(selection, (test_probs, shuffled), ("neg", "pos"), 1, settings, seed=0)
    # What is decided (cut, quantile) ignores the test labels; only the recorded test coverage (what predict
    # warns on) is measured with them.
    measured = ("test_coverage", "test_coverage_ci_low", "test_coverage_ci_high")
    assert dataclasses.replace(again, **dict.fromkeys(measured)) == dataclasses.replace(
        made, **dict.fromkeys(measured)
    )
    assert made.threshold is not None and made.conformal_quantile is not None
    assert other["decision/threshold"] == metrics["decision/threshold"]
    assert (
        other["test_threshold/accuracy"] != metrics["test_threshold/accuracy"]
    )  # the labels did matter there
    low, high = metrics["test_threshold/sensitivity_ci_low"], metrics["test_threshold/sensitivity_ci_high"]
    assert low <= metrics["test_threshold/sensitivity"] <= high


def test_conformal_coverage_matches_theory_on_known_probabilities():
    # Labels drawn from known class probabilities; over many calibration/test draws the mean coverage of
    # split conformal lies in [1 - alpha, 1 - alpha + 1 / (n + 1)] (Vovk; Angelopoulos & Bates, 2021).
    rng = np.random.default_rng(0)
    alpha, n_cal, n_test, k = 0.1, 300, 1000, 4
    coverage, size = [], []
    for _ in range(40):
        probs = rng.dirichlet(np.ones(k) * 0.7, n_cal + n_test)
        labels = (rng.random(len(probs))[:, None] > probs.cumsum(1)).sum(1)
        q = conformal_quantile(probs[:n_cal], labels[:n_cal], alpha)
        sets = prediction_sets(probs[n_cal:], q)
        coverage.append(sets[np.arange(n_test), labels[n_cal:]].mean())
        size.append(sets.sum(1).mean())
    assert 1 - alpha - 0.006 <= np.mean(coverage) <= 1 - alpha + 1 / (n_cal + 1) + 0.006
    assert 1 < np.mean(size) < k  # informative: smaller than all classes
    assert conformal_quantile(probs[:5], labels[:5], 0.1) == 1.0  # 5 images cannot give 90%: every class


def test_decision_file_round_trips_and_applies_the_cut_and_the_sets(tmp_path):
    made = Decision(
        model_sha256="a1" * 32,
        classes=("neg", "pos"),
        selection="val",
        positive_class="pos",
        threshold_rule="youden",
        threshold=0.3,
        conformal_alpha=0.1,
        conformal_quantile=0.75,
    )
    made.write(tmp_path / "decision.json")
    read = Decision.read(tmp_path / "decision.json")
    assert read == made
    probs = np.array([[0.75, 0.25], [0.65, 0.35], [0.1, 0.9]])
    assert read.predicted(probs).tolist() == [0, 1, 1]
    assert read.sets(probs) == ["neg|pos", "neg|pos", "pos"]
    assert Decision(model_sha256="r", classes=("a", "b", "c"), selection="val").sets(probs) is None


def test_a_cut_on_a_multiclass_task_is_refused_and_the_report_shows_both_cuts():
    with pytest.raises(decision.DecisionError, match=r"evaluate.threshold"):
        decision.check(Evaluate(threshold="f1"), 3)
    decision.check(Evaluate(), 3)  # the default 0.5 is argmax: fine for any task
    settings = Evaluate(threshold="youden", conformal_alpha=0.1, bootstrap=20)
    test = scored(80, 5)
    made, metrics = decide(scored(100, 4), test, ("neg", "pos"), 1, settings, seed=0)
    metrics |= split_metrics(*test, ("neg", "pos"), "test", settings, 0, positive=1)  # evaluate's, at 0.5
    text = "\n\n".join(body for _, body in decision.report_sections(metrics, made))
    assert f"| metric | at 0.5 | 95% CI | at {made.threshold:.3f} | 95% CI |" in text
    row = next(line for line in text.splitlines() if line.startswith("| sensitivity |"))
    assert "—" not in row  # both cuts' values and intervals
    assert "coverage (truth in the set)" in text and "mean set size" in text


def test_evaluate_fits_the_decisions_on_val_and_scores_them_on_test():
    import torch

    from pipeline.evaluation.evaluate import evaluate
    from pipeline.training.model import Classifier

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = Classifier(num_classes=2)
    images = rng.integers(0, 255, (40, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(40) % 2
    settings = Evaluate(
        threshold="specificity:0.5", conformal_alpha=0.2, bootstrap=20, temperature_scaling=False
    )
    out = evaluate(
        model,
        images[:20],
        labels[:20],
        ("neg", "pos"),
        settings,
        0,
        val=(images[20:], labels[20:]),
        model_sha256="r9",
    )
    val_probs, val_labels = out.selection
    assert out.decision.model_sha256 == "r9" and out.decision.positive_class == "pos"
    assert out.decision.threshold == choose_threshold(val_probs[:, 1], val_labels == 1, "specificity:0.5")
    assert out.decision.conformal_quantile == conformal_quantile(val_probs, val_labels, 0.2)
    assert {"decision/threshold", "decision_val/specificity", "conformal/coverage"} <= set(out.metrics)
    assert out.metrics["decision_val/specificity"] >= 0.5


def test_the_report_counts_misses_and_false_alarms_beside_the_prevalence_and_never_calls_05_chosen():
    # 4 positives (one scored 0.3: a miss at 0.5) and 4 negatives (one scored 0.7: a false alarm): balanced.
    test = (
        np.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.7, 0.3]] * 2),
        np.array([1, 1, 1, 1, 0, 0, 0, 0]),
    )
    test[0][4:] = [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]
    made, metrics = decide(scored(100, 4), test, ("normal", "tumor"), 1, Evaluate(bootstrap=0), seed=0)
    assert (metrics["operating/misses"], metrics["operating/false_alarms"]) == (1, 1)
    assert metrics["operating/prevalence"] == 0.5 and metrics["operating/ppv"] == 0.75
    text = "\n\n".join(body for _, body in decision.report_sections(metrics, made))
    assert "chosen" not in text and "a fixed cut 0.5000" in text and "set, not fitted" in text
    assert "**1 of the 4 `tumor` images are missed** (false negatives)" in text
    assert "**1 of the 4 `normal` images are false alarms** (false positives)" in text
    assert "PPV (positive calls that are right) 0.750, NPV 0.750: both at the test prevalence 50.0%" in text
    assert "balanced by construction" in text
    rare = (test[0][[0, 4, 5, 6, 7]], test[1][[0, 4, 5, 6, 7]])  # 1 positive of 5: prevalence 20%
    made, metrics = decide(scored(100, 4), rare, ("normal", "tumor"), 1, Evaluate(bootstrap=0), seed=0)
    text = "\n\n".join(body for _, body in decision.report_sections(metrics, made))
    assert "prevalence of `tumor` 20.0%" in text and "balanced by construction" not in text
    youden, metrics = decide(
        scored(100, 4), test, ("normal", "tumor"), 1, Evaluate(threshold="youden"), seed=0
    )
    text = "\n\n".join(body for _, body in decision.report_sections(metrics, youden))
    assert f"cut {youden.threshold:.4f} on its probability (`evaluate.threshold: youden`), chosen on" in text


def test_the_headline_names_both_the_05_metrics_and_the_cut_predict_applies():
    from pipeline.evaluation.reporting import split_headline

    settings = Evaluate(threshold="sensitivity:0.9", bootstrap=0)
    test = scored(80, 5)
    made, metrics = decide(scored(100, 4), test, ("neg", "pos"), 1, settings, seed=0)
    metrics |= split_metrics(*test, ("neg", "pos"), "test", settings, 0, positive=1)
    headline, _ = split_headline(metrics)
    assert headline["decision/threshold"] == pytest.approx(made.threshold, abs=1e-6)
    assert {"test/sensitivity", "test_threshold/sensitivity", "test_threshold/specificity"} <= set(headline)
    assert headline["test_threshold/sensitivity"] != headline["test/sensitivity"]
    assert {"operating/misses", "operating/false_alarms"} <= set(headline)
    from pipeline.evaluation.reporting import report
    from tests.conftest import run_info

    data = {
        "source": "data/raw/x",
        "classes": ["neg", "pos"],
        "n_images": 80,
        "image_size": 32,
        "rejected": [],
        "counts": {s: {"neg": 40, "pos": 40} for s in ("train", "val", "test")},
        "split_by": "stratified",
        "duplicates": {},
        "leakage": [],
        "warnings": [],
    }
    text = report(metrics, data, run_info(classes=("neg", "pos")), [], settings=settings)
    tested = text.split("## Test metrics")[1].split("\n## ")[0]
    assert f"at 0.5; predict applies the cut {made.threshold:.4f}**" in tested
