"""Exactness properties of the cut: what must hold to float precision."""

import copy

import pytest
import torch
from torch import nn

import prunetool
from prunetool.cut import cut, select
from prunetool.data import calibration
from prunetool.score import score
from prunetool.trace import trace

from conftest import SAMPLES, conv2_bn, evci_cnn, functional_net, mean_cut_and_masked, traced


@pytest.mark.parametrize("compensate", ["mean", "lstsq", "none"])
@pytest.mark.parametrize("make", [evci_cnn, functional_net, conv2_bn], ids=["evci", "functional", "conv2_bn"])
def test_ratio_zero_changes_nothing(make, compensate, mnist_small):
    dense = make()
    small, report = prunetool.shrink(dense, mnist_small, "mrs", 0.0, compensate, calib=200, measure=False)
    x = mnist_small.test.tensors[0][:64]
    with torch.no_grad():
        assert torch.equal(small(x), dense(x))
    assert all(layer["units_before"] == layer["units_after"] for layer in report["layers"])


def _force_constant_unit(model: nn.Module, layer: str, unit: int, value: float) -> None:
    """Zero a unit's incoming weights so its output is the constant relu(value) everywhere."""
    module = dict(model.named_modules())[layer]
    with torch.no_grad():
        module.weight[unit] = 0.0
        module.bias[unit] = value


@pytest.mark.parametrize("layer,units", [("features.0", 8), ("features.3", 16), ("classifier.1", 64)])
def test_constant_unit_removed_with_mean_leaves_outputs_unchanged(layer, units, mnist_small):
    """Conv→Conv (no padding), Conv→flatten→Linear and Linear→Linear, one unit removed each time."""
    dense = evci_cnn()
    _force_constant_unit(dense, layer, unit=3, value=0.7)
    # l1 ranks the zeroed unit lowest; the ratio removes exactly one unit of that layer
    ratio = {name: 0.0 for name in ("features.0", "features.3", "classifier.1")}
    ratio[layer] = 1.0 / units
    x, y = calibration(mnist_small, 200).all()
    graph = trace(dense, x[:2])
    scores = score(dense, graph, "l1", x, y)
    keep = select(graph, scores.scores, ratio)
    assert 3 not in keep[layer].tolist() and len(keep[layer]) == units - 1
    small = cut(copy.deepcopy(dense), graph, keep, "mean", scores.means, x)
    test_x = mnist_small.test.tensors[0][:200]
    with torch.no_grad():
        assert torch.allclose(small(test_x), dense(test_x), atol=1e-5, rtol=0)


