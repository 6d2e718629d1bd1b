"""Coverage beyond image classifiers, through the user's path: detectors, segmenters, a diffusion UNet and an
audio CNN, random weights, each written the way a user writes it (a builder in their own module), cut by the CLI
with ``--out`` and ``--onnx``, then reloaded in a fresh process from another directory.

    python -m benchmarks.coverage_tasks --out docs/COVERAGE.md
    python -m benchmarks.coverage_tasks --only yolov8n-detect unet-resnet18

Per model: ``prunetool shrink m.pt --arch mymodel:build --input-shape … --calib 32 --ratio 0.3 --no-latency
--out small.safetensors --onnx small.onnx --json r.json`` (default criterion and compensation; the ONNX file is
checked against onnxruntime by the command itself), then a fresh process in another folder runs
``prunetool.load(small.safetensors)`` with no flags on fixed inputs, and its outputs must equal those of the same
file loaded beside the user's module. No labels: the quality column is the cut model against the dense one on the
calibration inputs (:class:`prunetool.task.Fidelity`: mean IoU of the argmax maps for segmenters, output error
for detector heads, and, by ``--fidelity error``, for FPN feature maps and the UNet's noise prediction). Needs the ``bench`` extra (ultralytics,
segmentation-models-pytorch, diffusers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import commit, machine, publish, table_args, today

RATIO = 0.3
CALIB = 32

YOLO = """from ultralytics.nn.tasks import {cls}


def build():
    return {cls}({yaml!r}, verbose=False)
"""
TV_SEG = """import torchvision


def build():
    return torchvision.models.segmentation.{name}(weights=None, weights_backbone=None, num_classes=5, aux_loss=False)
"""
TV_DET = """import torchvision


def build():  # the detector's backbone with its FPN: what the cut reaches (post-processing is left as it is)
    return torchvision.models.detection.{name}(weights=None, weights_backbone=None).backbone
"""
SMP = """import segmentation_models_pytorch as smp


def build():
    return smp.{cls}("resnet18", encoder_weights=None, classes=3)
"""
DIFFUSERS = """import torch
from diffusers import UNet2DModel


class Denoiser(torch.nn.Module):
    \"\"\"The noise prediction at a fixed timestep (a user's wrapper: the CLI feeds one input).\"\"\"

    def __init__(self):
        super().__init__()
        self.unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)

    def forward(self, x):
        return self.unet(x, timestep=10).sample


def build():
    return Denoiser()
"""
AUDIO = """import torch
from torch import nn


class M5(nn.Module):
    \"\"\"Raw audio (B, 1, 8000) through four Conv1d blocks; the last one's (B, C, T) read time-major by the head.\"\"\"

    def __init__(self, classes=10):
        super().__init__()
        layers, c = [], 1
        for width, k, s in ((32, 40, 4), (32, 3, 1), (64, 3, 1), (64, 3, 1)):
            layers += [nn.Conv1d(c, width, k, stride=s), nn.BatchNorm1d(width), nn.ReLU(), nn.MaxPool1d(4)]
            c = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(64 * 7, classes)

    def forward(self, x):
        x = self.features(x)
        return self.head(x.permute(0, 2, 1).reshape(x.shape[0], -1))


def build():
    return M5()
