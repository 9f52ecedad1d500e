import pytest
import torch

from pipeline.config import Augment, Model, Train
from pipeline.training.model import Classifier, build_network
from pipeline.training.weights import imagenet_url

ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_builds_and_takes_a_training_step(arch):
    torch.manual_seed(0)
    model = Classifier(Model(arch=arch, dropout=0.1), num_classes=3)
    x, y = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 2])
    logits = model(x)
    assert logits.shape == (2, 3)
    torch.nn.functional.cross_entropy(logits, y).backward()
    assert model.net.fc[1].weight.grad is not None
    assert imagenet_url(arch).endswith(".pth")


def test_head_is_replaced_for_the_class_count():
    net = build_network("resnet50", 5)
    assert net.fc.out_features == 5 and net.fc.in_features == 2048


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    plain = Classifier(train=Train(channels_last=False), num_classes=3)
    fast = Classifier(train=Train(channels_last=True), num_classes=3)
    fast.load_state_dict(plain.state_dict())
    for model in (plain, fast):
        model.on_fit_start()
        model.eval()
    assert fast.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(plain(x), fast(x), atol=1e-4)


def test_mixup_and_cutmix_give_soft_labels_that_reach_the_weighted_loss():
    torch.manual_seed(0)
    model = Classifier(
        train=Train(label_smoothing=0.1),
        augment=Augment(mixup_alpha=0.4, cutmix_alpha=1.0, cutmix_switch_prob=0.5),
        num_classes=3,
        class_weights=[0.5, 1.0, 2.0],
    )
    x, y = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1, 2])
    mixed, target = model.mix(x, y)
    assert mixed.dtype == torch.float32 and mixed.min() >= 0 and mixed.max() <= 1
    assert target.shape == (6, 3) and torch.allclose(target.sum(1), torch.ones(6))
    assert (target.max(1).values < 1).any(), "some images carry two labels"
    logits = torch.randn(6, 3)
    torch.manual_seed(1)
    _, drawn = model.mix(x, y)  # what the training step will draw after the same seed
    expected = torch.nn.functional.cross_entropy(
        logits, drawn, weight=torch.tensor([0.5, 1.0, 2.0]), label_smoothing=0.1
    )
    model.forward = lambda _: logits
    model.log = model.log_dict = lambda *a, **k: None
    torch.manual_seed(1)
    assert model.training_step((x, y), 0).item() == pytest.approx(expected.item())
    model.eval()
    assert model.validation_step((x, y), 0) is None  # validation is never mixed (it ran on the hard labels)


def test_mixing_follows_the_params_defaults_and_either_mixer_alone_works():
    from torchvision.transforms import v2

    from pipeline.training.model import batch_mixer

    # The params defaults (MixUp 0.2 and CutMix 1.0, half each); both alphas 0 turn mixing off.
    assert isinstance(Classifier(num_classes=2).mixer, v2.RandomChoice)
    assert Classifier(augment=Augment(mixup_alpha=0.0, cutmix_alpha=0.0), num_classes=2).mixer is None
    assert isinstance(batch_mixer(2, 0.2, 0.0, 0.5), v2.MixUp)
    assert isinstance(batch_mixer(2, 0.0, 1.0, 0.5), v2.CutMix)
    assert isinstance(batch_mixer(2, 0.2, 1.0, 1.0), v2.CutMix)
    assert isinstance(batch_mixer(2, 0.2, 1.0, 0.3), v2.RandomChoice)
    never = Classifier(augment=Augment(mixup_alpha=0.4, mix_prob=0.0), num_classes=2)
    x, y = torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 1, 0])
    assert torch.equal(never.mix(x, y)[1], torch.nn.functional.one_hot(y, 2).float())


def test_small_stem_keeps_the_weights_and_doubles_the_final_map():
    standard, small = build_network("resnet18", 3), build_network("resnet18", 3, stem="small")
    assert standard.state_dict().keys() == small.state_dict().keys()  # pretrained weights load alike
    small.load_state_dict(standard.state_dict())
    x = torch.zeros(1, 3, 64, 64)
    side = {}
    for name, net in (("standard", standard), ("small", small)):
        net.layer4.register_forward_hook(lambda _m, _i, out, name=name: side.update({name: out.shape[-1]}))
        net(x)
    assert side == {"standard": 2, "small": 4}
    assert Classifier(Model(stem="small"), num_classes=3).hparams.stem == "small"  # the checkpoint records it


def test_a_checkpoints_flat_record_rebuilds_the_model_from_its_sections():
    """Checkpoints keep the flat hyperparameters they always had; load_from_checkpoint passes them back."""
    model = Classifier(
        Model(stem="small", dropout=0.2),
        Train(lr=0.01, label_smoothing=0.2),
        Augment(mixup_alpha=0.0, cutmix_alpha=0.0),
        num_classes=3,
    )
    assert model.hparams.lr == 0.01 and model.hparams.dropout == 0.2 and model.hparams.mixup_alpha == 0.0
    rebuilt = Classifier(**model.hparams)
    assert rebuilt.hparams == model.hparams
    assert isinstance(rebuilt.net.maxpool, torch.nn.Identity) and rebuilt.mixer is None
    with pytest.raises(TypeError, match="learning_rate"):
        Classifier(num_classes=2, learning_rate=0.1)
