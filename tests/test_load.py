"""Loading checkpoints in every accepted form, and saving prunetool's own."""

import json

import pytest
import torch

import prunetool
from prunetool.errors import UsageError
from prunetool.load import load

from conftest import SAMPLES, evci_cnn


def test_state_dict_with_arch():
    ckpt = load(SAMPLES / "evci_cnn.pt", arch="samples.nets:EvciCNN")
    assert sum(p.numel() for p in ckpt.model.parameters()) == 20522
    assert len(ckpt.sha256) == 64


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}},
    lambda sd: {"model": sd, "epoch": 3},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
])
def test_nested_and_prefixed_state_dicts(tmp_path, wrap):
    sd = evci_cnn().state_dict()
    path = tmp_path / "c.pt"
    torch.save(wrap(sd), path)
    model = load(path, arch="samples.nets:EvciCNN").model
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)


def test_arch_from_file_path(tmp_path):
    model = load(SAMPLES / "evci_cnn.pt", arch=f"{SAMPLES / 'nets.py'}:EvciCNN").model
    assert type(model).__name__ == "EvciCNN"


def test_pickled_module_needs_unsafe_flag(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(evci_cnn(), path)
    with pytest.raises(UsageError, match="--unsafe-pickle"):
        load(path)
    assert type(load(path, unsafe_pickle=True).model).__name__ == "EvciCNN"


def test_own_output_loads_without_flags_and_with_weights_only(tmp_path, mnist_small):
    out = tmp_path / "small.pt"
    small, report = prunetool.shrink(SAMPLES / "evci_cnn.pt", mnist_small, "l2", 0.5, "mean", calib=200,
                                     arch="samples.nets:EvciCNN", out=str(out), measure=False)
    raw = torch.load(out, weights_only=True)
    record = json.loads(raw["record"])
    assert record["criterion"] == "l2" and record["ratio"] == 0.5 and record["compensation"] == "mean"
    assert record["source_sha256"] == load(SAMPLES / "evci_cnn.pt", arch="samples.nets:EvciCNN").sha256
    assert record["prunetool_version"] == prunetool.__version__
    assert [layer["units_after"] for layer in record["layers"]] == [4, 8, 32]
    again = prunetool.load(out)
    x = mnist_small.test.tensors[0][:100]
    with torch.no_grad():
        assert torch.equal(again.model(x), small(x))
    assert again.record["criterion"] == "l2"


def test_shrunk_output_is_a_valid_input_again(tmp_path, mnist_small):
    first = tmp_path / "a.pt"
    prunetool.shrink(SAMPLES / "evci_cnn.pt", mnist_small, "mrs", 0.5, "lstsq", calib=200,
                     arch="samples.nets:EvciCNN", out=str(first), measure=False)
    second = tmp_path / "b.pt"
    small, _ = prunetool.shrink(str(first), mnist_small, "mrs", 0.5, "lstsq", calib=200, out=str(second),
                                measure=False)
    assert [m.out_features for m in small.modules() if isinstance(m, torch.nn.Linear)] == [16, 10]
    assert len(json.loads(torch.load(second, weights_only=True)["record"])["history"]) == 2


def test_biasless_conv_gaining_a_bias_reloads(tmp_path, mnist_small):
    """lstsq gives a biasless consumer a bias; the reload must recreate it."""
    from conftest import functional_net

    out = tmp_path / "f.pt"
    model = functional_net()
    small, _ = prunetool.shrink(model, mnist_small, "mrs", 0.5, "lstsq", calib=200, out=str(out),
                                arch="conftest:FunctionalNet", measure=False)
    assert small.conv2.bias is not None
    again = prunetool.load(out).model
    x = mnist_small.test.tensors[0][:50]
    with torch.no_grad():
        assert torch.equal(again(x), small(x))


def test_skipped_initialisation_never_loops_on_uninitialised_memory():
    """torch's trunc_normal_ draws again until every value is in range; with its draws skipped it must not read the
    memory it was given (here out of range everywhere) and loop for ever."""
    from prunetool.load import _NoRandomInit

    t = torch.full((300,), 1e30)
    with _NoRandomInit():
        torch.nn.init.trunc_normal_(t)
        assert bool((t < 0).any()) is False  # the skipped tensor compares as in range
    assert (t < 0).shape == t.shape and bool((t > 1).all())  # outside the build, comparisons are real again
