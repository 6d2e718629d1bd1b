"""Models as users write them (issue 21): a plain builder function in their own module, through every command
and the CLI, with --out, reloaded with no flags in a fresh process from another folder; refusals before the
work; all or nothing whatever fails; edge ratios."""

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import prunetool
from prunetool.cli import main
from prunetool.errors import UsageError

from catalogue import CASES
from conftest import ROOT, SAMPLES

NET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width=32, channels=1):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3),
                                      nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 10))

    def forward(self, x):
        return self.head(self.features(x))


def build():
    return Net()


def build_kw(width=32, seed=0):
    torch.manual_seed(seed)
    return Net(width)


def build_rgb():
    return Net(channels=3)
'''


def files(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's folder: mynet.py with plain builders, a trained-looking checkpoint, a small MNIST npz."""
    d = tmp_path / "proj"
    d.mkdir()
    (d / "mynet.py").write_text(NET)
    monkeypatch.chdir(d)
    monkeypatch.syspath_prepend(str(d))
    monkeypatch.delitem(sys.modules, "mynet", raising=False)
    import mynet

    torch.save(mynet.build_kw(seed=1).state_dict(), d / "m.pt")
    arrays = np.load(SAMPLES / "mnist_subset.npz")
    np.savez(d / "d.npz", x_train=arrays["x_train"][:96], y_train=arrays["y_train"][:96],
             x_test=arrays["x_test"][:64], y_test=arrays["y_test"][:64])
    return d


QUICK = ["--data", "d.npz", "--calib", "48", "--no-latency", "-q"]


def test_every_command_takes_a_plain_builder_and_its_files_reload_elsewhere(project, capsys):
    runs = [
        ["shrink", "m.pt", "--arch", "mynet:build", *QUICK, "--ratio", "0.5", "--out", "s.safetensors"],
        ["lowrank", "m.pt", "--arch", "./mynet.py:build_kw", "--arch-kwargs", '{"width": 32}', *QUICK, "--rank",
         "4", "--out", "l.pt"],
        ["compress", "m.pt", "--arch", "mynet:build", *QUICK, "--target-params", "0.7", "--plans", "shrink,lowrank",
         "--out", "c.safetensors"],
        ["sparsify", "m.pt", "--arch", "mynet:build", *QUICK, "--rounds", "1", "--finetune-epochs", "1",
         "--out", "p.safetensors"],
        ["lowrank", "s.safetensors", *QUICK, "--rank", "4", "--out", "sl.safetensors"],  # no flags: signed here
        ["export", "s.safetensors", "--onnx", "s.onnx", "--input-shape", "1,28,28"],
    ]
    for args in runs:
        code = main(args)
        err = capsys.readouterr().err
        assert code == 0, (args, err)
        assert "Traceback" not in err
    # a fresh process, another folder, nothing on its path: every file reloads with no flags, outputs as in memory
    elsewhere = project.parent / "elsewhere"
    elsewhere.mkdir()
    x = torch.as_tensor(np.load(project / "d.npz")["x_test"][:8]).float().div(255)
    torch.save(x, elsewhere / "x.pt")
    script = (
        "import sys, torch, prunetool\n"
        "torch.set_num_threads(1)  # as the suite: the same kernels, bit for bit\n"
        "x = torch.load('x.pt')\n"
        "for f in sys.argv[1:]:\n"
        "    m = prunetool.load(f).model.eval()\n"
        "    torch.save(m(x).detach(), f.rsplit('/', 1)[-1] + '.out')\n"
    )
    outs = ["s.safetensors", "l.pt", "c.safetensors", "p.safetensors", "sl.safetensors"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script, *[str(project / o) for o in outs]],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for o in outs:
        with torch.no_grad():
            want = prunetool.load(project / o).model.eval()(x)
        assert torch.equal(torch.load(elsewhere / f"{o}.out"), want), o


def test_a_file_from_another_machine_needs_arch(project, monkeypatch, capsys):
    assert main(["shrink", "m.pt", "--arch", "mynet:build", *QUICK, "--out", "s.safetensors"]) == 0
    monkeypatch.setenv("PRUNETOOL_KEY", str(project.parent / "another-machine.key"))
    with pytest.raises(UsageError, match=r"mynet:build, a plain function.*pass --arch mynet:build"):
        prunetool.load("s.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert prunetool.load("s.safetensors", arch="mynet:build").model is not None
    header = json.loads(Path("s.safetensors").read_bytes()[8:8 + int.from_bytes(
        Path("s.safetensors").read_bytes()[:8], "little")])["__metadata__"]
    assert json.loads(header["structure"])["signature"]


def test_a_signature_covers_the_arguments(project, monkeypatch):
    """A signed file whose recorded arguments were changed afterwards is a foreign file."""
    from safetensors.torch import load as st_load, save as st_save

    assert main(["shrink", "m.pt", "--arch", "mynet:build_kw", *QUICK, "--out", "s.safetensors"]) == 0
    raw = Path("s.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    meta["arch_kwargs"] = json.dumps({"seed": 7})
    Path("t.safetensors").write_bytes(st_save(st_load(raw), metadata=meta))
    with pytest.raises(UsageError, match="not written on this machine"):
        prunetool.load("t.safetensors")


PREFLIGHT = [c for c in CASES if c.name in {
    "out over the data", "json over the data", "out over the architecture's source",
    "summary over the architecture's source", "lowrank json over a file architecture", "out named .onnx",
    "pt2 named .onnx", "json into a missing folder", "export json into a folder", "json inside a Hugging Face input",
    "json over the options file", "dry-run json over the data", "inspect html over the data"}]


@pytest.mark.parametrize("case", PREFLIGHT, ids=lambda c: c.name)
def test_refusals_come_before_the_work(case, tmp_path, monkeypatch, capsys):
    """Each refusal needs no number of the model: it comes before the checkpoint is even loaded."""
    import prunetool.commands.common as common

    assert len(PREFLIGHT) == 13
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mynet", raising=False)
    case.setup(tmp_path)

    def started(*a, **k):
        raise AssertionError("the work started before the refusal")

    monkeypatch.setattr(common, "as_checkpoint", started)
    monkeypatch.setattr(prunetool.commands.shrink, "start", started)
    assert main(case.args) == 2
    assert "prunetool: error:" in capsys.readouterr().err


STAGES = [("prunetool.commands.shrink", "score"), ("prunetool.commands.shrink", "cut"),
          ("prunetool.commands.shrink", "verify"), ("prunetool.commands.shrink", "recalibrate_bn"),
          ("prunetool.commands.common", "check_reload"), ("prunetool.commands.common", "export_onnx"),
          ("prunetool.commands.common", "export_pt2"), ("prunetool.commands.common", "snapshot"),
          ("prunetool.terminal", "summary_markdown")]


@pytest.mark.parametrize("where", STAGES, ids=lambda w: w[1])
def test_a_failure_at_any_stage_writes_nothing(project, monkeypatch, capsys, where):
    import importlib

    Path("s.safetensors").write_bytes(b"an older result the user keeps")
    before = files(project)

    def fail(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(importlib.import_module(where[0]), where[1], fail)
    code = main(["shrink", "m.pt", "--arch", "mynet:build", *QUICK, "--eval", "16", "--out", "s.safetensors",
                 "--onnx", "s.onnx", "--pt2", "s.pt2", "--json", "r.json", "--summary-md", "r.md"])
    assert code == 3, capsys.readouterr().err
    assert files(project) == before


@pytest.mark.parametrize("failing", [1, 3, 5])
def test_a_commit_that_fails_midway_takes_back_what_it_moved(project, monkeypatch, capsys, failing):
    import prunetool.staging as staging

    Path("s.safetensors").write_bytes(b"an older result the user keeps")
    Path("r.json").write_text("{}")
    before = files(project)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == failing:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(staging.os, "replace", replace)
    code = main(["shrink", "m.pt", "--arch", "mynet:build", *QUICK, "--out", "s.safetensors", "--onnx", "s.onnx",
                 "--json", "r.json", "--summary-md", "r.md"])
    assert code == 3, capsys.readouterr().err
    assert files(project) == before
    assert not [p for p in project.iterdir() if p.name.startswith(".")]


EDGE_RATIOS = (0.0, 1e-3, 0.5, 0.9, 0.95, 0.99, 0.999)
EDGE_MODELS = [("evci_cnn.pt", "samples.nets:EvciCNN"), ("conv2.pt", "samples.nets:Conv2"),
               ("lenet_300_100.pt", "samples.nets:LeNet300100")]


@pytest.mark.parametrize("ratio", EDGE_RATIOS)
@pytest.mark.parametrize("sample", EDGE_MODELS, ids=lambda s: s[0])
def test_edge_ratios_give_a_file_that_reloads(sample, ratio, tmp_path, mnist_small):
    """Any ratio in [0, 1) leaves every layer at least one unit, and the file written reloads to the same
    outputs."""
    path, arch = sample
    small, report = prunetool.shrink(str(SAMPLES / path), mnist_small, arch=arch, ratio=ratio, calib=32,
                                     measure=False, out=str(tmp_path / "o.safetensors"))
    assert all(layer["units_after"] >= 1 for layer in report["layers"])
    x = mnist_small.test.tensors[0][:16]
    with torch.no_grad():
        assert torch.equal(prunetool.load(tmp_path / "o.safetensors").model.eval()(x), small.eval()(x))


@pytest.mark.parametrize("ratio", (0.0, 0.99, 0.999))
@pytest.mark.parametrize("name", ["DepthwiseSENet", "ThirdPartyNet"])
def test_edge_ratios_on_zoo_models(name, ratio, tmp_path):
    import zoo

    model = zoo.build(name)
    small, report = prunetool.shrink(model, input_shape=(3, 32, 32), arch=f"zoo:{name}", ratio=ratio, calib=16,
                                     measure=False, out=str(tmp_path / "o.safetensors"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(prunetool.load(tmp_path / "o.safetensors").model.eval()(x), small.eval()(x))


def test_batchnorm_recalibration_never_sees_one_sample():
    """deeplabv3_mobilenet_v3_large's pooled branch: BatchNorm on B×C×1×1 fails in training mode for B = 1."""
    from prunetool.recover import recalibrate_bn

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
                          nn.Flatten()).eval()
    assert recalibrate_bn(model, torch.randn(33, 3, 8, 8), batch=32)
    assert model[3].running_var.ne(1).all()
    with pytest.warns(UserWarning, match="at least 2 calibration samples"):
        assert not recalibrate_bn(model, torch.randn(1, 3, 8, 8), batch=32)


def test_the_digest_of_a_layer_cut_to_one_unit():
    """contiguous() keeps any stride on a dimension of size 1; the digest must not care."""
    from prunetool.load import tensor_digest

    w = torch.randn(1, 8)[:, 2:3].t()
    assert w.is_contiguous() and w.reshape(-1).stride() != (1,)
    assert tensor_digest({"w": w}) == tensor_digest({"w": w.clone(memory_format=torch.contiguous_format)})


@pytest.mark.parametrize("sample", ["kjv_llama", "mnist_vit"])
def test_edge_ratio_on_the_hugging_face_samples(sample, tmp_path):
    """0.999 leaves one head and one MLP unit per layer; the result (a directory, or prunetool's own file when the
    config cannot hold it) reloads to the outputs in memory."""
    data = str(SAMPLES / ("kjv_tokens.npz" if sample == "kjv_llama" else "mnist_subset.npz"))
    small, report = prunetool.shrink(str(SAMPLES / sample), data, ratio=0.999, calib=8, eval=8, measure=False,
                                     out=str(tmp_path / "o"))
    written = report["settings"]["out"]
    assert Path(written).exists()
    if report["settings"]["out_format"] == "huggingface":
        assert report["verify"]["reload_from_pretrained"] == "identical"
    else:
        assert report["verify"]["reload"] == "identical"
    assert report["after"]["params"] < report["before"]["params"]


def test_an_empty_key_neither_signs_nor_accepts_a_signature(project, monkeypatch):
    """PRUNETOOL_KEY=/dev/null (or an empty file) must not make the empty key a valid one: anyone could sign."""
    import hmac as hmac_

    from prunetool import trust

    monkeypatch.setenv("PRUNETOOL_KEY", "/dev/null")
    assert trust.sign("mynet:build", {}, None) is None
    forged = hmac_.new(b"", trust._message("mynet:build", {}, None), "sha256").hexdigest()
    assert not trust.signed(forged, "mynet:build", {}, None)
    empty = project / "empty.key"
    empty.write_text("")
    monkeypatch.setenv("PRUNETOOL_KEY", str(empty))
    assert not trust.signed(forged, "mynet:build", {}, None) and trust.sign("mynet:build", {}, None) is None


def _foreign_file(path: Path, arch: str, kwargs: dict, root: str | None = None) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(path), metadata={
        "prunetool_format": "2", "arch": arch, "arch_kwargs": json.dumps(kwargs),
        "structure": json.dumps({"arch_root": root, "signature": "0" * 64})})


def test_a_foreign_file_naming_a_python_file_is_refused_before_it_runs(project):
    (project / "evil.py").write_text("open('ran', 'w').close()\ndef f():\n    pass\n")
    _foreign_file(project / "f.safetensors", f"{project / 'evil.py'}:f", {})
    with pytest.raises(UsageError, match="a file of its own, and was not written on this machine"):
        prunetool.load(project / "f.safetensors")
    assert not (project / "ran").exists()


def test_a_foreign_file_may_not_make_an_annotated_builder_fetch(project):
    """timm.create_model is annotated -> nn.Module; a file from elsewhere still may not set pretrained or a url."""
    _foreign_file(project / "f.safetensors", "torchvision.models:get_model",
                  {"name": "resnet18", "weights": "DEFAULT"})
    with pytest.raises(UsageError, match="sets weights"):
        prunetool.load(project / "f.safetensors")
    from prunetool.trust import fetching_arguments

    assert fetching_arguments({"drop_path_rate": 0.1, "num_classes": 5, "img_size": 64, "weights_backbone": None,
                               "pretrained": False}) == []
    assert fetching_arguments({"checkpoint_path": "x", "cache_dir": "/x", "pretrained_cfg_overlay": {"url": "u"},
                               "hf_hub_id": "a/b"}) == ["checkpoint_path", "cache_dir", "pretrained_cfg_overlay",
                                                        "hf_hub_id"]


def test_signed_builders_from_partials_and_files_named_like_the_standard_library(project, capsys):
    """A user's nets/signal.py or a functools.partial is the user's code, not Python's."""
    (project / "nets").mkdir()
    (project / "nets" / "signal.py").write_text(NET)
    (project / "mynet.py").write_text(NET + "\nimport functools\n"
                                      "narrow = functools.partial(build_kw, width=32, seed=3)\n")
    del sys.modules["mynet"]  # the fixture imported the module as it was
    for arch, out in (("nets/signal.py:build", "a.safetensors"), ("mynet:narrow", "b.safetensors")):
        assert main(["shrink", "m.pt", "--arch", arch, *QUICK, "--out", out, "--json", f"{out}.json"]) == 0, \
            capsys.readouterr().err
        assert json.loads(Path(f"{out}.json").read_text())["verify"]["reload"] == "identical"
        assert prunetool.load(out).model is not None


def test_a_model_beside_its_image_folder(project, capsys):
    """--data DIR reads DIR/train and DIR/val only: outputs may sit beside them."""
    from PIL import Image

    for split in ("train", "val"):
        for label in ("a", "b"):
            (project / split / label).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(project / split / label / f"{i}.png")
    import mynet

    torch.save(mynet.build_rgb().state_dict(), project / "rgb.pt")
    code = main(["shrink", "rgb.pt", "--arch", "mynet:build_rgb", "--data", ".", "--resize", "28", "--crop", "28",
                 "--calib", "6", "--no-latency", "-q", "--summary-md", "summary.md"])
    assert code == 0, capsys.readouterr().err
    assert (project / "summary.md").is_file() and (project / "rgb.shrunk.safetensors").is_file()
    assert main(["shrink", "m.pt", "--arch", "mynet:build", "--data", ".", "--json", "train/r.json"]) == 2
    assert "inside the input --data (train/)" in capsys.readouterr().err


def test_no_output_overwrites_the_signing_key(project, monkeypatch, capsys):
    monkeypatch.setenv("PRUNETOOL_KEY", str(project / "key"))
    assert main(["shrink", "m.pt", "--arch", "mynet:build", *QUICK, "--out", "s.safetensors"]) == 0
    key = (project / "key").read_bytes()
    capsys.readouterr()
    for flag, path in (("--json", "key"), ("--summary-md", "key")):
        assert main(["shrink", "m.pt", "--arch", "mynet:build", *QUICK, flag, path]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "signing key" in err[0], err
    assert (project / "key").read_bytes() == key
    assert prunetool.load("s.safetensors").model is not None


def test_a_damaged_key_is_named_and_the_file_reloads_with_arch(project, monkeypatch, capsys):
    (project / "key").write_text('{"not": "a key"}')
    monkeypatch.setenv("PRUNETOOL_KEY", str(project / "key"))
    assert main(["shrink", "m.pt", "--arch", "mynet:build", *QUICK, "--out", "s.safetensors", "--json", "r.json"]) == 0
    assert "holds no key (damaged?)" in capsys.readouterr().err
    report = json.loads(Path("r.json").read_text())
    assert report["verify"]["reload"] == "identical with --arch" and "--arch mynet:build" in report["notes"][0]
    with pytest.raises(UsageError, match=r"pass --arch mynet:build \(arch= in Python\)"):
        prunetool.load("s.safetensors")
