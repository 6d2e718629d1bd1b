"""Inputs beyond one tensor, through the CLI in process: named .npz arrays mapped to a forward's parameters, token
ids given to a forward whose parameter is not ``input_ids``, and data that fits no parameter refused in one line
before any work; too few calibration samples warned about."""

import numpy as np
import pytest
import torch

import prunetool
from prunetool.cli import main

NETS = '''
import torch
from torch import nn


class Net(nn.Module):
    """Two inputs: a flat image and a metadata vector."""

    def __init__(self):
        super().__init__()
        self.image, self.meta = nn.Linear(8, 16), nn.Linear(3, 16)
        self.hidden, self.out = nn.Linear(32, 24), nn.Linear(24, 4)

    def forward(self, image, meta):
        z = torch.cat([torch.relu(self.image(image)), torch.relu(self.meta(meta))], 1)
        return self.out(torch.relu(self.hidden(z)))


class Pair(Net):
    """Two inputs called x and y: the labels must then be labels_train, labels_test."""

    def forward(self, x, y):
        return super().forward(x, y)


class Tokens(nn.Module):
    """A token classifier whose forward's parameter is not called input_ids."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.hidden, self.out = nn.Linear(16, 32), nn.Linear(32, 3)

    def forward(self, tokens):
        return self.out(torch.relu(self.hidden(self.embed(tokens).mean(1))))


def build():
    return Net()
'''


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "mynet.py").write_text(NETS)
    import importlib

    import mynet
    importlib.reload(mynet)  # each test's own file, not a cached module of an earlier tmp_path
    torch.manual_seed(0)
    for name in ("Net", "Pair", "Tokens"):
        torch.save(getattr(mynet, name)().state_dict(), tmp_path / f"{name.lower()}.pt")
    return tmp_path


def _run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, err.strip().splitlines()


def _one_line(code, err, *needles):
    assert code == 2 and len(err) == 1 and err[0].startswith("prunetool: error: "), err
    for needle in needles:
        assert needle in err[0], err[0]


def _arrays(n, **shapes):
    rng = np.random.default_rng(n)
    return {k: rng.normal(size=(n, *s)).astype(np.float32) for k, s in shapes.items()}


def _named_npz(path, train=64, test=32, label="y", **shapes):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", train), ("test", test)):
        arrays.update({f"{k}_{split}": v for k, v in _arrays(n, **shapes).items()})
        arrays[f"{label}_{split}"] = rng.integers(0, 4, n)
    np.savez(path, **arrays)


FAST = ["--ratio", "0.3", "--calib", "64", "--eval", "32", "--no-latency", "-q"]


def test_two_input_model_with_named_arrays_shrinks(work, capsys):
    _named_npz(work / "d.npz", image=(8,), meta=(3,))
    code, err = _run(["shrink", "net.pt", "--arch", "mynet:Net", "--data", "d.npz", *FAST, "--out", "small.pt"],
                     capsys)
    assert code == 0, err
    small = prunetool.load("small.pt").model
    logits = small(image=torch.zeros(2, 8), meta=torch.zeros(2, 3))
    assert logits.shape == (2, 4) and small.hidden.out_features < 24


def test_parameters_called_x_and_y_take_labels_as_labels_arrays(work, capsys):
    _named_npz(work / "d.npz", label="labels", x=(8,), y=(3,))
    code, err = _run(["shrink", "pair.pt", "--arch", "mynet:Pair", "--data", "d.npz", *FAST, "--out", "small.pt"],
                     capsys)
    assert code == 0, err
    assert (work / "small.pt").exists()


def test_token_model_whose_parameter_is_not_input_ids(work, capsys):
    rng = np.random.default_rng(0)
    np.savez(work / "ids.npz", input_ids=rng.integers(0, 50, (80, 12)), labels=rng.integers(0, 3, 80),
             attention_mask=np.ones((80, 12), dtype=np.int64))
    code, err = _run(["shrink", "tokens.pt", "--arch", "mynet:Tokens", "--data", "ids.npz", *FAST, "--out",
                      "small.pt"], capsys)
    assert code == 0, err
    assert prunetool.load("small.pt").model(tokens=torch.zeros(2, 12, dtype=torch.long)).shape == (2, 3)
    code, err = _run(["shrink", "tokens.pt", "--arch", "mynet:Tokens", "--tokens", "12", "--ratio", "0.3", "--calib",
                      "16", "--no-latency", "-q", "--out", "random.pt"], capsys)
    assert code == 0, err


def test_image_data_into_a_token_model_is_one_line(work, capsys):
    np.savez(work / "img.npz", **{f"x_{s}": np.random.default_rng(0).random((n, 1, 4, 4)).astype(np.float32)
                                  for s, n in (("train", 40), ("test", 20))},
             y_train=np.zeros(40, dtype=np.int64), y_test=np.zeros(20, dtype=np.int64))
    code, err = _run(["shrink", "tokens.pt", "--arch", "mynet:Tokens", "--data", "img.npz", *FAST], capsys)
    _one_line(code, err, "img.npz", "embedding embed", "input_ids")
    assert not (work / "tokens.shrunk.safetensors").exists()


@pytest.mark.parametrize("arch, needles", [
    ("mynet:Net", ("(image, meta)", "image_train, meta_train", "y_train")),
    ("mynet:Pair", ("(x, y)", "x_train, y_train", "labels_train")),
])
def test_two_input_model_with_one_input_array_is_one_line(work, capsys, arch, needles):
    rng = np.random.default_rng(0)
    np.savez(work / "plain.npz", x_train=rng.normal(size=(40, 8)).astype(np.float32), y_train=rng.integers(0, 4, 40),
             x_test=rng.normal(size=(20, 8)).astype(np.float32), y_test=rng.integers(0, 4, 20))
    code, err = _run(["shrink", f"{arch.split(':')[1].lower()}.pt", "--arch", arch, "--data", "plain.npz", *FAST],
                     capsys)
    _one_line(code, err, "plain.npz", "x_train/x_test", *needles)


def test_named_arrays_the_forward_does_not_take_are_one_line(work, capsys):
    _named_npz(work / "d.npz", image=(8,), extra=(3,))
    code, err = _run(["shrink", "net.pt", "--arch", "mynet:Net", "--data", "d.npz", *FAST], capsys)
    _one_line(code, err, "(image, meta)", "image_train, extra_train", "image_train, meta_train")


def test_two_input_model_with_an_input_shape_is_one_line(work, capsys):
    code, err = _run(["shrink", "net.pt", "--arch", "mynet:Net", "--input-shape", "8", "--calib", "8", "--no-latency"],
                     capsys)
    _one_line(code, err, "(image, meta)", "--input-shape", "--data", "image_train")


def test_too_few_calibration_samples_warn_once_naming_calib(work, capsys):
    _named_npz(work / "d.npz", image=(8,), meta=(3,))
    code, err = _run(["shrink", "net.pt", "--arch", "mynet:Net", "--data", "d.npz", "--ratio", "0.3", "--calib", "1",
                      "--eval", "32", "--no-latency", "-q", "--out", "small.pt"], capsys)
    assert code == 0, err
    warning = [line for line in err if line.startswith("prunetool: warning: ")]
    assert len(warning) == 1 and "--calib 1" in warning[0] and "--calib 64 or more" in warning[0], err
