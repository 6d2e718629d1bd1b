"""Tracing and cutting beyond chains: residual adds, squeeze-excitation, concat, depthwise and grouped
convs, transformer MLPs, layer subclasses; protection of what cannot be cut; scopes and targets."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunetool
from prunetool.cli import main
from prunetool.cut import global_ratios, select
from prunetool.errors import UsageError
from prunetool.score import score
from prunetool.trace import trace

from conftest import mean_cut_and_masked, traced


class SEBlock(nn.Module):
    """1×1 residual block with a depthwise conv and squeeze-excitation (no padding anywhere: exact means)."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * c)
        self.dw = nn.Conv2d(2 * c, 2 * c, 1, groups=2 * c)
        self.bn2 = nn.BatchNorm2d(2 * c)
        self.conv2 = nn.Conv2d(2 * c, c, 1)
        self.se1 = nn.Conv2d(c, 4, 1)
        self.se2 = nn.Conv2d(4, c, 1)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu6(self.bn2(self.dw(h)))
        h = self.conv2(h)
        w = torch.sigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(h, 1)))))
        return F.relu(x + h * w)


class BranchyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.block1 = SEBlock(8)
        self.block2 = SEBlock(8)
        self.left = nn.Conv2d(8, 6, 1)
        self.right = nn.Conv2d(8, 4, 1)
        self.bn_cat = nn.BatchNorm2d(10)
        self.mix = nn.Conv2d(10, 12, 1)
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.stem(x))), 2)
        x = self.block2(self.block1(x))
        x = F.relu(self.bn_cat(torch.cat([self.left(x), self.right(x)], 1)))
        x = F.relu(self.mix(x)).mean((2, 3))
        return self.fc2(F.relu(self.fc1(x)))


def branchy() -> nn.Module:
    torch.manual_seed(0)
    model = BranchyNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def branchy_setup(mnist_small):
    return traced(branchy(), mnist_small, 200)


def test_coupled_channels_form_one_group(branchy_setup):
    _, graph, _, _ = branchy_setup
    stream = next(g for g in graph.groups if "stem" in [p.name for p in g.producers])
    assert {p.name for p in stream.producers} == {"stem", "block1.conv2", "block1.se2", "block2.conv2", "block2.se2"}
    assert {c.name for c in stream.consumers} == {"block1.conv1", "block1.se1", "block2.conv1", "block2.se1",
                                                  "left", "right"}
    assert {m.name for m in stream.members} == {"bn"}
    inner = next(g for g in graph.groups if g.name == "block1.conv1")
    assert {m.name for m in inner.members} == {"block1.bn1", "block1.dw", "block1.bn2"}
    left = graph.group("left")
    assert [(c.name, c.offset) for c in left.consumers] == [("mix", 0)]
    assert [(c.name, c.offset) for c in graph.group("right").consumers] == [("mix", 6)]
    assert [(m.name, m.offset) for m in graph.group("right").members] == [("bn_cat", 6)]


@pytest.mark.parametrize("criterion", ["mrs", "l2", "fp"])
def test_coupled_cut_equals_masked_dense_model(branchy_setup, criterion, mnist_small):
    model, graph, x, y = branchy_setup
    keep = select(graph, score(model, graph, criterion, x, y).scores, 0.4)
    small, cut_out, masked = mean_cut_and_masked(model, graph, keep, x, mnist_small.test.tensors[0][:100])
    assert torch.allclose(cut_out, masked, atol=1e-5, rtol=0)
    assert small.block1.dw.groups == small.block1.dw.out_channels == len(keep["block1.conv1"])


def test_mrs_on_a_coupled_group_matches_mrp_ranking(branchy_setup):
    from scipy.stats import spearmanr

    model, graph, x, y = branchy_setup
    mrs = score(model, graph, "mrs", x, y).scores
    mrp = score(model, graph, "mrp", x, y).scores
    stream = next(g for g in graph.groups if "stem" in [p.name for p in g.producers])
    rho = spearmanr(mrs[stream.name].numpy(), mrp[stream.name].numpy()).statistic
    assert rho > 0.5, rho


