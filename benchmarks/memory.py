"""Memory: peak resident size of ``prunetool shrink`` on bf16 Llama-style checkpoints from 100 M to 1 B parameters.

    python -m benchmarks.memory --out docs/BENCHMARKS.md [--sizes 100m,1b] [--work DIR]

Each model is built here from a config (random weights, ``save_pretrained`` in bfloat16, vocabulary 32000), then
pruned as a user runs it: ``prunetool shrink DIR --tokens 128 --calib 64 --ratio 0.25 --latency-batches 1 --out
OUT --json R`` in a child process, whose peak resident size the kernel reports (``getrusage`` of the child:
everything, imports and the file read back included). The written model is then loaded again in a fresh process
from another directory and compared with the run's report. The target (issue 22): peak ≤ 2 × the bf16 size + 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import ROOT, commit, machine, today, write_section

GIB = 1 << 30
# name: (layers, hidden, intermediate, heads, kv heads)
CONFIGS = {
    "100m": (8, 768, 2048, 12, 4),
    "400m": (12, 1536, 4096, 16, 4),
    "1b": (20, 2048, 5632, 32, 8),
}
BUILD = """
import sys, torch, transformers
layers, hidden, inter, heads, kv = map(int, sys.argv[1:6])
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048)
model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(sys.argv[6])
print(sum(p.numel() for p in model.parameters()))
"""
RELOAD = """
import json, sys, torch, prunetool
model = prunetool.load(sys.argv[1]).model
print(json.dumps({"params": sum(p.numel() for p in model.parameters()),
                  "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
"""
COMMAND = ["--tokens", "128", "--calib", "64", "--ratio", "0.25", "--latency-batches", "1"]


def measure(name: str, work: Path) -> dict:
    src = work / name
    if not (src / "config.json").exists():
        subprocess.run([sys.executable, "-c", BUILD, *map(str, CONFIGS[name]), str(src)], check=True,
                       capture_output=True)
    weights = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    out, report = work / f"{name}.out", work / f"{name}.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    # a fresh child, alone: RUSAGE_CHILDREN's peak is the largest waited-for child's, so it runs before any other
    proc = subprocess.run([sys.executable, "-m", "prunetool", "shrink", str(src), *COMMAND, "--out", str(out),
                           "--json", str(report), "-q"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    if before * 1024 >= peak:
        raise SystemExit(f"{name}: an earlier child's peak hides this one; run one size per process")
    r = json.loads(report.read_text())
    written = r["settings"]["out"]
    with tempfile.TemporaryDirectory() as elsewhere:
        back = json.loads(subprocess.run([sys.executable, "-c", RELOAD, written], cwd=elsewhere, check=True,
                                         capture_output=True, text=True).stdout)
    assert back["params"] == r["after"]["params"], (back, r["after"]["params"])
    return {"model": name, "params": r["before"]["params"], "weights_bytes": weights, "peak_bytes": peak,
            "reported_peak_bytes": r["memory"]["peak_bytes"], "estimate_bytes": r["memory"]["estimate_bytes"],
            "target_bytes": 2 * weights + 2 * GIB, "seconds": seconds, "params_after": r["after"]["params"],
            "reload": r["verify"]["reload"], "reloaded_dtypes": back["dtypes"], "format": r["settings"]["out_format"]}


def markdown(rows: list[dict]) -> str:
    lines = ["## Memory: bf16 LLMs from 100 M to 1 B parameters",
             "",
             f"`python -m benchmarks.memory --out docs/BENCHMARKS.md` — {machine()}, {today()}, commit {commit()}.",
             "",
             "Llama-style models built from a config (random weights, bfloat16, vocabulary 32000), pruned through "
             "the CLI: `prunetool shrink DIR " + " ".join(COMMAND) + " --out OUT --json R`. Peak: the child "
             "process's peak resident size as the kernel counts it (imports, data, the file read back included). "
             "Target (issue 22): ≤ 2 × bf16 size + 2 GiB. Reloaded in a fresh process from another directory.",
             "",
             "| model | parameters | bf16 size | peak | peak ÷ size | target | estimate (before loading) | time | "
             "after | written as | reload |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|"]
    for r in rows:
        ok = "✓" if r["peak_bytes"] <= r["target_bytes"] else "✗"
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.0f} M | {r['weights_bytes'] / GIB:.2f} GiB | "
                     f"{r['peak_bytes'] / GIB:.2f} GiB | {r['peak_bytes'] / r['weights_bytes']:.1f}× | "
                     f"{r['target_bytes'] / GIB:.2f} GiB {ok} | {r['estimate_bytes'] / GIB:.2f} GiB | "
                     f"{r['seconds'] / 60:.1f} min | {r['params_after'] / r['params']:.2f} | {r['format']} "
                     f"({'/'.join(d.replace('torch.', '') for d in r['reloaded_dtypes'])}) | {r['reload']} |")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        lines += ["", f"Growth from {a['model']} to {b['model']}: {b['weights_bytes'] / a['weights_bytes']:.1f}× "
                      f"the weights, {b['peak_bytes'] / a['peak_bytes']:.1f}× the peak; each further GiB of "
                      f"weights costs {(b['peak_bytes'] - a['peak_bytes']) / (b['weights_bytes'] - a['weights_bytes']):.2f}"
                      " GiB of peak."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    parser.add_argument("--sizes", default="100m,1b")
    parser.add_argument("--work", default=None, help="where the models are built (kept for a rerun)")
    parser.add_argument("--one", action="store_true", help="measure one size and print its JSON row")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="prunetool-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(measure(args.sizes, work)))
        return
    rows = []
    for name in args.sizes.split(","):  # one child per size: a child's peak is read alone
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--one", "--sizes", name, "--work",
                               str(work)], cwd=ROOT, capture_output=True, text=True, env={**os.environ})
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    (ROOT / "benchmarks" / "results" / "memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    write_section(Path(args.out), "memory", markdown(rows))


if __name__ == "__main__":
    main()
