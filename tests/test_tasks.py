"""Tasks beyond classification: segmentation masks (mean IoU), and, without labels, fidelity to the dense model
(agreement, mean IoU of the argmax maps, output error), reported and held to --max-drop."""

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prunetool import task
from prunetool.cli import main

SEGNET = '''
import torch
from torch import nn


class Seg(nn.Module):
    """A small fully convolutional segmenter: N × 3 × 16 × 16 → N × 4 × 16 × 16 logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 24, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        return self.head(self.body(x))


class Embed(nn.Module):
    """A regression / embedding net: N × 8 → N × 1."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x):
        return self.fc(x)


def build():
    torch.manual_seed(0)
    return Seg()


def embed():
    torch.manual_seed(0)
    return Embed()
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "segnets.py").write_text(SEGNET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "segnets", raising=False)
    import segnets

    torch.save(segnets.build().state_dict(), "seg.pt")
    torch.save(segnets.embed().state_dict(), "embed.pt")
    rng = np.random.default_rng(0)
    x = rng.random((48, 3, 16, 16)).astype("float32")
    y = rng.integers(0, 4, (48, 16, 16))
    y[:, :2] = 255  # unlabelled rows
    np.savez("seg.npz", x_train=x[:32], y_train=y[:32], x_test=x[32:], y_test=y[32:])
    return tmp_path


def test_mean_iou_and_per_pixel_loss_by_hand():
    y = torch.tensor([[[0, 0], [1, task.IGNORE]]])  # 1 × 2 × 2, one pixel unlabelled
    out = torch.zeros(1, 3, 2, 2)
    out[0, 0, 0, 0] = out[0, 1, 0, 1] = out[0, 1, 1, 0] = 5.0  # predicts 0, 1 | 1, *
    tally = task.Tally()
    tally.add(out, y)
    q = tally.result()
    # class 0: 1 hit, union 2; class 1: 1 hit, union 2 → mean IoU 50%; pixel accuracy 2 of 3
    assert q.metric == "miou" and q.miou == pytest.approx(50.0) and q.accuracy == pytest.approx(200 / 3)
    want = F.cross_entropy(out, y, ignore_index=task.IGNORE)
    assert q.loss == pytest.approx(float(want))


@pytest.mark.parametrize("shape, metric", [((6, 5), "agreement"), ((6, 4, 3, 3), "miou"), ((6, 1), "output error"),
                                           ((6, 84, 20), "output error")])
def test_fidelity_of_a_model_with_itself_is_perfect(shape, metric):
    out = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    f = task.Fidelity()
    f.add(out, out.clone())
    r = f.result()
    assert r["metric"] == metric and r["value"] == f.perfect()
    assert r["cosine"] == pytest.approx(1.0) and r["output_error"] == 0.0


def test_fidelity_counts_what_changed():
    dense = torch.zeros(4, 3)
    dense[:, 0] = 1.0
    small = dense.clone()
    small[1] = torch.tensor([0.0, 2.0, 0.0])  # one of four samples changes its class
    f = task.Fidelity()
    f.add(dense, small)
    r = f.result()
    assert r["value"] == pytest.approx(75.0)
    assert r["output_error"] == pytest.approx(100 * (5 ** 0.5) / 2)  # ‖(−1, 2, 0)‖ / ‖4 ones‖


def test_segmentation_masks_give_mean_iou_with_unlabelled_pixels_ignored(project, capsys):
    code = main(["shrink", "seg.pt", "--arch", "segnets:build", "--data", "seg.npz", "--ratio", "0.25",
                 "--no-latency", "--out", "s.safetensors", "--json", "r.json"])
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads((project / "r.json").read_text())
    m = report["metric"]
    assert m["name"] == "miou" and m["unit"] == "pp" and 0 < m["before"] <= 100
    assert report["before"]["miou"] == m["before"] and "fidelity" not in report
    assert "mean IoU" in printed and "pixel accuracy" in printed


def test_masks_of_another_size_are_refused_in_one_line(project, capsys):
    rng = np.random.default_rng(1)
    np.savez("bad.npz", x_train=rng.random((8, 3, 16, 16)).astype("float32"), y_train=rng.integers(0, 4, (8, 8, 8)),
             x_test=rng.random((4, 3, 16, 16)).astype("float32"), y_test=rng.integers(0, 4, (4, 8, 8)))
    code = main(["shrink", "seg.pt", "--arch", "segnets:build", "--data", "bad.npz", "--no-latency"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "masks are (8, 8)" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("arch, shape, metric", [("segnets:build", "3,16,16", "miou"),
                                                 ("segnets:embed", "8", "output error")])
def test_without_labels_the_cut_is_measured_against_the_dense_model_and_gated(project, capsys, arch, shape, metric):
    ckpt = "seg.pt" if arch.endswith("build") else "embed.pt"
    common = ["shrink", ckpt, "--arch", arch, "--input-shape", shape, "--calib", "64", "--no-latency"]
    code = main([*common, "--ratio", "0", "--out", "zero.safetensors", "--json", "zero.json", "--max-drop", "0"])
    assert code == 0, capsys.readouterr().err
    zero = json.loads((project / "zero.json").read_text())
    assert zero["metric"]["name"] == metric and zero["metric"]["drop"] == 0  # ratio 0: the dense model itself
    code = main([*common, "--ratio", "0.6", "--compensate", "none", "--out", "cut.safetensors", "--json", "cut.json",
                 "--max-drop", "0"])
    printed = capsys.readouterr()
    report = json.loads((project / "cut.json").read_text())
    assert report["fidelity"]["metric"] == metric and report["metric"]["against"] == "dense"
    assert report["metric"]["drop"] > 0 and code == 1 and "budget missed" in printed.err
    assert "against the dense model" in printed.out


def test_fidelity_can_be_named_and_a_wrong_name_is_refused(project, capsys):
    common = ["shrink", "seg.pt", "--arch", "segnets:build", "--input-shape", "3,16,16", "--calib", "32",
              "--no-latency", "--ratio", "0.3"]
    code = main([*common, "--fidelity", "error", "--out", "e.safetensors", "--json", "e.json"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((project / "e.json").read_text())
    assert report["fidelity"]["metric"] == "output error" and report["metric"]["unit"] == "%"
    capsys.readouterr()
    code = main([*common, "--fidelity", "iou"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--fidelity 'iou'" in err and len(err.splitlines()) == 1
