"""The small-data recipe: frozen warm-up really freezes, unfreezing order, schedule, class balance."""

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from pipeline.config import with_overrides
from pipeline.data.datamodule import class_weights
from pipeline.training import recipe
from pipeline.training.fit import _tolerate_frozen_parameters, build_model, datamodule, fit
from pipeline.training.model import build_network


@pytest.fixture
def pretrained_file(tmp_path):
    """A 'pretrained' resnet18 state dict (1000-class head, as torchvision ships) in a local file."""
    torch.manual_seed(1)
    path = tmp_path / "pretrained.pth"
    torch.save(build_network("resnet18", 1000).state_dict(), path)
    return path


class Snapshots(Callback):
    """The network's state dict at the end of every training epoch."""

    def __init__(self):
        self.states = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})


def changed(before, after, prefix):
    return any(
        not torch.equal(before[k], after[k])
        for k in before
        if k.startswith(prefix) and before[k].is_floating_point()
    )


def fit_with_snapshots(params, prepared, epochs):
    snaps = Snapshots()
    start = build_model(params, prepared.classes, dataset_stats=None)[0].net.state_dict()
    fit(params, datamodule(params, prepared, None), callbacks=[snaps], max_epochs=epochs)
    return [start, *snaps.states]


def test_frozen_warmup_freezes_parameters_and_batchnorm_statistics(tiny_params, prepared, pretrained_file):
    params = with_overrides(
        tiny_params, {"model.weights": str(pretrained_file), "train.freeze_epochs": 1, "train.patience": 5}
    )
    start, frozen, unfrozen = fit_with_snapshots(params, prepared, epochs=2)
    backbone = [k for k in start if not k.startswith("fc.")]
    assert any("running_mean" in k for k in backbone) and any("num_batches_tracked" in k for k in backbone)
    for key in backbone:  # weights, BN affine parameters and BN running statistics alike
        assert torch.equal(start[key], frozen[key]), key
    assert changed(start, frozen, "fc.")
    assert changed(frozen, unfrozen, "layer1.") and changed(frozen, unfrozen, "bn1.running_mean")


def test_gradual_unfreezing_goes_from_the_top(tiny_params, prepared, pretrained_file):
    params = with_overrides(
        tiny_params,
        {
            "model.weights": str(pretrained_file),
            "train.freeze_epochs": 1,
            "train.unfreeze": "gradual",
            "train.patience": 5,
        },
    )
    _, frozen, one_stage = fit_with_snapshots(params, prepared, epochs=2)
    assert changed(frozen, one_stage, "layer4.") and changed(frozen, one_stage, "fc.")
    for prefix in ("conv1.", "bn1.", "layer1.", "layer2.", "layer3."):
        assert not changed(frozen, one_stage, prefix), prefix
    assert [recipe.trainable_stages(e, 2, "gradual") for e in range(9)] == [0, 0, 1, 2, 3, 4, 5, 5, 5]
    assert [recipe.trainable_stages(e, 2, "all") for e in range(4)] == [0, 0, 5, 5]


def test_random_init_ignores_freezing_and_the_lower_backbone_rate(tiny_params, prepared, caplog, monkeypatch):
    from pipeline.training import callbacks

    monkeypatch.setattr(callbacks, "_NOTED", set())  # the warning is given once per process
    params = with_overrides(tiny_params, {"train.freeze_epochs": 1})  # tiny_params: model.weights none
    start, first = fit_with_snapshots(params, prepared, epochs=1)
    assert changed(start, first, "layer1.") and "randomly initialised" in caplog.text
    model, _ = build_model(params, prepared.classes)
    assert model.hparams.backbone_lr_mult == 1.0


def test_backbone_learning_rate_and_warmup_cosine_schedule():
    net = build_network("resnet18", 3)
    head, backbone = recipe.head_and_backbone_params(net)
    assert len(head) == 2 and len(head) + len(backbone) == len(list(net.parameters()))
    opt = torch.optim.SGD([{"params": head, "lr": 1.0}, {"params": backbone, "lr": 0.1}], lr=1.0)
    schedule = recipe.warmup_cosine(opt, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        schedule.step()
    assert [round(h, 3) for h, _ in lrs[:5]] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert all(abs(b - h * 0.1) < 1e-9 for h, b in lrs)
    assert lrs[8][0] == pytest.approx(0.5) and lrs[-1][0] < 0.05


def test_class_weights_and_balanced_sampler(tiny_params, prepared):
    assert class_weights(np.array([0, 0, 0, 1]), 3).tolist() == [2 / 3, 2.0, 0.0]
    labels = prepared.split("train")["label_index"].to_numpy()
    keep = np.concatenate([np.flatnonzero(labels == 0), np.flatnonzero(labels != 0)[:2]])  # mostly class 0
    params = with_overrides(tiny_params, {"train.balance": "sampler", "train.batch_size": 2})
    data = datamodule(params, prepared, None)
    dataset = data.dataset("train")
    data.dataset = lambda split, transform=None: type(dataset)(dataset.images[keep], dataset.labels[keep])
    loader = data.train_dataloader()
    drawn = np.concatenate([y.numpy() for _ in range(200) for _, y in loader])  # 200 epochs
    share = np.bincount(drawn, minlength=3) / len(drawn)
    assert 0.45 < share[0] < 0.55  # 2/3 of the subset's images, half of the draws (one other class present)
    model, _ = build_model(
        with_overrides(tiny_params, {"train.balance": "loss"}), prepared.classes, train_labels=labels[keep]
    )
    assert model.class_weights.tolist() == pytest.approx(class_weights(labels[keep], 3).tolist())


def test_label_smoothing_and_class_weights_reach_the_loss(tiny_params, prepared):
    params = with_overrides(tiny_params, {"train.label_smoothing": 0.2, "train.balance": "loss"})
    model, _ = build_model(params, prepared.classes, train_labels=np.array([0, 0, 1, 2]))
    logits = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    expected = torch.nn.functional.cross_entropy(
        logits, y, weight=torch.tensor([2 / 3, 4 / 3, 4 / 3]), label_smoothing=0.2
    )
    model.forward = lambda x: logits
    model.log = model.log_dict = lambda *a, **k: None
    assert model.training_step((torch.zeros(4, 3, 8, 8), y), 0) == pytest.approx(expected.item())


def test_ddp_tolerates_frozen_parameters_only_where_needed():
    assert _tolerate_frozen_parameters("ddp", 2) == "ddp_find_unused_parameters_true"
    assert _tolerate_frozen_parameters("auto", 2) == "ddp_find_unused_parameters_true"
    assert _tolerate_frozen_parameters("ddp_spawn", 2) == "ddp_spawn_find_unused_parameters_true"
    assert _tolerate_frozen_parameters("auto", 1) == "auto"
    assert _tolerate_frozen_parameters("auto", 1, num_nodes=2) == "ddp_find_unused_parameters_true"


def test_mixed_precision_trains_on_cpu(tiny_params, prepared):
    params = with_overrides(tiny_params, {"train.precision": "bf16-mixed"})
    result = fit(params, datamodule(params, prepared, None), max_epochs=1)
    assert np.isfinite(result.last_metrics["val/loss"])
