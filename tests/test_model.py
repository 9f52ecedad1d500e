import pytest
import torch

from pipeline.model import Classifier, build_network
from pipeline.weights import imagenet_url

ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_builds_and_takes_a_training_step(arch):
    torch.manual_seed(0)
    model = Classifier(arch, num_classes=3, dropout=0.1)
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
    plain = Classifier("resnet18", 3, channels_last=False)
    fast = Classifier("resnet18", 3, channels_last=True)
    fast.load_state_dict(plain.state_dict())
    for model in (plain, fast):
        model.on_fit_start()
        model.eval()
    assert fast.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(plain(x), fast(x), atol=1e-4)
