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
    # AUROC, one-vs-rest macro: the share of (positive, negative) pairs ranked right, per class
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


# --- test-time augmentation ------------------------------------------------------------------------

@pytest.fixture
def tiny_model():
    """A linear classifier on raw pixels: fast, and position-sensitive, so a flip changes its predictions."""
    import torch

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
    np.testing.assert_allclose(evaluation.predict_tta(tiny_model, images, 3, flip), (plain + flipped) / 2, atol=1e-6)


def test_evaluate_reports_metrics_with_and_without_tta(tiny_model):
    from pipeline import augment
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    probs, plain = evaluation.evaluate(tiny_model, images, LABELS, CLASSES, 4)
    assert "test/accuracy" in plain and not any(k.startswith("test_tta/") for k in plain)
    _, both = evaluation.evaluate(tiny_model, images, LABELS, CLASSES, 4, augment.build_tta(["VerticalFlip"]))
    assert {k for k in both if k.startswith("test/")} == set(plain) and both["test/auroc"] == plain["test/auroc"]
    assert {f"test_tta/{m}" for m in evaluation.HEADLINE} <= set(both)
    assert probs.shape == (6, 3)


def test_report_shows_both_columns_when_tta_is_on():
    m = evaluation.compute_metrics(PROBS, LABELS, CLASSES) | evaluation.compute_metrics(
        np.eye(3)[LABELS], LABELS, CLASSES, evaluation.TTA_SPLIT)
    data = {"source": "data/raw/x", "classes": list(CLASSES), "n_images": 6, "image_size": 32, "rejected": [],
            "counts": {s: {c: 2 for c in CLASSES} for s in ("train", "val", "test")}}
    run = {"arch": "resnet18", "run_id": "r1", "checkpoint": "best.ckpt",
           "weights": {"pretrained": True, "source": "url"}}
    text = evaluation.report(m, data, run, [], ["HorizontalFlip", "VerticalFlip"])
    assert "| metric | without TTA | with TTA |" in text and "| accuracy | 0.8333 | 1.0000 |" in text
    assert "HorizontalFlip, VerticalFlip" in text
    assert "| accuracy | 0.8333 |\n" in evaluation.report(m, data, run, [])
