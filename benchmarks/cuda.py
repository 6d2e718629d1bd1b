"""The user's runs on a GPU: the same CLI jobs with ``--device cuda`` and ``--device cpu`` on one machine, side by side.

    python -m benchmarks.cuda --out docs/BENCHMARKS.md      # on a machine with a CUDA GPU

Every job is ``prunetool COMMAND SAMPLE FLAGS --device D --out OUT --json J`` in a subprocess, timed from start to
exit. Each CUDA-written file is then read back in a fresh process started in another folder, on the CPU and on the
GPU, and run on one fixed batch: the largest difference between the two outputs says the file written on a GPU
serves on a CPU. ``prunetool bench`` times the dense sample and the CUDA job's file on the GPU at batch 1 and 64.
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

from .common import ROOT, commit, machine, publish, table_args, today

S = ROOT / "samples"
FASHION = ["--data", str(S / "fashion_subset.npz")]
R20 = [str(S / "fashion_resnet20.pt"), "--arch", "samples.nets:ResNet20", *FASHION]
MOBILE = [str(S / "fashion_mobilenet.pt"), "--arch", "samples.nets:MobileNetV2Small", *FASHION]
LLM8 = [str(S / "kjv_llama8"), "--data", str(S / "kjv_tokens.npz")]
JOBS = {
    "resnet20 shrink --target-macs 0.5": ["shrink", *R20, "--target-macs", "0.5"],
    "resnet20 shrink --target-macs 0.5 --recover 30": ["shrink", *R20, "--target-macs", "0.5", "--recover", "30"],
    "mobilenet shrink --target-macs 0.5": ["shrink", *MOBILE, "--target-macs", "0.5"],
    "resnet20 shrink --target-latency 0.8": ["shrink", *R20, "--target-latency", "0.8"],
    "resnet20 lowrank --elbow": ["lowrank", *R20, "--elbow"],
    "kjv_llama8 shrink --target-params 0.7": ["shrink", *LLM8, "--target-params", "0.7"],
    "kjv_llama8 shrink --hidden 0.1 --drop-blocks 2 --target-params 0.7":
        ["shrink", *LLM8, "--hidden", "0.1", "--drop-blocks", "2", "--target-params", "0.7"],
}
SHAPES = {"resnet20": (8, 1, 28, 28), "mobilenet": (8, 1, 28, 28), "kjv_llama8": (2, 128)}

CROSS = """
import sys, torch, prunetool
path, shape = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
torch.manual_seed(0)
x = torch.randint(0, 100, shape) if len(shape) == 2 else torch.randn(shape)
outs = []
for device in ("cpu", "cuda"):
    model = prunetool.load(path).model.to(device).eval()
    with torch.no_grad():
        y = model(x.to(device))
    y = getattr(y, "logits", y)
    outs.append(y.float().cpu())
