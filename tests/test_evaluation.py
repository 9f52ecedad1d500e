import dataclasses
import time

import numpy as np
import pytest
import torch
from torchmetrics.functional import classification as tmf

from pipeline.config import Evaluate
from pipeline.evaluation import calibration, metrics, reporting
from pipeline.evaluation import evaluate as evaluation
from pipeline.runinfo import WeightsInfo
from tests.conftest import run_info

CLASSES = ("a", "b", "c")
# 6 images: true labels and predicted probabilities chosen so every metric is easy to work out by hand.
LABELS = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array(
    [
        [0.8, 0.1, 0.1],  # a -> a
        [0.2, 0.7, 0.1],  # a -> b (wrong)
        [0.1, 0.8, 0.1],  # b -> b
        [0.1, 0.6, 0.3],  # b -> b
        [0.1, 0.1, 0.8],  # c -> c
        [0.3, 0.2, 0.5],  # c -> c
    ]
)


def auc(scores, positive):
    """The share of (positive, negative) pairs ranked right, ties half."""
    pos, neg = scores[positive], scores[~positive]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def synthetic(n, k=3, seed=0, signal=1.2):
    """Probabilities of a moderately good classifier on ``n`` images of ``k`` classes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += signal
    return calibration.softmax(logits), labels


def test_metrics_match_hand_computed_values():
    m = metrics.compute_metrics(PROBS, LABELS, CLASSES, ece_bins=4)
    assert m["test/accuracy"] == pytest.approx(5 / 6)
    # recalls a=1/2, b=1, c=1 -> balanced accuracy 5/6; precisions a=1, b=2/3, c=1
    assert m["test/balanced_accuracy"] == pytest.approx(5 / 6)
    assert m["test/recall/a"] == pytest.approx(0.5) and m["test/precision/b"] == pytest.approx(2 / 3)
    f1 = [2 * 1 * 0.5 / 1.5, 2 * (2 / 3) / (5 / 3), 1.0]
    assert m["test/f1/a"] == pytest.approx(f1[0], abs=1e-5)
    assert m["test/macro_f1"] == pytest.approx(np.mean(f1), abs=1e-5)
    assert m["test/support/c"] == 2
    expected = [auc(PROBS[:, k], k == LABELS) for k in range(3)]
    assert m["test/auroc"] == pytest.approx(np.mean(expected), abs=1e-5)
    assert m["test/auroc/b"] == pytest.approx(expected[1], abs=1e-5)
    # Brier, per image sum over classes of (p - onehot)^2: .06, 1.14, .06, .26, .06, .38 -> mean 1.96 / 6
    assert m["test/brier"] == pytest.approx(1.96 / 6, abs=1e-5)
    # ECE, 4 bins of width .25: [.75, 1] holds images 1, 3, 5 (confidence .8, all right): |.8 - 1| x 3/6;
    # [.5, .75) holds 2, 4, 6 (.7 wrong, .6 and .5 right): |.6 - 2/3| x 3/6 -> 0.1 + 1/30
    assert m["test/ece"] == pytest.approx(0.1 + 1 / 30, abs=1e-5)
    assert m["test/nll"] == pytest.approx(-np.mean(np.log([0.8, 0.2, 0.8, 0.6, 0.8, 0.5])), abs=1e-5)
    assert "test/sensitivity" not in m  # three classes


def test_point_metrics_equal_torchmetrics_on_a_larger_set():
    probs, labels = synthetic(300, k=4)
    m = metrics.compute_metrics(probs, labels, "abcd", ece_bins=15)
    p, y = torch.tensor(probs), torch.tensor(labels)
    assert m["test/accuracy"] == pytest.approx(
        float(tmf.multiclass_accuracy(p, y, 4, average="micro")), abs=1e-6
    )
    assert m["test/balanced_accuracy"] == pytest.approx(
        float(tmf.multiclass_accuracy(p, y, 4, average="macro")), abs=1e-6
    )
    assert m["test/macro_f1"] == pytest.approx(
        float(tmf.multiclass_f1_score(p, y, 4, average="macro")), abs=1e-6
    )
    assert m["test/auroc"] == pytest.approx(float(tmf.multiclass_auroc(p, y, 4, average="macro")), abs=1e-6)
    assert m["test/ece"] == pytest.approx(
        float(tmf.multiclass_calibration_error(p, y, 4, n_bins=15)), abs=1e-6
    )
    per_class_f1 = tmf.multiclass_f1_score(p, y, 4, average=None)
    assert [m[f"test/f1/{c}"] for c in "abcd"] == pytest.approx(per_class_f1.tolist(), abs=1e-6)


def test_binary_sensitivity_and_specificity():
    # 'yes' is positive (the second class in sorted order): 3 positives, 2 caught; 4 negatives, 3 right
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    p_yes = np.array([0.1, 0.3, 0.6, 0.2, 0.9, 0.7, 0.4])
    probs = np.stack([1 - p_yes, p_yes], axis=1)
    positive = evaluation.positive_index(("no", "yes"), None)
    m = metrics.compute_metrics(probs, labels, ("no", "yes"), positive=positive)
    assert positive == 1
    assert m["test/sensitivity"] == pytest.approx(2 / 3) and m["test/specificity"] == pytest.approx(3 / 4)
    assert m["test/auroc"] == pytest.approx(11 / 12)  # 11 of the 12 (positive, negative) pairs ordered right
    flipped = metrics.compute_metrics(
        probs, labels, ("no", "yes"), positive=evaluation.positive_index(("no", "yes"), "no")
    )
    assert flipped["test/sensitivity"] == pytest.approx(3 / 4) and flipped[
        "test/specificity"
    ] == pytest.approx(2 / 3)


def test_positive_class_errors_name_the_key():
    with pytest.raises(
        evaluation.EvaluationError, match=r"evaluate.positive_class: 'maybe' is not a class.*no, yes"
    ):
        evaluation.positive_index(("no", "yes"), "maybe")
    with pytest.raises(evaluation.EvaluationError, match=r"evaluate.positive_class.*3 classes"):
        evaluation.positive_index(CLASSES, "a")
    assert evaluation.positive_index(CLASSES, None) is None


def test_macro_averages_run_over_the_classes_present():
    # class c never occurs in the labels (torchmetrics would count it as 0 in the macro averages)
    labels = np.array([0, 0, 1, 1])
    m = metrics.compute_metrics(PROBS[:4], labels, CLASSES)
    assert m["test/balanced_accuracy"] == pytest.approx((0.5 + 1) / 2)
    assert m["test/auroc"] == pytest.approx(np.mean([auc(PROBS[:4, k], labels == k) for k in range(2)]))
    assert "test/recall/c" not in m and "test/auroc/c" not in m and m["test/support/c"] == 0


# --- bootstrap ---------------------------------------------------------------------------------------


def test_resample_weights_count_draws_with_replacement():
    w = metrics.resample_weights(7, 500, np.random.default_rng(0))
    assert w.shape == (500, 7) and (w.sum(1) == 7).all()
    assert w.mean() == pytest.approx(1, abs=0.05) and (w == 0).any()  # some images left out, some repeated


def test_unit_weights_give_the_point_estimates():
    probs, labels = synthetic(80)
    point = metrics.compute_metrics(probs, labels, CLASSES)
    rows = metrics.weighted_metrics(probs, labels, np.ones((2, 80)))
    for name, values in rows.items():
        assert values == pytest.approx([point[f"test/{name}"]] * 2, abs=1e-6), name


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_images():
    widths = {}
    for n in (60, 600):
        probs, labels = synthetic(n)
        point = metrics.compute_metrics(probs, labels, CLASSES)
        intervals, skipped = metrics.bootstrap(probs, labels, 1000, seed=0)
        assert skipped == 0 and set(intervals) == {
            "accuracy",
            "balanced_accuracy",
            "macro_f1",
            "auroc",
            "ece",
            "brier",
            "nll",
        }
        for name, (low, high) in intervals.items():
            assert low <= point[f"test/{name}"] <= high, (n, name)
        widths[n] = {name: high - low for name, (low, high) in intervals.items()}
    assert all(widths[600][name] < widths[60][name] / 2 for name in widths[60])  # ~ 1/sqrt(n)
    again, _ = metrics.bootstrap(*synthetic(600), 1000, seed=0)
    assert again == intervals  # seeded


def test_bootstrap_skips_resamples_that_lack_a_class():
    probs, labels = synthetic(40)
    labels[labels == 2] = 0
    labels[0] = 2  # one image of class c: about 1 resample in e (37%) leaves it out
    intervals, skipped = metrics.bootstrap(probs, labels, 1000, seed=0)
    assert 300 < skipped < 450
    assert "auroc" in intervals and "accuracy" in intervals


def test_bootstrap_is_fast():
    probs, labels = synthetic(500, k=4)
    start = time.perf_counter()
    metrics.bootstrap(probs, labels, 1000, seed=0)
    assert time.perf_counter() - start < 2.0  # about 0.3 s on the 2-core development machine


def test_split_metrics_store_intervals_beside_each_metric():
    probs, labels = synthetic(60)
    settings = Evaluate(bootstrap=200)
    m = evaluation.split_metrics(probs, labels, CLASSES, "test", settings, seed=1)
    for name in (*evaluation.HEADLINE, *evaluation.CALIBRATION):
        assert m[f"test/{name}_ci_low"] <= m[f"test/{name}"] <= m[f"test/{name}_ci_high"]
    assert m["test/bootstrap_skipped"] == 0 and "test/f1/a_ci_low" not in m
    off = evaluation.split_metrics(probs, labels, CLASSES, "test", Evaluate(bootstrap=0), seed=1)
    assert not any(k.endswith(("_ci_low", "_ci_high")) for k in off) and "test/bootstrap_skipped" not in off


# --- calibration --------------------------------------------------------------------------------------


def over_confident(n=3000, temperature=3.0, seed=0):
    """Labels drawn from softmax(z), so z is calibrated; the 'model' reports z x temperature."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4)) * 1.5
    labels = np.array([rng.choice(4, p=p) for p in calibration.softmax(z)])
    return z * temperature, labels