"""

# name → (builder source, input shape, task, extra CLI flags)
CASES = {
    "yolov5nu-detect": (YOLO.format(cls="DetectionModel", yaml="yolov5nu.yaml"), "3,64,64", "detection", []),
    "yolov8n-detect": (YOLO.format(cls="DetectionModel", yaml="yolov8n.yaml"), "3,64,64", "detection", []),
    "yolo11n-detect": (YOLO.format(cls="DetectionModel", yaml="yolo11n.yaml"), "3,64,64", "detection", []),
    "yolov8n-segment": (YOLO.format(cls="SegmentationModel", yaml="yolov8n-seg.yaml"), "3,64,64", "segmentation",
                        []),
    "yolov8n-pose": (YOLO.format(cls="PoseModel", yaml="yolov8n-pose.yaml"), "3,64,64", "pose", []),
    "fcn_resnet50": (TV_SEG.format(name="fcn_resnet50"), "3,64,64", "segmentation", ["--output-key", "out"]),
    "fcn_resnet101": (TV_SEG.format(name="fcn_resnet101"), "3,64,64", "segmentation", ["--output-key", "out"]),
    "deeplabv3_resnet50": (TV_SEG.format(name="deeplabv3_resnet50"), "3,64,64", "segmentation",
                           ["--output-key", "out"]),
    "deeplabv3_resnet101": (TV_SEG.format(name="deeplabv3_resnet101"), "3,64,64", "segmentation",
                            ["--output-key", "out"]),
    "deeplabv3_mobilenet_v3_large": (TV_SEG.format(name="deeplabv3_mobilenet_v3_large"), "3,64,64", "segmentation",
                                     ["--output-key", "out"]),
    "lraspp_mobilenet_v3_large": (TV_SEG.format(name="lraspp_mobilenet_v3_large"), "3,64,64", "segmentation",
                                  ["--output-key", "out"]),
    "fasterrcnn_resnet50_fpn (backbone+FPN)": (TV_DET.format(name="fasterrcnn_resnet50_fpn"), "3,64,64",
                                               "detection features", ["--fidelity", "error"]),
    "fasterrcnn_mobilenet_v3_large_fpn (backbone+FPN)": (TV_DET.format(name="fasterrcnn_mobilenet_v3_large_fpn"),
                                                         "3,64,64", "detection features", ["--fidelity", "error"]),
    "retinanet_resnet50_fpn (backbone+FPN)": (TV_DET.format(name="retinanet_resnet50_fpn"), "3,64,64",
                                              "detection features", ["--fidelity", "error"]),
    "smp Unet (resnet18)": (SMP.format(cls="Unet"), "3,64,64", "segmentation", []),
    "smp FPN (resnet18)": (SMP.format(cls="FPN"), "3,64,64", "segmentation", []),
    "diffusers UNet2DModel": (DIFFUSERS, "3,32,32", "denoising", ["--fidelity", "error"]),
    "audio M5 (Conv1d)": (AUDIO, "1,8000", "audio classification", []),
}

FRESH = """
import sys, torch, prunetool
from prunetool.task import logits
m = prunetool.load(sys.argv[1]).model.eval()
with torch.no_grad():
    torch.save(logits(m(torch.load(sys.argv[2]))).detach(), 'y.pt')
