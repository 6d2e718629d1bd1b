import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prunetool.data import Data  # noqa: E402

torch.set_num_threads(1)
# Files written by the suite are signed with a key of its own (inherited by the CLI run in subprocesses), never
# with the developer's ~/.config/prunetool/key
os.environ["PRUNETOOL_KEY"] = os.path.join(tempfile.mkdtemp(prefix="prunetool-key-"), "key")


@pytest.fixture(scope="session")
def mnist():
    """The shipped MNIST subset: 2000 train (calibration) and 10000 test images."""
    return str(SAMPLES / "mnist_subset.npz")


@pytest.fixture(scope="session")
def mnist_small(mnist):
    """600 train / 500 test samples as a Data object, for fast API tests."""
    arrays = np.load(mnist)
    x = torch.as_tensor(arrays["x_train"][:600]).float() / 255
    y = torch.as_tensor(arrays["y_train"][:600]).long()
    xt = torch.as_tensor(arrays["x_test"][:500]).float() / 255
    yt = torch.as_tensor(arrays["y_test"][:500]).long()
    return Data(TensorDataset(x, y), TensorDataset(xt, yt), "mnist-subset")


def evci_cnn() -> nn.Module:
    from samples.nets import EvciCNN

    model = EvciCNN()
    model.load_state_dict(torch.load(SAMPLES / "evci_cnn.pt", weights_only=True))
    return model.eval()


def conv2_bn() -> nn.Module:
    from samples.nets import Conv2

    model = Conv2()
    model.load_state_dict(torch.load(SAMPLES / "conv2.pt", weights_only=True))
    return model.eval()


@pytest.fixture
def evci():
    return evci_cnn()


class FunctionalNet(nn.Module):
    """A LeNet-style net written with functional calls, a biasless conv followed by BatchNorm, and view()."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 12, 5, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc1 = nn.Linear(12 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(nn.functional.max_pool2d(self.conv1(x), 2))
        x = nn.functional.max_pool2d(nn.functional.relu(self.bn2(self.conv2(x))), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(nn.functional.relu(self.fc1(x)))


def functional_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = FunctionalNet()
    with torch.no_grad():
        model.bn2.running_mean.uniform_(-0.2, 0.2)
        model.bn2.running_var.uniform_(0.5, 2.0)
        model.bn2.weight.uniform_(0.5, 1.5)
        model.bn2.bias.uniform_(-0.1, 0.1)
    return model.eval()


def traced(model: nn.Module, data: Data, n: int):
    """``model`` with ``n`` calibration samples of ``data`` and its trace."""
    from prunetool.data import calibration
    from prunetool.trace import trace

    x, y = calibration(data, n).all()
    return model, trace(model, x[:2]), x, y


def mean_cut_and_masked(model, graph, keep, x, test_x):
    """Outputs of the mean-compensated cut and of the dense model with removed units read as those means."""
    import copy

    from prunetool.cut import cut, mask_hooks, sequential_means

    means = sequential_means(model, graph, keep, x)
    small = cut(copy.deepcopy(model), graph, keep, "mean", means, x)
    with torch.no_grad():
        with mask_hooks(model, graph, keep, means):
            masked = model(test_x)
        return small, small(test_x), masked
