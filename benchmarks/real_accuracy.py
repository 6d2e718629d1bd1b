"""Accuracy on compact trained models at 2× and 3× fewer MACs, no retraining: the default against the other ways
of choosing what goes, and against baselines re-implemented on prunetool's cut.

    python -m benchmarks.real_accuracy --out docs/BENCHMARKS.md

Every row is a user's run: ``prunetool shrink CKPT --arch ... --data samples/fashion_subset.npz
--target-macs T [flags] --out OUT --json J`` in a subprocess (the report's accuracy is on the full 10 000-image
Fashion-MNIST test set; its reload check reads OUT back to identical outputs), then ``prunetool bench`` times the
dense checkpoint and the row's OUT side by side (one call per row) in PyTorch and ONNX Runtime at batch 1 (speed-ups
are medians of per-round ratios to the dense model, 2 threads). Methods:

- *default*: ``--target-macs T`` (obs criterion, least-squares refit, allocation by sensitivity: the candidate
  whose joint trial cut diverges least);
- *uniform*: ``--allocation uniform`` (one ratio everywhere), and with ``--criterion mrs`` (prunetool before);
- *default, --round-to 8*: unit counts at multiples of 8 (what ONNX Runtime's convolution kernels block by);
- *default, --drop-blocks 2*: two whole residual blocks removed first (those whose removal moves the outputs
  least), the units then cut to the target;
- *default + recover 60 s*: ``--recover 60`` (label-free distillation towards the dense model on the inputs of
  the 2000 training images the npz ships, labels unread; the default ``--lr`` for it, 1e-4);
- *Torch-Pruning magnitude*: ``--criterion l2 --compensate none --allocation uniform`` (its group-L2 importance,
  no compensation, one ratio);
- *Torch-Pruning Taylor*: ``--criterion taylor --compensate none --allocation uniform``;
- *FLAP-style*: ``--compensate mean --scope global`` with uniform allocation off (mean compensation into the
  bias and units ranked across layers; mrs in place of FLAP's fluctuation metric);
- *Wanda-sp*, *ThiNet*: their unit choices (:mod:`benchmarks.peers`) on prunetool's cut at one ratio, Wanda-sp
  without compensation, ThiNet with its least-squares refit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import ROOT, commit, machine, publish, table_args, today

DATA = str(ROOT / "samples" / "fashion_subset.npz")
MODELS = {
    "fashion_resnet20": ("samples.nets:ResNet20", ROOT / "samples" / "fashion_resnet20.pt"),
    "fashion_mobilenet": ("samples.nets:MobileNetV2Small", ROOT / "samples" / "fashion_mobilenet.pt"),
}
TARGETS = {"1.5×": 2 / 3, "2×": 0.5, "3×": 1 / 3}
METHODS = {
    "default": [],
    "uniform": ["--allocation", "uniform"],
    "uniform, mrs": ["--allocation", "uniform", "--criterion", "mrs"],
    "default, --round-to 8": ["--round-to", "8"],
    "default, --drop-blocks 2": ["--drop-blocks", "2"],
    "default + recover 60 s": ["--recover", "60"],
    "Torch-Pruning magnitude": ["--criterion", "l2", "--compensate", "none", "--allocation", "uniform"],
    "Torch-Pruning Taylor": ["--criterion", "taylor", "--compensate", "none", "--allocation", "uniform"],
    "FLAP-style": ["--compensate", "mean", "--scope", "global", "--allocation", "uniform"],
    "Wanda-sp": ["peer", "wanda-sp"],
    "ThiNet": ["peer", "thinet"],
}


BASELINES = ("Torch-Pruning magnitude", "Torch-Pruning Taylor", "FLAP-style", "Wanda-sp", "ThiNet")


def run(model: str, target: float, method: str, work: Path, timeout: int) -> dict:
    arch, ckpt = MODELS[model]
    stem = f"{model}-{target:.3f}-{method.replace(' ', '_').replace('+', 'p')}"
    out, report = work / f"{stem}.safetensors", work / f"{stem}.json"
    start = time.perf_counter()
    flags = METHODS[method]
    command = ["-m", "benchmarks.peers", str(ckpt), "--peer", flags[1]] if flags[:1] == ["peer"] else \
        ["-m", "prunetool", "shrink", str(ckpt), *flags, "--no-latency", "-q", "--no-progress"]
    proc = subprocess.run([sys.executable, "-W", "ignore", *command, "--arch", arch, "--data", DATA,
                           "--target-macs", f"{target:.4f}", "--out", str(out), "--json", str(report)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    row = {"model": model, "target_macs": target, "method": method, "seconds": round(time.perf_counter() - start, 1),
           "exit": proc.returncode, "commit": commit()}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        return row
    r = json.loads(report.read_text())
    row.update(dense=r["before"]["accuracy"], accuracy=r["after"]["accuracy"], drop=r["accuracy_drop"],
               macs=r["after"]["macs"] / r["before"]["macs"], params=r["after"]["params"] / r["before"]["params"],
               reload=r["verify"]["reload"], out=str(out))
    steps = r.get("steps") or [{}]
    if "recover" in steps[-1]:
        row["after_cut"] = steps[-1].get("accuracy_after_cut")
        row["recover_kept"] = steps[-1]["recover"]["kept"]
    return row


def bench(model: str, rows: list[dict], work: Path, timeout: int) -> None:
    """Batch-1 speed-ups over the dense checkpoint in PyTorch and ONNX Runtime, written into ``rows``: one
    ``prunetool bench`` of the dense file and the row's each (with more files held at once, ONNX Runtime read the
    dense ResNet-20 at 0.43 ms where two read 0.27, as it runs alone)."""
    arch, ckpt = MODELS[model]
    for i, row in enumerate(r for r in rows if r.get("out")):
        report = work / f"{model}-bench-{i}.json"
        proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "prunetool", "bench", str(ckpt), row["out"],
                               "--arch", arch, "--input-shape", "1,28,28", "--batch-sizes", "1", "--threads", "2",
                               "--onnx", "--json", str(report), "--no-progress"],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            continue
        for entry in json.loads(report.read_text())["results"]:
            speed = entry["batches"].get("1", {}).get("speedup_vs_first")
            if entry["checkpoint"] == row["out"] and speed is not None:
                row[f"speedup_{'onnxruntime' if entry['runtime'] == 'onnxruntime' else 'pytorch'}"] = speed


def _runs(rows: list[dict]) -> str:
    """Which commit on which machine measured which rows (``--methods`` reruns some of them)."""
    runs: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        methods = runs.setdefault((r["commit"], r.get("machine", "?")), [])
        if r["method"] not in methods:
            methods.append(r["method"])
    if len(runs) == 1:
        (c, m), _ = next(iter(runs.items()))
        return f"{m} · commit {c}"
    return "; ".join(f"{', '.join(ms)}: commit {c}, {m}" for (c, m), ms in runs.items())


def markdown(rows: list[dict], seconds: float) -> str:
    lines = [
        "## Compact trained models: 1.5×, 2× and 3× fewer MACs without retraining (issue 25)",
        "",
        f"Command: `python -m benchmarks.real_accuracy --out docs/BENCHMARKS.md` · {_runs(rows)} · last run "
        f"{today()}, {seconds / 60:.0f} min.",
        "",
        "Fashion-MNIST samples trained here by `samples/train_compact.py` (`samples/fashion_accuracy.json`), "
        "pruned through the CLI with `--target-macs` (MACs kept: the row's column) and `--out`, the file read "
        "back to identical outputs; accuracy on the full 10 000-image test set; 1000 calibration images from "
        "`samples/fashion_subset.npz`. Speed-ups: `prunetool bench` of the dense file and the row's at batch 1, "
        "2 threads (noisy on this shared 2-core machine). Baselines are re-implemented on prunetool's cut "
        "(the method's choice of units and compensation; see the script's docstring).",
        "",
        "| model | target | method | MACs kept | params kept | accuracy (dense) | drop pp | after cut → recovered "
        "| speed-up PyTorch | speed-up ONNX Runtime |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("exit"):
            lines.append(f"| {r['model']} | {r['label']} | {r['method']} | refused: {r.get('error', '')} "
                         "| | | | | | |")
            continue
        rec = f"{r['after_cut']:.2f} → {r['accuracy']:.2f}" + ("" if r.get("recover_kept") else " (not kept)") \
            if "after_cut" in r else ""
        sp = [f"{r[k]:.2f}×" if k in r else "–" for k in ("speedup_pytorch", "speedup_onnxruntime")]
        lines.append(f"| {r['model']} | {r['label']} | {r['method']} | {r['macs']:.3f} | {r['params']:.3f} | "
                     f"{r['accuracy']:.2f} ({r['dense']:.2f}) | {r['drop']:.2f} | {rec} | {sp[0]} | {sp[1]} |")
    lines += ["", "Default against the best baseline at the same target (accuracy drop, pp; lower is better):", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        parts = []
        for label in TARGETS:
            at = {r["method"]: r for r in rows if r["model"] == model and r["label"] == label and not r.get("exit")}
            peers = [at[m] for m in BASELINES if m in at]
            if "default" in at and peers:
                best = min(peers, key=lambda r: r["drop"])
                parts.append(f"{label}: {at['default']['drop']:.2f} vs {best['drop']:.2f} ({best['method']})")
        lines.append(f"- {model}: " + "; ".join(parts))
    return "\n".join(lines)


def main() -> None:
    args = table_args(__doc__, "models", 1800, methods=True)
    start = time.perf_counter()
    results = ROOT / "benchmarks" / "results" / "real_accuracy.json"
    methods = args.methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    kept = [r for r in json.loads(results.read_text()) if r["method"] not in methods] if args.methods else []
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for model in args.only or MODELS:
            mine = []
            for label, target in TARGETS.items():
                for method in methods:
                    row = run(model, target, method, Path(d), args.timeout)
                    row.update(label=label, machine=machine())
                    mine.append(row)
                    print(json.dumps(row), flush=True)
            bench(model, mine, Path(d), args.timeout)
            rows += mine
    for r in rows:
        r.pop("out", None)
    order = {(m, label, method): i for i, (m, label, method) in enumerate(
        (m, label, method) for m in MODELS for label in TARGETS for method in METHODS)}
    rows = sorted(kept + rows, key=lambda r: order.get((r["model"], r["label"], r["method"]), len(order)))
    results.write_text(json.dumps(rows, indent=1) + "\n")
    publish(args.out, "real-accuracy", markdown(rows, time.perf_counter() - start))


if __name__ == "__main__":
    main()