def test_temperature_scaling_recovers_a_known_temperature_and_lowers_nll():
    logits, labels = over_confident(temperature=3.0)
    t = calibration.fit_temperature(logits, labels)
    assert t == pytest.approx(3.0, rel=0.1)
    assert calibration.nll(logits, labels, t) < calibration.nll(logits, labels) - 0.1
    before = metrics.compute_metrics(calibration.softmax(logits), labels, "abcd")
    after = metrics.compute_metrics(calibration.softmax(logits, t), labels, "abcd")
    assert after["test/ece"] < before["test/ece"] / 2 and after["test/brier"] < before["test/brier"]
    assert after["test/accuracy"] == before["test/accuracy"]  # confidences change, predicted classes do not
    under, labels = over_confident(temperature=0.5, seed=1)
    assert calibration.fit_temperature(under, labels) == pytest.approx(0.5, rel=0.1)


def test_temperature_stays_1_when_validation_is_all_right():
    logits = np.array([[3.0, 0.0], [0.0, 2.0], [4.0, 1.0]])
    assert calibration.fit_temperature(logits, np.array([0, 1, 0])) == 1.0  # NLL has no minimum: T -> 0
    assert calibration.fit_temperature(logits, np.array([0, 1, 1])) > 1.0  # one wrong: a finite, softer T
    m = {"calibration/temperature": 1.0, "calibration/val_accuracy": 1.0}
    assert any("nothing to fit" in w for w in reporting.warnings(m, DATA, PRETRAINED, Evaluate()))


