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
