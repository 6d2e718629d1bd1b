"""The catalogue of bad and odd inputs: every case of issue 12 and more, as data, so that the test suite
(tests/test_catalogue.py, in process) and benchmarks/catalogue.py (any prunetool, in a subprocess: the count of
cases that held before) run the same list.

Each case prepares files in an empty work directory (``setup``), gives the command line (``args``), and says what
must come out: the exit code, and for exit 2 one line on stderr naming the problem (``needles``). Every case also
requires: no traceback, no new file (temporary files included), no existing file changed. Cases marked
``since="0.2"`` use options prunetool 0.1 did not have.
"""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
EVCI = ["--arch", "samples.nets:EvciCNN"]
FAST = ["--calib", "32", "--eval", "32"]


@dataclass
class Case:
    name: str
    args: list[str]
    code: int = 2
    needles: tuple[str, ...] = ()
    setup: Callable[[Path], None] | None = None
    since: str = "0.1"
    env: dict = field(default_factory=dict)


def _ckpt(d: Path) -> None:
    shutil.copy(SAMPLES / "evci_cnn.pt", d / "m.pt")


def _npz(d: Path, name: str = "d.npz", n_train: int = 40, n_test: int = 20, x=None, y=None, **over) -> None:
    _ckpt(d)
    arrays = np.load(SAMPLES / "mnist_subset.npz")
    data = {"x_train": arrays["x_train"][:n_train], "y_train": arrays["y_train"][:n_train],
            "x_test": arrays["x_test"][:n_test], "y_test": arrays["y_test"][:n_test]}
    data.update(over)
    np.savez(d / name, **data)


def _with(**over) -> Callable[[Path], None]:
    return lambda d: _npz(d, **over)


def _text(name: str, content: str) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        _ckpt(d)
        (d / name).write_text(content)
    return setup


def _module(name: str, body: str) -> Callable[[Path], None]:
    return _text(f"{name}.py", body)


def _flipped(d: Path) -> None:
    _ckpt(d)
    data = bytearray((d / "m.pt").read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 2000):
        data[i] ^= 0x5A
    (d / "bad.pt").write_bytes(bytes(data))


def _truncated(d: Path) -> None:
    _ckpt(d)
    (d / "short.pt").write_bytes((d / "m.pt").read_bytes()[:5000])