def test_reliability_table_uses_the_ece_bins():
    table = calibration.reliability_table(PROBS, LABELS, 4)
    assert table["bin"].tolist() == [2, 3] and table["count"].tolist() == [3, 3]
    assert table["confidence"].tolist() == pytest.approx([0.6, 0.8]) and table[
        "accuracy"
    ].tolist() == pytest.approx([2 / 3, 1])
    ece = (table["count"] / 6 * (table["accuracy"] - table["confidence"]).abs()).sum()
    assert ece == pytest.approx(
        metrics.compute_metrics(PROBS, LABELS, CLASSES, ece_bins=4)["test/ece"], abs=1e-5
    )


# --- plots and report ---------------------------------------------------------------------------------


def test_confusion_table_and_plot(tmp_path):
    table = evaluation.confusion_table(PROBS, LABELS, CLASSES)
    assert list(table.itertuples(index=False, name=None))[1] == ("a", "b")
    evaluation.plot_confusion(table, CLASSES, tmp_path / "cm.png")
    assert (tmp_path / "cm.png").stat().st_size > 1000


def test_curve_tables_are_the_one_vs_rest_curves():
    from pipeline.evaluation import plots

    tables = plots.curve_tables(PROBS, LABELS, CLASSES)
    roc = tables["roc"]["a"]
    assert (roc["fpr"].iloc[0], roc["tpr"].iloc[0], roc["fpr"].iloc[-1], roc["tpr"].iloc[-1]) == (0, 0, 1, 1)
    area = (np.diff(roc["fpr"]) * (roc["tpr"].to_numpy()[1:] + roc["tpr"].to_numpy()[:-1]) / 2).sum()
    assert area == pytest.approx(auc(PROBS[:, 0], LABELS == 0))
    pr = tables["precision_recall"]["c"]
    assert pr["recall"].max() == 1 and pr["precision"].iloc[-1] == 1 and np.isnan(pr["threshold"].iloc[-1])
    assert plots.file_stems(["a b", "a/b", "x"]) == ["0_a_b", "1_a_b", "2_x"]


