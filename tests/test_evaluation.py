import numpy as np
import pytest

from pipeline import evaluation

CLASSES = ("a", "b", "c")
# 6 images: true labels and predicted probabilities chosen so every metric is easy to work out by hand.
LABELS = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array([
    [0.8, 0.1, 0.1],  # a -> a
    [0.2, 0.7, 0.1],  # a -> b (wrong)
    [0.1, 0.8, 0.1],  # b -> b
    [0.1, 0.6, 0.3],  # b -> b
    [0.1, 0.1, 0.8],  # c -> c
    [0.3, 0.2, 0.5],  # c -> c
])


def test_metrics_match_hand_computed_values():
    m = evaluation.compute_metrics(PROBS, LABELS, CLASSES)
    assert m["test/accuracy"] == pytest.approx(5 / 6)
    # recalls a=1/2, b=1, c=1 -> balanced accuracy 5/6; precisions a=1, b=2/3, c=1
    assert m["test/balanced_accuracy"] == pytest.approx(5 / 6)
    assert m["test/recall/a"] == pytest.approx(0.5) and m["test/precision/b"] == pytest.approx(2 / 3)
    f1 = [2 * 1 * 0.5 / 1.5, 2 * (2 / 3) / (5 / 3), 1.0]
    assert m["test/f1/a"] == pytest.approx(f1[0], abs=1e-5)
    assert m["test/macro_f1"] == pytest.approx(np.mean(f1), abs=1e-5)
    assert m["test/support/c"] == 2
    # AUROC one-vs-rest: class a scores [.8,.2 | .1,.1,.1,.3]: pairs won 4 + 3.5/... computed below
    def auc(scores, positive):
        pos, neg = scores[positive], scores[~positive]
        return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    expected = np.mean([auc(PROBS[:, k], LABELS == k) for k in range(3)])
    assert m["test/auroc"] == pytest.approx(expected, abs=1e-5)


def test_confusion_table_and_plot(tmp_path):
    table = evaluation.confusion_table(PROBS, LABELS, CLASSES)
    assert list(table.itertuples(index=False, name=None))[1] == ("a", "b")
    evaluation.plot_confusion(table, CLASSES, tmp_path / "cm.png")
    assert (tmp_path / "cm.png").stat().st_size > 1000


def test_report_warns_about_random_init():
    m = evaluation.compute_metrics(PROBS, LABELS, CLASSES)
    data = {"source": "data/raw/x", "classes": list(CLASSES), "n_images": 6, "image_size": 32, "rejected": [],
            "counts": {s: {c: 2 for c in CLASSES} for s in ("train", "val", "test")}}
    run = {"arch": "resnet18", "run_id": "r1", "checkpoint": "best.ckpt",
           "weights": {"pretrained": False, "source": "random-init", "fallback_reason": "download failed: offline"}}
    text = evaluation.report(m, data, run, ["plots/cm.png"])
    assert "Random initialization" in text and "download failed: offline" in text
    assert "Fewer than 10 test images" in text and "![cm](plots/cm.png)" in text
