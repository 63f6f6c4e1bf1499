"""flatlens.zoo: shapes, parameter counts and BatchNorm placement of the reference models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatlens import zoo


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mlp_shapes_and_size():
    model = zoo.mlp(in_features=64, hidden=64, num_classes=10, depth=2)
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)  # flattens images
    assert count(model) == (64 * 64 + 64) + (64 * 64 + 64) + (64 * 10 + 10)
    assert count(zoo.mlp(depth=0)) == 64 * 10 + 10


def test_cnn_has_batchnorm_and_works_on_8x8_and_32x32():
    model = zoo.cnn()
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2
    assert model(torch.zeros(4, 1, 8, 8)).shape == (4, 10)
    rgb = zoo.cnn(in_channels=3, num_classes=100)
    assert rgb(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_resnet18_matches_the_cifar_resnet18():
    # 11,173,962 parameters: the CIFAR ResNet-18 (3x3 stem, no max-pool) with 10 classes.
    assert count(zoo.resnet18()) == 11_173_962
    small = zoo.resnet18(num_classes=100, width=8)
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in small.modules()) == 20


def test_build_by_name():
    assert isinstance(zoo.build("cnn", channels=4), nn.Sequential)
    assert set(zoo.MODELS) == {"mlp", "cnn", "resnet18"}
    with pytest.raises(ValueError, match="unknown model"):
        zoo.build("vgg")