class ShuffleNet(nn.Module):
    """A channel shuffle (view that splits the channel dim) and a LayerNorm: both must be protected."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3)
        self.b = nn.Conv2d(8, 8, 3)
        self.c = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.a(x))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        x = F.relu(self.b(x)).mean((2, 3))
        return self.head(self.norm(self.c(x)))


def test_unsupported_patterns_are_protected_with_the_op_named():
    graph = trace(ShuffleNet().eval(), torch.randn(2, 1, 12, 12))
    reasons = {p.name: p.reason for p in graph.protected}
    assert "interleaved" in reasons["a"] and "b (conv2d)" in reasons["a"]  # the shuffle that interleaves groups
    assert "norm" in reasons["c"] and "LayerNorm" in reasons["c"]
    assert [g.name for g in graph.groups] == ["b"]


def test_nothing_to_prune_is_refused(mnist_small):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    with pytest.raises(UsageError, match="nothing to prune"):
        prunetool.shrink(model, mnist_small, "l1", 0.5, calib=32, measure=False)


class SamePadConv(nn.Conv2d):
    """A third-party style Conv2d subclass that pads in its own forward."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_conv_subclass_with_its_own_padding(mnist_small):
    torch.manual_seed(0)
    model = nn.Sequential(SamePadConv(1, 8, 3), nn.ReLU(), SamePadConv(8, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    small, report = prunetool.shrink(model, mnist_small, "mrs", 0.5, "lstsq", calib=64, measure=False)
    assert isinstance(small[2], SamePadConv) and small[2].in_channels == 4
    x = mnist_small.test.tensors[0][:8]
    with torch.no_grad():
        assert small(x).shape == (8, 10)
    assert report["verify"]["ratio_zero"] == "exact"


def test_transformer_encoder_mlp_units(mnist_small):
    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(28, 16)
            self.encoder = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            return self.head(self.encoder(self.embed(x[:, 0])).mean(1))

    model = Tiny().eval()
    graph = trace(model, torch.rand(2, 1, 28, 28))
    assert [g.name for g in graph.groups] == ["encoder.linear1"]
    small, _ = prunetool.shrink(model, mnist_small, "mrs", 0.5, "lstsq", calib=64, measure=False)
    assert small.encoder.linear1.out_features == 16 and small.encoder.linear2.in_features == 16


def test_global_scope_ranks_across_layers_and_respects_the_cap(branchy_setup):
    model, graph, x, y = branchy_setup
    scores = score(model, graph, "l2", x, y).scores
    ratios = global_ratios(graph, scores, 0.5, max_layer_ratio=0.6)
    total = sum(g.units for g in graph.groups)
    removed = sum(round(ratios[g.name] * g.units) for g in graph.groups)
    assert removed == int(0.5 * total)
    assert all(ratios[g.name] <= 0.6 + 1e-9 for g in graph.groups)
    assert len(set(round(r, 3) for r in ratios.values())) > 1, "global ranking should not be uniform"


def test_target_params_is_reached(mnist_small):
    from conftest import evci_cnn

    dense = evci_cnn()
    small, report = prunetool.shrink(dense, mnist_small, "l2", target_params=0.3, calib=128, measure=False)
    before = sum(p.numel() for p in dense.parameters())
    after = sum(p.numel() for p in small.parameters())
    assert after <= 0.3 * before and after > 0.2 * before
    assert 0 < report["settings"]["ratio"] < 1


def test_round_to_keeps_multiples(branchy_setup):
    model, graph, x, y = branchy_setup
    scores = score(model, graph, "l1", x, y).scores
    keep = select(graph, scores, 0.3, round_to=4)
    assert all(len(k) % 4 == 0 or len(k) == g.units for g, k in ((g, keep[g.name]) for g in graph.groups))


def test_grouped_conv_producer_stays_balanced():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                          nn.Conv2d(8, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    graph = trace(model, torch.randn(2, 1, 10, 10))
    assert any("grouped conv" in p.reason for p in graph.protected)  # the input of a grouped conv
    group = graph.group("2")
    assert group.blocks == 2
    keep = select(graph, {g.name: torch.arange(g.units, dtype=torch.float) for g in graph.groups}, 0.5)
    kept = keep["2"].tolist()
    assert sum(i < 4 for i in kept) == sum(i >= 4 for i in kept) == 2


def test_dry_run_writes_nothing(tmp_path, capsys, monkeypatch):
    from conftest import ROOT, SAMPLES

    monkeypatch.chdir(ROOT)
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes((SAMPLES / "evci_cnn.pt").read_bytes())
    assert main(["shrink", str(ckpt), "--arch", "samples.nets:EvciCNN", "--input-shape", "1,28,28", "--dry-run",
                 "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "3 prunable groups" in out and "model outputs" in out and "0.6" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [r["params"] for r in plan["ratios"] if r["ratio"] == 0.6] == [4019]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "plan.json"]