print((outs[0] - outs[1]).abs().max().item() / max(outs[0].abs().max().item(), 1e-12))
"""


def run(name: str, device: str, work: Path, timeout: int) -> dict:
    out = work / f"{name.split()[0]}-{abs(hash(name)) % 10**6}-{device}"
    out = out.with_suffix(".safetensors") if "llama" not in name else out
    report = work / f"{out.name}.json"
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "prunetool", *JOBS[name], "--device", device,
                               "--out", str(out), "--json", str(report), "-q", "--no-progress"],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"job": name, "device": device, "seconds": timeout, "exit": 124, "error": f"over {timeout} s"}
    row = {"job": name, "device": device, "seconds": round(time.perf_counter() - start, 1), "exit": proc.returncode}
    if proc.returncode != 0 or not report.exists():
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        return row
    r = json.loads(report.read_text())
    m = r.get("metric") or {}
    row.update(metric=m.get("name"), before=m.get("before"), after=m.get("after"), out=str(out),
               params=r["after"]["params"] / r["before"]["params"], reload=r.get("verify", {}).get("reload"))
    return row


def cross(row: dict, timeout: int) -> None:
    """The CUDA-written file read back on the CPU and on the GPU in a fresh process elsewhere: relative max diff."""
    shape = SHAPES[row["job"].split()[0]]
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", CROSS, row["out"], ",".join(map(str, shape))],
                          capture_output=True, text=True, timeout=timeout, cwd=tempfile.gettempdir(),
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    row["cross"] = float(proc.stdout.split()[-1]) if proc.returncode == 0 and proc.stdout.split() else \
        (proc.stderr.strip().splitlines() or ["?"])[-1][:200]


def bench(row: dict, timeout: int) -> None:
    """GPU speed-ups of the CUDA job's file over the dense sample at batch 1 and 64 (``prunetool bench``)."""
    args = JOBS[row["job"]]
    dense, arch = args[1], args[2:4] if args[2] == "--arch" else []
    shape = ["--input-shape", "1,28,28"] if arch else ["--tokens", "128"]
    report = Path(row["out"] + ".bench.json")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "prunetool", "bench", dense, row["out"], *arch,
                           *shape, "--batch-sizes", "1,64", "--device", "cuda", "--no-onnx", "--json", str(report),
                           "--no-progress"], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        row["bench_error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
        return
    for entry in json.loads(report.read_text())["results"]:
        if entry["checkpoint"] == row["out"] and entry["runtime"] == "torch":
            row["speedup"] = {b: v.get("speedup_vs_first") for b, v in entry["batches"].items()}


def markdown(rows: list[dict], gpu: str, host: str) -> str:
    lines = [
        "## On a GPU: the user's runs with --device cuda beside --device cpu",
        "",
        f"Command: `python -m benchmarks.cuda --out docs/BENCHMARKS.md` · {gpu}; {host} · {today()} · commit "
        f"{rows[0].get('commit', '?') if rows else '?'}.",
        "",
        "Each job through the CLI with `--out` and `--json`, once per device on the same machine; wall seconds from "
        "start to exit. *Read back*: the CUDA job's file loaded in a fresh process in another folder on the CPU "
        "and on the GPU, one fixed batch, largest output difference relative to the largest output. *GPU "
        "speed-up*: `prunetool bench` of the dense sample and the CUDA job's file on the GPU, batch 1 / 64.",
        "",
        "| job | metric (dense) | CUDA: after | CPU: after | CUDA s | CPU s | params kept (CUDA) | read back CPU vs GPU "
        "| GPU speed-up 1 / 64 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for job in JOBS:
        c = next((r for r in rows if r["job"] == job and r["device"] == "cuda"), None)
        p = next((r for r in rows if r["job"] == job and r["device"] == "cpu"), None)
        if c is None:
            continue

        def value(r):
            if r is None:
                return "–"
            if "error" in r:  # the one line's message, without the advice to rerun
                return "failed: " + r["error"].split("error: ", 1)[-1].split(" (run again")[0]
            return f"{r['after']:.4g}"
        known = c if "metric" in c else (p or {})
        s = c.get("speedup") or {}
        speed = " / ".join(f"{s[b]:.2f}×" if s.get(b) else "–" for b in ("1", "64")) if s else \
            c.get("bench_error", "–")
        back = c.get("cross")
        kept = f"{c['params']:.3f}" if "params" in c else "–"
        back = f"{back:.1e}" if isinstance(back, float) else (back or "–")
        lines.append(f"| `{job}` | {known.get('metric', '?')} ({known.get('before') or 0:.4g}) | {value(c)} | {value(p)} | "
                     f"{c['seconds']:.0f} | {p['seconds'] if p else '–'} | {kept} | {back} | "
                     f"{speed} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = table_args(__doc__, "jobs", timeout=900)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.cuda needs a CUDA GPU")
    gpu = torch.cuda.get_device_name(0)
    work = Path(tempfile.mkdtemp(prefix="prunetool-cuda-"))
    results = Path(os.environ.get("PRUNETOOL_RESULTS") or ROOT / "benchmarks" / "results" / "cuda.json")
    results.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for device in ("cuda", "cpu"):  # every GPU job first: the point of a short lease
        for job in [j for j in JOBS if not args.only or j in args.only]:
            row = run(job, device, work, args.timeout)
            row["commit"] = os.environ.get("PRUNETOOL_COMMIT") or commit()
            if device == "cuda" and "out" in row:
                cross(row, args.timeout)
                bench(row, args.timeout)
            print(json.dumps(row), flush=True)
            rows.append(row)
            results.write_text(json.dumps({"gpu": gpu, "machine": machine(), "rows": rows}, indent=1))
    publish(args.out, "cuda", markdown(rows, gpu, machine()))


if __name__ == "__main__":
    main()