DATA = {
    "source": "data/raw/x",
    "classes": list(CLASSES),
    "n_images": 6,
    "image_size": 32,
    "rejected": [],
    "counts": {s: {c: 2 for c in CLASSES} for s in ("train", "val", "test")},
    "split_by": "stratified",
    "duplicates": {"n_exact_sets": 1, "n_near_sets": 0},
    "leakage": [],
    "warnings": [],
}
RANDOM_INIT = run_info(
    weights=WeightsInfo(
        requested="imagenet",
        source="random-init",
        pretrained=False,
        fallback_reason="download failed: offline",
    )
)
PRETRAINED = run_info(
    monitor="val/loss",
    best_score=0.5,
    epochs_run=3,
    weights=WeightsInfo(requested="imagenet", source="url", pretrained=True),
)


def test_report_warns_about_random_init_tiny_classes_and_wide_intervals():
    m = evaluation.split_metrics(PROBS, LABELS, CLASSES, "test", Evaluate(bootstrap=200), seed=0)
    text = evaluation.report(m, DATA, RANDOM_INIT, ["plots/cm.png"])
    warnings = text.split("## Warnings")[1].split("##")[0]
    assert "Random initialization" in warnings and "download failed: offline" in warnings
    assert "Fewer than 10 test images" in warnings and "Leakage" not in warnings
    assert "**Wide intervals** — the test set (6 images) is too small" in warnings and "accuracy " in warnings
    assert "![cm](plots/cm.png)" in text
    low, high = m["test/accuracy_ci_low"], m["test/accuracy_ci_high"]
    assert f"| accuracy | 0.8333 | {low:.3f} – {high:.3f} |" in text


def test_report_warns_about_leakage_and_ingest_findings():
    data = DATA | {
        "leakage": [["x/a1.png", "x/a1_copy.png"]],
        "warnings": ["class 'a' has only 4 images"],
        "counts": {s: {c: 20 for c in CLASSES} for s in ("train", "val", "test")},
    }
    m = metrics.compute_metrics(PROBS, LABELS, CLASSES)  # no intervals: no width warning
    text = evaluation.report(m, data, PRETRAINED, [], settings=Evaluate(bootstrap=0), hparams={"lr": 0.001})
    warnings = text.split("## Warnings")[1].split("##")[0]
    assert "**Leakage** — 1 set(s)" in warnings and "x/a1.png, x/a1_copy.png" in warnings
    assert "Ingest: class 'a' has only 4 images" in warnings
    assert "Random initialization" not in warnings and "Wide intervals" not in warnings
    assert "| train lr | `0.001` |" in text and "| bootstrap | off |" in text
    assert "val/loss 0.5000 after 3 epochs" in text
    assert "| batch mixing | off |" in text and "| weight averaging | off |" in text


