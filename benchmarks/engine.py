"""The calibration engine at ImageNet scale: the whole ``shrink`` against one plain forward+backward over the same
calibration set, prunetool 0.1's engine, and Torch-Pruning (magnitude and Taylor), measured in the same run.

    python -m benchmarks.engine --out docs/BENCHMARKS.md                      # about 3 hours on 2 cores
    python -m benchmarks.engine --models resnet18 --old-engine /path/to/prunetool-0.1-checkout

torchvision resnet18, resnet50, mobilenet_v2 and vit_b_16 at 3×224×224 with random weights (seed 0), 1000
calibration images (random, labelled by the model itself, handed over as data so that every method starts from the
same tensors), ratio 0.5, default criterion and compensation. Each measurement runs in a fresh process, which
loads the model and the calibration tensors, then times the work: for prunetool, ``prunetool.shrink(CKPT, DATA,
ratio=0.5, calib=1000, out=FILE, measure=False)`` (load to verified file; no evaluation, no latency); for
Torch-Pruning, its MetaPruner on the same layers (all but the head; for ViT the MLP units only), Taylor
after gradients over the calibration set, then the state_dict saved. Memory: the peak resident size of the
process during the work minus its resident size before it (the model and the calibration tensors).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import ROOT, commit, machine, today, write_section

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "vit_b_16")
OLD_MODELS = ("resnet18", "mobilenet_v2")  # prunetool 0.1 takes hours on the others (one pass per layer)
CALIB = 1000
RATIO = 0.5
TIME_TARGET, MEMORY_TARGET_GB = 3.0, 3.0  # issue 11's targets
METHODS = ("forward+backward", "prunetool", "prunetool 0.1", "torch-pruning magnitude", "torch-pruning taylor")


def measure(method: str, name: str, calib: int, work: str, old: str | None, timeout: int) -> dict:
    at = commit()  # the code the child runs, whatever lands while it does
    env = dict(os.environ)
    env["PYTHONPATH"] = old if method == "prunetool 0.1" else str(ROOT)  # which prunetool the process imports
    cmd = [sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "engine_child.py"), method, name, str(calib),
           work, str(RATIO)]
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "model": name, "error": f"over {timeout} s"}
    if proc.returncode != 0:
        return {"method": method, "model": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), commit=at, date=today())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS,
                        help="rerun these rows only (the others keep their figures in engine.json)")
    parser.add_argument("--calib", type=int, default=CALIB)
    parser.add_argument("--old-engine", help="a checkout of prunetool 0.1 (commit 83b0d72)")
    parser.add_argument("--timeout", type=int, default=6 * 3600)
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = parser.parse_args()
    import torch

    results_path = ROOT / "benchmarks" / "results" / "engine.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []
    work = tempfile.mkdtemp(prefix="prunetool-engine-")
    for name in args.models:
        for method in args.methods:
            if method == "prunetool 0.1" and (args.old_engine is None or name not in OLD_MODELS):
                continue
            row = measure(method, name, args.calib, work, args.old_engine, args.timeout)
            rows = [r for r in rows if (r["model"], r["method"]) != (name, method)] + [row]
            print(json.dumps(row), flush=True)
            results_path.write_text(json.dumps(rows, indent=1))
    write_section(Path(args.out), "engine", markdown(rows, args.calib, torch.get_num_threads()))


def markdown(rows: list[dict], calib: int, threads: int) -> str:
    by = {(r["model"], r["method"]): r for r in rows}
    lines = [
        "## shrink at ImageNet scale: the calibration engine",
        "",
        f"Command: `python -m benchmarks.engine --old-engine PRUNETOOL_0.1_CHECKOUT --out docs/BENCHMARKS.md`, "
        f"{today()}, on {machine()}.",
        "",
        f"torchvision models with random weights at 3×224×224, {calib} calibration images, `--ratio {RATIO}`, default "
        "criterion (mrs) and compensation (lstsq); wall time of the whole `shrink` from loading the checkpoint to "
        "the verified file, without evaluation and latency, and the memory it takes beyond the model and the "
        "calibration tensors (peak resident size minus the resident size before the work; GB = 1024³ bytes). Every "
        "figure is a fresh process on an otherwise idle machine; *×* is the ratio to one plain forward+backward "
        "over the same calibration set (batch 32), marked † where the two rows come from different runs. "
        "prunetool 0.1 reruns the model up to each consumer for every batch; it is measured on "
        "the two smaller models only (hours on the others).",
        "",
        "| model | method | seconds | × forward+backward | memory beyond model and data | parameters after |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for model in MODELS:
        fb = by.get((model, "forward+backward"), {}).get("seconds")
        for method in METHODS:
            r = by.get((model, method))
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {model} | {method} | – | – | {r['error']} | |")
                continue
            other = _run(by[(model, "forward+backward")]) != _run(r) if fb else False
            ratio = f"{r['seconds'] / fb:.2f}×{' †' if other else ''}" if fb else ""
            label = f"**{method}**" if method == "prunetool" else method
            params = f"{r['params_after']:,}" if r.get("params_after") else ""
            lines.append(f"| {model} | {label} | {r['seconds']:.0f} | {ratio} | {r['peak_beyond_mb'] / 1024:.2f} GB | {params} |")
    time_ok, memory_ok = [], []
    for model in MODELS:
        fb, ours = by.get((model, "forward+backward"), {}), by.get((model, "prunetool"), {})
        if "seconds" in fb and "seconds" in ours:
            x, gb = ours["seconds"] / fb["seconds"], ours["peak_beyond_mb"] / 1024
            mark = " †" if _run(fb) != _run(ours) else ""
            time_ok.append(f"{model} {x:.2f}×{mark} {'✓' if x <= TIME_TARGET else '✗'}")
            memory_ok.append(f"{model} {gb:.2f} GB {'✓' if gb <= MEMORY_TARGET_GB else '✗'} "
                             f"(forward+backward alone: {fb['peak_beyond_mb'] / 1024:.2f} GB)")
    if time_ok:
        lines += ["", f"Targets. Whole `shrink` ≤ {TIME_TARGET:g}× one forward+backward: {', '.join(time_ok)}. "
                      f"Memory beyond the model and the calibration tensors ≤ {MEMORY_TARGET_GB:g} GB: "
                      f"{', '.join(memory_ok)}."]
    missing = [f"{method} on {model}" for model in MODELS for method in METHODS
               if method != "prunetool 0.1" and any(m == model for m, _ in by) and (model, method) not in by]
    if missing:
        lines += ["", f"Not measured: {', '.join(missing)}."]
    runs: dict[str, list[str]] = {}
    for r in rows:
        runs.setdefault(_run(r), []).append(f"{r['model']} {r['method']}")
    if len(runs) > 1:
        lines += ["", "Rows by run (`commit` and `date` of each in benchmarks/results/engine.json): "
                      + "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(runs.items())) + "."]
    lines += ["", "On vit_b_16 prunetool removes MLP units and attention heads; Torch-Pruning is given the MLP units "
                  "only (its head pruning needs per-model configuration), so it keeps more parameters."]
    return "\n".join(lines) + "\n"


def _run(row: dict) -> str:
    return f"{row.get('commit', 'commit not recorded')} ({row.get('date', 'date not recorded')})"


if __name__ == "__main__":
    main()
