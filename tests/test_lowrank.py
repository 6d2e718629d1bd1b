"""lowrank: exact factorisation at full rank, rank rules, reload, ONNX, composition with shrink."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import prunetool
from prunetool.cli import main
from prunetool.calls import capture
from prunetool.factor import elbow, factor, rank_for_energy, spectrum, Spectrum
from prunetool import lowrank

from conftest import ROOT, SAMPLES, evci_cnn


@pytest.mark.parametrize("layer,shape", [
    (nn.Linear(12, 7), (5, 12)),
    (nn.Conv2d(3, 6, 3, stride=2, padding=1, dilation=1), (2, 3, 9, 9)),
    (nn.Conv2d(4, 5, (3, 2), stride=(1, 2), padding=(2, 1), dilation=2, bias=False), (2, 4, 10, 11)),
])
@pytest.mark.parametrize("data_aware", [False, True])
def test_full_rank_factorisation_is_exact(layer, shape, data_aware):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    cov = None
    if data_aware:  # E[x xᵀ] of what the weight multiplies (conv: unfolded patches)
        design = capture(nn.Sequential(layer), "0", x).rows(layer.weight).double()
        cov = design.T @ design / len(design)
    spec = spectrum(layer, cov)
    full = factor(layer, len(spec.sigma), spec)
    with torch.no_grad():
        assert torch.allclose(full(x), layer(x), atol=1e-4)


def test_rank_rules_on_a_known_spectrum():
    sigma = torch.tensor([10.0, 9.0, 8.0, 0.3, 0.2, 0.1, 0.05, 0.01])
    spec = Spectrum(sigma, torch.eye(8), torch.eye(8))
    assert elbow(spec) == 3
    assert rank_for_energy(spec, 0.5) == 2  # 100/245.1 < 0.5 ≤ 181/245.1
    assert rank_for_energy(spec, 1.0) == 8
    assert spec.energy(3) == pytest.approx(245 / float((sigma ** 2).sum()))


def test_lowrank_samples_head_kept_and_only_saving_layers(mnist_small, tmp_path):
    out = tmp_path / "c.pt"
    small, report = lowrank(SAMPLES / "evci_cnn.pt", mnist_small, arch="samples.nets:EvciCNN", rank=7, calib=128,
                            out=str(out), measure=False)
    entries = {e["name"]: e for e in report["layers"]}
    assert "classifier.3" not in entries, "the output head is not factored by default"
    assert entries["features.0"]["rank"] is None and "would not save" in entries["features.0"]["skipped"]
    assert entries["classifier.1"]["rank"] == 7 and 0 < entries["classifier.1"]["energy"] < 1
    assert isinstance(small.classifier[1], nn.Sequential) and small.classifier[1][0].out_features == 7
    again = prunetool.load(out).model
    raw = torch.load(out, weights_only=True)
    assert json.loads(raw["record"])["factored"] == {"features.3": 7, "classifier.1": 7}
    x = mnist_small.test.tensors[0][:32]
    with torch.no_grad():
        assert torch.equal(again(x), small(x))


def test_layers_glob_and_data_aware_beats_plain_svd(mnist_small):
    losses = {}
    for aware in (False, True):
        small, report = lowrank(SAMPLES / "lenet_300_100.pt", mnist_small, arch="samples.nets:LeNet300100", rank=8,
                                layers="classifier.1", data_aware=aware, calib=300, measure=False)
        assert [e["name"] for e in report["layers"]] == ["classifier.1"]
        x, y = mnist_small.test.tensors
        with torch.no_grad():
            losses[aware] = nn.functional.cross_entropy(small(x), y).item()
    assert losses[True] < losses[False]


def test_max_drop_search_respects_the_budget(mnist_small):
    from prunetool.data import calibration

    small, report = lowrank(SAMPLES / "lenet_300_100.pt", mnist_small, arch="samples.nets:LeNet300100",
                            max_drop=1.0, calib=300, measure=False)
    x, y = calibration(mnist_small, 300).all()
    dense = prunetool.load(SAMPLES / "lenet_300_100.pt", arch="samples.nets:LeNet300100").model
    with torch.no_grad():
        acc = lambda m: 100 * (m(x).argmax(-1) == y).float().mean().item()  # noqa: E731
        assert acc(dense) - acc(small) <= 1.0 + 1e-6
    assert report["settings"]["search_evaluations"] > 0
    assert any(e["rank"] for e in report["layers"])


def test_factored_model_exports_to_onnx(tmp_path, mnist_small):
    import onnxruntime

    small, _ = lowrank(SAMPLES / "evci_cnn.pt", mnist_small, arch="samples.nets:EvciCNN", rank=3, calib=64,
                       measure=False)
    x = mnist_small.test.tensors[0][:5]
    path = tmp_path / "m.onnx"
    torch.onnx.export(small, (x,), str(path), input_names=["x"], dynamic_axes={"x": {0: "n"}}, dynamo=False)
    got = onnxruntime.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - small(x).numpy()).max() < 1e-4


def test_shrink_and_lowrank_compose_both_ways(tmp_path, mnist, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    src = tmp_path / "evci.pt"
    src.write_bytes((SAMPLES / "evci_cnn.pt").read_bytes())
    fast = ["--data", mnist, "--calib", "200", "--eval", "300", "-q"]
    assert main(["lowrank", str(src), "--arch", "samples.nets:EvciCNN", "--rank", "6", *fast]) == 0
    assert main(["shrink", str(tmp_path / "evci.lowrank.safetensors"), "--ratio", "0.3", *fast]) == 0
    assert main(["shrink", str(src), "--arch", "samples.nets:EvciCNN", "--ratio", "0.3", *fast]) == 0
    assert main(["lowrank", str(tmp_path / "evci.shrunk.safetensors"), "--energy", "0.95", *fast]) == 0
    x = torch.rand(3, 1, 28, 28)
    for name in ("evci.lowrank.shrunk.safetensors", "evci.shrunk.lowrank.safetensors"):
        model = prunetool.load(tmp_path / name).model
        assert model(x).shape == (3, 10)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["lowrank", "shrink", "shrink", "lowrank"]


@pytest.mark.parametrize("args,needle", [
    (["--rank", "0"], "--rank"), (["--energy", "1.5"], "--energy"), (["--rank", "3", "--energy", "0.9"], "one of"),
    (["--data-aware", "--input-shape", "1,28,28"], "--data"), (["--layers", "nothing*", "--input-shape", "1,28,28"],
                                                              "--layers"),
])
def test_lowrank_bad_input(args, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    src = tmp_path / "evci.pt"
    src.write_bytes((SAMPLES / "evci_cnn.pt").read_bytes())
    assert main(["lowrank", str(src), "--arch", "samples.nets:EvciCNN", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evci.pt"]


def test_default_caps_each_layers_output_error_on_the_calibration_data(mnist_small):
    """With data the default is data-aware; no layer loses more than --max-layer-error of its output energy, which
    is the empirical relative error of its output on the calibration inputs (a Linear: every row), up to the small
    ridge that keeps the Cholesky factor of a covariance with constant inputs defined."""
    from prunetool.data import calibration

    small, report = lowrank(SAMPLES / "evci_cnn.pt", mnist_small, arch="samples.nets:EvciCNN", calib=300,
                            measure=False)
    assert report["settings"]["method"] == "auto" and report["settings"]["data_aware"] is True
    factored = [e for e in report["layers"] if e["rank"] is not None]
    assert factored and all(e["relative_output_error"] <= 0.02 for e in factored)
    assert all(e["rule"].split(",")[0] in ("elbow", "output-error cap") for e in factored)  # perhaps raised
    fc = next(e for e in factored if e["name"] == "classifier.1")
    dense = prunetool.load(SAMPLES / "evci_cnn.pt", arch="samples.nets:EvciCNN").model
    x, _ = calibration(mnist_small, 300).all()
    features = torch.flatten(dense.features(x), 1)
    with torch.no_grad():
        want, got = dense.classifier[1](features), small.classifier[1](features)
    measured = float(((want - got) ** 2).sum() / (want ** 2).sum())
    assert measured == pytest.approx(fc["relative_output_error"], rel=1e-2)


def test_plain_elbow_is_an_explicit_choice(mnist_small):
    _, report = lowrank(SAMPLES / "evci_cnn.pt", mnist_small, arch="samples.nets:EvciCNN", calib=128,
                        raw_elbow=True, data_aware=False, measure=False)
    first = next(e for e in report["layers"] if e["name"] == "features.0")
    assert report["settings"]["method"] == "elbow" and first["rank"] == first["elbow"] == 3  # Heitmann's, uncapped


def test_the_literal_elbow_with_labelled_data_holds_the_calibration_accuracy(mnist_small):
    """``--elbow`` is the default rule: whitened, capped, then raised until the calibration accuracy is within
    half a point; the raw rule loses more there."""
    from prunetool.data import calibration
    from prunetool.measure import quality_on

    samples = calibration(mnist_small, 128)
    dense = evci_cnn()
    base = quality_on(dense, samples).value
    small, report = lowrank(dense, mnist_small, calib=128, elbow=True, measure=False)
    assert report["settings"]["method"] == "auto"
    assert base - quality_on(small, samples).value <= 0.5
    raw, _ = lowrank(dense, mnist_small, calib=128, raw_elbow=True, data_aware=False, measure=False)
    assert base - quality_on(raw, samples).value > 0.5


def test_predicted_loss_is_the_fisher_weighted_whitened_residual():
    """½ Σ_{i>k} σ_i² Σ_j F_j U_ji² equals ½ Σ_j F_j E[((W − W_k) x)_j²] over the samples the covariance comes from."""
    from prunetool.factor import predicted_loss

    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=False)
    x = torch.randn(500, 6) @ torch.randn(6, 6)
    cov = (x.T @ x / len(x)).double()
    spec = spectrum(layer, cov)
    fisher = torch.tensor([0.5, 2.0, 1.0, 3.0])
    curve = predicted_loss(spec, fisher)
    for k in range(1, 4):
        approx = factor(layer, k, spec)
        with torch.no_grad():
            delta = (layer(x) - approx(x)).double()
        direct = 0.5 * float((fisher.double() * (delta ** 2).mean(0)).sum())
        assert float(curve[k]) == pytest.approx(direct, rel=1e-4)
    assert float(curve[len(spec.sigma)]) == 0.0


@pytest.mark.parametrize("search", ["allocate", "greedy"])
def test_budget_meets_the_target(mnist_small, search):
    dense = prunetool.load(SAMPLES / "evci_cnn.pt", arch="samples.nets:EvciCNN").model
    before = sum(p.numel() for p in dense.parameters())
    small, report = lowrank(dense, mnist_small, target_params=0.5, search=search, calib=200, measure=False)
    assert sum(p.numel() for p in small.parameters()) <= 0.5 * before
    evaluations = report["settings"]["search_evaluations"]
    assert evaluations == 0 if search == "allocate" else evaluations >= 10  # AIMET-style: candidates per layer


def test_output_heads_only_when_named_exactly():
    from prunetool.factor import candidates
    from samples.nets import EvciCNN

    model = EvciCNN()
    names, heads = candidates(model, ["classifier.3"], "classifier.*")
    assert names == ["classifier.1"] and heads == []
    names, heads = candidates(model, ["classifier.3"], "classifier.3")
    assert names == ["classifier.3"] and heads == ["classifier.3"]


def test_compress_keeps_the_best_plan_within_the_budget(mnist_small, tmp_path):
    from prunetool import compress

    dense = prunetool.load(SAMPLES / "evci_cnn.pt", arch="samples.nets:EvciCNN")
    before = sum(p.numel() for p in dense.model.parameters())
    small, report = compress(dense, mnist_small, target_params=0.3, max_drop=3.0, calib=200, eval=300,
                             latency_batches=(), out=str(tmp_path / "c.safetensors"))
    plans = report["settings"]["plans"]
    assert [p["plan"] for p in plans] == ["shrink", "lowrank", "shrink+lowrank", "lowrank+shrink"]
    ok = [p for p in plans if p.get("reached") and p["calibration_drop"] <= 3.0]
    chosen = next(p for p in plans if p["plan"] == report["settings"]["plan"])
    assert chosen["calibration_accuracy"] == max(p["calibration_accuracy"] for p in ok)  # accuracy: the sample is a classifier
    assert sum(p.numel() for p in small.parameters()) <= 0.3 * before
    assert report["verify"]["reload"] == "identical"
    assert [s["command"] for s in report["steps"]] == report["settings"]["plan"].split("+")
    again = prunetool.load(tmp_path / "c.safetensors").model
    x = mnist_small.test.tensors[0][:20]
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
