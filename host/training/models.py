"""Models for the tasks: plain torch modules (``convert`` puts them on the macro).

- ``digits_mlp``, ``digits_cnn``: scikit-learn's 8x8 digits;
- ``har_cnn``: a 1-D CNN over the 9 raw inertial channels of UCI HAR (128 samples per window);
- ``resnet20`` (He et al. 2016, CIFAR variant with parameter-free shortcuts) and ``vgg8`` (128C3-128C3-MP-256C3-
  256C3-MP-512C3-512C3-MP-FC1024-FC10) for CIFAR-10.

``build_model(name, **kwargs)`` rebuilds a model from the name and arguments a checkpoint records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cimlab.firmware_bridge.errors import ConfigError


def digits_mlp(n_classes: int = 10, hidden: int = 64, in_features: int = 64) -> nn.Module:
    """Two-layer perceptron for flattened 8x8 digits."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, n_classes),
    )


def digits_cnn(n_classes: int = 10, width: int = 16, in_channels: int = 1) -> nn.Module:
    """Small CNN for 8x8 digits: conv-conv-pool-conv-pool-linear."""
    w = width
    return nn.Sequential(
        nn.Conv2d(in_channels, w, 3, padding=1, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * w),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * w),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * w * 4, n_classes),
    )


def har_cnn(n_classes: int = 6, in_channels: int = 9, width: int = 32) -> nn.Module:
    """1-D CNN for HAR windows [9, 128]: three conv blocks, global average pooling, linear."""
    w = width
    return nn.Sequential(
        nn.Conv1d(in_channels, w, 5, padding=2, bias=False),
        nn.BatchNorm1d(w),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(w, 2 * w, 5, padding=2, bias=False),
        nn.BatchNorm1d(2 * w),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(2 * w, 2 * w, 5, padding=2, bias=False),
        nn.BatchNorm1d(2 * w),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(2 * w, n_classes),
    )


class _Shortcut(nn.Module):
    """Parameter-free CIFAR ResNet shortcut (option A): subsample and zero-pad channels."""

    def __init__(self, planes: int, stride: int) -> None:
        super().__init__()
        self.planes = planes
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        pad = self.planes - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, pad // 2, pad - pad // 2))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _Shortcut(planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet with 6n+2 layers (n=3: ResNet20)."""

    def __init__(self, n: int = 3, n_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers: list[nn.Module] = []
        planes = width
        for stage in range(3):
            out = width * 2**stage
            for b in range(n):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(BasicBlock(planes, out, stride))
                planes = out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(planes, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def resnet20(n_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet20 for CIFAR-10 (0.27 M parameters)."""
    return ResNetCifar(3, n_classes, in_channels)


def vgg8(n_classes: int = 10, in_channels: int = 3, width: int = 128, hidden: int = 1024) -> nn.Module:
    """VGG8 for CIFAR-10 (32x32 inputs): six 3x3 convolutions in three pooled stages, two linear layers."""
    layers: list[nn.Module] = []
    c = in_channels
    for stage in range(3):
        out = width * 2**stage
        for _ in range(2):
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            c = out
        layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(c * 16, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
               nn.Linear(hidden, n_classes)]
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits_mlp": digits_mlp,
    "digits_cnn": digits_cnn,
    "har_cnn": har_cnn,
    "resnet20": resnet20,
    "vgg8": vgg8,
}
DEFAULT_MODEL = {"digits": "digits_cnn", "har": "har_cnn", "cifar10": "resnet20"}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """A model by name (``MODELS``); ConfigError naming the known ones."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    try:
        return MODELS[name](**kwargs)
    except TypeError as err:
        raise ConfigError(f"model {name!r} does not take these arguments {sorted(kwargs)}: {err}") from err


__all__ = ["DEFAULT_MODEL", "MODELS", "build_model", "digits_cnn", "digits_mlp", "har_cnn", "resnet20", "vgg8"]