"""


def one(name: str, work: Path, timeout: int) -> dict:
    source, shape, task, flags = CASES[name]
    d = work / "".join(c if c.isalnum() else "_" for c in name)
    d.mkdir()
    (d / "mymodel.py").write_text(source)
    row: dict = {"name": name, "task": task, "commit": commit()}
    env = {**os.environ, "PYTHONPATH": str(d), "YOLO_VERBOSE": "False"}
    make = subprocess.run([sys.executable, "-W", "ignore", "-c",
                           "import torch, mymodel; torch.manual_seed(0); "
                           "torch.save(mymodel.build().eval().state_dict(), 'm.pt')"],
                          cwd=d, env=env, capture_output=True, text=True, timeout=timeout)
    if make.returncode != 0:
        row["error"] = "build: " + (make.stderr.strip().splitlines() or ["?"])[-1][:200]
        return row
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "prunetool", "shrink", "m.pt", "--arch",
                           "mymodel:build", "--input-shape", shape, "--calib", str(CALIB), "--ratio", str(RATIO),
                           "--no-latency", "--out", "small.safetensors", "--onnx", "small.onnx", "--json", "r.json",
                           "-q", "--no-progress", *flags], cwd=d, env=env, capture_output=True, text=True,
                          timeout=timeout)
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["exit"] = proc.returncode
    if not (d / "r.json").exists():
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        return row
    report = json.loads((d / "r.json").read_text())
    row["params"] = (report["before"]["params"], report["after"]["params"])
    row["macs"] = (report["before"]["macs"], report["after"]["macs"])
    row["verify"] = "removal_rel_diff" in report["verify"] and report["verify"].get("reload") == "identical"
    row["onnx"] = report.get("onnx", {}).get("max_abs_diff")
    row["fidelity"] = report.get("fidelity")
    row["protected"] = [p["reason"] for p in report.get("protected", [])][:3]
    row["groups"] = sum(1 for layer in report["layers"] if layer["units_after"] < layer["units_before"])
    # the fresh process: another folder, nothing on its path, no flags
    x = torch.randn((2, *map(int, shape.split(","))), generator=torch.Generator().manual_seed(7))
    with tempfile.TemporaryDirectory() as elsewhere:
        torch.save(x, Path(elsewhere) / "x.pt")
        clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        fresh = subprocess.run([sys.executable, "-W", "ignore", "-c", FRESH, str(d / "small.safetensors"), "x.pt"],
                               cwd=elsewhere, env={**clean, "YOLO_VERBOSE": "False"}, capture_output=True,
                               text=True, timeout=timeout)
        if fresh.returncode != 0:
            row["reload"] = (fresh.stderr.strip().splitlines() or ["?"])[-1][:200]
            return row
        got = torch.load(Path(elsewhere) / "y.pt")
        # the same file loaded beside the user's module (a process of its own: each model's module is "mymodel")
        here = subprocess.run([sys.executable, "-W", "ignore", "-c", FRESH, str(d / "small.safetensors"),
                               str(Path(elsewhere) / "x.pt")], cwd=d, env=env, capture_output=True, text=True,
                              timeout=timeout)
        if here.returncode != 0:
            row["reload"] = "beside the module: " + (here.stderr.strip().splitlines() or ["?"])[-1][:200]
            return row
        row["reload"] = "identical" if torch.equal(got, torch.load(d / "y.pt")) else "differs"
    return row


def _quality(f: dict | None) -> str:
    if not f:
        return "–"
    names = {"miou": "mean IoU", "agreement": "agreement", "output error": "output error"}
    return f"{names[f['metric']]} {f['value']:.1f}%" + (f", cosine {f['cosine']:.3f}" if f.get("cosine") else "")


def markdown(rows: list[dict], seconds: float) -> str:
    lines = [
        "## Beyond classifiers: detectors, segmenters, a diffusion UNet, an audio CNN",
        "",
        f"Command: `python -m benchmarks.coverage_tasks --out docs/COVERAGE.md` · {machine()} · {today()} · "
        f"commit {rows[0]['commit'] if rows else '?'} · {seconds / 60:.1f} min.",
        "",
        f"Each model with random weights, written as a user writes it (a `build()` in their own module), through "
        f"`prunetool shrink m.pt --arch mymodel:build --input-shape … --calib {CALIB} --ratio {RATIO} --out "
        "small.safetensors --onnx small.onnx` (default criterion and compensation). *Verify*: every check of the "
        "verify stage passed and the file reloads identically; *ONNX*: max |onnxruntime − PyTorch| as the command "
        "checked it; *reload*: a fresh process in another folder loads the file with no flags and gives identical "
        "outputs. *Quality*: no labels, so the cut model against the dense one on the calibration inputs (random "
        "weights: these figures say that the measurement works, not how good a trained model's cut is).",
        "",
        "| model | task | params before → after | MACs kept | groups cut | verify | ONNX | reload | quality vs dense "
        "| kept whole (first reasons) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "params" not in r:
            lines.append(f"| {r['name']} | {r['task']} | failed: {r.get('error', '?')} | | | | | | | |")
            continue
        (pb, pa), (mb, ma) = r["params"], r["macs"]
        onnx = f"{r['onnx']:.1g}" if r.get("onnx") is not None else "–"
        why = "; ".join(dict.fromkeys(r.get("protected", []))).replace("|", "/")[:200]
        lines.append(f"| {r['name']} | {r['task']} | {pb:,} → {pa:,} ({pb / pa:.2f}×) | {ma / mb:.2f} | "
                     f"{r['groups']} | {'yes' if r['verify'] else 'no'} | {onnx} | {r.get('reload', '–')} | "
                     f"{_quality(r.get('fidelity'))} | {why} |")
    return "\n".join(lines)


def main() -> None:
    args = table_args(__doc__, "models", 900)
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.only or CASES:
            try:
                row = one(name, Path(d), args.timeout)
            except Exception as e:  # a benchmark row, not the run, fails
                row = {"name": name, "task": CASES[name][2], "commit": commit(), "error": f"{type(e).__name__}: {e}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    publish(args.out, "tasks-coverage", markdown(rows, time.perf_counter() - start))


if __name__ == "__main__":
    main()
