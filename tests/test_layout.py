"""Layout ops between a producer and its consumer: a permute or transpose and then a flatten puts positions in
front of the channels, so each unit's inputs to the next layer are strided (``x.permute(0, 2, 1, 3).reshape(B, -1)``
in audio CNNs, ``einops.rearrange``, channels-last flattening). Those units are cut exactly."""

import copy
import os
import subprocess
import sys

import pytest
import torch

import prunetool
from prunetool.cli import main
from prunetool.cut import cut, sequential_means
from prunetool.trace import trace

from conftest import mean_cut_and_masked

NETS = '''
import einops
import torch
from torch import nn


class Audio(nn.Module):
    """A spectrogram (B, 1, T, F) through two convs; the last one's (B, C, T, F) flattened time-major."""

    def __init__(self, flatten="permute"):
        super().__init__()
        self.flatten = flatten
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 12, 3, stride=2)
        self.fc = nn.Linear(3 * 12 * 3, 32)
        self.out = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.c1(x)))
        x = torch.relu(self.c2(x))
        b = x.shape[0]
        if self.flatten == "permute":
            x = x.permute(0, 2, 1, 3).reshape(b, -1)
        elif self.flatten == "einops":
            x = einops.rearrange(x, "b c t f -> b (t c f)")
        else:  # channels last
            x = x.permute(0, 2, 3, 1).flatten(1)
        return self.out(torch.relu(self.fc(x)))


class Sequence(nn.Module):
    """Conv1d over (B, 2, 16); its (B, C, T) read as (B, T·C), or split back into (B, T, C) for a per-step Linear."""

    def __init__(self, split_back=False):
        super().__init__()
        self.split_back = split_back
        self.c2 = nn.Conv1d(2, 16, 5)
        self.fc = nn.Linear(16, 4) if split_back else nn.Linear(16 * 12, 4)

    def forward(self, x):
        x = torch.relu(self.c2(x)).transpose(1, 2).flatten(1)
        if self.split_back:
            return self.fc(x.unflatten(1, (12, -1))).mean(1)
        return self.fc(x)


def build(flatten="permute"):
    return Audio(flatten)
'''

CASES = {"permute-reshape": ("Audio", "permute", (1, 7, 7)), "einops": ("Audio", "einops", (1, 7, 7)),
         "channels-last": ("Audio", "last", (1, 7, 7)), "transpose-flatten": ("Sequence", False, (2, 16)),
         "split-back": ("Sequence", True, (2, 16))}


@pytest.fixture
def nets(tmp_path, monkeypatch):
    (tmp_path / "layoutnets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "layoutnets", raising=False)
    import layoutnets

    return layoutnets


def _make(nets, case):
    cls, arg, shape = CASES[case]
    torch.manual_seed(0)
    return getattr(nets, cls)(arg).eval(), shape


@pytest.mark.parametrize("case", CASES)
def test_a_conv_read_through_a_permute_and_flatten_is_cut_as_masked(nets, case):
    model, shape = _make(nets, case)
    x, test_x = torch.randn(64, *shape), torch.randn(32, *shape)
    graph = trace(model, x[:2])
    conv = {g.name: g for g in graph.groups}.get("c2")
    assert conv is not None, [(p.name, p.reason) for p in graph.protected]
    keep = {g.name: torch.arange(0, g.units, 2) for g in graph.groups}
    small, got, masked = mean_cut_and_masked(model, graph, keep, x, test_x)
    assert dict(small.named_modules())["c2"].out_channels == conv.units // 2
    assert torch.allclose(got, masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_a_constant_unit_removed_through_a_permute_and_flatten_leaves_outputs_unchanged(nets, case):
    """Independent of how the unit's columns are found: if they were the wrong ones, the mean would be added to
    other inputs and the outputs would move."""
    model, shape = _make(nets, case)
    with torch.no_grad():
        model.c2.weight[3] = 0.0
        model.c2.bias[3] = 0.7
    x, test_x = torch.randn(64, *shape), torch.randn(32, *shape)
    graph = trace(model, x[:2])
    assert "c2" in {g.name for g in graph.groups}
    keep = {g.name: torch.tensor([u for u in range(g.units) if u != 3 or g.name != "c2"]) for g in graph.groups}
    small = cut(copy.deepcopy(model), graph, keep, "mean", sequential_means(model, graph, keep, x), x)
    with torch.no_grad():
        assert torch.allclose(small(test_x), model(test_x), atol=1e-5, rtol=0)


def test_the_audio_net_through_the_cli_verifies_exports_and_reloads_elsewhere(nets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(1)
    torch.save(nets.build().state_dict(), "audio.pt")
    code = main(["shrink", "audio.pt", "--arch", "layoutnets:build", "--input-shape", "1,7,7", "--calib", "128",
                 "--ratio", "0.5", "--no-latency", "--out", "small.safetensors", "--onnx", "small.onnx"])
    err = capsys.readouterr()
    assert code == 0, err.err
    assert "removal = zeroing" in err.out and "c2" in err.out
    x = torch.randn(4, 1, 7, 7)
    torch.save(x, "x.pt")
    with torch.no_grad():
        want = prunetool.load("small.safetensors").model.eval()(x)
    assert want.shape == (4, 5)
    (tmp_path / "elsewhere").mkdir()
    script = ("import sys, torch, prunetool\n"
              "m = prunetool.load(sys.argv[1]).model.eval()\n"
              "print(m.c2.out_channels, m.fc.in_features)\n"
              "torch.save(m(torch.load(sys.argv[2])).detach(), 'y.pt')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script, str(tmp_path / "small.safetensors"),
                           str(tmp_path / "x.pt")], cwd=tmp_path / "elsewhere", env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["6", "54"]  # 6 of 12 channels, each read at 3 × 3 (time, frequency) positions
    assert torch.allclose(torch.load(tmp_path / "elsewhere" / "y.pt"), want, atol=1e-6, rtol=0)
