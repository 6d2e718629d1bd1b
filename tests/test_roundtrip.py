"""Every output is a real artefact: written through the user's path, reloaded in a fresh process from another
directory with no flags, identical outputs; depthwise groups, layer scales, container widths, version metadata,
dtypes, safetensors, third-party layers, exports; and files that must be refused."""

import copy
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunetool
from prunetool.cli import main
from prunetool.errors import UsageError
from prunetool.trace import trace

import zoo

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory):
    """Each zoo model in float32 and float16, shrunk at ratio 0.5 from a state_dict file, saved in both formats;
    with the outputs the returned model gives (float32 compute; a float16 result is returned in float16, as saved)."""
    d = tmp_path_factory.mktemp("roundtrip")
    cases = {}
    for name in ("DepthwiseSENet", "ThirdPartyNet"):
        for dtype in (torch.float32, torch.float16):
            src = d / f"{name}_{str(dtype)[6:]}.pt"
            torch.save({k: v.to(dtype) if v.is_floating_point() else v
                        for k, v in zoo.build(name).state_dict().items()}, src)
            for fmt in (".safetensors", ".pt"):
                out = d / f"{src.stem}.small{fmt}"
                small, report = prunetool.shrink(str(src), None, "l2", 0.5, "mean", arch=f"zoo:{name}", calib=16,
                                                 input_shape=(3, 16, 16), out=str(out), measure=False)
                with torch.no_grad():
                    cases[str(out)] = (copy.deepcopy(small).float()(X), report, small)
    torch.save({k: v[0] for k, v in cases.items()}, d / "expected.pt")
    return d, cases


