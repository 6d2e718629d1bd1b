"""Small MNIST reference networks used as pruning samples.

The classes are written out explicitly (torchvision style) so that every
layer is a named ``nn.Module`` attribute that a pruning tool can find.
All of them expect inputs of shape ``(N, 1, 28, 28)`` with values in [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EvciCNN", "LeNet300100", "Conv2"]


class EvciCNN(nn.Module):
    """The small MNIST CNN of U. Evci, "Detecting Dead Weights and Units in Neural
    Networks" (MS thesis, NYU 2018, §4.2): two 5x5 convs (8 and 16 channels), each
    followed by 2x2 max pooling and ReLU, then a 256-64-10 MLP head.
    20,522 parameters; pruned at ratio 0.6 on every hidden layer it has 4,019.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=5),   # 28 -> 24
            nn.MaxPool2d(2),                  # 24 -> 12
            nn.ReLU(),
            nn.Conv2d(8, 16, kernel_size=5),  # 12 -> 8
            nn.MaxPool2d(2),                  # 8 -> 4
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(x)


class LeNet300100(nn.Module):
    """LeNet-300-100 fully connected MNIST network (LeCun et al., 1998,
    "Gradient-Based Learning Applied to Document Recognition"; the standard
    pruning benchmark of Han et al. 2015 and Frankle & Carbin 2019):
    784-300-100-10 with ReLU activations. 266,610 parameters.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, 300),
            nn.ReLU(),
            nn.Linear(300, 100),
            nn.ReLU(),
            nn.Linear(100, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


class Conv2(nn.Module):
    """Conv-2 from Frankle & Carbin, "The Lottery Ticket Hypothesis" (ICLR 2019), as
    studied by J. Heitmann, "Sources of Redundancy in Neural Networks" (EPFL semester
    project), here on 28x28 MNIST and with BatchNorm:
    two 3x3 convs with 64 channels (BN + ReLU), 2x2 max pooling, then a
    9216-256-256-10 MLP head. 2,465,738 parameters (including BatchNorm affine weights;
    BatchNorm running statistics are buffers, not parameters).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 64, kernel_size=3),   # 28 -> 26
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3),  # 26 -> 24
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),                   # 24 -> 12
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 12 * 12, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(x)


class BasicBlock(nn.Module):
    """Two 3×3 conv–BN layers with an identity (or strided 1×1 conv–BN) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20 (three stages of three basic blocks, 16/32/64 channels) for (N, 1, 28, 28)
    Fashion-MNIST, ~272 k parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expansion, 3×3 depthwise, 1×1 linear projection, residual when shapes agree."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2Small(nn.Module):
    """A MobileNetV2-style depthwise net for (N, 1, 28, 28) Fashion-MNIST: a 3×3 stem of stride 2 (as
    MobileNetV2's), seven inverted residual blocks (expansion 4), a 1×1 head conv, ~99 k parameters."""

    SETTINGS = ((16, 1, 1), (24, 2, 2), (32, 2, 2), (64, 2, 1))  # (channels, blocks, first stride)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True)]
        cin = 16
        for cout, n, stride in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, 4))
                cin = cout
        layers += [nn.Conv2d(cin, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
