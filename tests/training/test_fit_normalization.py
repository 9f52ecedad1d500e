import pytest
import torch

from pipeline.runinfo import WeightsInfo
from pipeline.training import fit as fit_module
from pipeline.training.model import IMAGENET_MEAN, Classifier

STATS = ((0.7, 0.6, 0.5), (0.1, 0.2, 0.3))


def test_random_init_normalizes_with_the_dataset_statistics(tiny_params):
    model, info = fit_module.build_model(tiny_params, ["a", "b"], dataset_stats=STATS)
    assert not info.pretrained
    assert model.mean.flatten().tolist() == pytest.approx(
        STATS[0]
    ) and model.std.flatten().tolist() == pytest.approx(STATS[1])
    rebuilt = Classifier(**model.hparams)  # what load_from_checkpoint does before loading the buffers
    assert torch.equal(rebuilt.mean, model.mean) and torch.equal(rebuilt.std, model.std)


def test_pretrained_rgb_weights_keep_imagenet_statistics(tiny_params, monkeypatch):
    monkeypatch.setattr(fit_module, "load_pretrained", lambda *a, **k: WeightsInfo("imagenet", "url", True))
    model, info = fit_module.build_model(tiny_params, ["a", "b"], dataset_stats=STATS)
    assert info.pretrained and model.mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    assert list(model.hparams.mean) == pytest.approx(IMAGENET_MEAN)