def test_reload_in_a_fresh_process_elsewhere_is_identical(shrunk, tmp_path):
    d, cases = shrunk
    script = f"""
import torch, prunetool
torch.set_num_threads(1)
expected = torch.load({str(d / 'expected.pt')!r})
x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
for path, want in expected.items():
    model = prunetool.load(path).model.float()
    with torch.no_grad():
        assert torch.equal(model(x), want), path
print(len(expected), "identical")
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PRUNETOOL_KEY": os.environ["PRUNETOOL_KEY"]})  # this machine
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{len(cases)} identical"
    assert "imported zoo from" in proc.stderr  # found through the directory recorded in the file


def test_depthwise_groups_and_container_widths_follow_the_cut(shrunk):
    _, cases = shrunk
    path = next(p for p in cases if "DepthwiseSENet_float32.small.safetensors" in p)
    for model in (cases[path][2], prunetool.load(path).model):
        dw = model.block1.dw[0]
        width = model.block1.expand[0].out_channels
        assert dw.groups == dw.in_channels == dw.out_channels == width == 32  # 64 hidden units, half cut
        assert model.stem.out_channels == model.stem[0].out_channels == 8  # Conv2dNormActivation-style record
        assert model.block1.out_channels == 8  # InvertedResidual-style record of the (coupled) stream


def test_dtypes_are_kept_and_reported(shrunk):
    _, cases = shrunk
    for path, (_, report, _) in cases.items():
        kind = "float16" if "float16" in path else "float32"
        ckpt = prunetool.load(path)
        assert {str(d) for d in ckpt.dtypes.values()} == {f"torch.{kind}"}, path
        assert report["settings"]["dtype"] == {"file": kind, "computed": "float32"}


def test_third_party_layers_are_recognised_by_what_they_do():
    graph = trace(zoo.build("ThirdPartyNet"), X[:2])
    groups = {g.name: g for g in graph.groups}
    assert set(groups) == {"conv1", "conv2", "left", "right", "fc1"}
    assert [m.name for m in groups["conv1"].members] == ["bn1"]  # a BatchNorm subclass that activates
    assert [(m.name, m.tensors) for m in groups["conv2"].members] == [("", (("gamma", 0),))]  # gamma.view(1,-1,1,1)
    assert [(c.name, c.offset) for c in groups["right"].consumers] == [("fc1", 8)]  # through mean and cat
    assert groups["conv1"].consumers[0].name == "conv2"  # a Conv2d subclass with a child module


def test_layer_scale_is_cut_with_its_units(shrunk):
    _, cases = shrunk
    path = next(p for p in cases if "ThirdPartyNet_float32.small.pt" in p)
    model = prunetool.load(path).model
    assert model.gamma.shape == (12,) and model.conv2.out_channels == 12


def test_mnasnet_version_metadata_survives(tmp_path):
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.mnasnet0_5(num_classes=10).state_dict(), tmp_path / "m.pt")
    assert main(["shrink", str(tmp_path / "m.pt"), "--arch", "torchvision.models:mnasnet0_5", "--arch-kwargs",
                 '{"num_classes": 10}', "--input-shape", "3,32,32", "--ratio", "0", "--criterion", "l1", "--calib", "4",
                 "--no-latency", "-q"]) == 0
    assert prunetool.load(tmp_path / "m.shrunk.safetensors").model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unimportable_architecture_fails_with_one_line_naming_it(tmp_path, monkeypatch):
    pkg = tmp_path / "proj" / "mynets"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "small.py").write_text("from torch import nn\n\nclass Net(nn.Sequential):\n"
                                  "    def __init__(self):\n        super().__init__(nn.Linear(4, 8), nn.ReLU(), "
                                  "nn.Linear(8, 2))\n")
    monkeypatch.chdir(tmp_path / "proj")
    monkeypatch.syspath_prepend(str(tmp_path / "proj"))
    from mynets.small import Net

    prunetool.save(Net(), tmp_path / "net.safetensors", arch="mynets.small:Net")
    (pkg / "small.py").unlink()
    for mod in [m for m in sys.modules if m.startswith("mynets")]:
        del sys.modules[mod]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"cannot import 'mynets.small'.*PYTHONPATH"):
        prunetool.load(tmp_path / "net.safetensors")


def test_a_file_cannot_name_an_arbitrary_callable(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, tmp_path / "evil.safetensors",
              metadata={"prunetool_format": "2", "arch": "os:system", "arch_kwargs": '{"command": "true"}'})
    with pytest.raises(UsageError, match="os:system, a plain function, and was not written on this machine"):
        prunetool.load(tmp_path / "evil.safetensors")


def test_a_signed_file_still_cannot_name_the_standard_library(tmp_path):
    """Even a file signed by this machine's key never makes load call Python's own callables."""
    import json

    from safetensors.torch import save_file

    from prunetool import trust

    structure = {"signature": trust.sign("os:system", {"command": "true"}, None), "arch_root": None}
    save_file({"w": torch.zeros(1)}, tmp_path / "evil.safetensors",
              metadata={"prunetool_format": "2", "arch": "os:system", "arch_kwargs": '{"command": "true"}',
                        "structure": json.dumps(structure)})
    with pytest.raises(UsageError, match="os:system"):
        prunetool.load(tmp_path / "evil.safetensors")


def test_a_damaged_file_is_refused(shrunk, tmp_path):
    _, cases = shrunk
    path = next(p for p in cases if p.endswith("DepthwiseSENet_float32.small.safetensors"))
    data = bytearray(open(path, "rb").read())
    header = struct.unpack("<Q", data[:8])[0]
    for i in range(8 + header + 100, 8 + header + 140):
        data[i] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(UsageError, match="damaged"):
        prunetool.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_safetensors_state_dict_in_any_dtype(tmp_path, dtype):
    from safetensors.torch import save_file

    model = zoo.build("DepthwiseSENet")
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()},
              tmp_path / "m.safetensors")
    assert main(["shrink", str(tmp_path / "m.safetensors"), "--arch", "zoo:DepthwiseSENet", "--input-shape", "3,16,16",
                 "--calib", "8", "--criterion", "l1", "--no-latency", "--json", str(tmp_path / "r.json"), "-q"]) == 0
    out = prunetool.load(tmp_path / "m.shrunk.safetensors")
    assert set(out.dtypes.values()) == {dtype}
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["dtype"]["file"] == str(dtype)[6:]
    assert report["settings"]["dtype"]["computed"] == ("float64" if dtype == torch.float64 else "float32")


def test_registered_atomic_layer_is_cut_and_reloads(tmp_path):
    prunetool.layers.register(EinsumLinear, prunetool.layers.Atomic("linear", "w", "b", {"n_out": "out",
                                                                                        "n_in": "in"}))
    torch.manual_seed(0)
    model = EinsumNet().eval()
    graph = trace(model, torch.randn(2, 6))
    assert [g.name for g in graph.groups] == ["a"]
    small, _ = prunetool.shrink(model, None, "l2", 0.5, "mean", calib=16, input_shape=(6,), measure=False,
                                out=str(tmp_path / "e.safetensors"))
    assert small.a.w.shape == (8, 6) and small.a.n_out == 8 and small.b.w.shape == (3, 8) and small.b.n_in == 8
    again = prunetool.load(tmp_path / "e.safetensors").model
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))


class EinsumLinear(nn.Module):
    """A layer trace cannot see into without help: a matrix product written with einsum."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.w = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return torch.einsum("...i,oi->...o", x, self.w) + self.b


class EinsumNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = EinsumLinear(6, 16)
        self.b = EinsumLinear(16, 3)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


class OddPool(nn.Module):
    """Adaptive pooling to a size that does not divide the input: the TorchScript exporter refuses it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.pool = nn.AdaptiveAvgPool2d((3, 3))
        self.fc = nn.Linear(72, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(F.relu(self.conv(x))), 1))


def test_onnx_falls_back_to_the_dynamo_exporter_and_pt2_reloads(tmp_path):
    torch.manual_seed(0)
    report = prunetool.export(OddPool().eval(), onnx=str(tmp_path / "m.onnx"), pt2=str(tmp_path / "m.pt2"),
                              input_shape=(3, 10, 10), calib=8)
    assert report["onnx"]["exporter"] == "dynamo" and report["onnx"]["max_abs_diff"] <= report["onnx"]["tolerance"]
    assert report["pt2"]["max_abs_diff"] <= report["pt2"]["tolerance"]
    program = torch.export.load(tmp_path / "m.pt2")
    assert program.module()(torch.randn(5, 3, 10, 10)).shape == (5, 4)  # the batch dimension is dynamic
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pt2"]  # nothing else left behind
