"""sparsify: IMP masks, then physical removal of units without incoming or outgoing weights."""

import copy
import json

import torch

from prunetool.cli import main
from prunetool.cut import cut, sequential_means
from prunetool.data import calibration
from prunetool.commands.sparsify import prunable_weights
from prunetool.cut import apply_masks
from prunetool.score import magnitude_masks, removable_units
from prunetool.trace import trace

from conftest import ROOT, SAMPLES, evci_cnn


def test_each_round_prunes_the_fraction_of_what_remains():
    model = evci_cnn()
    layers = prunable_weights(model)
    masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}
    expected = {n: m.weight.numel() for n, m in layers.items()}
    for _ in range(3):
        magnitude_masks(layers, masks, 0.3)
        expected = {n: e - int(0.3 * e) for n, e in expected.items()}
        assert {n: int(m.sum()) for n, m in masks.items()} == expected
    apply_masks(layers, masks)
    w = layers["classifier.1"].weight.detach()
    assert int((w != 0).sum()) == expected["classifier.1"]
    survivors = w[masks["classifier.1"]].abs()
    dense = evci_cnn().classifier[1].weight.detach().abs()
    assert survivors.min() >= dense[~masks["classifier.1"]].max(), "magnitude order: the largest survive"


def test_units_without_incoming_or_outgoing_weights_are_removed_exactly(mnist_small):
    model = evci_cnn()
    with torch.no_grad():
        model.classifier[1].weight[[2, 9]] = 0.0  # no incoming weights: a constant unit
        model.classifier[3].weight[:, [5, 11]] = 0.0  # no outgoing weights: nobody reads it
        model.features[3].weight[:, 6] = 0.0  # conv channel 6 of features.0 is read by nothing
    x, _ = calibration(mnist_small, 200).all()
    graph = trace(model, x[:2])
    keep = removable_units(graph, model)
    assert sorted(set(range(64)) - set(keep["classifier.1"].tolist())) == [2, 5, 9, 11]
    assert sorted(set(range(8)) - set(keep["features.0"].tolist())) == [6]
    small = cut(copy.deepcopy(model), graph, keep, "mean", sequential_means(model, graph, keep, x), x)
    test_x = mnist_small.test.tensors[0][:200]
    with torch.no_grad():
        assert torch.allclose(small(test_x), model(test_x), atol=1e-5)


def test_sparsify_cli(tmp_path, mnist, monkeypatch):
    monkeypatch.chdir(ROOT)
    src = tmp_path / "m.pt"
    src.write_bytes((SAMPLES / "evci_cnn.pt").read_bytes())
    assert main(["sparsify", str(src), "--arch", "samples.nets:EvciCNN", "--data", mnist, "--imp", "0.5",
                 "--rounds", "3", "--finetune-epochs", "1", "--calib", "128", "--eval", "300", "-q",
                 "--json", str(tmp_path / "s.json")]) == 0
    report = json.loads((tmp_path / "s.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert abs(report["rounds"][-1]["sparsity"] - (1 - 0.5 ** 3)) < 0.01
    assert all(0.85 < layer["sparsity"] < 0.9 for layer in report["sparsity"])
    assert report["after"]["params"] <= report["before"]["params"]
    assert (tmp_path / "m.sparse.safetensors").exists()