def test_report_settings_name_the_regularizers_that_shaped_the_shipped_weights():
    m = metrics.compute_metrics(PROBS, LABELS, CLASSES)
    run = dataclasses.replace(PRETRAINED, checkpoint="last", ema_decay=0.995)
    hparams = {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "mix_prob": 1.0, "cutmix_switch_prob": 0.5}
    text = evaluation.report(m, DATA, run, [], settings=Evaluate(bootstrap=0), hparams=hparams)
    assert (
        "| batch mixing | MixUp alpha 0.2, CutMix alpha 1 (every batch mixed, CutMix in 50% of those) |"
        in text
    )
    assert "| weight averaging | EMA, decay 0.995 |" in text and "| last checkpoint |" in text
    only = evaluation.report(
        m, DATA, run, [], settings=Evaluate(bootstrap=0), hparams={"cutmix_alpha": 1.0, "mix_prob": 0.5}
    )
    assert "| batch mixing | CutMix alpha 1 (50% of the batches mixed) |" in only
    probe = dataclasses.replace(run, mode="linear_probe", ema_decay=None)
    frozen = evaluation.report(m, DATA, probe, [], settings=Evaluate(bootstrap=0), hparams=hparams)
    assert (
        "| batch mixing | off (train.mode linear_probe) |" in frozen
        and "| weight averaging | off |" in frozen
    )


def test_report_shows_tta_and_calibration_columns_and_extra_sections():
    settings = Evaluate(bootstrap=0)
    m = metrics.compute_metrics(PROBS, LABELS, CLASSES) | metrics.compute_metrics(
        np.eye(3)[LABELS], LABELS, CLASSES, evaluation.TTA_SPLIT
    )
    m |= evaluation.split_metrics(
        PROBS**0.5 / (PROBS**0.5).sum(1, keepdims=True),
        LABELS,
        CLASSES,
        evaluation.CALIBRATED_SPLIT,
        settings,
        0,
        only=evaluation.CALIBRATION,
    )
    m |= {"calibration/temperature": 2.0, "calibration/val_nll": 0.9, "calibration/val_nll_calibrated": 0.7}
    text = evaluation.report(
        m,
        DATA,
        PRETRAINED,
        [],
        ["HorizontalFlip", "VerticalFlip"],
        settings=settings,
        extra=[("Grad-CAM", "![gradcam](plots/gradcam.png)")],
    )
    assert (
        "| metric | plain | 95% CI | with TTA | 95% CI |" in text
        and "| accuracy | 0.8333 | — | 1.0000 | — |" in text
    )
    assert "HorizontalFlip, VerticalFlip" in text
    assert "| metric | plain | 95% CI | with TTA | 95% CI | temperature-scaled | 95% CI |" in text
    assert "Temperature T = 2.000" in text and "NLL 0.9000 → 0.7000" in text
    assert text.rstrip().endswith("## Grad-CAM\n\n![gradcam](plots/gradcam.png)")
    assert "| accuracy | 0.8333 | — |\n" in evaluation.report(m, DATA, PRETRAINED, [], settings=settings)


# --- predictions and the whole evaluation ----------------------------------------------------------------


@pytest.fixture
def tiny_model():
    """A linear classifier on raw pixels: fast, and position-sensitive, so a flip changes its predictions."""

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 32 * 32, 3)

        def forward(self, x):
            return self.fc(x.flatten(1).float() / 255)

    torch.manual_seed(0)
    return Linear()


def test_tta_averages_the_plain_and_transformed_predictions(tiny_model):
    from pipeline import augment

    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    flip = augment.build_tta(["HorizontalFlip"])
    plain = evaluation.predict_proba(tiny_model, images, batch_size=3)
    flipped = evaluation.predict_proba(tiny_model, np.ascontiguousarray(images[:, :, ::-1]), batch_size=3)
    assert not np.allclose(plain, flipped, atol=1e-4)  # else the check below proves nothing
    np.testing.assert_allclose(
        evaluation.predict_tta(tiny_model, images, 3, flip), (plain + flipped) / 2, atol=1e-6
    )