def _own_flipped(d: Path) -> None:
    import torch

    _ckpt(d)
    import prunetool
    from samples.nets import EvciCNN

    model = EvciCNN()
    model.load_state_dict(torch.load(d / "m.pt", weights_only=True))
    prunetool.save(model, d / "own.safetensors", arch="samples.nets:EvciCNN")
    data = bytearray((d / "own.safetensors").read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    for i in range(8 + header + 64, 8 + header + 96):
        data[i] ^= 0xFF
    (d / "own.safetensors").write_bytes(bytes(data))


def _pickled_main(d: Path) -> None:
    """A whole module pickled from a script: its class lived in the script's ``__main__``, absent when loading."""
    import sys

    import torch

    class ScriptNet(torch.nn.Linear):
        pass
    ScriptNet.__module__, ScriptNet.__qualname__ = "__main__", "ScriptNet"
    main = sys.modules["__main__"]
    main.ScriptNet = ScriptNet
    try:
        torch.save(ScriptNet(2, 2), d / "whole.pt")
    finally:
        del main.ScriptNet


def _safetensors_sd(d: Path) -> None:
    import torch
    from safetensors.torch import save_file

    _ckpt(d)
    save_file(torch.load(d / "m.pt", weights_only=True), d / "m.safetensors")


MYNET = "from samples.nets import EvciCNN\n\n\ndef build():\n    return EvciCNN()\n"


def _mynet(d: Path) -> None:
    """A user's module: a plain builder function, no annotation."""
    _npz(d)
    (d / "mynet.py").write_text(MYNET)


def _foreign(arch: str, kwargs: dict | None = None) -> Callable[[Path], None]:
    """prunetool's own file naming ``arch``, written on another machine (signed by a key this one does not
    hold)."""
    def setup(d: Path) -> None:
        import os

        import torch

        from prunetool.load import serialize
        from samples.nets import EvciCNN

        _mynet(d)
        model = EvciCNN()
        model.load_state_dict(torch.load(d / "m.pt", weights_only=True))
        mine = os.environ.get("PRUNETOOL_KEY")
        os.environ["PRUNETOOL_KEY"] = str(d.parent / f"{d.name}-other-machine.key")
        try:
            (d / "own.safetensors").write_bytes(serialize(model, arch, kwargs, fmt=".safetensors", root=str(d)))
        finally:
            if mine is None:
                os.environ.pop("PRUNETOOL_KEY")
            else:
                os.environ["PRUNETOOL_KEY"] = mine
    return setup


def _hf_copy(d: Path) -> None:
    _ckpt(d)
    shutil.copytree(SAMPLES / "kjv_llama", d / "llama")


def _config(text: str) -> Callable[[Path], None]:
    return _text("prunetool.toml", text)


def _bench_sd(d: Path) -> None:
    _ckpt(d)


def _image_dir_without_val(d: Path) -> None:
    _ckpt(d)
    (d / "imgs" / "train" / "a").mkdir(parents=True)


CASES: list[Case] = [
    # --- loading ---
    Case("missing checkpoint", ["shrink", "nope.pt", *EVCI, "--input-shape", "1,28,28"], needles=("no such file",)),
    Case("text file as checkpoint", ["shrink", "notes.pt", *EVCI, "--input-shape", "1,28,28"],
         needles=("not a PyTorch checkpoint",), setup=_text("notes.pt", "not weights\n")),
    Case("checkpoint is a directory", ["shrink", ".", *EVCI, "--input-shape", "1,28,28"], needles=("directory",),
         setup=_ckpt),
    Case("state_dict does not fit arch", ["shrink", "m.pt", "--arch", "samples.nets:LeNet300100", "--input-shape",
                                          "1,28,28"], needles=("does not fit",), setup=_ckpt),
    Case("state_dict without arch", ["shrink", "m.pt", "--input-shape", "1,28,28"], needles=("--arch",), setup=_ckpt),
    Case("arch without colon", ["shrink", "m.pt", "--arch", "samples.nets", "--input-shape", "1,28,28"],
         needles=("MODULE:CALLABLE",), setup=_ckpt),
    Case("arch attribute missing", ["shrink", "m.pt", "--arch", "samples.nets:Nope", "--input-shape", "1,28,28"],
         needles=("Nope",), setup=_ckpt),
    Case("arch module missing", ["shrink", "m.pt", "--arch", "nosuchpkg.nets:Net", "--input-shape", "1,28,28"],
         needles=("nosuchpkg",), setup=_ckpt),
    Case("arch module raises on import", ["shrink", "m.pt", "--arch", "broken:Net", "--input-shape", "1,28,28"],
         needles=("broken",), setup=_module("broken", "raise RuntimeError('no GPU here')\n")),
    Case("arch module has a syntax error", ["shrink", "m.pt", "--arch", "syntaxerr:Net", "--input-shape", "1,28,28"],
         needles=("syntaxerr",), setup=_module("syntaxerr", "def Net(:\n")),
    Case("arch constructor raises", ["shrink", "m.pt", "--arch", "ctor:Net", "--input-shape", "1,28,28"],
         needles=("ctor:Net",), setup=_module("ctor", "class Net:\n    def __init__(self):\n"
                                                     "        raise ValueError('bad config')\n")),
    Case("arch returns no module", ["shrink", "m.pt", "--arch", "notmod:Net", "--input-shape", "1,28,28"],
         needles=("not an nn.Module",), setup=_module("notmod", "def Net():\n    return 3\n")),
    Case("arch kwargs negative size", ["shrink", "m.pt", *EVCI, "--arch-kwargs", '{"num_classes": -3}',
                                       "--input-shape", "1,28,28"], needles=("num_classes",), setup=_ckpt),
    Case("arch kwargs not JSON", ["shrink", "m.pt", *EVCI, "--arch-kwargs", "{num", "--input-shape", "1,28,28"],
         needles=("--arch-kwargs",), setup=_ckpt),
    Case("arch kwargs not an object", ["shrink", "m.pt", *EVCI, "--arch-kwargs", "[1]", "--input-shape", "1,28,28"],
         needles=("--arch-kwargs",), setup=_ckpt),
    Case("arch kwargs unknown name", ["shrink", "m.pt", *EVCI, "--arch-kwargs", '{"classes": 3}',
                                      "--input-shape", "1,28,28"], needles=("classes",), setup=_ckpt),
    Case("pickled module without --unsafe-pickle", ["shrink", "whole.pt", "--input-shape", "2"],
         needles=("--unsafe-pickle",), setup=_pickled_main),
    Case("pickled module from a script's __main__", ["shrink", "whole.pt", "--unsafe-pickle", "--input-shape", "2"],
         needles=("cannot be found", "state_dict"), setup=_pickled_main),
    Case("damaged checkpoint", ["shrink", "bad.pt", *EVCI, "--input-shape", "1,28,28"], needles=("damaged",),
         setup=_flipped),
    Case("truncated checkpoint", ["shrink", "short.pt", *EVCI, "--input-shape", "1,28,28"],
         needles=("short.pt",), setup=_truncated),
    Case("damaged prunetool file", ["shrink", "own.safetensors", "--input-shape", "1,28,28"], needles=("damaged",),
         setup=_own_flipped, since="0.2"),
    # --- data ---
    Case("labels out of range", ["shrink", "m.pt", *EVCI, "--data", "d.npz", *FAST], needles=("10 outputs",),
         setup=_with(y_train=np.full(40, 12))),
    Case("negative labels", ["shrink", "m.pt", *EVCI, "--data", "d.npz", *FAST], needles=("negative",),
         setup=_with(y_train=np.full(40, -1))),
    Case("one-hot labels", ["shrink", "m.pt", *EVCI, "--data", "d.npz", *FAST], needles=("one-hot",),
         setup=_with(y_train=np.eye(10)[np.arange(40) % 10])),
    Case("fractional labels", ["shrink", "m.pt", *EVCI, "--data", "d.npz", *FAST], needles=("class indices",),
         setup=_with(y_train=np.full(40, 0.5))),
    Case("npz with no samples", ["shrink", "m.pt", *EVCI, "--data", "d.npz", *FAST], needles=("no samples",),
         setup=_with(n_train=0)),
    Case("empty test split", ["shrink", "m.pt", *EVCI, "--data", "d.npz", *FAST], needles=("x_test",),
         setup=_with(n_test=0)),
    Case("npz lacks arrays", ["shrink", "m.pt", *EVCI, "--data", "d.npz", *FAST], needles=("lacks",),
         setup=lambda d: (_ckpt(d), np.savez(d / "d.npz", x=np.zeros(3)))),
    Case("x and y lengths differ", ["shrink", "m.pt", *EVCI, "--data", "d.npz", *FAST], needles=("40 samples", "39"),
         setup=_with(y_train=np.zeros(39, dtype=np.int64))),
    Case("float images in 0..255", ["shrink", "m.pt", *EVCI, "--data", "d.npz", *FAST], needles=("0..255",),
         setup=lambda d: _npz(d, x_train=np.load(SAMPLES / "mnist_subset.npz")["x_train"][:40].astype(np.float32))),
    Case("NaN in images", ["shrink", "m.pt", *EVCI, "--data", "d.npz", *FAST], needles=("NaN",),
         setup=lambda d: _npz(d, x_train=np.full((40, 28, 28), np.nan, dtype=np.float32))),
    Case("data shape does not fit", ["shrink", "m.pt", *EVCI, "--data", "d.npz", *FAST], needles=("do not fit",),
         setup=lambda d: _npz(d, x_train=np.zeros((40, 3, 32, 32), dtype=np.uint8),
                              x_test=np.zeros((20, 3, 32, 32), dtype=np.uint8))),
    Case("not an npz", ["shrink", "m.pt", *EVCI, "--data", "d.npz", *FAST], needles=("npz",),
         setup=_text("d.npz", "text\n")),
    Case("unknown data spec", ["shrink", "m.pt", *EVCI, "--data", "imagenet", *FAST], needles=("--data",),
         setup=_ckpt),
    Case("missing mnist root", ["shrink", "m.pt", *EVCI, "--data", "mnist:nowhere", *FAST], needles=("--download",),
         setup=_ckpt),
    Case("image folder without val", ["shrink", "m.pt", *EVCI, "--data", "imgs", *FAST], needles=("val",),
         setup=_image_dir_without_val),
    Case("no data and no shape", ["shrink", "m.pt", *EVCI], needles=("--input-shape",), setup=_ckpt),
    Case("input shape missing channels", ["shrink", "m.pt", *EVCI, "--input-shape", "28,28", "--calib", "8"],
         needles=("do not fit",), setup=_ckpt),
    Case("input shape with batch", ["shrink", "m.pt", *EVCI, "--input-shape", "1,1,28,28", "--calib", "8"],
         needles=("do not fit",), setup=_ckpt),
    Case("input shape of another size", ["shrink", "m.pt", *EVCI, "--input-shape", "1,32,32", "--calib", "8"],
         needles=("do not fit",), setup=_ckpt),
    Case("input shape not integers", ["shrink", "m.pt", *EVCI, "--input-shape", "a,b"], needles=("--input-shape",),
         setup=_ckpt),
    Case("input shape zero", ["shrink", "m.pt", *EVCI, "--input-shape", "0,28,28"], needles=("--input-shape",),
         setup=_ckpt),
    # --- options ---
    Case("ratio 1", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--ratio", "1.0"], needles=("--ratio",),
         setup=_ckpt),
    Case("ratio negative", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--ratio", "-0.1"],
         needles=("--ratio",), setup=_ckpt),
    Case("ratio not a number", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--ratio", "lots"],
         needles=("--ratio",), setup=_ckpt),
    Case("unknown criterion", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--criterion", "magic"],
         needles=("magic", "mrs"), setup=_ckpt),
    Case("unknown compensation", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--compensate", "magic"],
         needles=("magic", "lstsq"), setup=_ckpt),
    Case("eval 0", ["shrink", "m.pt", *EVCI, "--data", "d.npz", "--calib", "32", "--eval", "0"],
         needles=("--eval",), setup=_npz),
    Case("eval negative", ["shrink", "m.pt", *EVCI, "--data", "d.npz", "--calib", "32", "--eval", "-5"],
         needles=("--eval",), setup=_npz),
    Case("calib 0", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--calib", "0"], needles=("--calib",),
         setup=_ckpt),
    Case("finetune epochs negative", ["shrink", "m.pt", *EVCI, "--data", "d.npz", *FAST, "--finetune-epochs", "-1"],
         needles=("--finetune-epochs",), setup=_npz),
    Case("finetune without data", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--calib", "8",
                                   "--finetune-epochs", "1"], needles=("--finetune-epochs",), setup=_ckpt),
    Case("distill without finetune", ["shrink", "m.pt", *EVCI, "--data", "d.npz", *FAST, "--distill"],
         needles=("--distill",), setup=_npz),
    Case("lr negative", ["shrink", "m.pt", *EVCI, "--data", "d.npz", *FAST, "--finetune-epochs", "1", "--lr", "-1"],
         needles=("--lr",), setup=_npz),
    Case("unknown optimizer", ["shrink", "m.pt", *EVCI, "--data", "d.npz", *FAST, "--finetune-epochs", "1",
                               "--optimizer", "lion"], needles=("lion",), setup=_npz),
    Case("max-drop negative", ["shrink", "m.pt", *EVCI, "--data", "d.npz", *FAST, "--max-drop", "-1"],
         needles=("--max-drop",), setup=_npz),
    Case("max-params negative", ["shrink", "m.pt", *EVCI, "--data", "d.npz", *FAST, "--max-params", "-5"],
         needles=("--max-params",), setup=_npz),
    Case("max-drop search without data", ["lowrank", "m.pt", *EVCI, "--input-shape", "1,28,28", "--max-drop", "1"],
         needles=("--max-drop", "--data"), setup=_ckpt),
    Case("min-speedup zero", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--min-speedup", "0"],
         needles=("--min-speedup",), setup=_ckpt),
    Case("min-speedup without latency", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--min-speedup", "2",
                                         "--no-latency"], needles=("--min-speedup",), setup=_ckpt, since="0.2"),
    Case("speedup batch zero", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--min-speedup", "2",
                                "--speedup-batch", "0"], needles=("--speedup-batch",), setup=_ckpt),
    Case("schedule decreasing", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--schedule", "0.4,0.2"],
         needles=("--schedule",), setup=_ckpt),
    Case("schedule not numbers", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--schedule", "a,b"],
         needles=("--schedule",), setup=_ckpt),
    Case("target-params above 1", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--target-params", "2"],
         needles=("--target-params",), setup=_ckpt),
    Case("both targets", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--target-params", "0.5",
                          "--target-macs", "0.5"], needles=("--target-macs",), setup=_ckpt),
    Case("round-to zero", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--round-to", "0"],
         needles=("--round-to",), setup=_ckpt),
    Case("max-layer-ratio 1", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--max-layer-ratio", "1"],
         needles=("--max-layer-ratio",), setup=_ckpt),
    Case("unknown scope", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--scope", "model"],
         needles=("scope",), setup=_ckpt),
    Case("unknown device", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--device", "tpu"],
         needles=("--device",), setup=_ckpt),
    Case("latency batches zero", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--latency-batches", "0"],
         needles=("--latency-batches",), setup=_ckpt, since="0.2"),
    Case("calib memory not a size", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--calib-memory", "lots"],
         needles=("--calib-memory",), setup=_ckpt, since="0.2"),
    Case("calib memory too small", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--calib-memory", "10"],
         needles=("--calib-memory",), setup=_ckpt, since="0.2"),
    Case("unknown preset", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--preset", "cifar"],
         needles=("--preset",), setup=_ckpt, since="0.2"),
    Case("mean without std", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--mean", "0.5"],
         needles=("--std",), setup=_ckpt, since="0.2"),
    Case("onnx tolerance negative", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--onnx-atol", "-1"],
         needles=("--onnx-atol",), setup=_ckpt),
    Case("lowrank rank 0", ["lowrank", "m.pt", *EVCI, "--input-shape", "1,28,28", "--rank", "0"],
         needles=("--rank",), setup=_ckpt),
    Case("lowrank energy above 1", ["lowrank", "m.pt", *EVCI, "--input-shape", "1,28,28", "--energy", "2"],
         needles=("--energy",), setup=_ckpt),
    Case("lowrank rank and energy", ["lowrank", "m.pt", *EVCI, "--input-shape", "1,28,28", "--rank", "2",
                                     "--energy", "0.9"], needles=("--rank",), setup=_ckpt),
    Case("lowrank layers match nothing", ["lowrank", "m.pt", *EVCI, "--input-shape", "1,28,28", "--layers", "zzz*",
                                          "--calib", "8"], needles=("--layers",), setup=_ckpt),
    Case("lowrank data-aware without data", ["lowrank", "m.pt", *EVCI, "--input-shape", "1,28,28", "--data-aware",
                                             "--calib", "8"], needles=("--data",), setup=_ckpt),
    Case("lowrank target above 1", ["lowrank", "m.pt", *EVCI, "--input-shape", "1,28,28", "--target-params", "2"],
         needles=("--target-params",), setup=_ckpt, since="0.2"),
    Case("lowrank rank and target", ["lowrank", "m.pt", *EVCI, "--input-shape", "1,28,28", "--rank", "3",
                                     "--target-params", "0.5"], needles=("--rank", "--target-params"), setup=_ckpt,
         since="0.2"),
    Case("lowrank layer error cap 0", ["lowrank", "m.pt", *EVCI, "--input-shape", "1,28,28", "--max-layer-error",
                                       "0"], needles=("--max-layer-error",), setup=_ckpt, since="0.2"),
    Case("lowrank unknown search", ["lowrank", "m.pt", *EVCI, "--input-shape", "1,28,28", "--target-params", "0.5",
                                    "--search", "magic"], needles=("--search",), setup=_ckpt, since="0.2"),
    Case("compress without a target", ["compress", "m.pt", *EVCI, "--data", "d.npz"], needles=("--target",),
         setup=_npz, since="0.2"),
    Case("compress without data", ["compress", "m.pt", *EVCI, "--input-shape", "1,28,28", "--target-macs", "0.5"],
         needles=("--data",), setup=_ckpt, since="0.2"),
    Case("compress unknown plan", ["compress", "m.pt", *EVCI, "--data", "d.npz", "--target-macs", "0.5", "--plans",
                                   "prune"], needles=("--plans",), setup=_npz, since="0.2"),
    Case("compress target 1", ["compress", "m.pt", *EVCI, "--data", "d.npz", "--target-params", "1"],
         needles=("--target-params",), setup=_npz, since="0.2"),
    Case("sparsify without data", ["sparsify", "m.pt", *EVCI], needles=("--data",), setup=_ckpt),
    Case("sparsify imp above 1", ["sparsify", "m.pt", *EVCI, "--data", "d.npz", "--imp", "1.5"],
         needles=("--imp",), setup=_npz),
    Case("sparsify zero rounds", ["sparsify", "m.pt", *EVCI, "--data", "d.npz", "--rounds", "0"],
         needles=("--rounds",), setup=_npz),
    Case("bench zero runs", ["bench", "m.pt", *EVCI, "--input-shape", "1,28,28", "--runs", "0", "--no-onnx"],
         needles=("--runs",), setup=_bench_sd),
    Case("bench batch size zero", ["bench", "m.pt", *EVCI, "--input-shape", "1,28,28", "--batch-sizes", "0",
                                   "--no-onnx"], needles=("--batch-sizes",), setup=_bench_sd),
    Case("bench zero threads", ["bench", "m.pt", *EVCI, "--input-shape", "1,28,28", "--threads", "0", "--no-onnx"],
         needles=("--threads",), setup=_bench_sd),
    Case("bench state_dict without shape", ["bench", "m.pt", *EVCI, "--no-onnx"], needles=("--input-shape",),
         setup=_bench_sd),
    Case("export without a target", ["export", "m.pt", *EVCI, "--input-shape", "1,28,28"], needles=("--onnx",),
         setup=_ckpt, since="0.2"),
    # --- outputs ---
    Case("out directory missing", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--out", "no/x.pt"],
         needles=("does not exist",), setup=_ckpt),
    Case("out is a directory", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--out", "."],
         needles=("directory",), setup=_ckpt),
    Case("out is the input", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--out", "m.pt"],
         needles=("input",), setup=_ckpt),
    Case("json collides with out", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--out", "x.pt",
                                    "--json", "x.pt"], needles=("--json", "--out"), setup=_ckpt),
    Case("onnx collides with out", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--out", "x.pt",
                                    "--onnx", "x.pt"], needles=("--onnx", "--out"), setup=_ckpt),
    Case("json is the input", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--json", "m.pt"],
         needles=("--json", "input"), setup=_ckpt),
    Case("onnx directory missing", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--onnx", "no/x.onnx"],
         needles=("--onnx",), setup=_ckpt),
    Case("summary directory missing", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--summary-md",
                                       "no/s.md"], needles=("--summary-md",), setup=_ckpt),
    Case("html is a directory", ["inspect", "m.pt", *EVCI, "--input-shape", "1,28,28", "--html", "."],
         needles=("--html",), setup=_ckpt),
    # --- outputs over inputs, suffixes (issue 21): refused before any work ---
    Case("out over the data", ["shrink", "m.pt", *EVCI, "--data", "d.npz", "--out", "d.npz"],
         needles=("--out", "--data"), setup=_npz, since="0.2"),
    Case("json over the data", ["shrink", "m.pt", *EVCI, "--data", "d.npz", "--json", "d.npz"],
         needles=("--json", "--data"), setup=_npz, since="0.2"),
    Case("out over the architecture's source", ["shrink", "m.pt", "--arch", "mynet:build", "--data", "d.npz",
                                                "--out", "mynet.py"], needles=("--out", "--arch"), setup=_mynet,
         since="0.2"),
    Case("summary over the architecture's source", ["shrink", "m.pt", "--arch", "mynet:build", "--data", "d.npz",
                                                    "--summary-md", "mynet.py"], needles=("--summary-md", "--arch"),
         setup=_mynet, since="0.2"),
    Case("lowrank json over a file architecture", ["lowrank", "m.pt", "--arch", "mynet.py:build", "--data",
                                                   "d.npz", "--json", "mynet.py"], needles=("--json", "--arch"),
         setup=_mynet, since="0.2"),
    Case("out named .onnx", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--out", "x.onnx"],
         needles=("--out", ".onnx", "x.safetensors"), setup=_ckpt, since="0.2"),
    Case("pt2 named .onnx", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--pt2", "x.onnx"],
         needles=("--pt2", ".pt2"), setup=_ckpt, since="0.2"),
    Case("json into a missing folder", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--json", "newdir/"],
         needles=("--json", "folder", "newdir/report.json"), setup=_ckpt, since="0.2"),
    Case("export json into a folder", ["export", "m.pt", *EVCI, "--input-shape", "1,28,28", "--onnx", "m.onnx",
                                       "--json", "newdir/"], needles=("--json", "folder"), setup=_ckpt, since="0.2"),
    Case("json inside a Hugging Face input", ["shrink", "llama", "--tokens", "8", "--json", "llama/report.json"],
         needles=("--json", "inside", "CKPT"), setup=_hf_copy, since="0.2"),
    Case("json over the options file", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28", "--json",
                                        "prunetool.toml"], needles=("--json", "--config"),
         setup=_config("[shrink]\nratio = 0.4\n"), since="0.2"),
    Case("dry-run json over the data", ["shrink", "m.pt", *EVCI, "--data", "d.npz", "--dry-run", "--json", "d.npz"],
         needles=("--json", "--data"), setup=_npz, since="0.2"),
    Case("inspect html over the data", ["inspect", "m.pt", *EVCI, "--data", "d.npz", "--html", "d.npz"],
         needles=("--html", "--data"), setup=_npz, since="0.2"),
    # --- architectures a file names (issue 21) ---
    Case("foreign file names a plain builder", ["shrink", "own.safetensors", "--input-shape", "1,28,28"],
         needles=("mynet:build", "--arch mynet:build"), setup=_foreign("mynet:build"), since="0.2"),
    Case("foreign file names a standard-library callable", ["shrink", "own.safetensors", "--input-shape", "1,28,28"],
         needles=("os:getcwd", "--arch"), setup=_foreign("os:getcwd"), since="0.2"),
    Case("foreign file asks for remote code", ["shrink", "own.safetensors", "--input-shape", "1,28,28"],
         needles=("trust_remote_code",), setup=_foreign("samples.nets:EvciCNN", {"trust_remote_code": True}),
         since="0.2"),
    # --- config ---
    Case("config not TOML", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28"], needles=("prunetool.toml",),
         setup=_config("ratio = = 1\n")),
    Case("config unknown key", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28"],
         needles=("prunetool.toml", "ratios"), setup=_config("[shrink]\nratios = 0.4\n")),
    Case("config wrong type", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28"],
         needles=("prunetool.toml", "ratio"), setup=_config("[shrink]\nratio = \"half\"\n"), since="0.2"),
    Case("config unknown command table", ["shrink", "m.pt", *EVCI, "--input-shape", "1,28,28"],
         needles=("prunetool.toml", "shrunk"), setup=_config("[shrunk]\nratio = 0.4\n")),
    Case("config file missing", ["--config", "nope.toml", "shrink", "m.pt", *EVCI, "--input-shape", "1,28,28"],
         needles=("nope.toml",), setup=_ckpt),
    Case("help despite a broken config", ["shrink", "--help"], code=0, setup=_config("ratio = = 1\n"), since="0.2"),
    Case("no-config despite a broken config", ["--no-config", "shrink", "m.pt", *EVCI, "--input-shape", "1,28,28",
                                               "--ratio", "lots"], needles=("--ratio",), setup=_config("ratio = = 1\n"),
         since="0.2"),
]
