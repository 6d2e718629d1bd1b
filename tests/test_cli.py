"""The command line: the full job on a sample, the JSON report, and every kind of bad input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from prunetool.cli import main

from conftest import ROOT, SAMPLES, evci_cnn

EVCI = ["--arch", "samples.nets:EvciCNN"]


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "evci.pt"
    shutil.copy(SAMPLES / "evci_cnn.pt", path)
    return path


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def run(*args):
    return main([str(a) for a in args])


def test_evci_reproduction_has_4019_parameters(ckpt, mnist, tmp_path, capsys):
    """Evci's MNIST CNN at ratio 0.6 keeps 4, 7 and 26 units: 4019 parameters (thesis §4.2)."""
    report_path = tmp_path / "r.json"
    assert run("shrink", ckpt, *EVCI, "--data", mnist, "--ratio", 0.6, "--eval", 500, "--calib", 300,
               "--json", report_path) == 0
    report = json.loads(report_path.read_text())
    assert report["before"]["params"] == 20522
    assert report["after"]["params"] == 4019
    assert [layer["units_after"] for layer in report["layers"]] == [4, 7, 26]
    assert (tmp_path / "evci.shrunk.safetensors").exists()
    out = capsys.readouterr().out
    assert "4,019" in out and "accuracy drop" in out


def test_json_report_fields(ckpt, mnist, tmp_path, capsys):
    report_path = tmp_path / "r.json"
    assert run("shrink", ckpt, *EVCI, "--data", mnist, "--ratio", 0.5, "--eval", 300, "--calib", 200,
               "--criterion", "l1", "--compensate", "mean", "--json", report_path, "--quiet") == 0
    report = json.loads(report_path.read_text())
    for side in ("before", "after"):
        snap = report[side]
        assert {"params", "macs", "file_bytes", "accuracy", "loss", "latency_ms"} <= set(snap)
        assert set(snap["latency_ms"]) == {"1", "32"} and all(v > 0 for v in snap["latency_ms"].values())
        assert 0 <= snap["accuracy"] <= 100
    assert report["after"]["macs"] < report["before"]["macs"]
    assert report["after"]["file_bytes"] == os.path.getsize(tmp_path / "evci.shrunk.safetensors")
    assert report["before"]["file_bytes"] == os.path.getsize(SAMPLES / "evci_cnn.pt")
    assert report["accuracy_drop"] == pytest.approx(report["before"]["accuracy"] - report["after"]["accuracy"])
    assert report["settings"]["criterion"] == "l1" and report["settings"]["compensation"] == "mean"
    assert report["layers"][0] == {"name": "features.0", "units_before": 8, "units_after": 4,
                                   "producers": ["features.0"]}
    assert report["verify"]["ratio_zero"] == "exact" and report["verify"]["reload"] == "identical"
    assert report["verify"]["constant_unit_rel_diff"] < 1e-4
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("shrink: 20522 → ")


def test_structure_only_run(ckpt, tmp_path, capsys):
    report_path = tmp_path / "r.json"
    assert run("shrink", ckpt, *EVCI, "--input-shape", "1,28,28", "--criterion", "l2", "--ratio", 0.3,
               "--calib", 64, "--json", report_path) == 0
    report = json.loads(report_path.read_text())
    assert report["before"]["accuracy"] is None and report["accuracy_drop"] is None
    assert report["after"]["params"] < report["before"]["params"]
    # no labels: the cut is measured against the dense model, by top-1 agreement on the calibration inputs
    assert report["metric"]["name"] == "agreement" and report["metric"]["against"] == "dense"
    assert 0 <= report["fidelity"]["value"] <= 100 and report["fidelity"]["samples"] == 64
    assert "against the dense model" in capsys.readouterr().out


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("prunetool: error: ")
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def _npz(path, shape):
    x = np.zeros((4, *shape), dtype=np.uint8)
    y = np.zeros(4, dtype=np.int64)
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
    return path