def test_evaluate_reports_plain_tta_and_calibrated_metrics(tiny_model):
    from pipeline import augment

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    val = rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8), np.array([0, 1, 2] * 3)
    settings = Evaluate(batch_size=4, bootstrap=100, temperature_scaling=False)
    plain = evaluation.evaluate(tiny_model, images, LABELS, CLASSES, settings, seed=0)
    assert plain.calibrated is None and plain.probs.shape == (6, 3)
    assert "test/accuracy_ci_high" in plain.metrics and not any(
        k.startswith(("test_tta/", "calibration/")) for k in plain.metrics
    )
    both = evaluation.evaluate(
        tiny_model,
        images,
        LABELS,
        CLASSES,
        Evaluate(batch_size=4, bootstrap=100),
        seed=0,
        tta=augment.build_tta(["VerticalFlip"]),
        val=val,
    )
    assert {
        k: v for k, v in both.metrics.items() if k.startswith("test/")
    } == plain.metrics  # same seed, same CIs
    assert {f"test_tta/{m}" for m in evaluation.HEADLINE} <= set(both.metrics)
    assert {k.split("/")[1] for k in both.metrics if k.startswith("test_calibrated/")} == {
        "ece",
        "brier",
        "nll",
        "ece_ci_low",
        "ece_ci_high",
        "brier_ci_low",
        "brier_ci_high",
        "nll_ci_low",
        "nll_ci_high",
    }
    t = both.metrics["calibration/temperature"]
    np.testing.assert_allclose(both.calibrated.argmax(1), both.probs.argmax(1))
    assert (
        both.metrics["calibration/val_nll_calibrated"] <= both.metrics["calibration/val_nll"] + 1e-9 and t > 0
    )