def test_constant_unit_into_biasless_conv_is_absorbed_by_batchnorm(mnist_small):
    dense = functional_net()
    _force_constant_unit(dense, "conv1", unit=2, value=0.5)
    x, y = calibration(mnist_small, 200).all()
    graph = trace(dense, x[:2])
    assert graph.group("conv1").consumers[0].norm_after == "bn2"
    scores = score(dense, graph, "l1", x, y)
    keep = select(graph, scores.scores, {"conv1": 1 / 6, "conv2": 0.0, "fc1": 0.0})
    small = cut(copy.deepcopy(dense), graph, keep, "mean", scores.means, x)
    assert small.conv2.bias is None, "the constant must go into BatchNorm, not a new bias"
    with torch.no_grad():
        assert torch.allclose(small(x), dense(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [evci_cnn, functional_net], ids=["evci", "functional"])
@pytest.mark.parametrize("criterion", ["mrs", "l2"])
def test_cut_model_equals_masked_dense_model(make, criterion, mnist_small):
    """Cut + mean compensation == the dense model with removed units replaced by their means."""
    dense, graph, x, y = traced(make(), mnist_small, 300)
    keep = select(graph, score(dense, graph, criterion, x, y).scores, 0.5)
    test_x = mnist_small.test.tensors[0][:300]
    _, cut_out, masked = mean_cut_and_masked(dense, graph, keep, x, test_x)
    assert torch.allclose(cut_out, masked, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert not torch.allclose(cut_out, dense(test_x), atol=1e-3), "the cut must change something"


def test_lstsq_recovers_a_duplicated_unit(mnist_small):
    """A unit that duplicates another is replaced exactly by the refit consumer (up to the small ridge)."""
    dense = evci_cnn()
    with torch.no_grad():
        fc1 = dense.classifier[1]
        fc1.weight.mul_(10)
        fc1.bias.mul_(10)
        dense.classifier[3].weight.div_(10)
        fc1.weight[0] = fc1.weight[5] * 0.01
        fc1.bias[0] = fc1.bias[5] * 0.01
    x, y = calibration(mnist_small, 300).all()
    graph = trace(dense, x[:2])
    scores = score(dense, graph, "l1", x, y)
    keep = select(graph, scores.scores, {"features.0": 0.0, "features.3": 0.0, "classifier.1": 1 / 64})
    assert 0 not in keep["classifier.1"].tolist()
    refit = cut(copy.deepcopy(dense), graph, keep, "lstsq", scores.means, x)
    plain = cut(copy.deepcopy(dense), graph, keep, "none", scores.means, x)
    test_x = mnist_small.test.tensors[0][:200]
    with torch.no_grad():
        ref = dense(test_x)
        err_refit = (refit(test_x) - ref).abs().max().item()
        err_plain = (plain(test_x) - ref).abs().max().item()
    assert err_refit < 1e-3
    assert err_refit < err_plain / 10


def test_lstsq_beats_mean_and_none_on_the_calibration_loss(mnist_small):
    dense = evci_cnn()
    x, y = calibration(mnist_small, 500).all()
    graph = trace(dense, x[:2])
    scores = score(dense, graph, "l2", x, y)
    keep = select(graph, scores.scores, 0.6)
    losses = {}
    for comp in ("none", "mean", "lstsq"):
        small = cut(copy.deepcopy(dense), graph, keep, comp, scores.means, x)
        with torch.no_grad():
            losses[comp] = nn.functional.cross_entropy(small(x), y).item()
    assert losses["lstsq"] < min(losses["mean"], losses["none"]) / 10, losses


def test_lstsq_refit_of_activations_whose_squares_overflow_float32(mnist_small):
    """Random-weight deep nets reach activations of 1e14 and more; XᵀX must not overflow to inf (NaN weights)."""
    dense = evci_cnn()
    with torch.no_grad():
        dense.features[0].weight.mul_(1e20)  # every later activation is about 1e20: squares overflow float32
        dense.features[0].bias.mul_(1e20)
    x, y = calibration(mnist_small, 100).all()
    graph = trace(dense, x[:2])
    scores = score(dense, graph, "l1", x, y)
    keep = select(graph, scores.scores, 0.25)
    refit = cut(copy.deepcopy(dense), graph, keep, "lstsq", scores.means, x)
    plain = cut(copy.deepcopy(dense), graph, keep, "none", scores.means, x)
    assert all(torch.isfinite(p).all() for p in refit.parameters())
    with torch.no_grad():
        ref = dense(x)
        assert (refit(x) - ref).abs().max() < (plain(x) - ref).abs().max()


def test_a_misread_group_is_kept_whole_and_the_rest_is_cut(monkeypatch, tmp_path):
    """One group the tracer misread (here: its producer's rows mirrored, so removing unit i drops row n-1-i) must
    not cost the model: that group is kept whole and named among the protected layers, the others are cut, and
    the file reloads."""
    def misreading(*args, **kwargs):
        graph = trace(*args, **kwargs)
        group = graph.groups[0]
        producer = group.producers[0]
        producer.rows = lambda units, n=group.units: n - 1 - units
        return graph

    monkeypatch.setattr(prunetool.commands.common, "trace", misreading)
    # mrs: obs happens to pick a mirror-symmetric set of units here, which the mirrored rows cannot tell apart
    small, report = prunetool.shrink(str(SAMPLES / "evci_cnn.pt"), str(SAMPLES / "mnist_subset.npz"), "mrs",
                                     arch="samples.nets:EvciCNN", ratio=0.5, calib=64, eval=64, latency_batches=(),
                                     out=str(tmp_path / "small.safetensors"))
    first = report["layers"][0]
    assert first["units_after"] == first["units_before"]
    assert all(g["units_after"] < g["units_before"] for g in report["layers"][1:])
    assert any(p["name"] == first["name"] and "misread" in p["reason"] for p in report["protected"])
    assert report["verify"]["reload"] == "identical"
