"""inspect: numbers on matrices with known spectra, planted dead units, the HTML page."""

import json
import math

import pytest
import torch

from prunetool.cli import main
from prunetool.factor import Spectrum, elbow
from prunetool import inspect
from prunetool.redundancy import effective_rank, frame_potential, marchenko_pastur, stable_rank

from conftest import ROOT, SAMPLES


def test_ranks_of_known_matrices():
    eye = torch.ones(50)
    assert stable_rank(eye) == pytest.approx(50) and effective_rank(eye) == pytest.approx(50)
    one = torch.tensor([3.0] + [0.0] * 9)
    assert stable_rank(one) == pytest.approx(1) and effective_rank(one) == pytest.approx(1)
    torch.manual_seed(0)
    low = torch.randn(60, 5) @ torch.randn(5, 80) + 1e-3 * torch.randn(60, 80)
    sigma = torch.linalg.svdvals(low.double())
    assert elbow(Spectrum(sigma, None, None)) == 5


def test_marchenko_pastur_edge_and_spikes():
    torch.manual_seed(0)
    m, n = 200, 800
    noise = torch.randn(m, n)
    mp = marchenko_pastur(noise)
    assert mp["q"] == pytest.approx(0.25)
    assert mp["lambda_plus"] == pytest.approx(mp["sigma2"] * 2.25)
    assert mp["sigma2"] == pytest.approx(1.0, rel=0.02)
    assert mp["spikes"] <= 1
    spiked = noise.clone()
    for i, strength in enumerate((8.0, 6.0, 5.0)):
        u, v = torch.randn(m), torch.randn(n)
        spiked += strength * torch.outer(u / u.norm(), v / v.norm()) * math.sqrt(n)
    assert marchenko_pastur(spiked)["spikes"] == 3
    assert marchenko_pastur(spiked.T)["spikes"] == 3  # orientation does not matter


def test_frame_potential_of_orthonormal_and_repeated_rows():
    assert frame_potential(torch.eye(6)) == pytest.approx(6)
    assert frame_potential(torch.ones(4, 3)) == pytest.approx(16)


def test_planted_dead_units_are_reported_dead_frozen_and_ranked_lowest(mnist_small):
    import prunetool

    model = prunetool.load(SAMPLES / "lenet_300_100.pt", arch="samples.nets:LeNet300100").model
    fc = model.classifier[3]  # 300 → 100
    planted = [3, 7, 42]
    with torch.no_grad():
        for i in planted:
            fc.weight[i] = 0.0
            fc.bias[i] = -1.0  # ReLU(−1) = 0 for every input
    report = inspect(model, mnist_small, calib=200)
    group = next(g for g in report["groups"] if g["name"] == "classifier.3")
    assert set(planted) <= set(group["dead"])
    assert set(planted) <= set(group["frozen"])
    mrs = torch.tensor(group["mrs_per_sample"])
    # lowest: nothing scores below them (the trained net has a few naturally dead units that tie at zero)
    assert mrs[planted].max() <= mrs.min() + 1e-12
    assert group["dead_by"] == "mrp"


def test_cli_writes_a_self_contained_page(tmp_path, mnist, monkeypatch):
    monkeypatch.chdir(ROOT)
    html = tmp_path / "page.html"
    assert main(["inspect", str(SAMPLES / "evci_cnn.pt"), "--arch", "samples.nets:EvciCNN", "--data", mnist,
                 "--calib", "100", "--html", str(html), "--plots", str(tmp_path / "plots"), "--json",
                 str(tmp_path / "i.json")]) == 0
    text = html.read_text()
    assert text.count("data:image/png;base64,") >= 3 * 4 and "http" not in text.replace("http-equiv", "")
    report = json.loads((tmp_path / "i.json").read_text())
    assert [m["name"] for m in report["layers"]] == ["features.0", "features.3", "classifier.1", "classifier.3"]
    for m in report["layers"]:
        assert {"singular_values", "stable_rank", "effective_rank", "elbow_rank", "elbow_energy", "mp",
                "frame_potential", "lowrank_at_elbow"} <= set(m)
    assert len(list((tmp_path / "plots").glob("*.png"))) >= 3 * 4


def test_plots_never_replaces_a_folder_of_other_files(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("keep me")
    code = main(["inspect", str(SAMPLES / "evci_cnn.pt"), "--arch", "samples.nets:EvciCNN", "--input-shape",
                 "1,28,28", "--calib", "16", "--plots", str(folder)])
    assert code == 2 and "did not write" in capsys.readouterr().err
    assert (folder / "thesis.tex").read_text() == "keep me"