def test_report_names_the_positive_class():
    labels = np.array([0, 0, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    classes = ("normal", "pneumonia")
    data = DATA | {
        "classes": list(classes),
        "counts": {s: {c: 20 for c in classes} for s in ("train", "val", "test")},
    }
    m = metrics.compute_metrics(probs, labels, classes, positive=1)
    text = evaluation.report(m, data, PRETRAINED, [], settings=Evaluate(bootstrap=0))
    assert (
        "| sensitivity for pneumonia | 0.6667 |" in text
        and "| specificity (recall of normal) | 0.5000 |" in text
    )
    assert "| positive class | `pneumonia` (evaluate.positive_class is null" in text
    chosen = evaluation.report(
        m, data, PRETRAINED, [], settings=Evaluate(bootstrap=0, positive_class="normal")
    )
    assert "| sensitivity for normal |" in chosen


def test_report_states_temperature_scalings_test_effect_and_warns_when_it_hurts():
    settings = Evaluate(bootstrap=0)
    m = metrics.compute_metrics(PROBS, LABELS, CLASSES)
    m |= {f"test_calibrated/{name}": m[f"test/{name}"] + 0.05 for name in evaluation.CALIBRATION}  # all worse
    m |= {"calibration/temperature": 0.25, "calibration/val_nll": 0.9, "calibration/val_nll_calibrated": 0.7}
    assert m["test_calibrated/ece"] > m["test/ece"]
    text = evaluation.report(m, DATA, PRETRAINED, [], settings=settings)
    warnings = text.split("## Warnings")[1].split("##")[0]
    assert "**Temperature scaling made test calibration worse** (ECE " in warnings
    assert f"ECE {m['test/ece']:.3f} → {m['test_calibrated/ece']:.3f}" in text and "**worse**" in text
    assert "predict, export and the registered MLflow model: the plain softmax" in text
    m |= {
        k.replace("test/", "test_calibrated/"): v for k, v in m.items() if k.startswith("test/")
    }  # no change
    assert "Temperature scaling made" not in evaluation.report(m, DATA, PRETRAINED, [], settings=settings)


def test_the_reliability_diagram_shows_each_bins_image_count(tmp_path):
    from pipeline.evaluation import plots

    table = calibration.reliability_table(PROBS, LABELS, 4)
    fig = plots.plot_reliability({"test": table}, tmp_path / "r.png", {"test": "uncalibrated"})
    shown = [t.get_text() for t in fig.axes[0].texts]
    assert shown == [str(n) for n in table["count"]] and (tmp_path / "r.png").is_file()


def test_the_report_names_the_model_by_its_sha256_and_no_run():
    m = metrics.compute_metrics(PROBS, LABELS, CLASSES)
    text = evaluation.report(m, DATA, PRETRAINED, [], settings=Evaluate(bootstrap=0))
    assert f"`model.sha256` = `{PRETRAINED.model_sha256}`" in text and "run_id" not in text
    other = dataclasses.replace(PRETRAINED, model_sha256="b2" * 32)
    assert evaluation.report(m, DATA, other, [], settings=Evaluate(bootstrap=0)) != text


def test_report_says_which_training_mode_ran():
    m = metrics.compute_metrics(PROBS, LABELS, CLASSES)
    report = lambda run: evaluation.report(m, DATA, run, [], settings=Evaluate(bootstrap=0))  # noqa: E731
    assert "| training mode | `knn` |" in report(dataclasses.replace(PRETRAINED, mode="knn"))
    assert "| training mode | `finetune` |" in report(PRETRAINED)  # train.mode's default


@pytest.mark.parametrize(
    ("classes", "positive"),
    [
        (("malignant", "normal_benign"), "malignant"),  # sorted order would pick normal_benign
        (("abnormal", "normal"), "abnormal"),  # sorted order would pick normal; 'abnormal' is not 'normal'
        (("No_Finding", "effusion"), "effusion"),
        (("benign", "malignant"), "malignant"),
        (("NORMAL", "PNEUMONIA"), "PNEUMONIA"),
        (("cat", "dog"), "dog"),  # neither means healthy: the second in sorted order
    ],
)
def test_a_name_meaning_healthy_is_never_the_default_positive_class(classes, positive):
    assert classes[evaluation.positive_index(classes, None)] == positive
    flipped = classes[::-1]  # the order of the names does not matter
    assert flipped[evaluation.positive_index(flipped, None)] == positive
    other = next(c for c in classes if c != positive)
    assert classes[evaluation.positive_index(classes, other)] == other  # an explicit choice wins


def test_report_says_what_was_not_checked_the_native_size_and_the_provenance():
    data = DATA | {
        "formats": {"mode": {"L": 6}, "bits": {"8": 6}, "size": {"28x28": 6}},
        "excluded": {
            "file": "data/exclude.csv",
            "n": 2,
            "paths": ["data/raw/x/a/1.png", "data/raw/x/b/2.png"],
        },
    }
    m = metrics.compute_metrics(PROBS, LABELS, CLASSES)
    lineage = {"code.commit": "c" * 40, "code.dirty": "true", "data.dataset": "x", "data.version": "f00.dir"}
    text = evaluation.report(m, data, PRETRAINED, [], settings=Evaluate(bootstrap=0), provenance=lineage)
    section = text.split("## Data")[1].split("\n## ")[0]
    assert "leakage across splits: none" not in section  # no group column: nothing was checked per patient
    assert "patient-level separation was **not checked**" in section
    assert "from native sizes 28x28 (6) (**6 of them upscaled**" in section
    grouped = evaluation.report(m, data | {"groups": 3}, PRETRAINED, [], settings=Evaluate(bootstrap=0))
    assert "3 patient (group) IDs, each kept within one split" in grouped
    provenance = text.split("## Provenance")[1].split("\n## ")[0]
    for expected in (
        "`f00.dir`",
        "| code (git commit) | `" + "c" * 40 + "` with uncommitted changes",
        f"| model (sha256 of its checkpoints) | `{PRETRAINED.model_sha256}` |",
        f"its date and MLflow run are in MLflow: the evaluate run tagged `model.sha256` = `{PRETRAINED.model_sha256}`",
        "2 file(s) listed in `data/exclude.csv`",
    ):
        assert expected in provenance
    assert "evaluated on" not in provenance  # no date: the report is the same bytes for the same inputs
    assert "`1.png`" in provenance
    # The checkpoint is named for what it is: the file best.ckpt holds the last epoch under checkpoint: last.
    last = evaluation.report(m, DATA, run_info(checkpoint="last"), [], settings=Evaluate(bootstrap=0))
    assert "last epoch checkpoint `best.ckpt`" not in last
    assert "the weights of its last training epoch (train.checkpoint: last), in the file `best.ckpt`" in last
    unlisted = evaluation.report(m, DATA | {"excluded": {"file": None, "n": 0, "paths": []}}, PRETRAINED, [])
    assert "| files excluded | none (data.exclude is null) |" in unlisted


def test_with_folds_the_random_init_warning_still_opens_the_report():
    m = metrics.compute_metrics(PROBS, LABELS, CLASSES) | {"cv/accuracy": 0.8, "cv/auroc": 0.9}
    folds = dataclasses.replace(RANDOM_INIT, checkpoints=("fold0.ckpt", "fold1.ckpt"))
    text = evaluation.report(m, DATA, folds, [], settings=Evaluate(bootstrap=0))
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Warnings" and "## Cross-validation" in headings
    assert text.split("## Warnings")[1].split("\n## ")[0].strip().startswith("- **Random initialization")


def test_an_under_covering_conformal_set_is_a_warning_in_the_report():
    """A planted non-exchangeable split: the quantile is fitted on easy selection images, test is harder."""
    from pipeline.evaluation.decision import decide

    easy, easy_labels = synthetic(400, k=2, seed=1, signal=4.0)
    hard, hard_labels = synthetic(400, k=2, seed=2, signal=0.3)
    settings = Evaluate(conformal_alpha=0.1, bootstrap=200)
    made, m = decide((easy, easy_labels), (hard, hard_labels), ("a", "b"), 1, settings, seed=0)
    assert m["conformal/coverage_ci_high"] < 0.9  # measured below its 90% target
    data = DATA | {
        "classes": ["a", "b"],
        "counts": {s: {"a": 200, "b": 200} for s in ("train", "val", "test")},
    }
    m |= metrics.compute_metrics(hard, hard_labels, ("a", "b"), positive=1)
    text = evaluation.report(m, data, PRETRAINED, [], settings=settings)
    warnings = text.split("## Warnings")[1].split("\n## ")[0]
    assert "**Conformal sets miss their level**" in warnings and "below the target 90%" in warnings
    assert "not exchangeable with test" in warnings
    assert "not exchangeable" in made.coverage_warning()  # what predict says (tests/test_serve.py)
    fine, _ = decide((hard, hard_labels), (hard, hard_labels), ("a", "b"), 1, settings, seed=0)
    assert fine.coverage_warning() is None  # the same images: exchangeable, covered


def test_a_binary_task_gets_one_curve_for_its_positive_class_with_the_operating_point(tmp_path, monkeypatch):
    from pipeline.evaluation import plots

    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.35, 0.65], [0.7, 0.3], [0.1, 0.9]])
    labels = np.array([0, 0, 1, 1, 1, 0])  # at 0.5 on 'tumor': tp 2 of 3, fp 1 of 3
    drawn = {}
    real = plots.plot_curves
    monkeypatch.setattr(
        plots, "plot_curves", lambda kind, *a, **k: drawn.setdefault(kind, real(kind, *a, **k))
    )
    plots.write_plots(tmp_path, probs, labels, ("normal", "tumor"), positive=1, threshold=0.5)
    assert sorted(p.name for p in (tmp_path / "roc").iterdir()) == ["tumor.csv"]
    assert sorted(p.name for p in (tmp_path / "precision_recall").iterdir()) == ["tumor.csv"]
    for kind, expected in (("roc", (1 / 3, 2 / 3)), ("precision_recall", (2 / 3, 2 / 3))):
        ax = drawn[kind].axes[0]
        (point,) = [line for line in ax.get_lines() if line.get_label().startswith("operating point")]
        assert (point.get_xdata()[0], point.get_ydata()[0]) == pytest.approx(expected)
        assert "normal" not in " ".join(line.get_label() for line in ax.get_lines())
    multi = tmp_path / "multi"
    multi.mkdir()
    plots.write_plots(multi, PROBS, LABELS, CLASSES)  # more than two classes: one-vs-rest, one curve each
    assert len(list((multi / "roc").iterdir())) == 3