BAD_INPUTS = {
    "missing file": (lambda d, c, m: [d / "nope.pt", *EVCI, "--data", m], ["no such file"]),
    "not a checkpoint": (lambda d, c, m: [_text(d / "notes.pt"), *EVCI, "--data", m], ["not a PyTorch checkpoint"]),
    "state_dict does not fit arch": (lambda d, c, m: [c, "--arch", "samples.nets:LeNet300100", "--data", m],
                                     ["does not fit --arch", "--arch-kwargs"]),
    "state_dict without arch": (lambda d, c, m: [c, "--data", m], ["--arch"]),
    "ratio above range": (lambda d, c, m: [c, *EVCI, "--data", m, "--ratio", "1.0"], ["--ratio", "[0, 1)"]),
    "ratio below range": (lambda d, c, m: [c, *EVCI, "--data", m, "--ratio", "-0.1"], ["--ratio"]),
    "ratio not a number": (lambda d, c, m: [c, *EVCI, "--data", m, "--ratio", "lots"], ["--ratio"]),
    "unknown criterion": (lambda d, c, m: [c, *EVCI, "--data", m, "--criterion", "magic"], ["magic", "mrs"]),
    "unknown compensation": (lambda d, c, m: [c, *EVCI, "--data", m, "--compensate", "magic"], ["magic", "lstsq"]),
    "data shape does not fit": (lambda d, c, m: [c, *EVCI, "--data", _npz(d / "rgb.npz", (3, 32, 32))],
                                ["(3, 32, 32)", "do not fit the model"]),
    "unknown data spec": (lambda d, c, m: [c, *EVCI, "--data", "imagenet"], ["--data"]),
    "missing mnist root": (lambda d, c, m: [c, *EVCI, "--data", f"mnist:{d / 'none'}"], ["--download"]),
    "no data and no shape": (lambda d, c, m: [c, *EVCI], ["--input-shape"]),
    "bad arch": (lambda d, c, m: [c, "--arch", "samples.nets:Nope", "--data", m], ["Nope"]),
    "bad arch kwargs": (lambda d, c, m: [c, *EVCI, "--arch-kwargs", "{num", "--data", m], ["--arch-kwargs"]),
    "output dir missing": (lambda d, c, m: [c, *EVCI, "--data", m, "--out", d / "no" / "x.pt"], ["does not exist"]),
    "output is a directory": (lambda d, c, m: [c, *EVCI, "--data", m, "--out", d], ["directory"]),
    "output is the input": (lambda d, c, m: [c, *EVCI, "--data", m, "--out", c], ["input"]),
}


def _text(path):
    path.write_text("these are not weights\n")
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_no_output(case, ckpt, mnist, tmp_path, capsys):
    make_args, needles = BAD_INPUTS[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    ckpt_bytes = ckpt.read_bytes()
    code = run("shrink", *make_args(tmp_path, ckpt, mnist), "--calib", 50, "--eval", 50)
    assert code == 2
    _one_line_error(capsys, *needles)
    after = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith((".npz", "notes.pt")))
    assert after == [n for n in before], "no output file may be written"
    assert ckpt.read_bytes() == ckpt_bytes


def test_pickled_module_without_unsafe_pickle(tmp_path, mnist, capsys):
    path = tmp_path / "whole.pt"
    torch.save(evci_cnn(), path)
    assert run("shrink", path, "--data", mnist, "--calib", 50, "--eval", 50) == 2
    _one_line_error(capsys, "--unsafe-pickle")
    assert not (tmp_path / "whole.shrunk.safetensors").exists()
    assert run("shrink", path, "--unsafe-pickle", "--data", mnist, "--calib", 50, "--eval", 50, "-q") == 0
    assert (tmp_path / "whole.shrunk.safetensors").exists()


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "prunetool", "shrink", str(tmp_path / "missing.pt")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_help_has_examples():
    proc = subprocess.run([sys.executable, "-m", "prunetool", "shrink", "--help"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0
    assert "Examples:" in proc.stdout and "--criterion" in proc.stdout
