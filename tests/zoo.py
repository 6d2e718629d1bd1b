"""Small architectures with the patterns users' models have: depthwise convs with squeeze-excitation, containers
that record widths, a layer scale, concat, a Conv2d subclass that owns its padding module, a BatchNorm that also
activates, activation wrappers and ops trace has no rule for. Importable by path (``zoo:Name``), so saved files
record them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNAct(nn.Sequential):
    """Like torchvision's Conv2dNormActivation: a container that records its width."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1):
        super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU6(inplace=True))
        self.out_channels = cout


class InvertedResidual(nn.Module):
    def __init__(self, c, expand=4):
        super().__init__()
        hidden = c * expand
        self.expand = ConvBNAct(c, hidden, 1)
        self.dw = ConvBNAct(hidden, hidden, 3, groups=hidden)
        self.se1 = nn.Conv2d(hidden, 8, 1)
        self.se2 = nn.Conv2d(8, hidden, 1)
        self.project = nn.Conv2d(hidden, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.out_channels = c

    def forward(self, x):
        h = self.dw(self.expand(x))
        h = h * torch.sigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(h, 1)))))
        return x + self.bn(self.project(h))


class DepthwiseSENet(nn.Module):
    """MobileNet-style: depthwise convs (their groups must survive a reload), SE, residual adds, width records."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = ConvBNAct(3, 16, 3, 2)
        self.block1 = InvertedResidual(16)
        self.block2 = InvertedResidual(16)
        self.last = ConvBNAct(16, 32, 1)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.last(self.block2(self.block1(self.stem(x))))
        return self.head(x.mean((2, 3)))


class Conv2dSame(nn.Conv2d):
    """TF "same" padding done by a child module, as in several EfficientNet ports: not a leaf module."""

    def __init__(self, cin, cout, k):
        super().__init__(cin, cout, k, padding=0)
        self.pad = nn.ZeroPad2d((k - 1) // 2)

    def forward(self, x):
        return F.conv2d(self.pad(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class BatchNormAct2d(nn.BatchNorm2d):
    """A BatchNorm subclass that also activates, as timm's: it has a child, and calls batch_norm itself."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.SiLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(x)


class MyGELU(nn.Module):
    """An activation wrapper of the model's own (HF's GELUActivation, timm's GELU)."""

    def forward(self, x):
        return F.gelu(x)


class ThirdPartyNet(nn.Module):
    """Layers from elsewhere: a padding conv subclass with a child, a norm that activates, an activation wrapper,
    an op trace has no rule for (asinh, probed), a layer scale as a view of a 1-D parameter, and a concat."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = Conv2dSame(3, 16, 3)
        self.bn1 = BatchNormAct2d(16)
        self.conv2 = Conv2dSame(16, 24, 3)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 24))
        self.left = nn.Conv2d(24, 8, 1)
        self.right = nn.Conv2d(24, 8, 1)
        self.act = MyGELU()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = torch.asinh(self.conv2(x) * self.gamma.view(1, -1, 1, 1))
        x = torch.cat([self.left(x), self.right(x)], 1).mean((2, 3))
        return self.fc2(self.act(self.fc1(x)))


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh BatchNorm statistics are trivial (mean 0, var 1): make them ordinary."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomise_norms({"DepthwiseSENet": DepthwiseSENet, "ThirdPartyNet": ThirdPartyNet}[name]())
