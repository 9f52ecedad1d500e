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
